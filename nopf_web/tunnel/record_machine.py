"""The secure channel's handshake and record layer as a sans-IO machine.

Bytes in, events out; plaintext in, ciphertext out. No sockets, no event
loop, no clock: the one timeout (the peer's key confirmation) is a deadline
the driver reads from :attr:`RecordMachine.next_deadline` and reports with
:meth:`RecordMachine.timer`. The asyncio driver is :mod:`nopf_web.tunnel.secure`.

The two peers share only the pairing code (e.g. ``7-orbit-lantern``). They run
SPAKE2 on it, confirm they derived the same key, then exchange AES-256-GCM
records. Only reviewed primitives are used: SPAKE2 (``spake2`` package, Ed25519
group), HKDF-SHA256, HMAC-SHA256 and AES-256-GCM (``cryptography``).

Why this is safe against a rendezvous or a machine in the middle: SPAKE2 gives
the same key to both sides only if both used the same code; someone who relays
the connection and runs SPAKE2 with each side learns nothing that lets it test
other codes offline, so it gets one guess per attempt (the rendezvous limits
attempts and codes are single-use). Key confirmation makes a wrong guess fail
on both sides before any application data moves.

Roles are explicit (after a simultaneous open both peers think they
initiated): the server (sharer) is SPAKE2 side ``A``, the client (connector)
side ``B`` (:func:`nopf_web.roles.spake_side`; the letters exist only here).

In-band handshake (:meth:`RecordMachine.handshake`), both sides send each
message first and then read the peer's::

    hello (38 bytes)
        offset  size  field
        0       4     magic    b"NOPF"
        4       1     version  1
        5       33    spake2   the SPAKE2 message: side byte b"A"/b"B", then
                               a 32-byte Ed25519 group element
    confirm (32 bytes)
        HMAC-SHA256(Kc, b"nopf v1 confirm " + side + hello_A + hello_B)

where ``K`` is the 32-byte SPAKE2 key (``idA=b"nopf-A"``, ``idB=b"nopf-B"``,
password = the pairing code's UTF-8 bytes) and every key comes from
HKDF-SHA256(K, salt=b"nopf tunnel v1", info=label)::

    Kc    label b"nopf v1 confirm"  key confirmation
    K_AB  label b"nopf v1 A->B"     AES-256-GCM key, records sent by A
    K_BA  label b"nopf v1 B->A"     AES-256-GCM key, records sent by B

Each side checks the peer's confirm tag (with the peer's side in the label)
with ``hmac.compare_digest``; a mismatch is :class:`PairingMismatch` on both
sides, since each checks independently.

Confirm-only (:meth:`RecordMachine.confirm_only`): the SPAKE2 messages went
through the rendezvous (:class:`Pake`; each is the 33-byte ``spake2`` field
above, forwarded opaquely, so a lying rendezvous still gets one online guess,
as a relay on the path does). The tunnel starts with the confirm tag over the
same transcript (the two hellos rebuilt from the messages), and our records
may follow it at once. The peer's tag is checked before any of its records is
opened; after a wrong tag nothing is opened.

Records, in each direction after the handshake::

    offset  size  field
    0       1     type        0 = DATA, 1 = KEY_UPDATE (any other: the tunnel fails)
    1       3     length      u24 big-endian: bytes of ciphertext + tag that follow:
                              DATA TAG_SIZE+1 .. MAX_RECORD+TAG_SIZE; KEY_UPDATE exactly
                              TAG_SIZE (no plaintext)
    4       len   ciphertext  AES-256-GCM(key, nonce, plaintext, aad=the 4 header bytes),
                              then the 16-byte tag

(Before key updates existed the header was a u32 length; every DATA record is
byte for byte what it was, since lengths stay far below 2^24.) The nonce is 4
zero bytes then a u64 big-endian record counter, starting at 0 for each key
and never reused (each direction has its own keys). A DATA record holds
1..``MAX_RECORD`` bytes of plaintext. A tag failure or a type or length out of
range is :class:`TunnelTampered`; a connection cut mid-record is
:class:`RecordCut` (a lost path to the resume layer, as a cut connection is);
nothing of a failed or cut record is ever returned.

Key updates. Each direction's key and counter live in their own small object
(:class:`SealingKey`, :class:`OpeningKey`). A sender that has sealed
:attr:`KeyLimits.records` records or :attr:`KeyLimits.bytes` plaintext bytes
under its key seals a KEY_UPDATE record (empty, authenticated under the old
key with the next counter, so it can be neither forged nor dropped unseen nor
replayed) and seals everything after it under the next key, counter 0::

    K_next = HKDF-SHA256(K_current, salt=b"nopf tunnel v1", info=b"nopf v1 key update")

The receiver opens the KEY_UPDATE record with the old key and opens the next
record with K_next. One update costs one HKDF and one AES key schedule. A sender
checks before each record, so a key seals at most ``records`` DATA records and
``bytes - 1 + MAX_RECORD`` bytes. A peer that goes on past ``RECEIVE_SLACK``
times the limits (plus that one record) without an update is
:class:`TunnelTampered`: no key ever protects more than the bounds below
allow. A resumed connection starts with fresh keys of its own (see "Later
paths") and counts from zero.

Why these limits (AES-256-GCM with 96-bit nonces; NIST SP 800-38D and the
CFRG's "Usage Limits on AEAD Algorithms", draft-irtf-cfrg-aead-limits):

- Nonces: a u64 counter per key, so 2^64 records before a repeat; a key
  update resets it with a new key, so no (key, nonce) pair ever repeats.
- Confidentiality: an attacker's advantage in telling the records from random
  grows as (s + q + 1)^2 / 2^129, s the 16-byte blocks sealed under one key
  and q the records. At the default limits (2^32 bytes = 2^28 blocks, at most
  2^24 records) that is below 2^-72 per key (TLS 1.3 accepts 2^-60: RFC 8446,
  5.5); the receiver's hard stop (4 x: 2^30 blocks, 2^26 records) keeps it below
  2^-68 even against a peer that never updates.
- Integrity: a forgery succeeds with probability about (l + 1) / 2^128 per
  attempt, l the blocks of the longest record (2^14 for 257 KiB), and the
  first failed attempt ends the connection: below 2^-113.

Later paths (:meth:`RecordMachine.path`). A resumable tunnel
(:mod:`nopf_web.tunnel.resume_machine`) may move to a new TCP connection. Its
first connection runs the handshake above, unchanged; every later connection
proves the SPAKE2 key without running SPAKE2 again, from the tunnel's
:class:`TunnelSecrets` (derived from K once the first connection confirmed; K
itself is never kept)::

    Kp         = HKDF(K, salt=b"nopf tunnel v1", info=b"nopf v1 path")  32 bytes
    resume_id  = HKDF(K, salt=b"nopf tunnel v1", info=b"nopf v1 resume id")[:16]
                 (names the tunnel at the rendezvous; reveals nothing of K)

    path hello (22 bytes each way, sent by both sides at once)
        offset  size  field
        0       4     magic    b"NOPP"
        4       1     version  1
        5       1     side     b"A" (server) / b"B" (client)
        6       16    nonce    random, fresh per connection
    path confirm (32 bytes each way, once the peer's hello is in)
        HMAC-SHA256(Kc', b"nopf v1 path confirm " + side + hello_A + hello_B)

with, for this connection only, HKDF-SHA256(Kp, salt=nonce_A + nonce_B,
info=label)::

    Kc'    label b"nopf v1 path confirm"
    K_AB'  label b"nopf v1 path A->B"   records sent by A
    K_BA'  label b"nopf v1 path B->A"   records sent by B

Records then follow exactly as above, counters from 0. Both nonces go into
every key and into the tag, so each connection has keys never used before (no
key and nonce pair is ever reused), and a hello and confirm replayed from
another connection fail the check (the peer's nonce differs): the connection
is dropped with :class:`PathRejected` and nothing on it is ever opened. A
tag over the sender's own nonce only (the first sketch) would have let a
replayed hello pass as a live connection, which a leader could then select.
Our records may follow our confirm at once; the peer's are opened only after
its confirm checked out.
"""

