"""The guard's filter expressions: their text, and what they match in pydivert's own evaluator.

pydivert compiles and evaluates WinDivert filters in user space (WinDivert's
compiler, bundled in libebpfdivert on Linux), without privileges. These tests
hold three things to each other: the expression :func:`window_filter` builds,
the rule :func:`window_drops` states in Python, and what the real evaluator
does with real IPv4/TCP packets.
"""

from __future__ import annotations

import socket
import struct
import sys

import pytest
from hypothesis import given, settings, strategies as st

from nopf_web.guard import NullGuard, guard_status
from nopf_web.guard.divert import compile_error, filter_matches
from nopf_web.guard.filters import Segment, WindowRule, describe, window_drops, window_filter
from nopf_web.sockets import RESET_TOS

# The filter compiler and evaluator are pydivert's backends' (libebpfdivert on Linux,
# WinDivert.dll on Windows): macOS has neither.
needs_filter_backend = pytest.mark.skipif(
    sys.platform == "darwin", reason="pydivert has no macOS backend, so no filter compiler")

FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10


def tcp_packet(seg: Segment, payload: bytes = b"") -> bytes:
    """A well-formed IPv4 + TCP packet with ``seg``'s addresses, ports and flags."""
    flags = ((FIN if seg.fin else 0) | (SYN if seg.syn else 0) | (RST if seg.rst else 0)
             | (ACK if seg.ack else 0))
    tcp = struct.pack("!HHIIBBHHH", seg.src_port, seg.dst_port, 1000, 2000 if seg.ack else 0,
                      5 << 4, flags, 64240, 0, 0) + payload
    total = 20 + len(tcp)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, seg.tos, total, 1, 0, 64, socket.IPPROTO_TCP, 0,
                     socket.inet_aton(seg.src), socket.inet_aton(seg.dst))
    return ip + tcp


def evaluates(rule: WindowRule, seg: Segment) -> bool:
    return filter_matches(window_filter(rule), tcp_packet(seg), outbound=seg.outbound)


PEER = ("192.0.2.2", 40001)
RULE = WindowRule(40000, PEER)


def seg(**kw: object) -> Segment:
    base: dict[str, object] = {"src": "10.0.1.2", "src_port": 40000, "dst": "192.0.2.2",
                               "dst_port": 40001, "outbound": True}
    base.update(kw)
    return Segment(**base)  # type: ignore[arg-type]


# -- the text ---------------------------------------------------------------


def test_window_filter_text() -> None:
    assert window_filter(RULE) == (
        "outbound and tcp and tcp.SrcPort == 40000 and ip.DstAddr == 192.0.2.2 and "
        "tcp.DstPort == 40001 and ip.TOS != 4 and (tcp.Rst or (tcp.Fin and tcp.Ack))"
    )


def test_discovery_window_without_a_local_port_names_only_the_rendezvous() -> None:
    text = window_filter(WindowRule(0, ("198.51.100.2", 3012)))
    assert "SrcPort" not in text
    assert "ip.DstAddr == 198.51.100.2 and tcp.DstPort == 3012" in text


def test_window_without_a_remote_covers_only_the_port() -> None:
    text = window_filter(WindowRule(40000, None))
    assert "DstAddr" not in text and "DstPort" not in text
    assert "tcp.SrcPort == 40000" in text


@needs_filter_backend
@pytest.mark.parametrize("rule", [
    RULE, WindowRule(0, ("198.51.100.2", 3012)), WindowRule(65535, None),
    WindowRule(1, ("255.255.255.255", 0)),
])
def test_real_compiler_accepts_every_shape(rule: WindowRule) -> None:
    assert compile_error(window_filter(rule)) is None


@needs_filter_backend
def test_real_compiler_rejects_garbage() -> None:
    # The check itself can fail: a broken expression is reported, with a position.
    error = compile_error("outbound and tcp.SrcPort == and")
    assert error is not None and "position" in error


# -- what it matches --------------------------------------------------------


@needs_filter_backend
@pytest.mark.parametrize(("what", "segment", "dropped"), [
    ("RST to the peer", seg(rst=True), True),
    ("RST+ACK to the peer", seg(rst=True, ack=True), True),
    ("FIN+ACK to the peer", seg(fin=True, ack=True), True),
    ("FIN+PSH+ACK-like close", seg(fin=True, ack=True), True),
    ("bare FIN (no ACK)", seg(fin=True), False),
    ("SYN", seg(syn=True), False),
    ("SYN-ACK", seg(syn=True, ack=True), False),
    ("bare ACK", seg(ack=True), False),
    ("RST from another local port", seg(rst=True, src_port=40002), False),
    ("FIN+ACK from another local port", seg(fin=True, ack=True, src_port=22), False),
    ("RST to another peer port", seg(rst=True, dst_port=40002), False),
    ("RST to another host", seg(rst=True, dst="192.0.2.3"), False),
    ("inbound RST from the peer", seg(rst=True, src="192.0.2.2", src_port=40001,
                                      dst="10.0.1.2", dst_port=40000, outbound=False), False),
    ("inbound RST with our tuple", seg(rst=True, outbound=False), False),
    ("RST sent on purpose (reset_close's TOS)", seg(rst=True, ack=True, tos=RESET_TOS), False),
    ("RST with another TOS", seg(rst=True, tos=0x10), True),
    ("RST with the marker's DSCP and ECN bits", seg(rst=True, tos=RESET_TOS | 1), True),
    ("FIN+ACK marked like a deliberate reset", seg(fin=True, ack=True, tos=RESET_TOS), False),
])
def test_window_matches_exactly_the_closing_segments(what: str, segment: Segment,
                                                     dropped: bool) -> None:
    assert window_drops(RULE, segment) is dropped, what
    assert evaluates(RULE, segment) is dropped, what


