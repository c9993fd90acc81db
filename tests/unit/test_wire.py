"""The wire codecs, tested on bytes."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from nopf_web.wire.address import parse_host_endpoint, parse_ipv4_endpoint, parse_port
from nopf_web.wire.discovery import REPLY_SIZE, DiscoveryReader, decode_reply, encode_reply
from nopf_web.wire.errors import BadAddress, WireError


def test_reply_layout_is_the_seeds() -> None:
    # 4 bytes IPv4 network order, 2 bytes port big-endian, then END\0.
    assert encode_reply("111.111.111.111", 40737) == bytes([111] * 4) + b"\x9f\x21" + b"END\x00"
    assert REPLY_SIZE == 10


def test_decode_known_bytes() -> None:
    assert decode_reply(b"\xcb\x00\x71\x02\x0b\xb8END\x00") == ("203.0.113.2", 3000)


@given(st.ip_addresses(v=4), st.integers(1, 65535))
def test_roundtrip(ip: object, port: int) -> None:
    assert decode_reply(encode_reply(str(ip), port)) == (str(ip), port)


@pytest.mark.parametrize(
    "data",
    [b"", b"\x01\x02\x03\x04\x00\x50END", b"\x01\x02\x03\x04\x00\x50ENDX",
     b"\x01\x02\x03\x04\x00\x00END\x00", b"HTTP/1.1 200 OK\r\n"],
)
def test_decode_rejects(data: bytes) -> None:
    with pytest.raises(WireError):
        decode_reply(data)


def test_reader_accumulates_byte_by_byte() -> None:
    reader = DiscoveryReader()
    wire = encode_reply("198.51.100.7", 51234)
    for b in wire[:-1]:
        assert reader.feed(bytes([b])) is None
    assert reader.needed == 1
    assert reader.feed(wire[-1:]) == ("198.51.100.7", 51234)


def test_reader_reports_overlong_reply() -> None:
    with pytest.raises(WireError, match="longer"):
        DiscoveryReader().feed(encode_reply("1.2.3.4", 5) + b"x")


@given(st.binary(max_size=32))
def test_reader_never_crashes_on_garbage(data: bytes) -> None:
    reader = DiscoveryReader()
    try:
        result = reader.feed(data)
    except WireError:
        assert len(data) >= REPLY_SIZE  # only a complete (or overlong) reply can be invalid
        return
    assert (result is None) == (len(data) < REPLY_SIZE)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1.2.3.4:5", ("1.2.3.4", 5)), (" 203.0.113.2:65535\n", ("203.0.113.2", 65535))],
)
def test_parse_ipv4_endpoint(text: str, expected: tuple[str, int]) -> None:
    assert tuple(parse_ipv4_endpoint(text)) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [("1.2.3", "missing ':PORT'"), ("1.2.3:80", "not an IPv4"), ("host:99999", "not an IPv4"),
     ("1.2.3.4:99999", "out of range"), ("1.2.3.4:0", "out of range"), ("", "empty"),
     ("1.2.3.4:http", "not a number"), ("0.0.0.0:80", "cannot be a peer"), (":80", "missing")],
)
def test_parse_ipv4_endpoint_errors_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(BadAddress, match=message):
        parse_ipv4_endpoint(text)


def test_parse_host_endpoint_accepts_names() -> None:
    assert tuple(parse_host_endpoint("rdv.example.org:3012")) == ("rdv.example.org", 3012)
    with pytest.raises(BadAddress):
        parse_host_endpoint("bad_host!:3012")
    with pytest.raises(BadAddress):
        parse_host_endpoint("1.2.3:3012")


def test_parse_port() -> None:
    assert parse_port("0", allow_zero=True) == 0
    with pytest.raises(BadAddress):
        parse_port("-1")
