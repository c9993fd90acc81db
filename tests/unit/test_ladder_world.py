"""The ladder and the resume meeting, machine against machine: two coordinated peers'
machines and the rendezvous' real machine, on bytes and a fake clock
(tests/unit/meeting_world.py)."""

from __future__ import annotations

import pytest

from nopf_web.rendezvous.server_machine import RelayLimits, ServerLimits
from nopf_web.roles import PeerRole
from nopf_web.sessions import coordination_machine as cm, errors
from nopf_web.wire.address import Endpoint
from nopf_web.wire.nat import NatSummary
from nopf_web.wire.rendezvous import RESUME_WAIT, FrameReader, Relay, decode_client_message

from .meeting_world import RDV, RDV6, V6, NatKind, World

RID = bytes(range(16))
# The doctor's reports of the world's NAT kinds (as tests/unit/test_prediction.py has them).
REPORTS: dict[str, NatSummary] = {
    "none": NatSummary("none", "open", True, (), False, False),
    "stable": NatSummary("endpoint-independent", "drop", False, (), None, False),
    "symmetric": NatSummary("address-and-port-dependent", "drop", False, (), None, False)}
RELAY = Endpoint(*RDV)


def paired(sharer: NatKind, joiner: NatKind, **server: object) -> World:
    w = World(sharer, joiner, limits=ServerLimits(**server))  # type: ignore[arg-type]
    w.share(punch_timeout=10.0)
    w.run(stop=lambda: w.sides["server"].code is not None)
    w.join(punch_timeout=10.0)
    w.run()
    return w


def tokens(w: World) -> list[bytes]:
    out = []
    for side in w.sides.values():
        for hello in side.relay_hellos:
            [payload] = FrameReader().feed(hello)
            msg = decode_client_message(payload)
            assert isinstance(msg, Relay)
            out.append(msg.token)
    return out


@pytest.mark.parametrize(("sharer", "joiner", "sharer_why", "joiner_why"), [
    ("symmetric", "stable", "our NAT is symmetric", "the peer's NAT is symmetric"),
    # A joiner makes no mapping check (it would cost three round trips to every
    # pair): facing a symmetric sharer, unknown counts as hopeless.
    ("symmetric", "symmetric", "our NAT is symmetric", "the peer's NAT is symmetric"),
])
def test_a_hopeless_pair_goes_to_the_relay_at_once(sharer: NatKind, joiner: NatKind,
                                                   sharer_why: str, joiner_why: str) -> None:
    w = paired(sharer, joiner)
    s, j = w.sides["server"], w.sides["client"]
    assert s.error is None and j.error is None, (s.error, j.error)
    for side, why in ((s, sharer_why), (j, joiner_why)):
        assert isinstance(side.result, cm.Paired)
        assert side.result.path == "relay" and side.result.relay == RELAY
        assert side.result.why == why
        assert [type(p) for p in side.paths_opened] == [cm.ViaRelay]  # no punch at all
        assert side.said[-1] == f"tunnel up over the relay at {RELAY} ({why})"
        assert side.said[-2] == f"{why}: going through the relay at {RELAY}"
    assert isinstance(s.result, cm.Paired) and isinstance(j.result, cm.Paired)
    assert s.result.peer == j.result.public and j.result.peer == s.result.public
    # The relay joined the two, each with its own single-use token.
    assert len(w.relays) == 1
    assert len(set(tokens(w))) == 2
    # About a punched pair's time plus the relay connection's round trip.
    assert s.result is not None and j.result is not None
    for result in (s.result, j.result):
        assert result.timings.connected - result.timings.fire < 0.1


def test_a_punchable_pair_punches_and_never_touches_the_relay() -> None:
    w = paired("stable", "stable")
    for side in w.sides.values():
        assert isinstance(side.result, cm.Paired) and side.result.path == "public"
        assert all(isinstance(p, cm.Punch) for p in side.paths_opened)
    assert not w.relays and not tokens(w)


@pytest.mark.parametrize(("sharer", "joiner"), [("symmetric", "none"), ("stable", "symmetric")])
def test_a_failed_punch_climbs_to_the_relay_without_meeting_again(sharer: NatKind,
                                                                 joiner: NatKind) -> None:
    # A symmetric NAT facing no NAT is worth a punch (the plan punches first), and so
    # is a joiner whose mapping nobody checked: the punch fails in this world, and the
    # relay stage is next, in the same attempt, after at most 3 s + 4 RTT.
    w = paired(sharer, joiner)
    for side in w.sides.values():
        assert isinstance(side.result, cm.Paired), side.error
        assert side.result.path == "relay" and side.result.attempt == 1
        assert [type(p) for p in side.paths_opened] == [cm.Punch, cm.ViaRelay]
        assert side.result.why is not None and side.result.why.startswith(
            "no direct path within")
        assert not any("coordinating again" in line for line in side.said)
        assert side.result.timings.connected - side.result.timings.fire < 3.0 + 4 * 0.1


