"""Record-layer key updates, on bytes: two record machines back to back with low
key limits, every byte stream cut and merged arbitrarily, the KEY_UPDATE
record's layout and key derivation checked against an independent HKDF, and
every way a peer could drop, repeat, forge or skip an update refused."""

from __future__ import annotations

import hashlib
import hmac
import struct

import pytest
from hypothesis import given, strategies as st

from nopf_web.tunnel.record_machine import (
    DEFAULT_KEY_LIMITS,
    HEADER_SIZE,
    HKDF_SALT,
    KEY_UPDATE,
    LABEL_KEY_UPDATE,
    MAX_RECORD,
    RECEIVE_SLACK,
    TAG_SIZE,
    KeyLimits,
    OpeningKey,
    Pake,
    RecordMachine,
    SealingKey,
)

from .budget import FEW
from .record_peers import Peer, messages, settle


def pair(limits: KeyLimits, *, peer_limits: KeyLimits | None = None,
         kind: str = "in_band") -> tuple[Peer, Peer]:
    """Two machines past their handshake: ``limits`` for A, ``peer_limits`` for B."""
    lb = limits if peer_limits is None else peer_limits
    if kind == "in_band":
        a = Peer(RecordMachine.handshake("server", "7-orbit-lantern", limits=limits))
        b = Peer(RecordMachine.handshake("client", "7-orbit-lantern", limits=lb))
    else:
        pa, pb = Pake("server", "7-orbit-lantern"), Pake("client", "7-orbit-lantern")
        pa.finish(pb.message)
        pb.finish(pa.message)
        a = Peer(RecordMachine.confirm_only("server", pa, limits=limits))
        b = Peer(RecordMachine.confirm_only("client", pb, limits=lb))
        if kind == "path":  # a later path of the same tunnel
            a.start()
            b.start()
            settle(a, b)
            sa, sb = a.m.secrets, b.m.secrets
            assert sa is not None and sb is not None
            a = Peer(RecordMachine.path("server", sa, limits=limits))
            b = Peer(RecordMachine.path("client", sb, limits=lb))
    a.start()
    b.start()
    settle(a, b)
    assert a.m.state == b.m.state == "open"
    return a, b


def hkdf_sha256(key: bytes, salt: bytes, info: bytes) -> bytes:
    """RFC 5869 with hashlib/hmac only (not the library the machine uses)."""
    prk = hmac.new(salt, key, hashlib.sha256).digest()
    return hmac.new(prk, info + b"\x01", hashlib.sha256).digest()


def split(wire: bytes) -> list[tuple[int, bytes]]:
    """(header word, body) of each record on ``wire``."""
    out, pos = [], 0
    while pos < len(wire):
        (word,) = struct.unpack_from("!I", wire, pos)
        end = pos + HEADER_SIZE + (word & 0xFF_FFFF)
        out.append((word, wire[pos + HEADER_SIZE : end]))
        pos = end
    return out


def join(records: list[tuple[int, bytes]]) -> bytes:
    return b"".join(struct.pack("!I", word) + body for word, body in records)


# -- round trips ------------------------------------------------------------------------


@FEW
@given(data=st.data(), sent_a=messages, sent_b=messages, records=st.integers(1, 4),
       nbytes=st.integers(1, 9000), kind=st.sampled_from(["in_band", "confirm", "path"]))
def test_low_limits_round_trip_with_any_cuts(data: st.DataObject, sent_a: list[list[bytes]],
                                             sent_b: list[list[bytes]], records: int,
                                             nbytes: int, kind: str) -> None:
    limits = KeyLimits(records=records, bytes=nbytes)
    a, b = pair(limits, kind=kind)
    for parts in sent_a:
        a.seal(parts)
        sealing = a.m.sealing
        assert sealing is not None
        assert sealing.records <= records and sealing.bytes < nbytes + MAX_RECORD
    for parts in sent_b:
        b.seal(parts)
    settle(a, b, data)
    assert bytes(b.plain) == b"".join(b"".join(p) for p in sent_a)
    assert bytes(a.plain) == b"".join(b"".join(p) for p in sent_b)
    assert all(b.records) and all(a.records)  # a KEY_UPDATE delivers nothing
    assert a.m.key_updates == b.m.key_updates[::-1]
    sa, ob = a.m.sealing, b.m.opening
    assert sa is not None and ob is not None and sa.generation == ob.generation
    sent = [len(b"".join(p)) for p in sent_a]
    if len([n for n in sent if n]) > records:  # more records than one key may seal
        assert a.m.key_updates[0] >= 1
    assert a.m.state == b.m.state == "open"


