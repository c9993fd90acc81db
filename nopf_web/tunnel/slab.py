"""Read buffers that become records without a copy (the sending end's hot path).

A local read lands in a :class:`Slab` behind :data:`HEADROOM` free bytes. The
stream's data is a view of the slab (``slab.view()``), which the mux queues
and the resume layer keeps for replay by reference, as it keeps ``bytes``.
When a record carries exactly that view after its headers (a bulk stream's
every record: resume header, mux DATA header, one whole read), the record
machine writes the headers into the headroom and seals the slab's bytes in
place (:meth:`nopf_web.tunnel.record_machine.RecordMachine.seal`), instead of
copying headers and read into its plaintext buffer.

Why a slab may be trusted not to change, as ``bytes`` are: a ``bytearray``
cannot change size while any view of it exists (``BufferError``), and
:meth:`SlabPool.take` hands a slab out again only once it can (the resume
layer dropped its replay entry at the peer's ack, nobody else holds a view).
The headroom, which the record machine rewrites, is never inside a view that
outlives the call that made it.

No I/O here: machines may import it.
"""

from __future__ import annotations

from collections import deque

HEADROOM = 256  # resume header (17), control frames, DATA header (9): usually 26 bytes
READ_SIZE = 256 * 1024  # one local read, as asyncio's Protocol reads (the mux's largest frame)
# Reads smaller than this are copied out and the slab reused: a slab pins
# 256 KiB while its view waits in the replay buffer, too much for a few bytes.
MIN_LENT = 128 * 1024
# Slabs lent out and tracked for reuse: enough for the replay buffer (8 MiB)
# and the records in flight; older ones are left to the garbage collector.
MAX_TRACKED = 48
MAX_FREE = 4  # slabs kept for reuse while nothing is lent


class Slab(bytearray):
    """A read buffer: :data:`HEADROOM` bytes, then room for one read.
    ``filled``: the bytes read (the data is ``slab[HEADROOM : HEADROOM + filled]``)."""

    __slots__ = ("filled",)

    def __init__(self, size: int = READ_SIZE) -> None:
        super().__init__(HEADROOM + size + 1)
        del self[-1]  # the spare byte makes in_use() a resize that never moves the buffer
        self.filled = 0

    def room(self) -> memoryview:
        """Where the next read goes."""
        return memoryview(self)[HEADROOM:]

    def view(self) -> memoryview:
        """The data read: what the stream queues (the record machine recognises it)."""
        return memoryview(self)[HEADROOM : HEADROOM + self.filled]

    def in_use(self) -> bool:
        """Some view of the slab still exists (it must not be written)."""
        try:
            self.append(0)  # within its allocation: no copy
        except BufferError:
            return True
        del self[-1]
        return False


class SlabPool:
    """Slabs for one tunnel end's local reads, reused once nothing views them."""

    def __init__(self, size: int = READ_SIZE) -> None:
        self.size = size
        self._lent: deque[Slab] = deque()  # oldest first: acks free them in this order
        self._free: list[Slab] = []
        self.made = 0  # slabs allocated (tests and benchmarks look)

    def take(self) -> Slab:
        """A slab nobody views (a fresh one if none is)."""
        free, lent = self._free, self._lent
        while free:
            slab = free.pop()
            if not slab.in_use():
                return slab
        if lent and not lent[0].in_use():
            return lent.popleft()
        self.made += 1
        return Slab(self.size)

    def lend(self, slab: Slab) -> None:
        """``slab``'s view went to the stream: reuse it once the view is gone."""
        lent = self._lent
        lent.append(slab)
        if len(lent) > MAX_TRACKED:
            lent.popleft()  # forgotten: freed when its views are

    def give_back(self, slab: Slab) -> None:
        """``slab`` was not lent (its read was copied out): reuse it."""
        if len(self._free) < MAX_FREE:
            self._free.append(slab)
