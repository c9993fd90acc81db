"""The rendezvous machine's relay and resume, on bytes and a fake clock: relay plans,
single-use tokens and their checks, relay connections joined or refused, the limits,
resume pairing by id. No sockets, no loop."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
from hypothesis import event, given, settings, strategies as st

from nopf_web.rendezvous.book import PairingLimits
from nopf_web.rendezvous.server_machine import (
    FIRE_MARGIN,
    RELAY_TOKEN_GRACE,
    RELAY_TOKEN_MEMORY,
    RelayEnded,
    RelayLimits,
    ServerLimits,
    Shutdown,
    StartRelay,
    StopRelay,
)
from nopf_web.wire.address import Endpoint
from nopf_web.wire.nat import NatSummary
from nopf_web.wire.rendezvous import (
    RESUME_WAIT,
    Candidate,
    ErrorReply,
    Fire,
    Hello,
    Mapping,
    PakeMessage,
    Ping,
    Pong,
    Relay,
    Relayed,
    RelayStage,
    ResumeSide,
    Stage,
    Welcome,
    encode,
)
from tests.unit.server_harness import (
    JOINER_IP,
    LAN_A,
    LAN_B,
    RDV,
    SHARER_IP,
    Harness,
    Peer,
    error_of,
    fires,
)

RELAYED = encode(Relayed())
RID = bytes(range(16))


def counter_entropy() -> Callable[[int], bytes]:
    """Tokens 1, 2, 3... (16 bytes each): predictable, so tests can forge and guess."""
    count = itertools.count(1)
    return lambda n: next(count).to_bytes(n, "big")


def harness(relay: RelayLimits | None = None, **limits: object) -> Harness:
    return Harness(ServerLimits(relay=relay or RelayLimits(), **limits),  # type: ignore[arg-type]
                   entropy=counter_entropy())


def probe_for(h: Harness, ip: str, mapping: Mapping) -> tuple[Endpoint | None,
                                                                tuple[Endpoint, ...]]:
    """(probe, lan) for the next connection's hello to be classified as ``mapping``."""
    public = Endpoint(ip, 40000 + h._next + 1)  # the harness' next observed address
    if mapping == "none":
        return public, (public,)
    if mapping == "stable":
        return public, (LAN_A if ip == SHARER_IP else LAN_B,)
    if mapping == "symmetric":
        return Endpoint(ip, 4999), (LAN_A if ip == SHARER_IP else LAN_B,)
    return None, (LAN_A if ip == SHARER_IP else LAN_B,)


def meet(h: Harness, ms: Mapping = "stable", mj: Mapping = "stable", *, relay: bool = True,
         rtt: float = 0.02, joiner_ip: str = JOINER_IP, timeout: float = 10,
         ) -> tuple[Peer, Peer]:
    """A sharer and a joiner with these mappings, through their last messages."""
    probe, lan = probe_for(h, SHARER_IP, ms)
    sharer = h.hello(Hello("share", None, lan, probe, timeout, relay=relay), SHARER_IP, rtt=rtt)
    welcome = sharer.messages()[0]
    nameplate = welcome.nameplate  # type: ignore[union-attr]
    probe, lan = probe_for(h, joiner_ip, mj)
    joiner = h.hello(Hello("join", nameplate, lan, probe, timeout, relay=relay), joiner_ip,
                     rtt=rtt)
    h.advance(1)
    return sharer, joiner


def pair(h: Harness, ms: Mapping = "stable", mj: Mapping = "stable", *, relay: bool = True,
         rtt: float = 0.02, joiner_ip: str = JOINER_IP, timeout: float = 10,
         ) -> tuple[Peer, Peer, Fire, Fire]:
    """A sharer and a joiner with these mappings, paired; their fires."""
    sharer, joiner = meet(h, ms, mj, relay=relay, rtt=rtt, joiner_ip=joiner_ip,
                          timeout=timeout)
    s, j = fires(sharer, joiner)
    return sharer, joiner, s, j


def relay_conn(h: Harness, token: bytes, ip: str, *, rtt: float = 0.02) -> Peer:
    peer = h.connect(ip, rtt=rtt)
    h.send(peer, encode(Relay(token)))
    return peer


def relayed_pair(h: Harness, **kwargs: object) -> tuple[Peer, Peer, StartRelay]:
    _, _, s, j = pair(h, **kwargs)  # type: ignore[arg-type]
    assert s.relay is not None and j.relay is not None
    a = relay_conn(h, s.relay.token, SHARER_IP)
    b = relay_conn(h, j.relay.token, str(kwargs.get("joiner_ip", JOINER_IP)))
    assert h.relays, (a.messages(), b.messages())
    return a, b, h.relays[-1]


def refusal(peer: Peer, code: str = "relay_refused") -> str:
    err = error_of(peer)
    assert err.code == code and peer.fin, err
    return err.message


# Relay plans ---------------------------------------------------------------------------------


PUNCHABLE: list[tuple[Mapping, Mapping]] = [
    ("stable", "stable"), ("none", "stable"), ("stable", "none"), ("none", "none"),
    ("unknown", "stable"), ("stable", "unknown"), ("unknown", "unknown"),
    ("symmetric", "none"), ("none", "symmetric")]
HOPELESS: list[tuple[Mapping, Mapping]] = [
    ("symmetric", "stable"), ("stable", "symmetric"), ("symmetric", "symmetric"),
    ("symmetric", "unknown"), ("unknown", "symmetric")]


