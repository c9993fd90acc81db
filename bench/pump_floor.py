"""The floor of a pure-Python encrypted relay: the least work per record (issue 16).

An experiment, not a product: a near end (in b1: listens on a loopback port,
one TCP connection to the far end per accepted connection) and a far end (in
a1: listens on its public address, one connection to the service per accepted
connection), with AES-256-GCM records between them and nothing else: no mux,
no resume, no credit, no key update, no pairing (a pre-shared key on the
command line). What it costs per GB is the least a Python design of the
encrypted tunnel could cost; ``bench.paths`` runs it beside ``ssh -L``.

    python -m bench.pump_floor near|far --mode async|thread|alloc \
        --listen HOST:PORT --to HOST:PORT --key HEX64 [--habits fresh,copy,keep,mallopt]

``--mode async``: asyncio, :class:`asyncio.BufferedProtocol` at both sockets,
each read sealed and written in the same callback. ``--mode thread``: blocking
sockets, one thread per direction per connection, tight loops. ``--mode
alloc``: the thread mode with the tunnel's buffer habits (each read a fresh
``bytes`` copied into the plaintext buffer and kept for 8 MiB, as the resume
layer's replay; each record opened into a fresh ``bytes``), same wire;
``--habits`` keeps some of them only (see :func:`_seal_loop_alloc`;
``bench.buffer_cost`` compares them). Each prints ``listening HOST:PORT`` once
it accepts.

Wire format, per connection, near end -> far end first:

- salt: 16 random bytes, in clear, sent once by the near end. Each direction
  has its own key: BLAKE2b-256 keyed with the pre-shared key over the salt,
  personalised ``nopf-floor-n2f`` (near -> far) or ``nopf-floor-f2n``.
- then records, in both directions:
  - length: 4 bytes, big-endian, the size of the ciphertext that follows
    (plaintext + 16-byte tag): 16 .. MAX_PLAINTEXT + 16;
  - ciphertext: AES-256-GCM of the plaintext, no associated data; nonce: the
    direction's record counter, 12 bytes big-endian, from 0 (a fresh key per
    connection, so a nonce never repeats under one key).
- a record with an empty plaintext (length 16) ends its direction (the
  sender's source reached EOF); the receiver half-closes towards its side.
  EOF without it, a bad length or a tag that does not verify closes both
  sockets of the connection, and nothing of that record is forwarded.

Each record carries one read of up to MAX_PLAINTEXT (256 KiB) bytes, as the
tunnel's do.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import hashlib
import os
import socket
import sys
import threading
from collections import deque
from collections.abc import Callable
from typing import Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from nopf_web.tunnel.resumable import _keep_freed_memory

SALT = 16  # bytes, in clear, first on the near -> far connection
HEADER = 4  # record length field, big-endian
TAG = 16  # AES-GCM tag, at the end of the ciphertext
NONCE = 12  # the direction's record counter, big-endian
MAX_PLAINTEXT = 256 * 1024  # one read of the source per record
MAX_RECORD = HEADER + MAX_PLAINTEXT + TAG
KEY = 32  # AES-256 pre-shared key
PERSON_N2F, PERSON_F2N = b"nopf-floor-n2f", b"nopf-floor-f2n"
SETUP_S = 10.0  # connecting to the other side; the far end's wait for the salt

Direction = Literal["n2f", "f2n"]
Mode = Literal["async", "thread", "alloc"]


class BadRecord(Exception):
    """A record that does not open: wrong length, bad tag, or the stream cut short."""


def direction_key(psk: bytes, salt: bytes, direction: Direction) -> bytes:
    """The AES-256 key of one direction of one connection."""
    person = PERSON_N2F if direction == "n2f" else PERSON_F2N
    return hashlib.blake2b(salt, key=psk, digest_size=KEY, person=person).digest()


def seal(psk: bytes, salt: bytes, direction: Direction, counter: int, plaintext: bytes) -> bytes:
    """One whole record (length + ciphertext): for tests and documentation."""
    sealed = AESGCM(direction_key(psk, salt, direction)).encrypt(
        counter.to_bytes(NONCE, "big"), plaintext, None)
    return len(sealed).to_bytes(HEADER, "big") + sealed


def _keys(psk: bytes, salt: bytes, near: bool) -> tuple[AESGCM, AESGCM]:
    """(sealing, opening) ciphers of this end."""
    n2f, f2n = AESGCM(direction_key(psk, salt, "n2f")), AESGCM(direction_key(psk, salt, "f2n"))
    return (n2f, f2n) if near else (f2n, n2f)


def _nodelay(sock: socket.socket) -> None:
    # asyncio sets it on every TCP transport; the thread pump does the same.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _parse_addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


# -- thread mode ---------------------------------------------------------------


def _seal_loop(src: socket.socket, dst: socket.socket, aead: AESGCM,
               failed: threading.Event) -> None:
    """Plaintext from ``src`` -> records to ``dst``, until ``src``'s EOF (no end
    record when that EOF came from the other direction's failure)."""
    plain = bytearray(MAX_PLAINTEXT)
    pv = memoryview(plain)
    out = bytearray(MAX_RECORD)
    ov = memoryview(out)
    recv_into, sendall, encrypt_into = src.recv_into, dst.sendall, aead.encrypt_into
    counter = 0
    while True:
        n = recv_into(plain)
        if not n and failed.is_set():
            return
        size = n + TAG
        out[:HEADER] = size.to_bytes(HEADER, "big")
        encrypt_into(counter.to_bytes(NONCE, "big"), pv[:n], None, ov[HEADER:HEADER + size])
        counter += 1
        sendall(ov[:HEADER + size])
        if not n:  # that was the end record
            dst.shutdown(socket.SHUT_WR)
            return


