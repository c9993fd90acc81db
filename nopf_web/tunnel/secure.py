"""Authenticated encryption over an already-connected TCP connection.

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
initiated): the sharer is ``"A"`` and the connector ``"B"``.

Handshake, both sides send each message first and then read the peer's::

    hello (38 bytes)
        offset  size  field
        0       4     magic    b"NOPF"
        4       1     version  1
        5       33    spake2   the SPAKE2 message: side byte b"A"/b"B", then
                               a 32-byte Ed25519 group element
    confirm (32 bytes)
        HMAC-SHA256(Kc, b"nopf v1 confirm " + role + hello_A + hello_B)

where ``K`` is the 32-byte SPAKE2 key (``idA=b"nopf-A"``, ``idB=b"nopf-B"``,
password = the pairing code's UTF-8 bytes) and every key comes from
HKDF-SHA256(K, salt=b"nopf tunnel v1", info=label):

    Kc    label b"nopf v1 confirm"  key confirmation
    K_AB  label b"nopf v1 A->B"     AES-256-GCM key, records sent by A
    K_BA  label b"nopf v1 B->A"     AES-256-GCM key, records sent by B

Each side checks the peer's confirm tag (with the peer's role in the label)
with ``hmac.compare_digest``; a mismatch raises :class:`PairingMismatch` on
both sides, since each checks independently.

Records, in each direction after the handshake::

    offset  size  field
    0       4     length      u32 big-endian: bytes of ciphertext + tag that follow
    4       len   ciphertext  AES-256-GCM(key, nonce, plaintext, aad=the 4 length bytes),
                              then the 16-byte tag

The nonce is 4 zero bytes then a u64 big-endian record counter, starting at
0 in each direction and never reused (each direction has its own key). A
record holds 1..``MAX_RECORD`` bytes of plaintext. A tag failure, a length
out of range or a connection cut mid-record raises :class:`TunnelTampered`
and closes the connection; nothing of a failed record is ever returned.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import socket
import struct
from hashlib import sha256
from typing import Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from spake2 import SPAKE2_A, SPAKE2_B  # type: ignore[import-untyped]

from .errors import HandshakeError, HandshakeTimeout, PairingMismatch, TunnelTampered

Role = Literal["A", "B"]

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

TAG_SIZE = 16
MAX_RECORD = 256 * 1024  # plaintext bytes per record
RECORD_HEADER = struct.Struct("!I")
_NONCE = struct.Struct("!4xQ")  # 4 zero bytes, u64 BE counter
_MAX_COUNTER = (1 << 64) - 1
HANDSHAKE_TIMEOUT = 10.0
_READ_LIMIT = 1 << 20  # StreamReader buffer before it pauses the socket


def _derive(key: bytes, label: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=HKDF_SALT, info=label).derive(key)


def _confirm_tag(confirm_key: bytes, role: Role, transcript: bytes) -> bytes:
    return hmac.new(confirm_key, b"nopf v1 confirm " + role.encode() + transcript,
                    sha256).digest()


class SecureChannel:
    """Encrypted, authenticated records over a TCP stream (after :func:`handshake`).

    ``write`` encrypts at once and queues on the transport (call ``drain`` for
    backpressure); ``recv`` returns one record's plaintext, or ``b""`` at a
    clean end of stream. Not for concurrent ``recv`` callers.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                 role: Role, send_key: bytes, recv_key: bytes) -> None:
        self.role: Role = role
        self._reader = reader
        self._writer = writer
        self._send = AESGCM(send_key)
        self._recv = AESGCM(recv_key)
        self._send_counter = 0
        self._recv_counter = 0
        self._failure: TunnelTampered | None = None
        self.wire_bytes_out = 0
        self.wire_bytes_in = 0

    @property
    def peer_role(self) -> Role:
        return "B" if self.role == "A" else "A"

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt ``data`` into one or more records and queue them for sending."""
        view = memoryview(data)
        for start in range(0, len(view), MAX_RECORD):
            chunk = view[start : start + MAX_RECORD]
            size = len(chunk) + TAG_SIZE
            # Header and ciphertext in one buffer: one transport write, no concatenation.
            record = bytearray(RECORD_HEADER.size + size)
            RECORD_HEADER.pack_into(record, 0, size)
            header = bytes(record[: RECORD_HEADER.size])
            self._send.encrypt_into(self._next_nonce(), chunk, header,
                                    memoryview(record)[RECORD_HEADER.size :])
            self._writer.write(record)
            self.wire_bytes_out += len(record)

    def _next_nonce(self) -> bytes:
        if self._send_counter > _MAX_COUNTER:  # unreachable in practice: 2^64 records
            raise TunnelTampered("record counter exhausted: the tunnel must be re-keyed")
        nonce = _NONCE.pack(self._send_counter)
        self._send_counter += 1
        return nonce

    async def drain(self) -> None:
        await self._writer.drain()

    @property
    def write_buffer_size(self) -> int:
        return self._writer.transport.get_write_buffer_size()

    async def recv(self) -> bytes:
        """The next record's plaintext; ``b""`` when the peer ended the stream cleanly."""
        if self._failure is not None:
            raise self._failure
        try:
            header = await self._reader.readexactly(RECORD_HEADER.size)
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                return b""
            raise self._tampered("the connection was cut inside a record header") from None
        (size,) = RECORD_HEADER.unpack(header)
        if not TAG_SIZE < size <= MAX_RECORD + TAG_SIZE:
            raise self._tampered(f"record length {size} is out of range")
        try:
            body = await self._reader.readexactly(size)
        except asyncio.IncompleteReadError:
            raise self._tampered("the connection was cut inside a record") from None
        self.wire_bytes_in += RECORD_HEADER.size + size
        try:
            plain = self._recv.decrypt(_NONCE.pack(self._recv_counter), body, header)
        except InvalidTag:
            raise self._tampered(
                f"record {self._recv_counter} failed authentication: the data was altered "
                "or injected in transit") from None
        self._recv_counter += 1
        return plain

    def _tampered(self, message: str) -> TunnelTampered:
        self._failure = TunnelTampered(f"tunnel data rejected: {message}")
        self.abort()
        return self._failure

    def write_eof(self) -> None:
        if self._writer.can_write_eof():
            self._writer.write_eof()

    def close(self) -> None:
        self._writer.close()

    def abort(self) -> None:
        self._writer.transport.abort()

    async def wait_closed(self) -> None:
        with contextlib.suppress(OSError):  # already reset: closed is closed
            await self._writer.wait_closed()