@pytest.mark.parametrize(("ms", "mj"), PUNCHABLE)
def test_a_punchable_pair_punches_briefly_then_relays(ms: Mapping, mj: Mapping) -> None:
    h = harness()
    _, _, s, j = pair(h, ms, mj, rtt=0.05, timeout=10)
    # Punch for min(budget, 3 s + 4 x RTT), here 3.2 s, then the relay for the rest.
    punch = 3.0 + 4 * 0.05
    for fire, tactic in ((s, "connect" if ms == "symmetric" else "arm"),
                         (j, "arm" if ms == "symmetric" else "connect")):
        assert [(st.path, st.punch) for st in fire.plan] == [("public", tactic)]
        assert fire.plan[0].budget == pytest.approx(punch)
        assert fire.relay is not None
        assert fire.relay.relay == Endpoint(*RDV)
        assert fire.relay.budget == pytest.approx(10 - punch)
    assert s.relay is not None and j.relay is not None and s.relay.token != j.relay.token
    assert not s.hopeless and not j.hopeless
    assert h.m.stats.relay_plans == 1


@pytest.mark.parametrize(("ms", "mj"), HOPELESS)
def test_a_hopeless_pair_relays_at_once(ms: Mapping, mj: Mapping) -> None:
    h = harness()
    _, _, s, j = pair(h, ms, mj, timeout=7)
    for fire in (s, j):
        assert fire.plan == () and fire.hopeless
        assert fire.relay is not None and fire.relay.budget == 7  # the whole budget
        assert fire.note is not None and "relayed" in fire.note


def test_a_short_budget_still_leaves_the_relay_its_minimum() -> None:
    h = harness()
    _, _, s, _ = pair(h, timeout=2, rtt=0.01)
    assert [st.budget for st in s.plan] == [2.0]
    assert s.relay is not None and s.relay.budget == PairingLimits().relay_min_budget


def test_one_symmetric_nat_shared_by_both_tries_the_lan_then_relays() -> None:
    h = harness()
    probe = Endpoint(SHARER_IP, 4999)
    sharer = h.hello(Hello("share", None, (LAN_A,), probe, 9, relay=True), SHARER_IP)
    nameplate = sharer.messages()[0].nameplate  # type: ignore[union-attr]
    joiner = h.hello(Hello("join", nameplate, (LAN_B,), Endpoint(SHARER_IP, 40000 + h._next + 1),
                           9, relay=True), SHARER_IP)
    h.advance(1)
    s, j = fires(sharer, joiner)
    assert s.plan == (Stage("lan", LAN_B, "arm", 3.0),)
    assert j.plan == (Stage("lan", LAN_A, "connect", 3.0),)
    assert s.relay is not None and s.relay.budget == 6.0


@pytest.mark.parametrize(("ms", "mj"), PUNCHABLE + HOPELESS)
def test_without_relay_the_plans_are_exactly_todays(ms: Mapping, mj: Mapping) -> None:
    """A client that did not say "relay", or a --no-relay server: byte for byte the
    fires of a rendezvous without relay (no token issued, no relay stage)."""
    def fire_bytes(h: Harness, relay: bool) -> tuple[bytes, bytes]:
        sharer, joiner = meet(h, ms, mj, relay=relay)
        return last_frame(sharer), last_frame(joiner)

    def last_frame(peer: Peer) -> bytes:  # the fire (or refusal) as sent, byte for byte
        assert peer.fin
        return peer.sent_at[-1][1]

    def plain_fire_bytes(h: Harness) -> tuple[bytes, bytes]:
        probe, lan = probe_for(h, SHARER_IP, ms)
        sharer = h.hello(Hello("share", None, lan, probe, 10), SHARER_IP)
        nameplate = sharer.messages()[0].nameplate  # type: ignore[union-attr]
        probe, lan = probe_for(h, JOINER_IP, mj)
        joiner = h.hello(Hello("join", nameplate, lan, probe, 10), JOINER_IP)
        h.advance(1)
        return last_frame(sharer), last_frame(joiner)

    off = RelayLimits(enabled=False)
    if "symmetric" in (ms, mj) and "unknown" in (ms, mj):
        return  # the joiner is asked for its probe first: covered below
    expected = plain_fire_bytes(harness(off))
    assert fire_bytes(harness(), relay=False) == expected
    h_off = harness(off)
    assert fire_bytes(h_off, relay=True) == expected
    assert not h_off.m.tickets and h_off.m.stats.relay_plans == 0


def test_without_relay_a_symmetric_sharer_still_asks_for_the_joiners_probe() -> None:
    for relay, hello_relay in ((RelayLimits(enabled=False), True), (RelayLimits(), False)):
        h = harness(relay)
        sharer = h.hello(Hello("share", None, (LAN_A,), Endpoint(SHARER_IP, 4999), 10,
                               relay=True), SHARER_IP)
        nameplate = sharer.messages()[0].nameplate  # type: ignore[union-attr]
        joiner = h.hello(Hello("join", nameplate, (LAN_B,), None, 10, relay=hello_relay))
        assert error_of(joiner).code == "probe_required"


def test_with_relay_an_unchecked_joiner_facing_a_symmetric_sharer_relays_at_once() -> None:
    h = harness()
    _, _, s, j = pair(h, "symmetric", "unknown")
    assert s.plan == j.plan == () and s.relay is not None and j.relay is not None


