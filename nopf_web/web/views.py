"""HTML views: full pages on normal requests, fragments when htmx asks (HX-Request)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, Final
from urllib.parse import urlencode

from aiohttp import web
from markupsafe import Markup

from nopf_web.db import OUTCOMES, ConnectionRow, EventRow
from nopf_web.errors import NopfError
from nopf_web.inputs import InputError, query_choice, query_int, quote, text
from nopf_web.sessions.engine import Event

from .forms import FieldError, parse_new_session, parse_peer, parse_rendezvous
from .keys import CONFIG, MANAGER, RENDEZVOUS, STORE, TEMPLATES
from .live import live_parts, page_token, stream
from .manager import CreateError, ManagedSession
from .model import SessionView
from .render import is_fragment, iso, render
from .security import read_form

HISTORY_PAGE: Final = 25
EXPORT_LIMIT: Final = 100_000
SETTING_RENDEZVOUS: Final = "default_rendezvous"
FILTERS: Final = ("", "running", *OUTCOMES)


def base_url(request: web.Request) -> str:
    return f"{request.scheme}://{request.host}"


def _field(form: Mapping[str, Any], name: str) -> str:
    value = form.get(name, "")
    return value if isinstance(value, str) else ""


async def load_session(request: web.Request,
                       session_id: str) -> tuple[SessionView, ManagedSession | None]:
    """A session from memory (live or recent) or from history; 404 if neither has it."""
    ms = request.app[MANAGER].get(session_id)
    if ms is not None:
        return SessionView.from_managed(ms), ms
    row = await request.app[STORE].get_session(session_id)
    if row is None:
        raise web.HTTPNotFound(text=f"no session with id {session_id!r}")
    return SessionView.from_row(row), None


async def merged_history(request: web.Request, *, outcome: str | None, query: str | None,
                         limit: int, offset: int
                         ) -> tuple[list[SessionView], dict[str, list[ConnectionRow]], int]:
    """History rows, with live sessions shown as the manager sees them right now."""
    store, manager = request.app[STORE], request.app[MANAGER]
    rows, total = await store.list_sessions(outcome=outcome, query=query, limit=limit,
                                            offset=offset)
    views = []
    for row in rows:
        ms = manager.get(row.id)
        views.append(SessionView.from_managed(ms) if ms is not None
                     else SessionView.from_row(row))
    return views, await store.connections_for([v.id for v in views]), total


# -- sessions -------------------------------------------------------------------


def _session_list(request: web.Request, views: Sequence[SessionView]) -> tuple[Markup, str]:
    """The list's items and their digest, which the list's poll sends back as ``?seen=``."""
    module: Any = request.app[TEMPLATES].get_template("_session_items.html").module  # macros
    items = Markup(module.session_items(views))
    return items, hashlib.blake2b(items.encode(), digest_size=8).hexdigest()


async def sessions_page(request: web.Request) -> web.Response:
    views = [SessionView.from_managed(ms) for ms in request.app[MANAGER].sessions()]
    if is_fragment(request):
        items, seen = _session_list(request, views)
        if request.query.get("seen") == seen:
            # Nothing changed since the page's last poll: htmx swaps nothing on a 204.
            return web.Response(status=204, headers={"Vary": "HX-Request"})
        return render(request, "_session_list.html", items=items, seen=seen)
    again = request.query.get("again")  # "start again": the form as that session was made
    if again is None:
        return _sessions_full(request, views, form={"role": "server", "mode": "coordinated"},
                              errors={})
    if not _SESSION_ID.fullmatch(again):
        raise InputError("again", f"again must be a session id (12 hex digits), not "
                         f"{quote(again)}")
    source, _ms = await load_session(request, again)
    default = str(request.app[MANAGER].default_rendezvous)
    return _sessions_full(request, views, form=source.again_form(default), errors={},
                          again=source)


_SESSION_ID: Final = re.compile(r"[0-9a-f]{12}")


def _sessions_full(request: web.Request, views: Sequence[SessionView], *,
                   form: Mapping[str, str], errors: Mapping[str, str],
                   status: int = 200, again: SessionView | None = None) -> web.Response:
    items, seen = _session_list(request, views)
    return render(request, "sessions.html", status=status, items=items, seen=seen, form=form,
                  errors=errors, default_rendezvous=str(request.app[MANAGER].default_rendezvous),
                  again=again)


async def create_session(request: web.Request) -> web.Response:
    form = await read_form(request)
    values = {k: _field(form, k)
              for k in ("role", "local_port", "mode", "code", "rendezvous", "label")}
    manager = request.app[MANAGER]
    try:
        # The form keeps the code field (hidden by CSS) whatever the choice: it counts only
        # for a coordinated client.
        new = parse_new_session(values, ignore_stray_code=True)
        ms = manager.create(new.role, new.local_port, new.rendezvous, new.label,
                            mode=new.mode, code=new.code, local_host=new.local_host,
                            more_local=new.more_local)
    except FieldError as exc:
        return _sessions_full(request, [SessionView.from_managed(m) for m in manager.sessions()],
                              form=values, errors={exc.field: exc.message}, status=400)
    except CreateError as exc:
        return _sessions_full(request, [SessionView.from_managed(m) for m in manager.sessions()],
                              form=values, errors={exc.field: str(exc)}, status=exc.status)
    raise web.HTTPSeeOther(f"/sessions/{ms.id}")


async def _session_response(request: web.Request, view: SessionView, ms: ManagedSession | None,
                            base: str, *, errors: Mapping[str, str] | None = None,
                            peer_value: str = "", status: int = 200) -> web.Response:
    log: Sequence[Event | EventRow] = (
        list(ms.events) if ms is not None else await request.app[STORE].events_for(view.id))
    events = list(reversed(log))[:100]  # newest first
    parts = live_parts(request, view, base)
    if is_fragment(request):
        return render(request, "_session_live.html", s=view, parts=parts, events=events,
                      base=base)
    connections = (await request.app[STORE].connections_for([view.id]))[view.id]
    share_url = f"{base_url(request)}/s/{view.share_token}" if view.share_token else None
    return render(request, "session.html", status=status, s=view, parts=parts,
                  since=page_token(parts, log), events=events, base=base,
                  connections=connections, share_url=share_url, errors=errors or {},
                  peer_value=peer_value)


async def session_page(request: web.Request) -> web.Response:
    view, ms = await load_session(request, request.match_info["id"])
    return await _session_response(request, view, ms, f"/sessions/{view.id}")


async def _peer(request: web.Request, view: SessionView, ms: ManagedSession | None,
                base: str) -> web.Response:
    form = await read_form(request)
    value = _field(form, "address")
    try:
        peer = parse_peer(value)
        if ms is None:
            raise NopfError("the session has already ended")
        request.app[MANAGER].set_peer(ms, peer)
    except FieldError as exc:
        return await _session_response(request, view, ms, base, errors={"address": exc.message},
                                       peer_value=value, status=400)
    except NopfError as exc:
        return await _session_response(request, view, ms, base, errors={"address": str(exc)},
                                       peer_value=value, status=409)
    raise web.HTTPSeeOther(base)


async def session_live(request: web.Request) -> web.StreamResponse:
    view, ms = await load_session(request, request.match_info["id"])
    return await stream(request, view, ms, f"/sessions/{view.id}")


async def session_peer(request: web.Request) -> web.Response:
    view, ms = await load_session(request, request.match_info["id"])
    return await _peer(request, view, ms, f"/sessions/{view.id}")


async def session_stop(request: web.Request) -> web.Response:
    view, ms = await load_session(request, request.match_info["id"])
    if ms is not None:
        await request.app[MANAGER].stop(ms)
    raise web.HTTPSeeOther(f"/sessions/{view.id}")


# -- share links: the token is the credential, for this one session -----------------


async def _shared(request: web.Request) -> tuple[SessionView, ManagedSession | None, str]:
    token = request.match_info["token"]
    ms = request.app[MANAGER].by_share(token)
    if ms is not None:
        return SessionView.from_managed(ms), ms, f"/s/{token}"
    session_id = await request.app[STORE].session_id_for_share(token)
    if session_id is None:
        raise web.HTTPNotFound(text="this share link is not valid (or no longer)")
    view, ms = await load_session(request, session_id)
    return view, ms, f"/s/{token}"


async def share_page(request: web.Request) -> web.Response:
    view, ms, base = await _shared(request)
    return await _session_response(request, view, ms, base)


async def share_live(request: web.Request) -> web.StreamResponse:
    view, ms, base = await _shared(request)
    return await stream(request, view, ms, base)


async def share_peer(request: web.Request) -> web.Response:
    view, ms, base = await _shared(request)
    return await _peer(request, view, ms, base)


async def share_stop(request: web.Request) -> web.Response:
    _view, ms, base = await _shared(request)
    if ms is not None:
        await request.app[MANAGER].stop(ms)
    raise web.HTTPSeeOther(base)


# -- deleting from the history: a page that asks, then a POST ---------------------


async def forget_ended(request: web.Request, *, session_id: str | None = None,
                       outcome: str | None = None, query: str | None = None) -> list[str]:
    """Delete the ended sessions that match from the history and from memory; their ids."""
    deleted = await request.app[STORE].delete_ended(session_id=session_id, outcome=outcome,
                                                    query=query)
    request.app[MANAGER].forget(deleted)
    return deleted


def _deleted(count: int) -> web.HTTPSeeOther:
    return web.HTTPSeeOther(f"/history?deleted={count}")


async def session_delete_page(request: web.Request) -> web.Response:
    view, _ms = await load_session(request, request.match_info["id"])
    return render(request, "delete.html", s=view, count=0 if view.live else 1,
                  action=f"/sessions/{view.id}/delete", back=f"/sessions/{view.id}",
                  fields={})


async def session_delete(request: web.Request) -> web.Response:
    view, _ms = await load_session(request, request.match_info["id"])
    if view.live:
        raise web.HTTPConflict(text="this session is running: stop it before deleting it "
                               "from the history")
    raise _deleted(len(await forget_ended(request, session_id=view.id)))


async def history_delete_page(request: web.Request) -> web.Response:
    outcome, query, _page = history_filters(request.query)
    _rows, count = await request.app[STORE].list_sessions(outcome=outcome, query=query,
                                                          limit=0, ended=True)
    fields = {"outcome": outcome or "", "q": query or ""}
    back = "/history?" + urlencode(fields) if outcome or query else "/history"
    return render(request, "delete.html", s=None, count=count, action="/history/delete",
                  back=back, fields=fields, outcome=outcome, q=query)


async def history_delete(request: web.Request) -> web.Response:
    form = await read_form(request)
    outcome, query, _page = history_filters({k: _field(form, k) for k in ("outcome", "q")})
    raise _deleted(len(await forget_ended(request, outcome=outcome, query=query)))


# -- history ----------------------------------------------------------------------


def history_filters(values: Mapping[str, str]) -> tuple[str | None, str | None, int]:
    """(outcome, search, page) from a query (or a form); an InputError (a 400) naming
    the parameter if bad."""
    outcome = query_choice(values, "outcome", "", FILTERS)
    query = text(values.get("q", ""), "q", max_len=100)
    page = query_int(values, "page", 1, 1, 1_000_000)
    return outcome or None, query or None, page


async def history_page(request: web.Request) -> web.Response:
    outcome, query, page = history_filters(request.query)
    deleted = query_int(request.query, "deleted", -1, 0, 1_000_000_000)  # after a delete
    views, connections, total = await merged_history(
        request, outcome=outcome, query=query, limit=HISTORY_PAGE,
        offset=(page - 1) * HISTORY_PAGE)
    pages = max(1, -(-total // HISTORY_PAGE))
    context: dict[str, Any] = dict(sessions=views, connections=connections, total=total, page=page,
                   pages=pages, outcome=outcome or "", q=query or "", filters=FILTERS,
                   deleted=deleted)
    if is_fragment(request):
        return render(request, "_history_table.html", **context)
    return render(request, "history.html", **context)


_CSV_COLUMNS: Final = ("id", "label", "mode", "role", "local_port", "local_host", "more_local",
                       "rendezvous", "public_address",
                       "peer_address", "outcome", "state", "started_at", "ended_at",
                       "duration_s", "bytes_in", "bytes_out", "connections", "code", "path",
                       "error", "predicted_path", "prediction", "nat_pair", "setup_ms",
                       "timeline")


def _cell(value: object) -> object:
    # A leading =, +, - or @ makes spreadsheets run the cell as a formula.
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@"):
        return "'" + value
    return value


async def history_export(request: web.Request) -> web.Response:
    outcome, query, _page = history_filters(request.query)
    views, connections, _total = await merged_history(
        request, outcome=outcome, query=query, limit=EXPORT_LIMIT, offset=0)
    fmt = request.match_info["fmt"]
    if fmt == "json":
        base = base_url(request)
        body = json.dumps({"sessions": [history_json(v, connections[v.id], base)
                                        for v in views]}, indent=1)
        resp = web.Response(text=body, content_type="application/json")
    else:
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(_CSV_COLUMNS)
        for v in views:
            writer.writerow([_cell(x) for x in (
                v.id, v.label, v.mode, v.role, v.local_port, v.local_host, v.more_local,
                v.rendezvous, v.public_address or "",
                v.peer_address or "", v.outcome or "running", v.state, iso(v.started_at),
                iso(v.ended_at), round(v.elapsed, 1), v.bytes_in, v.bytes_out, v.connections,
                v.code or "", v.path or "", v.error or "", v.predicted_path or "",
                v.prediction or "", v.nat_pair or "",
                "" if v.setup_ms is None else v.setup_ms, v.timeline or "")])
        resp = web.Response(text=out.getvalue(), content_type="text/csv")
    resp.headers["Content-Disposition"] = f'attachment; filename="nopf-history.{fmt}"'
    return resp


def history_json(view: SessionView, connections: Sequence[ConnectionRow],
                 base: str) -> dict[str, Any]:
    data = view.to_json(base)
    data["connections"] = [
        {"peer_address": c.peer_address, "started_at": c.started_at, "ended_at": c.ended_at,
         "bytes_in": c.bytes_in, "bytes_out": c.bytes_out, "outcome": c.outcome,
         "error": c.error} for c in connections]
    return data


# -- settings ---------------------------------------------------------------------


def _settings(request: web.Request, *, errors: Mapping[str, str], value: str,
              saved: bool = False, status: int = 200) -> web.Response:
    app = request.app
    store, manager, config = app[STORE], app[MANAGER], app[CONFIG]
    return render(request, "settings.html", status=status, config=config, store=store,
                  manager=manager, rendezvous=app[RENDEZVOUS], errors=errors, value=value,
                  saved=saved, guard=manager.guard)


async def settings_page(request: web.Request) -> web.Response:
    return _settings(request, errors={}, value=str(request.app[MANAGER].default_rendezvous),
                     saved=request.query.get("saved") == "1")


async def settings_save(request: web.Request) -> web.Response:
    form = await read_form(request)
    value = _field(form, "default_rendezvous")
    try:
        endpoint = parse_rendezvous(value)
    except FieldError as exc:
        return _settings(request, errors={"default_rendezvous": exc.message}, value=value,
                         status=400)
    rendezvous = request.app[RENDEZVOUS]
    fallback = request.app[CONFIG].rendezvous or rendezvous.embedded
    if endpoint is None and fallback is None:
        return _settings(request, errors={"default_rendezvous": "is required"}, value=value,
                         status=400)
    new_default = endpoint or fallback
    assert new_default is not None
    request.app[MANAGER].default_rendezvous = new_default
    await request.app[STORE].set_setting(SETTING_RENDEZVOUS,
                                         str(endpoint) if endpoint else None)
    raise web.HTTPSeeOther("/settings?saved=1")


def add_routes(app: web.Application) -> None:
    sid = "{id:[0-9a-f]{12}}"
    token = "{token:[A-Za-z0-9_-]{20,64}}"
    r = app.router
    r.add_get("/", sessions_page)
    r.add_post("/sessions", create_session)
    r.add_get(f"/sessions/{sid}", session_page)
    r.add_get(f"/sessions/{sid}/live", session_live, allow_head=False)
    r.add_post(f"/sessions/{sid}/peer", session_peer)
    r.add_post(f"/sessions/{sid}/stop", session_stop)
    r.add_get(f"/s/{token}", share_page)
    r.add_get(f"/s/{token}/live", share_live, allow_head=False)
    r.add_post(f"/s/{token}/peer", share_peer)
    r.add_post(f"/s/{token}/stop", share_stop)
    r.add_get("/history", history_page)
    r.add_get(f"/sessions/{sid}/delete", session_delete_page)
    r.add_post(f"/sessions/{sid}/delete", session_delete)
    r.add_get("/history/delete", history_delete_page)
    r.add_post("/history/delete", history_delete)
    r.add_get("/history.{fmt:csv|json}", history_export)
    r.add_get("/settings", settings_page)
    r.add_post("/settings", settings_save)