from __future__ import annotations

import hmac
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from hashlib import sha256
from typing import Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from spake2 import SPAKE2_A, SPAKE2_B  # type: ignore[import-untyped]

from nopf_web.buffers import Buffer, unviewed
from nopf_web.roles import PeerRole, SpakeSide, other, spake_side
from nopf_web.wire.frames import RECORD_BUDGET

from .errors import (
    HandshakeError,
    HandshakeTimeout,
    PairingMismatch,
    PathRejected,
    RecordCut,
    TunnelTampered,
)
from .slab import HEADROOM, Slab

MAGIC = b"NOPF"
VERSION = 1
SPAKE2_MESSAGE_SIZE = 33
HELLO_SIZE = len(MAGIC) + 1 + SPAKE2_MESSAGE_SIZE  # 38
CONFIRM_SIZE = 32
ID_A, ID_B = b"nopf-A", b"nopf-B"
HKDF_SALT = b"nopf tunnel v1"
LABEL_CONFIRM = b"nopf v1 confirm"
LABEL_A_TO_B = b"nopf v1 A->B"
LABEL_B_TO_A = b"nopf v1 B->A"
HANDSHAKE_TIMEOUT = 10.0
# Later paths of a resumable tunnel (see the module docstring).
PATH_MAGIC = b"NOPP"
NONCE_SIZE = 16
PATH_HELLO = struct.Struct("!4sBc16s")  # magic, version, side, nonce
PATH_HELLO_SIZE = PATH_HELLO.size  # 22
PATH_CONFIRM_SIZE = 32
LABEL_PATH = b"nopf v1 path"
LABEL_RESUME_ID = b"nopf v1 resume id"
LABEL_PATH_CONFIRM = b"nopf v1 path confirm"
LABEL_PATH_A_TO_B = b"nopf v1 path A->B"
LABEL_PATH_B_TO_A = b"nopf v1 path B->A"
RESUME_ID_SIZE = 16

TAG_SIZE = 16
# Plaintext bytes per record: a full mux record (RECORD_BUDGET bytes of frames: a
# 1,020 KiB DATA frame and control frames) and 64 bytes for the resume layer's
# header (17 bytes), so it stays one record. Peers before large records took
# BASE_RECORD_BUDGET + 64; the mux keeps to that until the peer announces more.
MAX_RECORD = RECORD_BUDGET + 64
RECORD_HEADER = struct.Struct("!I")  # type (high byte) and u24 length, read as one word
HEADER_SIZE = RECORD_HEADER.size
DATA, KEY_UPDATE = 0, 1  # record types
_TYPE_SHIFT, _LENGTH_MASK = 24, 0xFF_FFFF
_KEY_UPDATE_WORD = KEY_UPDATE << _TYPE_SHIFT | TAG_SIZE  # the one valid KEY_UPDATE header
LABEL_KEY_UPDATE = b"nopf v1 key update"
RECEIVE_SLACK = 4  # a peer may go this many times past the limits before it is refused
RECORD_SIZE = HEADER_SIZE + MAX_RECORD + TAG_SIZE  # the largest record on the wire
_NONCE = struct.Struct("!4xQ")  # 4 zero bytes, u64 BE counter
_MAX_COUNTER = (1 << 64) - 1
# A whole record plus the next header, so one recv_into usually completes a record.
RECEIVE_BUFFER = RECORD_SIZE + HEADER_SIZE
# A read that starts at a record boundary (nothing of the next record known)
# asks for up to this much, not for the 4 header bytes alone: a small record
# (a keystroke, a request, its reply) then arrives in one read, not in a
# header read and a body read (a system call and a pass through the driver
# less per record). A larger record's rest is read exactly, as before.
FIRST_READ = 16 * 1024
# Records of at least OPEN_INTO_MIN bytes of plaintext are opened into one of
# OPEN_SLOTS reused buffers (PlainSlot) when one is free: a fresh plaintext is a
# zero-filled allocation per record, which cost half as much as the AES-GCM
# (perf, share end, 1 MiB records). Smaller records get their own bytes, so a
# slow reader holding small records never pins a whole slot.
OPEN_INTO_MIN = 128 * 1024
OPEN_SLOTS = 2
# A record of at least SEAL_PARTS_MIN bytes of plaintext in several parts is
# encrypted part by part, not from a joined copy: the copy costs more than the
# incremental cipher's setup (about 4 us a record) from here on.
SEAL_PARTS_MIN = 128 * 1024


