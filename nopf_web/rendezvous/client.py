"""Rendezvous client: learn our public ip:port from any seed-protocol server."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass

from nopf_web.errors import describe_os_error
from nopf_web.happy_eyeballs import connect_first, describe, resolve_all
from nopf_web.sockets import connect_nonblocking, reusable_socket
from nopf_web.wire.address import Endpoint
from nopf_web.wire.discovery import DiscoveryReader
from nopf_web.wire.errors import WireError

from .errors import RendezvousError, RendezvousProtocolError, RendezvousUnreachable


async def resolve_ipv4(endpoint: Endpoint, timeout: float) -> tuple[str, int]:
    """Resolve a rendezvous host name to an IPv4 address (the seed protocol is IPv4-only)."""
    return (await resolve_all(endpoint, timeout, socket.AF_INET))[0]


async def reach_rendezvous(endpoint: Endpoint, timeout: float, *,
                           on_event: Callable[[str], None] | None = None) -> tuple[str, int]:
    """The IPv4 address and port of the rendezvous to pair and punch through.

    A literal IPv4 address is used as is. A host name is resolved to every address,
    both families; the seed's discovery reply, the plans and the relay are IPv4 (the
    punch uses the IPv4 mapping the rendezvous sees), so its IPv4 addresses are the
    candidates: one is used as is, several are raced Happy Eyeballs style (RFC 8305:
    250 ms apart, the first that accepts wins) and ``on_event`` says which answered.
    """
    try:
        return str(ipaddress.IPv4Address(endpoint.host)), endpoint.port
    except ValueError:
        pass
    found = await resolve_all(endpoint, timeout)
    v4 = [a for a in found if ":" not in a[0]]
    if not v4:
        raise RendezvousUnreachable(
            f"{endpoint.host} has only IPv6 addresses ({', '.join(map(describe, found))}): "
            "nopf pairs and punches over IPv4, so the rendezvous needs an IPv4 address")
    if len(v4) == 1:
        if on_event is not None:
            on_event(f"rendezvous {endpoint} is {describe(v4[0])}")
        return v4[0]
    sock, address = await connect_first(v4, timeout)
    sock.close()  # a connection without a hello: the rendezvous resets it at once
    if on_event is not None:
        on_event(f"rendezvous {endpoint}: {describe(address)} answered first of "
                 f"{len(v4)} IPv4 addresses")
    return address


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
    where = f"{server[0]}:{server[1]}"
    try:
        sock = reusable_socket(bind_host, local_port)
    except OSError as exc:
        raise RendezvousUnreachable(
            f"cannot bind {bind_host}:{local_port} for the rendezvous: {_describe(exc)}"
        ) from None
    bound = sock.getsockname()[1]
    try:
        try:
            async with asyncio.timeout(timeout):
                await connect_nonblocking(sock, server)
        except TimeoutError:
            raise RendezvousUnreachable(
                f"rendezvous {where} did not answer the connection within {timeout:g} s"
            ) from None
        except OSError as exc:
            raise RendezvousUnreachable(f"rendezvous {where}: {_describe(exc)}") from None
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


async def _read_reply(sock: socket.socket, where: str) -> Endpoint:
    loop = asyncio.get_running_loop()
    reader = DiscoveryReader()
    received = b""
    while True:
        try:
            chunk = await loop.sock_recv(sock, reader.needed)
        except OSError as exc:
            raise RendezvousProtocolError(
                f"rendezvous {where} broke the connection: {_describe(exc)}"
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


def _describe(exc: OSError) -> str:
    text = describe_os_error(exc)
    return f"{text} (nothing listening there?)" if exc.errno == errno.ECONNREFUSED else text


__all__ = [
    "Discovery",
    "RendezvousError",
    "RendezvousProtocolError",
    "RendezvousUnreachable",
    "discover",
    "probe_mapping",
    "reach_rendezvous",
    "resolve_ipv4",
]