def _read_exact(sock: socket.socket, view: memoryview) -> bool:
    """Fill ``view``; False on EOF before its first byte, BadRecord on EOF inside it."""
    got, need = 0, len(view)
    while got < need:
        n = sock.recv_into(view[got:], need - got, socket.MSG_WAITALL)
        if not n:
            if got:
                raise BadRecord("the connection ended inside a record")
            return False
        got += n
    return True


def _read_record(src: socket.socket, rv: memoryview) -> int:
    """The next record into ``rv`` (its length field, then its ciphertext): the
    ciphertext's size. BadRecord on EOF before the end record or a bad length."""
    if not _read_exact(src, rv[:HEADER]):
        raise BadRecord("the connection ended without an end record")
    size = int.from_bytes(rv[:HEADER], "big")
    if not TAG <= size <= MAX_PLAINTEXT + TAG:
        raise BadRecord(f"record length {size} out of range")
    if not _read_exact(src, rv[HEADER:HEADER + size]):
        raise BadRecord("the connection ended inside a record")
    return size


def _open_loop(src: socket.socket, dst: socket.socket, aead: AESGCM,
               failed: threading.Event) -> None:
    """Records from ``src`` -> plaintext to ``dst``, until the end record."""
    record = bytearray(MAX_RECORD)
    rv = memoryview(record)
    plain = bytearray(MAX_PLAINTEXT)
    pv = memoryview(plain)
    sendall, decrypt_into = dst.sendall, aead.decrypt_into
    counter = 0
    while True:
        size = _read_record(src, rv)
        try:
            decrypt_into(counter.to_bytes(NONCE, "big"), rv[HEADER:HEADER + size], None,
                         pv[:size - TAG])
        except InvalidTag as exc:
            raise BadRecord(f"record {counter} does not verify") from exc
        counter += 1
        if size == TAG:
            dst.shutdown(socket.SHUT_WR)
            return
        sendall(pv[:size - TAG])


REPLAY = 8 << 20  # --mode alloc: bytes of past reads kept, as the resume layer's replay cap


def _open_loop_alloc(src: socket.socket, dst: socket.socket, aead: AESGCM,
                     failed: threading.Event) -> None:
    """:func:`_open_loop` with each record opened into a fresh ``bytes``
    (``AESGCM.decrypt``, as the record machine does)."""
    record = bytearray(MAX_RECORD)
    rv = memoryview(record)
    sendall, decrypt = dst.sendall, aead.decrypt
    counter = 0
    while True:
        size = _read_record(src, rv)
        try:
            plaintext = decrypt(counter.to_bytes(NONCE, "big"), rv[HEADER:HEADER + size], None)
        except InvalidTag as exc:
            raise BadRecord(f"record {counter} does not verify") from exc
        counter += 1
        if size == TAG:
            dst.shutdown(socket.SHUT_WR)
            return
        sendall(plaintext)


