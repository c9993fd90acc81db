"""Pairing codes, the rendezvous' nameplate book (fake clock) and its punch plans."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, strategies as st

from nopf_web.pairing import BadCode, PairingCode, make_code, parse_code
from nopf_web.pairing_words import WORDS
from nopf_web.rendezvous.book import (
    ClaimRefused,
    NameplateBook,
    PairingLimits,
    PeerInfo,
    SymmetricPair,
    make_plans,
)
from nopf_web.wire.address import Endpoint
from tests.unit.fake_clock import Clock

# Codes ----------------------------------------------------------------------------


def test_wordlist_is_256_distinct_lowercase_words_none_a_prefix_of_another() -> None:
    assert len(WORDS) == len(set(WORDS)) == 256
    assert all(w.isascii() and w.isalpha() and w.islower() for w in WORDS)
    ordered = sorted(WORDS)
    assert not any(b.startswith(a) for a, b in itertools.pairwise(ordered))


def test_make_and_parse_round_trip() -> None:
    code = make_code(7)
    assert str(code).startswith("7-") and len(code.words) == 2
    assert parse_code(str(code)) == code
    assert parse_code("  7  Orbit--LANTERN ") == PairingCode(7, ("orbit", "lantern"))


@pytest.mark.parametrize(("text", "needle"), [
    ("", "empty pairing code"),
    ("orbit-lantern", "must start with a number"),
    ("07-orbit-lantern", "out of range"),
    ("1234567-orbit-lantern", "out of range"),
    ("7-orbit", "has 1 word(s)"),
    ("7-orbit-lantern-comet", "has 3 word(s)"),
    ("7-orbit-lantren", "did you mean 'lantern'"),
    ("7-orbit-xyzzy", "check the spelling"),
    ("٣-orbit-lantern", "must start with a number"),
])
def test_bad_codes_say_what_is_wrong(text: str, needle: str) -> None:
    with pytest.raises(BadCode) as info:
        parse_code(text)
    assert needle in str(info.value) and "\n" not in str(info.value)


# The book --------------------------------------------------------------------------


def book(**kw: float) -> tuple[NameplateBook[str], Clock]:
    clock = Clock()
    return NameplateBook(PairingLimits(**kw), clock), clock  # type: ignore[arg-type]


def test_claim_pairs_once_then_says_used() -> None:
    b, _ = book()
    n, _ = b.allocate("sharer")
    assert 1 <= n <= 9  # quiet rendezvous: one digit
    assert b.claim(n, "198.51.100.7") == "sharer"
    with pytest.raises(ClaimRefused) as info:
        b.claim(n, "198.51.100.7")
    assert info.value.code == "used" and "already used" in str(info.value)


def test_codes_expire_with_the_clock() -> None:
    b, clock = book(code_lifetime=600)
    n, expires_at = b.allocate("sharer")
    assert expires_at == 1600
    clock.now += 599
    assert b.sweep() == [] and b.is_open(n)
    clock.now += 1
    assert b.sweep() == [(n, "sharer")]
    with pytest.raises(ClaimRefused) as info:
        b.claim(n, "x")
    assert info.value.code == "expired" and "10 min" in str(info.value)


def test_unknown_and_left_nameplates() -> None:
    b, _ = book()
    with pytest.raises(ClaimRefused) as info:
        b.claim(5, "x")
    assert info.value.code == "unknown_code"
    n, _ = b.allocate("sharer")
    b.release(n, "sharer")
    with pytest.raises(ClaimRefused, match="stopped waiting"):
        b.claim(n, "x")


def test_failed_claims_are_limited_per_source_and_forgotten_after_the_window() -> None:
    b, clock = book(max_failed_claims=3, failed_claim_window=60)
    n, _ = b.allocate("sharer")
    guesses = [m for m in range(1, 10) if m != n][:3]
    for m in guesses:
        with pytest.raises(ClaimRefused):
            b.claim(m, "203.0.113.9")
    # Now even the right nameplate is refused to that address, with a clear error...
    with pytest.raises(ClaimRefused) as info:
        b.claim(n, "203.0.113.9")
    assert info.value.code == "too_many_guesses" and "wait 60 s" in str(info.value)
    assert b.is_open(n)  # ...and the sharer's code is not burnt by the refusal
    assert b.claim(n, "192.0.2.1") == "sharer"  # another address is unaffected
    clock.now += 61
    with pytest.raises(ClaimRefused) as info:
        b.claim(n, "203.0.113.9")
    assert info.value.code == "used"


def test_nameplates_grow_with_load_and_stay_unique() -> None:
    b, _ = book()
    plates = {b.allocate(f"s{i}")[0] for i in range(200)}
    assert len(plates) == 200 and max(plates) <= 999


def test_tombstones_are_not_reused_until_they_age_out() -> None:
    b, clock = book(tombstone_lifetime=100)
    n, _ = b.allocate("a")
    b.claim(n, "x")
    seen = {b.allocate(f"s{i}")[0] for i in range(4)}
    assert n not in seen
    clock.now += 101
    b.sweep()
    with pytest.raises(ClaimRefused) as info:
        b.claim(n, "y")
    assert info.value.code == "unknown_code"


# Plans -----------------------------------------------------------------------------

E = Endpoint


def peer(public: str, lan: str, probe: str | None = None, timeout: float = 30) -> PeerInfo:
    ip, port = public.split(":")
    lan_ip, lan_port = lan.split(":")
    return PeerInfo(E(ip, int(port)), (E(lan_ip, int(lan_port)),),
                    E(ip, int(probe)) if probe else E(ip, int(port)), timeout, 0.04)


def test_plan_between_two_nats_is_public_sharer_arms() -> None:
    a, b = peer("203.0.113.2:4000", "10.0.1.2:4000"), peer("192.0.2.2:5000", "10.0.2.2:5000")
    plans = make_plans(a, b, PairingLimits())
    assert [(s.path, s.peer, s.punch, s.budget) for s in plans.sharer] == [
        ("public", b.public, "arm", 30)]
    assert [(s.path, s.peer, s.punch) for s in plans.joiner] == [("public", a.public, "connect")]
    assert plans.sharer_note is None


def test_plan_behind_one_nat_tries_the_lan_first() -> None:
    a = peer("203.0.113.2:4000", "10.0.1.2:4000", timeout=30)
    b = peer("203.0.113.2:4001", "10.0.1.3:4100", timeout=12)
    plans = make_plans(a, b, PairingLimits())
    assert [(s.path, s.peer, s.punch, s.budget) for s in plans.sharer] == [
        ("lan", b.lan[0], "arm", 4), ("public", b.public, "arm", 8)]
    assert [(s.path, s.peer) for s in plans.joiner] == [("lan", a.lan[0]), ("public", a.public)]


def test_plan_refuses_two_symmetric_nats_naming_the_ports() -> None:
    a = peer("203.0.113.2:4000", "10.0.1.2:4000", probe="4999")
    b = peer("192.0.2.2:5000", "10.0.2.2:5000", probe="5999")
    with pytest.raises(SymmetricPair, match="sharer public ports 4999 then 4000"):
        make_plans(a, b, PairingLimits())


def test_plan_with_one_symmetric_nat_is_short_and_names_it() -> None:
    a = peer("203.0.113.2:4000", "10.0.1.2:4000", probe="4999")
    b = peer("192.0.2.2:5000", "10.0.2.2:5000")
    plans = make_plans(a, b, PairingLimits(symmetric_budget=4))
    assert [(s.punch, s.budget) for s in plans.sharer] == [("connect", 4)]
    assert [(s.punch, s.budget) for s in plans.joiner] == [("arm", 4)]
    assert plans.sharer_note is not None and "your NAT is symmetric" in plans.sharer_note
    assert plans.joiner_note is not None and "peer's NAT is symmetric" in plans.joiner_note
    # Against a peer without NAT it may work: full budget, that side arms and accepts.
    c = peer("192.0.2.9:5000", "192.0.2.9:5000")
    plans = make_plans(a, c, PairingLimits(symmetric_budget=4))
    assert [(s.punch, s.budget) for s in plans.joiner] == [("arm", 30)]


def test_plan_behind_one_symmetric_nat_uses_the_lan_only() -> None:
    a = peer("203.0.113.2:4000", "10.0.1.2:4000", probe="4999")
    b = peer("203.0.113.2:5000", "10.0.1.3:5000", probe="5999")
    plans = make_plans(a, b, PairingLimits())
    assert [(s.path, s.peer, s.punch) for s in plans.sharer] == [("lan", b.lan[0], "arm")]
    assert [(s.path, s.peer, s.punch) for s in plans.joiner] == [("lan", a.lan[0], "connect")]


# A peer seen over IPv6 has no IPv4 mapping: no IPv4 stage is ever planned for the pair.

V6_PEER = PeerInfo(E("2001:db8:b::2", 40001), (), None, 30, 0.04)
ipv4_peers = st.builds(
    lambda mapping, lan, timeout: PeerInfo(
        E("203.0.113.2", 4000), lan, None if mapping == "unknown" else
        E("203.0.113.2", 4000 if mapping == "stable" else 4999), timeout, 0.04),
    st.sampled_from(["unknown", "stable", "symmetric"]),
    st.sampled_from([(), (E("10.0.1.2", 4000),)]), st.floats(1, 60))
ipv6_peers = st.builds(lambda port, timeout: PeerInfo(
    E("2001:db8:a::2", port), (), None, timeout, 0.04), st.integers(1, 65535),
    st.floats(1, 60))


@given(st.one_of(st.tuples(ipv4_peers, ipv6_peers), st.tuples(ipv6_peers, ipv4_peers),
                 st.tuples(ipv6_peers, ipv6_peers)),
       st.booleans(), st.booleans(), st.booleans())
def test_no_ipv4_stage_for_a_pair_with_a_peer_seen_over_ipv6(
        pair: tuple[PeerInfo, PeerInfo], relay: bool, direct_only: bool,
        ipv6_pair: bool) -> None:
    sharer, joiner = pair
    limits = PairingLimits()
    try:
        plans = make_plans(sharer, joiner, limits, relay=relay, direct_only=direct_only,
                           ipv6_pair=ipv6_pair)
    except SymmetricPair as exc:  # no relay and no IPv6 between them: nothing can work
        assert not ipv6_pair and not (relay and not direct_only)
        assert "reached the rendezvous over IPv6 only" in str(exc)
        return
    assert plans.sharer == plans.joiner == ()
    relayed = relay and not direct_only
    assert (plans.relay_budget is not None) == relayed
    if relayed:
        assert plans.relay_budget == max(limits.relay_min_budget,
                                         min(sharer.punch_timeout, joiner.punch_timeout))
    assert plans.sharer_note == plans.joiner_note
    assert plans.sharer_note is not None and "over IPv6 only" in plans.sharer_note
    assert V6_PEER.mapping == "unknown" and V6_PEER.over_ipv6


def test_a_pair_no_punch_connects_is_left_to_its_candidates_when_it_has_some() -> None:
    sym = peer("203.0.113.2:4000", "10.0.1.2:4000", probe="4999")
    other = peer("192.0.2.2:5000", "10.0.2.2:5000", probe="5999")
    stable = peer("192.0.2.2:5000", "10.0.2.2:5000")
    for a, b, kw in ((sym, other, {}), (sym, stable, {"relay": True, "direct_only": True})):
        with pytest.raises(SymmetricPair):
            make_plans(a, b, PairingLimits(), **kw)
        for extra in ({"mapped_pair": True}, {"ipv6_pair": True}):
            plans = make_plans(a, b, PairingLimits(), **kw, **extra)
            assert plans.sharer == plans.joiner == () and plans.relay_budget is None
            assert plans.sharer_note is not None
            assert plans.sharer_note.endswith("only their own candidates (IPv6, a mapped "
                                              "port) can")
