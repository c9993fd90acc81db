"""Dashboard benchmark: page/API latency during a full-speed transfer, and tunnel
throughput with dashboards watching against the plain CLI.

Everything runs on loopback (no root, no lab): two ``nopf-web`` processes, as
two users would run them (A hosts the server session and the embedded
rendezvous, B the client session), a sink service behind A, and a sender
through B's local port. While the transfer runs, a watcher polls both
dashboards the way open browser tabs would (the live fragment, the JSON
session, the sessions list) and records each request's latency. The same
transfer then runs through two ``nopf`` CLI processes for the baseline.

    .venv/bin/python -m bench.web [--size-mb 1024] [--rounds 3] [--poll-ms 50] [--json out.json]

Targets (issue 4): p95 page and API latency < 100 ms during the transfer; tunnel
throughput with the dashboards watching >= 90 % of the CLI's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.measure import send_bytes
from tests.loopback import accepted
from tests.programs import argv, free_port

CHUNK = 1 << 20


def sink(listener: socket.socket, stop: threading.Event) -> None:
    """Count each connection's bytes to EOF, then answer with the count."""
    listener.settimeout(0.5)
    buf = bytearray(CHUNK)
    for conn in accepted(listener, stop):
        with conn:
            total = 0
            while n := conn.recv_into(buf):
                total += n
            conn.sendall(total.to_bytes(8, "big"))


