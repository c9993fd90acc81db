"""Scenarios 1 and 7: one stream's throughput through each path, and its CPU cost.

One no-NAT lab (:mod:`bench.paths`): the sender in b1, the counting service in
a1. Each round sends the same amount through every path in turn (the order
rotates per round); figures are medians over the rounds, each a ratio to
direct TCP measured in the same rounds. CPU cost is the user + system time of
the path's own processes (both ends) during the transfer, per GB moved.

Two regimes: the lab unshaped (the 2-core CPU is the bottleneck) and inet's
links shaped to 1 Gbit/s (the network is, as on a real internet path).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from bench.paths import LABELS, Bench, Path as LabPath, cpu_seconds, path_notes, send_sized, started
from bench.report import Progress, ScenarioResult, Target, bar_chart

NAME = "throughput"
TITLE = "Throughput of one stream, and CPU seconds per GB (scenarios 1 and 7)"
BUDGET_S = 180

TARGETS = {"plain": (0.80, "issue 3"), "encrypted": (0.40, "issue 6")}


def _one(bench: Bench, path: LabPath, size: int) -> tuple[float, float]:
    """One transfer of ``size`` bytes: (MB/s, CPU-s of the path's processes)."""
    sock = bench.connect(path.entry())
    try:
        before = cpu_seconds(path.pids())
        mbs = send_sized(sock, size)
        cpu = cpu_seconds(path.pids()) - before  # read before closing: the seed pipe exits
    finally:
        sock.close()
        path.release()
    return mbs, cpu


def _regime(bench: Bench, paths: dict[str, LabPath], rounds: int, seconds: float,
            cap: int, progress: Progress) -> dict[str, Any]:
    names = list(paths)
    # Warm-up transfer per path (not counted): it also sizes the measured ones to
    # about ``seconds`` each, so slow paths don't eat the budget.
    size: dict[str, int] = {}
    for name in names:
        mbs, _ = _one(bench, paths[name], min(cap, 32_000_000))
        size[name] = int(min(cap, max(16e6, mbs * 1e6 * seconds)))
    mb_s: dict[str, list[float]] = {n: [] for n in names}
    cpu_gb: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            mbs, cpu = _one(bench, paths[name], size[name])
            mb_s[name].append(round(mbs, 1))
            cpu_gb[name].append(round(cpu / (size[name] / 1e9), 3))
            progress(f"round {r + 1}/{rounds}: {LABELS[name]} {mbs:.0f} MB/s")
    med = {n: statistics.median(v) for n, v in mb_s.items()}
    return {
        "rate_mbit": bench.rate_mbit or None, "rounds": rounds,
        "size_mb": {n: round(s / 1e6) for n, s in size.items()},
        "mb_s": mb_s, "median_mb_s": {n: round(v, 1) for n, v in med.items()},
        "ratio": {n: round(v / med["direct"], 3) for n, v in med.items()},
        "cpu_s_per_gb": cpu_gb,
        "median_cpu_s_per_gb": {n: (round(statistics.median(v), 3) if n != "direct" else None)
                                for n, v in cpu_gb.items()},
    }


def run(progress: Progress, quick: bool, outdir: Path) -> ScenarioResult:
    regimes = [("unshaped", 0.0, 1 if quick else 5)]
    if not quick:
        regimes.append(("1 Gbit/s", 1000.0, 3))
    seconds = 0.4 if quick else 1.5
    cap = 64_000_000 if quick else 1_000_000_000
    data: dict[str, Any] = {"regimes": {}}
    with Bench(progress) as bench, started(bench) as (paths, absent):
        if "direct" not in paths:
            raise RuntimeError(f"no direct path: {absent.get('direct')}")
        data["absent"] = absent
        data["info"] = {n: p.info for n, p in paths.items() if p.info}
        for regime, rate, rounds in regimes:
            bench.shape(rate)
            progress(f"regime {regime}: {rounds} rounds over {', '.join(paths)}")
            data["regimes"][regime] = _regime(bench, paths, rounds, seconds, cap, progress)
    return ScenarioResult(NAME, TITLE, data, _markdown(data), _plots(data, outdir),
                          _targets(data))


def _targets(data: dict[str, Any]) -> list[Target]:
    out = []
    for regime, d in data["regimes"].items():
        for name, (goal, issue) in TARGETS.items():
            if name not in d["ratio"]:
                continue
            ratio = d["ratio"][name]
            out.append(Target(
                f"{LABELS[name]} throughput vs direct, {regime}",
                f">= {goal:.0%} of direct TCP ({issue})",
                f"{ratio:.2f} ({d['median_mb_s'][name]:.0f} vs "
                f"{d['median_mb_s']['direct']:.0f} MB/s)",
                ratio >= goal))
    return out


def _markdown(data: dict[str, Any]) -> str:
    out = ["One stream from b1 to a1 in a lab without NAT. Median of the rounds; the ratio "
           "is to direct TCP in the same rounds. CPU: user + system seconds of the path's "
           "own processes, both ends, per GB moved (direct TCP has none: only the kernel). "
           "The sender announces the size up front and waits for the sink's count (fowl "
           "ends a stream on a half-close, so EOF cannot mark the end).", ""]
    for regime, d in data["regimes"].items():
        out += [f"**{regime}** ({d['rounds']} rounds)", "",
                "| path | MB/s (median) | ratio to direct | CPU-s per GB | runs (MB/s) |",
                "|---|---|---|---|---|"]
        for name, mbs in d["median_mb_s"].items():
            cpu = d["median_cpu_s_per_gb"][name]
            runs = ", ".join(f"{v:.0f}" for v in d["mb_s"][name])
            out.append(f"| {LABELS[name]} | {mbs:.0f} | {d['ratio'][name]:.2f} | "
                       f"{'-' if cpu is None else f'{cpu:.2f}'} | {runs} |")
        out.append("")
    out += path_notes(data)
    return "\n".join(out)


def _plots(data: dict[str, Any], outdir: Path) -> list[Path]:
    regimes = data["regimes"]
    names = list(next(iter(regimes.values()))["median_mb_s"])
    groups = [LABELS[n] for n in names]
    mbs = {r: [d["median_mb_s"].get(n) for n in names] for r, d in regimes.items()}
    ratio_labels = {r: [f"{d['ratio'][n]:.2f}" if n in d["ratio"] else "" for n in names]
                    for r, d in regimes.items()}
    cpu = {r: [d["median_cpu_s_per_gb"].get(n) for n in names[1:]] for r, d in regimes.items()}
    cpu_labels = {r: [f"{v:.2f}" if v is not None else "" for v in vals]
                  for r, vals in cpu.items()}
    return [
        bar_chart(outdir / "throughput.png", "One stream through each path (label: ratio "
                  "to direct)", "MB/s (median)", groups, mbs, ratio_labels),
        bar_chart(outdir / "cpu_per_gb.png", "CPU cost of the path's processes, both ends",
                  "CPU seconds per GB", groups[1:], cpu, cpu_labels),
    ]
