"""The rendezvous server as one sans-IO machine: events in, actions out.

:class:`ServerMachine` is the whole of ``nopf-server``'s protocol logic, for
every connection at once, without sockets or a clock (h11 style). A driver
(:class:`nopf_web.rendezvous.server.RendezvousServer`, asyncio) feeds it what
happened, with the time ``now`` on one clock, and carries out what it returns:

Events (:meth:`ServerMachine.handle`)
    :class:`Accepted`  a connection came in: an opaque id (never reused), the
                       peer's address as the kernel reported it, and what the
                       kernel knew at accept: its smoothed RTT (``TCP_INFO``,
                       None where there is none) and whether the SYN carried data
                       (TCP Fast Open).
    :class:`Received`  bytes from a connection, with the kernel's RTT as of now
                       (its pings' ACKs arrive with the pongs, so the figure is
                       fresh whenever the machine uses it).
    :class:`PeerClosed` the peer's FIN (the driver keeps our direction open).
    :class:`Lost`      the connection is gone (a reset or a socket error, or our
                       close completed); ``writing``: a write of ours failed.
    :class:`Tick`      the time is ``now``: call it at :attr:`next_deadline`.
    :class:`Shutdown`  the server is stopping.
    :class:`RelayEnded` a relay session the driver was copying has ended (both
                       directions over, or stopped), with its byte counts.
    :class:`BookAnswer`, :class:`FromNode`, :class:`StoreHealth`  only on a node of a
                       rendezvous shared through Redis (``node`` given): the shared
                       book's answer to an :class:`AskBook`, a message from another
                       node, the store's state (a problem refuses new pairings).

Actions (a list, in order, from every event)
    :class:`Send`      write bytes.
    :class:`LastWord`  write bytes, then a FIN. The machine then discards what
                       the peer sends until it closes (then :class:`Close`), or
                       resets after ``write_timeout``: closing at once would turn
                       a late pong, unread in our kernel, into a RST that can
                       overtake the message on a reordering path and destroy it.
    :class:`Close`     close gracefully (FIN after what is buffered). The machine
                       waits for :class:`Lost`, and resets after ``write_timeout``.
    :class:`Reset`     drop with RST (``SO_LINGER`` 0): no TIME_WAIT, no buffered
                       data. The machine has forgotten the connection.
    :class:`Log`       one problem line (rate-limited per kind already).
    :class:`StartRelay` the two connections of a relay session are the driver's from
                       now on: write ``greeting`` to each, then copy bytes both ways,
                       unread, at most ``rate`` bytes/s for the two directions together
                       (0: no limit), until both directions end; then report
                       :class:`RelayEnded`. The machine has forgotten both
                       connections (it only counts the session).
    :class:`StopRelay` stop copying that session (the server is stopping): end both
                       connections; :class:`RelayEnded` follows.
    :class:`AskBook`   carry out an operation of the shared book (``--redis``), and
                       answer with :class:`BookAnswer` if it names a connection.
    :class:`ToNode`    deliver messages to another node (:class:`Delivered` answers
                       for the connection it names); :class:`PollNode`: read this
                       node's messages now.

:attr:`ServerMachine.next_deadline` is when the driver's single timer must
deliver the next :class:`Tick` (None: nothing is due).

What happens on a connection (``docs/protocol.md``, sections 1 and 6):

- accepted over the global or per-source cap: reset at once;
- the seed's 10-byte discovery reply, first, without reading anything (over IPv6
  the 22-byte one, then all that follows as over IPv4; a peer seen over IPv6 gets
  no IPv4 stage in its plans, and its relay address in its own family);
- then up to ``hello_timeout`` for a frame. The client closes (a seed client,
  served): reset, so its port is free at once; nothing in time: close, as the
  seed did (reset if a partial frame is buffered); bytes that are no frame:
  reset; a ``probe``: close at once; a valid frame that is no single valid
  hello: ``error`` then close;
- a hello: ``share`` (a nameplate, pings), ``join`` (claim, RTT, plans and the
  two fires, the sharer's timed), ``reshare``/``rejoin`` (coordinate a failed
  pairing again), ``resume`` (two hellos with one resume id and opposite sides
  pair like a code: the first waits, pinged, up to ``RESUME_WAIT``);
- a ``relay`` message (instead of a hello): a relay token from a plan's relay
  stage. Checked (known, unused, unexpired, from the IP its side coordinated
  from, within the relay's limits), it waits for the other side's, up to the
  token's expiry, then both get ``relayed`` and :class:`StartRelay` hands the
  two connections to the driver.

Shared through Redis (``docs/protocol.md``, "Several nodes"): share, join and
resume hellos ask the shared book instead of the in-memory one (the connection
waits in ``BOOK`` up to ``BOOK_WAIT``); a partner found there on another node is a
:class:`PeerSide` planned with as a local one, and its node gets its fire with
:class:`ToNode`; a relay session may be handed to the partner's node (a grant).

Each connection's state is a plain :class:`Conn`; a waiting sharer is known to
the nameplate book (:class:`~nopf_web.rendezvous.book.PairingBook`, any store
behind that interface) by its connection id only. A bug or an exception on one
connection costs that connection (one log line and a reset), never the others.
"""

from __future__ import annotations

import enum
import hashlib
import heapq
import ipaddress
import secrets
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from nopf_web.prediction import fire_facts, predict
from nopf_web.wire.address import Endpoint, parse_observed_endpoint
from nopf_web.wire.discovery import encode_reply, encode_reply6
from nopf_web.wire.errors import BadAddress, WireError
from nopf_web.wire.nat import NatSummary
from nopf_web.wire.rendezvous import (
    RELAY_TOKEN_SIZE,
    RESUME_WAIT,
    Candidate,
    ErrorReply,
    Fire,
    FrameReader,
    Hello,
    MessageError,
    PakeMessage,
    Ping,
    Pong,
    Probe,
    Relay,
    Relayed,
    RelayStage,
    ServerMessage,
    UnsupportedVersion,
    Welcome,
    decode_client_message,
    encode,
    mapped_unusable,
)

from .book import (
    ClaimRefused,
    NameplateBook,
    PairingBook,
    PairingLimits,
    PeerInfo,
    SymmetricPair,
    describe_duration,
    make_plans,
)

# Re-exported: the machine's own event and action vocabulary.
from .conn_events import (
    Accepted as Accepted,
    Close as Close,
    ConnId as ConnId,
    Log as Log,
    Lost as Lost,
    PeerClosed as PeerClosed,
    Received as Received,
    Reset as Reset,
    Send as Send,
    Shutdown as Shutdown,
    Tick as Tick,
)
from .shared import (
    Allocate,
    Allocated,
    BookOp,
    BookResult,
    Claim,
    Claimed,
    FireAt,
    Grant,
    Listed,
    Meet,
    NodeId,
    NodeMessage,
    Reclaim,
    RefuseConn,
    Refused,
    Release,
    Republish,
    Unlist,
    Update,
    UpdateResume,
    Waiting,
)

FIRE_MARGIN = 0.005  # s the sharer's fire may trail the joiner's: scheduling slack
QUICK_PINGS = 3  # RTT samples taken at once from a sharer, then one per ping_interval
DEFAULT_RTT = 0.2  # s, assumed when nothing was measured (non-Linux, no pong yet)
RETRY_WAIT = 10.0  # s a peer's retry hello waits for the other peer's
MAX_RETRIES = 2  # coordinations again after a failed punch, per pairing
RETRY_GRACE = 30.0  # s after the last plan's budget during which a retry is accepted
PING_ONCE_WAIT = 1.0  # s a joiner's one RTT ping may take (where the kernel has no RTT)
RTT_SAMPLES = 5  # a sharer's most recent pong RTTs kept
RELAY_TOKEN_GRACE = 10.0  # s a relay token outlives its plan's budget
RELAY_TOKEN_MEMORY = 30.0  # s an expired token is still told apart from an unknown one
# Shared through Redis (--redis): how long a connection waits for the shared book's
# answer, and a relay connection whose token is not known here yet for its grant (the
# pairing node sends it through Redis; a lost wake-up is caught by the next poll).
BOOK_WAIT = 2.0
GRANT_WAIT = 1.5
REPUBLISH_BATCH = 200  # waiting peers listed again per operation (one Lua call each)

RelayId = int  # one relay session (a pairing's two tokens); never reused


@dataclass(frozen=True)
class RelayLimits:
    """The relay (``nopf-server --no-relay``, ``--relay-*``)."""

    enabled: bool = True
    # Sessions at once, waiting for the second side or copying: each copying one
    # holds two sockets and two threads on the server.
    max_sessions: int = 64
    max_per_source: int = 4  # sessions at once with a side from one IP address
    rate: float = 0.0  # bytes/s per session, both directions together; 0: no limit
    # The relay addresses put in plans, at most one per family; for a family without
    # one, the address each client reached us on (wrong behind a port forward or a
    # container's NAT: then name the public one).
    addresses: tuple[Endpoint, ...] = ()

    def __post_init__(self) -> None:
        if self.max_sessions < 1 or self.max_per_source < 1:
            raise ValueError("relay session limits must be at least 1")
        if self.rate < 0:
            raise ValueError("the relay rate must be >= 0 (0: no limit)")
        if len({":" in a.host for a in self.addresses}) != len(self.addresses):
            raise ValueError("one relay address per family (IPv4, IPv6) at most")

    def address_in(self, v6: bool) -> Endpoint | None:
        """The configured relay address of that family, if any."""
        return next((a for a in self.addresses if (":" in a.host) == v6), None)


@dataclass(frozen=True)
class ServerLimits:
    # About 3 KiB of server memory per waiting peer (bench/scn_rendezvous.py; 12 KiB
    # before the machine and its Protocol driver): 16,384 is ~50 MB.
    max_connections: int = 16384
    max_per_source: int = 64
    write_timeout: float = 5.0
    log_interval: float = 10.0  # at most one line per problem kind per interval
    hello_timeout: float = 1.0  # after the 10-byte reply: wait this long for a v2 hello
    # Liveness ping to a waiting sharer (a fresh RTT is taken when its peer
    # arrives). 15 s is far under NAT idle timeouts for TCP (RFC 5382: >= 2 h 4 min);
    # at 5 s, 10,000 waiting sharers kept 63 % of a core busy.
    ping_interval: float = 15.0
    pairing: PairingLimits = field(default_factory=PairingLimits)
    relay: RelayLimits = field(default_factory=RelayLimits)


