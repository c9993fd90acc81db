"""The coordinated peer (``nopf share`` / ``nopf connect``) as a pure state machine.

Events in (bytes the rendezvous sent, a connection up or closed, a path that
opened or failed, the clock), actions out (open a connection from port P, send
bytes, close, open a path to the peer, succeed, fail). No sockets, no asyncio,
no clock of its own: every event carries ``now``. The asyncio driver is
:mod:`nopf_web.sessions.coordination`; the rendezvous' side is
:mod:`nopf_web.rendezvous.server` and the wire formats :mod:`nopf_web.wire.rendezvous`.

One *meeting* is a conversation with the rendezvous from one local port P
(the punch port):

1. The NAT mapping check, when needed: a connection that sends a ``probe``
   frame, reads the seed's 10-byte discovery reply and waits for the
   rendezvous to close first (which frees the 4-tuple for P's next
   connection). The sharer always checks (nobody waits for it yet); the
   joiner only when the rendezvous asks (``probe_required``: against a
   symmetric sharer its own mapping decides the plan), and before a retry.
2. The hello connection, with TCP Fast Open where possible (the hello rides
   in the SYN): the seed's 10-byte reply (our public address) first, then
   frames. Pings are answered at once. The sharer gets a ``welcome`` (its
   nameplate; the code is made of it and two local words), sends its SPAKE2
   message, and waits up to the code's lifetime for a ``fire``; the joiner's
   hello carries its SPAKE2 message and gets its ``fire`` within about a round
   trip. An ``error`` frame is a typed failure (:func:`refusal`).
3. A rendezvous that closes after the discovery reply without a frame speaks
   only the seed protocol, or lost our hello: one more hello tells the two
   apart (a seed-only one closes again).

Over IPv6 (the driver reached the rendezvous at an IPv6 address: a host without
IPv4, or whose IPv4 failed) there is no NAT mapping to check and no IPv4 punch
to plan: the mapping check's connection is closed as soon as it is up, the
hello says ``lan: []`` and ``probe: null``, the reply is the 22-byte one, and
the rendezvous' plan has no punch stage (our IPv6 candidates, then the relay).

Every hello says ``relay: true``: this peer can use a plan's relay stage, and
carries ``nat``, our NAT doctor's compact report (``CoordinationConfig.nat``; a
report of nothing without one). When a fire comes, :class:`Fired` says so before
the first path opens, with the path predicted for a pairing's first attempt
(:func:`nopf_web.prediction.predict` on the fire's facts).

A sharer's hello also carries ``owner``, a secret it drew. When its connection
to the rendezvous breaks while it waits for its peer (its rendezvous node died,
or restarted), it registers the same code again: a new meeting (mapping check,
hello with the nameplate and the owner) through the next address of the
rendezvous (:class:`Connect` ``rotate``), every ``REREGISTER_PAUSE`` s while the
code lives, at most ``MAX_REREGISTER`` times in a row. A rendezvous that shares
its codes (``nopf-server --redis``) takes it on any node; one that keeps them in
memory refuses (``unknown_code``), and that refusal ends the wait. A rendezvous
older than ``owner`` rejects the hello (``bad_request`` naming it): the hello goes
again without it, once.

Then an *attempt*: the fire's plan, tried as *paths* to the peer, of a
:data:`PathKind`: a :class:`Punch` (the driver runs
:class:`~nopf_web.punch.driver.PunchDriver`) or :class:`ViaRelay` (the driver
opens a connection to the relay and runs
:class:`~nopf_web.sessions.relay_join_machine.RelayJoinMachine` on it). Paths
are grouped in *rungs*: the paths of a rung run together and the first that
opens wins; when all of a rung's paths failed, the next rung starts. The
rendezvous' punch stages are one rung each, in order, and its relay stage (if
any) the last rung: the *ladder*. A plan with only the relay stage (a hopeless
pair: a symmetric NAT facing another NAT) goes to the relay at once.

Without a relay stage (a rendezvous without relay: older, or ``--no-relay``), a
failed attempt is met again (``reshare``/``rejoin``: fresh ports, a new fire)
while the punch timeout allows it: at most ``MAX_ATTEMPTS`` attempts, each with
at least ``MIN_ATTEMPT`` seconds left, and none when the fire says punching
cannot help (``Fire.hopeless``). With a relay stage no retry is needed: the
relay's failure (a refusal, or the peer never reaching it) ends the attempt.

A *resume* meeting (``CoordinationConfig.resume``) meets the peer of an
established tunnel again, by the tunnel's resume id instead of a code: the
mapping check, a ``resume`` hello (no code, no SPAKE2), a fire (the first side
waits, pinged, up to ``RESUME_WAIT``), then one attempt of the same ladder
(``direct_only``: punch stages only). It ends with a :class:`Met` (a new
connection to the peer and its path) instead of a :class:`Paired`.
"""

from __future__ import annotations

import enum
import secrets
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeAlias

from nopf_web.errors import NopfError
from nopf_web.pairing import PairingCode, make_code
from nopf_web.prediction import PairFacts, Prediction, fire_facts, predict, usable_mapped
from nopf_web.punch.machine import Failure, PunchConfig, PunchTimeout
from nopf_web.rendezvous.conn_events import Close as Close, Send as Send
from nopf_web.rendezvous.errors import (
    RendezvousError,
    RendezvousProtocolError,
    RendezvousUnreachable,
)
from nopf_web.roles import PeerRole
from nopf_web.wire.address import Endpoint
from nopf_web.wire.discovery import DiscoveryReader
from nopf_web.wire.errors import WireError
from nopf_web.wire.nat import NatSummary
from nopf_web.wire.rendezvous import (
    OWNER_SIZE,
    RESUME_WAIT,
    Candidate,
    ErrorReply,
    Fire,
    FrameReader,
    Hello,
    HelloAction,
    MessageError,
    PakeMessage,
    Ping,
    Pong,
    Probe,
    RelayStage,
    ResumeSide,
    ServerMessage,
    Stage,
    Welcome,
    decode_server_message,
    encode,
    mapped_unusable,
)

from .errors import (
    CodeExpired,
    CodeUsed,
    CoordinatedPunchTimeout,
    PairingError,
    PeerDidNotResume,
    PeerDidNotRetry,
    PeerNeverArrived,
    RelayRefused,
    RendezvousBusy,
    RendezvousRejected,
    RendezvousTooOld,
    SymmetricNat,
    TooManyGuesses,
    UnknownCode,
)

