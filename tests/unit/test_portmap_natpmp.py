"""NAT-PMP codec and machine (RFC 6886), on bytes and a fake clock."""

from __future__ import annotations

import ast
import contextlib
import itertools
import struct
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from nopf_web.portmap import natpmp_machine as n
from nopf_web.portmap.exchange_machine import (
    BadLength,
    BadOpcode,
    BadVersion,
    Granted,
    NoAnswer,
    Refused,
    Truncated,
    Unsupported,
    WireError,
)

u16 = st.integers(0, 2**16 - 1)
u32 = st.integers(0, 2**32 - 1)
ports = st.integers(1, 2**16 - 1)
addresses = st.integers(0, 2**32 - 1).map(IPv4Address)
map_ops = st.sampled_from([n.Opcode.MAP_UDP, n.Opcode.MAP_TCP])

requests = st.one_of(
    st.just(n.ExternalAddressRequest()),
    st.builds(n.MapRequest, map_ops, u16, u16, u32),
)
responses = st.one_of(
    st.builds(n.ExternalAddressResponse, u16, u32, addresses),
    st.builds(n.MapResponse, map_ops, u16, u32, u16, u16, u32),
    st.builds(n.UnsupportedVersionResponse, u32),
)


def address_response(ip: str = "203.0.113.2", result: int = 0, epoch: int = 100) -> bytes:
    return n.encode_response(n.ExternalAddressResponse(result, epoch, IPv4Address(ip)))


def map_response(internal: int = 5000, external: int = 5000, lifetime: int = 7200,
                 result: int = 0, epoch: int = 100, op: n.Opcode = n.Opcode.MAP_TCP) -> bytes:
    return n.encode_response(n.MapResponse(op, result, epoch, internal, external, lifetime))


# --------------------------------------------------------------------------- codec


def test_wire_formats_match_the_rfc_layouts() -> None:
    assert n.encode_request(n.ExternalAddressRequest()) == b"\x00\x00"
    assert n.encode_request(n.MapRequest(n.Opcode.MAP_TCP, 5000, 6000, 7200)) == \
        bytes.fromhex("0002 0000 1388 1770 00001c20")
    assert address_response("203.0.113.2", epoch=0x01020304) == \
        bytes.fromhex("0080 0000 01020304 cb007102")
    assert map_response(5000, 6000, 7200, epoch=1) == \
        bytes.fromhex("0082 0000 00000001 1388 1770 00001c20")
    assert n.encode_response(n.UnsupportedVersionResponse(9)) == \
        bytes.fromhex("0000 0001 00000009")


@given(requests)
def test_requests_round_trip(request: n.Request) -> None:
    assert n.decode_request(n.encode_request(request)) == request


@given(responses)
def test_responses_round_trip(response: n.Response) -> None:
    assert n.decode_response(n.encode_response(response)) == response


@given(responses, st.data())
def test_truncated_responses_name_the_missing_field(response: n.Response,
                                                    data: st.DataObject) -> None:
    wire = n.encode_response(response)
    cut = data.draw(st.integers(0, len(wire) - 1))
    with pytest.raises(Truncated) as info:
        n.decode_response(wire[:cut])
    assert info.value.field and info.value.need > cut == info.value.got


def test_truncation_names_each_field() -> None:
    wire = map_response()
    fields = {cut: _field(wire[:cut]) for cut in range(len(wire))}
    assert fields[0] == "Vers"
    assert fields[1] == "OP"
    assert fields[3] == "Result Code"
    assert fields[7] == "Seconds Since Start of Epoch"
    assert fields[9] == "Internal Port"
    assert fields[11] == "Mapped External Port"
    assert fields[15] == "Port Mapping Lifetime"
    assert _field(address_response()[:10]) == "External IPv4 Address"


def _field(data: bytes) -> str:
    with pytest.raises(Truncated) as info:
        n.decode_response(data)
    return info.value.field


@given(responses, st.binary(min_size=1, max_size=8))
def test_trailing_bytes_are_refused(response: n.Response, extra: bytes) -> None:
    with pytest.raises(BadLength):
        n.decode_response(n.encode_response(response) + extra)


