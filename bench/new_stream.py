"""Round trips on a stream opened while bulk streams already run on the same tunnel.

    sudo .venv/bin/python -m bench.new_stream [--paths encrypted,ssh_gcm,...]
        [--bulk 10] [--rounds 3] [--settle 2] [--rate-mbit 0] [--json out.json]

The latency scenario's lab and paths (:mod:`bench.paths`). Per path and round:
``--bulk`` sender processes in b1 move data to the service in a1 as fast as
they can, each on its own connection of the path (for the encrypted tunnel and
ssh: streams of one tunnel); after ``--settle`` seconds one more connection
switches to echo and times 20 round trips of 32 bytes, then 400 more. The
first round trips show what a new interactive stream meets: the bulk bytes
already in flight when it opens (for nopf, windows that grew while every
stream was busy); the 400 after show the steady state. The CPU per GB is the
path's processes' while the echo stream runs, over the bytes the bulk rate
gives for that time. Paths alternate by round. ``--rate-mbit`` shapes the
lab's links, as the throughput scenario's 1 Gbit/s regime does.
``NOPF_BENCH_BASE=DIR`` adds ``encrypted_base``, as in the suite.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path as FsPath
from typing import Any

from bench.measure import echo_mode, round_trips
from bench.paths import Bench, Path, cpu_seconds, path_list, started
from bench.report import write_json

FIRST = 20  # round trips timed one by one right after the stream opens
AFTER = 400
BULK_SECONDS = 60  # each sender's own limit; closing its stdin stops it sooner
ROUND_TRIP_TIMEOUT = 10.0  # seconds one round trip may take before the run fails


def _round(bench: Bench, path: Path, bulk: int, settle: float) -> dict[str, Any]:
    senders = [bench.bulk(path.entry(), seconds=BULK_SECONDS) for _ in range(bulk)]
    try:
        time.sleep(settle)
        sock = echo_mode(bench.connect(path.entry(), timeout=30))
        pids = path.pids()  # after the entries: seed mode starts a pair of processes at each
        with sock:
            sock.settimeout(ROUND_TRIP_TIMEOUT)
            cpu0, t0 = cpu_seconds(pids), time.perf_counter()
            first = round_trips(sock, FIRST)
            after = round_trips(sock, AFTER)
            cpu, elapsed = cpu_seconds(pids) - cpu0, time.perf_counter() - t0
    finally:
        results = [s.communicate(timeout=30) for s in senders]  # closing stdin stops them
        path.release()
    failed = [err.decode()[-200:] for s, (_, err) in zip(senders, results, strict=True)
              if s.returncode != 0]
    if failed:
        raise RuntimeError(f"a bulk sender via {path.label} failed: {failed[0]}")
    q = statistics.quantiles(after, n=100)
    mb_s = sum(float(out.split()[-1]) for out, _ in results)
    # CPU while the echo stream runs, per GB the bulk moved meanwhile at its rate over
    # the whole round (the senders report no more): an estimate, made alike for every path.
    return {"first_ms": round(first[0], 3), "first20_max_ms": round(max(first), 3),
            "p50_ms": round(q[49], 3), "p99_ms": round(q[98], 3),
            "bulk_mb_s": round(mb_s, 1),
            "cpu_s_per_gb": round(cpu / (mb_s * elapsed / 1000), 3) if mb_s and pids else None}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.new_stream",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--paths", type=path_list, default="encrypted,ssh_gcm")
    ap.add_argument("--bulk", type=int, default=10, help="bulk connections at once")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--settle", type=float, default=2.0,
                    help="seconds of bulk before the new stream opens")
    ap.add_argument("--rate-mbit", type=float, default=0.0,
                    help="shape the lab's links to this rate (0: unshaped)")
    ap.add_argument("--json", type=FsPath)
    args = ap.parse_args(argv)
    names: tuple[str, ...] = args.paths

    def progress(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    data: dict[str, Any] = {"bulk": args.bulk, "settle_s": args.settle,
                            "rate_mbit": args.rate_mbit or None, "rounds": {}}
    with Bench(progress) as bench, started(bench, names) as (paths, absent):
        bench.shape(args.rate_mbit)
        for name, why in absent.items():
            print(f"{name}: not available: {why}")
        order = list(paths.items())
        for rnd in range(args.rounds):
            for name, path in order if rnd % 2 == 0 else order[::-1]:
                r = _round(bench, path, args.bulk, args.settle)
                data["rounds"].setdefault(name, []).append(r)
                print(f"round {rnd + 1} {path.label}: first round trip {r['first_ms']:.1f} ms, "
                      f"worst of the first {FIRST} {r['first20_max_ms']:.1f} ms, then p50 "
                      f"{r['p50_ms']:.2f} ms p99 {r['p99_ms']:.2f} ms; bulk "
                      f"{r['bulk_mb_s']:.0f} MB/s"
                      + (f", {r['cpu_s_per_gb']:.2f} CPU-s/GB" if r["cpu_s_per_gb"] else ""),
                      flush=True)
    write_json(args.json, data)


if __name__ == "__main__":
    main()
