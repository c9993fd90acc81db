"""The benchmark suite's pure parts: doc sections, targets table, JSON records."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bench.report import (
    ScenarioResult,
    Target,
    begin,
    end,
    result_json,
    targets_table,
    update_section,
)
from bench.suite import _parse, write_outputs

PROSE = "# Benchmarks\n\nHand-written analysis.\n\n## Old section\n\nKeep me.\n"


def result(name: str = "throughput", met: bool = True) -> ScenarioResult:
    return ScenarioResult(
        name=name, title=f"{name} title", data={"ratio": 0.9}, markdown="| a | b |\n|---|---|",
        targets=[Target("plain vs direct", ">= 80 %", "0.90", met)], seconds=12.3)


def test_section_is_created_at_the_end_and_prose_kept() -> None:
    text = update_section(PROSE, "throughput", "body one")
    assert text.startswith(PROSE.rstrip("\n"))
    assert text.rstrip().endswith(end("throughput"))
    assert text.count(begin("throughput")) == 1
    assert "body one" in text


def test_section_is_replaced_in_place() -> None:
    text = update_section(PROSE, "throughput", "body one")
    text = update_section(text + "\nTrailing prose.\n", "throughput", "body two")
    assert "body one" not in text and "body two" in text
    assert text.count(begin("throughput")) == 1 and text.count(end("throughput")) == 1
    assert "Keep me." in text and text.endswith("Trailing prose.\n")
    assert text.index("body two") < text.index("Trailing prose.")


def test_sections_are_independent() -> None:
    text = update_section(update_section(PROSE, "a", "alpha"), "b", "beta")
    text = update_section(text, "a", "ALPHA")
    assert "ALPHA" in text and "beta" in text and "alpha" not in text
    assert text.index("ALPHA") < text.index("beta")


def test_unbalanced_markers_are_refused() -> None:
    with pytest.raises(ValueError, match="unbalanced"):
        update_section(PROSE + begin("x") + "\n", "x", "body")


def test_targets_table_says_met_or_not() -> None:
    table = targets_table([("throughput", Target("plain", ">= 80 %", "0.90", True)),
                           ("latency", Target("p99", "< 50 ms", "70 ms", False))])
    rows = [line for line in table.splitlines() if line.startswith("| throughput")
            or line.startswith("| latency")]
    assert len(rows) == 2
    assert rows[0].endswith("| met |") and "0.90" in rows[0]
    assert rows[1].endswith("| **NOT met** |") and "70 ms" in rows[1]


def test_json_record(tmp_path: Path) -> None:
    r = result()
    r.plots = [tmp_path / "img" / "throughput.png"]
    record = result_json(r, date="2026-11-27 06:00 UTC", budget_s=180, quick=True, base=tmp_path)
    assert record["name"] == "throughput" and record["seconds"] == 12.3
    assert record["data"] == {"ratio": 0.9} and record["quick"] is True
    assert record["targets"] == [{"name": "plain vs direct", "goal": ">= 80 %",
                                  "measured": "0.90", "met": True}]
    assert record["plots"] == ["img/throughput.png"]
    assert record["machine"]["cpus"] >= 1 and record["machine"]["kernel"]
    json.dumps(record)  # JSON-able as a whole


def test_write_outputs_keeps_prose_and_collects_targets(tmp_path: Path) -> None:
    doc, results = tmp_path / "BENCHMARKS.md", tmp_path / "results"
    doc.write_text(PROSE, encoding="utf-8")
    write_outputs(result("throughput", met=True), date="d1", budget_s=1, quick=False,
                  doc=doc, results=results)
    write_outputs(result("latency", met=False), date="d2", budget_s=1, quick=False,
                  doc=doc, results=results)
    text = doc.read_text(encoding="utf-8")
    assert text.startswith(PROSE.rstrip("\n")) and "Keep me." in text
    for name in ("throughput", "latency", "targets"):
        assert text.count(begin(name)) == 1
    targets = text[text.index(begin("targets")):text.index(end("targets"))]
    assert "| throughput |" in targets and "| latency |" in targets and "NOT met" in targets
    saved = json.loads((results / "latency.json").read_text(encoding="utf-8"))
    assert saved["date"] == "d2" and saved["targets"][0]["met"] is False
    # A later run of one scenario replaces only its own section.
    write_outputs(result("throughput", met=False), date="d3", budget_s=1, quick=False,
                  doc=doc, results=results)
    again = doc.read_text(encoding="utf-8")
    assert again.count(begin("throughput")) == 1 and "d3" in again and "d2" in again


def test_quick_writes_to_a_temp_dir_unless_told(tmp_path: Path) -> None:
    args = _parse(["--quick", "--only", "latency,throughput"])
    shutil.rmtree(args.doc.parent)  # the temp dir _parse made
    assert args.names == ("throughput", "latency")  # the fixed order, whatever was asked
    assert "docs" not in str(args.doc) and "nopf-bench-quick-" in str(args.doc)
    doc = tmp_path / "d.md"
    args = _parse(["--quick", "--doc", str(doc), "--img-dir", str(tmp_path),
                   "--results", str(tmp_path)])
    assert args.doc == doc
    full = _parse([])
    assert full.doc.parts[-2:] == ("docs", "BENCHMARKS.md")


def test_unknown_scenario_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        _parse(["--only", "throughput,nope"])
    assert exc.value.code == 2
    assert "unknown scenario nope" in capsys.readouterr().err
