"""Fixtures shared by the end-to-end tests."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from pytest_aiohttp import AiohttpClient

from nopf_web.guard.base import NullGuard
from nopf_web.rendezvous.server import RendezvousServer
from nopf_web.web import create_app
from nopf_web.wire.address import Endpoint

from .web_lab import Dashboard
from .web_support import Client, web_config


@pytest.fixture
async def rendezvous() -> AsyncIterator[Endpoint]:
    """An in-process rendezvous server on loopback; its address."""
    server = RendezvousServer("127.0.0.1", 0)
    await server.start()
    try:
        yield Endpoint(*server.address)
    finally:
        await server.close()


@pytest.fixture
async def client(aiohttp_client: AiohttpClient, tmp_path: Path) -> Client:
    """A dashboard (``web_config``: a temp DB, an embedded rendezvous, no guard) under
    aiohttp's test client."""
    return await aiohttp_client(create_app(web_config(tmp_path), guard=NullGuard("tests")))


@pytest.fixture
def dashboards(tmp_path: Path) -> Iterator[list[Dashboard]]:
    """The lab dashboards a test starts (``web_lab.start_dashboard``): each is sent SIGTERM
    at the end and must exit with 0."""
    started: list[Dashboard] = []
    yield started
    for d in started:
        d.proc.send_signal(signal.SIGTERM)
    for d in started:
        try:
            d.proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            d.proc.kill()
            d.proc.communicate()
        assert d.proc.returncode == 0, f"{d.host.name}: nopf-web exited {d.proc.returncode}"
