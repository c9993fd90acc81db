"""The NAT doctor's probe protocol codec (nopf_web.wire.doctor), on bytes."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given, strategies as st

from nopf_web.wire.address import Endpoint
from nopf_web.wire.doctor import (
    MAX_FRAME,
    MAX_WAIT_MS,
    MIN_WAIT_MS,
    Check,
    DialBack,
    DoctorError,
    DoctorMessageError,
    FrameReader,
    Icmp,
    Seen,
    decode_client_message,
    decode_responder_message,
    encode,
    parse_endpoint,
)
from nopf_web.wire.errors import WireError

ipv4 = st.tuples(st.integers(1, 223), st.integers(0, 255), st.integers(0, 255),
                 st.integers(1, 254)).map(lambda t: ".".join(map(str, t)))
ipv6 = st.integers(1, 2**128 - 1).map(
    lambda n: str(__import__("ipaddress").IPv6Address(n))).filter(
    lambda a: not __import__("ipaddress").IPv6Address(a).is_multicast)
addresses = ipv4 | ipv6
endpoints = st.builds(Endpoint, addresses, st.integers(1, 65535))
checks = st.builds(Check, st.booleans(), st.integers(MIN_WAIT_MS, MAX_WAIT_MS))
icmps = st.builds(Icmp, st.integers(0, 255), st.integers(0, 255), st.none() | addresses)
dial_backs = st.one_of(
    st.builds(DialBack, st.sampled_from(["open", "rst", "drop"]), endpoints,
              st.integers(0, 60_000)),
    st.builds(DialBack, st.just("icmp"), endpoints, st.integers(0, 60_000), st.none() | icmps))
texts = st.text(st.characters(min_codepoint=32, max_codepoint=0x2FFF,
                              blacklist_categories=("Cs", "Zl", "Zp", "Cc")),
                max_size=100).filter(str.isprintable)
errors = st.one_of(
    st.builds(DoctorError, st.sampled_from(["bad_request", "busy", "unsupported_version",
                                            "dial_failed"]), texts),
    st.builds(DoctorError, st.just("rate_limited"), texts, st.none() | st.floats(0, 3600)))
responder_msgs = st.one_of(
    st.builds(Seen, endpoints, st.lists(addresses, max_size=4).map(tuple)), dial_backs, errors)


def frame(obj: object) -> bytes:
    payload = json.dumps(obj, separators=(",", ":")).encode()
    return struct.pack("!I", len(payload)) + payload


def payload_of(data: bytes) -> bytes:
    return data[4:]


@given(checks)
def test_a_check_round_trips(msg: Check) -> None:
    assert decode_client_message(payload_of(encode(msg))) == msg


@given(responder_msgs)
def test_responder_messages_round_trip(msg: Seen | DialBack | DoctorError) -> None:
    assert decode_responder_message(payload_of(encode(msg))) == msg


@given(st.lists(responder_msgs, min_size=1, max_size=4), st.data())
def test_frames_split_and_merged_anyhow_decode_the_same(
        msgs: list[Seen | DialBack | DoctorError], data: st.DataObject) -> None:
    stream = b"".join(encode(m) for m in msgs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    reader = FrameReader()
    got = []
    for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        got += [decode_responder_message(f) for f in reader.feed(stream[a:b])]
    assert got == msgs and reader.buffered == 0


@given(endpoints)
def test_endpoints_are_written_one_way_and_parsed_back(ep: Endpoint) -> None:
    text = str(ep)
    assert parse_endpoint(text) == ep
    assert text.startswith("[") == (":" in ep.host)


@pytest.mark.parametrize("text", [
    "1.2.3.4", "1.2.3.4:0", "1.2.3.4:65536", "1.2.3.4:08", "[1.2.3.4]:80", "::1:80",
    "[::1]80", "[::1]:", "0.0.0.0:80", "224.0.0.1:80", "[::]:80", "1.2.3:80", "[::FFFF:1]:80",
    "host.example:80", "1.2.3.4:+80"])
def test_bad_endpoints_are_refused(text: str) -> None:
    with pytest.raises(DoctorMessageError):
        parse_endpoint(text)


@pytest.mark.parametrize(("obj", "words"), [
    ({"type": "check", "version": 1, "dial_back": True}, "lacks field 'wait_ms'"),
    ({"type": "check", "version": 1, "dial_back": 1, "wait_ms": 500}, "true or false"),
    ({"type": "check", "version": 1, "dial_back": True, "wait_ms": 99}, "out of range"),
    ({"type": "check", "version": 1, "dial_back": True, "wait_ms": 3001}, "out of range"),
    ({"type": "check", "version": 1, "dial_back": True, "wait_ms": 500.0}, "integer"),
    ({"type": "check", "version": 2, "dial_back": True, "wait_ms": 500}, "not supported"),
    ({"type": "check", "version": 1, "dial_back": True, "wait_ms": 500,
      "target": "192.0.2.9:22"}, "unknown field(s): target"),
    ({"type": "seen", "public": "1.2.3.4:5", "others": []}, "unexpected message type"),
    ({"type": "hello", "version": 2}, "unexpected message type"),
    ([1, 2], "JSON object"),
])
def test_bad_client_messages_are_refused_with_the_reason(obj: object, words: str) -> None:
    with pytest.raises(DoctorMessageError, match=words.replace("(", r"\(").replace(")", r"\)")):
        decode_client_message(json.dumps(obj).encode())


@pytest.mark.parametrize(("obj", "words"), [
    ({"type": "seen", "public": "1.2.3.4:5"}, "lacks field 'others'"),
    ({"type": "seen", "public": "1.2.3.4:5", "others": ["a", "b", "c", "d", "e"]},
     "at most 4"),
    ({"type": "seen", "public": "1.2.3.4:5", "others": ["1.2.3.4:5"]}, "not an IP address"),
    ({"type": "dial_back", "outcome": "maybe", "from": "1.2.3.4:5", "ms": 1}, "is not one of"),
    ({"type": "dial_back", "outcome": "rst", "from": "1.2.3.4:5", "ms": 1,
      "icmp": {"type": 3, "code": 13}}, "only with outcome icmp"),
    ({"type": "dial_back", "outcome": "icmp", "from": "1.2.3.4:5", "ms": 1,
      "icmp": {"type": 3, "code": 256}}, "out of range"),
    ({"type": "dial_back", "outcome": "icmp", "from": "1.2.3.4:5", "ms": 1,
      "icmp": {"type": 3}}, "type, code, from"),
    ({"type": "error", "code": "busy", "message": "x", "retry_in": 3}, "only with code"),
    ({"type": "error", "code": "nope", "message": "x"}, "is not one of"),
    ({"type": "error", "code": "busy", "message": "two\nlines"}, "one printable line"),
    ({"type": "check", "version": 1, "dial_back": True, "wait_ms": 500},
     "unexpected message type"),
])
def test_bad_responder_messages_are_refused_with_the_reason(obj: object, words: str) -> None:
    with pytest.raises(DoctorMessageError, match=words):
        decode_responder_message(json.dumps(obj).encode())


@pytest.mark.parametrize("payload", [
    b'{"type":"check","version":1,"version":1,"dial_back":true,"wait_ms":500}',
    b'{"type":"check","version":1,"dial_back":true,"wait_ms":NaN}', b"\xff\xfe", b"[[[[",
    b"", b"null"])
def test_malformed_payloads_are_message_errors(payload: bytes) -> None:
    with pytest.raises(DoctorMessageError):
        decode_client_message(payload)


def test_a_hostile_length_is_refused_after_four_bytes() -> None:
    reader = FrameReader()
    with pytest.raises(WireError):
        reader.feed(struct.pack("!I", MAX_FRAME + 1))
    with pytest.raises(WireError):
        FrameReader().feed(b"\x00\x00\x00\x00")


def test_encode_refuses_what_the_other_side_would_refuse() -> None:
    with pytest.raises(DoctorMessageError):
        encode(Check(True, wait_ms=10))
    with pytest.raises(DoctorMessageError):
        encode(DoctorError("busy", "x", retry_in=1.0))
    with pytest.raises(DoctorMessageError):
        encode(Seen(Endpoint("1.2.3.4", 5), ("a", "b", "c", "d", "e")))


def test_the_wire_form_is_the_documented_one() -> None:
    assert encode(Check(True, 400)) == frame(
        {"type": "check", "version": 1, "dial_back": True, "wait_ms": 400})
    assert json.loads(payload_of(encode(DialBack(
        "icmp", Endpoint("198.51.100.3", 40000), 21, Icmp(3, 13, "203.0.113.2"))))) == {
        "type": "dial_back", "outcome": "icmp", "from": "198.51.100.3:40000", "ms": 21,
        "icmp": {"type": 3, "code": 13, "from": "203.0.113.2"}}
    assert json.loads(payload_of(encode(Seen(Endpoint("2001:db8::1", 5), ("198.51.100.3",))))) \
        == {"type": "seen", "public": "[2001:db8::1]:5", "others": ["198.51.100.3"]}
