"""PCP codec and machine (RFC 6887 MAP and ANNOUNCE), on bytes and a fake clock."""

from __future__ import annotations

import contextlib
import itertools
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given, strategies as st

from nopf_web.portmap import pcp_machine as p
from nopf_web.portmap.exchange_machine import (
    BadField,
    BadLength,
    BadOpcode,
    BadVersion,
    Granted,
    NoAnswer,
    NonceMismatch,
    Refused,
    Truncated,
    Unsupported,
    WireError,
)

NONCE = bytes(range(12))
CLIENT = IPv4Address("10.0.1.2")
u8 = st.integers(0, 255)
u16 = st.integers(0, 2**16 - 1)
u32 = st.integers(0, 2**32 - 1)
v6 = st.integers(0, 2**128 - 1).map(IPv6Address)
options = st.lists(st.builds(p.Option, u8, st.binary(max_size=9)), max_size=3).map(tuple)
map_data = st.builds(p.MapData, st.binary(min_size=12, max_size=12), u8, u16, u16, v6)
requests = st.one_of(
    st.builds(p.Request, st.just(p.Opcode.MAP), u32, v6, map_data, options),
    st.builds(p.Request, st.just(p.Opcode.ANNOUNCE), u32, v6, st.none(), options),
)
responses = st.one_of(
    st.builds(p.Response, st.just(p.Opcode.MAP), u8, u32, u32, map_data, options),
    st.builds(p.Response, st.just(p.Opcode.ANNOUNCE), u8, u32, u32, st.none(), options),
)


def never_jitter() -> float:
    return 0.5  # RAND = 0


def machine(lifetime: int = 7200, give_up_after: float | None = None,
            nonce: bytes = NONCE) -> p.PcpMapping:
    return p.PcpMapping(client_address=CLIENT, internal_port=5000, lifetime=lifetime,
                        nonce=nonce, rand=never_jitter, give_up_after=give_up_after)


def answer(request: bytes, *, result: int = 0, lifetime: int = 3600, epoch: int = 50,
           port: int = 5000, ip: str = "203.0.113.2", nonce: bytes | None = None) -> bytes:
    req = p.decode_request(request)
    assert req.map is not None
    body = p.MapData(nonce or req.map.nonce, req.map.protocol, req.map.internal_port, port,
                     p.mapped(IPv4Address(ip)))
    return p.encode_response(p.Response(p.Opcode.MAP, result, lifetime, epoch, body))


# --------------------------------------------------------------------------- codec


def test_map_request_layout() -> None:
    [wire] = machine().start(0.0)
    assert len(wire) == 60
    assert wire[:4] == bytes([2, 1, 0, 0])  # version, R=0 + MAP, reserved
    assert wire[4:8] == (7200).to_bytes(4, "big")
    assert wire[8:24] == bytes(10) + b"\xff\xff" + CLIENT.packed  # IPv4-mapped client
    assert wire[24:36] == NONCE
    assert wire[36:40] == bytes([6, 0, 0, 0])  # TCP, reserved
    assert wire[40:44] == (5000).to_bytes(2, "big") * 2  # internal, suggested external
    assert wire[44:60] == p.ALL_ZEROS_V4.packed  # no preference for the address


def test_map_response_layout() -> None:
    [wire] = machine().start(0.0)
    out = answer(wire, result=0, lifetime=3600, epoch=0x0A0B0C0D, port=6001)
    assert out[:4] == bytes([2, 0x81, 0, 0])
    assert out[4:8] == (3600).to_bytes(4, "big")
    assert out[8:12] == bytes([10, 11, 12, 13])
    assert out[12:24] == bytes(12)
    assert out[42:44] == (6001).to_bytes(2, "big")


@given(requests)
def test_requests_round_trip(request: p.Request) -> None:
    assert p.decode_request(p.encode_request(request)) == request


@given(responses)
def test_responses_round_trip(response: p.Response) -> None:
    wire = p.encode_response(response)
    assert len(wire) % 4 == 0
    assert p.decode_response(wire) == response


