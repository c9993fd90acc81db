"""Happy Eyeballs' asyncio driver: resolve a host name to every address, connect to
the first that answers (RFC 8305 order and stagger:
:mod:`nopf_web.happy_eyeballs_machine`)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable

from nopf_web.rendezvous.errors import RendezvousUnreachable
from nopf_web.sockets import connect_nonblocking
from nopf_web.wire.address import Endpoint

from .happy_eyeballs_machine import (
    CONNECTION_ATTEMPT_DELAY,
    AllFailed,
    CancelAttempt,
    Family,
    HappyEyeballs,
    StartAttempt,
    Won,
    interleave,
    is_ipv6,
)

__all__ = ["by_family", "connect_first", "resolve_all", "routes_ipv4"]


async def resolve_all(endpoint: Endpoint, timeout: float,
                      family: socket.AddressFamily = socket.AF_UNSPEC) -> list[tuple[str, int]]:
    """Every address ``endpoint.host`` resolves to (``family``: both, or one), in
    Happy Eyeballs order; :class:`RendezvousUnreachable` names the host on failure."""
    loop = asyncio.get_running_loop()
    try:
        # asyncio.timeout, not wait_for: in 3.11 wait_for can swallow a cancellation
        # that arrives as the awaited call completes, and a stop would be lost.
        async with asyncio.timeout(timeout):
            infos = await loop.getaddrinfo(endpoint.host, endpoint.port, family=family,
                                           type=socket.SOCK_STREAM)
    except TimeoutError:
        raise RendezvousUnreachable(
            f"could not resolve {endpoint.host} within {timeout:g} s") from None
    except OSError as exc:
        raise RendezvousUnreachable(f"could not resolve {endpoint.host}: {exc}") from None
    found = interleave((str(info[4][0]), int(info[4][1])) for info in infos
                       if info[0] in (socket.AF_INET, socket.AF_INET6))
    if not found:
        which = {socket.AF_INET: "IPv4 ", socket.AF_INET6: "IPv6 "}.get(family, "")
        raise RendezvousUnreachable(f"{endpoint.host} has no {which}address")
    return found


def routes_ipv4(address: tuple[str, int]) -> bool:
    """Whether this host has an IPv4 route (and address) to ``address``: a UDP socket's
    connect picks both without sending anything."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(address)
    except OSError:
        return False
    return True


def by_family(addresses: list[tuple[str, int]], first: Family) -> list[tuple[str, int]]:
    """``first``'s addresses, then the other family's (each in the given order): where to
    go next when one address failed us, staying in our family while it has any."""
    lead = [a for a in addresses if is_ipv6(a[0]) == (first == 6)]
    return lead + [a for a in addresses if a not in lead]


async def connect_first(
    addresses: list[tuple[str, int]], timeout: float, *,
    delay: float = CONNECTION_ATTEMPT_DELAY, first: Family = 6, first_count: int = 1,
    clock: Callable[[], float] = time.monotonic,
) -> tuple[socket.socket, tuple[str, int]]:
    """Connect to the first of ``addresses`` that answers, racing them as RFC 8305 says
    (``first``: the family tried first, ``first_count`` of its addresses before the
    other's); the connected (non-blocking) socket and its address. Within ``timeout`` in
    all; :class:`RendezvousUnreachable` lists every address with its reason."""
    machine = HappyEyeballs(addresses, delay, first, first_count)
    outcomes: asyncio.Queue[tuple[int, OSError | None]] = asyncio.Queue()
    socks: dict[int, socket.socket] = {}
    tasks: dict[int, asyncio.Task[None]] = {}

    async def attempt(index: int, sock: socket.socket, address: tuple[str, int]) -> None:
        try:
            await connect_nonblocking(sock, address)
        except OSError as exc:
            outcomes.put_nowait((index, exc))
        else:
            outcomes.put_nowait((index, None))

    winner: tuple[socket.socket, tuple[str, int]] | None = None
    failure: AllFailed | None = None
    try:
        async with asyncio.timeout(timeout), asyncio.TaskGroup() as tg:
            actions = machine.start(clock())
            while True:
                for action in actions:
                    if isinstance(action, StartAttempt):
                        family = socket.AF_INET6 if ":" in action.address[0] else socket.AF_INET
                        sock = socket.socket(family, socket.SOCK_STREAM)
                        sock.setblocking(False)
                        socks[action.index] = sock
                        tasks[action.index] = tg.create_task(
                            attempt(action.index, sock, action.address),
                            name=f"happy-eyeballs-{action.index}")
                    elif isinstance(action, CancelAttempt):
                        tasks[action.index].cancel()
                    elif isinstance(action, Won):
                        winner = (socks.pop(action.index), action.address)
                    elif isinstance(action, AllFailed):
                        failure = action  # raised outside the group, as itself
                if winner is not None or failure is not None:
                    break
                wake = machine.wake_at
                try:
                    async with asyncio.timeout(None if wake is None
                                               else max(0.0, wake - clock())):
                        index, error = await outcomes.get()
                except TimeoutError:
                    actions = machine.timer(clock())
                    continue
                if error is None:
                    actions = machine.connected(index, clock())
                else:
                    actions = machine.failed(index, error.strerror or str(error), clock())
    except TimeoutError:
        tried = ", ".join(str(Endpoint(*a)) for a in machine.addresses)
        raise RendezvousUnreachable(
            f"none of {tried} answered within {timeout:g} s") from None
    finally:
        for sock in socks.values():
            with contextlib.suppress(OSError):
                sock.close()
    if failure is not None:
        raise RendezvousUnreachable(f"no address answered: {failure.message}")
    assert winner is not None
    return winner
