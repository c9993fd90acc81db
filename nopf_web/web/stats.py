"""The statistics page: success rate and setup time by NAT-kind pair and by path, over
the history, drawn as server-rendered SVG (no script, no chart library).

:func:`summarize` groups :class:`~nopf_web.db.AttemptRow` values (pure); :func:`bar_chart`
and :func:`setup_chart` turn the groups into SVG markup with every text escaped.
``GET /stats?range=24h`` (``1h``, ``24h``, ``7d``, ``30d``, ``all``) renders the page,
or only its body for htmx (``HX-Request``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from aiohttp import web
from markupsafe import Markup, escape

from nopf_web.db import AttemptRow
from nopf_web.inputs import query_choice

from .keys import STORE
from .render import is_fragment, render

RANGES: Final = {"1h": 3600.0, "24h": 86400.0, "7d": 7 * 86400.0, "30d": 30 * 86400.0,
                 "all": None}
DEFAULT_RANGE: Final = "7d"


@dataclass
class Group:
    """Pairings that share a key (a NAT-kind pair, or a path)."""

    key: str
    attempts: int = 0
    connected: int = 0
    as_predicted: int = 0
    running: int = 0
    setup_ms: list[float] = field(default_factory=list)

    @property
    def ended(self) -> int:
        return self.attempts - self.running

    @property
    def success_rate(self) -> float | None:
        return self.connected / self.ended if self.ended else None

    def percentile(self, q: float) -> float | None:
        return percentile(self.setup_ms, q)


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of ``values``; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass
class Summary:
    total: int
    connected: int
    as_predicted: int
    by_pair: list[Group]
    by_path: list[Group]


def summarize(rows: Iterable[AttemptRow]) -> Summary:
    """Success and setup time per NAT-kind pair and per path taken (no path: "none");
    a session still running counts as an attempt, not in the success rate."""
    pairs: dict[str, Group] = {}
    paths: dict[str, Group] = {}
    total = connected = held = 0
    for row in rows:
        ok = row.path is not None
        total += 1
        connected += ok
        held += (row.path or "none") == row.predicted_path
        for groups, key in ((pairs, row.nat_pair or "unknown"), (paths, row.path or "none")):
            g = groups.setdefault(key, Group(key))
            g.attempts += 1
            if row.outcome is None and not ok:
                g.running += 1
            g.connected += ok
            g.as_predicted += (row.path or "none") == row.predicted_path
            if ok and row.setup_ms is not None:
                g.setup_ms.append(row.setup_ms)
    return Summary(total, connected, held,
                   sorted(pairs.values(), key=lambda g: (-g.attempts, g.key)),
                   sorted(paths.values(), key=lambda g: (-g.attempts, g.key)))


# -- SVG ---------------------------------------------------------------------------------

_ROW = 26  # px per group
_LABEL = 170  # px for the labels on the left
_WIDTH = 640


def _svg(height: int, title: str, body: list[str]) -> Markup:
    return Markup(
        f'<svg class="chart" role="img" viewBox="0 0 {_WIDTH} {height}" width="{_WIDTH}" '
        f'height="{height}" xmlns="http://www.w3.org/2000/svg"><title>{escape(title)}</title>'
        + "".join(body) + "</svg>")


def bar_chart(groups: Sequence[Group], title: str) -> Markup:
    """One bar per group: connected (green) and failed (red) out of the ended attempts,
    with the success rate written after it."""
    plot = _WIDTH - _LABEL - 110
    most = max((g.ended for g in groups), default=0) or 1
    body: list[str] = []
    for i, g in enumerate(groups):
        y = 8 + i * _ROW
        ok_w = plot * g.connected / most
        fail_w = plot * (g.ended - g.connected) / most
        rate = "no ended attempt" if g.success_rate is None else (
            f"{g.success_rate:.0%} of {g.ended}")
        body.append(
            f'<text x="{_LABEL - 8}" y="{y + 14}" text-anchor="end">{escape(g.key)}</text>'
            f'<rect class="bar-ok" x="{_LABEL}" y="{y}" width="{ok_w:.1f}" height="18">'
            f'<title>{escape(g.key)}: {g.connected} connected</title></rect>'
            f'<rect class="bar-fail" x="{_LABEL + ok_w:.1f}" y="{y}" width="{fail_w:.1f}" '
            f'height="18"><title>{escape(g.key)}: {g.ended - g.connected} failed</title></rect>'
            f'<text x="{_LABEL + ok_w + fail_w + 6:.1f}" y="{y + 14}">{escape(rate)}</text>')
    return _svg(16 + len(groups) * _ROW, title, body)


def setup_chart(groups: Sequence[Group], title: str) -> Markup:
    """Per group, the setup time: a box from p10 to p90, the median as a line, a
    whisker to the maximum; a log-free linear axis from 0 to the largest maximum."""
    with_times = [g for g in groups if g.setup_ms]
    top = max((max(g.setup_ms) for g in with_times), default=0.0)
    scale = _nice(top)
    plot = _WIDTH - _LABEL - 30
    body: list[str] = []

    def x(ms: float) -> float:
        return _LABEL + plot * ms / scale

    for i, g in enumerate(with_times):
        y = 8 + i * _ROW
        p10, p50, p90 = (g.percentile(q) or 0.0 for q in (10, 50, 90))
        high = max(g.setup_ms)
        body.append(
            f'<text x="{_LABEL - 8}" y="{y + 14}" text-anchor="end">{escape(g.key)}</text>'
            f'<line class="whisker" x1="{x(p90):.1f}" y1="{y + 9}" x2="{x(high):.1f}" '
            f'y2="{y + 9}"/>'
            f'<rect class="box" x="{x(p10):.1f}" y="{y + 2}" '
            f'width="{max(1.0, x(p90) - x(p10)):.1f}" '
            f'height="14"><title>{escape(g.key)}: p10 {p10:.0f} ms, median {p50:.0f} ms, '
            f'p90 {p90:.0f} ms, max {high:.0f} ms ({len(g.setup_ms)} connected)</title></rect>'
            f'<line class="median" x1="{x(p50):.1f}" y1="{y}" x2="{x(p50):.1f}" y2="{y + 18}"/>')
    axis_y = 8 + len(with_times) * _ROW
    body.append(f'<line class="axis" x1="{_LABEL}" y1="{axis_y}" x2="{_LABEL + plot}" '
                f'y2="{axis_y}"/>')
    for k in range(5):
        ms = scale * k / 4
        body.append(f'<text x="{x(ms):.1f}" y="{axis_y + 16}" text-anchor="middle">'
                    f'{ms:.0f} ms</text>')
    return _svg(axis_y + 24, title, body)


def _nice(value: float) -> float:
    """The smallest 1, 2 or 5 x 10^n at or above ``value`` (at least 10)."""
    value = max(value, 10.0)
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 5, 10):
        if step * power >= value:
            return float(step * power)
    return float(10 * power)


# -- the page ----------------------------------------------------------------------------


def parse_range(request: web.Request) -> str:
    """The ``range`` query parameter (an :class:`InputError` naming it: a 400)."""
    return query_choice(request.query, "range", DEFAULT_RANGE, tuple(RANGES))


async def stats_page(request: web.Request) -> web.Response:
    chosen = parse_range(request)
    span = RANGES[chosen]
    rows = await request.app[STORE].attempts(since=None if span is None else time.time() - span)
    summary = summarize(rows)
    context: dict[str, Any] = dict(
        summary=summary, range=chosen, ranges=list(RANGES),
        pair_bars=bar_chart(summary.by_pair, "Success by NAT-kind pair"),
        path_bars=bar_chart(summary.by_path, "Success by path"),
        pair_setup=setup_chart(summary.by_pair, "Setup time by NAT-kind pair"),
        path_setup=setup_chart(summary.by_path, "Setup time by path"))
    if is_fragment(request):
        return render(request, "_stats_body.html", **context)
    return render(request, "stats.html", **context)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/stats", stats_page)
