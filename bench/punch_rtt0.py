"""RST/ICMP NAT pairs at near-zero RTT: how often the coordinated punch goes direct.

For each ordered pair of the lab's refusing NAT kinds (``rst``, ``icmp``), one lab
with the given per-hop delay (default 0) and the real ``nopf-server`` (relay on);
``--runs`` pairings in-process (``coordinate`` in a1 and b1), each recording both
peers' timelines. Prints, per pair, direct vs relay and the median setup time of
the joiner (from its start); ``--verbose`` prints the SYNs of each run that did not
go direct and what came back to them.

Before the fix of the punch's retry rules (see "Near-zero round trips" in
docs/protocol.md), at 0 ms per hop an rst sharer facing an icmp joiner went
direct in 6 of 20 runs (docs/BENCHMARKS.md, "Refusing NATs at near-zero RTT").

    sudo .venv/bin/python -m bench.punch_rtt0 [--runs 20] [--delay-ms 0] [--verbose]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import queue
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field

from nopf_web.roles import PeerRole
from nopf_web.sessions.coordination import CoordinationSpec, PairedTunnel, coordinate
from nopf_web.sessions.timeline import Timeline
from nopf_web.wire.address import Endpoint
from tests.e2e.peers import start_rendezvous
from tests.lab.topology import RDV_IP, Host, Lab, cleanup_stale

KINDS = ("rst", "icmp")
RDV = Endpoint(RDV_IP, 3012)


@dataclass
class Side:
    timeline: Timeline = field(default_factory=lambda: Timeline(time.monotonic()))
    tunnel: PairedTunnel | None = None
    error: BaseException | None = None

    @property
    def path(self) -> str:
        return self.tunnel.path if self.tunnel is not None else f"failed: {self.error!r}"

    def setup_ms(self) -> float | None:
        return next((m.data.get("setup_ms") for m in self.timeline.marks if m.kind == "path"),
                    None)

    def answers(self) -> list[str]:
        return [m.data["answer"] for m in self.timeline.marks if m.kind == "answer"]

    def close(self) -> None:
        if self.tunnel is not None:
            self.tunnel.sock.close()


def pair(sharer: Host, joiner: Host, punch_timeout: float = 8.0) -> tuple[Side, Side]:
    """One coordinated pairing through the lab's rendezvous, both timelines kept."""
    codes: queue.Queue[str] = queue.Queue()
    out = {"server": Side(), "client": Side()}

    def run(role: PeerRole, host: Host, spec: CoordinationSpec) -> None:
        side = out[role]
        side.timeline = Timeline(time.monotonic())
        try:
            with host.enter():
                side.tunnel = asyncio.run(coordinate(spec, on_code=codes.put,
                                                     timeline=side.timeline))
        except BaseException as exc:  # reported by the caller
            side.error = exc

    a = threading.Thread(target=run, daemon=True, name="rtt0-sharer", args=(
        "server", sharer, CoordinationSpec(RDV, "server", code_lifetime=20,
                                           punch_timeout=punch_timeout)))
    a.start()
    code = codes.get(timeout=10)
    b = threading.Thread(target=run, daemon=True, name="rtt0-joiner", args=(
        "client", joiner, CoordinationSpec(RDV, "client", code=code,
                                           punch_timeout=punch_timeout)))
    b.start()
    a.join(45)
    b.join(45)
    return out["server"], out["client"]


def show(side: Side, who: str, origin: float) -> None:
    for m in side.timeline.marks:
        if m.kind in ("fire", "syn", "answer", "stage", "stage_failed", "path", "retry"):
            print(f"    {who:6} {(m.at - origin) * 1000:8.1f} ms {m.kind:12} {m.text}")


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--delay-ms", type=float, default=0.0)
    ap.add_argument("--punch-timeout", type=float, default=8.0)
    ap.add_argument("--pairs", default="all", help="e.g. rst-icmp,icmp-rst (sharer-joiner)")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()
    cleanup_stale()
    pairs = list(itertools.product(KINDS, repeat=2)) if args.pairs == "all" else [
        tuple(p.split("-", 1)) for p in args.pairs.split(",")]
    rows = []
    for sharer_kind, joiner_kind in pairs:
        paths: list[str] = []
        setups: list[float] = []
        with Lab(sharer_kind, joiner_kind, delay_ms=args.delay_ms) as lab:
            server = start_rendezvous(lab)
            for i in range(args.runs):
                s, j = pair(lab.a1, lab.b1, args.punch_timeout)
                paths.append(j.path)
                ms = j.setup_ms()
                if ms is not None and j.path == "public":
                    setups.append(ms)
                print(f"{sharer_kind} × {joiner_kind} run {i + 1}: {j.path} {ms} ms",
                      file=sys.stderr, flush=True)
                if args.verbose and j.path != "public":
                    show(s, "sharer", j.timeline.origin)
                    show(j, "joiner", j.timeline.origin)
                s.close()
                j.close()
                time.sleep(0.05)
            server.terminate()
            server.communicate(timeout=10)
        direct = paths.count("public")
        med = f"{statistics.median(setups):.0f} ms" if setups else "-"
        rows.append(f"| {sharer_kind} | {joiner_kind} | {direct}/{len(paths)} | "
                    f"{len(paths) - direct} | {med} |")
    print(f"Per-hop delay {args.delay_ms:g} ms, {args.runs} runs per pair.\n")
    print("| sharer | joiner | direct | not direct | joiner setup, median of direct runs |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
