"""Direct candidates (issue 17): the hello's and the fire's fields, the rendezvous
passing them through, the ladder's IPv6 and mapped-port rungs, and which IPv6
addresses a host offers."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, strategies as st

from nopf_web.punch.machine import Failure, PunchTimeout
from nopf_web.sessions.candidates import parse_if_inet6
from nopf_web.sessions.coordination_machine import (
    AwaitMapped,
    CoordinationConfig,
    Gathered,
    OpenPath,
    Punch,
    Succeed,
    ViaRelay,
    path_words,
)
from nopf_web.wire.address import Endpoint
from nopf_web.wire.rendezvous import (
    Candidate,
    Fire,
    Hello,
    MessageError,
    RelayStage,
    Stage,
    Welcome,
    decode_client_message,
    decode_server_message,
    encode,
)

from .coordination_peer import LOCAL, PEER, PUBLIC, Peer, frames, reply

V6_US = Endpoint("2001:db8:a::2", 41000)
V6_PEER = Endpoint("2001:db8:b::2", 42000)
MAPPED = Endpoint(PUBLIC.host, 45000)
PEER_MAPPED = Endpoint(PEER.host, 46000)
RELAY = RelayStage(Endpoint("198.51.100.2", 3012), 5.0, bytes(16))


# -- the wire -----------------------------------------------------------------------------


def test_hello_and_fire_carry_candidates_and_say_nothing_without_them() -> None:
    cands = (Candidate("ipv6", V6_US), Candidate("mapped", MAPPED))
    hello = Hello("share", None, (Endpoint(LOCAL, 4000),), PUBLIC, 15.0, relay=True,
                  candidates=cands)
    data = encode(hello)
    assert b'"candidates":[{"path":"ipv6","peer":"[2001:db8:a::2]:41000"},' \
           b'{"path":"mapped","peer":"203.0.113.2:45000"}]' in data
    assert decode_client_message(data[4:]) == hello
    empty = Hello("join", 7, (), None, 15.0, relay=True, candidates=())
    assert b'"candidates":[]' in encode(empty)  # present and empty: "I race candidates"
    assert decode_client_message(encode(empty)[4:]) == empty
    assert b"candidates" not in encode(Hello("join", 7, (), None, 15.0, relay=True))
    fire = Fire(PUBLIC, PEER, (), 40.0, relay=RELAY, peer_candidates=cands)
    assert decode_server_message(encode(fire)[4:]) == fire
    assert b"peer_candidates" not in encode(Fire(PUBLIC, PEER, (), 40.0, relay=RELAY))


@pytest.mark.parametrize(("entry", "says"), [
    ('{"path":"ipv6","peer":"[fe80::1]:4000"}', "not a global unicast IPv6 address"),
    ('{"path":"ipv6","peer":"[fd00::1]:4000"}', "not a global unicast IPv6 address"),
    ('{"path":"ipv6","peer":"[::ffff:1.2.3.4]:4000"}', "not a global unicast IPv6 address"),
    ('{"path":"ipv6","peer":"2001:db8::1:4000"}', "is not [IPv6]:PORT"),
    ('{"path":"ipv6","peer":"[2001:db8::1%eth0]:4000"}', "is not [IPv6]:PORT"),  # no zone id
    ('{"path":"ipv6","peer":"[::]:4000"}', "cannot be a peer address"),
    ('{"path":"ipv6","peer":"[2001:db8::1]:0"}', "out of range"),
    ('{"path":"mapped","peer":"[2001:db8::1]:4000"}', "not an IPv4 address"),
    ('{"path":"public","peer":"1.2.3.4:4000"}', "is not one of ipv6, mapped"),
    ('{"path":"ipv6","peer":"[2001:db8::1]:4000","x":1}', "unknown field"),
])
def test_bad_candidates_are_named(entry: str, says: str) -> None:
    payload = ('{"type":"hello","version":2,"action":"join","nameplate":7,"lan":[],'
               f'"probe":null,"punch_timeout":15,"candidates":[{entry}]}}').encode()
    with pytest.raises(MessageError, match=says.replace("[", r"\[").replace("]", r"\]")):
        decode_client_message(payload)


def test_null_or_too_many_candidates_are_refused() -> None:
    base = ('{"type":"hello","version":2,"action":"join","nameplate":7,"lan":[],'
            '"probe":null,"punch_timeout":15,"candidates":')
    with pytest.raises(MessageError, match="list or absent"):
        decode_client_message((base + "null}").encode())
    many = ",".join(['{"path":"mapped","peer":"1.2.3.4:5"}'] * 9)
    with pytest.raises(MessageError, match="at most 8"):
        decode_client_message((base + f"[{many}]}}").encode())


# -- the ladder -----------------------------------------------------------------------------


def sharer(gathered: Gathered | None) -> Peer:
    p = Peer("server", punch_timeout=30.0, candidates=gathered)  # type: ignore[arg-type]
    p.start()
    p.probe()
    p.connect()
    return p


def fired(p: Peer, theirs: tuple[Candidate, ...] | None, *, plan: tuple[Stage, ...] = (),
          relay: RelayStage | None = RELAY, rtt_ms: float = 40.0) -> list[OpenPath]:
    conn = max(p.ports)  # the hello's connection
    p.says(conn, reply() + frames(Welcome(7, 600.0, PUBLIC), Fire(
        PUBLIC, PEER, plan, rtt_ms, relay=relay, peer_candidates=theirs)))
    return [a for a in p.actions if isinstance(a, OpenPath)]


def test_the_hello_offers_ipv6_and_a_mapping_the_rendezvous_sees() -> None:
    p = sharer(Gathered((V6_US,), MAPPED, 5555))
    [hello] = p.client_frames(max(p.ports))
    assert isinstance(hello, Hello)
    assert hello.candidates == (Candidate("ipv6", V6_US), Candidate("mapped", MAPPED))
    assert f"offering the mapped port {MAPPED} (local port 5555)" in p.said()


def test_a_mapping_whose_address_the_rendezvous_does_not_see_is_not_offered() -> None:
    p = sharer(Gathered((), Endpoint("100.64.7.7", 45000), 5555))
    [hello] = p.client_frames(max(p.ports))
    assert isinstance(hello, Hello) and hello.candidates == ()
    assert any(s.startswith("not offering the mapped port 100.64.7.7:45000: the gateway's "
                            f"public address is not {PUBLIC.host}") for s in p.said())


def test_without_gathered_candidates_the_hello_is_as_before() -> None:
    p = sharer(None)
    [hello] = p.client_frames(max(p.ports))
    assert isinstance(hello, Hello) and hello.candidates is None


def test_ipv6_then_mapped_then_the_plan_one_rung_at_a_time() -> None:
    p = sharer(Gathered((V6_US,), MAPPED, 5555))
    public = Stage("public", PEER, "arm", 4.0)
    [first] = fired(p, (Candidate("ipv6", V6_PEER),), plan=(public,), rtt_ms=100.0)
    assert isinstance(first.how, Punch)
    assert first.how.local == V6_US and first.how.stage == Stage("ipv6", V6_PEER, "arm", 2.4)
    assert not first.how.config.first_shot and first.how.config.timeout == pytest.approx(2.4)
    assert first.how.config.arm_ttl == 2
    timeout = PunchTimeout("no SYN", Counter({Failure.SILENT: 2}))
    p.feed(p.machine.path_failed(first.path, timeout, 2.4))
    assert "no IPv6 path: no SYN" in p.said()
    second = [a for a in p.actions if isinstance(a, OpenPath)][-1]
    assert second.how == AwaitMapped(5555, PEER.host, 2.4)  # the sharer's mapping: it waits
    p.feed(p.machine.path_failed(second.path, timeout, 4.8))
    third = [a for a in p.actions if isinstance(a, OpenPath)][-1]
    assert isinstance(third.how, Punch) and third.how.stage == public
    p.feed(p.machine.path_failed(third.path, timeout, 8.8))
    last = [a for a in p.actions if isinstance(a, OpenPath)][-1]
    assert isinstance(last.how, ViaRelay)


def test_a_joiner_connects_to_the_sharers_mapped_port_and_says_so() -> None:
    p = Peer("client", punch_timeout=30.0, candidates=Gathered())  # type: ignore[arg-type]
    p.start()
    conn = p.connect()
    p.says(conn, reply() + frames(Fire(PUBLIC, PEER, (), 10.0, relay=RELAY,
                                       peer_candidates=(Candidate("mapped", PEER_MAPPED),))))
    [opened] = [a for a in p.actions if isinstance(a, OpenPath)]
    assert isinstance(opened.how, Punch)
    assert opened.how.stage == Stage("mapped", PEER_MAPPED, "connect", 2.04)
    assert opened.how.local == Endpoint("0.0.0.0", 0)  # any port: no NAT mapping to keep
    p.feed(p.machine.path_opened(opened.path, 1.0, local=Endpoint(LOCAL, 40999)))
    succeed = p.last(Succeed)
    assert succeed.paired.path == "mapped" and succeed.paired.peer == PEER_MAPPED
    assert succeed.paired.local == Endpoint(LOCAL, 40999)
    assert f"tunnel up to {PEER_MAPPED} over a mapped port" in p.said()


def test_no_candidate_rungs_unless_both_sides_race_candidates() -> None:
    p = sharer(Gathered((V6_US,), MAPPED, 5555))
    [only] = fired(p, None)  # the peer's hello had no "candidates"
    assert isinstance(only.how, ViaRelay)


def test_a_lan_stage_stays_first() -> None:
    p = sharer(Gathered((V6_US,)))
    lan = Stage("lan", Endpoint("10.0.0.3", 4000), "arm", 1.0)
    [first] = fired(p, (Candidate("ipv6", V6_PEER),), plan=(lan,))
    assert isinstance(first.how, Punch) and first.how.stage == lan


@given(ours=st.booleans(), v6=st.booleans(), theirs=st.sampled_from([None, "seen", "other"]))
def test_both_peers_build_the_same_rungs(ours: bool, v6: bool, theirs: str | None) -> None:
    """Each peer derives its rungs from (its list, the other's list): the paths line up.
    A joiner's mapping (``theirs``) is offered before it knows its public address: at the
    fire both apply the rule to it, so one on another address ("other") is used by
    neither."""
    s_cands = Gathered((V6_US,) if v6 else (), MAPPED if ours else None, 5555)
    j_mapped = {None: None, "seen": PEER_MAPPED, "other": Endpoint("100.64.7.7", 46000)}
    j_cands = Gathered((V6_PEER,) if v6 else (), j_mapped[theirs], 6666)
    s = sharer(s_cands)
    s_said = s.client_frames(max(s.ports))[0]
    assert isinstance(s_said, Hello) and s_said.candidates is not None
    j = Peer("client", punch_timeout=30.0, candidates=j_cands)  # type: ignore[arg-type]
    j.start()
    conn = j.connect()
    j_hello = j.client_frames(conn)[0]
    assert isinstance(j_hello, Hello) and j_hello.candidates is not None
    s_paths = fired(s, j_hello.candidates)
    # The joiner's fire: its own public address (PEER), the sharer's (PUBLIC).
    j.says(conn, reply(PEER) + frames(Fire(PEER, PUBLIC, (), 40.0, relay=RELAY,
                                           peer_candidates=s_said.candidates)))
    j_paths = [a for a in j.actions if isinstance(a, OpenPath)]
    def kind(o: OpenPath) -> str:
        return (o.how.stage.path if isinstance(o.how, Punch)
                else "mapped" if isinstance(o.how, AwaitMapped) else "relay")

    assert kind(s_paths[0]) == kind(j_paths[0])
    mapped = ours or theirs == "seen"
    assert kind(s_paths[0]) == ("ipv6" if v6 else "mapped" if mapped else "relay")
    if theirs is not None:
        assert any(c.path == "mapped" for c in j_hello.candidates)  # offered, unchecked
    if theirs == "other":
        assert any(line.startswith("not using our mapped port 100.64.7.7:46000: the "
                                   f"gateway's public address is not {PEER.host}")
                   for line in j.said())
    if not v6 and not ours and theirs == "seen":
        # The sharer (no mapping of its own) dials the joiner's mapped port from any port;
        # the joiner accepts it on its mapped port's listener, from the sharer's IP only.
        assert isinstance(s_paths[0].how, Punch)
        assert s_paths[0].how.stage == Stage("mapped", PEER_MAPPED, "connect", 2.16)
        assert j_paths[0].how == AwaitMapped(6666, PUBLIC.host, 2.16)


def test_path_words() -> None:
    assert path_words("ipv6", None) == "over IPv6"
    assert path_words("mapped", None) == "over a mapped port"


# -- which IPv6 addresses a host offers ------------------------------------------------------


def test_only_stable_global_addresses_are_offered() -> None:
    table = "\n".join([
        "20010db8000a00000000000000000002 02 40 00 80     eth0",  # permanent: offered
        "20010db8000a000012345678abcdef01 02 40 00 01     eth0",  # temporary (privacy)
        "20010db8000a00000000000000000003 02 40 00 20     eth0",  # deprecated
        "20010db8000a00000000000000000004 02 40 00 40     eth0",  # tentative
        "fe80000000000000e0b64dfffe825deb 02 40 20 80     eth0",  # link-local
        "fd000000000000000000000000000001 02 40 00 80     eth0",  # unique local
        "00000000000000000000000000000001 01 80 10 80       lo",  # loopback
        "20010db8000b00000000000000000002 03 40 00 00     eth1",  # dynamic (SLAAC): offered
        "garbage",
    ])
    assert parse_if_inet6(table) == ["2001:db8:a::2", "2001:db8:b::2"]


def test_config_without_candidates_is_the_default() -> None:
    assert CoordinationConfig(role="server", where="x").candidates is None
