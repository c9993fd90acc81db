"""A session page's live values, pushed as server-sent events (``GET <page>/live``).

The page renders every value through the same ``part_*`` macros
(``templates/_session_parts.html``) and opens a stream with ``?since=`` the
state token of what it shows. The stream then, every ``live_interval``,
renders the parts again from ``SessionView.from_managed``, and sends only
the parts whose HTML changed and each new event-log line, once
(:class:`~nopf_web.web.sse.LiveState`). When the session has ended it sends
the final values, then ``end``, and closes. Wire format: ``sse.py``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any, Final

from aiohttp import web
from markupsafe import Markup

from nopf_web.errors import NopfError

from .keys import CONFIG, LIVE_STREAMS, STORE, TEMPLATES
from .manager import ManagedSession
from .model import SessionView
from .render import csrf_token
from .sse import END, RETRY_MS, LiveState, LogEntry, Message, encode_comment, encode_retry

log = logging.getLogger("nopf.web")

# The live values: each is a part_NAME macro, an sse-swap="NAME" element and an event NAME.
PARTS: Final = ("state", "steps", "problem", "pairing", "code", "public", "peer", "path",
                "bytes_in", "rate_in", "bytes_out", "rate_out", "connections", "elapsed",
                "guard", "stop", "peer_form", "ended", "diagnosis", "timeline")
WRITE_TIMEOUT: Final = 10.0  # s a browser may leave its stream unread before it is dropped
_TEMPLATE: Final = "_session_parts.html"


class StreamStalled(NopfError):
    """The browser stopped reading its live stream."""


def live_parts(request: web.Request, view: SessionView, base: str) -> dict[str, Markup]:
    """Every live value's HTML, by part name (what the page shows and the stream sends)."""
    module = request.app[TEMPLATES].get_template(_TEMPLATE).module
    token = csrf_token(request)
    return {name: Markup(getattr(module, f"part_{name}")(view, base, token)).strip()
            for name in PARTS}


def page_token(parts: dict[str, Markup], log_entries: Sequence[LogEntry]) -> str:
    """The state token of a page that shows ``parts`` and the log up to its newest entry."""
    state = LiveState(PARTS)
    state.update(parts, log_entries, lambda _entry: None)
    return state.token()


class _Stream:
    """One open ``text/event-stream`` response: writes with a deadline, notes when."""

    def __init__(self, request: web.Request, response: web.StreamResponse) -> None:
        self.request = request
        self.response = response
        self.loop = asyncio.get_running_loop()
        self.last_write = self.loop.time()

    @property
    def gone(self) -> bool:
        transport = self.request.transport
        return transport is None or transport.is_closing()

    async def write(self, data: bytes) -> None:
        try:
            async with asyncio.timeout(WRITE_TIMEOUT):
                await self.response.write(data)
        except TimeoutError:
            raise StreamStalled(f"the browser read nothing of its live stream for "
                                f"{WRITE_TIMEOUT:g} s") from None
        self.last_write = self.loop.time()


async def stream(request: web.Request, view: SessionView, ms: ManagedSession | None,
                 base: str) -> web.StreamResponse:
    """The live stream of a session page at ``base`` (access already checked by the caller).

    A session no longer in memory gets its stored values and ``end`` at once.
    """
    streams = request.app[LIVE_STREAMS]
    token = request.headers.get("Last-Event-ID") or request.query.get("since")
    state = LiveState.from_token(PARTS, token)
    with streams.slot():
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-store",
            "X-Accel-Buffering": "no"})  # a buffering proxy (nginx) would hold events back
        await response.prepare(request)
        out = _Stream(request, response)
        try:
            await out.write(encode_retry(RETRY_MS))
            await _pump(request, out, state, view, ms, base)
        except (ConnectionResetError, StreamStalled) as exc:
            log.debug("live stream of %s ended: %s", view.id, exc)
    return response


async def _pump(request: web.Request, out: _Stream, state: LiveState, view: SessionView,
                ms: ManagedSession | None, base: str) -> None:
    config, streams = request.app[CONFIG], request.app[LIVE_STREAMS]
    module: Any = request.app[TEMPLATES].get_template(_TEMPLATE).module  # its macros

    def render_line(entry: LogEntry) -> str | None:
        # The engine also logs a pairing code, with its lifetime; the page shows it above.
        return None if entry.kind == "code" else str(module.log_line(entry))

    while True:
        log_entries: Sequence[LogEntry]
        if ms is not None:
            view = SessionView.from_managed(ms)
            log_entries = list(ms.events)
        else:
            log_entries = await request.app[STORE].events_for(view.id)
        ended = not view.live  # read with the values: the last round sends the final ones
        messages = state.update(live_parts(request, view, base), log_entries, render_line)
        data = b"".join(m.encode() for m in messages)
        if ended:
            data += Message(END, view.status, state.token()).encode()
        if data:
            await out.write(data)
        elif out.loop.time() - out.last_write >= config.live_heartbeat:
            await out.write(encode_comment("keepalive"))
        if ended or streams.closing or out.gone:
            return
        await streams.pause(config.live_interval)

