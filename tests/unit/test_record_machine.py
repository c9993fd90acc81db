"""The secure channel's record machine, on bytes: two machines back to back in
memory, with every byte stream cut and merged arbitrarily, and every way the
handshake or a record can go wrong."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, strategies as st

from nopf_web.roles import PeerRole
from nopf_web.tunnel.errors import (
    HandshakeError,
    HandshakeTimeout,
    PairingMismatch,
    PathRejected,
    RecordCut,
    TunnelTampered,
)
from nopf_web.tunnel.record_machine import (
    CONFIRM_SIZE,
    FIRST_READ,
    HEADER_SIZE,
    HELLO_SIZE,
    MAX_RECORD,
    OPEN_INTO_MIN,
    OPEN_SLOTS,
    PATH_HELLO_SIZE,
    RESUME_ID_SIZE,
    SEAL_PARTS_MIN,
    TAG_SIZE,
    ChannelEnded,
    HandshakeDone,
    KeyLimits,
    Pake,
    PeerConfirmed,
    PlainSlot,
    RecordMachine,
    RecordReceived,
    SealingKey,
    TunnelSecrets,
)

from .budget import FEW
from .record_peers import Peer, cuts_of, messages, move, ready_pair, settle, started

CODE = "7-orbit-lantern"
WRONG = "7-orbit-lanterns"


def in_band(code_a: str = CODE, code_b: str = CODE,
            roles: tuple[PeerRole, PeerRole] = ("server", "client")) -> tuple[Peer, Peer]:
    return (Peer(RecordMachine.handshake(roles[0], code_a)),
            Peer(RecordMachine.handshake(roles[1], code_b)))


def exchanged(code_a: str = CODE, code_b: str = CODE) -> tuple[Pake, Pake]:
    pa, pb = Pake("server", code_a), Pake("client", code_b)
    pa.finish(pb.message)
    pb.finish(pa.message)
    return pa, pb


def confirm_only(code_a: str = CODE, code_b: str = CODE) -> tuple[Peer, Peer]:
    pa, pb = exchanged(code_a, code_b)
    return (Peer(RecordMachine.confirm_only("server", pa)),
            Peer(RecordMachine.confirm_only("client", pb)))


# -- round trips ----------------------------------------------------------------


@FEW
@given(data=st.data(), sent_a=messages, sent_b=messages)
def test_in_band_round_trip_with_any_cuts(data: st.DataObject, sent_a: list[list[bytes]],
                                          sent_b: list[list[bytes]]) -> None:
    a, b = started(in_band())
    settle(a, b, data)
    for p in (a, b):
        assert p.kinds() == [HandshakeDone, PeerConfirmed]
        assert p.m.state == "open" and p.m.confirmed and p.m.next_deadline is None
    for parts in sent_a:
        a.seal(parts)
    for parts in sent_b:
        b.seal(parts)
    settle(a, b, data)
    assert bytes(b.plain) == b"".join(b"".join(p) for p in sent_a)
    assert bytes(a.plain) == b"".join(b"".join(p) for p in sent_b)
    assert all(b.records)  # no empty record is ever sent or delivered
    # A clean end at a record boundary.
    b.take(b.m.connection_lost(None))
    assert b.events[-1] == ChannelEnded()


@FEW
@given(data=st.data(), early=messages, later=messages, b_starts_late=st.booleans())
def test_confirm_only_round_trip_with_early_data(data: st.DataObject, early: list[list[bytes]],
                                                 later: list[list[bytes]],
                                                 b_starts_late: bool) -> None:
    a, b = confirm_only()
    a.start()
    assert a.kinds() == [HandshakeDone]  # records may follow our tag at once
    assert len(a.out) == CONFIRM_SIZE
    for parts in early:
        a.seal(parts)
    if b_starts_late:  # A's tag and records arrive before B even started
        move(a, b, data)
        assert b.m.state == "new" and not b.plain
    b.start()
    settle(a, b, data)
    for parts in later:
        b.seal(parts)
    settle(a, b, data)
    for p in (a, b):
        assert p.kinds() == [HandshakeDone, PeerConfirmed]
    assert bytes(b.plain) == b"".join(b"".join(p) for p in early)
    assert bytes(a.plain) == b"".join(b"".join(p) for p in later)


def test_in_band_handshake_sends_exactly_a_hello_then_a_tag() -> None:
    a, b = in_band()
    a.start()
    assert len(a.out) == HELLO_SIZE and a.out.startswith(b"NOPF\x01A")
    b.start()
    assert b.out.startswith(b"NOPF\x01B")
    move(a, b)
    assert len(b.out) == HELLO_SIZE + CONFIRM_SIZE  # its hello, then its tag
    move(b, a)
    assert a.kinds() == [HandshakeDone, PeerConfirmed]
    assert len(a.out) == CONFIRM_SIZE
    move(a, b)
    assert b.kinds() == [HandshakeDone, PeerConfirmed]
    assert a.m.bytes_out == b.m.bytes_in == HELLO_SIZE + CONFIRM_SIZE
    assert a.m.role == "server" and a.m.peer_role == "client"


def test_records_fill_up_from_the_parts_without_joining_them() -> None:
    a, b = ready_pair()
    data = bytes(range(256)) * ((3 * MAX_RECORD + 12345) // 256 + 1)
    data = data[: 3 * MAX_RECORD + 12345]
    view = memoryview(data)
    parts: list[bytes | bytearray | memoryview] = [
        view[:1], bytearray(view[1:100_000]), view[100_000 : MAX_RECORD + 9],
        view[MAX_RECORD + 9 :]]
    records = a.seal(parts)
    assert [len(r) for r in records] == [4 + MAX_RECORD + TAG_SIZE] * 3 + [4 + 12345 + TAG_SIZE]
    assert a.m.sealing is not None and a.m.sealing.records == 4
    move(a, b)
    assert [len(r) for r in b.records] == [MAX_RECORD] * 3 + [12345]
    assert bytes(b.plain) == data
    assert a.seal([]) == [] and a.seal([b""]) == []


part_sizes = st.sampled_from([0, 1, 9, 4096, 100_000, SEAL_PARTS_MIN, 300_000, MAX_RECORD])


@FEW
@given(sizes=st.lists(part_sizes, min_size=1, max_size=6), records=st.integers(1, 3))
def test_a_record_sealed_part_by_part_is_the_record_of_the_joined_bytes(
        sizes: list[int], records: int) -> None:
    """Large records of several parts are encrypted part by part (GCM's incremental
    form): byte for byte the records of the joined bytes, key updates included, and
    the peer opens them to those bytes."""
    limits = KeyLimits(records=2)  # a key update every two records
    parted, peer = ready_pair(limits=limits)
    joined, _ = ready_pair(limits=limits)
    assert parted.m.sealing is not None
    joined.m.sealing = SealingKey(parted.m.sealing._key)
    for _ in range(records):
        parts = [os.urandom(n) for n in sizes]
        wire = b"".join(parted.seal(parts))
        assert wire == b"".join(joined.seal([b"".join(parts)]))
        before = len(peer.plain)
        peer.feed(wire)
        assert bytes(peer.plain[before:]) == b"".join(parts)


def test_a_large_record_of_several_parts_is_never_joined() -> None:
    """The record's parts go straight to the cipher: the machine's plaintext buffer,
    where the copying path joins them, is never written."""
    a, b = ready_pair()
    parts = [b"frame header", os.urandom(SEAL_PARTS_MIN), b"another header",
             os.urandom(100_000)]
    (record,) = a.seal(parts)
    assert bytes(a.m._plain) == bytes(MAX_RECORD)
    b.feed(record)
    assert b.records == [b"".join(parts)]
    a.seal([b"small", b"parts"])  # under SEAL_PARTS_MIN: the copy is the cheaper way
    assert bytes(a.m._plain[:10]) == b"smallparts"


def test_records_only_after_the_handshake() -> None:
    a, _ = in_band()
    with pytest.raises(RuntimeError):
        a.m.seal([b"too early"])
    a.start()
    with pytest.raises(RuntimeError):  # the peer's tag is not checked yet (in-band)
        a.m.seal([b"too early"])
    with pytest.raises(RuntimeError):
        a.m.start(1.0)
    with pytest.raises(RuntimeError, match="handshake"):
        RecordMachine("server").start(0.0)


def test_bytes_before_the_start_wait_for_it_and_a_loss_before_it_is_final() -> None:
    a, b = in_band()
    b.start()
    a.feed(bytes(b.out))  # B's hello arrives before A started
    assert not a.events and not a.out and a.m.state == "new"
    a.start()
    assert len(a.out) == HELLO_SIZE + CONFIRM_SIZE  # our hello first, then our tag
    c = Peer(RecordMachine.handshake("server", CODE))
    c.take(c.m.connection_lost(None))
    assert isinstance(c.failure().error, HandshakeError)
    assert c.m.start(0.0) == [] and not c.out
    pa, _ = exchanged()
    d = Peer(RecordMachine.confirm_only("server", pa))
    d.take(d.m.connection_lost(None))
    assert "before sending its key confirmation" in str(d.failure().error)


# -- a wrong code, wrong roles, not a peer -----------------------------------------


@FEW
@given(data=st.data())
def test_wrong_code_fails_on_both_sides_and_nothing_else_is_sent(data: st.DataObject) -> None:
    a, b = started(in_band(CODE, WRONG))
    wire = bytearray()
    while a.out or b.out:
        wire += move(a, b, data)
        move(b, a, data)
    for p in (a, b):
        failure = p.failure()
        assert isinstance(failure.error, PairingMismatch)
        assert str(failure.error) == "pairing code did not match"
        assert failure.flush  # our own tag must still reach the peer
        assert HandshakeDone not in p.kinds() and not p.plain
        with pytest.raises(RuntimeError):
            p.m.seal([b"x"])
    assert len(wire) == HELLO_SIZE + CONFIRM_SIZE


@FEW
@given(data=st.data())
def test_wrong_code_with_early_data_opens_nothing(data: st.DataObject) -> None:
    a, b = started(confirm_only(CODE, WRONG))
    a.seal([b"secret a"])
    b.seal([b"secret b"])
    settle(a, b, data)
    for p in (a, b):
        assert isinstance(p.failure().error, PairingMismatch)
        assert PeerConfirmed not in p.kinds() and not p.records


def test_man_in_the_middle_with_one_guess_fails_both_confirmations() -> None:
    # A relay that runs its own SPAKE2 towards each side with a guessed code.
    a, ma = in_band(CODE, WRONG)
    mb, b = in_band(WRONG, CODE)
    for p in (a, ma, mb, b):
        p.start()
    settle(a, ma)
    settle(mb, b)
    for p in (a, ma, mb, b):
        assert isinstance(p.failure().error, PairingMismatch)


def test_same_role_on_both_sides_is_refused() -> None:
    a, b = started(in_band(roles=("server", "server")))
    settle(a, b)
    for p in (a, b):
        error = p.failure().error
        assert isinstance(error, HandshakeError)
        assert "both peers took role A" in str(error)


@pytest.mark.parametrize(("hello", "message"), [
    (b"SSH-2.0-OpenSSH_9.6\r\n" + bytes(17), "the peer is not a nopf tunnel"),
    (b"NOPF\x02B" + bytes(32), "the peer speaks tunnel version 2, we speak 1"),
    (b"NOPF\x01B" + b"\xff" * 32, "the peer's pairing message is invalid"),
    (b"NOPF\x01A" + bytes(32), "both peers took role A"),
])
def test_a_bad_hello_is_named(hello: bytes, message: str) -> None:
    assert len(hello) == HELLO_SIZE
    a = Peer(RecordMachine.handshake("server", CODE)).start()
    a.feed(hello)
    failure = a.failure()
    assert isinstance(failure.error, HandshakeError) and message in str(failure.error)
    assert not failure.flush
    assert len(a.out) == HELLO_SIZE  # no tag after a bad hello
    a.feed(b"ignored from now on")
    assert len(a.events) == 1


def test_pake_errors() -> None:
    pa = Pake("server", CODE)
    with pytest.raises(ValueError, match="finish"):
        pa.key()
    pa.finish(Pake("server", CODE).message)  # the rendezvous sent our own side back
    with pytest.raises(HandshakeError, match="both peers took role A"):
        RecordMachine.confirm_only("server", pa)
    pa, pb = exchanged()
    with pytest.raises(ValueError, match="made for role server, not client"):
        RecordMachine.confirm_only("client", pa)
    pb.finish(pb.peer_message or b"")  # the same message again: a no-op
    assert pb.key() == pa.key()
    pb.finish(Pake("server", CODE).message)  # another one: refused
    with pytest.raises(HandshakeError, match="changed between attempts"):
        pb.key()
    with pytest.raises(ValueError, match="role must be"):
        Pake("A", CODE)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="role must be"):
        RecordMachine.handshake("B", CODE)  # type: ignore[arg-type]


# -- time and connection loss during the handshake -------------------------------


def test_handshake_timeout_names_the_step_it_waited_for() -> None:
    a = Peer(RecordMachine.handshake("server", CODE, timeout=0.3)).start(100.0)
    assert a.m.next_deadline == pytest.approx(100.3)
    a.take(a.m.timer(100.29))
    assert not a.events
    a.take(a.m.timer(100.3))
    error = a.failure().error
    assert isinstance(error, HandshakeTimeout)
    assert str(error) == "secure handshake: no pairing message from the peer within 0.3 s"
    assert a.m.next_deadline is None and not a.failure().flush
    # Past the hello, the step is the confirmation; the deadline does not move.
    a, b = in_band()
    a.start(5.0)
    b.start(7.0)
    move(b, a)
    b.out.clear()  # B's tag is lost
    move(a, b)
    assert a.m.next_deadline == pytest.approx(15.0)
    a.take(a.m.timer(15.0))
    assert str(a.failure().error) == ("secure handshake: no key confirmation from the peer "
                                      "within 10 s")


def test_confirm_only_timeout_and_after_confirmation_no_deadline() -> None:
    pa, _ = exchanged()
    a = Peer(RecordMachine.confirm_only("server", pa, timeout=2.5)).start(0.0)
    a.seal([b"sending is fine meanwhile"])
    a.take(a.m.timer(2.4))
    assert a.kinds() == [HandshakeDone]
    a.take(a.m.timer(2.5))
    error = a.failure().error
    assert isinstance(error, HandshakeTimeout)
    assert "no key confirmation from the peer within 2.5 s" in str(error)
    a, b = confirm_only()
    a.start(0.0)
    b.start(0.0)
    settle(a, b)
    a.take(a.m.timer(1e9))
    assert a.kinds() == [HandshakeDone, PeerConfirmed] and a.m.next_deadline is None


@pytest.mark.parametrize(("when", "exc", "message"), [
    ("hello", None, "the peer closed the connection before sending its pairing message"),
    ("confirm", None, "the peer closed the connection before sending its key confirmation"),
    ("hello", ConnectionResetError(104, "Connection reset by peer"),
     "connection failed while waiting for the peer's pairing message (Connection reset by peer)"),
])
def test_connection_lost_during_the_handshake(when: str, exc: Exception | None,
                                              message: str) -> None:
    a, b = started(in_band())
    if when == "confirm":
        b.out[HELLO_SIZE:] = b""  # B's hello arrives; its tag never does
        move(b, a)
        assert a.m.state == "confirm"
    a.take(a.m.connection_lost(exc))
    error = a.failure().error
    assert type(error) is HandshakeError and message in str(error)
    a.take(a.m.connection_lost(None))  # once ended, nothing more
    assert len(a.events) == 1


# -- records that were tampered with ----------------------------------------------


@FEW
@given(data=st.data(), bit=st.integers(0, 7))
def test_any_flipped_bit_is_detected_and_nothing_of_it_is_delivered(data: st.DataObject,
                                                                    bit: int) -> None:
    a, b = ready_pair()
    first = a.seal([b"first record, delivered"])[0]
    records = a.seal([b"x" * 100, b"second record"])
    stream = bytearray(b"".join(records))
    at = data.draw(st.integers(0, len(stream) - 1), label="at")
    stream[at] ^= 1 << bit
    b.feed(first + bytes(stream), cuts_of(data, len(first) + len(stream)))
    b.take(b.m.connection_lost(None))
    assert b.records == [b"first record, delivered"]
    error = b.failure().error
    headers = {sum(len(r) for r in records[:i]) + k for i in range(len(records))
               for k in range(HEADER_SIZE)}
    if isinstance(error, RecordCut):  # a length made larger: the record never ends
        assert at in headers
    else:
        assert isinstance(error, TunnelTampered)
        assert str(error).startswith("tunnel data rejected: ")


def opened(peer: Peer, record: bytes) -> bytes | memoryview:
    """``record`` into ``peer``'s machine; the plaintext exactly as it came out."""
    events = []
    piece = memoryview(record)
    while piece:
        room = peer.m.get_buffer(len(piece))
        n = min(len(room), len(piece))
        room[:n] = piece[:n]
        del room
        events += peer.m.buffer_updated(n)
        piece = piece[n:]
    (event,) = events
    assert type(event) is RecordReceived
    return event.plaintext


