"""Local TCP connections <-> tunnel streams, both ways, with half-close.

- Sharer (:func:`serve_share`): each stream the peer opens becomes a connection
  to the local service; if that connect fails the stream is reset with the reason.
- Connector (:func:`serve_connect`): each connection accepted on the local
  listener becomes a new stream.

EOF on one side becomes FIN (or ``shutdown(SHUT_WR)``) on the other; a
stream reset aborts the local connection with a TCP RST, and a failed local
connection resets its stream. Both functions run until the tunnel ends:
they return after a clean close and raise the tunnel's failure otherwise,
cancelling and awaiting every per-connection task on the way out.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable, Coroutine, Iterator, Sequence
from typing import Any

from nopf_web.repeats import Repeats
from nopf_web.sockets import (
    LINGER_RESET,
    connect_tcp,
    release_if_closed,
    send_gathered,
    set_exclusive_address,
    stream_transport,
)
from nopf_web.wire.address import Endpoint
from nopf_web.wire.frames import ResetCode

from .errors import NoSuchService, ServicesUnknown, StreamReset, TunnelError
from .mux import Mux, Stream
from .read_pacing import BULK_READ
from .slab import LOCAL_READ_SIZE, Slab

CONNECT_TIMEOUT = 5.0
ACCEPT_BURST = 1024  # local connections taken from the accept queue per wake-up
_MAX_GATHER = 64  # buffers per sendmsg (the kernel allows 1024); more are joined
# (Windows has no sendmsg: send_gathered joins them there.)

EventSink = Callable[[str], None]


def _quiet(_message: str) -> None:
    pass


class _Said:
    """The asyncio edge of :class:`~nopf_web.repeats.Repeats`: an event sink that says
    a burst of one problem (a service that is down, streams reset one after another)
    in a few lines; :meth:`run` says the counts on time, :meth:`flush` the rest."""

    def __init__(self, sink: EventSink) -> None:
        self._sink, self._repeats = sink, Repeats()
        self._loop = asyncio.get_running_loop()
        self._held = asyncio.Event()  # the first message of a kind, after none was held

    def __call__(self, message: str) -> None:
        for line in self._repeats.feed(message, self._loop.time()):
            self._sink(line)
        self._held.set()

    async def run(self) -> None:
        while True:
            deadline = self._repeats.deadline()
            if deadline is None:
                self._held.clear()
                await self._held.wait()
                continue
            # A message fed meanwhile only moves deadlines later: sleep to this one.
            await asyncio.sleep(max(0.0, deadline - self._loop.time()))
            for line in self._repeats.due(self._loop.time()):
                self._sink(line)

    def flush(self) -> None:
        for line in self._repeats.flush(self._loop.time()):
            self._sink(line)


async def serve_share(mux: Mux, service: tuple[str, int], *,
                      more: Sequence[tuple[str, int]] = (),
                      connect_timeout: float = CONNECT_TIMEOUT,
                      on_event: EventSink = _quiet) -> None:
    """Connect every stream the peer opens to ``service``, or to ``more[i - 1]`` for a
    stream to service ``i`` (the mux refuses one beyond them, given ``services``); run
    until the tunnel ends."""
    targets = (service, *more)
    said = _Said(on_event)

    async def accept_loop(handlers: asyncio.TaskGroup) -> None:
        while True:
            try:
                stream = await mux.accept_stream()
            except TunnelError:
                return  # the tunnel ended: _serve reports how, from wait_closed
            handlers.create_task(_share_one(stream, targets[stream.service], connect_timeout,
                                            said),
                                 name=f"{mux.name}-share-{stream.stream_id}")

    await _serve(mux, accept_loop, f"{mux.name}-share-accept", said)


async def serve_connect(mux: Mux, listener: socket.socket | tuple[str, int], *,
                        more: Sequence[socket.socket] = (),
                        on_event: EventSink = _quiet) -> None:
    """Turn every connection to ``listener`` into a stream to the peer's first service,
    and every one to ``more[i - 1]`` into one to its service ``i``; run until the
    tunnel ends.

    ``listener`` is a listening socket (left open: the caller owns it, as it owns
    ``more``) or a ``(host, port)`` to listen on (closed on return). A connection to
    a service the sharer does not share is closed, and said once per listener.
    """
    said = _Said(on_event)
    owned = not isinstance(listener, socket.socket)
    sock = _listen(listener) if not isinstance(listener, socket.socket) else listener
    socks = (sock, *more)
    for each in socks:
        each.setblocking(False)
    loop = asyncio.get_running_loop()

    async def accept_one(handlers: asyncio.TaskGroup, service: int) -> None:
        lsock, refused = socks[service], False
        while True:
            first, _addr = await loop.sock_accept(lsock)
            # Then everything else already queued, in this turn of the loop: a
            # burst of connections larger than the kernel's accept queue
            # (net.core.somaxconn caps it) that is drained one per turn while
            # the loop moves data overflows it, and the kernel resets the
            # connections it could not queue (seen at 1,000 at once).
            for conn in _accepted_now(lsock, first):
                try:
                    stream = await mux.open_stream(service)
                except (NoSuchService, ServicesUnknown) as exc:
                    conn.close()
                    if not refused:
                        said(f"connections to {_named(lsock)} are refused: {exc}")
                        refused = True
                    continue
                except TunnelError:
                    conn.close()
                    return  # the tunnel ended: _serve reports how, from wait_closed
                handlers.create_task(_connect_one(stream, conn, said),
                                     name=f"{mux.name}-connect-{stream.stream_id}")

    async def unreached() -> None:
        # A sharer with more services than we listen for: say so (once), or the
        # user never learns of the ones this side cannot reach.
        try:
            count = await mux.peer_service_count()
        except TunnelError:  # the tunnel ended, or an older sharer that says nothing
            return
        if count > len(socks):
            said(f"the sharer shares {count} services and this side listens for the "
                     f"first {len(socks)}: one local port per service reaches them all")

    async def accept_loop(handlers: asyncio.TaskGroup) -> None:
        for service in range(len(socks)):
            handlers.create_task(accept_one(handlers, service),
                                 name=f"{mux.name}-connect-accept-{service}")
        handlers.create_task(unreached(), name=f"{mux.name}-connect-services")

    try:
        await _serve(mux, accept_loop, f"{mux.name}-connect-accept", said)
    finally:
        if owned:
            sock.close()


def _named(sock: socket.socket) -> Endpoint:
    """A listener's address, as messages show it."""
    host, port = sock.getsockname()[:2]
    return Endpoint(host, port)


