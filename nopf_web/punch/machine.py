"""The punch as a pure state machine: events in, actions out, no sockets, no clock.

Why the sequence looks like this (see ``../shared/docs/nat-facts.md`` and
``docs/protocol.md``): Linux NATs track TCP sequence numbers, so the socket
that opened our NAT's mapping must be the one that completes the handshake
(a TCP simultaneous open), never a listener created afterwards. And a SYN of
ours that reaches the peer's NAT before the peer has opened its side is
answered by some NATs with RST or ICMP, which aborts our attempt and can
poison the NAT's tracking state for seconds.

Two tactics therefore (a tactic is what one side's punch does; the peers'
roles, server and client, pick it: see ``nopf_web.roles``):

``ARM`` (the seed's server, who fires first): keeps one socket in SYN_SENT
towards the peer at all times. Its SYN leaves with a low TTL (``arm_ttl``):
enough to open our own NAT, too little to reach the peer's NAT, so the peer's
NAT never sees it and cannot refuse it. (The router where it expires answers
with ICMP time-exceeded, which would abort a SYN_SENT socket; the driver sets
IP_MINTTL so the kernel ignores that error.) The socket is replaced by a fresh one
before the kernel's first retransmission (1 s) would send a full-TTL SYN. When
the peer's SYN arrives, our socket in SYN_SENT answers with a SYN-ACK carrying
the sequence number the NAT already knows, at the normal TTL. It also listens
on the punch port: when there is no NAT on our side (or the peer's SYN finds
no socket in SYN_SENT), the kernel's listener completes the connection instead
of answering with RST, as the seed's server did.

``CONNECT`` (the seed's client): sends ordinary SYNs, a fresh attempt every
``connect_interval`` or ``retry_delay`` after a refusal, until one meets an
armed peer. Before the peer arms, its NAT drops or refuses our SYNs; that is
expected and simply retried, so the two users may enter the addresses seconds
apart in either order.

With ``arm_ttl = 0`` both tactics send full-TTL SYNs: plain repeated TCP
simultaneous open.

With ``first_shot`` (coordinated mode) the first attempt of either tactic is a
SYN that reaches the peer: the rendezvous makes both peers start at the same
moment, so the two SYNs cross and each NAT has opened its side before the
other's SYN arrives, whatever the number of hops to the NAT. From the second
attempt on the tactics behave as above, which recovers if the SYNs did not cross
in time.

The rendezvous fires ``CONNECT`` (the joiner) first and ``ARM`` a few ms later,
so that ``ARM``'s SYN never reaches the joiner's NAT before the joiner's own SYN
has left it. The joiner's SYN, though, can reach the sharer's NAT before the
sharer's has left: a NAT that answers with ICMP then makes the kernel abort
the joiner's socket (even one the sharer's SYN already moved to SYN_RECV), and
the sharer's SYN, crossing, leaves the joiner's NAT tracking a simultaneous
open with that dead socket's sequence number: Linux conntrack marks every later
SYN from the same port (a new socket, a new ISN) invalid for minutes, and NATs
drop invalid packets. So ``CONNECT``'s first shot leaves with TTL
``first_shot_ttl`` (32: any NAT within 31 hops), below that of every packet of
the peer's (TTL 64 minus at most 31 hops), and the driver has the kernel ignore
ICMP errors quoting a TTL that low (IP_MINTTL, as for the arming SYN): the
socket stays in SYN_SENT and the sharer's SYN completes it. (Only one side can
tell its refusals apart this way: the peer's first shot must arrive above our
IP_MINTTL.)

No shield works against an RST, though, and at a round trip shorter than the
rendezvous' FIRE_MARGIN (a LAN, a data centre) ``CONNECT``'s first shot reaches
the sharer's NAT before ``ARM``'s first SYN has left it: a NAT that answers with
RST kills it, and that RST, crossing the joiner's NAT, closes its tracking so
that ``ARM``'s first SYN is refused there in turn. Two rules keep the punch
direct whatever the round trip: ``ARM`` re-arms at once after its first shot is
refused (no moment without a socket in SYN_SENT, in which the peer's next SYN
would meet our listener, whose SYN-ACK carries a sequence number our NAT never
saw and is dropped, while its half-open socket holds the address pair, or our
kernel's RST), and ``CONNECT`` tries again ``first_retry_delay`` after a refused
first shot, when ``ARM`` has surely armed, instead of ``retry_delay``.

The arming TTL is restored right after the SYN leaves, but a peer's SYN that
arrives in those microseconds (likeliest when both start at once on a path with
no delay) is answered while it still holds: our SYN-ACK expires on the way. The
peer's socket then gets no answer and is replaced before our kernel resends
(1 s later), and our NAT, tracking a handshake in SYN_RECV, refuses every new
SYN of the pair (ours and the peer's) for a minute. The driver sees the
socket mid-handshake as it restores the TTL (the attempt may be ``clipped``; or the
peer's SYN came just after the restore, and the SYN-ACK left at full TTL: the
driver cannot tell which). Unless the handshake completes within ``clip_grace``,
the socket is closed with an RST that the guard lets pass, sent with the arming
TTL (it ends our NAT's tracking and goes no further), and ``ARM`` re-arms before
the peer's next SYN. Any half-open socket the machine abandons is closed that way
when the punch arms (without an arming TTL the RST would reach the peer: a plain close).
"""