def test_large_records_are_opened_into_slots_that_never_change_while_viewed() -> None:
    a, b = ready_pair()
    size = OPEN_INTO_MIN
    records = [a.seal([bytes([i]) * size])[0] for i in range(OPEN_SLOTS + 3)]
    held = [opened(b, r) for r in records[:OPEN_SLOTS]]  # each slot viewed
    views = [p for p in held if isinstance(p, memoryview) and type(p.obj) is PlainSlot]
    assert len(views) == OPEN_SLOTS and len({id(p.obj) for p in views}) == OPEN_SLOTS
    del views
    spare = opened(b, records[OPEN_SLOTS])
    assert type(spare) is bytes and spare == bytes([OPEN_SLOTS]) * size  # no slot free
    # The held views still read their own records.
    assert [bytes(p) for p in held] == [bytes([i]) * size for i in range(OPEN_SLOTS)]
    first = held[0]
    assert isinstance(first, memoryview)
    slot = id(first.obj)  # not the slot itself: a reference would keep it taken
    del held[0], first  # that slot is free again: the next record goes there
    again = opened(b, records[OPEN_SLOTS + 1])
    assert isinstance(again, memoryview) and id(again.obj) == slot
    assert bytes(again) == bytes([OPEN_SLOTS + 1]) * size
    assert bytes(held[0]) == bytes([1]) * size  # the other slot is untouched


