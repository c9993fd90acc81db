"""Ask the home gateway to open a TCP port: NAT-PMP, PCP and UPnP-IGD raced.

::

    async with PortMapper() as mapper:          # gateway: the default route's
        mapping = await mapper.map_tcp(5000, lifetime=7200)
        if mapping is None:
            print("\\n".join(mapper.reasons))     # one line per protocol
        elif usable(mapping, public_ip_seen_by_rendezvous):
            ...                                   # mapper renews it until exit
    # on exit (normal, exception or cancellation) the mapping is deleted

The three protocols start together against the gateway. The first grant wins
within ``timeout`` (250 ms for a silent gateway). Losers that had not yet asked
for a mapping are cancelled. Losers that were granted one too keep it only when it is
the winner's own entry (same external address and port: gateways such as
miniupnpd share one table between the protocols); any other is deleted at
once. The winner is renewed at half its lifetime by a named task of the
mapper's TaskGroup, and deleted on exit within ``delete_timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import random
import secrets
import socket
import subprocess
import sys
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass, replace
from ipaddress import IPv4Address
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import aiohttp

from nopf_web.portmap import natpmp_machine as natpmp, pcp_machine as pcp, upnp
from nopf_web.portmap.errors import AlreadyMappedError, AttemptFailed, NoGatewayError
from nopf_web.portmap.exchange_machine import (
    Epoch,
    Granted,
    NoAnswer,
    Outcome,
    Refused,
    Unsupported,
)
from nopf_web.wire.rendezvous import CGNAT, mapped_unusable

log = logging.getLogger(__name__)

RTF_UP, RTF_GATEWAY = 0x1, 0x2  # route flags in /proc/net/route


class MapProtocol(enum.Enum):
    NATPMP = "NAT-PMP"
    PCP = "PCP"
    UPNP = "UPnP-IGD"


@dataclass(frozen=True)
class Mapping:
    """A TCP port the gateway forwards to us. ``expires_at`` is on the event loop's clock."""

    protocol: MapProtocol
    external_address: IPv4Address
    external_port: int
    internal_port: int
    lifetime: int
    expires_at: float
    internal_address: IPv4Address

    def __str__(self) -> str:
        return (f"TCP {self.external_address}:{self.external_port} -> "
                f"{self.internal_address}:{self.internal_port} via {self.protocol.value}, "
                f"lifetime {self.lifetime} s")


@dataclass(frozen=True)
class Probe:
    """Does one protocol answer on the gateway? ``detail`` is one line."""

    protocol: MapProtocol
    answered: bool
    external_address: IPv4Address | None
    detail: str


@dataclass(frozen=True)
class Detection:
    gateway: IPv4Address
    probes: tuple[Probe, ...]

    @property
    def answering(self) -> tuple[MapProtocol, ...]:
        return tuple(p.protocol for p in self.probes if p.answered)


def is_cgnat(address: IPv4Address | str) -> bool:
    """In 100.64.0.0/10, the carrier-grade NAT range (RFC 6598)."""
    return IPv4Address(address) in CGNAT


def unusable_reason(mapping: Mapping, public_ip_seen_by_rendezvous: IPv4Address | str) \
        -> str | None:
    """Why peers could not reach the mapping, or None if they can.

    The gateway's external address must be the one the rendezvous sees: if it
    differs (a CGNAT or second NAT in front of the gateway, or a gateway that
    lies), the mapping opens a port on an address nobody outside can reach.
    (:func:`nopf_web.wire.rendezvous.mapped_unusable`, the rule the peers apply.)
    """
    return mapped_unusable(str(mapping.external_address),
                           str(IPv4Address(public_ip_seen_by_rendezvous)))


def usable(mapping: Mapping, public_ip_seen_by_rendezvous: IPv4Address | str) -> bool:
    """True when the mapping's external address is our public address (see unusable_reason)."""
    return unusable_reason(mapping, public_ip_seen_by_rendezvous) is None