def test_no_relay_stage_without_an_ipv4_address_of_ours() -> None:
    for local in (None, ("::1", 3012), ("2001:db8::2", 3012)):
        h = harness()
        sharer = h.hello(Hello("share", None, (LAN_A,), None, 10, relay=True), SHARER_IP)
        nameplate = sharer.messages()[0].nameplate  # type: ignore[union-attr]
        joiner = h.connect(local=local)
        h.send(joiner, encode(Hello("join", nameplate, (LAN_B,), None, 10, relay=True)))
        h.advance(1)
        s, j = fires(sharer, joiner)
        assert s.relay is None and j.relay is None and [st.budget for st in s.plan] == [10]
    # A v4-mapped address of a dual-stack listener is IPv4.
    h = harness()
    sharer = h.connect(SHARER_IP, local=("::ffff:198.51.100.2", 3012))
    h.send(sharer, encode(Hello("share", None, (LAN_A,), None, 10, relay=True)))
    joiner = h.hello(Hello("join", sharer.messages()[0].nameplate, (LAN_B,), None, 10,  # type: ignore[union-attr]
                           relay=True))
    h.advance(1)
    s, _ = fires(sharer, joiner)
    assert s.relay is not None and s.relay.relay == Endpoint("198.51.100.2", 3012)


def test_a_configured_relay_address_is_the_one_in_plans() -> None:
    h = harness(RelayLimits(addresses=(Endpoint("192.0.2.80", 443),)))
    _, _, s, j = pair(h)
    assert s.relay is not None and j.relay is not None
    assert s.relay.relay == j.relay.relay == Endpoint("192.0.2.80", 443)


def test_each_side_gets_the_relay_address_it_reached() -> None:
    h = harness()
    sharer = h.connect(SHARER_IP, local=("198.51.100.2", 3012))
    h.send(sharer, encode(Hello("share", None, (LAN_A,), None, 10, relay=True)))
    joiner = h.connect(local=("198.51.100.3", 3012))
    h.send(joiner, encode(Hello("join", sharer.messages()[0].nameplate, (LAN_B,), None, 10,  # type: ignore[union-attr]
                                relay=True)))
    h.advance(1)
    s, j = fires(sharer, joiner)
    assert s.relay is not None and j.relay is not None
    assert (s.relay.relay.host, j.relay.relay.host) == ("198.51.100.2", "198.51.100.3")


# Relay connections ---------------------------------------------------------------------------


def test_the_two_sides_are_joined_with_relayed_and_forgotten() -> None:
    h = harness(RelayLimits(rate=1.25e6))
    sharer, joiner, s, j = pair(h)
    assert s.relay is not None and j.relay is not None
    for p in (sharer, joiner):
        h.close(p)
    # The joiner's side comes first: it waits, told nothing, with no deadline before the
    # tokens expire.
    b = relay_conn(h, j.relay.token, JOINER_IP)
    assert b.data == b.reply and b.ended is None and not h.relays
    assert h.m.conns[b.id].deadline == h.m.sessions[1].expires_at
    a = relay_conn(h, s.relay.token, SHARER_IP)
    (start,) = h.relays
    assert start == StartRelay(1, a.id, b.id, RELAYED, 1.25e6)  # a: the sharer's side
    for p in (a, b):
        assert p.data == p.reply + RELAYED and p.ended == "relayed"
        assert p.id not in h.m.conns
    assert h.m.stats.relayed == 1 and h.m.stats.relay_live == 1 and h.m.stats.open_now == 2
    assert not h.logs
    h.feed(RelayEnded(1, h.now, 1000, 24))
    assert h.m.stats.relay_live == 0 and h.m.stats.relayed_bytes == 1024
    assert not h.m.sessions and not h.m.tickets


def test_the_tokens_last_the_plans_budget_and_ten_seconds_more() -> None:
    h = harness()
    pair(h, rtt=0.02, timeout=10)
    session = h.m.sessions[1]
    # fired at the join (h.now - 1): the sharer's fire arrives RTT/2 after it leaves.
    fired = h.now - 1 + FIRE_MARGIN + 0.01
    assert session.expires_at == pytest.approx(fired + 10 + RELAY_TOKEN_GRACE)


@pytest.mark.parametrize("first", ["sharer", "joiner"])
def test_a_relay_message_split_anywhere_is_one(first: str) -> None:
    @settings(max_examples=25, deadline=None)
    @given(st.lists(st.integers(1, len(encode(Relay(RID))) - 1), max_size=4))
    def check(cuts: list[int]) -> None:
        h = harness()
        _, _, s, j = pair(h)
        assert s.relay is not None and j.relay is not None
        order = [(s.relay.token, SHARER_IP), (j.relay.token, JOINER_IP)]
        if first == "joiner":
            order.reverse()
        peers = []
        for token, ip in order:
            peer = h.connect(ip)
            data = encode(Relay(token))
            for lo, hi in itertools.pairwise([0, *sorted(cuts), len(data)]):
                h.send(peer, data[lo:hi])
            peers.append(peer)
        assert len(h.relays) == 1 and all(p.ended == "relayed" for p in peers)

    check()


def test_an_unknown_token_is_refused_and_logged() -> None:
    h = harness()
    pair(h)
    peer = relay_conn(h, b"\xee" * 16, "192.0.2.66")
    assert refusal(peer) == "relay refused: unknown relay token"
    assert [x.line for x in h.logs] == ["relay refused 192.0.2.66:40003: unknown relay token"]
    assert h.m.stats.relay_refused == 1


def test_a_used_token_is_refused_a_third_party_cannot_join() -> None:
    h = harness()
    relayed_pair(h)
    # The sharer's token again: from the sharer's own IP (a second connection of a
    # host behind that NAT, or a thief there) and from elsewhere.
    sharer_token = (1).to_bytes(16, "big")
    again = relay_conn(h, sharer_token, SHARER_IP)
    assert refusal(again) == "relay refused: relay token of the sharer already used"
    thief = relay_conn(h, sharer_token, "192.0.2.66")
    assert "already used" in refusal(thief)
    assert len(h.relays) == 1 and h.m.stats.relay_refused == 2
    assert h.logs[0].kind == "relay-token" and "already used" in h.logs[0].line


