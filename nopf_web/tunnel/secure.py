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

Coordinated mode moves the SPAKE2 messages to the rendezvous (see
:class:`Pake`; each is the 33-byte ``spake2`` field above, forwarded opaquely,
so a lying rendezvous still gets one online guess, as a relay on the path
does). The tunnel then starts with the confirm tag, computed over the same
transcript (the two hellos as above, rebuilt from the messages), and records
may follow it at once: no hello and no waiting on the tunnel. The receiver
checks the peer's tag before it opens any record; a wrong tag is
:class:`PairingMismatch` on both sides and nothing after it is opened.

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

I/O: one ``asyncio.BufferedProtocol`` receives straight into a buffer sized
for a whole record (``recv_into``, reading each record's body together with
the next header), decrypts from a memoryview of it and hands the plaintext to
a callback (the mux) or a queue (``recv``): no intermediate copies, and no
task switch per record. Sending seals each record from the caller's buffers
(``writelines``) into one reused record buffer and sends it straight on the
socket when the transport has nothing queued.
"""

from __future__ import annotations

import asyncio
import hmac
import socket
import struct
from collections import deque
from collections.abc import Callable, Iterable
from hashlib import sha256

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from spake2 import SPAKE2_A, SPAKE2_B  # type: ignore[import-untyped]

from nopf_web.roles import SpakeSide

from .errors import HandshakeError, HandshakeTimeout, PairingMismatch, TunnelTampered

RecordSink = Callable[[bytes], None]
EndSink = Callable[[Exception | None], None]  # None: clean end of stream

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
MAX_RECORD = 257 * 1024  # plaintext bytes per record: a 256 KiB DATA frame and control frames
RECORD_HEADER = struct.Struct("!I")
_HDR = RECORD_HEADER.size
_NONCE = struct.Struct("!4xQ")  # 4 zero bytes, u64 BE counter
_MAX_COUNTER = (1 << 64) - 1
HANDSHAKE_TIMEOUT = 10.0
# A whole record plus the next header, so one recv_into usually completes a record.
_RECV_BUFFER = _HDR + MAX_RECORD + TAG_SIZE + _HDR
_PULL_QUEUE = 16  # records queued for recv() before reading pauses
# Transport write buffer: small, so a latency-sensitive frame never queues behind
# megabytes; the kernel's socket buffer is the real pipeline.
_WRITE_HIGH, _WRITE_LOW = 256 * 1024, 64 * 1024


def _derive(key: bytes, label: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=HKDF_SALT, info=label).derive(key)


def _confirm_tag(confirm_key: bytes, role: SpakeSide, transcript: bytes) -> bytes:
    return hmac.new(confirm_key, b"nopf v1 confirm " + role.encode() + transcript,
                    sha256).digest()


class _RecordProtocol(asyncio.BufferedProtocol):
    """Raw bytes during the handshake (``readexactly``), then decrypted records."""

    def __init__(self, sock: socket.socket | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        self._sock = sock  # the transport's socket, for direct sends (see send)
        self._buf = bytearray(_RECV_BUFFER)
        self._view = memoryview(self._buf)
        self._have = 0
        self._opener: AESGCM | None = None
        self._counter = 0
        self._waiters: list[asyncio.Future[None]] = []
        self._ended = False
        self._end_error: Exception | None = None
        self._records: deque[bytes] = deque()
        self._sink: RecordSink | None = None
        self._on_end: EndSink | None = None
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self.bytes_in = 0
        # Early data (see open_channel's pake): the peer's confirmation tag, still
        # to be checked ahead of its records, and who waits for the verdict.
        self._expect: bytes | None = None
        self.confirmed: asyncio.Future[None] | None = None
        self._confirm_timer: asyncio.TimerHandle | None = None

    # -- asyncio callbacks ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(_WRITE_HIGH, _WRITE_LOW)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._opener is None or self._expect is not None:  # handshake: whatever comes
            return self._view[self._have :]
        if self._have < _HDR:
            return self._view[self._have : _HDR]
        (size,) = RECORD_HEADER.unpack_from(self._buf)
        return self._view[self._have : _HDR + size + _HDR]

    def buffer_updated(self, nbytes: int) -> None:
        self._have += nbytes
        self.bytes_in += nbytes
        if self._opener is None:
            self._wake()
        else:
            self._process()

    def eof_received(self) -> bool:
        return False  # close our side too: the channel has no half-close

    def connection_lost(self, exc: Exception | None) -> None:
        if self._expect is not None:
            if isinstance(exc, OSError):
                exc = HandshakeError("secure handshake: connection failed while waiting for "
                                     f"the peer's key confirmation ({exc.strerror or exc})")
            elif exc is None:
                exc = HandshakeError("secure handshake: the peer closed the connection before "
                                     "sending its key confirmation")
        elif exc is None and self._opener is not None and self._have:
            exc = TunnelTampered("tunnel data rejected: the connection was cut inside a record")
        self._finish(exc)
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    # -- records --------------------------------------------------------------

    def expect_confirmation(self, tag: bytes, timeout: float) -> None:
        """Check ``tag`` ahead of the peer's records; ``confirmed`` gets the verdict."""
        loop = asyncio.get_running_loop()
        self._expect = tag
        self.confirmed = loop.create_future()
        # Retrieved here so an unawaited failure is not logged: the channel's
        # end (on_end / recv) reports it too.
        self.confirmed.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._confirm_timer = loop.call_later(timeout, self._confirm_timeout, timeout)

    def _confirm_timeout(self, timeout: float) -> None:
        if self._expect is not None and not self._ended:
            self._finish(HandshakeTimeout(
                f"secure handshake: no key confirmation from the peer within {timeout:g} s"))
            if self.transport is not None:
                self.transport.abort()

    def _process(self) -> None:
        if self._expect is not None:
            if self._have < CONFIRM_SIZE or self._ended:
                return
            tag = bytes(self._view[:CONFIRM_SIZE])
            if not hmac.compare_digest(tag, self._expect):
                # Nothing after a wrong tag is opened. Close, not abort: the peer
                # needs our own tag to reach the same verdict.
                self._finish(PairingMismatch("pairing code did not match"))
                if self.transport is not None:
                    self.transport.close()
                return
            self._expect = None
            rest = self._have - CONFIRM_SIZE
            self._buf[:rest] = bytes(self._view[CONFIRM_SIZE : self._have])
            self._have = rest
            if self._confirm_timer is not None:
                self._confirm_timer.cancel()
            if self.confirmed is not None and not self.confirmed.done():
                self.confirmed.set_result(None)
        self._open_records()

    def _open_records(self) -> None:
        opener, buf, view = self._opener, self._buf, self._view
        assert opener is not None
        while self._have >= _HDR and not self._ended:
            (size,) = RECORD_HEADER.unpack_from(buf)
            if not TAG_SIZE < size <= MAX_RECORD + TAG_SIZE:
                self._tampered(f"record length {size} is out of range")
                return
            end = _HDR + size
            if self._have < end:
                return
            try:
                plain = opener.decrypt(_NONCE.pack(self._counter), view[_HDR:end], view[:_HDR])
            except InvalidTag:
                self._tampered(f"record {self._counter} failed authentication: the data was "
                               "altered or injected in transit")
                return
            self._counter += 1
            rest = self._have - end  # at most the next header, except just after the handshake
            if rest:
                buf[:rest] = bytes(view[end : self._have])
            self._have = rest
            if self._sink is not None:
                self._sink(plain)
            else:
                self._records.append(plain)
                if len(self._records) >= _PULL_QUEUE and self.transport is not None:
                    self.transport.pause_reading()
                self._wake()

    def _tampered(self, message: str) -> None:
        self._finish(TunnelTampered(f"tunnel data rejected: {message}"))
        if self.transport is not None:
            self.transport.abort()

    def _finish(self, exc: Exception | None) -> None:
        if self._ended:
            return
        self._ended = True
        self._end_error = exc
        if self._confirm_timer is not None:
            self._confirm_timer.cancel()
        if self.confirmed is not None and not self.confirmed.done():
            self.confirmed.set_exception(exc or HandshakeError(
                "secure handshake: the channel ended before the peer's key confirmation"))
        self._wake()
        if self._on_end is not None:
            self._on_end(exc)

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _wait(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        await waiter

    # -- handshake phase ------------------------------------------------------

    async def readexactly(self, n: int) -> bytes:
        while self._have < n:
            if self._ended:
                if self._end_error is not None:
                    raise self._end_error
                raise asyncio.IncompleteReadError(bytes(self._view[: self._have]), n)
            await self._wait()
        data = bytes(self._view[:n])
        self._buf[: self._have - n] = bytes(self._view[n : self._have])
        self._have -= n
        return data

    def start_records(self, opener: AESGCM) -> None:
        self._opener = opener
        self._process()  # records the peer sent right after its confirmation

    def send(self, data: memoryview) -> None:
        """Send ``data`` (a reused buffer: not kept after the call) in order."""
        transport = self.transport
        assert transport is not None
        if self._sock is not None and not transport.get_write_buffer_size() \
                and not transport.is_closing():
            # Nothing queued in the transport, so writing to the socket directly
            # keeps the order; it saves the transport's copy of the buffer.
            try:
                data = data[self._sock.send(data) :]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                pass  # the transport's own write below meets the error and reports it
            if not data:
                return
        transport.write(bytes(data))  # a copy: the transport may keep what it is given

    async def drain(self) -> None:
        if self._write_paused and not self._ended:
            self._drain_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._drain_waiter
            finally:
                self._drain_waiter = None


class SecureChannel:
    """Encrypted, authenticated records over one TCP connection (from :func:`open_channel`).

    Sending: ``write`` encrypts at once and queues on the transport; ``drain``
    waits while too much is queued. Receiving, either pull (``await recv()``:
    one record's plaintext, ``b""`` at a clean end) or push (``start(on_record,
    on_end)``: every record to ``on_record``, then ``on_end(None)`` at a clean
    end or ``on_end(error)``); the callbacks must not raise.
    """

    def __init__(self, transport: asyncio.Transport, protocol: _RecordProtocol, *,
                 role: SpakeSide, send_key: bytes, recv_key: bytes) -> None:
        self.role: SpakeSide = role
        self._transport = transport
        self._protocol = protocol
        self._sealer = AESGCM(send_key)
        self._counter = 0
        self.wire_bytes_out = 0
        # Reused for every record: a fresh 256 KiB buffer per record (zeroed,
        # often page-faulted) cost more than AES-GCM itself, and a reused one
        # stays in cache for the encryption and the send that follow.
        self._plain = memoryview(bytearray(MAX_RECORD))
        self._record = memoryview(bytearray(_HDR + MAX_RECORD + TAG_SIZE))
        protocol.start_records(AESGCM(recv_key))

    async def confirmed(self) -> None:
        """Wait until the peer's key confirmation has been checked.

        Returns at once after the in-band handshake (it checked it already).
        After an early-data open (``pake``) it raises :class:`PairingMismatch`,
        :class:`HandshakeTimeout` or :class:`HandshakeError` as the in-band
        handshake would have.
        """
        if self._protocol.confirmed is not None:
            await asyncio.shield(self._protocol.confirmed)

    @property
    def peer_role(self) -> SpakeSide:
        return "B" if self.role == "A" else "A"

    @property
    def wire_bytes_in(self) -> int:
        return self._protocol.bytes_in

    @property
    def write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt ``data`` into one or more records and queue them for sending."""
        self.writelines((data,))

    def writelines(self, parts: Iterable[bytes | bytearray | memoryview]) -> None:
        """Like ``write(b"".join(parts))``, without building the joined copy."""
        plain, fill = self._plain, 0
        for part in parts:
            n = len(part)
            if fill + n <= MAX_RECORD:  # the usual case: the part fits whole
                plain[fill : fill + n] = part
                fill += n
                continue
            view, start = memoryview(part), 0
            while start < n:
                if fill == MAX_RECORD:
                    self._seal(fill)
                    fill = 0
                take = min(n - start, MAX_RECORD - fill)
                plain[fill : fill + take] = view[start : start + take]
                fill += take
                start += take
        if fill:
            self._seal(fill)

    def _seal(self, n: int) -> None:
        """Encrypt the first ``n`` bytes of the plaintext buffer as one record and send it."""
        size = n + TAG_SIZE
        header = RECORD_HEADER.pack(size)
        record = self._record[: _HDR + size]
        record[:_HDR] = header
        self._sealer.encrypt_into(self._next_nonce(), self._plain[:n], header, record[_HDR:])
        self.wire_bytes_out += len(record)
        self._protocol.send(record)

    def _next_nonce(self) -> bytes:
        if self._counter > _MAX_COUNTER:  # unreachable in practice: 2^64 records
            raise TunnelTampered("record counter exhausted: the tunnel must be re-keyed")
        nonce = _NONCE.pack(self._counter)
        self._counter += 1
        return nonce

    async def drain(self) -> None:
        await self._protocol.drain()

    async def recv(self) -> bytes:
        """The next record's plaintext; ``b""`` when the peer ended the stream cleanly."""
        proto = self._protocol
        if proto._sink is not None:
            raise RuntimeError("recv() on a channel started in push mode")
        while not proto._records:
            if proto._ended:
                if proto._end_error is not None:
                    raise proto._end_error
                return b""
            await proto._wait()
        if len(proto._records) == _PULL_QUEUE and not proto._ended:
            self._transport.resume_reading()
        return proto._records.popleft()

    def start(self, on_record: RecordSink, on_end: EndSink) -> None:
        """Push mode: deliver every record (queued ones first) to ``on_record``."""
        proto = self._protocol
        while proto._records:
            on_record(proto._records.popleft())
        proto._sink, proto._on_end = on_record, on_end
        self._transport.resume_reading()
        if proto._ended:
            on_end(proto._end_error)

    def close(self) -> None:
        self._transport.close()

    def abort(self) -> None:
        self._transport.abort()

    async def wait_closed(self) -> None:
        while not self._protocol._ended:
            await self._protocol._wait()


class Pake:
    """One side's SPAKE2 for one pairing, run before the tunnel exists.

    ``message`` (33 bytes) goes to the peer through the rendezvous;
    :meth:`finish` takes the peer's message from there and derives the key
    (it never raises: an invalid message fails :func:`open_channel` later, as
    the in-band handshake would). Then ``open_channel(..., pake=this)`` has
    only the key confirmation left to do on the tunnel.
    """

    def __init__(self, role: SpakeSide, code: str) -> None:
        if role not in ("A", "B"):
            raise ValueError(f"role must be 'A' or 'B', not {role!r}")
        self.role: SpakeSide = role
        self._spake = (SPAKE2_A if role == "A" else SPAKE2_B)(
            code.encode("utf-8"), idA=ID_A, idB=ID_B)
        self.message: bytes = self._spake.start()
        self.peer_message: bytes | None = None
        self._key: bytes | HandshakeError | None = None

    @property
    def hello(self) -> bytes:
        """Our message as the in-band hello would carry it (for the transcript)."""
        return MAGIC + bytes([VERSION]) + self.message

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
            self._key = _finish_spake(self._spake, self.role, MAGIC + bytes([VERSION])
                                      + peer_message)
        except HandshakeError as exc:
            self._key = exc

    def key(self) -> bytes:
        if self._key is None:
            raise ValueError("Pake.finish() was not called")
        if isinstance(self._key, HandshakeError):
            raise self._key
        return self._key


async def open_channel(sock: socket.socket, *, role: SpakeSide, code: str,
                       timeout: float = HANDSHAKE_TIMEOUT,
                       pake: Pake | None = None) -> SecureChannel:
    """Authenticate the peer on a connected TCP socket with ``code``; the channel owns it.

    Raises :class:`PairingMismatch` if the peer used another code,
    :class:`HandshakeTimeout` naming the step it waited for, and
    :class:`HandshakeError` for anything else. On failure the socket is closed.

    With ``pake`` (SPAKE2 already exchanged through the rendezvous and
    finished) only the key confirmation runs here, and without a wait: the
    channel is returned as soon as our confirmation tag is sent, so records may
    follow it at once. Nothing the peer sends is delivered before its tag has
    been checked; :meth:`SecureChannel.confirmed` waits for that check and
    raises the same errors (``PairingMismatch`` on a wrong code).
    """
    if role not in ("A", "B"):
        raise ValueError(f"role must be 'A' or 'B', not {role!r}")
    if pake is not None:
        return await _open_confirming(sock, role, pake, timeout)
    transport, proto = await _attach(sock)
    waiting_for = "nothing"
    try:
        async with asyncio.timeout(timeout):
            spake = (SPAKE2_A if role == "A" else SPAKE2_B)(
                code.encode("utf-8"), idA=ID_A, idB=ID_B)
            hello = MAGIC + bytes([VERSION]) + spake.start()
            transport.write(hello)
            waiting_for = "pairing message"
            peer_hello = await proto.readexactly(HELLO_SIZE)
            key = _finish_spake(spake, role, peer_hello)
            transcript = hello + peer_hello if role == "A" else peer_hello + hello
            confirm_key = _derive(key, LABEL_CONFIRM)
            transport.write(_confirm_tag(confirm_key, role, transcript))
            waiting_for = "key confirmation"
            peer_tag = await proto.readexactly(CONFIRM_SIZE)
    except TimeoutError:
        transport.abort()
        raise HandshakeTimeout(
            f"secure handshake: no {waiting_for} from the peer within {timeout:g} s") from None
    except asyncio.IncompleteReadError:
        transport.abort()
        raise HandshakeError(
            f"secure handshake: the peer closed the connection before sending its "
            f"{waiting_for}") from None
    except OSError as exc:
        transport.abort()
        raise HandshakeError(
            f"secure handshake: connection failed while waiting for the peer's {waiting_for} "
            f"({exc.strerror or exc})") from None
    except BaseException:
        transport.abort()
        raise
    peer_role: SpakeSide = "B" if role == "A" else "A"
    if not hmac.compare_digest(peer_tag, _confirm_tag(confirm_key, peer_role, transcript)):
        transport.close()  # not abort: our own tag may still be queued, the peer needs it
        raise PairingMismatch("pairing code did not match")
    send_key, recv_key = _record_keys(key, role)
    return SecureChannel(transport, proto, role=role, send_key=send_key, recv_key=recv_key)


async def _attach(sock: socket.socket) -> tuple[asyncio.Transport, _RecordProtocol]:
    """The record protocol on ``sock`` (which it owns from now on, even on failure)."""
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    loop = asyncio.get_running_loop()
    try:
        return await loop.create_connection(lambda: _RecordProtocol(sock), sock=sock)
    except BaseException:
        sock.close()
        raise


def _record_keys(key: bytes, role: SpakeSide) -> tuple[bytes, bytes]:
    """(send key, receive key) of ``role`` from the SPAKE2 key."""
    a_to_b, b_to_a = _derive(key, LABEL_A_TO_B), _derive(key, LABEL_B_TO_A)
    return (a_to_b, b_to_a) if role == "A" else (b_to_a, a_to_b)


async def _open_confirming(sock: socket.socket, role: SpakeSide, pake: Pake,
                           timeout: float) -> SecureChannel:
    if pake.role != role:
        sock.close()
        raise ValueError(f"the pake was made for role {pake.role}, not {role}")
    try:
        key = pake.key()
    except BaseException:
        sock.close()
        raise
    assert pake.peer_message is not None
    peer_hello = MAGIC + bytes([VERSION]) + pake.peer_message
    # The same transcript and labels as the in-band handshake: both sides derive it
    # from the two hellos, however the messages travelled.
    transcript = pake.hello + peer_hello if role == "A" else peer_hello + pake.hello
    confirm_key = _derive(key, LABEL_CONFIRM)
    peer_role: SpakeSide = "B" if role == "A" else "A"
    send_key, recv_key = _record_keys(key, role)
    transport, proto = await _attach(sock)
    transport.write(_confirm_tag(confirm_key, role, transcript))
    proto.expect_confirmation(_confirm_tag(confirm_key, peer_role, transcript), timeout)
    return SecureChannel(transport, proto, role=role, send_key=send_key, recv_key=recv_key)


def _finish_spake(spake: SPAKE2_A | SPAKE2_B, role: SpakeSide, peer_hello: bytes) -> bytes:
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
