"""Pacing of local bulk reads: short loop iterations while an interactive stream
shares the tunnel with several bulk ones.

A tunnel end reads each ready local socket once per loop iteration, and the
mux sends what the iteration read when it ends. With ten bulk streams that
is ten reads of up to 256 KiB, some 4 MB sealed and sent an iteration, and
every other stream's bytes (a keystroke, a request, the reply to one) wait
for the iteration in progress: round trips of 6 ms on a new stream among ten
bulk ones, against ssh's 3 (docs/BENCHMARKS.md, "A new stream among ten bulk
ones").

So while some open stream's reader is interactive (its last read was small),
a bulk reader is held after each read, and also when its stream's credit
comes back (one record brings credit for many streams, whose readers all
resumed in the next iteration). Each loop iteration releases held readers
until the reads expected of them fill :data:`ITERATION_BUDGET`. With bulk
streams only (the throughput case), one bulk stream beside others, or
streams that have read nothing yet (new or idle ones), no reader is held.
"""

from __future__ import annotations

from collections import deque

# A local read this large is a bulk sender's: that much was waiting in its
# socket. An interactive stream's reads (keystrokes, requests, replies) are smaller.
BULK_READ = 64 * 1024
# Bulk bytes read per loop iteration while readers are held: two of uvloop's
# reads, about a millisecond of a tunnel end's reading, sealing and sending.
ITERATION_BUDGET = 512 * 1024


class ReadPacer:
    """Which bulk readers of one tunnel read in the next loop iteration."""

    __slots__ = ("_bulk", "_held", "_interactive", "budget", "bulk_read")

    def __init__(self, *, budget: int = ITERATION_BUDGET, bulk_read: int = BULK_READ) -> None:
        self.budget = budget
        self.bulk_read = bulk_read
        self._bulk: dict[int, int] = {}  # the open streams' bulk readers: their last read's size
        self._interactive: set[int] = set()  # open streams whose last read was small
        self._held: deque[tuple[int, int]] = deque()  # (stream id, expected read), oldest first

    @property
    def holding(self) -> bool:
        """Some reader is held: release some in the next loop iteration."""
        return bool(self._held)

    def read(self, stream_id: int, size: int) -> bool:
        """Stream ``stream_id``'s reader read ``size`` bytes: True to read on, False
        to pause until released."""
        if size < self.bulk_read:
            self._bulk.pop(stream_id, None)
            self._interactive.add(stream_id)
            return True
        self._interactive.discard(stream_id)
        self._bulk[stream_id] = size
        return not self.hold(stream_id)

    def hold(self, stream_id: int) -> bool:
        """Stream ``stream_id``'s reader may read again (its stream's credit came
        back): True if it is held instead, until released.

        Only bulk readers are held, and only while at least two streams read bulk
        and some stream reads small: with one bulk reader an iteration reads no
        more than its one read anyway, and with no interactive reader nobody
        waits for the iteration to end."""
        bulk = self._bulk
        size = bulk.get(stream_id)
        if size is None or len(bulk) < 2 or not self._interactive:
            return False
        self._held.append((stream_id, size))
        return True

    def release(self) -> list[int]:
        """A new loop iteration: the held readers to resume now, oldest first, as
        many as the reads expected of them fit in the budget (at least one)."""
        held = self._held
        released: list[int] = []
        expected = 0
        while held and (not released or expected + held[0][1] <= self.budget):
            stream_id, size = held.popleft()
            released.append(stream_id)
            expected += size
        return released

    def forget(self, stream_id: int) -> None:
        """Stream ``stream_id`` ended: it reads no more. (Were its reader held,
        :meth:`release` names it in turn; the driver finds no stream.)"""
        self._bulk.pop(stream_id, None)
        self._interactive.discard(stream_id)

    def clear(self) -> None:
        """The tunnel ended: nobody is held."""
        self._held.clear()
        self._bulk.clear()
        self._interactive.clear()