DEFAULT_PUNCH_TTL = 2
# A failed attempt is met again (fresh ports, a new fire time) while the punch
# timeout allows: the first attempt gets half of it, and an attempt is only
# started with at least MIN_ATTEMPT seconds left.
MIN_ATTEMPT = 2.0
MAX_ATTEMPTS = 3
RETRY_WAIT = 12.0  # s for the peer to fail its attempt too and ask again (rendezvous: 10)
REREGISTER_PAUSE = 1.0  # s between a sharer's tries to register its code again
MAX_REREGISTER = 20  # tries in a row (a rendezvous that never comes back: give up)
FIRE_GRACE = 2.0  # s beyond the network timeout for a joiner's fire (a ping may come first)
READ_SIZE = 4096  # what the driver reads at once from a rendezvous connection
# How a tunnel's connection reaches the peer: a punched connection between public
# addresses, one between LAN addresses (both behind one NAT), a punched one between
# global IPv6 addresses, a plain one to a port a gateway maps (NAT-PMP, PCP, UPnP-IGD),
# or through the rendezvous' relay. (The resumable tunnel's PathKind is the same.)
TunnelPath = Literal["public", "lan", "ipv6", "mapped", "relay"]
TUNNEL_PATHS: tuple[TunnelPath, ...] = ("lan", "ipv6", "public", "mapped", "relay")
# A candidate rung's budget: a direct path between the peers opens within about a
# round trip of both starting; long enough for several punch attempts (0.5-0.8 s
# apart) and a few peer round trips, short, since the rungs after it wait for it.
CANDIDATE_MIN_BUDGET = 2.0
CANDIDATE_MAX_BUDGET = 4.0


# -- configuration and result ------------------------------------------------------


@dataclass(frozen=True)
class Resume:
    """Meet the peer of an established tunnel again (a ``resume`` hello): after its path
    was lost, or to try a direct path while relayed (``direct_only``)."""

    resume_id: bytes  # RESUME_ID_SIZE bytes, derived from the tunnel's key by both peers
    direct_only: bool = False  # punch stages only, never the relay


@dataclass(frozen=True)
class Gathered:
    """This peer's own direct candidates, found before the meeting by the driver.

    ``ipv6``: our global IPv6 addresses, each with the port our IPv6 punch runs from.
    ``mapped``: the public address and port our gateway forwards to ``mapped_port``,
    a local port where the driver listens (advertised only when its address is the
    public IP the rendezvous sees: behind a second NAT the mapping is unreachable).
    """

    ipv6: tuple[Endpoint, ...] = ()
    mapped: Endpoint | None = None
    mapped_port: int = 0


@dataclass(frozen=True)
class CoordinationConfig:
    role: PeerRole  # server: share (gets the code); client: join with ``code``
    where: str  # the rendezvous as "ip:port", for messages
    code: PairingCode | None = None  # the sharer's code (client only)
    code_lifetime: float = 600.0  # how long a sharer waits for its peer
    punch_timeout: float = 30.0  # for all attempts together, from the first fire
    net_timeout: float = 5.0  # each wait for the rendezvous
    punch_ttl: int = DEFAULT_PUNCH_TTL
    punch_port: int = 0  # 0: any port, a fresh one per meeting
    bind_host: str = "0.0.0.0"
    pake: bool = False  # our SPAKE2 message travels with the coordination (MakePake)
    resume: Resume | None = None  # a resume meeting (no code, no SPAKE2) instead of a pairing
    nat: NatSummary | None = None  # our doctor report, sent with every hello (None: none)
    # Our direct candidates (None: the hello says nothing of candidates, as before).
    candidates: Gathered | None = None

    def __post_init__(self) -> None:
        if self.resume is not None:
            if self.code is not None or self.pake:
                raise ValueError("a resume meeting has no code and no SPAKE2")
        elif (self.code is not None) != (self.role == "client"):
            raise ValueError("a client joins with the sharer's code; a server gets its own")


@dataclass(frozen=True)
class Timings:
    """Instants (the ``now`` of the events) of the meeting that led to the tunnel."""

    started: float  # the meeting started (the first: share()/connect() called)
    hello_sent: float  # the hello left
    fire: float  # the fire instruction arrived (the punch starts)
    connected: float  # the path opened
    probed: float | None = None  # the NAT mapping check finished (None: not run)
    rdv_connected: float = 0.0  # the hello's connection was established


def path_words(path: TunnelPath, relay: Endpoint | None) -> str:
    """How the tunnel reaches the peer, for people: "over the public path", "over the
    LAN", "over IPv6", "over a mapped port", "over the relay at 198.51.100.2:3012"."""
    if path == "relay":
        return f"over the relay at {relay}"
    return {"lan": "over the LAN", "ipv6": "over IPv6",
            "mapped": "over a mapped port"}.get(path, "over the public path")


@dataclass(frozen=True)
class Paired:
    """Everything about a paired tunnel but its socket (which the driver holds)."""

    role: PeerRole
    code: str  # the full code, e.g. "7-orbit-lantern"
    peer: Endpoint  # the address that answered (relayed: the peer's public address)
    path: TunnelPath
    local: Endpoint  # our end of the tunnel (host as bound; punch port, or relay conn's)
    public: Endpoint  # our public address, as the rendezvous saw it
    rtt: float  # s, the rendezvous' estimate of the peer-to-peer round trip
    timings: Timings
    attempt: int = 1  # 2 and up: the punch worked after meeting again
    # The peer's SPAKE2 message from the fire, given to FinishPake; None: both
    # sides run SPAKE2 in-band on the tunnel.
    peer_pake: bytes | None = None
    relay: Endpoint | None = None  # path "relay": the relay's address
    why: str | None = None  # path "relay": why not direct ("the peer's NAT is symmetric")
    prediction: Prediction | None = None  # the path predicted when the fire came

    @property
    def over(self) -> str:
        return path_words(self.path, self.relay)


@dataclass(frozen=True)
class Met:
    """A resume meeting's new connection to the peer (its socket the driver holds)."""

    role: PeerRole
    peer: Endpoint  # the address that answered (relayed: the peer's public address)
    path: TunnelPath
    local: Endpoint
    public: Endpoint  # our public address, as the rendezvous saw it
    rtt: float  # s, the rendezvous' estimate of the peer-to-peer round trip
    timings: Timings
    relay: Endpoint | None = None
    why: str | None = None

    @property
    def over(self) -> str:
        return path_words(self.path, self.relay)


# -- actions ----------------------------------------------------------------------


@dataclass(frozen=True)
class Connect:
    """Open a TCP connection to the rendezvous from local port ``port`` (0: any).

    Report :meth:`CoordinationMachine.connected` or ``connect_failed``. With
    ``fastopen`` the connect may be deferred to the first :class:`Send` (its SYN
    carries those bytes): report ``deferred=True``; :class:`AwaitHandshake` follows.
    """

    conn: int
    port: int
    fastopen: bool
    rotate: bool = False  # the rendezvous' address failed us: use its next address


@dataclass(frozen=True)
class AwaitHandshake:
    """A deferred connection sent its first bytes: report ``established`` or
    ``connect_failed`` once its handshake is done (then read it)."""

    conn: int


