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
from collections.abc import Callable, Iterable
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
        args.json.write_text(json.dumps(result.data, indent=2), encoding="utf-8")
    print(f"{mod.NAME}: {result.seconds:.1f} s (budget {mod.BUDGET_S} s); plots: "
          + ", ".join(str(p) for p in result.plots), file=sys.stderr)
    return 0


def write_json(path: Path | None, data: Any) -> None:
    """``data`` as indented JSON into ``path``, when one was asked for (``--json``)."""
    import json

    if path is not None:
        path.write_text(json.dumps(data, indent=2))


def publish(lines: list[str], out: Path | None, failures: Iterable[str] = (), *,
            failures_heading: str) -> None:
    """Print a Markdown report, ``lines`` then the distinct ``failures`` (if any, sorted,
    under ``failures_heading``), and write it to ``out`` when one was asked for."""
    seen = sorted(set(failures))
    if seen:
        lines = [*lines, "", failures_heading, "", *(f"- `{e}`" for e in seen)]
    report = "\n".join(lines) + "\n"
    print(report)
    if out is not None:
        out.write_text(report)


# -- helpers of the runner (bench.suite) and the scenarios ----------------------


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    import os
    import platform

    return {"cpus": os.cpu_count(), "kernel": platform.release(),
            "python": platform.python_version()}


def result_json(result: ScenarioResult, *, date: str, budget_s: int, quick: bool,
                base: Path) -> dict[str, Any]:
    """The JSON record of one scenario run (plots relative to ``base``)."""
    import dataclasses
    import os

    return {
        "name": result.name, "title": result.title, "date": date,
        "seconds": round(result.seconds, 1), "budget_s": budget_s, "quick": quick,
        "machine": machine(), "data": result.data,
        "targets": [dataclasses.asdict(t) for t in result.targets],
        "plots": [os.path.relpath(p, base) for p in result.plots],
    }


def begin(name: str) -> str:
    return f"<!-- begin:{name} -->"


def end(name: str) -> str:
    return f"<!-- end:{name} -->"


def update_section(text: str, name: str, body: str) -> str:
    """Replace what lies between ``name``'s markers, or add the block at the end.

    Everything outside the markers (hand-written prose) is kept as it is.
    """
    block = f"{begin(name)}\n{body.strip()}\n{end(name)}"
    b, e = text.find(begin(name)), text.find(end(name))
    if b >= 0 and e > b:
        return text[:b] + block + text[e + len(end(name)):]
    if b >= 0 or e >= 0:
        raise ValueError(f"unbalanced markers for section {name!r}")
    return text.rstrip("\n") + "\n\n" + block + "\n"


def section_body(result: ScenarioResult, *, date: str, doc_dir: Path) -> str:
    """The generated Markdown of one scenario: heading, provenance, body, plots."""
    import os

    m = machine()
    lines = [f"## {result.title}", "",
             f"_Generated by `python -m bench.suite` on {date} in {result.seconds:.0f} s "
             f"({m['cpus']} CPUs, Linux {m['kernel']})._", "", result.markdown.strip(), ""]
    for plot in result.plots:
        lines.append(f"![{plot.stem}]({os.path.relpath(plot, doc_dir)})")
    return "\n".join(lines).strip() + "\n"


def targets_table(rows: list[tuple[str, Target]]) -> str:
    """One Markdown table of every target: (scenario, target) pairs."""
    out = ["## Targets", "",
           "| scenario | target | goal | measured | met? |", "|---|---|---|---|---|"]
    for scenario, t in rows:
        verdict = "met" if t.met else "**NOT met**"
        out.append(f"| {scenario} | {t.name} | {t.goal} | {t.measured} | {verdict} |")
    if not rows:
        out.append("| - | no targets recorded yet | | | |")
    return "\n".join(out) + "\n"


def targets_from_json(record: dict[str, Any]) -> list[Target]:
    return [Target(**t) for t in record.get("targets", [])]


def bar_chart(path: Path, title: str, ylabel: str, groups: list[str],
              series: dict[str, list[float | None]], labels: dict[str, list[str]] | None = None,
              log: bool = False) -> Path:
    """A grouped bar chart (one bar per series in each group), saved as PNG.

    ``None`` values are drawn as gaps; ``labels`` puts a text above each bar.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    wide = min(14.0, max(6.0, len(groups) * (0.5 + 0.35 * len(series))))
    fig, ax = plt.subplots(figsize=(wide, 4.2))
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ys = [v if v is not None else 0.0 for v in values]
        bars = ax.bar(xs, ys, width * 0.95, label=name)
        for bar, text in zip(bars, (labels or {}).get(name, []), strict=False):
            if text:
                ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=8, xytext=(0, 2),
                            textcoords="offset points")
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if log:
        ax.set_yscale("log")
    if len(series) > 1:
        ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
