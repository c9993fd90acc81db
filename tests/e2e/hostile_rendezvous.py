"""A hostile rendezvous for the lab: it pairs peers, then puts itself in the middle.

It speaks the real coordinated-mode protocol (nopf_web's wire codecs) well
enough for real ``share`` / ``connect`` clients. ``via="punch"``: it tells each
peer that the other one is at the rendezvous' own address, on a port of its own
per side, and both punch straight into it. ``via="relay"``: it gives both a
relay-only plan (as nopf-server does for a symmetric NAT) with its own relay
address and a token per side, answers the relay connections like nopf-server's
relay (seed reply, token checked, ``relayed`` to both), and is then the relay.
Either way it sits in the middle of the tunnel's TCP connection:

- ``relay``: copies bytes unchanged both ways and keeps a copy of everything
  (what a passive eavesdropper on the path could read);
- ``flip``: the same, but flips one byte of the first record after the secure
  handshake in each direction (an active attacker altering data);
- ``inject``: the same, but inserts a record of its own (a valid length, random
  ciphertext) before the first record in each direction (an attacker injecting);
- ``mitm``: terminates both connections and runs its own SPAKE2 towards each
  peer with a guessed code (it knows the nameplate, never the words).

When the peers send SPAKE2 messages through it (``pake`` in the joiner's
hello, a pake message from the sharer), ``relay`` and ``flip`` forward them
unchanged in the fire instructions, and ``mitm`` substitutes its own (made
with the guessed code), then only confirms keys on the tunnel, as the peers do.

Runs its own asyncio loop in a thread entered into the lab's rendezvous host.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import threading
from dataclasses import dataclass, field
from typing import Literal

from nopf_web.roles import PeerRole
from nopf_web.tunnel.errors import TunnelError
from nopf_web.tunnel.record_machine import RECORD_HEADER
from nopf_web.tunnel.secure import CONFIRM_SIZE, HELLO_SIZE, Pake, open_channel
from nopf_web.wire.address import Endpoint
from nopf_web.wire.discovery import encode_reply
from nopf_web.wire.rendezvous import (
    LENGTH,
    Fire,
    FrameReader,
    Hello,
    PakeMessage,
    Probe,
    Relay,
    Relayed,
    RelayStage,
    Stage,
    Welcome,
    decode_client_message,
    encode,
)
from tests.lab import Host

Mode = Literal["relay", "flip", "inject", "mitm"]
Via = Literal["punch", "relay"]
RDV_PORT = 3012
SHARER_SIDE, JOINER_SIDE = 4001, 4002  # where each peer is told its peer is
RELAY_PORT = 4003  # via="relay": the relay address its plans give
TOKENS = {b"S" * 16: SHARER_SIDE, b"J" * 16: JOINER_SIDE}  # relay token -> side
# First byte of the first record's ciphertext (after hello, confirm and its
# 4-byte length) plus a few: inside the AES-GCM ciphertext. With SPAKE2 through
# the rendezvous the tunnel starts with the confirmation: no hello.
FLIP_AT = HELLO_SIZE + CONFIRM_SIZE + 4 + 3
FLIP_AT_EARLY = CONFIRM_SIZE + 4 + 3
INJECT_AT, INJECT_AT_EARLY = FLIP_AT - 7, FLIP_AT_EARLY - 7  # where the first record starts
INJECTED = RECORD_HEADER.pack(48) + secrets.token_bytes(48)  # a record we sealed with no key
GUESS = "1-orbit-lantern"  # the nameplate may match; the words are a guess


@dataclass
class HostileRendezvous:
    host: Host
    mode: Mode
    via: Via = "punch"
    seen: dict[str, bytearray] = field(default_factory=lambda: {"a>b": bytearray(),
                                                                  "b>a": bytearray()})
    pairs: int = 0  # pairs told the lie
    relayed: int = 0  # via="relay": pairs joined by our relay
    mitm_results: list[str] = field(default_factory=list)  # what our own SPAKE2 got
    forwarded: dict[str, bytes] = field(default_factory=dict)  # SPAKE2 messages, by sender
    # mitm with forwarded SPAKE2: our halves towards the sharer (as B) and joiner (as A)
    _halves: dict[str, Pake] = field(default_factory=dict)
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _ready: threading.Event = field(default_factory=threading.Event)
    _stop: asyncio.Event | None = None
    _error: BaseException | None = None

    # -- control from the test thread -------------------------------------------

    def start(self, timeout: float = 5) -> None:
        self._thread = threading.Thread(target=self._run, name=f"hostile-{self.mode}",
                                        daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise AssertionError(f"hostile rendezvous did not start within {timeout} s: "
                                 f"{self._error!r}")
        if self._error is not None:
            raise AssertionError(f"hostile rendezvous failed to start: {self._error!r}")

    def stop(self, timeout: float = 5) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout)
            assert not self._thread.is_alive(), "hostile rendezvous did not stop"

    def __enter__(self) -> HostileRendezvous:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the rendezvous host's side ------------------------------------------------

    def _run(self) -> None:
        try:
            with self.host.enter():
                asyncio.run(self._main())
        except BaseException as exc:  # reported by start() or the test
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._sharer: asyncio.Future[tuple[asyncio.StreamWriter, Hello, Endpoint]] = (
            self._loop.create_future())
        self._sharer_pake: asyncio.Future[bytes | None] = self._loop.create_future()
        self._tasks: set[asyncio.Task[None]] = set()
        servers = [
            await asyncio.start_server(self._control, "0.0.0.0", RDV_PORT, reuse_address=True),
        ]
        listeners = {}
        # Up before any peer hears of them.
        for side in ((SHARER_SIDE, JOINER_SIDE) if self.via == "punch" else (RELAY_PORT,)):
            listeners[side] = socket.create_server(("0.0.0.0", side), reuse_port=True)
            listeners[side].setblocking(False)
        self._tasks.add(asyncio.create_task(self._middle(listeners)))
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            for server in servers:
                server.close()
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """The coordination protocol, as far as the peers can tell a real rendezvous."""
        ip, port = writer.get_extra_info("peername")[:2]
        public = Endpoint(ip, port)
        writer.write(encode_reply(ip, port))
        frames = FrameReader()
        try:
            async with asyncio.timeout(5):
                payloads: list[bytes] = []
                while not payloads:
                    chunk = await reader.read(4096)
                    if not chunk:
                        writer.close()
                        return
                    payloads = frames.feed(chunk)
            msg = decode_client_message(payloads[0])
        except (TimeoutError, OSError, ValueError):
            writer.close()
            return
        if isinstance(msg, Probe):  # the sharer's mapping check: close first
            writer.close()
            return
        if not isinstance(msg, Hello):
            writer.close()
            return
        if msg.action == "share":
            writer.write(encode(Welcome(1 + secrets.randbelow(99), 600, public)))
            if not self._sharer.done():
                self._sharer.set_result((writer, msg, public))
            await self._read_sharer_pake(reader, frames)
            return  # the writer stays open until the joiner arrives
        sharer_writer, sharer_hello, sharer_public = await self._sharer
        sharer_pake: bytes | None = None
        if msg.pake is not None:  # the sharer's follows its welcome: long since sent
            with contextlib.suppress(TimeoutError):
                sharer_pake = await asyncio.wait_for(asyncio.shield(self._sharer_pake), 2)
        to_sharer, to_joiner = self._pakes(sharer_pake, msg.pake)
        rdv = Endpoint(self.host.ip, 0)
        budget = min(8.0, msg.punch_timeout, sharer_hello.punch_timeout)
        # The lie: "your peer is at my address", or "go through my relay".
        for w, me, side, peer_pake, peer in (
                (sharer_writer, sharer_public, SHARER_SIDE, to_sharer, public),
                (writer, public, JOINER_SIDE, to_joiner, sharer_public)):
            if self.via == "relay":
                token = next(t for t, s in TOKENS.items() if s == side)
                fire = Fire(me, peer, (), 40.0, "relayed", peer_pake,
                            ("symmetric", "symmetric"),
                            RelayStage(Endpoint(rdv.host, RELAY_PORT), budget, token))
            else:
                there = Endpoint(rdv.host, side)
                fire = Fire(me, there, (Stage("public", there, "connect", budget),), 40.0,
                            peer_pake=peer_pake)
            w.write(encode(fire))
            with contextlib.suppress(OSError):
                w.write_eof()
        self.pairs += 1

    async def _read_sharer_pake(self, reader: asyncio.StreamReader, frames: FrameReader) -> None:
        """The sharer's SPAKE2 message, if it sends one (None: it runs SPAKE2 in-band)."""
        got: bytes | None = None
        with contextlib.suppress(TimeoutError, OSError, ValueError):
            async with asyncio.timeout(5):
                while got is None:
                    chunk = await reader.read(4096)
                    if not chunk:
                        break
                    for payload in frames.feed(chunk):
                        pake = decode_client_message(payload)
                        if isinstance(pake, PakeMessage):
                            got = pake.pake
        if not self._sharer_pake.done():
            self._sharer_pake.set_result(got)

    def _pakes(self, sharer: bytes | None, joiner: bytes | None,
               ) -> tuple[bytes | None, bytes | None]:
        """The SPAKE2 messages each side gets in its fire: the other's, or ours."""
        if sharer is None or joiner is None:
            return None, None
        self.forwarded = {"sharer": sharer, "joiner": joiner}
        if self.mode != "mitm":
            return joiner, sharer
        to_sharer, to_joiner = Pake("client", GUESS), Pake("server", GUESS)
        to_sharer.finish(sharer)
        to_joiner.finish(joiner)
        self._halves = {"sharer": to_sharer, "joiner": to_joiner}
        return to_sharer.message, to_joiner.message

    async def _accept_side(self, listener: socket.socket) -> socket.socket:
        """The first connection (the peer's punch); the listener closes after it."""
        loop = asyncio.get_running_loop()
        try:
            conn, _ = await loop.sock_accept(listener)
        finally:
            listener.close()
        conn.setblocking(False)
        return conn

    async def _relay_side(self, conn: socket.socket) -> tuple[int, socket.socket]:
        """One relay connection, as nopf-server's relay takes it: the seed reply, then the
        relay frame (read exactly: what follows is the tunnel's), its side by token."""
        loop = asyncio.get_running_loop()
        ip, port = conn.getpeername()[:2]
        conn.setblocking(False)
        await loop.sock_sendall(conn, encode_reply(ip, port))

        async def exactly(n: int) -> bytes:
            data = b""
            while len(data) < n:
                chunk = await loop.sock_recv(conn, n - len(data))
                if not chunk:
                    raise ConnectionError("closed before its relay message")
                data += chunk
            return data

        (size,) = LENGTH.unpack(await exactly(LENGTH.size))
        msg = decode_client_message(await exactly(size))
        assert isinstance(msg, Relay) and msg.token in TOKENS, msg
        return TOKENS[msg.token], conn

    async def _relayed(self, listener: socket.socket) -> tuple[socket.socket, socket.socket]:
        loop = asyncio.get_running_loop()
        try:  # one accept at a time: the loop watches a socket for one reader only
            conns = [(await loop.sock_accept(listener))[0] for _ in range(2)]
        finally:
            listener.close()
        first, second = await asyncio.gather(*(self._relay_side(c) for c in conns))
        sides = dict([first, second])
        a, b = sides[SHARER_SIDE], sides[JOINER_SIDE]
        for conn in (a, b):
            await loop.sock_sendall(conn, encode(Relayed()))
        self.relayed += 1
        return a, b

    async def _middle(self, listeners: dict[int, socket.socket]) -> None:
        if self.via == "relay":
            a, b = await self._relayed(listeners[RELAY_PORT])
        else:
            a, b = await asyncio.gather(self._accept_side(listeners[SHARER_SIDE]),
                                        self._accept_side(listeners[JOINER_SIDE]))
        try:
            if self.mode == "mitm":
                await self._impersonate(a, b)
                return
            flip = None if self.mode != "flip" else FLIP_AT_EARLY if self.forwarded else FLIP_AT
            inject = (None if self.mode != "inject"
                      else INJECT_AT_EARLY if self.forwarded else INJECT_AT)
            await asyncio.gather(self._copy(a, b, "a>b", flip, inject),
                                 self._copy(b, a, "b>a", flip, inject))
        finally:
            a.close()
            b.close()

    async def _copy(self, src: socket.socket, dst: socket.socket, name: str,
                    flip_at: int | None, inject_at: int | None = None) -> None:
        loop = asyncio.get_running_loop()
        seen = self.seen[name]
        try:
            while chunk := await loop.sock_recv(src, 65536):
                data = bytearray(chunk)
                if flip_at is not None and len(seen) <= flip_at < len(seen) + len(data):
                    data[flip_at - len(seen)] ^= 0x01
                if inject_at is not None and len(seen) <= inject_at < len(seen) + len(data):
                    at = inject_at - len(seen)
                    data[at:at] = INJECTED
                seen += chunk  # the bytes as they came: what an eavesdropper reads
                await loop.sock_sendall(dst, bytes(data))
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    async def _impersonate(self, a: socket.socket, b: socket.socket) -> None:
        """Our own SPAKE2 with each side: we are the client to the sharer and the
        server to the joiner."""
        async def spake(sock: socket.socket, role: PeerRole) -> None:
            half = self._halves.get("sharer" if role == "client" else "joiner")
            try:
                channel = await open_channel(sock.dup(), role=role, code=GUESS, timeout=5,
                                             pake=half)
                await channel.confirmed()
            except TunnelError as exc:
                self.mitm_results.append(f"{type(exc).__name__}: {exc}")
                return
            self.mitm_results.append("channel opened")  # would mean the guess was right
            channel.abort()

        await asyncio.gather(spake(a, "client"), spake(b, "server"))
