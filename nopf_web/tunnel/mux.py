"""Many streams over one secure channel (frames: :mod:`nopf_web.wire.frames`).

Reading is event-driven: the channel hands each decrypted record to the mux,
which decodes its frames and hands them to streams (no task switch per
record). One writer task
sends control frames first (OPEN, WINDOW_UPDATE, RST, PING/PONG), then DATA
frames of at most ``max_frame`` bytes, round-robin over the streams that have
data and credit, so a bulk stream cannot starve an interactive one. Several
frames go into one encrypted record to amortise the per-record cost. A
keepalive task sends a PING every ``keepalive`` seconds and fails the tunnel
with :class:`PeerLost` when nothing arrived for ``dead_after`` seconds.

Flow control is per stream: a sender may have at most its credit of DATA
bytes in flight (``INITIAL_WINDOW`` at first); the receiver grants more with
WINDOW_UPDATE as the application reads, so an application that stops reading
stops only its own stream. A receive ``window`` above ``INITIAL_WINDOW`` is
granted with one WINDOW_UPDATE when the stream opens. A stream alone on the
tunnel whose application keeps up gets a larger window for a while (see
:meth:`Mux._resize_window`).

Ending: :meth:`Mux.close` sends GOAWAY and closes; every stream still open then
fails with :class:`TunnelClosed`. A failure (dead peer, tampering, protocol
error) fails every stream with that error. :meth:`Mux.wait_closed` returns
after a clean close (by either side) and raises the failure otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any, Literal, Protocol, Self

from nopf_web.wire import frames as fr
from nopf_web.wire.frames import FrameDecoder, FrameError, ResetCode

from .errors import (
    PeerLost,
    StreamClosed,
    StreamReset,
    TunnelClosed,
    TunnelError,
    TunnelProtocolError,
)

DEFAULT_MAX_FRAME = 16 * 1024
# Bytes of frames the writer packs into one write: a whole 256 KiB local read
# (asyncio's read size) as one DATA frame, plus room for control frames.
RECORD_BUDGET = 257 * 1024
STREAM_SEND_BUFFER = 256 * 1024  # queued bytes per stream before write() waits
DEFAULT_MAX_STREAMS = 4096
# The receive window of a lone stream whose application keeps up doubles up to
# this (see Mux._resize_window); the budget bounds all streams' growth together.
AUTO_WINDOW_MAX = 4 * 1024 * 1024
AUTO_WINDOW_BUDGET = 8 * 1024 * 1024
CLOSE_FLUSH_TIMEOUT = 2.0
_PING = struct.Struct("!Q")

MuxState = Literal["new", "open", "closed", "failed"]


class Channel(Protocol):
    """What the mux needs from a transport (``SecureChannel`` is one)."""

    def write(self, data: bytes | bytearray | memoryview) -> None: ...
    async def drain(self) -> None: ...
    def start(self, on_record: Callable[[bytes], None],
              on_end: Callable[[Exception | None], None]) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...
    async def wait_closed(self) -> None: ...


class Stream:
    """One bidirectional byte stream of a :class:`Mux` (like a TCP connection).

    ``read`` returns ``b""`` after the peer's FIN; ``write_eof`` half-closes our
    side; ``reset`` aborts both directions of this stream only.
    """

    def __init__(self, mux: Mux, stream_id: int) -> None:
        self._mux = mux
        self.stream_id = stream_id
        self.bytes_in = 0
        self.bytes_out = 0
        # receiving
        self._in: deque[bytes | memoryview] = deque()
        self._in_size = 0
        self._recv_window = fr.INITIAL_WINDOW  # bytes the peer may still send
        self._window = mux.window  # receive window now granted (grows, see _consumed)
        self._unacked = 0  # consumed by the application, not yet credited back
        self._remote_fin = False
        self._readable = asyncio.Event()
        # sending
        self._out: deque[memoryview] = deque()
        self._out_size = 0
        self._credit = fr.INITIAL_WINDOW
        self._fin_pending = False
        self._fin_sent = False
        self._queued = False  # in the writer's round-robin queue
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

    def __repr__(self) -> str:
        return f"<Stream {self.stream_id} in={self.bytes_in} out={self.bytes_out}>"

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
        self._consumed(len(data))
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

    def _consumed(self, n: int) -> None:
        # Credit back in batches (a quarter window): fewer frames, no stall.
        self._unacked += n
        if self._unacked >= self._window // 4 and not self._remote_fin:
            credit = self._unacked + self._mux._resize_window(self, self._unacked)
            self._unacked = 0
            if credit:
                self._mux._grant(self, credit)

    def _on_data(self, data: bytes | memoryview) -> None:
        n = len(data)
        if n > self._recv_window:
            self._mux._reset(self, ResetCode.FLOW_CONTROL,
                             f"peer sent {n} bytes with {self._recv_window} of credit",
                             local=True)
            return
        self._recv_window -= n
        self.bytes_in += n
        self._in.append(data)
        self._in_size += n
        self._readable.set()
        self._deliver_later()

    def _on_fin(self) -> None:
        self._remote_fin = True
        self._readable.set()
        self._deliver_later()

    def _deliver_later(self) -> None:
        # In push mode, everything one record brings for this stream goes out in
        # one write once the record is parsed: far fewer local send() calls.
        if self._sink is not None and not self._flush_queued:
            self._flush_queued = True
            self._mux._to_deliver.append(self)

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
            self._consumed(n)
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
        self.resume_delivery()

    def pause_delivery(self) -> None:
        self._delivery_paused = True

    def resume_delivery(self) -> None:
        self._delivery_paused = False
        self._deliver()

    def feed(self, data: bytes | bytearray | memoryview,
             on_writable: Callable[[], None]) -> bool:
        """Queue ``data`` without waiting; False means too much is queued: stop
        feeding until ``on_writable`` is called (once)."""
        if self._error is not None:
            raise self._error
        if self._fin_pending:
            raise StreamClosed(f"stream {self.stream_id}: write after write_eof()")
        if data:
            view = memoryview(data if type(data) is bytes else bytes(data))
            self._out.append(view)
            self._out_size += len(view)
            self._mux._schedule(self)
        if self._out_size < STREAM_SEND_BUFFER:
            return True
        self._on_writable = on_writable
        return False

    # -- writing -------------------------------------------------------------

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Queue ``data`` for sending; waits while this stream has too much queued."""
        if self._error is not None:
            raise self._error
        if self._fin_pending:
            raise StreamClosed(f"stream {self.stream_id}: write after write_eof()")
        if not data:
            return
        # Queued until the writer sends it: copy anything the caller could still change.
        view = memoryview(data if type(data) is bytes else bytes(data))
        self._out.append(view)
        self._out_size += len(view)
        self._mux._schedule(self)
        while self._out_size >= STREAM_SEND_BUFFER and self._error is None:
            self._writable.clear()
            await self._writable.wait()
        if self._error is not None:
            raise self._error

    def write_eof(self) -> None:
        """Half-close: FIN goes after the queued data; reading goes on."""
        if self._error is not None or self._fin_pending:
            return
        self._fin_pending = True
        self._mux._schedule(self)

    def reset(self, code: int = ResetCode.CANCEL, message: str = "") -> None:
        """Abort this stream both ways (RST to the peer); other streams go on."""
        if self._error is None:
            self._mux._reset(self, code, message, local=True)

    def _take(self, limit: int) -> list[memoryview]:
        parts: list[memoryview] = []
        while limit and self._out:
            chunk = self._out[0]
            if len(chunk) <= limit:
                self._out.popleft()
            else:
                self._out[0] = chunk[limit:]
                chunk = chunk[:limit]
            parts.append(chunk)
            limit -= len(chunk)
        return parts

    def _sendable(self) -> bool:
        if self._error is not None:
            return False
        if self._out_size:
            return self._credit > 0
        return self._fin_pending and not self._fin_sent

    def _drained(self) -> None:
        self._writable.set()
        callback, self._on_writable = self._on_writable, None
        if callback is not None:
            callback()

    def _fail(self, error: TunnelError) -> None:
        if self._error is not None:
            return
        self._error = error
        self._mux._release_window(self)
        self._out.clear()
        self._out_size = 0
        self._in.clear()
        self._in_size = 0
        self._readable.set()
        self._writable.set()
        self._on_writable = None
        if self._sink is not None:
            self._sink.on_error(error)


