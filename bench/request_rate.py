"""Small requests through each path: requests a second and the path's CPU per request.

    sudo .venv/bin/python -m bench.request_rate [--paths direct,encrypted,ssh_gcm,...]
        [--conns 1,16] [--size 64] [--seconds 3] [--rounds 3] [--json out.json]

The latency scenario's lab and paths (:mod:`bench.paths`). Per path, round and
``--conns`` value, a load process in b1 keeps one ``--size``-byte request in
flight on each of that many echo connections to the service in a1 (a closed
loop: the next request leaves when the answer is back) for ``--seconds``, and
checks every answer. Reported: requests answered a second, and the CPU time
of the path's own processes (the tunnel ends, ssh, socat; none for direct TCP)
per request, in microseconds. The load process and the service are the same
for every path; the CPU per request is the steadier figure on a busy machine.
Paths alternate by round. ``NOPF_BENCH_BASE=DIR`` adds ``encrypted_base``, as
in the suite.

What it shows that the latency scenario does not: a request/response protocol
(a database, an RPC, a remote shell's keystrokes) costs the tunnel a small
record each way per request, so its per-message work sets the rate, not its
bulk throughput.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path as FsPath
from typing import Any

from bench.paths import Bench, Path, cpu_seconds, path_list, started
from bench.report import write_json

LOAD_GRACE = 30.0  # seconds past --seconds the load process may take to connect and report


def _round(bench: Bench, path: Path, conns: int, seconds: float, size: int) -> dict[str, Any]:
    entry = path.entry()  # first: seed mode starts its pair of processes here
    pids = path.pids()
    cpu0 = cpu_seconds(pids)
    load = bench.load(entry, conns, seconds, size)
    try:
        out, err = load.communicate(timeout=seconds + LOAD_GRACE)
    finally:
        path.release()
    cpu = cpu_seconds(pids) - cpu0
    if load.returncode != 0:
        raise RuntimeError(f"the load via {path.label} failed: {err.decode()[-300:]}")
    answered, elapsed = out.split()
    n = int(answered)
    if not n:
        raise RuntimeError(f"the load via {path.label} got no answer in {seconds:g} s")
    return {"req_s": round(n / float(elapsed), 1),
            "cpu_us_per_req": round(cpu / n * 1e6, 2) if pids else None}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.request_rate",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--paths", type=path_list, default="direct,encrypted,ssh_gcm")
    ap.add_argument("--conns", default="1,16", help="connections at once, comma-separated")
    ap.add_argument("--size", type=int, default=64, help="bytes per request (and answer)")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=FsPath)
    args = ap.parse_args(argv)
    names: tuple[str, ...] = args.paths
    try:
        conns_list = [int(c) for c in args.conns.split(",")]
    except ValueError:
        ap.error(f"--conns: comma-separated whole numbers, got {args.conns!r}")
    if min(conns_list) < 1 or args.size < 1 or args.seconds <= 0:
        ap.error("--conns and --size must be at least 1, --seconds above 0")
    if "plain" in names and max(conns_list) > 1:
        ap.error("--paths plain carries one connection per punch: use it with --conns 1")

    def progress(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    data: dict[str, Any] = {"size": args.size, "seconds": args.seconds, "results": {}}
    with Bench(progress) as bench, started(bench, names) as (paths, absent):
        for name, why in absent.items():
            print(f"{name}: not available: {why}")
        order = list(paths.items())
        for rnd in range(args.rounds):
            for name, path in order if rnd % 2 == 0 else order[::-1]:
                for conns in conns_list:
                    r = _round(bench, path, conns, args.seconds, args.size)
                    data["results"].setdefault(f"{name} x{conns}", []).append(r)
                    cpu = f", {r['cpu_us_per_req']:.1f} CPU-us/request" \
                        if r["cpu_us_per_req"] is not None else ""
                    print(f"round {rnd + 1} {path.label}, {conns} connections: "
                          f"{r['req_s']:.0f} requests/s{cpu}", flush=True)
        labels = {name: path.label for name, path in paths.items()}
    print("\n| path | connections | requests/s (median) | CPU-us per request (median) |")
    print("|---|---|---|---|")
    for name in labels:
        for conns in conns_list:
            rows = data["results"][f"{name} x{conns}"]
            cpus = [r["cpu_us_per_req"] for r in rows if r["cpu_us_per_req"] is not None]
            cpu_txt = f"{statistics.median(cpus):.1f}" if cpus else "-"
            print(f"| {labels[name]} | {conns} | "
                  f"{statistics.median(r['req_s'] for r in rows):.0f} | {cpu_txt} |")
    write_json(args.json, data)


if __name__ == "__main__":
    main()
