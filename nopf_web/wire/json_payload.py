"""The JSON payload rules that coordinated mode (:mod:`nopf_web.wire.rendezvous`,
docs/protocol.md §6 "Frames") and the NAT doctor's protocol
(:mod:`nopf_web.wire.doctor`, §7: the same frame format) share.

A frame is a 4-byte big-endian length, then that many bytes of payload (see
``rendezvous.FrameReader``). The payload is one JSON object, UTF-8, with a
string field "type". Decoding is strict: no duplicate keys, no NaN or
Infinity, no unknown field, a bool is not a number, every value in its range,
text one printable line of at most ``MAX_TEXT`` characters. Each protocol
raises its own error type (``error``), and names the field as ``kind.name``.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from typing import Any

from .errors import WireError

MAX_TEXT = 300  # characters of a text field (an error message, a note)


def load_object(payload: bytes, error: type[WireError]) -> dict[str, Any]:
    """The payload's JSON object, or ``error`` saying why it is none."""

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj: dict[str, Any] = {}
        for key, value in pairs:
            if key in obj:
                raise error(f"duplicate field {key!r}")
            obj[key] = value
        return obj

    def reject_constant(name: str) -> Any:
        raise error(f"{name} is not valid JSON here")

    try:
        obj = json.loads(payload.decode("utf-8"), object_pairs_hook=no_duplicates,
                         parse_constant=reject_constant)
    except UnicodeDecodeError:
        raise error("frame payload is not UTF-8") from None
    except RecursionError:
        raise error("frame payload is nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise error(f"frame payload is not JSON ({exc.msg} at {exc.pos})") from None
    if not isinstance(obj, dict):
        raise error("frame payload must be a JSON object")
    return obj


def message_type(obj: dict[str, Any], allowed: frozenset[str], error: type[WireError]) -> str:
    """The object's "type", one of ``allowed``."""
    kind = obj.get("type")
    if not isinstance(kind, str) or kind not in allowed:
        raise error(f"unexpected message type {kind!r:.40} (expected one of "
                    f"{', '.join(sorted(allowed))})")
    return kind


def present(value: Any) -> Any:
    """A field read without ``optional``: it was there (or the read raised).
    Any: a text read with ``choices`` is one of a ``Literal``'s values."""
    assert value is not None
    return value


def integer(value: Any, what: str, lo: int, hi: int, error: type[WireError]) -> int:
    """A JSON integer (not a bool, not 1.0) in ``lo..hi``."""
    if type(value) is not int:
        raise error(f"{what} must be an integer, got {value!r:.40}")
    if not lo <= value <= hi:
        raise error(f"{what} = {value} is out of range ({lo}-{hi})")
    return value


def text(value: Any, what: str, error: type[WireError],
         choices: frozenset[str] | None = None) -> str:
    """One printable line of at most ``MAX_TEXT`` characters (one of ``choices``)."""
    if not isinstance(value, str):
        raise error(f"{what} must be a string, got {value!r:.40}")
    if choices is not None and value not in choices:
        raise error(f"{what} = {value!r:.40} is not one of {', '.join(sorted(choices))}")
    if len(value) > MAX_TEXT or not value.isprintable():
        raise error(f"{what} must be one printable line of at most {MAX_TEXT} characters")
    return value


_Int = int  # (inside Fields, "int" is its method)


class Fields:
    """Typed access to one JSON object's fields, failing with ``error`` naming the field.

    A read without ``optional`` raises if the field is absent; with it, an
    absent field (or null) is None.
    """

    def __init__(self, obj: dict[str, Any], kind: str, allowed: set[str] | frozenset[str],
                 error: type[WireError]) -> None:
        extra = set(obj) - allowed - {"type"}
        if extra:
            raise error(f"{kind} message has unknown field(s): {', '.join(sorted(extra))}")
        self.obj = obj
        self.kind = kind
        self.error = error

    def require(self, names: set[str]) -> None:
        """All of ``names`` are there (checked up front: the first missing one is named)."""
        missing = names - set(self.obj)
        if missing:
            raise self.error(f"{self.kind} message lacks field {sorted(missing)[0]!r}")

    def _get(self, name: str, optional: bool) -> Any:
        if name not in self.obj:
            if optional:
                return None
            raise self.error(f"{self.kind} message lacks field {name!r}")
        return self.obj[name]

    def int(self, name: str, lo: _Int, hi: _Int, *, optional: bool = False) -> _Int | None:
        value = self._get(name, optional)
        if value is None and optional:
            return None
        return integer(value, f"{self.kind}.{name}", lo, hi, self.error)

    def num(self, name: str, lo: float, hi: float) -> float:
        value = self._get(name, False)
        if type(value) not in (int, float) or not math.isfinite(value):
            raise self.error(f"{self.kind}.{name} must be a number, got {value!r:.40}")
        if not lo <= value <= hi:
            raise self.error(f"{self.kind}.{name} = {value} is out of range ({lo:g}-{hi:g})")
        return float(value)

    def text(self, name: str, *, optional: bool = False,
             choices: frozenset[str] | None = None) -> str | None:
        value = self._get(name, optional)
        if value is None and optional:
            return None
        return text(value, f"{self.kind}.{name}", self.error, choices)

    def b64(self, name: str, size: _Int, what: str, *, optional: bool = False) -> bytes | None:
        """``size`` bytes as standard base64 with padding, in its one spelling."""
        value = self._get(name, optional)
        if value is None and optional:
            return None
        chars = 4 * ((size + 2) // 3)
        if not isinstance(value, str) or len(value) != chars:
            raise self.error(f"{self.kind}.{name} must be {chars} characters of base64 "
                             f"({what}), got {value!r:.60}")
        try:
            data = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise self.error(f"{self.kind}.{name} is not valid base64") from None
        if len(data) != size or base64.b64encode(data).decode("ascii") != value:
            raise self.error(f"{self.kind}.{name} must encode exactly {size} bytes")
        return data

    def flag(self, name: str, *, optional: bool = False) -> bool | None:
        value = self._get(name, optional)
        if value is None and optional:
            return None
        if type(value) is not bool:
            raise self.error(f"{self.kind}.{name} must be true or false, got {value!r:.40}")
        return value