# Send (bytes for a connection) and Close (end it) are the connection actions of
# nopf-server's machines (:mod:`nopf_web.rendezvous.conn_events`), imported above.


@dataclass(frozen=True)
class MakePake:
    """Make our SPAKE2 half for ``code``; report ``pake_made`` with its message."""

    code: str


@dataclass(frozen=True)
class FinishPake:
    """Finish our SPAKE2 half with the peer's message (the first path's SYN is out)."""

    peer_message: bytes


@dataclass(frozen=True)
class ShowCode:
    """The sharer's code exists: show it to the user (the CLI's first line)."""

    code: str


@dataclass(frozen=True)
class Say:
    """A line for the event log; ``punching``: a punch is starting."""

    text: str
    punching: bool = False


@dataclass(frozen=True)
class Fired:
    """The fire of attempt ``number`` came (the punch starts now); ``prediction``: the
    path it predicts for a pairing's first attempt (None for the rest)."""

    number: int
    fire: Fire
    prediction: Prediction | None


@dataclass(frozen=True)
class Punch:
    """A path by hole punching from ``local`` along one stage of the plan."""

    local: Endpoint
    stage: Stage
    config: PunchConfig
    nat_hint: str | None


@dataclass(frozen=True)
class ViaRelay:
    """A path through the relay of the plan's relay stage: a new connection to
    ``stage.relay`` from a fresh port on ``bind_host`` (never the punch port), the
    relay message with our token, then ``relayed`` within the stage's budget (the
    driver runs :class:`~nopf_web.sessions.relay_join_machine.RelayJoinMachine`)."""

    bind_host: str
    stage: RelayStage


@dataclass(frozen=True)
class AwaitMapped:
    """A path through our mapped port: accept, on the driver's listener at local port
    ``port``, a connection from ``peer_ip`` (the peer's public IP: its NAT may pick any
    port) within ``budget`` seconds; else fail with a :class:`PunchTimeout`."""

    port: int
    peer_ip: str
    budget: float


PathKind: TypeAlias = Punch | ViaRelay | AwaitMapped  # the ways to reach the peer


@dataclass(frozen=True)
class OpenPath:
    """Start trying a path; report ``path_opened`` (keep its socket) or ``path_failed``
    (a punch's :class:`PunchTimeout`, or the relay's typed error)."""

    path: int
    how: PathKind


@dataclass(frozen=True)
class AbandonPath:
    """Stop trying a path (another one of its rung won); close whatever it opened."""

    path: int


@dataclass(frozen=True)
class Succeed:
    """Done: the socket of ``path`` is the tunnel (a resume meeting's: a new connection)."""

    path: int
    paired: Paired | Met


@dataclass(frozen=True)
class Fail:
    error: NopfError


Action = (Connect | AwaitHandshake | Send | Close | MakePake | FinishPake | ShowCode | Say
          | Fired | OpenPath | AbandonPath | Succeed | Fail)


# -- refusals -----------------------------------------------------------------------

_REFUSALS: dict[str, type[PairingError]] = {
    "unknown_code": UnknownCode, "expired": CodeExpired, "used": CodeUsed,
    "too_many_guesses": TooManyGuesses, "symmetric_nat": SymmetricNat,
}
_NAMED_REFUSALS: dict[str, type[PairingError]] = {  # their message names the rendezvous
    "busy": RendezvousBusy, "timeout": PeerDidNotRetry, "bad_request": RendezvousRejected,
    "unsupported_version": RendezvousRejected, "relay_refused": RelayRefused,
}


def refusal(reply: ErrorReply, where: str) -> PairingError:
    """The typed error for an ``error`` frame (``probe_required`` is no error: the
    machine checks the mapping and says hello again)."""
    if reply.code in _REFUSALS:
        return _REFUSALS[reply.code](reply.message)
    return _NAMED_REFUSALS.get(reply.code, PairingError)(f"rendezvous {where}: {reply.message}")


# -- the machine ----------------------------------------------------------------------


class _Step(enum.Enum):
    PROBE_CONNECT = "probe: connecting"
    PROBE_REPLY = "probe: its address"
    PROBE_END = "probe: the rendezvous' close"
    CONNECT = "hello: connecting"
    HANDSHAKE = "hello: Fast Open handshake"
    ADDRESS = "our address"
    WELCOME = "welcome"
    PEER = "a peer"
    FIRE = "fire"
    DRAIN = "the rendezvous' close"
    PAUSE = "a pause before registering the code again"


@dataclass
class _Meeting:
    """One conversation with the rendezvous, up to its fire."""

    action: HelloAction
    started: float
    punch_timeout: float  # what the hello says this peer will punch
    port: int  # where the next connection is made from
    need_probe: bool
    fire_wait: float  # s to wait for the fire once the address is in (joiner, retries)
    fire_what: str
    step: _Step = _Step.CONNECT
    conn: int = 0
    deadline: float | None = None
    timeout_error: NopfError | None = None  # what the deadline's expiry fails with
    hello_retried: bool = False
    probed: Endpoint | None = None
    probed_at: float | None = None
    local_port: int = 0  # the hello connection's port
    lan: Endpoint | None = None
    deferred: bool = False
    hello_sent: float = 0.0
    rdv_connected: float = 0.0
    discovery: DiscoveryReader = field(default_factory=DiscoveryReader)
    frames: FrameReader = field(default_factory=FrameReader)
    seen: int = 0  # frames received on the hello connection
    backlog: list[bytes] = field(default_factory=list)  # frames received, not yet handled
    awaiting_pake: bool = False  # the sharer's SPAKE2 message goes out before the rest
    public: Endpoint | None = None
    reclaim: bool = False  # a sharer registering its code again (after a broken connection)
    lost: NopfError | None = None  # reclaim: why the first connection ended
    advertised: tuple[Candidate, ...] = ()  # our candidates, as the hello had them


@dataclass
class _Attempt:
    """The paths tried after one fire, rung by rung."""

    number: int
    fire: Fire
    meeting: _Meeting
    fired: float
    rungs: list[list[PathKind]]  # each rung's paths run together; the first to open wins
    running: dict[int, PathKind] = field(default_factory=dict)
    failures: list[tuple[Stage, PunchTimeout]] = field(default_factory=list)
    relay_error: NopfError | None = None  # why the relay rung failed
    pake_to_finish: bytes | None = None


