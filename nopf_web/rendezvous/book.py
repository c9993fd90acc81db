"""The rendezvous' pairing logic, without I/O: nameplates, claims and punch plans.

:class:`NameplateBook` hands out short numeric nameplates, pairs a claim with
the waiting sharer, makes codes single-use and expiring, and limits failed
claims per source address (guessing a live nameplate is the only thing the
rendezvous can see of an attack: the words never reach it). Every method takes
the time as ``now`` (the rendezvous' machine passes its one clock); without it
the book asks its ``clock``. :class:`PairingBook` is the interface the
rendezvous' machine uses, so another store (shared between nodes) can replace
this in-memory one.

:func:`make_plans` decides, from what the rendezvous observed of both peers,
which addresses each one punches to, in which role, and for how long, and
whether (and for how long) the plan ends with the relay.
"""

from __future__ import annotations

import secrets
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, Literal, Protocol, TypeVar

from nopf_web.errors import NopfError
from nopf_web.wire.address import Endpoint
from nopf_web.wire.rendezvous import MAX_NAMEPLATE, Mapping, Stage, TacticName

T = TypeVar("T")
Owner = TypeVar("Owner")
Tombstone = Literal["used", "expired", "left"]


@dataclass(frozen=True)
class PairingLimits:
    code_lifetime: float = 600.0  # a code not claimed by then expires
    max_failed_claims: int = 10  # per source address, within failed_claim_window
    failed_claim_window: float = 600.0
    tombstone_lifetime: float = 600.0  # used/expired nameplates answer precisely this long
    max_open_codes: int = 100_000
    symmetric_budget: float = 4.0  # punch time for a pair that is very likely to fail
    # A plan with a relay stage punches for min(budget, base + rtts x the peers' RTT)
    # first (a punch that works is up in ~1 RTT after the fire; the seed sequence's
    # later attempts rarely win after 3 s), then relays for the rest, at least
    # relay_min_budget (connect to the relay, wait for the peer: a few RTTs).
    relay_punch_base: float = 3.0
    relay_punch_rtts: float = 4.0
    relay_min_budget: float = 5.0

    def __post_init__(self) -> None:
        if self.code_lifetime <= 0 or self.failed_claim_window <= 0:
            raise ValueError("pairing lifetimes must be positive")
        if self.max_failed_claims < 1:
            raise ValueError("max_failed_claims must be at least 1")