# -- events (what the driver acts on) ---------------------------------------------
# Values, never changed after they are made; not frozen, since a frozen dataclass
# costs 2.5 times as much to make, and some are made once per record.


@dataclass(slots=True)
class Transmit:
    """Handshake bytes to send now, before any record sealed after this event."""

    data: bytes


@dataclass(slots=True)
class HandshakeDone:
    """Records may be sealed and sent from now on."""


@dataclass(slots=True)
class PeerConfirmed:
    """The peer's key confirmation checked out: it used the same code."""


class PlainSlot(bytearray):
    """A reused buffer records are opened into. The machine writes it only when
    nothing views it (:func:`~nopf_web.buffers.unviewed`), so a view of it does not change while
    it lives, as a view of ``bytes`` does not: the frame decoder may slice it
    without a copy (``UNCHANGING_WHILE_VIEWED``)."""

    UNCHANGING_WHILE_VIEWED = True


@dataclass(slots=True)
class RecordReceived:
    """One record's plaintext, authenticated: ``bytes``, or a view of a
    :class:`PlainSlot` (which does not change while viewed)."""

    plaintext: bytes | memoryview


@dataclass(slots=True)
class ChannelFailed:
    """The channel is dead; ``flush``: send what is queued before closing (the
    peer needs our confirmation to reach the same verdict), else abort."""

    error: Exception
    flush: bool


@dataclass(slots=True)
class ChannelEnded:
    """The peer ended the connection cleanly, at a record boundary."""


@dataclass(frozen=True, repr=False)
class TunnelSecrets:
    """What later paths of a tunnel need, derived from the SPAKE2 key (never the key).

    ``path_secret`` (32 bytes) keys every later path's handshake; ``resume_id``
    (16 bytes) names the tunnel at the rendezvous when both peers come back
    to resume it. Not printed by ``repr``.
    """

    path_secret: bytes
    resume_id: bytes

    def __repr__(self) -> str:
        return "TunnelSecrets(...)"

    @classmethod
    def from_key(cls, key: bytes) -> TunnelSecrets:
        return cls(_derive(key, LABEL_PATH), _derive(key, LABEL_RESUME_ID)[:RESUME_ID_SIZE])


RecordEvent = Transmit | HandshakeDone | PeerConfirmed | RecordReceived | ChannelFailed \
    | ChannelEnded
State = Literal["new", "hello", "confirm", "open", "failed", "ended"]


# -- keys ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeyLimits:
    """When a sender updates its key: after ``records`` records or ``bytes`` bytes of
    plaintext under one key, whichever comes first (see the module docstring for
    why these defaults; tests set low ones)."""

    records: int = 1 << 24
    bytes: int = 1 << 32

    def __post_init__(self) -> None:
        if self.records < 1 or self.bytes < 1:
            raise ValueError("key limits must be at least 1")


DEFAULT_KEY_LIMITS = KeyLimits()


class SealingKey:
    """One sending direction: its AES-256-GCM key, record counter (the nonce) and
    plaintext bytes, and which key of the direction it is (``generation``)."""

    __slots__ = ("_aead", "_aes", "_key", "bytes", "generation", "records")

    def __init__(self, key: bytes, generation: int = 0) -> None:
        self._key = key
        self._aead = AESGCM(key)
        self._aes = algorithms.AES(key)  # for records sealed part by part
        self.records = 0  # sealed so far: the next record's nonce counter
        self.bytes = 0  # plaintext sealed so far
        self.generation = generation

    def due(self, limits: KeyLimits) -> bool:
        """Time for a key update (before the next record)."""
        return self.records >= limits.records or self.bytes >= limits.bytes

    def next(self) -> SealingKey:
        return SealingKey(_derive(self._key, LABEL_KEY_UPDATE), self.generation + 1)

    def seal_into(self, plain: memoryview, out: memoryview, kind: int = DATA) -> int:
        """Seal ``plain`` (1..MAX_RECORD bytes; none for KEY_UPDATE) as one record at the
        start of ``out``; returns the record's size on the wire."""
        if self.records > _MAX_COUNTER:  # unreachable: keys are updated long before
            raise TunnelTampered("record counter exhausted: the tunnel must be re-keyed")
        size = len(plain) + TAG_SIZE
        header = RECORD_HEADER.pack(kind << _TYPE_SHIFT | size)
        out[:HEADER_SIZE] = header
        self._aead.encrypt_into(_NONCE.pack(self.records), plain, header,
                                out[HEADER_SIZE : HEADER_SIZE + size])
        self.records += 1
        self.bytes += len(plain)
        return HEADER_SIZE + size

    def seal_parts_into(self, parts: list[Buffer], n: int, out: memoryview) -> int:
        """As :meth:`seal_into` for the concatenation of ``parts`` (``n`` bytes, at most
        MAX_RECORD), encrypted part by part: GCM's incremental form (NIST SP 800-38D,
        the same ciphertext and tag as one call on the joined bytes), no joined copy."""
        if self.records > _MAX_COUNTER:  # unreachable, as in seal_into
            raise TunnelTampered("record counter exhausted: the tunnel must be re-keyed")
        size = n + TAG_SIZE
        header = RECORD_HEADER.pack(DATA << _TYPE_SHIFT | size)
        out[:HEADER_SIZE] = header
        encryptor = Cipher(self._aes, modes.GCM(_NONCE.pack(self.records))).encryptor()
        encryptor.authenticate_additional_data(header)
        pos = HEADER_SIZE
        for part in parts:  # out has room for the tag after them: update_into's margin
            pos += encryptor.update_into(part, out[pos:])
        encryptor.finalize()  # GCM has no bytes left to give here
        out[pos : pos + TAG_SIZE] = encryptor.tag
        assert pos + TAG_SIZE == HEADER_SIZE + size
        self.records += 1
        self.bytes += n
        return HEADER_SIZE + size


