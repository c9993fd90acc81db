"""Small helpers shared by the benchmark scenarios: statistics, tables, limits, plots."""

from __future__ import annotations

import resource
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def median(values: Sequence[float]) -> float:
    """Median, or NaN for no values (a table cell then reads "-")."""
    return statistics.median(values) if values else float("nan")


def pct(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) by rank: an observed value, NaN for none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def in_rtts(seconds: float, rtt: float) -> float:
    """``seconds`` in round trips; NaN under 1 ms of RTT, where the multiple means nothing."""
    return seconds / rtt if rtt >= 1e-3 else float("nan")


def setup_target(rtt: float) -> float:
    """Issue 6's coordinated setup target: 3 RTTs + 100 ms, in seconds."""
    return 3 * rtt + 0.1


def fmt(value: float, spec: str = ".0f", unit: str = "") -> str:
    """A table cell: ``value`` formatted, or "-" when it is NaN."""
    if value != value:  # NaN
        return "-"
    return f"{value:{spec}}{unit}"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table; every row must have one cell per header."""
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row {list(row)!r} has {len(row)} cells for {len(headers)} headers")
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def raise_nofile(want: int) -> int:
    """Raise the soft open-files limit towards ``want`` (capped by the hard limit); new soft."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return int(soft)


def rss_kib(pid: int) -> int:
    """Resident set size of a process in KiB (``VmRSS`` of ``/proc/PID/status``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


def new_figure(width: float = 6.4, height: float = 3.8) -> Any:
    """A matplotlib figure and axes on the non-interactive backend: (fig, ax)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height), dpi=100)


def label_plot(ax: Any, xlabel: str, ylabel: str, title: str, **legend: Any) -> None:
    """A line plot's axis labels and title, a light grid, and its legend (``legend``: the
    legend's options)."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(**legend)


def save_figure(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
