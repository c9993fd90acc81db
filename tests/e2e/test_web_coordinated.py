"""Coordinated mode (pairing codes) through the JSON API, on loopback with the embedded
rendezvous: code on the server session, a client joining with it, many connections
through one encrypted tunnel, history with the mode, and input validation."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import os
import re
import shlex
import signal
import subprocess
from typing import Any

import pytest

from nopf_web.pairing import make_code, parse_code
from nopf_web.web.keys import STORE
from tests.loopback import ask_service, echo_service, tagged_service
from tests.programs import argv, free_port

from .web_support import (
    Client,
    connection,
    create_by_form,
    create_session,
    echo,
    get_session,
    wait_until,
)


async def _wait_code(client: Client, session_id: str) -> str:
    async def has_code() -> bool:
        return bool((await get_session(client, session_id))["code"])

    await wait_until(has_code, what="the pairing code")
    code: str = (await get_session(client, session_id))["code"]
    return code


async def test_a_client_joins_a_server_by_its_code_and_carries_many_connections(
        client: Client) -> None:
    streams, size = 8, 256 * 1024
    with echo_service() as echo_port:
        server = await create_session(client, role="server", local_port=echo_port, label="share")
        assert (server["mode"], server["state"]) == ("coordinated", "discovering")
        code = await _wait_code(client, server["id"])
        assert str(parse_code(code)) == code
        server = await get_session(client, server["id"])
        assert server["state"] == "waiting_peer"
        assert code in server["invite"] and f"nopf connect {code}" in server["invite"]
        # One-time secret: the history file gets the code only once it is spent.
        store = client.app[STORE]
        row = await store.get_session(server["id"])
        assert row is not None and row.code is None
        assert not [e for e in await store.events_for(server["id"]) if code in e.message]

        app_port = free_port()
        joiner = await create_session(client, role="client", local_port=app_port, code=code,
                               label="join")
        assert (joiner["mode"], joiner["code"]) == ("coordinated", code)

        async def connected() -> bool:
            states = {(await get_session(client, s["id"]))["state"] for s in (server, joiner)}
            assert "failed" not in states
            return states == {"connected"}

        await wait_until(connected, timeout=20, what="both sessions connected")
        server = await get_session(client, server["id"])
        assert server["invite"] is None  # the code is used
        assert server["path"] in ("public", "lan") and server["peer_address"]
        resp = await client.post(f"/api/sessions/{server['id']}/peer",
                                 json={"address": "127.0.0.3:4000"})
        assert resp.status == 409 and "code" in (await resp.json())["error"]

        async def one(i: int) -> None:
            payload = os.urandom(size)
            async with connection(app_port) as (reader, writer):
                echoed = await echo(reader, writer, payload)
            assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest(), i

        await asyncio.gather(*(one(i) for i in range(streams)))  # all at once, one tunnel

        async def counted() -> bool:
            c = await get_session(client, joiner["id"])
            return bool(c["bytes_out"] == c["bytes_in"] == streams * size
                        and c["connections"] == streams)

        await wait_until(counted, what="bytes and connections counted")
        s = await get_session(client, server["id"])
        assert (s["bytes_in"], s["bytes_out"], s["connections"]) == (
            streams * size, streams * size, streams)

        resp = await client.delete(f"/api/sessions/{joiner['id']}")
        assert resp.status == 200
        assert (await resp.json())["outcome"] == "stopped"

        async def server_ended() -> bool:
            return (await get_session(client, server["id"]))["outcome"] is not None

        await wait_until(server_ended, what="the server session to end")

    history = await (await client.get("/api/history?limit=10")).json()
    by_label = {s["label"]: s for s in history["sessions"]}
    assert [s["label"] for s in history["sessions"]] == ["join", "share"]
    for label in ("join", "share"):
        row = by_label[label]
        assert (row["mode"], row["code"], row["live"]) == ("coordinated", code, False)
        assert row["bytes_in"] == row["bytes_out"] == streams * size
        assert row["connections"] and row["connections"][0]["ended_at"] is not None
    assert by_label["join"]["outcome"] == "stopped"
    assert by_label["share"]["outcome"] == "closed"
    # Ended: now the code is in the file (used, so harmless), and the CSV export has the mode.
    row = await client.app[STORE].get_session(server["id"])
    assert row is not None and row.code == code and row.mode == "coordinated"
    csv_text = await (await client.get("/history.csv")).text()
    assert csv_text.splitlines()[0].startswith("id,label,mode,role,")
    assert csv_text.count(",coordinated,") == 2


async def test_a_code_nobody_shares_fails_the_client_with_words_and_a_hint(
        client: Client) -> None:
    joiner = await create_session(client, role="client", local_port=free_port(),
                           code=str(make_code(999_999)))

    async def ended() -> bool:
        return (await get_session(client, joiner["id"]))["outcome"] is not None

    await wait_until(ended, what="the client session to fail")
    data = await get_session(client, joiner["id"])
    assert (data["state"], data["outcome"]) == ("failed", "failed")
    assert data["error"] and data["hint"] and "code" in data["hint"]


async def test_seed_mode_is_still_available_and_takes_no_code(client: Client) -> None:
    s = await create_session(client, role="server", local_port=free_port(), mode="seed")
    assert (s["mode"], s["code"], s["invite"]) == ("seed", None, None)
    resp = await client.post(f"/api/sessions/{s['id']}/peer", json={"address": "127.0.0.3:4000"})
    assert resp.status == 200


@pytest.mark.parametrize("body, field", [
    ({"role": "client", "local_port": 1}, "code"),
    ({"role": "client", "local_port": 1, "code": ""}, "code"),
    ({"role": "client", "local_port": 1, "code": None}, "code"),
    ({"role": "client", "local_port": 1, "code": "orbit-lantern"}, "code"),
    ({"role": "client", "local_port": 1, "code": "7-orbit"}, "code"),
    ({"role": "client", "local_port": 1, "code": "7-orbit-lantern-x"}, "code"),
    ({"role": "client", "local_port": 1, "code": "7-zzzqqq-lantern"}, "code"),
    ({"role": "client", "local_port": 1, "code": "0-orbit-lantern"}, "code"),
    ({"role": "client", "local_port": 1, "code": "12345678-orbit-lantern"}, "code"),
    ({"role": "client", "local_port": 1, "code": 7}, "code"),
    ({"role": "client", "local_port": 1, "code": ["7-orbit-lantern"]}, "code"),
    ({"role": "client", "local_port": 1, "code": "x" * 5000}, "code"),
    ({"role": "server", "local_port": 1, "code": "7-orbit-lantern"}, "code"),
    ({"role": "client", "local_port": 1, "mode": "seed", "code": "7-orbit-lantern"}, "code"),
    ({"role": "server", "local_port": 1, "mode": "magic"}, "mode"),
    ({"role": "server", "local_port": 1, "mode": 1}, "mode"),
])
async def test_bad_mode_or_code_is_a_400_naming_the_field(
        client: Client, body: dict[str, Any], field: str) -> None:
    if "code" in body and body["code"] == "7-orbit-lantern":
        body["code"] = str(make_code(7))  # well formed; refused for the role or mode
    resp = await client.post("/api/sessions", json=body)
    assert resp.status == 400, await resp.text()
    data = await resp.json()
    assert data["field"] == field
    assert data["error"].startswith(f"{field}:")
    assert (await (await client.get("/api/sessions")).json())["sessions"] == []


async def test_the_invitations_command_joins_with_the_nopf_cli(client: Client) -> None:
    with echo_service() as echo_port:
        server = await create_session(client, role="server", local_port=echo_port)
        await _wait_code(client, server["id"])
        invite = (await get_session(client, server["id"]))["invite"]
        command = re.search(r"run (nopf connect .+?) \(PORT", invite)
        assert command, invite
        app_port = free_port()
        words = shlex.split(command.group(1).replace("PORT", str(app_port)))
        peer = await asyncio.create_subprocess_exec(
            *argv(*words), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL)
        try:
            async def connected() -> bool:
                assert peer.returncode is None, "nopf connect exited early"
                return bool((await get_session(client, server["id"]))["state"] == "connected")

            await wait_until(connected, timeout=20, what="the CLI peer to join")
            for size in (1, 100_000):
                payload = os.urandom(size)
                async with connection(app_port) as (reader, writer):
                    assert await echo(reader, writer, payload) == payload
        finally:
            if peer.returncode is None:
                peer.send_signal(signal.SIGTERM)
            _out, err = await asyncio.wait_for(peer.communicate(), 15)
        assert peer.returncode == 0, err.decode(errors="replace")

        async def closed() -> bool:
            return bool((await get_session(client, server["id"]))["outcome"] == "closed")

        await wait_until(closed, what="the server session to close with the CLI peer")


@pytest.mark.parametrize("joiner", ["dashboard", "cli"])
async def test_a_session_shares_two_services_and_each_port_of_the_peer_reaches_its_own(
        client: Client, joiner: str) -> None:
    servers = [await asyncio.start_server(tagged_service(tag), "127.0.0.1", 0)
               for tag in (b"A:", b"B:")]
    first, second = (srv.sockets[0].getsockname()[1] for srv in servers)
    # Through the form, as a user types it: a bare port, then HOST:PORT.
    server_id = await create_by_form(client, role="server", mode="coordinated",
                                     local_port=f"{first}, 127.0.0.1:{second}", label="two")
    server = await get_session(client, server_id)
    assert (server["local_port"], server["more_local"]) == (first, [f"127.0.0.1:{second}"])
    code = await _wait_code(client, server_id)
    invite = (await get_session(client, server_id))["invite"]
    assert f"nopf connect {code} -p PORT -p PORT -a" in invite
    assert "a free local port for each of the 2 services, in order" in invite
    assert "with the code " + code + " and 2 local ports, one per service" in invite
    page = await (await client.get(f"/sessions/{server_id}")).text()
    assert (f"<dt>Services</dt><dd>127.0.0.1:{first} (service 1), 127.0.0.1:{second} "
            "(service 2)</dd>") in page
    assert "server session on ports" not in page  # it has a label
    ports = [free_port(), free_port()]
    peer: asyncio.subprocess.Process | None = None
    if joiner == "dashboard":  # a JSON list, as the API takes several
        await create_session(client, role="client", code=code, label="join",
                             local_port=[ports[0], f"127.0.0.1:{ports[1]}"])
    else:  # the invitation's command, each PORT in order
        command = re.search(r"run (nopf connect .+?) \(PORT", invite)
        assert command, invite
        fill = iter(ports)
        words = [str(next(fill)) if w == "PORT" else w for w in shlex.split(command.group(1))]
        peer = await asyncio.create_subprocess_exec(
            *argv(*words), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL)
    try:
        async def connected() -> bool:
            assert peer is None or peer.returncode is None, "nopf connect exited early"
            return bool((await get_session(client, server_id))["state"] == "connected")

        await wait_until(connected, timeout=20, what="the peer to join")
        for port, tag in zip(ports, (b"A:", b"B:"), strict=True):
            assert await ask_service(("127.0.0.1", port)) == tag + b"hello"
        page = await (await client.get(f"/sessions/{server_id}")).text()
        assert (f"the peer's connections reach 127.0.0.1:{first} (service 1), "
                f"127.0.0.1:{second} (service 2) on this machine") in page
    finally:
        if peer is not None and peer.returncode is None:
            peer.send_signal(signal.SIGTERM)
        if peer is not None:
            _out, err = await asyncio.wait_for(peer.communicate(), 15)
            assert peer.returncode == 0, err.decode(errors="replace")
        for srv in servers:
            srv.close()
            await srv.wait_closed()
    for s in (await (await client.get("/api/sessions")).json())["sessions"]:
        await client.delete(f"/api/sessions/{s['id']}")
    history = (await (await client.get("/api/history")).json())["sessions"]
    joined = [f"127.0.0.1:{ports[1]}"] if joiner == "dashboard" else None
    assert {h["label"]: h["more_local"] for h in history} == {
        "two": [f"127.0.0.1:{second}"], **({"join": joined} if joined else {})}
    rows = list(csv.DictReader(io.StringIO(await (await client.get("/history.csv")).text())))
    assert {r["label"]: r["more_local"] for r in rows} == {
        "two": f"127.0.0.1:{second}", **({"join": joined[0]} if joined else {})}