def test_small_records_get_their_own_bytes() -> None:
    a, b = ready_pair()
    plain = opened(b, a.seal([b"x" * (OPEN_INTO_MIN - 1)])[0])
    assert type(plain) is bytes and plain == b"x" * (OPEN_INTO_MIN - 1)


def read(peer: Peer, stream: memoryview) -> int:
    """One read as a socket gives it: as much of ``stream`` as get_buffer has room
    for, through buffer_updated; the bytes taken."""
    room = peer.m.get_buffer(-1)
    n = min(len(room), len(stream))
    room[:n] = stream[:n]
    del room
    peer.take(peer.m.buffer_updated(n))
    return n


def test_a_small_record_at_a_record_boundary_takes_one_read() -> None:
    # Not a 4-byte header read and then the body: a keystroke or a request costs
    # one read (one system call, one pass through the driver).
    a, b = ready_pair()
    for text in (b"ls -l\n", b"y" * 2000, b"q"):
        record = a.seal([text])[0]
        assert len(b.m.get_buffer(-1)) == FIRST_READ
        assert read(b, memoryview(record)) == len(record)
        assert b.records[-1] == text
    assert len(b.records) == 3


def test_one_read_of_many_records_opens_each_and_keeps_the_next_ones_start() -> None:
    a, b = ready_pair()
    small = [f"request {i}".encode() for i in range(1000)]  # some 30 KiB of records
    large = bytes(range(256)) * 1024  # 256 KiB: one record, cut by the first read
    stream = memoryview(b"".join(a.seal([m])[0] for m in small) + a.seal([large])[0])
    assert len(stream) > FIRST_READ
    taken = read(b, stream)
    assert taken == FIRST_READ
    whole = len(b.records)
    assert 0 < whole < len(small) and b.records == small[:whole]  # in order, each once
    # Then the rest is read as before: exactly a record and the next header.
    while taken < len(stream):
        room = len(b.m.get_buffer(-1))
        got = read(b, stream[taken:])
        if b.records[-1] != large:
            assert got == room  # every read until the large record fills its room
        taken += got
    assert b.records == [*small, large]
    assert len(b.m.get_buffer(-1)) == FIRST_READ  # back at a boundary


