"""Two muxes over a real secure channel on loopback, forwarding a service as ``nopf
share`` / ``nopf connect`` do, and a service and client that check every byte by hash
(both half-closes exercised)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable

from nopf_web.tunnel.forward import serve_connect, serve_share
from nopf_web.tunnel.mux import Mux
from nopf_web.tunnel.secure import SecureChannel, open_channel
from tests.loopback import tcp_pair

CODE = "7-orbit-lantern"


async def channels(a: socket.socket, b: socket.socket, code_a: str = CODE, code_b: str = CODE,
                   timeout: float = 5.0) -> tuple[SecureChannel, SecureChannel]:
    """The secure channels over the two ends ``a`` (server) and ``b`` (client)."""
    return await asyncio.gather(open_channel(a, role="server", code=code_a, timeout=timeout),
                                open_channel(b, role="client", code=code_b, timeout=timeout))


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def muxes(pair: tuple[socket.socket, socket.socket] | None = None,
                keepalive: float = 15.0, dead_after: float = 45.0,
                ) -> AsyncIterator[tuple[Mux, Mux]]:
    """A server mux (A) and a client mux (B) over a secure channel on ``pair`` (by default
    a loopback TCP pair)."""
    a, b = pair if pair is not None else tcp_pair()
    ca, cb = await channels(a, b)
    async with Mux(ca, role="server", name="mux-a", keepalive=keepalive,
                   dead_after=dead_after) as ma, \
            Mux(cb, role="client", name="mux-b", keepalive=keepalive,
                dead_after=dead_after) as mb:
        yield ma, mb


@contextlib.asynccontextmanager
async def forwarded(handler: Handler) -> AsyncIterator[tuple[tuple[str, int], Mux, Mux]]:
    """A service behind the sharer (mux A), reachable at the connector's listener (mux B)."""
    server = await asyncio.start_server(handler, "127.0.0.1", 0, limit=1 << 20)
    service = server.sockets[0].getsockname()
    listener = socket.create_server(("127.0.0.1", 0), backlog=512)
    async with muxes() as (ma, mb):
        share = asyncio.create_task(serve_share(ma, service), name="test-share")
        connect = asyncio.create_task(serve_connect(mb, listener), name="test-connect")
        try:
            yield listener.getsockname(), ma, mb
        finally:
            await ma.close()
            await mb.close()
            await asyncio.gather(share, connect, return_exceptions=True)
            listener.close()
            server.close()
            await server.wait_closed()


def blob(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


async def hash_service(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Reads seed+size, sends that blob while hashing everything the client sends
    until its FIN, then sends the hash and closes: both half-closes are exercised."""
    seed, size = struct.unpack("!QI", await reader.readexactly(12))

    async def send() -> None:
        writer.write(blob(seed, size))
        await writer.drain()

    sending = asyncio.create_task(send(), name="hash-service-send")
    digest = hashlib.sha256()
    while data := await reader.read(1 << 20):
        digest.update(data)
    await sending
    writer.write(digest.digest())
    await writer.drain()
    writer.close()


async def hash_client(addr: tuple[str, int], seed: int, size: int | None = None) -> None:
    """One connection to ``hash_service``: asks for a blob, sends its own (in pieces, then
    EOF) while reading; checks the blob and the hash of what it sent. ``size`` bytes each
    way, or by default 256 KiB to 1 MiB each way, drawn from ``seed``."""
    if size is None:
        rng = random.Random(seed)
        up, down = rng.randint(256 << 10, 1 << 20), rng.randint(256 << 10, 1 << 20)
    else:
        up = down = size
    payload = blob(seed + 1, up)
    reader, writer = await asyncio.open_connection(*addr, limit=1 << 20)
    writer.write(struct.pack("!QI", seed, down))

    async def send() -> None:
        for i in range(0, up, 1 << 18):  # in pieces: a long transfer runs a while
            writer.write(payload[i : i + (1 << 18)])
            await writer.drain()
        writer.write_eof()

    sending = asyncio.create_task(send(), name=f"hash-client-{seed}")
    got = bytearray()
    while data := await reader.read(1 << 20):
        got += data
    await sending
    writer.close()
    assert len(got) == down + 32, (seed, len(got), down)
    assert hashlib.sha256(got[:down]).digest() == hashlib.sha256(blob(seed, down)).digest()
    assert got[down:] == hashlib.sha256(payload).digest()
