"""nopf-server: the rendezvous service (seed discovery, and coordinated mode).

On every accepted connection it writes the seed's 10-byte discovery reply
(see :mod:`nopf_web.wire.discovery`) without reading anything first. Then it
waits up to ``hello_timeout`` for a coordinated-mode hello
(:mod:`nopf_web.wire.rendezvous`):

- the client closes (a seed client, done with its 10 bytes): the server
  resets the connection. The client has already closed, so it sees nothing,
  and its port is free at once (a FIN answer would leave it in TIME_WAIT,
  blocking the next discovery from the same port);
- nothing arrives in time: the server closes, as the seed always did;
- anything but a valid frame: reset; a valid frame that is not a valid hello:
  an error message, then close;
- a probe: close at once (the coordinated client's NAT mapping check);
- a hello: coordinated mode — pairing by nameplate, RTT measurement and the
  fire instruction (see ``docs/protocol.md``, "Coordinated mode").

Defences against hostile clients, all bounded:
- a global cap on open connections and a per-source-address cap, so a flood
  from one address cannot starve others; refused connections are reset at once;
- a write deadline per connection, so a client that never reads cannot pin
  a connection (10 bytes fit any socket buffer, but the close may not);
- problem logging is rate-limited per kind, one line per problem;
- coordinated mode: frames of at most 4 KiB, a hello deadline, one waiting
  code per connection (so the per-source cap also caps codes), failed claims
  limited per source address, codes single-use and expiring.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nopf_web.sockets import kernel_rtt, syn_had_data
from nopf_web.wire.address import Endpoint
from nopf_web.wire.discovery import encode_reply
from nopf_web.wire.rendezvous import (
    ErrorReply,
    Fire,
    FrameReader,
    Hello,
    MessageError,
    PakeMessage,
    Ping,
    Pong,
    Probe,
    ServerMessage,
    UnsupportedVersion,
    Welcome,
    decode_client_message,
    encode,
)

from .book import (
    ClaimRefused,
    NameplateBook,
    PairingLimits,
    PeerInfo,
    SymmetricPair,
    describe_duration,
    make_plans,
)

log = logging.getLogger("nopf.rendezvous")

DEFAULT_PORT = 3012
FIRE_MARGIN = 0.005  # s the sharer's fire may trail the joiner's: scheduling slack
QUICK_PINGS = 3  # RTT samples taken at once from a sharer, then one per ping_interval
DEFAULT_RTT = 0.2  # s, assumed when nothing was measured (non-Linux, no pong yet)
RETRY_WAIT = 10.0  # s a peer's retry hello waits for the other peer's
MAX_RETRIES = 2  # coordinations again after a failed punch, per pairing
RETRY_GRACE = 30.0  # s after the last plan's budget during which a retry is accepted
# TCP Fast Open: pending (SYN-data, handshake not yet complete) connections the
# kernel accepts before falling back to plain handshakes; bounds spoofed SYN-data.
FASTOPEN_QUEUE = 256
# net.ipv4.tcp_fastopen bits: server enabled, and data accepted without a cookie
# (the coordinated client sends its hello with TCP_FASTOPEN_NO_COOKIE).
TFO_SERVER_ENABLE = 0x2
TFO_SERVER_COOKIE_NOT_REQD = 0x200
FASTOPEN_SYSCTL = "/proc/sys/net/ipv4/tcp_fastopen"


@dataclass(frozen=True)
class ServerLimits:
    # About 12 KiB per waiting peer (bench/scn_rendezvous.py): 16,384 is ~200 MB.
    max_connections: int = 16384
    max_per_source: int = 64
    write_timeout: float = 5.0
    log_interval: float = 10.0  # at most one line per problem kind per interval
    hello_timeout: float = 1.0  # after the 10-byte reply: wait this long for a v2 hello
    # Liveness ping to a waiting sharer (a fresh RTT is taken when its peer
    # arrives). 15 s is far under NAT idle timeouts for TCP (RFC 5382: >= 2 h 4 min);
    # at 5 s, 10,000 waiting sharers kept 63 % of a core busy.
    ping_interval: float = 15.0
    pairing: PairingLimits = field(default_factory=PairingLimits)


@dataclass
class ServerStats:
    served: int = 0
    refused_flood: int = 0
    refused_capacity: int = 0
    failed: int = 0
    open_now: int = 0
    coordinated: int = 0  # hellos accepted
    paired: int = 0  # pairs sent a fire instruction
    refused_claims: int = 0
    syn_data: int = 0  # coordinated hellos that arrived in the SYN (TCP Fast Open)


@dataclass
class _ProblemLog:
    """One log line per problem kind per interval, with a count of the repeats."""

    interval: float
    _last: dict[str, float] = field(default_factory=dict)
    _suppressed: Counter[str] = field(default_factory=Counter)

    def problem(self, kind: str, message: str) -> None:
        now = time.monotonic()
        if now - self._last.get(kind, -1e9) < self.interval:
            self._suppressed[kind] += 1
            return
        extra = self._suppressed.pop(kind, 0)
        suffix = f" (and {extra} more like it)" if extra else ""
        self._last[kind] = now
        log.warning("%s%s", message, suffix)


class _Gone(Exception):
    """The coordinated peer closed, broke the connection or sent something invalid."""


@dataclass
class _Conn:
    """One coordinated-mode connection, from the rendezvous' side."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    public: Endpoint
    hello: Hello
    frames: FrameReader = field(default_factory=FrameReader)
    rtts: list[float] = field(default_factory=list)
    pending: list[bytes] = field(default_factory=list)  # frames read, not yet handled
    pake: bytes | None = None  # the peer's SPAKE2 message, forwarded opaquely in the fire

    def __post_init__(self) -> None:
        self.pake = self.hello.pake

    def send(self, msg: ServerMessage) -> None:
        self.writer.write(encode(msg))

    async def receive(self) -> Pong:
        """The next pong (after the hello only pongs are valid, and a sharer's one
        pake message, which is kept)."""
        while True:
            while self.pending:
                try:
                    msg = decode_client_message(self.pending.pop(0))
                except MessageError as exc:
                    raise _Gone(f"sent an invalid message ({exc})") from None
                if isinstance(msg, PakeMessage):
                    if self.hello.action != "share" or self.pake is not None:
                        raise _Gone("sent an unexpected pake message")
                    self.pake = msg.pake
                    continue
                if not isinstance(msg, Pong):
                    raise _Gone("sent a second hello")
                return msg
            try:
                chunk = await self.reader.read(4096)
            except OSError as exc:
                raise _Gone(f"broke the connection ({exc})") from None
            if not chunk:
                raise _Gone("closed the connection")
            try:
                self.pending += self.frames.feed(chunk)
            except MessageError as exc:
                raise _Gone(f"sent an invalid message ({exc})") from None

    def rtt_known(self) -> bool:
        return bool(self.rtts) or kernel_rtt(self.writer.get_extra_info("socket")) is not None

    def rtt(self) -> float:
        samples = list(self.rtts)
        kernel = kernel_rtt(self.writer.get_extra_info("socket"))
        if kernel is not None:
            samples.append(kernel)
        return min(samples) if samples else DEFAULT_RTT

    def info(self) -> PeerInfo:
        h = self.hello
        return PeerInfo(self.public, h.lan, h.probe, h.punch_timeout, self.rtt())


