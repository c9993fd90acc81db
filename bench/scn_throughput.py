"""Scenarios 1 and 7: throughput through each path, one stream and ten, and its CPU cost.

One no-NAT lab (:mod:`bench.paths`): the sender in b1, the counting service in
a1. Each round sends the same amount through every path in turn (the order
rotates per round); figures are medians over the rounds, each a ratio to
direct TCP measured in the same rounds. CPU cost is the user + system time of
the path's own processes during the transfer, per GB moved, for each end (b1:
the sender's side, a1: the service's) and both together.

Each nopf path also has a peer in the same topology, a relay at each end
(:data:`bench.paths.PEERS`): ``ssh -L`` with AES-128-GCM for the encrypted
tunnel, two ``socat -b 262144`` relays for the plain pipe (issue 16). Its
ratios to the peer are medians of the per-round ratios (the peer measured in
the same round, a few seconds apart), which the machine's noise moves less
than a ratio of medians.

Regimes: the lab unshaped (the 2-core CPU is the bottleneck) with one stream
and with ten concurrent streams (ten connections through the same path: one
tunnel, one ssh connection, ten seed pipes or socat pairs), and inet's links
shaped to 1 Gbit/s with one stream (the network is, as on a real internet
path). ``NOPF_BENCH_REGIMES`` (e.g. ``1,10``; keys of :data:`REGIMES`) and
``NOPF_BENCH_PATHS`` (:mod:`bench.paths`) narrow a run by hand.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from bench.paths import (
    LABELS,
    PEERS,
    Bench,
    Path as LabPath,
    cpu_seconds,
    path_notes,
    send_sized,
    started,
)
from bench.report import Progress, ScenarioResult, Target, bar_chart
from bench.scn_util import table

NAME = "throughput"
TITLE = "Throughput of one stream and of ten, and CPU seconds per GB (scenarios 1 and 7)"
BUDGET_S = 600

# key: (title, shaping in Mbit/s (0: none), concurrent streams, rounds in full mode)
REGIMES = {"1": ("unshaped", 0.0, 1, 5), "10": ("unshaped, 10 streams", 0.0, 10, 5),
           "1g": ("1 Gbit/s", 1000.0, 1, 3)}
# Targets of the unshaped regimes against the peer (issue 16), of the shaped one
# against direct TCP (issues 3 and 6; their unshaped versions were retired by issue 16).
PEER_TARGETS = ("encrypted", "plain")
DIRECT_TARGETS = {"plain": (0.80, "issue 3"), "encrypted": (0.40, "issue 6")}
ENDS = ("b1", "a1")


def _one(bench: Bench, path: LabPath, size: int, streams: int,
         ) -> tuple[float, dict[str, float]]:
    """One transfer of ``size`` bytes over ``streams`` connections at once:
    (MB/s, CPU-s of the path's processes per end)."""
    socks = [bench.connect(path.entry()) for _ in range(streams)]
    errors: list[Exception] = []

    def send(sock: Any, share: int) -> None:
        try:
            send_sized(sock, share)
        except Exception as exc:  # reported by the caller, after every thread ended
            errors.append(exc)

    try:
        ends = path.ends()
        before = {end: cpu_seconds(pids) for end, pids in ends.items()}
        share = size // streams
        threads = [threading.Thread(target=send, args=(s, share), name=f"send-{i}")
                   for i, s in enumerate(socks)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - t0
        # Read before closing: the seed pipes exit with their connection.
        cpu = {end: cpu_seconds(pids) - before[end] for end, pids in ends.items()}
    finally:
        for sock in socks:
            sock.close()
        path.release()
    if errors:
        raise RuntimeError(f"{path.label}: a transfer failed: {errors[0]!r}")
    return share * streams / elapsed / 1e6, cpu


def _regime(bench: Bench, paths: dict[str, LabPath], rounds: int, streams: int,
            seconds: float, cap: int, progress: Progress) -> dict[str, Any]:
    names = list(paths)
    # Warm-up transfer per path (not counted): it also sizes the measured ones to
    # about ``seconds`` each, so slow paths don't eat the budget.
    size: dict[str, int] = {}
    for name in names:
        mbs, _ = _one(bench, paths[name], min(cap, 32_000_000), streams)
        size[name] = int(min(cap, max(16e6, mbs * 1e6 * seconds)))
    mb_s: dict[str, list[float]] = {n: [] for n in names}
    cpu_gb: dict[str, dict[str, list[float]]] = {n: {e: [] for e in (*ENDS, "both")}
                                                 for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            mbs, cpu = _one(bench, paths[name], size[name], streams)
            mb_s[name].append(round(mbs, 1))
            gb = size[name] / 1e9
            for end in ENDS:
                cpu_gb[name][end].append(round(cpu[end] / gb, 3))
            cpu_gb[name]["both"].append(round(sum(cpu.values()) / gb, 3))
            progress(f"round {r + 1}/{rounds}, {streams} stream(s): {LABELS[name]} "
                     f"{mbs:.0f} MB/s, {sum(cpu.values()) / gb:.2f} CPU-s/GB")
    med = {n: statistics.median(v) for n, v in mb_s.items()}
    peer_ratio: dict[str, float] = {}
    peer_cpu_ratio: dict[str, float] = {}
    for name, peer in PEERS.items():
        if name in mb_s and peer in mb_s:
            peer_ratio[name] = round(statistics.median(
                a / b for a, b in zip(mb_s[name], mb_s[peer], strict=True)), 3)
            cpu_ratios = [a / b for a, b in zip(cpu_gb[name]["both"], cpu_gb[peer]["both"],
                                                strict=True) if b]
            if cpu_ratios:  # a transfer shorter than a clock tick reads no CPU at all
                peer_cpu_ratio[name] = round(statistics.median(cpu_ratios), 3)
    return {
        "rate_mbit": bench.rate_mbit or None, "rounds": rounds, "streams": streams,
        "size_mb": {n: round(s / 1e6) for n, s in size.items()},
        "mb_s": mb_s, "median_mb_s": {n: round(v, 1) for n, v in med.items()},
        "ratio": {n: round(v / med["direct"], 3) for n, v in med.items()},
        "peer": {n: p for n, p in PEERS.items() if n in peer_ratio},
        "peer_ratio": peer_ratio, "peer_cpu_ratio": peer_cpu_ratio,
        "cpu_s_per_gb": {n: v["both"] for n, v in cpu_gb.items()},
        "cpu_s_per_gb_ends": {n: {e: v[e] for e in ENDS} for n, v in cpu_gb.items()},
        "median_cpu_s_per_gb": {n: (round(statistics.median(v["both"]), 3)
                                    if n != "direct" else None) for n, v in cpu_gb.items()},
        "median_cpu_s_per_gb_ends": {
            n: {e: round(statistics.median(v[e]), 3) for e in ENDS}
            for n, v in cpu_gb.items() if n != "direct"},
    }


def _chosen_regimes(quick: bool) -> list[tuple[str, float, int, int]]:
    keys = [k.strip() for k in os.environ.get("NOPF_BENCH_REGIMES", "").split(",") if k.strip()]
    if not keys:
        keys = ["1", "10"] if quick else list(REGIMES)
    unknown = [k for k in keys if k not in REGIMES]
    if unknown:
        raise ValueError(f"NOPF_BENCH_REGIMES: unknown {unknown}; choose from {list(REGIMES)}")
    return [(t, rate, streams, 1 if quick else rounds)
            for t, rate, streams, rounds in (REGIMES[k] for k in keys)]


def run(progress: Progress, quick: bool, outdir: Path) -> ScenarioResult:
    regimes = _chosen_regimes(quick)
    seconds = 0.4 if quick else 1.5
    cap = 64_000_000 if quick else 1_000_000_000
    data: dict[str, Any] = {"regimes": {}}
    with Bench(progress) as bench, started(bench) as (paths, absent):
        if "direct" not in paths:
            raise RuntimeError(f"no direct path: {absent.get('direct')}")
        data["absent"] = absent
        data["info"] = {n: p.info for n, p in paths.items() if p.info}
        for regime, rate, streams, rounds in regimes:
            bench.shape(rate)
            progress(f"regime {regime}: {rounds} rounds over {', '.join(paths)}")
            data["regimes"][regime] = _regime(bench, paths, rounds, streams, seconds, cap,
                                              progress)
    return ScenarioResult(NAME, TITLE, data, _markdown(data), _plots(data, outdir),
                          _targets(data))


def _targets(data: dict[str, Any]) -> list[Target]:
    out = []
    for regime, d in data["regimes"].items():
        if d["rate_mbit"]:
            for name, (goal, issue) in DIRECT_TARGETS.items():
                if name not in d["ratio"]:
                    continue
                ratio = d["ratio"][name]
                out.append(Target(
                    f"{LABELS[name]} throughput vs direct, {regime}",
                    f">= {goal:.0%} of direct TCP ({issue})",
                    f"{ratio:.2f} ({d['median_mb_s'][name]:.0f} vs "
                    f"{d['median_mb_s']['direct']:.0f} MB/s)",
                    ratio >= goal))
            continue
        for name in PEER_TARGETS:
            if name not in d["peer_ratio"]:
                continue
            peer = LABELS[d["peer"][name]]
            ratio, cpu = d["peer_ratio"][name], d["peer_cpu_ratio"].get(name, float("nan"))
            out.append(Target(
                f"{LABELS[name]} throughput vs {peer}, {regime}",
                ">= the peer's in the same round (issue 16)",
                f"{ratio:.2f} ({d['median_mb_s'][name]:.0f} vs "
                f"{d['median_mb_s'][d['peer'][name]]:.0f} MB/s)", ratio >= 1.0))
            out.append(Target(
                f"{LABELS[name]} CPU per GB vs {peer}, {regime}",
                "<= the peer's, both ends (issue 16)",
                f"{cpu:.2f} ({d['median_cpu_s_per_gb'][name]:.2f} vs "
                f"{d['median_cpu_s_per_gb'][d['peer'][name]]:.2f} CPU-s/GB)", cpu <= 1.0))
    return out


def _markdown(data: dict[str, Any]) -> str:
    out = ["From b1 to a1 in a lab without NAT. Median of the rounds; the ratio to direct "
           "is to direct TCP in the same rounds; the ratio to the peer (the nopf path's "
           "strongest rival in its topology, a relay at each end: ssh -L aes128-gcm for "
           "the encrypted tunnel, two socat -b 262144 relays for the plain pipe) is the "
           "median of the per-round ratios. CPU: user + system seconds of the path's own "
           "processes per GB moved, b1 end (the sender's side), a1 end (the service's "
           "side) and both (direct TCP has none: only the kernel). The sender announces "
           "the size up front and waits for the sink's count (fowl ends a stream on a "
           "half-close, so EOF cannot mark the end). Ten streams: ten connections at once "
           "through the same path, each with a tenth of the bytes.", ""]
    for regime, d in data["regimes"].items():
        rows = []
        for name, mbs in d["median_mb_s"].items():
            cpu = d["median_cpu_s_per_gb"][name]
            ends = d["median_cpu_s_per_gb_ends"].get(name, {})
            runs = ", ".join(f"{v:.0f}" for v in d["mb_s"][name])
            peer = d["peer_ratio"].get(name)
            peer_cpu = d["peer_cpu_ratio"].get(name)

            def f(v: float | None, bold: bool = False) -> str:
                return "-" if v is None else (f"**{v:.2f}**" if bold else f"{v:.2f}")

            rows.append([LABELS[name], f"{mbs:.0f}", f"{d['ratio'][name]:.2f}", f(peer, True),
                         f(cpu), f(ends.get("b1")), f(ends.get("a1")), f(peer_cpu, True),
                         runs])
        out += [f"**{regime}** ({d['rounds']} rounds)", "",
                table(["path", "MB/s (median)", "ratio to direct", "ratio to peer",
                       "CPU-s per GB", "b1 end", "a1 end", "CPU vs peer", "runs (MB/s)"], rows),
                ""]
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
        bar_chart(outdir / "throughput.png", "Throughput through each path (label: ratio "
                  "to direct)", "MB/s (median)", groups, mbs, ratio_labels),
        bar_chart(outdir / "cpu_per_gb.png", "CPU cost of the path's processes, both ends",
                  "CPU seconds per GB", groups[1:], cpu, cpu_labels),
    ]


if __name__ == "__main__":
    import sys

    from bench.report import standalone

    sys.exit(standalone(__name__))
