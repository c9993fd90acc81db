"""The coordinated-mode codec: round trips, strict validation, fuzzing."""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import json
import re
import struct

import pytest
from hypothesis import given, strategies as st

from nopf_web.errors import NopfError
from nopf_web.wire.address import Endpoint
from nopf_web.wire.rendezvous import (
    MAX_FRAME,
    Candidate,
    ErrorReply,
    Fire,
    FrameReader,
    Hello,
    Mapping,
    Message,
    MessageError,
    PakeMessage,
    Ping,
    Pong,
    Probe,
    Relay,
    Relayed,
    RelayStage,
    Stage,
    UnsupportedVersion,
    Welcome,
    decode_client_message,
    decode_server_message,
    encode,
)

endpoints = st.builds(
    Endpoint,
    st.tuples(st.integers(1, 223), st.integers(0, 255), st.integers(0, 255),
              st.integers(0, 254)).map(lambda t: ".".join(map(str, t))),
    st.integers(1, 65535),
)
seconds = st.floats(0.1, 3600, allow_nan=False)
texts = st.text(st.characters(min_codepoint=32, max_codepoint=0x2FFF,
                              blacklist_categories=("Cs", "Cc", "Zl", "Zp", "Cf", "Co",
                                                    "Cn", "Zs")),
                min_size=1, max_size=300)
pakes = st.binary(min_size=33, max_size=33)
mappings: st.SearchStrategy[Mapping] = st.sampled_from(["none", "stable", "symmetric",
                                                       "unknown"])
ids16 = st.binary(min_size=16, max_size=16)
# Global unicast IPv6 (2000::/3), as the codec accepts it, in its one spelling.
v6_endpoints = st.builds(
    Endpoint,
    st.integers(0x2000 << 112, (0x4000 << 112) - 1).map(
        lambda n: str(ipaddress.IPv6Address(n))),
    st.integers(1, 65535))
candidate_lists = st.none() | st.lists(
    st.builds(Candidate, st.just("ipv6"), v6_endpoints)
    | st.builds(Candidate, st.just("mapped"), endpoints), max_size=8).map(tuple)
hellos = st.one_of(
    st.builds(Hello, st.just("share"), st.none(), st.lists(endpoints, max_size=8).map(tuple),
              st.none() | endpoints, seconds, relay=st.booleans(), candidates=candidate_lists),
    st.builds(Hello, st.sampled_from(["join", "reshare", "rejoin"]), st.integers(1, 999_999),
              st.lists(endpoints, max_size=8).map(tuple), st.none() | endpoints, seconds,
              pake=st.none() | pakes, relay=st.booleans(), candidates=candidate_lists),
    st.builds(Hello, st.just("share"), st.none() | st.integers(1, 999_999),
              st.lists(endpoints, max_size=8).map(tuple), st.none() | endpoints, seconds,
              relay=st.booleans(), owner=ids16, candidates=candidate_lists),
    st.builds(Hello, st.just("resume"), st.none(), st.lists(endpoints, max_size=8).map(tuple),
              st.none() | endpoints, seconds, resume_id=ids16,
              side=st.sampled_from(["share", "join"]), direct_only=st.booleans(),
              candidates=candidate_lists),
)
# What the rendezvous observed may be IPv6 too (a peer that reached it over IPv6): any
# address but the unspecified and the multicast ones.
observed = endpoints | st.builds(
    Endpoint, st.integers(1, (0xFF00 << 112) - 1).map(lambda n: str(ipaddress.IPv6Address(n))),
    st.integers(1, 65535))
stages = st.builds(Stage, st.sampled_from(["public", "lan"]), endpoints,
                   st.sampled_from(["arm", "connect"]), seconds)
relay_stages = st.builds(RelayStage, observed, seconds, ids16)
client_msgs = st.one_of(hellos, st.builds(Pong, st.integers(0, 2**31 - 1)), st.just(Probe()),
                        st.builds(PakeMessage, pakes), st.builds(Relay, ids16))