def test_a_forged_record_opened_into_a_slot_fails_and_delivers_nothing() -> None:
    a, b = ready_pair()
    record = bytearray(a.seal([bytes(OPEN_INTO_MIN)])[0])
    record[-1] ^= 1  # the tag
    b.feed(bytes(record))
    assert "failed authentication" in str(b.failure().error)
    assert not b.records


def test_a_flipped_ciphertext_byte_names_the_record() -> None:
    a, b = ready_pair()
    record = bytearray(a.seal([b"known plaintext"])[0])
    record[4 + 3] ^= 1
    b.feed(bytes(record))
    error = b.failure().error
    assert str(error) == ("tunnel data rejected: record 0 failed authentication: "
                          "the data was altered or injected in transit")
    assert not b.failure().flush


def test_reordered_replayed_and_injected_records_fail_authentication() -> None:
    a, b = ready_pair()
    r0, r1 = a.seal([b"zero"])[0], a.seal([b"one"])[0]
    b.feed(r1 + r0)  # reordered
    assert "record 0 failed authentication" in str(b.failure().error) and not b.records
    a, b = ready_pair()
    r0 = a.seal([b"zero"])[0]
    b.feed(r0 + r0)  # replayed
    assert b.records == [b"zero"]
    assert "record 1 failed authentication" in str(b.failure().error)
    a, b = ready_pair()
    forged = bytearray(4 + 5 + TAG_SIZE)
    n = SealingKey(bytes(32)).seal_into(memoryview(b"evil!"), memoryview(forged))
    b.feed(bytes(forged[:n]))  # injected: a valid record under another key
    assert "record 0 failed authentication" in str(b.failure().error) and not b.records


