"""The plain pipe with the kernel redirect (NOPF_PIPE_COPY=sockmap) on loopback.

Each test builds two TCP connections on 127.0.0.1, pipes their inner ends
with ``Pipe(copy="sockmap")`` and drives the outer ends as the application and
the peer would. Needs root and a kernel with BPF sockmap; the fallback test
drops the capabilities in a child process.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from nopf_web.tunnel.pipe import Pipe, PipeResult
from nopf_web.tunnel.sockmap import Redirect, Unsupported
from tests.e2e.peers import Exchange

MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[2]


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """(outer, inner): a connected loopback pair; the pipe gets ``inner``."""
    with socket.create_server(("127.0.0.1", 0)) as lsock:
        outer = socket.create_connection(lsock.getsockname(), timeout=30)
        inner, _ = lsock.accept()
    return outer, inner


def require_sockmap() -> None:
    """Skip off root / without sockmap, except in CI, where that is a failure."""
    a_out, a_in = tcp_pair()
    b_out, b_in = tcp_pair()
    try:
        Redirect(a_in, b_in).close()
    except Unsupported as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"BPF sockmap unavailable in CI: {exc}")
        pytest.skip(f"BPF sockmap unavailable: {exc}")
    finally:
        for s in (a_out, a_in, b_out, b_in):
            s.close()


@pytest.fixture
def sockmap() -> None:
    require_sockmap()


async def run_pipe(pipe: Pipe, timeout: float = 60) -> PipeResult:
    async with asyncio.timeout(timeout):  # the whole exchange, not one read
        return await pipe.run()


async def start(pipe: Pipe, timeout: float = 60) -> asyncio.Task[PipeResult]:
    """Run the pipe in a task; on return its method is chosen and set up."""
    task = asyncio.create_task(run_pipe(pipe, timeout))
    await asyncio.sleep(0)  # run() sets the redirect up before its first await
    return task


@pytest.mark.usefixtures("sockmap")
async def test_64_mib_each_way_at_once_arrives_intact() -> None:
    app, a = tcp_pair()
    peer, b = tcp_pair()
    pipe = Pipe(a, b, copy="sockmap")
    ex_app, ex_peer = Exchange(app, 64 * MiB), Exchange(peer, 64 * MiB)
    result = await run_pipe(pipe)
    await asyncio.to_thread(ex_app.join, 30)
    await asyncio.to_thread(ex_peer.join, 30)
    assert pipe.copy == "sockmap", "the pipe fell back instead of redirecting"
    assert result.error is None, result.error
    assert ex_peer.received_bytes == ex_app.received_bytes == 64 * MiB
    assert ex_peer.received.hexdigest() == ex_app.sent.hexdigest()
    assert ex_app.received.hexdigest() == ex_peer.sent.hexdigest()
    assert (pipe.counters.a_to_b, pipe.counters.b_to_a) == (64 * MiB, 64 * MiB)


@pytest.mark.usefixtures("sockmap")
async def test_slow_reader_bounds_buffering_and_loses_nothing() -> None:
    """A stalled far reader must stall the sender (the kernel alone would queue without end)."""
    app, a = tcp_pair()
    peer, b = tcp_pair()
    pipe = Pipe(a, b, copy="sockmap")
    task = await start(pipe)
    sent = bytearray()

    def push_until_blocked() -> None:
        app.setblocking(False)
        quiet_since = time.monotonic()
        deadline = quiet_since + 20
        while time.monotonic() - quiet_since < 1.0 and time.monotonic() < deadline:
            chunk = os.urandom(256 * 1024)
            try:
                n = app.send(chunk)
            except BlockingIOError:
                time.sleep(0.01)
                continue
            sent.extend(chunk[:n])
            quiet_since = time.monotonic()
        app.setblocking(True)

    await asyncio.to_thread(push_until_blocked)
    # Socket buffers on four sockets plus HIGH in flight: tens of MiB at most.
    assert len(sent) < 96 * MiB, f"{len(sent) >> 20} MiB accepted while nobody read"
    app.shutdown(socket.SHUT_WR)

    def drain() -> bytes:
        got = bytearray()
        while data := peer.recv(MiB):
            got += data
        return bytes(got)

    received = await asyncio.to_thread(drain)
    peer.shutdown(socket.SHUT_WR)
    result = await task
    assert result.error is None, result.error
    assert pipe.copy == "sockmap"
    assert len(received) == len(sent) and received == bytes(sent)
    assert app.recv(1) == b""
    app.close()
    peer.close()


@pytest.mark.usefixtures("sockmap")
@pytest.mark.parametrize("first", ["app", "peer"])
async def test_half_close_either_way(first: str) -> None:
    """One side sends and half-closes; the other still answers after that EOF."""
    app, a = tcp_pair()
    peer, b = tcp_pair()
    pipe = Pipe(a, b, copy="sockmap")
    task = await start(pipe)
    closer, answerer = (app, peer) if first == "app" else (peer, app)

    def exchange() -> tuple[bytes, bytes]:
        closer.sendall(b"request" * 1000)
        closer.shutdown(socket.SHUT_WR)
        got = bytearray()
        while data := answerer.recv(65536):
            got += data
        answerer.sendall(b"answer after eof:" + str(len(got)).encode())
        answerer.shutdown(socket.SHUT_WR)
        back = bytearray()
        while data := closer.recv(65536):
            back += data
        return bytes(got), bytes(back)

    got, back = await asyncio.to_thread(exchange)
    result = await task
    assert result.error is None, result.error
    assert got == b"request" * 1000
    assert back == b"answer after eof:7000"
    assert pipe.copy == "sockmap"


@pytest.mark.usefixtures("sockmap")
@pytest.mark.parametrize("side", ["a", "b"])
async def test_reset_ends_the_pipe_with_the_failed_side(side: str) -> None:
    app, a = tcp_pair()
    peer, b = tcp_pair()
    pipe = Pipe(a, b, copy="sockmap")
    task = await start(pipe, timeout=20)
    app.sendall(b"hello")
    peer.settimeout(10)
    assert await asyncio.to_thread(peer.recv, 5) == b"hello"  # the redirect is up
    victim, survivor = (app, peer) if side == "a" else (peer, app)
    victim.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    victim.close()  # RST
    result = await task
    assert result.error is not None
    assert result.error_side == side
    survivor.settimeout(10)
    with pytest.raises(ConnectionResetError):
        while survivor.recv(1024):  # the pipe tears the other connection down too
            pass
        raise ConnectionResetError  # EOF is an acceptable end as well
    assert pipe.copy == "sockmap"
    survivor.close()


@pytest.mark.usefixtures("sockmap")
async def test_data_queued_before_the_redirect_is_delivered() -> None:
    """Bytes that arrived before the sockets joined the map are not stranded."""
    app, a = tcp_pair()
    peer, b = tcp_pair()
    app.sendall(b"early bytes")
    peer.sendall(b"early reply")
    await asyncio.sleep(0.1)  # the bytes are in the receive queues
    pipe = Pipe(a, b, copy="sockmap")
    task = await start(pipe)
    peer.settimeout(10)
    app.settimeout(10)
    assert await asyncio.to_thread(peer.recv, 100) == b"early bytes"
    assert await asyncio.to_thread(app.recv, 100) == b"early reply"
    app.shutdown(socket.SHUT_WR)
    peer.shutdown(socket.SHUT_WR)
    result = await task
    assert result.error is None and pipe.copy == "sockmap"


@pytest.mark.usefixtures("sockmap")
@pytest.mark.parametrize("closed", ["a", "b"])
async def test_a_side_already_at_eof(closed: str) -> None:
    """A socket that has its FIN cannot join a sockmap: the pipe splices instead."""
    app, a = tcp_pair()
    peer, b = tcp_pair()
    early = app if closed == "a" else peer
    early.sendall(b"last words")
    early.shutdown(socket.SHUT_WR)
    await asyncio.sleep(0.1)  # the FIN has arrived
    pipe = Pipe(a, b, copy="sockmap")
    task = await start(pipe)
    other = peer if closed == "a" else app

    def talk() -> tuple[bytes, bytes]:
        other.settimeout(10)
        early.settimeout(10)
        got = bytearray()
        while data := other.recv(100):
            got += data
        other.sendall(b"reply")
        other.shutdown(socket.SHUT_WR)
        back = bytearray()
        while data := early.recv(100):
            back += data
        return bytes(got), bytes(back)

    got, back = await asyncio.to_thread(talk)
    result = await task
    assert result.error is None, result.error
    assert (got, back) == (b"last words", b"reply")
    assert pipe.copy == "splice"


FALLBACK = textwrap.dedent("""
    import asyncio, socket
    from nopf_web.tunnel.pipe import Pipe
    from tests.e2e.test_sockmap_pipe import tcp_pair

    async def main() -> None:
        app, a = tcp_pair()
        peer, b = tcp_pair()
        pipe = Pipe(a, b, name="fb", copy="sockmap")
        task = asyncio.create_task(pipe.run())
        app.sendall(b"ping" * 10000)
        app.shutdown(socket.SHUT_WR)
        got = b""
        while data := await asyncio.to_thread(peer.recv, 65536):
            got += data
        peer.shutdown(socket.SHUT_WR)
        result = await asyncio.wait_for(task, 20)
        print(pipe.copy, len(got), got == b"ping" * 10000, result.error)

    asyncio.run(main())
""")


def test_without_bpf_privileges_the_pipe_falls_back_to_splice() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to drop capabilities from")
    proc = subprocess.run(
        ["setpriv", "--bounding-set", "-bpf,-sys_admin,-perfmon,-net_admin",
         sys.executable, "-c", FALLBACK],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["splice", "40000", "True", "None"], proc.stdout
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "kernel redirect unavailable" in lines[0], proc.stderr


def test_redirect_threads_do_not_outlive_the_pipe() -> None:
    """No leftover copier threads (they are per pipe, daemon, and must end with it)."""
    require_sockmap()

    async def one() -> None:
        app, a = tcp_pair()
        peer, b = tcp_pair()
        task = await start(Pipe(a, b, copy="sockmap"))
        for s in (app, peer):
            s.shutdown(socket.SHUT_WR)
        assert (await task).error is None
        app.close()
        peer.close()

    before = {t.ident for t in threading.enumerate()}
    asyncio.run(one())
    time.sleep(0.2)
    left = [t.name for t in threading.enumerate() if t.ident not in before and t.is_alive()]
    assert not [n for n in left if "sockmap" in n], left