def default_gateway(route_table: Path | None = None) -> IPv4Address:
    """The IPv4 default gateway from the kernel's routing table (lowest metric).

    Linux: reads ``/proc/thread-self/net/route`` (or ``route_table``): it follows
    this thread's network namespace, where ``/proc/net`` follows the main
    thread's. macOS and Windows have no such file: the system's ``route``
    command answers instead (:func:`gateway_from_route_command`; it blocks for
    a few ms, so async callers run it in a thread there).
    """
    if route_table is None and not sys.platform.startswith("linux"):
        return gateway_from_route_command()
    paths = [route_table] if route_table else [Path("/proc/thread-self/net/route"),
                                               Path("/proc/net/route")]
    for path in paths:
        try:
            lines = path.read_text().splitlines()[1:]
        except OSError:
            continue
        best: tuple[int, IPv4Address] | None = None
        for line in lines:
            cols = line.split()
            if len(cols) < 8:
                continue
            destination, gateway, flags, metric, mask = cols[1], cols[2], cols[3], cols[6], cols[7]
            try:
                if int(destination, 16) or int(mask, 16):
                    continue
                if int(flags, 16) & (RTF_UP | RTF_GATEWAY) != RTF_UP | RTF_GATEWAY:
                    continue
                address = IPv4Address(int(gateway, 16).to_bytes(4, "little"))
                rank = int(metric)
            except ValueError:
                continue
            if best is None or rank < best[0]:
                best = (rank, address)
        if best is not None:
            return best[1]
        break
    raise NoGatewayError("no IPv4 default gateway in the routing table")


# The route lookups of systems without /proc/net/route. Their output is parsed for
# numbers only (labels may be translated on Windows).
ROUTE_TIMEOUT = 3.0  # s for the route command to answer


def route_command(platform: str | None = None) -> list[str] | None:
    """The command that prints the IPv4 default route here (None: none known)."""
    name = sys.platform if platform is None else platform
    if name == "darwin":
        return ["/sbin/route", "-n", "get", "default"]
    if name == "win32":
        system = os.environ.get("SYSTEMROOT", r"C:\Windows")
        return [rf"{system}\System32\route.exe", "print", "-4", "0.0.0.0"]
    return None


def _ipv4(text: str) -> IPv4Address | None:
    try:
        return IPv4Address(text)
    except ValueError:
        return None


def parse_route_get(text: str) -> IPv4Address | None:
    """macOS ``route -n get default``: its ``gateway:`` line, if an IPv4 address
    (a VPN's default route may name an interface instead)."""
    for line in text.splitlines():
        key, sep, value = line.strip().partition(":")
        if sep and key.strip() == "gateway":
            return _ipv4(value.strip())
    return None


def parse_route_print(text: str) -> IPv4Address | None:
    """Windows ``route print -4 0.0.0.0``: the active default route of lowest metric.

    Active routes are five columns (destination, netmask, gateway, interface,
    metric); the persistent ones, listed after, have four and are skipped, as is
    an ``On-link`` gateway.
    """
    best: tuple[int, IPv4Address] | None = None
    for line in text.splitlines():
        cols = line.split()
        if len(cols) != 5 or cols[0] != "0.0.0.0" or cols[1] != "0.0.0.0":
            continue
        gateway, interface = _ipv4(cols[2]), _ipv4(cols[3])
        if gateway is None or interface is None or not cols[4].isdigit():
            continue
        if best is None or int(cols[4]) < best[0]:
            best = (int(cols[4]), gateway)
    return None if best is None else best[1]


