"""Plain-pipe benchmark: nopf's seed-mode pipe against direct TCP on the same lab path.

Builds a no-NAT lab (so a direct path exists), then alternates runs of
- direct: a sender in b1 connects straight to a sink in a1 (public addresses);
- nopf:   the same sender connects to 127.0.0.1:3010 (nopf client in b1), which
          pipes through the punched connection to nopf server in a1, to the sink;
and reports throughput and request/response latency, each as a ratio to the
direct baseline measured in the same run (medians over ``--rounds``).

    sudo .venv/bin/python -m bench.pipe [--size-mb 512] [--rounds 3] [--rate-mbit N]
        [--json out.json]

``--rate-mbit`` shapes the router's links to the sites (tc tbf) so the network,
not the 2-core CPU, is the bottleneck, as on a real internet path.

Targets (issue 3): throughput >= 80 % of direct; added round trip <= 0.1 ms.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

from tests.e2e.peers import connect, punch_pair, start_rendezvous
from tests.lab import Host, Lab

CHUNK = 1 << 20


def sink(lsock: socket.socket, results: list[float], stop: threading.Event) -> None:
    """Accept connections; for each, count bytes to EOF, or echo small messages."""
    lsock.settimeout(0.5)
    buf = bytearray(CHUNK)
    while not stop.is_set():
        try:
            conn, _ = lsock.accept()
        except TimeoutError:
            continue
        mode = conn.recv(1)
        if mode == b"E":  # echo, for latency
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while data := conn.recv(64):
                conn.sendall(data)
        else:
            total = 0
            while n := conn.recv_into(buf):
                total += n
            conn.sendall(total.to_bytes(8, "big"))
        conn.close()
    del results


def throughput(sock: socket.socket, size: int) -> float:
    """Send ``size`` bytes, wait for the sink's count; return MB/s."""
    payload = memoryview(bytearray(CHUNK))
    sock.sendall(b"T")
    t0 = time.perf_counter()
    left = size
    while left:
        n = min(left, CHUNK)
        sock.sendall(payload[:n])
        left -= n
    sock.shutdown(socket.SHUT_WR)
    got = int.from_bytes(sock.recv(8), "big")
    elapsed = time.perf_counter() - t0
    if got != size:
        raise SystemExit(f"bench: sink counted {got} bytes, expected {size}")
    return size / elapsed / 1e6


def echo_mode(sock: socket.socket) -> socket.socket:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(b"E")
    return sock


def latency(sock: socket.socket, count: int) -> list[float]:
    """``count`` request/response round trips of 32 bytes, in milliseconds."""
    samples = []
    for _ in range(count):
        t0 = time.perf_counter()
        sock.sendall(b"x" * 32)
        got = 0
        while got < 32:
            got += len(sock.recv(64))
        samples.append((time.perf_counter() - t0) * 1e3)
    return samples


def direct(host: Host, ip: str) -> socket.socket:
    with host.enter():
        return socket.create_connection((ip, 4000), timeout=60)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pings", type=int, default=2000)
    ap.add_argument("--rate-mbit", type=float, default=0,
                    help="shape inet's links to the sites to this rate (0: unshaped)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    size = args.size_mb * 1_000_000
    with Lab("none", "none") as lab:
        if args.rate_mbit:
            for dev in ("to-a", "to-b"):
                lab.inet.run(["tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate",
                              f"{args.rate_mbit}mbit", "burst", "512k", "latency", "20ms"])
        stop = threading.Event()
        with lab.a1.enter():
            direct_l = socket.create_server(("0.0.0.0", 4000))
            service_l = socket.create_server(("127.0.0.1", 3000), backlog=8)
        for lsock in (direct_l, service_l):
            threading.Thread(target=sink, args=(lsock, [], stop), daemon=True).start()
        start_rendezvous(lab)
        # One punched tunnel per nopf run: the seed pipes exactly one connection.
        rows: dict[str, list[float]] = {"direct": [], "nopf": []}
        lat: dict[str, list[float]] = {"direct": [], "nopf": []}
        for r in range(args.rounds):
            print(f"round {r + 1}/{args.rounds}: direct", file=sys.stderr, flush=True)
            rows["direct"].append(throughput(direct(lab.b1, lab.a1.ip), size))
            print(f"round {r + 1}/{args.rounds}: nopf", file=sys.stderr, flush=True)
            pair = punch_pair(lab, gap=0.2)
            pair.server.line(20)  # "Started pipe": the tunnel is up, time only the transfer
            rows["nopf"].append(throughput(connect(lab.b1, 3010, timeout=60), size))
            pair.server.wait(20)
            pair.client.wait(20)
        # Latency: both paths open at once, measured in alternating batches so
        # the machine's noise (vCPU wake-ups, other load) hits both alike.
        pair = punch_pair(lab, gap=0.2)
        pair.server.line(20)
        socks = {"direct": echo_mode(direct(lab.b1, lab.a1.ip)),
                 "nopf": echo_mode(connect(lab.b1, 3010))}
        batch = max(1, args.pings // 20)
        for _ in range(20):
            for name, sock in socks.items():
                lat[name] += latency(sock, batch)
        for sock in socks.values():
            sock.close()
        pair.server.wait(20)
        pair.client.wait(20)
        stop.set()
    d, n = statistics.median(rows["direct"]), statistics.median(rows["nopf"])
    p50 = {k: statistics.median(v) for k, v in lat.items()}
    p99 = {k: statistics.quantiles(v, n=100)[98] for k, v in lat.items()}
    result = {
        "size_mb": args.size_mb, "rounds": args.rounds, "rate_mbit": args.rate_mbit or None,
        "throughput_mb_s": rows, "median_mb_s": {"direct": d, "nopf": n},
        "throughput_ratio": n / d,
        "rtt_ms_p50": p50, "rtt_ms_p99": p99,
        "added_rtt_ms_p50": p50["nopf"] - p50["direct"],
    }
    print(f"| path | throughput (median MB/s) | ratio | RTT p50 ms | RTT p99 ms |\n"
          f"|---|---|---|---|---|\n"
          f"| direct TCP | {d:.0f} | 1.00 | {p50['direct']:.3f} | {p99['direct']:.3f} |\n"
          f"| nopf plain pipe | {n:.0f} | {n / d:.2f} | {p50['nopf']:.3f} | {p99['nopf']:.3f} |")
    print(f"added RTT p50: {result['added_rtt_ms_p50']:.3f} ms; "
          f"throughput ratio {n / d:.2f} (target >= 0.80)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
