"""Many streams over one secure channel: the asyncio driver of
:mod:`nopf_web.tunnel.mux_machine` (which has the protocol: stream ids, credit,
window tuning, scheduling, keepalive).

The driver reads, feeds, acts. The channel hands each decrypted record to the
machine (no task switch per record) and the driver turns the machine's events
into the streams' buffers and wake-ups. Whatever makes frames to send
schedules one flush in the next loop iteration (so everything one iteration
queued shares records): it asks the machine for one record's frames at a
time and seals them without joining them, until the machine has nothing
left or the channel must drain. While an interactive stream shares the
tunnel with bulk ones, local bulk readers are paused and resumed a few an
iteration (:mod:`.read_pacing`), so that iterations stay short. Two tasks,
in one task group from :meth:`Mux.start` until the tunnel ends: the writer
waits for those drains, and the keepalive calls the machine's timer at its
deadlines.

Ending: :meth:`Mux.close` sends GOAWAY and closes; every stream still open then
fails with :class:`TunnelClosed`. A failure (dead peer, tampering, protocol
error) fails every stream with that error. :meth:`Mux.wait_closed` returns
after a clean close (by either side) and raises the failure otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, Self

from nopf_web.buffers import Buffer
from nopf_web.delegated import Delegated
from nopf_web.roles import PeerRole
from nopf_web.wire import frames as fr
from nopf_web.wire.frames import ResetCode

from .errors import PeerLost, ServicesUnknown, StreamClosed, TunnelClosed, TunnelError
from .mux_machine import (
    AUTO_WINDOW_BUDGET,
    AUTO_WINDOW_MAX,
    DEFAULT_MAX_STREAMS,
    DEFAULT_MIN_TURN,
    STREAM_SEND_BUFFER,
    MuxEvent,
    MuxMachine,
    MuxState,
    PeerServices,
    StreamData,
    StreamDone,
    StreamEof,
    StreamFailed,
    StreamOpened,
    StreamState,
    StreamWritable,
    TunnelEnded,
)
from .read_pacing import ReadPacer
from .slab import SlabPool

__all__ = ["AUTO_WINDOW_BUDGET", "AUTO_WINDOW_MAX", "CLOSE_FLUSH_TIMEOUT", "DEFAULT_MAX_STREAMS",
           "DEFAULT_MIN_TURN", "STREAM_SEND_BUFFER", "Channel", "Mux",
           "MuxState", "Stream"]

CLOSE_FLUSH_TIMEOUT = 2.0
# How long a stream to a service but the first waits for the peer to say how many it
# shares: it does in its first record, so only a peer that never answers meets this.
SERVICES_WAIT = 10.0


class Channel(Protocol):
    """What the mux needs from a transport (``SecureChannel`` and
    ``ResumableChannel`` are). Records are ``bytes`` or views of ``bytes``."""

    def write(self, data: Buffer) -> None: ...
    async def drain(self) -> None: ...
    @property
    def writing_paused(self) -> bool: ...
    def start(self, on_record: Callable[[bytes | memoryview], None],
              on_end: Callable[[Exception | None], None]) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...
    async def wait_closed(self) -> None: ...


class Stream:
    """One bidirectional byte stream of a :class:`Mux` (like a TCP connection).

    ``read`` returns ``b""`` after the peer's FIN; ``write_eof`` half-closes our
    side; ``reset`` aborts both directions of this stream only.
    """

    def __init__(self, mux: Mux, state: StreamState) -> None:
        self._mux = mux
        self._machine = mux._machine
        self._state = state
        self.stream_id = state.stream_id
        self.service = state.service  # which of the sharer's services
        # receiving
        self._in: deque[bytes | memoryview] = deque()
        self._in_size = 0
        self._remote_fin = False
        self._readable = asyncio.Event()
        # sending
        self._writable = asyncio.Event()
        self._writable.set()
        self._error: TunnelError | None = None
        # push mode (forwarders): data goes straight to a sink, no task per chunk
        self._sink: _Sink | None = None
        self._sink_parts: Callable[[list[bytes | memoryview]], None] | None = None
        self._delivery_paused = False
        self._eof_delivered = False
        self._flush_queued = False
        self._on_writable: Callable[[], None] | None = None
        self._on_release: Callable[[], None] | None = None  # its reader is held (.read_pacing)

    def __repr__(self) -> str:
        return f"<Stream {self.stream_id} in={self.bytes_in} out={self.bytes_out}>"

    @property
    def slabs(self) -> SlabPool:
        """The tunnel's buffers for local reads (see :mod:`.slab`), for a local reader."""
        return self._mux.slabs

    @property
    def alone(self) -> bool:
        """The only stream the tunnel has open (a local reader then reads into slabs)."""
        return len(self._mux._streams) == 1

    bytes_in = Delegated[int]("_state")
    bytes_out = Delegated[int]("_state")
    _window = Delegated[int](
        "_state", "window", doc="The receive window now granted (tests look at its growth).")

    @property
    def at_eof(self) -> bool:
        return self._remote_fin and not self._in

    # -- reading -------------------------------------------------------------

    async def read(self, max_bytes: int = -1) -> bytes:
        """Up to ``max_bytes`` (all buffered if -1) bytes; ``b""`` at the peer's FIN."""
        while not self._in:
            if self._error is not None:
                raise self._error
            if self._remote_fin:
                return b""
            self._readable.clear()
            await self._readable.wait()
        if self._error is not None:
            raise self._error
        if max_bytes < 0 or max_bytes >= self._in_size:
            data = bytes(self._in[0]) if len(self._in) == 1 else b"".join(self._in)
            self._in.clear()
        else:
            parts: list[bytes] = []
            need = max_bytes
            while need:
                chunk = self._in.popleft()
                if len(chunk) > need:
                    self._in.appendleft(chunk[need:])
                    chunk = chunk[:need]
                parts.append(bytes(chunk))
                need -= len(chunk)
            data = b"".join(parts)
        self._in_size -= len(data)
        if self._machine.consumed(self.stream_id, len(data)):
            self._mux._kick()
        return data

    async def readexactly(self, n: int) -> bytes:
        """Exactly ``n`` bytes; :class:`StreamClosed` if the peer's FIN comes first."""
        parts: list[bytes] = []
        while n:
            chunk = await self.read(n)
            if not chunk:
                raise StreamClosed(f"stream {self.stream_id} ended {n} bytes short")
            parts.append(chunk)
            n -= len(chunk)
        return b"".join(parts)

    def _deliver(self) -> None:
        self._flush_queued = False
        sink = self._sink
        if sink is None or self._delivery_paused or self._error is not None:
            return
        if self._in:
            n = self._in_size
            if len(self._in) == 1:
                sink.on_data(self._in.pop())
            elif self._sink_parts is not None:
                parts = list(self._in)  # the sink gathers them (sendmsg): no join here
                self._in.clear()
                self._sink_parts(parts)
            else:
                sink.on_data(b"".join(self._in))
                self._in.clear()
            self._in_size = 0
            if self._machine.consumed(self.stream_id, n):
                self._mux._kick()
        if self._remote_fin and not self._eof_delivered:
            self._eof_delivered = True
            sink.on_eof()

    # -- push mode (used by the forwarders) -----------------------------------

    def attach(self, sink: _Sink) -> None:
        """Deliver incoming data to ``sink`` as it arrives instead of via ``read``.

        Credit goes back to the peer as data is delivered, so the sink must call
        :meth:`pause_delivery` when it cannot take more (e.g. its transport's
        ``pause_writing``) and :meth:`resume_delivery` when it can.
        """
        self._sink = sink
        # Optional: a sink that takes a list of chunks and writes them in one go.
        self._sink_parts = getattr(sink, "on_data_parts", None)
        if self._error is not None:
            # Failed before its sink came (the peer reset it while the local
            # connection was being made): said at once, or that connection would
            # wait for ever; from the loop, not from inside the transport's
            # connection_made, which uvloop fails with EBADF if it is aborted there.
            asyncio.get_running_loop().call_soon(sink.on_error, self._error)
            return
        self.resume_delivery()

    def pause_delivery(self) -> None:
        self._delivery_paused = True

    def resume_delivery(self) -> None:
        self._delivery_paused = False
        self._deliver()

    def feed(self, data: Buffer,
             on_writable: Callable[[], None]) -> bool:
        """Queue ``data`` (one local read) without waiting; False means stop
        feeding until ``on_writable`` is called (once): too much is queued, or
        the reader is held (:mod:`.read_pacing`)."""
        if self._error is not None:
            raise self._error
        # Eager unless a flush waits for the channel to drain: the flush in the next
        # loop iteration sends all the stream has before the next read (a second
        # read before that flush waits).
        mux = self._mux
        more = self._machine.send(self.stream_id, data, eager=not mux._draining)
        if data:
            mux._kick()
            if more and not mux._pacer.read(self.stream_id, len(data)):
                self._hold(on_writable)
                return False
        if more:
            return True
        self._on_writable = on_writable
        return False

    # -- writing -------------------------------------------------------------

    async def write(self, data: Buffer) -> None:
        """Queue ``data`` for sending; waits while this stream has too much queued."""
        if self._error is not None:
            raise self._error
        if not data:
            if self._state.fin_pending:
                raise StreamClosed(f"stream {self.stream_id}: write after write_eof()")
            return
        # Queued until the writer sends it: the machine copies anything the caller
        # could still change.
        more = self._machine.send(self.stream_id, data)
        self._mux._kick()
        while not more and self._error is None:
            self._writable.clear()
            await self._writable.wait()
            more = self._machine.writable(self.stream_id)
        if self._error is not None:
            raise self._error

    def write_eof(self) -> None:
        """Half-close: FIN goes after the queued data; reading goes on."""
        if self._error is None:
            self._machine.end_stream(self.stream_id)
            self._mux._pacer.forget(self.stream_id)  # its local reader reads no more
            self._mux._kick()

    def reset(self, code: int = ResetCode.CANCEL, message: str = "") -> None:
        """Abort this stream both ways (RST to the peer); other streams go on."""
        if self._error is None:
            error = self._machine.reset_stream(self.stream_id, code, message)
            self._mux._streams.pop(self.stream_id, None)
            self._fail(error)
            self._mux._kick()

    def _drained(self) -> None:
        self._writable.set()
        callback, self._on_writable = self._on_writable, None
        if callback is not None:
            # One record brings many streams' credit: their bulk readers are
            # released over several iterations, not all in the next one.
            if self._mux._pacer.hold(self.stream_id):
                self._hold(callback)
            else:
                callback()

    def _hold(self, on_release: Callable[[], None]) -> None:
        self._on_release = on_release
        self._mux._release_soon()

    def _fail(self, error: TunnelError) -> None:
        if self._error is not None:
            return
        self._error = error
        self._in.clear()
        self._in_size = 0
        self._readable.set()
        self._writable.set()
        self._on_writable = None
        self._on_release = None
        self._mux._pacer.forget(self.stream_id)
        if self._sink is not None:
            self._sink.on_error(error)