@given(responses, st.integers(1, 255))
def test_wrong_version_is_refused(response: n.Response, version: int) -> None:
    wire = bytearray(n.encode_response(response))
    wire[0] = version
    with pytest.raises(BadVersion) as info:
        n.decode_response(bytes(wire))
    assert info.value.value == version and info.value.field == "Vers"


@given(st.integers(0, 255).filter(lambda op: op not in (0, 128, 129, 130)))
def test_wrong_opcode_is_refused(op: int) -> None:
    wire = bytearray(map_response())
    wire[1] = op
    with pytest.raises(BadOpcode) as info:
        n.decode_response(bytes(wire))
    assert info.value.field == "OP"


def test_opcode_zero_is_only_the_unsupported_version_answer() -> None:
    with pytest.raises(BadOpcode):
        n.decode_response(struct.pack("!BBHI", 0, 0, 2, 5))


@given(st.binary(max_size=40))
def test_arbitrary_bytes_raise_only_wire_errors(data: bytes) -> None:
    for decode in (n.decode_response, n.decode_request):
        with contextlib.suppress(WireError):
            decode(data)


# --------------------------------------------------------------------------- machine


def test_asks_the_address_then_the_mapping_one_at_a_time() -> None:
    m = n.NatPmpMapping(5000, 7200)
    assert m.start(0.0) == [b"\x00\x00"]
    assert not m.mapping_requested
    sent = m.receive(address_response(), 0.01)
    assert sent == [n.encode_request(n.MapRequest(n.Opcode.MAP_TCP, 5000, 5000, 7200))]
    assert m.mapping_requested
    assert m.receive(map_response(external=5001, lifetime=3600), 0.02) == []
    assert m.outcome == Granted(IPv4Address("203.0.113.2"), 5001, 5000, 3600, 100)
    assert m.wake_at is None


def test_retransmits_at_250_ms_doubling_nine_times_then_gives_up() -> None:
    m = n.NatPmpMapping(5000, 7200)
    times = [0.0]
    m.start(0.0)
    while m.outcome is None:
        wake = m.wake_at
        assert wake is not None
        assert m.timer(wake - 0.001) == []  # not yet
        if m.timer(wake):
            times.append(wake)
    assert [b - a for a, b in itertools.pairwise(times)] == \
        pytest.approx([0.25 * 2**k for k in range(8)])
    assert len(times) == 9
    assert isinstance(m.outcome, NoAnswer)
    assert m.outcome.sent == 9
    assert m.outcome.waited == pytest.approx(times[-1] + 64)


def test_give_up_after_bounds_the_whole_exchange() -> None:
    m = n.NatPmpMapping(5000, 7200, give_up_after=0.25)
    m.start(10.0)
    assert m.wake_at == pytest.approx(10.25)
    assert m.timer(10.25) == []
    assert m.outcome == NoAnswer(1, pytest.approx(0.25), ())  # type: ignore[arg-type]


def test_the_mapping_gets_what_is_left_of_the_budget() -> None:
    m = n.NatPmpMapping(5000, 7200, give_up_after=0.25)
    m.start(0.0)
    m.receive(address_response(), 0.2)
    assert m.wake_at == pytest.approx(0.25)
    m.timer(0.25)
    assert isinstance(m.outcome, NoAnswer)
    assert m.outcome.sent == 2


def test_deletion_is_lifetime_zero_and_suggested_port_zero() -> None:
    m = n.NatPmpMapping(5000, 0)
    assert m.start(0.0) == [bytes.fromhex("0002 0000 1388 0000 00000000")]
    m.receive(map_response(external=0, lifetime=0), 0.01)
    assert m.outcome == Granted(None, 0, 5000, 0, 100)


def test_renewal_suggests_the_assigned_port() -> None:
    m = n.NatPmpMapping(5000, 7200, suggested_external_port=6001, ask_external_address=False)
    assert m.start(0.0) == [n.encode_request(n.MapRequest(n.Opcode.MAP_TCP, 5000, 6001, 7200))]