def test_a_stolen_unused_token_is_refused_from_another_address_and_stays_good() -> None:
    h = harness()
    _, _, s, j = pair(h)
    assert s.relay is not None and j.relay is not None
    thief = relay_conn(h, j.relay.token, "192.0.2.66")
    assert refusal(thief) == ("relay refused: relay token of the joiner presented from "
                              f"another address than {JOINER_IP}")
    assert "another address" in h.logs[-1].line
    # Not burnt: the joiner still joins with it.
    a = relay_conn(h, s.relay.token, SHARER_IP)
    b = relay_conn(h, j.relay.token, JOINER_IP)
    assert (a.ended, b.ended) == ("relayed", "relayed")
    # The sharer's token from the joiner's IP is not the joiner's to use.
    h2 = harness()
    _, _, s2, _ = pair(h2)
    assert s2.relay is not None
    assert "another address" in refusal(relay_conn(h2, s2.relay.token, JOINER_IP))


def test_an_expired_token_is_told_apart_then_forgotten() -> None:
    h = harness()
    _, _, s, _ = pair(h)
    assert s.relay is not None
    expires = h.m.sessions[1].expires_at
    h.advance(expires - h.now)
    assert refusal(relay_conn(h, s.relay.token, SHARER_IP)) == "relay refused: relay token expired"
    h.advance(RELAY_TOKEN_MEMORY)
    assert "unknown relay token" in refusal(relay_conn(h, s.relay.token, SHARER_IP))
    assert not h.m.sessions and not h.m.tickets


def test_the_first_side_waits_until_the_tokens_expire() -> None:
    h = harness()
    _, _, s, _ = pair(h)
    assert s.relay is not None
    a = relay_conn(h, s.relay.token, SHARER_IP)
    expires = h.m.sessions[1].expires_at
    h.advance(expires - h.now - 0.001)
    assert a.data == a.reply and a.ended is None
    h.advance(0.001)
    err = error_of(a)
    assert err.code == "timeout" and "did not reach the relay in time" in err.message
    assert h.m._relay_count == 0 and not h.m._relay_sources


@pytest.mark.parametrize("how", ["close", "lost", "bytes"])
def test_a_waiting_side_that_leaves_ends_the_session(how: str) -> None:
    h = harness()
    _, _, s, j = pair(h)
    assert s.relay is not None and j.relay is not None
    a = relay_conn(h, s.relay.token, SHARER_IP)
    if how == "close":
        h.close(a)
    elif how == "lost":
        h.lost(a)
    else:
        h.send(a, b"\x16\x03\x01")  # anything before "relayed": no peer of ours
        assert any("sent 3 bytes before it was joined" in x.line for x in h.logs)
    assert a.id not in h.m.conns and a.ended in (None, "reset")
    assert h.m._relay_count == 0
    b = relay_conn(h, j.relay.token, JOINER_IP)
    assert refusal(b) == ("relay refused: the sharer's relay connection ended before the "
                          "joiner's arrived")
    assert not h.relays


def test_bytes_behind_the_relay_message_reset_it() -> None:
    h = harness()
    _, _, s, _ = pair(h)
    assert s.relay is not None
    a = h.connect(SHARER_IP)
    h.send(a, encode(Relay(s.relay.token)) + b"\x00\x00")  # the start of a frame
    assert a.ended == "reset" and a.data == a.reply
    assert "sent bytes behind its relay message" in h.logs[-1].line
    b = h.connect(SHARER_IP)
    h.send(b, encode(Relay(s.relay.token)) + b"early tunnel bytes")  # no frame: noise
    assert b.ended == "reset" and b.data == b.reply
    assert not h.m.tickets[s.relay.token].used  # not burnt: nothing was accepted


def test_a_relay_message_to_a_rendezvous_that_does_not_relay() -> None:
    h = harness(RelayLimits(enabled=False))
    peer = relay_conn(h, RID, SHARER_IP)
    assert refusal(peer) == "relay refused: this rendezvous does not relay"
    assert h.logs[-1].kind == "relay-token"


def test_the_session_limit_refuses_with_busy_and_one_line() -> None:
    h = harness(RelayLimits(max_sessions=1), log_interval=10)
    relayed_pair(h)
    _, _, s, j = pair(h, joiner_ip="192.0.2.77")
    assert s.relay is not None and j.relay is not None
    a = relay_conn(h, s.relay.token, SHARER_IP)
    assert refusal(a, "busy") == "relay refused: 1 relay sessions open"
    assert h.logs[-1] == h.logs[-1].__class__("relay-sessions", f"relay refused {SHARER_IP}:"
                                              f"{40000 + a.id}: 1 relay sessions open")
    b = relay_conn(h, j.relay.token, "192.0.2.77")
    assert refusal(b, "busy") and len([x for x in h.logs if x.kind == "relay-sessions"]) == 1
    assert h.m.stats.relay_refused == 2
    # The first session ends: the tokens (not burnt by the refusals) now join.
    h.feed(RelayEnded(1, h.now))
    a2 = relay_conn(h, s.relay.token, SHARER_IP)
    b2 = relay_conn(h, j.relay.token, "192.0.2.77")
    assert (a2.ended, b2.ended) == ("relayed", "relayed")