HABITS = frozenset({"fresh", "copy", "keep", "mallopt"})  # --habits: all of them by default
SCATTER = "scatter"  # --habits, not one of the tunnel's: see _seal_loop_alloc


def _seal_loop_alloc(habits: frozenset[str], key: bytes, src: socket.socket,
                     dst: socket.socket, aead: AESGCM, failed: threading.Event) -> None:
    """:func:`_seal_loop` with the tunnel's buffer habits, all of them (:data:`HABITS`)
    or some only, to tell their costs apart: ``fresh`` (each read a new ``bytes``,
    as asyncio's ``data_received`` gives; without it, ``recv_into`` a reused
    buffer: one, or with ``keep`` a ring of 8 MiB of them, a pool), ``copy`` (into
    the plaintext buffer, as ``RecordMachine.seal`` does; without it, sealed from
    the read itself), ``keep`` (8 MiB of past reads alive, standing for the replay
    buffer, which keeps reads until acked). ``scatter`` (instead of
    ``copy``): each record sealed from two parts, its first 20 bytes and the
    rest (standing for a frame header and the read), by a streaming AES-GCM
    encryptor, with no copy: what the record machine could do instead of
    joining its parts."""
    plain = bytearray(MAX_PLAINTEXT)
    pv = memoryview(plain)
    out = bytearray(MAX_RECORD)
    ov = memoryview(out)
    fresh, copy, keep = "fresh" in habits, "copy" in habits, "keep" in habits
    scatter, aes = SCATTER in habits, algorithms.AES(key)  # key: aead's
    ring = [] if fresh else [memoryview(bytearray(MAX_PLAINTEXT))
                             for _ in range(REPLAY // MAX_PLAINTEXT + 1 if keep else 1)]
    recv, recv_into, sendall, encrypt_into = src.recv, src.recv_into, dst.sendall, \
        aead.encrypt_into
    kept: deque[bytes] = deque()
    kept_size = counter = 0
    while True:
        data: bytes | memoryview
        if fresh:
            data = recv(MAX_PLAINTEXT)
            n = len(data)
        else:
            buf = ring[counter % len(ring)]
            n = recv_into(buf)
            data = buf[:n]
        if not n and failed.is_set():
            return
        if copy:
            plain[:n] = data
            source = pv[:n]
        else:
            source = memoryview(data)
        size = n + TAG
        out[:HEADER] = size.to_bytes(HEADER, "big")
        nonce = counter.to_bytes(NONCE, "big")
        if scatter:
            enc = Cipher(aes, modes.GCM(nonce)).encryptor()
            at = HEADER + enc.update_into(source[:20], ov[HEADER:])
            at += enc.update_into(source[20:], ov[at:])
            enc.finalize()
            ov[at:at + TAG] = enc.tag
        else:
            encrypt_into(nonce, source, None, ov[HEADER:HEADER + size])
        counter += 1
        sendall(ov[:HEADER + size])
        if not n:
            dst.shutdown(socket.SHUT_WR)
            return
        if keep and fresh:
            assert isinstance(data, bytes)
            kept.append(data)
            kept_size += n
            while kept_size > REPLAY:
                kept_size -= len(kept.popleft())


Loop = Callable[[socket.socket, socket.socket, AESGCM, threading.Event], None]


def _direction(loop_fn: Loop, src: socket.socket, dst: socket.socket, aead: AESGCM,
               both: tuple[socket.socket, socket.socket], failed: threading.Event) -> None:
    """Run one direction; on any failure cut both sockets so the other direction ends."""
    try:
        loop_fn(src, dst, aead, failed)
    except (OSError, BadRecord) as exc:
        print(f"pump_floor: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        failed.set()  # before the cuts: the EOF they cause must not send an end record
        for sock in both:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def _thread_conn(plain: socket.socket, cipher: socket.socket, aead_seal: AESGCM,
                 aead_open: AESGCM, alloc: bool, habits: frozenset[str] = HABITS,
                 seal_key: bytes = b"") -> None:
    both, failed = (cipher, plain), threading.Event()
    seal_loop: Loop = functools.partial(_seal_loop_alloc, habits, seal_key) if alloc \
        else _seal_loop
    open_loop: Loop = _open_loop_alloc if alloc else _open_loop
    up = threading.Thread(target=_direction, name="pump-seal",
                          args=(seal_loop, plain, cipher, aead_seal, both, failed),
                          daemon=True)
    up.start()
    _direction(open_loop, cipher, plain, aead_open, both, failed)
    up.join()
    plain.close()
    cipher.close()


def _thread_accepted(conn: socket.socket, near: bool, to: tuple[str, int], psk: bytes,
                     alloc: bool, habits: frozenset[str] = HABITS) -> None:
    other: socket.socket | None = None
    try:
        _nodelay(conn)
        if near:
            other = socket.create_connection(to, timeout=SETUP_S)
            other.settimeout(None)
            _nodelay(other)
            salt = os.urandom(SALT)
            other.sendall(salt)
            plain, cipher = conn, other
        else:
            conn.settimeout(SETUP_S)  # waits for the salt
            got = bytearray(SALT)
            if not _read_exact(conn, memoryview(got)):
                raise BadRecord("the connection ended before its salt")
            salt = bytes(got)
            conn.settimeout(None)
            other = socket.create_connection(to, timeout=SETUP_S)
            other.settimeout(None)
            _nodelay(other)
            plain, cipher = other, conn
    except (OSError, BadRecord) as exc:
        print(f"pump_floor: connection setup: {type(exc).__name__}: {exc}", file=sys.stderr,
              flush=True)
        conn.close()
        if other is not None:
            other.close()
        return
    _thread_conn(plain, cipher, *_keys(psk, salt, near), alloc, habits,
                 direction_key(psk, salt, "n2f" if near else "f2n"))


def serve_thread(listen: socket.socket, near: bool, to: tuple[str, int], psk: bytes,
                 alloc: bool = False, habits: frozenset[str] = HABITS) -> None:
    """Accept forever; two threads per connection (``alloc``: the tunnel's buffer
    habits, or those of them in ``habits``)."""
    if alloc and "mallopt" in habits:
        _keep_freed_memory()  # as the tunnel's process does for its replay buffer
    while True:
        conn, _ = listen.accept()
        threading.Thread(target=_thread_accepted, args=(conn, near, to, psk, alloc, habits),
                         name="pump-conn", daemon=True).start()


# -- async mode ----------------------------------------------------------------


class _Conn:
    """One relayed connection: its two transports and which directions ended."""

    def __init__(self) -> None:
        self.plain: asyncio.Transport | None = None
        self.cipher: asyncio.Transport | None = None
        self.sent_end = False  # plain EOF -> end record sent
        self.got_end = False  # end record -> plain half-closed

    def maybe_close(self) -> None:
        if self.sent_end and self.got_end:
            for t in (self.plain, self.cipher):
                if t is not None:
                    t.close()

    def abort(self, why: str) -> None:
        print(f"pump_floor: {why}", file=sys.stderr, flush=True)
        for t in (self.plain, self.cipher):
            if t is not None:
                t.abort()


Hook = Callable[[asyncio.Transport], None]


class _Side(asyncio.BufferedProtocol):
    """One socket of a relayed connection: its writes back up into the other side's
    reads, and its end closes the other side."""

    conn: _Conn

    def _other(self) -> asyncio.Transport | None:
        raise NotImplementedError

    def pause_writing(self) -> None:
        if (other := self._other()) is not None:
            other.pause_reading()

    def resume_writing(self) -> None:
        if (other := self._other()) is not None:
            other.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if (other := self._other()) is not None:
            other.close()


class _PlainSide(_Side):
    """The unencrypted socket: reads are sealed into records to the cipher side."""

    def __init__(self, conn: _Conn) -> None:
        self.conn = conn
        self.on_accept: Hook | None = None  # set on the accepted socket's protocol
        self.aead: AESGCM | None = None
        self.counter = 0
        self.plain = bytearray(MAX_PLAINTEXT)
        self.pv = memoryview(self.plain)
        self.out = bytearray(MAX_RECORD)
        self.ov = memoryview(self.out)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.conn.plain = transport
        if self.aead is None:
            transport.pause_reading()  # nothing can be sealed before the keys
        if self.on_accept is not None:
            self.on_accept(transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.pv

    def _seal(self, n: int) -> None:
        assert self.aead is not None and self.conn.cipher is not None
        size = n + TAG
        self.out[:HEADER] = size.to_bytes(HEADER, "big")
        self.aead.encrypt_into(self.counter.to_bytes(NONCE, "big"), self.pv[:n], None,
                               self.ov[HEADER:HEADER + size])
        self.counter += 1
        self.conn.cipher.write(self.ov[:HEADER + size])  # copies what it cannot send now

    def buffer_updated(self, nbytes: int) -> None:
        self._seal(nbytes)

    def eof_received(self) -> bool:
        assert self.conn.cipher is not None
        self._seal(0)
        self.conn.cipher.write_eof()
        self.conn.sent_end = True
        self.conn.maybe_close()
        return True

    def _other(self) -> asyncio.Transport | None:
        return self.conn.cipher


class _CipherSide(_Side):
    """The record socket: whole records are opened and written to the plain side.

    Reads land in a buffer of four records' room; what is left of a partial
    record moves to its start only when less than one whole record fits after it.
    """

    def __init__(self, conn: _Conn, psk: bytes, near: bool, peer: _PlainSide) -> None:
        self.conn = conn
        self.on_accept: Hook | None = None  # set on the accepted socket's protocol
        self.psk = psk
        self.near = near
        self.peer = peer
        self.aead: AESGCM | None = None
        self.counter = 0
        self.buf = bytearray(4 * MAX_RECORD)
        self.bv = memoryview(self.buf)
        self.pos = 0  # first byte not yet consumed
        self.filled = 0  # first byte not yet received
        self.plain = bytearray(MAX_PLAINTEXT)
        self.pv = memoryview(self.plain)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.conn.cipher = transport
        if self.on_accept is not None:
            self.on_accept(transport)

    def start(self, salt: bytes) -> None:
        self.peer.aead, self.aead = _keys(self.psk, salt, self.near)
        if not self.near and self.conn.plain is not None:
            self.conn.plain.resume_reading()  # the service's bytes can be sealed now

    def get_buffer(self, sizehint: int) -> memoryview:
        if len(self.buf) - self.filled < MAX_RECORD:
            left = self.filled - self.pos
            self.buf[:left] = self.bv[self.pos:self.filled]
            self.pos, self.filled = 0, left
        return self.bv[self.filled:]

    def buffer_updated(self, nbytes: int) -> None:
        self.filled += nbytes
        try:
            self._records()
        except BadRecord as exc:
            self.conn.abort(f"BadRecord: {exc}")

    def _records(self) -> None:
        buf, bv = self.buf, self.bv
        if self.aead is None:  # the far end: the salt comes first
            if self.filled - self.pos < SALT:
                return
            self.start(bytes(bv[self.pos:self.pos + SALT]))
            self.pos += SALT
        aead, plain_t = self.aead, self.conn.plain
        assert aead is not None and plain_t is not None
        pos, filled = self.pos, self.filled
        while filled - pos >= HEADER:
            size = int.from_bytes(buf[pos:pos + HEADER], "big")
            if not TAG <= size <= MAX_PLAINTEXT + TAG:
                raise BadRecord(f"record length {size} out of range")
            end = pos + HEADER + size
            if end > filled:
                break
            try:
                aead.decrypt_into(self.counter.to_bytes(NONCE, "big"), bv[pos + HEADER:end],
                                  None, self.pv[:size - TAG])
            except InvalidTag as exc:
                raise BadRecord(f"record {self.counter} does not verify") from exc
            self.counter += 1
            pos = end
            if size == TAG:
                plain_t.write_eof()
                self.conn.got_end = True
                self.conn.maybe_close()
                break
            plain_t.write(self.pv[:size - TAG])  # copies what it cannot send now
        self.pos = pos

    def eof_received(self) -> bool:
        if not self.conn.got_end:
            self.conn.abort("BadRecord: the connection ended without an end record")
        return True

    def _other(self) -> asyncio.Transport | None:
        return self.conn.plain


# Records are 256 KiB: let a transport hold a few before it pauses its reader.
WRITE_HIGH, WRITE_LOW = 4 * MAX_RECORD, MAX_RECORD


async def serve_async(listen: socket.socket, near: bool, to: tuple[str, int],
                      psk: bytes) -> None:
    """Accept forever; per connection open the other socket, then relay in callbacks."""
    loop = asyncio.get_running_loop()

    async def connect_other(conn: _Conn, accepted: asyncio.Transport,
                            other: _PlainSide | _CipherSide) -> None:
        salt = os.urandom(SALT)
        if isinstance(other, _CipherSide):  # near end: keys before any record arrives
            other.start(salt)
        try:
            transport, _ = await asyncio.wait_for(
                loop.create_connection(lambda: other, *to), SETUP_S)
        except (OSError, TimeoutError) as exc:
            conn.abort(f"connecting to {to}: {type(exc).__name__}: {exc}")
            return
        assert isinstance(transport, asyncio.Transport)
        transport.set_write_buffer_limits(WRITE_HIGH, WRITE_LOW)
        if near:
            transport.write(salt)
        accepted.resume_reading()

    async with asyncio.TaskGroup() as tg:
        def accepted_factory() -> asyncio.BaseProtocol:
            conn = _Conn()
            plain = _PlainSide(conn)
            cipher = _CipherSide(conn, psk, near, plain)
            first, other = (plain, cipher) if near else (cipher, plain)

            def accepted(transport: asyncio.Transport) -> None:
                transport.set_write_buffer_limits(WRITE_HIGH, WRITE_LOW)
                transport.pause_reading()  # until the other socket is open
                tg.create_task(connect_other(conn, transport, other), name="pump-connect")
                if not near:  # as the thread mode's socket timeout
                    loop.call_later(SETUP_S, no_salt)

            def no_salt() -> None:
                if cipher.aead is None:
                    conn.abort(f"BadRecord: no salt within {SETUP_S:.0f} s")

            first.on_accept = accepted
            return first

        server = await loop.create_server(accepted_factory, sock=listen)
        async with server:
            await server.serve_forever()


# -- command line --------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.pump_floor",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("end", choices=("near", "far"))
    ap.add_argument("--mode", choices=("async", "thread", "alloc"), required=True)
    ap.add_argument("--listen", required=True, help="HOST:PORT (port 0: any)")
    ap.add_argument("--to", required=True, help="HOST:PORT: far end (near) or service (far)")
    ap.add_argument("--key", required=True, help="pre-shared key, 64 hex digits")
    ap.add_argument("--habits", default=",".join(sorted(HABITS)),
                    help="--mode alloc: which of the tunnel's buffer habits the sending "
                         "loop keeps, comma-separated, from " + ",".join(sorted(HABITS))
                         + " (default: all; 'none' for none), or scatter instead of copy")
    args = ap.parse_args(argv)
    habits = frozenset(h for h in args.habits.split(",") if h and h != "none")
    if not habits <= HABITS | {SCATTER} or {SCATTER, "copy"} <= habits:
        ap.error(f"--habits: from {','.join(sorted(HABITS | {SCATTER}))} ({SCATTER} "
                 "without copy)")
    psk = bytes.fromhex(args.key)
    if len(psk) != KEY:
        ap.error(f"--key must be {KEY} bytes ({2 * KEY} hex digits)")
    listen = socket.create_server(_parse_addr(args.listen), backlog=128)
    host, port = listen.getsockname()[:2]
    print(f"listening {host}:{port}", flush=True)
    near, to = args.end == "near", _parse_addr(args.to)
    if args.mode in ("thread", "alloc"):
        serve_thread(listen, near, to, psk, alloc=args.mode == "alloc", habits=habits)
    else:
        asyncio.run(serve_async(listen, near, to, psk))


if __name__ == "__main__":
    main()