def _accepted_now(sock: socket.socket, first: socket.socket) -> Iterator[socket.socket]:
    """``first``, then the connections waiting in ``sock``'s accept queue (at most
    ``ACCEPT_BURST``), without waiting."""
    yield first
    for _ in range(ACCEPT_BURST):
        try:
            conn, _addr = sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # EMFILE and the like: sock_accept meets it again and raises
            return
        conn.setblocking(False)
        yield conn


def _listen(addr: tuple[str, int]) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        set_exclusive_address(sock)  # SO_REUSEADDR; SO_EXCLUSIVEADDRUSE on Windows
        sock.bind(addr)
        sock.listen(socket.SOMAXCONN)  # bursts of streams, as in Session's listener
    except BaseException:
        sock.close()
        raise
    return sock


class _TunnelEnded(Exception):
    """Raised in :func:`_serve`'s task group once the tunnel ended cleanly: it
    cancels the accept loop and every per-connection task."""


async def _serve(mux: Mux, accept_loop: Callable[[asyncio.TaskGroup], Coroutine[Any, Any, None]],
                 name: str, said: _Said) -> None:
    """Run an accept loop (which starts one task per connection in the group it is
    given) until the tunnel ends; then cancel and await all of them, and say what
    ``said`` still counts.

    Returns after a clean close; raises the tunnel's failure, or the accept
    loop's own (the listener failed: not the tunnel's fault).
    """
    try:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(accept_loop(tasks), name=name)
            tasks.create_task(said.run(), name=f"{name}-said")
            await mux.wait_closed()  # the tunnel's verdict: raises unless closed cleanly
            raise _TunnelEnded
    except BaseExceptionGroup as group:
        errors = [e for e in group.exceptions if not isinstance(e, _TunnelEnded)]
        if errors:  # one error, as the caller expects: the listener's first
            raise next((e for e in errors if not isinstance(e, TunnelError)), errors[0]) \
                from None
    finally:
        said.flush()