def test_the_per_source_limit_counts_sessions_not_connections() -> None:
    h = harness(RelayLimits(max_per_source=1))
    relayed_pair(h)  # one session with a side at SHARER_IP and one at JOINER_IP
    _, _, s, j = pair(h, joiner_ip="192.0.2.77")
    assert s.relay is not None and j.relay is not None
    # The new joiner's IP has no session: it waits. The sharer's IP has one: refused.
    b = relay_conn(h, j.relay.token, "192.0.2.77")
    assert b.ended is None
    a = relay_conn(h, s.relay.token, SHARER_IP)
    assert refusal(a, "busy") == f"relay refused: 1 relay sessions open from {SHARER_IP}"
    assert h.logs[-1].kind == "relay-per-source"
    h.feed(RelayEnded(1, h.now))
    a = relay_conn(h, s.relay.token, SHARER_IP)
    assert a.ended == "relayed" and b.ended == "relayed"
    assert dict(h.m._relay_sources) == {SHARER_IP: 1, "192.0.2.77": 1}


def test_both_sides_from_one_ip_count_once() -> None:
    h = harness(RelayLimits(max_per_source=1))
    _, _, _, _ = pair(h, joiner_ip=SHARER_IP)
    a = relay_conn(h, (1).to_bytes(16, "big"), SHARER_IP)
    b = relay_conn(h, (2).to_bytes(16, "big"), SHARER_IP)
    assert (a.ended, b.ended) == ("relayed", "relayed")
    assert dict(h.m._relay_sources) == {SHARER_IP: 1}


def test_shutdown_stops_live_sessions_and_resets_waiting_ones() -> None:
    h = harness()
    relayed_pair(h)
    _, _, s, _ = pair(h, joiner_ip="192.0.2.77")
    assert s.relay is not None
    waiting = relay_conn(h, s.relay.token, SHARER_IP)
    h.feed(Shutdown(h.now))
    assert h.stopped == [StopRelay(1)] and waiting.ended == "reset"
    assert h.m.stats.relay_live == 1  # until the driver reports the end
    h.feed(RelayEnded(1, h.now, error="stopped"))
    assert h.m.stats.relay_live == 0 and h.m._relay_count == 0
    h.feed(RelayEnded(1, h.now))  # twice, or unknown: nothing
    h.feed(RelayEnded(99, h.now))
    assert h.m.stats.relay_live == 0


# Resume pairing --------------------------------------------------------------------------------


def resume(h: Harness, side: ResumeSide, ip: str, *, rid: bytes = RID,
           probe: Endpoint | None = None, direct_only: bool = False,
           rtt: float | None = 0.02, lan: tuple[Endpoint, ...] = ()) -> Peer:
    return h.hello(Hello("resume", None, lan, probe, 10, resume_id=rid, side=side,
                         direct_only=direct_only), ip, rtt=rtt)


def test_two_resume_hellos_with_one_id_and_opposite_sides_pair() -> None:
    h = harness()
    share = resume(h, "share", SHARER_IP)
    assert share.messages() == [Ping(1)]  # waiting, pinged like a sharer; no welcome
    h.advance(5)
    join = resume(h, "join", "192.0.2.99")  # a new network: any IP may resume
    assert isinstance(join.last(), Fire)
    h.advance(1)
    s, j = fires(share, join)
    assert s.peer_public == j.public and j.peer_public == s.public
    assert s.relay is not None and j.relay is not None  # a resume implies "relay"
    assert s.peer_pake is None and j.peer_pake is None
    assert h.m.stats.resumed == 1 and not h.m.retries and not h.m.resumes


def test_the_join_side_may_wait_and_the_share_side_arrive() -> None:
    h = harness()
    join = resume(h, "join", JOINER_IP, rtt=0.06)
    share = resume(h, "share", SHARER_IP, rtt=0.02)
    # The joiner's fire leaves at once, the sharer's (RTT_B - RTT_A) / 2 + margin later.
    assert isinstance(join.last(), Fire) and share.messages() == []
    h.advance(0.02 + FIRE_MARGIN)
    s, j = fires(share, join)
    assert [st.punch for st in s.plan] == ["arm"] and [st.punch for st in j.plan] == ["connect"]


def test_a_newer_resume_from_the_same_side_replaces_the_older() -> None:
    h = harness()
    old = resume(h, "share", SHARER_IP)
    new = resume(h, "share", "192.0.2.50")
    err = error_of(old)
    assert err.code == "bad_request" and "a newer resume hello from the same side" in err.message
    assert new.messages() == [Ping(1)] and h.m.resumes == {RID: new.id}
    join = resume(h, "join", JOINER_IP)
    h.advance(1)
    s, _ = fires(new, join)
    assert s.public.host == "192.0.2.50"


def test_resume_ids_pair_only_with_themselves() -> None:
    h = harness()
    a = resume(h, "share", SHARER_IP, rid=b"A" * 16)
    b = resume(h, "join", JOINER_IP, rid=b"B" * 16)
    h.advance(1)
    assert not any(isinstance(m, Fire) for m in a.messages() + b.messages())
    assert set(h.m.resumes) == {b"A" * 16, b"B" * 16}


def test_a_resume_waits_thirty_seconds_then_times_out() -> None:
    h = harness(ping_interval=15.0)
    share = resume(h, "share", SHARER_IP)
    for _ in range(int(RESUME_WAIT) - 1):
        h.advance(1)
        h.pong(share)
    assert share.ended is None and not share.fin
    h.advance(1)
    err = error_of(share)
    assert err.code == "timeout" and err.message == "the peer did not resume within 30 s"
    assert not h.m.resumes
    late = resume(h, "join", JOINER_IP)
    assert late.messages() == [Ping(1)]  # nobody to pair with: it waits in turn


def test_a_resume_waiter_that_leaves_is_unlisted() -> None:
    for leave in ("close", "lost", "pake"):
        h = harness()
        share = resume(h, "share", SHARER_IP)
        if leave == "close":
            h.close(share)
        elif leave == "lost":
            h.lost(share)
        else:
            h.send(share, encode(PakeMessage(bytes(33))))  # no SPAKE2 in a resume
            assert share.ended == "reset"
        assert not h.m.resumes, leave
        join = resume(h, "join", JOINER_IP)
        assert join.messages() == [Ping(1)], leave


