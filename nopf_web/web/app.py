"""The application factory: routes, middlewares, and the background services.

The history store, the embedded rendezvous (and its NAT doctor responder), the guard,
the session manager and the NAT doctor's cache are ``cleanup_ctx`` contexts: started
before the first request, torn down in reverse order at shutdown (sessions are stopped
and recorded as ``interrupted`` while the store is still open). Before that,
``on_shutdown`` ends the live pages' event streams, which aiohttp would otherwise wait for.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from nopf_web.db import HistoryStore
from nopf_web.doctor.cache import DoctorCache
from nopf_web.doctor.report import DoctorReport
from nopf_web.errors import NopfError
from nopf_web.guard import make_guard
from nopf_web.guard.base import Guard, NullGuard
from nopf_web.inputs import InputError
from nopf_web.rendezvous.doctor import DoctorResponder
from nopf_web.rendezvous.server import RendezvousServer
from nopf_web.resources import resource_dir
from nopf_web.wire.address import Endpoint, parse_host_endpoint
from nopf_web.wire.nat import NatSummary

from . import api, doctor, stats, views
from .config import WebConfig
from .keys import (
    CONFIG,
    DOCTOR,
    GUARD,
    LIVE_STREAMS,
    MANAGER,
    RENDEZVOUS,
    SECRET,
    STORE,
    TEMPLATES,
    Rendezvous,
)
from .manager import SessionManager
from .render import make_templates
from .security import MIDDLEWARES, security_headers
from .streams import LiveStreams

log = logging.getLogger("nopf.web")

MAX_BODY = 64 * 1024  # forms and JSON bodies are tiny; refuse big ones with 413
STREAMS_CLOSE_TIMEOUT = 15.0  # s shutdown waits for live streams (a stalled write ends in 10)


class StartupError(NopfError):
    """A background service could not start (the message says which and why)."""


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    store = await HistoryStore.open(config.db_path, flush_interval=config.flush_interval)
    interrupted = await store.mark_interrupted()
    if interrupted:
        log.info("%d session(s) were running when the dashboard last stopped: recorded as "
                 "interrupted", interrupted)
    store.start()
    app[STORE] = store
    yield
    await store.close()


async def _rendezvous_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    if config.rendezvous is not None:
        yield
        return
    listen = config.rendezvous_listen
    server = RendezvousServer(listen.host, listen.port)
    try:
        await server.start()
    except OSError as exc:
        raise StartupError(
            f"cannot start the embedded rendezvous on {listen} ({exc.strerror or exc}): "
            "another nopf-server may be running there; use it with --rendezvous "
            f"{listen}, or choose another --rendezvous-listen") from None
    host, port = server.address
    # Sessions reach a wildcard listener through loopback.
    app[RENDEZVOUS].embedded = Endpoint("127.0.0.1" if host in ("0.0.0.0", "::") else host,
                                        port)
    try:
        async with contextlib.AsyncExitStack() as stack:
            # Its NAT doctor, on the next port if free (any free port when the rendezvous
            # took any): the Doctor page works out of the box (against loopback it can
            # only say so). Not worth failing the start for.
            doctor_port = 0 if listen.port == 0 else port + 1
            if doctor_port <= 65535:
                try:
                    responder = await stack.enter_async_context(
                        DoctorResponder(listen.host, doctor_port))
                except OSError as exc:
                    log.info("no NAT doctor beside the embedded rendezvous: cannot listen on "
                             "%s:%d (%s)", listen.host, doctor_port, exc.strerror or exc)
                else:
                    app[RENDEZVOUS].doctor_port = responder.address[1]
            yield
    finally:
        await server.close()


async def _doctor_ctx(app: web.Application) -> AsyncIterator[None]:
    async with DoctorCache() as cache:
        app[DOCTOR] = cache
        # Measured once at start, in the background, so that the first coordinated
        # session's hello already carries our NAT report (a pairing never waits for
        # it). Not against a rendezvous on this machine or LAN: that says nothing.
        target = doctor.doctor_target(app)
        if not DoctorReport(str(target[0])).rendezvous_is_local:
            cache.warm(*target)
        yield


async def _close_streams(app: web.Application) -> None:
    # on_shutdown: before aiohttp waits for its handlers, which an open page would hold.
    await app[LIVE_STREAMS].close(STREAMS_CLOSE_TIMEOUT)


def _guard_ctx(guard: Guard | None) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        chosen = guard or (make_guard() if app[CONFIG].guard else NullGuard())
        chosen.start()
        app[GUARD] = chosen
        try:
            yield
        finally:
            # Removes any packet filter still in place; joining a window's receive
            # thread takes up to a poll interval, so not on the event loop.
            await asyncio.to_thread(chosen.stop)
    return ctx


async def _manager_ctx(app: web.Application) -> AsyncIterator[None]:
    config, store = app[CONFIG], app[STORE]
    default = config.rendezvous or await _stored_rendezvous(store) or app[RENDEZVOUS].embedded
    assert default is not None  # no --rendezvous means the embedded one runs
    def nat_report() -> NatSummary | None:
        cache = app.get(DOCTOR)  # the doctor's context starts after this one
        report = cache.last_report() if cache is not None else None
        return None if report is None else NatSummary.from_report(report)

    manager = SessionManager(store, app[GUARD], default, punch_timeout=config.punch_timeout,
                             max_live=config.max_live_sessions, nat_report=nat_report,
                             port_mapping=config.port_mapping)
    # Its TaskGroup holds every session; leaving it stops them (recorded as interrupted)
    # while the store is still open.
    async with manager.running():
        app[MANAGER] = manager
        yield


async def _stored_rendezvous(store: HistoryStore) -> Endpoint | None:
    text = await store.get_setting(views.SETTING_RENDEZVOUS)
    if not text:
        return None
    try:
        return parse_host_endpoint(text)
    except InputError:
        log.warning("ignoring the stored default rendezvous %r: not HOST:PORT", text)
        return None


def create_app(config: WebConfig, *, guard: Guard | None = None) -> web.Application:
    """The dashboard; its services start with the app (``AppRunner.setup`` or a test client)."""
    app = web.Application(middlewares=MIDDLEWARES, client_max_size=MAX_BODY)
    app[CONFIG] = config
    app[SECRET] = secrets.token_bytes(32)
    app[TEMPLATES] = make_templates()
    app[RENDEZVOUS] = Rendezvous()
    app[LIVE_STREAMS] = LiveStreams(config.max_live_streams)
    app.cleanup_ctx.append(_store_ctx)
    app.cleanup_ctx.append(_rendezvous_ctx)
    app.cleanup_ctx.append(_guard_ctx(guard))
    app.cleanup_ctx.append(_manager_ctx)
    app.cleanup_ctx.append(_doctor_ctx)
    app.on_shutdown.append(_close_streams)
    app.on_response_prepare.append(security_headers)
    views.add_routes(app)
    api.add_routes(app)
    doctor.add_routes(app)
    stats.add_routes(app)
    app.router.add_static("/static/", resource_dir("static"), name="static")
    return app
