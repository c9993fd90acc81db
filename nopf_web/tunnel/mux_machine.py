"""Many streams over one channel, as a sans-IO machine (frames: :mod:`nopf_web.wire.frames`).

Plain frame bytes in and out, no records, sockets or clock: the machine is
fed the plaintext the peer sent (:meth:`MuxMachine.receive`), the
application's actions (open, send, end, reset, consumed) and the time
(:meth:`MuxMachine.timer`, ``now`` in seconds on any monotonic clock). It
returns events (:class:`StreamOpened`, :class:`StreamData`, ...,
:class:`TunnelEnded`) and, from :meth:`MuxMachine.data_to_send`, the frames
for one record. A layer between it and the record machine (a resumable one
that numbers records, say) sees only those bytes. The asyncio driver is
:mod:`nopf_web.tunnel.mux`.

Stream ids: the server (the sharer) opens odd ids and the client even ids, so
both can open streams without agreeing first; ids increase and are never
reused. OPEN needs no answer: DATA may follow at once.

Flow control is per stream: a sender may have at most its credit of DATA
bytes in flight (``INITIAL_WINDOW`` at first); the receiver grants more with
WINDOW_UPDATE as the application consumes data, a quarter window at a time,
so an application that stops reading stops only its own stream. A receive
``window`` above ``INITIAL_WINDOW`` is granted with one WINDOW_UPDATE when the
stream opens. Streams whose application keeps up get larger windows for a while
when every stream on the tunnel is busy (a bulk transfer each), and give them
back once one is not, as an interactive stream is
(see :meth:`MuxMachine._resize_window`).

Scheduling: each record carries the control frames first (OPEN,
WINDOW_UPDATE, RST, PING/PONG, GOAWAY), then DATA frames round-robin over the
streams with data and credit, up to the record budget (below). The streams queued
when a record starts share it: a turn is the room left divided among them, and
never less than ``min_turn`` (16 KiB). Unless some 16 streams or more are
queued, every one of them has a frame in the record, so a bulk stream cannot
hold an interactive one back past it. (Where a frame sits inside a record does not
delay it: the peer opens a record whole.) A stream alone in the queue gets one
frame filling the rest of the record; where the record's room is what stops it,
the frame ends where one of its writes ends (a write is cut only when none fits
whole, and never for a second frame of it filling the rest of a record), so a
bulk sender's reads travel one frame each. No frame goes past the budget: a turn
that does not fit starts the next record.

Record size: every peer takes records of ``BASE_RECORD_BUDGET`` (257 KiB)
bytes of frames. At start the machine announces in a PING that it takes up to
``RECORD_BUDGET`` (1,021 KiB; :func:`nopf_web.wire.frames.announced_records`);
an older peer just answers it. Once the peer has announced, records grow with
the rate the tunnel carries: a record holds what the tunnel carried in
``RECORD_TIME`` (8 ms) at the rate measured over the last ``RATE_INTERVAL``
(100 ms) or more, between the two budgets. They start at the base size; a
pause of ``RATE_INTERVAL`` or more with nothing queued is left out, and the
budget outlives it. On a fast path large records cut the interpreter's
per-record work to a quarter; on a slow one they would hold an interactive
frame back four times as long, so there they stay at the base size.

Liveness: a PING every ``keepalive`` seconds; nothing received for
``dead_after`` seconds ends the tunnel with :class:`PeerLost`.
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass
from typing import Literal

from nopf_web.buffers import Buffer, unchanging
from nopf_web.roles import PeerRole
from nopf_web.wire import frames as fr
from nopf_web.wire.frames import (
    BASE_RECORD_BUDGET,
    RECORD_BUDGET,
    FrameDecoder,
    FrameError,
    ResetCode,
)

from .errors import (
    NoSuchService,
    PeerLost,
    StreamClosed,
    StreamReset,
    TunnelClosed,
    TunnelError,
    TunnelProtocolError,
)

# The smallest share of a record a queued stream gets per turn (with more than
# 16 streams queued, each gets this much, and some wait for the next record).
DEFAULT_MIN_TURN = 16 * 1024
# A record's budget in bytes of frames is between BASE_RECORD_BUDGET and what the peer
# announced (up to RECORD_BUDGET): what the tunnel carried in RECORD_TIME seconds, at
# the rate measured over the last RATE_INTERVAL or more. Its largest DATA frame is the
# budget less fr.CONTROL_ROOM (1 KiB, for control frames): 256 KiB to 1,020 KiB.
RECORD_TIME = 0.008
RATE_INTERVAL = 0.1
# Queued bytes per stream before the sender must wait: a full frame of the largest
# record, so a bulk stream's next local read is queued before its record goes.
STREAM_SEND_BUFFER = 1024 * 1024
DEFAULT_MAX_STREAMS = 4096
# The receive window of a stream whose application keeps up doubles up to this
# while every stream is busy (see MuxMachine._resize_window); the budget bounds all
# streams' growth together.
AUTO_WINDOW_MAX = 4 * 1024 * 1024
AUTO_WINDOW_BUDGET = 8 * 1024 * 1024
# Up to this many streams (each checked when one returns credit) may grow together.
GROWING_STREAMS = 16
_PING = struct.Struct("!Q")  # PING payload: our clock in ns when it left (u64 BE)
_DATA = fr.FrameType.DATA.value
_DataFrame = fr.DataFrame
_pack_header = fr.HEADER.pack
_U64 = (1 << 64) - 1

MuxState = Literal["new", "open", "closed", "failed"]


# -- events -------------------------------------------------------------------------
# Values, never changed after they are made (not frozen: cheaper to make, and
# StreamData is made once per DATA frame).


@dataclass(slots=True)
class StreamOpened:
    """The peer opened a stream. ``state`` is its state: the same batch of events may
    end it (OPEN, DATA and RST in one record), after which :meth:`MuxMachine.stream`
    no longer has it."""

    stream_id: int
    state: StreamState


@dataclass(slots=True)
class StreamData:
    """Bytes for the application; report them with :meth:`MuxMachine.consumed`
    once it has taken them, which returns the peer's credit."""

    stream_id: int
    data: bytes | memoryview