@st.composite
def fires(draw: st.DrawFn) -> Fire:
    relay = draw(st.none() | relay_stages)
    cands = draw(candidate_lists)
    # No stage at all only beside the peer's candidates (an IPv6 pair without relay).
    plan = tuple(draw(st.lists(stages, min_size=0 if relay or cands is not None else 1,
                               max_size=7 if relay else 8)))
    return Fire(draw(observed), draw(observed), plan, draw(st.floats(0, 10_000)),
                draw(st.none() | texts), draw(st.none() | pakes),
                draw(st.none() | st.tuples(mappings, mappings)), relay,
                peer_candidates=cands)


server_msgs = st.one_of(
    st.builds(Welcome, st.integers(1, 999_999), st.floats(0, 3600), observed),
    st.builds(Ping, st.integers(0, 2**31 - 1)),
    fires(),
    st.builds(ErrorReply, st.sampled_from(["expired", "used", "unknown_code", "relay_refused"]),
              texts),
    st.just(Relayed()),
)


def frame(obj: object) -> bytes:
    payload = json.dumps(obj).encode()
    return struct.pack("!I", len(payload)) + payload


@given(client_msgs)
def test_client_messages_round_trip(msg: Message) -> None:
    (payload,) = FrameReader().feed(encode(msg))
    assert decode_client_message(payload) == msg


@given(server_msgs)
def test_server_messages_round_trip(msg: Message) -> None:
    (payload,) = FrameReader().feed(encode(msg))
    assert decode_server_message(payload) == msg


@given(st.lists(client_msgs, min_size=1, max_size=5), st.data())
def test_frames_split_anywhere_reassemble(msgs: list[Message], data: st.DataObject) -> None:
    stream = b"".join(encode(m) for m in msgs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    reader = FrameReader()
    out: list[bytes] = []
    for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        out += reader.feed(stream[a:b])
    assert [decode_client_message(p) for p in out] == msgs
    assert reader.buffered == 0


@given(st.binary(max_size=600))
def test_arbitrary_bytes_only_ever_raise_message_error(data: bytes) -> None:
    try:
        for payload in FrameReader().feed(data):
            decode_client_message(payload)
    except MessageError as exc:
        assert isinstance(exc, NopfError) and str(exc)


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                    lambda c: st.lists(c) | st.dictionaries(st.text(), c), max_leaves=20))
def test_arbitrary_json_only_ever_raises_message_error(obj: object) -> None:
    for decode in (decode_client_message, decode_server_message):
        with contextlib.suppress(MessageError):
            decode(json.dumps(obj).encode())


@given(st.dictionaries(st.sampled_from(["type", "version", "action", "nameplate", "lan",
                                        "probe", "punch_timeout", "seq", "extra"]),
                       st.none() | st.booleans() | st.integers(-5, 10**7) | st.text(max_size=30)
                       | st.lists(st.text(max_size=25), max_size=10)))
def test_hello_like_objects_decode_or_fail_cleanly(obj: dict[str, object]) -> None:
    try:
        msg = decode_client_message(json.dumps({"type": "hello", **obj}).encode())
    except MessageError:
        return
    assert isinstance(msg, Hello | Pong | Probe | PakeMessage | Relay)


