"""Local reads that become records without a copy (the sending end's hot path).

A local read lands in a :class:`Slab` behind :data:`HEADROOM` free bytes. A
large read goes to its stream as the slab's view (:meth:`Slab.view`), which the
mux queues and the resume layer keeps for replay by reference, as it keeps
``bytes``. When a record carries exactly that view after its headers (a bulk
stream's every record: resume header, mux DATA header, one whole read), the
record machine writes the headers into the headroom and seals the slab in
place (:meth:`nopf_web.tunnel.record_machine.RecordMachine.seal`) instead of
copying headers and read into its plaintext buffer: one memory pass less per
record (perf: 9 % of the sending end's samples were that copy). Only a stream
alone on its tunnel reads into slabs: with several, the mux cuts reads into
turns that share a record (sealed part by part, also without a copy), and the
forwarder reads as asyncio's ``bytes`` (``tunnel.forward._Local``).

Why a slab may be kept like ``bytes`` (``UNCHANGING_WHILE_VIEWED``):
:meth:`SlabPool.take` hands a slab out for the next read only when nothing
refers to it any more (:func:`nopf_web.buffers.unviewed`: the resume layer
dropped it at the peer's ack, the mux sent it, the forwarder let go). The
headroom, which the record machine rewrites, is never inside a view that
outlives the call that made it.

Memory is bounded; slabs that were not (2026-12-05, reverted: each tunnel end
held 168-246 MiB in the soak, not 71-80) let small reads pin whole slabs and
kept every slab they made:

- a read under half a slab (:attr:`SlabPool.lend_min`) is copied out into its own
  ``bytes`` and the slab is read into again, so a view pins at most twice
  its bytes, and an interactive stream's few bytes pin nothing;
- the pool has at most :data:`POOLED` slabs to lend. When all of them are
  viewed (slow acks), the forwarder reads as asyncio's own ``bytes`` until one is free
  (:meth:`SlabPool.has_free`). A read that finds none free all the same (the
  last free one was just taken) goes into the pool's scratch slab, which is
  never lent, and is copied out. (Tried on ten streams, before they read as
  bytes: a fresh slab per such read cost a zero-filled 1 MiB each, and
  reading every one into the scratch and copying it out cost the sender
  0.03-0.08 CPU-s/GB more than asyncio's reads: docs/BENCHMARKS.md.)

No I/O here: machines may import it.
"""

from __future__ import annotations

from nopf_web.buffers import unviewed

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
        super().__init__(HEADROOM + size)
        self.filled = 0

    def room(self) -> memoryview:
        """Where the next read goes."""
        return memoryview(self)[HEADROOM:]

    def view(self, n: int) -> memoryview:
        """The first ``n`` bytes read, as the stream queues them (the record machine
        knows a view of all ``filled`` bytes by its length)."""
        self.filled = n
        return memoryview(self)[HEADROOM : HEADROOM + n]


class SlabPool:
    """Slabs for one tunnel end's local reads (shared by its streams): at most
    ``keep`` to lend, each reused once nothing views it, and one scratch slab
    that is never lent. Reads are synchronous (``get_buffer``, ``recv_into``,
    ``buffer_updated`` in one call), so one scratch serves every stream."""

    def __init__(self, size: int = LOCAL_READ_SIZE, keep: int = POOLED) -> None:
        self.size = size
        self.lend_min = size // 2  # smaller reads are copied out (see the module docstring)
        self.keep = keep
        self._slabs: list[Slab] = []
        self.scratch = Slab(size)  # read into when none can be lent; copied out

    def take(self) -> Slab:
        """A slab nothing refers to: a kept one, a new one while fewer than ``keep``
        exist, else the scratch. The caller's reference makes it taken until dropped."""
        slabs = self._slabs
        for i in range(len(slabs)):
            if unviewed(slabs, i):
                return slabs[i]
        if len(slabs) < self.keep:
            slabs.append(Slab(self.size))
            return slabs[-1]
        return self.scratch

    def has_free(self) -> bool:
        """:meth:`take` would give a slab it may lend."""
        slabs = self._slabs
        return len(slabs) < self.keep or any(unviewed(slabs, i) for i in range(len(slabs)))

    @property
    def kept(self) -> int:
        """Slabs it may lend, made so far (at most ``keep``)."""
        return len(self._slabs)

    @property
    def made(self) -> int:
        """Slabs allocated: the kept ones and the scratch (it never makes others)."""
        return len(self._slabs) + 1