@needs_filter_backend
def test_a_close_with_payload_is_still_a_close() -> None:
    packet = tcp_packet(seg(fin=True, ack=True), payload=b"bye")
    assert filter_matches(window_filter(RULE), packet, outbound=True)


@needs_filter_backend
def test_udp_on_the_punch_port_is_never_matched() -> None:
    udp = struct.pack("!HHHH", 40000, 40001, 8, 0)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28, 1, 0, 64, socket.IPPROTO_UDP, 0,
                     socket.inet_aton("10.0.1.2"), socket.inet_aton("192.0.2.2"))
    assert not filter_matches(window_filter(WindowRule(40000, None)), ip + udp, outbound=True)


@needs_filter_backend
def test_discovery_window_catches_any_local_port_to_the_rendezvous_only() -> None:
    rule = WindowRule(0, ("198.51.100.2", 3012))
    to_rdv = seg(fin=True, ack=True, src_port=51234, dst="198.51.100.2", dst_port=3012)
    to_peer = seg(fin=True, ack=True, src_port=51234)
    assert window_drops(rule, to_rdv) and evaluates(rule, to_rdv)
    assert not window_drops(rule, to_peer) and not evaluates(rule, to_peer)


@needs_filter_backend
def test_remote_port_zero_means_any_port_of_that_host() -> None:
    rule = WindowRule(40000, ("192.0.2.2", 0))
    for port in (1, 40001, 65535):
        s = seg(rst=True, dst_port=port)
        assert window_drops(rule, s) and evaluates(rule, s)


HOSTS = st.sampled_from(["10.0.1.2", "192.0.2.2", "192.0.2.3", "198.51.100.2"])
PORTS = st.sampled_from([1, 3012, 40000, 40001, 65535])


@st.composite
def segments(draw: st.DrawFn) -> Segment:
    return Segment(src=draw(HOSTS), src_port=draw(PORTS), dst=draw(HOSTS), dst_port=draw(PORTS),
                   outbound=draw(st.booleans()), syn=draw(st.booleans()), ack=draw(st.booleans()),
                   fin=draw(st.booleans()), rst=draw(st.booleans()),
                   tos=draw(st.sampled_from([0, 1, RESET_TOS, RESET_TOS | 2, 0xb8])))


@st.composite
def rules(draw: st.DrawFn) -> WindowRule:
    local = draw(st.sampled_from([0, 40000, 3012]))
    remote = draw(st.none() | st.tuples(HOSTS, st.sampled_from([0, 40001, 3012])))
    if local == 0 and remote is None:
        remote = ("198.51.100.2", 3012)
    return WindowRule(local, remote)


@needs_filter_backend
@settings(max_examples=300, deadline=None)
@given(rules(), segments())
def test_python_rule_and_real_evaluator_agree(rule: WindowRule, segment: Segment) -> None:
    assert evaluates(rule, segment) == window_drops(rule, segment)


@needs_filter_backend
@settings(max_examples=100, deadline=None)
@given(st.integers(0, 65535), st.ip_addresses(v=4).map(str), st.integers(0, 65535))
def test_every_buildable_rule_compiles(local: int, host: str, port: int) -> None:
    assert compile_error(window_filter(WindowRule(local, (host, port)))) is None


# -- rule validation --------------------------------------------------------


@pytest.mark.parametrize(("local", "remote", "message"), [
    (0, None, "needs a local port or a remote"),
    (70000, None, "out of range"),
    (-1, ("192.0.2.2", 1), "out of range"),
    (1, ("example.org", 1), "not an IPv4 address"),
    (1, ("192.0.2.02", 1), "not"),
    (1, ("::1", 1), "not an IPv4 address"),
    (1, ("192.0.2.2", 65536), "out of range"),
    (1, ("192.0.2.2 or true", 1), "not an IPv4 address"),
])
def test_rules_that_would_be_wrong_or_unsafe_are_refused(
        local: int, remote: tuple[str, int] | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        WindowRule(local, remote)


def test_describe_names_flags_and_direction() -> None:
    assert describe(seg(rst=True, ack=True)) == "RST+ACK 10.0.1.2:40000 -> 192.0.2.2:40001"
    assert describe(seg(fin=True, ack=True, outbound=False)).endswith("(inbound)")


# -- the null guard and the status body -------------------------------------


async def test_null_guard_status_and_window() -> None:
    guard = NullGuard("disabled with --no-guard")
    guard.start()
    assert guard_status(guard) == {"active": False, "reason": "disabled with --no-guard",
                                   "dropped": 0}
    async with guard.protect(40000, PEER) as window:
        pass
    assert not window.guarded and window.dropped == 0
    guard.stop()
