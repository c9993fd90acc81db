"""Punch many times with and without the packet guard across NAT situations.

Run as root from the repository root::

    .venv/bin/python -m bench.guard_matrix --runs 20

For every NAT pair it builds one namespace lab (``tests.lab.Lab``, netem-like
delay and jitter on the internet router), starts nopf's rendezvous in it, and
for every strategy and firing order runs ``--runs`` punches with the guard on
both peers and as many without, interleaved (on, off, on, off...) so that
slow drifts hit both alike. A run succeeds when both peers got a connected
socket within ``--timeout`` s and one byte crossed each way.

Each peer runs in a thread moved into its host's namespace; it does what
``nopf`` does: discovery (guarded), then the punch (guarded), then the tunnel
(unguarded); see ``tests/e2e/guard_harness.py``. nftables counters in each
NAT namespace count the RST segments the hosts sent to the other site - the
packets the guard is there to keep in.

Strategies:

``nopf``   nopf's punch as shipped: the server arms with TTL-2 SYNs (which
           never reach the peer's NAT), the client repeats full SYNs.
``ttl0``   nopf with ``--punch-ttl 0``: both send full-TTL SYNs (repeated
           TCP simultaneous open).
``seed``   the seed's one-shot sequence: server SYN, abandon, listen;
           client one connect.

Orders: ``server-first`` (the seed's: the server enters the address first,
the client fires ``--offset`` s later) and ``client-first``.

The table is printed as Markdown; ``--json`` also writes every run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from nopf_web.punch.machine import PunchConfig, Tactic
from tests.e2e.guard_harness import (
    NatCounters,
    PairResult,
    Side,
    close_rules,
    punch_pair,
    rendezvous,
)
from tests.lab import Lab, lab_unavailable_reason

STRATEGIES = ("nopf", "ttl0", "seed")
ORDERS = ("server-first", "client-first")
NATS = ("drop/drop", "rst/rst", "icmp/icmp", "rst/icmp", "icmp/rst", "rst/none", "icmp/none")


@dataclass
class Cell:
    nats: str
    strategy: str
    order: str
    runs: dict[str, list[dict[str, object]]] = field(
        default_factory=lambda: {"off": [], "on": []})

    def ok(self, mode: str) -> int:
        return sum(1 for r in self.runs[mode] if r["ok"])

    def times(self, mode: str) -> list[float]:
        return sorted(float(str(r["seconds"])) for r in self.runs[mode] if r["ok"])

    def quantile(self, mode: str, q: float) -> float | None:
        times = self.times(mode)
        return times[min(len(times) - 1, int(q * len(times)))] if times else None

    def total(self, mode: str, key: str) -> int:
        return sum(int(str(r[key])) for r in self.runs[mode])


def one_run(lab: Lab, rdv: tuple[str, int], strategy: str, order: str, guard: bool,
            timeout: float, offset: float) -> dict[str, object]:
    config = PunchConfig(timeout=timeout, arm_ttl=0 if strategy == "ttl0" else 2)
    kind = "seed" if strategy == "seed" else "nopf"
    server_delay, client_delay = (0.0, offset) if order == "server-first" else (offset, 0.0)
    server = Side(lab.a1, Tactic.ARM, guard, server_delay, config, kind)
    client = Side(lab.b1, Tactic.CONNECT, guard, client_delay, config, kind)
    with NatCounters(lab.nata, close_rules(lab.a1.ip, not_dst=lab.rdv.ip)) as ca, \
            NatCounters(lab.natb, close_rules(lab.b1.ip, not_dst=lab.rdv.ip)) as cb:
        result: PairResult = punch_pair(server, client, rdv)
        time.sleep(0.3)  # let late segments reach the counters
        a, b = ca.read(), cb.read()
    # From the moment the later peer fired: that side's own punch duration.
    seconds = min(result.server.seconds or 0.0, result.client.seconds or 0.0)
    return {
        "ok": result.ok,
        "seconds": round(seconds, 3),
        "server_seconds": result.server.seconds, "client_seconds": result.client.seconds,
        "server_ok": result.server.ok, "client_ok": result.client.ok,
        "attempts": [result.server.attempts, result.client.attempts],
        "guard_dropped_punch": result.server.dropped_punch + result.client.dropped_punch,
        "guard_dropped_discovery": (result.server.dropped_discovery
                                    + result.client.dropped_discovery),
        "rst_out": a["rst"] + b["rst"],
        "finack_out": a["finack"] + b["finack"],
        "guarded": result.server.guarded and result.client.guarded if guard else False,
        "errors": [e for e in (result.server.error, result.client.error) if e],
    }


def fisher_p(ok1: int, n1: int, ok2: int, n2: int) -> float:
    """Two-sided Fisher exact test: how likely success counts this far apart are by chance."""
    total_ok, n = ok1 + ok2, n1 + n2

    def prob(k: int) -> float:
        return math.comb(total_ok, k) * math.comb(n - total_ok, n1 - k) / math.comb(n, n1)

    observed = prob(ok1)
    ks = range(max(0, total_ok - n2), min(total_ok, n1) + 1)
    return min(1.0, sum(prob(k) for k in ks if prob(k) <= observed * (1 + 1e-9)))


def fmt_rate(cell: Cell, mode: str) -> str:
    n = len(cell.runs[mode])
    return f"{cell.ok(mode)}/{n}" if n else "-"


def fmt_s(value: float | None) -> str:
    return f"{value:.2f}" if value is not None else "-"


def table(cells: list[Cell]) -> str:
    """Columns per guard mode ("-" / "+"): successes; successes within 1 s of the
    later peer firing; 90th percentile of that time; Fisher p of the two success
    counts; RSTs the hosts sent towards the other site; packets the guard dropped."""
    head = ("| NATs server/client | strategy | order | ok − | ok + | ≤1 s − | ≤1 s + "
            "| p90 s − | p90 s + | p | RSTs to peer − | RSTs to peer + | guard drops |")
    rule = "|" + "---|" * 13
    rows = [head, rule]
    for c in cells:
        n_off, n_on = len(c.runs["off"]), len(c.runs["on"])
        fast = {m: sum(1 for t in c.times(m) if t <= 1.0) for m in ("off", "on")}
        rows.append(
            f"| {c.nats} | {c.strategy} | {c.order} | {fmt_rate(c, 'off')} | {fmt_rate(c, 'on')} "
            f"| {fast['off']}/{n_off} | {fast['on']}/{n_on} "
            f"| {fmt_s(c.quantile('off', 0.9))} | {fmt_s(c.quantile('on', 0.9))} "
            f"| {fisher_p(c.ok('off'), n_off, c.ok('on'), n_on):.2f} "
            f"| {c.total('off', 'rst_out')} | {c.total('on', 'rst_out')} "
            f"| {c.total('on', 'guard_dropped_punch')} |")
    return "\n".join(rows)


def load(path: Path) -> list[Cell]:
    data = json.loads(path.read_text())
    return [Cell(c["nats"], c["strategy"], c["order"], c["runs"]) for c in data["cells"]]


def parse_list(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    for item in items:
        if item not in allowed:
            raise SystemExit(f"unknown {what} {item!r}: choose from {', '.join(allowed)}")
    return items


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.guard_matrix", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=20, help="runs per cell and guard mode")
    p.add_argument("--timeout", type=float, default=10.0, help="punch timeout, s (default 10)")
    p.add_argument("--offset", type=float, default=0.5,
                   help="how much later the second peer fires, s (default 0.5)")
    p.add_argument("--delay-ms", type=float, default=20.0, help="one-way delay per inet pass")
    p.add_argument("--jitter-ms", type=float, default=5.0, help="uniform jitter per inet pass")
    p.add_argument("--nats", default=",".join(NATS), help=f"NAT pairs ({', '.join(NATS)})")
    p.add_argument("--strategies", default=",".join(STRATEGIES),
                   help=f"punch strategies ({', '.join(STRATEGIES)})")
    p.add_argument("--orders", default=",".join(ORDERS), help=f"({', '.join(ORDERS)})")
    p.add_argument("--json", type=Path, help="also write every run here")
    p.add_argument("--render", type=Path, nargs="+", metavar="JSON",
                   help="run nothing: print the table of earlier --json files")
    args = p.parse_args(argv)
    if args.render:
        print(table([cell for path in args.render for cell in load(path)]))
        return 0
    nats = parse_list(args.nats, NATS, "NAT pair")
    strategies = parse_list(args.strategies, STRATEGIES, "strategy")
    orders = parse_list(args.orders, ORDERS, "order")
    reason = lab_unavailable_reason(need_iptables=True)
    if reason:
        print(f"guard_matrix: {reason}", file=sys.stderr)
        return 2

    cells: list[Cell] = []
    started = time.monotonic()
    for pair in nats:
        left, right = pair.split("/")
        with Lab(left, right, delay_ms=args.delay_ms, jitter_ms=args.jitter_ms) as lab, \
                rendezvous(lab.rdv) as rdv:
            for strategy in strategies:
                for order in orders:
                    cell = Cell(pair, strategy, order)
                    cells.append(cell)
                    for i in range(2 * args.runs):
                        guard = i % 2 == 0
                        run = one_run(lab, rdv, strategy, order, guard, args.timeout,
                                      args.offset)
                        cell.runs["on" if guard else "off"].append(run)
                    print(f"# {pair} {strategy} {order}: no guard {fmt_rate(cell, 'off')}, "
                          f"guard {fmt_rate(cell, 'on')} "
                          f"({time.monotonic() - started:.0f} s)", file=sys.stderr, flush=True)
    print(table(cells))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "cells": [asdict(c) for c in cells]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