@pytest.mark.parametrize("code", [2, 3, 4, 5, 77])
def test_result_codes_refuse(code: int) -> None:
    m = n.NatPmpMapping(5000, 7200)
    m.start(0.0)
    m.receive(address_response(), 0.0)
    m.receive(map_response(result=code), 0.0)
    assert isinstance(m.outcome, Refused)
    assert m.outcome.code == code
    assert m.outcome.name == (n.ResultCode(code).name if code <= 5 else "unknown result code 77")


def test_address_refusal_stops_before_mapping() -> None:
    m = n.NatPmpMapping(5000, 7200)
    m.start(0.0)
    assert m.receive(address_response("0.0.0.0", result=3), 0.0) == []
    assert m.outcome == Refused(3, "NETWORK_FAILURE")


def test_a_pcp_answer_means_no_natpmp() -> None:
    m = n.NatPmpMapping(5000, 7200)
    m.start(0.0)
    m.receive(bytes([2, 0x80, 0, 1]) + bytes(20), 0.0)
    assert isinstance(m.outcome, Unsupported)
    assert "PCP" in m.outcome.detail


def test_unsupported_version_answer_ends_at_once() -> None:
    m = n.NatPmpMapping(5000, 7200)
    m.start(0.0)
    m.receive(n.encode_response(n.UnsupportedVersionResponse(3)), 0.0)
    assert isinstance(m.outcome, Unsupported)


def test_stale_and_garbage_datagrams_are_ignored_and_reported() -> None:
    m = n.NatPmpMapping(5000, 7200, give_up_after=1.0)
    m.start(0.0)
    assert m.receive(map_response(), 0.0) == []  # a mapping answer before we asked one
    assert m.receive(b"\x00\x80\x00", 0.0) == []  # truncated
    m.receive(address_response(), 0.0)
    assert m.receive(map_response(internal=4999), 0.0) == []  # another port's answer
    assert m.receive(map_response(op=n.Opcode.MAP_UDP), 0.0) == []  # UDP, we asked TCP
    assert m.outcome is None
    m.timer(1.0)
    assert isinstance(m.outcome, NoAnswer)
    assert len(m.outcome.ignored) == 4
    assert "Internal Port" in m.outcome.ignored[2]


@given(st.lists(st.binary(max_size=20), max_size=6))
def test_arbitrary_datagrams_never_crash_the_machine(datagrams: list[bytes]) -> None:
    m = n.NatPmpMapping(5000, 7200, give_up_after=0.25)
    m.start(0.0)
    for data in datagrams:
        m.receive(data, 0.1)
    m.timer(0.25)
    assert m.outcome is not None


@given(responses)
def test_split_or_merged_datagrams_are_not_answers(response: n.Response) -> None:
    # UDP keeps message boundaries: half a message, or two in one, is garbage
    wire = n.encode_response(response)
    m = n.NatPmpMapping(5000, 7200)
    m.start(0.0)
    m.receive(wire[: len(wire) // 2], 0.0)
    m.receive(wire + wire, 0.0)
    assert m.outcome is None or isinstance(m.outcome, Unsupported)


def test_external_address_probe() -> None:
    m = n.NatPmpExternalAddress(give_up_after=0.25)
    assert m.start(0.0) == [b"\x00\x00"]
    m.receive(address_response("100.64.0.9", epoch=5), 0.001)
    assert m.outcome == Granted(IPv4Address("100.64.0.9"), 0, 0, 0, 5)


def test_epoch_detects_a_reboot() -> None:
    e = n.Epoch()
    assert not e.observe(1000, 0.0)
    assert not e.observe(1100, 100.0)  # normal
    assert not e.observe(1186, 200.0)  # slow gateway clock, within 7/8
    assert e.observe(5, 300.0)  # back to zero: the table was lost


def test_machines_do_no_io() -> None:
    forbidden = {"asyncio", "socket", "selectors", "threading", "time"}
    root = Path(n.__file__).parent
    for path in sorted(root.glob("*machine*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                    if isinstance(node, ast.Import) for alias in node.names}
        imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom)}
        assert not imported & forbidden, f"{path.name} imports {imported & forbidden}"
