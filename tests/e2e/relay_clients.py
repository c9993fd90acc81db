"""Raw clients of nopf-server's relay: coordinate over rendezvous v2 (hello with the
relay capability, or resume), then open relay connections with the tokens of the
fires. Plain sockets and the wire codec only, no nopf peer code: the tests and the
benchmark see exactly what goes over the wire."""

from __future__ import annotations

import asyncio
import hashlib
import os
import queue
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Self

from nopf_web.wire.address import Endpoint
from nopf_web.wire.discovery import REPLY_SIZE, decode_reply
from nopf_web.wire.rendezvous import (
    ErrorReply,
    Fire,
    FrameReader,
    Hello,
    Ping,
    Pong,
    Probe,
    Relay,
    Relayed,
    ServerMessage,
    Welcome,
    decode_server_message,
    encode,
)

if TYPE_CHECKING:
    from tests.lab import Host

STEP = 10.0  # s for any one step of a client
RELAYED = encode(Relayed())


def take_message(pending: list[ServerMessage],
                 answer: Callable[[bytes], object]) -> ServerMessage | None:
    """The first message of ``pending`` that is not a ping (taken off the list), each ping
    before it answered with its pong through ``answer``; None once none is left."""
    while pending:
        msg = pending.pop(0)
        if not isinstance(msg, Ping):
            return msg
        answer(encode(Pong(msg.seq)))
    return None


