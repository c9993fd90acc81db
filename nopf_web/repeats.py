"""Said once, then counted: what keeps a burst of one problem to a few lines.

A browser that opens thirty connections to a shared service that is down would
otherwise write thirty identical lines to stderr and thirty rows to the
dashboard's history, on both peers. :class:`Repeats` says a message at once;
the same message again (stream ids aside: ``stream 98 was reset`` and ``stream
100 was reset`` are one problem) within ``every`` seconds is counted, and the
count is said once that time has passed, with the last of them:

    cannot reach the shared service at 127.0.0.1:80 (nothing is listening there)
    cannot reach the shared service at 127.0.0.1:80 (nothing is listening there)
        (29 more like it in the last 10 s)

No I/O and no clock of its own: the caller feeds messages with the time and asks
for what is due (:meth:`Repeats.due`) at :meth:`Repeats.deadline`, and for what
is left (:meth:`Repeats.flush`) when it ends.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

REPEAT_EVERY: Final = 10.0  # s: a repeated message is said, with its count, at most this often
MAX_KINDS: Final = 64  # distinct messages tracked at once; beyond, the oldest count is said

_STREAM_ID: Final = re.compile(r"\bstream \d+\b")


def kind_of(message: str) -> str:
    """What makes two messages the same problem: the text without its stream ids."""
    return _STREAM_ID.sub("stream", message)


@dataclass
class _Kind:
    said_at: float  # when a line of this kind was last said
    count: int = 0  # messages since then, not said
    last: str = ""  # the latest of them


class Repeats:
    """Which messages to say now, and which to count (see the module docstring)."""

    def __init__(self, every: float = REPEAT_EVERY) -> None:
        if every <= 0:
            raise ValueError("the repeat interval must be positive")
        self.every = every
        self._kinds: dict[str, _Kind] = {}  # insertion order: the oldest said first

    def feed(self, message: str, now: float) -> list[str]:
        """The lines to say now for ``message``: itself, or nothing (counted)."""
        key = kind_of(message)
        kind = self._kinds.get(key)
        if kind is not None and now - kind.said_at < self.every:
            kind.count += 1
            kind.last = message
            return []
        lines = [] if kind is None else self._counted(kind, now)  # not asked for in time
        self._kinds.pop(key, None)
        self._kinds[key] = _Kind(now)
        if len(self._kinds) > MAX_KINDS:
            oldest = next(iter(self._kinds))
            lines += self._counted(self._kinds.pop(oldest), now)
        return [*lines, message]

    def deadline(self) -> float | None:
        """When :meth:`due` has something to say or to forget next (None: nothing held)."""
        return min((kind.said_at + self.every for kind in self._kinds.values()), default=None)

    def due(self, now: float) -> list[str]:
        """The counts whose interval has passed; a kind with nothing counted is
        forgotten then (its next message is said at once)."""
        lines: list[str] = []
        for key, kind in list(self._kinds.items()):
            if now - kind.said_at < self.every:
                continue
            if kind.count:
                lines += self._counted(kind, now)
                kind.said_at, kind.count = now, 0
            else:
                del self._kinds[key]
        return lines

    def flush(self, now: float) -> list[str]:
        """Every count not said yet (at the end); then nothing is held."""
        lines = [line for kind in self._kinds.values() for line in self._counted(kind, now)]
        self._kinds.clear()
        return lines

    @staticmethod
    def _counted(kind: _Kind, now: float) -> list[str]:
        if not kind.count:
            return []
        more = "1 more like it" if kind.count == 1 else f"{kind.count} more like it"
        return [f"{kind.last} ({more} in the last {max(1, round(now - kind.said_at))} s)"]
