"""Plain-pipe benchmark: nopf's seed-mode pipe against direct TCP on the same lab path.

Builds a no-NAT lab (so a direct path exists), then alternates runs of
- direct: a sender in b1 connects straight to a sink in a1 (public addresses);
- nopf:   the same sender connects to 127.0.0.1:3010 (nopf client in b1), which
          pipes through the punched connection to nopf server in a1, to the sink;
and reports throughput and request/response latency, each as a ratio to the
direct baseline measured in the same run (medians over ``--rounds``).

    sudo .venv/bin/python -m bench.pipe [--size-mb 512] [--rounds 3] [--rate-mbit N]
        [--copy splice,sockmap] [--json out.json]

``--copy`` lists the pipe's copy methods (NOPF_PIPE_COPY) to compare in the
same run; each is its own row, measured alternately with the others.
``--rate-mbit`` shapes the router's links to the sites (tc tbf) so the network,
not the 2-core CPU, is the bottleneck, as on a real internet path.

Targets (issue 3): throughput >= 80 % of direct; added round trip <= 0.1 ms.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import sys
import threading
from pathlib import Path

from bench.measure import echo_mode, environ, round_trips, send_counted, serve_conn
from bench.report import write_json
from nopf_web.tunnel.pipe import COPY_METHODS
from tests.e2e.peers import connect, punch_pair, start_rendezvous
from tests.lab import Host, Lab
from tests.loopback import accepted


def sink(lsock: socket.socket, stop: threading.Event) -> None:
    """Serve the counting/echo protocol on every connection until ``stop``."""
    lsock.settimeout(0.5)
    for conn in accepted(lsock, stop):
        conn.settimeout(None)
        threading.Thread(target=serve_conn, args=(conn,), daemon=True).start()


def direct(host: Host, ip: str) -> socket.socket:
    with host.enter():
        return socket.create_connection((ip, 4000), timeout=60)


def copy_env(method: str) -> contextlib.AbstractContextManager[None]:
    """NOPF_PIPE_COPY for the peers started inside (they inherit the environment);
    "" leaves it as it is."""
    return environ("NOPF_PIPE_COPY", method or os.environ.get("NOPF_PIPE_COPY"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pings", type=int, default=2000)
    ap.add_argument("--rate-mbit", type=float, default=0,
                    help="shape inet's links to the sites to this rate (0: unshaped)")
    ap.add_argument("--copy", default="",
                    help="comma-separated NOPF_PIPE_COPY methods to compare (default: as set)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    methods = [m for m in args.copy.split(",") if m] or [os.environ.get("NOPF_PIPE_COPY", "")]
    bad = [m for m in methods if m not in ("", *COPY_METHODS)]
    if bad:
        print(f"bench.pipe: error: unknown copy method {bad[0]!r} "
              f"(choose from {', '.join(COPY_METHODS)})", file=sys.stderr)
        return 2
    # One method keeps the historical row name "nopf"; several are told apart.
    names = {m: "nopf" if len(methods) == 1 else f"nopf-{m}" for m in methods}
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
            threading.Thread(target=sink, args=(lsock, stop), daemon=True).start()
        start_rendezvous(lab)
        # One punched tunnel per nopf run: the seed pipes exactly one connection.
        rows: dict[str, list[float]] = {"direct": [], **{n: [] for n in names.values()}}
        lat: dict[str, list[float]] = {"direct": [], **{n: [] for n in names.values()}}
        for r in range(args.rounds):
            print(f"round {r + 1}/{args.rounds}: direct", file=sys.stderr, flush=True)
            rows["direct"].append(send_counted(direct(lab.b1, lab.a1.ip), size))
            # Rotate the methods' order each round so none always follows direct.
            for method in methods[r % len(methods):] + methods[:r % len(methods)]:
                print(f"round {r + 1}/{args.rounds}: {names[method]}", file=sys.stderr,
                      flush=True)
                with copy_env(method):
                    pair = punch_pair(lab, gap=0.2)
                pair.server.line(20)  # "Started pipe": the tunnel is up, time only the transfer
                rows[names[method]].append(send_counted(connect(lab.b1, 3010, timeout=60), size))
                pair.server.wait(20)
                pair.client.wait(20)
        # Latency: the direct path and one method's pipe open at once, measured in
        # alternating batches so the machine's noise hits both alike.
        batch = max(1, args.pings // 20)
        for method in methods:
            with copy_env(method):
                pair = punch_pair(lab, gap=0.2)
            pair.server.line(20)
            socks = {"direct": echo_mode(direct(lab.b1, lab.a1.ip)),
                     names[method]: echo_mode(connect(lab.b1, 3010))}
            for _ in range(20):
                for name, sock in socks.items():
                    lat[name] += round_trips(sock, batch)
            for sock in socks.values():
                sock.close()
            pair.server.wait(20)
            pair.client.wait(20)
        stop.set()
    med = {k: statistics.median(v) for k, v in rows.items()}
    p50 = {k: statistics.median(v) for k, v in lat.items()}
    p99 = {k: statistics.quantiles(v, n=100)[98] for k, v in lat.items()}
    d = med["direct"]
    result = {
        "size_mb": args.size_mb, "rounds": args.rounds, "rate_mbit": args.rate_mbit or None,
        "copy": methods, "throughput_mb_s": rows, "median_mb_s": med,
        "throughput_ratio": {n: med[n] / d for n in names.values()},
        "rtt_ms_p50": p50, "rtt_ms_p99": p99,
        "added_rtt_ms_p50": {n: p50[n] - p50["direct"] for n in names.values()},
    }
    if len(methods) == 1:  # the single-method shape earlier results were recorded in
        result["throughput_ratio"] = med["nopf"] / d
        result["added_rtt_ms_p50"] = p50["nopf"] - p50["direct"]
    table = [f"| direct TCP | {d:.0f} | 1.00 | {p50['direct']:.3f} | {p99['direct']:.3f} |"]
    for method, n in names.items():
        label = "nopf plain pipe" + (f" ({method})" if method else "")
        table.append(f"| {label} | {med[n]:.0f} | {med[n] / d:.2f} | {p50[n]:.3f} "
                     f"| {p99[n]:.3f} |")
    print("| path | throughput (median MB/s) | ratio | RTT p50 ms | RTT p99 ms |\n"
          "|---|---|---|---|---|\n" + "\n".join(table))
    for method, n in names.items():
        print(f"{method or 'default'}: added RTT p50 {p50[n] - p50['direct']:.3f} ms; "
              f"throughput ratio {med[n] / d:.2f} (target >= 0.80)")
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