@dataclass
class ServerStats:
    served: int = 0
    refused_flood: int = 0
    refused_capacity: int = 0
    failed: int = 0
    open_now: int = 0
    coordinated: int = 0  # hellos accepted
    paired: int = 0  # pairs sent a fire instruction
    refused_claims: int = 0
    syn_data: int = 0  # coordinated hellos that arrived in the SYN (TCP Fast Open)
    resumed: int = 0  # resume pairings sent a fire instruction
    relay_plans: int = 0  # pairings whose plans end with the relay
    relayed: int = 0  # relay sessions started (both sides joined)
    relay_live: int = 0  # relay sessions being copied now
    relay_refused: int = 0  # relay connections refused
    relayed_bytes: int = 0  # copied by relay sessions that ended
    predicted: dict[str, int] = field(default_factory=dict)  # pairings by predicted path


# Events (besides those of .conn_events) ---------------------------------------


@dataclass(frozen=True, slots=True)
class RelayEnded:
    """A relay session is over: both directions ended, or it was stopped."""

    session: RelayId
    now: float
    a_to_b: int = 0  # bytes copied from the sharer's side to the joiner's
    b_to_a: int = 0
    error: str | None = None  # a socket error ended it (the other side was reset)


@dataclass(frozen=True, slots=True)
class BookAnswer:
    """The shared book's answer to :class:`AskBook` for ``conn`` (``--redis``)."""

    conn: ConnId
    result: BookResult
    now: float


@dataclass(frozen=True, slots=True)
class FromNode:
    """Another node of the shared rendezvous tells us something (``--redis``)."""

    message: NodeMessage
    now: float


@dataclass(frozen=True, slots=True)
class Delivered:
    """A :class:`ToNode` that named a connection reached Redis (``problem`` None), or
    did not (why, one line)."""

    conn: ConnId
    problem: str | None
    now: float


@dataclass(frozen=True, slots=True)
class StoreHealth:
    """The shared store's state: ``problem`` None when it works, else why not (one
    line). While there is a problem, new pairings are refused with it."""

    problem: str | None
    now: float


Event = (Accepted | Received | PeerClosed | Lost | Tick | Shutdown | RelayEnded | BookAnswer
         | FromNode | StoreHealth | Delivered)


# Actions (besides those of .conn_events) --------------------------------------


@dataclass(frozen=True, slots=True)
class LastWord:
    """Write ``data``, then a FIN (the machine handles the rest: see the module doc)."""

    conn: ConnId
    data: bytes


@dataclass(frozen=True, slots=True)
class StartRelay:
    """Connections ``a`` (the sharer's side) and ``b`` are the driver's: write
    ``greeting`` to each, then copy both ways unread (see the module doc)."""

    session: RelayId
    a: ConnId
    b: ConnId
    greeting: bytes
    rate: float  # bytes/s for both directions together; 0: no limit


@dataclass(frozen=True, slots=True)
class StopRelay:
    session: RelayId


@dataclass(frozen=True, slots=True)
class AskBook:
    """Carry out ``op`` on the shared book; answer with :class:`BookAnswer` for ``conn``
    (None: no answer wanted; a failure is only logged)."""

    conn: ConnId | None
    op: BookOp


@dataclass(frozen=True, slots=True)
class ToNode:
    """Deliver ``messages`` to node ``node``, in order (its list in Redis, then a
    wake-up); ``conn``: report :class:`Delivered` for that connection."""

    node: NodeId
    messages: tuple[NodeMessage, ...]
    conn: ConnId | None = None


@dataclass(frozen=True, slots=True)
class PollNode:
    """Read this node's messages now (a relay token may be on its way)."""


Action = (Send | LastWord | Close | Reset | Log | StartRelay | StopRelay | AskBook | ToNode
          | PollNode)


# State -------------------------------------------------------------------------


class Phase(enum.Enum):
    HELLO = "hello"  # the reply is out; waiting for the first frame
    SHARING = "sharing"  # a sharer waiting on its nameplate, pinged
    MEASURING = "measuring"  # a joiner or retrier: one ping, where the kernel has no RTT
    RETRY_WAITING = "retry-waiting"  # a retry hello waiting for the other side's
    RELAY_WAITING = "relay-waiting"  # a relay connection waiting for the other side's
    FIRING = "firing"  # its last message (fire or refusal) leaves at the deadline
    BOOK = "book"  # waiting for the shared book's answer (--redis)
    HANDOFF = "handoff"  # its fire waits until the peer's node has its own (--redis)
    GRANT_WAIT = "grant-wait"  # a relay token not known here yet: its grant may be coming
    LAST_WORD = "last-word"  # message and FIN sent; discarding until the peer's FIN
    CLOSING = "closing"  # closed; waiting for the close to complete


@dataclass(slots=True)
class Sharing:
    """A waiting sharer's nameplate (None: a resume hello, waiting by its id) and pings."""

    nameplate: int | None
    expires_at: float
    last_pong: float
    owner: str = ""  # shared book: sha256 hex of the sharer's owner secret ("" none)
    seq: int = 0
    sent: dict[int, float] = field(default_factory=dict)  # pings not yet answered


@dataclass(slots=True)
class Conn:
    """One connection, from the rendezvous' side."""

    id: ConnId
    source: str  # the per-source cap's key
    peer: tuple[str, int] | None
    phase: Phase = Phase.HELLO
    deadline: float | None = None
    frames: FrameReader = field(default_factory=FrameReader)
    kernel_rtt: float | None = None
    syn_data: bool = False
    hello: Hello | None = None  # coordinated mode from here on
    rtts: list[float] = field(default_factory=list)  # our pings' round trips
    pake: bytes | None = None  # the peer's SPAKE2 message, forwarded opaquely in the fire
    sharing: Sharing | None = None
    partner: ConnId | None = None  # a joiner's claimed sharer
    ping_at: float = 0.0  # MEASURING: when the ping left
    message: bytes = b""  # FIRING: what leaves at the deadline
    eof: bool = False  # the peer closed its side
    gone: bool = False  # lost, kept only until its coordination ends (nothing is sent)
    local: tuple[str, int] | None = None  # our address as the peer reached it
    relay: RelayId | None = None  # RELAY_WAITING: the session it waits in
    remote: Waiting | None = None  # the partner found in the shared book
    token: bytes = b""  # GRANT_WAIT: the relay token presented
    fire_in: float = 0.0  # HANDOFF: when its fire is due, from the handoff

    @property
    def public(self) -> Endpoint:
        """The peer's address as observed (IPv4-mapped addresses unwrapped)."""
        assert self.peer is not None
        return _observed(self.peer)

    def rtt_known(self) -> bool:
        return bool(self.rtts) or self.kernel_rtt is not None

    def rtt(self) -> float:
        samples = list(self.rtts)
        if self.kernel_rtt is not None:
            samples.append(self.kernel_rtt)
        return min(samples) if samples else DEFAULT_RTT

    def info(self) -> PeerInfo:
        h = self.hello
        assert h is not None
        return PeerInfo(self.public, h.lan, h.probe, h.punch_timeout, self.rtt())


@dataclass(frozen=True, slots=True)
class PeerSide:
    """One peer as a plan sees it: on this node (``node`` None), or waiting on another."""

    info: PeerInfo
    pake: bytes | None
    relay: bool  # can use relay stages
    direct_only: bool
    relay_at: Endpoint | None  # its node's relay address as the peer reached it
    rtt_known: bool
    node: NodeId | None
    load: int  # its node's relay sessions
    # Its NAT report and direct candidates, as its hello had them (a peer waiting on
    # another node: as its node published them in the shared book).
    nat: NatSummary | None = None
    candidates: tuple[Candidate, ...] | None = None
    # Its node's relay address in the other family (None: unknown): where a peer of
    # that family reaches the relay if the pairing puts it on this peer's node.
    relay_other: Endpoint | None = None

    @classmethod
    def waiting(cls, w: Waiting, here: NodeId | None) -> PeerSide:
        return cls(w.info, w.pake, w.relay and not w.direct_only, w.direct_only, w.relay_at,
                   w.rtt_known, None if w.node == here else w.node, w.load, w.nat,
                   w.candidates, w.relay_other)

    def relay_in(self, v6: bool) -> Endpoint | None:
        """Its node's relay address in one family (a peer of that family uses it)."""
        for addr in (self.relay_at, self.relay_other):
            if addr is not None and (":" in addr.host) == v6:
                return addr
        return None


@dataclass(frozen=True, slots=True)
class RelayChoice:
    """A node that can relay a pair (None: this one), with each side's address there."""

    node: NodeId | None
    sharer: Endpoint  # in the sharer's family
    joiner: Endpoint  # in the joiner's family


@dataclass(slots=True)
class RetrySlot:
    """A paired nameplate whose peers may coordinate again after a failed punch."""

    sharer_ip: str  # a retry is accepted only from the IP each side paired from
    joiner_ip: str
    until: float  # after this, retries are refused
    left: int = MAX_RETRIES
    waiting: tuple[str, ConnId] | None = None  # the side that asked first, and its conn


@dataclass(slots=True)
class RelayTicket:
    """One side's relay token: single use, from one IP, until its session expires."""

    session: RelaySession
    side: str  # "sharer" | "joiner"
    ip: str  # the public IP that side coordinated from
    used: bool = False


@dataclass(slots=True)
class RelaySession:
    """A pairing's relay: its two tokens, then the connections that presented them."""

    id: RelayId
    expires_at: float  # tokens are refused from then on
    tokens: tuple[bytes, bytes]  # (sharer's, joiner's)
    waiting: ConnId | None = None  # the first side's connection, until the second's
    counted: tuple[str, ...] = ()  # the IPs it counts against while waiting or live
    live: bool = False  # handed to the driver, until RelayEnded


