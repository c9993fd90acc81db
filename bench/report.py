"""What every benchmark scenario of ``python -m bench.suite`` hands back.

A scenario module ``bench/scn_<name>.py`` exposes::

    NAME: str          # e.g. "throughput"; also the JSON file and the BENCHMARKS.md section
    TITLE: str         # one line, for progress and the section heading
    BUDGET_S: int      # upper bound of its wall time in full mode, on 2 cores
    def run(progress: Progress, quick: bool, outdir: Path) -> ScenarioResult

``quick`` shrinks sizes and counts so the whole suite is a smoke test of a
minute or two (the test suite runs it); full mode gives the published figures.
Plots go into ``outdir`` (``docs/img`` by default) as PNG files.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Target:
    """A target stated in an issue, and what this run measured against it."""

    name: str  # "encrypted throughput vs direct"
    goal: str  # ">= 40 % of direct TCP (issue 6)"
    measured: str  # "0.43 (512 vs 1190 MB/s)"
    met: bool


@dataclass
class ScenarioResult:
    name: str
    title: str
    data: dict[str, Any]  # JSON-able: raw figures of every run, settings, units
    markdown: str  # the section body for docs/BENCHMARKS.md (tables, short prose)
    plots: list[Path] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    seconds: float = 0.0  # wall time, set by the runner


def stopwatch() -> Callable[[], float]:
    """Seconds since the call, for scenarios that time their own phases."""
    t0 = time.perf_counter()
    return lambda: time.perf_counter() - t0