async def _share_one(stream: Stream, service: tuple[str, int], timeout: float,
                     on_event: EventSink) -> None:
    host, port = service
    loop = asyncio.get_running_loop()
    sock: socket.socket | None = None
    try:
        async with asyncio.timeout(timeout):
            sock = await connect_tcp(host, port)
            local = _Local(stream, sock)
            transport, _ = await loop.create_connection(lambda: local, sock=sock)
            release_if_closed(transport, sock)
    except BaseException as exc:
        if sock is not None:
            sock.close()
        if not isinstance(exc, (OSError, TimeoutError)):
            raise
        why = (f"no answer within {timeout:g} s" if isinstance(exc, TimeoutError)
               else "nothing is listening there" if isinstance(exc, ConnectionRefusedError)
               else exc.strerror or str(exc))
        message = f"cannot reach the shared service at {Endpoint(host, port)} ({why})"
        on_event(message)
        stream.reset(ResetCode.REFUSED, message)
        return
    await _run_local(local, on_event)


async def _connect_one(stream: Stream, conn: socket.socket, on_event: EventSink) -> None:
    loop = asyncio.get_running_loop()
    local = _Local(stream, conn)
    try:
        await loop.connect_accepted_socket(lambda: local, conn)
    except OSError as exc:
        conn.close()
        stream.reset(ResetCode.CONNECTION_LOST, f"local connection failed: {exc}")
        return
    await _run_local(local, on_event)


async def _run_local(local: _Local, on_event: EventSink) -> None:
    try:
        await local.run()
    except StreamReset as exc:
        on_event(str(exc))
    except TunnelError:
        pass  # the whole tunnel failed: serve_* reports that once, via wait_closed