class OpeningKey:
    """One receiving direction: its AES-256-GCM key, record counter and plaintext
    bytes, and which key of the direction it is (``generation``). The peer must
    update it before ``RECEIVE_SLACK`` times ``limits``."""

    __slots__ = ("_aead", "_key", "_limits", "_max_bytes", "_max_records", "bytes",
                 "generation", "records")

    def __init__(self, key: bytes, limits: KeyLimits = DEFAULT_KEY_LIMITS,
                 generation: int = 0) -> None:
        self._key = key
        self._aead = AESGCM(key)
        self._limits = limits
        # A sender checks before each record: one record may go past its byte
        # limit, and the KEY_UPDATE record comes on top of its record limit.
        self._max_records = RECEIVE_SLACK * limits.records + 1
        self._max_bytes = RECEIVE_SLACK * limits.bytes + MAX_RECORD
        self.records = 0  # opened so far: the next record's nonce counter
        self.bytes = 0
        self.generation = generation

    def next(self) -> OpeningKey:
        return OpeningKey(_derive(self._key, LABEL_KEY_UPDATE), self._limits,
                          self.generation + 1)

    def open(self, header: memoryview, body: memoryview) -> bytes:
        """The plaintext of the record ``header + body``; :class:`TunnelTampered` if forged,
        or if the peer went past ``RECEIVE_SLACK`` times the limits on this key."""
        try:
            plain: bytes = self._aead.decrypt(_NONCE.pack(self.records), body, header)
        except InvalidTag:
            raise self._forged() from None
        self._count(len(plain))
        return plain

    def open_into(self, header: memoryview, body: memoryview, out: memoryview) -> None:
        """As :meth:`open`, the plaintext written to ``out`` (exactly its size); on
        an error ``out`` holds garbage, never to be used."""
        try:
            self._aead.decrypt_into(_NONCE.pack(self.records), body, header, out)
        except InvalidTag:
            raise self._forged() from None
        self._count(len(out))

    def _forged(self) -> TunnelTampered:
        return TunnelTampered(f"tunnel data rejected: record {self.records} failed "
                              "authentication: the data was altered or injected in transit")

    def _count(self, n: int) -> None:
        self.records += 1
        self.bytes += n
        if self.records > self._max_records or self.bytes > self._max_bytes:
            raise TunnelTampered(
                f"tunnel data rejected: the peer sent {self.records:,} records "
                f"({self.bytes:,} bytes) under one key without updating it")


def _bad_header(word: int) -> str:
    kind, length = word >> _TYPE_SHIFT, word & _LENGTH_MASK
    if kind == DATA:
        return f"tunnel data rejected: record length {length} is out of range"
    if kind == KEY_UPDATE:
        return f"tunnel data rejected: key update record length {length} is not {TAG_SIZE}"
    return f"tunnel data rejected: record type {kind} is unknown"


def _derive(key: bytes, label: bytes, salt: bytes = HKDF_SALT) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=label).derive(key)


def _confirm_tag(confirm_key: bytes, side: SpakeSide, transcript: bytes) -> bytes:
    return hmac.new(confirm_key, b"nopf v1 confirm " + side.encode() + transcript,
                    sha256).digest()


def _record_keys(key: bytes, side: SpakeSide,
                 limits: KeyLimits) -> tuple[SealingKey, OpeningKey]:
    """(sealing, opening) keys of ``side`` from the SPAKE2 key."""
    a_to_b, b_to_a = _derive(key, LABEL_A_TO_B), _derive(key, LABEL_B_TO_A)
    send, recv = (a_to_b, b_to_a) if side == "A" else (b_to_a, a_to_b)
    return SealingKey(send), OpeningKey(recv, limits)


def _hello(message: bytes) -> bytes:
    return MAGIC + bytes([VERSION]) + message


def _spake(side: SpakeSide, code: str) -> SPAKE2_A | SPAKE2_B:
    return (SPAKE2_A if side == "A" else SPAKE2_B)(code.encode("utf-8"), idA=ID_A, idB=ID_B)