@pytest.mark.parametrize("size", [0, 1, TAG_SIZE, MAX_RECORD + TAG_SIZE + 1, 0xFF_FFFF])
def test_a_record_length_out_of_range_is_refused_at_once(size: int) -> None:
    _, b = ready_pair()
    b.feed(struct.pack("!I", size))  # no body: refused on the header alone
    error = b.failure().error
    assert str(error) == f"tunnel data rejected: record length {size} is out of range"
    assert len(b.m.get_buffer(-1)) > 0


@pytest.mark.parametrize(("word", "message"), [
    (0xFFFF_FFFF, "record type 255 is unknown"),
    (0x0200_0020, "record type 2 is unknown"),
    (0x0100_0000, "key update record length 0 is not 16"),
    (0x0100_0011, "key update record length 17 is not 16"),
])
def test_an_unknown_record_type_or_a_key_update_of_another_length_is_refused_at_once(
        word: int, message: str) -> None:
    _, b = ready_pair()
    b.feed(struct.pack("!I", word))
    assert str(b.failure().error) == f"tunnel data rejected: {message}"
    assert len(b.m.get_buffer(-1)) > 0


@pytest.mark.parametrize("size", [TAG_SIZE + 1, MAX_RECORD + TAG_SIZE])
def test_the_record_lengths_at_the_limits_are_accepted(size: int) -> None:
    a, b = ready_pair()
    payload = bytes(size - TAG_SIZE)
    b.feed(a.seal([payload])[0])
    assert b.records == [payload] and not b.events[2:]


