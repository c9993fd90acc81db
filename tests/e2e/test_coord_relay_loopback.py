"""The peer's relay path on loopback, against a scripted rendezvous whose plans relay at
once: the real driver (``coordinate``, ``meet_again``) opens the relay connection,
sends its token, reads exactly up to ``relayed`` (the tunnel's first bytes stay in
the socket for the tunnel) and reports refusals, silence and an unreachable relay
with their types and a line that names the wait.

The real rendezvous' relay is exercised in the lab (test_ladder_lab.py); here the
relay's side is a script, so that each of its answers can be chosen.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal

import pytest

from nopf_web.rendezvous.errors import RendezvousUnreachable
from nopf_web.sessions import coordination as coord, errors
from nopf_web.wire.address import Endpoint
from nopf_web.wire.discovery import encode_reply
from nopf_web.wire.rendezvous import (
    ErrorReply,
    Fire,
    FrameReader,
    Hello,
    MessageError,
    Probe,
    Relay,
    Relayed,
    RelayStage,
    Welcome,
    decode_client_message,
    encode,
)
from tests.programs import free_port

# On uvloop too: the loop of nopf's commands on Linux (tests/conftest.py).
pytestmark = pytest.mark.uvloop_too

LO = "127.0.0.1"
Mode = Literal["join", "refuse", "silent", "unreachable"]
TUNNEL_HEAD = b"the tunnel's first bytes"


@dataclass
class Script:
    """A rendezvous that pairs one sharer and one joiner (or two resume hellos) with
    relay-only plans, and a relay on its own port that answers as ``mode`` says."""

    mode: Mode
    budget: float = 3.0
    port: int = 0
    relay_port: int = 0
    hellos: list[Hello] = field(default_factory=list)
    relay_messages: list[bytes] = field(default_factory=list)  # each relay conn's bytes
    _waiting: list[asyncio.StreamWriter] = field(default_factory=list)
    _joined: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = field(
        default_factory=list)
    _piped: asyncio.Event = field(default_factory=asyncio.Event)

    async def _read_frame(self, reader: asyncio.StreamReader) -> bytes:
        frames = FrameReader()
        while not (got := frames.feed(await reader.read(4096))):
            pass
        return got[0]

    async def rendezvous(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        host, port = writer.get_extra_info("peername")[:2]
        writer.write(encode_reply(host, port))
        with contextlib.suppress(OSError, MessageError, asyncio.IncompleteReadError):
            msg = decode_client_message(await self._read_frame(reader))
            if isinstance(msg, Probe):
                writer.close()
                return
            assert isinstance(msg, Hello), msg
            self.hellos.append(msg)
            if msg.action == "share":
                writer.write(encode(Welcome(7, 600.0, Endpoint(host, port))))
            if not self._waiting:
                self._waiting.append(writer)
                await reader.read()  # held open until the fires are out
                return
            first = self._waiting.pop()
            relay = Endpoint(LO, self.relay_port)
            for w, n in ((first, 1), (writer, 2)):
                w.write(encode(Fire(Endpoint(host, port), Endpoint(host, port), (), 1.0,
                                    "relayed", None, ("symmetric", "symmetric"),
                                    RelayStage(relay, self.budget, bytes([n]) * 16))))
                w.write_eof()
            await reader.read()
        writer.close()

    async def relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, port = writer.get_extra_info("peername")[:2]
        writer.write(encode_reply(host, port))
        with contextlib.suppress(OSError, MessageError, asyncio.IncompleteReadError):
            payload = await self._read_frame(reader)
            self.relay_messages.append(payload)
            msg = decode_client_message(payload)
            assert isinstance(msg, Relay), msg
            if self.mode == "refuse":
                writer.write(encode(ErrorReply("relay_refused", "relay token already used")))
                await writer.drain()
                writer.close()
                return
            if self.mode == "silent":
                await reader.read()
                return
            self._joined.append((reader, writer))
            if len(self._joined) < 2:
                await self._piped.wait()  # the second one's handler pipes both
                return
            (ra, wa), (rb, wb) = self._joined
            for w in (wa, wb):  # "relayed" and the peer's first bytes in one segment
                w.write(encode(Relayed()) + TUNNEL_HEAD)
            try:
                await asyncio.gather(self._pipe(ra, wb), self._pipe(rb, wa))
            finally:
                self._piped.set()

    async def _pipe(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
            w.write_eof()


@contextlib.asynccontextmanager
async def scripted(mode: Mode, budget: float = 3.0) -> AsyncIterator[Script]:
    script = Script(mode, budget)
    rdv = await asyncio.start_server(script.rendezvous, LO, 0)
    script.port = rdv.sockets[0].getsockname()[1]
    relay = None
    if mode == "unreachable":
        script.relay_port = free_port()  # nobody listens there
    else:
        relay = await asyncio.start_server(script.relay, LO, 0)
        script.relay_port = relay.sockets[0].getsockname()[1]
    try:
        yield script
    finally:
        for server in (rdv, relay):
            if server is not None:
                server.close()


async def pair(script: Script) -> tuple[coord.PairedTunnel | BaseException,
                                        coord.PairedTunnel | BaseException]:
    codes: asyncio.Queue[str] = asyncio.Queue()
    events: list[str] = []
    sharer = asyncio.create_task(coord.share(
        (LO, script.port), on_code=codes.put_nowait, punch_timeout=10, net_timeout=2,
        bind_host=LO, on_event=events.append))
    code = await asyncio.wait_for(codes.get(), 5)
    joiner = asyncio.create_task(coord.connect((LO, script.port), code, punch_timeout=10,
                                               net_timeout=2, bind_host=LO))
    a, b = await asyncio.gather(sharer, joiner, return_exceptions=True)
    return a, b


def read_exactly(sock: socket.socket, n: int) -> bytes:
    sock.setblocking(True)
    sock.settimeout(5)
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, f"closed after {len(data)} bytes"
        data += chunk
    return data


async def test_both_peers_are_relayed_and_the_tunnels_bytes_stay_in_the_socket() -> None:
    async with scripted("join") as script:
        a, b = await pair(script)
        assert isinstance(a, coord.PairedTunnel) and isinstance(b, coord.PairedTunnel), (a, b)
        try:
            for t, role in ((a, "server"), (b, "client")):
                assert (t.path, t.relay, t.role, t.early) == (
                    "relay", Endpoint(LO, script.relay_port), role, b"")
                assert t.why == "both NATs are symmetric"
                assert t.local.port not in (0, script.relay_port)
                # Nothing after "relayed" was read by the driver: it is all still here.
                assert await asyncio.to_thread(read_exactly, t.sock,
                                               len(TUNNEL_HEAD)) == TUNNEL_HEAD
            # Each side presented its own token, as one frame, first.
            tokens = sorted(decode_client_message(m).token  # type: ignore[union-attr]
                            for m in script.relay_messages)
            assert tokens == [bytes([1]) * 16, bytes([2]) * 16]
            assert all(h.relay for h in script.hellos)  # the hellos said they can relay
            # The joined connections carry the peers' bytes both ways.
            data = os.urandom(100_000)
            await asyncio.to_thread(a.sock.sendall, data)
            assert await asyncio.to_thread(read_exactly, b.sock, len(data)) == data
        finally:
            a.sock.close()
            b.sock.close()


async def test_a_refusal_is_a_relay_refused_error_on_both_sides() -> None:
    async with scripted("refuse") as script:
        a, b = await pair(script)
    for result in (a, b):
        assert isinstance(result, errors.RelayRefused), result
        assert str(result) == (f"relay {LO}:{script.relay_port} refused our token: relay "
                               "token already used")


async def test_a_relay_that_never_joins_times_out_at_the_stages_budget() -> None:
    async with scripted("silent", budget=1.5) as script:
        t0 = time.monotonic()
        a, b = await pair(script)
        took = time.monotonic() - t0
    for result in (a, b):
        assert isinstance(result, errors.RelayTimeout), result
        assert str(result) == (f"the relay at {LO}:{script.relay_port} did not join us with "
                               "the peer within 1.5 s: the peer never reached it")
    assert 1.4 < took < 4


async def test_an_unreachable_relay_is_named() -> None:
    async with scripted("unreachable") as script:
        a, b = await pair(script)
    for result in (a, b):
        assert isinstance(result, RendezvousUnreachable), result
        assert str(result).startswith(f"relay: rendezvous {LO}:{script.relay_port}")
        assert "refused" in str(result).lower()


@pytest.mark.parametrize("direct_only", [False, True])
async def test_meet_again_sends_resume_hellos_and_returns_the_new_path(
        direct_only: bool) -> None:
    rid = os.urandom(16)
    async with scripted("join") as script:
        results = await asyncio.gather(
            coord.meet_again(Endpoint(LO, script.port), "server", rid, direct_only=direct_only,
                             timeout=20, net_timeout=2, bind_host=LO),
            coord.meet_again(Endpoint(LO, script.port), "client", rid, direct_only=direct_only,
                             timeout=20, net_timeout=2, bind_host=LO),
            return_exceptions=True)
    assert [(h.action, h.resume_id, h.side, h.direct_only, h.punch_timeout)
            for h in sorted(script.hellos, key=lambda h: h.side or "")] == [
        ("resume", rid, "join", direct_only, 20.0), ("resume", rid, "share", direct_only, 20.0)]
    for result in results:
        # The script relays whatever the hello says: the machine takes the plan it gets.
        assert isinstance(result, coord.NewPath), result
        assert result.path == "relay" and result.early == b""
        assert await asyncio.to_thread(read_exactly, result.sock,
                                       len(TUNNEL_HEAD)) == TUNNEL_HEAD
        result.sock.close()
