"""The Guard interface: drop our own RST / FIN+ACK that would close a NAT mapping.

Engines enter ``async with guard.protect(port, peer)`` around a punch window
(an async context manager: opening and closing a window never holds the event
loop); a guard that cannot run (no privileges, no backend) is a
:class:`NullGuard` that says why.

A guard is a supervised service: ``start()`` / ``stop()`` (or ``async with
guard:``) bracket its life, and ``stop()`` leaves no packet filter behind.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol


@dataclass
class Protection:
    """One protected window: what it covers and how many packets it dropped.

    ``guarded`` says whether a packet filter really covered the window;
    ``error`` why not, when a working guard could not protect this one.
    """

    local_port: int
    peer: tuple[str, int] | None
    dropped: int = 0
    guarded: bool = False
    error: str | None = None


@dataclass(frozen=True)
class GuardStatus:
    """What pages and ``GET /api/guard`` show of a guard."""

    active: bool
    reason: str | None  # why it is inactive (None when active)
    dropped: int  # packets dropped since start, all windows together

    @classmethod
    def of(cls, guard: Guard) -> GuardStatus:
        return cls(guard.active, guard.reason, guard.dropped)


class Guard(Protocol):
    @property
    def active(self) -> bool: ...

    @property
    def reason(self) -> str | None:
        """Why the guard is inactive (None when active)."""

    @property
    def dropped(self) -> int:
        """Packets dropped since start, all windows together."""

    def start(self) -> None:
        """Begin supervising (idempotent)."""

    def stop(self) -> None:
        """End every open window, removing its packet filter (idempotent)."""

    def protect(
        self, local_port: int, peer: tuple[str, int] | None
    ) -> contextlib.AbstractAsyncContextManager[Protection]:
        """``async with``: drop our RST / FIN+ACK from ``local_port`` to ``peer`` inside."""


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

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    async def __aenter__(self) -> NullGuard:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        pass

    @contextlib.asynccontextmanager
    async def protect(self, local_port: int,
                      peer: tuple[str, int] | None) -> AsyncIterator[Protection]:
        yield Protection(local_port, peer)
