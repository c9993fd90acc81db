"""The Doctor page and ``GET /api/doctor``: the NAT doctor's report for the default rendezvous.

Both answer from :class:`~nopf_web.doctor.cache.DoctorCache` (a report is kept
for a minute; concurrent requests share one measurement). ``GET /doctor`` is the
full page, or the report fragment when htmx asks; ``POST /doctor`` (the "Measure
again" button, CSRF-checked like every form) measures again, then shows the
page (303) or the fragment; ``GET /api/doctor?refresh=1`` measures again.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from nopf_web.doctor.cache import DoctorCache, Measurement
from nopf_web.inputs import query_choice
from nopf_web.wire.address import Endpoint

from .keys import DOCTOR, MANAGER, RENDEZVOUS
from .render import is_fragment, render


def doctor_target(app: web.Application) -> tuple[Endpoint, int | None]:
    """The default rendezvous and its doctor's port (known for the embedded one)."""
    default = app[MANAGER].default_rendezvous
    rendezvous = app[RENDEZVOUS]
    if rendezvous.embedded is not None and default == rendezvous.embedded:
        return default, rendezvous.doctor_port
    return default, None


async def _measure(request: web.Request, refresh: bool) -> tuple[Measurement, bool]:
    cache: DoctorCache = request.app[DOCTOR]
    rendezvous, doctor_port = doctor_target(request.app)
    return await cache.get(rendezvous, doctor_port, refresh=refresh)


def _refresh(request: web.Request) -> bool:
    return query_choice(request.query, "refresh", "0", ("0", "1")) == "1"


def _page(request: web.Request, measurement: Measurement, cached: bool) -> web.Response:
    context: dict[str, Any] = dict(m=measurement, report=measurement.report, cached=cached,
                                   age=round(request.app[DOCTOR].age(measurement)))
    if is_fragment(request):
        return render(request, "_doctor_report.html", **context)
    return render(request, "doctor.html", **context)


async def doctor_page(request: web.Request) -> web.Response:
    measurement, cached = await _measure(request, _refresh(request))
    return _page(request, measurement, cached)


async def doctor_again(request: web.Request) -> web.Response:
    measurement, cached = await _measure(request, True)
    if is_fragment(request):
        return _page(request, measurement, cached)
    raise web.HTTPSeeOther("/doctor")


async def doctor_api(request: web.Request) -> web.Response:
    measurement, cached = await _measure(request, _refresh(request))
    if measurement.report is None:
        return web.json_response({"error": measurement.error or "not measured",
                                  "field": "rendezvous"}, status=502)
    body = measurement.report.to_json()
    body["cached"] = cached
    body["age_s"] = round(request.app[DOCTOR].age(measurement), 1)
    return web.json_response(body)


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/doctor", doctor_page)
    r.add_post("/doctor", doctor_again)
    r.add_get("/api/doctor", doctor_api)
