"""The pure helpers of the benchmark scenarios (bench/scn_util.py, scn_rendezvous)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.linux_only("the benchmark suite measures Linux lab paths")
# Off Unix the bench modules do not even import (they use resource): skip the module.
resource = pytest.importorskip("resource", reason="linux_only: the benchmark suite is Linux's")

from bench.scn_rendezvous import Waiting, source  # noqa: E402
from bench.scn_util import (  # noqa: E402
    fmt,
    in_rtts,
    median,
    pct,
    raise_nofile,
    rss_kib,
    setup_target,
    table,
)


def test_median_and_pct_pick_observed_values() -> None:
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert math.isnan(median([]))
    values = [float(v) for v in range(1, 11)]
    assert pct(values, 0.0) == 1.0
    assert pct(values, 1.0) == 10.0
    assert pct(values, 0.9) == 9.0
    assert math.isnan(pct([], 0.5))


def test_rtt_multiples_and_the_setup_target() -> None:
    assert in_rtts(0.3, 0.1) == pytest.approx(3.0)
    assert math.isnan(in_rtts(0.3, 0.0003))  # sub-millisecond RTT: no meaningful multiple
    assert setup_target(0.04) == pytest.approx(0.22)  # 3 x 40 ms + 100 ms
    assert setup_target(0.0) == pytest.approx(0.1)


def test_fmt_shows_nan_as_a_dash() -> None:
    assert fmt(float("nan")) == "-"
    assert fmt(12.345, ".1f", " %") == "12.3 %"


def test_table_renders_markdown_and_rejects_ragged_rows() -> None:
    text = table(["a", "b"], [[1, "x"], [2.5, ""]])
    assert text.splitlines() == ["| a | b |", "|---|---|", "| 1 | x |", "| 2.5 |  |"]
    with pytest.raises(ValueError, match="2 headers"):
        table(["a", "b"], [[1]])


def test_raise_nofile_never_lowers_and_stays_under_the_hard_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert raise_nofile(1) == soft  # asking for less changes nothing
    got = raise_nofile(soft + 1)
    assert got >= soft
    if hard != resource.RLIM_INFINITY:
        assert got <= hard
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == got


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_rss_of_this_process_is_plausible() -> None:
    assert 1024 < rss_kib(os.getpid()) < 64 * 1024 * 1024


def test_sources_are_distinct_loopback_addresses() -> None:
    addrs = [source(i) for i in range(600)]
    assert len(set(addrs)) == 600
    assert all(a.startswith("127.1.") for a in addrs)
    assert all(1 <= int(a.rsplit(".", 1)[1]) <= 250 for a in addrs)
    assert source(0, 2) != source(0, 3)


def test_memory_per_waiting_peer_is_the_rss_growth_over_peers_held() -> None:
    w = Waiting(tried=100, held=100, idle_kib=20_000, samples=[(0, 20_000), (100, 21_000)])
    assert w.kib_per_peer == pytest.approx(10.0)
    assert math.isnan(Waiting(tried=100).kib_per_peer)  # nothing sampled
