"""Live session pages: the server-sent event streams, against a real running dashboard."""

from __future__ import annotations

import asyncio
import html
import re
import time
from pathlib import Path

import pytest
from pytest_aiohttp import AiohttpClient

from nopf_web.guard.base import NullGuard
from nopf_web.web import create_app
from nopf_web.web.live import PARTS
from nopf_web.web.security import TOKEN_COOKIE
from tests.programs import free_port

from .web_support import (
    Client,
    SseEvent,
    SseReader,
    create_session,
    get_session,
    wait_until,
    web_config,
)

TOKEN = "lan-access-token-for-tests-0123456789"
INTERVAL = 0.2  # live_interval: quicker rounds than the default 0.5 s, same behaviour


@pytest.fixture
async def client(aiohttp_client: AiohttpClient, tmp_path: Path) -> Client:
    config = web_config(tmp_path, live_interval=INTERVAL)
    return await aiohttp_client(create_app(config, guard=NullGuard("tests")))


@pytest.fixture
async def lan(aiohttp_client: AiohttpClient, tmp_path: Path) -> Client:
    config = web_config(tmp_path, host="0.0.0.0", access_token=TOKEN, live_interval=INTERVAL)
    return await aiohttp_client(create_app(config, guard=NullGuard("tests")))


async def open_stream(client: Client, path: str,
                      headers: dict[str, str] | None = None) -> SseReader:
    resp = await client.get(path, headers=headers)
    assert resp.status == 200, await resp.text()
    assert resp.headers["Content-Type"] == "text/event-stream"
    assert resp.headers["Cache-Control"] == "no-store"
    return SseReader(resp)


async def waiting_seed_server(client: Client) -> dict[str, object]:
    """A seed-mode server session that knows its public address and waits for its peer."""
    session = await create_session(client, role="server", local_port=free_port(), mode="seed")

    async def waiting() -> bool:
        state = (await get_session(client, str(session["id"])))["state"]
        return bool(state == "waiting_peer")

    await wait_until(waiting, what="the session waiting for its peer")
    return await get_session(client, str(session["id"]))


async def page_stream_url(client: Client, page_path: str) -> str:
    page = await (await client.get(page_path)).text()
    match = re.search(r'sse-connect="([^"]+)"', page)
    assert match, "the page opens no event stream"
    return html.unescape(match.group(1))


def by_name(events: list[SseEvent], name: str) -> list[str]:
    return [e.data for e in events if e.name == name]


async def test_a_stream_sends_every_value_once_then_only_what_changes(client: Client) -> None:
    session = await waiting_seed_server(client)
    reader = await open_stream(client, f"/sessions/{session['id']}/live")
    first = await reader.take(len(PARTS))
    assert reader.retry == 2000
    assert [e.name for e in first] == list(PARTS)  # no ?since=: the full set, in order
    values = {e.name: e.data for e in first}
    assert "badge-waiting_peer" in values["state"]
    assert f'<code id="public-address">{session["public_address"]}</code>' in values["public"]
    assert 'data-copy="' in values["public"]  # seed mode: its copy button
    assert values["bytes_in"] == '<span id="bytes-in" data-bytes="0">0 B</span>'
    assert 'action="/sessions/' in values["stop"] and 'name="address"' in values["peer_form"]
    assert values["code"] == "" and values["pairing"] == ""
    assert all(e.id for e in first)

    later = await reader.during(2.5)
    lines = by_name(later, "line")
    assert any("your public address is" in line for line in lines)  # the log so far, once
    assert len(lines) == len(set(lines))
    changed = [e for e in later if e.name != "line"]
    assert "elapsed" in {e.name for e in changed}  # 2.5 s: it ticked at least twice
    assert len(by_name(changed, "elapsed")) >= 2
    for event in changed:  # a value is sent again only when its HTML differs
        assert event.data != values[event.name], event
        values[event.name] = event.data
    assert not {e.name for e in changed} & {"state", "steps", "public", "stop", "peer_form",
                                            "pairing", "guard"}


