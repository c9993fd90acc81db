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


def standalone(module: str, argv: list[str] | None = None) -> int:
    """``python -m bench.scn_<name> [--quick] [--outdir DIR] [--json FILE]``: one scenario.

    Progress goes to stderr, the Markdown section to stdout.
    """
    import argparse
    import importlib
    import json
    import sys

    mod = importlib.import_module(module)
    ap = argparse.ArgumentParser(prog=f"python -m {module}", description=mod.TITLE)
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke test")
    ap.add_argument("--outdir", type=Path, default=Path("docs/img"), help="where plots go")
    ap.add_argument("--json", type=Path, help="also write the result's data here")
    args = ap.parse_args(argv)
    args.outdir.mkdir(parents=True, exist_ok=True)
    clock = stopwatch()

    def progress(msg: str) -> None:
        print(f"[{mod.NAME} {clock():6.1f} s] {msg}", file=sys.stderr, flush=True)

    result: ScenarioResult = mod.run(progress, args.quick, args.outdir)
    result.seconds = clock()
    print(f"## {result.title}\n\n{result.markdown}")
    for t in result.targets:
        print(f"- target {t.name}: {t.goal}; measured {t.measured}: "
              f"{'met' if t.met else 'NOT met'}")
    if args.json:
        args.json.write_text(json.dumps(result.data, indent=2))
    print(f"{mod.NAME}: {result.seconds:.1f} s (budget {mod.BUDGET_S} s); plots: "
          + ", ".join(str(p) for p in result.plots), file=sys.stderr)
    return 0
