"""Coordinated mode on loopback: share/connect against an in-process rendezvous."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import pytest

from nopf_web.pairing import BadCode, parse_code
from nopf_web.rendezvous.book import PairingLimits
from nopf_web.rendezvous.server import RendezvousServer, ServerLimits
from nopf_web.roles import PeerRole
from nopf_web.sessions import coordination as coord, errors
from nopf_web.tunnel.errors import PairingMismatch
from nopf_web.tunnel.secure import Pake, open_channel
from nopf_web.wire.address import Endpoint
from nopf_web.wire.discovery import decode_reply
from nopf_web.wire.rendezvous import (
    ErrorReply,
    Fire,
    FrameReader,
    Hello,
    PakeMessage,
    ServerMessage,
    Welcome,
    decode_server_message,
    encode,
)

# On uvloop too: the loop of nopf's commands on Linux (tests/conftest.py).
pytestmark = pytest.mark.uvloop_too

LO = "127.0.0.1"


@contextlib.asynccontextmanager
async def rendezvous(**pairing: float) -> AsyncIterator[RendezvousServer]:
    limits = ServerLimits(pairing=PairingLimits(**pairing))  # type: ignore[arg-type]
    server = RendezvousServer(LO, 0, limits)
    await server.start()
    try:
        yield server
    finally:
        await server.close()


async def start_share(server: RendezvousServer, *, timeout: float = 600,
                      punch_timeout: float = 30, pake: coord.PakeFactory | None = None,
                      ) -> tuple[asyncio.Task[coord.PairedTunnel], str]:
    codes: asyncio.Queue[str] = asyncio.Queue()
    task = asyncio.create_task(coord.share(server.address, on_code=codes.put_nowait,
                                           bind_host=LO, timeout=timeout,
                                           punch_timeout=punch_timeout, pake=pake),
                               name="test-share")
    code = await asyncio.wait_for(codes.get(), 5)
    return task, code


async def pair_once(server: RendezvousServer) -> str:
    """A sharer and a connector pair through ``server`` and close their ends at once;
    the code they used."""
    sharing, code = await start_share(server, punch_timeout=5)
    b = await coord.connect(server.address, code, bind_host=LO, punch_timeout=5)
    a = await sharing
    a.sock.close()
    b.sock.close()
    return code


async def test_share_and_connect_give_both_ends_of_one_connection() -> None:
    async with rendezvous() as server:
        sharing, code = await start_share(server, punch_timeout=5)
        assert parse_code(code).nameplate >= 1
        b = await coord.connect(server.address, code, bind_host=LO, punch_timeout=5)
        a = await sharing
        try:
            assert (a.role, b.role) == ("server", "client")
            assert a.code == b.code == code and a.path == b.path == "public"
            assert a.sock.getpeername() == b.sock.getsockname()
            assert a.peer.port == b.local.port and b.peer.port == a.local.port
            assert not a.sock.getblocking()
            assert a.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            loop = asyncio.get_running_loop()
            await loop.sock_sendall(a.sock, b"from A")
            assert await loop.sock_recv(b.sock, 100) == b"from A"
            await loop.sock_sendall(b.sock, b"from B")
            assert await loop.sock_recv(a.sock, 100) == b"from B"
            assert b.timings.started <= b.timings.hello_sent <= b.timings.fire
            assert b.timings.fire <= b.timings.connected
        finally:
            a.sock.close()
            b.sock.close()
        assert server.stats.paired == 1


async def test_codes_work_once() -> None:
    async with rendezvous() as server:
        code = await pair_once(server)
        with pytest.raises(errors.CodeUsed, match="already used"):
            await coord.connect(server.address, code, bind_host=LO)


async def test_unknown_code_and_malformed_code() -> None:
    async with rendezvous() as server:
        with pytest.raises(errors.UnknownCode, match="no open pairing code starts with 4"):
            await coord.connect(server.address, "4-orbit-lantern", bind_host=LO)
        with pytest.raises(BadCode):  # before any traffic: nothing is counted
            await coord.connect(server.address, "4-orbit", bind_host=LO)
        assert server.stats.refused_claims == 1


async def test_expired_code_both_sides() -> None:
    async with rendezvous(code_lifetime=0.6) as server:
        sharing, code = await start_share(server)
        with pytest.raises(errors.PeerNeverArrived, match="nobody used the pairing code"):
            await asyncio.wait_for(sharing, 5)
        with pytest.raises(errors.CodeExpired, match="expired"):
            await coord.connect(server.address, code, bind_host=LO)


async def test_sharer_timeout_names_the_wait() -> None:
    async with rendezvous() as server:
        sharing, _ = await start_share(server, timeout=0.5)
        with pytest.raises(errors.PeerNeverArrived, match=r"within 0\.5 s"):
            await asyncio.wait_for(sharing, 5)
        await asyncio.sleep(0.2)
        assert server.stats.open_now == 0  # the nameplate's connection is gone


async def test_sharer_gone_means_the_code_is_closed() -> None:
    async with rendezvous() as server:
        sharing, code = await start_share(server)
        sharing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sharing
        await asyncio.sleep(0.2)
        with pytest.raises(errors.UnknownCode, match="stopped waiting"):
            await coord.connect(server.address, code, bind_host=LO)


async def test_guessing_is_limited_with_a_clear_error() -> None:
    async with rendezvous(max_failed_claims=3) as server:
        sharing, code = await start_share(server)
        nameplate = parse_code(code).nameplate
        wrong = [n for n in range(1, 10) if n != nameplate]
        for n in wrong[:3]:
            with pytest.raises(errors.UnknownCode):
                await coord.connect(server.address, f"{n}-orbit-lantern", bind_host=LO)
        with pytest.raises(errors.TooManyGuesses, match="too many failed pairing attempts"):
            await coord.connect(server.address, code, bind_host=LO)
        assert not sharing.done()
        sharing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sharing


async def test_seed_only_rendezvous_is_named() -> None:
    async def seed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ip, port = writer.get_extra_info("peername")[:2]
        writer.write(socket.inet_aton(ip) + port.to_bytes(2, "big") + b"END\0")
        writer.close()

    server = await asyncio.start_server(seed, LO, 0)
    try:
        with pytest.raises(errors.PairingError, match="speaks only the seed protocol"):
            await coord.connect(server.sockets[0].getsockname()[:2], "3-orbit-lantern",
                                bind_host=LO, net_timeout=2)
    finally:
        server.close()


async def test_seed_clients_are_served_as_before_next_to_coordinated_ones() -> None:
    async with rendezvous() as server:
        sharing, _ = await start_share(server)
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        sock.setblocking(False)
        await loop.sock_connect(sock, server.address)
        data = b""
        while len(data) < 10:
            data += await loop.sock_recv(sock, 10)
        assert decode_reply(data) == (LO, sock.getsockname()[1])
        sock.close()  # the seed client's close: the server lets go at once
        await asyncio.sleep(0.2)
        assert server.stats.open_now == 1  # only the waiting sharer
        sharing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sharing


async def _hello(server: RendezvousServer, hello: Hello,
                 ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, ServerMessage]:
    """Connect, send ``hello``, skip the discovery reply; return the first message."""
    reader, writer = await asyncio.open_connection(*server.address)
    writer.write(encode(hello))
    await reader.readexactly(10)
    frames = FrameReader()
    async with asyncio.timeout(5):
        while not (payloads := frames.feed(await reader.read(4096))):
            pass
    return reader, writer, decode_server_message(payloads[0])


async def test_a_joiner_without_mapping_check_is_asked_for_one_by_a_symmetric_sharer() -> None:
    # The probe is what the client reports: a port other than the observed one
    # makes this sharer "symmetric" to the rendezvous.
    lan = Endpoint(LO, 1)
    async with rendezvous() as server:
        _, s_writer, welcome = await _hello(
            server, Hello("share", None, (lan,), Endpoint("192.0.2.7", 4999), 5))
        assert isinstance(welcome, Welcome)
        _, j_writer, reply = await _hello(
            server, Hello("join", welcome.nameplate, (lan,), None, 5))
        assert isinstance(reply, ErrorReply) and reply.code == "probe_required", reply
        assert server.book.is_open(welcome.nameplate)  # not spent: the joiner comes back
        assert server.stats.paired == 0
        j_writer.close()
        s_writer.close()


async def test_a_pairing_can_be_coordinated_again_by_both_sides_only() -> None:
    lan = Endpoint(LO, 1)
    async with rendezvous() as server:
        code = await pair_once(server)
        nameplate = parse_code(code).nameplate
        # A nameplate that was never paired cannot be retried.
        _, w, reply = await _hello(server, Hello("rejoin", nameplate + 1, (lan,), None, 5))
        assert isinstance(reply, ErrorReply) and reply.code == "unknown_code", reply
        w.close()
        # Both sides ask again: both get a new fire instruction, one side waiting for the other.
        # Their SPAKE2 messages (unused: no tunnel ran them) go with the retry hellos.
        pa, pb = Pake("server", code).message, Pake("client", code).message
        first = asyncio.create_task(_hello(server, Hello("reshare", nameplate, (lan,), None, 5,
                                                         pake=pa)))
        await asyncio.sleep(0.2)
        assert not first.done()  # the sharer waits for the joiner
        _, wj, to_joiner = await _hello(server, Hello("rejoin", nameplate, (lan,), None, 5,
                                                      pake=pb))
        _, ws, to_sharer = await first
        assert isinstance(to_sharer, Fire) and isinstance(to_joiner, Fire), (to_sharer, to_joiner)
        assert to_sharer.peer_public == to_joiner.public
        assert (to_sharer.peer_pake, to_joiner.peer_pake) == (pb, pa)
        assert server.stats.paired == 2
        ws.close()
        wj.close()


class Halves:
    """A pake factory that keeps what it made (as the coordinated engine does)."""

    def __init__(self, role: PeerRole, code: str | None = None) -> None:
        self.role, self.code = role, code  # code: use this one instead (a wrong guess)
        self.made: list[Pake] = []

    def __call__(self, code: str) -> Pake:
        self.made.append(Pake(self.role, self.code or code))
        return self.made[-1]


async def _pair_with(server: RendezvousServer, sharer: Halves | None, joiner: Halves | None,
                     ) -> tuple[coord.PairedTunnel, coord.PairedTunnel]:
    sharing, code = await start_share(server, punch_timeout=5, pake=sharer)
    await asyncio.sleep(0.05)  # the sharer's pake message follows its welcome
    b = await coord.connect(server.address, code, bind_host=LO, punch_timeout=5, pake=joiner)
    return await sharing, b


async def test_spake2_messages_travel_with_the_coordination_and_early_data_works() -> None:
    async with rendezvous() as server:
        sh, jh = Halves("server"), Halves("client")
        a, b = await _pair_with(server, sh, jh)
        (pa,), (pb,) = sh.made, jh.made
        # Each got the other's message, as sent, and finished SPAKE2 while punching.
        assert a.peer_pake == pb.message and b.peer_pake == pa.message
        assert pa.finished and pb.finished
        ca = await open_channel(a.sock, role="server", code=a.code, pake=pa)
        cb = await open_channel(b.sock, role="client", code=b.code, pake=pb)
        cb.write(b"first bytes")  # no wait for the peer's confirmation
        assert await ca.recv() == b"first bytes"
        await asyncio.gather(ca.confirmed(), cb.confirmed())
        ca.close()
        cb.close()


async def test_a_wrong_code_with_forwarded_spake2_fails_on_both_sides() -> None:
    async with rendezvous() as server:
        sh, jh = Halves("server"), Halves("client", "9-orbit-lantern-wrong")
        a, b = await _pair_with(server, sh, jh)
        ca = await open_channel(a.sock, role="server", code=a.code, pake=sh.made[0])
        cb = await open_channel(b.sock, role="client", code=b.code, pake=jh.made[0])
        cb.write(b"never opened")
        results = await asyncio.gather(ca.confirmed(), cb.confirmed(), ca.recv(),
                                       return_exceptions=True)
        for res in results:
            assert isinstance(res, PairingMismatch), results
            assert str(res) == "pairing code did not match"


async def test_without_both_spake2_messages_neither_side_gets_one() -> None:
    # A peer without SPAKE2 forwarding must not see the field (it rejects unknown
    # fields), and both sides must agree to run SPAKE2 in-band.
    async with rendezvous() as server:
        for sharer, joiner in ((Halves("server"), None), (None, Halves("client"))):
            a, b = await _pair_with(server, sharer, joiner)
            assert a.peer_pake is None and b.peer_pake is None
            ca, cb = await asyncio.gather(open_channel(a.sock, role="server", code=a.code),
                                          open_channel(b.sock, role="client", code=b.code))
            cb.write(b"in-band")
            assert await ca.recv() == b"in-band"
            ca.close()
            cb.close()


async def test_the_rendezvous_accepts_one_pake_message_from_a_sharer_only() -> None:
    lan = Endpoint(LO, 1)
    message = Pake("server", "5-orbit-lantern").message
    async with rendezvous() as server:
        reader, writer, welcome = await _hello(server, Hello("share", None, (lan,), None, 5))
        assert isinstance(welcome, Welcome)
        writer.write(encode(PakeMessage(message)) + encode(PakeMessage(message)))
        # A second one ends the connection (with a reset: the sharer is dropped).
        with contextlib.suppress(ConnectionResetError):
            async with asyncio.timeout(5):
                while await reader.read(4096):
                    pass
        assert not server.book.is_open(welcome.nameplate)
        writer.close()