def gateway_from_route_command(platform: str | None = None) -> IPv4Address:
    """The default gateway as macOS' or Windows' ``route`` command prints it."""
    name = sys.platform if platform is None else platform
    argv = route_command(name)
    if argv is None:
        raise NoGatewayError(f"cannot look up the default gateway on {name}: give the "
                             "gateway's address")
    shown = " ".join(["route", *argv[1:]])
    try:
        done = subprocess.run(argv, capture_output=True, encoding="ascii", errors="replace",
                              timeout=ROUTE_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NoGatewayError(f"cannot ask `{shown}` for the default gateway ({exc})") from None
    found = (parse_route_print if name == "win32" else parse_route_get)(done.stdout)
    if found is None:
        raise NoGatewayError(f"no IPv4 default gateway in the output of `{shown}`")
    return found


def local_address_towards(gateway: IPv4Address) -> IPv4Address:
    """Our source address towards the gateway (a UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect((str(gateway), natpmp.SERVER_PORT))
        except OSError as exc:
            raise NoGatewayError(f"no route to the gateway {gateway}: {exc.strerror}") from exc
        return IPv4Address(sock.getsockname()[0])


# --------------------------------------------------------------------------- UDP driver


class _Machine(Protocol):
    outcome: Outcome | None

    @property
    def wake_at(self) -> float | None: ...

    def start(self, now: float) -> list[bytes]: ...

    def receive(self, data: bytes, now: float) -> list[bytes]: ...

    def timer(self, now: float) -> list[bytes]: ...


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes | OSError] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self.queue.put_nowait(data)

    def error_received(self, exc: Exception) -> None:
        if isinstance(exc, OSError):
            self.queue.put_nowait(exc)


async def _drive(machine: _Machine, gateway: IPv4Address, local: IPv4Address) -> Outcome:
    """Run a NAT-PMP/PCP machine on a UDP socket connected to the gateway's 5351.

    Connected: the kernel drops datagrams from anyone else (RFC 6886 §3.2) and
    reports an ICMP port unreachable, which ends the attempt at once (§3.1).
    """
    loop = asyncio.get_running_loop()
    try:
        transport, channel = await loop.create_datagram_endpoint(
            _Datagrams, local_addr=(str(local), 0),
            remote_addr=(str(gateway), natpmp.SERVER_PORT))
    except OSError as exc:
        raise AttemptFailed(f"cannot open a UDP socket to {gateway}: {exc.strerror}") from exc
    try:
        for data in machine.start(loop.time()):
            transport.sendto(data)
        while machine.outcome is None:
            wake = machine.wake_at
            if wake is None:
                raise AssertionError("a machine without outcome must have a timer")
            try:
                async with asyncio.timeout_at(wake):
                    item = await channel.queue.get()
            except TimeoutError:
                out = machine.timer(loop.time())
            else:
                # Windows reports a UDP port unreachable as WSAECONNRESET, not ECONNREFUSED.
                if isinstance(item, ConnectionRefusedError | ConnectionResetError):
                    raise AttemptFailed(
                        f"{gateway} refused (ICMP port unreachable on {natpmp.SERVER_PORT})")
                if isinstance(item, OSError):
                    raise AttemptFailed(f"UDP to {gateway}: {item.strerror or item}")
                out = machine.receive(item, loop.time())
            for data in out:
                transport.sendto(data)
        return machine.outcome
    finally:
        transport.close()


def _failure_text(outcome: Outcome, gateway: IPv4Address) -> str:
    if isinstance(outcome, NoAnswer):
        text = f"no answer from {gateway} within {outcome.waited * 1000:.0f} ms"
        if outcome.ignored:
            text += f" ({len(outcome.ignored)} invalid datagrams ignored: {outcome.ignored[-1]})"
        return text
    if isinstance(outcome, Refused):
        return f"{gateway} refused: {outcome.name} ({outcome.code})"
    if isinstance(outcome, Unsupported):
        return outcome.detail
    return "granted"


# --------------------------------------------------------------------------- attempts


@dataclass(frozen=True)
class _Grant:
    external_address: IPv4Address
    external_port: int
    lifetime: int


class _Attempt:
    """One protocol's way to map, renew and delete one internal port."""

    protocol: MapProtocol

    def __init__(self, mapper: PortMapper, internal_port: int) -> None:
        self.mapper = mapper
        self.internal_port = internal_port

    @property
    def committed(self) -> bool:
        """True once a request that may create a mapping has left."""
        raise NotImplementedError

    async def map(self, lifetime: int, suggested_port: int, budget: float) -> _Grant:
        raise NotImplementedError

    async def delete(self, external_port: int) -> None:
        raise NotImplementedError

    async def detect(self) -> Probe:
        raise NotImplementedError

    async def map_tidily(self, lifetime: int, suggested_port: int, budget: float) -> _Grant:
        """map(), but a cancellation after the request left deletes what it may have made."""
        try:
            return await self.map(lifetime, suggested_port, budget)
        except asyncio.CancelledError:
            if self.committed:
                self.mapper._cleaning()
                with contextlib.suppress(AttemptFailed):
                    await self.delete(suggested_port)
            raise


class _UdpAttempt(_Attempt):
    """NAT-PMP or PCP: a sans-IO machine per exchange, driven over UDP to the gateway."""

    def __init__(self, mapper: PortMapper, internal_port: int, epoch: Epoch) -> None:
        super().__init__(mapper, internal_port)
        self.epoch = epoch

    async def _granted(self, machine: _Machine, *, deleting: bool = False) -> Granted:
        """Drive ``machine``: its grant, or AttemptFailed saying why there is none.
        A mapping's epoch is checked (a gateway that lost its state is logged)."""
        m = self.mapper
        outcome = await _drive(machine, m.gateway, m.local_address)
        if not isinstance(outcome, Granted):
            raise AttemptFailed(f"{'delete: ' if deleting else ''}"
                                f"{_failure_text(outcome, m.gateway)}")
        if not deleting and self.epoch.observe(outcome.epoch, asyncio.get_running_loop().time()):
            log.info("%s: %s lost its mapping state (epoch %d)", self.protocol.value, m.gateway,
                     outcome.epoch)
        return outcome

    async def _probe(self, machine: _Machine) -> Probe:
        """Drive a detection ``machine``: a gateway that refuses speaks the protocol too."""
        m = self.mapper
        try:
            outcome = await _drive(machine, m.gateway, m.local_address)
        except AttemptFailed as exc:
            return Probe(self.protocol, False, None, f"{self.protocol.value}: {exc}")
        if isinstance(outcome, Granted):
            return self._answered(outcome)
        answered = isinstance(outcome, Refused)  # it speaks the protocol, but says no
        return Probe(self.protocol, answered, None,
                     f"{self.protocol.value}: {_failure_text(outcome, m.gateway)}")

    def _answered(self, outcome: Granted) -> Probe:
        raise NotImplementedError


class _NatPmpAttempt(_UdpAttempt):
    protocol = MapProtocol.NATPMP

    def __init__(self, mapper: PortMapper, internal_port: int) -> None:
        super().__init__(mapper, internal_port, natpmp.Epoch())
        self._machine: natpmp.NatPmpMapping | None = None

    @property
    def committed(self) -> bool:
        return self._machine is not None and self._machine.mapping_requested

    async def map(self, lifetime: int, suggested_port: int, budget: float) -> _Grant:
        self._machine = machine = natpmp.NatPmpMapping(
            self.internal_port, lifetime, suggested_external_port=suggested_port,
            give_up_after=budget)
        outcome = await self._granted(machine)
        if outcome.external_address is None or outcome.lifetime == 0:
            raise AttemptFailed(f"{self.mapper.gateway} granted no lifetime or address")
        return _Grant(outcome.external_address, outcome.external_port, outcome.lifetime)

    async def delete(self, external_port: int) -> None:
        await self._granted(natpmp.NatPmpMapping(
            self.internal_port, 0, give_up_after=self.mapper.delete_timeout), deleting=True)

    async def detect(self) -> Probe:
        return await self._probe(natpmp.NatPmpExternalAddress(give_up_after=self.mapper.timeout))

    def _answered(self, outcome: Granted) -> Probe:
        return Probe(self.protocol, True, outcome.external_address,
                     f"{self.protocol.value}: external address {outcome.external_address}")


class _PcpAttempt(_UdpAttempt):
    protocol = MapProtocol.PCP

    def __init__(self, mapper: PortMapper, internal_port: int) -> None:
        super().__init__(mapper, internal_port, pcp.Epoch())
        self.nonce = secrets.token_bytes(pcp.NONCE_SIZE)  # §11.1: random, kept for renewals
        self._started = False
        self._last: _Grant | None = None

    @property
    def committed(self) -> bool:
        return self._started

    def _machine(self, lifetime: int, suggested_port: int, budget: float) -> pcp.PcpMapping:
        m = self.mapper
        return pcp.PcpMapping(
            client_address=m.local_address, internal_port=self.internal_port,
            lifetime=lifetime, nonce=self.nonce, rand=m.rng.random,
            suggested_external_port=suggested_port,
            suggested_external_address=self._last.external_address if self._last else None,
            give_up_after=budget)

    async def map(self, lifetime: int, suggested_port: int, budget: float) -> _Grant:
        machine = self._machine(lifetime, suggested_port, budget)
        self._started = True
        outcome = await self._granted(machine)
        gateway = self.mapper.gateway
        if outcome.external_address is None:
            raise AttemptFailed(f"{gateway} assigned an IPv6 external address to IPv4")
        if outcome.lifetime == 0:
            raise AttemptFailed(f"{gateway} granted a lifetime of 0")
        self._last = _Grant(outcome.external_address, outcome.external_port, outcome.lifetime)
        return self._last

    async def delete(self, external_port: int) -> None:
        await self._granted(self._machine(0, external_port, self.mapper.delete_timeout),
                            deleting=True)

    async def detect(self) -> Probe:
        m = self.mapper
        return await self._probe(pcp.PcpAnnounce(client_address=m.local_address,
                                                 rand=m.rng.random, give_up_after=m.timeout))

    def _answered(self, outcome: Granted) -> Probe:
        return Probe(self.protocol, True, None,
                     f"{self.protocol.value}: server answers (epoch {outcome.epoch})")


class _UpnpAttempt(_Attempt):
    protocol = MapProtocol.UPNP

    def __init__(self, mapper: PortMapper, internal_port: int) -> None:
        super().__init__(mapper, internal_port)
        self._igd: upnp.Igd | None = None
        self._committed = False

    @property
    def committed(self) -> bool:
        return self._committed

    async def _find(self, budget: float) -> upnp.Igd:
        if self._igd is None:
            m = self.mapper
            location = await upnp.search(m.gateway, m.local_address, budget)
            self._igd = await upnp.describe(location, m.session, m.step_timeout)
        return self._igd

    async def map(self, lifetime: int, suggested_port: int, budget: float) -> _Grant:
        m = self.mapper
        igd = await self._find(budget)
        address = await igd.external_address()
        self._committed = True
        port = await igd.map_tcp(m.local_address, self.internal_port, suggested_port,
                                 lifetime, m.description, m.rng)
        return _Grant(address, port, lifetime)

    async def delete(self, external_port: int) -> None:
        if self._igd is None:
            return
        # delete_timeout bounds the whole call (the IGD's own step timeout may be longer)
        try:
            async with asyncio.timeout(self.mapper.delete_timeout):
                await self._igd.delete_tcp(external_port)
        except TimeoutError:
            raise AttemptFailed(
                f"DeletePortMapping: no answer within {self.mapper.delete_timeout:g} s") \
                from None

    async def detect(self) -> Probe:
        try:
            igd = await self._find(self.mapper.timeout)
            address = await igd.external_address()
        except AttemptFailed as exc:
            return Probe(self.protocol, False, None, f"{self.protocol.value}: {exc}")
        return Probe(self.protocol, True, address,
                     f"{self.protocol.value}: {igd.service_type.rsplit(':', 2)[-2]} at "
                     f"{igd.location}, external address {address}")


_ATTEMPTS: dict[MapProtocol, type[_Attempt]] = {
    MapProtocol.NATPMP: _NatPmpAttempt,
    MapProtocol.PCP: _PcpAttempt,
    MapProtocol.UPNP: _UpnpAttempt,
}


# --------------------------------------------------------------------------- the mapper


class PortMapper:
    """Maps one TCP port on the gateway and keeps it until the ``async with`` ends.

    ``gateway`` defaults to the default route's; ``protocols`` to all three.
    ``timeout`` bounds the race against a silent gateway; ``step_timeout`` each
    HTTP step of UPnP once the gateway answered SSDP; ``renew_timeout`` one
    renewal; ``delete_timeout`` the deletion (RFC 6886 §3.1: deletion is
    advisory, one or two tries are enough).
    """

    def __init__(
        self,
        gateway: IPv4Address | str | None = None,
        *,
        local_address: IPv4Address | str | None = None,
        protocols: Iterable[MapProtocol] = tuple(MapProtocol),
        timeout: float = 0.25,
        step_timeout: float = 1.0,
        renew_timeout: float = 2.0,
        delete_timeout: float = 0.5,
        description: str = "nopf",
        rng: random.Random | None = None,
    ) -> None:
        self._gateway = IPv4Address(gateway) if gateway is not None else None
        self._local = IPv4Address(local_address) if local_address is not None else None
        self.protocols = tuple(protocols)
        self.timeout = timeout
        self.step_timeout = step_timeout
        self.renew_timeout = renew_timeout
        self.delete_timeout = delete_timeout
        self.description = description
        self.rng = rng or random.Random()
        self._session: aiohttp.ClientSession | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._cleanup: set[asyncio.Task[None]] = set()  # deleting: not to be cancelled
        self._mapping: Mapping | None = None
        self._winner: _Attempt | None = None
        self._reasons: dict[MapProtocol, str] = {}
        self._lost = asyncio.Event()
        self.lost_reason: str | None = None
        self.delete_error: str | None = None
        self.renewals = 0

    # ------------------------------------------------------------------ properties

    @property
    def gateway(self) -> IPv4Address:
        if self._gateway is None:
            raise RuntimeError("use PortMapper in `async with`")
        return self._gateway

    @property
    def local_address(self) -> IPv4Address:
        if self._local is None:
            raise RuntimeError("use PortMapper in `async with`")
        return self._local

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("use PortMapper in `async with`")
        return self._session

    @property
    def mapping(self) -> Mapping | None:
        """The current mapping (renewals replace it), None before, after loss or deletion."""
        return self._mapping

    @property
    def reasons(self) -> tuple[str, ...]:
        """One line per protocol that did not give the mapping, in protocol order."""
        return tuple(self._reasons[p] for p in self.protocols if p in self._reasons)

    async def wait_lost(self) -> str:
        """Wait until the mapping is lost (renewals failed until it expired); the reason."""
        await self._lost.wait()
        return self.lost_reason or "lost"

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> PortMapper:
        if self._gateway is None:
            # Linux reads this thread's /proc (its network namespace's); elsewhere a
            # route command runs, off the event loop.
            self._gateway = (default_gateway() if sys.platform.startswith("linux")
                             else await asyncio.to_thread(default_gateway))
        if self._local is None:
            self._local = local_address_towards(self._gateway)
        self._session = aiohttp.ClientSession()
        self._tg = asyncio.TaskGroup()
        await self._tg.__aenter__()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        # Our own tasks (renewal, race leftovers) stop first, except those deleting
        # what a race loser may have made (bounded by delete_timeout); the caller's
        # exception, cancellation included, propagates unchanged once the mapping
        # is deleted.
        try:
            for task in self._tasks - self._cleanup:
                task.cancel()
            if self._tg is not None:
                await self._tg.__aexit__(None, None, None)
        finally:
            try:
                await self._delete_current()
            finally:
                if self._session is not None:
                    await self._session.close()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        if self._tg is None:
            raise RuntimeError("use PortMapper in `async with`")
        task = self._tg.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(self._cleanup.discard)
        return task

    def _cleaning(self) -> None:
        """The current task now deletes a mapping: exit must wait for it, not cancel it."""
        task = asyncio.current_task()
        if task in self._tasks:
            self._cleanup.add(task)

    # ------------------------------------------------------------------ mapping

    async def map_tcp(self, internal_port: int, lifetime: int = natpmp.RECOMMENDED_LIFETIME) \
            -> Mapping | None:
        """Race the protocols for a mapping of ``internal_port``; None if none gave one
        (``reasons`` then says why, one line per protocol)."""
        if self._mapping is not None:
            raise AlreadyMappedError(f"already mapped: {self._mapping}")
        if not 0 < internal_port < 65536:
            raise ValueError(f"internal port out of range: {internal_port}")
        if lifetime <= 0:
            raise ValueError("lifetime must be positive (0 would delete)")
        self._reasons = {}
        self.lost_reason = None
        self._lost.clear()
        race = _Race(self, internal_port, lifetime)
        await race.run()
        if race.winner is None:
            return None
        attempt, grant, at = race.winner
        self._winner = attempt
        self._mapping = Mapping(attempt.protocol, grant.external_address, grant.external_port,
                                internal_port, grant.lifetime, at + grant.lifetime,
                                self.local_address)
        self._spawn(self._renew(attempt, lifetime),
                    name=f"portmap-renew-{attempt.protocol.value}-{internal_port}")
        return self._mapping

    async def unmap(self) -> None:
        """Stop renewing and delete the mapping now (exit does it too)."""
        renewals = [t for t in self._tasks if t.get_name().startswith("portmap-renew-")]
        for task in renewals:
            task.cancel()
        if renewals:
            await asyncio.wait(renewals, timeout=self.delete_timeout + self.renew_timeout)
        await self._delete_current()

    async def _renew(self, attempt: _Attempt, lifetime: int) -> None:
        """Renew at half the lifetime (RFC 6886 §3.3, RFC 6887 §11.2.1); after a
        failure, again at half the time left, until the mapping expires."""
        loop = asyncio.get_running_loop()
        current = self._mapping
        assert current is not None
        next_try = current.expires_at - current.lifetime / 2
        while True:
            await asyncio.sleep(max(0.0, next_try - loop.time()))
            current = self._mapping
            assert current is not None
            try:
                grant = await attempt.map(lifetime, current.external_port,
                                          min(self.renew_timeout, current.lifetime / 4))
            except AttemptFailed as exc:
                now = loop.time()
                left = current.expires_at - now
                if left <= 1.0:
                    self._mapping = None
                    self.lost_reason = (f"{attempt.protocol.value}: mapping expired, "
                                        f"renewal failed: {exc}")
                    self._lost.set()
                    return
                log.info("%s renewal failed (%s); retrying", attempt.protocol.value, exc)
                next_try = now + left / 2
                continue
            now = loop.time()
            self.renewals += 1
            self._mapping = replace(current, external_address=grant.external_address,
                                    external_port=grant.external_port,
                                    lifetime=grant.lifetime, expires_at=now + grant.lifetime)
            next_try = now + grant.lifetime / 2

    async def _delete_current(self) -> None:
        mapping, attempt = self._mapping, self._winner
        self._mapping = None
        self._winner = None
        if mapping is None or attempt is None:
            return
        try:
            await attempt.delete(mapping.external_port)
        except AttemptFailed as exc:
            self.delete_error = f"{attempt.protocol.value}: {exc}"
            log.warning("could not delete %s: %s", mapping, exc)

    # ------------------------------------------------------------------ detection

    async def detect(self) -> Detection:
        """Which protocols answer on the gateway (no mapping made), within ``timeout``
        per protocol plus UPnP's HTTP steps."""
        attempts = [_ATTEMPTS[p](self, 0) for p in self.protocols]
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(a.detect(), name=f"portmap-detect-{a.protocol.value}")
                     for a in attempts]
        return Detection(self.gateway, tuple(t.result() for t in tasks))


