"""The NAT matrix of coordinated mode with the relay on: every pair connected, and how.

Per pair of lab NAT kinds (sharer site x connector site, every kind including
symmetric) and for two hosts behind one NAT, one lab with the real ``nopf-server``
on rdv (its relay on, the default) and coordinated peers run in-process (``share``
in a1, ``connect`` in b1 or a2), each run checked by exchanging random bytes both
ways: the runs of :func:`bench.coord_matrix.run_cell`. The path each pair took
(``public``: punched, ``relay``, ``lan``, ``ipv6``, ``mapped``) is what the ladder chose.

Issue 17's columns: the same pairs when both sites also have global IPv6 behind a
stateful firewall of their kind ("dual stack"), when the connector's site has IPv6
only ("IPv6-only connector"), when the sharer's gateway maps ports ("mapped": the lab
gateway in nata, NAT-PMP, PCP and UPnP-IGD), and when the connector's does ("mapped
connector", in natb); with the share of pairs that connect directly (any path but the
relay), and how often the path predicted at the fire was the path taken.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path
from typing import Any

from bench.coord_matrix import MODES, VARIANTS, Cell, run_cell
from bench.report import Progress, ScenarioResult, Target, bar_chart
from bench.scn_util import fmt, median, table

NAME = "matrix"
TITLE = "NAT matrix with the relay: every pair connected, and the path it took"
BUDGET_S = 900

DELAY_MS, JITTER_MS = 10.0, 2.0
PUNCH_TIMEOUT = 10.0
# Quick mode: the pairs that exercise each rung (punched, relayed at once, relayed
# after a short punch, LAN behind a symmetric NAT).
QUICK = (("drop", "rst", False, "ipv4"), ("symmetric", "drop", False, "ipv4"),
         ("drop", "symmetric", False, "ipv4"), ("symmetric", "symmetric", False, "ipv4"),
         ("symmetric", "drop", True, "ipv4"),
         # issue 17: what the relay carried before goes direct
         ("symmetric", "symmetric", False, "dualstack"), ("drop", "symmetric", False, "mapped"),
         ("symmetric", "symmetric", False, "ipv6only"),
         ("symmetric", "symmetric", False, "mappedconn"))
SUFFIX = {"ipv4": "", "dualstack": " dual stack", "mapped": " mapped",
          "ipv6only": " IPv6-only connector", "mappedconn": " mapped connector"}
COLUMNS = {"ipv4": "IPv4 only", "dualstack": "dual stack", "mapped": "mapped sharer",
           "ipv6only": "IPv6-only connector", "mappedconn": "mapped connector"}


def expected_path(left: str, right: str, same: bool, variant: str = "ipv4") -> str:
    """What the ladder should take: the LAN behind one NAT; IPv6 when both sites have it
    (its rung comes first, and a stateful firewall of any kind lets the timed
    simultaneous open through); the sharer's mapped port when its gateway maps; else
    the relay when a symmetric NAT faces another NAT, else a punched public path."""
    if same:
        return "lan"
    if variant in ("dualstack", "ipv6only"):
        return "ipv6"
    if variant in ("mapped", "mappedconn"):
        return "mapped"
    return "relay" if "symmetric" in (left, right) else "public"


def _key(left: str, right: str, same: bool, variant: str) -> str:
    return (f"same {left}" if same else f"{left} x {right}") + SUFFIX[variant]


def run(progress: Progress, quick: bool, outdir: Path) -> ScenarioResult:
    runs = 1 if quick else 5
    args = argparse.Namespace(runs=runs, delay_ms=DELAY_MS, jitter_ms=JITTER_MS, loss=0.0,
                              punch_timeout=PUNCH_TIMEOUT)
    pairs = QUICK if quick else (
        *((left, right, False, variant) for variant in VARIANTS
          for left, right in itertools.product(MODES, repeat=2)),
        *((mode, "drop", True, "ipv4") for mode in MODES))
    spend = (BUDGET_S - 20) if not quick else 90
    t0 = time.monotonic()
    cells: dict[tuple[str, str, bool, str], Cell] = {}
    for k, (left, right, same, variant) in enumerate(pairs):
        label = (f"same {left}" if same else f"{left} -> {right}") + SUFFIX[variant]
        progress(f"{label}: {runs} pairings")
        cells[(left, right, same, variant)] = run_cell(
            left, right, same, args, progress=progress,
            deadline=t0 + spend * (k + 1) / len(pairs), variant=variant)
    data: dict[str, Any] = {"runs_wanted": runs, "delay_ms": DELAY_MS, "jitter_ms": JITTER_MS,
                            "punch_timeout_s": PUNCH_TIMEOUT, "cells": {}}
    for (left, right, same, variant), c in cells.items():
        data["cells"][_key(left, right, same, variant)] = {
            "sharer": left, "connector": "same NAT" if same else right, "variant": variant,
            "runs": c.runs, "wins": c.wins, "paths": sorted(c.paths), "run_paths": c.run_paths,
            "expected_path": expected_path(left, right, same, variant), "rtt_s": c.rtt,
            "ready_to_up_s": c.ready_to_up, "errors": sorted(c.errors),
            "as_predicted": c.as_predicted, "missed_uncertain": c.missed_uncertain}
    data["direct"] = _direct_shares(data["cells"])
    return ScenarioResult(NAME, TITLE, data, _markdown(data, quick), _plots(data, outdir),
                          _targets(data))


def _plots(data: dict[str, Any], outdir: Path) -> list[Path]:
    """Setup time per pair, each bar labelled with the path the ladder took."""
    cells = data["cells"]
    keys = list(cells)
    ms = [None if not c["ready_to_up_s"] else median(c["ready_to_up_s"]) * 1000
          for c in cells.values()]
    labels = [(", ".join(c["paths"]) or "failed") + f" {c['wins']}/{c['runs']}"
              for c in cells.values()]
    return [bar_chart(outdir / "nat_matrix_paths.png",
                      "Time to connected per NAT pair (relay on), and the path",
                      "ms (median, connect() to both ends up)",
                      [k.replace(" x ", "\nx ") for k in keys], {"setup": ms},
                      {"setup": labels})]


def _direct_shares(cells: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Per variant, over the pairs of two sites: pairs whose every run connected directly
    (any path but the relay), and runs that did."""
    out: dict[str, dict[str, int]] = {}
    for variant in VARIANTS:
        mine = [c for c in cells.values()
                if c.get("variant", "ipv4") == variant and c["connector"] != "same NAT"]
        if not mine:
            continue
        out[variant] = {
            "pairs": len(mine),
            "pairs_direct": sum(bool(c["run_paths"]) and "relay" not in c["run_paths"]
                                and c["wins"] == c["runs"] for c in mine),
            "runs": sum(c["runs"] for c in mine),
            "runs_direct": sum(p != "relay" for c in mine for p in c["run_paths"]),
            "wins": sum(c["wins"] for c in mine),
            "as_predicted": sum(c.get("as_predicted", 0) for c in mine),
            "missed_uncertain": sum(c.get("missed_uncertain", 0) for c in mine)}
    return out


