"""The engines' Windows/macOS code paths, run here over real loopback sockets with the
Unix-only features taken away (see platform_support): forward's gathered write
without sendmsg, the seed engine's EOF watch without MSG_DONTWAIT, a whole seed
session (punch without IP_MINTTL and its notice, the pipe's buffer loop without
splice), the rendezvous measuring RTT with a ping without TCP_INFO, and the pipe
and relay copy loops without splice.

On Windows itself these would be the real loopback punch and sessions, which we
have never run: they are skipped there rather than guessed at, and the tests that
punch (a session, a pairing) run on Linux only: elsewhere they would test that
system's TCP stack, which we have not seen."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import sys
import threading
from collections.abc import Callable

import pytest

from nopf_web import sockets
from nopf_web.rendezvous.relay import RelayLink, RelayOutcome
from nopf_web.rendezvous.server import RendezvousServer
from nopf_web.rendezvous.server_machine import (
    Accepted,
    Action as ServerAction,
    Event as ServerEvent,
    Received,
    Send,
)
from nopf_web.sessions import coordination as coord
from nopf_web.sessions.engine import Event
from nopf_web.sessions.seed import SeedEngine, _wait_eof
from nopf_web.tunnel import forward
from nopf_web.tunnel.pipe import Pipe, copy_method
from nopf_web.wire.address import Endpoint
from nopf_web.wire.rendezvous import Ping, encode
from tests.e2e.mux_streams import forwarded, hash_client, hash_service
from tests.e2e.seed_sessions import app_round_trip, introduce, seed_pair
from tests.loopback import tcp_pair
from tests.unit.platform_support import FEATURES, take_away

# A real loopback punch: what it checks on Linux is nopf's code; on macOS it would be
# macOS' stack (simultaneous open, port sharing with a listener), never run by us.
PUNCHES = "a real loopback punch, run by us on Linux only"

pytestmark = pytest.mark.skipif(
    sys.platform == "win32",
    reason="emulates Windows' socket module on Linux/macOS; on Windows this would be the "
    "real loopback punch, never run by us")

LO = "127.0.0.1"


# -- forward: gathered writes --------------------------------------------------------------


async def test_forwarded_streams_without_sendmsg_send_joined_buffers(
        monkeypatch: pytest.MonkeyPatch) -> None:
    take_away(monkeypatch, "sendmsg")
    had_sendmsg: list[bool] = []
    real = sockets.send_gathered

    def spy(sock: socket.socket, parts: list[bytes | memoryview]) -> int:
        had_sendmsg.append(hasattr(sock, "sendmsg"))
        return real(sock, parts)

    monkeypatch.setattr(forward, "send_gathered", spy)
    async with asyncio.timeout(30), forwarded(hash_service) as (addr, _ma, _mb):
        await asyncio.gather(*(hash_client(addr, seed) for seed in range(8)))
    assert had_sendmsg, "no gathered write happened: the path was not exercised"
    assert not any(had_sendmsg)


# -- the seed engine's EOF watch ---------------------------------------------------------


async def test_eof_watch_without_msg_dontwait(monkeypatch: pytest.MonkeyPatch) -> None:
    take_away(monkeypatch, "MSG_DONTWAIT")
    a, b = tcp_pair()
    c, d = tcp_pair()
    with a, b, c, d:
        for s in (a, c):
            s.setblocking(False)
        # The peer closes: the watch returns.
        watch = asyncio.create_task(_wait_eof(a), name="test-eof")
        await asyncio.sleep(0.05)
        assert not watch.done()
        b.close()
        async with asyncio.timeout(5):
            await watch
        # The peer's service speaks first: no end, and its bytes stay unread.
        watch = asyncio.create_task(_wait_eof(c), name="test-banner")
        d.sendall(b"SSH-2.0-banner\r\n")
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await asyncio.shield(watch)
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)
        c.setblocking(True)
        assert c.recv(100) == b"SSH-2.0-banner\r\n"


# -- a whole seed session ----------------------------------------------------------------


async def seed_session(rdv: Endpoint) -> tuple[SeedEngine, SeedEngine, list[Event]]:
    """A server and a client session over loopback, 100 kB through the pipe."""
    service, server, client = seed_pair(rdv)
    events: list[Event] = []
    server.subscribe(events.append)
    tasks = [asyncio.create_task(s.run(), name=f"test-{s.spec.role}") for s in (server, client)]
    try:
        await introduce(server, client)
        await app_round_trip(client.spec.local_port, service)
        async with asyncio.timeout(10):
            await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        service.close()
    return server, client, events


@pytest.mark.linux_only(PUNCHES)
async def test_a_seed_session_without_the_unix_only_features(
        monkeypatch: pytest.MonkeyPatch) -> None:
    rdv_server = RendezvousServer(LO, 0)
    await rdv_server.start()
    try:
        take_away(monkeypatch, *(f for f in FEATURES if f != "SO_REUSEPORT"))
        assert copy_method() == "buffer"
        server, client, events = await seed_session(Endpoint(*rdv_server.address))
    finally:
        await rdv_server.close()
    assert client.bytes_out == server.bytes_in == 100_000
    notices = [e.message for e in events if e.kind == "log" and "IP_MINTTL" in e.message]
    # The server arms with TTL 2 (the default): told once, not per attempt.
    assert notices == [sockets.SYN_ERRORS_NOTICE]
    assert server._pipe is not None and server._pipe.copy == "buffer"


@pytest.mark.linux_only("Linux has IP_MINTTL: the control case of the test above")
async def test_with_ip_minttl_there_is_no_notice() -> None:
    rdv_server = RendezvousServer(LO, 0)
    await rdv_server.start()
    try:
        _server, _client, events = await seed_session(Endpoint(*rdv_server.address))
    finally:
        await rdv_server.close()
    assert not [e for e in events if e.kind == "log" and "IP_MINTTL" in e.message]


# -- the rendezvous' RTT -----------------------------------------------------------------


async def paired_with_pings(monkeypatch: pytest.MonkeyPatch) -> tuple[list[float | None], int]:
    """Pair share/connect on loopback: the kernel RTTs the server saw, and how many
    connections it pinged (the waiting sharer always is: liveness and RTT)."""
    server = RendezvousServer(LO, 0)
    await server.start()
    rtts: list[float | None] = []
    pinged: set[int] = set()
    feed, act = server._feed, server._act

    def spy_feed(event: ServerEvent) -> None:
        if isinstance(event, Accepted | Received):
            rtts.append(event.kernel_rtt)
        feed(event)

    def spy_act(action: ServerAction) -> None:
        if isinstance(action, Send) and action.data == encode(Ping(1)):
            pinged.add(action.conn)
        act(action)

    monkeypatch.setattr(server, "_feed", spy_feed)
    monkeypatch.setattr(server, "_act", spy_act)
    try:
        codes: asyncio.Queue[str] = asyncio.Queue()
        sharing = asyncio.create_task(coord.share(server.address, on_code=codes.put_nowait,
                                                  bind_host=LO, punch_timeout=5),
                                      name="test-share")
        code = await asyncio.wait_for(codes.get(), 5)
        b = await coord.connect(server.address, code, bind_host=LO, punch_timeout=5)
        a = await sharing
        a.sock.close()
        b.sock.close()
        assert server.stats.paired == 1
    finally:
        await server.close()
    return rtts, len(pinged)


@pytest.mark.linux_only(PUNCHES)
async def test_without_tcp_info_the_rendezvous_measures_with_a_ping(
        monkeypatch: pytest.MonkeyPatch) -> None:
    take_away(monkeypatch, "TCP_INFO")  # and macOS' TCP_CONNECTION_INFO: no facts at all
    rtts, pinged = await paired_with_pings(monkeypatch)
    assert rtts and all(rtt is None for rtt in rtts)
    assert pinged == 2  # the sharer, and the joiner for the RTT the kernel did not give


@pytest.mark.linux_only("TCP_INFO's RTT: the control case of the test above")
async def test_with_tcp_info_no_ping_is_needed(monkeypatch: pytest.MonkeyPatch) -> None:
    rtts, pinged = await paired_with_pings(monkeypatch)
    assert any(rtt is not None for rtt in rtts)
    assert pinged == 1  # the sharer only: the joiner's RTT came from TCP_INFO


# -- copy loops without splice -----------------------------------------------------------


async def test_the_pipe_copies_with_its_buffer_loop_without_splice(
        monkeypatch: pytest.MonkeyPatch) -> None:
    take_away(monkeypatch, "splice")
    assert copy_method() == "buffer"
    app, a = tcp_pair()
    b, peer = tcp_pair()
    pipe = Pipe(a, b, copy="splice")  # asked for, but there is none
    assert not pipe._use_splice
    data = os.urandom(3 << 20)

    def far_end() -> bytes:
        got = bytearray()
        while chunk := peer.recv(1 << 16):
            got += chunk
        peer.sendall(hashlib.sha256(got).digest())
        peer.shutdown(socket.SHUT_WR)
        return bytes(got)

    result: list[bytes] = []
    thread = threading.Thread(target=lambda: result.append(far_end()), name="test-far-end")
    thread.start()
    running = asyncio.create_task(pipe.run(), name="test-pipe")
    await asyncio.to_thread(app.sendall, data)
    app.shutdown(socket.SHUT_WR)  # the half-close travels through the buffer loop
    reply = await asyncio.to_thread(app.recv, 100)
    async with asyncio.timeout(10):
        outcome = await running
    thread.join(5)
    app.close()
    peer.close()
    assert outcome.error is None
    assert result == [data] and reply == hashlib.sha256(data).digest()
    assert pipe.counters.a_to_b == len(data) and pipe.counters.b_to_a == 32


def test_the_relay_copies_with_its_buffer_loop_without_splice(
        monkeypatch: pytest.MonkeyPatch) -> None:
    take_away(monkeypatch, "splice")
    left, a = tcp_pair()
    b, right = tcp_pair()
    ended: list[RelayOutcome] = []
    done = threading.Event()

    def on_end(outcome: RelayOutcome) -> None:
        ended.append(outcome)
        done.set()

    relay = RelayLink(a, b, greeting=b"hi", name="test-relay", on_end=on_end, copy="splice")
    assert not relay._use_splice
    relay.start()
    with left, right:
        assert right.recv(2) == b"hi" and left.recv(2) == b"hi"
        send: Callable[[], None] = lambda: left.sendall(b"y" * 500_000)  # noqa: E731
        sender = threading.Thread(target=send, name="test-send")
        sender.start()
        got = 0
        while got < 500_000:
            got += len(right.recv(1 << 16))
        sender.join(5)
        left.shutdown(socket.SHUT_WR)
        right.shutdown(socket.SHUT_WR)
        assert right.recv(10) == b"" and left.recv(10) == b""
    assert done.wait(5) and relay.join(5)
    assert ended[0].error is None and ended[0].a_to_b == 500_000