class _Race:
    """map_tcp's race: every protocol at once, the first grant wins."""

    def __init__(self, mapper: PortMapper, internal_port: int, lifetime: int) -> None:
        self.mapper = mapper
        self.internal_port = internal_port
        self.lifetime = lifetime
        self.attempts = [_ATTEMPTS[p](mapper, internal_port) for p in mapper.protocols]
        self.tasks: dict[MapProtocol, asyncio.Task[None]] = {}
        self.winner: tuple[_Attempt, _Grant, float] | None = None
        self.finished = 0
        self.decided = asyncio.Event()
        self.unanswered: list[_Attempt] = []  # failed after a mapping request left

    async def run(self) -> None:
        m = self.mapper
        for attempt in self.attempts:
            self.tasks[attempt.protocol] = m._spawn(
                self._one(attempt),
                name=f"portmap-{attempt.protocol.value}-{self.internal_port}")
        if not self.attempts:
            return
        # each attempt is bounded (timeout, then at most 3 HTTP steps for UPnP);
        # this outer bound only guards against a bug
        bound = m.timeout + 4 * m.step_timeout + 1.0
        try:
            async with asyncio.timeout(bound):
                await self.decided.wait()
        except TimeoutError:
            raise AssertionError(f"port mapping race undecided after {bound:g} s") from None
        except asyncio.CancelledError:
            # map_tcp was cancelled: attempts still under way delete what they may have
            # made (map_tidily); a winner already granted is deleted here.
            for task in self.tasks.values():
                task.cancel()
            if self.winner is not None:
                attempt, grant, _ = self.winner
                with contextlib.suppress(AttemptFailed):
                    await attempt.delete(grant.external_port)
            raise

    async def _one(self, attempt: _Attempt) -> None:
        m = self.mapper
        name = attempt.protocol.value
        try:
            grant = await attempt.map_tidily(self.lifetime, self.internal_port, m.timeout)
        except AttemptFailed as exc:
            m._reasons[attempt.protocol] = f"{name}: {exc}"
            if attempt.committed:
                self.unanswered.append(attempt)
            if self._finish() and self.winner is None:
                await self._tidy_unanswered()
            return
        at = asyncio.get_running_loop().time()
        if self.winner is None:
            self.winner = (attempt, grant, at)
            for other in self.attempts:
                task = self.tasks[other.protocol]
                if other is not attempt and not other.committed and not task.done():
                    m._reasons[other.protocol] = f"{other.protocol.value}: not needed, {name} won"
                    task.cancel()
            self._finish()
            self.decided.set()
            return
        winner_grant = self.winner[1]
        same = (grant.external_address, grant.external_port) == \
            (winner_grant.external_address, winner_grant.external_port)
        if same:  # the gateway's one entry, answered through two protocols
            m._reasons[attempt.protocol] = (
                f"{name}: also granted {grant.external_address}:{grant.external_port} "
                f"(the same entry), not used")
        else:
            m._cleaning()
            try:
                await attempt.delete(grant.external_port)
                outcome = "deleted"
            except AttemptFailed as exc:
                outcome = f"delete failed: {exc}"
            m._reasons[attempt.protocol] = (
                f"{name}: also granted {grant.external_address}:{grant.external_port}, "
                f"not used, {outcome}")
        self._finish()

    def _finish(self) -> bool:
        """Count a finished attempt; True for the last one."""
        self.finished += 1
        if self.finished >= len(self.attempts):
            self.decided.set()
            return True
        return False

    async def _tidy_unanswered(self) -> None:
        """Nobody won, but some requests left without an answer in time: a slow
        gateway may still have made those mappings, so delete them (blindly: NAT-PMP
        by internal port, PCP by nonce, UPnP by port). Never done when a protocol
        won: on a gateway with one table for all protocols (miniupnpd) that would
        delete the winner's entry too."""
        self.mapper._cleaning()
        for attempt in self.unanswered:
            with contextlib.suppress(AttemptFailed):
                await attempt.delete(self.internal_port)