class CoordinationMachine:
    """See the module docstring. Feed events; carry out the actions in order."""

    def __init__(self, config: CoordinationConfig, *,
                 make_code: Callable[[int], PairingCode] = make_code,
                 entropy: Callable[[int], bytes] = secrets.token_bytes) -> None:
        self.config = config
        self._make_code = make_code
        # The sharer's owner secret: registers its code again through another node.
        self._owner: bytes | None = (entropy(OWNER_SIZE) if config.role == "server"
                                     and config.resume is None else None)
        self._reregistered = 0  # tries in a row
        self.code: PairingCode | None = config.code
        self.done = False
        self._conns = 0
        self._paths = 0
        self._pake_message: bytes | None = None
        self._meeting: _Meeting | None = None
        self._attempt: _Attempt | None = None
        self._attempts = 0
        self._deadline = 0.0  # of all attempts together, from the first fire
        self._failed_attempt: CoordinatedPunchTimeout | None = None  # while meeting again
        self.prediction: Prediction | None = None  # the first fire's, once it came
        self.facts: PairFacts | None = None  # the last fire's, as predictions read them

    # -- events -------------------------------------------------------------------

    def start(self, now: float) -> list[Action]:
        cfg = self.config
        if cfg.resume is not None:
            # The mapping check first: a NAT that rebooted or a network that changed has a
            # new mapping, and the plan (relay at once, or punch) depends on it. The first
            # side waits for the other up to RESUME_WAIT; no retry slot: the whole budget.
            meeting = _Meeting("resume", now, cfg.punch_timeout, cfg.punch_port,
                               need_probe=True, fire_wait=RESUME_WAIT + FIRE_GRACE,
                               fire_what="fire instruction (the peer did not resume)")
        elif cfg.role == "server":
            meeting = _Meeting("share", now, _first_budget(cfg.punch_timeout), cfg.punch_port,
                               need_probe=True, fire_wait=0.0, fire_what="")
        else:
            meeting = _Meeting("join", now, _first_budget(cfg.punch_timeout), cfg.punch_port,
                               need_probe=False, fire_wait=cfg.net_timeout + FIRE_GRACE,
                               fire_what="fire instruction")
        return self._begin(meeting)

    @property
    def wake_at(self) -> float | None:
        """When :meth:`timer` must be called next (None: no timer runs)."""
        if self.done or self._meeting is None:
            return None
        return self._meeting.deadline

    def timer(self, now: float) -> list[Action]:
        m = self._meeting
        if self.done or m is None or m.deadline is None or now < m.deadline:
            return []
        m.deadline = None
        if m.step is _Step.PAUSE:
            return self._begin(m)
        if m.step is _Step.DRAIN:
            return [Close(m.conn), *self._probe_required(m, now)]
        assert m.timeout_error is not None
        return self._meeting_failed(m, m.timeout_error, [Close(m.conn)], now)

    def connected(self, conn: int, local: Endpoint, deferred: bool, now: float) -> list[Action]:
        """The connection of :class:`Connect` is up (``deferred``: waits for its first send)."""
        m = self._meeting_on(conn)
        if m is None:
            return []
        cfg = self.config
        over_ipv6 = ":" in local.host
        if m.step is _Step.PROBE_CONNECT and over_ipv6:
            # Over IPv6 there is no NAT mapping to check: the rendezvous plans no IPv4
            # punch for a peer it sees over IPv6 (our IPv6 paths are our candidates).
            # The hello goes on a connection of its own, with Fast Open.
            m.need_probe, m.port = False, cfg.punch_port
            return [Close(conn), *self._connect(m, now)]
        if m.step is _Step.PROBE_CONNECT:
            m.step = _Step.PROBE_REPLY
            self._wait(m, now + cfg.net_timeout, RendezvousProtocolError(
                f"rendezvous {cfg.where} did not answer a probe within {cfg.net_timeout:g} s "
                "(is it a nopf-server?)"))
            m.local_port = local.port
            return [Send(conn, encode(Probe()))]
        if m.step is not _Step.CONNECT:
            return []
        m.local_port, m.lan, m.deferred, m.rdv_connected = local.port, local, deferred, now
        m.discovery = DiscoveryReader(ipv6=over_ipv6)  # its reply: 22 bytes over IPv6
        return self._hello(m, now)

    def established(self, conn: int, now: float) -> list[Action]:
        """A deferred connection's handshake is done: it is read from now on."""
        m = self._meeting_on(conn)
        if m is None or m.step is not _Step.HANDSHAKE:
            return []
        m.rdv_connected = now
        self._await_address(m, now)
        return []

    def connect_failed(self, conn: int, error: RendezvousError, now: float) -> list[Action]:
        m = self._meeting_on(conn)
        if m is None:
            return []
        return self._meeting_failed(m, error, [Close(conn)], now)

    def pake_made(self, message: bytes, now: float) -> list[Action]:
        """Our SPAKE2 message, as :class:`MakePake` asked."""
        self._pake_message = message
        m = self._meeting
        if self.done or m is None:
            return []
        if m.awaiting_pake:  # the sharer's, once its code exists
            m.awaiting_pake = False
            return [Send(m.conn, encode(PakeMessage(message))), *self._read_backlog(m, now)]
        if m.step is _Step.CONNECT and m.lan is not None:  # the hello waited for it
            return self._hello(m, now)
        return []

    def received(self, conn: int, data: bytes, now: float) -> list[Action]:
        m = self._meeting_on(conn)
        if m is None or not data:
            return []
        if m.step in (_Step.PROBE_REPLY, _Step.ADDRESS):
            need = m.discovery.needed
            head, data = data[:need], data[need:]
            try:
                found = m.discovery.feed(head)
            except WireError as exc:
                return self._meeting_failed(m, RendezvousProtocolError(
                    f"rendezvous {self.config.where}: {exc}"), [Close(conn)])
            if found is None:
                return []
            if m.step is _Step.PROBE_REPLY:
                m.public = Endpoint(*found)
                m.step = _Step.PROBE_END  # the rest is ignored; its close is awaited
                return []
            actions = self._address(m, Endpoint(*found), now)
            if not data:
                return actions
            return actions + self._frames(m, data, now)
        if m.step in (_Step.WELCOME, _Step.PEER, _Step.FIRE):
            return self._frames(m, data, now)
        return []  # the probe's rest, or a drain

    def closed(self, conn: int, error: str | None, now: float) -> list[Action]:
        """The rendezvous closed the connection (EOF), or it broke (``error``: why, one
        line, e.g. a reset or a failed send)."""
        m = self._meeting_on(conn)
        if m is None:
            return []
        where = self.config.where
        close: list[Action] = [Close(conn)]
        if m.step is _Step.PROBE_END:
            # Its close came first (or a seed-only server reset our unread probe):
            # the 4-tuple is free for the hello either way.
            m.probed, m.probed_at, m.port = m.public, now, m.local_port
            return close + self._connect(m, now)
        if m.step is _Step.DRAIN:
            return close + self._probe_required(m, now)
        if m.step is _Step.HANDSHAKE:  # its first send failed: it never connected
            return self._meeting_failed(m, RendezvousUnreachable(
                f"rendezvous {where}: {error or 'the connection closed'}"), close, now)
        if m.step in (_Step.PROBE_REPLY, _Step.ADDRESS):
            why = (f"rendezvous {where} closed before its discovery reply (is it a "
                   "nopf-server?)" if error is None else
                   f"rendezvous {where} broke the connection ({error})")
            return self._meeting_failed(m, RendezvousProtocolError(why), close, now)
        if m.step in (_Step.WELCOME, _Step.PEER, _Step.FIRE):
            if not m.seen and not m.reclaim:  # a seed server closes, or resets as our
                return close + self._seed_only_or_lost(m, now)  # hello goes unread
            why = (f"rendezvous {where} closed the connection unexpectedly" if error is None
                   else f"rendezvous {where} broke the connection ({error})")
            if (m.step is _Step.PEER or m.reclaim) and self._owner is not None:
                return close + self._reregister(m, RendezvousProtocolError(why), now)
            return self._meeting_failed(m, RendezvousProtocolError(why), close)
        return close

    def path_opened(self, path: int, now: float, local: Endpoint | None = None,
                    ) -> list[Action]:
        """``local``: our end of a relay path's connection (a punch's is the punch port)."""
        a = self._attempt
        if self.done or a is None or path not in a.running:
            return []
        how = a.running.pop(path)
        actions: list[Action] = [AbandonPath(p) for p in a.running]
        a.running.clear()
        m = a.meeting
        self.done = True
        timings = Timings(m.started, m.hello_sent, a.fired, now, m.probed_at, m.rdv_connected)
        peer: Endpoint
        kind: TunnelPath
        if isinstance(how, ViaRelay):
            peer, kind, relay = a.fire.peer_public, "relay", how.stage.relay
            why: str | None = _relay_reason(a.fire, a.failures)
            local = local or Endpoint(how.bind_host, 0)
            said = f"tunnel up over the relay at {relay} ({why})"
        elif isinstance(how, AwaitMapped):
            peer, kind, relay, why = a.fire.peer_public, "mapped", None, None
            local = local or Endpoint(self.config.bind_host, how.port)
            said = f"tunnel up from {a.fire.peer_public.host} {path_words(kind, None)}"
        else:
            peer, kind, relay, why = how.stage.peer, how.stage.path, None, None
            local = local or how.local
            said = f"tunnel up to {peer} {path_words(kind, None)}"
        rtt = a.fire.rtt_ms / 1000
        result: Paired | Met
        if self.config.resume is not None:
            result = Met(self.config.role, peer, kind, local, a.fire.public, rtt, timings,
                         relay, why)
        else:
            assert self.code is not None
            result = Paired(
                self.config.role, str(self.code), peer, kind, local, a.fire.public, rtt,
                timings, attempt=a.number,
                peer_pake=a.fire.peer_pake if self._pake_message is not None else None,
                relay=relay, why=why, prediction=self.prediction)
        return [*actions, Say(said), Succeed(path, result)]

    def path_failed(self, path: int, error: NopfError, now: float) -> list[Action]:
        """A path did not open: a punch's :class:`PunchTimeout`, or a relay's typed error
        (refused, the peer never reached it, unreachable)."""
        a = self._attempt
        if self.done or a is None or path not in a.running:
            return []
        how = a.running.pop(path)
        if isinstance(how, ViaRelay):
            a.relay_error = error
        elif isinstance(how, AwaitMapped):
            assert isinstance(error, PunchTimeout), error
            stage = Stage("mapped", Endpoint(self.config.bind_host, how.port), "arm",
                          how.budget)
            a.failures.append((stage, error))
        else:
            assert isinstance(error, PunchTimeout), error
            a.failures.append((how.stage, error))
        said: list[Action] = []
        kind = ("mapped" if isinstance(how, AwaitMapped)
                else how.stage.path if isinstance(how, Punch) else "relay")
        if kind in ("ipv6", "mapped"):  # a candidate rung: why the ladder goes on
            said.append(Say(f"no {'IPv6' if kind == 'ipv6' else 'mapped-port'} path: {error}"))
        if a.running:
            return said  # another path of this rung is still trying
        if a.rungs:
            return said + self._open_rung(a)
        return said + self._attempt_failed(a, now)

    # -- meetings ---------------------------------------------------------------------

    def _begin(self, meeting: _Meeting) -> list[Action]:
        self._meeting = meeting
        if meeting.need_probe:
            return self._probe(meeting)
        return self._connect(meeting, meeting.started)

    def _probe(self, m: _Meeting) -> list[Action]:
        m.step, m.deadline, m.discovery = _Step.PROBE_CONNECT, None, DiscoveryReader()
        m.conn = self._next_conn()
        # A sharer registering its code again starts at the rendezvous' next address
        # (the probe and the hello must reach the same one).
        return [Connect(m.conn, m.port, fastopen=False, rotate=m.reclaim)]

    def _connect(self, m: _Meeting, now: float) -> list[Action]:
        m.step, m.deadline, m.lan = _Step.CONNECT, None, None
        m.discovery, m.frames, m.seen, m.backlog = DiscoveryReader(), FrameReader(), 0, []
        m.conn = self._next_conn()
        actions: list[Action] = [Connect(m.conn, m.port, fastopen=True)]
        if self.config.pake and self._pake_message is None and m.action != "share":
            # Made while the SYN is out (or before it carries the hello): the
            # SPAKE2 arithmetic costs no round trip.
            assert self.code is not None
            actions.append(MakePake(str(self.code)))
        return actions

    def _hello(self, m: _Meeting, now: float) -> list[Action]:
        """Send the hello once the connection is up and our SPAKE2 message (if any) made."""
        wants_pake = self.config.pake and m.action != "share"
        if wants_pake and self._pake_message is None:
            return []  # pake_made() sends it
        assert m.lan is not None
        resume = self.config.resume
        actions: list[Action] = []
        candidates = None
        if self.config.candidates is not None:
            candidates, said = self._advertise(m, self.config.candidates)
            actions += [Say(line) for line in said]
        # Our address as our OS sees it, for a LAN path: an IPv4 one (over IPv6 none:
        # our global IPv6 addresses are candidates).
        lan = () if ":" in m.lan.host else (m.lan,)
        if resume is not None:  # implies the relay unless direct_only
            side: ResumeSide = "share" if self.config.role == "server" else "join"
            hello = Hello("resume", None, lan, m.probed, m.punch_timeout,
                          resume_id=resume.resume_id, side=side,
                          direct_only=resume.direct_only, nat=self._nat,
                          candidates=candidates)
        else:
            nameplate = (None if self.code is None or (m.action == "share" and not m.reclaim)
                         else self.code.nameplate)
            hello = Hello(m.action, nameplate, lan, m.probed, m.punch_timeout,
                          pake=self._pake_message if wants_pake else None, relay=True,
                          nat=self._nat, candidates=candidates,
                          owner=self._owner if m.action == "share" else None)
        m.hello_sent = now
        actions.append(Send(m.conn, encode(hello)))
        if m.deferred:
            m.step = _Step.HANDSHAKE
            actions.append(AwaitHandshake(m.conn))
        else:
            self._await_address(m, now)
        return actions

    @property
    def _nat(self) -> NatSummary:
        """Our report for the hello; without one, a report of nothing (all unknown): the
        field also says we read a fire's ``peer_nat`` (the rendezvous sends it only then)."""
        return self.config.nat if self.config.nat is not None else NatSummary()

    def _advertise(self, m: _Meeting, own: Gathered,
                   ) -> tuple[tuple[Candidate, ...], list[str]]:
        """Our candidates for the hello, and what to say about them."""
        cands = [Candidate("ipv6", e) for e in own.ipv6[:4]]
        said = []
        if own.mapped is not None:
            seen = m.probed.host if m.probed is not None else None
            why = mapped_unusable(own.mapped.host, seen)
            if why is None or (seen is None and m.action == "join"):
                # A joiner's hello leaves before it knows its public address: the
                # rule is applied at the fire, by both peers, to the address the
                # rendezvous saw (_candidate_rungs).
                cands.append(Candidate("mapped", own.mapped))
                said.append(f"offering the mapped port {own.mapped} (local port "
                            f"{own.mapped_port})")
            else:
                said.append(f"not offering the mapped port {own.mapped}: {why}")
        m.advertised = tuple(cands)
        return m.advertised, said

    def _await_address(self, m: _Meeting, now: float) -> None:
        cfg = self.config
        m.step = _Step.ADDRESS
        self._wait(m, now + cfg.net_timeout, RendezvousProtocolError(
            f"rendezvous {cfg.where} sent no address within {cfg.net_timeout:g} s (is it a "
            "nopf-server?)"))

    def _address(self, m: _Meeting, public: Endpoint, now: float) -> list[Action]:
        cfg = self.config
        m.public = public
        actions: list[Action] = []
        if m.probed is not None and public != m.probed:
            actions.append(Say(f"our NAT gave public ports {m.probed.port} then {public.port} "
                               f"from local port {m.local_port}: it looks symmetric"))
        actions.append(Say(f"public address {public} (local port {m.local_port})"))
        if m.action == "share":
            m.step = _Step.WELCOME
            self._wait(m, now + cfg.net_timeout, RendezvousProtocolError(
                f"rendezvous {cfg.where} sent no pairing code (nameplate) within "
                f"{cfg.net_timeout:g} s"))
        else:
            m.step = _Step.FIRE
            self._wait(m, now + m.fire_wait, RendezvousProtocolError(
                f"rendezvous {cfg.where} sent no {m.fire_what} within {m.fire_wait:g} s"))
        return actions

    def _frames(self, m: _Meeting, data: bytes, now: float) -> list[Action]:
        try:
            payloads = m.frames.feed(data)
        except MessageError as exc:
            return self._meeting_failed(m, RendezvousProtocolError(
                f"rendezvous {self.config.where}: {exc}"), [Close(m.conn)])
        m.seen += len(payloads)
        m.backlog += payloads
        return self._read_backlog(m, now)

    def _read_backlog(self, m: _Meeting, now: float) -> list[Action]:
        """Handle the frames received, in order, until one ends the conversation or asks
        for our SPAKE2 message first (the rest waits for :meth:`pake_made`)."""
        actions: list[Action] = []
        while m.backlog and not m.awaiting_pake:
            try:
                msg = decode_server_message(m.backlog.pop(0))
            except MessageError as exc:
                return actions + self._meeting_failed(m, RendezvousProtocolError(
                    f"rendezvous {self.config.where}: {exc}"), [Close(m.conn)])
            actions += self._message(m, msg, now)
            if self._meeting is not m or m.step not in (_Step.WELCOME, _Step.PEER, _Step.FIRE):
                m.backlog.clear()  # the conversation ended (fire, error): the rest is not read
        return actions

    def _message(self, m: _Meeting, msg: ServerMessage, now: float) -> list[Action]:
        cfg = self.config
        where = cfg.where
        if isinstance(msg, Ping):
            return [Send(m.conn, encode(Pong(msg.seq)))]
        if isinstance(msg, ErrorReply):
            if msg.code == "probe_required":
                # The rendezvous closes first: our port is free again once our FIN
                # is acknowledged. Read to its close, then check the mapping.
                m.step = _Step.DRAIN
                self._wait(m, now + cfg.net_timeout, None)
                return []
            if (m.action == "share" and msg.code == "bad_request" and self._owner is not None
                    and "hello.owner" in msg.message and not m.reclaim):
                # A rendezvous from before owner secrets: share without (once).
                self._owner = None
                return [Close(m.conn), Say("the rendezvous does not take owner secrets: "
                                           "sharing without (the code cannot be registered "
                                           "again if the connection breaks)"),
                        *self._begin(m)]
            error = refusal(msg, where)
            if m.reclaim and isinstance(error, RendezvousBusy):
                return [Close(m.conn), *self._reregister(m, error, now)]
            if m.reclaim:
                assert m.lost is not None
                error = type(error)(f"{m.lost}; registering the code again: {error}")
            if m.action == "resume" and msg.code == "timeout":
                error = PeerDidNotResume(f"rendezvous {where}: {msg.message}")
            if m.step is _Step.PEER and isinstance(error, CodeExpired):
                # the rendezvous' lifetime was shorter than ours
                error = PeerNeverArrived(f"the peer never arrived: {error}")
            return self._meeting_failed(m, error, [Close(m.conn)])
        if m.step is _Step.WELCOME:
            if not isinstance(msg, Welcome):
                return self._meeting_failed(m, RendezvousProtocolError(
                    f"rendezvous {where} sent {msg!r:.60} instead of a nameplate"),
                    [Close(m.conn)])
            m.step = _Step.PEER
            self._wait(m, m.started + cfg.code_lifetime, PeerNeverArrived(
                f"no peer used the pairing code within {cfg.code_lifetime:g} s"))
            if m.reclaim:
                assert self.code is not None
                if msg.nameplate != self.code.nameplate:
                    return self._meeting_failed(m, RendezvousProtocolError(
                        f"rendezvous {where} registered nameplate {msg.nameplate} instead of "
                        f"our {self.code.nameplate}"), [Close(m.conn)])
                self._reregistered = 0
                again: list[Action] = [Say(f"pairing code {self.code} registered again "
                                           f"through rendezvous {where}")]
                if self._pake_message is not None:
                    again.append(Send(m.conn, encode(PakeMessage(self._pake_message))))
                return again
            self.code = code = self._make_code(msg.nameplate)
            actions: list[Action] = [
                Say(f"pairing code {code} (valid {msg.expires_in / 60:g} min)"),
                ShowCode(str(code))]
            if cfg.pake:  # nobody waits for us yet: the SPAKE2 arithmetic is free here
                m.awaiting_pake = True
                actions.append(MakePake(str(code)))
            return actions
        if not isinstance(msg, Fire):
            return self._meeting_failed(m, RendezvousProtocolError(
                f"rendezvous {where} sent {type(msg).__name__} where a fire instruction "
                "was due"), [Close(m.conn)])
        return [Close(m.conn), *self._fired(m, msg, now)]

    def _probe_required(self, m: _Meeting, now: float) -> list[Action]:
        if m.need_probe:  # asked twice: the rendezvous is confused
            return self._meeting_failed(m, RendezvousProtocolError(
                f"rendezvous {self.config.where} asked for a NAT mapping check it already "
                "had"), [])
        m.need_probe, m.port = True, m.local_port
        return [Say("the sharer's NAT is symmetric: checking ours"), *self._probe(m)]

    def _seed_only_or_lost(self, m: _Meeting, now: float) -> list[Action]:
        error = RendezvousTooOld(
            f"rendezvous {self.config.where} closed the connection after the discovery reply: "
            "it speaks only the seed protocol, so pairing codes need a newer nopf-server")
        if m.hello_retried:
            return self._meeting_failed(m, error, [])
        # nopf-server closes a connection whose hello has not come within a second, as
        # it closes seed clients: a hello lost and retransmitted (TCP's first timeout is
        # a second) looks the same. A seed-only server closes again.
        m.hello_retried = True
        return [Say("the rendezvous closed before answering our hello; trying once more (a "
                    "lost packet, or a rendezvous that speaks only the seed protocol)"),
                *self._begin(m)]

    def _reregister(self, m: _Meeting, error: NopfError, now: float) -> list[Action]:
        """The sharer's connection broke while it waited: register the code again, after
        a pause, through the rendezvous' next address (see the module doc)."""
        lost = m.lost or error
        left = m.started + self.config.code_lifetime - now
        self._reregistered += 1
        if self._reregistered > MAX_REREGISTER or left <= REREGISTER_PAUSE:
            return self._meeting_failed(m, lost, [])
        again = _Meeting("share", m.started, m.punch_timeout, self.config.punch_port,
                         need_probe=True, fire_wait=0.0, fire_what="", reclaim=True, lost=lost)
        self._meeting = again
        again.step = _Step.PAUSE
        self._wait(again, now + REREGISTER_PAUSE, None)
        if self._reregistered > 1:
            return [Say(f"could not register pairing code {self.code} again ({error}); "
                        f"trying again in {REREGISTER_PAUSE:g} s")]
        return [Say(f"{lost}: registering pairing code {self.code} again in "
                    f"{REREGISTER_PAUSE:g} s")]

    def _meeting_failed(self, m: _Meeting, error: NopfError,
                        actions: Sequence[Action], now: float | None = None) -> list[Action]:
        if (m.reclaim and now is not None and not self.done
                and isinstance(error, RendezvousError)):
            # No rendezvous to register again with (unreachable, silent): try again.
            return [*actions, *self._reregister(m, error, now)]
        self._meeting = None
        self.done = True
        failed = self._failed_attempt
        if failed is not None:  # meeting again after a failed attempt: that failure stands
            return [*actions, Say(f"could not coordinate again: {error}"), Fail(failed)]
        return [*actions, Fail(error)]

    # -- attempts ---------------------------------------------------------------------

    def _fired(self, m: _Meeting, fire: Fire, now: float) -> list[Action]:
        self._meeting = None
        self._failed_attempt = None
        self._attempts += 1
        if self._attempts == 1:
            self._deadline = now + self.config.punch_timeout
        cfg = self.config
        local = Endpoint(cfg.bind_host, m.local_port)
        rungs: list[list[PathKind]] = [[Punch(local, stage, PunchConfig(
            timeout=stage.budget,
            # On a LAN there is no NAT between us to open with a short-lived SYN.
            arm_ttl=cfg.punch_ttl if stage.path == "public" else 0,
            first_shot=stage.path == "public",
        ), fire.note)] for stage in fire.plan]
        # The peers' own candidates, one rung each, before the public punch (after a
        # LAN stage): IPv6, then a mapped port. One rung at a time, never raced, so
        # both peers always take the same connection: two direct paths opening at once
        # could each win on a different side.
        first = 1 if fire.plan and fire.plan[0].path == "lan" else 0
        rungs[first:first] = self._candidate_rungs(m, fire)
        said: list[Action] = []
        for c in m.advertised:  # a joiner's mapping, offered before it knew its address
            why = mapped_unusable(c.addr.host, fire.public.host) if c.path == "mapped" else None
            if why is not None:
                said.append(Say(f"not using our mapped port {c.addr}: {why}"))
        if fire.relay is not None:  # the last rung: when every punch stage failed, or at once
            rungs.append([ViaRelay(cfg.bind_host, fire.relay)])
        # Both sides sent a SPAKE2 message (else the rendezvous forwards neither).
        finish = fire.peer_pake if self._pake_message is not None else None
        self._attempt = _Attempt(self._attempts, fire, m, now, rungs, pake_to_finish=finish)
        fired = Fired(self._attempts, fire, None)
        self.facts = fire_facts(fire, cfg.role, cfg.nat, m.advertised)
        if self._attempts == 1 and cfg.resume is None:  # before the first SYN
            self.prediction = predict(self.facts)
            fired = Fired(1, fire, self.prediction)
        if not rungs:  # no IPv4 path, no relay, and our IPv6 met none of the peer's:
            self._attempt, self.done = None, True  # nothing to try, now or again
            return [fired, *said, Fail(_punch_failed(fire, []))]
        return [fired, *said, *self._open_rung(self._attempt)]

    def _candidate_rungs(self, m: _Meeting, fire: Fire) -> list[list[PathKind]]:
        """IPv6 and mapped-port rungs, as both peers make them from the same two lists
        (ours as the hello had them, the peer's from the fire) and the same RTT."""
        own, theirs = self.config.candidates, fire.peer_candidates
        if own is None or theirs is None:
            return []
        budget = min(CANDIDATE_MAX_BUDGET, CANDIDATE_MIN_BUDGET + 4 * fire.rtt_ms / 1000)
        sharer = self.config.role == "server"
        rungs: list[list[PathKind]] = []
        peer_v6 = [c.addr for c in theirs if c.path == "ipv6"]
        our_v6 = [c.addr for c in m.advertised if c.path == "ipv6"]
        if our_v6 and peer_v6:
            # The first address each offered (the peer picks ours alike): the sharer
            # arms (SYNs whose short hop limit opens its firewall and dies before the
            # peer's, which then never tracks an attempt its own SYN collides with), the
            # joiner connects. No full first shot: IPv6 cannot shield a socket from the
            # ICMPv6 refusal of a firewall not yet open (IPV6_MINHOPCOUNT checks the
            # error's own hop limit, not the quoted SYN's), and the sharer's full SYN
            # crossing that dead attempt left the joiner's firewall dropping its next
            # SYNs as invalid (the dual-stack matrix: 2 of 80 runs, both ICMP sites).
            stage = Stage("ipv6", peer_v6[0], "arm" if sharer else "connect", budget)
            rungs.append([Punch(our_v6[0], stage, PunchConfig(
                timeout=budget, arm_ttl=self.config.punch_ttl, first_shot=False), None)])
        # A mapped port is used only where its gateway's address is its owner's public
        # IP as the rendezvous saw it (both peers read the same two addresses).
        ours_mapped = usable_mapped(m.advertised, fire.public)
        peer_mapped = usable_mapped(theirs, fire.peer_public)
        # The sharer's mapping first: with both, the joiner connects to the sharer's.
        listen = ours_mapped is not None and (sharer or peer_mapped is None)
        assert own is not None
        if listen:
            rungs.append([AwaitMapped(own.mapped_port, fire.peer_public.host, budget)])
        elif peer_mapped is not None:
            stage = Stage("mapped", peer_mapped, "connect", budget)
            rungs.append([Punch(Endpoint(self.config.bind_host, 0), stage, PunchConfig(
                timeout=budget, arm_ttl=0, first_shot=False), None)])
        return rungs

    def _open_rung(self, a: _Attempt) -> list[Action]:
        actions: list[Action] = []
        for how in a.rungs.pop(0):
            path = self._paths = self._paths + 1
            a.running[path] = how
            if isinstance(how, ViaRelay):
                said = (f"{_relay_reason(a.fire, a.failures)}: going through the relay at "
                        f"{how.stage.relay}")
            elif isinstance(how, AwaitMapped):
                said = (f"waiting for the peer on our mapped port (local port {how.port}, "
                        f"{how.budget:.3g} s)")
            else:
                said = f"punching to {how.stage.peer} ({how.stage.path}, {how.stage.punch})"
            actions += [Say(said, punching=True), OpenPath(path, how)]
            if a.pake_to_finish is not None:  # runs while that path's first SYN crosses
                actions.append(FinishPake(a.pake_to_finish))
                a.pake_to_finish = None
        return actions

    def _attempt_failed(self, a: _Attempt, now: float) -> list[Action]:
        self._attempt = None
        if a.relay_error is not None:  # the last rung: the relay's failure ends it all
            self.done = True
            return [Fail(a.relay_error)]
        failed = _punch_failed(a.fire, a.failures)
        left = self._deadline - now
        # A symmetric NAT facing another NAT fails again the same way. A resume meeting
        # has no retry slot at the rendezvous: the peers resume again instead.
        if (a.number >= MAX_ATTEMPTS or left < MIN_ATTEMPT or a.fire.hopeless
                or self.config.resume is not None):
            self.done = True
            return [Fail(failed)]
        self._failed_attempt = failed
        cfg = self.config
        # The peer meets again when its own attempt has failed, about when ours did;
        # one that stopped never does: wait no longer than the punch timeout allows.
        meeting = _Meeting("reshare" if cfg.role == "server" else "rejoin", now, left,
                           cfg.punch_port, need_probe=True,
                           fire_wait=min(cfg.net_timeout + RETRY_WAIT, max(1.0, left)),
                           fire_what="fire instruction for a second attempt (the peer did "
                                     "not coordinate again)")
        return [Say(f"punch attempt {a.number} failed ({failed}); coordinating again with "
                    f"fresh sockets (attempt {a.number + 1}, {left:.1f} s left)"),
                *self._begin(meeting)]

    # -- helpers ------------------------------------------------------------------------

    def _meeting_on(self, conn: int) -> _Meeting | None:
        m = self._meeting
        if self.done or m is None or m.conn != conn:
            return None  # a connection already given up
        return m

    def _next_conn(self) -> int:
        self._conns += 1
        return self._conns

    @staticmethod
    def _wait(m: _Meeting, deadline: float, error: NopfError | None) -> None:
        m.deadline, m.timeout_error = deadline, error


