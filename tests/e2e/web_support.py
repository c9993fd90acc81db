"""Helpers for the dashboard tests: a config on a temp DB, waiting, the API and its events."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient

from nopf_web.web import WebConfig
from nopf_web.wire.address import Endpoint

Client = TestClient[Any, Any]


def web_config(tmp_path: Path, **overrides: Any) -> WebConfig:
    """A dashboard on a temp DB with an embedded rendezvous on a free loopback port."""
    settings: dict[str, Any] = dict(
        db_path=tmp_path / "history.sqlite3", rendezvous_listen=Endpoint("127.0.0.1", 0),
        guard=False, punch_timeout=5.0, flush_interval=0.05)
    settings.update(overrides)
    return WebConfig(**settings)


async def wait_until(check: Callable[[], Awaitable[bool]], timeout: float = 10.0,
                     what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def connection(port: int) -> AsyncIterator[tuple[asyncio.StreamReader,
                                                      asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
               payload: bytes) -> bytes:
    """Send ``payload`` and read as many bytes back."""
    writer.write(payload)
    await writer.drain()
    return await asyncio.wait_for(reader.readexactly(len(payload)), 20)


async def create_session(client: Client, **body: Any) -> dict[str, Any]:
    """POST /api/sessions and insist on 201; the session object."""
    resp = await client.post("/api/sessions", json=body)
    assert resp.status == 201, await resp.text()
    data: dict[str, Any] = await resp.json()
    return data


async def csrf(client: Client, path: str = "/") -> str:
    page = await (await client.get(path)).text()
    match = re.search(r'name="csrf_token" value="([0-9a-f]{64})"', page)
    assert match, "no CSRF token in the page"
    return match.group(1)


async def create_by_form(client: Client, **fields: Any) -> str:
    """Create a session through the form; return its id."""
    form = {"csrf_token": await csrf(client), "rendezvous": "", "label": "", **fields}
    resp = await client.post("/sessions", data=form, allow_redirects=False)
    assert resp.status == 303, await resp.text()
    match = re.fullmatch(r"/sessions/([0-9a-f]{12})", resp.headers["Location"])
    assert match
    return match.group(1)


async def get_session(client: Client, session_id: str) -> dict[str, Any]:
    resp = await client.get(f"/api/sessions/{session_id}")
    assert resp.status == 200
    data: dict[str, Any] = await resp.json()
    return data


@dataclass(frozen=True)
class SseEvent:
    name: str
    data: str
    id: str | None  # the stream's last event id once this event arrived


class SseReader:
    """The events of a ``text/event-stream`` response, parsed as a browser's EventSource does."""

    def __init__(self, resp: ClientResponse) -> None:
        self.resp = resp
        self.comments: list[str] = []
        self.retry: int | None = None
        self.last_id: str | None = None
        # The event being read: kept here, so a wait cut short loses nothing.
        self._name = "message"
        self._data: list[str] = []

    async def next(self, timeout: float = 10.0) -> SseEvent | None:
        """The next event, or None once the server has closed the stream."""
        while True:
            try:
                raw = await asyncio.wait_for(self.resp.content.readline(), timeout)
            except TimeoutError:
                raise AssertionError(f"no server-sent event line within {timeout} s") from None
            if not raw:
                return None
            line = raw.decode().removesuffix("\n")
            if not line:
                name, data = self._name, self._data
                self._name, self._data = "message", []
                if data:
                    return SseEvent(name, "\n".join(data), self.last_id)
            elif line.startswith(":"):
                self.comments.append(line[1:].strip())
            else:
                field, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if field == "event":
                    self._name = value
                elif field == "data":
                    self._data.append(value)
                elif field == "id":
                    self.last_id = value
                elif field == "retry":
                    self.retry = int(value)

    async def take(self, count: int) -> list[SseEvent]:
        events: list[SseEvent] = []
        for _ in range(count):
            event = await self.next()
            assert event is not None, f"the stream ended after {len(events)} of {count} events"
            events.append(event)
        return events

    async def during(self, seconds: float) -> list[SseEvent]:
        """Every event for ``seconds`` (fewer if the stream ends)."""
        events: list[SseEvent] = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                event = await asyncio.wait_for(self.next(timeout=left + 1), left)
            except TimeoutError:  # readline was waiting: nothing of the stream is lost
                break
            if event is None:
                break
            events.append(event)
        return events

    async def until(self, check: Callable[[SseEvent], bool], timeout: float = 15.0,
                    what: str = "an event") -> list[SseEvent]:
        """Events up to and including the first that passes ``check``."""
        events: list[SseEvent] = []
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}; got "
                                     f"{[e.name for e in events]}")
            event = await self.next(timeout=left)
            assert event is not None, f"the stream ended before {what}"
            events.append(event)
            if check(event):
                return events