def send(port: int, size: int) -> float:
    """Send ``size`` bytes through 127.0.0.1:port; return MB/s once the sink confirms."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        t0 = time.perf_counter()
        send_bytes(sock, size)
        sock.shutdown(socket.SHUT_WR)
        got = b""
        while len(got) < 8:
            chunk = sock.recv(8 - len(got))
            if not chunk:
                raise RuntimeError("the tunnel closed before the sink answered")
            got += chunk
        elapsed = time.perf_counter() - t0
    if int.from_bytes(got, "big") != size:
        raise RuntimeError(f"sink counted {int.from_bytes(got, 'big')} of {size} bytes")
    return size / elapsed / 1e6


class Dashboard:
    def __init__(self, db: Path, *extra: str) -> None:
        self.proc = subprocess.Popen(
            argv("nopf-web", "--port", "0", "--db", str(db), "--no-guard", *extra),
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
            text=True)
        assert self.proc.stdout is not None
        self.url = self.proc.stdout.readline().strip().rstrip("/")
        if not self.url:
            raise RuntimeError("nopf-web did not start")

    def call(self, method: str, path: str, body: dict[str, Any] | None = None,
             headers: dict[str, str] | None = None) -> tuple[float, bytes]:
        req = urllib.request.Request(self.url + path, method=method,
                                     data=json.dumps(body).encode() if body else None,
                                     headers={"Content-Type": "application/json",
                                              **(headers or {})})
        t0 = time.perf_counter()
        with urllib.request.urlopen(req, timeout=10) as resp:
            data = resp.read()
        return time.perf_counter() - t0, data

    def json(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        return json.loads(self.call(method, path, body)[1])

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(15)


def wait_for(fn: Any, what: str, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := fn()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)
    return value


@contextlib.contextmanager
def dashboard_tunnel(tmp: Path, sink_port: int, app_port: int
                     ) -> Iterator[tuple[Dashboard, Dashboard, str, str]]:
    rdv_port = free_port()
    a = Dashboard(tmp / f"a-{app_port}.db", "--rendezvous-listen", f"127.0.0.1:{rdv_port}")
    b = Dashboard(tmp / f"b-{app_port}.db", "--rendezvous", f"127.0.0.1:{rdv_port}")
    try:
        s = a.json("POST", "/api/sessions", {"role": "server", "local_port": sink_port,
                                           "mode": "seed"})
        c = b.json("POST", "/api/sessions", {"role": "client", "local_port": app_port,
                                           "mode": "seed"})
        s = wait_for(lambda: (d := a.json("GET", f"/api/sessions/{s['id']}"))
                     ["public_address"] and d, "A's public address")
        c = wait_for(lambda: (d := b.json("GET", f"/api/sessions/{c['id']}"))
                     ["public_address"] and d, "B's public address")
        a.json("POST", f"/api/sessions/{s['id']}/peer", {"address": c["public_address"]})
        b.json("POST", f"/api/sessions/{c['id']}/peer", {"address": s["public_address"]})
        for d, sid in ((a, s["id"]), (b, c["id"])):
            wait_for(lambda d=d, sid=sid: d.json("GET", f"/api/sessions/{sid}")["state"]
                     == "connected", "connected")
        yield a, b, s["id"], c["id"]
    finally:
        a.stop()
        b.stop()


@contextlib.contextmanager
def cli_tunnel(sink_port: int, app_port: int) -> Iterator[None]:
    rdv_port = free_port()
    rdv = subprocess.Popen(argv("nopf-server", "--host", "127.0.0.1", "--port", str(rdv_port)),
                           stderr=subprocess.PIPE)
    assert rdv.stderr is not None
    rdv.stderr.readline()  # "listening on ..."
    peers = [subprocess.Popen(
        argv("nopf", "-t", role, "-p", str(port), "-a", f"127.0.0.1:{rdv_port}", "--no-guard"),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        for role, port in (("server", sink_port), ("client", app_port))]
    try:
        publics = [p.stdout.readline().strip() for p in peers if p.stdout]
        for p, peer in zip(peers, reversed(publics), strict=True):
            assert p.stdin is not None
            p.stdin.write(peer + "\n")
            p.stdin.flush()
        server_out = peers[0].stdout
        assert server_out is not None
        server_out.readline()  # "Started pipe ...": the server side is connected
        yield
    finally:
        procs: list[subprocess.Popen[Any]] = [*peers, rdv]
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(15)


def watch(dashboards: list[tuple[Dashboard, str]], poll: float, stop: threading.Event,
          latencies: dict[str, list[float]]) -> None:
    """Poll like open browser tabs: live fragment, JSON session, sessions list."""
    hx = {"HX-Request": "true"}
    while not stop.is_set():
        for d, sid in dashboards:
            latencies["page"].append(d.call("GET", f"/sessions/{sid}", headers=hx)[0])
            latencies["api"].append(d.call("GET", f"/api/sessions/{sid}")[0])
            latencies["page"].append(d.call("GET", "/", headers=hx)[0])
        stop.wait(poll)


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[18] * 1000 if len(values) > 1 else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--poll-ms", type=float, default=50.0,
                        help="pause between watcher sweeps (a browser polls every 1000)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    size = args.size_mb * 1024 * 1024

    listener = socket.create_server(("127.0.0.1", 0))
    sink_port = int(listener.getsockname()[1])
    stop_sink = threading.Event()
    threading.Thread(target=sink, args=(listener, stop_sink), daemon=True).start()
    dash_rates: list[float] = []
    cli_rates: list[float] = []
    latencies: dict[str, list[float]] = {"page": [], "api": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            app_port = free_port()
            with cli_tunnel(sink_port, app_port):
                cli_rates.append(send(app_port, size))
            app_port = free_port()
            with dashboard_tunnel(Path(tmp), sink_port, app_port) as (a, b, sid_a, sid_b):
                stop = threading.Event()
                watcher = threading.Thread(target=watch, args=(
                    [(a, sid_a), (b, sid_b)], args.poll_ms / 1000, stop, latencies))
                watcher.start()
                try:
                    dash_rates.append(send(app_port, size))
                finally:
                    stop.set()
                    watcher.join()
    stop_sink.set()
    listener.close()

    result = {
        "size_mb": args.size_mb, "rounds": args.rounds, "poll_ms": args.poll_ms,
        "cli_mb_s": statistics.median(cli_rates), "dashboard_mb_s": statistics.median(dash_rates),
        "throughput_ratio": statistics.median(dash_rates) / statistics.median(cli_rates),
        "page_requests": len(latencies["page"]), "api_requests": len(latencies["api"]),
        "page_p95_ms": p95(latencies["page"]), "api_p95_ms": p95(latencies["api"]),
        "page_max_ms": max(latencies["page"], default=0) * 1000,
        "api_max_ms": max(latencies["api"], default=0) * 1000,
    }
    print(f"CLI tunnel          {result['cli_mb_s']:8.0f} MB/s (median of {args.rounds})")
    print(f"dashboards watching {result['dashboard_mb_s']:8.0f} MB/s "
          f"({result['throughput_ratio']:.0%} of the CLI; target >= 90 %)")
    print(f"page latency p95    {result['page_p95_ms']:8.1f} ms over {result['page_requests']} "
          f"requests (max {result['page_max_ms']:.1f}; target p95 < 100 ms)")
    print(f"API latency p95     {result['api_p95_ms']:8.1f} ms over {result['api_requests']} "
          f"requests (max {result['api_max_ms']:.1f})")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    ok = result["throughput_ratio"] >= 0.9 and max(result["page_p95_ms"],
                                                    result["api_p95_ms"]) < 100
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