def test_a_waiter_gone_while_the_other_measured_lets_it_wait_in_turn() -> None:
    h = harness()
    share = resume(h, "share", SHARER_IP)
    join = resume(h, "join", JOINER_IP, rtt=None)
    assert join.messages() == [Ping(1)]  # the one RTT ping: the kernel had none
    h.close(share)
    h.send(join, encode(Pong(1)))
    assert not any(isinstance(m, Fire | ErrorReply) for m in join.messages())
    assert h.m.resumes == {RID: join.id}
    share2 = resume(h, "share", SHARER_IP)
    h.advance(1)
    fires(share2, join)


def test_a_newcomer_gone_while_measuring_leaves_the_waiter_waiting() -> None:
    h = harness()
    share = resume(h, "share", SHARER_IP)
    join = resume(h, "join", JOINER_IP, rtt=None)
    h.lost(join)
    assert h.m.resumes == {RID: share.id} and not isinstance(share.last(), Fire)
    join2 = resume(h, "join", JOINER_IP)
    h.advance(1)
    fires(share, join2)


def test_direct_only_resumes_get_punch_plans_or_are_refused() -> None:
    h = harness()
    share = resume(h, "share", SHARER_IP, direct_only=True,
                   probe=Endpoint(SHARER_IP, 40000 + h._next + 1))
    join = resume(h, "join", JOINER_IP, direct_only=True,
                  probe=Endpoint(JOINER_IP, 40000 + h._next + 1))
    h.advance(1)
    s, j = fires(share, join)
    assert s.relay is None and j.relay is None and [st.budget for st in s.plan] == [10]
    assert not h.m.tickets
    # A symmetric NAT facing another NAT: refused at once, nothing to try.
    h = harness()
    share = resume(h, "share", SHARER_IP, direct_only=True, probe=Endpoint(SHARER_IP, 4999))
    join = resume(h, "join", JOINER_IP, direct_only=True,
                  probe=Endpoint(JOINER_IP, 40000 + h._next + 1))
    for p in (share, join):
        err = error_of(p)
        assert err.code == "symmetric_nat" and "the sharer's NAT is symmetric" in err.message
    # One side direct_only is enough to leave the relay out.
    h = harness()
    share = resume(h, "share", SHARER_IP)
    join = resume(h, "join", JOINER_IP, direct_only=True)
    h.advance(1)
    s, _ = fires(share, join)
    assert s.relay is None


def test_a_resumed_pair_is_relayed_like_any_other() -> None:
    h = harness()
    share = resume(h, "share", SHARER_IP, probe=Endpoint(SHARER_IP, 4999))  # symmetric
    join = resume(h, "join", JOINER_IP)
    h.advance(1)
    s, j = fires(share, join)
    assert s.plan == () and s.relay is not None and j.relay is not None
    a = relay_conn(h, s.relay.token, SHARER_IP)
    b = relay_conn(h, j.relay.token, JOINER_IP)
    assert (a.ended, b.ended) == ("relayed", "relayed")


# Anything at all, relays and resumes included -----------------------------------------------


IPS = ["198.51.100.1", "203.0.113.1", "192.0.2.1"]
ops = st.sampled_from(["share", "join", "pair", "pair", "resume", "resumes", "relay", "relay",
                       "relay", "both", "both", "send", "close", "lost", "advance", "pong",
                       "end", "shutdown"])
steps = st.lists(st.tuples(ops, st.integers(0, 7), st.binary(max_size=8), st.floats(0, 20),
                           st.sampled_from(IPS)), min_size=3, max_size=40)


