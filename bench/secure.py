"""Secure multiplexed tunnel benchmark on loopback: encrypted streams vs direct TCP.

Four processes, as in real use: a service (sink / echo), the sharer's tunnel
end (``serve_share``), the connector's tunnel end (``serve_connect`` on a local
listener), and this process as the application. The two tunnel ends run the
SPAKE2 handshake over one loopback TCP connection and carry every stream
over it, encrypted. Measured in the same run:

- throughput of one stream (or ``--parallel`` streams at once) through the
  tunnel vs as many direct TCP connections to the same sink (median of
  ``--rounds`` alternating runs; target >= 40 %);
- ``--streams`` concurrent streams (default 1,000), each echoing
  ``--stream-kb`` of random data and checked byte for byte;
- round trip of 32-byte request/response on a quiet tunnel vs direct, in
  alternating batches (target: added p50 < 1 ms).

    .venv/bin/python -m bench.secure [--size-mb 512] [--rounds 5] [--pings 4000]
        [--streams 1000] [--stream-kb 64] [--profile share|connect] [--json out.json]
        [--channel resumable|secure] [--parallel 1] [--loop product|asyncio]

The round trips also give each tunnel end's CPU time per round trip (user and
system, in microseconds; from ``/proc``, so Linux only): the cost of one small
message each way, steadier than the round trip's time on a busy machine.

``--loop``: the event loop of the tunnel ends, by default the one the product
runs on (``event_loop_factory``: uvloop on Linux), or asyncio's own.

``--channel``: the tunnel runs over a ``ResumableChannel`` (numbered records,
acks, a replay buffer: what coordinated sessions use) or, to compare, straight
over the ``SecureChannel`` of its one connection.

``--profile`` runs that tunnel end under cProfile and prints its hottest calls.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import multiprocessing as mp
import os
import pstats
import signal
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from bench.measure import round_trips, send_counted, serve_conn
from bench.report import write_json
from nopf_web.cli.common import event_loop_factory
from nopf_web.roles import PeerRole
from nopf_web.tunnel.forward import serve_connect, serve_share
from nopf_web.tunnel.mux import Channel, Mux
from nopf_web.tunnel.resumable import ResumableChannel
from nopf_web.tunnel.secure import open_channel
from nopf_web.wire.frames import INITIAL_WINDOW

CODE = "7-orbit-lantern"
STALL_TIMEOUT = 60.0  # seconds one send of a transfer (or the final count) may take


# -- the service: sink (counts to EOF, answers the count) or echo ------------


def service(lsock: socket.socket) -> None:
    while True:
        conn, _ = lsock.accept()
        threading.Thread(target=serve_conn, args=(conn,), daemon=True).start()


def service_proc(port_out: Connection) -> None:
    lsock = socket.create_server(("127.0.0.1", 0), backlog=2048)
    port_out.send(lsock.getsockname()[1])
    service(lsock)


# -- the two tunnel ends ------------------------------------------------------


def _profiled(enabled: bool, fn: object) -> None:
    assert callable(fn)
    if not enabled:
        fn()
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # end via finally: print stats
    prof = cProfile.Profile()
    try:
        prof.runcall(fn)
    finally:
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(22)
        print(out.getvalue(), file=sys.stderr, flush=True)


async def tunnel_channel(sock: socket.socket, role: PeerRole, kind: str) -> Channel:
    """The channel the mux runs over: resumable (with its first path) or plain."""
    if kind == "secure":
        return await open_channel(sock, role=role, code=CODE)
    channel = ResumableChannel(role, code=CODE)
    await channel.add_path(sock, "lan", first=True)
    return channel


def _run(coro_fn: Callable[[], Coroutine[Any, Any, None]], loop: str) -> None:
    factory = event_loop_factory() if loop == "product" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(coro_fn())


def share_proc(service_port: int, ready: Connection, profile: bool, window: int,
               kind: str, loop: str = "product") -> None:
    async def run() -> None:
        lsock = socket.create_server(("127.0.0.1", 0))
        ready.send(lsock.getsockname()[1])
        loop = asyncio.get_running_loop()
        lsock.setblocking(False)
        tunnel, _ = await loop.sock_accept(lsock)
        lsock.close()
        channel = await tunnel_channel(tunnel, "server", kind)
        async with Mux(channel, role="server", name="share", window=window) as mux:
            await serve_share(mux, ("127.0.0.1", service_port))

    _profiled(profile, lambda: _run(run, loop))


def connect_proc(tunnel_port: int, ready: Connection, profile: bool, window: int,
                 kind: str, loop: str = "product") -> None:
    async def run() -> None:
        listener = socket.create_server(("127.0.0.1", 0), backlog=2048)
        tunnel = socket.create_connection(("127.0.0.1", tunnel_port))
        channel = await tunnel_channel(tunnel, "client", kind)
        ready.send(listener.getsockname()[1])
        async with Mux(channel, role="client", name="connect", window=window) as mux:
            await serve_connect(mux, listener)

    _profiled(profile, lambda: _run(run, loop))


# -- measurements (this process is the application) ---------------------------


def _counted(port: int, size: int) -> float:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=STALL_TIMEOUT) as sock:
            return send_counted(sock, size)
    except TimeoutError:
        raise SystemExit(f"bench: a 1 MB send or the service's count took over "
                         f"{STALL_TIMEOUT:g} s (port {port})") from None


def throughput(port: int, size: int, parallel: int = 1) -> float:
    """Send ``size`` bytes to the sink via ``port`` over ``parallel`` concurrent
    connections (an equal share each), wait for every count; MB/s of them all."""
    if parallel == 1:
        return _counted(port, size)
    errors: list[BaseException] = []

    def one() -> None:
        try:
            _counted(port, size // parallel)
        except BaseException as exc:  # reported by the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(parallel)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return size // parallel * parallel / (time.perf_counter() - t0) / 1e6


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of a process so far (Linux ``/proc``; 0 elsewhere)."""
    return sum(cpu_split(pid))


