"""Which path two paired peers will take, and why, before the first SYN: pure, on data.

The rendezvous (when it plans) and each peer (when its ``fire`` arrives) hold
the same facts: both sides' NAT mappings as the rendezvous classified them
(``fire.mapping``), both sides' doctor reports when they sent one (the hello's
``nat``, the fire's ``peer_nat``), and the plan (a LAN stage? a relay stage?).
:func:`predict` turns :class:`PairFacts` into a :class:`Prediction`, so all three
say the same thing.

The prediction is **data-driven**: :data:`RULES` is an ordered tuple of
:class:`Rule` (a name, the path it predicts, a test and a one-sentence reason);
the first rule whose test holds wins. The rules follow the ladder's order
(:class:`~nopf_web.sessions.coordination_machine.CoordinationMachine` builds it at
the fire): the LAN stage, then the peers' own candidates (an IPv6 rung when both offered
global IPv6 addresses, then a mapped port that passes
:func:`~nopf_web.wire.rendezvous.mapped_unusable`), then the rendezvous' IPv4 punch
stages, then the relay. A new path kind is a new rule inserted where it belongs, with
whatever it needs in ``PairFacts.extra``; nothing else changes. The mapping a rule sees
(:meth:`SideFacts.kind`) is the rendezvous' own check when it made one, else
the doctor report's, else ``unknown`` (treated as endpoint-independent, as the
rendezvous' plans do, and the prediction is then not ``certain``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from nopf_web.roles import PeerRole
from nopf_web.wire.address import Endpoint
from nopf_web.wire.nat import NatSummary
from nopf_web.wire.rendezvous import (
    Candidate,
    Fire,
    Mapping as RendezvousMapping,
    mapped_unusable,
)

# The paths a prediction can name (the ladder's, coordination_machine.TUNNEL_PATHS) and
# "none": no path will open (a pair no punch can connect, no candidate, and no relay).
PATHS: Final = ("lan", "ipv6", "mapped", "public", "relay", "none")

_FROM_REPORT: Final[dict[str, RendezvousMapping]] = {
    "none": "none", "endpoint-independent": "stable", "address-dependent": "symmetric",
    "address-and-port-dependent": "symmetric"}
_FILTERING_WORDS: Final = {
    "drop": "drops unsolicited SYNs", "rst": "refuses unsolicited SYNs with a reset",
    "icmp": "refuses unsolicited SYNs with ICMP", "open": "lets unsolicited SYNs in"}


@dataclass(frozen=True)
class SideFacts:
    """One peer, as the rendezvous and the other peer see it."""

    name: str  # "sharer" or "joiner": how reasons name it
    mapping: RendezvousMapping = "unknown"  # the rendezvous' classification
    nat: NatSummary | None = None  # its doctor report, when it sent one
    over_ipv6: bool = False  # it reached the rendezvous over IPv6: no IPv4 punch for it

    @property
    def kind(self) -> RendezvousMapping:
        """The mapping rules decide on: the rendezvous' check, else the report's."""
        if self.mapping != "unknown":
            return self.mapping
        if self.nat is not None and self.nat.mapping is not None:
            return _FROM_REPORT[self.nat.mapping]
        return "unknown"

    @property
    def nat_kind(self) -> str:
        """One word for statistics: "none", "symmetric", "drop"/"rst"/"icmp"/"open", or
        "unknown" (see :attr:`NatSummary.kind`)."""
        if self.nat is not None and self.nat.kind != "unknown":
            return self.nat.kind
        return {"none": "none", "symmetric": "symmetric"}.get(self.kind, "unknown")


@dataclass(frozen=True)
class PairFacts:
    sharer: SideFacts
    joiner: SideFacts
    lan: bool = False  # the plan has a LAN stage (both behind one NAT)
    relay: bool = False  # the plan ends with the relay
    ipv6: bool = False  # both peers offered global IPv6 addresses (candidates)
    # The side ("sharer" or "joiner") whose mapped port the ladder uses: the sharer's when
    # both offered a usable one, as the ladder does (None: no usable mapped port).
    mapped: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)  # for later rules (candidates...)

    @property
    def sides(self) -> tuple[SideFacts, SideFacts]:
        return self.sharer, self.joiner

    def with_kind(self, kind: str) -> SideFacts | None:
        return next((s for s in self.sides if s.kind == kind), None)

    def other(self, side: SideFacts) -> SideFacts:
        return self.joiner if side is self.sharer else self.sharer


@dataclass(frozen=True)
class Prediction:
    path: str  # one of PATHS (or a later rule's)
    why: str  # one sentence
    rule: str  # the rule's name
    certain: bool = True  # False: a side's mapping was unknown (assumed endpoint-independent)

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "why": self.why, "rule": self.rule, "certain": self.certain}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Prediction:
        path, why, rule = obj.get("path"), obj.get("why"), obj.get("rule")
        if not all(isinstance(v, str) for v in (path, why, rule)):
            raise ValueError("a prediction needs path, why and rule strings")
        return cls(str(path), str(why), str(rule), bool(obj.get("certain", True)))


@dataclass(frozen=True)
class Rule:
    name: str
    path: str
    applies: Callable[[PairFacts], bool]
    why: Callable[[PairFacts], str]
    # Its test does not rest on a NAT mapping: certain even when a mapping is unknown.
    mapping_free: bool = False


def _symmetric_facing_nat(f: PairFacts) -> bool:
    kinds = (f.sharer.kind, f.joiner.kind)
    return "symmetric" in kinds and "none" not in kinds


def _why_lan(f: PairFacts) -> str:
    return ("Both peers are behind the same NAT (one public address), so they connect "
            "over their LAN.")


def _no_ipv4(f: PairFacts) -> bool:
    return any(s.over_ipv6 for s in f.sides)


def _ipv6_only_words(f: PairFacts) -> str:
    v6 = [s.name for s in f.sides if s.over_ipv6]
    who = "Both peers" if len(v6) == 2 else f"The {v6[0]}"
    return f"{who} reached the rendezvous over IPv6 only, so no IPv4 punch is planned"


def _why_ipv6_only(f: PairFacts) -> str:
    return (f"{_ipv6_only_words(f)}; both peers have global IPv6 addresses, so they "
            "connect directly over IPv6.")


def _why_ipv6(f: PairFacts) -> str:
    return ("Both peers offered global IPv6 addresses, tried before any IPv4 punch, and "
            "their simultaneous open crosses both firewalls, so they connect directly over "
            "IPv6.")


def _mapped_usable(f: PairFacts) -> bool:
    # An IPv6-only peer cannot dial an IPv4 mapped port (nor have one the rendezvous saw).
    return f.mapped is not None and not _no_ipv4(f)


def _why_mapped(f: PairFacts) -> str:
    owner = f.sharer if f.mapped == "sharer" else f.joiner
    return (f"The {owner.name}'s gateway mapped a port on its public address (the one the "
            f"rendezvous sees), so the {f.other(owner).name} connects to it directly, "
            "whatever its own NAT.")


def _why_ipv6_only_relayed(f: PairFacts) -> str:
    return (f"{_ipv6_only_words(f)} and the peers share no IPv6 path, so the relay "
            "carries the tunnel.")


def _why_ipv6_only_none(f: PairFacts) -> str:
    return (f"{_ipv6_only_words(f)}, the peers share no IPv6 path, and the rendezvous "
            "offers no relay.")


def _why_open(f: PairFacts) -> str:
    side = f.with_kind("none")
    assert side is not None
    return (f"The {side.name} has no NAT, so the {f.other(side).name}'s SYN reaches it "
            "directly on the public path.")


def _symmetric_words(f: PairFacts) -> str:
    sym = f.with_kind("symmetric")
    assert sym is not None
    if f.other(sym).kind == "symmetric":
        return "Both NATs are symmetric (a new public port per destination)"
    return (f"The {sym.name}'s NAT is symmetric (a new public port per destination) and "
            f"the {f.other(sym).name} is behind a NAT too")


def _why_relay(f: PairFacts) -> str:
    return f"{_symmetric_words(f)}: no punch can meet, so the relay carries the tunnel."


def _why_none(f: PairFacts) -> str:
    return (f"{_symmetric_words(f)}: no punch can meet, and the rendezvous offers no "
            "relay.")


def _why_public(f: PairFacts) -> str:
    unknown = [s.name for s in f.sides if s.kind == "unknown"]
    filters = [f"the {s.name}'s {_FILTERING_WORDS[s.nat.filtering]}" for s in f.sides
               if s.nat is not None and s.nat.filtering in _FILTERING_WORDS
               and s.nat.filtering != "open"]
    if unknown:
        head = (f"The {' and '.join(unknown)}'s NAT mapping is unknown (no doctor report); "
                "assuming it keeps one public port per connection")
    else:
        head = "Both NATs keep one public port per connection (endpoint-independent)"
    tail = f" ({', '.join(filters)})" if filters else ""
    return f"{head}, so the timed SYNs cross and open both NATs{tail}."


RULES: tuple[Rule, ...] = (
    Rule("same-nat", "lan", lambda f: f.lan, _why_lan, mapping_free=True),
    Rule("ipv6-only", "ipv6", lambda f: _no_ipv4(f) and f.ipv6, _why_ipv6_only,
         mapping_free=True),
    Rule("both-ipv6", "ipv6", lambda f: f.ipv6, _why_ipv6, mapping_free=True),
    Rule("mapped-port", "mapped", _mapped_usable, _why_mapped, mapping_free=True),
    Rule("ipv6-only-relayed", "relay", lambda f: _no_ipv4(f) and f.relay,
         _why_ipv6_only_relayed, mapping_free=True),
    Rule("ipv6-only-unrelayed", "none", _no_ipv4, _why_ipv6_only_none, mapping_free=True),
    Rule("no-nat", "public", lambda f: f.with_kind("none") is not None, _why_open),
    Rule("symmetric-relayed", "relay", lambda f: _symmetric_facing_nat(f) and f.relay,
         _why_relay),
    Rule("symmetric-unrelayed", "none", _symmetric_facing_nat, _why_none),
    Rule("punchable", "public", lambda f: True, _why_public),
)


def predict(facts: PairFacts, rules: tuple[Rule, ...] = RULES) -> Prediction:
    """The first rule that applies (the last of :data:`RULES` always does)."""
    certain = all(s.kind != "unknown" for s in facts.sides)
    for rule in rules:
        if rule.applies(facts):
            return Prediction(rule.path, rule.why(facts), rule.name,
                              certain or rule.mapping_free)
    raise ValueError("no rule applies: the rules must end with a catch-all")


def fire_facts(fire: Fire, role: PeerRole, own: NatSummary | None,
               own_candidates: Sequence[Candidate] | None = None) -> PairFacts:
    """The facts as the peer of ``role`` holds them once its fire came (``own``: the
    NAT report its hello carried, ``own_candidates`` the candidates it offered); the
    rendezvous builds the same from the sharer's fire."""
    ours, theirs = fire.mapping or ("unknown", "unknown")
    me = SideFacts("sharer" if role == "server" else "joiner", ours, own,
                   ":" in fire.public.host)
    peer = SideFacts("joiner" if role == "server" else "sharer", theirs, fire.peer_nat,
                     ":" in fire.peer_public.host)
    sharer, joiner = (me, peer) if role == "server" else (peer, me)
    ipv6 = all(any(c.path == "ipv6" for c in cands or ())
               for cands in (own_candidates, fire.peer_candidates))
    # A mapped port counts under the one rule, on its owner's address as the rendezvous
    # saw it; and only when both hellos had candidates (else the fire has none for us).
    owners = {me.name: fire.peer_candidates is not None
              and usable_mapped(own_candidates, fire.public) is not None,
              peer.name: usable_mapped(fire.peer_candidates, fire.peer_public) is not None}
    mapped = next((name for name in ("sharer", "joiner") if owners[name]), None)
    return PairFacts(sharer, joiner, lan=any(s.path == "lan" for s in fire.plan),
                     relay=fire.relay is not None, ipv6=ipv6, mapped=mapped)


def usable_mapped(candidates: Sequence[Candidate] | None, public: Endpoint) -> Endpoint | None:
    """The first mapped port in ``candidates`` that passes :func:`mapped_unusable` on
    ``public``, its owner's address as the rendezvous saw it (the ladder's and the
    prediction's one reading of it); None if none does."""
    return next((c.addr for c in candidates or () if c.path == "mapped"
                 and mapped_unusable(c.addr.host, public.host) is None), None)


def nat_pair(facts: PairFacts) -> str:
    """The pair's NAT kinds for statistics: "rst × symmetric" (sharer first)."""
    return f"{facts.sharer.nat_kind} × {facts.joiner.nat_kind}"