class Coordination:
    """One coordination connection (asyncio), answering pings while it waits."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.frames = FrameReader()
        self.pending: list[ServerMessage] = []

    @classmethod
    async def open(cls, rdv: tuple[str, int], source: str, hello: Hello, *,
                   sock: socket.socket | None = None) -> Self:
        """``sock``: a connected socket to use (from the port the mapping check used)."""
        async with asyncio.timeout(STEP):
            if sock is not None:
                sock.setblocking(False)
                reader, writer = await asyncio.open_connection(sock=sock)
            else:
                reader, writer = await asyncio.open_connection(*rdv, local_addr=(source, 0))
            writer.write(encode(hello))
            await reader.readexactly(REPLY_SIZE)
        return cls(reader, writer)

    async def next(self, timeout: float | None = STEP) -> ServerMessage:
        """The next message other than a ping (pings are answered at once), within
        ``timeout`` s (None: no limit)."""
        async with asyncio.timeout(timeout):
            while (msg := take_message(self.pending, self.writer.write)) is None:
                chunk = await self.reader.read(4096)
                if not chunk:
                    raise ConnectionError("the rendezvous closed the coordination connection")
                self.pending += [decode_server_message(p) for p in self.frames.feed(chunk)]
        return msg

    def close(self) -> None:
        self.writer.close()


async def coordinate(rdv: tuple[str, int], sharer_ip: str = "127.0.0.1",
                     joiner_ip: str = "127.0.0.2", *, symmetric: bool = True,
                     timeout: float = 10.0) -> tuple[Fire, Fire]:
    """Pair a relay-capable sharer and joiner; their fires. ``symmetric``: the sharer
    reports a NAT check that makes it symmetric, so the plans relay at once."""
    probe = Endpoint(sharer_ip, 1) if symmetric else None
    sharer = await Coordination.open(rdv, sharer_ip,
                                     Hello("share", None, (), probe, timeout, relay=True))
    try:
        welcome = await sharer.next()
        if not isinstance(welcome, Welcome):
            raise AssertionError(f"expected a welcome, got {welcome}")
        joiner = await Coordination.open(
            rdv, joiner_ip, Hello("join", welcome.nameplate, (), None, timeout, relay=True))
        try:
            fs, fj = await asyncio.gather(sharer.next(), joiner.next())
        finally:
            joiner.close()
    finally:
        sharer.close()
    if not isinstance(fs, Fire) or not isinstance(fj, Fire):
        raise AssertionError(f"expected two fires, got {fs} and {fj}")
    return fs, fj


def relay_connect(fire: Fire, source: str, *, token: bytes | None = None,
                  wait: bool = True) -> socket.socket:
    """A relay connection with this fire's token (or ``token``): blocking, and once
    ``wait``, joined (the seed reply and "relayed" read; the next byte is the peer's)."""
    assert fire.relay is not None
    sock = socket.create_connection((fire.relay.relay.host, fire.relay.relay.port), STEP,
                                    source_address=(source, 0))
    sock.sendall(encode(Relay(token or fire.relay.token)))
    if wait:
        expect_joined(sock)
    return sock


def reusable(port: int = 0) -> socket.socket:
    """A socket bound to ``port`` that a second connection may bind again at once."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("0.0.0.0", port))
    return sock


def mapping_check(rdv: tuple[str, int]) -> tuple[socket.socket, Endpoint]:
    """The NAT mapping check as a peer makes it: a probe from a port P (the rendezvous
    closes first), then a connection from P again for the hello. That connection,
    and the address the probe got."""
    first = reusable()
    port = first.getsockname()[1]
    first.settimeout(STEP)
    first.connect(rdv)
    first.sendall(encode(Probe()))
    host, public_port = decode_reply(recv_exactly(first, REPLY_SIZE))
    while first.recv(100):  # its FIN: the 4-tuple is free again
        pass
    first.close()
    second = reusable(port)
    second.settimeout(STEP)
    second.connect(rdv)
    return second, Endpoint(host, public_port)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {n} bytes")
        data += chunk
    return bytes(data)


def expect_joined(sock: socket.socket) -> None:
    head = recv_exactly(sock, REPLY_SIZE + len(RELAYED))
    if head[REPLY_SIZE:] != RELAYED:
        msgs = FrameReader().feed(head[REPLY_SIZE:] + sock.recv(4096))
        raise AssertionError(f"not relayed: {[decode_server_message(m) for m in msgs]}")


def refusal_of(sock: socket.socket) -> ErrorReply:
    """The error a refused relay connection gets (after the seed reply), then EOF."""
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    (payload,) = FrameReader().feed(data[REPLY_SIZE:])
    msg = decode_server_message(payload)
    assert isinstance(msg, ErrorReply), msg
    return msg


@dataclass
class Transfer:
    sent_sha: str
    received_sha: str
    received: int
    seconds: float  # first byte to EOF, at the receiver


def send_and_close(sock: socket.socket, data: bytes) -> str:
    sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)
    return hashlib.sha256(data).hexdigest()


def receive_all(sock: socket.socket) -> tuple[str, int, float]:
    """SHA-256, size and the seconds from the first byte to EOF."""
    digest = hashlib.sha256()
    size = 0
    first = None
    buf = bytearray(1 << 20)
    while n := sock.recv_into(buf):
        if first is None:
            first = time.monotonic()
        digest.update(memoryview(buf)[:n])
        size += n
    return digest.hexdigest(), size, time.monotonic() - (first or time.monotonic())


def random_bytes(n: int) -> bytes:
    return os.urandom(n)


@dataclass
class RelayedPair:
    """Two peers in lab hosts, paired by a real rendezvous and joined by its relay."""

    sharer_fire: Fire
    joiner_fire: Fire
    sharer: socket.socket  # in the sharer's host; the next byte is the joiner's
    joiner: socket.socket
    seconds: float  # from the first connection to both joined


def relayed_pair(sharer_host: Host, joiner_host: Host, rdv: tuple[str, int],
                 timeout: float = 30.0) -> RelayedPair:
    """Each peer in its host (a thread entered into its namespace): the NAT mapping
    check, a relay-capable hello, the fire; then the relay connection of its plan
    (whatever the punch stages: these clients do not punch), joined."""
    plates: queue.Queue[int] = queue.Queue()
    result: dict[str, object] = {}

    def side(host: Host, share: bool) -> None:
        name = "sharer" if share else "joiner"
        try:
            with host.enter():
                sock, probe = mapping_check(rdv)

                async def coordinate() -> Fire:
                    nameplate = None if share else plates.get(timeout=timeout)
                    hello = Hello("share" if share else "join", nameplate, (), probe, 10,
                                  relay=True)
                    coord = await Coordination.open(rdv, "", hello, sock=sock)
                    try:
                        msg = await coord.next()
                        if share:
                            if not isinstance(msg, Welcome):
                                raise AssertionError(f"expected a welcome, got {msg}")
                            plates.put(msg.nameplate)
                            msg = await coord.next()
                        if not isinstance(msg, Fire):
                            raise AssertionError(f"expected a fire, got {msg}")
                        return msg
                    finally:
                        coord.close()

                fire = asyncio.run(coordinate())
                result[f"{name}-fire"] = fire
                result[name] = relay_connect(fire, "0.0.0.0")
        except BaseException as exc:  # reported below, with the other side's outcome
            result[f"{name}-error"] = exc
            if share:
                plates.put(0)  # the joiner stops waiting (nameplate 0 is refused)

    t0 = time.monotonic()
    threads = [threading.Thread(target=side, args=(sharer_host, True)),
               threading.Thread(target=side, args=(joiner_host, False))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 5)
    seconds = time.monotonic() - t0
    a, b = result.get("sharer"), result.get("joiner")
    fs, fj = result.get("sharer-fire"), result.get("joiner-fire")
    if not (isinstance(a, socket.socket) and isinstance(b, socket.socket)
            and isinstance(fs, Fire) and isinstance(fj, Fire)):
        for sock in (a, b):
            if isinstance(sock, socket.socket):
                sock.close()
        raise AssertionError(f"the pair was not relayed: {result}")
    return RelayedPair(fs, fj, a, b, seconds)