@given(responses, st.data())
def test_truncated_responses_are_refused(response: p.Response, data: st.DataObject) -> None:
    wire = p.encode_response(response)
    cut = data.draw(st.integers(0, len(wire) - 1))
    try:
        decoded = p.decode_response(wire[:cut])
    except (Truncated, BadLength) as exc:
        assert exc.field
    else:  # still valid: an error answer cut to its header, or cut between options
        if cut == p.HEADER_SIZE and response.result != p.ResultCode.SUCCESS:
            assert decoded.map is None and decoded.options == ()
        else:
            assert len(decoded.options) < len(response.options)
            assert decoded.map == response.map


def test_truncation_names_the_field() -> None:
    [wire] = machine().start(0.0)
    full = answer(wire)
    for cut, field in ((0, "Version"), (1, "Opcode"), (12, "header"),
                       (48, "response MAP data")):
        with pytest.raises(Truncated) as info:
            p.decode_response(full[:cut])
        assert info.value.field == field
    with pytest.raises(Truncated) as info:
        p.decode_response(full + bytes([1, 0, 0, 8]) + bytes(4))  # option says 8, has 4
    assert info.value.field == "Option 1 data"


@given(responses, st.integers(0, 255).filter(lambda v: v != 2))
def test_wrong_version_is_refused(response: p.Response, version: int) -> None:
    wire = bytearray(p.encode_response(response))
    wire[0] = version
    with pytest.raises(BadVersion) as info:
        p.decode_response(bytes(wire))
    assert info.value.value == version


@given(st.integers(2, 127))
def test_wrong_opcode_is_refused(opcode: int) -> None:
    wire = bytearray(p.encode_response(p.Response(p.Opcode.ANNOUNCE, 0, 0, 0)))
    wire[1] = 0x80 | opcode
    with pytest.raises(BadOpcode):
        p.decode_response(bytes(wire))


def test_a_request_is_not_a_response() -> None:
    [wire] = machine().start(0.0)
    with pytest.raises(BadField) as info:
        p.decode_response(wire)
    assert info.value.field == "R"


def test_length_rules() -> None:
    ok = p.encode_response(p.Response(p.Opcode.ANNOUNCE, 0, 0, 0))
    with pytest.raises(BadLength):
        p.decode_response(ok + b"\0\0")  # not a multiple of 4
    with pytest.raises(BadLength):
        p.decode_response(ok + bytes(1100))  # over 1100 bytes


def test_header_only_error_answer_decodes() -> None:
    short = p.encode_response(p.Response(p.Opcode.MAP, p.ResultCode.MALFORMED_REQUEST, 30, 9))
    assert p.decode_response(short).map is None
    success = bytearray(short)
    success[3] = 0
    with pytest.raises(Truncated):  # a MAP success must say what it assigned
        p.decode_response(bytes(success))


@given(st.binary(max_size=120))
def test_arbitrary_bytes_raise_only_wire_errors(data: bytes) -> None:
    for decode in (p.decode_response, p.decode_request):
        with contextlib.suppress(WireError):
            decode(data)


@given(st.binary(min_size=1, max_size=200).map(lambda b: bytes([2]) + b))
def test_arbitrary_version_2_bytes_raise_only_wire_errors(data: bytes) -> None:
    with contextlib.suppress(WireError):
        p.decode_response(data)


# --------------------------------------------------------------------------- machine


def test_map_granted() -> None:
    m = machine()
    [wire] = m.start(0.0)
    assert m.receive(answer(wire, lifetime=3600, port=6001), 0.002) == []
    assert m.outcome == Granted(IPv4Address("203.0.113.2"), 6001, 5000, 3600, 50)


def test_wrong_nonce_is_ignored() -> None:
    m = machine(give_up_after=0.25)
    [wire] = m.start(0.0)
    m.receive(answer(wire, nonce=b"x" * 12), 0.01)
    assert m.outcome is None
    m.timer(0.25)
    assert isinstance(m.outcome, NoAnswer)
    assert "Mapping Nonce" in m.outcome.ignored[0]


@given(st.binary(min_size=12, max_size=12).filter(lambda b: b != NONCE))
def test_match_refuses_any_other_nonce(nonce: bytes) -> None:
    m = machine()
    [wire] = m.start(0.0)
    with pytest.raises(NonceMismatch):
        p.match_map_response(p.decode_response(answer(wire, nonce=nonce)),
                             p.decode_request(wire))


