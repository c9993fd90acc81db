"""Templates: the jinja2 environment, filters, and full-page-or-fragment responses."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
from typing import Any

import jinja2
from aiohttp import web

from nopf_web import __version__
from nopf_web.resources import resource_dir

from .keys import ACCESS, CONFIG, SECRET, TEMPLATES, Access


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_rate(n: float) -> str:
    return f"{human_bytes(n)}/s"


def human_duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def when(ts: float | None) -> str:
    if ts is None:
        return "—"
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def clock(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%H:%M:%S")


def iso(ts: float | None) -> str:
    if ts is None:
        return ""
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds")


def make_templates() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(resource_dir("templates")),
        autoescape=True,
        undefined=jinja2.StrictUndefined,  # a typo in a template fails loudly in tests
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(bytes=human_bytes, rate=human_rate, duration=human_duration,
                       when=when, clock=clock, iso=iso)
    env.globals["version"] = __version__
    return env


def csrf_token(request: web.Request) -> str:
    """The form token of this request's credential (valid while this process runs)."""
    access = request.get(ACCESS)
    credential = access.credential if access else "none"
    return hmac.new(request.app[SECRET], credential.encode(), hashlib.sha256).hexdigest()


def is_fragment(request: web.Request) -> bool:
    """htmx asks for a fragment, except when it restores a page from history."""
    headers = request.headers
    return headers.get("HX-Request") == "true" and "HX-History-Restore-Request" not in headers


def render(request: web.Request, template: str, status: int = 200,
           **context: Any) -> web.Response:
    access = request.get(ACCESS) or Access(full=False, credential="none")
    context.setdefault("nav", access.full)
    text = request.app[TEMPLATES].get_template(template).render(
        request=request, csrf_token=csrf_token(request), lan_mode=request.app[CONFIG].lan_mode,
        path=request.path, **context)
    resp = web.Response(text=text, status=status, content_type="text/html")
    resp.headers["Vary"] = "HX-Request"
    return resp
