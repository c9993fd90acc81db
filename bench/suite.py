"""Run the benchmark scenarios, write their JSON, plots and docs/BENCHMARKS.md sections.

    sudo .venv/bin/python -m bench.suite [--quick] [--only NAME[,NAME]]
        [--img-dir docs/img] [--doc docs/BENCHMARKS.md] [--results bench/results]

Scenarios are the modules ``bench/scn_<name>.py`` (contract: :mod:`bench.report`),
run in a fixed order. Each writes ``<results>/<name>.json`` and replaces its
own generated section of the doc, between ``<!-- begin:NAME -->`` and
``<!-- end:NAME -->``; the ``targets`` section lists every target of every
scenario with a result on file. Text outside the markers is left alone.

``--quick`` is a smoke test: small sizes, few rounds. Its figures are not
publishable, so unless told otherwise it writes doc, plots and JSON into a
fresh temporary directory. The exit status is 1 if any scenario raised.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import ModuleType

from bench.report import (
    ScenarioResult,
    Target,
    result_json,
    section_body,
    targets_from_json,
    targets_table,
    update_section,
)

ROOT = Path(__file__).resolve().parent.parent
ORDER = ("throughput", "streams", "latency", "setup", "punch", "rendezvous", "relay", "resume",
         "matrix", "soak")


def _load(name: str) -> ModuleType | None:
    """``bench.scn_<name>``, or None if that module does not exist (yet)."""
    module = f"bench.scn_{name}"
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name == module:
            return None
        raise


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.suite",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="small sizes and counts: a smoke test, not published figures")
    ap.add_argument("--only", metavar="NAME[,NAME]",
                    help=f"run only these scenarios (of: {', '.join(ORDER)})")
    ap.add_argument("--img-dir", type=Path, help="plots (default docs/img)")
    ap.add_argument("--doc", type=Path, help="Markdown to update (default docs/BENCHMARKS.md)")
    ap.add_argument("--results", type=Path, help="JSON per scenario (default bench/results)")
    args = ap.parse_args(argv)
    names: tuple[str, ...] = ORDER
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in ORDER]
        if unknown or not wanted:
            ap.error(f"unknown scenario {', '.join(unknown) or '(none)'}: "
                     f"choose from {', '.join(ORDER)}")
        names = tuple(n for n in ORDER if n in wanted)
    args.names = names
    if args.quick and None in (args.img_dir, args.doc, args.results):
        # Quick figures must never land in the published docs by accident.
        tmp = Path(tempfile.mkdtemp(prefix="nopf-bench-quick-"))
        args.img_dir = args.img_dir or tmp / "img"
        args.doc = args.doc or tmp / "BENCHMARKS.md"
        args.results = args.results or tmp / "results"
    args.img_dir = args.img_dir or ROOT / "docs" / "img"
    args.doc = args.doc or ROOT / "docs" / "BENCHMARKS.md"
    args.results = args.results or ROOT / "bench" / "results"
    return args


def write_outputs(result: ScenarioResult, *, date: str, budget_s: int, quick: bool,
                  doc: Path, results: Path) -> None:
    """The scenario's JSON, its doc section and the doc's targets table."""
    results.mkdir(parents=True, exist_ok=True)
    record = result_json(result, date=date, budget_s=budget_s, quick=quick, base=doc.parent)
    (results / f"{result.name}.json").write_text(json.dumps(record, indent=2) + "\n",
                                                 encoding="utf-8")
    text = doc.read_text(encoding="utf-8") if doc.exists() else "# Benchmarks\n"
    text = update_section(text, result.name, section_body(result, date=date,
                                                          doc_dir=doc.parent))
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(update_section(text, "targets", targets_table(_all_targets(results))),
                   encoding="utf-8")


def _all_targets(results: Path) -> list[tuple[str, Target]]:
    """Every target on file, in scenario order (a partial run keeps the others')."""
    rows: list[tuple[str, Target]] = []
    for name in ORDER:
        path = results / f"{name}.json"
        if path.exists():
            saved = json.loads(path.read_text(encoding="utf-8"))
            rows += [(name, t) for t in targets_from_json(saved)]
    return rows


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    t_suite = time.monotonic()
    n = len(args.names)
    failures: list[str] = []
    missing: list[str] = []
    met: list[tuple[str, Target]] = []

    def say(msg: str) -> None:
        print(f"[bench {time.monotonic() - t_suite:6.1f}s] {msg}", file=sys.stderr, flush=True)

    say(f"{'quick' if args.quick else 'full'} run of {', '.join(args.names)}; doc "
        f"{args.doc}, plots {args.img_dir}, results {args.results}")
    for i, name in enumerate(args.names, 1):
        module = _load(name)
        if module is None:
            say(f"[{i}/{n}] {name}: not available (no bench/scn_{name}.py)")
            missing.append(name)
            continue
        budget = int(getattr(module, "BUDGET_S", 0))
        say(f"[{i}/{n}] {name}: {module.TITLE} (budget {budget} s)")
        t0 = time.monotonic()

        def progress(msg: str, i: int = i, name: str = name, t0: float = t0) -> None:
            say(f"[{i}/{n}] {name} +{time.monotonic() - t0:.1f}s: {msg}")

        try:
            args.img_dir.mkdir(parents=True, exist_ok=True)
            result: ScenarioResult = module.run(progress, args.quick, args.img_dir)
            result.seconds = time.monotonic() - t0
            date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
            write_outputs(result, date=date, budget_s=budget, quick=args.quick,
                          doc=args.doc, results=args.results)
        except Exception as exc:  # one scenario's failure must not stop the others
            args.results.mkdir(parents=True, exist_ok=True)
            log = args.results / f"{name}.error.txt"
            log.write_text(traceback.format_exc(), encoding="utf-8")
            first = str(exc).splitlines()[0] if str(exc) else ""
            failures.append(f"{name}: {type(exc).__name__}: {first} (traceback in {log})")
            say(f"[{i}/{n}] {name}: FAILED after {time.monotonic() - t0:.0f} s: {failures[-1]}")
            continue
        met += [(name, t) for t in result.targets]
        if budget and result.seconds > budget:
            say(f"[{i}/{n}] {name}: WARNING: took {result.seconds:.0f} s, over its "
                f"{budget} s budget")
        say(f"[{i}/{n}] {name}: done in {result.seconds:.0f} s")
    say(f"finished in {time.monotonic() - t_suite:.0f} s")
    for scenario, t in met:
        print(f"{'met    ' if t.met else 'NOT met'}  {scenario}: {t.name}: {t.measured} "
              f"(goal {t.goal})", file=sys.stderr)
    for name in missing:
        print(f"bench.suite: {name}: not available", file=sys.stderr)
    for line in failures:
        print(f"bench.suite: failed: {line}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
