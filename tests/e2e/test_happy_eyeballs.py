"""Happy Eyeballs against real loopback listeners (IPv4 and IPv6)."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from nopf_web.happy_eyeballs import by_family, connect_first, resolve_all
from nopf_web.rendezvous.client import coordinated_first, reach_rendezvous
from nopf_web.rendezvous.errors import RendezvousUnreachable
from nopf_web.wire.address import Endpoint
from tests.loopback import has_ipv6_loopback


def _listener(host: str) -> socket.socket:
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    s.bind((host, 0))
    s.listen(4)
    return s


def _closed_port(host: str) -> int:
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    s.bind((host, 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback")
def test_ipv6_answers_first_when_both_listen() -> None:
    with _listener("127.0.0.1") as v4, _listener("::1") as v6:
        addrs = [("127.0.0.1", v4.getsockname()[1]), ("::1", v6.getsockname()[1])]
        sock, won = asyncio.run(connect_first(addrs, 2.0))
        sock.close()
    assert won == addrs[1]


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback")
def test_a_refused_ipv6_address_falls_back_to_ipv4_at_once() -> None:
    with _listener("127.0.0.1") as v4:
        addrs = [("::1", _closed_port("::1")), ("127.0.0.1", v4.getsockname()[1])]
        started = time.monotonic()
        sock, won = asyncio.run(connect_first(addrs, 2.0))
        sock.close()
    assert won == addrs[1]
    assert time.monotonic() - started < 0.2  # not the 250 ms stagger: the refusal


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback")
def test_the_coordinated_peer_tries_ipv4_first_when_it_routes_ipv4() -> None:
    with _listener("127.0.0.1") as v4, _listener("::1") as v6:
        addrs = [("::1", v6.getsockname()[1]), ("127.0.0.1", v4.getsockname()[1])]
        first = coordinated_first(addrs)
        assert first == 4  # loopback routes IPv4
        sock, won = asyncio.run(connect_first(addrs, 2.0, first=first))
        sock.close()
    assert won == addrs[1]
    assert coordinated_first([("::1", 3012)]) == 6  # no IPv4 address: IPv6 first
    # Where to go when one address failed: our family's next, then the other's.
    v4a, v4b, v6a = ("192.0.2.1", 1), ("192.0.2.2", 1), ("2001:db8::1", 1)
    assert by_family([v6a, v4a, v4b], 4) == [v4a, v4b, v6a]
    assert by_family([v4a, v6a, v4b], 6) == [v6a, v4a, v4b]


def test_every_address_refused_names_each() -> None:
    addrs = [("127.0.0.1", _closed_port("127.0.0.1")), ("127.0.0.2", _closed_port("127.0.0.1"))]
    with pytest.raises(RendezvousUnreachable, match=r"127\.0\.0\.1:.*127\.0\.0\.2:"):
        asyncio.run(connect_first(addrs, 2.0))


def test_a_silent_first_address_costs_the_stagger_only() -> None:
    # A listener whose backlog is full does not answer SYNs: like a lost path.
    with _listener("127.0.0.1") as good:
        silent = socket.socket()
        silent.bind(("127.0.0.3", 0))
        silent.listen(0)
        fillers = []
        try:
            for _ in range(4):
                f = socket.socket()
                f.setblocking(False)
                f.connect_ex(silent.getsockname())
                fillers.append(f)
            time.sleep(0.05)
            addrs = [silent.getsockname(), ("127.0.0.1", good.getsockname()[1])]
            started = time.monotonic()
            sock, won = asyncio.run(connect_first(addrs, 3.0))
            elapsed = time.monotonic() - started
            sock.close()
        finally:
            for f in fillers:
                f.close()
            silent.close()
    assert won == addrs[1]
    assert 0.2 <= elapsed < 1.0, elapsed


def test_resolve_all_and_reach_rendezvous_on_localhost() -> None:
    found = asyncio.run(resolve_all(Endpoint("localhost", 3012), 5.0))
    assert ("127.0.0.1", 3012) in found
    said: list[str] = []
    assert asyncio.run(reach_rendezvous(Endpoint("localhost", 3012), 5.0,
                                        on_event=said.append)) == ("127.0.0.1", 3012)
    assert said == ["rendezvous localhost:3012 is 127.0.0.1:3012"]
    # A literal IPv4 address needs no resolver and says nothing.
    assert asyncio.run(reach_rendezvous(Endpoint("127.0.0.1", 9), 5.0)) == ("127.0.0.1", 9)