class ClaimRefused(NopfError):
    """A claim the rendezvous refuses; ``code`` is the wire error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class _Open(Generic[T]):
    owner: T
    expires_at: float


class PairingBook(Protocol[Owner]):
    """What the rendezvous needs of its nameplates: allocation, single-use claims,
    expiry and the per-source limit on failed claims. ``Owner`` identifies a waiting
    sharer (owners compare by equality, so use an id that is never reused)."""

    def allocate(self, owner: Owner, *, now: float) -> tuple[int, float]: ...
    def release(self, nameplate: int, owner: Owner, *, now: float) -> None: ...
    def sweep(self, *, now: float) -> list[tuple[int, Owner]]: ...
    def claim(self, nameplate: int, source: str, *, now: float) -> Owner: ...
    def peek(self, nameplate: int, *, now: float) -> Owner | None: ...
    def is_open(self, nameplate: int) -> bool: ...


@dataclass
class NameplateBook(Generic[T]):
    """The in-memory :class:`PairingBook`."""

    limits: PairingLimits = field(default_factory=PairingLimits)
    clock: Callable[[], float] | None = None  # asked when a method gets no ``now``
    _open: dict[int, _Open[T]] = field(default_factory=dict)
    _tombstones: dict[int, tuple[Tombstone, float]] = field(default_factory=dict)
    _failures: dict[str, deque[float]] = field(default_factory=dict)

    def _time(self, now: float | None) -> float:
        if now is not None:
            return now
        if self.clock is None:
            raise TypeError("NameplateBook needs `now` or a clock")
        return self.clock()

    # -- sharer side -----------------------------------------------------------

    def allocate(self, owner: T, *, now: float | None = None) -> tuple[int, float]:
        """A fresh nameplate for ``owner``, and when it expires (clock time)."""
        now = self._time(now)
        self.sweep(now=now)
        taken = len(self._open) + len(self._tombstones)
        if len(self._open) >= self.limits.max_open_codes:
            raise ClaimRefused("busy", "the rendezvous has too many open codes; try again later")
        # The smallest number of digits that keeps the space at most half full:
        # short codes while it is quiet, and a random pick is free in <= 2 tries.
        space = 9
        while space < 2 * (taken + 1) and space < MAX_NAMEPLATE:
            space = space * 10 + 9
        for _ in range(64):
            nameplate = 1 + secrets.randbelow(space)
            if nameplate not in self._open and nameplate not in self._tombstones:
                break
        else:  # only when the space is the whole range and nearly full
            free = (n for n in range(1, MAX_NAMEPLATE + 1)
                    if n not in self._open and n not in self._tombstones)
            nameplate = next(free, 0)
            if not nameplate:
                raise ClaimRefused("busy", "the rendezvous has no free codes; try again later")
        expires_at = now + self.limits.code_lifetime
        self._open[nameplate] = _Open(owner, expires_at)
        return nameplate, expires_at

    def release(self, nameplate: int, owner: T, *, now: float | None = None) -> None:
        """The sharer left before anyone claimed its nameplate."""
        entry = self._open.get(nameplate)
        if entry is not None and entry.owner == owner:
            del self._open[nameplate]
            self._bury(nameplate, "left", self._time(now))

    def sweep(self, *, now: float | None = None) -> list[tuple[int, T]]:
        """Expire what is due; return the expired nameplates and their owners."""
        now = self._time(now)
        expired = [(n, e.owner) for n, e in self._open.items() if e.expires_at <= now]
        for n, _ in expired:
            del self._open[n]
            self._bury(n, "expired", now)
        for n in [n for n, (_, until) in self._tombstones.items() if until <= now]:
            del self._tombstones[n]
        horizon = now - self.limits.failed_claim_window
        for source in list(self._failures):
            self._prune(source, horizon)
        return expired

    # -- joiner side -----------------------------------------------------------

    def claim(self, nameplate: int, source: str, *, now: float | None = None) -> T:
        """Pair a joiner from ``source`` with the sharer of ``nameplate`` (single use)."""
        now = self._time(now)
        self.sweep(now=now)
        failures = self._failures.get(source)
        if failures is not None and len(failures) >= self.limits.max_failed_claims:
            wait = failures[0] + self.limits.failed_claim_window - now
            raise ClaimRefused(
                "too_many_guesses",
                f"too many failed pairing attempts from {source} ({len(failures)} within "
                f"{describe_duration(self.limits.failed_claim_window)}): wait "
                f"{describe_duration(wait)} and check the code")
        entry = self._open.pop(nameplate, None)
        if entry is not None:
            self._bury(nameplate, "used", now)
            return entry.owner
        self._failures.setdefault(source, deque()).append(now)
        why = self._tombstones.get(nameplate)
        if why is None:
            raise ClaimRefused("unknown_code", f"no open pairing code starts with {nameplate} "
                               "(check the number, or ask for a new code)")
        if why[0] == "used":
            raise ClaimRefused("used", f"pairing code {nameplate}-… was already used (codes "
                               "work once): ask for a new code")
        if why[0] == "expired":
            lifetime = describe_duration(self.limits.code_lifetime)
            raise ClaimRefused("expired", f"pairing code {nameplate}-… expired (codes last "
                               f"{lifetime}): ask for a new code")
        raise ClaimRefused("unknown_code", f"pairing code {nameplate}-… is no longer open (the "
                           "sharer stopped waiting): ask for a new code")

    def is_open(self, nameplate: int) -> bool:
        return nameplate in self._open

    def peek(self, nameplate: int, *, now: float | None = None) -> T | None:
        """The sharer waiting on ``nameplate``, without claiming it (None: not open)."""
        self.sweep(now=self._time(now))
        entry = self._open.get(nameplate)
        return None if entry is None else entry.owner

    # -------------------------------------------------------------------------

    def _bury(self, nameplate: int, why: Tombstone, now: float) -> None:
        self._tombstones[nameplate] = (why, now + self.limits.tombstone_lifetime)

    def _prune(self, source: str, horizon: float) -> None:
        times = self._failures[source]
        while times and times[0] <= horizon:
            times.popleft()
        if not times:
            del self._failures[source]


def describe_duration(seconds: float) -> str:
    """``42 s`` or ``10 min``, for one-line messages."""
    seconds = max(0.0, seconds)
    if seconds >= 90:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.0f} s"


# Plans ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PeerInfo:
    """What the rendezvous knows of one peer when it pairs them."""

    public: Endpoint  # as observed on the coordination connection
    lan: tuple[Endpoint, ...]  # as the peer reports them
    probe: Endpoint | None  # a plain discovery from the same port, just before
    punch_timeout: float
    rtt: float  # seconds, rendezvous <-> peer

    @property
    def over_ipv6(self) -> bool:
        """It reached the rendezvous over IPv6: no IPv4 mapping was seen, so no IPv4
        punch can be planned for it (its IPv6 paths are its own candidates)."""
        return ":" in self.public.host

    @property
    def mapping(self) -> Mapping:
        if self.over_ipv6:
            return "unknown"  # of its IPv4 NAT, if any: never seen
        if self.public in self.lan:
            return "none"
        if self.probe is None:
            return "unknown"
        return "stable" if self.probe == self.public else "symmetric"

    def describe_symmetric(self) -> str:
        assert self.probe is not None
        return (f"public ports {self.probe.port} then {self.public.port} from one local "
                "port")


class SymmetricPair(NopfError):
    """Both peers are behind symmetric NATs: no punch can connect them."""


@dataclass(frozen=True)
class Plans:
    sharer: tuple[Stage, ...]
    joiner: tuple[Stage, ...]
    sharer_note: str | None = None
    joiner_note: str | None = None
    relay_budget: float | None = None  # both plans end with a relay stage this long


def hopeless(a: Mapping, b: Mapping) -> bool:
    """A symmetric NAT faces another NAT (or an unchecked mapping): no punch can work
    (the rule of :attr:`nopf_web.wire.rendezvous.Fire.hopeless`)."""
    return "symmetric" in (a, b) and "none" not in (a, b)


def make_plans(sharer: PeerInfo, joiner: PeerInfo, limits: PairingLimits, *,
               relay: bool = False, direct_only: bool = False,
               ipv6_pair: bool = False, mapped_pair: bool = False) -> Plans:
    """Which addresses each side punches to, as whom, and for how long; and whether
    the plans end with the relay (``relay``: both peers can use one, and the
    rendezvous relays).

    Without the relay (and without ``direct_only``), the plans of a rendezvous that
    has none:

    - Both symmetric: refuse at once (:class:`SymmetricPair`), unless they share
      the NAT: then the LAN only.
    - One symmetric: the other side arms (its listener accepts the symmetric
      side's unpredictable port when it has no NAT); against another NAT this
      almost surely fails, so the budget is short and the cause is named.
    - Same public IP behind a NAT: the LAN addresses first, then the public
      ones (works if the NAT hairpins).
    - Otherwise: the public addresses, the sharer arming.

    With the relay: a hopeless pair (a symmetric NAT facing another NAT) relays at
    once (after the LAN stage if both share the NAT); any other pair punches as
    above for at most ``relay_punch_base + relay_punch_rtts x RTT``, then relays for
    the rest of the budget (at least ``relay_min_budget``).

    ``direct_only`` (a resume trying to leave the relay): the plans without the
    relay, but a hopeless pair not behind one NAT is refused at once.

    A peer that reached the rendezvous over IPv6 (:attr:`PeerInfo.over_ipv6`) gets no
    IPv4 stage at all (:func:`_without_ipv4`); ``ipv6_pair``: both peers offered
    global IPv6 addresses, which their own candidate rung tries first. With such a
    rung, or ``mapped_pair`` (a peer offered a mapped port the other can reach), a pair
    no punch can connect is not refused: its plan is empty (the candidates only).
    """
    ms, mj = sharer.mapping, joiner.mapping
    budget = min(sharer.punch_timeout, joiner.punch_timeout)
    if sharer.over_ipv6 or joiner.over_ipv6:
        return _without_ipv4(sharer, joiner, limits, budget, relay=relay and not direct_only,
                             ipv6_pair=ipv6_pair)
    same_nat = bool(sharer.public.host == joiner.public.host and "none" not in (ms, mj)
                    and sharer.lan and joiner.lan)
    try:
        if direct_only and hopeless(ms, mj) and not same_nat:
            sym = sharer if ms == "symmetric" else joiner
            raise SymmetricPair(
                f"the {'sharer' if sym is sharer else 'connector'}'s NAT is symmetric "
                f"({sym.describe_symmetric()}) and the other peer is behind a NAT too: hole "
                "punching cannot connect them")
        if not relay or direct_only:
            return _punch_plans(sharer, joiner, limits, budget, same_nat)
    except SymmetricPair as exc:
        if not (ipv6_pair or mapped_pair):
            raise
        note = f"{exc}: only their own candidates (IPv6, a mapped port) can"
        return Plans((), (), note, note)
    if hopeless(ms, mj):
        sym = sharer if ms == "symmetric" else joiner
        why = (f"the {'sharer' if sym is sharer else 'connector'}'s NAT is symmetric "
               f"({sym.describe_symmetric()}) and hole punching cannot connect this pair: "
               "relayed")
        if not same_nat:
            return Plans((), (), why, why, max(limits.relay_min_budget, budget))
        # Behind one NAT: its LAN may connect them (as without relay), in a third of
        # the time; then the relay.
        lan = max(0.5, min(5.0, budget / 3))
        return Plans((Stage("lan", joiner.lan[0], "arm", lan),),
                     (Stage("lan", sharer.lan[0], "connect", lan),), why, why,
                     max(limits.relay_min_budget, budget - lan))
    rtt = (sharer.rtt + joiner.rtt) / 2  # peer <-> peer, estimated as the fire's rtt_ms
    punch = min(budget, limits.relay_punch_base + limits.relay_punch_rtts * rtt)
    plans = _punch_plans(sharer, joiner, limits, punch, same_nat)
    return Plans(plans.sharer, plans.joiner, plans.sharer_note, plans.joiner_note,
                 max(limits.relay_min_budget, budget - punch))


def _without_ipv4(sharer: PeerInfo, joiner: PeerInfo, limits: PairingLimits, budget: float,
                  *, relay: bool, ipv6_pair: bool) -> Plans:
    """The plans when a peer has no IPv4 mapping (it came over IPv6): no LAN or public
    stage (both are IPv4). The ladder is the peers' IPv6 candidates (their own rung,
    when both offered some), then the relay; without the relay, IPv6 alone, or
    nothing (:class:`SymmetricPair`)."""
    v6 = [name for name, p in (("sharer", sharer), ("connector", joiner)) if p.over_ipv6]
    who = "both peers" if len(v6) == 2 else f"the {v6[0]}"
    why = f"{who} reached the rendezvous over IPv6 only, so no IPv4 punch can be planned"
    if relay:
        note = f"{why}: {'IPv6, then ' if ipv6_pair else ''}relayed"
        return Plans((), (), note, note, max(limits.relay_min_budget, budget))
    if ipv6_pair:
        note = f"{why}: only IPv6 can connect them"
        return Plans((), (), note, note)
    raise SymmetricPair(f"{why}, and the peers do not both offer global IPv6 addresses: no "
                        "direct path can connect them, and no relay is planned")


def _symmetric_notes(sharer: PeerInfo, joiner: PeerInfo) -> tuple[str, str]:
    """(sharer's note, joiner's note) when one of them is symmetric."""
    sym = sharer if sharer.mapping == "symmetric" else joiner
    mine = (f"your NAT is symmetric ({sym.describe_symmetric()}), so the peer cannot aim at "
            "the port we punch from; only a peer without NAT can accept us")
    theirs = (f"the peer's NAT is symmetric ({sym.describe_symmetric()}), so we cannot aim "
              "at its port; only a peer without NAT (or a full-cone NAT) can accept it")
    return (mine, theirs) if sym is sharer else (theirs, mine)


def _punch_plans(sharer: PeerInfo, joiner: PeerInfo, limits: PairingLimits, budget: float,
                 same_nat: bool) -> Plans:
    """The punch stages within ``budget`` (the plans of a rendezvous without relay)."""
    ms, mj = sharer.mapping, joiner.mapping
    if ms == "symmetric" and mj == "symmetric" and same_nat:
        # Behind one symmetric NAT: only the LAN can work (no hairpin to aim at).
        return Plans((Stage("lan", joiner.lan[0], "arm", budget),),
                     (Stage("lan", sharer.lan[0], "connect", budget),),
                     "the LAN address did not answer, and the shared NAT is symmetric",
                     "the LAN address did not answer, and the shared NAT is symmetric")
    if ms == "symmetric" and mj == "symmetric":
        raise SymmetricPair(
            "both peers are behind symmetric NATs (a new public port per destination: "
            f"sharer {sharer.describe_symmetric()}, connector {joiner.describe_symmetric()}): "
            "hole punching cannot connect them")
    sharer_note = joiner_note = None
    sharer_tactic: TacticName = "arm"
    joiner_tactic: TacticName = "connect"
    if "symmetric" in (ms, mj):
        sym, other = (sharer, joiner) if ms == "symmetric" else (joiner, sharer)
        if sym is sharer:
            sharer_tactic, joiner_tactic = "connect", "arm"
        if other.mapping != "none":
            budget = min(budget, limits.symmetric_budget)
        sharer_note, joiner_note = _symmetric_notes(sharer, joiner)
    stages_s: list[Stage] = []
    stages_j: list[Stage] = []
    if same_nat:
        # A LAN connect works in one round trip or not at all (two LANs behind one
        # carrier NAT): a third of the time, leaving the rest for a hairpin.
        lan_budget = max(0.5, min(5.0, budget / 3))
        stages_s.append(Stage("lan", joiner.lan[0], "arm", lan_budget))
        stages_j.append(Stage("lan", sharer.lan[0], "connect", lan_budget))
        budget = max(0.5, budget - lan_budget)
        hairpin = ("both peers have the same public IP: the LAN addresses did not answer, "
                   "and the NAT does not hairpin")
        sharer_note = sharer_note or hairpin
        joiner_note = joiner_note or hairpin
    stages_s.append(Stage("public", joiner.public, sharer_tactic, budget))
    stages_j.append(Stage("public", sharer.public, joiner_tactic, budget))
    return Plans(tuple(stages_s), tuple(stages_j), sharer_note, joiner_note)
