"""HTML views: full pages, htmx fragments, forms with errors in place, history and exports."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

from nopf_web.pairing import make_code
from nopf_web.web.keys import STORE
from tests.programs import free_port

from .web_support import Client, create_by_form, csrf, wait_until

HX = {"HX-Request": "true"}


async def test_the_sessions_page_is_a_full_page_and_a_fragment_for_htmx(client: Client) -> None:
    resp = await client.get("/")
    page = await resp.text()
    assert resp.status == 200 and page.startswith("<!doctype html>")
    assert 'src="/static/htmx.min.js"' in page and "<form" in page
    assert resp.headers["Vary"] == "HX-Request"
    fragment = await (await client.get("/", headers=HX)).text()
    assert "<html" not in fragment and 'id="session-list"' in fragment
    restore = await (await client.get("/", headers={**HX, "HX-History-Restore-Request": "true"}
                                      )).text()
    assert restore.startswith("<!doctype html>")


async def test_the_session_list_poll_gets_a_204_while_nothing_changed(client: Client) -> None:
    fragment = await (await client.get("/", headers=HX)).text()
    seen = re.search(r'hx-get="/\?seen=([0-9a-f]{16})" hx-trigger="every 2s"', fragment)
    assert seen and "No sessions yet" in fragment
    resp = await client.get(f"/?seen={seen.group(1)}", headers=HX)
    assert resp.status == 204 and await resp.read() == b""
    session_id = await create_by_form(client, role="server", local_port=str(free_port()),
                                      label="new")
    resp = await client.get(f"/?seen={seen.group(1)}", headers=HX)
    fragment = await resp.text()
    assert resp.status == 200 and session_id in fragment and "new" in fragment
    assert f"seen={seen.group(1)}" not in fragment
    page = await (await client.get(f"/?seen={seen.group(1)}")).text()  # a full page, always
    assert page.startswith("<!doctype html>") and session_id in page


async def test_static_files_are_vendored(client: Client) -> None:
    resp = await client.get("/static/htmx.min.js")
    assert resp.status == 200
    assert (await resp.text()).startswith("/*! htmx 2.")
    assert (await client.get("/static/app.css")).status == 200
    resp = await client.get("/static/htmx-ext-sse.min.js")  # for htmx 2, loaded on every page
    assert resp.status == 200 and (await resp.text()).startswith("/*! htmx-ext-sse 2.")
    assert "Zero Clause" in await (await client.get("/static/htmx-ext-sse.LICENSE")).text()
    page = await (await client.get("/")).text()
    assert 'src="/static/htmx-ext-sse.min.js"' in page and "https://" not in page


async def test_a_form_error_is_shown_next_to_the_field_and_keeps_the_input(
        client: Client) -> None:
    form = {"csrf_token": await csrf(client), "role": "client", "local_port": "99999",
            "rendezvous": "", "label": "my label"}
    resp = await client.post("/sessions", data=form)
    page = await resp.text()
    assert resp.status == 400
    assert 'id="local_port-error"' in page and "out of range" in page
    assert 'value="99999"' in page and 'value="my label"' in page
    assert 'value="client" checked' in page
    assert 'aria-invalid="true"' in page


async def test_create_then_the_session_page_and_its_live_fragment(client: Client) -> None:
    session_id = await create_by_form(client, role="server", local_port=str(free_port()),
                              label="<b>web</b> & co", mode="seed")
    page = await (await client.get(f"/sessions/{session_id}")).text()
    assert "&lt;b&gt;web&lt;/b&gt; &amp; co" in page and "<b>web</b>" not in page  # autoescape
    assert 'id="live"' in page and 'hx-ext="sse"' in page  # pushed, not polled: see test_web_live
    assert f'sse-connect="/sessions/{session_id}/live?since=' in page
    assert 'sse-close="end"' in page and 'sse-swap="state"' in page
    assert 'name="address"' in page  # the peer form, while the peer is unknown
    assert "/s/" in page  # the share link

    async def public() -> bool:
        fragment = await (await client.get(f"/sessions/{session_id}", headers=HX)).text()
        return 'id="public-address"' in fragment

    await wait_until(public, what="the public address on the page")
    fragment = await (await client.get(f"/sessions/{session_id}", headers=HX)).text()
    assert "<html" not in fragment
    assert 'id="event-log" class="card" aria-labelledby="log-h" hx-swap-oob="true"' in fragment
    assert "waiting" in fragment


async def test_peer_form_errors_and_success(client: Client) -> None:
    session_id = await create_by_form(client, role="server", local_port=str(free_port()),
                                      mode="seed")
    token = await csrf(client, f"/sessions/{session_id}")
    resp = await client.post(f"/sessions/{session_id}/peer",
                             data={"csrf_token": token, "address": "not an address"})
    page = await resp.text()
    assert resp.status == 400 and 'id="address-error"' in page and "not an address" in page
    resp = await client.post(f"/sessions/{session_id}/peer",
                             data={"csrf_token": token, "address": "127.0.0.5:4000"},
                             allow_redirects=False)
    assert resp.status == 303
    page = await (await client.get(f"/sessions/{session_id}")).text()
    assert "127.0.0.5:4000" in page and 'name="address"' not in page


async def test_the_form_defaults_to_pairing_codes_and_a_server_page_shows_its_code(
        client: Client) -> None:
    page = await (await client.get("/")).text()
    assert 'name="mode" value="coordinated" checked' in page
    assert 'name="mode" value="seed">' in page and 'name="code"' in page
    session_id = await create_by_form(client, role="server", local_port=str(free_port()),
                              code="ignored for a server")
    page = await (await client.get(f"/sessions/{session_id}")).text()
    assert 'name="address"' not in page  # no peer address in coordinated mode
    assert "pairing code (encrypted)" in page

    async def code_shown() -> bool:
        fragment = await (await client.get(f"/sessions/{session_id}", headers=HX)).text()
        return 'id="pairing-code"' in fragment

    await wait_until(code_shown, what="the pairing code on the page")
    fragment = await (await client.get(f"/sessions/{session_id}", headers=HX)).text()
    code = re.search(r'id="pairing-code">([^<]+)<', fragment)
    assert code
    assert f'data-copy="{code.group(1)}"' in fragment  # its copy button
    invite = re.search(r'data-copy="([^"]+)" data-label="Copy invitation"', fragment)
    assert invite and f"nopf connect {code.group(1)} -p PORT -a 127.0.0.1:" in invite.group(1)
    assert 'id="invite"' in fragment
    assert "Send the code below to the peer" in fragment


async def test_a_client_form_needs_a_valid_code(client: Client) -> None:
    for code, words in (("", "is required"), ("7-orbit", "expected 2"),
                        ("<b>7-x-y</b>", "must start with a number")):
        form = {"csrf_token": await csrf(client), "role": "client",
                "local_port": str(free_port()), "mode": "coordinated", "code": code,
                "rendezvous": "", "label": ""}
        resp = await client.post("/sessions", data=form)
        page = await resp.text()
        assert resp.status == 400, code
        assert 'id="code-error"' in page and words in page
        assert "<b>7-x-y</b>" not in page  # autoescaped, in the error and the kept value
    form["mode"] = "seed"  # a seed client takes no code: the (hidden) field is ignored
    resp = await client.post("/sessions", data=form, allow_redirects=False)
    assert resp.status == 303


async def test_stop_ends_the_session_and_the_page_stops_updating(client: Client) -> None:
    session_id = await create_by_form(client, role="server", local_port=str(free_port()))
    token = await csrf(client, f"/sessions/{session_id}")
    resp = await client.post(f"/sessions/{session_id}/stop", data={"csrf_token": token},
                             allow_redirects=False)
    assert resp.status == 303
    page = await (await client.get(f"/sessions/{session_id}")).text()
    assert "sse-connect" not in page and "hx-trigger" not in page  # nothing left to update
    assert "<noscript>" not in page  # nor a refresh link
    fragment = await (await client.get(f"/sessions/{session_id}", headers=HX)).text()
    assert "hx-trigger" not in fragment and "sse-connect" not in fragment
    assert 'id="peer-section" hx-swap-oob="true"' in fragment  # the peer form goes away
    assert "badge-stopped" in fragment


async def test_unknown_session_pages_are_404_pages(client: Client) -> None:
    resp = await client.get("/sessions/0123456789ab")
    assert resp.status == 404 and "Not found" in await resp.text()
    resp = await client.get("/s/AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")
    assert resp.status == 404


async def test_history_filters_pages_and_fragments(client: Client) -> None:
    ids = [await create_by_form(client, role="server", local_port=str(free_port()),
                                label=f"job {i}")
           for i in range(3)]
    token = await csrf(client)
    await client.post(f"/sessions/{ids[0]}/stop", data={"csrf_token": token})
    page = await (await client.get("/history")).text()
    assert "3 sessions" in page and "job 0" in page and 'role="search"' in page
    fragment = await (await client.get("/history?outcome=stopped", headers=HX)).text()
    assert "<html" not in fragment and "1 session<" in fragment and "job 0" in fragment
    fragment = await (await client.get("/history?q=job%202", headers=HX)).text()
    assert "job 2" in fragment and "job 1" not in fragment
    for bad in ("outcome=won", "page=0", "page=x", "q=" + "x" * 101):
        resp = await client.get(f"/history?{bad}")
        assert resp.status == 400, bad


async def test_history_exports_as_csv_and_json(client: Client) -> None:
    await create_by_form(client, role="server", local_port=str(free_port()), label="=HYPERLINK(1)")
    resp = await client.get("/history.csv")
    assert resp.headers["Content-Disposition"] == 'attachment; filename="nopf-history.csv"'
    rows = list(csv.DictReader(io.StringIO(await resp.text())))
    assert rows[0]["label"] == "'=HYPERLINK(1)"  # no formula injection into spreadsheets
    assert rows[0]["outcome"] == "running" and rows[0]["role"] == "server"
    data = await (await client.get("/history.json?outcome=running")).json()
    assert data["sessions"][0]["label"] == "=HYPERLINK(1)"
    assert data["sessions"][0]["connections"] == []


async def test_settings_show_the_database_and_change_the_default_rendezvous(
        client: Client, tmp_path: Path) -> None:
    page = await (await client.get("/settings")).text()
    assert str(tmp_path / "history.sqlite3") in page
    token = await csrf(client, "/settings")
    resp = await client.post("/settings", data={"csrf_token": token,
                                                "default_rendezvous": "bad address"})
    assert resp.status == 400 and 'id="default_rendezvous-error"' in await resp.text()
    resp = await client.post("/settings", data={"csrf_token": token,
                                                "default_rendezvous": "127.0.0.9:3012"},
                             allow_redirects=False)
    assert resp.status == 303
    page = await (await client.get("/")).text()
    assert 'placeholder="127.0.0.9:3012"' in page
    # An IPv6 rendezvous, in brackets (without them: ambiguous, refused in one line).
    for value, status in (("2001:db8::9:3012", 400), ("[2001:DB8::9]:3012", 303)):
        resp = await client.post("/settings", allow_redirects=False,
                                 data={"csrf_token": token, "default_rendezvous": value})
        assert resp.status == status, value
        assert (status == 303) != ("put an IPv6 address in brackets" in await resp.text())
    assert 'placeholder="[2001:db8::9]:3012"' in await (await client.get("/")).text()
    resp = await client.post("/settings", data={"csrf_token": token, "default_rendezvous": ""},
                             allow_redirects=False)
    assert resp.status == 303
    page = await (await client.get("/")).text()
    assert 'placeholder="127.0.0.1:' in page  # back to the embedded rendezvous


async def _stop(client: Client, session_id: str) -> None:
    """Stop it (a session that has ended already stays as it ended)."""
    token = await csrf(client)
    resp = await client.post(f"/sessions/{session_id}/stop", data={"csrf_token": token},
                             allow_redirects=False)
    assert resp.status == 303


async def test_ended_sessions_are_deleted_from_the_history_after_a_page_that_asks(
        client: Client) -> None:
    store = client.app[STORE]
    ids = [await create_by_form(client, role="server", local_port=str(free_port()),
                                label=f"job {i}", mode="seed") for i in range(3)]
    for session_id in ids[:2]:
        await _stop(client, session_id)
    share = re.search(r'id="share-url">[^<]*/s/([A-Za-z0-9_-]+)<',
                      await (await client.get(f"/sessions/{ids[0]}")).text())
    assert share
    # The history offers it for what it shows; the page that asks counts ended ones only.
    table = await (await client.get("/history?outcome=stopped")).text()
    assert 'href="/history/delete?outcome=stopped&amp;q="' in table
    page = await (await client.get("/history/delete?outcome=&q=job")).text()
    assert ("Delete 2 ended sessions that match the search “job”, with their connections and "
            "event logs? This cannot be undone. Running sessions stay.") in page
    assert 'name="q" value="job"' in page and "Delete 2 sessions</button>" in page
    # Without the form's token nothing goes.
    resp = await client.post("/history/delete", data={"q": "job"}, allow_redirects=False)
    assert resp.status == 403 and await store.get_session(ids[0]) is not None
    token = await csrf(client, "/history/delete?q=job")
    resp = await client.post("/history/delete", data={"csrf_token": token, "outcome": "",
                                                      "q": "job"}, allow_redirects=False)
    assert (resp.status, resp.headers["Location"]) == (303, "/history?deleted=2")
    page = await (await client.get("/history?deleted=2")).text()
    assert "Deleted 2 sessions from the history." in page
    for session_id in ids[:2]:
        assert await store.get_session(session_id) is None
        assert await store.events_for(session_id) == []  # the event log went with it
        assert (await client.get(f"/sessions/{session_id}")).status == 404
    assert (await client.get(f"/s/{share.group(1)}")).status == 404  # its share link too
    sessions = await (await client.get("/", headers=HX)).text()
    assert "job 0" not in sessions and "job 2" in sessions  # gone from the list too
    # A running session is not deleted: its page says to stop it first.
    running = ids[2]
    page = await (await client.get(f"/sessions/{running}")).text()
    assert "Delete from the history…" not in page
    page = await (await client.get(f"/sessions/{running}/delete")).text()
    assert "This session is running: stop it first, then delete it." in page
    resp = await client.post(f"/sessions/{running}/delete",
                             data={"csrf_token": await csrf(client)}, allow_redirects=False)
    assert resp.status == 409 and await store.get_session(running) is not None
    await _stop(client, running)
    page = await (await client.get(f"/sessions/{running}")).text()
    assert f'href="/sessions/{running}/delete"' in page
    page = await (await client.get(f"/sessions/{running}/delete")).text()
    assert "Delete the session “job 2” (server, stopped, started" in page
    resp = await client.post(f"/sessions/{running}/delete",
                             data={"csrf_token": await csrf(client)}, allow_redirects=False)
    assert (resp.status, resp.headers["Location"]) == (303, "/history?deleted=1")
    assert await store.get_session(running) is None
    page = await (await client.get("/history/delete")).text()
    assert "No ended session matches: nothing to delete." in page


async def test_start_again_fills_the_form_as_the_session_was_made(client: Client) -> None:
    first, second = free_port(), free_port()
    server = await create_by_form(client, role="server", mode="coordinated", label="ssh",
                                  local_port=f"{first}, 127.0.0.2:{second}",
                                  rendezvous="127.0.0.1:9")
    page = await (await client.get(f"/sessions/{server}")).text()
    assert 'id="again-link"' not in page  # running: nothing to start again yet
    await _stop(client, server)
    page = await (await client.get(f"/sessions/{server}")).text()
    assert f'href="/?again={server}" id="again-link"' in page
    form = await (await client.get(f"/?again={server}")).text()
    assert f'value="{first}, 127.0.0.2:{second}"' in form
    assert 'value="server" checked' in form and 'value="coordinated" checked' in form
    assert 'value="127.0.0.1:9"' in form and 'value="ssh"' in form
    assert "Filled in as" in form and "ask the sharer for a new one" not in form
    # A client's code is used once: the form asks for a new one; the default rendezvous
    # stays empty (it follows the default).
    joiner = await create_by_form(client, role="client", mode="coordinated",
                                  code=str(make_code(7)), local_port=str(free_port()))
    await _stop(client, joiner)
    form = await (await client.get(f"/?again={joiner}")).text()
    assert "a code works once, so ask the sharer for a new one" in form
    assert 'value="client" checked' in form and str(make_code(7)) not in form
    assert re.search(r'id="rendezvous" [^>]*value=""', form)
    resp = await client.get("/?again=zz")
    assert resp.status == 400 and "again must be a session id" in await resp.text()
    assert (await client.get("/?again=0123456789ab")).status == 404