def test_without_a_relay_the_old_ladder_stands() -> None:
    # --no-relay: a symmetric NAT facing a NAT is refused at once, as before relays.
    w = paired("symmetric", "symmetric", relay=RelayLimits(enabled=False))
    for side in w.sides.values():
        assert isinstance(side.error, errors.SymmetricNat), side.error
    # One symmetric side: the short punch, no retry (hopeless), the punch failure.
    w = paired("symmetric", "stable", relay=RelayLimits(enabled=False))
    for side in w.sides.values():
        assert isinstance(side.error, errors.CoordinatedPunchTimeout), side.error
        assert all(isinstance(p, cm.Punch) for p in side.paths_opened)


# -- resume --------------------------------------------------------------------------------


@pytest.mark.parametrize(("sharer", "joiner", "path"), [
    ("stable", "stable", "public"), ("symmetric", "stable", "relay"),
    ("symmetric", "symmetric", "relay")])
@pytest.mark.parametrize("gap", [0.0, 12.0])
def test_a_resume_meeting_gives_both_sides_a_new_connection(
        sharer: NatKind, joiner: NatKind, path: str, gap: float) -> None:
    w = World(sharer, joiner)
    w.resume("server", RID)
    w.run(until=gap, stop=lambda: False)  # the first waits (pinged) for the other
    assert not w.sides["server"].done
    w.resume("client", RID)
    w.run()
    for side in w.sides.values():
        assert isinstance(side.result, cm.Met), side.error
        assert side.result.path == path
        assert side.result.relay == (RELAY if path == "relay" else None)
    assert w.server.stats.resumed == 1


def test_a_resume_hello_is_what_the_rendezvous_expects() -> None:
    w = World("stable", "stable")
    w.resume("client", RID, direct_only=True, punch_timeout=20.0)
    side = w.sides["client"]
    m = side.machine
    assert m is not None
    # The mapping check, then the hello: the server took it (it waits, pinging).
    w.run(until=5.0, stop=lambda: False)
    assert not side.done and w.server.resumes == {RID: max(w.conns)}
    conn = w.server.conns[max(w.conns)]
    assert conn.hello is not None
    assert (conn.hello.action, conn.hello.resume_id, conn.hello.side,
            conn.hello.direct_only, conn.hello.punch_timeout, conn.hello.relay) == (
        "resume", RID, "join", True, 20.0, False)
    assert conn.hello.probe is not None  # a resume always carries its mapping check


def test_a_peer_that_never_resumes_is_named() -> None:
    w = World("stable", "stable")
    w.resume("server", RID)
    w.run(until=RESUME_WAIT + 10)
    error = w.sides["server"].error
    assert isinstance(error, errors.PeerDidNotResume), error
    assert "did not resume" in str(error)


def test_direct_only_resume_of_a_hopeless_pair_is_refused_at_once() -> None:
    w = World("symmetric", "stable")
    w.resume("server", RID, direct_only=True)
    w.resume("client", RID, direct_only=True)
    t0 = w.now
    w.run()
    assert w.now - t0 < 1
    for side in w.sides.values():
        assert isinstance(side.error, errors.SymmetricNat), side.error
        assert not side.paths_opened


def test_direct_only_resume_that_fails_its_punch_does_not_retry() -> None:
    w = World("symmetric", "none")
    w.resume("server", RID, direct_only=True, punch_timeout=6.0)
    w.resume("client", RID, direct_only=True, punch_timeout=6.0)
    w.run()
    for side in w.sides.values():
        assert isinstance(side.error, errors.CoordinatedPunchTimeout), side.error
        assert all(isinstance(p, cm.Punch) for p in side.paths_opened)


# -- a peer that reaches the rendezvous over IPv6 only (issue 17) ----------------------------


def ipv6_world(*, ipv6_only: tuple[PeerRole, ...], offers: tuple[PeerRole, ...],
               sharer: NatKind = "stable", joiner: NatKind = "stable", reports: bool = False,
               **server: object) -> World:
    """A pairing where ``ipv6_only`` have no IPv4 at all and ``offers`` send their global
    IPv6 address as a candidate (every peer sends the field, possibly empty);
    ``reports``: each hello carries the doctor's report of its NAT kind."""
    w = World(sharer, joiner, limits=ServerLimits(**server),  # type: ignore[arg-type]
              ipv6_only=ipv6_only)

    def gathered(role: PeerRole) -> cm.Gathered:
        return cm.Gathered((V6[role],) if role in offers else ())

    def nat(kind: NatKind) -> dict[str, NatSummary]:
        return {"nat": REPORTS[kind]} if reports else {}

    w.share(punch_timeout=10.0, candidates=gathered("server"), **nat(sharer))
    w.run(stop=lambda: w.sides["server"].code is not None)
    w.join(punch_timeout=10.0, candidates=gathered("client"), **nat(joiner))
    w.run()
    return w


