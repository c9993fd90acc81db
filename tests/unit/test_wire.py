"""The wire codecs, tested on bytes."""

from __future__ import annotations

import ipaddress
import subprocess
import sys

import pytest
from hypothesis import given, strategies as st

from nopf_web.wire.address import (
    MAX_HOSTNAME,
    SEED_IPV4_ONLY,
    Endpoint,
    is_hostname,
    local_text,
    parse_host_endpoint,
    parse_ipv4_endpoint,
    parse_local_endpoint,
    parse_local_sides,
    parse_port,
)
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
    # A host to connect to, in IPv4 as in IPv6 (Linux would take 0.0.0.0 for itself).
    for bad in ("0.0.0.0:3012", "224.0.0.1:3012", "239.255.255.250:3012"):
        with pytest.raises(BadAddress, match=f"--serveraddr '{bad}': .* cannot be a "
                           "rendezvous address"):
            parse_host_endpoint(bad, field="--serveraddr")


def test_parse_host_endpoint_takes_ipv6_in_brackets_only() -> None:
    assert parse_host_endpoint("[2001:DB8::1]:3012") == Endpoint("2001:db8::1", 3012)
    assert parse_host_endpoint(" [::1]:3012 ") == Endpoint("::1", 3012)
    assert str(parse_host_endpoint("[2001:db8::1]:3012")) == "[2001:db8::1]:3012"
    # Without brackets the last group cannot be told from a port: one line says so.
    with pytest.raises(BadAddress, match=r"ambiguous: put an IPv6 address in brackets, "
                       r"as in '\[2001:db8::1\]:3012'") as bare:
        parse_host_endpoint("2001:db8::1:3012", field="--serveraddr")
    assert str(bare.value).startswith("--serveraddr '2001:db8::1:3012' is ambiguous")
    for bad, why in (("[::]:3012", "cannot be a rendezvous address"),
                     ("[ff02::1]:3012", "cannot be a rendezvous address"),
                     ("[fe80::1%eth0]:3012", "is not \\[IPv6\\]:PORT"),
                     ("[2001:db8::1]", "is not \\[IPv6\\]:PORT"),
                     ("[1.2.3.4]:3012", "is not \\[IPv6\\]:PORT"),
                     ("[2001:db8::1]:0", "out of range"), ("::1", "ambiguous")):
        with pytest.raises(BadAddress, match=why):
            parse_host_endpoint(bad)


def test_a_use_without_ipv6_refuses_it_in_one_line_saying_why() -> None:
    with pytest.raises(BadAddress) as refused:
        parse_host_endpoint("[2001:db8::1]:3012", field="--serveraddr", no_ipv6=SEED_IPV4_ONLY)
    assert str(refused.value) == (
        "--serveraddr '[2001:db8::1]:3012' is an IPv6 address: seed mode speaks the seed's "
        "IPv4-only protocol; give an IPv4 address or a host name")
    assert refused.value.field == "--serveraddr"
    # Names and IPv4 pass as before.
    assert parse_host_endpoint("rdv.example.org:3012", no_ipv6=SEED_IPV4_ONLY).port == 3012
    assert parse_host_endpoint("1.2.3.4:3012", no_ipv6=SEED_IPV4_ONLY).host == "1.2.3.4"


@pytest.mark.parametrize("name, ok", [
    ("rdv.example.org", True), ("rdv.example.org.", True), ("a", True), ("x-1.b2", True),
    ("a" * 63 + ".org", True), ("a" * 64 + ".org", False),  # a label is 1-63 characters
    (".".join(["a" * 63] * 3) + "." + "a" * 61, True),  # 253 characters
    (".".join(["a" * 63] * 3) + "." + "a" * 62, False),
    ("", False), (".", False), ("a..b", False), (".a", False), ("a.", True), ("a..", False),
    ("-a", False), ("a-", False), ("a-.b", False), ("a_b", False), ("a b", False),
    ("a\n", False), ("é.org", False),
])
def test_host_names_are_rfc_1123_label_by_label(name: str, ok: bool) -> None:
    assert is_hostname(name) is ok