async def test_the_pages_stream_starts_from_what_the_page_shows(client: Client) -> None:
    session = await waiting_seed_server(client)
    url = await page_stream_url(client, f"/sessions/{session['id']}")
    assert url.startswith(f"/sessions/{session['id']}/live?since=")
    reader = await open_stream(client, url)
    events = await reader.during(1.6)
    # Nothing the page shows is sent again: only the clock (and no old log line).
    assert {e.name for e in events} <= {"elapsed", "rate_in", "rate_out"}, events
    assert "elapsed" in {e.name for e in events}

    # A browser reconnecting with the last id it got is sent nothing it has either.
    again = await open_stream(client, f"/sessions/{session['id']}/live",
                              headers={"Last-Event-ID": reader.last_id or ""})
    assert {e.name for e in await again.during(1.2)} <= {"elapsed", "rate_in", "rate_out"}


async def test_a_peer_form_error_on_the_page_is_not_swapped_away(client: Client) -> None:
    session = await waiting_seed_server(client)
    page = await (await client.get(f"/sessions/{session['id']}")).text()
    csrf = re.search(r'name="csrf_token" value="([0-9a-f]{64})"', page)
    assert csrf
    resp = await client.post(f"/sessions/{session['id']}/peer",
                             data={"csrf_token": csrf.group(1), "address": "not an address"})
    page = await resp.text()
    assert resp.status == 400 and 'id="address-error"' in page
    match = re.search(r'sse-connect="([^"]+)"', page)
    assert match
    reader = await open_stream(client, html.unescape(match.group(1)))
    # The form with its error and the typed text stays until the form has to go.
    assert "peer_form" not in {e.name for e in await reader.during(1.2)}


async def test_a_new_event_line_is_sent_once_and_the_values_it_changes(client: Client) -> None:
    session = await waiting_seed_server(client)
    reader = await open_stream(client, await page_stream_url(client,
                                                             f"/sessions/{session['id']}"))
    resp = await client.post(f"/api/sessions/{session['id']}/peer",
                             json={"address": "127.0.0.9:4242"})
    assert resp.status == 200
    events = await reader.until(lambda e: e.name == "state" and "badge-punching" in e.data,
                                what="the punching state")
    events += await reader.during(1.5)
    lines = by_name(events, "line")
    assert sum("peer address set to 127.0.0.9:4242" in line for line in lines) == 1
    assert len(lines) == len(set(lines))
    assert '<code id="peer-address">127.0.0.9:4242</code>' in by_name(events, "peer")
    assert by_name(events, "peer_form") == [""]  # the peer form goes, once
    assert all(line.startswith('<li class="log-') for line in lines)


async def test_the_stream_ends_once_the_session_has_ended(client: Client) -> None:
    session = await create_session(client, role="server", local_port=free_port())
    session_id = session["id"]
    reader = await open_stream(client, f"/sessions/{session_id}/live")
    await reader.take(len(PARTS))
    resp = await client.delete(f"/api/sessions/{session_id}")
    assert resp.status == 200
    events = await reader.until(lambda e: e.name == "end", what="the end event")
    assert events[-1].data == "stopped"
    finals = {e.name: e.data for e in events}
    assert "badge-stopped" in finals["state"]
    assert finals["stop"] == "" and finals["steps"] == ""
    assert "<dt>Lasted</dt>" in finals["elapsed"]
    assert finals["rate_in"] == "" and finals["ended"] != "—"
    assert any("session stopped" in line for line in by_name(events, "line"))
    assert await reader.next(timeout=3) is None  # and the server closes the stream

    # A finished session's stream: what the browser lacks, then the end at once.
    again = await open_stream(client, f"/sessions/{session_id}/live",
                              headers={"Last-Event-ID": reader.last_id or ""})
    assert [(e.name, e.data) for e in await again.during(3)] == [("end", "stopped")]
    fresh = await open_stream(client, f"/sessions/{session_id}/live")
    rest = await fresh.during(3)
    assert [e.name for e in rest[:len(PARTS)]] == list(PARTS) and rest[-1].name == "end"


