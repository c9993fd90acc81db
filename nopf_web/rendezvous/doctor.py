"""The NAT doctor's responder: asyncio driver of :class:`ResponderMachine`.

``nopf-server`` runs it beside the rendezvous on its own port (by default the
rendezvous port + 1). One :class:`asyncio.Protocol` per connection hands the
machine what the kernel reports; the machine's :class:`Dial` actions become
tasks of the responder's TaskGroup that connect to the client's public address
from another port and classify what came back:

- the handshake completed: ``open``;
- an ICMP error: ``icmp``, with its type, code and sender read from the socket's
  error queue (``IP_RECVERR``/``IPV6_RECVERR``, Linux); where there is no error
  queue, an unreachable error (EHOSTUNREACH, ENETUNREACH) is taken for one;
- ECONNREFUSED with no ICMP queued: a TCP reset, ``rst``;
- nothing before the timeout: ``drop``.

Use ``async with DoctorResponder(...) as doctor:``; leaving the block stops the
listeners, resets open connections and cancels dials under way.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import socket
import struct
import sys
import time
from collections.abc import Callable
from types import TracebackType

from nopf_web.wire.doctor import DEFAULT_PORT_OFFSET, Icmp, Outcome

from .deadline import DeadlineTimer
from .doctor_machine import (
    Accepted,
    Action,
    CancelDial,
    Close,
    ConnId,
    Dial,
    Dialed,
    DoctorLimits,
    Event,
    Log,
    Lost,
    PeerClosed,
    Received,
    Reset,
    ResponderMachine,
    ResponderStats,
    Send,
    Shutdown,
    Tick,
)
from .server import DEFAULT_PORT

__all__ = ["DEFAULT_DOCTOR_PORT", "DoctorLimits", "DoctorResponder", "ResponderStats",
           "read_icmp_error"]

log = logging.getLogger("nopf.doctor")

DEFAULT_DOCTOR_PORT = DEFAULT_PORT + DEFAULT_PORT_OFFSET

# Linux: ask for ICMP errors on the socket's error queue (<linux/in.h>, <linux/in6.h>).
IP_RECVERR = 11
IPV6_RECVERR = 25
# struct sock_extended_err (<linux/errqueue.h>): ee_errno u32, ee_origin u8, ee_type u8,
# ee_code u8, ee_pad u8, ee_info u32, ee_data u32 (native byte order), then the
# offender's sockaddr (sockaddr_in: address at bytes 4-8; sockaddr_in6: at 8-24).
_EXTENDED_ERR = struct.Struct("=IBBBBII")
SO_EE_ORIGIN_ICMP = 2
SO_EE_ORIGIN_ICMP6 = 3


class _Link(asyncio.Protocol):
    """One accepted connection: tells the machine what its socket reports."""

    __slots__ = ("_doctor", "id", "sock", "transport")

    def __init__(self, doctor: DoctorResponder) -> None:
        self._doctor = doctor
        self.id: ConnId = 0
        self.transport: asyncio.Transport | None = None
        self.sock: socket.socket | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._doctor._accepted(self, transport)

    def data_received(self, data: bytes) -> None:
        self._doctor._feed(Received(self.id, data, self._doctor._clock()))

    def eof_received(self) -> bool:
        self._doctor._feed(PeerClosed(self.id, self._doctor._clock()))
        return True  # our direction stays open: the machine closes it

    def connection_lost(self, exc: Exception | None) -> None:
        self._doctor._lost(self)


class DoctorResponder:
    """Answer NAT doctor probes on ``host:port`` and on each of ``addresses``.

    ``addresses`` are this host's other addresses (IPv4 or IPv6) that clients
    may use: the responder listens on them too (unless the wildcard ``host``
    covers them) and tells each client about those it did not connect to.
    """

    def __init__(self, host: str = "0.0.0.0", port: int = DEFAULT_DOCTOR_PORT,
                 addresses: tuple[str, ...] = (), limits: DoctorLimits | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.host = host
        self.port = port
        self.limits = limits or DoctorLimits()
        self._clock = clock
        self._machine = ResponderMachine(self.limits, addresses)
        self._servers: list[asyncio.Server] = []
        self._links: dict[ConnId, _Link] = {}
        self._dials: dict[ConnId, asyncio.Task[None]] = {}
        self._next_id: ConnId = 0
        self._timer = DeadlineTimer(clock, lambda now: self._feed(Tick(now)))
        self._tg: asyncio.TaskGroup | None = None

    @property
    def stats(self) -> ResponderStats:
        return self._machine.stats

    @property
    def addresses(self) -> tuple[str, ...]:
        return self._machine.addresses

    @property
    def address(self) -> tuple[str, int]:
        """The first listener's bound address (useful with port 0)."""
        if not self._servers or not self._servers[0].sockets:
            raise RuntimeError("doctor responder not started")
        host, port = self._servers[0].sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def __aenter__(self) -> DoctorResponder:
        self._tg = asyncio.TaskGroup()
        await self._tg.__aenter__()
        try:
            await self._listen()
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        # Dials under way are cancelled by _stop; the caller's exception, cancellation
        # included, propagates unchanged once they have ended.
        await self._stop()
        if self._tg is not None:
            tg, self._tg = self._tg, None
            await tg.__aexit__(None, None, None)

    async def _listen(self) -> None:
        loop = asyncio.get_running_loop()
        first = await loop.create_server(lambda: _Link(self), self.host, self.port,
                                         reuse_address=True, backlog=256)
        self._servers.append(first)
        port = self.address[1]
        wildcard = {"0.0.0.0": 4, "": 4, "::": 6}.get(self.host)
        for address in self.addresses:
            family = ipaddress.ip_address(address).version
            if family == wildcard or address == self.host:
                continue
            self._servers.append(await loop.create_server(
                lambda: _Link(self), address, port, reuse_address=True, backlog=256))

    async def _stop(self) -> None:
        servers, self._servers = self._servers, []
        for server in servers:
            server.close()
        self._feed(Shutdown(self._clock()))
        for task in list(self._dials.values()):
            task.cancel()
        self._timer.cancel()
        for server in servers:
            await server.wait_closed()

    # -- the machine's driver ---------------------------------------------------------

    def _accepted(self, link: _Link, transport: asyncio.Transport) -> None:
        self._next_id += 1
        link.id = self._next_id
        link.transport = transport
        link.sock = transport.get_extra_info("socket")
        self._links[link.id] = link
        peer = transport.get_extra_info("peername")
        local = transport.get_extra_info("sockname")
        self._feed(Accepted(link.id, (str(peer[0]), int(peer[1])) if peer else None,
                            self._clock(),
                            local=(str(local[0]), int(local[1])) if local else None))

    def _lost(self, link: _Link) -> None:
        if self._links.pop(link.id, None) is None:
            return  # reset by us: the machine has forgotten it already
        self._feed(Lost(link.id, self._clock()))

    def _feed(self, event: Event) -> None:
        for action in self._machine.handle(event):
            self._act(action)
        self._timer.arm(self._machine.next_deadline)

    def _act(self, action: Action) -> None:
        if isinstance(action, Log):
            log.warning("%s", action.line)
            return
        if isinstance(action, Dial):
            assert self._tg is not None
            self._dials[action.conn] = self._tg.create_task(
                self._dial(action), name=f"doctor-dial-{action.conn}")
            return
        if isinstance(action, CancelDial):
            task = self._dials.pop(action.conn, None)
            if task is not None:
                task.cancel()
            return
        link = self._links.get(action.conn)
        if link is None or link.transport is None:
            return
        if isinstance(action, Send):
            link.transport.write(action.data)
        elif isinstance(action, Close):
            link.transport.close()
        elif isinstance(action, Reset):
            del self._links[action.conn]
            if link.sock is not None:
                with contextlib.suppress(OSError):
                    link.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                         struct.pack("ii", 1, 0))
            link.transport.abort()

    async def _dial(self, action: Dial) -> None:
        """Connect to the client's public address; feed what came back."""
        try:
            outcome, source, elapsed, icmp, error = await dial_back(
                action.target, action.source, action.timeout, self._clock)
        except Exception as exc:  # a bug here costs this one probe, not the responder
            log.exception("doctor: dial-back to %s failed", action.target)
            outcome, source, elapsed, icmp, error = None, None, 0.0, None, repr(exc)
        finally:
            self._dials.pop(action.conn, None)
        self._feed(Dialed(action.conn, outcome, source, self._clock(), elapsed, icmp, error))