@pytest.mark.parametrize(("obj", "needle"), [
    ({"type": "hello", "version": 2, "action": "join", "nameplate": None, "lan": [],
      "probe": None, "punch_timeout": 30}, "required to join"),
    ({"type": "hello", "version": 2, "action": "share", "nameplate": None, "lan": [],
      "probe": None, "punch_timeout": True}, "must be a number"),
    ({"type": "hello", "version": 2, "action": "share", "nameplate": 5, "lan": [],
      "probe": None, "punch_timeout": 30}, "must be null to share"),
    ({"type": "hello", "version": 2, "action": "share", "lan": ["10.0.0.1:0"],
      "punch_timeout": 30}, "hello.lan"),
    ({"type": "hello", "version": 2, "action": "dance", "punch_timeout": 30}, "not one of"),
    ({"type": "pong", "seq": 1, "spare": 0}, "unknown field(s): spare"),
    ({"type": "pong", "seq": True}, "must be an integer"),
    ({"type": "ping", "seq": 1}, "unexpected message type 'ping'"),
    ({"type": "hello", "version": 2, "action": "share", "punch_timeout": 30,
      "pake": base64.b64encode(b"A" * 33).decode()}, "hello.pake must be absent to share"),
    ({"type": "pake", "pake": base64.b64encode(b"A" * 32).decode()}, "exactly 33 bytes"),
    ({"type": "pake", "pake": base64.b64encode(b"A" * 34).decode()}, "must be 44 characters"),
    ({"type": "pake", "pake": "!" * 44}, "not valid base64"),
    ({"type": "pake", "pake": None}, "pake.pake must be 44 characters"),
    ([1, 2], "must be a JSON object"),
    ({"type": "hello", "version": 2, "action": "join", "nameplate": 5, "punch_timeout": 30,
      "owner": base64.b64encode(b"o" * 16).decode()}, "hello.owner belongs to a share hello"),
    ({"type": "hello", "version": 2, "action": "share", "nameplate": None, "punch_timeout": 30,
      "owner": base64.b64encode(b"o" * 15).decode()}, "hello.owner must be 24 characters"),
    ({"type": "hello", "version": 2, "action": "resume", "resume_id": "A" * 22 + "==",
      "side": "share", "direct_only": False, "punch_timeout": 30,
      "owner": base64.b64encode(b"o" * 16).decode()}, "hello.owner must be absent to resume"),
])
def test_precise_errors(obj: object, needle: str) -> None:
    with pytest.raises(MessageError, match=None) as info:
        (payload,) = FrameReader().feed(frame(obj))
        decode_client_message(payload)
    assert needle in str(info.value)


def test_other_version_is_named() -> None:
    with pytest.raises(UnsupportedVersion) as info:
        decode_client_message(json.dumps({"type": "hello", "version": 3}).encode())
    assert info.value.version == 3 and "version 3" in str(info.value)


def test_duplicate_keys_nan_and_bad_utf8_are_rejected() -> None:
    for payload, needle in ((b'{"type":"pong","seq":1,"seq":2}', "duplicate"),
                            (b'{"type":"pong","seq":NaN}', "NaN"),
                            (b'\xff\xfe', "UTF-8")):
        with pytest.raises(MessageError, match=needle):
            decode_client_message(payload)


def test_oversize_or_empty_frames_fail_on_the_header() -> None:
    for size in (0, MAX_FRAME + 1, 0x47455420):  # "GET " as a length
        with pytest.raises(MessageError, match="out of range"):
            FrameReader().feed(struct.pack("!I", size))


def test_encode_refuses_what_decode_would_reject() -> None:
    with pytest.raises(MessageError):
        encode(ErrorReply("nonsense", "x"))
    with pytest.raises(MessageError):
        encode(ErrorReply("used", "two\nlines"))


def test_pake_fields_are_absent_not_null_when_unused() -> None:
    """A client or rendezvous without SPAKE2 forwarding rejects unknown fields, so a
    message without a SPAKE2 message must look exactly as before the field existed."""
    hello = Hello("join", 7, (), None, 30.0)
    fire = Fire(Endpoint("192.0.2.1", 1), Endpoint("192.0.2.2", 2),
                (Stage("public", Endpoint("192.0.2.2", 2), "connect", 5.0),), 40.0)
    for msg in (hello, fire):
        (payload,) = FrameReader().feed(encode(msg))
        assert b"pake" not in payload
    with_pake = Hello("join", 7, (), None, 30.0, pake=bytes(range(33)))
    (payload,) = FrameReader().feed(encode(with_pake))
    assert json.loads(payload)["pake"] == base64.b64encode(bytes(range(33))).decode()
    assert decode_client_message(payload) == with_pake


