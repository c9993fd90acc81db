"""Read-only attributes that a driver shows from the object it wraps.

A driver (the tunnel's ``Mux`` and ``SecureChannel``, nopf-server's rendezvous and
NAT doctor responder) keeps its state in its sans-IO machine, and the seed engine its
byte counts in its pipe's ``Counters``: those values are read through, never copied
(a copy could drift from what the machine acts on).
"""

from __future__ import annotations

from typing import Any, Generic, Self, TypeVar, overload

T = TypeVar("T")


class Delegated(Generic[T]):
    """``owner.<name>`` reads ``owner.<holder>.<attribute>`` (``attribute``
    defaults to the same name); it cannot be set.

    ``bytes_in = Delegated[int]("_machine")`` in a class body makes
    ``obj.bytes_in`` return ``obj._machine.bytes_in``.
    """

    def __init__(self, holder: str, attribute: str | None = None, *, doc: str | None = None
                 ) -> None:
        self.holder = holder
        self.attribute = attribute or ""  # set by __set_name__ when not given
        self.__doc__ = doc

    def __set_name__(self, owner: type, name: str) -> None:
        self.attribute = self.attribute or name

    @overload
    def __get__(self, obj: None, objtype: type | None = None) -> Self: ...
    @overload
    def __get__(self, obj: object, objtype: type | None = None) -> T: ...

    def __get__(self, obj: object | None, objtype: type | None = None) -> Self | T:
        if obj is None:
            return self  # on the class: the descriptor itself (for help() and tests)
        value: T = getattr(getattr(obj, self.holder), self.attribute)
        return value

    def __set__(self, obj: Any, value: T) -> None:
        raise AttributeError(f"{self.attribute} is read-only: it is {self.holder}'s")