@FEW
@given(data=st.data())
def test_a_connection_cut_inside_a_record(data: st.DataObject) -> None:
    a, b = ready_pair()
    whole = a.seal([b"complete"])[0]
    cut = a.seal([b"never complete"])[0]
    keep = data.draw(st.integers(1, len(cut) - 1), label="keep")
    b.feed(whole + cut[:keep], cuts_of(data, len(whole) + keep))
    b.take(b.m.connection_lost(None))
    assert b.records == [b"complete"]
    error = b.failure().error
    assert isinstance(error, RecordCut)  # a lost path to the resume layer, not tampering
    assert str(error) == "tunnel connection cut inside a record (the partial record is dropped)"


def test_a_connection_error_after_the_handshake_is_passed_on_as_is() -> None:
    _, b = ready_pair()
    reset = ConnectionResetError(104, "Connection reset by peer")
    b.take(b.m.connection_lost(reset))
    assert b.failure().error is reset


def test_records_right_behind_the_tag_are_opened_in_the_same_read() -> None:
    a, b = started(in_band())
    move(a, b)  # A's hello: B sends its hello and tag
    move(b, a)  # A verifies B's tag, sends its own
    records = a.seal([b"right behind"]) + a.seal([b"the tag"])
    wire = bytes(a.out)
    a.out.clear()
    b.feed(wire)  # one read: tag and two records
    assert b.kinds() == [HandshakeDone, PeerConfirmed]
    assert b.records == [b"right behind", b"the tag"] and len(records) == 2