@dataclass(slots=True)
class StreamEof:
    """The peer sends no more on this stream (FIN)."""

    stream_id: int


@dataclass(slots=True)
class StreamFailed:
    """The stream was reset (by the peer, or by us for a peer's violation)."""

    stream_id: int
    error: StreamReset


@dataclass(slots=True)
class StreamWritable:
    """The stream's queue fell below ``STREAM_SEND_BUFFER``: the sender may go on."""

    stream_id: int


@dataclass(slots=True)
class StreamDone:
    """Both directions ended (FIN each way): the machine forgot the stream."""

    stream_id: int


@dataclass(slots=True)
class PeerServices:
    """How many services the peer shares is known (its ``svc`` announcement, or 1 for a
    peer whose ``rec`` came without one): :meth:`MuxMachine.open_stream` may now
    open streams to services 1 and up."""

    count: int


@dataclass(slots=True)
class TunnelEnded:
    """The tunnel ended: every stream still open ended with it (``error``).
    ``graceful``: a clean close (GOAWAY, :class:`TunnelClosed`); close the
    channel, else abort it."""

    error: TunnelError
    graceful: bool


MuxEvent = StreamOpened | StreamData | StreamEof | StreamFailed | StreamWritable | StreamDone \
    | PeerServices | TunnelEnded


class StreamState:
    """One stream's protocol state (read-only outside the machine)."""

    __slots__ = ("bytes_in", "bytes_out", "credit", "credit_epoch", "failed", "fin_pending",
                 "fin_sent", "out", "out_size", "pending", "queued", "recv_window", "remote_fin",
                 "service", "stream_id", "unacked", "waiting", "window")

    def __init__(self, stream_id: int, window: int, service: int = 0) -> None:
        self.stream_id = stream_id
        self.service = service  # which of the sharer's services it reaches
        self.bytes_in = 0
        self.bytes_out = 0
        # receiving
        self.recv_window = fr.INITIAL_WINDOW  # bytes the peer may still send
        self.window = window  # receive window now granted (grows, see _resize_window)
        self.pending = 0  # received, not yet consumed by the application
        self.unacked = 0  # consumed by the application, not yet credited back
        self.credit_epoch = -2  # the last credit epoch it returned credit in (never yet)
        self.remote_fin = False
        # sending
        self.out: deque[memoryview] = deque()
        self.out_size = 0
        self.credit = fr.INITIAL_WINDOW
        self.fin_pending = False
        self.fin_sent = False
        self.queued = False  # in the round-robin queue
        self.waiting = False  # send() said to wait: StreamWritable once below the limit
        self.failed = False

    def __repr__(self) -> str:
        return f"<StreamState {self.stream_id} in={self.bytes_in} out={self.bytes_out}>"

    def _sendable(self) -> bool:
        if self.failed:
            return False
        if self.out_size:
            return self.credit > 0
        return self.fin_pending and not self.fin_sent

    def _whole(self, limit: int) -> int:
        """The bytes of the queued writes, from the first, that fit whole in ``limit``
        (0 if the first alone does not)."""
        total = 0
        for chunk in self.out:
            n = len(chunk)
            if total + n > limit:
                break
            total += n
        return total

    def _take(self, limit: int) -> list[memoryview]:
        parts: list[memoryview] = []
        out = self.out
        while limit and out:
            chunk = out[0]
            if len(chunk) <= limit:
                out.popleft()
            else:
                out[0] = chunk[limit:]
                chunk = chunk[:limit]
            parts.append(chunk)
            limit -= len(chunk)
        return parts