@settings(max_examples=200, deadline=None)
@given(steps)
def test_no_sequence_of_relay_and_resume_events_breaks_the_machine(
        script: list[tuple[str, int, bytes, float, str]]) -> None:
    h = harness(RelayLimits(max_sessions=2, max_per_source=2), max_connections=12,
                max_per_source=6, pairing=PairingLimits(code_lifetime=30))
    shut = False
    for op, which, data, dt, ip in script:
        target = h.live_peer(which)
        plates = h.nameplates()
        relays: list[RelayStage] = [m.relay for p in h.peers.values() for m in p.messages()
                                    if isinstance(m, Fire) and m.relay is not None]
        if op == "share":
            h.hello(Hello("share", None, (LAN_A,), None, 5, relay=which % 4 != 0), ip,
                    rtt=0.01 * which or None)
        elif op == "pair":  # share, join its code, fire: the usual way to relay tokens
            sharer = h.hello(Hello("share", None, (LAN_A,), Endpoint(ip, 4999) if which == 1
                                   else None, 5, relay=True), ip, rtt=0.02)
            welcome = sharer.messages()[0] if sharer.messages() else None
            if welcome is not None and hasattr(welcome, "nameplate"):
                h.hello(Hello("join", welcome.nameplate, (LAN_B,), None, 5, relay=True),
                        IPS[which % 3], rtt=0.03, syn_data=which == 7)
                h.advance(0.05)
        elif op == "join":
            h.hello(Hello("join", plates[which % len(plates)], (LAN_B,),
                          Endpoint(ip, 4999) if which == 5 else None, 5, relay=which % 3 != 0),
                    ip, rtt=0.01 * which or None, syn_data=which == 7)
        elif op == "resume":
            h.hello(Hello("resume", None, (), Endpoint(ip, 4999) if which == 6 else None, 5,
                          resume_id=bytes([which % 2]) * 16,
                          side="share" if which % 4 < 2 else "join",
                          direct_only=which == 4), ip, rtt=0.01 * which or None)
        elif op == "resumes":  # both sides of one resume id, one after the other
            for side in ("share", "join")[::1 if which % 2 else -1]:
                h.hello(Hello("resume", None, (), None, 5, resume_id=bytes([which % 3]) * 16,
                              side=side, direct_only=which == 4),  # type: ignore[arg-type]
                        IPS[(which + len(side)) % 3], rtt=0.02 if which % 4 else None)
            h.advance(0.05)
        elif op == "relay":
            token = (relays[which % len(relays)].token if relays and which != 7
                     else (which + 1).to_bytes(16, "big"))
            ticket = h.m.tickets.get(token)
            relay_conn(h, token, ticket.ip if ticket is not None and which % 4 != 3 else ip)
        elif op == "both" and h.m.sessions:  # both sides of a session, one after the other
            sessions = sorted(h.m.sessions)
            session = h.m.sessions[sessions[which % len(sessions)]]
            for token in session.tokens[::1 if which % 2 else -1]:
                ticket = h.m.tickets.get(token)
                relay_conn(h, token, ticket.ip if ticket is not None else ip)
        elif op == "end" and h.m.sessions:
            live = [sid for sid, sess in h.m.sessions.items() if sess.live]
            if live:
                h.feed(RelayEnded(live[which % len(live)], h.now, which, which))
        elif op == "shutdown" and not shut:
            h.feed(Shutdown(h.now))
            shut = True
        elif target is None or op in ("end", "shutdown", "both"):
            h.connect(ip)
        elif op == "send":
            h.send(target, data)
        else:
            h.fuzz_op(op, target, which, dt)
        h.invariants()
        mach = h.m
        assert 0 <= mach._relay_count <= 2
        assert all(n > 0 for n in mach._relay_sources.values())
        assert mach._relay_count == sum(1 for x in mach.sessions.values()
                                        if x.live or x.waiting is not None)
        assert mach.stats.relay_live == sum(1 for x in mach.sessions.values() if x.live)
        assert not [x for x in h.logs if x.kind == "internal"], h.logs
    event(f"relayed: {min(h.m.stats.relayed, 2)}")
    event(f"resumed: {min(h.m.stats.resumed, 1)}")
    # Sessions end when the driver says so; everything else ends on its own.
    for sid in [sid for sid, x in h.m.sessions.items() if x.live]:
        h.feed(RelayEnded(sid, h.now))
    h.advance(1000)
    assert h.m.stats.open_now == 0 and not h.m.conns and h.m.next_deadline is None
    assert h.m._relay_count == 0 and not h.m._relay_sources and not h.m.resumes
    h.advance(1000)
    h.connect()  # pruning happens as the relay is used
    relay_conn(h, b"\x00" * 16, JOINER_IP)
    assert not h.m.sessions and not h.m.tickets


def test_each_fire_carries_the_peers_nat_report_and_the_rendezvous_predicts() -> None:
    h = harness()
    rst = NatSummary("endpoint-independent", "rst", False, (), None, False)
    symmetric = NatSummary("address-and-port-dependent", "drop", False, (), None, False)
    probe, lan = probe_for(h, SHARER_IP, "stable")
    sharer = h.hello(Hello("share", None, lan, probe, 10, relay=True, nat=rst), SHARER_IP)
    nameplate = sharer.messages()[0].nameplate  # type: ignore[union-attr]
    probe, lan = probe_for(h, JOINER_IP, "unknown")
    joiner = h.hello(Hello("join", nameplate, lan, probe, 10, relay=True, nat=symmetric),
                     JOINER_IP)
    h.advance(1)
    s, j = fires(sharer, joiner)
    assert (s.peer_nat, j.peer_nat) == (symmetric, rst)
    # The joiner made no mapping check (its mapping is "unknown" to the rendezvous): its
    # report names it symmetric, so the relay is predicted, as an INFO note.
    assert h.m.stats.predicted == {"relay": 1}
    [note] = h.m.notes
    assert "predicted path relay: The joiner's NAT is symmetric" in note
    assert not h.logs  # a prediction is no problem


def test_peers_without_reports_still_pair_and_get_no_peer_nat() -> None:
    h = harness()
    _, _, s, j = pair(h)
    assert s.peer_nat is None and j.peer_nat is None
    assert h.m.stats.predicted == {"public": 1}


def test_an_older_peer_without_nat_never_gets_peer_nat_in_its_fire() -> None:
    """An older client rejects a fire with a field it does not know: the new peer's
    report reaches only peers that sent a report (or an empty one) themselves."""
    h = harness()
    rst = NatSummary("endpoint-independent", "rst", False, (), None, False)
    probe, lan = probe_for(h, SHARER_IP, "stable")
    sharer = h.hello(Hello("share", None, lan, probe, 10, relay=True, nat=rst), SHARER_IP)
    nameplate = sharer.messages()[0].nameplate  # type: ignore[union-attr]
    probe, lan = probe_for(h, JOINER_IP, "unknown")
    joiner = h.hello(Hello("join", nameplate, lan, probe, 10, relay=True), JOINER_IP)
    h.advance(1)
    s, j = fires(sharer, joiner)
    assert j.peer_nat is None and b"peer_nat" not in encode(j)
    assert s.peer_nat is None  # the older peer has none to give
    assert h.m.stats.predicted == {"public": 1}


# A peer seen over IPv6 (issue 17) -----------------------------------------------------------

SHARER6, JOINER6 = "2001:db8:a::2", "2001:db8:b::2"
RDV6 = Endpoint("2001:db8:100::2", 3012)  # the harness' IPv6 clients reach us there


