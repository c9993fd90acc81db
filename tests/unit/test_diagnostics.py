"""Per-attempt diagnostics on data: the timeline's JSON, what a failed SYN's errno is
called, the history's attempts (migration 0003), and the statistics' groups, percentiles
and SVG."""

from __future__ import annotations

import errno
import json
import time
from pathlib import Path

import pytest

from nopf_web.db import AttemptRow, HistoryStore, NewSession
from nopf_web.punch.driver import answer_of
from nopf_web.sessions.timeline import MAX_MARKS, Timeline, summary
from nopf_web.web.stats import bar_chart, percentile, setup_chart, summarize


def test_the_timeline_is_json_in_ms_from_its_origin() -> None:
    t = Timeline(100.0)
    t.add(100.0, "start", "pairing")
    t.add(100.0123, "syn", "SYN #1", attempt=1, ttl=32)
    t.add(100.02, "answer", "SYN #1: rst", attempt=1, answer="rst", detail="refused")
    t.add(100.5, "path", "path chosen", path="public", setup_ms=500.0)
    marks = t.to_json()
    assert [m["t_ms"] for m in marks] == [0.0, 12.3, 20.0, 500.0]
    assert marks[1] == {"t_ms": 12.3, "kind": "syn", "text": "SYN #1", "attempt": 1, "ttl": 32}
    assert json.loads(json.dumps(marks)) == marks
    assert summary(marks) == {"syns": 1, "answers": {"rst": 1}, "attempts": 0,
                              "setup_ms": 500.0}


def test_a_long_punch_keeps_its_timeline_bounded_but_its_end() -> None:
    t = Timeline(0.0)
    for i in range(MAX_MARKS + 50):
        t.add(i / 1000, "syn", f"SYN #{i}")
    t.add(1.0, "failed", "no connection")
    marks = t.to_json()
    assert len(marks) == MAX_MARKS + 2
    assert marks[-2]["kind"] == "failed"
    assert marks[-1] == {"t_ms": 1000.0, "kind": "note", "text": "50 more marks not kept"}


@pytest.mark.parametrize(("code", "answer"), [
    (errno.ECONNREFUSED, "rst"), (errno.EHOSTUNREACH, "icmp"), (errno.ENETUNREACH, "icmp"),
    (errno.ETIMEDOUT, "nothing"), (errno.EBADF, "other")])
def test_what_came_back_to_a_syn(code: int, answer: str) -> None:
    got, detail = answer_of(OSError(code, "x"))
    assert got == answer
    if answer == "icmp":
        assert errno.errorcode[code] in detail  # which ICMP, as far as the kernel says


def row(pair: str, path: str | None, predicted: str, setup: float | None,
        outcome: str | None = "closed") -> AttemptRow:
    return AttemptRow(1.0, outcome, path, predicted, pair, setup)


def test_statistics_group_by_pair_and_path_with_percentiles() -> None:
    rows = [row("rst × rst", "public", "public", float(ms)) for ms in range(100, 200, 10)]
    rows += [row("rst × symmetric", "relay", "relay", 900.0),
             row("rst × symmetric", None, "relay", None, "failed"),
             row("rst × symmetric", None, "relay", None, None)]  # still running
    s = summarize(rows)
    assert (s.total, s.connected, s.as_predicted) == (13, 11, 11)
    pairs = {g.key: g for g in s.by_pair}
    assert pairs["rst × rst"].success_rate == 1.0
    sym = pairs["rst × symmetric"]
    assert (sym.attempts, sym.ended, sym.connected, sym.running) == (3, 2, 1, 1)
    assert sym.success_rate == 0.5
    assert pairs["rst × rst"].percentile(50) == 140.0
    assert pairs["rst × rst"].percentile(90) == 180.0
    paths = {g.key: g for g in s.by_path}
    assert set(paths) == {"public", "relay", "none"}
    assert paths["none"].as_predicted == 0 and paths["relay"].as_predicted == 1
    assert percentile([], 50) is None and percentile([3.0], 99) == 3.0


def test_charts_are_svg_with_every_label_escaped() -> None:
    s = summarize([row("<b>x</b> × y", "public", "public", 120.0),
                   row("<b>x</b> × y", None, "public", None, "failed")])
    bars = str(bar_chart(s.by_pair, "Success <by> pair"))
    assert bars.startswith('<svg class="chart" role="img"') and bars.endswith("</svg>")
    assert "<b>" not in bars and "&lt;b&gt;x&lt;/b&gt; × y" in bars
    assert "50% of 2" in bars and "Success &lt;by&gt; pair" in bars
    box = str(setup_chart(s.by_pair, "Setup"))
    assert "median 120 ms" in box and ">200 ms<" in box  # the axis ends at a round 200 ms
    assert "<rect" not in str(setup_chart(summarize([]).by_pair, "nothing"))


async def test_the_history_keeps_prediction_timeline_and_first_path(tmp_path: Path) -> None:
    store = await HistoryStore.open(tmp_path / "h.db")
    try:
        assert store.schema_version >= 3
        now = time.time()
        for sid, mode in (("aaaaaaaaaaa1", "coordinated"), ("aaaaaaaaaaa2", "coordinated"),
                          ("aaaaaaaaaaa3", "seed")):
            store.add_session(NewSession(id=sid, role="server", local_port=22, rendezvous="r:1",
                                         label="", share_token=f"t{sid}", state="punching",
                                         started_at=now, mode=mode))  # type: ignore[arg-type]
        marks = [{"t_ms": 0.0, "kind": "start", "text": "x"},
                 {"t_ms": 3120.0, "kind": "path", "text": "y", "path": "relay",
                  "setup_ms": 3120.0}]
        # Relayed first, then moved back to direct: the statistics count the first path.
        store.update_session("aaaaaaaaaaa1", predicted_path="relay", prediction="why",
                             nat_pair="rst × symmetric", setup_ms=3120.0,
                             timeline=json.dumps(marks), path="public", outcome="closed")
        store.update_session("aaaaaaaaaaa3", predicted_path="public")  # seed: not counted
        rows = await store.attempts(since=now - 1)
        assert rows == [AttemptRow(now, "closed", "relay", "relay", "rst × symmetric", 3120.0)]
        assert await store.attempts(since=now + 1) == []
        assert len(await store.attempts(until=now + 1)) == 1
        got = await store.get_session("aaaaaaaaaaa1")
        assert got is not None and got.timeline is not None and got.prediction == "why"
    finally:
        await store.close()