class _Local(asyncio.BufferedProtocol):
    """One local TCP connection piped to one stream, driven by callbacks both ways.

    Local data goes to the stream with ``feed`` (reading pauses while the stream
    has too much queued); stream data goes to the transport as it arrives
    (delivery pauses while the transport's buffer is full, which withholds the
    peer's credit). EOF becomes FIN and FIN becomes ``shutdown(SHUT_WR)``.

    Local reads land in a slab of the tunnel's pool (:mod:`.slab`): a large read
    goes to the stream as the slab's view and is sealed in place, no copy; a
    small one, or one read into the pool's scratch (no slab free to lend), is
    copied out and the slab is free for the next read. Reads come as asyncio's
    own ``bytes`` (the transport is handed a :class:`_BytesReads`) while the pool
    has no slab free to lend, or while the tunnel has other streams: the mux then
    cuts reads into turns of several streams a record, never sealed in place,
    and slabs only cost (see :mod:`.slab`). They also come as ``bytes`` after a
    read under ``BULK_READ`` (an interactive stream: a slab's bookkeeping cost
    it more than its copy) until a read of at least that much.
    """

    def __init__(self, stream: Stream, sock: socket.socket) -> None:
        self.stream = stream
        self._slabs = stream.slabs
        self._slab: Slab | None = None  # the one read into, between the two calls
        self._bytes_reads = _BytesReads(self)
        self.transport: asyncio.Transport | None = None
        self._sock = sock  # the transport's socket, for gathered sends
        self._done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sent_eof = False  # local EOF passed on as FIN
        self._got_eof = False  # the stream's FIN passed on as SHUT_WR

    async def run(self) -> None:
        """Wait until both directions end; raise the stream's error if it failed."""
        try:
            await asyncio.shield(self._done)
        except asyncio.CancelledError:
            self._abort()
            self.stream.reset(ResetCode.CANCEL, "the tunnel end is shutting down")
            raise

    # -- local side (asyncio.Protocol) ------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = stream_transport(transport)
        # Reads into get_buffer's slab take the whole slab on asyncio's selector
        # transport and on uvloop's; asyncio's proactor reads max_size into its own
        # buffer, then copies. Reads as bytes (_BytesReads) are max_size on asyncio's
        # transports, raised here to a slab's; uvloop's are at most 250 KiB.
        if hasattr(transport, "max_size"):
            transport.max_size = LOCAL_READ_SIZE
        self.stream.attach(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        slab = self._slab = self._slabs.take()
        return slab.room()

    def buffer_updated(self, nbytes: int) -> None:
        slab = self._slab
        assert slab is not None
        self._slab = None  # an idle connection holds none
        pool = self._slabs
        if nbytes >= pool.lend_min and slab is not pool.scratch:
            self.data_received(slab.view(nbytes))
        else:
            self.data_received(bytes(slab.room()[:nbytes]))
        # An interactive read, or slabs would not be sealed in place: bytes reads.
        if (nbytes < BULK_READ or not (self.stream.alone and pool.has_free())) \
                and self.transport is not None:
            self.transport.set_protocol(self._bytes_reads)

    def bytes_received(self, data: bytes) -> None:
        """A read as asyncio's ``bytes`` (see :class:`_BytesReads`)."""
        self.data_received(data)
        if len(data) >= BULK_READ and self.stream.alone and self._slabs.has_free() \
                and self.transport is not None:
            self.transport.set_protocol(self)

    def data_received(self, data: bytes | memoryview) -> None:
        try:
            more = self.stream.feed(data, self._resume_reading)
        except TunnelError as exc:
            self.on_error(exc)
            return
        if not more and self.transport is not None:
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def eof_received(self) -> bool:
        self._sent_eof = True
        self.stream.write_eof()
        self._maybe_close()
        return True  # keep our sending half open

    def connection_lost(self, exc: Exception | None) -> None:
        if not (self._sent_eof and self._got_eof):
            reason = f": {exc}" if exc else " before its end"
            self.stream.reset(ResetCode.CONNECTION_LOST, f"the local connection closed{reason}")
        if not self._done.done():
            self._done.set_result(None)

    def pause_writing(self) -> None:
        self.stream.pause_delivery()

    def resume_writing(self) -> None:
        self.stream.resume_delivery()

    # -- stream side (the stream's sink) -------------------------------------

    def on_data(self, data: bytes | memoryview) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def on_data_parts(self, parts: list[bytes | memoryview]) -> None:
        """Several chunks (one record's DATA frames) in one ``sendmsg``, no joined copy
        (one joined buffer where there is no sendmsg: Windows)."""
        transport = self.transport
        if transport is None:
            return
        if len(parts) <= _MAX_GATHER and not transport.get_write_buffer_size() \
                and not transport.is_closing():
            # Nothing queued in the transport, so writing to the socket directly
            # keeps the order.
            try:
                sent = send_gathered(self._sock, parts)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                sent = 0  # the transport's own write below meets the error and reports it
            while parts and sent >= len(parts[0]):
                sent -= len(parts.pop(0))
            if not parts:
                return
            if sent:
                parts[0] = parts[0][sent:]
        transport.write(b"".join(parts))

    def on_eof(self) -> None:
        self._got_eof = True
        if self.transport is not None and self.transport.can_write_eof():
            try:
                self.transport.write_eof()
            except OSError as exc:
                # asyncio's transport shuts the socket down at once and lets the
                # error out (ENOTCONN once the application has reset it; uvloop says
                # so through connection_lost). Raised here, inside the mux's reading
                # of a record, it ended the whole tunnel as "the tunnel connection
                # failed"; it is this stream's local connection that is gone.
                asyncio.get_running_loop().call_soon(self._local_failed, exc)
                return
        self._maybe_close()

    def _local_failed(self, exc: OSError) -> None:
        self._abort()
        self.stream.reset(ResetCode.CONNECTION_LOST,
                          f"the local connection failed: {exc.strerror or exc}")

    def on_error(self, error: TunnelError) -> None:
        self._abort()
        if not self._done.done():
            self._done.set_exception(error)
            self._done.exception()  # retrieved here: run() may already be cancelled

    def _maybe_close(self) -> None:
        if self._sent_eof and self._got_eof and self.transport is not None:
            self.transport.close()

    def _abort(self) -> None:
        """Close the local connection with RST, as a reset TCP connection would."""
        if self.transport is None:
            return
        # Our own socket object: uvloop's get_extra_info("socket") raises EBADF once the
        # transport has closed it (a stream that ended both ways, failed by the tunnel's
        # end), and that error took the whole tunnel down.
        with contextlib.suppress(OSError):
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        self.transport.abort()


class _BytesReads(asyncio.Protocol):
    """A :class:`_Local` whose reads come as asyncio's ``bytes``: the transport's
    protocol while the tunnel's slab pool has none free to lend."""

    def __init__(self, local: _Local) -> None:
        self._local = local

    def data_received(self, data: bytes) -> None:
        self._local.bytes_received(data)

    def eof_received(self) -> bool:
        return self._local.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._local.connection_lost(exc)

    def pause_writing(self) -> None:
        self._local.pause_writing()

    def resume_writing(self) -> None:
        self._local.resume_writing()