@dataclass
class ProblemLog:
    """One log line per problem kind per interval, with a count of the repeats."""

    interval: float
    _last: dict[str, float] = field(default_factory=dict)
    _suppressed: Counter[str] = field(default_factory=Counter)

    def problem(self, kind: str, message: str, now: float) -> Log | None:
        if now - self._last.get(kind, -1e9) < self.interval:
            self._suppressed[kind] += 1
            return None
        extra = self._suppressed.pop(kind, 0)
        suffix = f" (and {extra} more like it)" if extra else ""
        self._last[kind] = now
        return Log(kind, f"{message}{suffix}")


class _Gone(Exception):
    """A coordinated peer sent what it must not: its connection ends."""


# The machine --------------------------------------------------------------------


class ServerMachine:
    """Every connection of one rendezvous server; see the module docstring."""

    def __init__(self, limits: ServerLimits | None = None,
                 book: PairingBook[ConnId] | None = None, *,
                 entropy: Callable[[int], bytes] = secrets.token_bytes,
                 node: NodeId | None = None) -> None:
        """``node``: this node's id when the pairing state is shared with other nodes
        (``nopf-server --redis``): codes, claims and resume hellos then go through
        :class:`AskBook`, and the store starts as not yet reachable."""
        self.limits = limits or ServerLimits()
        self.node = node
        self.store_problem: str | None = (
            None if node is None else "the shared state (Redis) is not connected yet")
        self._stopping = False
        self._asked: dict[ConnId, BookOp] = {}  # questions to the shared book, by asker
        self._grant: tuple[NodeId, Grant] | None = None  # _plan's, for _pair_shared
        self.stats = ServerStats()
        # Lines for the driver's INFO log (a pairing's predicted path: news, not a problem
        # Log); the driver takes them after each event.
        self.notes: list[str] = []
        self.book: PairingBook[ConnId] = (book if book is not None
                                          else NameplateBook(self.limits.pairing))
        self.conns: dict[ConnId, Conn] = {}
        self.retries: dict[int, RetrySlot] = {}  # by nameplate
        self.resumes: dict[bytes, ConnId] = {}  # a waiting resume hello's conn, by id
        self.tickets: dict[bytes, RelayTicket] = {}  # relay tokens, by token
        self.sessions: dict[RelayId, RelaySession] = {}  # relay sessions, by id
        self._entropy = entropy  # relay tokens
        self._next_session: RelayId = 0
        self._session_expiry: list[tuple[float, RelayId]] = []  # a heap: when to forget
        self._relay_sources: Counter[str] = Counter()  # relay sessions per IP
        self._relay_count = 0  # sessions waiting or live (RelayLimits.max_sessions)
        # This node's own addresses per family (True: IPv6), for a peer of the family it
        # did not reach us in: where it listens (:meth:`listening`), else the last one a
        # peer of that family reached.
        self._listening: dict[bool, Endpoint] = {}
        self._reached: dict[bool, Endpoint] = {}
        # The last accept's local address, as the kernel gave it: the same again (nearly
        # every accept) changes nothing in _reached, so it is not parsed again.
        self._last_local: tuple[str, int] | None = None
        self._per_source: Counter[str] = Counter()
        self._problems = ProblemLog(self.limits.log_interval)
        self._timers: list[tuple[float, ConnId]] = []  # a heap; stale entries are skipped
        self._out: list[Action] = []

    @property
    def relay_load(self) -> int:
        """Relay sessions waiting for their second side or copied now."""
        return self._relay_count

    @property
    def next_deadline(self) -> float | None:
        """When the next :class:`Tick` is due (None: nothing is)."""
        timers = self._timers
        while timers:
            at, cid = timers[0]
            conn = self.conns.get(cid)
            if conn is not None and conn.deadline == at:
                return at
            heapq.heappop(timers)  # stale: that connection moved on
        return None

    def handle(self, event: Event) -> list[Action]:
        """Take one event; return what to do, in order."""
        if isinstance(event, Tick):
            self._tick(event.now)
        elif isinstance(event, BookAnswer | FromNode | StoreHealth | Delivered):
            self._shared_event(event)
        elif isinstance(event, Shutdown):
            # Shared codes outlive this node: their sharers register them again elsewhere.
            self._stopping = True
            for each in list(self.conns.values()):
                if event.force or each.hello is not None or each.relay is not None:
                    self._reset(each, event.now)
            for session in self.sessions.values():
                if session.live:  # counted until the driver reports its end
                    self._out.append(StopRelay(session.id))
        elif isinstance(event, RelayEnded):
            self._relay_ended(event)
        elif isinstance(event, Accepted):
            if event.conn in self.conns:
                raise ValueError(f"connection id {event.conn} is already in use")
            try:
                self._accept(event)
            except Exception as exc:
                self._crashed(event.conn, exc, event.now)
        else:
            conn = self.conns.get(event.conn)
            if conn is not None:  # else: forgotten already, nothing to do
                try:
                    if isinstance(event, Received):
                        self._receive(conn, event.data, event.now, event.kernel_rtt)
                    elif isinstance(event, PeerClosed):
                        self._peer_closed(conn, event.now)
                    else:
                        self._lost(conn, event)
                except Exception as exc:
                    self._crashed(conn.id, exc, event.now)
        out, self._out = self._out, []
        return out

    # -- plumbing ------------------------------------------------------------------------

    def _crashed(self, cid: ConnId, exc: Exception, now: float) -> None:
        """A bug costs its connection (one log line, a reset), never the server."""
        conn = self.conns.get(cid)
        who = _fmt(conn.peer) if conn is not None else "?"
        self._problem("internal", f"rendezvous error on the connection from {who}: "
                      f"{type(exc).__name__}: {exc}", now)
        if conn is not None:
            self._reset(conn, now)

    def _problem(self, kind: str, message: str, now: float) -> None:
        line = self._problems.problem(kind, message, now)
        if line is not None:
            self._out.append(line)

    def _at(self, conn: Conn, deadline: float | None) -> None:
        conn.deadline = deadline
        if deadline is not None:
            heapq.heappush(self._timers, (deadline, conn.id))

    def _forget(self, conn: Conn, now: float) -> None:
        """The connection is over: it no longer counts, and a sharer's code closes."""
        del self.conns[conn.id]
        conn.deadline = None
        self.stats.open_now -= 1
        self._per_source[conn.source] -= 1
        if self._per_source[conn.source] <= 0:
            del self._per_source[conn.source]
        if conn.sharing is not None:
            shared = self.node is not None and not self._stopping
            if conn.sharing.nameplate is None:
                self._unlist_resume(conn)
                if shared:
                    assert conn.hello is not None and conn.hello.resume_id is not None
                    self._ask(None, Unlist(conn.hello.resume_id, self._node(), conn.id))
            elif shared:
                self._ask(None, Release(conn.sharing.nameplate, self._node(), conn.id, "left"))
            elif self.node is None:
                self.book.release(conn.sharing.nameplate, conn.id, now=now)
            conn.sharing = None
        if conn.relay is not None:
            self._relay_abandoned(conn)

    def _reset(self, conn: Conn, now: float) -> None:
        self._forget(conn, now)
        if not conn.gone:
            self._out.append(Reset(conn.id))

    def _close(self, conn: Conn, now: float) -> None:
        if conn.gone:
            self._forget(conn, now)
            return
        conn.phase = Phase.CLOSING
        self._out.append(Close(conn.id))
        self._at(conn, now + self.limits.write_timeout)

    def _last_word(self, conn: Conn, data: bytes, now: float) -> None:
        """Send ``data`` and a FIN, then discard until the peer closes (or reset)."""
        if conn.gone:
            self._forget(conn, now)
            return
        conn.sharing = None  # a sharer's code is claimed or expired by now
        self._out.append(LastWord(conn.id, data))
        if conn.eof:  # the peer's FIN is in already: nothing left to wait for
            self._close(conn, now)
            return
        conn.phase = Phase.LAST_WORD
        self._at(conn, now + self.limits.write_timeout)

    def _refuse(self, conn: Conn, code: str, message: str, now: float) -> None:
        self._last_word(conn, encode(ErrorReply(code, message[:300])), now)

    def _send(self, conn: Conn, msg: ServerMessage) -> None:
        if not conn.gone:
            self._out.append(Send(conn.id, encode(msg)))

    # -- accept: the caps and the seed's reply ---------------------------------------------

    def _accept(self, ev: Accepted) -> None:
        now, peer = ev.now, ev.peer
        source = str(peer[0]) if peer else "?"
        conn = Conn(ev.conn, source, peer, kernel_rtt=ev.kernel_rtt, syn_data=ev.syn_data,
                    local=ev.local)
        if ev.local is not None and ev.local != self._last_local:
            self._last_local = ev.local
            ours = _own_endpoint(*ev.local)
            if ours is not None and not _host_scoped(ours.host):
                v6 = ":" in ours.host
                learned = self._relay_in(v6) is None
                self._reached[v6] = ours  # (no peer elsewhere reaches a loopback)
                if learned and self.node is not None and self.limits.relay.enabled:
                    self._relist_other_family(v6)  # (records without a relay don't change)
        self.conns[conn.id] = conn
        self.stats.open_now += 1
        self._per_source[source] += 1
        if self.stats.open_now > self.limits.max_connections:
            self.stats.refused_capacity += 1
            self._problem("capacity", f"refused {source}: {self.limits.max_connections} "
                          "connections open", now)
            self._reset(conn, now)
            return
        if self._per_source[source] > self.limits.max_per_source:
            self.stats.refused_flood += 1
            self._problem("flood", f"refused {source}: over {self.limits.max_per_source} "
                          "open connections from one address", now)
            self._reset(conn, now)
            return
        try:
            if peer is None:
                raise WireError("connection closed before it could be served")
            public = _observed(peer)
            # Over IPv6 (an IPv6 listener) the same fields for its IPv6 address (22
            # bytes), then coordinated mode as over IPv4: such a peer gets no IPv4
            # punch in its plans (book.make_plans), its relay path comes here over IPv6.
            reply = (encode_reply6(public.host, public.port) if ":" in public.host
                     else encode_reply(public.host, public.port))
        except WireError as exc:  # already gone
            self._unserved(conn, str(exc), now)
            return
        self._out.append(Send(conn.id, reply))  # first, before reading anything
        self.stats.served += 1
        self._at(conn, now + self.limits.hello_timeout)

    def _unserved(self, conn: Conn, why: str | None, now: float) -> None:
        self.stats.failed += 1
        self._problem("error", f"could not serve {_fmt(conn.peer)}: {why}", now)
        self._reset(conn, now)

    # -- what the peer does -------------------------------------------------------------------

    def _receive(self, conn: Conn, data: bytes, now: float, kernel_rtt: float | None) -> None:
        if kernel_rtt is not None:
            conn.kernel_rtt = kernel_rtt
        phase = conn.phase
        if phase is Phase.HELLO:
            self._hello_bytes(conn, data, now)
        elif phase is Phase.SHARING:
            try:
                for payload in self._frames(conn, data):
                    self._sharer_message(conn, payload, now)
            except _Gone:
                self._reset(conn, now)  # the code closes with it
        elif phase is Phase.RELAY_WAITING or phase is Phase.GRANT_WAIT:
            # Nothing may come before "relayed": whatever does is no peer of ours.
            self._problem("relay-protocol", f"relay connection from {_fmt(conn.peer)} sent "
                          f"{len(data)} bytes before it was joined: reset", now)
            self._reset(conn, now)
        elif phase is Phase.MEASURING:
            try:
                payloads = self._frames(conn, data)
            except _Gone:
                payloads = [b""]  # the wait ends without a sample, as on a close
            if not payloads:
                return
            try:
                msg = decode_client_message(payloads[0])
            except MessageError:
                msg = None
            if isinstance(msg, Pong):
                conn.rtts.append(now - conn.ping_at)
            self._measured(conn, now)  # anything else ends the wait without a sample
        # Otherwise (waiting for a retry, firing, last word, closing) nothing is read
        # any more: what arrives is discarded.

    def _peer_closed(self, conn: Conn, now: float) -> None:
        conn.eof = True
        phase = conn.phase
        if phase in (Phase.HELLO, Phase.SHARING, Phase.RELAY_WAITING, Phase.GRANT_WAIT,
                     Phase.BOOK):
            # A seed client that has its answer and closed (it sees nothing of the
            # RST, and its port is free at once), or a sharer that left.
            self._reset(conn, now)
        elif phase is Phase.MEASURING:
            self._measured(conn, now)
        elif phase is Phase.LAST_WORD:
            self._close(conn, now)
        # RETRY_WAITING, FIRING: its message still goes out. CLOSING: over soon.

    def _lost(self, conn: Conn, ev: Lost) -> None:
        now = ev.now
        if ev.writing and conn.phase is Phase.HELLO:
            self.stats.served -= 1  # counted when the reply was handed over: undelivered
            conn.gone = True
            self._unserved(conn, ev.error, now)
            return
        if conn.phase is Phase.RETRY_WAITING or conn.phase is Phase.FIRING:
            conn.gone = True  # kept until its coordination ends: the other side's goes ahead
            return
        if conn.phase is Phase.MEASURING:
            conn.gone = True
            self._measured(conn, now)  # the pairing goes ahead without a sample
            return
        self._forget(conn, now)

    def _tick(self, now: float) -> None:
        timers = self._timers
        while timers and timers[0][0] <= now:
            at, cid = heapq.heappop(timers)
            conn = self.conns.get(cid)
            if conn is None or conn.deadline != at:
                continue  # stale
            conn.deadline = None
            try:
                self._due(conn, now)
            except Exception as exc:
                self._crashed(cid, exc, now)

    def _due(self, conn: Conn, now: float) -> None:
        phase = conn.phase
        if phase is Phase.HELLO:
            # A seed client that keeps its end open: close, as the seed always did
            # (with a partial frame buffered it is no seed client: reset).
            if conn.frames.buffered:
                self._reset(conn, now)
            else:
                self._close(conn, now)
        elif phase is Phase.SHARING:
            self._sharer_wake(conn, now)
        elif phase is Phase.RELAY_WAITING:
            self._relay_timeout(conn, now)
        elif phase is Phase.BOOK:
            self._book_silent(conn, now)
        elif phase is Phase.HANDOFF:
            self._handed_off(conn, f"the shared state (Redis) did not answer within "
                             f"{BOOK_WAIT:g} s", now)
        elif phase is Phase.GRANT_WAIT:
            conn.phase = Phase.HELLO
            self._relay(conn, conn.token, now, hold=False)
        elif phase is Phase.MEASURING:
            self._measured(conn, now)  # no pong within PING_ONCE_WAIT: go without
        elif phase is Phase.RETRY_WAITING:
            slot = self.retries.get(_nameplate(conn))
            if slot is not None and slot.waiting is not None and slot.waiting[1] == conn.id:
                slot.waiting = None
            self._refuse(conn, "timeout", f"the peer did not retry within {RETRY_WAIT:g} s", now)
        elif phase is Phase.FIRING:
            data, conn.message = conn.message, b""
            self._last_word(conn, data, now)
        else:  # LAST_WORD, CLOSING: the peer did not finish in time
            self._reset(conn, now)

    # -- the hello ---------------------------------------------------------------------------

    def _hello_bytes(self, conn: Conn, data: bytes, now: float) -> None:
        try:
            payloads = conn.frames.feed(data)
        except MessageError:  # not a framed client at all (HTTP, noise): no answer
            self._reset(conn, now)
            return
        if not payloads:
            return
        try:
            msg = decode_client_message(payloads[0])
            if isinstance(msg, Probe):  # the mapping check: close first, at once
                self._close(conn, now)
                return
            if isinstance(msg, Relay):
                if len(payloads) > 1 or conn.frames.buffered:
                    # Bytes behind it would be the peer's: none may come before "relayed".
                    self._problem("relay-protocol", f"relay connection from "
                                  f"{_fmt(conn.peer)} sent bytes behind its relay message: "
                                  "reset", now)
                    self._reset(conn, now)
                    return
                conn.deadline = None
                self._relay(conn, msg.token, now)
                return
            if not isinstance(msg, Hello) or len(payloads) > 1 or conn.frames.buffered:
                raise MessageError("the first message must be a single hello")
        except UnsupportedVersion as exc:
            self._refuse(conn, "unsupported_version", f"rendezvous: {exc}", now)
            return
        except MessageError as exc:
            self._problem("bad-hello", f"bad hello from {_fmt(conn.peer)}: {exc}", now)
            self._refuse(conn, "bad_request", f"rendezvous rejected the hello: {exc}", now)
            return
        self.stats.coordinated += 1
        conn.hello = msg
        conn.pake = msg.pake
        conn.deadline = None
        if self.node is not None and msg.action in ("share", "join", "resume"):
            if self.store_problem is not None:
                why = f"the rendezvous cannot pair now: {self.store_problem}"
                self._problem("store", f"refused {_fmt(conn.peer)}: {why}", now)
                self._refuse(conn, "busy", why, now)
                return
            self._shared_hello(conn, msg, now)
            return
        if msg.action == "share" and msg.nameplate is not None:
            self._refuse(conn, "unknown_code", f"pairing code {msg.nameplate}-… is not open "
                         "here (this rendezvous keeps its codes in memory: it restarted, or "
                         "another rendezvous had it): ask for a new code", now)
            return
        if msg.action == "share":
            self._share(conn, now)
        elif msg.action == "join":
            self._join(conn, now)
        elif msg.action == "resume":
            self._resume(conn, now)
        else:
            self._retry(conn, now)

    def _frames(self, conn: Conn, data: bytes) -> list[bytes]:
        try:
            return conn.frames.feed(data)
        except MessageError as exc:
            raise _Gone(f"sent an invalid message ({exc})") from None

    # -- share -----------------------------------------------------------------------------------

    def _share(self, conn: Conn, now: float) -> None:
        try:
            nameplate, expires_at = self.book.allocate(conn.id, now=now)
        except ClaimRefused as exc:
            self._refuse(conn, exc.code, str(exc), now)
            return
        conn.phase = Phase.SHARING
        conn.sharing = Sharing(nameplate, expires_at, last_pong=now)
        self._send(conn, Welcome(nameplate, self.limits.pairing.code_lifetime, conn.public))
        self._ping(conn, now)

    def _ping(self, conn: Conn, now: float) -> None:
        """The next ping to a waiting sharer, and when to wake for the one after."""
        sharing = conn.sharing
        assert sharing is not None
        sharing.seq += 1
        sharing.sent[sharing.seq] = now
        self._send(conn, Ping(sharing.seq))
        interval = 0.0 if sharing.seq < QUICK_PINGS else self.limits.ping_interval
        left = sharing.expires_at - now
        self._at(conn, now + min(max(interval, 2 * conn.rtt()), max(0.0, left)))

    def _sharer_message(self, conn: Conn, payload: bytes, now: float) -> None:
        try:
            msg = decode_client_message(payload)
        except MessageError as exc:
            raise _Gone(f"sent an invalid message ({exc})") from None
        if isinstance(msg, PakeMessage):  # once, after the welcome
            if conn.pake is not None or conn.sharing is None or conn.sharing.nameplate is None:
                raise _Gone("sent an unexpected pake message")
            conn.pake = msg.pake
            self._publish(conn)
        elif isinstance(msg, Pong):
            sharing = conn.sharing
            assert sharing is not None
            sent = sharing.sent.pop(msg.seq, None)
            if sent is not None:
                conn.rtts = [*conn.rtts[1 - RTT_SAMPLES:], now - sent]
                sharing.last_pong = now
                if msg.seq == QUICK_PINGS:  # its RTT, measured: for a joiner elsewhere
                    self._publish(conn)
        else:
            raise _Gone("sent a second hello")

    def _sharer_wake(self, conn: Conn, now: float) -> None:
        sharing = conn.sharing
        assert sharing is not None
        if now >= sharing.expires_at and sharing.nameplate is None:
            self._unlist_resume(conn)
            self._refuse(conn, "timeout",
                         f"the peer did not resume within {RESUME_WAIT:g} s", now)
            return
        if now >= sharing.expires_at:
            if self.node is not None and sharing.nameplate is not None:
                self._ask(None, Release(sharing.nameplate, self._node(), conn.id, "expired"))
                conn.sharing = None  # released as expired, not as left
            else:
                self.book.sweep(now=now)  # buries it as expired (a late claim is told so)
            lifetime = describe_duration(self.limits.pairing.code_lifetime)
            self._refuse(conn, "expired", f"nobody used the pairing code within {lifetime}",
                         now)
            return
        if now - sharing.last_pong > 3 * self.limits.ping_interval + 1:
            self._reset(conn, now)  # silently gone: its code closes
            return
        self._ping(conn, now)

    # -- join --------------------------------------------------------------------------------------

    def _join(self, conn: Conn, now: float) -> None:
        hello = conn.hello
        assert hello is not None and hello.nameplate is not None
        nameplate = hello.nameplate
        owner = self.book.peek(nameplate, now=now)
        sharer = None if owner is None else self.conns.get(owner)
        if (sharer is not None and hello.probe is None and not conn.info().over_ipv6
                and not self._relays(self._side(sharer), self._side(conn))
                and sharer.info().mapping == "symmetric" and conn.info().mapping != "none"):
            # Against a symmetric sharer the joiner's own mapping decides between
            # "refuse at once" and a short punch: it has to check it first. The
            # code stays open for its second hello. (With the relay, an unchecked
            # mapping facing a symmetric one relays at once: no check needed.)
            self._refuse(conn, "probe_required",
                         "the sharer's NAT is symmetric: check our NAT mapping (a probe from "
                         "the same port), then send the hello again", now)
            return
        try:
            conn.partner = self.book.claim(nameplate, conn.public.host, now=now)
        except ClaimRefused as exc:
            self.stats.refused_claims += 1
            self._refuse(conn, exc.code, str(exc), now)
            return
        if conn.syn_data:
            # The hello came in the SYN: its handshake is still completing, so no
            # RTT yet, and measuring one would cost the round trip Fast Open saved.
            # The plan fires without it.
            self.stats.syn_data += 1
            self._measured(conn, now)
        elif conn.kernel_rtt is None:
            self._ping_once(conn, now)
        else:
            self._measured(conn, now)

    def _measured_or_ping(self, conn: Conn, now: float) -> None:
        """On with the pairing if ``conn``'s RTT is known (or its hello came in the SYN,
        as with a joiner: see :meth:`_join`); else one ping first."""
        if conn.syn_data or conn.rtt_known():
            if conn.syn_data:
                self.stats.syn_data += 1
            self._measured(conn, now)
        else:
            self._ping_once(conn, now)

    def _ping_once(self, conn: Conn, now: float) -> None:
        """One RTT sample where the kernel offers none (bounded: a silent peer costs 1 s)."""
        conn.phase = Phase.MEASURING
        conn.ping_at = now
        self._send(conn, Ping(1))
        self._at(conn, now + PING_ONCE_WAIT)

    def _measured(self, conn: Conn, now: float) -> None:
        """A joiner or retrier has its RTT (or goes without): on with the pairing."""
        conn.deadline = None
        assert conn.hello is not None
        if conn.hello.action == "join":
            self._join_measured(conn, now)
        elif conn.hello.action == "resume":
            self._resume_measured(conn, now)
        else:
            self._retry_measured(conn, now)

    def _join_measured(self, conn: Conn, now: float) -> None:
        if conn.remote is not None:
            self._pair_shared(_nameplate(conn), conn, now)
            return
        sharer = None if conn.partner is None else self.conns.get(conn.partner)
        if sharer is None or sharer.phase is not Phase.SHARING:
            self._refuse(conn, "unknown_code",
                         f"pairing code {_nameplate(conn)}-… is no longer open (the sharer "
                         "stopped waiting): ask for a new code", now)
            return
        self._pair(_nameplate(conn), sharer, conn, now)

    # -- retry after a failed punch -------------------------------------------------------------

    def _retry(self, conn: Conn, now: float) -> None:
        """A peer whose punch failed coordinates again: wait for the other, then fire both."""
        slot = self._retry_slot(conn, now)
        if slot is None:
            return
        if conn.kernel_rtt is None:
            self._ping_once(conn, now)  # then _retry_measured looks the slot up again
        else:
            self._retry_measured(conn, now, slot)

    def _retry_slot(self, conn: Conn, now: float) -> RetrySlot | None:
        """The pairing this retry may coordinate again (None: refused)."""
        nameplate = _nameplate(conn)
        side = _side(conn)
        self._prune_retries(now)
        slot = self.retries.get(nameplate)
        paired_from = None if slot is None else (
            slot.sharer_ip if side == "sharer" else slot.joiner_ip)
        if slot is None or slot.left <= 0 or paired_from != conn.public.host:
            self.stats.refused_claims += 1
            self._refuse(conn, "unknown_code",
                         f"no failed punch of pairing code {nameplate}-… to retry from here "
                         "(it was never paired, or its retries are spent)", now)
            return None
        return slot

    def _retry_measured(self, conn: Conn, now: float, slot: RetrySlot | None = None) -> None:
        slot = slot or self._retry_slot(conn, now)
        if slot is None:
            return
        side = _side(conn)
        other = None if slot.waiting is None else self.conns.get(slot.waiting[1])
        if slot.waiting is None or other is None or other.phase is not Phase.RETRY_WAITING:
            slot.waiting = (side, conn.id)
            conn.phase = Phase.RETRY_WAITING
            self._at(conn, now + RETRY_WAIT)
            return
        if slot.waiting[0] == side:
            self._refuse(conn, "bad_request", f"a retry from the {side} is already waiting", now)
            return
        slot.waiting = None
        slot.left -= 1
        other.deadline = None
        if side == "joiner":
            self._pair(_nameplate(conn), other, conn, now)
        else:
            self._pair(_nameplate(conn), conn, other, now)

    def _prune_retries(self, now: float) -> None:
        for nameplate in [n for n, s in self.retries.items() if s.until <= now]:
            del self.retries[nameplate]

    # -- resume: meet the peer of a tunnel again -------------------------------------------

    def _resume(self, conn: Conn, now: float) -> None:
        """Pair with the waiting resume hello of the other side, or wait for it."""
        hello = conn.hello
        assert hello is not None and hello.resume_id is not None
        other = self._waiting_resume(hello.resume_id)
        if other is None:
            self._resume_wait(conn, now)
            return
        del self.resumes[hello.resume_id]  # claimed (it keeps its pings until the fire)
        assert other.hello is not None
        if other.hello.side == hello.side:
            # The same side again: its earlier connection is likely dead without our
            # knowing (a NAT that rebooted drops it silently), so the newer one wins.
            older, newer = (other, conn) if other.id < conn.id else (conn, other)
            if newer is other:
                self.resumes[hello.resume_id] = other.id
            else:
                self._resume_wait(conn, now)
            self._refuse(older, "bad_request", "a newer resume hello from the same side "
                         "replaced this one", now)
            return
        conn.partner = other.id
        self._measured_or_ping(conn, now)

    def _waiting_resume(self, resume_id: bytes) -> Conn | None:
        cid = self.resumes.get(resume_id)
        conn = None if cid is None else self.conns.get(cid)
        if conn is None or conn.phase is not Phase.SHARING:
            return None
        return conn

    def _resume_wait(self, conn: Conn, now: float) -> None:
        """The first of two resume hellos: pinged like a sharer, up to RESUME_WAIT."""
        assert conn.hello is not None and conn.hello.resume_id is not None
        self.resumes[conn.hello.resume_id] = conn.id
        conn.phase = Phase.SHARING
        conn.partner = None
        conn.sharing = Sharing(None, now + RESUME_WAIT, last_pong=now)
        self._ping(conn, now)

    def _unlist_resume(self, conn: Conn) -> None:
        assert conn.hello is not None and conn.hello.resume_id is not None
        if self.resumes.get(conn.hello.resume_id) == conn.id:
            del self.resumes[conn.hello.resume_id]

    def _resume_measured(self, conn: Conn, now: float) -> None:
        if conn.remote is not None:
            self._pair_shared(None, conn, now)
            return
        other = None if conn.partner is None else self.conns.get(conn.partner)
        if other is None or other.phase is not Phase.SHARING or other.gone:
            self._resume(conn, now)  # it left meanwhile: pair with another, or wait
            return
        if conn.gone:  # we left while measuring: the other waits on, for a newer hello
            assert other.hello is not None and other.hello.resume_id is not None
            self.resumes.setdefault(other.hello.resume_id, other.id)
            self._forget(conn, now)
            return
        other.deadline = None
        if _side(conn) == "joiner":
            self._pair(None, other, conn, now)
        else:
            self._pair(None, conn, other, now)

    # -- the relay: tokens in plans, then the connections that present them ----------------

    def _relays(self, a: PeerSide, b: PeerSide) -> bool:
        """Will a plan for these two end with the relay?"""
        return self._relay_wanted(a, b) and bool(self._relay_options(a, b))

    def _relay_wanted(self, a: PeerSide, b: PeerSide) -> bool:
        return (self.limits.relay.enabled and a.relay and b.relay
                and a.relay_at is not None and b.relay_at is not None)

    def _relay_options(self, a: PeerSide, b: PeerSide) -> list[RelayChoice]:
        """Where this pair's relay session can run, each node with the address each
        side gets there, in that side's own family: here (node None), and the other
        node when a side waits there. A node without a relay address in a side's
        family is no option (a pair split across nodes and families)."""
        here = [p for p in (a, b) if p.node is None]

        def ours(p: PeerSide) -> Endpoint | None:
            if p.node is None:
                return p.relay_at  # as it reached us
            v6 = p.info.over_ipv6
            for q in here:  # as its peer reached us, if of its family; else as we know it
                if q.info.over_ipv6 == v6 and q.relay_at is not None:
                    return q.relay_at
            return self._relay_in(v6)

        options = []
        addr_a, addr_b = ours(a), ours(b)
        if addr_a is not None and addr_b is not None:
            options.append(RelayChoice(None, addr_a, addr_b))
        there = a if a.node is not None else b if b.node is not None else None
        if there is not None and there.node is not None:
            addr_a, addr_b = there.relay_in(a.info.over_ipv6), there.relay_in(b.info.over_ipv6)
            if addr_a is not None and addr_b is not None:
                options.append(RelayChoice(there.node, addr_a, addr_b))
        return options

    def _side(self, conn: Conn) -> PeerSide:
        """A peer of this node as the plan sees it."""
        hello = conn.hello
        assert hello is not None
        return PeerSide(conn.info(), conn.pake, hello.relay_capable, hello.direct_only,
                        self._relay_address(conn), conn.rtt_known(), None, self._relay_count,
                        hello.nat, hello.candidates, self._relay_in(not conn.info().over_ipv6))

    def _relay_address(self, conn: Conn) -> Endpoint | None:
        """The relay address for this client's plan: ours as it reached us (so the
        relay connection takes the coordination's path, in the peer's family), unless
        one of that family is configured."""
        over_ipv6 = ":" in conn.public.host
        configured = self.limits.relay.address_in(over_ipv6)  # (the other's is no use)
        if configured is not None:
            return configured
        ours = None if conn.local is None else _own_endpoint(*conn.local)
        # The peer's own family, or none (the relay path goes where the hello went).
        return ours if ours is not None and (":" in ours.host) == over_ipv6 else None

    def listening(self, addresses: Iterable[tuple[str, int]]) -> None:
        """The driver's bound addresses: the relay address this node gives a peer of
        the family it did not reach it in (a pair split across families and nodes).
        Unspecified ones (0.0.0.0, ::) say nothing: then the last address a peer of
        that family reached."""
        for host, port in addresses:
            ours = _own_endpoint(host, port)
            if ours is not None:
                self._listening.setdefault(":" in ours.host, ours)

    def _relay_in(self, v6: bool) -> Endpoint | None:
        """This node's relay address in one family, for a peer that did not reach us
        (it waits on another node): configured, bound, or last reached; None: unknown."""
        return (self.limits.relay.address_in(v6) or self._listening.get(v6)
                or self._reached.get(v6))

    def _relay_tokens(self, ips: tuple[str, str], expires_at: float,
                      now: float) -> tuple[bytes, bytes]:
        """A new relay session's two single-use tokens, each bound to its side's IP
        (``ips``: the sharer's, the joiner's)."""
        tokens = (self._entropy(RELAY_TOKEN_SIZE), self._entropy(RELAY_TOKEN_SIZE))
        self._relay_session(tokens, ips, expires_at, now)
        return tokens

    def _relay_session(self, tokens: tuple[bytes, bytes], ips: tuple[str, str],
                       expires_at: float, now: float) -> None:
        """Serve a relay session here (its tokens minted here, or by another node)."""
        self._prune_sessions(now)
        self._next_session += 1
        session = RelaySession(self._next_session, expires_at, tokens)
        self.sessions[session.id] = session
        heapq.heappush(self._session_expiry,
                       (expires_at + RELAY_TOKEN_MEMORY, session.id))
        for token, side, ip in ((tokens[0], "sharer", ips[0]), (tokens[1], "joiner", ips[1])):
            self.tickets[token] = RelayTicket(session, side, ip)

    def _prune_sessions(self, now: float) -> None:
        """Forget sessions well past their tokens' expiry (never one waiting or live)."""
        heap = self._session_expiry
        while heap and heap[0][0] <= now:
            _, sid = heapq.heappop(heap)
            session = self.sessions.get(sid)
            if session is None:
                continue  # ended already
            if session.live or session.waiting is not None:  # not yet: look again later
                heapq.heappush(heap, (now + RELAY_TOKEN_MEMORY, sid))
                continue
            self._drop_session(session)

    def _drop_session(self, session: RelaySession) -> None:
        del self.sessions[session.id]
        for token in session.tokens:
            self.tickets.pop(token, None)

    def _relay_refuse(self, conn: Conn, code: str, kind: str, why: str, now: float) -> None:
        """Refuse a relay connection: one log line (per kind and interval), the error."""
        self.stats.relay_refused += 1
        self._problem(kind, f"relay refused {_fmt(conn.peer)}: {why}", now)
        self._refuse(conn, code, f"relay refused: {why}", now)

    def _relay(self, conn: Conn, token: bytes, now: float, *, hold: bool = True) -> None:
        """A relay message: check its token, then wait for the other side or join it.
        Shared (``--redis``): a token not known here may be on its way from the node that
        paired (``hold``): wait up to GRANT_WAIT for it."""
        relay = self.limits.relay
        if not relay.enabled:
            self._relay_refuse(conn, "relay_refused", "relay-token",
                               "this rendezvous does not relay", now)
            return
        self._prune_sessions(now)
        ticket = self.tickets.get(token)
        if ticket is None and hold and self.node is not None:
            conn.phase, conn.token = Phase.GRANT_WAIT, token
            self._at(conn, now + GRANT_WAIT)
            self._out.append(PollNode())
            return
        if ticket is None:
            self._relay_refuse(conn, "relay_refused", "relay-token",
                               "unknown relay token", now)
            return
        session = ticket.session
        if now >= session.expires_at:
            self._relay_refuse(conn, "relay_refused", "relay-token",
                               "relay token expired", now)
            return
        if ticket.used:
            self._relay_refuse(conn, "relay_refused", "relay-token",
                               f"relay token of the {ticket.side} already used", now)
            return
        if conn.public.host != ticket.ip:
            self._relay_refuse(conn, "relay_refused", "relay-token",
                               f"relay token of the {ticket.side} presented from another "
                               f"address than {ticket.ip}", now)
            return
        other = self.tickets.get(session.tokens[1] if ticket.side == "sharer"
                                 else session.tokens[0])
        waiting = None if session.waiting is None else self.conns.get(session.waiting)
        if waiting is None and other is not None and other.used:
            ticket.used = True
            self._relay_refuse(conn, "relay_refused", "relay-token",
                               f"the {other.side}'s relay connection ended before the "
                               f"{ticket.side}'s arrived", now)
            return
        ip = conn.public.host
        if waiting is None and self._relay_count >= relay.max_sessions:
            self._relay_refuse(conn, "busy", "relay-sessions",
                               f"{relay.max_sessions} relay sessions open", now)
            return
        if ip not in session.counted and self._relay_sources[ip] >= relay.max_per_source:
            self._relay_refuse(conn, "busy", "relay-per-source",
                               f"{relay.max_per_source} relay sessions open from {ip}", now)
            return
        ticket.used = True
        if ip not in session.counted:
            session.counted += (ip,)
            self._relay_sources[ip] += 1
        if waiting is None:  # the first side: wait for the other, until the tokens expire
            self._relay_count += 1
            session.waiting = conn.id
            conn.relay = session.id
            conn.phase = Phase.RELAY_WAITING
            self._at(conn, session.expires_at)
            return
        session.waiting = None
        waiting.relay = None
        a, b = (waiting, conn) if ticket.side == "joiner" else (conn, waiting)
        for each in (a, b):  # the driver's from now on (no reset, no more events)
            self._forget(each, now)
        session.live = True
        self.stats.relayed += 1
        self.stats.relay_live += 1
        self._out.append(StartRelay(session.id, a.id, b.id, encode(Relayed()), relay.rate))

    def _relay_timeout(self, conn: Conn, now: float) -> None:
        session = None if conn.relay is None else self.sessions.get(conn.relay)
        self._relay_abandoned(conn)
        waited = "" if session is None else " (the relay tokens expired)"
        self._refuse(conn, "timeout", f"the peer did not reach the relay in time{waited}", now)

    def _relay_abandoned(self, conn: Conn) -> None:
        """A waiting relay connection ends before the other side came: its session no
        longer counts (its token stays used)."""
        session = None if conn.relay is None else self.sessions.get(conn.relay)
        conn.relay = None
        if session is None or session.waiting != conn.id:
            return
        session.waiting = None
        self._uncount(session)

    def _uncount(self, session: RelaySession) -> None:
        self._relay_count -= 1
        for ip in session.counted:
            self._relay_sources[ip] -= 1
            if self._relay_sources[ip] <= 0:
                del self._relay_sources[ip]
        session.counted = ()

    def _relay_ended(self, ev: RelayEnded) -> None:
        session = self.sessions.get(ev.session)
        if session is None or not session.live:
            return
        session.live = False
        self.stats.relay_live -= 1
        self.stats.relayed_bytes += ev.a_to_b + ev.b_to_a
        self._uncount(session)
        self._drop_session(session)

    # -- shared through Redis (--redis): the book's answers and the other nodes ----------

    def _node(self) -> NodeId:
        assert self.node is not None
        return self.node

    def _ask(self, conn: Conn | None, op: BookOp, now: float | None = None) -> None:
        """Ask the shared book; ``conn`` waits for the answer (up to BOOK_WAIT)."""
        if conn is None:
            self._out.append(AskBook(None, op))
            return
        assert now is not None
        conn.phase = Phase.BOOK
        self._asked[conn.id] = op
        self._at(conn, now + BOOK_WAIT)
        self._out.append(AskBook(conn.id, op))

    def _waiting(self, conn: Conn, side: str = "share") -> Waiting:
        """This node's peer as the other nodes read it in the shared book."""
        hello = conn.hello
        assert hello is not None
        enabled = self.limits.relay.enabled
        relay_at = self._relay_address(conn) if enabled else None
        other = self._relay_in(not conn.info().over_ipv6) if enabled else None
        return Waiting(self._node(), conn.id, conn.info(), conn.rtt_known(), conn.pake,
                       hello.relay_capable, hello.direct_only, relay_at, self._relay_count,
                       "share" if side == "share" else "join", hello.nat, hello.candidates,
                       other)

    def _shared_hello(self, conn: Conn, hello: Hello, now: float) -> None:
        if hello.action == "resume":
            assert hello.resume_id is not None and hello.side is not None
            self._ask(conn, Meet(hello.resume_id, self._waiting(conn, hello.side)), now)
        elif hello.action == "share":
            owner = "" if hello.owner is None else hashlib.sha256(hello.owner).hexdigest()
            if hello.nameplate is not None:
                self._ask(conn, Reclaim(hello.nameplate, self._waiting(conn), owner), now)
            else:
                self._ask(conn, Allocate(self._waiting(conn), owner,
                                         self.limits.pairing.code_lifetime), now)
        else:
            assert hello.nameplate is not None
            mine = self._side(conn)
            probe_first = hello.probe is None and conn.info().mapping != "none"
            joiner_relays = self.limits.relay.enabled and mine.relay and mine.relay_at is not None
            self._ask(conn, Claim(hello.nameplate, conn.public.host, probe_first,
                                  joiner_relays), now)

    def _shared_event(self, event: BookAnswer | FromNode | StoreHealth | Delivered) -> None:
        now = event.now
        if isinstance(event, StoreHealth):
            self._health(event.problem, now)
            return
        if isinstance(event, Delivered):
            held = self.conns.get(event.conn)
            if held is not None and held.phase is Phase.HANDOFF:
                try:
                    self._handed_off(held, event.problem, now)
                except Exception as exc:
                    self._crashed(held.id, exc, now)
            return
        if isinstance(event, FromNode):
            try:
                self._from_node(event.message, now)
            except Exception as exc:
                self._problem("internal", f"rendezvous error on a message from another node: "
                              f"{type(exc).__name__}: {exc}", now)
            return
        asked = self._asked.pop(event.conn, None)
        conn = self.conns.get(event.conn)
        if conn is None or conn.phase is not Phase.BOOK:
            self._unanswered(event.conn, asked, event.result)
            return
        try:
            self._answer(conn, asked, event.result, now)
        except Exception as exc:
            self._crashed(conn.id, exc, now)

    def _unanswered(self, cid: ConnId, asked: BookOp | None, result: BookResult) -> None:
        """The asking connection went away (or gave up waiting) before the answer: undo
        what the book did for it (a code allocated to nobody, a resume hello listed for
        nobody). A claim that went through is not undone: that code is used."""
        if isinstance(result, Allocated):
            self._ask(None, Release(result.nameplate, self._node(), cid, "left"))
        elif isinstance(asked, Meet) and isinstance(result, Listed):
            self._ask(None, Unlist(asked.resume_id, self._node(), cid))

    def _book_silent(self, conn: Conn, now: float) -> None:
        why = f"the shared state (Redis) did not answer within {BOOK_WAIT:g} s"
        self._problem("store", f"refused {_fmt(conn.peer)}: {why}", now)
        self._refuse(conn, "busy", f"the rendezvous cannot pair now: {why}", now)

    def _answer(self, conn: Conn, asked: BookOp | None, result: BookResult,
                now: float) -> None:
        conn.deadline = None
        if isinstance(result, Refused):
            if isinstance(asked, Claim) and result.code != "probe_required":
                self.stats.refused_claims += 1
            if result.code == "busy":
                self._problem("store", f"refused {_fmt(conn.peer)}: {result.message}", now)
            self._refuse(conn, result.code, result.message, now)
            return
        if isinstance(asked, Allocate | Reclaim):
            assert isinstance(result, Allocated)
            conn.phase = Phase.SHARING
            conn.sharing = Sharing(result.nameplate, now + result.expires_in, last_pong=now,
                                   owner=asked.owner)
            if result.replaced is not None:
                self._replaced(result.replaced, "this pairing code was registered again "
                               "through another connection", now)
            self._send(conn, Welcome(result.nameplate, round(result.expires_in, 3),
                                     conn.public))
            self._ping(conn, now)
            return
        if isinstance(asked, Meet) and isinstance(result, Listed):
            if result.replaced is not None:
                self._replaced(result.replaced, "a newer resume hello from the same side "
                               "replaced this one", now)
            self._resume_wait(conn, now)
            return
        assert isinstance(result, Claimed), result
        conn.remote = result.waiting
        self._measured_or_ping(conn, now)

    def _replaced(self, where: tuple[NodeId, ConnId], why: str, now: float) -> None:
        node, cid = where
        if node != self.node:
            self._out.append(ToNode(node, (RefuseConn(cid, "bad_request", why),)))
            return
        self._from_node(RefuseConn(cid, "bad_request", why), now)

    def _relist_other_family(self, v6: bool) -> None:
        """This node now knows its relay address in one family: the records of the
        peers of the other family waiting here (sharers, resume hellos) say it
        (``relay_other``), so a peer of that family pairing on another node can
        still be relayed here."""
        for conn in self.conns.values():
            if (conn.phase is Phase.SHARING and conn.hello is not None
                    and conn.info().over_ipv6 != v6):
                self._publish(conn)

    def _publish(self, conn: Conn) -> None:
        """A waiting peer's record changed (SPAKE2 message, RTT, relay addresses): tell
        the book."""
        if self.node is None or self._stopping or conn.sharing is None:
            return
        hello = conn.hello
        if conn.sharing.nameplate is not None:
            self._ask(None, Update(conn.sharing.nameplate, self._waiting(conn)))
        elif hello is not None and hello.resume_id is not None and hello.side is not None:
            self._ask(None, UpdateResume(hello.resume_id, self._waiting(conn, hello.side)))

    def _pair_shared(self, nameplate: int | None, conn: Conn, now: float) -> None:
        """Pair ``conn`` with the partner the shared book gave it (on any node)."""
        w = conn.remote
        assert w is not None
        ours_is_sharer = _side(conn) == "sharer"
        if w.node == self.node:  # both here after all: as on one node
            other = self.conns.get(w.conn)
            if other is None or other.phase is not Phase.SHARING or other.gone:
                if nameplate is None:  # it left meanwhile: wait for a newer one
                    conn.remote = None
                    assert conn.hello is not None
                    self._shared_hello(conn, conn.hello, now)
                    return
                self._refuse(conn, "unknown_code", f"pairing code {nameplate}-… is no longer "
                             "open (the sharer stopped waiting): ask for a new code", now)
                return
            other.deadline = None
            if other.sharing is not None and other.sharing.nameplate is None:
                self._unlist_resume(other)
            other.sharing = None  # claimed in the book already: nothing to release
            sharer, joiner = (conn, other) if ours_is_sharer else (other, conn)
            self._pair(nameplate, sharer, joiner, now)
            return
        mine, theirs = self._side(conn), PeerSide.waiting(w, self.node)
        s_side, j_side = (mine, theirs) if ours_is_sharer else (theirs, mine)
        (to_sharer, sharer_at), (to_joiner, joiner_at) = self._plan(nameplate, s_side, j_side,
                                                                    now)
        here, there = conn.peer, (w.info.public.host, w.info.public.port)
        self._predicted(to_sharer, s_side.nat, s_side.candidates,
                        *((here, there) if ours_is_sharer else (there, here)))
        msg, at = (to_sharer, sharer_at) if ours_is_sharer else (to_joiner, joiner_at)
        remote_msg, remote_at = ((to_joiner, joiner_at) if ours_is_sharer
                                 else (to_sharer, sharer_at))
        # The other node fires its peer ``delay`` after it hears of it: later than
        # planned by the message's trip (under a ms), which only moves its fire later.
        # Ours waits until Redis has taken that (and the relay grant, if any): a fire
        # that reached one peer only would send it punching at nobody.
        grant, self._grant = self._grant, None
        messages: tuple[NodeMessage, ...] = (
            FireAt(w.conn, encode(remote_msg), round(max(0.0, remote_at - now), 6)),)
        if grant is not None:
            assert grant[0] == w.node
            messages = (grant[1], *messages)
        conn.sharing = None  # claimed: nothing to release
        conn.phase, conn.message, conn.fire_in = Phase.HANDOFF, encode(msg), at - now
        self._at(conn, now + BOOK_WAIT)
        self._out.append(ToNode(w.node, messages, conn.id))

    def _handed_off(self, conn: Conn, problem: str | None, now: float) -> None:
        """The peer's node has its fire (``problem`` None): ours goes; or it could not
        be told: we refuse, and its node lists its code again when Redis is back."""
        conn.deadline = None
        data, conn.message = conn.message, b""
        if problem is None:
            self._fire(conn, data, now + conn.fire_in, now)
            return
        why = f"the rendezvous cannot pair now: {problem}"
        self._problem("store", f"refused {_fmt(conn.peer)}: {why}", now)
        self._refuse(conn, "busy", why, now)

    def _relay_node(self, options: list[RelayChoice], a: PeerSide, b: PeerSide) -> RelayChoice:
        """Where a pairing's relay session runs, of its :meth:`_relay_options` (not
        empty): of two nodes that both can, the one with fewer relay sessions; on a tie
        either, at random, so relays spread over the nodes."""
        if len(options) == 1:
            return options[0]
        here, there = options
        load = (a if a.node is not None else b).load
        if load > self._relay_count:
            return here
        if load == self._relay_count and self._entropy(1)[0] & 1:
            return here
        return there

    def _from_node(self, msg: NodeMessage, now: float) -> None:
        if isinstance(msg, Grant):
            self._relay_session(msg.tokens, msg.ips, now + msg.ttl, now)
            for held in [c for c in self.conns.values() if c.phase is Phase.GRANT_WAIT
                         and c.token in msg.tokens]:
                held.deadline, held.phase = None, Phase.HELLO
                self._relay(held, held.token, now, hold=False)
            return
        conn = self.conns.get(msg.conn)
        if conn is None or conn.phase is not Phase.SHARING or conn.sharing is None:
            what = "fire" if isinstance(msg, FireAt) else "refusal"
            self._problem("node-message", f"a {what} from another node for a connection that "
                          "no longer waits here", now)
            return
        if conn.sharing.nameplate is None:
            self._unlist_resume(conn)
        conn.sharing = None  # the book has moved on: nothing to release
        conn.deadline = None
        if isinstance(msg, FireAt):
            self._fire(conn, msg.data, now + msg.delay, now)
        else:
            self._refuse(conn, msg.code, msg.message, now)

    def _health(self, problem: str | None, now: float) -> None:
        before, self.store_problem = self.store_problem, problem
        if problem is not None and problem != before:  # its node says it once an outage
            self._out.append(Log("store", f"shared state lost: {problem}: refusing new "
                                 "pairings until it is back"))
        elif problem is None and before is not None:
            self._out.append(Log("store", "shared state reachable: pairing"))
            # It may have lost what it held (a restart without persistence): list this
            # node's waiting peers again where nobody took their place.
            plates, resumes = [], []
            for conn in self.conns.values():
                sharing = conn.sharing
                if conn.phase is not Phase.SHARING or sharing is None or conn.gone:
                    continue
                left = sharing.expires_at - now
                if left <= 0:
                    continue
                assert conn.hello is not None
                if sharing.nameplate is not None:
                    plates.append((sharing.nameplate, self._waiting(conn), left,
                                   sharing.owner))
                elif conn.hello.resume_id is not None and conn.hello.side is not None:
                    resumes.append((conn.hello.resume_id,
                                    self._waiting(conn, conn.hello.side), left))
            for i in range(0, max(len(plates), len(resumes)), REPUBLISH_BATCH):
                self._ask(None, Republish(tuple(plates[i:i + REPUBLISH_BATCH]),
                                          tuple(resumes[i:i + REPUBLISH_BATCH])))

    # -- the plan and the fires ------------------------------------------------------------------

    def _pair(self, nameplate: int | None, sharer: Conn, joiner: Conn, now: float) -> None:
        """Plan and fire a pairing (``nameplate`` None: a resume)."""
        s_side = self._side(sharer)
        (to_sharer, sharer_at), (to_joiner, joiner_at) = self._plan(
            nameplate, s_side, self._side(joiner), now)
        self._predicted(to_sharer, s_side.nat, s_side.candidates, sharer.peer, joiner.peer)
        self._fire(joiner, encode(to_joiner), joiner_at, now)
        self._fire(sharer, encode(to_sharer), sharer_at, now)

    def _predicted(self, to_sharer: ServerMessage, sharer_nat: NatSummary | None,
                   sharer_candidates: tuple[Candidate, ...] | None,
                   sharer: tuple[str, int] | None, joiner: tuple[str, int] | None) -> None:
        """Count the path a sharer's fire predicts, and say why (one INFO line)."""
        if not isinstance(to_sharer, Fire):
            return
        guess = predict(fire_facts(to_sharer, "server", sharer_nat, sharer_candidates))
        self.stats.predicted[guess.path] = self.stats.predicted.get(guess.path, 0) + 1
        self.notes.append(f"pairing {_fmt(sharer)} with {_fmt(joiner)}: "
                          f"predicted path {guess.path}: {guess.why}")

    def _fire(self, conn: Conn, data: bytes, at: float, now: float) -> None:
        """``data`` is this connection's last message, due at ``at``."""
        conn.sharing = None  # claimed: no more pings, and nothing to release
        if at <= now:
            self._last_word(conn, data, now)
            return
        conn.phase = Phase.FIRING
        conn.message = data
        self._at(conn, at)

    def _plan(self, nameplate: int | None, sharer_conn: PeerSide, joiner_conn: PeerSide,
              now: float) -> tuple[tuple[ServerMessage, float], tuple[ServerMessage, float]]:
        """Each side's last message (fire, or the refusal) and when to send it. One of
        the sides may wait on another node (``PeerSide.node``): a relay stage is then
        served here or there (:meth:`_relay_node`)."""
        sharer, joiner = sharer_conn.info, joiner_conn.info
        direct_only = sharer_conn.direct_only or joiner_conn.direct_only
        relay_wanted = self._relay_wanted(sharer_conn, joiner_conn)
        relay_options = self._relay_options(sharer_conn, joiner_conn) if relay_wanted else []
        try:
            plans = make_plans(sharer, joiner, self.limits.pairing,
                               relay=bool(relay_options),
                               direct_only=direct_only,
                               ipv6_pair=_offers_ipv6(sharer_conn) and _offers_ipv6(joiner_conn),
                               mapped_pair=(sharer_conn.candidates is not None
                                            and joiner_conn.candidates is not None
                                            and (_offers_mapped(sharer_conn)
                                                 or _offers_mapped(joiner_conn))))
        except SymmetricPair as exc:
            why = str(exc)
            if relay_wanted and not relay_options:
                why += "; neither node of this pair has a relay address in IPv4 and IPv6"
            refusal = ErrorReply("symmetric_nat", why[:300])  # the codec's limit
            return (refusal, now), (refusal, now)
        # The joiner fires as soon as its fire arrives: nothing is gained by holding
        # it back. The sharer's fire arrives with it or a few ms later, never
        # before: a sharer SYN that beat the joiner's own SYN out of the joiner's
        # NAT would be dropped or refused there, while a sharer SYN that leaves
        # up to half a peer round trip late still crosses the joiner's (whose SYN
        # takes that long to reach the sharer's NAT), and the joiner's first
        # bytes reach the sharer no later. At a peer round trip under about
        # 2 * FIRE_MARGIN the joiner's SYN does reach the sharer's NAT first: the
        # punch machine's first-shot retry rules make that refusal harmless
        # (docs/protocol.md, "Near-zero round trips").
        joiner_at = now
        if joiner_conn.rtt_known:
            sharer_at = now + max(0.0, (joiner.rtt - sharer.rtt) / 2) + FIRE_MARGIN
            fire_at = now + joiner.rtt / 2  # when the joiner fires
            rtt_ms = round((sharer.rtt + joiner.rtt) / 2 * 1000, 3)  # peer <-> peer, estimated
        else:
            # The joiner's hello came in its SYN (no RTT measured): fire both at once.
            # Still safe: the sharer's SYN reaches the joiner's NAT after
            # (sharer + peer path) / 2, no earlier than the joiner's SYN leaves it
            # (joiner path / 2) as long as paths obey the triangle inequality.
            sharer_at = now + FIRE_MARGIN
            fire_at = now + sharer.rtt / 2
            rtt_ms = round(sharer.rtt * 1000, 3)
        # SPAKE2 messages go through only if both sent one (a client without it
        # must see neither: it rejects unknown fields, and both must agree on
        # whether the tunnel runs SPAKE2 in-band).
        both = sharer_conn.pake is not None and joiner_conn.pake is not None
        budget = sum(s.budget for s in plans.sharer) + (plans.relay_budget or 0.0)
        relay_s = relay_j = None
        if plans.relay_budget is not None:
            # The tokens last until the plan's end (as the later fire arrives) + grace.
            start = max(fire_at, sharer_at + sharer.rtt / 2)
            expires_at = start + budget + RELAY_TOKEN_GRACE
            ips = (sharer.public.host, joiner.public.host)
            # Each side gets the relay node's address in its own family.
            assert relay_options  # a relay stage is planned only with one
            choice = self._relay_node(relay_options, sharer_conn, joiner_conn)
            addr_s, addr_j = choice.sharer, choice.joiner
            if choice.node is None:  # here
                token_s, token_j = self._relay_tokens(ips, expires_at, now)
            else:  # the other node relays: it learns the tokens from a grant
                token_s, token_j = (self._entropy(RELAY_TOKEN_SIZE),
                                    self._entropy(RELAY_TOKEN_SIZE))
                self._grant = (choice.node, Grant((token_s, token_j), ips, expires_at - now))
            relay_s = RelayStage(addr_s, plans.relay_budget, token_s)
            relay_j = RelayStage(addr_j, plans.relay_budget, token_j)
            self.stats.relay_plans += 1
        if nameplate is not None:
            # Keep the pairing for a retry until well after its punch can have ended.
            self._prune_retries(now)
            until = fire_at + budget + RETRY_GRACE
            slot = self.retries.get(nameplate)
            if slot is None:
                self.retries[nameplate] = RetrySlot(sharer.public.host, joiner.public.host,
                                                    until)
            else:
                slot.until = until
        else:
            self.stats.resumed += 1
        self.stats.paired += 1
        # The peers' own candidates pass through, only when both hellos had the field.
        cands_s, cands_j = sharer_conn.candidates, joiner_conn.candidates
        if cands_s is None or cands_j is None:
            cands_s = cands_j = None
        return (
            (Fire(sharer.public, joiner.public, plans.sharer, rtt_ms, plans.sharer_note,
                  joiner_conn.pake if both else None, (sharer.mapping, joiner.mapping),
                  relay_s, _peer_nat(sharer_conn, joiner_conn), peer_candidates=cands_j),
             sharer_at),
            (Fire(joiner.public, sharer.public, plans.joiner, rtt_ms, plans.joiner_note,
                  sharer_conn.pake if both else None, (joiner.mapping, sharer.mapping),
                  relay_j, _peer_nat(joiner_conn, sharer_conn), peer_candidates=cands_s),
             joiner_at),
        )


