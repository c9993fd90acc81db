"""Scenario 5: punch success rate per NAT pair, coordinated mode, with jitter and loss.

Per pair one lab with delay, jitter and 1 % loss on every pass through the
internet router, the real ``nopf-server`` on rdv (``--no-relay``: punching
alone; and once more for the symmetric pair with the relay) and coordinated peers run
in-process (``share`` in a1, ``connect`` in b1, or in a2 behind the same NAT),
each run checked by exchanging random bytes both ways - the runs of
:mod:`bench.coord_matrix`, reused. The baseline for the times is the RTT
measured in the same lab (TCP handshake a1 -> rdv).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from bench.coord_matrix import Cell, run_cell
from bench.report import Progress, ScenarioResult, Target
from bench.scn_util import fmt, in_rtts, median, new_figure, save_figure, table

NAME = "punch"
TITLE = "Punch success rate per NAT pair (coordinated mode, jitter and 1 % loss)"
BUDGET_S = 240

DELAY_MS, JITTER_MS, LOSS = 10.0, 5.0, 0.01
PUNCH_TIMEOUT = 5.0
# (label, sharer site NAT, connector site NAT, both behind the sharer's NAT, relay on)
# Symmetric first: its runs fail fast, and the time they leave goes to the others.
PAIRS: tuple[tuple[str, str, str, bool, bool], ...] = (
    ("symmetric", "symmetric", "symmetric", False, False),
    ("silent-drop", "drop", "drop", False, False),
    ("RST", "rst", "rst", False, False),
    ("ICMP", "icmp", "icmp", False, False),
    ("same NAT (silent-drop)", "drop", "drop", True, False),
    ("symmetric, relay on", "symmetric", "symmetric", False, True),
)


def run(progress: Progress, quick: bool, outdir: Path) -> ScenarioResult:
    runs = 2 if quick else 50
    args = argparse.Namespace(runs=runs, delay_ms=DELAY_MS, jitter_ms=JITTER_MS, loss=LOSS,
                              punch_timeout=PUNCH_TIMEOUT)
    # Each pair may use its share of the budget plus whatever earlier pairs left over.
    spend = BUDGET_S - 15 if not quick else 14
    t0 = time.monotonic()
    cells: dict[str, Cell] = {}
    for k, (label, left, right, same, relay) in enumerate(PAIRS):
        progress(f"{label}: {runs} pairings")
        cells[label] = run_cell(left, right, same, args, progress=progress,
                                deadline=t0 + spend * (k + 1) / len(PAIRS),
                                rendezvous_flags=() if relay else ("--no-relay",))

    rows = []
    data: dict[str, Any] = {"runs_wanted": runs, "delay_ms": DELAY_MS, "jitter_ms": JITTER_MS,
                            "loss": LOSS, "punch_timeout_s": PUNCH_TIMEOUT, "pairs": {}}
    for label, c in cells.items():
        ok_t, fail_t = median(c.ready_to_up), median(c.fail_times)
        rows.append([label, f"{c.wins}/{c.runs}",
                     fmt(100 * c.wins / c.runs if c.runs else float("nan"), ".0f", " %"),
                     fmt(c.rtt * 1000, ".1f"), fmt(ok_t * 1000), fmt(in_rtts(ok_t, c.rtt), ".1f"),
                     fmt(fail_t * 1000), ", ".join(sorted(c.paths)) or "-"])
        data["pairs"][label] = {
            "runs": c.runs, "wins": c.wins, "rtt_s": c.rtt, "ready_to_up_s": c.ready_to_up,
            "hello_to_up_s": c.hello_to_up, "fail_s": c.fail_times,
            "errors": sorted(c.errors), "paths": sorted(c.paths)}
    sym, relayed = cells["symmetric"], cells["symmetric, relay on"]
    sym_named = bool(sym.errors) and all("symmetric" in e.lower() for e in sym.errors)
    md = [
        f"Coordinated mode, in-process peers (`bench.coord_matrix.run_cell`): one lab per "
        f"pair with {DELAY_MS:g} ± {JITTER_MS:g} ms delay and {LOSS:.0%} loss on every pass "
        "through the internet router, the real `nopf-server` on rdv; `share` in a1, `connect` "
        "in b1 (a2 for the same-NAT pair), each run checked by exchanging 4 KiB of random "
        f"bytes both ways; punch timeout {PUNCH_TIMEOUT:g} s. The rendezvous runs with "
        "`--no-relay` (punching alone) but for the last row, the symmetric pair again with "
        "its relay (the ladder: relayed at once). Time = `connect()` called → "
        "both ends connected (successes) or → the failure reported. The RTT baseline is "
        "the TCP handshake a1 → rdv measured in the same lab. Seed mode across NAT pairs "
        "is covered by `bench.nat_matrix` (not re-run here, for time). Each pair gets its "
        "share of the time budget plus what earlier pairs left; a pair with fewer than "
        f"{runs} runs ran out of it.",
        "",
        table(["pair", "connected", "success rate", "RTT ms", "median time ms",
               "in RTTs", "median time to failure ms", "path"], rows),
    ]
    failures = sorted({e for c in cells.values() for e in c.errors})
    if failures:
        md += ["", "Messages seen on failure:", ""] + [f"- `{e}`" for e in failures]

    fig, ax = new_figure()
    labels = list(cells)
    rates = [100 * c.wins / c.runs if c.runs else 0.0 for c in cells.values()]
    bars = ax.bar(range(len(labels)), rates, color=["tab:green" if r >= 95 else "tab:orange"
                                                    if r > 0 else "tab:red" for r in rates])
    for bar, c in zip(bars, cells.values(), strict=True):
        t = median(c.ready_to_up) if c.ready_to_up else median(c.fail_times)
        what = "ok" if c.ready_to_up else "fails"
        ax.annotate(f"{c.wins}/{c.runs}\n{what} {fmt(t * 1000)} ms",
                    (bar.get_x() + bar.get_width() / 2, max(bar.get_height(), 2)),
                    ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(labels)), labels, rotation=15, fontsize=8)
    ax.set_ylim(0, 118)
    ax.set_ylabel("punch success (%)")
    ax.set_title(f"Coordinated punch, {DELAY_MS:g}±{JITTER_MS:g} ms, {LOSS:.0%} loss")
    plot = save_figure(fig, outdir / "punch_success.png")

    targets = [Target(
        "symmetric/symmetric fails fast, naming the cause",
        "fails quickly, the message naming the cause (issue 7)",
        f"{sym.runs - sym.wins}/{sym.runs} failed, median {fmt(median(sym.fail_times) * 1000)}"
        f" ms; message {'names' if sym_named else 'does NOT name'} the symmetric NAT",
        sym.wins == 0 and sym.runs > 0 and sym_named),
        Target("symmetric/symmetric connects through the relay",
               "every run connected, over the relay (issue 12)",
               f"{relayed.wins}/{relayed.runs} connected, median "
               f"{fmt(median(relayed.ready_to_up) * 1000)} ms, path "
               f"{', '.join(sorted(relayed.paths)) or '-'}",
               relayed.runs > 0 and relayed.wins == relayed.runs
               and relayed.paths == {"relay"})]
    return ScenarioResult(NAME, TITLE, data, "\n".join(md), [plot], targets)


if __name__ == "__main__":
    from bench.report import standalone

    sys.exit(standalone(__name__))
