"""Fixtures shared by the loopback end-to-end tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from nopf_web.rendezvous.server import RendezvousServer
from nopf_web.wire.address import Endpoint


@pytest.fixture
async def rendezvous() -> AsyncIterator[Endpoint]:
    """An in-process rendezvous server on loopback; its address."""
    server = RendezvousServer("127.0.0.1", 0)
    await server.start()
    try:
        yield Endpoint(*server.address)
    finally:
        await server.close()