def _targets(data: dict[str, Any]) -> list[Target]:
    cells = data["cells"].values()
    runs = sum(c["runs"] for c in cells)
    wins = sum(c["wins"] for c in cells)
    wrong = [k for k, c in data["cells"].items() if c["paths"] != [c["expected_path"]]]
    held = sum(c.get("as_predicted", 0) for c in cells)
    unsure = sum(c.get("missed_uncertain", 0) for c in cells)
    return [
        Target("coordinated pairs connected, every lab NAT kind incl. symmetric",
               "100 % connected (issue 12)",
               f"{wins}/{runs} runs in {len(data['cells'])} pairs", runs > 0 and wins == runs),
        Target("the path per pair", "LAN behind one NAT, relay when a symmetric NAT faces "
               "another NAT, else punched (issue 12); IPv6 or the mapped port when the "
               "sites have them (issue 17)",
               "as expected in every pair" if not wrong else f"unexpected in {', '.join(wrong)}",
               not wrong),
        Target("the path predicted at the fire", "the path taken, in every run whose "
               "prediction was certain",
               f"{held}/{wins} runs; the {unsure} others not certain (a joiner's mapping "
               "unknown: these peers send no doctor report)", wins > 0 and held + unsure == wins)]


def _markdown(data: dict[str, Any], quick: bool) -> str:
    cells = data["cells"]

    def cell(key: str) -> str:
        c = cells.get(key)
        if c is None:
            return "-"
        t = median(c["ready_to_up_s"])
        paths = ", ".join(c["paths"]) or "failed"
        return f"{c['wins']}/{c['runs']} {paths} ({fmt(t * 1000)} ms)"

    md = [f"Coordinated mode with the relay on (the default), in-process peers "
          f"(`bench.coord_matrix.run_cell`): one lab per pair with {DELAY_MS:g} ± "
          f"{JITTER_MS:g} ms delay on every pass through the internet router (RTT about "
          f"{2 * DELAY_MS:g} ms between the sites), the real `nopf-server` on rdv, `share` in "
          "a1 and `connect` in b1 (a2 behind the same NAT), each run checked by "
          "exchanging 4 KiB of random bytes both ways; punch timeout "
          f"{PUNCH_TIMEOUT:g} s. Each cell: runs connected / runs, the path the ladder took, "
          "the median time from `connect()` called to both ends connected. "
          + ("Quick mode: the pairs that exercise each rung, one run each."
             if quick else f"{data['runs_wanted']} runs per pair."), ""]
    if not quick:
        rows = [[f"**{left}**", *(cell(f"{left} x {right}") for right in MODES)]
                for left in MODES]
        md += [table(["sharer \\ connector", *MODES], rows), "",
               "Two hosts behind the same NAT (a1 shares, a2 connects):", "",
               table(["NAT", "result"], [[f"**{m}**", cell(f"same {m}")] for m in MODES]),
               "", "The same pairs with IPv6 (dual stack; the connector's site with IPv6 only) "
               "and with a mapping gateway at the sharer or the connector, beside IPv4 "
               "alone:", "",
               table(["sharer x connector", *(COLUMNS[v] for v in VARIANTS)],
                     [[f"{left} x {right}",
                       *(cell(f"{left} x {right}{SUFFIX[v]}") for v in VARIANTS)]
                      for left, right in itertools.product(MODES, repeat=2)])]
    else:
        md.append(table(["pair", "result", "expected path"],
                        [[k, cell(k), c["expected_path"]] for k, c in cells.items()]))
    shares = data.get("direct", {})
    if shares:
        md += ["", "Pairs of two sites that connect directly (any path but the relay), and "
               "the runs whose path was the one predicted at the fire, before the first "
               "SYN (in brackets: missed by a prediction not certain, a symmetric "
               "connector's mapping being unknown without its doctor report):", "",
               table(["sites", "pairs direct", "runs direct", "as predicted"],
                     [[COLUMNS[v], f"{s['pairs_direct']}/{s['pairs']}",
                       f"{s['runs_direct']}/{s['runs']}",
                       f"{s['as_predicted']}/{s['wins']}"
                       + (f" ({s['missed_uncertain']} not certain)"
                          if s["missed_uncertain"] else "")] for v, s in shares.items()])]
    failures = sorted({e for c in cells.values() for e in c["errors"]})
    if failures:
        md += ["", "Messages seen on failure:", ""] + [f"- `{e}`" for e in failures]
    md += ["", "A symmetric sharer facing a NAT is relayed at once (the sharer's mapping "
           "check tells the rendezvous); a symmetric *connector* makes no mapping check "
           "(it would cost every pair three round trips), so it punches for "
           "`min(budget, 3 s + 4 × RTT)` first, then goes to the relay: that cell's time."]
    return "\n".join(md)


if __name__ == "__main__":
    from bench.report import standalone

    sys.exit(standalone(__name__))
