"""nopf-server's connection driver on a real socket, on both loops: what a write
meets when the client has reset the connection before the loop read that reset."""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time

import pytest

from nopf_web.rendezvous.conn_driver import ConnDriver, ConnEvent
from tests.loopback import tcp_pair

pytestmark = pytest.mark.uvloop_too


class _Recorder(ConnDriver):
    """A driver whose machine only records what it is fed."""

    _log = logging.getLogger("test.conn_driver")

    def __init__(self) -> None:
        super().__init__(time.monotonic)
        self.fed: list[ConnEvent] = []

    def _feed(self, event: ConnEvent) -> None:
        self.fed.append(event)


async def test_a_last_word_to_a_client_that_reset_unseen_fails_that_connection_only(
        ) -> None:
    """A reply with its FIN (the machine's last word) to a client that reset the
    connection unseen: asyncio's write_eof() raises ENOTCONN at once, which would
    have escaped into the server's handling of every connection; it marks that
    connection's write as failed and ends it instead (uvloop reports the same error
    through connection_lost)."""
    loop = asyncio.get_running_loop()
    driver = _Recorder()
    mine, client = tcp_pair()
    transport, link = await loop.connect_accepted_socket(driver._new_link, mine)
    transport.pause_reading()  # the loop does not see the reset
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()
    await asyncio.sleep(0.05)  # the RST is in
    driver._send(link.id, b"", fin=True)  # raises nothing, on either loop
    await asyncio.sleep(0.05)
    assert link.id not in driver._links  # connection_lost came, and the machine heard
    assert [type(e).__name__ for e in driver.fed] == ["Accepted", "Lost"]