def cpu_split(pid: int | None) -> tuple[float, float]:
    """(user, system) CPU time of a process so far (Linux ``/proc``; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def echo_conn(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(b"E")
    return sock


async def many_streams(port: int, count: int, size: int) -> tuple[int, float]:
    """``count`` concurrent echo streams of ``size`` random bytes; (failures, seconds)."""

    async def one(i: int) -> bool:
        data = os.urandom(size)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"E" + data)
        writer.write_eof()
        got = bytearray()
        while chunk := await reader.read(1 << 20):
            got += chunk
        writer.close()
        return bytes(got) == data

    t0 = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(count)), return_exceptions=True)
    elapsed = time.perf_counter() - t0
    failures = [r for r in results if r is not True]
    for r in failures[:3]:
        print(f"stream failure: {r!r}", file=sys.stderr)
    return len(failures), elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--pings", type=int, default=4000)
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--stream-kb", type=int, default=64)
    ap.add_argument("--parallel", type=int, default=1,
                    help="bulk connections at once in each round (the size is shared out)")
    ap.add_argument("--profile", choices=["share", "connect"])
    ap.add_argument("--window-kb", type=int, default=INITIAL_WINDOW // 1024,
                    help="per-stream receive window of both tunnel ends")
    ap.add_argument("--channel", choices=["resumable", "secure"], default="resumable",
                    help="the channel under the mux (default: resumable, as sessions use)")
    ap.add_argument("--loop", choices=["product", "asyncio"], default="product",
                    help="the tunnel ends' event loop (product: uvloop on Linux)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.parallel < 1:
        ap.error("--parallel must be at least 1")
    size = args.size_mb * 1_000_000
    window = args.window_kb * 1024
    ctx = mp.get_context("spawn")
    procs: list[mp.process.BaseProcess] = []
    try:
        rx, tx = ctx.Pipe(duplex=False)
        procs.append(ctx.Process(target=service_proc, args=(tx,), daemon=True))
        procs[-1].start()
        service_port = rx.recv()
        procs.append(ctx.Process(target=share_proc, daemon=True,
                                 args=(service_port, tx, args.profile == "share", window,
                                       args.channel, args.loop)))
        procs[-1].start()
        tunnel_port = rx.recv()
        procs.append(ctx.Process(target=connect_proc, daemon=True,
                                 args=(tunnel_port, tx, args.profile == "connect", window,
                                       args.channel, args.loop)))
        procs[-1].start()
        listen_port = rx.recv()
        ports = {"direct": service_port, "tunnel": listen_port}

        rows: dict[str, list[float]] = {"direct": [], "tunnel": []}
        # CPU time of each tunnel end per GB carried: unlike MB/s, it hardly
        # depends on what else the machine is running.
        ends = {"share": procs[1].pid, "connect": procs[2].pid}
        cpu = dict.fromkeys(ends, 0.0)
        user = dict.fromkeys(ends, 0.0)  # of which in user space (the interpreter's share)
        for r in range(args.rounds):
            for name, port in ports.items():
                print(f"round {r + 1}/{args.rounds}: {name}", file=sys.stderr, flush=True)
                before = {end: cpu_split(pid) for end, pid in ends.items()}
                rows[name].append(throughput(port, size, args.parallel))
                if name == "tunnel":
                    for end, pid in ends.items():
                        after = cpu_split(pid)
                        cpu[end] += sum(after) - sum(before[end])
                        user[end] += after[0] - before[end][0]

        print(f"{args.streams} concurrent streams", file=sys.stderr, flush=True)
        failures, streams_s = asyncio.run(
            many_streams(listen_port, args.streams, args.stream_kb * 1024))

        socks = {name: echo_conn(port) for name, port in ports.items()}
        lat: dict[str, list[float]] = {"direct": [], "tunnel": []}
        batch = max(1, args.pings // 20)
        # The tunnel ends idle through the direct batches: their CPU time over
        # the whole phase is the tunnel's round trips'.
        before_rt = {end: cpu_split(pid) for end, pid in ends.items()}
        for _ in range(20):
            for name, sock in socks.items():
                lat[name] += round_trips(sock, batch)
        after_rt = {end: cpu_split(pid) for end, pid in ends.items()}
        rt_us = {end: [(after_rt[end][k] - before_rt[end][k]) / len(lat["tunnel"]) * 1e6
                       for k in (0, 1)] for end in ends}
        for sock in socks.values():
            sock.close()
    finally:
        for p in reversed(procs):
            p.terminate()  # SIGTERM: the profiled end prints its statistics
        for p in procs:
            p.join(5)

    d, t = statistics.median(rows["direct"]), statistics.median(rows["tunnel"])
    p50 = {k: statistics.median(v) for k, v in lat.items()}
    p99 = {k: statistics.quantiles(v, n=100)[98] for k, v in lat.items()}
    cpu_per_gb = {end: seconds / (size * args.rounds / 1e9) for end, seconds in cpu.items()}
    user_per_gb = {end: seconds / (size * args.rounds / 1e9) for end, seconds in user.items()}
    result = {
        "size_mb": args.size_mb, "rounds": args.rounds, "parallel": args.parallel,
        "cpus": os.cpu_count(),
        "window_kb": args.window_kb, "channel": args.channel,
        "throughput_mb_s": rows, "median_mb_s": {"direct": d, "tunnel": t},
        "throughput_ratio": t / d, "tunnel_cpu_s_per_gb": cpu_per_gb,
        "tunnel_user_cpu_s_per_gb": user_per_gb,
        "streams": args.streams, "stream_kb": args.stream_kb,
        "stream_failures": failures, "streams_seconds": streams_s,
        "rtt_ms_p50": p50, "rtt_ms_p99": p99,
        "added_rtt_ms_p50": p50["tunnel"] - p50["direct"],
        "loop": args.loop,
        "round_trip_cpu_us": rt_us,  # each end: [user, system] per tunnel round trip
    }
    print(f"| path | throughput (median MB/s) | ratio | RTT p50 ms | RTT p99 ms |\n"
          f"|---|---|---|---|---|\n"
          f"| direct TCP | {d:.0f} | 1.00 | {p50['direct']:.3f} | {p99['direct']:.3f} |\n"
          f"| secure tunnel | {t:.0f} | {t / d:.2f} | {p50['tunnel']:.3f} "
          f"| {p99['tunnel']:.3f} |")
    print(f"throughput ratio {t / d:.2f} (target >= 0.40); added RTT p50 "
          f"{result['added_rtt_ms_p50']:.3f} ms (target < 1 ms); {args.streams} streams x "
          f"{args.stream_kb} KiB echoed in {streams_s:.2f} s, {failures} failures")
    print("tunnel CPU per round trip: " + ", ".join(
        f"{end} end {u + s_:.1f} us (user {u:.1f})" for end, (u, s_) in rt_us.items()))
    print("tunnel CPU per GB carried: " + ", ".join(
        f"{end} end {v:.2f} s (user {user_per_gb[end]:.2f})" for end, v in cpu_per_gb.items()))
    write_json(args.json, result)
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
