"""Diagnostics in the dashboard, on loopback with the embedded rendezvous: the predicted
path beside the path taken, the pairing's timeline (page, API, history, CSV and JSON
exports), the Statistics page (full page, htmx fragment, ranges), and the warning that
a loopback rendezvous cannot be reached from another machine."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from nopf_web.web.keys import STORE
from tests.programs import free_port

from .web_support import Client, create_session, get_session, wait_until

HX = {"HX-Request": "true"}


async def _paired(client: Client) -> tuple[dict[str, Any], dict[str, Any]]:
    server = await create_session(client, role="server", local_port=free_port())

    async def has_code() -> bool:
        return bool((await get_session(client, server["id"]))["code"])

    await wait_until(has_code, what="the pairing code")
    server = await get_session(client, server["id"])
    joiner = await create_session(client, role="client", local_port=free_port(),
                                  code=server["code"])

    async def connected() -> bool:
        return {(await get_session(client, s["id"]))["state"]
                for s in (server, joiner)} == {"connected"}

    await wait_until(connected, timeout=20, what="both sessions connected")
    return (await get_session(client, server["id"]), await get_session(client, joiner["id"]))


async def test_a_pairing_shows_its_prediction_and_timeline_and_history_keeps_them(
        client: Client) -> None:
    server, joiner = await _paired(client)
    for s in (server, joiner):
        # On loopback the rendezvous sees each peer's own address: no NAT on either side.
        assert s["prediction"]["path"] == "public" and s["prediction"]["held"] is True
        assert s["prediction"]["why"].startswith("The sharer has no NAT")
        assert s["nat_pair"] == "none × none"
        kinds = [m["kind"] for m in s["timeline"]]
        assert kinds[0] == "start" and "fire" in kinds and kinds[-1] == "path", kinds
        assert kinds.index("fire") < kinds.index("syn") < kinds.index("answer")
        fire = next(m for m in s["timeline"] if m["kind"] == "fire")
        assert fire["prediction"]["path"] == "public"
        answers = {m["answer"] for m in s["timeline"] if m["kind"] == "answer"}
        assert answers & {"syn-ack", "accepted"}, s["timeline"]
        assert 0 < s["setup_ms"] < 10_000
        assert all(a["t_ms"] <= b["t_ms"] for a, b in zip(s["timeline"], s["timeline"][1:],
                                                            strict=False))
    page = await (await client.get(f"/sessions/{server['id']}")).text()
    assert 'id="predicted-path">public<' in page and 'data-held="true"' in page
    assert 'id="timeline-table"' in page and "fire instruction (attempt 1)" in page
    fragment = await (await client.get(f"/sessions/{server['id']}", headers=HX)).text()
    assert 'id="diagnosis"' in fragment

    # Stopped: the history keeps the prediction, the timeline and the setup time.
    for s in (joiner, server):
        assert (await client.delete(f"/api/sessions/{s['id']}")).status == 200
    row = await client.app[STORE].get_session(server["id"])
    assert row is not None
    assert (row.predicted_path, row.nat_pair, row.path) == ("public", "none × none", "public")
    assert row.timeline and json.loads(row.timeline)[-1]["kind"] == "path"
    assert row.setup_ms == server["setup_ms"]

    text = await (await client.get("/history.csv")).text()
    rows = list(csv.DictReader(io.StringIO(text)))
    kept = next(r for r in rows if r["id"] == server["id"])
    assert (kept["predicted_path"], kept["nat_pair"]) == ("public", "none × none")
    assert kept["prediction"].startswith("The sharer has no NAT")
    assert json.loads(kept["timeline"])[0]["kind"] == "start"
    assert float(kept["setup_ms"]) == server["setup_ms"]
    exported = (await (await client.get("/history.json")).json())["sessions"]
    mine = next(s for s in exported if s["id"] == server["id"])
    assert mine["prediction"]["path"] == "public" and mine["timeline"][-1]["kind"] == "path"

    # Statistics: both sides counted (each dashboard session is one pairing's side).
    resp = await client.get("/stats?range=1h")
    page = await resp.text()
    assert resp.status == 200 and page.startswith("<!doctype html>")
    assert 'href="/stats" aria-current="page"' in page
    assert "<strong>2</strong> of <strong>2</strong> pairings connected" in page
    assert page.count('<svg class="chart"') == 4 and "none × none" in page
    fragment = await (await client.get("/stats?range=all", headers=HX)).text()
    assert fragment.lstrip().startswith('<div id="stats-body">') and "<html" not in fragment
    assert (await client.get("/stats?range=2w")).status == 400


async def test_statistics_without_history_say_so(client: Client) -> None:
    page = await (await client.get("/stats")).text()
    assert 'id="stats-empty"' in page and "<svg" not in page
    assert '<option value="7d" selected>' in page


async def test_a_loopback_rendezvous_is_named_unreachable_from_other_machines(
        client: Client) -> None:
    server = await create_session(client, role="server", local_port=free_port())

    async def has_invite() -> bool:
        return bool((await get_session(client, server["id"]))["invite"])

    await wait_until(has_invite, what="the invitation")
    server = await get_session(client, server["id"])
    assert server["rendezvous"].startswith("127.0.0.1:")
    assert server["invite"].endswith(
        f"Only from this machine: the rendezvous {server['rendezvous']} is a loopback "
        "address, which a peer on another machine cannot reach.")
    page = await (await client.get(f"/sessions/{server['id']}")).text()
    assert 'id="local-rendezvous"' in page and "A peer on another machine cannot reach" in page
    assert page.count('href="/settings"') >= 3  # nav, the warning, the details row
    assert 'id="rendezvous-local"' in page