async def dial_back(target: tuple[str, int], source: str, timeout: float,
                    clock: Callable[[], float] = time.monotonic
                    ) -> tuple[Outcome | None, tuple[str, int] | None, float, Icmp | None,
                               str | None]:
    """One dial-back: (outcome, where from, seconds, ICMP details, our own error)."""
    loop = asyncio.get_running_loop()
    v6 = ":" in target[0]
    sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        # Linux's error queue. Elsewhere the number means another option (11 is
        # IP_MULTICAST_LOOP on Windows and macOS): not set, the ICMP is guessed below.
        if sys.platform.startswith("linux"):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_IPV6 if v6 else socket.IPPROTO_IP,
                                IPV6_RECVERR if v6 else IP_RECVERR, 1)
        try:
            sock.bind((source, 0))
        except OSError as exc:
            return None, None, 0.0, None, f"cannot bind {source}: {exc.strerror or exc}"
        host, port = sock.getsockname()[:2]
        where = (str(host), int(port))
        start = clock()
        try:
            async with asyncio.timeout(timeout):
                await loop.sock_connect(sock, target)
        except TimeoutError:
            return "drop", where, clock() - start, None, None
        except OSError as exc:
            elapsed = clock() - start
            icmp = read_icmp_error(sock)
            if icmp is not None:
                return "icmp", where, elapsed, icmp, None
            if exc.errno == errno.ECONNREFUSED:
                return "rst", where, elapsed, None, None
            if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
                return "icmp", where, elapsed, None, None
            return None, where, elapsed, None, exc.strerror or str(exc)
        return "open", where, clock() - start, None, None
    finally:
        sock.close()