@dataclass
class _Waiting:
    """A sharer waiting on its nameplate; the joiner's handler hands it its fire."""

    conn: _Conn
    paired: asyncio.Future[tuple[ServerMessage, float]]


@dataclass
class _RetrySlot:
    """A paired nameplate whose peers may coordinate again after a failed punch."""

    sharer_ip: str  # a retry is accepted only from the IP each side paired from
    joiner_ip: str
    until: float  # loop time after which retries are refused
    left: int = MAX_RETRIES
    waiting: tuple[str, _Conn, asyncio.Future[tuple[ServerMessage, float]]] | None = None


class RendezvousServer:
    """Serve discovery replies and coordinated mode; :meth:`start`, then :meth:`close`."""

    def __init__(
        self, host: str = "0.0.0.0", port: int = DEFAULT_PORT, limits: ServerLimits | None = None,
        *, clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.host = host
        self.port = port
        self.limits = limits or ServerLimits()
        self.stats = ServerStats()
        self.book: NameplateBook[_Waiting] = NameplateBook(self.limits.pairing, clock)
        self._per_source: Counter[str] = Counter()
        self._server: asyncio.Server | None = None
        self._problems = _ProblemLog(self.limits.log_interval)
        self._coordinated: set[asyncio.StreamWriter] = set()
        self._retries: dict[int, _RetrySlot] = {}

    @property
    def address(self) -> tuple[str, int]:
        """The bound address (useful with port 0)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("server not started")
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, self.host, self.port, reuse_address=True, backlog=1024
        )
        # A coordinated client's hello may ride in its SYN: one round trip less.
        # Whether the kernel takes it is the host's sysctl (see fastopen_hint()).
        for sock in self._server.sockets:
            with contextlib.suppress(OSError, AttributeError):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, "TCP_FASTOPEN", 23),
                                FASTOPEN_QUEUE)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            # Waiting sharers would hold their handlers for minutes: end them now.
            for writer in list(self._coordinated):
                _reset(writer)
            # Handlers finish within write_timeout; don't wait on stuck clients forever.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), self.limits.write_timeout + 1)
            self._server = None

    async def serve_forever(self) -> None:
        if self._server is None:
            await self.start()
        assert self._server is not None
        await self._server.serve_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        source = str(peer[0]) if peer else "?"
        self.stats.open_now += 1
        self._per_source[source] += 1
        try:
            if self.stats.open_now > self.limits.max_connections:
                self.stats.refused_capacity += 1
                self._problems.problem(
                    "capacity", f"refused {source}: {self.limits.max_connections} connections open"
                )
                _reset(writer)
                return
            if self._per_source[source] > self.limits.max_per_source:
                self.stats.refused_flood += 1
                self._problems.problem(
                    "flood",
                    f"refused {source}: over {self.limits.max_per_source} open connections "
                    "from one address",
                )
                _reset(writer)
                return
            hello = await self._reply(peer, reader, writer)
            if hello is not None:
                assert peer is not None
                await self._coordinate(_Conn(reader, writer, _observed(peer), hello))
        finally:
            self.stats.open_now -= 1
            self._per_source[source] -= 1
            if self._per_source[source] <= 0:
                del self._per_source[source]

    async def _reply(
        self, peer: tuple[str, int] | None, reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> Hello | None:
        """The seed's reply, then a hello if the client sends one (None: done with it)."""
        try:
            if peer is None:
                raise ConnectionError("connection closed before it could be served")
            ip, port = _observed(peer)
            writer.write(encode_reply(ip, port))  # first, before reading anything
            await asyncio.wait_for(writer.drain(), self.limits.write_timeout)
            self.stats.served += 1
        except TimeoutError:
            self.stats.failed += 1
            self._problems.problem(
                "timeout",
                f"gave up on {_fmt(peer)}: reply not delivered within "
                f"{self.limits.write_timeout} s",
            )
            _reset(writer)
            return None
        except (OSError, ValueError) as exc:
            self.stats.failed += 1
            self._problems.problem("error", f"could not serve {_fmt(peer)}: {exc}")
            _reset(writer)
            return None
        return await self._read_hello(peer, reader, writer)

    async def _read_hello(
        self, peer: tuple[str, int], reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
    ) -> Hello | None:
        frames = FrameReader()
        try:
            async with asyncio.timeout(self.limits.hello_timeout):
                while True:
                    chunk = await reader.read(4096)
                    if not chunk:  # a seed client that has its answer and closed
                        _reset(writer)
                        return None
                    payloads = frames.feed(chunk)
                    if payloads:
                        break
        except TimeoutError:  # a seed client that keeps its end open: close, as always
            if frames.buffered:
                _reset(writer)
            else:
                await self._close(writer)
            return None
        except MessageError:  # not a framed client at all (HTTP, noise): no answer
            _reset(writer)
            return None
        except OSError:
            _reset(writer)
            return None
        try:
            msg = decode_client_message(payloads[0])
            if isinstance(msg, Probe):  # the mapping check: close first, at once
                await self._close(writer)
                return None
            if not isinstance(msg, Hello) or len(payloads) > 1 or frames.buffered:
                raise MessageError("the first message must be a single hello")
        except UnsupportedVersion as exc:
            await self._refuse(reader, writer, "unsupported_version", f"rendezvous: {exc}")
            return None
        except MessageError as exc:
            self._problems.problem("bad-hello", f"bad hello from {_fmt(peer)}: {exc}")
            await self._refuse(reader, writer, "bad_request",
                               f"rendezvous rejected the hello: {exc}")
            return None
        self.stats.coordinated += 1
        return msg

    # -- coordinated mode ------------------------------------------------------

    async def _coordinate(self, conn: _Conn) -> None:
        self._coordinated.add(conn.writer)
        try:
            if conn.hello.action == "share":
                await self._share(conn)
            elif conn.hello.action == "join":
                await self._join(conn)
            else:
                await self._retry(conn)
        except (OSError, TimeoutError) as exc:
            self._problems.problem("coord", f"coordinated peer {conn.public}: {exc}")
            _reset(conn.writer)
        finally:
            self._coordinated.discard(conn.writer)

    async def _share(self, conn: _Conn) -> None:
        loop = asyncio.get_running_loop()
        waiting = _Waiting(conn, loop.create_future())
        try:
            nameplate, expires_at = self.book.allocate(waiting)
        except ClaimRefused as exc:
            await self._refuse(conn.reader, conn.writer, exc.code, str(exc))
            return
        conn.send(Welcome(nameplate, self.limits.pairing.code_lifetime, conn.public))
        receiver = asyncio.create_task(conn.receive(), name=f"rdv-share-{nameplate}-receive")
        sent: dict[int, float] = {}
        last_pong = loop.time()
        try:
            seq = 0
            while not waiting.paired.done():
                seq += 1
                sent[seq] = loop.time()
                conn.send(Ping(seq))
                interval = 0.0 if seq < QUICK_PINGS else self.limits.ping_interval
                left = expires_at - self.book.clock()
                wake = loop.time() + min(max(interval, 2 * conn.rtt()), max(0.0, left))
                while not waiting.paired.done() and loop.time() < wake:
                    pending: set[asyncio.Future[Any]] = {receiver, waiting.paired}
                    done, _ = await asyncio.wait(pending, timeout=wake - loop.time(),
                                                 return_when=asyncio.FIRST_COMPLETED)
                    if receiver not in done:
                        continue
                    try:
                        pong = receiver.result()
                    except _Gone:
                        self.book.release(nameplate, waiting)
                        _reset(conn.writer)
                        return
                    if pong.seq in sent:
                        conn.rtts = [*conn.rtts[-4:], loop.time() - sent.pop(pong.seq)]
                        last_pong = loop.time()
                    receiver = asyncio.create_task(conn.receive(),
                                                   name=f"rdv-share-{nameplate}-receive")
                if waiting.paired.done():
                    break
                if self.book.clock() >= expires_at:
                    self.book.sweep()
                    await _stop(receiver)
                    lifetime = describe_duration(self.limits.pairing.code_lifetime)
                    await self._refuse(conn.reader, conn.writer, "expired",
                                       f"nobody used the pairing code within {lifetime}")
                    return
                if loop.time() - last_pong > 3 * self.limits.ping_interval + 1:
                    self.book.release(nameplate, waiting)  # silently gone
                    _reset(conn.writer)
                    return
            fire, send_at = waiting.paired.result()
            await _stop(receiver)  # _fire reads the rest
            await self._fire(conn, fire, send_at)
        finally:
            await _stop(receiver)
            if not waiting.paired.done():
                waiting.paired.cancel()

    async def _join(self, conn: _Conn) -> None:
        nameplate = conn.hello.nameplate
        assert nameplate is not None
        sharer_waiting = self.book.peek(nameplate)
        if (sharer_waiting is not None and conn.hello.probe is None
                and sharer_waiting.conn.info().mapping == "symmetric"
                and conn.info().mapping != "none"):
            # Against a symmetric sharer the joiner's own mapping decides between
            # "refuse at once" and a short punch: it has to check it first. The
            # code stays open for its second hello.
            await self._refuse(conn.reader, conn.writer, "probe_required",
                               "the sharer's NAT is symmetric: check our NAT mapping (a "
                               "probe from the same port), then send the hello again")
            return
        try:
            waiting = self.book.claim(nameplate, conn.public.host)
        except ClaimRefused as exc:
            self.stats.refused_claims += 1
            await self._refuse(conn.reader, conn.writer, exc.code, str(exc))
            return
        sock = conn.writer.get_extra_info("socket")
        if syn_had_data(sock):
            # The hello came in the SYN: its handshake is still completing, so no
            # RTT yet, and measuring one would cost the round trip Fast Open saved.
            # _plan fires without it.
            self.stats.syn_data += 1
        elif kernel_rtt(sock) is None:
            await self._ping_once(conn)
        if waiting.paired.done():  # the sharer left while we measured
            await self._refuse(conn.reader, conn.writer, "unknown_code",
                               f"pairing code {nameplate}-… is no longer open (the sharer "
                               "stopped waiting): ask for a new code")
            return
        to_sharer, to_joiner = self._plan(nameplate, waiting.conn, conn)
        waiting.paired.set_result(to_sharer)
        await self._fire(conn, *to_joiner)

    def _plan(self, nameplate: int, sharer_conn: _Conn, joiner_conn: _Conn,
              ) -> tuple[tuple[ServerMessage, float], tuple[ServerMessage, float]]:
        """Each side's last message (fire, or the refusal) and when to send it."""
        loop = asyncio.get_running_loop()
        sharer, joiner = sharer_conn.info(), joiner_conn.info()
        try:
            plans = make_plans(sharer, joiner, self.limits.pairing)
        except SymmetricPair as exc:
            refusal = ErrorReply("symmetric_nat", str(exc))
            return (refusal, loop.time()), (refusal, loop.time())
        # The joiner fires as soon as its fire arrives: nothing is gained by holding
        # it back. The sharer's fire arrives with it or a few ms later, never
        # before: a sharer SYN that beat the joiner's own SYN out of the joiner's
        # NAT would be dropped or refused there, while a sharer SYN that leaves
        # up to half a peer round trip late still crosses the joiner's (whose SYN
        # takes that long to reach the sharer's NAT), and the joiner's first
        # bytes reach the sharer no later.
        now = loop.time()
        joiner_at = now
        if joiner_conn.rtt_known():
            sharer_at = now + max(0.0, (joiner.rtt - sharer.rtt) / 2) + FIRE_MARGIN
            fire_at = now + joiner.rtt / 2  # when the joiner fires
            rtt_ms = round((sharer.rtt + joiner.rtt) / 2 * 1000, 3)  # peer <-> peer, estimated
        else:
            # The joiner's hello came in its SYN (no RTT measured): fire both at once.
            # Still safe: the sharer's SYN reaches the joiner's NAT after
            # (sharer + peer path) / 2, no earlier than the joiner's SYN leaves it
            # (joiner path / 2) as long as paths obey the triangle inequality.
            sharer_at = now + FIRE_MARGIN
            fire_at = now + sharer.rtt / 2
            rtt_ms = round(sharer.rtt * 1000, 3)
        # SPAKE2 messages go through only if both sent one (a client without it
        # must see neither: it rejects unknown fields, and both must agree on
        # whether the tunnel runs SPAKE2 in-band).
        both = sharer_conn.pake is not None and joiner_conn.pake is not None
        # Keep the pairing for a retry until well after its punch can have ended.
        self._prune_retries()
        until = fire_at + sum(s.budget for s in plans.sharer) + RETRY_GRACE
        slot = self._retries.get(nameplate)
        if slot is None:
            self._retries[nameplate] = _RetrySlot(sharer.public.host, joiner.public.host, until)
        else:
            slot.until = until
        self.stats.paired += 1
        return (
            (Fire(sharer.public, joiner.public, plans.sharer, rtt_ms, plans.sharer_note,
                  joiner_conn.pake if both else None, (sharer.mapping, joiner.mapping)),
             sharer_at),
            (Fire(joiner.public, sharer.public, plans.joiner, rtt_ms, plans.joiner_note,
                  sharer_conn.pake if both else None, (joiner.mapping, sharer.mapping)),
             joiner_at),
        )

    async def _retry(self, conn: _Conn) -> None:
        """A peer whose punch failed coordinates again: wait for the other, then fire both."""
        loop = asyncio.get_running_loop()
        nameplate = conn.hello.nameplate
        assert nameplate is not None
        side = "sharer" if conn.hello.action == "reshare" else "joiner"
        self._prune_retries()
        slot = self._retries.get(nameplate)
        paired_from = None if slot is None else (
            slot.sharer_ip if side == "sharer" else slot.joiner_ip)
        if slot is None or slot.left <= 0 or paired_from != conn.public.host:
            self.stats.refused_claims += 1
            await self._refuse(conn.reader, conn.writer, "unknown_code",
                               f"no failed punch of pairing code {nameplate}-… to retry "
                               "from here (it was never paired, or its retries are spent)")
            return
        if kernel_rtt(conn.writer.get_extra_info("socket")) is None:
            await self._ping_once(conn)
        if slot.waiting is None or slot.waiting[2].done():
            mine: asyncio.Future[tuple[ServerMessage, float]] = loop.create_future()
            slot.waiting = (side, conn, mine)
            try:
                async with asyncio.timeout(RETRY_WAIT):
                    msg, send_at = await mine
            except TimeoutError:
                if slot.waiting is not None and slot.waiting[2] is mine:
                    slot.waiting = None
                await self._refuse(conn.reader, conn.writer, "timeout",
                                   f"the peer did not retry within {RETRY_WAIT:g} s")
                return
            await self._fire(conn, msg, send_at)
            return
        other_side, other, theirs = slot.waiting
        if other_side == side:
            await self._refuse(conn.reader, conn.writer, "bad_request",
                               f"a retry from the {side} is already waiting")
            return
        slot.waiting = None
        slot.left -= 1
        if side == "joiner":
            to_other, to_me = self._plan(nameplate, other, conn)
        else:
            to_me, to_other = self._plan(nameplate, conn, other)
        theirs.set_result(to_other)
        await self._fire(conn, *to_me)

    def _prune_retries(self) -> None:
        now = asyncio.get_running_loop().time()
        for nameplate in [n for n, s in self._retries.items() if s.until <= now]:
            del self._retries[nameplate]

    async def _ping_once(self, conn: _Conn) -> None:
        """One RTT sample where the kernel offers none (bounded: a silent peer costs 1 s)."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        conn.send(Ping(1))
        with contextlib.suppress(TimeoutError, _Gone):
            async with asyncio.timeout(1.0):
                await conn.receive()
                conn.rtts.append(loop.time() - start)

    async def _fire(self, conn: _Conn, msg: ServerMessage, send_at: float) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(max(0.0, send_at - loop.time()))
        await self._last_word(conn.reader, conn.writer, msg)

    async def _refuse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      code: str, message: str) -> None:
        await self._last_word(reader, writer, ErrorReply(code, message[:300]))

    async def _last_word(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         msg: ServerMessage) -> None:
        """Send ``msg`` and a FIN, then wait for the peer's close, discarding its bytes.

        Closing at once would turn a late pong (unread in the kernel) into a RST,
        and a RST can overtake the message on a path that reorders and destroy it.
        """
        writer.write(encode(msg))
        try:
            writer.write_eof()
            async with asyncio.timeout(self.limits.write_timeout):
                while await reader.read(4096):
                    pass
        except (OSError, TimeoutError):
            _reset(writer)
            return
        await self._close(writer)

    async def _close(self, writer: asyncio.StreamWriter) -> None:
        try:
            writer.close()
            await asyncio.wait_for(writer.wait_closed(), self.limits.write_timeout)
        except (OSError, TimeoutError):
            _reset(writer)


async def _stop(task: asyncio.Task[Pong]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, _Gone, OSError):
        await task


def _observed(peer: tuple[str, int]) -> Endpoint:
    return Endpoint(str(peer[0]).removeprefix("::ffff:"), int(peer[1]))  # IPv4-mapped, dual stack


def fastopen_hint(path: str = FASTOPEN_SYSCTL) -> str | None:
    """One line for the operator if this host's sysctl keeps hellos out of SYNs, else None.

    Reads the sysctl of the calling process' network namespace; never changes it.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        with open(path) as f:
            value = int(f.read().strip(), 0)
    except (OSError, ValueError):
        return None
    wanted = TFO_SERVER_ENABLE | TFO_SERVER_COOKIE_NOT_REQD
    if value & wanted == wanted:
        return None
    return ("TCP Fast Open is off on this host: setup takes one round trip more; enable "
            f"with sysctl -w net.ipv4.tcp_fastopen={value | wanted:#x}")


def _fmt(peer: tuple[str, int] | None) -> str:
    return f"{peer[0]}:{peer[1]}" if peer else "?"


def _reset(writer: asyncio.StreamWriter) -> None:
    """Drop a connection with RST: no FIN handshake, no TIME_WAIT, no buffered data."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
