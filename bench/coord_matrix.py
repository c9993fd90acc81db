"""Coordinated mode across NAT pairs: success rates, the path taken, time to tunnel.

For each (sharer site, connector site) pair of lab NAT behaviours, and for two
hosts behind the same NAT, it builds one lab with the real ``nopf-server``
(relay on, unless ``--no-relay``) and runs ``--runs`` pairings in-process
(``share`` in a1, ``connect`` in b1 or a2), each checked by exchanging random
bytes both ways. Writes a Markdown report.

    sudo .venv/bin/python -m bench.coord_matrix [--runs 20] [--delay-ms 20 --jitter-ms 5]
        [--no-relay] [--out docs/coord-matrix.md]
"""

from __future__ import annotations

import argparse
import itertools
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.report import publish
from tests.e2e.coord_harness import RDV, Gather, exchange, handshake_rtt, pair
from tests.e2e.peers import start_rendezvous
from tests.lab import Lab, gateway as lab_gateway
from tests.lab.topology import RDV_IP6

MODES = ("drop", "rst", "icmp", "symmetric")
# What the sites offer besides their IPv4 NAT (issue 17): "ipv4" nothing (the hellos
# as before), "dualstack" global IPv6 per site behind a stateful firewall of the site's
# kind, "mapped" a gateway in the sharer's NAT that maps ports (NAT-PMP, PCP, IGD);
# "ipv6only" the dual-stack sites, but the connector's with IPv6 only (no IPv4 at all:
# it reaches the rendezvous at its IPv6 address); "mappedconn" the gateway in the
# connector's NAT (its mapping granted before its hello: the harness waits for it).
VARIANTS = ("ipv4", "dualstack", "mapped", "ipv6only", "mappedconn")


@dataclass
class Cell:
    runs: int = 0
    wins: int = 0
    rtt: float = 0.0  # s, median TCP handshake a1 -> rendezvous (= the peer-to-peer RTT here)
    ready_to_up: list[float] = field(default_factory=list)  # connect() called -> both up
    hello_to_up: list[float] = field(default_factory=list)  # joiner's hello sent -> both up
    fail_times: list[float] = field(default_factory=list)
    errors: set[str] = field(default_factory=set)
    paths: set[str] = field(default_factory=set)
    run_paths: list[str] = field(default_factory=list)  # each success's path, in order
    as_predicted: int = 0  # successes whose path is the one predicted at the fire
    # ...and those that missed it with a prediction not certain (a mapping unknown: the
    # in-process peers send no doctor report, and a joiner makes no mapping check)
    missed_uncertain: int = 0


def run_cell(left: str, right: str, same: bool, args: argparse.Namespace, *,
             progress: Callable[[str], None] | None = None, deadline: float | None = None,
             rendezvous_flags: tuple[str, ...] = (), variant: str = "ipv4",
             ) -> Cell:
    """``args.runs`` pairings in one lab (fewer if ``time.monotonic()`` passes ``deadline``).

    ``args.loss`` (optional) is the lab's loss probability per pass through the router;
    ``rendezvous_flags``: nopf-server's (``--no-relay``: punching alone); ``variant``
    one of :data:`VARIANTS`.
    """
    cell = Cell()
    say = progress or (lambda msg: print(msg, file=sys.stderr, flush=True))
    gather = {"ipv4": None, "dualstack": (Gather(), Gather()),
              "mapped": (Gather(ipv6=False, port_mapping=True), Gather(ipv6=False)),
              "ipv6only": (Gather(), Gather()),
              "mappedconn": (Gather(ipv6=False), Gather(ipv6=False, port_mapping=True)),
              }[variant]
    with Lab(left, right, delay_ms=args.delay_ms, jitter_ms=args.jitter_ms,
             loss=getattr(args, "loss", 0.0), ipv6=variant in ("dualstack", "ipv6only"),
             ipv6_only=("b",) if variant == "ipv6only" else ()) as lab:
        if variant in ("mapped", "mappedconn"):  # stopped with the lab
            lab_gateway.start(lab.nata if variant == "mapped" else lab.natb)
        start_rendezvous(lab, *rendezvous_flags)
        cell.rtt = handshake_rtt(lab.a1, RDV)
        joiner = lab.a2 if same else lab.b1
        for i in range(args.runs):
            if deadline is not None and time.monotonic() > deadline:
                break
            try:
                out = pair(lab.a1, joiner, punch_timeout=args.punch_timeout,
                           candidates=gather,
                           joiner_rdv=(RDV_IP6, RDV[1]) if variant == "ipv6only" else None)
            except AssertionError as exc:  # no code, or peers hung: a failed run, not a crash
                cell.runs += 1
                cell.errors.add(str(exc)[:200])
                say(f"run {i + 1}/{args.runs}: FAILED before pairing: {exc}")
                continue
            ok = False
            try:
                if out.sharer is not None and out.joiner is not None:
                    exchange(out.sharer, out.joiner, 4096)
                    ok = True
                    cell.paths.add(out.joiner.path)
                    cell.run_paths.append(out.joiner.path)
                    predicted = out.joiner.prediction
                    held = predicted is not None and predicted.path == out.joiner.path
                    cell.as_predicted += held
                    cell.missed_uncertain += (not held and predicted is not None
                                              and not predicted.certain)
                    up = max(out.sharer.timings.connected, out.joiner.timings.connected)
                    cell.ready_to_up.append(up - out.ready_at)
                    cell.hello_to_up.append(up - out.joiner.timings.hello_sent)
                else:
                    cell.fail_times.append(out.up_at - out.ready_at)
                    for err in out.errors:
                        text = re.sub(r"\d+\.\d+\.\d+\.\d+:\d+", "IP:PORT", err)
                        cell.errors.add(re.sub(r"\d+", "N", text))
            except AssertionError as exc:
                cell.errors.add(f"data check failed: {exc}"[:200])
            finally:
                out.close()
            cell.runs += 1
            cell.wins += ok
            say(f"{'same ' + left if same else left + ' -> ' + right:>22} run {i + 1}/"
                f"{args.runs}: {'ok' if ok else 'FAILED'} "
                f"{(out.up_at - out.ready_at) * 1000:.0f} ms")
            time.sleep(0.05)
    return cell