def test_fire_mapping_is_structured_and_decides_hopelessness() -> None:
    """Programs decide on the fire's mapping field, never on its note's text."""
    stage = (Stage("public", Endpoint("192.0.2.2", 2), "connect", 5.0),)
    base = Fire(Endpoint("192.0.2.1", 1), Endpoint("192.0.2.2", 2), stage, 40.0,
                note="any text, symmetric or not")
    assert not base.hopeless  # no mapping: the note alone decides nothing
    cases: dict[tuple[Mapping, Mapping], bool] = {
        ("symmetric", "stable"): True, ("stable", "symmetric"): True,
        ("symmetric", "none"): False, ("stable", "stable"): False, ("unknown", "stable"): False}
    for mapping, hopeless in cases.items():
        fire = Fire(base.public, base.peer_public, stage, 40.0, None, None, mapping)
        (payload,) = FrameReader().feed(encode(fire))
        assert json.loads(payload)["mapping"] == {"you": mapping[0], "peer": mapping[1]}
        decoded = decode_server_message(payload)
        assert decoded == fire and isinstance(decoded, Fire)
        assert decoded.hopeless is hopeless
    bad = json.loads(FrameReader().feed(encode(base))[0])
    for wrong in ({"you": "cone", "peer": "none"}, {"you": "none"}, ["none", "none"],
                  {"you": "none", "peer": "none", "extra": 1}):
        bad["mapping"] = wrong
        with pytest.raises(MessageError):
            decode_server_message(frame(bad)[4:])


# Rendezvous v2 additions: resume hellos, relay stages, the relay messages ------------------


def test_messages_without_the_additions_are_what_they_always_were() -> None:
    """Byte for byte what the codec sent before relays and resumes existed (golden bytes
    taken from that codec)."""
    e = Endpoint
    golden: list[tuple[Message, bytes]] = [
        (Hello("share", None, (e("10.0.1.2", 4000),), e("203.0.113.2", 40001), 15.0),
         b'\x00\x00\x00\x87{"type":"hello","version":2,"action":"share","nameplate":null,'
         b'"lan":["10.0.1.2:4000"],"probe":"203.0.113.2:40001","punch_timeout":15.0}'),
        (Hello("join", 7, (e("10.0.2.2", 5000),), None, 7.5, pake=bytes(range(33))),
         b'\x00\x00\x00\xa9{"type":"hello","version":2,"action":"join","nameplate":7,'
         b'"lan":["10.0.2.2:5000"],"probe":null,"punch_timeout":7.5,'
         b'"pake":"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8g"}'),
        (Hello("rejoin", 123456, (), e("198.51.100.7", 1), 3.0),
         b'\x00\x00\x00w{"type":"hello","version":2,"action":"rejoin","nameplate":123456,'
         b'"lan":[],"probe":"198.51.100.7:1","punch_timeout":3.0}'),
        (Fire(e("192.0.2.1", 1), e("192.0.2.2", 2),
              (Stage("lan", e("10.0.0.2", 3), "arm", 1.5),
               Stage("public", e("192.0.2.2", 2), "connect", 5.0)),
              40.0, "note", bytes(33), ("stable", "symmetric")),
         b'\x00\x00\x01T{"type":"fire","public":"192.0.2.1:1","peer_public":"192.0.2.2:2",'
         b'"plan":[{"path":"lan","peer":"10.0.0.2:3","punch":"arm","budget":1.5},'
         b'{"path":"public","peer":"192.0.2.2:2","punch":"connect","budget":5.0}],'
         b'"rtt_ms":40.0,"note":"note","peer_pake":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",'
         b'"mapping":{"you":"stable","peer":"symmetric"}}'),
        (Fire(e("192.0.2.1", 1), e("192.0.2.2", 2),
              (Stage("public", e("192.0.2.2", 2), "arm", 5.0),), 12.5),
         b'\x00\x00\x00\xa7{"type":"fire","public":"192.0.2.1:1","peer_public":"192.0.2.2:2",'
         b'"plan":[{"path":"public","peer":"192.0.2.2:2","punch":"arm","budget":5.0}],'
         b'"rtt_ms":12.5,"note":null}'),
        (ErrorReply("symmetric_nat", "both peers are behind symmetric NATs"),
         b'\x00\x00\x00X{"type":"error","code":"symmetric_nat",'
         b'"message":"both peers are behind symmetric NATs"}'),
        (Welcome(42, 600.0, e("203.0.113.2", 40001)),
         b'\x00\x00\x00Q{"type":"welcome","nameplate":42,"expires_in":600.0,'
         b'"public":"203.0.113.2:40001"}'),
        (Ping(3), b'\x00\x00\x00\x17{"type":"ping","seq":3}'),
        (Pong(3), b'\x00\x00\x00\x17{"type":"pong","seq":3}'),
        (Probe(), b'\x00\x00\x00\x1c{"type":"probe","version":2}'),
        (PakeMessage(bytes(33)),
         b'\x00\x00\x00E{"type":"pake","pake":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"}'),
    ]
    for msg, data in golden:
        assert encode(msg) == data