class MuxMachine:
    """One tunnel's streams; see the module docstring.

    ``role`` picks the stream id parity (odd for the server): exactly one side
    must be each. Call :meth:`start` with the time first. Local actions on a
    stream the machine no longer has (it ended) are ignored, except
    :meth:`send`, which raises :class:`StreamClosed`.
    """

    def __init__(self, *, role: PeerRole, keepalive: float = 15.0, dead_after: float = 45.0,
                 window: int = fr.INITIAL_WINDOW, min_turn: int = DEFAULT_MIN_TURN,
                 max_streams: int = DEFAULT_MAX_STREAMS, name: str = "mux",
                 services: int | None = None) -> None:
        if role not in ("server", "client"):
            raise ValueError(f"role must be 'server' or 'client', not {role!r}")
        if not 0 < keepalive < dead_after:
            raise ValueError("need 0 < keepalive < dead_after")
        if not 0 < min_turn <= fr.BASE_MAX_PAYLOAD:
            raise ValueError(f"min_turn must be 1..{fr.BASE_MAX_PAYLOAD}")
        if not fr.INITIAL_WINDOW <= window <= fr.MAX_INCREMENT:
            raise ValueError(f"window must be {fr.INITIAL_WINDOW}..{fr.MAX_INCREMENT}")
        if services is not None and not 1 <= services <= fr.MAX_SERVICES:
            raise ValueError(f"services must be 1..{fr.MAX_SERVICES}")
        self.role: PeerRole = role
        self.name = name
        self.keepalive = keepalive
        self.dead_after = dead_after
        self.window = window
        self.min_turn = min_turn
        self.max_streams = max_streams
        # A sharer's services (announced at start; None: not a sharer, nothing to
        # announce, and a peer's stream is for service 0 only).
        self.services = services
        # The peer's, once known (PeerServices); until then only service 0 is opened.
        self.peer_services: int | None = None
        # Counters: stream payload bytes, all streams together.
        self.bytes_in = 0
        self.bytes_out = 0
        self.total_streams = 0
        self.rtt: float | None = None  # seconds, from the last PING/PONG
        self._odd = role == "server"  # our ids are odd
        self._streams: dict[int, StreamState] = {}
        self._next_id = 1 if self._odd else 2
        self._peer_last_id = 0
        self._control: deque[bytes] = deque()
        self._ready: deque[StreamState] = deque()
        self._decoder = FrameDecoder()
        self._window_budget = AUTO_WINDOW_BUDGET  # see _resize_window
        self._credit_epoch = 0  # see _resize_window
        self._epoch_credit = 0  # bytes of credit returned in this epoch
        self._state: MuxState = "new"
        self._end_reason: TunnelError | None = None  # TunnelClosed if it ended cleanly
        self._last_rx = 0.0
        self._next_ping = 0.0
        # Record size (see the module docstring).
        self._peer_budget = BASE_RECORD_BUDGET  # the most the peer takes
        self._budget = BASE_RECORD_BUDGET  # the current records'
        self._rate_since = 0.0
        self._rate_bytes = 0
        self._queued = 0  # DATA bytes queued, all streams together
        self._idle_since: float | None = None  # nothing was queued after a record then

    # -- observation ------------------------------------------------------------

    @property
    def state(self) -> MuxState:
        return self._state

    @property
    def end_reason(self) -> TunnelError | None:
        """Why the tunnel ended, :class:`TunnelClosed` for a clean close; None while not."""
        return self._end_reason

    @property
    def error(self) -> TunnelError | None:
        """The failure that ended the tunnel (None while open or after a clean close)."""
        return None if isinstance(self._end_reason, TunnelClosed) else self._end_reason

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    @property
    def window_budget(self) -> int:
        """Window growth still available to busy streams, in bytes."""
        return self._window_budget

    @property
    def record_budget(self) -> int:
        """Bytes of frames the next record may hold."""
        return self._budget

    @property
    def peer_record_budget(self) -> int:
        """The most the peer takes (``BASE_RECORD_BUDGET`` until it announces more)."""
        return self._peer_budget

    def stream(self, stream_id: int) -> StreamState | None:
        return self._streams.get(stream_id)

    @property
    def wants_to_send(self) -> bool:
        """:meth:`data_to_send` may have frames."""
        return bool(self._control or self._ready)

    @property
    def next_deadline(self) -> float | None:
        """When :meth:`timer` must be called next (a ping or the dead-peer limit)."""
        if self._state != "open":
            return None
        return min(self._next_ping, self._last_rx + self.dead_after)

    # -- life -------------------------------------------------------------------

    def start(self, now: float) -> None:
        if self._state != "new":
            raise TunnelError(f"{self.name} already started")
        self._state = "open"
        self._last_rx = now
        self._next_ping = now + self.keepalive
        self._rate_since = now
        if self.services is not None:  # before rec: see PeerServices
            self._control.append(fr.encode_ping(fr.announce_services(self.services)))
        self._control.append(fr.encode_ping(fr.announce_records(RECORD_BUDGET)))

    def goaway(self, code: int = 0, message: str = "closing") -> None:
        """Queue GOAWAY (a clean close); :meth:`end` once it is sent (or given up)."""
        if self._state == "open":
            self._control.append(fr.encode_goaway(code, message))

    def end(self, error: TunnelError, *, graceful: bool) -> list[MuxEvent]:
        """End the tunnel for a local reason (closed, the connection failed...)."""
        return self._end(error, graceful=graceful)

    def connection_lost(self, exc: Exception | None) -> list[MuxEvent]:
        """The channel under the mux ended (``None``: cleanly, but without GOAWAY)."""
        if isinstance(exc, TunnelError):
            return self._end(exc, graceful=False)
        if isinstance(exc, OSError):
            return self._end(PeerLost(f"the tunnel connection failed: {exc.strerror or exc}"),
                             graceful=False)
        if exc is not None:
            return self._end(TunnelError(f"the tunnel connection failed: {exc!r}"),
                             graceful=False)
        return self._end(PeerLost("the peer's connection ended without a goodbye "
                                  "(its nopf stopped or the path broke)"), graceful=False)

    def timer(self, now: float) -> list[MuxEvent]:
        """Keepalive: a PING when one is due, :class:`PeerLost` after ``dead_after``."""
        if self._state != "open":
            return []
        idle = now - self._last_rx
        if idle >= self.dead_after:
            return self._end(PeerLost(
                f"the peer went silent: nothing received for {idle:.1f} s "
                f"(limit {self.dead_after:g} s); the peer or the path is gone"), graceful=False)
        if now >= self._next_ping:
            self._control.append(fr.encode_ping(_PING.pack(int(now * 1e9) & _U64)))
            self._next_ping = now + self.keepalive
        return []

    # -- the application's actions ----------------------------------------------

    def open_stream(self, service: int = 0) -> int:
        """A new stream to the peer's ``service`` (OPEN queued; data may follow at
        once); its id. A service but 0 needs the peer's count first
        (:class:`PeerServices`): an older sharer takes an OPEN that names one for a
        broken frame."""
        self._check_open()
        if service:
            known = self.peer_services
            if known is None:
                raise TunnelError(f"{self.name}: the peer's services are not known yet")
            if service >= known:
                raise NoSuchService(service, known)
        if len(self._streams) >= self.max_streams:
            raise TunnelError(f"too many open streams ({self.max_streams})")
        stream_id = self._next_id
        if stream_id > fr.MAX_STREAM_ID:
            raise TunnelError("stream ids exhausted: reconnect the tunnel")
        self._next_id += 2
        stream = self._streams[stream_id] = StreamState(stream_id, self.window, service)
        self.total_streams += 1
        self._control.append(fr.encode_open(stream_id, service))
        self._open_window(stream)
        return stream_id

    def send(self, stream_id: int, data: Buffer, *, eager: bool = False) -> bool:
        """Queue ``data``; False when the stream has ``STREAM_SEND_BUFFER`` or more
        queued: the sender waits for :class:`StreamWritable`. The machine keeps
        ``bytes`` and views of what does not change while viewed
        (:func:`~nopf_web.buffers.unchanging`: a local read's slab) as given, no
        copy; other buffers are copied.

        ``eager``: the caller sends all it can before it sends more (it flushes
        first), so a ``data`` that alone took the queue to the limit, on a stream
        with the credit to send all that is queued, needs no wait: True, and no
        StreamWritable (a bulk sender's every 256 KiB read is such a ``data``;
        waiting and resuming cost it an event and two epoll_ctl calls a record)."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.fin_pending:
            raise StreamClosed(f"stream {stream_id}: write after write_eof()")
        n = len(data)
        if n:
            if type(data) is bytes:
                view = memoryview(data)
            elif type(data) is memoryview and unchanging(data):
                view = data
            else:
                view = memoryview(bytes(data))
            stream.out.append(view)
            stream.out_size += n
            self._queued += n
            self._schedule(stream)
        queued = stream.out_size
        if queued < STREAM_SEND_BUFFER:
            return True
        if eager and queued - n < STREAM_SEND_BUFFER and stream.credit >= queued:
            return True
        stream.waiting = True
        return False

    def writable(self, stream_id: int) -> bool:
        """Below ``STREAM_SEND_BUFFER`` queued (True for a stream that ended)."""
        stream = self._streams.get(stream_id)
        return stream is None or stream.out_size < STREAM_SEND_BUFFER

    def end_stream(self, stream_id: int) -> None:
        """Half-close: FIN after the queued data; receiving goes on."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.fin_pending:
            return
        stream.fin_pending = True
        self._schedule(stream)

    def reset_stream(self, stream_id: int, code: int = ResetCode.CANCEL,
                     message: str = "") -> StreamReset:
        """Abort the stream both ways (RST); the error it now fails with."""
        stream = self._streams.get(stream_id)
        if stream is not None:
            return self._reset(stream, code, message, local=True).error
        # It ended already (FIN both ways): tell the peer anyway, as a reset TCP
        # connection would; the peer drops an RST for a stream it forgot.
        if self._state == "open":
            self._control.append(fr.encode_reset(stream_id, code, message))
        return StreamReset(f"stream {stream_id} was reset" + (f": {message}" if message else ""),
                           code=code)

    def consumed(self, stream_id: int, n: int) -> bool:
        """The application took ``n`` bytes of the stream's data: credit them back
        (in batches of a quarter window: fewer frames, no stall). True when a
        WINDOW_UPDATE was queued (there is something to send)."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return False
        stream.pending -= n
        stream.unacked += n
        if stream.unacked >= stream.window // 4 and not stream.remote_fin:
            credit = stream.unacked + self._resize_window(stream, stream.unacked)
            stream.unacked = 0
            if credit:
                self._grant(stream, credit)
                return True
        return False

    # -- receiving --------------------------------------------------------------

    def receive(self, data: bytes | memoryview, now: float) -> list[MuxEvent]:
        """Plaintext from the peer (frames may straddle calls). Pass ``bytes`` or
        a view of ``bytes``: DATA payloads are then zero-copy slices of it."""
        if self._state != "open":
            return []
        self._last_rx = now
        events: list[MuxEvent] = []
        try:
            # A record of one DATA frame (a bulk stream's every record) skips the
            # decoder's frame list.
            whole = self._decoder.whole_data(data)
            frames = (_DataFrame(*whole),) if whole is not None else self._decoder.feed(data)
            streams = self._streams
            for frame in frames:
                if type(frame) is _DataFrame:  # the hot path first, inline
                    sid, payload = frame
                    stream = streams.get(sid)
                    n = len(payload)
                    if stream is not None and not stream.remote_fin and n <= stream.recv_window:
                        self.bytes_in += n
                        stream.recv_window -= n
                        stream.bytes_in += n
                        stream.pending += n
                        events.append(StreamData(sid, payload))
                    else:
                        self._on_data(sid, payload, events)
                else:
                    self._dispatch(frame, now, events)
        except FrameError as exc:
            events += self._end(TunnelProtocolError(f"the peer broke the tunnel protocol: {exc}"),
                                graceful=False)
        except TunnelError as exc:
            events += self._end(exc, graceful=isinstance(exc, TunnelClosed))
        return events

    def _on_data(self, stream_id: int, data: bytes | memoryview, events: list[MuxEvent]) -> None:
        stream = self._streams.get(stream_id)
        if stream is None or stream.remote_fin:
            self._check_known(stream_id, "DATA")
            return
        n = len(data)
        self.bytes_in += n
        if n > stream.recv_window:
            events.append(self._reset(
                stream, ResetCode.FLOW_CONTROL,
                f"peer sent {n} bytes with {stream.recv_window} of credit", local=True))
            return
        stream.recv_window -= n
        stream.bytes_in += n
        stream.pending += n
        events.append(StreamData(stream_id, data))

    def _dispatch(self, frame: fr.Frame, now: float, events: list[MuxEvent]) -> None:
        match frame:
            case fr.WindowUpdateFrame(sid, increment):
                stream = self._streams.get(sid)
                if stream is None:
                    self._check_known(sid, "WINDOW_UPDATE")
                    return
                stream.credit += increment
                if stream.credit > fr.MAX_INCREMENT:
                    raise TunnelProtocolError(f"stream {sid}: credit above 2^31-1")
                self._schedule(stream)
            case fr.OpenFrame(sid, service):
                self._on_open(sid, service, events)
            case fr.FinFrame(sid):
                stream = self._streams.get(sid)
                if stream is None:
                    self._check_known(sid, "FIN")
                    return
                if not stream.remote_fin:
                    stream.remote_fin = True
                    events.append(StreamEof(sid))
                    self._maybe_forget(stream, events)
            case fr.ResetFrame(sid, code, message):
                stream = self._streams.get(sid)
                if stream is not None:
                    events.append(self._reset(stream, code, message, local=False))
            case fr.PingFrame(opaque):
                self._control.append(fr.encode_pong(opaque))
                budget = fr.announced_records(opaque)
                if budget is not None:
                    self._peer_budget = budget
                    if self.peer_services is None:  # a sharer says svc before rec
                        self._know_services(1, events)
                elif (count := fr.announced_services(opaque)) is not None and \
                        self.peer_services is None:
                    self._know_services(count, events)
            case fr.PongFrame(opaque):
                if not fr.is_announcement(opaque):  # the answer to our announcement
                    self.rtt = (int(now * 1e9) - _PING.unpack(opaque)[0]) / 1e9
            case fr.GoAwayFrame(_code, message):
                why = f": {message}" if message and message != "closing" else ""
                raise TunnelClosed(f"the peer closed the tunnel{why}")

    def _know_services(self, count: int, events: list[MuxEvent]) -> None:
        self.peer_services = count
        events.append(PeerServices(count))

    def _on_open(self, sid: int, service: int, events: list[MuxEvent]) -> None:
        if (sid % 2 == 1) == self._odd:
            raise TunnelProtocolError(f"the peer opened stream {sid}, which is one of our ids")
        if sid <= self._peer_last_id:
            raise TunnelProtocolError(f"the peer reopened stream {sid}")
        self._peer_last_id = sid
        if len(self._streams) >= self.max_streams:
            self._control.append(fr.encode_reset(sid, ResetCode.TOO_MANY_STREAMS,
                                                 f"more than {self.max_streams} open streams"))
            return
        if service >= (self.services or 1):
            self._control.append(fr.encode_reset(sid, ResetCode.REFUSED,
                                                 str(NoSuchService(service, self.services or 1))))
            return
        stream = self._streams[sid] = StreamState(sid, self.window, service)
        self.total_streams += 1
        self._open_window(stream)
        events.append(StreamOpened(sid, stream))

    def _check_known(self, sid: int, what: str) -> None:
        # Frames for a stream that ended (e.g. DATA crossing our RST) are dropped;
        # frames for one that was never opened mean the peer is out of sync.
        ours = (sid % 2 == 1) == self._odd
        if (ours and sid >= self._next_id) or (not ours and sid > self._peer_last_id):
            raise TunnelProtocolError(f"{what} for stream {sid}, which was never opened")

    # -- sending ----------------------------------------------------------------

    def data_to_send(self, now: float) -> tuple[list[bytes | memoryview], list[MuxEvent]]:
        """The frames for one record (all control frames, then DATA round-robin),
        as buffers to send in order without joining them, and the events sending
        them caused (:class:`StreamWritable`, :class:`StreamDone`). Empty when
        there is nothing to send. ``now``: the time, which sizes the records."""
        parts: list[bytes | memoryview] = []
        events: list[MuxEvent] = []
        if self._state != "open":
            return parts, events
        size = 0
        budget = self._budget
        max_frame = budget - fr.CONTROL_ROOM
        control, ready = self._control, self._ready
        while control:
            frame = control.popleft()
            parts.append(frame)
            size += len(frame)
        # The streams queued now share the record (see the module docstring). With
        # 16 KiB turns, ten bulk streams cut every record into 16 frames: each a
        # header, a slice, an event and a local send at the peer.
        turn = max(self.min_turn, (budget - size) // max(len(ready), 1) - fr.HEADER_SIZE)
        served: StreamState | None = None  # the stream of the record's last DATA frame
        while ready:
            stream = ready[0]
            if stream.failed:
                ready.popleft()
                stream.queued = False
                continue
            # A stream alone in the queue delays nobody: one frame filling the
            # rest of the record. A frame never goes past the budget (the resume
            # layer would carry the excess in a record of its own): a stream
            # whose turn does not fit starts the next record.
            room = min(budget - size - fr.HEADER_SIZE, max_frame)
            alone = len(ready) == 1
            n = min(stream.out_size, stream.credit, room if alone else turn)
            if n > room or room <= 0:
                break
            if alone and n == room < min(stream.out_size, stream.credit):
                # Where the record's room is all that stops a lone stream, its
                # frame ends where a write ends, so that a bulk sender's reads
                # stay one frame each: sealed in place (see tunnel.slab), one
                # frame a record at the peer. A write is cut only if none fits
                # whole, and not for a second frame of the stream: the record's rest.
                whole = stream._whole(n)
                if whole:
                    n = whole
                elif stream is served:
                    break
            ready.popleft()
            stream.queued = False
            if n:
                queued = stream.out_size
                # 0 < n <= max_frame <= MAX_PAYLOAD and a valid id: no need for the codec's checks.
                parts.append(_pack_header(_DATA, stream.stream_id, n))
                parts += stream._take(n)
                stream.out_size = queued - n
                self._queued -= n
                stream.credit -= n
                stream.bytes_out += n
                self.bytes_out += n
                size += fr.HEADER_SIZE + n
                served = stream
                if stream.waiting and stream.out_size < STREAM_SEND_BUFFER:
                    stream.waiting = False
                    events.append(StreamWritable(stream.stream_id))
            if not stream.out_size and stream.fin_pending and not stream.fin_sent \
                    and size + fr.HEADER_SIZE <= budget:
                parts.append(fr.encode_fin(stream.stream_id))
                size += fr.HEADER_SIZE
                stream.fin_sent = True
                self._maybe_forget(stream, events)
            self._schedule(stream)  # back of the queue if it still has data and credit
        if self._peer_budget > BASE_RECORD_BUDGET:
            self._size_records(size, now)
        return parts, events

    def _size_records(self, size: int, now: float) -> None:
        """Count a record; each ``RATE_INTERVAL`` or more, size the next records for
        the rate the tunnel carried: a channel paused by a slow path and streams
        waiting for credit lower it. A ``RATE_INTERVAL`` or more with nothing
        queued is not the path's time: the record after it starts a new interval,
        and the budget stays as it was. (Shorter gaps count: a bulk stream's queue
        empties for a moment between two local reads.)"""
        if self._idle_since is not None:
            if now - self._idle_since >= RATE_INTERVAL:
                self._rate_since, self._rate_bytes = now, 0
            self._idle_since = None
        if not self._queued and not self._control:
            self._idle_since = now
        self._rate_bytes += size
        elapsed = now - self._rate_since
        if elapsed >= RATE_INTERVAL:
            fits = int(self._rate_bytes / elapsed * RECORD_TIME)
            self._budget = min(self._peer_budget, max(BASE_RECORD_BUDGET, fits))
            self._rate_since = now
            self._rate_bytes = 0

    # -- internals --------------------------------------------------------------

    def _check_open(self) -> None:
        if self._end_reason is not None:
            raise self._end_reason
        if self._state != "open":
            raise TunnelError(f"{self.name} is not started")

    def _schedule(self, stream: StreamState) -> None:
        if not stream.queued and stream._sendable():
            stream.queued = True
            self._ready.append(stream)

    def _open_window(self, stream: StreamState) -> None:
        if self.window > fr.INITIAL_WINDOW:
            self._grant(stream, self.window - fr.INITIAL_WINDOW)

    def _grant(self, stream: StreamState, increment: int) -> None:
        stream.recv_window += increment
        self._control.append(fr.encode_window_update(stream.stream_id, increment))

    def _reset(self, stream: StreamState, code: int, message: str, *,
               local: bool) -> StreamFailed:
        sid = stream.stream_id
        if local:
            self._control.append(fr.encode_reset(sid, code, message))
            why = f"stream {sid} was reset" + (f": {message}" if message else "")
        else:
            why = f"stream {sid} was reset by the peer" + (f": {message}" if message else "")
        self._forget(stream)
        return StreamFailed(sid, StreamReset(why, code=code))

    def _maybe_forget(self, stream: StreamState, events: list[MuxEvent]) -> None:
        if stream.fin_sent and stream.remote_fin:
            self._streams.pop(stream.stream_id, None)
            self._release_window(stream)
            events.append(StreamDone(stream.stream_id))

    def _forget(self, stream: StreamState) -> None:
        stream.failed = True
        stream.out.clear()
        self._queued -= stream.out_size
        stream.out_size = 0
        self._streams.pop(stream.stream_id, None)
        self._release_window(stream)

    def _resize_window(self, stream: StreamState, returning: int) -> int:
        """How much to add to (or, down to -``returning``, withhold from) the
        credit ``stream`` is about to return.

        A stream is busy when it returned credit in this credit epoch or the
        last; an epoch ends when the tunnel has returned its windows' worth (a
        bulk stream returns credit at least once a window). While every stream
        on the tunnel is busy, a stream whose application keeps up (nothing
        left unconsumed) doubles its window, so the sender fills whole records
        instead of waiting on credit (ten bulk streams at 256 KiB sent one
        record per credit record, of a few streams' credit). Once a stream is
        not busy (an interactive one, an idle one, a new one) the others
        shrink back: their bulk bytes in flight would queue ahead of its frames.
        """
        epoch = self._count_credit(stream, returning)
        if not self._all_busy(epoch):
            delta = max(self.window - stream.window, -returning)
        elif stream.pending:
            return 0
        else:
            # Several streams share the budget evenly (one would take it all).
            cap = min(AUTO_WINDOW_MAX, self.window + AUTO_WINDOW_BUDGET // len(self._streams))
            delta = min(stream.window, cap - stream.window)
            if delta <= 0 or delta > self._window_budget:
                return 0
        self._window_budget -= delta
        stream.window += delta
        return delta

    def _count_credit(self, stream: StreamState, returning: int) -> int:
        """``stream`` returns ``returning`` bytes of credit now: the credit epoch it
        returned it in (an epoch ends once the tunnel returned its windows' worth)."""
        stream.credit_epoch = epoch = self._credit_epoch
        self._epoch_credit += returning
        windows = len(self._streams) * self.window + AUTO_WINDOW_BUDGET - self._window_budget
        if self._epoch_credit >= windows:
            self._credit_epoch += 1
            self._epoch_credit = 0
        return epoch

    def _all_busy(self, epoch: int) -> bool:
        """Every open stream returned credit in ``epoch`` or the one before (a lone
        stream is busy; more than GROWING_STREAMS streams never count as busy)."""
        streams = self._streams
        if len(streams) == 1:
            return True
        return len(streams) <= GROWING_STREAMS and all(
            s.credit_epoch >= epoch - 1 for s in streams.values())

    def _release_window(self, stream: StreamState) -> None:
        self._window_budget += stream.window - self.window
        stream.window = self.window

    def _end(self, error: TunnelError, *, graceful: bool) -> list[MuxEvent]:
        if self._state in ("closed", "failed"):
            return []
        self._state = "closed" if graceful else "failed"
        self._end_reason = error
        for stream in self._streams.values():
            stream.failed = True
            stream.out.clear()
            stream.out_size = 0
            self._release_window(stream)
        self._queued = 0
        self._streams.clear()
        self._control.clear()
        self._ready.clear()
        return [TunnelEnded(error, graceful)]