def fmt_cell(c: Cell) -> str:
    text = f"{c.wins}/{c.runs}"
    if c.ready_to_up:
        paths = ", ".join(sorted(c.paths))
        text += f" ({statistics.median(c.ready_to_up) * 1000:.0f} ms, {paths})"
    elif c.fail_times:
        text += f" (fails in {statistics.median(c.fail_times):.1f} s)"
    return text


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--delay-ms", type=float, default=20)
    ap.add_argument("--jitter-ms", type=float, default=5)
    ap.add_argument("--loss", type=float, default=0.0,
                    help="loss probability per pass through the internet router")
    ap.add_argument("--punch-timeout", type=float, default=8)
    ap.add_argument("--no-relay", action="store_true",
                    help="run nopf-server --no-relay (punching alone)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    flags = ("--no-relay",) if args.no_relay else ()
    cells: dict[tuple[str, str], Cell] = {}
    for left, right in itertools.product(MODES, repeat=2):
        cells[(left, right)] = run_cell(left, right, False, args, rendezvous_flags=flags)
    same = {mode: run_cell(mode, "drop", True, args, rendezvous_flags=flags) for mode in MODES}

    cmd = " ".join(["python -m bench.coord_matrix", *sys.argv[1:]])
    lines = [
        "# Coordinated mode across NAT pairs",
        "",
        "Measured in the namespace lab (`tests/lab/`), with the real `nopf-server` in the "
        "rendezvous host and `nopf_web.sessions.coordination.share` / `connect` run in-process in "
        "a1 (sharer) and b1 (connector), or a1 and a2 for two hosts behind the same NAT. "
        f"Per-hop delay {args.delay_ms:g} ± {args.jitter_ms:g} ms on every packet crossing the "
        f"internet router, punch timeout {args.punch_timeout:g} s, {args.runs} runs per cell, "
        "each checked by exchanging 4 KiB of random bytes both ways. One lab and one "
        "rendezvous per cell; the sharer is waiting with its code when the connector starts. "
        + ("The rendezvous runs `--no-relay` (punching alone)." if args.no_relay else
           "The rendezvous relays (the default): a pair that cannot be punched goes "
           "through it."),
        "",
        f"Reproduce: `sudo .venv/bin/{cmd}`",
        "",
        "## Success rate",
        "",
        "Sharer site (rows) × connector site (columns); in brackets the median time from "
        "`connect()` being called to both tunnels up and the path taken (`public`: "
        "punched, `relay`, `lan`), or how soon a failure is reported.",
        "",
        "| sharer \\ connector | " + " | ".join(MODES) + " |",
        "|---|" + "---|" * len(MODES),
    ]
    for left in MODES:
        lines.append(f"| **{left}** | "
                     + " | ".join(fmt_cell(cells[(left, r)]) for r in MODES) + " |")
    lines += ["", "Two hosts behind the same NAT (a1 shares, a2 connects):", "",
              "| NAT | result | path |", "|---|---|---|"]
    for mode, c in same.items():
        lines.append(f"| **{mode}** | {fmt_cell(c)} | {', '.join(sorted(c.paths)) or '-'} |")

    everything = [*cells.values(), *same.values()]
    rtt = statistics.median(c.rtt for c in everything)
    # Punched runs only: a relayed pair adds the relay (and a short punch first for a
    # symmetric connector facing an ordinary NAT).
    r2u = [t for c in cells.values() for t, p in zip(c.ready_to_up, c.run_paths, strict=True)
           if p == "public"]
    h2u = [t for c in cells.values() for t, p in zip(c.hello_to_up, c.run_paths, strict=True)
           if p == "public"]
    target = 3 * rtt + 0.1
    lines += [
        "",
        "## Time to tunnel (punched runs between two sites)",
        "",
        f"RTT between the sites (median TCP handshake to the rendezvous, which is as far): "
        f"**{rtt * 1000:.0f} ms**. Target: within 3 RTTs + 100 ms = {target * 1000:.0f} ms.",
        "",
        "| interval | median | p90 | max | median in RTTs | within target |",
        "|---|---|---|---|---|---|",
    ]
    for name, values in (("connector's hello sent → both tunnels up", h2u),
                         ("`connect()` called → both tunnels up", r2u)):
        if not values:
            continue
        within = sum(v <= target for v in values)
        lines.append(
            f"| {name} | {statistics.median(values) * 1000:.0f} ms | "
            f"{pct(values, 0.9) * 1000:.0f} ms | {max(values) * 1000:.0f} ms | "
            f"{statistics.median(values) / rtt:.1f} | {within}/{len(values)} |")
    lines += [
        "",
        "The first row is the coordination proper: the hello reaches the rendezvous (½ RTT), "
        "the fire instruction reaches both at the same moment (½ RTT + 20 ms margin), the "
        "SYNs cross and the handshake completes (1 RTT). The second adds the connector's "
        "own setup before its hello: the NAT mapping check (a probe connection, 2 RTTs, and "
        "waiting for its close, 1 RTT) and the coordination connection's handshake (1 RTT).",
    ]
    publish(lines, args.out, (e for c in everything for e in c.errors),
            failures_heading="## Messages seen on failure")
    return 0


if __name__ == "__main__":
    sys.exit(main())
