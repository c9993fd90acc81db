"""The one timer an asyncio driver keeps for its sans-IO machine's next deadline."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class DeadlineTimer:
    """Call ``due(now)`` no later than the deadline last given to :meth:`arm`.

    A timer already due first is kept (its tick re-arms): deadlines that move
    later, as when a seed client's connection ends, cost no cancel and
    re-schedule each.
    """

    __slots__ = ("_at", "_clock", "_due", "_handle")

    def __init__(self, clock: Callable[[], float], due: Callable[[float], None]) -> None:
        self._clock = clock
        self._due = due
        self._handle: asyncio.TimerHandle | None = None
        self._at: float | None = None

    def arm(self, at: float | None) -> None:
        if at is None or (self._at is not None and self._at <= at):
            return
        if self._handle is not None:
            self._handle.cancel()
        self._at = at
        self._handle = asyncio.get_running_loop().call_later(max(0.0, at - self._clock()),
                                                             self._fire)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._handle = self._at = None

    def _fire(self) -> None:
        self._handle = self._at = None
        self._due(self._clock())
