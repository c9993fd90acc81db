"""Local reads that become records without a copy (the sending end's hot path).

A local read lands in a :class:`Slab` behind :data:`HEADROOM` free bytes. A
large read goes to its stream as the slab's view (:meth:`Slab.view`), which the
mux queues and the resume layer keeps for replay by reference, as it keeps
``bytes``. When a record carries exactly that view after its headers (a bulk
stream's every record: resume header, mux DATA header, one whole read), the
record machine writes the headers into the headroom and seals the slab in
place (:meth:`nopf_web.tunnel.record_machine.RecordMachine.seal`) instead of
copying headers and read into its plaintext buffer: one memory pass less per
record (perf: 9 % of the sending end's samples were that copy).

Why a slab may be kept like ``bytes`` (``UNCHANGING_WHILE_VIEWED``): a
``bytearray`` cannot change size while a view of it exists (``BufferError``),
which :meth:`Slab.in_use` tests, and :meth:`SlabPool.take` hands a slab out
for the next read only when nothing views it (the resume layer dropped it at
the peer's ack, the mux sent it). The headroom, which the record machine
rewrites, is never inside a view that outlives the call that made it.

Memory is bounded; slabs that were not (2026-12-05, reverted: each tunnel end
held 168-246 MiB in the soak, not 71-80) let small reads pin whole slabs and
kept every slab they made:

- a read under half a slab (:attr:`SlabPool.lend_min`) is copied out into its own
  ``bytes`` and the slab is read into again, so a view pins at most twice
  its bytes, and an interactive stream's few bytes pin nothing;
- the pool keeps at most :data:`POOLED` slabs. When all of them are viewed
  (a slow peer's acks), a read gets a fresh slab that nobody keeps: it is
  freed with its last view, as a read's ``bytes`` are.

No I/O here: machines may import it.
"""

from __future__ import annotations

HEADROOM = 256  # resume header (17), control frames, DATA header (9): usually 26 bytes
# One local read at most. Asyncio's Protocol reads 256 KiB; a bulk sender's
# data are waiting in the socket, and each read costs a loop iteration, a feed
# and a flush whatever its size (docs/BENCHMARKS.md, "Larger local reads").
# A slab (this plus HEADROOM) stays under the 1 MiB malloc mmap threshold the
# resume layer sets (resumable._keep_freed_memory): a fresh slab comes from the
# heap, not from a new mapping whose pages fault in.
LOCAL_READ_SIZE = 1020 * 1024
# Slabs kept for reuse per tunnel end: one bulk stream has a read in the
# socket, one queued, and up to the resume layer's ack interval (2 MiB) plus a
# round trip's worth waiting for the ack.
POOLED = 8


class Slab(bytearray):
    """A read buffer: :data:`HEADROOM` bytes, then room for one read.
    ``filled``: the bytes of the read its views show (``view``)."""

    __slots__ = ("filled",)
    UNCHANGING_WHILE_VIEWED = True

    def __init__(self, size: int = LOCAL_READ_SIZE) -> None:
        super().__init__(HEADROOM + size + 1)
        del self[-1]  # the spare byte makes in_use() a resize that never moves the buffer
        self.filled = 0

    def room(self) -> memoryview:
        """Where the next read goes."""
        return memoryview(self)[HEADROOM:]

    def view(self, n: int) -> memoryview:
        """The first ``n`` bytes read, as the stream queues them (the record machine
        knows a view of all ``filled`` bytes by its length)."""
        self.filled = n
        return memoryview(self)[HEADROOM : HEADROOM + n]

    def in_use(self) -> bool:
        """Some view of the slab still exists: it must not be written."""
        try:
            self.append(0)  # within its allocation: nothing moves
        except BufferError:
            return True
        del self[-1]
        return False


class SlabPool:
    """Slabs for one tunnel end's local reads (shared by its streams), reused once
    nothing views them; at most ``keep`` of them are kept."""

    def __init__(self, size: int = LOCAL_READ_SIZE, keep: int = POOLED) -> None:
        self.size = size
        self.lend_min = size // 2  # smaller reads are copied out (see the module docstring)
        self.keep = keep
        self._slabs: list[Slab] = []
        self.made = 0  # slabs allocated, kept or not (tests and benchmarks look)

    def take(self) -> Slab:
        """A slab nothing views: a kept one, else a new one (kept if there is room)."""
        slabs = self._slabs
        for slab in slabs:
            if not slab.in_use():
                return slab
        slab = Slab(self.size)
        self.made += 1
        if len(slabs) < self.keep:
            slabs.append(slab)
        return slab

    @property
    def kept(self) -> int:
        return len(self._slabs)
