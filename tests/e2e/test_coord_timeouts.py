"""A rendezvous that answers the discovery and then goes silent: every wait names itself.

A bare ``TimeoutError`` (no message) once escaped ``connect`` here and reached the
user as "TimeoutError: "; each wait now says what it waited for.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest

from nopf_web.pairing import make_code
from nopf_web.rendezvous.errors import RendezvousProtocolError
from nopf_web.sessions import coordination as coord, errors
from nopf_web.wire.discovery import encode_reply
from nopf_web.wire.rendezvous import (
    ErrorReply,
    FrameReader,
    Hello,
    MessageError,
    Probe,
    decode_client_message,
    encode,
)

# On uvloop too: the loop of nopf's commands on Linux (tests/conftest.py).
pytestmark = pytest.mark.uvloop_too

LO = "127.0.0.1"


@contextlib.asynccontextmanager
async def mute_rendezvous() -> AsyncIterator[int]:
    """Sends the seed discovery reply (so it is no seed-only server) and answers a
    NAT mapping probe as nopf-server does (by closing), but answers no hello."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, port = writer.get_extra_info("peername")[:2]
        writer.write(encode_reply(host, port))
        frames = FrameReader()
        with contextlib.suppress(OSError, MessageError):
            await writer.drain()
            while chunk := await reader.read(4096):
                if any(isinstance(decode_client_message(m), Probe) for m in frames.feed(chunk)):
                    break
        writer.close()

    server = await asyncio.start_server(handle, LO, 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def test_connector_names_the_missing_fire_instruction() -> None:
    async with mute_rendezvous() as port:
        t0 = time.monotonic()
        with pytest.raises(RendezvousProtocolError,
                           match=r"rendezvous 127\.0\.0\.1:\d+ sent no fire instruction "
                                 r"within 2\.3 s"):
            await coord.connect((LO, port), str(make_code(7)), net_timeout=0.3,
                                punch_timeout=5, bind_host=LO)
        assert time.monotonic() - t0 < 4


async def test_sharer_names_the_missing_pairing_code() -> None:
    codes: list[str] = []
    async with mute_rendezvous() as port:
        with pytest.raises(RendezvousProtocolError,
                           match=r"sent no pairing code \(nameplate\) within 0\.3 s"):
            await coord.share((LO, port), on_code=codes.append, net_timeout=0.3,
                              punch_timeout=5, bind_host=LO)
    assert codes == []


async def test_a_hello_lost_once_is_retried_not_taken_for_a_seed_only_server() -> None:
    # Under loss a hello can arrive after nopf-server stopped waiting for one (it then
    # closes, as it does for seed clients). The first connection here is answered
    # that way; the second answers the hello. One retry tells the two apart.
    hellos: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, port = writer.get_extra_info("peername")[:2]
        writer.write(encode_reply(host, port))
        first = not hellos
        hellos.append(b"")
        with contextlib.suppress(OSError, MessageError):
            if not first:
                frames = FrameReader()
                while not (got := frames.feed(await reader.read(4096))):
                    pass
                hellos[-1] = got[0]
                writer.write(encode(ErrorReply("unknown_code", "no such pairing code")))
            await writer.drain()
        writer.close()

    events: list[str] = []
    server = await asyncio.start_server(handle, LO, 0)
    try:
        with pytest.raises(errors.UnknownCode):
            await coord.connect(server.sockets[0].getsockname()[:2], str(make_code(7)),
                                bind_host=LO, net_timeout=2, on_event=events.append)
    finally:
        server.close()
    assert len(hellos) == 2
    assert isinstance(decode_client_message(hellos[1]), Hello)
    assert any("closed before answering our hello" in e for e in events), events
