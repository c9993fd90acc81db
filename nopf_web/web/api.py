"""The JSON API: what scripts and tests use. Errors are ``{"error": ..., "field": ...}``."""

from __future__ import annotations

from typing import Any, Final

from aiohttp import web

from nopf_web.errors import NopfError
from nopf_web.guard import guard_status
from nopf_web.inputs import InputError, is_one_line, parse_json_object, query_int, quote

from .forms import FieldError, parse_new_session, parse_peer
from .keys import GUARD, MANAGER, STORE
from .manager import CreateError
from .model import SessionView
from .views import (
    base_url,
    forget_ended,
    history_filters,
    history_json,
    load_session,
    merged_history,
)

CREATE_FIELDS: Final = frozenset({"role", "local_port", "mode", "code", "rendezvous", "label",
                                   "port_mapping"})


def _error(message: str, status: int = 400, field: str = "body") -> web.Response:
    return web.json_response({"error": message, "field": field}, status=status)


def _field_error(exc: InputError) -> web.Response:
    return _error(str(exc), field=exc.field)


async def _body(request: web.Request) -> dict[str, Any]:
    """The JSON object sent (UTF-8 whatever the charset says: RFC 8259); a body that is
    no JSON object is an :class:`InputError` naming ``body``."""
    return parse_json_object(await request.read())


async def _durable(request: web.Request) -> None:
    """Commit what the store has queued. Called after a handler has taken its view of
    the sessions and before it answers: a creation answered 201, or an end the answer
    shows, is then in the database (and survives a crash of this process)."""
    await request.app[STORE].flush()


async def list_sessions(request: web.Request) -> web.Response:
    base = base_url(request)
    views = [SessionView.from_managed(ms) for ms in request.app[MANAGER].sessions()]
    await _durable(request)
    return web.json_response({"sessions": [v.to_json(base) for v in views]})


async def create_session(request: web.Request) -> web.Response:
    body = await _body(request)
    unknown = sorted(set(body) - CREATE_FIELDS)
    if unknown:
        name = unknown[0]
        expected = "(expected role, local_port, mode, code, rendezvous, label, port_mapping)"
        if name and len(name) <= 40 and is_one_line(name):
            return _error(f"{name}: unknown field {expected}", field=name)
        return _error(f"body: unknown field {quote(name)} {expected}", field="body")
    for required in ("role", "local_port"):
        if required not in body:
            return _error(f"{required}: is required", field=required)
    try:
        new = parse_new_session(body)
        mapping = body.get("port_mapping")
        if mapping is not None and not isinstance(mapping, bool):
            raise FieldError("port_mapping", "must be true or false")
        ms = request.app[MANAGER].create(new.role, new.local_port, new.rendezvous, new.label,
                                         mode=new.mode, code=new.code, port_mapping=mapping,
                                         local_host=new.local_host,
                                         more_local=new.more_local)
    except FieldError as exc:
        return _field_error(exc)
    except CreateError as exc:
        return _error(str(exc), exc.status, exc.field)
    view = SessionView.from_managed(ms)
    await _durable(request)
    return web.json_response(view.to_json(base_url(request)), status=201,
                             headers={"Location": f"/api/sessions/{ms.id}"})


async def get_session(request: web.Request) -> web.Response:
    view, _ms = await load_session(request, request.match_info["id"])
    await _durable(request)
    return web.json_response(view.to_json(base_url(request)))


async def set_peer(request: web.Request) -> web.Response:
    _view, ms = await load_session(request, request.match_info["id"])
    body = await _body(request)
    if "address" not in body:
        return _error("address: is required (the peer's public IP:PORT)", field="address")
    try:
        peer = parse_peer(body["address"])
    except FieldError as exc:
        return _field_error(exc)
    if ms is None:
        return _error("the session has already ended", 409, "id")
    try:
        request.app[MANAGER].set_peer(ms, peer)
    except NopfError as exc:
        return _error(str(exc), 409, "address")
    view = SessionView.from_managed(ms)
    await _durable(request)
    return web.json_response(view.to_json(base_url(request)))


async def stop_session(request: web.Request) -> web.Response:
    view, ms = await load_session(request, request.match_info["id"])
    if ms is not None:
        await request.app[MANAGER].stop(ms)
        view = SessionView.from_managed(ms)
    await _durable(request)
    return web.json_response(view.to_json(base_url(request)))


async def history(request: web.Request) -> web.Response:
    try:
        limit = query_int(request.query, "limit", 50, 1, 1000)
        offset = query_int(request.query, "offset", 0, 0, 999_999_999)
    except InputError as exc:
        return _field_error(exc)
    views, connections, total = await merged_history(
        request, outcome=None, query=None, limit=limit, offset=offset)
    base = base_url(request)
    return web.json_response({"total": total, "sessions": [
        history_json(v, connections[v.id], base) for v in views]})


async def delete_one(request: web.Request) -> web.Response:
    view, _ms = await load_session(request, request.match_info["id"])
    if view.live:
        return _error(f"session {view.id} is running: stop it first (DELETE "
                      f"/api/sessions/{view.id})", 409, "id")
    return web.json_response({"deleted": await forget_ended(request, session_id=view.id)})


async def delete_history(request: web.Request) -> web.Response:
    outcome, query, _page = history_filters(request.query)
    return web.json_response({"deleted": await forget_ended(request, outcome=outcome,
                                                            query=query)})


async def guard(request: web.Request) -> web.Response:
    return web.json_response(guard_status(request.app[GUARD]))


def add_routes(app: web.Application) -> None:
    sid = "{id:[0-9a-f]{12}}"
    r = app.router
    r.add_get("/api/sessions", list_sessions)
    r.add_post("/api/sessions", create_session)
    r.add_get(f"/api/sessions/{sid}", get_session)
    r.add_post(f"/api/sessions/{sid}/peer", set_peer)
    r.add_delete(f"/api/sessions/{sid}", stop_session)
    r.add_get("/api/history", history)
    r.add_delete("/api/history", delete_history)
    r.add_delete(f"/api/history/{sid}", delete_one)
    r.add_get("/api/guard", guard)
