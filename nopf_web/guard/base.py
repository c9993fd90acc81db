"""The Guard interface: drop our own RST / FIN+ACK that would close a NAT mapping.

Engines call :meth:`Guard.protect` around a punch window; a guard that cannot
run (no privileges, no backend) is a :class:`NullGuard` that says why.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol


@dataclass
class Protection:
    """One protected window: what it covers and how many packets it dropped."""

    local_port: int
    peer: tuple[str, int] | None
    dropped: int = 0


class Guard(Protocol):
    @property
    def active(self) -> bool: ...

    @property
    def reason(self) -> str | None:
        """Why the guard is inactive (None when active)."""

    @property
    def dropped(self) -> int:
        """Packets dropped since start, all windows together."""

    def protect(
        self, local_port: int, peer: tuple[str, int] | None
    ) -> contextlib.AbstractContextManager[Protection]: ...


class NullGuard:
    """A guard that guards nothing, and says why."""

    def __init__(self, reason: str = "disabled with --no-guard") -> None:
        self._reason = reason

    @property
    def active(self) -> bool:
        return False

    @property
    def reason(self) -> str | None:
        return self._reason

    @property
    def dropped(self) -> int:
        return 0

    @contextlib.contextmanager
    def protect(self, local_port: int, peer: tuple[str, int] | None) -> Iterator[Protection]:
        yield Protection(local_port, peer)
