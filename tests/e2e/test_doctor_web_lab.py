"""The Doctor page and GET /api/doctor: the real app, run inside the lab.

The dashboard, its test client and every socket the doctor opens live in a1's
namespace (behind a ``drop`` NAT) for the length of each test: the test's
thread enters it before anything is made. The rendezvous is a real nopf-server
on rdv. A rendezvous that is not there is tested on loopback (nothing is sent
anywhere else: the gateway is asked only once the rendezvous has answered).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer
from pytest_aiohttp import AiohttpClient

from nopf_web.guard.base import NullGuard
from nopf_web.web import create_app
from nopf_web.web.keys import DOCTOR
from nopf_web.wire.address import Endpoint
from tests.lab.fixtures import LabFactory
from tests.lab.topology import RDV_IP, Lab
from tests.programs import free_port

from .peers import DOCTOR_DELAY_MS, DOCTOR_TARGET_MS, start_doctor_server
from .web_support import Client, web_config

HX = {"HX-Request": "true"}
KEYS = ("mapping", "filtering", "hairpin", "port_mapping", "cgnat", "ipv6", "public_address",
        "elapsed_ms")


@pytest.fixture
def lab(lab_factory: LabFactory) -> Iterator[Lab]:
    lab = lab_factory("drop", "drop", delay_ms=DOCTOR_DELAY_MS, rdv_second_ip=True)
    start_doctor_server(lab)
    yield lab


@asynccontextmanager
async def dashboard_in(lab: Lab, tmp_path: Path) -> AsyncIterator[Client]:
    """The real app and a client for it, made and run inside a1's namespace."""
    with lab.a1.enter():
        app = create_app(web_config(tmp_path, rendezvous=Endpoint(RDV_IP, 3012)),
                         guard=NullGuard("tests"))
        client: Client = TestClient(TestServer(app))
        await client.start_server()
        try:
            yield client
        finally:
            await client.close()


async def csrf(client: Client) -> str:
    page = await (await client.get("/settings")).text()
    match = re.search(r'name="csrf_token" value="([0-9a-f]{64})"', page)
    assert match
    return match.group(1)


@pytest.mark.lab
async def test_api_doctor_measures_caches_and_shares_one_measurement(
        lab: Lab, tmp_path: Path) -> None:
    async with dashboard_in(lab, tmp_path) as client:
        cache = client.app[DOCTOR]
        resp = await client.get("/api/doctor")
        assert resp.status == 200 and resp.content_type == "application/json"
        first = await resp.json()
        for key in KEYS:
            assert key in first
        assert (first["mapping"], first["filtering"], first["hairpin"]) == (
            "endpoint-independent", "drop", False)
        assert first["public_address"].startswith("203.0.113.2:")
        assert first["elapsed_ms"] <= DOCTOR_TARGET_MS and first["cached"] is False
        assert first["summary"].endswith("except peers behind symmetric NATs.")

        again = await (await client.get("/api/doctor")).json()
        assert again["cached"] is True and again["measured_at"] == first["measured_at"]
        assert cache.measurements == 1

        answers = await asyncio.gather(*[client.get("/api/doctor?refresh=1") for _ in range(5)])
        bodies = [await a.json() for a in answers]
        assert cache.measurements == 2, "concurrent refreshes share one measurement"
        assert len({b["measured_at"] for b in bodies}) == 1
        assert bodies[0]["measured_at"] > first["measured_at"]
        assert all(b["cached"] is False for b in bodies)

        bad = await client.get("/api/doctor?refresh=yes")
        assert bad.status == 400 and "refresh" in (await bad.json())["error"]
        foreign = await client.get("/api/doctor", headers={"Host": "evil.example"})
        assert foreign.status == 403 and cache.measurements == 2


@pytest.mark.lab
async def test_the_doctor_page_full_fragment_and_measure_again(lab: Lab, tmp_path: Path) -> None:
    async with dashboard_in(lab, tmp_path) as client:
        cache = client.app[DOCTOR]
        resp = await client.get("/doctor")
        page = await resp.text()
        assert resp.status == 200 and page.startswith("<!doctype html>")
        assert resp.headers["Vary"] == "HX-Request"
        assert '<a href="/doctor" aria-current="page">Doctor</a>' in page
        assert "you can share with anyone except peers behind symmetric NATs" in page
        for row in ("doctor-mapping", "doctor-filtering", "doctor-hairpin", "doctor-cgnat",
                    "doctor-port-mapping", "doctor-ipv6", "doctor-public-address"):
            assert f'id="{row}"' in page
        assert "drop: unsolicited connections are dropped silently" in page
        assert "Measure again" in page

        fragment = await (await client.get("/doctor", headers=HX)).text()
        assert "<html" not in fragment and 'id="doctor-summary"' in fragment
        assert " s ago" in fragment  # from the cache
        assert cache.measurements == 1

        token = await csrf(client)
        resp = await client.post("/doctor", data={"csrf_token": token}, allow_redirects=False)
        assert resp.status == 303 and resp.headers["Location"] == "/doctor"
        assert cache.measurements == 2
        resp = await client.post("/doctor", headers={**HX, "X-CSRF-Token": token})
        fragment = await resp.text()
        assert resp.status == 200 and "<html" not in fragment and " s ago" not in fragment
        assert cache.measurements == 3
        refused = await client.post("/doctor", data={"csrf_token": "0" * 64})
        assert refused.status == 403 and cache.measurements == 3


async def test_an_unreachable_rendezvous_is_a_502_and_a_page_that_says_why(
        aiohttp_client: AiohttpClient, tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    client = await aiohttp_client(create_app(
        web_config(tmp_path, rendezvous=Endpoint("127.0.0.1", port)), guard=NullGuard("t")))
    resp = await client.get("/api/doctor")
    assert resp.status == 502
    # Every API error names the input to look at: here the rendezvous setting.
    assert await resp.json() == {"error": f"rendezvous 127.0.0.1:{port}: connection refused",
                                 "field": "rendezvous"}
    page = await (await client.get("/doctor")).text()
    assert "Could not measure" in page and "connection refused" in page
    assert client.app[DOCTOR].measurements == 2  # failures are not kept
