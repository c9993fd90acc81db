"""Rendezvous client: learn our public ip:port from any seed-protocol server."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from nopf_web.errors import describe_os_error
from nopf_web.happy_eyeballs import connect_first, resolve_all, routes_ipv4
from nopf_web.happy_eyeballs_machine import Family, is_ipv6
from nopf_web.sockets import connect_nonblocking, reusable_socket
from nopf_web.wire.address import SEED_IPV4_ONLY, Endpoint
from nopf_web.wire.discovery import DiscoveryReader
from nopf_web.wire.errors import WireError

from .errors import RendezvousError, RendezvousProtocolError, RendezvousUnreachable


async def resolve_ipv4(endpoint: Endpoint, timeout: float) -> tuple[str, int]:
    """Resolve a rendezvous host name to an IPv4 address (the seed protocol is IPv4-only)."""
    return (await resolve_all(endpoint, timeout, socket.AF_INET))[0]


async def reach_rendezvous(endpoint: Endpoint, timeout: float, *,
                           on_event: Callable[[str], None] | None = None,
                           coordinated: bool = False) -> tuple[str, int]:
    """The address and port of the rendezvous to pair and punch through.

    A literal IPv4 address (coordinated: or IPv6) is used as is. A host name is
    resolved to every address, both families. Seed mode (the default) keeps the
    seed's IPv4-only wire format: its IPv4 addresses are the candidates.
    ``coordinated``: every address of both families is a candidate
    (:func:`coordinated_first` says which family goes first).
    One is used as is; several are raced Happy Eyeballs style (RFC 8305: 250 ms
    apart, the first that accepts wins) and ``on_event`` says which answered.
    """
    try:
        return str(ipaddress.IPv4Address(endpoint.host)), endpoint.port
    except ValueError:
        pass
    if coordinated and is_ipv6(endpoint.host):
        return endpoint.host, endpoint.port  # an address already chosen (IPv6)
    found = await resolve_all(endpoint, timeout)
    first: Family = 6
    if coordinated:
        usable, first = found, coordinated_first(found)
    else:
        usable = [a for a in found if not is_ipv6(a[0])]
        if not usable:
            listed = ", ".join(str(Endpoint(*a)) for a in found)
            raise RendezvousUnreachable(
                f"{endpoint.host} has only IPv6 addresses ({listed}): {SEED_IPV4_ONLY}, so the "
                "rendezvous needs an IPv4 address")
    if len(usable) == 1:
        if on_event is not None:
            on_event(f"rendezvous {endpoint} is {Endpoint(*usable[0])}")
        return usable[0]
    # Coordinated, IPv4 first: every IPv4 address before IPv6 (each has its 250 ms, or
    # less when it fails), since an IPv4 connection is what our punch is planned from.
    v4 = sum(not is_ipv6(a[0]) for a in usable)
    sock, address = await connect_first(usable, timeout, first=first,
                                        first_count=v4 if coordinated and first == 4 else 1)
    sock.close()  # a connection without a hello: the rendezvous resets it at once
    if on_event is not None:
        v6 = len(usable) - v4
        what = (f"{len(usable)} IPv{4 if v4 else 6} addresses" if not (v4 and v6) else
                f"{len(usable)} addresses ({v4} IPv4, {v6} IPv6; IPv{first} tried first)")
        on_event(f"rendezvous {endpoint}: {Endpoint(*address)} answered first of {what}")
    return address


def coordinated_first(addresses: list[tuple[str, int]]) -> Family:
    """The family a coordinated peer tries first: IPv4 when this host has an IPv4 route
    to one of the rendezvous' IPv4 addresses, else IPv6.

    Why not IPv6 first, as RFC 8305 says: the rendezvous plans our punch from the NAT
    mapping it sees on our connection, and that mapping is an IPv4 one (the punch
    leaves from this connection's local port; the relay path goes to the address it
    reached). Over IPv6 it sees no IPv4 mapping and plans no IPv4 punch for us. Our
    global IPv6 addresses travel anyway, as ``ipv6`` candidates in the hello, so IPv4
    first loses no IPv6 path. IPv6 still follows, 250 ms after the last IPv4 attempt
    started (or at once when the
    IPv4 attempts fail), and a host without IPv4 starts with it.
    """
    v4 = [a for a in addresses if not is_ipv6(a[0])]
    return 4 if v4 and routes_ipv4(v4[0]) else 6


@dataclass(frozen=True)
class Discovery:
    public: Endpoint  # as the rendezvous saw us
    local_port: int  # the port we connected from: the punch port


async def discover(
    server: tuple[str, int], local_port: int = 0, *, bind_host: str = "0.0.0.0",
    timeout: float = 5.0,
) -> Discovery:
    """Connect from ``local_port`` (0: any) to a discovery server; learn our public address.

    The socket is bound with the punch socket options so the same local port
    can be reused for the punch right after.
    """
    where = str(Endpoint(*server))
    sock = socket_for_rendezvous(bind_host, local_port)
    bound = sock.getsockname()[1]
    try:
        await connected_within(connect_nonblocking(sock, server), where, timeout)
        try:
            async with asyncio.timeout(timeout):
                public = await _read_reply(sock, where)
            return Discovery(public, bound)
        except TimeoutError:
            raise RendezvousProtocolError(
                f"rendezvous {where} accepted but sent no address within {timeout:g} s "
                "(is it a nopf-server?)"
            ) from None
    finally:
        sock.close()


async def probe_mapping(
    server: tuple[str, int], first: Discovery, *, bind_host: str = "0.0.0.0",
    timeout: float = 5.0, settle: float = 0.5,
) -> Endpoint | None:
    """Ask again from the same local port: a different public port means a symmetric NAT.

    An endpoint-independent NAT reuses the mapping (same public port); one that
    maps per connection gives a new port. Returns None when the check could not
    run: the previous connection's 4-tuple stays busy while its close is still
    in progress (e.g. a seed server that firewalls its own FIN away), and we
    wait at most ``settle`` seconds for it.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settle
    while True:
        try:
            again = await discover(server, first.local_port, bind_host=bind_host,
                                   timeout=timeout)
        except RendezvousUnreachable:
            if loop.time() >= deadline:
                return None
            await asyncio.sleep(0.05)
            continue
        except RendezvousError:
            return None
        return again.public