# -- later paths of a resumable tunnel ---------------------------------------------


def tunnel_secrets(code: str = CODE) -> tuple[TunnelSecrets, TunnelSecrets]:
    """Both sides' secrets after a first connection confirmed."""
    a, b = started(confirm_only(code, code))
    settle(a, b)
    assert a.m.secrets is not None and b.m.secrets is not None
    return a.m.secrets, b.m.secrets


def path_pair(secrets: tuple[TunnelSecrets, TunnelSecrets] | None = None,
              nonces: tuple[bytes | None, bytes | None] = (None, None)) -> tuple[Peer, Peer]:
    sa, sb = secrets or tunnel_secrets()
    return (Peer(RecordMachine.path("server", sa, nonce=nonces[0])),
            Peer(RecordMachine.path("client", sb, nonce=nonces[1])))


def test_the_first_connection_exposes_secrets_only_once_confirmed_never_the_key() -> None:
    a, b = confirm_only()
    assert a.m.secrets is None  # derived already, but not proven by the peer yet
    a.start()
    b.start()
    move(a, b)
    assert b.m.secrets is not None and a.m.secrets is None
    move(b, a)
    sa, sb = a.m.secrets, b.m.secrets
    assert sa is not None and sb is not None
    assert sa.path_secret == sb.path_secret and sa.resume_id == sb.resume_id
    assert len(sa.path_secret) == 32 and len(sa.resume_id) == RESUME_ID_SIZE == 16
    pa, _ = exchanged()
    assert pa.key() not in (sa.path_secret, sa.resume_id)
    assert repr(sa) == "TunnelSecrets(...)"
    # In-band gives the same kind of secrets; another pairing gives other ones.
    c, d = in_band()
    c.start()
    d.start()
    settle(c, d)
    assert c.m.secrets is not None and d.m.secrets is not None
    assert c.m.secrets.resume_id == d.m.secrets.resume_id != sa.resume_id
    e, f = in_band(CODE, WRONG)
    e.start()
    f.start()
    settle(e, f)
    assert e.m.secrets is None and f.m.secrets is None


@FEW
@given(data=st.data(), early=messages, later=messages)
def test_a_path_round_trip_with_any_cuts(data: st.DataObject, early: list[list[bytes]],
                                         later: list[list[bytes]]) -> None:
    a, b = started(path_pair())
    assert len(a.out) == PATH_HELLO_SIZE == 22 and a.out.startswith(b"NOPP\x01A")
    assert b.out.startswith(b"NOPP\x01B")
    move(a, b, data)
    assert b.kinds() == [HandshakeDone]  # its confirm is sent; records may follow it
    for parts in early:
        b.seal(parts)
    settle(a, b, data)
    for parts in later:
        a.seal(parts)
    settle(a, b, data)
    for p in (a, b):
        assert p.kinds() == [HandshakeDone, PeerConfirmed] and p.m.confirmed
        assert p.m.next_deadline is None
    assert bytes(a.plain) == b"".join(b"".join(p) for p in early)
    assert bytes(b.plain) == b"".join(b"".join(p) for p in later)
    assert a.m.bytes_out - sum(len(b"".join(p)) for p in later) \
        == PATH_HELLO_SIZE + CONFIRM_SIZE + (4 + TAG_SIZE) * sum(1 for p in later if b"".join(p))


