"""Seed engines on loopback: events, stop from any state, a full punch and pipe."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from nopf_web.sessions.engine import Event, State
from nopf_web.wire.address import Endpoint

from .seed_sessions import app_round_trip, introduce, seed_pair, wait_state

# On uvloop too: the loop of nopf's commands on Linux (tests/conftest.py).
pytestmark = pytest.mark.uvloop_too


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


async def test_the_local_side_may_be_another_address(rendezvous: Endpoint) -> None:
    # The service listens on [::1] only, and so does the client: a session that kept
    # to 127.0.0.1 would reach neither.
    service, server, client = seed_pair(rendezvous, local_host="::1")
    events: list[Event] = []
    server.subscribe(events.append)
    tasks = [asyncio.create_task(s.run(), name=f"test-{s.spec.role}") for s in (server, client)]
    await introduce(server, client)
    await app_round_trip(client.spec.local_port, service, host="::1")
    await asyncio.gather(*tasks)
    assert server.bytes_in == 100_000 and server.bytes_out == 3
    (started,) = [e.message for e in events if e.kind == "pipe_started"]
    assert started.startswith(f"Started pipe between [::1]:{server.spec.local_port} - ")
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