async def handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                    role: Role, code: str,
                    timeout: float = HANDSHAKE_TIMEOUT) -> SecureChannel:
    """Authenticate the peer with ``code`` and return the encrypted channel.

    Raises :class:`PairingMismatch` if the peer used another code,
    :class:`HandshakeTimeout` naming the step it waited for, and
    :class:`HandshakeError` for anything else. On failure the connection is closed.
    """
    if role not in ("A", "B"):
        raise ValueError(f"role must be 'A' or 'B', not {role!r}")
    waiting_for = "nothing"
    try:
        async with asyncio.timeout(timeout):
            spake = (SPAKE2_A if role == "A" else SPAKE2_B)(
                code.encode("utf-8"), idA=ID_A, idB=ID_B)
            hello = MAGIC + bytes([VERSION]) + spake.start()
            writer.write(hello)
            waiting_for = "pairing message"
            peer_hello = await reader.readexactly(HELLO_SIZE)
            key = _finish_spake(spake, role, peer_hello)
            transcript = hello + peer_hello if role == "A" else peer_hello + hello
            confirm_key = _derive(key, LABEL_CONFIRM)
            writer.write(_confirm_tag(confirm_key, role, transcript))
            waiting_for = "key confirmation"
            peer_tag = await reader.readexactly(CONFIRM_SIZE)
    except TimeoutError:
        writer.transport.abort()
        raise HandshakeTimeout(
            f"secure handshake: no {waiting_for} from the peer within {timeout:g} s") from None
    except asyncio.IncompleteReadError:
        writer.transport.abort()
        raise HandshakeError(
            f"secure handshake: the peer closed the connection before sending its "
            f"{waiting_for}") from None
    except OSError as exc:
        writer.transport.abort()
        raise HandshakeError(
            f"secure handshake: connection failed while waiting for the peer's {waiting_for} "
            f"({exc.strerror or exc})") from None
    except HandshakeError:
        writer.transport.abort()
        raise
    peer_role: Role = "B" if role == "A" else "A"
    if not hmac.compare_digest(peer_tag, _confirm_tag(confirm_key, peer_role, transcript)):
        writer.close()  # not abort: our own tag may still be queued, the peer needs it
        raise PairingMismatch("pairing code did not match")
    a_to_b, b_to_a = _derive(key, LABEL_A_TO_B), _derive(key, LABEL_B_TO_A)
    send_key, recv_key = (a_to_b, b_to_a) if role == "A" else (b_to_a, a_to_b)
    return SecureChannel(reader, writer, role=role, send_key=send_key, recv_key=recv_key)


def _finish_spake(spake: SPAKE2_A | SPAKE2_B, role: Role, peer_hello: bytes) -> bytes:
    if peer_hello[: len(MAGIC)] != MAGIC:
        raise HandshakeError("secure handshake: the peer is not a nopf tunnel "
                             f"(got {peer_hello[:8]!r}...)")
    if peer_hello[len(MAGIC)] != VERSION:
        raise HandshakeError(f"secure handshake: the peer speaks tunnel version "
                             f"{peer_hello[len(MAGIC)]}, we speak {VERSION}")
    message = peer_hello[len(MAGIC) + 1 :]
    if message[:1] == role.encode():
        raise HandshakeError(f"secure handshake: both peers took role {role} "
                             "(one must share, the other connect)")
    try:
        key: bytes = spake.finish(message)
    # spake2 is untyped and raises assorted errors (ValueError, its own) on a bad element.
    except Exception:
        raise HandshakeError("secure handshake: the peer's pairing message is invalid") from None
    return key


async def open_channel(sock: socket.socket, *, role: Role, code: str,
                       timeout: float = HANDSHAKE_TIMEOUT) -> SecureChannel:
    """Run :func:`handshake` on a connected TCP socket (the channel then owns it)."""
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    reader, writer = await asyncio.open_connection(sock=sock, limit=_READ_LIMIT)
    return await handshake(reader, writer, role=role, code=code, timeout=timeout)
