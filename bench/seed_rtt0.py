"""Seed-mode punches between two drop NATs at near-zero RTT: how many connect.

One drop/drop lab (``--delay-ms`` per hop, default 0), the real ``nopf-server``;
each run starts ``nopf -t server`` in a1 and ``nopf -t client`` in b1 (as the
setup scenario does), gives each the other's address at the same moment and
waits for one byte from an app at b1 to reach the service at a1. At 0 ms both
peers' SYNs meet within microseconds: before the punch handled a peer SYN that
arrives while the arming TTL is still set ("clipped", docs/protocol.md section
3), about one run in 100 never connected. A failed run prints the NATs'
tracking of the punch pair (``conntrack -L``, when the tool is installed).

    sudo .venv/bin/python -m bench.seed_rtt0 [--runs 200] [--delay-ms 0] [--json F]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.scn_setup import first_byte, stop
from tests.e2e.peers import listening, start_peer, start_rendezvous
from tests.lab.topology import Lab, cleanup_stale

SERVICE_PORT = 3000
WAIT_S = 4.0  # for the byte: a punch that connects at all does so within ~1 s here


def tracking(lab: Lab, ports: tuple[str, str]) -> str:
    """Both NATs' conntrack entries that mention one of the punch ports."""
    if shutil.which("conntrack") is None:
        return "(conntrack not installed)"
    lines = []
    for name, nat in (("nat a", lab.nata), ("nat b", lab.natb)):
        out = subprocess.run(nat.command(["conntrack", "-L"]), capture_output=True,
                             text=True, timeout=10, check=False).stdout
        lines += [f"{name}: {line}" for line in out.splitlines()
                  if any(f"port={p} " in line or line.endswith(f"port={p}") for p in ports)]
    return "\n".join(lines) or "(no entry)"


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--delay-ms", type=float, default=0.0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    cleanup_stale()
    times: list[float] = []
    failures: list[str] = []
    with Lab("drop", "drop", delay_ms=args.delay_ms) as lab:
        start_rendezvous(lab)
        with listening(lab.a1, SERVICE_PORT) as service:
            for i in range(args.runs):
                port = 4000 + i % 1000
                s = start_peer(lab.a1, "server", SERVICE_PORT, timeout=WAIT_S + 2)
                c = start_peer(lab.b1, "client", port, timeout=WAIT_S + 2)
                try:
                    sp, cp = s.line(10), c.line(10)
                    if not (sp and cp):
                        raise SystemExit(f"no public address: {s.stderr()} {c.stderr()}")
                    t0 = time.monotonic()
                    s.enter(cp)
                    c.enter(sp)
                    try:
                        through, _ = first_byte(lab.b1, port, service, t0, WAIT_S)
                    except RuntimeError as exc:
                        ports = (sp.rsplit(":", 1)[1], cp.rsplit(":", 1)[1])
                        failures.append(f"run {i + 1}: {exc}\n{tracking(lab, ports)}")
                        print(failures[-1], file=sys.stderr, flush=True)
                        continue
                    times.append(through)
                    print(f"run {i + 1}: {through * 1000:.0f} ms", file=sys.stderr, flush=True)
                finally:
                    stop(s, c)
    ok = len(times)
    median = statistics.median(times) * 1000 if times else None
    print(f"per-hop delay {args.delay_ms:g} ms: {ok}/{args.runs} connected"
          + (f", first byte through in {median:.0f} ms (median)" if median else ""))
    if args.json:
        args.json.write_text(json.dumps({"runs": args.runs, "connected": ok,
                                         "median_ms": median, "failures": failures}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
