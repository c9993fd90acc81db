"""A coordinated peer's own direct candidates: its global IPv6 addresses and a port
mapped on its gateway (NAT-PMP, PCP or UPnP-IGD, raced by :mod:`nopf_web.portmap`).

:func:`direct_candidates` gathers them for a session and keeps them for its whole
life: the mapping is renewed at half its lifetime by the mapper, and deleted when
the ``async with`` ends, however it ends (the session's stop, Ctrl-C and SIGTERM
are cancellations that unwind through it). The listener the mapping forwards to
is held here too; the coordination's ladder accepts the peer on it
(:class:`~nopf_web.sessions.coordination_machine.AwaitMapped`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from nopf_web.portmap import PortMapError, PortMapper
from nopf_web.sockets import reusable_socket
from nopf_web.wire.address import Endpoint
from nopf_web.wire.rendezvous import is_global_unicast

from .coordination import DirectCandidates
from .engine import task_group

# The calling thread's network namespace's (/proc/net is the main thread's).
IF_INET6 = Path("/proc/thread-self/net/if_inet6")
# /proc/net/if_inet6 (Linux): one address per line, whitespace-separated hex fields:
#   address (32 hex digits), ifindex, prefix length, scope, flags, interface name.
# The flags are the kernel's IFA_F_* (include/uapi/linux/if_addr.h):
IFA_F_TEMPORARY = 0x01  # RFC 4941 privacy address: changes, never offered
IFA_F_DADFAILED = 0x08
IFA_F_DEPRECATED = 0x20
IFA_F_TENTATIVE = 0x40
_UNUSABLE = IFA_F_TEMPORARY | IFA_F_DADFAILED | IFA_F_DEPRECATED | IFA_F_TENTATIVE
MAPPING_LIFETIME = 1200  # s asked for; renewed at half. A crash leaves it 20 min at most
MAX_IPV6 = 4  # addresses offered


def parse_if_inet6(text: str) -> list[str]:
    """The stable global unicast addresses in ``/proc/net/if_inet6``, in its order:
    never link-local, unique-local, temporary (privacy), deprecated or tentative."""
    found = []
    for line in text.splitlines():
        cols = line.split()
        if len(cols) < 6 or len(cols[0]) != 32:
            continue
        try:
            ip = ipaddress.IPv6Address(int(cols[0], 16))
            flags = int(cols[4], 16)
        except ValueError:
            continue
        if flags & _UNUSABLE or not is_global_unicast(ip):
            continue
        found.append(str(ip))
    return list(dict.fromkeys(found))


def global_ipv6_addresses(path: Path = IF_INET6) -> list[str]:
    """This host's stable global IPv6 addresses (Linux; elsewhere none: not offered)."""
    if not sys.platform.startswith("linux"):
        return []
    for where in (path, Path("/proc/net/if_inet6")):  # the latter before Linux 3.17
        try:
            return parse_if_inet6(where.read_text())
        except FileNotFoundError:
            continue
        except OSError:
            break
    return []  # no IPv6 in this kernel or namespace


def _ipv6_port(address: str) -> int | None:
    """A free port on ``address`` for the IPv6 punch (None: the address cannot be bound)."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind((address, 0))
            return int(sock.getsockname()[1])
    except OSError:
        return None


@contextlib.asynccontextmanager
async def direct_candidates(
    *, ipv6: bool = True, port_mapping: bool = True, bind_host: str = "0.0.0.0",
    on_event: Callable[[str], None] | None = None,
    mapper: Callable[[], PortMapper] = PortMapper, wait_mapping: bool = True,
) -> AsyncIterator[DirectCandidates]:
    """Gather our candidates; keep the mapping (renewed) until the block ends, then
    delete it. ``port_mapping`` False or no gateway that maps: no mapped candidate.

    ``wait_mapping`` False (the connector): the gateway race runs in the background
    while the block runs; the mapping joins the candidates as soon as it is granted
    (the hellos made from then on offer it: a first hello that left earlier goes
    without, the meetings that follow, e.g. to leave the relay, have it). The sharer
    waits for it: nobody waits for the sharer before its hello."""

    def say(line: str) -> None:
        if on_event is not None:
            on_event(line)

    v6: list[Endpoint] = []
    if ipv6:
        addresses = global_ipv6_addresses()[:MAX_IPV6]
        port = _ipv6_port(addresses[0]) if addresses else None
        if port is not None:
            v6 = [Endpoint(a, port) for a in addresses]
            say(f"IPv6 candidates: {', '.join(f'[{e.host}]:{e.port}' for e in v6)}")
    held: list[PortMapper] = []  # the mapper whose mapping we hold, once granted

    async def map_port(stack: contextlib.AsyncExitStack, local_port: int) -> None:
        """Race the gateway's protocols; the mapper joins ``stack`` (its exit deletes)."""
        try:
            found = await stack.enter_async_context(mapper())
            mapping = await found.map_tcp(local_port, MAPPING_LIFETIME)
        except (PortMapError, OSError) as exc:
            say(f"no port mapping: {exc}")
            return
        if mapping is None:
            say(f"no port mapping: {'; '.join(found.reasons) or 'no gateway answered'}")
            return
        say(f"port mapping: {mapping}")
        held.append(found)

    async def hold_mapping(local_port: int) -> None:
        """The background race, then the mapping held until cancelled (then deleted)."""
        async with contextlib.AsyncExitStack() as own:
            await map_port(own, local_port)
            if held:
                await asyncio.Event().wait()  # until the block ends

    async with contextlib.AsyncExitStack() as stack:
        listener: socket.socket | None = None
        if port_mapping:
            listener = stack.enter_context(reusable_socket(bind_host, 0))
            listener.listen(8)
            local_port = int(listener.getsockname()[1])
            if wait_mapping:
                await map_port(stack, local_port)
            else:
                tg = await stack.enter_async_context(task_group())
                holder = tg.create_task(hold_mapping(local_port), name="port-mapping")
                stack.callback(holder.cancel)  # at the block's end, before the group's wait

        def current() -> tuple[Endpoint, int] | None:
            mapping = held[0].mapping if held else None
            if mapping is None:
                return None
            return (Endpoint(str(mapping.external_address), mapping.external_port),
                    mapping.internal_port)

        # The listener goes with the mapping: present from the start in the background
        # case (the mapping may come later), else only when there is one.
        yield DirectCandidates(tuple(v6), listener if held or not wait_mapping else None,
                               current)
