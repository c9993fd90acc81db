"""The path predictor on data: every pair of lab NAT kinds, what the rendezvous' own check
overrides, unknown mappings, the fire's view from both sides, and new rules."""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

import nopf_web.prediction as prediction_module
from nopf_web.prediction import (
    PATHS,
    RULES,
    PairFacts,
    Prediction,
    Rule,
    SideFacts,
    fire_facts,
    nat_pair,
    predict,
)
from nopf_web.wire.address import Endpoint
from nopf_web.wire.nat import NatSummary
from nopf_web.wire.rendezvous import Candidate, Fire, RelayStage, Stage

# The lab's NAT kinds as the doctor reports them (docs/doctor.md, "Measured").
REPORTS = {
    "none": NatSummary("none", "open", True, (), False, False),
    "drop": NatSummary("endpoint-independent", "drop", False, (), None, False),
    "rst": NatSummary("endpoint-independent", "rst", False, (), None, False),
    "icmp": NatSummary("endpoint-independent", "icmp", False, (), None, False),
    "symmetric": NatSummary("address-and-port-dependent", "drop", False, (), None, False),
}
# How the rendezvous classifies each (the sharer checks its mapping; the joiner does not).
CHECKED = {"none": "none", "drop": "stable", "rst": "stable", "icmp": "stable",
           "symmetric": "symmetric"}


def lab_expected(sharer: str, joiner: str, same: bool) -> str:
    """What the ladder does in the lab (bench.scn_matrix.expected_path, plus no-NAT sites):
    the LAN behind one NAT, a punch when a side has no NAT, the relay when a symmetric
    NAT faces another NAT, else a punch."""
    if same and "none" not in (sharer, joiner):
        return "lan"
    if "none" in (sharer, joiner):
        return "public"
    return "relay" if "symmetric" in (sharer, joiner) else "public"


def facts(sharer: str, joiner: str, same: bool = False, relay: bool = True,
          reports: bool = True, ipv6: bool = False, mapped: str | None = None) -> PairFacts:
    lan = same and "none" not in (sharer, joiner)
    return PairFacts(
        SideFacts("sharer", CHECKED[sharer], REPORTS[sharer] if reports else None),  # type: ignore[arg-type]
        SideFacts("joiner", "unknown", REPORTS[joiner] if reports else None),
        lan=lan, relay=relay, ipv6=ipv6, mapped=mapped)


@pytest.mark.parametrize(("sharer", "joiner"), list(itertools.product(REPORTS, repeat=2)))
def test_every_pair_of_lab_nat_kinds_is_predicted_as_the_ladder_goes(
        sharer: str, joiner: str) -> None:
    for same in (False, True):
        if same and sharer != joiner:
            continue
        p = predict(facts(sharer, joiner, same))
        assert p.path == lab_expected(sharer, joiner, same), (sharer, joiner, same, p)
        assert p.certain
        assert p.why.endswith(".") and "\n" not in p.why and len(p.why) < 250


@pytest.mark.parametrize(("sharer", "joiner"), list(itertools.product(REPORTS, repeat=2)))
def test_candidates_come_before_every_ipv4_punch_as_on_the_ladder(
        sharer: str, joiner: str) -> None:
    # The ladder: the LAN stage, the IPv6 rung, the mapped rung, then the IPv4 punch.
    for relay in (True, False):
        p = predict(facts(sharer, joiner, relay=relay, ipv6=True, mapped="sharer"))
        assert (p.path, p.rule, p.certain) == ("ipv6", "both-ipv6", True)
        for owner in ("sharer", "joiner"):
            p = predict(facts(sharer, joiner, relay=relay, mapped=owner))
            assert (p.path, p.rule, p.certain) == ("mapped", "mapped-port", True)
            assert p.why.startswith(f"The {owner}'s gateway mapped a port")
        if sharer == joiner and sharer != "none":  # behind one NAT: the LAN stage first
            assert predict(facts(sharer, joiner, True, ipv6=True, mapped="joiner")).path == "lan"


SIDE_FACTS = st.builds(
    SideFacts, st.sampled_from(["sharer"]),
    st.sampled_from(["none", "stable", "symmetric", "unknown"]),
    st.one_of(st.none(), st.sampled_from(list(REPORTS.values()))), st.booleans())


@given(SIDE_FACTS, SIDE_FACTS, st.booleans(), st.booleans(), st.booleans(),
       st.sampled_from([None, "sharer", "joiner"]))