from __future__ import annotations

import enum
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from nopf_web.errors import NopfError

ACCEPTED = 0  # the attempt number of a connection that came through the listener


class Tactic(enum.Enum):
    ARM = "arm"
    CONNECT = "connect"


class Failure(enum.Enum):
    """How an attempt ended, as far as the kernel told us."""

    REFUSED = "refused"  # RST: ECONNREFUSED
    UNREACHABLE = "unreachable"  # ICMP unreachable / prohibited
    SILENT = "silent"  # replaced or timed out without any answer
    # The peer's SYN reached the socket before its arming TTL was restored: our
    # SYN-ACK left with that TTL and expired on the way (see the module docstring).
    CLIPPED = "clipped"
    OTHER = "other"


@dataclass(frozen=True)
class PunchConfig:
    timeout: float = 30.0
    arm_ttl: int = 2
    rearm_interval: float = 0.8  # < 1 s initial SYN RTO: no full-TTL retransmission leaves
    connect_interval: float = 0.5
    retry_delay: float = 0.2
    # Retry delays vary by ±retry_jitter/2 of themselves: two peers refused in
    # lockstep with equal periods could otherwise stay out of phase for good.
    retry_jitter: float = 0.5
    handshake_grace: float = 0.2  # re-check a socket that is mid-handshake this often
    # A socket mid-handshake is kept at most this long past its interval: a
    # half-open one (its peer gone, its RSTs perhaps dropped by the guard) must
    # not hold the punch port until the deadline.
    handshake_limit: float = 3.0
    first_shot: bool = False  # attempt 1 reaches the peer in both tactics (rendezvous-timed)
    # TTL of CONNECT's first shot: enough for any NAT within 31 hops, yet below
    # the TTL of the peer's packets (64 minus at most 31 hops), so ICMP errors
    # about it can be told apart and ignored (see the module docstring).
    first_shot_ttl: int = 32
    # After a refused first shot, CONNECT tries again this soon (not retry_delay): the
    # peer fires a few ms after us (the rendezvous' FIRE_MARGIN), and at a round trip
    # shorter than that our first shot arrives before the peer's NAT has opened.
    first_retry_delay: float = 0.03
    # An arming socket already mid-handshake as its TTL was restored ("clipped") gets
    # this long to complete: its SYN-ACK may have left after the restore, at full TTL.
    # Still half-open then, its SYN-ACK expired: it is reset and ARM re-arms, before
    # the peer's next SYN (connect_interval after the one that met it).
    clip_grace: float = 0.3

    def __post_init__(self) -> None:
        if self.timeout <= 0:
            raise ValueError("punch timeout must be positive")
        if not 0 <= self.arm_ttl <= 255 or self.arm_ttl == 1:
            raise ValueError("arm TTL must be 0 (off) or 2-255")
        if not 2 <= self.first_shot_ttl <= 254:
            raise ValueError("first shot TTL must be 2-254")
        if self.first_retry_delay < 0:
            raise ValueError("first retry delay must be >= 0")
        if self.clip_grace <= 0:
            raise ValueError("clip grace must be positive")