async def test_a_share_link_streams_its_session_with_the_same_rules_as_its_page(
        lan: Client) -> None:
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    made = []
    for label in ("shared", "private"):
        resp = await lan.post("/api/sessions", headers=bearer,
                              json={"role": "server", "local_port": free_port(), "label": label})
        made.append(await resp.json())
    shared, private = made
    share_path = "/" + shared["share_url"].split("/", 3)[3]
    page = await (await lan.get(share_path)).text()
    assert f'sse-connect="{share_path}/live?since=' in page
    reader = await open_stream(lan, f"{share_path}/live")  # the link is the credential
    values = {e.name: e.data for e in await reader.take(len(PARTS))}
    assert f'action="{share_path}/stop"' in values["stop"]
    csrf = re.search(r'name="csrf_token" value="([0-9a-f]{64})"', page)
    assert csrf and csrf.group(1) in values["stop"]  # bound to the share link, as on its page
    assert (await lan.get(share_path[:-4] + "AAAA/live")).status == 404

    # Without the access token: refused, as the pages are.
    for path in (f"/sessions/{shared['id']}/live", f"/sessions/{private['id']}/live"):
        resp = await lan.get(path)
        assert resp.status == 401 and "access token" in await resp.text()
    await open_stream(lan, f"/sessions/{private['id']}/live", headers=bearer)
    resp = await lan.get(f"/sessions/{private['id']}/live?token={TOKEN}", allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"] == f"/sessions/{private['id']}/live"
    assert resp.cookies[TOKEN_COOKIE].value == TOKEN
    await open_stream(lan, f"/sessions/{private['id']}/live")  # the cookie is enough now


async def test_a_foreign_host_gets_no_stream(client: Client) -> None:
    session = await create_session(client, role="server", local_port=free_port())
    share_path = "/" + str(session["share_url"]).split("/", 3)[3]
    for path in (f"/sessions/{session['id']}/live", f"{share_path}/live"):
        resp = await client.get(path, headers={"Host": "evil.example"})
        assert resp.status == 403 and "DNS rebinding" in await resp.text()
    assert (await client.get("/sessions/0123456789ab/live")).status == 404


async def test_open_streams_are_capped(aiohttp_client: AiohttpClient, tmp_path: Path) -> None:
    config = web_config(tmp_path, live_interval=INTERVAL, max_live_streams=2)
    client = await aiohttp_client(create_app(config, guard=NullGuard("tests")))
    session = await create_session(client, role="server", local_port=free_port())
    path = f"/sessions/{session['id']}/live"
    first, _second = await open_stream(client, path), await open_stream(client, path)
    resp = await client.get(path)
    assert resp.status == 503 and "2 live pages are already open" in await resp.text()
    first.resp.close()  # a page closed: its place is free once the server notices

    async def accepted() -> bool:
        resp = await client.get(path)
        resp.close()
        return resp.status == 200

    await wait_until(accepted, timeout=5, what="a stream accepted again")


async def test_a_quiet_stream_sends_keepalive_comments(aiohttp_client: AiohttpClient,
                                                       tmp_path: Path) -> None:
    config = web_config(tmp_path, live_interval=0.1, live_heartbeat=0.3)
    client = await aiohttp_client(create_app(config, guard=NullGuard("tests")))
    session = await create_session(client, role="server", local_port=free_port())
    reader = await open_stream(client, f"/sessions/{session['id']}/live")
    await reader.during(2.5)  # the elapsed time changes each second: quiet spells between
    assert "keepalive" in reader.comments


async def test_shutdown_ends_open_streams_without_waiting_for_the_page(
        client: Client) -> None:
    session = await create_session(client, role="server", local_port=free_port())
    reader = await open_stream(client, f"/sessions/{session['id']}/live")
    await reader.take(len(PARTS))
    started = time.monotonic()
    closing = asyncio.create_task(client.server.close(), name="test-server-close")
    tail = await reader.during(8)
    await asyncio.wait_for(closing, 10)
    assert time.monotonic() - started < 5  # aiohttp alone would wait for the handler (60 s)
    assert "end" not in {e.name for e in tail}  # the page reconnects and learns the outcome
    assert await reader.next(timeout=1) is None