def _first_budget(punch_timeout: float) -> float:
    """The first attempt's share of the punch timeout (the rest is for retries)."""
    if punch_timeout < 2 * MIN_ATTEMPT:
        return punch_timeout
    return max(MIN_ATTEMPT, punch_timeout / 2)


def _relay_reason(fire: Fire, failures: list[tuple[Stage, PunchTimeout]]) -> str:
    """Why a tunnel goes through the relay, in a few words."""
    v6 = [who for who, e in (("we", fire.public), ("the peer", fire.peer_public))
          if ":" in e.host]
    if v6:
        who = "both peers" if len(v6) == 2 else v6[0]
        tried = (f": no IPv6 path within {sum(s.budget for s, _ in failures):.3g} s"
                 if failures else "")
        return f"{who} reached the rendezvous over IPv6 only, no IPv4 punch{tried}"
    if fire.hopeless and fire.mapping is not None:
        ours, theirs = fire.mapping
        if ours == theirs == "symmetric":
            return "both NATs are symmetric"
        return "our NAT is symmetric" if ours == "symmetric" else "the peer's NAT is symmetric"
    if failures:
        return f"no direct path within {sum(s.budget for s, _ in failures):.3g} s"
    return "the rendezvous planned no direct path"


def _punch_failed(fire: Fire,
                  failures: list[tuple[Stage, PunchTimeout]]) -> CoordinatedPunchTimeout:
    outcomes: Counter[Failure] = Counter()
    for _, exc in failures:
        outcomes.update(exc.outcomes)
    total = sum(s.budget for s, _ in failures)
    tried = ", ".join(f"{s.peer} ({s.path})" for s, _ in failures)
    rejected = outcomes[Failure.REFUSED] + outcomes[Failure.UNREACHABLE]
    if fire.note:
        cause = fire.note
    elif rejected:
        cause = (f"the peer's NAT rejected our SYNs {rejected} time(s) (RST/ICMP) and its own "
                 "SYN never reached us: the peer may have stopped, or a firewall blocks it")
    else:
        cause = ("no SYN from the peer ever arrived: a NAT or firewall on the path probably "
                 "maps each destination to a new port (symmetric) or blocks the connection")
    if not failures:
        return CoordinatedPunchTimeout(f"no path to the peer could be tried: {cause}",
                                       outcomes)
    return CoordinatedPunchTimeout(
        f"no connection to the peer within {total:g} s (tried {tried}): {cause}", outcomes)
