"""User and system CPU per GB at each end, and system calls per record (issue 16).

    sudo .venv/bin/python -m bench.cpu_split [--paths encrypted,ssh_gcm,...]
        [--rounds 5] [--size-gb 1] [--strace-mb 512] [--streams 1] [--rate-mbit 0]

The throughput scenario's lab, paths and transfer (:func:`bench.scn_throughput._one`,
one stream or ``--streams`` at once), alternating rounds; for each path and end
(b1: the sender's side, a1: the service's side) the median user and system CPU
seconds per GB of the path's processes and their descendants
(``/proc/PID/stat``, children's times included); ``--rate-mbit`` shapes the
lab's path first (tc tbf, as the throughput scenario's shaped regime). Then,
with ``--strace-mb``, one more transfer per path with ``strace -c -f`` attached
to every process of each end: system calls per 256 KiB of data moved (a full
record of the tunnel and of ``bench.pump_floor``).
"""

from __future__ import annotations

import argparse
import shutil
import signal
import statistics
import subprocess
import sys
import time

from bench.paths import Bench, process_tree, started, user_system
from bench.scn_throughput import ENDS, _one

RECORD = 256 * 1024


def _syscalls(summary: str, size: int) -> str:
    """``strace -c``'s table as "name per-record-count, ..." (calls >= 0.05 per record)."""
    out = []
    for line in summary.splitlines():
        cols = line.split()
        if len(cols) >= 5 and cols[0].replace(".", "").isdigit() and cols[-1] != "total":
            per = int(cols[3]) / (size / RECORD)
            if per >= 0.05:
                out.append(f"{cols[-1]} {per:.2f}")
    return ", ".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.cpu_split",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--paths", default="encrypted,ssh_gcm,floor_async,floor_thread")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--size-gb", type=float, default=1.0)
    ap.add_argument("--strace-mb", type=int, default=512, help="0: no strace transfer")
    ap.add_argument("--streams", type=int, default=1, help="connections at once")
    ap.add_argument("--rate-mbit", type=float, default=0.0,
                    help="shape the lab's path to this rate (0: unshaped)")
    args = ap.parse_args(argv)
    names = tuple(n.strip() for n in args.paths.split(",") if n.strip())
    size = int(args.size_gb * 1e9)

    def progress(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    per_gb: dict[str, dict[str, list[tuple[float, float]]]] = {
        n: {e: [] for e in ENDS} for n in names}
    with Bench(progress) as bench, started(bench, ("direct", *names)) as (paths, absent):
        if absent:
            progress(f"not measured: {absent}")
        names = tuple(n for n in names if n in paths)
        bench.shape(args.rate_mbit)
        for name in names:
            _one(bench, paths[name], 64_000_000, args.streams)  # warm-up, not counted
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                ends = paths[name].ends()
                before = {e: user_system(p) for e, p in ends.items()}
                mbs, _ = _one(bench, paths[name], size, args.streams)
                for end, pids in ends.items():
                    (u1, s1), (u0, s0) = user_system(pids), before[end]
                    per_gb[name][end].append(((u1 - u0) / (size / 1e9),
                                              (s1 - s0) / (size / 1e9)))
                progress(f"round {r + 1}: {name} {mbs:.0f} MB/s")
        print("| path | b1 user | b1 system | a1 user | a1 system |\n|---|---|---|---|---|")
        for name in names:
            cells = [f"{statistics.median(v[i] for v in per_gb[name][e]):.2f}"
                     for e in ENDS for i in (0, 1)]
            print(f"| {name} | " + " | ".join(cells) + " |")
        # Same-round ratios to the first path (rounds alternate, so a round's
        # load weighs on both): steadier than a ratio of medians on a busy machine.
        for name in names[1:]:
            cells = []
            for end in ENDS:
                for label, both in (("CPU", True), ("user", False)):
                    ratios = [(v[0] + v[1] * both) / (w[0] + w[1] * both) for v, w in
                              zip(per_gb[name][end], per_gb[names[0]][end], strict=True)
                              if w[0] + w[1] * both]
                    if ratios:
                        cells.append(f"{end} {label} {statistics.median(ratios):.2f} "
                                     f"({min(ratios):.2f}-{max(ratios):.2f})")
            print(f"- {name} / {names[0]}, per round: " + ", ".join(cells))
        if not args.strace_mb or shutil.which("strace") is None:
            return
        size = args.strace_mb << 20
        for name in names:
            tracers: list[tuple[str, subprocess.Popen[str]]] = []
            try:
                for end, pids in paths[name].ends().items():
                    flags = [a for pid in process_tree(pids) for a in ("-p", str(pid))]
                    tracers.append((end, subprocess.Popen(
                        ["strace", "-c", "-f", *flags], stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE, text=True)))
                time.sleep(1)  # attached
                mbs, _ = _one(bench, paths[name], size, args.streams)
                time.sleep(0.5)
                for end, tracer in tracers:
                    tracer.send_signal(signal.SIGINT)
                    summary = tracer.communicate(timeout=30)[1]
                    print(f"- {name} {end} (system calls per 256 KiB; {mbs:.0f} MB/s under "
                          f"strace): {_syscalls(summary, size)}")
            finally:  # a failed transfer or summary must not leave strace attached
                for _, tracer in tracers:
                    if tracer.poll() is None:
                        tracer.kill()
                        tracer.wait(5)


if __name__ == "__main__":
    main()