@settings(max_examples=150)
@given(sharer_v6=st.booleans(), joiner_v6=st.booleans(), relay=st.booleans(),
       cands=st.sampled_from(["none", "empty", "sharer", "joiner", "both"]),
       sharer_mapping=st.sampled_from(["unknown", "stable", "symmetric"]))
def test_no_ipv4_stage_is_ever_planned_for_a_peer_seen_over_ipv6(
        sharer_v6: bool, joiner_v6: bool, relay: bool, cands: str,
        sharer_mapping: Mapping) -> None:
    h = harness(None if relay else RelayLimits(enabled=False))

    def offered(role: str, ip: str) -> tuple[Candidate, ...] | None:
        if cands == "none":
            return None
        mine = cands in (role, "both")
        return (Candidate("ipv6", Endpoint(ip, 41000)),) if mine else ()

    s_ip, j_ip = (SHARER6 if sharer_v6 else SHARER_IP), (JOINER6 if joiner_v6 else JOINER_IP)
    probe, lan = ((None, ()) if sharer_v6 else probe_for(h, SHARER_IP, sharer_mapping))
    sharer = h.hello(Hello("share", None, lan, probe, 10, relay=True,
                           candidates=offered("sharer", SHARER6)), s_ip)
    welcome = sharer.messages()[0]
    assert isinstance(welcome, Welcome) and welcome.public.host == s_ip
    joiner = h.hello(Hello("join", welcome.nameplate, () if joiner_v6 else (LAN_B,), None, 10,
                           relay=True, candidates=offered("joiner", JOINER6)), j_ip)
    h.advance(1)
    h.invariants()
    last_s, last_j = sharer.last(), joiner.last()
    if not (sharer_v6 or joiner_v6):
        return  # the IPv4 plans, tested above
    if isinstance(last_s, ErrorReply):  # no relay, and no IPv6 pair: refused, both
        assert isinstance(last_j, ErrorReply) and last_s == last_j
        assert last_s.code == "symmetric_nat" and "over IPv6 only" in last_s.message
        assert not relay and cands != "both"
        return
    s, j = fires(sharer, joiner)
    assert s.plan == j.plan == ()  # no LAN or public stage: nothing IPv4 to punch
    assert (s.public.host, s.peer_public.host, j.public.host) == (s_ip, j_ip, j_ip)
    assert (s.relay is not None) == (j.relay is not None) == relay
    for fire, v6 in ((s, sharer_v6), (j, joiner_v6)):
        if fire.relay is not None:  # the relay in the receiving peer's own family
            assert fire.relay.relay == (RDV6 if v6 else Endpoint(*RDV))
        assert fire.note is not None and "over IPv6 only" in fire.note
    if not relay:
        assert cands == "both" and s.peer_candidates and j.peer_candidates


PUBLIC4, PUBLIC6 = Endpoint("192.0.2.80", 443), Endpoint("2001:db8:ff::80", 443)


@pytest.mark.parametrize("configured", [(PUBLIC4,), (PUBLIC6,), (PUBLIC4, PUBLIC6)])
def test_configured_relay_addresses_are_given_per_family(
        configured: tuple[Endpoint, ...]) -> None:
    # nopf-server --relay-address IP:PORT --relay-address [IPv6]:PORT: each peer gets
    # the one of its own family, or (none of it configured) ours as it reached us.
    h = harness(RelayLimits(addresses=configured))
    sharer = h.hello(Hello("share", None, (LAN_A,), None, 10, relay=True), SHARER_IP)
    welcome = sharer.messages()[0]
    assert isinstance(welcome, Welcome)
    joiner = h.hello(Hello("join", welcome.nameplate, (), None, 10, relay=True), JOINER6)
    h.advance(1)
    s, j = fires(sharer, joiner)
    assert s.relay is not None and j.relay is not None
    assert s.relay.relay == (PUBLIC4 if PUBLIC4 in configured else Endpoint(*RDV))
    assert j.relay.relay == (PUBLIC6 if PUBLIC6 in configured else RDV6)


def test_one_relay_address_per_family() -> None:
    with pytest.raises(ValueError, match="one relay address per family"):
        RelayLimits(addresses=(PUBLIC4, Endpoint("192.0.2.81", 443)))


@pytest.mark.parametrize(("mapped_ip", "left_to_candidates"), [
    (JOINER_IP, True),  # the connector's gateway maps on the address we see it at
    ("100.64.7.7", False),  # behind another NAT: of no use, the pair is refused
])
def test_a_direct_only_resume_no_punch_can_connect_is_left_to_a_mapped_port(
        mapped_ip: str, left_to_candidates: bool) -> None:
    h = harness()
    sharer = h.hello(Hello("resume", None, (LAN_A,), Endpoint(SHARER_IP, 4999), 10,
                           resume_id=RID, side="share", direct_only=True, candidates=()),
                     SHARER_IP)  # symmetric: its probe's port is not the one we see
    mapped = Candidate("mapped", Endpoint(mapped_ip, 46000))
    joiner = h.hello(Hello("resume", None, (LAN_B,), None, 10, resume_id=RID, side="join",
                           direct_only=True, candidates=(mapped,)), JOINER_IP)
    h.advance(1)
    if not left_to_candidates:
        assert error_of(sharer).code == error_of(joiner).code == "symmetric_nat"
        return
    s, j = fires(sharer, joiner)
    assert s.plan == j.plan == () and s.relay is None and j.relay is None
    assert s.peer_candidates == (mapped,) and j.peer_candidates == ()
    assert s.note is not None and s.note.endswith("only their own candidates (IPv6, a "
                                                  "mapped port) can")
