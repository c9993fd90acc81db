"""The coordinated-mode codec: round trips, strict validation, fuzzing."""

from __future__ import annotations

import base64
import contextlib
import json
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nopf_web.errors import NopfError
from nopf_web.wire.address import Endpoint
from nopf_web.wire.rendezvous import (
    MAX_FRAME,
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
mappings = st.sampled_from(["none", "stable", "symmetric", "unknown"])
hellos = st.one_of(
    st.builds(Hello, st.just("share"), st.none(), st.lists(endpoints, max_size=8).map(tuple),
              st.none() | endpoints, seconds),
    st.builds(Hello, st.sampled_from(["join", "reshare", "rejoin"]), st.integers(1, 999_999),
              st.lists(endpoints, max_size=8).map(tuple), st.none() | endpoints, seconds,
              pake=st.none() | pakes),
)
stages = st.builds(Stage, st.sampled_from(["public", "lan"]), endpoints,
                   st.sampled_from(["arm", "connect"]), seconds)
client_msgs = st.one_of(hellos, st.builds(Pong, st.integers(0, 2**31 - 1)), st.just(Probe()),
                        st.builds(PakeMessage, pakes))
server_msgs = st.one_of(
    st.builds(Welcome, st.integers(1, 999_999), st.floats(0, 3600), endpoints),
    st.builds(Ping, st.integers(0, 2**31 - 1)),
    st.builds(Fire, endpoints, endpoints, st.lists(stages, min_size=1, max_size=8).map(tuple),
              st.floats(0, 10_000), st.none() | texts, st.none() | pakes,
              st.none() | st.tuples(mappings, mappings)),
    st.builds(ErrorReply, st.sampled_from(["expired", "used", "unknown_code"]), texts),
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
    assert isinstance(msg, Hello | Pong | Probe | PakeMessage)


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
