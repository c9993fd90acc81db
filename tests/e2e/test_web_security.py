"""DNS rebinding, CSRF, LAN access tokens and share links."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pytest_aiohttp import AiohttpClient

from nopf_web.guard.base import NullGuard
from nopf_web.web import create_app
from nopf_web.web.security import TOKEN_COOKIE
from tests.programs import free_port

from .web_support import Client, web_config

TOKEN = "lan-access-token-for-tests-0123456789"


@pytest.fixture
async def lan(aiohttp_client: AiohttpClient, tmp_path: Path) -> Client:
    # LAN mode comes from the configured bind address; the test server itself stays on loopback.
    config = web_config(tmp_path, host="0.0.0.0", access_token=TOKEN)
    return await aiohttp_client(create_app(config, guard=NullGuard("tests")))


def _csrf(page: str) -> str:
    match = re.search(r'name="csrf_token" value="([0-9a-f]{64})"', page)
    assert match
    return match.group(1)


async def test_security_headers_are_set(client: Client) -> None:
    resp = await client.get("/")
    assert "script-src 'self'" in resp.headers["Content-Security-Policy"]
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert resp.headers["Referrer-Policy"] == "same-origin"
    assert resp.headers["X-Frame-Options"] == "DENY"


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8080", "127.0.0.1.nip.io",
                                  "192.168.1.5:8080", ""])
async def test_a_foreign_host_header_is_refused(client: Client, host: str) -> None:
    for resp in (await client.get("/", headers={"Host": host}),
                 await client.get("/api/sessions", headers={"Host": host}),
                 await client.post("/api/sessions", headers={"Host": host},
                                   json={"role": "server", "local_port": 22})):
        assert resp.status == 403
        assert "DNS rebinding" in await resp.text()


@pytest.mark.parametrize("host", ["localhost:8080", "127.0.0.1", "[::1]:8080", "LOCALHOST"])
async def test_loopback_host_names_are_served(client: Client, host: str) -> None:
    assert (await client.get("/api/sessions", headers={"Host": host})).status == 200


async def test_a_cross_origin_form_post_is_refused_even_with_a_token(client: Client) -> None:
    token = _csrf(await (await client.get("/")).text())
    form = {"csrf_token": token, "role": "server", "local_port": "22"}
    resp = await client.post("/sessions", data=form, headers={"Origin": "http://evil.example"})
    assert resp.status == 403 and "cross-origin" in await resp.text()
    resp = await client.post("/sessions", data=form, headers={"Origin": "null"})
    assert resp.status == 403
    resp = await client.post("/sessions", data=form, headers={"Sec-Fetch-Site": "cross-site"})
    assert resp.status == 403
    same = f"http://{client.host}:{client.port}"
    resp = await client.post("/sessions", data=form, headers={"Origin": same},
                             allow_redirects=False)
    assert resp.status == 303


async def test_a_cross_origin_api_call_is_refused(client: Client) -> None:
    resp = await client.post("/api/sessions", json={"role": "server", "local_port": 22},
                             headers={"Origin": "http://evil.example"})
    assert resp.status == 403
    assert "cross-origin" in (await resp.json())["error"]
    assert (await client.get("/api/sessions")).status == 200
    resp = await client.get("/api/sessions")
    assert (await resp.json())["sessions"] == []  # nothing was created


@pytest.mark.parametrize("token", [None, "", "0" * 64])
async def test_forms_need_the_csrf_token(client: Client, token: str | None) -> None:
    form = {"role": "server", "local_port": "22"}
    if token is not None:
        form["csrf_token"] = token
    resp = await client.post("/sessions", data=form)
    assert resp.status == 403 and "reload the page" in await resp.text()
    resp = await client.post("/settings", data={**form, "default_rendezvous": "127.0.0.1:1"})
    assert resp.status == 403


async def test_scripts_need_nothing_more_in_loopback_mode(client: Client) -> None:
    resp = await client.post("/api/sessions", json={"role": "server", "local_port": free_port()})
    assert resp.status == 201


async def test_lan_mode_without_a_token_is_refused(lan: Client) -> None:
    resp = await lan.get("/api/sessions")
    assert resp.status == 401 and "access token" in (await resp.json())["error"]
    resp = await lan.post("/api/sessions", json={"role": "server", "local_port": 22})
    assert resp.status == 401
    resp = await lan.get("/")
    assert resp.status == 401 and "?token=" in await resp.text()
    resp = await lan.get("/api/sessions", headers={"Authorization": "Bearer wrong"})
    assert resp.status == 401
    resp = await lan.get("/?token=wrong")
    assert resp.status == 401
    assert (await lan.get("/static/app.css")).status == 200  # nothing secret there


async def test_lan_mode_with_bearer_token_url_token_and_cookie(lan: Client) -> None:
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    resp = await lan.post("/api/sessions", json={"role": "server", "local_port": free_port()},
                          headers=bearer)
    assert resp.status == 201
    # The printed URL: the token is traded for a cookie and dropped from the address bar.
    resp = await lan.get(f"/history?outcome=&token={TOKEN}", allow_redirects=False)
    assert resp.status == 303
    assert resp.headers["Location"] == "/history?outcome="
    cookie = resp.cookies[TOKEN_COOKIE]
    assert cookie.value == TOKEN and cookie["httponly"] and cookie["samesite"] == "Strict"
    resp = await lan.get("/history")  # the client's cookie jar now holds the cookie
    assert resp.status == 200


async def test_a_share_link_opens_its_session_and_nothing_else(lan: Client) -> None:
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    made = []
    for label in ("shared one", "private one"):
        resp = await lan.post("/api/sessions", headers=bearer,
                              json={"role": "server", "local_port": free_port(), "label": label,
                                    "mode": "seed"})  # seed: its page takes a peer address
        made.append(await resp.json())
    shared, private = made
    share_path = "/" + shared["share_url"].split("/", 3)[3]
    assert re.fullmatch(r"/s/[A-Za-z0-9_-]{32}", share_path)  # 24 random bytes: 192 bits
    page = await (await lan.get(share_path)).text()
    assert "shared one" in page and "private one" not in page and private["id"] not in page
    assert 'href="/history"' not in page  # no navigation into the rest of the dashboard
    assert (await lan.get(share_path, headers={"HX-Request": "true"})).status == 200
    for path in (f"/sessions/{private['id']}", f"/sessions/{shared['id']}", "/history",
                 f"/api/sessions/{private['id']}", "/api/sessions",
                 f"/sessions/{shared['id']}/delete", "/history/delete"):
        resp = await lan.get(path)
        assert resp.status == 401, path
    other = share_path[:-4] + ("AAAA" if not share_path.endswith("AAAA") else "BBBB")
    assert (await lan.get(other)).status == 404
    # The share page's own form works, with the token bound to the share credential.
    token = _csrf(page)
    resp = await lan.post(f"{share_path}/peer", data={"csrf_token": token,
                                                      "address": "127.0.0.9:4242"},
                          allow_redirects=False)
    assert resp.status == 303
    resp = await lan.get(f"/api/sessions/{shared['id']}", headers=bearer)
    assert (await resp.json())["peer_address"] == "127.0.0.9:4242"
    resp = await lan.get(f"/api/sessions/{private['id']}", headers=bearer)
    assert (await resp.json())["peer_address"] is None
    # Deleting from the history is the dashboard's, not a share link's.
    resp = await lan.post(f"/sessions/{shared['id']}/delete", data={"csrf_token": token})
    assert resp.status == 401
    for path in (f"/api/history/{shared['id']}", "/api/history"):
        assert (await lan.delete(path)).status == 401, path


async def test_a_share_links_csrf_token_does_not_work_for_the_full_dashboard(
        client: Client) -> None:
    resp = await client.post("/api/sessions", json={"role": "server", "local_port": free_port()})
    share_path = "/" + (await resp.json())["share_url"].split("/", 3)[3]
    share_token = _csrf(await (await client.get(share_path)).text())
    resp = await client.post("/sessions", data={"csrf_token": share_token, "role": "server",
                                                "local_port": "22"})
    assert resp.status == 403