def _finish_spake(spake: SPAKE2_A | SPAKE2_B, side: SpakeSide, peer_hello: bytes) -> bytes:
    if peer_hello[: len(MAGIC)] != MAGIC:
        raise HandshakeError("secure handshake: the peer is not a nopf tunnel "
                             f"(got {peer_hello[:8]!r}...)")
    if peer_hello[len(MAGIC)] != VERSION:
        raise HandshakeError(f"secure handshake: the peer speaks tunnel version "
                             f"{peer_hello[len(MAGIC)]}, we speak {VERSION}")
    message = peer_hello[len(MAGIC) + 1 :]
    if message[:1] == side.encode():
        raise HandshakeError(f"secure handshake: both peers took role {side} "
                             "(one must share, the other connect)")
    try:
        key: bytes = spake.finish(message)
    # spake2 is untyped and raises assorted errors (ValueError, its own) on a bad element.
    except Exception:
        raise HandshakeError("secure handshake: the peer's pairing message is invalid") from None
    return key


def _check_role(role: PeerRole) -> None:
    if role not in ("server", "client"):
        raise ValueError(f"role must be 'server' or 'client', not {role!r}")


class Pake:
    """One side's SPAKE2 for one pairing, run before the tunnel exists.

    ``message`` (33 bytes) goes to the peer through the rendezvous;
    :meth:`finish` takes the peer's message from there and derives the key
    (it never raises: an invalid message fails the channel later, as the
    in-band handshake would). Then :meth:`RecordMachine.confirm_only` has only
    the key confirmation left to do on the tunnel.
    """

    def __init__(self, role: PeerRole, code: str) -> None:
        _check_role(role)
        self.role: PeerRole = role
        self._side = spake_side(role)
        self._spake = _spake(self._side, code)
        self.message: bytes = self._spake.start()
        self.peer_message: bytes | None = None
        self._key: bytes | HandshakeError | None = None

    @property
    def hello(self) -> bytes:
        """Our message as the in-band hello would carry it (for the transcript)."""
        return _hello(self.message)

    @property
    def finished(self) -> bool:
        return self._key is not None

    def finish(self, peer_message: bytes) -> None:
        """Derive the key from the peer's message (once; a repeat must be the same message)."""
        if self.peer_message is not None:
            if peer_message != self.peer_message:
                self._key = HandshakeError("secure handshake: the peer's pairing message "
                                           "changed between attempts")
            return
        self.peer_message = peer_message
        try:
            self._key = _finish_spake(self._spake, self._side, _hello(peer_message))
        except HandshakeError as exc:
            self._key = exc

    def key(self) -> bytes:
        if self._key is None:
            raise ValueError("Pake.finish() was not called")
        if isinstance(self._key, HandshakeError):
            raise self._key
        return self._key


# -- the machine ----------------------------------------------------------------