def test_candidates_only_put_a_direct_rung_in_front(
        sharer: SideFacts, joiner: SideFacts, lan: bool, relay: bool, ipv6: bool,
        mapped: str | None) -> None:
    joiner = SideFacts("joiner", joiner.mapping, joiner.nat, joiner.over_ipv6)
    f = PairFacts(sharer, joiner, lan=lan, relay=relay, ipv6=ipv6, mapped=mapped)
    without = predict(PairFacts(sharer, joiner, lan=lan, relay=relay))
    p = predict(f)
    assert p.why.endswith(".") and "\n" not in p.why and len(p.why) < 250
    if lan:
        assert p == without
    elif ipv6:
        assert p.path == "ipv6" and p.certain
    elif mapped is not None and not (sharer.over_ipv6 or joiner.over_ipv6):
        assert p.path == "mapped" and p.certain
    else:  # an IPv6-only peer cannot dial an IPv4 mapped port: as without candidates
        assert p == without


def test_the_reasons_say_which_side_and_what() -> None:
    assert predict(facts("rst", "symmetric")).why.startswith(
        "The joiner's NAT is symmetric (a new public port per destination) and the sharer "
        "is behind a NAT too")
    assert "relay carries the tunnel" in predict(facts("symmetric", "drop")).why
    assert predict(facts("symmetric", "symmetric")).why.startswith("Both NATs are symmetric")
    assert predict(facts("none", "symmetric")).why == (
        "The sharer has no NAT, so the joiner's SYN reaches it directly on the public path.")
    public = predict(facts("icmp", "rst")).why
    assert "endpoint-independent" in public
    assert "the sharer's refuses unsolicited SYNs with ICMP" in public
    assert "the joiner's refuses unsolicited SYNs with a reset" in public
    assert "over their LAN" in predict(facts("symmetric", "symmetric", same=True)).why


def test_without_a_relay_a_symmetric_nat_facing_a_nat_is_predicted_to_fail() -> None:
    p = predict(facts("symmetric", "rst", relay=False))
    assert (p.path, p.rule) == ("none", "symmetric-unrelayed")
    assert "offers no relay" in p.why


def test_without_reports_an_unchecked_joiner_is_assumed_to_keep_its_port() -> None:
    p = predict(facts("rst", "symmetric", reports=False))
    assert (p.path, p.certain) == ("public", False)
    assert "joiner's NAT mapping is unknown (no doctor report)" in p.why
    # The sharer's own check still counts without its report.
    assert predict(facts("symmetric", "rst", reports=False)).path == "relay"


def test_the_rendezvous_check_overrides_a_stale_report() -> None:
    stale = SideFacts("sharer", "symmetric", REPORTS["drop"])
    assert stale.kind == "symmetric"
    assert SideFacts("joiner", "unknown", REPORTS["symmetric"]).kind == "symmetric"
    assert SideFacts("joiner", "unknown", NatSummary()).kind == "unknown"


def test_nat_pair_names_the_kinds_sharer_first() -> None:
    assert nat_pair(facts("rst", "symmetric")) == "rst × symmetric"
    assert nat_pair(facts("rst", "symmetric", reports=False)) == "unknown × unknown"
    assert SideFacts("sharer", "symmetric").nat_kind == "symmetric"


PUB_A, PUB_B = Endpoint("203.0.113.2", 40001), Endpoint("192.0.2.2", 50000)
V6_A, V6_B = Endpoint("2001:db8:a::2", 41000), Endpoint("2001:db8:b::2", 42000)


def test_both_peers_and_the_rendezvous_predict_the_same_from_their_fires() -> None:
    relay = RelayStage(Endpoint("198.51.100.2", 3012), 10.0, b"t" * 16)
    stage_s = Stage("public", PUB_B, "arm", 3.2)
    stage_j = Stage("public", PUB_A, "connect", 3.2)
    # A checked stable sharer, an unchecked symmetric joiner that sent its report.
    to_sharer = Fire(PUB_A, PUB_B, (stage_s,), 40.0, None, None, ("stable", "unknown"), relay,
                     REPORTS["symmetric"])
    to_joiner = Fire(PUB_B, PUB_A, (stage_j,), 40.0, None, None, ("unknown", "stable"), relay,
                     REPORTS["rst"])
    sharer_view = predict(fire_facts(to_sharer, "server", REPORTS["rst"]))
    joiner_view = predict(fire_facts(to_joiner, "client", REPORTS["symmetric"]))
    assert sharer_view == joiner_view
    assert sharer_view.path == "relay"
    lan = Fire(PUB_A, PUB_A, (Stage("lan", Endpoint("10.0.1.3", 1), "arm", 1.0), stage_s),
               1.0, mapping=("stable", "unknown"))
    assert fire_facts(lan, "server", None).lan
    assert predict(fire_facts(lan, "server", None)).path == "lan"


def mapped(host: str, port: int = 45000) -> Candidate:
    return Candidate("mapped", Endpoint(host, port))


