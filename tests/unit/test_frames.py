"""The tunnel frame codec, tested on bytes (and fuzzed)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from nopf_web.tunnel.record_machine import PlainSlot
from nopf_web.wire.errors import WireError
from nopf_web.wire.frames import (
    BASE_MAX_PAYLOAD,
    BASE_RECORD_BUDGET,
    HEADER_SIZE,
    MAX_INCREMENT,
    MAX_PAYLOAD,
    MAX_REASON,
    MAX_SERVICES,
    RECORD_BUDGET,
    DataFrame,
    FinFrame,
    Frame,
    FrameDecoder,
    FrameError,
    FrameType,
    GoAwayFrame,
    OpenFrame,
    PingFrame,
    PongFrame,
    ResetFrame,
    WindowUpdateFrame,
    announce_records,
    announce_services,
    announced_records,
    announced_services,
    encode,
    encode_data,
    encode_goaway,
    encode_ping,
    encode_reset,
    encode_window_update,
    is_announcement,
)

sids = st.integers(1, 0xFFFF_FFFF)
reasons = st.text(max_size=60)  # up to 240 UTF-8 bytes: never truncated
frames: st.SearchStrategy[Frame] = st.one_of(
    st.builds(OpenFrame, sids, st.integers(0, MAX_SERVICES - 1)),
    st.builds(DataFrame, sids, st.binary(min_size=1, max_size=300)),
    st.builds(WindowUpdateFrame, sids, st.integers(1, MAX_INCREMENT)),
    st.builds(FinFrame, sids),
    st.builds(ResetFrame, sids, st.integers(0, 0xFFFF_FFFF), reasons),
    st.builds(PingFrame, st.binary(min_size=8, max_size=8)),
    st.builds(PongFrame, st.binary(min_size=8, max_size=8)),
    st.builds(GoAwayFrame, st.integers(0, 0xFFFF_FFFF), reasons),
)


def test_an_open_names_its_service_in_one_byte_and_service_0_as_before() -> None:
    assert encode(OpenFrame(5)) == b"\x01\x00\x00\x00\x05\x00\x00\x00\x00"  # as older peers
    assert encode(OpenFrame(5, 3)) == b"\x01\x00\x00\x00\x05\x00\x00\x00\x01\x03"
    assert FrameDecoder().feed(b"\x01\x00\x00\x00\x05\x00\x00\x00\x01\x0f") == [
        OpenFrame(5, 15)]
    for bad in (b"\x00", bytes((MAX_SERVICES,)), b"\xff"):
        with pytest.raises(FrameError, match="OPEN for service"):
            FrameDecoder().feed(b"\x01\x00\x00\x00\x05\x00\x00\x00\x01" + bad)
    with pytest.raises(FrameError, match=r"allowed 0\.\.1"):
        FrameDecoder().feed(b"\x01\x00\x00\x00\x05\x00\x00\x00\x02\x01\x01")
    with pytest.raises(FrameError, match="out of range"):
        encode(OpenFrame(5, MAX_SERVICES))


def test_a_services_announcement_is_told_from_a_record_one_and_a_clock() -> None:
    svc = announce_services(3)
    assert svc == b"\xffsvc\x00\x00\x00\x03"
    assert is_announcement(svc) and announced_services(svc) == 3
    assert announced_records(svc) is None
    assert announced_services(announce_records(RECORD_BUDGET)) is None
    assert announced_services(b"\x00" * 8) is None  # a clock
    assert announced_services(b"\xffsvc\x00\x00\x00\x00") == 1  # clamped
    assert announced_services(b"\xffsvc\xff\xff\xff\xff") == MAX_SERVICES
    for bad in (0, MAX_SERVICES + 1):
        with pytest.raises(ValueError):
            announce_services(bad)


def test_layout_is_documented_one() -> None:
    # type 2, stream id 5 (u32 BE), length 3 (u32 BE), payload.
    assert encode_data(5, b"abc") == b"\x02\x00\x00\x00\x05\x00\x00\x00\x03abc"
    assert encode_window_update(7, 65536) == (
        b"\x03\x00\x00\x00\x07\x00\x00\x00\x04\x00\x01\x00\x00")
    assert encode_ping(b"12345678") == b"\x06" + b"\x00" * 4 + b"\x00\x00\x00\x08" + b"12345678"
    assert encode_reset(1, 1, "no") == b"\x05\x00\x00\x00\x01\x00\x00\x00\x06\x00\x00\x00\x01no"
    assert HEADER_SIZE == 9


@given(st.lists(frames, max_size=20))
def test_roundtrip(values: list[Frame]) -> None:
    wire = b"".join(encode(f) for f in values)
    decoder = FrameDecoder()
    assert decoder.feed(wire) == values
    assert decoder.buffered == 0


@settings(max_examples=60)
@given(st.lists(frames, min_size=1, max_size=6))
def test_split_at_every_byte(values: list[Frame]) -> None:
    wire = b"".join(encode(f) for f in values)
    for cut in range(len(wire) + 1):
        decoder = FrameDecoder()
        assert decoder.feed(wire[:cut]) + decoder.feed(wire[cut:]) == values
    decoder = FrameDecoder()
    got: list[Frame] = []
    for i in range(len(wire)):
        got += decoder.feed(wire[i : i + 1])
    assert got == values


@given(st.binary(max_size=200), st.integers(1, 50))
def test_garbage_decodes_or_raises_frame_error(data: bytes, step: int) -> None:
    decoder = FrameDecoder()
    try:
        for i in range(0, len(data), step):
            for frame in decoder.feed(data[i : i + step]):
                assert encode(frame)  # whatever decodes is a frame we could send
    except FrameError:
        pass


@given(st.integers(0, 255), st.integers(0, 0xFFFF_FFFF), st.binary(max_size=40))
def test_garbage_after_valid_header_fields(kind: int, sid: int, payload: bytes) -> None:
    # Hand-built headers reach the per-type checks more often than random bytes do.
    wire = bytes([kind]) + sid.to_bytes(4, "big") + len(payload).to_bytes(4, "big") + payload
    try:
        got = FrameDecoder().feed(wire)
    except FrameError:
        return
    assert [encode(f) for f in got] == [wire]


@pytest.mark.parametrize(
    ("wire", "match"),
    [
        (b"\x09" + bytes(8), "unknown frame type 9"),
        (b"\x00" + bytes(8), "unknown frame type 0"),
        (b"\x02\x00\x00\x00\x01\xff\xff\xff\xff", "DATA frame with a 4294967295-byte"),
        (b"\x02\x00\x00\x00\x01\x00\x00\x00\x00", "DATA frame with a 0-byte"),
        (b"\x02\x00\x00\x00\x00\x00\x00\x00\x01x", "DATA frame on stream 0"),
        (b"\x06\x00\x00\x00\x01\x00\x00\x00\x08" + bytes(8), "PING frame on stream 1"),
        (b"\x06\x00\x00\x00\x00\x00\x00\x00\x07" + bytes(7), "PING frame with a 7-byte"),
        (b"\x03\x00\x00\x00\x01\x00\x00\x00\x04" + bytes(4), "increment 0"),
        (b"\x03\x00\x00\x00\x01\x00\x00\x00\x04\x80\x00\x00\x00", "increment 2147483648"),
        (b"\x05\x00\x00\x00\x01\x00\x00\x00\x05\x00\x00\x00\x00\xff", "RST reason is not UTF-8"),
        (b"\x01\x00\x00\x00\x01\x00\x00\x00\x02xy", "OPEN frame with a 2-byte"),
        (b"\x01\x00\x00\x00\x01\x00\x00\x00\x01x", "OPEN for service 120"),
    ],
)
def test_rejects(wire: bytes, match: str) -> None:
    with pytest.raises(FrameError, match=match):
        FrameDecoder().feed(wire)


def test_oversized_length_fails_on_the_header_alone() -> None:
    # No waiting for (or buffering) a hostile MAX_PAYLOAD+1 payload.
    header = bytes([FrameType.DATA]) + (1).to_bytes(4, "big") + (MAX_PAYLOAD + 1).to_bytes(4, "big")
    with pytest.raises(FrameError):
        FrameDecoder().feed(header)


def test_error_is_final_and_a_wire_error() -> None:
    decoder = FrameDecoder()
    with pytest.raises(WireError):
        decoder.feed(b"\xff" + bytes(8))
    with pytest.raises(FrameError, match="already failed"):
        decoder.feed(encode_ping(bytes(8)))


def test_max_payload_roundtrip_and_partial_buffering() -> None:
    big = bytes(range(256)) * (MAX_PAYLOAD // 256)
    wire = encode_data(3, big)
    decoder = FrameDecoder()
    assert decoder.feed(wire[:1000]) == []
    assert decoder.buffered == 1000
    assert decoder.feed(wire[1000:]) == [DataFrame(3, big)]


def test_encoders_refuse_what_decoders_reject() -> None:
    with pytest.raises(FrameError):
        encode_data(0, b"x")
    with pytest.raises(FrameError):
        encode_data(1, b"")
    with pytest.raises(FrameError):
        encode_data(1, bytes(MAX_PAYLOAD + 1))
    with pytest.raises(FrameError):
        encode_window_update(1, 0)
    with pytest.raises(FrameError):
        encode_ping(b"short")


def test_the_record_announcement_is_the_documented_ping_payload() -> None:
    # 0xFF, b"rec", u32 BE bytes of frames per record.
    assert announce_records(RECORD_BUDGET) == b"\xffrec" + RECORD_BUDGET.to_bytes(4, "big")
    assert announce_records(RECORD_BUDGET) == b"\xffrec\x00\x0f\xf4\x00"  # 1,021 KiB
    assert (BASE_RECORD_BUDGET, BASE_MAX_PAYLOAD) == (257 * 1024, 256 * 1024)  # every peer's
    assert (RECORD_BUDGET, MAX_PAYLOAD) == (1021 * 1024, 1020 * 1024)
    for budget in (BASE_RECORD_BUDGET, 600_000, RECORD_BUDGET):
        payload = announce_records(budget)
        assert is_announcement(payload) and announced_records(payload) == budget
        assert PingFrame(payload) == FrameDecoder().feed(encode_ping(payload))[0]
    for wrong in (BASE_RECORD_BUDGET - 1, RECORD_BUDGET + 1):
        with pytest.raises(ValueError, match="record budget must be"):
            announce_records(wrong)


@pytest.mark.parametrize(("payload", "budget"), [
    ((123_456_789_000).to_bytes(8, "big"), None),  # a clock in ns
    ((0xFE << 56).to_bytes(8, "big"), None),  # the largest clocks never start with 0xFF
    (b"\xffxyz" + bytes(4), None),  # a later version's announcement of something else
    (b"\xffrec" + (1).to_bytes(4, "big"), BASE_RECORD_BUDGET),  # every peer takes the base
    (b"\xffrec" + (0xFFFF_FFFF).to_bytes(4, "big"), RECORD_BUDGET),  # no more than we send
])
def test_announced_records_reads_only_a_record_announcement(payload: bytes,
                                                             budget: int | None) -> None:
    assert announced_records(payload) == budget
    assert is_announcement(payload) == (payload[0] == 0xFF)


def test_long_reason_is_cut_at_a_character_boundary() -> None:
    wire = encode_goaway(0, "é" * 200)  # 400 bytes of UTF-8
    (frame,) = FrameDecoder().feed(wire)
    assert isinstance(frame, GoAwayFrame)
    assert frame.message == "é" * (MAX_REASON // 2)


def test_data_payloads_are_views_only_of_buffers_nobody_can_change() -> None:
    record = b"hdr" + encode_data(1, b"payload one") + encode_data(3, b"payload two")
    for fed in (record[3:], memoryview(record)[3:]):  # bytes, or a view of bytes
        got = FrameDecoder().feed(fed)
        assert [bytes(f.data) for f in got if isinstance(f, DataFrame)] \
            == [b"payload one", b"payload two"]
        assert all(type(f.data) is memoryview for f in got if isinstance(f, DataFrame))
    mutable = bytearray(record)
    got = FrameDecoder().feed(memoryview(mutable)[3:])
    mutable[:] = bytes(len(mutable))  # the caller reuses its buffer
    assert [f.data for f in got if isinstance(f, DataFrame)] == [b"payload one", b"payload two"]
    slot = PlainSlot(record)  # does not change while viewed: sliced, not copied
    got = FrameDecoder().feed(memoryview(slot)[3:])
    assert all(type(f.data) is memoryview and f.data.obj is slot
               for f in got if isinstance(f, DataFrame))


@given(st.lists(frames, max_size=3), st.binary(max_size=12), st.booleans(),
       st.sampled_from(["bytes", "view of bytes", "view of bytearray", "view of a slot"]))
def test_whole_data_agrees_with_feed(values: list[Frame], junk: bytes, pending: bool,
                                     kind: str) -> None:
    """The one-DATA-frame shortcut gives what feed would, or None and consumes nothing."""
    wire = b"".join(encode(v) for v in values) + junk
    fed: bytes | memoryview = wire
    if kind == "view of bytes":
        fed = memoryview(b"x" + wire)[1:]
    elif kind == "view of bytearray":
        fed = memoryview(bytearray(wire))
    elif kind == "view of a slot":  # a buffer that does not change while viewed
        fed = memoryview(PlainSlot(wire))
    dec, ref = FrameDecoder(), FrameDecoder()
    if pending:  # half a header waiting: never a whole frame by itself
        dec.feed(b"\x01\x00")
        ref.feed(b"\x01\x00")
    got = dec.whole_data(fed)
    try:
        expected: list[Frame] | None = ref.feed(fed)
    except FrameError:
        expected = None
    if got is None:
        assert not (kind != "view of bytearray" and not pending and not junk
                    and len(values) == 1 and isinstance(values[0], DataFrame))
        assert dec.buffered == (2 if pending else 0)  # nothing consumed
        if expected is not None:
            assert dec.feed(fed) == expected
    else:
        sid, payload = got
        assert expected == [DataFrame(sid, payload)]
        assert type(payload) is memoryview and bytes(payload) == values[0].data  # type: ignore[union-attr]
        assert dec.buffered == 0