class RecordMachine:
    """One connection's handshake and records; make it with :meth:`handshake`,
    :meth:`confirm_only` or (a later path of a resumable tunnel) :meth:`path`.

    Receiving is BufferedProtocol-shaped, so records land straight in a buffer
    sized for a whole record (no intermediate copy): write up to
    ``len(get_buffer(hint))`` bytes into the returned view, then call
    :meth:`buffer_updated` with the count; :meth:`receive_data` does both.
    The view is valid until the next call into the machine. Every input
    returns the events it caused, in order; after :class:`ChannelFailed` or
    :class:`ChannelEnded` input is ignored.

    Sending: :meth:`start` gives our first handshake bytes; once
    :class:`HandshakeDone` has been returned, :meth:`seal` turns plaintext
    into records.
    """

    def __init__(self, role: PeerRole, *, timeout: float = HANDSHAKE_TIMEOUT,
                 limits: KeyLimits = DEFAULT_KEY_LIMITS) -> None:
        """Use :meth:`handshake`, :meth:`confirm_only` or :meth:`path`."""
        _check_role(role)
        self.role: PeerRole = role
        self.timeout = timeout
        self.limits = limits  # when our keys are updated (and the peer's must be)
        self.key_updates = (0, 0)  # (sent, received) KEY_UPDATE records
        self._side: SpakeSide = spake_side(role)
        self._state: State = "new"
        self.confirmed = False  # the peer's key confirmation checked out
        # In-band: our SPAKE2 state and hello until the peer's hello arrives.
        self._spake: SPAKE2_A | SPAKE2_B | None = None
        self._our_hello = b""
        # A later path: the tunnel's secrets (the hello exchange replaces SPAKE2).
        self._path: TunnelSecrets | None = None
        self._secrets: TunnelSecrets | None = None  # derived once K is known
        self._tags = (b"", b"")  # confirmation tags: (ours, the one the peer must send)
        self._keys: tuple[SealingKey, OpeningKey] | None = None  # derived, not yet in use
        self.sealing: SealingKey | None = None
        self.opening: OpeningKey | None = None
        self._deadline: float | None = None
        self._buf = bytearray(RECEIVE_BUFFER)
        self._view = memoryview(self._buf)
        self._slots: list[PlainSlot] = []  # see OPEN_INTO_MIN; made when first needed
        self._have = 0
        # Reused record buffers for seal() (one per record of the largest call):
        # a fresh 256 KiB buffer per record (zeroed, often page-faulted) cost more
        # than AES-GCM itself, and a reused one stays in cache for the send.
        self._plain = memoryview(bytearray(MAX_RECORD))
        self._out: list[memoryview] = [memoryview(bytearray(RECORD_SIZE))]
        self.bytes_in = 0  # wire bytes, handshake included
        self.bytes_out = 0

    @classmethod
    def handshake(cls, role: PeerRole, code: str, *, timeout: float = HANDSHAKE_TIMEOUT,
                  limits: KeyLimits = DEFAULT_KEY_LIMITS) -> RecordMachine:
        """The full handshake on the tunnel: hellos (SPAKE2), then confirmations."""
        machine = cls(role, timeout=timeout, limits=limits)
        machine._spake = _spake(machine._side, code)
        machine._our_hello = _hello(machine._spake.start())
        return machine

    @classmethod
    def confirm_only(cls, role: PeerRole, pake: Pake, *, timeout: float = HANDSHAKE_TIMEOUT,
                     limits: KeyLimits = DEFAULT_KEY_LIMITS) -> RecordMachine:
        """SPAKE2 already exchanged and finished (``pake``): confirmations only.

        Raises what the in-band handshake would for a bad peer message
        (:class:`HandshakeError`), and ``ValueError`` for a pake of another role.
        """
        if pake.role != role:
            raise ValueError(f"the pake was made for role {pake.role}, not {role}")
        key = pake.key()
        assert pake.peer_message is not None
        machine = cls(role, timeout=timeout, limits=limits)
        machine._our_hello = pake.hello
        machine._keys = machine._derive_all(key, _hello(pake.peer_message))
        return machine

    @classmethod
    def path(cls, role: PeerRole, secrets: TunnelSecrets, *,
             timeout: float = HANDSHAKE_TIMEOUT, nonce: bytes | None = None,
             limits: KeyLimits = DEFAULT_KEY_LIMITS) -> RecordMachine:
        """A later connection of a tunnel whose first one confirmed ``secrets``:
        path hellos, then path confirmations (no SPAKE2). ``nonce``: for tests;
        16 fresh random bytes otherwise."""
        nonce = os.urandom(NONCE_SIZE) if nonce is None else nonce
        if len(nonce) != NONCE_SIZE:
            raise ValueError(f"a path nonce is {NONCE_SIZE} bytes")
        machine = cls(role, timeout=timeout, limits=limits)
        machine._path = machine._secrets = secrets
        machine._our_hello = PATH_HELLO.pack(PATH_MAGIC, VERSION, machine._side.encode(), nonce)
        return machine
    # -- observation ------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def peer_role(self) -> PeerRole:
        return other(self.role)

    @property
    def can_send(self) -> bool:
        """Records may be sealed (the handshake is done, on our side)."""
        return self.sealing is not None

    @property
    def next_deadline(self) -> float | None:
        """When :meth:`timer` must be called (the handshake's deadline), if ever."""
        return self._deadline

    @property
    def secrets(self) -> TunnelSecrets | None:
        """What the tunnel's later paths need; None until the peer's confirmation
        checked out (a tunnel that was never confirmed cannot be resumed)."""
        return self._secrets if self.confirmed else None
    # -- inputs -----------------------------------------------------------------

    def start(self, now: float) -> list[RecordEvent]:
        """Begin at ``now``: our first handshake bytes (and, confirm-only, HandshakeDone).

        Bytes received before are kept and handled now; after the connection was
        lost, there is nothing to do."""
        if self._state in ("failed", "ended"):
            return []
        if self._state != "new":
            raise RuntimeError("the record machine was already started")
        if self._keys is None and self._spake is None and self._path is None:
            raise RuntimeError("make the machine with RecordMachine.handshake(), "
                               ".confirm_only() or .path()")
        self._deadline = now + self.timeout
        events: list[RecordEvent]
        if self._keys is None:  # in-band or a later path: hellos first
            self._state = "hello"
            events = [self._transmit(self._our_hello)]
        else:
            self._state = "confirm"
            self.sealing = self._keys[0]
            events = [self._transmit(self._tags[0]), HandshakeDone()]
        if self._have:  # bytes that arrived before the start
            events += self._advance()
        return events

    def timer(self, now: float) -> list[RecordEvent]:
        if self._deadline is None or now < self._deadline:
            return []
        return self._fail(HandshakeTimeout(
            f"secure handshake: no {self._waiting_for} from the peer within {self.timeout:g} s"),
            flush=False)

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Where the next received bytes go (never empty)."""
        if self._state != "open":  # handshake (or dead): whatever comes
            return self._view[self._have :]
        if self._have < HEADER_SIZE:
            return self._view[self._have : FIRST_READ]
        (word,) = RECORD_HEADER.unpack_from(self._buf)
        # The record and the next header; an out-of-range length was refused already.
        return self._view[self._have : HEADER_SIZE + (word & _LENGTH_MASK) + HEADER_SIZE]

    def buffer_updated(self, nbytes: int) -> list[RecordEvent]:
        """``nbytes`` were written at the start of the last :meth:`get_buffer` view."""
        self.bytes_in += nbytes
        if self._state == "open":  # the hot path first
            self._have += nbytes
            return self._open_records([])
        if self._state in ("failed", "ended"):
            self._have = 0  # keep room for whatever still arrives; it is ignored
            return []
        self._have += nbytes
        if self._state == "new":
            return []  # kept for start()
        return self._advance()

    def receive_data(self, data: Buffer) -> list[RecordEvent]:
        """Copy ``data`` in through :meth:`get_buffer` (for drivers without one)."""
        events: list[RecordEvent] = []
        view, pos = memoryview(data), 0
        while pos < len(view):
            room = self.get_buffer(len(view) - pos)
            n = min(len(room), len(view) - pos)
            room[:n] = view[pos : pos + n]
            pos += n
            del room
            events += self.buffer_updated(n)
        return events

    def connection_lost(self, exc: Exception | None) -> list[RecordEvent]:
        """The connection ended: ``None`` for the peer's clean end (EOF)."""
        if self._state in ("new", "hello", "confirm"):
            if isinstance(exc, OSError):
                exc = HandshakeError("secure handshake: connection failed while waiting for "
                                     f"the peer's {self._waiting_for} ({exc.strerror or exc})")
            elif exc is None:
                exc = HandshakeError("secure handshake: the peer closed the connection before "
                                     f"sending its {self._waiting_for}")
            return self._fail(exc, flush=False)
        if self._state != "open":
            return []
        if exc is None and self._have:
            exc = RecordCut("tunnel connection cut inside a record (the partial record is "
                            "dropped)")
        if exc is not None:
            return self._fail(exc, flush=False)
        self._state = "ended"
        return [ChannelEnded()]

    # -- sending ----------------------------------------------------------------

    def seal(self, parts: Iterable[Buffer]) -> list[memoryview]:
        """Records carrying the concatenation of ``parts``: full records first, no
        joined copy of the parts. The views are reused by the next call: send or
        copy them before. Parts ending in a local read's whole slab (see
        :mod:`nopf_web.tunnel.slab`) are sealed in place, and a large record's
        parts one by one (:meth:`SealingKey.seal_parts_into`), without a copy."""
        sealing = self.sealing
        if sealing is None:
            raise RuntimeError("records before the handshake is done")
        if type(parts) is list and parts:
            data = parts[-1]
            if type(data) is memoryview and type(slab := data.obj) is Slab \
                    and len(data) == slab.filled:  # a whole read: the headroom is before it
                record = self._seal_in_place(parts, slab, sealing)
                if record is not None:
                    return [record]
            if len(parts) > 1:
                n = sum(map(len, parts))
                if SEAL_PARTS_MIN <= n <= MAX_RECORD and not sealing.due(self.limits):
                    out = self._out[0]
                    size = sealing.seal_parts_into(parts, n, out)
                    self.bytes_out += size
                    return [out[:size]]
        plain, fill, used = self._plain, 0, 0
        records: list[memoryview] = []
        for part in parts:
            n = len(part)
            if fill + n <= MAX_RECORD:  # the usual case: the part fits whole
                plain[fill : fill + n] = part
                fill += n
                continue
            view, start = memoryview(part), 0
            while start < n:
                if fill == MAX_RECORD:
                    records.append(self._seal_one(fill, used, records))
                    used += 1
                    fill = 0
                take = min(n - start, MAX_RECORD - fill)
                plain[fill : fill + take] = view[start : start + take]
                fill += take
                start += take
        if fill:
            if not records and not sealing.due(self.limits):  # usual: one record, inline
                out = self._out[0]
                size = sealing.seal_into(plain[:fill], out)
                self.bytes_out += size
                return [out[:size]]
            records.append(self._seal_one(fill, used, records))
        return records

    def _seal_in_place(self, parts: list[Buffer], slab: Slab,
                       sealing: SealingKey) -> memoryview | None:
        """One record of ``parts``, the last a slab's whole read: the others are
        written into its headroom and the record sealed from the slab. None, and
        nothing done, when they do not fit or a key update is due (the copying
        path does both)."""
        head = 0
        for part in parts[:-1]:
            head += len(part)
        start = HEADROOM - head
        if start < 0 or head + slab.filled > MAX_RECORD or sealing.due(self.limits):
            return None
        view = memoryview(slab)
        pos = start
        for part in parts[:-1]:
            end = pos + len(part)
            view[pos:end] = part
            pos = end
        out = self._out[0]
        size = sealing.seal_into(view[start : HEADROOM + slab.filled], out)
        self.bytes_out += size
        return out[:size]

    def _seal_one(self, n: int, index: int, records: list[memoryview]) -> memoryview:
        """The ``index``-th data record of this call from ``n`` bytes of the plaintext
        buffer, after a KEY_UPDATE record (appended to ``records``) if one is due."""
        sealing = self.sealing
        assert sealing is not None
        if sealing.due(self.limits):
            update = memoryview(bytearray(HEADER_SIZE + TAG_SIZE))  # rare: a fresh buffer
            self.bytes_out += sealing.seal_into(update[:0], update, KEY_UPDATE)
            records.append(update)
            self.sealing = sealing = sealing.next()
            self.key_updates = (self.key_updates[0] + 1, self.key_updates[1])
        if index == len(self._out):
            self._out.append(memoryview(bytearray(RECORD_SIZE)))
        out = self._out[index]
        size = sealing.seal_into(self._plain[:n], out)
        self.bytes_out += size
        return out[:size]

    # -- internals --------------------------------------------------------------

    @property
    def _waiting_for(self) -> str:
        # Keys exist from the peer's hello on (in-band, path), or from the start
        # (confirm-only).
        if self._path is not None:
            return "path hello" if self._keys is None else "path confirmation"
        return "pairing message" if self._keys is None else "key confirmation"

    def _derive_all(self, key: bytes, peer_hello: bytes) -> tuple[SealingKey, OpeningKey]:
        """Record keys from the SPAKE2 key; remembers both confirmation tags."""
        # The same transcript and labels for both handshakes: A's hello first.
        transcript = (self._our_hello + peer_hello if self._side == "A"
                      else peer_hello + self._our_hello)
        confirm_key = _derive(key, LABEL_CONFIRM)
        self._tags = (_confirm_tag(confirm_key, self._side, transcript),
                      _confirm_tag(confirm_key, spake_side(self.peer_role), transcript))
        self._secrets = TunnelSecrets.from_key(key)
        return _record_keys(key, self._side, self.limits)

    def _derive_path(self, peer_hello: bytes) -> tuple[SealingKey, OpeningKey]:
        """This connection's keys and both confirmation tags, from the path secret
        and both hellos (``peer_hello`` already checked)."""
        assert self._path is not None
        hello_a, hello_b = ((self._our_hello, peer_hello) if self._side == "A"
                            else (peer_hello, self._our_hello))
        salt = hello_a[-NONCE_SIZE:] + hello_b[-NONCE_SIZE:]
        secret = self._path.path_secret
        confirm_key = _derive(secret, LABEL_PATH_CONFIRM, salt)
        transcript = hello_a + hello_b
        label = b"nopf v1 path confirm "
        self._tags = (
            hmac.new(confirm_key, label + self._side.encode() + transcript, sha256).digest(),
            hmac.new(confirm_key, label + spake_side(self.peer_role).encode() + transcript,
                     sha256).digest())
        a_to_b = _derive(secret, LABEL_PATH_A_TO_B, salt)
        b_to_a = _derive(secret, LABEL_PATH_B_TO_A, salt)
        send, recv = (a_to_b, b_to_a) if self._side == "A" else (b_to_a, a_to_b)
        return SealingKey(send), OpeningKey(recv, self.limits)

    def _check_path_hello(self, hello: bytes) -> None:
        magic, version, side, _nonce = PATH_HELLO.unpack(hello)
        if magic != PATH_MAGIC:
            raise HandshakeError("path handshake: the peer is not a nopf tunnel path "
                                 f"(got {hello[:8]!r}...)")
        if version != VERSION:
            raise HandshakeError(f"path handshake: the peer speaks tunnel version {version}, "
                                 f"we speak {VERSION}")
        if side != spake_side(self.peer_role).encode():
            raise HandshakeError(f"path handshake: the peer took side {side!r}; "
                                 f"expected {spake_side(self.peer_role)}")

    def _transmit(self, data: bytes) -> Transmit:
        self.bytes_out += len(data)
        return Transmit(data)

    def _consume(self, n: int) -> bytes:
        data = bytes(self._view[:n])
        rest = self._have - n
        self._buf[:rest] = bytes(self._view[n : self._have])  # may overlap: copy first
        self._have = rest
        return data

    def _advance(self) -> list[RecordEvent]:
        events: list[RecordEvent] = []
        if self._state == "hello" and self._path is not None:
            if self._have < PATH_HELLO_SIZE:
                return events
            peer_hello = self._consume(PATH_HELLO_SIZE)
            try:
                self._check_path_hello(peer_hello)
            except HandshakeError as exc:
                return self._fail(exc, flush=False)
            self._keys = self._derive_path(peer_hello)
            self._state = "confirm"
            # Our records may follow our confirm at once (the peer opens them
            # only after checking it).
            self.sealing = self._keys[0]
            events += [self._transmit(self._tags[0]), HandshakeDone()]
        elif self._state == "hello":
            if self._have < HELLO_SIZE:
                return events
            assert self._spake is not None
            peer_hello = self._consume(HELLO_SIZE)
            try:
                key = _finish_spake(self._spake, self._side, peer_hello)
            except HandshakeError as exc:
                return self._fail(exc, flush=False)
            self._spake = None
            self._keys = self._derive_all(key, peer_hello)
            self._state = "confirm"
            events.append(self._transmit(self._tags[0]))
        if self._have < CONFIRM_SIZE:
            return events
        if not hmac.compare_digest(self._consume(CONFIRM_SIZE), self._tags[1]):
            # Nothing after a wrong tag is opened.
            if self._path is not None:  # a stranger or a replay: just drop the connection
                return events + self._fail(PathRejected(
                    "path handshake: the peer did not prove the tunnel's key (a stranger, "
                    "or a hello replayed from another connection)"), flush=False)
            # Flush, not abort: the peer needs our own tag to reach the same verdict.
            return events + self._fail(PairingMismatch("pairing code did not match"),
                                       flush=True)
        assert self._keys is not None
        self._state = "open"
        self.confirmed = True
        self._deadline = None
        if self.sealing is None:  # in-band: records from now on
            self.sealing = self._keys[0]
            events.append(HandshakeDone())
        self.opening = self._keys[1]
        self._keys = None
        events.append(PeerConfirmed())
        return self._open_records(events)  # records the peer sent right after its tag

    def _open_records(self, events: list[RecordEvent]) -> list[RecordEvent]:
        """Open every whole record in the buffer, then move what is left of the
        next one to its start (once: a first read may bring several records)."""
        opening, buf, view, have = self.opening, self._buf, self._view, self._have
        assert opening is not None
        start = 0
        while have - start >= HEADER_SIZE:
            (size,) = RECORD_HEADER.unpack_from(buf, start)  # a DATA record's type byte is 0
            update = size == _KEY_UPDATE_WORD
            if not (TAG_SIZE < size <= MAX_RECORD + TAG_SIZE or update):
                return events + self._fail(TunnelTampered(_bad_header(size)), flush=False)
            body = start + HEADER_SIZE
            end = body + (size & _LENGTH_MASK)
            if have < end:
                break
            n = end - body - TAG_SIZE
            slot = self._free_slot() if n >= OPEN_INTO_MIN and not update else None
            try:
                if slot is None:
                    plain: bytes | memoryview = opening.open(view[start:body], view[body:end])
                else:
                    plain = memoryview(slot)[:n]
                    opening.open_into(view[start:body], view[body:end], plain)
            except TunnelTampered as exc:
                return events + self._fail(exc, flush=False)
            start = end
            if update:  # authenticated under the old key: the next record uses the next
                self.opening = opening = opening.next()
                self.key_updates = (self.key_updates[0], self.key_updates[1] + 1)
                continue
            events.append(RecordReceived(plain))
        if start:
            rest = have - start  # usually at most the next header
            if rest:
                buf[:rest] = bytes(view[start:have])  # may overlap: copy first
            self._have = rest
        return events

    def _free_slot(self) -> PlainSlot | None:
        """A slot nothing views any more, None if every slot is still viewed."""
        slots = self._slots
        for i in range(len(slots)):
            if unviewed(slots, i):
                return slots[i]
        if len(slots) < OPEN_SLOTS:
            slots.append(PlainSlot(MAX_RECORD))
            return slots[-1]
        return None

    def _fail(self, error: Exception, *, flush: bool) -> list[RecordEvent]:
        self._state = "failed"
        self._deadline = None
        self._have = 0
        self._spake = None
        self._keys = None
        return [ChannelFailed(error, flush)]