def read_icmp_error(sock: socket.socket) -> Icmp | None:
    """The ICMP error queued on ``sock`` (IP_RECVERR), or None."""
    flag = getattr(socket, "MSG_ERRQUEUE", None)
    if flag is None or sys.platform == "win32":  # Linux only; Windows has no recvmsg
        return None
    try:
        _data, ancdata, _flags, _addr = sock.recvmsg(0, 512, flag)
    except OSError:
        return None
    for level, kind, data in ancdata:
        if (level, kind) not in ((socket.IPPROTO_IP, IP_RECVERR),
                                 (socket.IPPROTO_IPV6, IPV6_RECVERR)):
            continue
        if len(data) < _EXTENDED_ERR.size:
            continue
        _errno, origin, icmp_type, code, _pad, _info, _data32 = _EXTENDED_ERR.unpack_from(data)
        if origin not in (SO_EE_ORIGIN_ICMP, SO_EE_ORIGIN_ICMP6):
            continue
        offender = data[_EXTENDED_ERR.size:]
        source: str | None = None
        if origin == SO_EE_ORIGIN_ICMP and len(offender) >= 8:
            source = str(ipaddress.IPv4Address(offender[4:8]))
        elif origin == SO_EE_ORIGIN_ICMP6 and len(offender) >= 24:
            source = str(ipaddress.IPv6Address(offender[8:24]))
        return Icmp(icmp_type, code, source)
    return None