class _Sink(Protocol):
    """Where a stream in push mode delivers (see :meth:`Stream.attach`)."""

    def on_data(self, data: bytes | memoryview) -> None: ...
    def on_eof(self) -> None: ...
    def on_error(self, error: TunnelError) -> None: ...


class Mux:
    """Streams multiplexed over one channel; see the module docstring.

    ``initiator`` picks the stream id parity (odd for the initiator): exactly
    one side must be the initiator (use the sharer/connector roles, not who
    sent the first SYN). Use as ``async with Mux(...) as mux:`` or call
    :meth:`start` and :meth:`close`.
    """

    def __init__(self, channel: Channel, *, initiator: bool, keepalive: float = 15.0,
                 dead_after: float = 45.0, window: int = fr.INITIAL_WINDOW,
                 max_frame: int = DEFAULT_MAX_FRAME,
                 max_streams: int = DEFAULT_MAX_STREAMS, name: str = "mux") -> None:
        if not 0 < keepalive < dead_after:
            raise ValueError("need 0 < keepalive < dead_after")
        if not 0 < max_frame <= fr.MAX_PAYLOAD:
            raise ValueError(f"max_frame must be 1..{fr.MAX_PAYLOAD}")
        if not fr.INITIAL_WINDOW <= window <= fr.MAX_INCREMENT:
            raise ValueError(f"window must be {fr.INITIAL_WINDOW}..{fr.MAX_INCREMENT}")
        self.name = name
        self.initiator = initiator
        self.keepalive = keepalive
        self.dead_after = dead_after
        self.window = window
        self.max_frame = max_frame
        self.max_streams = max_streams
        # Counters for the dashboard: stream payload bytes, all streams together.
        self.bytes_in = 0
        self.bytes_out = 0
        self.total_streams = 0
        self.rtt: float | None = None  # seconds, from the last PING/PONG
        self._channel = channel
        # Optional (SecureChannel has it): write a list of buffers without joining them.
        self._writelines: Callable[[list[bytes | memoryview]], None] | None = getattr(
            channel, "writelines", None)
        self._streams: dict[int, Stream] = {}
        self._next_id = 1 if initiator else 2
        self._peer_last_id = 0
        self._accepts: deque[Stream] = deque()
        self._accept_ready = asyncio.Event()
        self._control: deque[bytes] = deque()
        self._ready: deque[Stream] = deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()  # the writer sent (and drained) all it had
        self._tasks: list[asyncio.Task[None]] = []
        self._state: MuxState = "new"
        self._error: TunnelError | None = None  # why it ended (TunnelClosed if cleanly)
        self._done = asyncio.Event()
        self._last_rx = 0.0
        self._decoder = FrameDecoder()
        self._window_budget = AUTO_WINDOW_BUDGET  # see _grow_window
        self._to_deliver: list[Stream] = []  # push-mode streams with data from this record
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- observation ----------------------------------------------------------

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    @property
    def state(self) -> MuxState:
        return self._state

    @property
    def error(self) -> TunnelError | None:
        """The failure that ended the tunnel (None while open or after a clean close)."""
        return None if isinstance(self._error, TunnelClosed) else self._error

    # -- life -----------------------------------------------------------------

    async def start(self) -> None:
        if self._state != "new":
            raise TunnelError(f"{self.name} already started")
        self._state = "open"
        self._loop = asyncio.get_running_loop()
        self._last_rx = self._loop.time()
        for role, coro in (("writer", self._write_loop()),
                           ("keepalive", self._keepalive_loop())):
            self._tasks.append(asyncio.create_task(self._supervised(coro),
                                                   name=f"{self.name}-{role}"))
        self._channel.start(self._on_record, self._on_channel_end)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Say GOAWAY, flush briefly, close the channel; every open stream fails."""
        if self._state == "open":
            self._control.append(fr.encode_goaway(0, "closing"))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_FLUSH_TIMEOUT):
                    await self._flushed()
            self._end(TunnelClosed("the tunnel was closed"), graceful=True)
        elif self._state == "new":
            self._end(TunnelClosed("the tunnel was closed"), graceful=True)
        await self._reap()

    async def wait_closed(self) -> None:
        """Wait for the end; raise the failure if it did not end cleanly."""
        await self._done.wait()
        await self._reap()
        if self.error is not None:
            raise self.error

    async def _flushed(self) -> None:
        self._idle.clear()
        self._wake.set()
        await self._idle.wait()

    async def _reap(self) -> None:
        current = asyncio.current_task()
        tasks = [t for t in self._tasks if t is not current]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(1.0):
                await self._channel.wait_closed()

    def _end(self, error: TunnelError, *, graceful: bool) -> None:
        if self._state in ("closed", "failed"):
            return
        self._state = "closed" if graceful else "failed"
        self._error = error
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
        self._wake.set()
        self._idle.set()  # nothing more will be sent: release a close() waiting to flush
        self._done.set()
        current = asyncio.current_task()
        for t in self._tasks:
            if t is not current:
                t.cancel()

    async def _supervised(self, coro: Coroutine[Any, Any, None]) -> None:
        try:
            await coro
        except TunnelError as exc:
            self._end(exc, graceful=isinstance(exc, TunnelClosed))
        except OSError as exc:
            self._end(PeerLost(f"the tunnel connection failed: {exc.strerror or exc}"),
                      graceful=False)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug: fail loudly through wait_closed, never hang
            self._end(TunnelError(f"internal tunnel error: {exc!r}"), graceful=False)
            raise

    # -- streams --------------------------------------------------------------

    async def open_stream(self) -> Stream:
        """Open a new stream to the peer (no round trip: data may follow at once)."""
        self._check_open()
        if len(self._streams) >= self.max_streams:
            raise TunnelError(f"too many open streams ({self.max_streams})")
        stream_id = self._next_id
        if stream_id > fr.MAX_STREAM_ID:
            raise TunnelError("stream ids exhausted: reconnect the tunnel")
        self._next_id += 2
        stream = Stream(self, stream_id)
        self._streams[stream_id] = stream
        self.total_streams += 1
        self._control.append(fr.encode_open(stream_id))
        self._open_window(stream)
        self._wake.set()
        return stream

    async def accept_stream(self) -> Stream:
        """The next stream the peer opened; raises once the tunnel has ended."""
        while not self._accepts:
            self._check_open()
            self._accept_ready.clear()
            await self._accept_ready.wait()
        return self._accepts.popleft()

    def _check_open(self) -> None:
        if self._error is not None:
            raise self._error
        if self._state != "open":
            raise TunnelError(f"{self.name} is not started")

    def _open_window(self, stream: Stream) -> None:
        if self.window > fr.INITIAL_WINDOW:
            self._grant(stream, self.window - fr.INITIAL_WINDOW)

    def _grant(self, stream: Stream, increment: int) -> None:
        stream._recv_window += increment
        self._control.append(fr.encode_window_update(stream.stream_id, increment))
        self._wake.set()

    def _schedule(self, stream: Stream) -> None:
        if not stream._queued and stream._sendable():
            stream._queued = True
            self._ready.append(stream)
            self._wake.set()

    def _reset(self, stream: Stream, code: int, message: str, *, local: bool) -> None:
        sid = stream.stream_id
        if local:
            self._control.append(fr.encode_reset(sid, code, message))
            self._wake.set()
            why = f"stream {sid} was reset" + (f": {message}" if message else "")
        else:
            why = f"stream {sid} was reset by the peer" + (f": {message}" if message else "")
        stream._fail(StreamReset(why, code=code))
        self._streams.pop(sid, None)

    def _maybe_forget(self, stream: Stream) -> None:
        if stream._fin_sent and stream._remote_fin:
            self._streams.pop(stream.stream_id, None)
            self._release_window(stream)

    def _resize_window(self, stream: Stream, returning: int) -> int:
        """How much to add to (or, down to -``returning``, withhold from) the
        credit ``stream`` is about to return.

        A stream alone on the tunnel whose application keeps up (nothing left
        buffered) doubles its window, so the sender fills whole records instead
        of waiting on credit. Once other streams are open it shrinks back: the
        bulk bytes in flight would queue ahead of their frames.
        """
        if len(self._streams) > 1:
            delta = max(self.window - stream._window, -returning)
        elif stream._in:
            return 0
        else:
            delta = min(stream._window, AUTO_WINDOW_MAX - stream._window)
            if delta <= 0 or delta > self._window_budget:
                return 0
        self._window_budget -= delta
        stream._window += delta
        return delta

    def _release_window(self, stream: Stream) -> None:
        self._window_budget += stream._window - self.window
        stream._window = self.window

    # -- reading --------------------------------------------------------------

    def _on_record(self, record: bytes) -> None:
        if self._state != "open":
            return
        assert self._loop is not None
        self._last_rx = self._loop.time()
        try:
            for frame in self._decoder.feed(record):
                self._dispatch(frame)
            streams, self._to_deliver = self._to_deliver, []
            for stream in streams:
                stream._deliver()
        except FrameError as exc:
            self._end(TunnelProtocolError(f"the peer broke the tunnel protocol: {exc}"),
                      graceful=False)
        except TunnelError as exc:
            self._end(exc, graceful=isinstance(exc, TunnelClosed))

    def _on_channel_end(self, exc: Exception | None) -> None:
        if isinstance(exc, TunnelError):
            self._end(exc, graceful=False)
        elif isinstance(exc, OSError):
            self._end(PeerLost(f"the tunnel connection failed: {exc.strerror or exc}"),
                      graceful=False)
        elif exc is not None:
            self._end(TunnelError(f"the tunnel connection failed: {exc!r}"), graceful=False)
        else:
            self._end(PeerLost("the peer's connection ended without a goodbye "
                               "(its nopf stopped or the path broke)"), graceful=False)

    def _dispatch(self, frame: fr.Frame) -> None:
        if type(frame) is fr.DataFrame:  # the hot path first
            stream = self._streams.get(frame.stream_id)
            if stream is not None and not stream._remote_fin:
                self.bytes_in += len(frame.data)
                stream._on_data(frame.data)
            else:
                self._check_known(frame.stream_id, "DATA")
            return
        match frame:
            case fr.WindowUpdateFrame(sid, increment):
                stream = self._streams.get(sid)
                if stream is None:
                    self._check_known(sid, "WINDOW_UPDATE")
                    return
                stream._credit += increment
                if stream._credit > fr.MAX_INCREMENT:
                    raise TunnelProtocolError(f"stream {sid}: credit above 2^31-1")
                self._schedule(stream)
            case fr.OpenFrame(sid):
                self._on_open(sid)
            case fr.FinFrame(sid):
                stream = self._streams.get(sid)
                if stream is None:
                    self._check_known(sid, "FIN")
                    return
                stream._on_fin()
                self._maybe_forget(stream)
            case fr.ResetFrame(sid, code, message):
                stream = self._streams.get(sid)
                if stream is not None:
                    self._reset(stream, code, message, local=False)
            case fr.PingFrame(opaque):
                self._control.append(fr.encode_pong(opaque))
                self._wake.set()
            case fr.PongFrame(opaque):
                self.rtt = (time.monotonic_ns() - _PING.unpack(opaque)[0]) / 1e9
            case fr.GoAwayFrame(code, message):
                why = f": {message}" if message and message != "closing" else ""
                raise TunnelClosed(f"the peer closed the tunnel{why}")

    def _on_open(self, sid: int) -> None:
        if (sid % 2 == 1) == self.initiator:
            raise TunnelProtocolError(f"the peer opened stream {sid}, which is one of our ids")
        if sid <= self._peer_last_id:
            raise TunnelProtocolError(f"the peer reopened stream {sid}")
        self._peer_last_id = sid
        if len(self._streams) >= self.max_streams:
            self._control.append(fr.encode_reset(sid, ResetCode.TOO_MANY_STREAMS,
                                                 f"more than {self.max_streams} open streams"))
            self._wake.set()
            return
        stream = Stream(self, sid)
        self._streams[sid] = stream
        self.total_streams += 1
        self._open_window(stream)
        self._accepts.append(stream)
        self._accept_ready.set()

    def _check_known(self, sid: int, what: str) -> None:
        # Frames for a stream that ended (e.g. DATA crossing our RST) are dropped;
        # frames for one that was never opened mean the peer is out of sync.
        ours = (sid % 2 == 1) == self.initiator
        if (ours and sid >= self._next_id) or (not ours and sid > self._peer_last_id):
            raise TunnelProtocolError(f"{what} for stream {sid}, which was never opened")

    # -- writing --------------------------------------------------------------

    async def _write_loop(self) -> None:
        channel = self._channel
        while True:
            await self._wake.wait()
            self._wake.clear()
            while parts := self._collect():
                if self._writelines is not None:
                    self._writelines(parts)  # encrypts from the parts: no joined copy
                else:
                    channel.write(b"".join(parts))
                await channel.drain()
            self._idle.set()

    def _collect(self) -> list[bytes | memoryview]:
        """Frames for one write: all control frames, then DATA round-robin."""
        parts: list[bytes | memoryview] = []
        size = 0
        control, ready = self._control, self._ready
        while control:
            frame = control.popleft()
            parts.append(frame)
            size += len(frame)
        while ready and size < RECORD_BUDGET:
            stream = ready.popleft()
            stream._queued = False
            if stream._error is not None:
                continue
            # A stream alone in the queue delays nobody: one frame filling the
            # rest of the record (so frames never straddle records).
            room = RECORD_BUDGET - size - fr.HEADER_SIZE
            limit = self.max_frame if ready else min(fr.MAX_PAYLOAD, max(self.max_frame, room))
            n = min(stream._out_size, stream._credit, limit)
            if n:
                parts.append(fr.encode_data_header(stream.stream_id, n))
                parts += stream._take(n)
                stream._out_size -= n
                stream._credit -= n
                stream.bytes_out += n
                self.bytes_out += n
                size += fr.HEADER_SIZE + n
                if stream._out_size < STREAM_SEND_BUFFER:
                    stream._drained()
            if not stream._out_size and stream._fin_pending and not stream._fin_sent:
                parts.append(fr.encode_fin(stream.stream_id))
                stream._fin_sent = True
                self._maybe_forget(stream)
            self._schedule(stream)  # back of the queue if it still has data and credit
        return parts

    # -- keepalive ------------------------------------------------------------

    async def _keepalive_loop(self) -> None:
        loop = asyncio.get_running_loop()
        next_ping = loop.time() + self.keepalive
        while True:
            now = loop.time()
            idle = now - self._last_rx
            if idle >= self.dead_after:
                raise PeerLost(f"the peer went silent: nothing received for {idle:.1f} s "
                               f"(limit {self.dead_after:g} s); the peer or the path is gone")
            if now >= next_ping:
                self._control.append(fr.encode_ping(_PING.pack(time.monotonic_ns())))
                self._wake.set()
                next_ping = now + self.keepalive
            await asyncio.sleep(max(0.0, min(next_ping, self._last_rx + self.dead_after) - now))
