"""The NAT doctor's responder: asyncio driver of :class:`ResponderMachine`.

``nopf-server`` runs it beside the rendezvous on its own port (by default the
rendezvous port + 1). One :class:`asyncio.Protocol` per connection hands the
machine what the kernel reports (:class:`~nopf_web.rendezvous.conn_driver.ConnDriver`,
as for the rendezvous); the machine's :class:`Dial` actions become
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

from nopf_web.delegated import Delegated
from nopf_web.wire.doctor import DEFAULT_PORT_OFFSET, Icmp, Outcome

from .conn_driver import ConnDriver
from .doctor_machine import (
    Action,
    CancelDial,
    ConnId,
    Dial,
    Dialed,
    DoctorLimits,
    Event,
    ResponderMachine,
    ResponderStats,
    Shutdown,
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


class DoctorResponder(ConnDriver):
    """Answer NAT doctor probes on ``host:port`` and on each of ``addresses``.

    ``addresses`` are this host's other addresses (IPv4 or IPv6) that clients
    may use: the responder listens on them too (unless the wildcard ``host``
    covers them) and tells each client about those it did not connect to.
    """

    _log = log

    def __init__(self, host: str = "0.0.0.0", port: int = DEFAULT_DOCTOR_PORT,
                 addresses: tuple[str, ...] = (), limits: DoctorLimits | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.host = host
        self.port = port
        self.limits = limits or DoctorLimits()
        super().__init__(clock)
        self._machine = ResponderMachine(self.limits, addresses)
        self._servers: list[asyncio.Server] = []
        self._dials: dict[ConnId, asyncio.Task[None]] = {}
        self._tg: asyncio.TaskGroup | None = None

    stats = Delegated[ResponderStats]("_machine")
    addresses = Delegated[tuple[str, ...]]("_machine")

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
        first = await loop.create_server(self._new_link, self.host, self.port,
                                         reuse_address=True, backlog=256)
        self._servers.append(first)
        port = self.address[1]
        wildcard = {"0.0.0.0": 4, "": 4, "::": 6}.get(self.host)
        for address in self.addresses:
            family = ipaddress.ip_address(address).version
            if family == wildcard or address == self.host:
                continue
            self._servers.append(await loop.create_server(
                self._new_link, address, port, reuse_address=True, backlog=256))

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

    def _feed(self, event: Event) -> None:
        for action in self._machine.handle(event):
            self._act(action)
        self._timer.arm(self._machine.next_deadline)

    def _act(self, action: Action) -> None:
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
        self._act_common(action)

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