def test_one_big_write_crosses_several_key_updates_in_one_seal() -> None:
    a, b = pair(KeyLimits(records=2, bytes=1 << 40))
    data = bytes(range(256)) * (7 * MAX_RECORD // 256 + 1)
    records = a.seal([data])  # 8 data records: updates after the 2nd, 4th and 6th
    words = [struct.unpack_from("!I", r)[0] for r in records]
    assert [w >> 24 for w in words] == [0, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0]
    assert a.m.key_updates == (3, 0)
    settle(a, b)
    assert bytes(b.plain) == data and b.m.key_updates == (0, 3)


# -- the wire ---------------------------------------------------------------------------


def test_the_key_update_record_and_the_next_key_are_the_documented_ones() -> None:
    key = bytes(range(32))
    limits = KeyLimits(records=2, bytes=1 << 40)
    sealing = SealingKey(key)
    out = memoryview(bytearray(HEADER_SIZE + MAX_RECORD + TAG_SIZE))
    wire = bytearray()
    for plain in (b"zero", b"one"):
        wire += out[: sealing.seal_into(memoryview(plain), out)]
    assert sealing.due(limits)
    n = sealing.seal_into(memoryview(b""), out, KEY_UPDATE)
    assert n == HEADER_SIZE + TAG_SIZE
    update = bytes(out[:n])
    assert update[:4] == bytes([KEY_UPDATE, 0, 0, TAG_SIZE])  # type 1, u24 length 16
    following = sealing.next()
    assert following.generation == 1 and following.records == 0
    wire += update
    wire += out[: following.seal_into(memoryview(b"two"), out)]
    # K_next = HKDF-SHA256(K, salt, info), computed here without the machine's library.
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    k_next = hkdf_sha256(key, HKDF_SALT, LABEL_KEY_UPDATE)
    records = split(bytes(wire))
    assert [w >> 24 for w, _ in records] == [0, 0, 1, 0]
    # The update is sealed under the old key with the next counter (2), empty.
    assert AESGCM(key).decrypt(struct.pack("!4xQ", 2), records[2][1], update[:4]) == b""
    word, body = records[3]
    assert AESGCM(k_next).decrypt(struct.pack("!4xQ", 0), body,
                                  struct.pack("!I", word)) == b"two"
    # And the machine's opening side agrees.
    opening = OpeningKey(key, limits)
    header = memoryview(bytes(wire))
    pos = 0
    got = []
    for word, body in records:
        size = HEADER_SIZE + len(body)
        plain = opening.open(header[pos : pos + HEADER_SIZE],
                             header[pos + HEADER_SIZE : pos + size])
        if word >> 24 == KEY_UPDATE:
            opening = opening.next()
        else:
            got.append(plain)
        pos += size
    assert got == [b"zero", b"one", b"two"]


def test_a_data_record_keeps_its_old_header_byte_for_byte() -> None:
    a, _ = pair(DEFAULT_KEY_LIMITS)
    (record,) = a.seal([b"x" * 1000])
    assert record[:4] == struct.pack("!I", 1000 + TAG_SIZE)  # type 0: the u32 length of old


# -- a peer that drops, repeats, forges or skips an update --------------------------------


def updated_wire() -> tuple[Peer, Peer, list[tuple[int, bytes]]]:
    """A with limits of 2 records has sent: r0, r1, KEY_UPDATE, r2, r3 (not yet carried)."""
    a, b = pair(KeyLimits(records=2, bytes=1 << 40))
    for i in range(4):
        a.seal([f"record {i}".encode()])
    records = split(bytes(a.out))
    a.out.clear()
    assert [w >> 24 for w, _ in records] == [0, 0, 1, 0, 0]
    return a, b, records


@pytest.mark.parametrize(("what", "edit", "delivered", "message"), [
    ("dropped", lambda r: r[:2] + r[3:], 2, "record 2 failed authentication"),
    ("repeated", lambda r: [*r[:3], r[2], *r[3:]], 2, "record 0 failed authentication"),
    ("moved later", lambda r: [*r[:2], r[3], r[2], *r[4:]], 2, "record 2 failed authentication"),
    ("forged", lambda r: [*r[:2], (r[2][0], bytes(TAG_SIZE)), *r[3:]], 2,
     "record 2 failed authentication"),
    ("retyped as data", lambda r: [*r[:2], (TAG_SIZE, r[2][1]), *r[3:]], 2,
     "record length 16 is out of range"),
    ("a data record retyped as an update",
     lambda r: [*r[:1], (0x0100_0000 | len(r[1][1]), r[1][1]), *r[2:]],
     1, "key update record length"),
])
def test_an_update_dropped_repeated_moved_or_forged_fails_the_channel(
        what: str, edit: object, delivered: int, message: str) -> None:
    _, b, records = updated_wire()
    b.feed(join(edit(records)))  # type: ignore[operator]
    assert message in str(b.failure().error), what
    assert b.records == [f"record {i}".encode() for i in range(delivered)]
    assert b.m.state == "failed"


def test_a_peer_that_never_updates_is_refused_past_the_slack() -> None:
    # A seals as if its limits were huge; B expects updates every 2 records.
    a, b = pair(KeyLimits(records=1 << 30), peer_limits=KeyLimits(records=2))
    allowed = RECEIVE_SLACK * 2 + 1
    for i in range(allowed + 1):
        a.seal([b"%d" % i])
    settle(a, b)
    assert len(b.records) == allowed
    assert "without updating it" in str(b.failure().error)


def test_a_peer_that_never_updates_its_byte_count_is_refused_past_the_slack() -> None:
    a, b = pair(KeyLimits(bytes=1 << 40), peer_limits=KeyLimits(bytes=1000))
    a.seal([bytes(RECEIVE_SLACK * 1000 + MAX_RECORD)])  # the most one key may carry
    settle(a, b)
    assert b.m.state == "open"
    a.seal([b"one byte too many"])
    settle(a, b)
    assert "without updating it" in str(b.failure().error)


def test_limits_are_at_least_one() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        KeyLimits(records=0)
    with pytest.raises(ValueError, match="at least 1"):
        KeyLimits(bytes=0)
    assert KeyLimits(records=1 << 24, bytes=1 << 32) == DEFAULT_KEY_LIMITS
