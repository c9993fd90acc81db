"""Scenario 3: request/response round trips through each path, idle and under bulk.

32-byte request, 32-byte answer (:func:`bench.measure.round_trips`), from b1
to the echo service in a1, in a lab without NAT:

- idle: one echo connection per path, all open at once, measured in
  alternating batches so the machine's noise hits every path alike;
- under bulk: per path, a sender process in b1 moves data as fast as it can
  on a second connection of the same path while the round trips run. For the
  encrypted tunnel, ssh and fowl both connections share one tunnel; nopf's seed
  mode pipes one connection per punch, so its bulk runs on a second punched
  pipe between the same hosts.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from bench.measure import echo_mode, round_trips
from bench.paths import LABELS, Bench, Path as LabPath, path_notes, started
from bench.report import Progress, ScenarioResult, Target, bar_chart
from bench.scn_util import table

NAME = "latency"
TITLE = "Request/response latency, idle and under a bulk transfer (scenario 3)"
BUDGET_S = 150


def _p99(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=100)[98] if len(samples) >= 2 else samples[0]


def _idle(bench: Bench, paths: dict[str, LabPath], pings: int, limit_s: float,
          ) -> dict[str, list[float]]:
    socks = {n: echo_mode(bench.connect(p.entry(), timeout=30)) for n, p in paths.items()}
    samples: dict[str, list[float]] = {n: [] for n in paths}
    try:
        batch = max(1, pings // 20)
        for _ in range(20):
            for name, sock in socks.items():
                # A slow path (tens of ms per round trip) stops early, with fewer samples.
                if sum(samples[name]) < limit_s * 1e3:
                    samples[name] += round_trips(sock, batch)
    finally:
        for sock in socks.values():
            sock.close()
        for p in paths.values():
            p.release()
    return samples


def _under_bulk(bench: Bench, path: LabPath, pings: int, limit_s: float,
                ) -> tuple[list[float], float]:
    """Round trips while a bulk sender runs on the same path; (samples, bulk MB/s)."""
    bulk = bench.bulk(path.entry(), seconds=limit_s + 30)
    samples: list[float] = []
    try:
        sock = echo_mode(bench.connect(path.entry(), timeout=30))
        time.sleep(0.5)  # let the bulk transfer fill the pipe first
        t0 = time.monotonic()
        with sock:
            sock.settimeout(10)  # one round trip stuck this long is a failure, not a figure
            while len(samples) < pings and time.monotonic() - t0 < limit_s:
                samples += round_trips(sock, min(50, pings - len(samples)))
    finally:
        try:
            out, err = bulk.communicate(timeout=30)  # closes its stdin: the sender stops
        finally:
            path.release()
    if bulk.returncode != 0:
        raise RuntimeError(f"bulk sender via {path.label} failed: {err.decode()[-300:]}")
    return samples, float(out.split()[-1])


def run(progress: Progress, quick: bool, outdir: Path) -> ScenarioResult:
    pings, bulk_pings, limit_s = (400, 200, 2.0) if quick else (4000, 1500, 8.0)
    data: dict[str, Any] = {"pings_idle": pings, "pings_bulk": bulk_pings,
                            "bulk_limit_s": limit_s}
    with Bench(progress) as bench, started(bench) as (paths, absent):
        if "direct" not in paths:
            raise RuntimeError(f"no direct path: {absent.get('direct')}")
        data["absent"] = absent
        data["info"] = {n: p.info for n, p in paths.items() if p.info}
        progress(f"idle: {pings} round trips per path, alternating batches")
        idle = _idle(bench, paths, pings, limit_s)
        progress("idle p50: " + ", ".join(f"{paths[n].label} {statistics.median(v):.3f} ms"
                                          for n, v in idle.items()))
        bulk: dict[str, list[float]] = {}
        bulk_mb_s: dict[str, float] = {}
        for name, path in paths.items():
            bulk[name], bulk_mb_s[name] = _under_bulk(bench, path, bulk_pings, limit_s)
            progress(f"under bulk: {path.label}: {len(bulk[name])} round trips, p50 "
                     f"{statistics.median(bulk[name]):.2f} ms, bulk {bulk_mb_s[name]:.0f} MB/s")
    stats: dict[str, dict[str, float]] = {}
    for name in idle:
        stats[name] = {
            "idle_p50_ms": round(statistics.median(idle[name]), 4),
            "idle_p99_ms": round(_p99(idle[name]), 4),
            "idle_samples": len(idle[name]),
            "bulk_p50_ms": round(statistics.median(bulk[name]), 4),
            "bulk_p99_ms": round(_p99(bulk[name]), 4),
            "bulk_samples": len(bulk[name]),
            "bulk_mb_s": round(bulk_mb_s[name], 1),
        }
        stats[name]["added_idle_p50_ms"] = round(
            stats[name]["idle_p50_ms"] - stats["direct"]["idle_p50_ms"], 4)
    data["stats"] = stats
    return ScenarioResult(NAME, TITLE, data, _markdown(data), [_plot(stats, outdir)],
                          _targets(stats))


def _targets(stats: dict[str, dict[str, float]]) -> list[Target]:
    out = []
    if "plain" in stats:
        added = stats["plain"]["added_idle_p50_ms"]
        out.append(Target("nopf plain added round trip, idle (p50)", "<= 0.1 ms (issue 3)",
                          f"{added:.3f} ms", added <= 0.1))
    if "encrypted" in stats:
        s = stats["encrypted"]
        out.append(Target("nopf encrypted added round trip, idle (p50)", "< 1 ms (issue 6)",
                          f"{s['added_idle_p50_ms']:.3f} ms", s["added_idle_p50_ms"] < 1))
        out.append(Target("nopf encrypted interactive p99 while bulk runs on the tunnel",
                          "< 50 ms (issue 6)",
                          f"{s['bulk_p99_ms']:.1f} ms (bulk {s['bulk_mb_s']:.0f} MB/s)",
                          s["bulk_p99_ms"] < 50))
    return out


def _markdown(data: dict[str, Any]) -> str:
    stats = data["stats"]
    out = [f"32-byte request/response round trips from b1 to an echo service in a1 (no NAT): "
           f"{data['pings_idle']} per path idle (alternating batches; a path slower than "
           f"{data['bulk_limit_s']:g} s in all stops early), up to "
           f"{data['pings_bulk']} per path (or {data['bulk_limit_s']:g} s) while a sender "
           "process in b1 moves bulk data over the same path. Seed mode pipes one "
           "connection per punch, so its bulk runs on a second punched pipe.", "",
           table(["path", "idle p50 ms", "idle p99 ms", "added p50 vs direct",
                  "under bulk p50 ms", "under bulk p99 ms", "bulk MB/s meanwhile"],
                 [[LABELS[name], f"{s['idle_p50_ms']:.3f}", f"{s['idle_p99_ms']:.3f}",
                   f"{s['added_idle_p50_ms']:+.3f}", f"{s['bulk_p50_ms']:.2f}",
                   f"{s['bulk_p99_ms']:.2f}", f"{s['bulk_mb_s']:.0f}"]
                  for name, s in stats.items()]), ""]
    out += path_notes(data)
    return "\n".join(out)


def _plot(stats: dict[str, dict[str, float]], outdir: Path) -> Path:
    names = list(stats)
    series: dict[str, list[float | None]] = {
        label: [stats[n][key] for n in names]
        for label, key in (("idle p50", "idle_p50_ms"), ("idle p99", "idle_p99_ms"),
                           ("under bulk p50", "bulk_p50_ms"), ("under bulk p99", "bulk_p99_ms"))}
    return bar_chart(outdir / "latency.png", "32-byte round trips (log scale)", "ms",
                     [LABELS[n] for n in names], series, log=True)