def test_a_mapped_port_counts_under_the_one_rule_from_every_view() -> None:
    relay = RelayStage(Endpoint("198.51.100.2", 3012), 10.0, b"t" * 16)
    v6_s, v6_j = Candidate("ipv6", V6_A), Candidate("ipv6", V6_B)

    def views(sharer: tuple[Candidate, ...], joiner: tuple[Candidate, ...] | None,
              mapping: tuple[str, str] = ("stable", "symmetric")) -> set[Prediction]:
        """The sharer's, the joiner's and the rendezvous' predictions (the rendezvous
        makes the sharer's fire, with ``peer_candidates`` None unless both hellos had
        them): they must be one."""
        both = joiner is not None
        to_s = Fire(PUB_A, PUB_B, (), 40.0, None, None, mapping, relay,  # type: ignore[arg-type]
                    REPORTS["symmetric"], peer_candidates=joiner if both else None)
        to_j = Fire(PUB_B, PUB_A, (), 40.0, None, None, mapping[::-1], relay,  # type: ignore[arg-type]
                    REPORTS["drop"], peer_candidates=sharer if both else None)
        return {predict(fire_facts(to_s, "server", REPORTS["drop"], sharer)),
                predict(fire_facts(to_j, "client", REPORTS["symmetric"], joiner or ()))}

    [p] = views((mapped(PUB_A.host),), ())
    assert (p.path, p.rule) == ("mapped", "mapped-port")
    assert p.why == ("The sharer's gateway mapped a port on its public address (the one the "
                     "rendezvous sees), so the joiner connects to it directly, whatever its "
                     "own NAT.")
    [p] = views((), (mapped(PUB_B.host),), ("symmetric", "stable"))
    assert p.path == "mapped" and p.why.startswith("The joiner's gateway")
    # Both mapped: the sharer's, as the ladder takes it.
    [p] = views((mapped(PUB_A.host),), (mapped(PUB_B.host),))
    assert p.why.startswith("The sharer's gateway")
    # A gateway behind another NAT (its address is not the one the rendezvous sees).
    [p] = views((mapped("100.64.7.7"),), ())
    assert p.path == "relay"
    [p] = views((), (mapped("100.64.7.7"),), ("symmetric", "stable"))
    assert p.path == "relay"
    # A peer whose hello had no candidates: the fire carries none, no rung, no mapping.
    [p] = views((mapped(PUB_A.host),), None)
    assert p.path == "relay"
    # IPv6 on both sides comes first, whatever else.
    [p] = views((v6_s, mapped(PUB_A.host)), (v6_j,))
    assert (p.path, p.rule) == ("ipv6", "both-ipv6")
    [p] = views((v6_s, mapped(PUB_A.host)), ())
    assert p.path == "mapped"


def test_an_ipv6_only_joiner_never_dials_an_ipv4_mapped_port() -> None:
    relay = RelayStage(Endpoint("198.51.100.2", 3012), 10.0, b"t" * 16)
    to_s = Fire(PUB_A, Endpoint(V6_B.host, 50000), (), 40.0, None, None,
                ("stable", "unknown"), relay, None, peer_candidates=())
    p = predict(fire_facts(to_s, "server", None, (mapped(PUB_A.host),)))
    assert (p.path, p.rule) == ("relay", "ipv6-only-relayed")


def test_a_new_path_kind_is_one_more_rule() -> None:
    ipv6 = Rule("both-ipv6", "ipv6", lambda f: bool(f.extra.get("ipv6")),
                lambda f: "Both peers reach each other over IPv6, without NAT.")
    rules = (RULES[0], ipv6, *RULES[1:])
    f = facts("symmetric", "symmetric")
    assert predict(f, rules).path == "relay"
    f6 = PairFacts(f.sharer, f.joiner, relay=True, extra={"ipv6": True})
    assert (predict(f6, rules).path, predict(f6, rules).rule) == ("ipv6", "both-ipv6")
    with pytest.raises(ValueError, match="catch-all"):
        predict(f, RULES[:2])


@given(st.sampled_from(PATHS), st.text(max_size=80), st.text(max_size=20), st.booleans())
def test_a_prediction_round_trips_through_json(path: str, why: str, rule: str,
                                               certain: bool) -> None:
    p = Prediction(path, why, rule, certain)
    assert Prediction.from_json(p.to_json()) == p


def test_from_json_rejects_what_is_not_a_prediction() -> None:
    with pytest.raises(ValueError, match="path, why and rule"):
        Prediction.from_json({"path": "lan", "why": 3, "rule": "x"})


def test_the_predictor_is_pure() -> None:
    tree = ast.parse(Path(prediction_module.__file__).read_text(encoding="utf-8"))
    imported = {(n.module or "").split(".")[0] for n in ast.walk(tree)
                if isinstance(n, ast.ImportFrom)}
    imported |= {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                 for a in n.names}
    assert not imported & {"asyncio", "socket", "selectors", "threading", "time"}
