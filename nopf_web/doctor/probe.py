"""The NAT doctor's asyncio driver: carries out :class:`DoctorMachine`'s probes.

:func:`run_doctor` measures against a rendezvous (and its doctor responder) and
returns a :class:`~nopf_web.doctor.report.DoctorReport`, within ``budget``
seconds whatever the network does: at the deadline every probe still under way
is cancelled and reported as not measured. It raises
:class:`~nopf_web.rendezvous.errors.RendezvousUnreachable` (one line) when the
rendezvous cannot be reached at all.

Sockets: a listener on an ephemeral port P (port sharing on, as the punch does)
receives the responder's dial-back and our own hairpin connection; every
probe from P or from a second port P2 binds that port too. Probes are started
in the machine's order with a synchronous ``connect()`` each, so their SYNs
leave in that order (the port step between consecutive mappings relies on it).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Final

from nopf_web.errors import describe_os_error
from nopf_web.portmap import NoGatewayError, PortMapError, PortMapper
from nopf_web.rendezvous.client import resolve_ipv4
from nopf_web.rendezvous.errors import RendezvousUnreachable
from nopf_web.sockets import reusable_socket, start_connect, wait_connected
from nopf_web.wire.address import DOCTOR_IPV4_ONLY, Endpoint
from nopf_web.wire.discovery import DiscoveryReader
from nopf_web.wire.doctor import (
    DEFAULT_PORT_OFFSET,
    Check as CheckMessage,
    DialBack,
    DoctorError,
    DoctorMessageError,
    FrameReader,
    Seen,
    decode_responder_message,
    encode,
)
from nopf_web.wire.errors import WireError

from .machine import (
    Action,
    Check,
    DetectGateway,
    DialedBack,
    Discover,
    DoctorMachine,
    Event,
    Failed,
    GatewayDone,
    Hairpin,
    HairpinDone,
    Observed,
    Resolved,
    ResolveIPv6,
    dial_wait,
)
from .report import PORT_MAPPING_PROTOCOLS, DoctorReport

__all__ = ["DEFAULT_BUDGET", "GatewayDetector", "detect_gateway", "run_doctor"]

DEFAULT_BUDGET: Final = 4.0  # s for the whole report, whatever the network does
HAIRPIN_WAIT: Final = 1.0  # s at most for the hairpin connection and its nonce
NONCE_SIZE: Final = 16
GATEWAY_TIMEOUT: Final = 0.25  # s for a silent gateway (the port mapper's race bound)

GatewayDetector = Callable[[], Awaitable[GatewayDone]]


async def detect_gateway() -> GatewayDone:
    """Which port-mapping protocols answer on the default gateway (no mapping made)."""
    loop = asyncio.get_running_loop()
    try:
        async with PortMapper(timeout=GATEWAY_TIMEOUT) as mapper:
            detection = await mapper.detect()
    except (NoGatewayError, PortMapError) as exc:
        return GatewayDone(None, (), str(exc), loop.time())
    answered = [p for p in detection.probes if p.answered]
    order = {name: i for i, name in enumerate(PORT_MAPPING_PROTOCOLS)}
    names = tuple(sorted((p.protocol.value for p in answered), key=lambda n: order.get(n, 9)))
    external = tuple(str(p.external_address) for p in answered if p.external_address)
    detail = "; ".join(p.detail for p in detection.probes)
    return GatewayDone(names, external, f"gateway {detection.gateway}: {detail}", loop.time())


class _Run:
    """One measurement: the machine, its sockets and its tasks."""

    def __init__(self, machine: DoctorMachine, tg: asyncio.TaskGroup, listener: socket.socket,
                 ports: tuple[int, int], deadline: float, gateway: GatewayDetector) -> None:
        self.machine = machine
        self.tg = tg
        self.listener = listener
        self.ports = ports
        self.deadline = deadline
        self.gateway = gateway
        self.loop = asyncio.get_running_loop()
        self.done = asyncio.Event()
        self.nonce = os.urandom(NONCE_SIZE)
        self.hairpin_arrived = asyncio.Event()
        self.tasks: set[asyncio.Task[None]] = set()
        # Every probe socket, closed at the end too: a task cancelled before it ran
        # never reaches its own ``finally``.
        self.sockets: list[socket.socket] = []

    # -- machine plumbing -------------------------------------------------------------

    def feed(self, event: Event) -> None:
        self.act(self.machine.handle(event))

    def act(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Discover | Check):
                self._start_probe(action)
            elif isinstance(action, Hairpin):
                self.spawn(self._hairpin(action), "doctor-hairpin")
            elif isinstance(action, DetectGateway):
                self.spawn(self._gateway(), "doctor-gateway")
            elif isinstance(action, ResolveIPv6):
                self.spawn(self._resolve(action), "doctor-resolve-ipv6")
        if self.machine.done:
            self.done.set()

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = self.tg.create_task(coro, name=name)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def cancel_all(self) -> None:
        for task in list(self.tasks):
            task.cancel()

    def close_sockets(self) -> None:
        for sock in self.sockets:
            sock.close()

    # -- probes -----------------------------------------------------------------------

    def _start_probe(self, action: Discover | Check) -> None:
        """Bind and send the SYN now (in the machine's order), then wait in a task."""
        target = action.target
        v6 = ":" in target.host
        try:
            if v6:
                sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
                sock.setblocking(False)
            else:
                port = self.ports[action.slot] if action.slot is not None else 0
                sock = reusable_socket("0.0.0.0", port)
        except OSError as exc:
            self.feed(Failed(action.probe, f"cannot open a socket: {describe_os_error(exc)}",
                             self.loop.time()))
            return
        self.sockets.append(sock)
        started = self.loop.time()
        try:
            start_connect(sock, (target.host, target.port))
        except OSError as exc:
            sock.close()
            self.feed(Failed(action.probe, describe_os_error(exc), self.loop.time()))
            return
        kind = "discover" if isinstance(action, Discover) else "check"
        self.spawn(self._probe(action, sock, started), f"doctor-{kind}-{action.probe}")

    async def _probe(self, action: Discover | Check, sock: socket.socket,
                     started: float) -> None:
        try:
            try:
                await wait_connected(sock)
            except OSError as exc:
                self.feed(Failed(action.probe, describe_os_error(exc), self.loop.time()))
                return
            rtt = self.loop.time() - started
            host, port = sock.getsockname()[:2]
            local = Endpoint(str(host), int(port))
            if isinstance(action, Discover):
                await self._discover(action, sock, local, rtt)
            else:
                await self._check(action, sock, local, rtt)
        finally:
            sock.close()

    async def _discover(self, action: Discover, sock: socket.socket, local: Endpoint,
                        rtt: float) -> None:
        reader = DiscoveryReader()
        while True:
            try:
                chunk = await self.loop.sock_recv(sock, reader.needed)
            except OSError as exc:
                self.feed(Failed(action.probe, describe_os_error(exc), self.loop.time(),
                                 connect=False))
                return
            if not chunk:
                self.feed(Failed(action.probe, "closed without an address (is it a "
                                 "nopf-server?)", self.loop.time(), connect=False))
                return
            try:
                result = reader.feed(chunk)
            except WireError as exc:
                self.feed(Failed(action.probe, f"sent no discovery reply ({exc})",
                                 self.loop.time(), connect=False))
                return
            if result is not None:
                self.feed(Observed(action.probe, local, Endpoint(*result), self.loop.time(),
                                   rtt))
                return

    async def _check(self, action: Check, sock: socket.socket, local: Endpoint,
                     rtt: float) -> None:
        wait_ms = round(dial_wait(rtt) * 1000)
        try:
            await self.loop.sock_sendall(sock, encode(CheckMessage(action.dial_back, wait_ms)))
        except OSError as exc:
            self.feed(Failed(action.probe, describe_os_error(exc), self.loop.time(), connect=False))
            return
        reader = FrameReader()
        seen = False
        while True:
            try:
                chunk = await self.loop.sock_recv(sock, 4096)
            except OSError as exc:
                chunk, error = b"", describe_os_error(exc)
            else:
                error = "closed"
            if not chunk:
                why = f"{error} before " + ("the dial-back result" if seen else "answering")
                if seen:
                    self.feed(DialedBack(None, self.loop.time(), reason=why))
                else:
                    self.feed(Failed(action.probe, why, self.loop.time(), connect=False))
                return
            try:
                messages = [decode_responder_message(f) for f in reader.feed(chunk)]
            except (DoctorMessageError, WireError) as exc:
                why = f"not a NAT doctor ({exc})"
                if seen:
                    self.feed(DialedBack(None, self.loop.time(), reason=why))
                else:
                    self.feed(Failed(action.probe, why, self.loop.time(), connect=False))
                return
            for msg in messages:
                if isinstance(msg, Seen) and not seen:
                    seen = True
                    self.feed(Observed(action.probe, local, msg.public, self.loop.time(), rtt,
                                       msg.others))
                    if not action.dial_back:
                        return
                elif isinstance(msg, DialBack) and seen:
                    self.feed(DialedBack(msg.outcome, self.loop.time(), msg.icmp))
                    return
                elif isinstance(msg, DoctorError):
                    why = f"the NAT doctor refused: {msg.message}"
                    if msg.retry_in is not None:
                        why += f" (try again in {msg.retry_in:.0f} s)"
                    if seen:
                        self.feed(DialedBack(None, self.loop.time(), reason=why))
                    else:
                        self.feed(Failed(action.probe, why, self.loop.time(), connect=False))
                    return

    # -- the listener and the hairpin -------------------------------------------------

    async def accept_loop(self) -> None:
        """Take every connection to P: the dial-back (nothing to read) and our hairpin."""
        while True:
            conn, _addr = await self.loop.sock_accept(self.listener)
            self.spawn(self._inbound(conn), "doctor-inbound")

    async def _inbound(self, conn: socket.socket) -> None:
        try:
            conn.setblocking(False)
            data = b""
            async with asyncio.timeout(HAIRPIN_WAIT):
                while len(data) < NONCE_SIZE:
                    chunk = await self.loop.sock_recv(conn, NONCE_SIZE - len(data))
                    if not chunk:
                        return
                    data += chunk
            if data == self.nonce:
                self.hairpin_arrived.set()
        except (OSError, TimeoutError):
            return
        finally:
            conn.close()

    async def _hairpin(self, action: Hairpin) -> None:
        target = (action.target.host, action.target.port)
        where = str(action.target)
        limit = max(0.0, min(HAIRPIN_WAIT, self.deadline - self.loop.time()))
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            try:
                async with asyncio.timeout(limit):
                    start_connect(sock, target)
                    await wait_connected(sock)
                    await self.loop.sock_sendall(sock, self.nonce)
                    await self.hairpin_arrived.wait()
            except TimeoutError:
                connected = _connected(sock)
                detail = (f"connected to {where}, but it was not this machine" if connected
                          else f"no answer from {where} within {limit * 1000:.0f} ms")
                self.feed(HairpinDone(False, detail, self.loop.time()))
                return
            except OSError as exc:
                self.feed(HairpinDone(False, f"{where}: {describe_os_error(exc)}",
                                      self.loop.time()))
                return
            self.feed(HairpinDone(True, f"reached this machine through {where}",
                                  self.loop.time()))
        finally:
            sock.close()

    # -- the gateway and DNS ----------------------------------------------------------

    async def _gateway(self) -> None:
        self.feed(await self.gateway())

    async def _resolve(self, action: ResolveIPv6) -> None:
        try:
            infos = await self.loop.getaddrinfo(action.host, None, family=socket.AF_INET6,
                                                type=socket.SOCK_STREAM)
        except OSError as exc:  # socket.gaierror included
            self.feed(Resolved((), self.loop.time(), f"no IPv6 address for {action.host}: "
                               f"{exc.strerror or exc}"))
            return
        addresses = []
        for info in infos:
            ip = ipaddress.IPv6Address(str(info[4][0]).split("%")[0])
            if ip.ipv4_mapped is None and str(ip) not in addresses:
                addresses.append(str(ip))
        self.feed(Resolved(tuple(addresses), self.loop.time()))


def _connected(sock: socket.socket) -> bool:
    try:
        sock.getpeername()
    except OSError:
        return False
    return True


def _is_ipv4(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True


async def run_doctor(rendezvous: Endpoint, *, doctor_port: int | None = None,
                     budget: float = DEFAULT_BUDGET,
                     gateway: GatewayDetector | None = detect_gateway) -> DoctorReport:
    """Measure this machine's NAT against ``rendezvous`` (its doctor on ``doctor_port``,
    by default the rendezvous port + 1). ``gateway`` None: skip port-mapping detection."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = started + budget
    if ":" in rendezvous.host:  # an IPv6 literal (the dashboard's rendezvous setting)
        raise RendezvousUnreachable(f"rendezvous {rendezvous} is an IPv6 address: "
                                    f"{DOCTOR_IPV4_ONLY}")
    ip, port = await resolve_ipv4(rendezvous, budget)
    label = str(rendezvous)
    machine = DoctorMachine(
        Endpoint(ip, port), doctor_port if doctor_port is not None else port + DEFAULT_PORT_OFFSET,
        name=None if _is_ipv4(rendezvous.host) else rendezvous.host, label=label, now=started,
        gateway=gateway is not None)
    with contextlib.ExitStack() as sockets:
        try:
            listener = sockets.enter_context(reusable_socket("0.0.0.0", 0))
            listener.listen(16)
            second = sockets.enter_context(reusable_socket("0.0.0.0", 0))  # holds P2
        except OSError as exc:
            raise RendezvousUnreachable(
                f"cannot open local sockets: {describe_os_error(exc)}") from None
        ports = (int(listener.getsockname()[1]), int(second.getsockname()[1]))

        async def no_gateway() -> GatewayDone:
            return GatewayDone(None, (), "not asked", loop.time())

        async with asyncio.TaskGroup() as tg:
            run = _Run(machine, tg, listener, ports, deadline, gateway or no_gateway)
            sockets.callback(run.close_sockets)
            run.spawn(run.accept_loop(), "doctor-listen")
            run.act(machine.start())
            try:
                async with asyncio.timeout_at(deadline):
                    await run.done.wait()
            except TimeoutError:
                machine.expire(loop.time())
            finally:
                run.cancel_all()
    if machine.unreachable is not None:
        raise RendezvousUnreachable(f"rendezvous {label}: {machine.unreachable}")
    report = machine.report(loop.time(), time.time())
    if report.public_address is None:
        raise RendezvousUnreachable(f"rendezvous {label} did not answer within {budget:g} s")
    return report