def test_the_additions_on_the_wire() -> None:
    e = Endpoint
    token, rid = bytes(range(16)), bytes(range(16, 32))
    cases: list[tuple[Message, dict[str, object]]] = [
        (Hello("join", 7, (), None, 5.0, relay=True),
         {"type": "hello", "version": 2, "action": "join", "nameplate": 7, "lan": [],
          "probe": None, "punch_timeout": 5.0, "relay": True}),
        (Hello("resume", None, (e("10.0.1.2", 4000),), None, 8.0, resume_id=rid, side="join",
               direct_only=True),
         {"type": "hello", "version": 2, "action": "resume",
          "resume_id": base64.b64encode(rid).decode(), "side": "join", "direct_only": True,
          "lan": ["10.0.1.2:4000"], "probe": None, "punch_timeout": 8.0}),
        (Relay(token), {"type": "relay", "version": 2, "token": "AAECAwQFBgcICQoLDA0ODw=="}),
        (Relayed(), {"type": "relayed"}),
        (Fire(e("192.0.2.1", 1), e("192.0.2.2", 2),
              (Stage("public", e("192.0.2.2", 2), "arm", 3.2),), 40.0,
              relay=RelayStage(e("198.51.100.2", 3012), 11.8, token)),
         {"type": "fire", "public": "192.0.2.1:1", "peer_public": "192.0.2.2:2",
          "plan": [{"path": "public", "peer": "192.0.2.2:2", "punch": "arm", "budget": 3.2},
                   {"path": "relay", "peer": "198.51.100.2:3012", "punch": "connect",
                    "budget": 11.8, "token": "AAECAwQFBgcICQoLDA0ODw=="}],
          "rtt_ms": 40.0, "note": None}),
        (Fire(e("192.0.2.1", 1), e("192.0.2.2", 2), (), 40.0,
              relay=RelayStage(e("198.51.100.2", 3012), 15.0, token)),
         {"type": "fire", "public": "192.0.2.1:1", "peer_public": "192.0.2.2:2",
          "plan": [{"path": "relay", "peer": "198.51.100.2:3012", "punch": "connect",
                    "budget": 15.0, "token": "AAECAwQFBgcICQoLDA0ODw=="}],
          "rtt_ms": 40.0, "note": None}),
    ]
    for msg, obj in cases:
        (payload,) = FrameReader().feed(encode(msg))
        assert json.loads(payload) == obj
        decoded = (decode_client_message(payload) if isinstance(msg, Hello | Relay)
                   else decode_server_message(payload))
        assert decoded == msg