def socket_for_rendezvous(bind_host: str, port: int) -> socket.socket:
    """A socket bound to ``bind_host`` and ``port`` (0: any) with the punch's options,
    to connect to the rendezvous from; a failure is :class:`RendezvousUnreachable`."""
    try:
        return reusable_socket(bind_host, port)
    except OSError as exc:
        raise RendezvousUnreachable(f"cannot bind {Endpoint(bind_host, port)} for the "
                                    f"rendezvous: {describe_os_error(exc)}") from None


async def connected_within(connecting: Awaitable[None], where: str, timeout: float) -> None:
    """Wait up to ``timeout`` s for ``connecting``, a connection to the rendezvous at
    ``where``: a timeout or a socket error is :class:`RendezvousUnreachable` saying so."""
    try:
        async with asyncio.timeout(timeout):
            await connecting
    except TimeoutError:
        raise RendezvousUnreachable(
            f"rendezvous {where} did not answer the connection within {timeout:g} s"
        ) from None
    except OSError as exc:
        raise RendezvousUnreachable(
            f"rendezvous {where}: {describe_connect_error(exc)}") from None


async def _read_reply(sock: socket.socket, where: str) -> Endpoint:
    loop = asyncio.get_running_loop()
    reader = DiscoveryReader()
    received = b""
    while True:
        try:
            chunk = await loop.sock_recv(sock, reader.needed)
        except OSError as exc:
            raise RendezvousProtocolError(
                f"rendezvous {where} broke the connection: {describe_connect_error(exc)}"
            ) from None
        if not chunk:
            raise RendezvousProtocolError(
                f"rendezvous {where} closed after {len(received)} of 10 bytes "
                "(is it a nopf-server?)"
            )
        received += chunk
        try:
            result = reader.feed(chunk)
        except WireError as exc:
            raise RendezvousProtocolError(
                f"rendezvous {where} sent something that is not a discovery reply ({exc})"
            ) from None
        if result is not None:
            return Endpoint(*result)


def describe_connect_error(exc: OSError) -> str:
    """A connection's socket error in a message (a refusal suggests why)."""
    text = describe_os_error(exc)
    return f"{text} (nothing listening there?)" if exc.errno == errno.ECONNREFUSED else text


__all__ = [
    "Discovery",
    "RendezvousError",
    "RendezvousProtocolError",
    "RendezvousUnreachable",
    "connected_within",
    "coordinated_first",
    "describe_connect_error",
    "discover",
    "probe_mapping",
    "reach_rendezvous",
    "resolve_ipv4",
    "socket_for_rendezvous",
]