def test_a_long_name_with_a_bad_last_character_is_refused_at_once() -> None:
    # The old single pattern took 4 s at 26 characters, 4 times more per 2 more: a
    # hostile (or mistyped) rendezvous name hung the CLI and the dashboard's forms. A
    # regular expression holds the GIL, so the check runs in a child process that a
    # timeout can kill.
    names = ["a" * (MAX_HOSTNAME - 1) + "!", "a-" * 126 + "!"]
    script = (
        "import sys\n"
        "from nopf_web.wire.address import is_hostname, parse_host_endpoint\n"
        "from nopf_web.wire.errors import BadAddress\n"
        f"print([is_hostname(n) for n in {names!r}])\n"
        "try:\n"
        f"    parse_host_endpoint({'a' * 40 + '_:3012'!r})\n"
        "except BadAddress as exc:\n"
        "    print(exc)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=10, check=True)
    assert done.stdout.splitlines() == [
        "[False, False]",
        f"'{'a' * 36}... in '{'a' * 36}... is not an IPv4 address or host name"]


@pytest.mark.parametrize("listen", [False, True])
def test_a_bare_localport_is_on_loopback_as_the_seeds_was(listen: bool) -> None:
    assert parse_local_endpoint(" 3000 ", listen=listen) == Endpoint("127.0.0.1", 3000)
    for bad, why in (("0", "out of range"), ("70000", "out of range"), ("²", "not a port"),
                     ("", "not a port"), (":80", "not a port or HOST:PORT")):
        with pytest.raises(BadAddress, match=why) as refused:
            parse_local_endpoint(bad, listen=listen)
        assert refused.value.field == "--localport"


# A sharer names its service by address or name; a connector listens on an address of
# its own (a name is refused there: what is bound is an address).
@pytest.mark.parametrize("listen, text, expected", [
    (False, "192.168.1.20:80", Endpoint("192.168.1.20", 80)),
    (False, "nas.local:8080", Endpoint("nas.local", 8080)),
    (False, "[2001:DB8::20]:80", Endpoint("2001:db8::20", 80)),
    (True, "0.0.0.0:3010", Endpoint("0.0.0.0", 3010)),
    (True, "192.168.1.5:3010", Endpoint("192.168.1.5", 3010)),
    (True, "[::]:3010", Endpoint("::", 3010)),
    (True, "[::1]:3010", Endpoint("::1", 3010)),
])
def test_a_local_side_is_host_and_port(listen: bool, text: str, expected: Endpoint) -> None:
    assert parse_local_endpoint(text, listen=listen) == expected


@pytest.mark.parametrize("listen, text, why", [
    (False, "2001:db8::20:80", "ambiguous: put an IPv6 address in brackets"),
    (False, "bad_host!:80", "is not an IPv4 address or host name"),
    (False, "[::]:80", "cannot be a service address"),
    (False, "0.0.0.0:80", "0.0.0.0 cannot be a service address"),
    (False, "224.0.0.1:80", "cannot be a service address"),
    (False, "[ff02::1]:80", "cannot be a service address"),
    (False, "1.2.3.4:0", "out of range"),
    (True, "localhost:3010", "'localhost' is not an IP address to listen on"),
    (True, "::1:3010", "IPv6 in brackets"),
    (True, "[1.2.3.4]:3010", "not an IP address"),
    (True, "[fe80::1%eth0]:3010", "not an IP address"),
    (True, "239.1.2.3:3010", "multicast"),
    (True, "0.0.0.0:0", "out of range"),
])
def test_a_bad_local_side_is_one_line_naming_the_flag(listen: bool, text: str,
                                                      why: str) -> None:
    with pytest.raises(BadAddress, match=why) as refused:
        parse_local_endpoint(text, listen=listen)
    assert refused.value.field == "--localport" and "\n" not in str(refused.value)


def test_several_local_sides_keep_their_order_and_are_each_checked() -> None:
    assert parse_local_sides(["22", "nas:80", "[::1]:8080"], listen=False, most=3) == (
        Endpoint("127.0.0.1", 22), Endpoint("nas", 80), Endpoint("::1", 8080))
    for texts, listen, why in [
            ([], False, "--localport is empty"),
            (["22", "23", "24"], False, "--localport names 3 services: one tunnel carries at "
             "most 2"),
            (["22", " 127.0.0.1:22"], False, "--localport 127.0.0.1:22 is given twice"),
            (["[::1]:22", "[0:0::1]:22"], True, r"--localport \[::1\]:22 is given twice"),
            (["22", "nas:80"], True, "'nas' is not an IP address to listen on")]:
        with pytest.raises(BadAddress, match=why) as refused:
            parse_local_sides(texts, listen=listen, most=2)
        assert refused.value.field == "--localport"


def test_messages_keep_the_seeds_localhost_wording_for_the_default_host() -> None:
    assert local_text("127.0.0.1", 3000) == "localhost:3000"  # "Started pipe between ..."
    assert local_text("192.168.1.20", 80) == "192.168.1.20:80"
    assert local_text("::1", 3010) == "[::1]:3010"


@given(st.ip_addresses(v=6).filter(lambda ip: not (ip.is_multicast or ip.is_unspecified)),
       st.integers(1, 65535))
def test_an_ipv6_rendezvous_round_trips_through_its_text(ip: ipaddress.IPv6Address,
                                                         port: int) -> None:
    endpoint = parse_host_endpoint(f"[{ip.exploded}]:{port}")
    assert endpoint == Endpoint(str(ip), port)
    assert parse_host_endpoint(str(endpoint)) == endpoint  # as the settings store it
    with pytest.raises(BadAddress, match="ambiguous"):
        parse_host_endpoint(f"{ip}:{port}")


def test_parse_port() -> None:
    assert parse_port("0", allow_zero=True) == 0
    with pytest.raises(BadAddress):
        parse_port("-1")
