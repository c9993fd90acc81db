"""Two seed-mode sessions (``SeedEngine``) on loopback: a service, a server session
sharing it and a client session; introducing them to each other, and an application's
round trip through their tunnel."""

from __future__ import annotations

import asyncio
import socket

from nopf_web.punch.machine import PunchConfig
from nopf_web.roles import PeerRole
from nopf_web.sessions.engine import State
from nopf_web.sessions.seed import SeedEngine, SeedSpec
from nopf_web.wire.address import Endpoint
from tests.programs import free_port


def spec(role: PeerRole, port: int, rdv: Endpoint, host: str = "127.0.0.1") -> SeedSpec:
    return SeedSpec(role=role, local_host=host, local_port=port, rendezvous=rdv,
                    punch=PunchConfig(timeout=10), bind_host="127.0.0.1")


async def wait_state(session: SeedEngine, state: State, timeout: float = 10) -> None:
    reached = asyncio.Event()
    unsubscribe = session.subscribe(lambda e: reached.set() if session.state is state else None)
    try:
        if session.state is not state:
            async with asyncio.timeout(timeout):
                await reached.wait()
    finally:
        unsubscribe()


def seed_pair(rdv: Endpoint, local_host: str = "127.0.0.1",
              ) -> tuple[socket.socket, SeedEngine, SeedEngine]:
    """A local service (non-blocking listener), a server session sharing it and a client
    session on a free port, both on ``local_host``; not started."""
    family = socket.AF_INET6 if ":" in local_host else socket.AF_INET
    service = socket.create_server((local_host, 0), family=family)
    service.setblocking(False)
    server = SeedEngine(spec("server", service.getsockname()[1], rdv, local_host))
    client = SeedEngine(spec("client", free_port(local_host), rdv, local_host))
    return service, server, client


async def introduce(server: SeedEngine, client: SeedEngine) -> None:
    """Once both sessions know their public address, give each the other's; wait until
    the client is connected."""
    await wait_state(server, State.WAITING_PEER)
    await wait_state(client, State.WAITING_PEER)
    assert server.public_address and client.public_address
    server.set_peer(client.public_address)
    client.set_peer(server.public_address)
    await wait_state(client, State.CONNECTED)


async def app_round_trip(client_port: int, service: socket.socket,
                         host: str = "127.0.0.1") -> None:
    """An application on the client session's port (on ``host``) sends 100 000 bytes and
    EOF; the service (non-blocking) gets them all and answers "bye", which the
    application reads."""
    loop = asyncio.get_running_loop()
    app = socket.create_connection((host, client_port))
    app.setblocking(False)
    try:
        async with asyncio.timeout(10):
            conn, _ = await loop.sock_accept(service)
    except TimeoutError:
        app.close()
        raise AssertionError("the server session did not connect to the service "
                             "within 10 s") from None
    await loop.sock_sendall(app, b"x" * 100_000)
    app.shutdown(socket.SHUT_WR)
    got = b""
    while chunk := await loop.sock_recv(conn, 65536):
        got += chunk
    assert got == b"x" * 100_000
    await loop.sock_sendall(conn, b"bye")
    conn.close()
    assert await loop.sock_recv(app, 10) == b"bye"
    app.close()