class _Sink(Protocol):
    """Where a stream in push mode delivers (see :meth:`Stream.attach`)."""

    def on_data(self, data: bytes | memoryview) -> None: ...
    def on_eof(self) -> None: ...
    def on_error(self, error: TunnelError) -> None: ...


class Mux:
    """Streams multiplexed over one channel; see the module docstring.

    ``role`` picks the stream id parity (the server, which shares, opens odd
    ids): exactly one side must be each. Use as ``async with Mux(...) as
    mux:`` or call :meth:`start` and :meth:`close`.
    """

    def __init__(self, channel: Channel, *, role: PeerRole, keepalive: float = 15.0,
                 dead_after: float = 45.0, window: int = fr.INITIAL_WINDOW,
                 min_turn: int = DEFAULT_MIN_TURN,
                 max_streams: int = DEFAULT_MAX_STREAMS, name: str = "mux",
                 services: int | None = None) -> None:
        self._machine = MuxMachine(role=role, keepalive=keepalive, dead_after=dead_after,
                                   window=window, min_turn=min_turn, max_streams=max_streams,
                                   name=name, services=services)
        self._channel = channel
        # Optional (SecureChannel has it): write a list of buffers without joining them.
        self._writelines: Callable[[list[bytes | memoryview]], None] | None = getattr(
            channel, "writelines", None)
        self._streams: dict[int, Stream] = {}
        self._accepts: deque[Stream] = deque()
        self._accept_ready = asyncio.Event()
        self._services_known = asyncio.Event()  # the peer's services, or the end
        self._flush_handle: asyncio.Handle | None = None  # a flush is scheduled or running
        self._draining = False  # a flush stopped for the channel to drain
        self._wake = asyncio.Event()  # the writer task: wait for the drain, flush again
        self._idle = asyncio.Event()  # everything the machine had is sent
        self._done = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None  # the writer and keepalive's group
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pacer = ReadPacer()  # which held local readers read next (see .read_pacing)
        self._release_handle: asyncio.Handle | None = None  # a release is scheduled

    # -- settings and observation: the machine's ------------------------------

    name = Delegated[str]("_machine")
    role = Delegated[PeerRole]("_machine")
    keepalive = Delegated[float]("_machine")
    dead_after = Delegated[float]("_machine")
    window = Delegated[int]("_machine")
    min_turn = Delegated[int]("_machine")
    max_streams = Delegated[int]("_machine")
    services = Delegated[int | None]("_machine")
    peer_services = Delegated[int | None](
        "_machine", doc="How many services the peer shares, once it said (None before).")
    bytes_in = Delegated[int](
        "_machine", doc="Stream payload bytes received, all streams together.")
    bytes_out = Delegated[int]("_machine")
    total_streams = Delegated[int]("_machine")
    rtt = Delegated[float | None]("_machine", doc="Seconds, from the last PING/PONG.")
    open_streams = Delegated[int]("_machine")
    state = Delegated[MuxState]("_machine")
    error = Delegated[TunnelError | None](
        "_machine", doc="What ended the tunnel (None while open or after a clean close).")
    _window_budget = Delegated[int](
        "_machine", "window_budget", doc="Window growth left for lone streams (tests look at it).")

    # -- life -----------------------------------------------------------------

    @functools.cached_property
    def slabs(self) -> SlabPool:
        """The streams' buffers for local reads (see :mod:`.slab`), made when a local
        reader first asks: a tunnel without one allocates none."""
        return SlabPool()

    async def start(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self._machine.start(loop.time())
        self._runner = asyncio.create_task(self._run(), name=f"{self.name}-tasks")
        self._channel.start(self._on_record, self._on_channel_end)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Say GOAWAY, flush briefly, close the channel; every open stream fails."""
        if self.state == "open":
            self._machine.goaway()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_FLUSH_TIMEOUT):
                    await self._flushed()
        self._apply(self._machine.end(TunnelClosed("the tunnel was closed"), graceful=True))
        await self._reap()

    async def wait_closed(self) -> None:
        """Wait for the end; raise the failure if it did not end cleanly."""
        await self._done.wait()
        await self._reap()
        if self.error is not None:
            raise self.error

    async def _flushed(self) -> None:
        self._idle.clear()
        self._kick()
        await self._idle.wait()

    async def _reap(self) -> None:
        runner = self._runner
        if runner is not None and runner is not asyncio.current_task():
            await asyncio.wait({runner})  # cancelled by _ended; the caller's cancel propagates
            if not runner.cancelled():
                runner.exception()  # a bug, already reported as the tunnel's error
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(1.0):
                await self._channel.wait_closed()

    async def _run(self) -> None:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._supervised(self._write_loop()), name=f"{self.name}-writer")
            tasks.create_task(self._supervised(self._keepalive_loop()),
                              name=f"{self.name}-keepalive")

    async def _supervised(self, coro: Coroutine[Any, Any, None]) -> None:
        try:
            await coro
        except (TunnelError, OSError) as exc:
            self._end_for(exc)
        except Exception as exc:  # a bug: fail loudly through wait_closed, never hang
            self._end_for(exc)
            raise

    def _end_for(self, exc: Exception) -> None:
        """End the tunnel for what a task or a flush raised: a tunnel error as
        itself, a socket error as the peer lost, anything else as a bug."""
        if isinstance(exc, TunnelError):
            self._apply(self._machine.end(exc, graceful=isinstance(exc, TunnelClosed)))
        elif isinstance(exc, OSError):
            self._apply(self._machine.end(
                PeerLost(f"the tunnel connection failed: {exc.strerror or exc}"), graceful=False))
        else:
            error = TunnelError(f"internal tunnel error: {exc!r}")
            error.__cause__ = exc
            self._apply(self._machine.end(error, graceful=False))

    # -- streams --------------------------------------------------------------

    async def open_stream(self, service: int = 0) -> Stream:
        """Open a new stream to the peer's ``service`` (no round trip: data may follow at
        once). A service but 0 first waits, at most ``SERVICES_WAIT``, for the peer to
        say how many it shares (it does with its first record); :class:`NoSuchService`
        if it shares fewer."""
        if service:
            await self.peer_service_count()
        stream_id = self._machine.open_stream(service)
        state = self._machine.stream(stream_id)
        assert state is not None
        stream = self._streams[stream_id] = Stream(self, state)
        self._kick()
        return stream

    async def peer_service_count(self) -> int:
        """How many services the peer shares, once it said: at most ``SERVICES_WAIT``
        (:class:`ServicesUnknown`), or the tunnel's end (its error)."""
        try:
            async with asyncio.timeout(SERVICES_WAIT):
                while (count := self._machine.peer_services) is None:
                    reason = self._machine.end_reason
                    if reason is not None:
                        raise reason
                    await self._services_known.wait()
        except TimeoutError:
            raise ServicesUnknown(f"the peer did not say within {SERVICES_WAIT:g} s how "
                                  "many services it shares") from None
        return count

    async def accept_stream(self) -> Stream:
        """The next stream the peer opened; raises once the tunnel has ended."""
        while not self._accepts:
            reason = self._machine.end_reason
            if reason is not None:
                raise reason
            if self.state != "open":
                raise TunnelError(f"{self.name} is not started")
            self._accept_ready.clear()
            await self._accept_ready.wait()
        return self._accepts.popleft()

    def _kick(self) -> None:
        """Flush in the next loop iteration (unless one is due, or waits for a drain)."""
        if self._flush_handle is None and not self._draining and self._loop is not None:
            self._flush_handle = self._loop.call_soon(self._flush)

    def _release_soon(self) -> None:
        """Release held readers in the next loop iteration (unless that is scheduled)."""
        if self._release_handle is None and self._loop is not None:
            self._release_handle = self._loop.call_soon(self._release)

    def _release(self) -> None:
        """Resume this iteration's share of the held readers; again in the next
        while some are held."""
        self._release_handle = None
        streams = self._streams
        for stream_id in self._pacer.release():
            stream = streams.get(stream_id)
            if stream is not None:
                callback, stream._on_release = stream._on_release, None
                if callback is not None:
                    callback()
        if self._pacer.holding:
            self._release_soon()

    def _flush(self) -> None:
        """Send what the machine has, a record at a time, until it has nothing or
        the channel must drain first (the writer task waits for that)."""
        machine, loop = self._machine, self._loop
        assert loop is not None  # started: a flush is scheduled on it
        try:
            while machine.wants_to_send:
                if self._channel.writing_paused:
                    self._draining = True
                    self._wake.set()
                    return
                parts, events = machine.data_to_send(loop.time())
                if not parts:
                    break
                if self._writelines is not None:
                    self._writelines(parts)  # encrypts from the parts: no joined copy
                else:
                    self._channel.write(b"".join(parts))
                if events:
                    self._apply(events)
            self._idle.set()
        except (TunnelError, OSError) as exc:
            self._end_for(exc)
        except Exception as exc:  # a bug: fail loudly through wait_closed, never hang
            self._end_for(exc)
            raise
        finally:
            self._flush_handle = None

    # -- the machine's events -------------------------------------------------

    def _apply(self, events: list[MuxEvent]) -> None:
        streams = self._streams
        deliver: list[Stream] | None = None  # push-mode streams with news
        for event in events:
            if type(event) is StreamData:  # the hot path first
                stream = streams[event.stream_id]
                stream._in.append(event.data)
                stream._in_size += len(event.data)
            elif type(event) is StreamEof:
                stream = streams[event.stream_id]
                stream._remote_fin = True
            else:  # nothing for a stream's reader (inline: no call per event)
                if type(event) is StreamOpened:
                    # From the event: a later event of this batch may have ended it.
                    stream = streams[event.stream_id] = Stream(self, event.state)
                    self._accepts.append(stream)
                    self._accept_ready.set()
                elif type(event) is StreamWritable:
                    streams[event.stream_id]._drained()
                elif type(event) is StreamDone:
                    streams.pop(event.stream_id)
                    self._pacer.forget(event.stream_id)
                elif isinstance(event, StreamFailed):
                    streams.pop(event.stream_id)._fail(event.error)
                elif isinstance(event, TunnelEnded):
                    self._ended(event.error, graceful=event.graceful)
                elif isinstance(event, PeerServices):
                    self._services_known.set()
                continue
            # Data or FIN for the stream's reader. In push mode, everything one
            # record brings for this stream goes out in one write once the
            # record is parsed: fewer local sends.
            if stream._sink is None:
                stream._readable.set()
            elif not stream._flush_queued:
                stream._flush_queued = True
                if deliver is None:
                    deliver = []
                deliver.append(stream)
        if deliver is not None:
            for stream in deliver:
                stream._deliver()
        if self._machine.wants_to_send:
            self._kick()

    def _on_record(self, record: bytes | memoryview) -> None:
        assert self._loop is not None
        events = self._machine.receive(record, self._loop.time())
        if events:
            self._apply(events)
        elif self._machine.wants_to_send:  # a PONG, credit or a reset to send
            self._kick()

    def _on_channel_end(self, exc: Exception | None) -> None:
        self._apply(self._machine.connection_lost(exc))

    def _ended(self, error: TunnelError, *, graceful: bool) -> None:
        if graceful:
            self._channel.close()
        else:
            self._channel.abort()
        for stream in list(self._streams.values()):
            stream._fail(error)
        self._streams.clear()
        for stream in self._accepts:
            stream._fail(error)
        self._accepts.clear()
        self._accept_ready.set()
        self._services_known.set()
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        if self._release_handle is not None:
            self._release_handle.cancel()
        self._pacer.clear()  # their streams failed above
        self._idle.set()  # nothing more will be sent: release a close() waiting to flush
        self._done.set()
        if self._runner is not None:
            self._runner.cancel()  # the writer may wait on a drain that never ends

    # -- the two tasks --------------------------------------------------------

    async def _write_loop(self) -> None:
        """Wait for the channel to drain whenever a flush had to stop for it."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._channel.drain()
            self._draining = False
            self._kick()

    async def _keepalive_loop(self) -> None:
        loop = asyncio.get_running_loop()
        machine = self._machine
        while (deadline := machine.next_deadline) is not None:
            await asyncio.sleep(max(0.0, deadline - loop.time()))
            self._apply(machine.timer(loop.time()))