def test_only_resume_hellos_are_relay_capable_by_default() -> None:
    assert not Hello("join", 7, (), None, 5.0).relay_capable
    assert Hello("join", 7, (), None, 5.0, relay=True).relay_capable
    resume = Hello("resume", None, (), None, 5.0, resume_id=bytes(16), side="share")
    assert resume.relay_capable
    assert not Hello("resume", None, (), None, 5.0, resume_id=bytes(16), side="share",
                     direct_only=True).relay_capable


RID = base64.b64encode(bytes(16)).decode()
TOKEN = RID
RESUME = {"type": "hello", "version": 2, "action": "resume", "resume_id": RID, "side": "share",
          "direct_only": False, "lan": [], "probe": None, "punch_timeout": 5}
RELAY_STAGE = {"path": "relay", "peer": "198.51.100.2:3012", "punch": "connect", "budget": 5,
               "token": TOKEN}
PUBLIC_STAGE = {"path": "public", "peer": "192.0.2.2:2", "punch": "arm", "budget": 5}
FIRE = {"type": "fire", "public": "192.0.2.1:1", "peer_public": "192.0.2.2:2",
        "plan": [PUBLIC_STAGE, RELAY_STAGE], "rtt_ms": 40, "note": None}


@pytest.mark.parametrize(("obj", "needle"), [
    ({**RESUME, "nameplate": None}, "hello.nameplate must be absent to resume"),
    ({**RESUME, "pake": base64.b64encode(bytes(33)).decode()}, "hello.pake must be absent"),
    ({**RESUME, "relay": True}, "hello.relay must be absent to resume"),
    ({k: v for k, v in RESUME.items() if k != "resume_id"}, "lacks field 'resume_id'"),
    ({**RESUME, "resume_id": base64.b64encode(bytes(17)).decode()},
     "must encode exactly 16 bytes"),
    ({**RESUME, "resume_id": base64.b64encode(bytes(15)).decode()}, "must be 24 characters"),
    ({**RESUME, "resume_id": RID.replace("==", "A=")}, "hello.resume_id must encode exactly"),
    ({**RESUME, "side": "server"}, "hello.side = 'server' is not one of join, share"),
    ({k: v for k, v in RESUME.items() if k != "side"}, "lacks field 'side'"),
    ({**RESUME, "direct_only": 0}, "hello.direct_only must be true or false"),
    ({k: v for k, v in RESUME.items() if k != "direct_only"}, "lacks field 'direct_only'"),
    ({**RESUME, "action": "join", "nameplate": 5}, "hello.resume_id belongs to a resume hello"),
    ({"type": "hello", "version": 2, "action": "join", "nameplate": 5, "punch_timeout": 3,
      "side": "join"}, "hello.side belongs to a resume hello, not to join"),
    ({"type": "hello", "version": 2, "action": "join", "nameplate": 5, "punch_timeout": 3,
      "relay": False}, "hello.relay must be true or absent"),
    ({"type": "hello", "version": 2, "action": "join", "nameplate": 5, "punch_timeout": 3,
      "relay": 1}, "hello.relay must be true or false"),
    ({"type": "relay", "version": 2}, "relay message lacks field 'token'"),
    ({"type": "relay", "version": 2, "token": TOKEN, "peer": "192.0.2.9:22"},
     "unknown field(s): peer"),  # a relay only ever joins the two peers: no address here
    ({"type": "relay", "token": TOKEN}, "relay message lacks field 'version'"),
    ({"type": "relay", "version": 2, "token": TOKEN[:-2]}, "must be 24 characters"),
    ({"type": "relayed"}, "unexpected message type 'relayed'"),
])
def test_precise_errors_of_the_additions(obj: dict[str, object], needle: str) -> None:
    with pytest.raises(MessageError) as info:
        decode_client_message(json.dumps(obj).encode())
    assert needle in str(info.value)