def _observed(peer: tuple[str, int]) -> Endpoint:
    return Endpoint(str(peer[0]).removeprefix("::ffff:"), int(peer[1]))  # IPv4-mapped, dual stack


def _own_endpoint(host: str, port: int) -> Endpoint | None:
    """One of our addresses as a peer can use it (IPv4, a v4-mapped one unwrapped, or
    IPv6, checked as the encoder will); None for an unspecified or unusable one."""
    try:
        return parse_observed_endpoint(str(Endpoint(str(host).removeprefix("::ffff:"),
                                                    int(port))))
    except BadAddress:
        return None


def _host_scoped(host: str) -> bool:
    """Loopback or link-local: an address of ours that no peer on another host could use."""
    ip = ipaddress.ip_address(host)
    return ip.is_loopback or ip.is_link_local


def _offers_ipv6(side: PeerSide) -> bool:
    return any(c.path == "ipv6" for c in side.candidates or ())


def _offers_mapped(side: PeerSide) -> bool:
    """A mapped port the peer can reach: on the address we see this side at (the rule
    both peers apply to it at the fire)."""
    return any(c.path == "mapped" and mapped_unusable(c.addr.host, side.info.public.host) is None
               for c in side.candidates or ())


def _nat(conn: Conn) -> NatSummary | None:
    return None if conn.hello is None else conn.hello.nat


def _peer_nat(to: PeerSide, peer: PeerSide) -> NatSummary | None:
    """The peer's report for ``to``'s fire: only to a client that sent one itself (an
    older client rejects a fire with a field it does not know)."""
    return peer.nat if to.nat is not None else None


def _fmt(peer: tuple[str, int] | None) -> str:
    return str(Endpoint(*peer)) if peer else "?"


def _nameplate(conn: Conn) -> int:
    assert conn.hello is not None and conn.hello.nameplate is not None
    return conn.hello.nameplate


def _side(conn: Conn) -> str:
    assert conn.hello is not None
    if conn.hello.action == "resume":
        return "sharer" if conn.hello.side == "share" else "joiner"
    return "sharer" if conn.hello.action == "reshare" else "joiner"