def test_every_path_has_fresh_keys() -> None:
    secrets = tunnel_secrets()
    sealed = set()
    for _ in range(3):
        a, b = path_pair(secrets)
        a.start()
        b.start()
        settle(a, b)
        sealed.add(a.seal([b"the same plaintext"])[0])
        move(a, b)
        assert b.records == [b"the same plaintext"]
    assert len(sealed) == 3  # the same counter 0 and plaintext, other keys each time


def test_a_path_with_another_tunnels_secret_is_rejected_on_both_sides() -> None:
    a, _ = path_pair()
    _, b = path_pair(tunnel_secrets(WRONG))
    a.start()
    b.start()
    move(b, a)
    a.seal([b"secret a"])  # right behind A's confirm: never opened
    settle(a, b)
    for p in (a, b):
        failure = p.failure()
        assert isinstance(failure.error, PathRejected) and not failure.flush
        assert "did not prove the tunnel's key" in str(failure.error)
        assert PeerConfirmed not in p.kinds() and not p.records


def test_a_path_hello_and_confirm_replayed_from_another_connection_give_nothing() -> None:
    secrets = tunnel_secrets()
    # A genuine connection: A's hello, confirm and a record, as an eavesdropper saw them.
    a1, b1 = path_pair(secrets)
    a1.start()
    b1.start()
    move(b1, a1)
    a1.seal([b"seen once"])
    seen = bytes(a1.out)
    # Replayed to B on a new connection (B picks a fresh nonce).
    b2 = Peer(RecordMachine.path("client", secrets[1])).start()
    b2.feed(seen)
    failure = b2.failure()
    assert isinstance(failure.error, PathRejected)
    assert not b2.records and PeerConfirmed not in b2.kinds()
    # A stranger's hello with a made-up confirm is refused the same way.
    b3 = Peer(RecordMachine.path("client", secrets[1], nonce=bytes(16))).start()
    b3.feed(seen[:PATH_HELLO_SIZE] + bytes(CONFIRM_SIZE))
    assert isinstance(b3.failure().error, PathRejected)


def test_a_path_with_a_wrong_tag_is_dropped_and_the_genuine_one_still_works() -> None:
    secrets = tunnel_secrets()
    a, b = started(path_pair(secrets))
    move(b, a)  # A has B's hello: A's confirm is out
    forged = bytearray(a.out)
    forged[-1] ^= 1
    b.feed(bytes(forged))
    assert isinstance(b.failure().error, PathRejected)
    a2, b2 = path_pair(secrets)
    a2.start()
    b2.start()
    settle(a2, b2)
    assert a2.m.confirmed and b2.m.confirmed


@pytest.mark.parametrize(("hello", "message"), [
    (b"NOPF\x01B" + bytes(16), "the peer is not a nopf tunnel path"),
    (b"NOPP\x02B" + bytes(16), "the peer speaks tunnel version 2, we speak 1"),
    (b"NOPP\x01A" + bytes(16), "the peer took side b'A'; expected B"),
])
def test_a_bad_path_hello_is_named(hello: bytes, message: str) -> None:
    assert len(hello) == PATH_HELLO_SIZE
    a = Peer(RecordMachine.path("server", tunnel_secrets()[0])).start()
    a.feed(hello)
    failure = a.failure()
    assert type(failure.error) is HandshakeError and message in str(failure.error)
    assert len(a.out) == PATH_HELLO_SIZE  # no confirm after a bad hello


def test_path_handshake_timeouts_and_losses_name_the_step() -> None:
    secrets = tunnel_secrets()
    a = Peer(RecordMachine.path("server", secrets[0], timeout=2.0)).start(10.0)
    a.take(a.m.timer(12.0))
    assert str(a.failure().error) == ("secure handshake: no path hello from the peer "
                                      "within 2 s")
    a, b = path_pair(secrets)
    a.start(0.0)
    b.start(0.0)
    move(b, a)
    a.take(a.m.connection_lost(None))
    assert "before sending its path confirmation" in str(a.failure().error)
    with pytest.raises(ValueError, match="16 bytes"):
        RecordMachine.path("server", secrets[0], nonce=b"short")