def test_a_relay_message_of_another_version_is_named() -> None:
    with pytest.raises(UnsupportedVersion):
        decode_client_message(json.dumps({"type": "relay", "version": 3,
                                          "token": TOKEN}).encode())


@pytest.mark.parametrize(("plan", "needle"), [
    ([RELAY_STAGE, PUBLIC_STAGE], "the relay stage must be the last one"),
    ([RELAY_STAGE, RELAY_STAGE], "the relay stage must be the last one"),
    ([{**RELAY_STAGE, "punch": "arm"}], "punch must be connect on a relay stage"),
    ([{k: v for k, v in RELAY_STAGE.items() if k != "token"}], "lacks field 'token'"),
    ([{**PUBLIC_STAGE, "token": TOKEN}], "token belongs to relay stages, not public"),
    ([{**RELAY_STAGE, "token": "!" * 24}], "not valid base64"),
    ([{**RELAY_STAGE, "token": "x" * 24}], "must encode exactly 16 bytes"),
    ([], "must be a list of 1-8 stages"),
    ([PUBLIC_STAGE] * 8 + [RELAY_STAGE], "must be a list of 1-8 stages"),
])
def test_a_relay_stage_is_checked(plan: list[object], needle: str) -> None:
    with pytest.raises(MessageError) as info:
        decode_server_message(json.dumps({**FIRE, "plan": plan}).encode())
    assert needle in str(info.value)


def test_relayed_takes_no_fields_and_a_fire_needs_a_stage() -> None:
    with pytest.raises(MessageError, match="unknown field"):
        decode_server_message(b'{"type":"relayed","token":"x"}')
    with pytest.raises(MessageError, match="1-8 stages"):
        encode(Fire(Endpoint("192.0.2.1", 1), Endpoint("192.0.2.2", 2), (), 1.0))
    # ...unless the peer's candidates come with it (an IPv6 pair without a relay).
    bare = Fire(Endpoint("192.0.2.1", 1), Endpoint("2001:db8::2", 2), (), 1.0,
                peer_candidates=(Candidate("ipv6", Endpoint("2001:db8::2", 3)),))
    assert b'"plan":[]' in encode(bare) and b'"peer_public":"[2001:db8::2]:2"' in encode(bare)
    with pytest.raises(MessageError, match="belongs to a resume hello"):
        encode(Hello("join", 7, (), None, 5.0, direct_only=True))


def test_observed_addresses_may_be_ipv6_and_punch_addresses_may_not() -> None:
    v6 = Endpoint("2001:db8:b::2", 40001)
    welcome = Welcome(7, 600.0, v6)
    assert b'"public":"[2001:db8:b::2]:40001"' in encode(welcome)
    relay = RelayStage(Endpoint("2001:db8:100::2", 3012), 5.0, bytes(16))
    fire = Fire(Endpoint("203.0.113.2", 4000), v6, (), 20.0, relay=relay)
    [payload] = FrameReader().feed(encode(fire))
    assert decode_server_message(payload) == fire
    assert b'"peer":"[2001:db8:100::2]:3012"' in payload
    bads: list[tuple[Message, str]] = [
        (Hello("join", 7, (v6,), None, 5.0), "hello.lan"),  # a LAN address is IPv4
        (Hello("join", 7, (), v6, 5.0), "hello.probe"),  # a mapping check is IPv4's
        (Fire(v6, v6, (Stage("public", v6, "arm", 4.0),), 1.0), "fire.plan[].peer"),
    ]
    for bad, needle in bads:
        with pytest.raises(MessageError, match=re.escape(needle)):
            encode(bad)
    for text in ('"[2001:db8::1]"', '"[ff02::1]:5"', '"[::]:5"', '"[fe80::1%eth0]:5"',
                 '"2001:db8::1:5"'):
        obj = ('{"type":"welcome","nameplate":7,"expires_in":600,"public":' + text + "}")
        with pytest.raises(MessageError, match=r"welcome\.public"):
            decode_server_message(obj.encode())