class PunchTimeout(NopfError):
    def __init__(self, message: str, outcomes: Counter[Failure]) -> None:
        super().__init__(message)
        self.outcomes = outcomes


# Actions ---------------------------------------------------------------------


@dataclass(frozen=True)
class StartAttempt:
    """Open a new socket from the punch port and send a SYN to the peer.

    ``ttl`` is the TTL of that first SYN only (None = the system default);
    the driver restores the default right after, for the handshake, and has
    the socket ignore ICMP errors about a SYN with a TTL that low.
    """

    attempt: int
    ttl: int | None


@dataclass(frozen=True)
class Abandon:
    """Close this attempt's socket (a SYN_SENT socket closes without a packet; a
    half-open one with an RST the guard lets pass). ``clipped``: its SYN-ACK expired
    with the arming TTL (see :meth:`PunchMachine.clipped`)."""

    attempt: int
    clipped: bool = False


@dataclass(frozen=True)
class Succeed:
    attempt: int


@dataclass(frozen=True)
class GiveUp:
    error: PunchTimeout


PunchAction = StartAttempt | Abandon | Succeed | GiveUp


# The machine -----------------------------------------------------------------


@dataclass
class PunchMachine:
    tactic: Tactic
    config: PunchConfig
    peer: str
    nat_hint: str | None = None  # e.g. "our NAT changed the port", added to the timeout
    outcomes: Counter[Failure] = field(default_factory=Counter)
    attempts: int = 0
    done: bool = False
    _deadline: float = 0.0
    _current: int | None = None
    _current_started: float = 0.0
    _next_fire: float | None = None
    _recheck: float | None = None
    _suspect: bool = False  # the current socket was mid-handshake as its TTL was restored
    rand: Callable[[], float] = field(default=random.random, repr=False)  # in [0, 1)

    def start(self, now: float) -> list[PunchAction]:
        self._deadline = now + self.config.timeout
        return self._fire(now)

    @property
    def wake_at(self) -> float | None:
        """When :meth:`timer` must be called next (None once finished)."""
        if self.done:
            return None
        times = [self._deadline]
        if self._current is not None:
            times.append(self._recheck or self._current_started + self._interval)
        elif self._next_fire is not None:
            times.append(self._next_fire)
        return min(times)

    def timer(self, now: float, *, handshaking: bool = False) -> list[PunchAction]:
        """Time has passed; ``handshaking`` says the current socket is mid-handshake."""
        if self.done:
            return []
        if now >= self._deadline:
            return self._give_up()
        if self._current is not None:
            if now < (self._recheck or self._current_started + self._interval):
                return []
            if self._suspect:
                self._suspect = False
                self._recheck = None
                if handshaking:  # no ACK in clip_grace: our SYN-ACK expired
                    self.outcomes[Failure.CLIPPED] += 1
                    return [Abandon(self._current, clipped=True), *self._fire(now)]
                if now < self._current_started + self._interval:
                    return []  # back to its own schedule
            overdue = now - (self._current_started + self._interval)
            if handshaking and overdue < self.config.handshake_limit:
                # The peer's SYN reached our socket: let the handshake finish.
                self._recheck = now + self.config.handshake_grace
                return []
            self.outcomes[Failure.SILENT] += 1
            old = self._current
            return [Abandon(old), *self._fire(now)]
        if self._next_fire is not None and now >= self._next_fire:
            return self._fire(now)
        return []

    def failed(self, attempt: int, how: Failure, now: float) -> list[PunchAction]:
        if self.done or attempt != self._current:
            return []
        self.outcomes[how] += 1
        self._current = None
        refused = how in (Failure.REFUSED, Failure.UNREACHABLE)
        first = self.config.first_shot and attempt == 1
        if refused and first and self.tactic is Tactic.ARM and self.config.arm_ttl:
            # Re-arm at once, with a low-TTL SYN the peer's NAT never sees to refuse
            # (see the module docstring: no moment without a socket in SYN_SENT).
            return [Abandon(attempt), *self._fire(now)]
        if refused and first and self.tactic is Tactic.CONNECT:
            self._next_fire = now + self.config.first_retry_delay
            return [Abandon(attempt)]
        jitter = self.config.retry_jitter * (self.rand() - 0.5)
        self._next_fire = now + self.config.retry_delay * (1 + jitter)
        return [Abandon(attempt)]

    def clipped(self, attempt: int, now: float) -> list[PunchAction]:
        """``attempt``'s socket was mid-handshake when the driver restored its TTL: the
        peer's SYN came around then, and our SYN-ACK may have left with the short TTL."""
        if self.done or attempt != self._current:
            return []
        if self._syn_ttl(attempt) != self.config.arm_ttl:
            return []  # a first shot's TTL reaches the peer: its SYN-ACK does too
        # If it did, the peer's socket will be gone by the kernel's retransmission (1 s):
        # unless the handshake completes within clip_grace, the attempt ends (the driver
        # resets a half-open socket, which clears our NAT's tracking) and ARM re-arms.
        self._suspect = True
        self._recheck = now + self.config.clip_grace
        return []

    def accepted(self, now: float) -> list[PunchAction]:
        """The listener on the punch port accepted the peer (a path without our NAT)."""
        if self.done:
            return []
        self.done = True
        actions: list[PunchAction] = []
        if self._current is not None:
            actions.append(Abandon(self._current))
            self._current = None
        return [*actions, Succeed(ACCEPTED)]

    def connected(self, attempt: int, now: float) -> list[PunchAction]:
        if self.done or attempt != self._current:
            return []
        self.done = True
        self._current = None
        return [Succeed(attempt)]

    # -------------------------------------------------------------------------

    @property
    def _interval(self) -> float:
        if self.tactic is Tactic.ARM:
            return self.config.rearm_interval
        return self.config.connect_interval

    def _fire(self, now: float) -> list[PunchAction]:
        self.attempts += 1
        self._current = self.attempts
        self._current_started = now
        self._next_fire = None
        self._recheck = None
        self._suspect = False
        return [StartAttempt(self.attempts, self._syn_ttl(self.attempts))]

    def _syn_ttl(self, attempt: int) -> int | None:
        """The TTL of ``attempt``'s first SYN (None: the system's)."""
        if self.config.first_shot and attempt == 1:
            return self.config.first_shot_ttl if self.tactic is Tactic.CONNECT else None
        return self.config.arm_ttl if self.tactic is Tactic.ARM and self.config.arm_ttl else None

    def _give_up(self) -> list[PunchAction]:
        self.done = True
        actions: list[PunchAction] = []
        if self._current is not None:
            actions.append(Abandon(self._current))
            self._current = None
        actions.append(GiveUp(PunchTimeout(self._explain(), Counter(self.outcomes))))
        return actions

    def _explain(self) -> str:
        o = self.outcomes
        head = (f"no connection to peer {self.peer} within {self.config.timeout:g} s "
                f"({self.attempts} attempts")
        if self.tactic is Tactic.CONNECT and (o[Failure.REFUSED] or o[Failure.UNREACHABLE]):
            kinds = []
            if o[Failure.REFUSED]:
                kinds.append(f"{o[Failure.REFUSED]} refused with RST")
            if o[Failure.UNREACHABLE]:
                kinds.append(f"{o[Failure.UNREACHABLE]} refused with ICMP")
            cause = (f", {', '.join(kinds)}): the peer's NAT rejected every SYN — has the peer "
                     "entered our address, and is it still running?")
        elif self.tactic is Tactic.ARM:
            cause = ("): the peer's SYN never arrived — has the peer entered our address? "
                     "If both did, one NAT is probably symmetric (a new public port per "
                     "destination), which hole punching cannot cross")
        else:
            cause = ("): every SYN went unanswered — has the peer entered our address? "
                     "If both did, one NAT is probably symmetric (a new public port per "
                     "destination), which hole punching cannot cross")
        hint = f"; {self.nat_hint}" if self.nat_hint else ""
        return head + cause + hint
