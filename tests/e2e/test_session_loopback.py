"""Seed engines on loopback: events, stop from any state, a full punch and pipe."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import pytest

from nopf_web.punch.machine import PunchConfig
from nopf_web.roles import PeerRole
from nopf_web.sessions.engine import Event, State
from nopf_web.sessions.seed import SeedEngine, SeedSpec
from nopf_web.wire.address import Endpoint
from tests.programs import free_port


def spec(role: PeerRole, port: int, rdv: Endpoint) -> SeedSpec:
    return SeedSpec(role=role, local_port=port, rendezvous=rdv,
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


def seed_pair(rdv: Endpoint) -> tuple[socket.socket, SeedEngine, SeedEngine]:
    """A local service (non-blocking listener), a server session sharing it and a client
    session on a free port; not started."""
    service = socket.create_server(("127.0.0.1", 0))
    service.setblocking(False)
    server = SeedEngine(spec("server", service.getsockname()[1], rdv))
    client = SeedEngine(spec("client", free_port(), rdv))
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


async def app_round_trip(client_port: int, service: socket.socket) -> None:
    """An application on the client session's port sends 100 000 bytes and EOF; the
    service (non-blocking) gets them all and answers "bye", which the application reads."""
    loop = asyncio.get_running_loop()
    app = socket.create_connection(("127.0.0.1", client_port))
    app.setblocking(False)
    conn, _ = await loop.sock_accept(service)
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


async def test_punch_pipe_and_events(rendezvous: Endpoint) -> None:
    service, server, client = seed_pair(rendezvous)
    events: list[Event] = []
    client.subscribe(events.append)
    tasks = [asyncio.create_task(s.run(), name=f"test-{s.spec.role}") for s in (server, client)]
    await introduce(server, client)
    await app_round_trip(client.spec.local_port, service)
    await asyncio.gather(*tasks)
    assert client.state is State.CLOSED and server.state is State.CLOSED
    assert client.bytes_out == 100_000 and client.bytes_in == 3
    assert server.bytes_in == 100_000 and server.bytes_out == 3
    kinds = [e.kind for e in events]
    assert kinds.index("public_address") < kinds.index("peer_address") < kinds.index(
        "pipe_started")
    states = [e.data["state"] for e in events if e.kind == "state"]
    assert states == ["discovering", "waiting_peer", "punching", "connected", "closed"]
    service.close()


@pytest.mark.parametrize("stop_in", [State.DISCOVERING, State.WAITING_PEER, State.CONNECTED])
async def test_stop_ends_the_session_in_any_state(rendezvous: Endpoint, stop_in: State) -> None:
    service, server, client = seed_pair(rendezvous)
    tasks = [asyncio.create_task(s.run(), name=f"test-{s.spec.role}") for s in (server, client)]
    try:
        if stop_in is State.WAITING_PEER:
            await wait_state(server, State.WAITING_PEER)
            await wait_state(client, State.WAITING_PEER)
        elif stop_in is State.CONNECTED:  # and waits for its local application
            await introduce(server, client)
        client.stop()
        with contextlib.suppress(asyncio.CancelledError):
            async with asyncio.timeout(5):
                await tasks[1]
        assert client.state is State.CLOSED
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        service.close()
