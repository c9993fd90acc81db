"""Which NAT pairs nopf's seed mode connects: every pair of lab NAT behaviours.

For each (server site, client site) pair it builds a lab, runs the real
``nopf-server`` and both ``nopf`` peers in the seed's order (server enters the
client's address, the client ``--gap`` seconds later), and counts runs whose
tunnel came up and carried a ping/pong. Writes a Markdown table.

    sudo .venv/bin/python -m bench.nat_matrix [--runs 5] [--delay-ms 20 --jitter-ms 5]
        [--order seed|client-first] [--out docs/nat-matrix.md]
"""

from __future__ import annotations

import argparse
import itertools
import re
import sys
import time
from pathlib import Path

from bench.report import publish
from tests.e2e.peers import connect, listening, punch_pair, start_rendezvous
from tests.lab import MODES, Lab


def one_run(left: str, right: str, args: argparse.Namespace) -> tuple[bool, float, str]:
    with Lab(left, right, delay_ms=args.delay_ms, jitter_ms=args.jitter_ms,
             loss=args.loss) as lab:
        start_rendezvous(lab)
        with listening(lab.a1, 3000) as service:
            t0 = time.monotonic()
            pair = punch_pair(lab, order=args.order, gap=args.gap, timeout=args.timeout)
            line = pair.server.lines.get(timeout=args.timeout + 10)
            took = time.monotonic() - t0
            if not line.startswith("Started pipe"):
                pair.server.wait(10)
                err = pair.server.stderr().strip().splitlines()
                return False, took, err[-1] if err else "no output"
            app = connect(lab.b1, 3010)
            conn, _ = service.accept()
            conn.settimeout(10)
            app.sendall(b"ping")
            ok = conn.recv(4) == b"ping"
            app.close()
            conn.close()
            return ok, took, ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--order", choices=("seed", "client-first"), default="seed")
    ap.add_argument("--gap", type=float, default=1.0)
    ap.add_argument("--timeout", type=float, default=8.0)
    ap.add_argument("--delay-ms", type=float, default=0)
    ap.add_argument("--jitter-ms", type=float, default=0)
    ap.add_argument("--loss", type=float, default=0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    results: dict[tuple[str, str], tuple[int, list[float], set[str]]] = {}
    for left, right in itertools.product(MODES, repeat=2):
        wins, times, errors = 0, [], set()
        for i in range(args.runs):
            ok, took, err = one_run(left, right, args)
            wins += ok
            if ok:
                times.append(took)
            elif err:
                # One line per distinct cause: addresses and counts vary run to run.
                text = err.split("error: ", 1)[-1]
                text = re.sub(r"\d+\.\d+\.\d+\.\d+:\d+", "IP:PORT", text)
                errors.add(re.sub(r"\d+", "N", text))
            print(f"{left:>9} -> {right:<9} run {i + 1}/{args.runs}: "
                  f"{'ok' if ok else 'FAILED'} in {took:.1f} s", file=sys.stderr, flush=True)
        results[(left, right)] = (wins, times, errors)
    cmd = " ".join(["python -m bench.nat_matrix", *sys.argv[1:]])
    lines = [
        f"Server site (rows) × client site (columns), successes / {args.runs} runs, seed order "
        f"({args.order}, gap {args.gap:g} s), delay {args.delay_ms:g}±{args.jitter_ms:g} ms per "
        f"hop, loss {args.loss:g}, punch timeout {args.timeout:g} s. Reproduce: `sudo "
        f".venv/bin/{cmd}`.",
        "",
        "| server \\ client | " + " | ".join(MODES) + " |",
        "|---|" + "---|" * len(MODES),
    ]
    for left in MODES:
        cells = []
        for right in MODES:
            wins, times, _ = results[(left, right)]
            mean = f" ({sum(times) / len(times):.1f} s)" if times else ""
            cells.append(f"{wins}/{args.runs}{mean}")
        lines.append(f"| **{left}** | " + " | ".join(cells) + " |")
    publish(lines, args.out, (e for (_, _, errs) in results.values() for e in errs),
            failures_heading="Messages seen on failure:")
    return 0


if __name__ == "__main__":
    sys.exit(main())
