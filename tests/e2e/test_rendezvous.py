"""nopf-server against well-behaved and hostile clients, on loopback."""

from __future__ import annotations

import asyncio
import resource
import socket
import subprocess
import sys
from collections.abc import Callable

import pytest

from nopf_web.rendezvous.client import discover
from nopf_web.rendezvous.server import RendezvousServer, ServerLimits
from nopf_web.wire.discovery import decode_reply
from nopf_web.wire.rendezvous import FrameReader, Hello, encode
from tests.loopback import read_until_close
from tests.programs import argv, free_port, serving

# On uvloop too: the loop of nopf's commands on Linux (tests/conftest.py).
pytestmark = pytest.mark.uvloop_too


async def test_reply_is_exactly_the_seed_format() -> None:
    server = RendezvousServer("127.0.0.1", 0)
    await server.start()
    try:
        data, port = await read_until_close(server.address)
        assert len(data) == 10 and data.endswith(b"END\x00")
        assert decode_reply(data) == ("127.0.0.1", port)
        found = await discover(server.address, 0, bind_host="127.0.0.1", timeout=2)
        assert str(found.public) == f"127.0.0.1:{found.local_port}"
    finally:
        await server.close()


async def test_survives_garbage_idle_and_half_open_clients() -> None:
    server = RendezvousServer("127.0.0.1", 0, ServerLimits(write_timeout=1.0))
    await server.start()
    loop = asyncio.get_running_loop()
    hostile: list[socket.socket] = []
    try:
        for i in range(30):
            s = socket.socket()
            s.setblocking(False)
            await loop.sock_connect(s, server.address)
            if i % 3 == 0:
                await loop.sock_sendall(s, b"\xff" * 4096 + b"GET / HTTP/1.1\r\n\r\n")
            elif i % 3 == 1:
                s.shutdown(socket.SHUT_WR)  # half-open: we never read
            hostile.append(s)  # the rest: idle, never read
        data, port = await read_until_close(server.address)
        assert decode_reply(data) == ("127.0.0.1", port)
        await asyncio.sleep(0.2)
        assert server.stats.open_now == 0  # nothing stays pinned by hostile clients
    finally:
        for s in hostile:
            s.close()
        await server.close()


async def test_flood_from_one_address_does_not_starve_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    limits = ServerLimits(max_per_source=4, write_timeout=3.0)
    server = RendezvousServer("127.0.0.1", 0, limits)
    await server.start()
    loop = asyncio.get_running_loop()
    try:
        socks = []
        for _ in range(200):
            s = socket.socket()
            s.setblocking(False)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        # 200 connects at once: the server accepts them in batches, so far more
        # than 4 from 127.0.0.1 are open together and the cap must bite.
        await asyncio.gather(*(loop.sock_connect(s, server.address) for s in socks))
        await asyncio.sleep(0.5)
        assert server.stats.served + server.stats.refused_flood == 200
        assert server.stats.refused_flood > 0
        assert sum("over 4 open connections from one address" in r.message
                   for r in caplog.records) == 1  # one line, repeats counted not logged
        data, port = await read_until_close(server.address, source="127.0.0.2")
        assert decode_reply(data) == ("127.0.0.2", port)
        for s in socks:
            s.close()
    finally:
        await server.close()


def test_server_program_bad_port_is_one_line() -> None:
    proc = subprocess.run(argv("nopf-server", "--port", "99999"), capture_output=True,
                          text=True, timeout=20)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "99999" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_server_program_port_in_use_is_one_line() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = subprocess.run(argv("nopf-server", "--host", "127.0.0.1", "--port", str(port)),
                              capture_output=True, text=True, timeout=20)
    assert proc.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_server_program_serves_and_stops_on_sigterm() -> None:
    port = free_port()
    with serving("nopf-server", "--host", "127.0.0.1", "--port", str(port)) as stderr:
        assert "listening on" in stderr.readline()
        data, local = asyncio.run(read_until_close(("127.0.0.1", port)))
        assert decode_reply(data) == ("127.0.0.1", local)


@pytest.mark.parametrize(("flag", "value", "needle"), [
    ("--max-connections", "0", "--max-connections must be between 1 and 1,000,000, got 0"),
    ("--max-connections", "many", "--max-connections 'many' is not a whole number"),
    ("--max-per-source", "-3", "--max-per-source must be between 1 and 1,000,000, got -3"),
])
def test_server_program_bad_limits_are_one_line(flag: str, value: str, needle: str) -> None:
    proc = subprocess.run(argv("nopf-server", flag, value), capture_output=True, text=True,
                          timeout=20)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and needle in proc.stderr


def _open_files_limit(soft: int, hard: int) -> Callable[[], None]:
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_server_program_fits_max_connections_to_the_open_files_limit() -> None:
    # Soft 100 is lifted to the hard 300, which still leaves room for only 236
    # clients (64 spare descriptors): the server says so and refuses the rest.
    port = free_port()
    with serving("nopf-server", "--host", "127.0.0.1", "--port", str(port),
                 "--max-connections", "5000", preexec_fn=_open_files_limit(100, 300)) as stderr:
        lines = [stderr.readline(), stderr.readline()]
        assert any("the open-files limit allows only 236 connections (asked for 5,000); "
                   "raise it with ulimit -n" in line for line in lines), lines
        data, local = asyncio.run(read_until_close(("127.0.0.1", port)))
        assert decode_reply(data) == ("127.0.0.1", local)


def test_programs_lift_the_soft_open_files_limit() -> None:
    code = ("import resource; from nopf_web.cli.common import raise_open_files_limit; "
            "print(raise_open_files_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=20, preexec_fn=_open_files_limit(256, 4096))
    assert proc.stdout.split() == ["4096", "4096"], proc.stderr


async def test_close_ends_every_connection_within_its_bound() -> None:
    # A waiting sharer is reset at once; a seed client the hello deadline would
    # keep for 30 s gets write_timeout + 1 s, then a reset.
    limits = ServerLimits(write_timeout=0.5, hello_timeout=30.0)
    server = RendezvousServer("127.0.0.1", 0, limits)
    await server.start()
    loop = asyncio.get_running_loop()
    sharer_r, sharer_w = await asyncio.open_connection(*server.address)
    sharer_w.write(encode(Hello("share", None, (), None, 5)))
    await sharer_r.readexactly(10)
    frames = FrameReader()
    async with asyncio.timeout(5):
        while not frames.feed(await sharer_r.read(4096)):
            pass
    idle = socket.socket()
    idle.setblocking(False)
    await loop.sock_connect(idle, server.address)
    assert len(await asyncio.wait_for(loop.sock_recv(idle, 100), 5)) == 10
    assert server.stats.open_now == 2
    t0 = loop.time()
    await asyncio.wait_for(server.close(), 5)
    assert 0.5 <= loop.time() - t0 < 2.5
    assert server.stats.open_now == 0
    with pytest.raises(ConnectionResetError):
        async with asyncio.timeout(5):
            while await sharer_r.read(4096):
                pass
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(loop.sock_recv(idle, 100), 5)
    idle.close()
    sharer_w.close()