def test_an_ipv6_only_connector_and_a_dual_stack_sharer_connect_over_ipv6() -> None:
    w = ipv6_world(ipv6_only=("client",), offers=("server", "client"), sharer="symmetric")
    s, j = w.sides["server"], w.sides["client"]
    for side, peer in ((s, V6["client"]), (j, V6["server"])):
        assert isinstance(side.result, cm.Paired), side.error
        assert (side.result.path, side.result.peer) == ("ipv6", peer)
        # No IPv4 punch was planned for anyone: the IPv6 rung first, and it won.
        assert [p.stage.path for p in side.paths_opened if isinstance(p, cm.Punch)] == ["ipv6"]
        assert side.result.prediction is not None
        assert side.result.prediction.rule == "ipv6-only", side.result.prediction
        assert side.result.prediction.certain
    assert not w.relays
    assert s.result is not None and j.result is not None
    assert j.result.public.host == V6["client"].host  # as the rendezvous saw it
    assert s.result.public.host == "203.0.113.2"
    assert f"public address [{V6['client'].host}]:" in " ".join(j.said)


def test_an_ipv6_only_connector_and_an_ipv4_only_sharer_meet_on_the_relay() -> None:
    w = ipv6_world(ipv6_only=("client",), offers=("client",))
    s, j = w.sides["server"], w.sides["client"]
    relays = {"server": RELAY, "client": Endpoint(*RDV6)}  # each reaches it in its family
    for role, side in w.sides.items():
        assert isinstance(side.result, cm.Paired), side.error
        assert side.result.path == "relay" and side.result.relay == relays[role]
        assert [type(p) for p in side.paths_opened] == [cm.ViaRelay]  # no punch at all
    assert s.result is not None and j.result is not None
    assert s.result.why == "the peer reached the rendezvous over IPv6 only, no IPv4 punch"
    assert j.result.why == "we reached the rendezvous over IPv6 only, no IPv4 punch"
    assert s.result.peer == j.result.public and j.result.public.host == V6["client"].host
    assert len(w.relays) == 1 and len(set(tokens(w))) == 2


def test_an_ipv6_only_sharer_checks_no_mapping_and_offers_no_lan() -> None:
    w = ipv6_world(ipv6_only=("server",), offers=("server",))
    s = w.sides["server"]
    assert isinstance(s.result, cm.Paired) and s.result.path == "relay", s.error
    assert s.result.relay == Endpoint(*RDV6)
    # Its connections: the one it opened to check the mapping, given up as soon as it
    # was up over IPv6 (nothing sent), then the hello's. The hello says no LAN, no probe.
    assert not any("checking" in line for line in s.said)
    [sent] = s.hellos
    assert (sent.lan, sent.probe) == ((), None)


def test_without_a_relay_an_ipv6_pair_needs_no_plan_and_others_are_refused() -> None:
    w = ipv6_world(ipv6_only=("client",), offers=("server", "client"),
                   relay=RelayLimits(enabled=False))
    for side in w.sides.values():
        assert isinstance(side.result, cm.Paired) and side.result.path == "ipv6", side.error
    w = ipv6_world(ipv6_only=("client",), offers=("client",), relay=RelayLimits(enabled=False))
    for side in w.sides.values():
        assert isinstance(side.error, errors.SymmetricNat), side.error
        assert "the connector reached the rendezvous over IPv6 only" in str(side.error)
        assert not side.paths_opened


@pytest.mark.parametrize("offers", [("server", "client"), ("server",), ()],
                         ids=["both-offer-ipv6", "sharer-offers-ipv6", "no-ipv6"])
@pytest.mark.parametrize(("sharer", "joiner"), [
    ("symmetric", "symmetric"), ("stable", "symmetric"), ("stable", "stable")])
def test_a_dual_stack_pair_takes_the_path_predicted_at_the_fire(
        sharer: NatKind, joiner: NatKind, offers: tuple[PeerRole, ...]) -> None:
    # Both peers reach the rendezvous over IPv4; the IPv6 rung comes first when both
    # offered an address, whatever their NATs (the prediction says so before any SYN).
    w = ipv6_world(ipv6_only=(), offers=offers, sharer=sharer, joiner=joiner, reports=True)
    paths = set()
    for side in w.sides.values():
        assert isinstance(side.result, cm.Paired), side.error
        assert side.result.prediction is not None
        assert side.result.prediction.path == side.result.path, side.result.prediction
        assert side.result.prediction.certain
        paths.add(side.result.path)
    want = ("ipv6" if len(offers) == 2 else "relay" if "symmetric" in (sharer, joiner)
            else "public")
    assert paths == {want}
    # The rendezvous predicted the same (its INFO line).
    [note] = w.server.notes
    assert f"predicted path {want}: " in note, note
