"""A tunnel that outlives its TCP connections: the resume layer, as a sans-IO machine.

Between the mux (:mod:`nopf_web.tunnel.mux_machine`, which sees only frame
bytes) and the record layer (:mod:`nopf_web.tunnel.record_machine`, one per TCP
connection). The mux's bytes travel in numbered DATA messages that the peer
acknowledges; each message is kept (by reference, never copied) until it is
acknowledged, and replayed in order over the next connection when one breaks.
The mux never sees a path change: every byte reaches it exactly once, in
order, across connections.

No sockets, no event loop, no clock: the driver
(:mod:`nopf_web.tunnel.resumable`) passes ``now`` (seconds, any monotonic
clock) to every input and calls :meth:`ResumeMachine.timer` at
:attr:`ResumeMachine.next_deadline`. Inputs: :meth:`~ResumeMachine.add_path`,
:meth:`~ResumeMachine.path_confirmed`, :meth:`~ResumeMachine.path_closed`,
:meth:`~ResumeMachine.progress`, :meth:`~ResumeMachine.receive` (one record's
plaintext from one path), :meth:`~ResumeMachine.send` (one record's worth of
mux bytes), :meth:`~ResumeMachine.timer`, :meth:`~ResumeMachine.close`.
Outputs, as events: :class:`Send` (a record's plaintext for one path),
:class:`Deliver` (bytes for the mux), :class:`ClosePath`,
:class:`PathSelected`, :class:`PathLost`, :class:`PathFailed`,
:class:`NeedPath`, :class:`Writable`, :class:`TunnelFailed`,
:class:`PeerClosed`.

Messages, one per record (the record's whole plaintext), integers big-endian::

    offset  size  field
    0       1     kind
    DATA    1     kind 1, u64 seq, u64 ack, then 1..MAX_DATA_PAYLOAD mux bytes
                  (17-byte header). seq counts DATA messages per direction from 0;
                  ack, here and below, is the next seq the sender expects from
                  the peer (everything before it arrived).
    ACK     2     kind 2, u64 ack                          (9 bytes)
    SELECT  3     kind 3, u64 ack, u32 epoch               (13 bytes)
                  leader -> follower: "this connection carries the tunnel from now
                  on"; epochs increase, so a late SELECT never undoes a newer one.
    PING    4     kind 4, u64 opaque (the sender's clock in ns) (9 bytes)
    PONG    5     kind 5, the u64 of the PING it answers   (9 bytes)
    CLOSE   6     kind 6                                   (1 byte)
                  the tunnel ends: the connections closing next are no loss.

Receiving: DATA with seq == the next expected is delivered; a lower seq is a
copy already delivered (a replay) and is dropped; a higher one, an ack beyond
what was sent, an unknown kind or a wrong size is a protocol error that fails
the tunnel. Every connection carries a contiguous run of seqs starting at or
below what the peer has, so a gap cannot happen between honest peers.

Acknowledging: every DATA carries our ack. Without DATA to carry it, an ACK
goes out ``ack_delay`` (20 ms) after the first unacknowledged message, or at
once when ``ack_bytes`` (a quarter of the replay cap: 2 MiB) are unacknowledged.
The spec's 256 KiB would have cost one more record per 256 KiB on a one-way
bulk transfer; 2 MiB keeps the sender's buffer at most a quarter full.

Replay buffer: the parts of every unacknowledged DATA (the mux's own buffers
are ``bytes`` or views of local reads' slabs, which do not change while viewed:
:func:`nopf_web.buffers.unchanging`; anything else is copied once). When it holds
``replay_cap`` bytes (8 MiB) or more, :attr:`writing_paused` is true (the
driver's ``drain`` waits) until an ack frees space (:class:`Writable`).

Paths (one TCP connection each, of a :data:`PathKind`): the first one is
active from the start (today's handshake, no SELECT). Later ones are
candidates once authenticated (:meth:`path_confirmed`). The leader (the
server role) picks: direct kinds over the relay, among equals the newest. It
sends SELECT there, replays every unacknowledged DATA there and sends only
there from then on. A candidate worse than a live active path is kept while
the leader probes the active path (a PING): if that is answered, the
candidate is closed; if not, the active path is lost and the candidate
selected. The follower (the client role) moves to whatever connection the
latest SELECT came on, answers with an ACK and replays. Both sides keep
reading the old connection; the leader closes it once the follower's first
record arrives on the new one, or after ``switch_grace`` (2 s); the follower
closes it after twice that if the leader did not. A candidate never selected
is closed after ``candidate_timeout`` (30 s).

Liveness, per active path, with T = max(``min_timeout`` 1 s, ``rtt_factor``
4 x smoothed RTT from PING/PONG): when something is outstanding
(unacknowledged DATA, or a PING) or the peer has been sending DATA since a PONG
last showed the path alive (a receiver of a one-way transfer has nothing of its
own outstanding), and nothing arrived for T, a probe PING; when still nothing
arrived T after the probe, the path is lost. A peer that merely stopped sending
answers the probe, and its next silence is no news until it sends DATA again. Any byte of the
peer counts as arrived (:meth:`progress`: a slow link may take longer than T
to carry one record), and while the peer's bytes arrive and we have sent
nothing for T/2 we send an ACK, so the peer sees us alive too. Idle: a PING
every ``keepalive`` (15 s). A connection that ends without CLOSE (RST, EOF,
timeout of the OS) is lost at once. A tampered record fails the tunnel, as
before: resuming would only hide the attacker. Each side detects on its own;
losing the path, it closes it (so the peer, if the path still half works,
sees the end at once).

A lost path: if a candidate exists, the leader selects it at once; otherwise
:class:`NeedPath` asks the driver's owner for a new connection (rendezvous,
punch, relay) and the tunnel waits, for at most ``resume_budget`` (60 s),
after which it fails with :class:`PeerLost` naming what was tried. Writes go
on meanwhile, into the replay buffer, up to its cap.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from nopf_web.buffers import Buffer, unchanging
from nopf_web.roles import PeerRole

from .errors import PeerLost, TunnelClosed, TunnelError, TunnelProtocolError, TunnelTampered
from .record_machine import MAX_RECORD

PathKind = Literal["lan", "public", "relay", "ipv6", "mapped"]
PATH_KINDS: tuple[PathKind, ...] = ("lan", "public", "relay", "ipv6", "mapped")
PathStatus = Literal["handshaking", "candidate", "active", "retiring", "closed"]


def path_rank(kind: PathKind) -> int:
    """Higher is preferred: every direct kind over the relay."""
    return 0 if kind == "relay" else 1


# -- messages -------------------------------------------------------------------------

DATA, ACK, SELECT, PING, PONG, CLOSE = 1, 2, 3, 4, 5, 6
_DATA = struct.Struct("!BQQ")  # kind, seq, ack
DATA_HEADER_SIZE = _DATA.size  # 17
MAX_DATA_PAYLOAD = MAX_RECORD - DATA_HEADER_SIZE
_SEQ_ACK = struct.Struct("!QQ")
_U64 = struct.Struct("!Q")
_ACK = struct.Struct("!BQ")  # kind, ack; also PING/PONG: kind, opaque
_SELECT = struct.Struct("!BQI")  # kind, ack, epoch
_CLOSE = bytes([CLOSE])
_SMALL_SIZE = _ACK.size  # 9
_MASK64 = (1 << 64) - 1

# -- defaults -------------------------------------------------------------------------

REPLAY_CAP = 8 * 1024 * 1024
KEEPALIVE = 15.0
MIN_TIMEOUT = 1.0
RTT_FACTOR = 4.0
ACK_DELAY = 0.020
SWITCH_GRACE = 2.0
CANDIDATE_TIMEOUT = 30.0
RESUME_BUDGET = 60.0


# -- events ---------------------------------------------------------------------------
# Values, never changed after they are made (not frozen: cheaper, and Send and
# Deliver are made once per record).


@dataclass(slots=True)
class Send:
    """Seal ``parts`` (joined) as one record on ``path``, in order with earlier Sends."""

    path: int
    parts: list[Buffer]


@dataclass(slots=True)
class Deliver:
    """The next mux bytes, in order, exactly once (a view of the record's bytes)."""

    data: memoryview


@dataclass(slots=True)
class ClosePath:
    """Close that connection: ``abort`` (RST, it is dead or hostile) or flush and FIN."""

    path: int
    abort: bool
    why: str


@dataclass(slots=True)
class PathSelected:
    """The tunnel now runs over ``path``. ``previous``: the kind it ran over
    before (None for the first path); ``after``: seconds since the previous
    path was lost (None when nothing was lost: the first path, an upgrade);
    ``replayed``: DATA messages sent again on it."""

    path: int
    kind: PathKind
    previous: PathKind | None
    after: float | None
    replayed: int


@dataclass(slots=True)
class PathLost:
    """The active path broke. ``silent_for``: seconds since the peer's last byte on
    it; ``timed_out``: found by liveness (else the connection reported an error
    or ended without CLOSE)."""

    path: int
    kind: PathKind
    why: str
    silent_for: float
    timed_out: bool


@dataclass(slots=True)
class PathFailed:
    """A connection that never carried the tunnel ended (its handshake failed, it
    was not selected, it broke while a candidate)."""

    path: int
    kind: PathKind
    why: str


@dataclass(slots=True)
class NeedPath:
    """No connection carries the tunnel and none is being set up: make one and
    :meth:`ResumeMachine.add_path` it (within the resume budget)."""

    why: str


@dataclass(slots=True)
class Writable:
    """The replay buffer went below its cap: writing may go on."""


@dataclass(slots=True)
class TunnelFailed:
    """The tunnel is over (every connection is being closed)."""

    error: TunnelError


@dataclass(slots=True)
class PeerClosed:
    """The peer ended the tunnel cleanly (CLOSE), after everything it sent."""


ResumeEvent = Send | Deliver | ClosePath | PathSelected | PathLost | PathFailed | NeedPath \
    | Writable | TunnelFailed | PeerClosed


# -- paths ----------------------------------------------------------------------------


class PathState:
    """One connection as the resume layer sees it (read-only outside the machine)."""

    __slots__ = ("added_at", "confirmed_at", "data_in", "data_out", "first", "heartbeat_at",
                 "id", "kind", "last_rx", "last_tx", "ping_at", "probe_at", "records_in",
                 "records_out", "retire_at", "selected_at", "srtt", "status", "streaming")

    def __init__(self, path_id: int, kind: PathKind, now: float, *, first: bool) -> None:
        self.id = path_id
        self.kind: PathKind = kind
        self.first = first
        self.status: PathStatus = "active" if first else "handshaking"
        self.added_at = now
        self.confirmed_at: float | None = None
        self.selected_at: float | None = now if first else None
        self.retire_at = 0.0
        self.last_rx = now  # the peer's last byte on this path (or when we began)
        self.last_tx = now
        self.ping_at: float | None = None  # an unanswered PING left then
        self.probe_at: float | None = None  # a liveness probe left then
        self.heartbeat_at: float | None = None  # see ResumeMachine.progress
        # The peer sent DATA since a PONG last showed the path alive: its silence
        # is suspect too (a receiver has nothing outstanding of its own).
        self.streaming = False
        self.srtt: float | None = None
        self.records_in = 0
        self.records_out = 0
        self.data_in = 0  # mux bytes carried (DATA payloads), replays included
        self.data_out = 0

    def __repr__(self) -> str:
        return f"<PathState {self.id} {self.kind} {self.status}>"


@dataclass(frozen=True, slots=True)
class PathStats:
    id: int
    kind: PathKind
    status: PathStatus
    data_in: int
    data_out: int
    records_in: int
    records_out: int
    rtt: float | None


@dataclass(frozen=True, slots=True)
class ResumeStats:
    """``kind``: the active path's (None while resuming); ``resumes``: moves to
    another path (after a loss or for an upgrade)."""

    kind: PathKind | None
    resumes: int
    replayed: int
    duplicates: int
    unacked_bytes: int
    paths: tuple[PathStats, ...]


def _describe(error: Exception | None) -> str:
    if error is None:
        return "the connection ended without a goodbye"
    if isinstance(error, OSError):
        return f"the connection failed ({error.strerror or error})"
    return str(error)


class ResumeMachine:
    """One tunnel's resume layer; see the module docstring.

    ``role`` decides who leads path selection: the server. Every input
    returns the events it caused, in order. After :class:`TunnelFailed`,
    :class:`PeerClosed` or :meth:`close`, inputs are ignored (and :meth:`send`
    raises the reason).
    """

    def __init__(self, role: PeerRole, *, replay_cap: int = REPLAY_CAP,
                 keepalive: float = KEEPALIVE, min_timeout: float = MIN_TIMEOUT,
                 rtt_factor: float = RTT_FACTOR, ack_delay: float = ACK_DELAY,
                 ack_bytes: int | None = None, switch_grace: float = SWITCH_GRACE,
                 candidate_timeout: float = CANDIDATE_TIMEOUT,
                 resume_budget: float = RESUME_BUDGET) -> None:
        if role not in ("server", "client"):
            raise ValueError(f"role must be 'server' or 'client', not {role!r}")
        if replay_cap < MAX_DATA_PAYLOAD:
            raise ValueError(f"replay_cap must be at least {MAX_DATA_PAYLOAD}")
        if not 0 < min_timeout < keepalive:
            raise ValueError("need 0 < min_timeout < keepalive")
        self.role: PeerRole = role
        self.leader = role == "server"
        self.replay_cap = replay_cap
        self.keepalive = keepalive
        self.min_timeout = min_timeout
        self.rtt_factor = rtt_factor
        self.ack_delay = ack_delay
        self.ack_bytes = replay_cap // 4 if ack_bytes is None else ack_bytes
        self.switch_grace = switch_grace
        self.candidate_timeout = candidate_timeout
        self.resume_budget = resume_budget
        self._state: Literal["open", "closed", "failed"] = "open"
        self._end: TunnelError | None = None
        self._paths: dict[int, PathState] = {}
        self._next_path = 1
        self._active: PathState | None = None
        self._retiring: list[PathState] = []
        self._epoch = 0  # the last SELECT sent (leader) or followed (follower)
        # sending
        self._send_seq = 0  # the next DATA's seq
        self._acked = 0  # the peer's ack: seq of the replay buffer's first entry
        # Each unacknowledged message: [header, mux bytes...] (the header is
        # rewritten whenever it is sent) and its size in mux bytes.
        self._replay: deque[tuple[list[Buffer], int]] = deque()
        self._replay_bytes = 0
        self._unacked_since: float | None = None
        self._full = False
        # receiving
        self._recv_next = 0
        self._ack_pending = 0  # payload bytes received since our last ack went out
        self._ack_due: float | None = None
        # resuming
        self._lost_at: float | None = None
        self._lost_kind: PathKind | None = None
        self._lost_why = ""
        self._attempts: list[str] = []
        # statistics
        self.resumes = 0
        self.replayed = 0
        self.duplicates = 0
        # Set when a deadline earlier than the driver's timer (see armed) may now
        # exist: the driver re-arms and clears it. A later one needs nothing: the
        # timer fires, finds nothing due and is set again.
        self.rearm = False
        self._timer_at = float("inf")

    # -- observation ------------------------------------------------------------------

    @property
    def state(self) -> Literal["open", "closed", "failed"]:
        return self._state

    @property
    def active(self) -> PathState | None:
        return self._active

    def path(self, path_id: int) -> PathState | None:
        return self._paths.get(path_id)

    @property
    def writing_paused(self) -> bool:
        """The replay buffer is full: hold writes until :class:`Writable`."""
        return self._replay_bytes >= self.replay_cap

    @property
    def unacked_bytes(self) -> int:
        return self._replay_bytes

    def stats(self) -> ResumeStats:
        return ResumeStats(
            kind=self._active.kind if self._active is not None else None,
            resumes=self.resumes, replayed=self.replayed, duplicates=self.duplicates,
            unacked_bytes=self._replay_bytes,
            paths=tuple(PathStats(p.id, p.kind, p.status, p.data_in, p.data_out, p.records_in,
                                  p.records_out, p.srtt) for p in self._paths.values()))

    def armed(self, at: float | None) -> None:
        """The driver's timer will call :meth:`timer` at ``at`` (None: not at all)."""
        self._timer_at = float("inf") if at is None else at

    def _wake(self, at: float) -> None:
        if at < self._timer_at:
            self.rearm = True

    def patience(self, p: PathState) -> float:
        """T: how long a path may stay silent while we wait for it."""
        if p.srtt is None:
            return self.min_timeout
        return max(self.min_timeout, self.rtt_factor * p.srtt)

    @property
    def next_deadline(self) -> float | None:
        """When :meth:`timer` must be called next, if ever."""
        if self._state != "open":
            return None
        deadlines: list[float] = []
        if self._ack_due is not None:
            deadlines.append(self._ack_due)
        deadlines += (r.retire_at for r in self._retiring)
        for c in self._paths.values():
            if c.status == "candidate" and c.confirmed_at is not None:
                deadlines.append(c.confirmed_at + self.candidate_timeout)
        p = self._active
        if p is None:
            if self._lost_at is not None:
                deadlines.append(self._lost_at + self.resume_budget)
        elif p.confirmed_at is not None:
            patience = self.patience(p)
            if p.probe_at is not None:
                deadlines.append(p.probe_at + patience)
            elif (waiting := self._waiting_since(p)) is not None:
                deadlines.append(max(p.last_rx, waiting) + patience)
            else:
                deadlines.append(p.last_rx + self.keepalive)
            if p.heartbeat_at is not None:
                deadlines.append(p.heartbeat_at)
        return min(deadlines) if deadlines else None

    # -- paths ------------------------------------------------------------------------

    def add_path(self, kind: PathKind, now: float, *, first: bool = False) -> int:
        """A new connection of ``kind``; its id. ``first``: the tunnel's first
        connection, which carries it from the start (records may be sent as soon
        as its handshake allows). Others are handshaking until
        :meth:`path_confirmed`."""
        if kind not in PATH_KINDS:
            raise ValueError(f"unknown path kind {kind!r}")
        if self._state != "open":
            raise self._end or TunnelClosed("the tunnel was closed")
        if first and (self._next_path != 1 or self._replay):
            raise ValueError("the first path must be added first, before any data")
        if not first and self._next_path == 1:
            raise ValueError("add the tunnel's first path first")
        path_id = self._next_path
        self._next_path += 1
        p = self._paths[path_id] = PathState(path_id, kind, now, first=first)
        if first:
            self._active = p
        return path_id

    def path_confirmed(self, path_id: int, now: float) -> list[ResumeEvent]:
        """The peer proved the tunnel's key on that connection."""
        p = self._paths.get(path_id)
        if p is None or self._state != "open" or p.confirmed_at is not None:
            return []
        return self._confirmed(p, now)

    def path_closed(self, path_id: int, error: Exception | None,
                    now: float) -> list[ResumeEvent]:
        """That connection ended: ``error`` from the record layer or the socket,
        ``None`` for a clean EOF (no loss only after the peer's CLOSE, or for a
        connection we were closing)."""
        p = self._paths.pop(path_id, None)
        if p is None:
            return []
        status, p.status = p.status, "closed"
        if p in self._retiring:
            self._retiring.remove(p)
        if self._state != "open" or status == "retiring":
            return []
        why = _describe(error)
        if isinstance(error, TunnelTampered):
            return self._fail(error)
        if p.first and p.confirmed_at is None:  # the tunnel was never set up
            return self._fail(error if isinstance(error, TunnelError) else PeerLost(
                f"the tunnel connection was lost before the peer confirmed it: {why}"))
        if status == "active":
            return self._lose(p, why, now, timed_out=False)
        self._attempts.append(f"{p.kind}: {why}")
        events: list[ResumeEvent] = [PathFailed(p.id, p.kind, why)]
        return events + self._need_path(f"the {p.kind} path failed: {why}")

    def attempt_failed(self, why: str) -> None:
        """The owner's try at a new path failed before any connection reached the
        tunnel (the rendezvous was down, the peer never came): named with the
        attempts when the resume budget ends. A repeat of the last one is counted."""
        if self._state != "open" or self._lost_at is None:
            return
        attempts = self._attempts
        last = attempts[-1] if attempts else ""
        if last == why:
            attempts[-1] = f"{why} (2 times)"
        elif last.startswith(f"{why} (") and last.endswith(" times)") \
                and last[len(why) + 2:-len(" times)")].isdigit():
            attempts[-1] = f"{why} ({int(last[len(why) + 2:-len(' times)')]) + 1} times)"
        else:
            attempts.append(why)

    def progress(self, path_id: int, now: float) -> None:
        """Bytes arrived on that connection without completing a record: the
        peer is alive, and we must show we are (see the module docstring)."""
        p = self._paths.get(path_id)
        if p is None:
            return
        p.last_rx = now
        p.probe_at = None
        if p.heartbeat_at is None and p is self._active:
            p.heartbeat_at = max(now, p.last_tx + self.patience(p) / 2)
            self._wake(p.heartbeat_at)

    # -- data -------------------------------------------------------------------------

    def send(self, parts: Iterable[Buffer], now: float) -> list[ResumeEvent]:
        """Mux bytes (``parts`` joined) to carry as one DATA message (or more, past
        :data:`MAX_DATA_PAYLOAD`); kept until acknowledged (by reference: only
        buffers that could change are copied). Raises the reason once the
        tunnel has ended."""
        if self._state != "open":
            raise self._end or TunnelClosed("the tunnel was closed")
        message: list[Buffer] = [b""]  # the header's place
        size = 0
        for part in parts:
            n = len(part)
            if n:
                kind = type(part)
                if kind is not bytes and (kind is not memoryview
                                          or not unchanging(part)):  # type: ignore[arg-type]
                    part = bytes(part)  # nobody may change it while it waits for its ack
                message.append(part)
                size += n
        if not size:
            return []
        if size <= MAX_DATA_PAYLOAD:
            return self._send_data(message, size, now)
        events: list[ResumeEvent] = []
        for chunk, n in _chunks(message[1:], MAX_DATA_PAYLOAD):
            events += self._send_data([b"", *chunk], n, now)
        return events

    def _send_data(self, message: list[Buffer], size: int, now: float) -> list[ResumeEvent]:
        """``message``: its header's place, then the mux bytes (kept as the replay
        entry, and sent as it is: the header goes in when it is sent)."""
        seq = self._send_seq
        self._send_seq = seq + 1
        self._replay.append((message, size))
        self._replay_bytes += size
        if self._unacked_since is None:
            self._unacked_since = now
            # Liveness now waits for an ack: at T (at least min_timeout) from now.
            self._wake(now + self.min_timeout)
        if self._replay_bytes >= self.replay_cap:
            self._full = True
        p = self._active
        if p is None:
            return []  # sent with the replay once a path carries the tunnel
        message[0] = _DATA.pack(DATA, seq, self._recv_next)
        self._ack_pending = 0
        self._ack_due = None
        p.data_out += size
        p.records_out += 1
        p.last_tx = now
        p.heartbeat_at = None
        return [Send(p.id, message)]

    def receive(self, path_id: int, plain: bytes | memoryview,
                now: float) -> list[ResumeEvent]:
        """One record's plaintext (``bytes``, or a view of a buffer that does not
        change while viewed: delivered data are views of it)."""
        p = self._paths.get(path_id)
        if p is None or self._state != "open":
            return []
        p.last_rx = now
        p.probe_at = None
        p.records_in += 1
        events: list[ResumeEvent] = []
        if p.confirmed_at is None:  # its records are opened only after its confirm
            events += self._confirmed(p, now)
        kind = plain[0]
        if kind == DATA:  # the hot path first
            if len(plain) <= DATA_HEADER_SIZE:
                return events + self._violation("a DATA message without data")
            seq, ack = _SEQ_ACK.unpack_from(plain, 1)
            p.streaming = True
            if ack != self._acked:
                events += self._on_ack(ack, now)
                if self._state != "open":
                    return events
            if seq == self._recv_next:
                self._recv_next = seq + 1
                n = len(plain) - DATA_HEADER_SIZE
                p.data_in += n
                self._ack_pending += n
                if self._ack_pending >= self.ack_bytes:
                    self._ack_due = now
                    self.rearm = True
                elif self._ack_due is None:
                    self._ack_due = now + self.ack_delay
                    self._wake(self._ack_due)
                events.append(Deliver(memoryview(plain)[DATA_HEADER_SIZE:]))
            elif seq > self._recv_next:
                return events + self._violation(
                    f"DATA {seq} when {self._recv_next} was expected (a gap)")
            else:
                self.duplicates += 1
            if self._retiring and self.leader and p is self._active:
                events += self._close_retiring("the peer moved to the new path")
        elif kind == ACK and len(plain) == _SMALL_SIZE:
            (ack,) = _U64.unpack_from(plain, 1)
            events += self._on_ack(ack, now)
            if self._retiring and self.leader and p is self._active:
                events += self._close_retiring("the peer moved to the new path")
        elif kind == PING and len(plain) == _SMALL_SIZE:
            events.append(self._out(p, [bytes([PONG]) + plain[1:]], now))
        elif kind == PONG and len(plain) == _SMALL_SIZE:
            events += self._on_pong(p, _U64.unpack_from(plain, 1)[0], now)
        elif kind == SELECT and len(plain) == _SELECT.size:
            if self.leader:
                return events + self._violation("SELECT from the follower")
            _kind, ack, epoch = _SELECT.unpack(plain)
            events += self._on_ack(ack, now)
            if self._state == "open" and epoch > self._epoch:
                events += self._follow(p, epoch, now)
        elif kind == CLOSE and len(plain) == 1:
            return events + self._peer_closed()
        else:
            return events + self._violation(
                f"a message of kind {kind} and {len(plain)} bytes")
        return events

    def timer(self, now: float) -> list[ResumeEvent]:
        """Acks, liveness, old and unselected connections, the resume budget."""
        if self._state != "open":
            return []
        events: list[ResumeEvent] = []
        if self._ack_due is not None and now >= self._ack_due:
            if self._active is not None:
                events.append(self._ack(self._active, now))
            else:
                self._ack_due = None  # SELECT or the follower's ACK carries it later
        for r in [r for r in self._retiring if now >= r.retire_at]:
            self._retiring.remove(r)
            r.status = "closed"
            self._paths.pop(r.id, None)
            events.append(ClosePath(r.id, abort=False, why="replaced by a newer path"))
        for c in list(self._paths.values()):
            if c.status == "candidate" and c.confirmed_at is not None \
                    and now >= c.confirmed_at + self.candidate_timeout:
                why = f"not selected within {self.candidate_timeout:g} s"
                events += self._drop(c, why) + self._need_path(f"the {c.kind} path was {why}")
        p = self._active
        if p is None:
            if self._lost_at is not None and now >= self._lost_at + self.resume_budget:
                return events + self._fail(PeerLost(self._give_up_message()))
        elif p.confirmed_at is not None:
            events += self._liveness(p, now)
        return events

    def close(self, now: float) -> list[ResumeEvent]:
        """End the tunnel cleanly: CLOSE on the active path, then close every
        connection (after what is queued on it)."""
        if self._state != "open":
            return []
        events: list[ResumeEvent] = []
        if self._active is not None:
            events.append(self._out(self._active, [_CLOSE], now))
        events += [ClosePath(p.id, abort=False, why="the tunnel was closed")
                   for p in self._paths.values()]
        self._finish("closed", TunnelClosed("the tunnel was closed"))
        return events

    def abort(self, error: TunnelError) -> list[ResumeEvent]:
        """End the tunnel at once (RST on every connection)."""
        if self._state != "open":
            return []
        events: list[ResumeEvent] = [ClosePath(p.id, abort=True, why=str(error))
                                     for p in self._paths.values()]
        self._finish("failed", error)
        return events

    # -- internals --------------------------------------------------------------------

    def _out(self, p: PathState, parts: list[Buffer], now: float) -> Send:
        p.records_out += 1
        p.last_tx = now
        p.heartbeat_at = None
        return Send(p.id, parts)

    def _ack(self, p: PathState, now: float) -> Send:
        self._ack_pending = 0
        self._ack_due = None
        return self._out(p, [_ACK.pack(ACK, self._recv_next)], now)

    def _ping(self, p: PathState, now: float) -> Send:
        if p.ping_at is None:
            p.ping_at = now
        return self._out(p, [_ACK.pack(PING, int(now * 1e9) & _MASK64)], now)

    def _waiting_since(self, p: PathState) -> float | None:
        """Since when we expect something from the peer on ``p`` (None: nothing): our
        unacknowledged DATA, our PING, or the peer's own stream (a receiver that
        hears nothing more must not wait for its keepalive to find out)."""
        waiting = self._unacked_since if self._replay else None
        if p.ping_at is not None and (waiting is None or p.ping_at < waiting):
            waiting = p.ping_at
        if p.streaming and (waiting is None or p.last_rx < waiting):
            waiting = p.last_rx
        return waiting

    def _liveness(self, p: PathState, now: float) -> list[ResumeEvent]:
        patience = self.patience(p)
        events: list[ResumeEvent] = []
        if p.heartbeat_at is not None and now >= p.heartbeat_at:
            p.heartbeat_at = None
            if now - p.last_tx >= patience / 2:
                events.append(self._ack(p, now))
        if p.probe_at is not None:
            if now >= p.probe_at + patience:
                silent = now - p.last_rx
                return events + self._lose(
                    p, f"nothing arrived for {silent:.1f} s (a probe went unanswered for "
                    f"{patience:.1f} s)", now, timed_out=True)
            return events
        waiting = self._waiting_since(p)
        if waiting is not None:
            if now >= max(p.last_rx, waiting) + patience:
                p.probe_at = now
                events.append(self._ping(p, now))
        elif now >= p.last_rx + self.keepalive:
            events.append(self._ping(p, now))
        return events

    def _on_ack(self, ack: int, now: float) -> list[ResumeEvent]:
        if ack <= self._acked:
            return []  # not news (it came on an older path)
        if ack > self._send_seq:
            return self._violation(f"an ack of {ack} when {self._send_seq} were sent")
        replay = self._replay
        freed = 0
        for _ in range(ack - self._acked):
            freed += replay.popleft()[1]
        self._replay_bytes -= freed
        self._acked = ack
        self._unacked_since = now if replay else None
        if self._full and self._replay_bytes < self.replay_cap:
            self._full = False
            return [Writable()]
        return []

    def _on_pong(self, p: PathState, opaque: int, now: float) -> list[ResumeEvent]:
        # Our clock in ns when the PING left; it may come back a hair early from
        # the round trip through an integer, hence a microsecond of slack below.
        sent = opaque / 1e9
        sample = now - sent
        if 0 <= sample < 3600:  # our own clock came back: a usable sample
            p.srtt = sample if p.srtt is None else 0.875 * p.srtt + 0.125 * sample
            if p.ping_at is not None and sent >= p.ping_at - 1e-6:
                p.ping_at = None
                p.streaming = False  # alive now: the peer's next silence is no news
        events: list[ResumeEvent] = []
        if self.leader and p is self._active:
            # The active path answers: candidates worse than it that were
            # waiting for this verdict are not needed.
            for c in list(self._paths.values()):
                if c.status == "candidate" and c.confirmed_at is not None \
                        and c.confirmed_at <= sent + 1e-6 \
                        and path_rank(c.kind) < path_rank(p.kind):
                    events += self._drop(c, f"the {p.kind} path is alive")
        return events

    def _confirmed(self, p: PathState, now: float) -> list[ResumeEvent]:
        p.confirmed_at = now
        p.last_rx = now
        events: list[ResumeEvent] = [self._ping(p, now)]  # a first RTT sample
        if p.status == "handshaking":
            p.status = "candidate"
            if self.leader:
                events += self._consider(now)
        return events

    def _consider(self, now: float) -> list[ResumeEvent]:
        """Leader: select the best candidate if it beats the active path."""
        candidates = [p for p in self._paths.values() if p.status == "candidate"]
        if not candidates:
            return []
        best = max(candidates, key=lambda p: (path_rank(p.kind), p.confirmed_at or 0.0, p.id))
        current = self._active
        if current is None or (path_rank(best.kind), best.confirmed_at or 0.0) \
                >= (path_rank(current.kind), current.confirmed_at or 0.0):
            return self._select(best, now)
        # Worse than a live path: keep it while we check that path (the follower
        # may have lost it).
        if current.probe_at is None and current.confirmed_at is not None:
            current.probe_at = now
            return [self._ping(current, now)]
        return []

    def _select(self, p: PathState, now: float) -> list[ResumeEvent]:
        self._epoch += 1
        old = self._switch_to(p, now)
        ack = self._recv_next
        self._ack_pending = 0
        self._ack_due = None
        events: list[ResumeEvent] = [self._out(p, [_SELECT.pack(SELECT, ack, self._epoch)], now)]
        return events + self._replay_on(p, now) + [self._selected(p, old, now)]

    def _follow(self, p: PathState, epoch: int, now: float) -> list[ResumeEvent]:
        self._epoch = epoch
        if p is self._active:
            return []
        old = self._switch_to(p, now)
        events: list[ResumeEvent] = [self._ack(p, now)]  # our first record there
        return events + self._replay_on(p, now) + [self._selected(p, old, now)]

    def _switch_to(self, p: PathState, now: float) -> PathState | None:
        old = self._active
        p.status = "active"
        p.selected_at = now
        p.probe_at = None
        self._active = p
        if old is not None and old is not p:
            old.status = "retiring"
            # The leader closes it when the follower shows up on the new path;
            # the follower only if the leader did not.
            old.retire_at = now + self.switch_grace * (1 if self.leader else 2)
            old.heartbeat_at = None
            self._retiring.append(old)
            self.rearm = True
        return old

    def _replay_on(self, p: PathState, now: float) -> list[ResumeEvent]:
        if not self._replay:
            return []
        self._unacked_since = now
        seq, ack = self._acked, self._recv_next
        events: list[ResumeEvent] = []
        for message, size in self._replay:
            message[0] = _DATA.pack(DATA, seq, ack)  # our ack now
            events.append(self._out(p, message, now))
            p.data_out += size
            seq += 1
        self.replayed += len(self._replay)
        return events

    def _selected(self, p: PathState, old: PathState | None, now: float) -> PathSelected:
        after = now - self._lost_at if self._lost_at is not None else None
        previous = old.kind if old is not None else self._lost_kind
        self.resumes += 1
        self._lost_at = None
        self._lost_kind = None
        self._attempts = []
        self.rearm = True
        replayed = self._send_seq - self._acked
        return PathSelected(p.id, p.kind, previous, after, replayed)

    def _close_retiring(self, why: str) -> list[ResumeEvent]:
        """Leader: the follower sent ACK or DATA (only ever sent on the path it
        uses) on the new path, so it moved: the old ones can go."""
        events: list[ResumeEvent] = []
        for r in self._retiring:
            r.status = "closed"
            self._paths.pop(r.id, None)
            events.append(ClosePath(r.id, abort=False, why=why))
        self._retiring.clear()
        return events

    def _drop(self, p: PathState, why: str) -> list[ResumeEvent]:
        """Close a connection that does not carry the tunnel."""
        self._paths.pop(p.id, None)
        p.status = "closed"
        return [ClosePath(p.id, abort=False, why=why), PathFailed(p.id, p.kind, why)]

    def _lose(self, p: PathState, why: str, now: float, *,
              timed_out: bool) -> list[ResumeEvent]:
        silent = now - p.last_rx
        p.status = "closed"
        self._paths.pop(p.id, None)
        self._active = None
        events: list[ResumeEvent] = []
        if timed_out:
            events.append(ClosePath(p.id, abort=True, why=why))
        events.append(PathLost(p.id, p.kind, why, silent, timed_out))
        if self._lost_at is None:
            self._lost_at = now
            self._lost_kind = p.kind
            self._lost_why = why
            self._attempts = []
            self.rearm = True
        if self.leader:
            events += self._consider(now)
        if self._active is None:
            events += self._need_path(f"the {p.kind} path was lost: {why}")
        return events

    def _need_path(self, why: str) -> list[ResumeEvent]:
        if self._active is not None:
            return []
        if any(p.status in ("handshaking", "candidate") for p in self._paths.values()):
            return []  # one is on its way (the follower waits for the leader's SELECT)
        return [NeedPath(why)]

    def _give_up_message(self) -> str:
        tried = "; ".join(self._attempts) if self._attempts else "no new connection came up"
        return (f"the tunnel's {self._lost_kind} path was lost ({self._lost_why}) and no "
                f"new path carried it within {self.resume_budget:g} s (tried: {tried})")

    def _peer_closed(self) -> list[ResumeEvent]:
        events: list[ResumeEvent] = [PeerClosed()]
        events += [ClosePath(p.id, abort=False, why="the peer closed the tunnel")
                   for p in self._paths.values()]
        self._finish("closed", TunnelClosed("the peer closed the tunnel"))
        return events

    def _violation(self, what: str) -> list[ResumeEvent]:
        return self._fail(TunnelProtocolError(f"the peer broke the resume protocol: {what}"))

    def _fail(self, error: TunnelError) -> list[ResumeEvent]:
        events: list[ResumeEvent] = [ClosePath(p.id, abort=True, why=str(error))
                                     for p in self._paths.values()]
        events.append(TunnelFailed(error))
        self._finish("failed", error)
        return events

    def _finish(self, state: Literal["closed", "failed"], error: TunnelError) -> None:
        self._state = state
        self._end = error
        for p in self._paths.values():
            p.status = "closed"
        self._paths.clear()
        self._retiring.clear()
        self._active = None
        self._replay.clear()
        self._replay_bytes = 0
        self._ack_due = None


def _chunks(parts: list[Buffer], limit: int) -> list[tuple[list[Buffer], int]]:
    """``parts`` cut into runs of at most ``limit`` bytes (views, no copies)."""
    out: list[tuple[list[Buffer], int]] = []
    chunk: list[Buffer] = []
    size = 0
    for part in parts:
        view = memoryview(part) if len(part) > limit - size else part
        start = 0
        while start < len(part):
            take = min(len(part) - start, limit - size)
            chunk.append(view if start == 0 and take == len(part)
                         else memoryview(view)[start : start + take])
            size += take
            start += take
            if size == limit:
                out.append((chunk, size))
                chunk, size = [], 0
    if size:
        out.append((chunk, size))
    return out
