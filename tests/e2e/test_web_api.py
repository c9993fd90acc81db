"""The JSON API through aiohttp's test client: validation, a real loopback punch, history.

The punch here is the seed's manual-address flow (``"mode": "seed"``); coordinated mode
(pairing codes, the default) is in test_web_coordinated.py."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import os
import random
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from pytest_aiohttp import AiohttpClient

from nopf_web.guard.base import NullGuard
from nopf_web.pairing import make_code
from nopf_web.web import create_app
from tests.loopback import echo_service
from tests.programs import free_port

from .web_support import (
    Client,
    connection,
    create_session,
    echo,
    get_session,
    wait_until,
    web_config,
)

JSON = {"Content-Type": "application/json"}


@pytest.mark.parametrize("body, field", [
    ({"local_port": 22}, "role"),
    ({"role": "s", "local_port": 22}, "role"),
    ({"role": 1, "local_port": 22}, "role"),
    ({"role": "server"}, "local_port"),
    ({"role": "server", "local_port": 0}, "local_port"),
    ({"role": "server", "local_port": 70000}, "local_port"),
    ({"role": "server", "local_port": True}, "local_port"),
    ({"role": "server", "local_port": 22.5}, "local_port"),
    ({"role": "server", "local_port": "ssh"}, "local_port"),
    ({"role": "server", "local_port": "2001:db8::1:80"}, "local_port"),  # brackets needed
    ({"role": "server", "local_port": "[::]:80"}, "local_port"),
    ({"role": "server", "local_port": "22,,80"}, "local_port"),  # an empty entry
    ({"role": "server", "local_port": "22, 127.0.0.1:22"}, "local_port"),  # twice
    ({"role": "server", "local_port": []}, "local_port"),
    ({"role": "server", "local_port": [22, [80]]}, "local_port"),
    ({"role": "server", "local_port": [22, 80], "mode": "seed"}, "local_port"),
    ({"role": "server", "local_port": list(range(1000, 1017))}, "local_port"),  # 17 services
    ({"role": "client", "local_port": "nas.example:3010", "code": "7-orbit-lantern"},
     "local_port"),  # a listener binds an address, not a name
    ({"role": "server", "local_port": 22, "rendezvous": "nohost"}, "rendezvous"),
    ({"role": "server", "local_port": 22, "rendezvous": "a b:1"}, "rendezvous"),
    ({"role": "server", "local_port": 22, "rendezvous": "h:99999"}, "rendezvous"),
    ({"role": "server", "local_port": 22, "rendezvous": ["x"]}, "rendezvous"),
    ({"role": "server", "local_port": 22, "rendezvous": "2001:db8::1:3012"}, "rendezvous"),
    # A seed session speaks the seed's IPv4-only protocol (coordinated ones take IPv6).
    ({"role": "server", "local_port": 22, "mode": "seed", "rendezvous": "[::1]:3012"},
     "rendezvous"),
    ({"role": "server", "local_port": 22, "label": "x" * 81}, "label"),
    ({"role": "server", "local_port": 22, "label": "bell\x07"}, "label"),
    ({"role": "server", "local_port": 22, "label": 5}, "label"),
    ({"role": "server", "local_port": 22, "colour": "red"}, "colour"),
])
async def test_bad_session_input_is_a_400_naming_the_field(
        client: Client, body: dict[str, Any], field: str) -> None:
    resp = await client.post("/api/sessions", json=body)
    assert resp.status == 400
    data = await resp.json()
    assert data["field"] == field
    assert data["error"].startswith(f"{field}:")


@pytest.mark.parametrize("raw", [b"{", b"[1, 2]", b'"text"', b"\xff\xfe", b"null"])
async def test_a_body_that_is_not_a_json_object_is_a_400(client: Client, raw: bytes) -> None:
    resp = await client.post("/api/sessions", data=raw, headers=JSON)
    assert resp.status == 400
    assert "error" in await resp.json()


async def test_a_body_that_is_not_json_typed_is_refused(client: Client) -> None:
    resp = await client.post("/api/sessions", data=b'{"role": "server", "local_port": 22}',
                             headers={"Content-Type": "text/plain"})
    assert resp.status == 415
    assert "application/json" in (await resp.json())["error"]


async def test_a_huge_body_is_refused_without_a_500(client: Client) -> None:
    resp = await client.post("/api/sessions", data=b"{" + b" " * 200_000 + b"}", headers=JSON)
    assert resp.status == 413
    assert "error" in await resp.json()


@pytest.mark.parametrize("path", ["/api/sessions/0123456789ab", "/api/sessions/nope",
                                  "/api/nothing"])
async def test_unknown_ids_and_paths_are_a_json_404(client: Client, path: str) -> None:
    resp = await client.get(path)
    assert resp.status == 404
    assert "error" in await resp.json()
    resp = await client.delete(path)
    assert resp.status in (404, 405)
    assert "error" in await resp.json()


@pytest.mark.parametrize("query", ["limit=0", "limit=abc", "limit=5000", "limit=-1",
                                   "offset=x"])
async def test_bad_history_parameters_are_a_400(client: Client, query: str) -> None:
    resp = await client.get(f"/api/history?{query}")
    assert resp.status == 400
    assert (await resp.json())["field"] == query.split("=")[0]


async def test_a_client_port_already_in_use_is_refused_up_front(client: Client) -> None:
    port = free_port()
    first = await create_session(client, role="client", local_port=port, mode="seed")
    resp = await client.post("/api/sessions", json={"role": "client", "local_port": port,
                                                    "code": str(make_code(7))})
    assert resp.status == 400
    body = await resp.json()
    assert body["field"] == "local_port" and first["id"] in body["error"]
    # One session's own listeners: 0.0.0.0 takes the port on 127.0.0.1 too.
    other = free_port()
    resp = await client.post("/api/sessions", json={
        "role": "client", "code": str(make_code(7)),
        "local_port": f"127.0.0.1:{other}, 0.0.0.0:{other}"})
    assert await resp.json() == {"field": "local_port", "error": f"local port {other} is "
                                 "already in use on this machine: choose another one"}


async def test_the_local_side_may_be_another_address_or_host(client: Client) -> None:
    # A client session on [::1] only: its applications connect there, and 127.0.0.1
    # has nothing on that port.
    port = free_port("::1")
    c = await create_session(client, role="client", local_port=f"[::1]:{port}", mode="seed")
    assert (c["local_host"], c["local_port"]) == ("::1", port)

    async def listening() -> bool:
        try:
            _reader, writer = await asyncio.open_connection("::1", port)
        except ConnectionRefusedError:
            return False
        writer.close()
        return True

    await wait_until(listening, what=f"the client session to listen on [::1]:{port}")
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)
    resp = await client.post("/api/sessions", json={"role": "client", "mode": "seed",
                                                    "local_port": "192.0.2.1:3010"})
    assert resp.status == 400
    assert await resp.json() == {"field": "local_port", "error": "192.0.2.1 is not an address "
                                 "of this machine: choose one of its own, or 0.0.0.0"}
    # A server session's service may be on another machine, named by address or name.
    s = await create_session(client, role="server", local_port="nas.example:8080",
                             mode="seed", label="")
    assert (s["local_host"], s["local_port"], s["label"]) == ("nas.example", 8080, "")
    page = await (await client.get(f"/sessions/{s['id']}")).text()
    assert "<dt>Service</dt><dd>nas.example:8080</dd>" in page
    assert "server session on nas.example:8080" in page  # its title
    # The history keeps both hosts, in JSON and CSV.
    for ms in (c, s):
        assert (await client.delete(f"/api/sessions/{ms['id']}")).status == 200
    history = (await (await client.get("/api/history")).json())["sessions"]
    assert {h["id"]: h["local_host"] for h in history} == {c["id"]: "::1", s["id"]: "nas.example"}
    rows = list(csv.DictReader(io.StringIO(await (await client.get("/history.csv")).text())))
    assert {r["id"]: (r["local_host"], r["local_port"]) for r in rows} == {
        c["id"]: ("::1", str(port)), s["id"]: ("nas.example", "8080")}


async def test_a_client_on_all_addresses_is_warned_in_its_log(client: Client) -> None:
    port = free_port("0.0.0.0")
    c = await create_session(client, role="client", local_port=f"0.0.0.0:{port}", mode="seed")
    warning = (f"listening on 0.0.0.0:{port}: other machines that can reach this one can use "
               "the tunnel too")

    async def warned() -> bool:
        return warning in await (await client.get(f"/sessions/{c['id']}")).text()

    await wait_until(warned, what="the warning in the session's log")
    page = await (await client.get(f"/sessions/{c['id']}")).text()
    assert f"<dt>Listens on</dt><dd>0.0.0.0:{port}</dd>" in page


async def test_peer_address_is_validated_and_set_once(client: Client) -> None:
    s = await create_session(client, role="server", local_port=free_port(), mode="seed")
    for bad in ("", "1.2.3.4", "host:80", "1.2.3.4:0", "0.0.0.0:80", 7):
        resp = await client.post(f"/api/sessions/{s['id']}/peer", json={"address": bad})
        assert resp.status == 400, bad
        assert (await resp.json())["field"] == "address"
    resp = await client.post(f"/api/sessions/{s['id']}/peer", json={})
    assert resp.status == 400
    resp = await client.post(f"/api/sessions/{s['id']}/peer", json={"address": "127.0.0.3:4000"})
    assert resp.status == 200
    assert (await resp.json())["peer_address"] == "127.0.0.3:4000"
    resp = await client.post(f"/api/sessions/{s['id']}/peer", json={"address": "127.0.0.3:4001"})
    assert resp.status == 409
    assert "already set" in (await resp.json())["error"]


async def test_an_unreachable_rendezvous_fails_with_words_and_a_hint(client: Client) -> None:
    s = await create_session(client, role="client", local_port=free_port(), mode="seed",
                      rendezvous=f"127.0.0.1:{free_port()}", label="nobody home")

    async def ended() -> bool:
        return (await get_session(client, s["id"]))["outcome"] is not None

    await wait_until(ended, what="the session to fail")
    data = await get_session(client, s["id"])
    assert (data["state"], data["outcome"]) == ("failed", "failed")
    assert "rendezvous" in data["error"]
    assert "nopf-server" in data["hint"]
    resp = await client.post(f"/api/sessions/{s['id']}/peer", json={"address": "127.0.0.3:1"})
    assert resp.status == 409


async def test_two_sessions_punch_on_loopback_and_move_data(client: Client) -> None:
    with echo_service() as echo_port:
        server = await create_session(client, role="server", local_port=echo_port, label="srv",
                               mode="seed")
        app_port = free_port()
        cli = await create_session(client, role="client", local_port=app_port, label="cli",
                            mode="seed")
        assert server["share_url"].startswith("http://127.0.0.1:")

        async def both_public() -> bool:
            return all([(await get_session(client, s["id"]))["public_address"]
                        for s in (server, cli)])

        await wait_until(both_public, what="public addresses")
        server, cli = await get_session(client, server["id"]), await get_session(client, cli["id"])
        for me, peer in ((server, cli), (cli, server)):
            resp = await client.post(f"/api/sessions/{me['id']}/peer",
                                     json={"address": peer["public_address"]})
            assert resp.status == 200

        async def connected() -> bool:
            states = {(await get_session(client, s["id"]))["state"] for s in (server, cli)}
            return states == {"connected"}

        await wait_until(connected, what="both sessions connected")
        payload = os.urandom(3 * 1024 * 1024)
        async with connection(app_port) as (reader, writer):
            echoed = await echo(reader, writer, payload)
            assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()

            async def counted() -> bool:
                c = await get_session(client, cli["id"])
                return bool(c["bytes_out"] == c["bytes_in"] == len(payload))

            await wait_until(counted, what="bytes counted")
            resp = await client.delete(f"/api/sessions/{cli['id']}")  # while still connected
            assert resp.status == 200
            stopped = await resp.json()
            assert (stopped["outcome"], stopped["live"]) == ("stopped", False)

        async def server_ended() -> bool:
            return (await get_session(client, server["id"]))["outcome"] is not None

        await wait_until(server_ended, what="the server session to end")

    resp = await client.get("/api/history?limit=10")
    history = await resp.json()
    by_label = {s["label"]: s for s in history["sessions"]}
    assert by_label["cli"]["outcome"] == "stopped"
    assert by_label["srv"]["outcome"] == "closed"
    conn = by_label["cli"]["connections"][0]
    assert conn["bytes_out"] == len(payload) and conn["ended_at"] is not None
    assert [s["label"] for s in history["sessions"]] == ["cli", "srv"]  # newest first
    assert {s["mode"] for s in history["sessions"]} == {"seed"}
    assert by_label["cli"]["code"] is None


async def test_sessions_running_at_shutdown_are_interrupted_after_restart(
        tmp_path: Path) -> None:
    config = web_config(tmp_path)
    first = TestClient(TestServer(create_app(config, guard=NullGuard("tests"))))
    await first.start_server()
    try:
        running = await create_session(first, role="server", local_port=free_port(),
                                       label="left on")
    finally:
        await first.close()  # the dashboard stops while the session waits for its peer
    second = TestClient(TestServer(create_app(config, guard=NullGuard("tests"))))
    await second.start_server()
    try:
        data = await get_session(second, running["id"])
        assert data["outcome"] == "interrupted"
        assert data["share_url"] is None  # share tokens do not survive in clear
        resp = await second.get("/api/history?limit=1")
        assert (await resp.json())["sessions"][0]["outcome"] == "interrupted"
    finally:
        await second.close()


async def test_guard_status_is_reported(client: Client) -> None:
    resp = await client.get("/api/guard")
    assert await resp.json() == {"active": False, "reason": "tests", "dropped": 0}


async def test_the_session_limit_is_a_409(aiohttp_client: AiohttpClient, tmp_path: Path) -> None:
    client = await aiohttp_client(create_app(web_config(tmp_path, max_live_sessions=2),
                                             guard=NullGuard("tests")))
    for _ in range(2):
        await create_session(client, role="server", local_port=free_port())
    resp = await client.post("/api/sessions", json={"role": "server", "local_port": 22})
    assert resp.status == 409
    assert "stop one first" in (await resp.json())["error"]


# Every address here is loopback or invalid: sessions this creates send nothing off the machine.
NASTY: tuple[Any, ...] = (None, True, 0, -1, 1.5, 2**64, "", " ", "x" * 5000, "\x00", "🙂",
                          "server", "client", "22", "127.0.0.1:0", "[::1]:80", "127.0.0.2:5",
                          "1.2.3.4", [], {}, ["server"], {"a": 1}, "seed", "coordinated",
                          "7-orbit-lantern", "999999-apple-apple", "7 - Orbit  lantern")


async def test_odd_input_never_causes_a_server_error(client: Client) -> None:
    rng = random.Random(4)  # fixed: a failure is reproducible
    for _ in range(150):
        body = {key: rng.choice(NASTY) for key in ("role", "local_port", "mode", "code",
                                                    "rendezvous", "label")
                if rng.random() < 0.8}
        resp = await client.post("/api/sessions", json=body)
        assert resp.status in (201, 400, 409), (body, resp.status)
        data = await resp.json()
        assert ("id" in data) if resp.status == 201 else ("error" in data)
        if resp.status == 201:
            peer = {"address": rng.choice(NASTY)}
            resp = await client.post(f"/api/sessions/{data['id']}/peer", json=peer)
            assert resp.status in (200, 400, 409), (peer, resp.status)
    for value in NASTY:
        if isinstance(value, str):
            resp = await client.get("/api/history", params={"limit": value, "offset": value})
            assert resp.status in (200, 400)
            resp = await client.get("/history", params={"outcome": value, "q": value,
                                                         "page": value})
            assert resp.status in (200, 400)


async def test_ended_sessions_are_deleted_one_or_by_filter_and_running_ones_stay(
        client: Client) -> None:
    made = [await create_session(client, role="server", local_port=free_port(), mode="seed",
                                 label=label) for label in ("keep", "old", "older")]
    keep, old, older = (m["id"] for m in made)
    resp = await client.delete(f"/api/history/{old}")
    assert resp.status == 409 and await resp.json() == {
        "field": "id", "error": f"session {old} is running: stop it first (DELETE "
                                f"/api/sessions/{old})"}
    for session_id in (old, older):
        assert (await client.delete(f"/api/sessions/{session_id}")).status == 200
    resp = await client.delete(f"/api/history/{old}")
    assert (resp.status, await resp.json()) == (200, {"deleted": [old]})
    assert (await client.delete(f"/api/history/{old}")).status == 404
    assert (await client.get(f"/api/sessions/{old}")).status == 404
    resp = await client.delete("/api/history?outcome=done")
    assert resp.status == 400 and (await resp.json())["field"] == "outcome"
    resp = await client.delete("/api/history?q=nothing-like-it")
    assert await resp.json() == {"deleted": []}
    resp = await client.delete("/api/history")  # every ended one; the running one stays
    assert await resp.json() == {"deleted": [older]}
    history = (await (await client.get("/api/history")).json())["sessions"]
    assert [h["id"] for h in history] == [keep]
