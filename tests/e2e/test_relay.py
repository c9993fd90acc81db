"""nopf-server's relay on loopback, with raw clients: two coordinated peers get relay
plans, present their tokens, and are joined; bytes pass both ways unread (SHA-256);
half-close and resets propagate; stolen tokens, foreign addresses and the limits are
refused, each with one log line; the rate limit holds; close() stops everything."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import socket
import struct
import subprocess
import threading
import time
from collections.abc import AsyncIterator

import pytest

from nopf_web.rendezvous.relay import RelayLink, RelayOutcome
from nopf_web.rendezvous.server import RendezvousServer, ServerLimits
from nopf_web.rendezvous.server_machine import RelayLimits
from nopf_web.wire.rendezvous import Hello, Relay, encode
from tests.e2e.relay_clients import (
    RELAYED,
    coordinate,
    expect_joined,
    random_bytes,
    receive_all,
    recv_exactly,
    refusal_of,
    relay_connect,
    send_and_close,
)
from tests.programs import argv, free_port, serving

# On uvloop too: the loop of nopf's commands on Linux (tests/conftest.py).
pytestmark = pytest.mark.uvloop_too

A_IP, B_IP = "127.0.0.1", "127.0.0.2"  # the sharer's and the joiner's "public" addresses


async def started(relay: RelayLimits | None = None, **limits: object) -> RendezvousServer:
    server = RendezvousServer("127.0.0.1", 0, ServerLimits(relay=relay or RelayLimits(),
                                                           **limits))  # type: ignore[arg-type]
    await server.start()
    return server


@contextlib.asynccontextmanager
async def running(relay: RelayLimits | None = None,
                  **limits: object) -> AsyncIterator[RendezvousServer]:
    """A started rendezvous (``started``), closed on exit."""
    server = await started(relay, **limits)
    try:
        yield server
    finally:
        await server.close()


async def joined(server: RendezvousServer, a_ip: str = A_IP, b_ip: str = B_IP,
                 ) -> tuple[socket.socket, socket.socket]:
    """A sharer's and a joiner's relay connections, joined."""
    fs, fj = await coordinate(server.address, a_ip, b_ip)
    assert fs.plan == () and fs.relay is not None and fj.relay is not None  # relay only
    assert fs.relay.relay == fj.relay.relay and fs.relay.relay.port == server.address[1]
    # The joiner's side first: it waits (nothing comes) until the sharer's arrives.
    b = await asyncio.to_thread(relay_connect, fj, b_ip, wait=False)
    a = await asyncio.to_thread(relay_connect, fs, a_ip)
    await asyncio.to_thread(expect_joined, b)
    return a, b


async def wait_for(predicate: object, what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def relay_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("relay-")]


async def test_two_peers_are_joined_and_their_bytes_pass_both_ways_unread() -> None:
    async with running() as server:
        a, b = await joined(server)
        # What the relay would parse if it parsed anything: frames, a relay message,
        # a hello, noise. It must all arrive as sent.
        bait = (encode(Relay(bytes(16))) + encode(Hello("share", None, (), None, 5))
                + RELAYED + b"\x00\x00\x00\x00" + b"GET / HTTP/1.1\r\n\r\n")
        to_b, to_a = bait + random_bytes(6 << 20), random_bytes(5 << 20) + bait
        results = await asyncio.gather(
            asyncio.to_thread(send_and_close, a, to_b), asyncio.to_thread(receive_all, b),
            asyncio.to_thread(send_and_close, b, to_a), asyncio.to_thread(receive_all, a))
        sent_ab, (got_b, size_b, _), sent_ba, (got_a, size_a, _) = results
        assert (got_b, size_b) == (sent_ab, len(to_b))
        assert (got_a, size_a) == (sent_ba, len(to_a))
        await wait_for(lambda: server.stats.relay_live == 0, "the session's end")
        assert server.stats.relayed == 1
        assert server.stats.relayed_bytes == len(to_a) + len(to_b)
        assert not relay_threads()
        a.close()
        b.close()


async def test_a_half_close_passes_through_and_the_other_way_keeps_going() -> None:
    async with running() as server:
        a, b = await joined(server)
        a.sendall(b"last words")
        a.shutdown(socket.SHUT_WR)
        got, size, _ = await asyncio.to_thread(receive_all, b)
        assert (got, size) == (hashlib.sha256(b"last words").hexdigest(), 10)
        # b's direction is still open: a keeps receiving until b closes.
        late = random_bytes(1 << 20)
        sent = await asyncio.to_thread(send_and_close, b, late)
        got, size, _ = await asyncio.to_thread(receive_all, a)
        assert (got, size) == (sent, len(late))
        await wait_for(lambda: server.stats.relay_live == 0, "the session's end")
        a.close()
        b.close()


async def test_a_reset_on_one_side_resets_the_other() -> None:
    async with running() as server:
        a, b = await joined(server)
        a.sendall(b"x" * 1000)
        assert await asyncio.to_thread(recv_exactly, b, 1000) == b"x" * 1000
        a.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        a.close()  # RST

        def sees_the_end() -> str:
            b.settimeout(5)
            try:
                while b.recv(4096):
                    pass
            except ConnectionResetError:
                return "reset"
            try:  # EOF first (the relay's shutdown), then the reset on the next send
                for _ in range(50):
                    b.send(b"y")
                    time.sleep(0.01)
            except (ConnectionResetError, BrokenPipeError):
                return "reset"
            return "open"

        assert await asyncio.to_thread(sees_the_end) == "reset"
        await wait_for(lambda: server.stats.relay_live == 0, "the session's end")
        b.close()


async def test_a_stolen_token_cannot_join_a_third_connection(
        caplog: pytest.LogCaptureFixture) -> None:
    async with running() as server:
        fs, fj = await coordinate(server.address, A_IP, B_IP)
        assert fs.relay is not None
        a, b = await asyncio.gather(asyncio.to_thread(relay_connect, fs, A_IP),
                                    asyncio.to_thread(relay_connect, fj, B_IP))
        # A third party that saw the sharer's token (from its own address, and from the
        # sharer's): refused, the session untouched.
        for source in ("127.0.0.3", A_IP):
            thief = await asyncio.to_thread(relay_connect, fs, source, wait=False)
            err = await asyncio.to_thread(refusal_of, thief)
            assert err.code == "relay_refused" and "already used" in err.message
            thief.close()
        a.sendall(b"still ours")
        assert await asyncio.to_thread(recv_exactly, b, 10) == b"still ours"
        assert server.stats.relay_refused == 2 and server.stats.relayed == 1
        lines = [r.message for r in caplog.records if "relay refused" in r.message]
        assert lines == [f"relay refused 127.0.0.3:{lines[0].rsplit(':', 2)[1]}: relay token "
                         "of the sharer already used"]  # one line (the second is counted)
        a.close()
        b.close()


async def test_a_token_from_another_address_is_refused(caplog: pytest.LogCaptureFixture,
                                                       ) -> None:
    async with running() as server:
        fs, fj = await coordinate(server.address, A_IP, B_IP)
        thief = await asyncio.to_thread(relay_connect, fj, "127.0.0.3", wait=False)
        err = await asyncio.to_thread(refusal_of, thief)
        assert err.code == "relay_refused"
        assert err.message == ("relay refused: relay token of the joiner presented from "
                               f"another address than {B_IP}")
        assert any("presented from another address" in r.message for r in caplog.records)
        thief.close()
        # The token is not burnt: its owner joins with it.
        a, b = await asyncio.gather(asyncio.to_thread(relay_connect, fs, A_IP),
                                    asyncio.to_thread(relay_connect, fj, B_IP))
        b.sendall(b"ok")
        assert await asyncio.to_thread(recv_exactly, a, 2) == b"ok"
        a.close()
        b.close()


async def test_the_rate_limit_holds() -> None:
    rate = 1_000_000  # --relay-rate 1M
    size = 3_000_000
    async with running(RelayLimits(rate=rate)) as server:
        a, b = await joined(server)
        sent, (got, n, seconds) = await asyncio.gather(
            asyncio.to_thread(send_and_close, a, random_bytes(size)),
            asyncio.to_thread(receive_all, b))
        assert (got, n) == (sent, size)
        # 3 s at 1 MB/s (the first quantum, 16 KiB, goes at once).
        assert 2.7 <= seconds <= 3.6, seconds
        a.close()
        b.close()


async def test_the_session_limits_refuse_with_one_log_line_each(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    async with running(RelayLimits(max_sessions=2, max_per_source=1)) as server:
        a1, b1 = await joined(server, "127.0.0.1", "127.0.0.2")
        # The sharer's IP already has a session: per-source refusal.
        fs, _ = await coordinate(server.address, "127.0.0.1", "127.0.0.4")
        refused = await asyncio.to_thread(relay_connect, fs, "127.0.0.1", wait=False)
        err = await asyncio.to_thread(refusal_of, refused)
        assert err.code == "busy" and "1 relay sessions open from 127.0.0.1" in err.message
        refused.close()
        a2, b2 = await joined(server, "127.0.0.5", "127.0.0.6")
        # Two sessions open: the limit.
        fs, _ = await coordinate(server.address, "127.0.0.7", "127.0.0.8")
        refused = await asyncio.to_thread(relay_connect, fs, "127.0.0.7", wait=False)
        err = await asyncio.to_thread(refusal_of, refused)
        assert err.code == "busy" and err.message == "relay refused: 2 relay sessions open"
        refused.close()
        lines = [r.message for r in caplog.records if "relay refused" in r.message]
        assert len(lines) == 2
        assert "1 relay sessions open from 127.0.0.1" in lines[0]
        assert lines[1].endswith(": 2 relay sessions open")
        for s in (a1, b1, a2, b2):
            s.close()


async def test_close_stops_live_sessions_and_joins_their_threads() -> None:
    server = await started()
    a, b = await joined(server)
    a.sendall(b"before")
    assert await asyncio.to_thread(recv_exactly, b, 6) == b"before"
    assert len(relay_threads()) == 2
    t0 = time.monotonic()
    await asyncio.wait_for(server.close(), 10)
    assert time.monotonic() - t0 < 2.0
    assert not relay_threads() and server.stats.relay_live == 0

    def ended(sock: socket.socket) -> bool:
        sock.settimeout(5)
        try:
            return sock.recv(100) == b""
        except ConnectionResetError:
            return True

    assert await asyncio.to_thread(ended, a) and await asyncio.to_thread(ended, b)
    a.close()
    b.close()


async def test_a_no_relay_server_plans_as_before_and_refuses_relay_messages() -> None:
    async with running(RelayLimits(enabled=False)) as server:
        fs, fj = await coordinate(server.address, A_IP, B_IP, symmetric=False)
        assert fs.relay is None and fj.relay is None
        assert [s.budget for s in fs.plan] == [10.0]
        sock = socket.create_connection(server.address, 5)
        sock.sendall(encode(Relay(bytes(16))))
        err = await asyncio.to_thread(refusal_of, sock)
        assert (err.code, err.message) == ("relay_refused",
                                           "relay refused: this rendezvous does not relay")
        sock.close()


# The program's flags ------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "needle"), [
    (["--relay-max-sessions", "0"], "--relay-max-sessions must be between 1 and 1,000,000, got 0"),
    (["--relay-max-per-source", "x"], "--relay-max-per-source 'x' is not a whole number"),
    (["--relay-rate", "fast"], "--relay-rate 'fast' is not a rate"),
    (["--relay-rate=-1M"], "--relay-rate '-1M' is not a rate"),
    (["--relay-rate", "200G"], "--relay-rate '200G' is over 100 GB/s"),
    (["--relay-rate", "12.5Q"], "--relay-rate '12.5Q' is not a rate"),
    (["--relay-address", "host:port"], "--relay-address"),
    (["--relay-address", "192.0.2.1:1", "--relay-address", "192.0.2.2:1"],
     "--relay-address: given twice for IPv4: one address per family"),
    (["--relay-address", "2001:db8::1:3012"], "--relay-address"),
    (["--no-relay", "--relay-rate", "1M"], "--relay-rate makes no sense with --no-relay"),
])
def test_bad_relay_flags_are_one_line(args: list[str], needle: str) -> None:
    proc = subprocess.run(argv("nopf-server", *args), capture_output=True, text=True,
                          timeout=20)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and needle in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_program_takes_a_relay_address_per_family_and_says_so() -> None:
    port = free_port()
    with serving("nopf-server", "--host", "127.0.0.1", "--port", str(port),
                 "--relay-address", "[2001:db8::80]:443",
                 "--relay-address", "192.0.2.80:443") as stderr:
        assert "listening on" in stderr.readline()
        assert stderr.readline().endswith(", at [2001:db8::80]:443 and 192.0.2.80:443\n")


def test_the_program_relays_at_its_rate_and_says_so() -> None:
    port = free_port()
    with serving("nopf-server", "--host", "127.0.0.1", "--port", str(port),
                 "--relay-rate", "2M", "--relay-max-sessions", "8") as stderr:
        assert "listening on" in stderr.readline()
        assert (stderr.readline()
                == "nopf-server: relay on: up to 8 sessions, 4 per address, 2 MB/s each\n")

        async def run() -> float:
            fs, fj = await coordinate(("127.0.0.1", port), A_IP, B_IP)
            a, b = await asyncio.gather(asyncio.to_thread(relay_connect, fs, A_IP),
                                        asyncio.to_thread(relay_connect, fj, B_IP))
            sent, (got, _, seconds) = await asyncio.gather(
                asyncio.to_thread(send_and_close, a, random_bytes(2_000_000)),
                asyncio.to_thread(receive_all, b))
            assert got == sent
            a.close()
            b.close()
            return seconds

        seconds = asyncio.run(run())
        assert 0.8 <= seconds <= 1.3, seconds


# The copier itself ---------------------------------------------------------------------------


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname(), 5)
        server, _ = listener.accept()
    return client, server


@pytest.mark.parametrize("copy", ["splice", "buffer"])
def test_a_relay_link_copies_exactly_with_either_method(copy: str) -> None:
    peer_a, relay_a = tcp_pair()
    peer_b, relay_b = tcp_pair()
    ended = threading.Event()
    outcomes: list[RelayOutcome] = []

    def on_end(outcome: RelayOutcome) -> None:
        outcomes.append(outcome)
        ended.set()

    link = RelayLink(relay_a, relay_b, greeting=b"hi", rate=4e6, copy=copy, on_end=on_end)
    link.start()
    assert recv_exactly(peer_a, 2) == recv_exactly(peer_b, 2) == b"hi"
    to_b, to_a = random_bytes(2_000_000), random_bytes(1_000_000)
    out: dict[str, object] = {}
    movers = [threading.Thread(target=lambda: out.update(ab=send_and_close(peer_a, to_b))),
              threading.Thread(target=lambda: out.update(b=receive_all(peer_b))),
              threading.Thread(target=lambda: out.update(ba=send_and_close(peer_b, to_a))),
              threading.Thread(target=lambda: out.update(a=receive_all(peer_a)))]
    t0 = time.monotonic()
    for t in movers:
        t.start()
    for t in movers:
        t.join(30)
    took = time.monotonic() - t0
    assert out["b"][:2] == (out["ab"], len(to_b))  # type: ignore[index]
    assert out["a"][:2] == (out["ba"], len(to_a))  # type: ignore[index]
    # 3 MB at 4 MB/s for both directions together.
    assert 0.65 <= took <= 1.1, took
    assert ended.wait(5) and link.join(5)
    (outcome,) = outcomes
    assert (outcome.a_to_b, outcome.b_to_a, outcome.error) == (len(to_b), len(to_a), None)
    assert link.copy == copy
    peer_a.close()
    peer_b.close()