def test_other_internal_port_or_protocol_is_ignored() -> None:
    m = machine()
    [wire] = m.start(0.0)
    req = p.decode_request(wire)
    assert req.map is not None
    for body in (p.MapData(NONCE, 17, 5000, 5000, p.ALL_ZEROS_V4),
                 p.MapData(NONCE, 6, 4000, 5000, p.ALL_ZEROS_V4)):
        m.receive(p.encode_response(p.Response(p.Opcode.MAP, 0, 60, 1, body)), 0.0)
    assert m.outcome is None


def test_retransmissions_follow_8_1_1() -> None:
    m = machine()
    m.start(0.0)
    times = [0.0]
    while len(times) < 12:
        wake = m.wake_at
        assert wake is not None
        assert m.timer(wake)
        times.append(wake)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    expected = [3.0]
    while len(expected) < len(gaps):
        expected.append(min(expected[-1] * 2, 1024.0))
    assert gaps == pytest.approx(expected)


def test_retransmission_jitter_stays_within_ten_percent() -> None:
    for r in (0.0, 0.999):
        gen = p.intervals(lambda r=r: r)  # type: ignore[misc]
        first = next(gen)
        assert 2.7 <= first <= 3.3


def test_bounded_race_gives_up_after_one_request() -> None:
    m = machine(give_up_after=0.25)
    m.start(0.0)
    assert m.timer(0.25) == []
    assert m.outcome == NoAnswer(1, pytest.approx(0.25), ())  # type: ignore[arg-type]


def test_natpmp_only_gateway_answers_unsupported_version() -> None:
    m = machine()
    m.start(0.0)
    m.receive(bytes.fromhex("0000 0001 00000007"), 0.0)
    assert isinstance(m.outcome, Unsupported)
    assert "NAT-PMP" in m.outcome.detail


@pytest.mark.parametrize("code", [2, 8, 11, 12, 99])
def test_result_codes_refuse(code: int) -> None:
    m = machine()
    [wire] = m.start(0.0)
    m.receive(answer(wire, result=code), 0.0)
    assert isinstance(m.outcome, Refused)
    assert m.outcome.code == code


def test_unsupp_version_result_is_unsupported() -> None:
    m = machine()
    m.start(0.0)
    m.receive(p.encode_response(p.Response(p.Opcode.MAP, 1, 0, 0)), 0.0)
    assert isinstance(m.outcome, Unsupported)


def test_delete_is_lifetime_zero_with_the_same_nonce() -> None:
    m = machine(lifetime=0)
    [wire] = m.start(0.0)
    req = p.decode_request(wire)
    assert req.lifetime == 0 and req.map is not None and req.map.nonce == NONCE
    m.receive(answer(wire, lifetime=0), 0.0)
    assert isinstance(m.outcome, Granted) and m.outcome.lifetime == 0


def test_renewal_suggests_the_assigned_address_and_port() -> None:
    m = p.PcpMapping(client_address=CLIENT, internal_port=5000, lifetime=60, nonce=NONCE,
                     rand=never_jitter, suggested_external_port=6001,
                     suggested_external_address=IPv4Address("203.0.113.2"))
    req = p.decode_request(m.start(0.0)[0])
    assert req.map is not None
    assert req.map.external_port == 6001
    assert p.unmapped(req.map.external_address) == IPv4Address("203.0.113.2")


def test_announce_probe() -> None:
    m = p.PcpAnnounce(client_address=CLIENT, rand=never_jitter, give_up_after=0.25)
    [wire] = m.start(0.0)
    assert wire[:2] == bytes([2, 0]) and len(wire) == 24
    m.receive(p.encode_response(p.Response(p.Opcode.ANNOUNCE, 0, 0, 77)), 0.0)
    assert m.outcome == Granted(None, 0, 0, 0, 77)


@given(st.lists(st.binary(max_size=80), max_size=6))
def test_arbitrary_datagrams_never_crash_the_machine(datagrams: list[bytes]) -> None:
    m = machine(give_up_after=0.25)
    m.start(0.0)
    for data in datagrams:
        m.receive(data, 0.1)
    m.timer(0.25)
    assert m.outcome is not None


def test_epoch_rules_of_8_5() -> None:
    e = p.Epoch()
    assert not e.observe(100, 0.0)
    assert not e.observe(200, 100.0)
    assert e.observe(50, 110.0)  # went backwards by more than 2 s
    e = p.Epoch()
    e.observe(100, 0.0)
    assert e.observe(1000, 100.0)  # server time ran far ahead of ours
