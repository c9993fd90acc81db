"""Coordinated peers that reach the rendezvous over IPv6, with the real programs in the
namespace lab (issue 17). Every peer knows the rendezvous by one name, ``rdv.lab``,
that resolves to its IPv4 and IPv6 addresses (``nopf-server`` listens on both).

- a host with IPv6 only (no IPv4 at all) pairs with a dual-stack sharer behind a
  symmetric IPv4 NAT directly over IPv6: the bytes cross both sites' routers as IPv6,
  and the rendezvous host sees none of them;
- the same host, given the rendezvous' IPv6 address in brackets, pairs with a sharer
  that has IPv4 only, through the relay, each side reaching the relay in its own family;
- a dual-stack client whose first address for the name is unreachable connects
  through the next one within the 250 ms stagger, and says which answered.
"""

from __future__ import annotations

import pytest

from tests.lab.fixtures import LabFactory
from tests.lab.topology import RDV_IP, RDV_IP6

from .peers import RDV_HOST, RDV_NAME, SIZE, drop_ipv6, named_pair, round_trip

pytestmark = pytest.mark.lab

DEAD_IP = "198.51.100.9"  # on the rendezvous' link, but nobody's: SYNs to it go unanswered


def test_an_ipv6_only_host_pairs_with_a_dual_stack_sharer_directly_over_ipv6(
        lab_factory: LabFactory) -> None:
    # Site a: a symmetric IPv4 NAT (no IPv4 punch could work) and IPv6; site b: IPv6 only.
    lab = lab_factory("symmetric", "rst", ipv6=True, ipv6_only=("b",))
    rdv_bytes = lab.tcp_counter(lab.rdv, 3012)
    with named_pair(lab, RDV_IP, RDV_IP6) as (s, c):
        err_s, err_c = s.stderr(), c.stderr()
        # Each says which address answered: the sharer's IPv4 (tried first: its IPv4
        # mapping is what a punch needs), the IPv6-only host's IPv6.
        assert (f"rendezvous {RDV_NAME}: {RDV_IP}:3012 answered first of 2 addresses "
                "(1 IPv4, 1 IPv6; IPv4 tried first)") in err_s, err_s
        assert (f"rendezvous {RDV_NAME}: [{RDV_IP6}]:3012 answered first of 2 "
                "addresses (1 IPv4, 1 IPv6; IPv6 tried first)") in err_c, err_c
        assert f"public address [{lab.b1.ip6}]:" in err_c, err_c
        assert "is [" not in err_c, err_c  # the address it chose is not resolved again
        assert f"tunnel up to [{lab.b1.ip6}]:" in err_s and "over IPv6" in err_s, err_s
        assert f"tunnel up to [{lab.a1.ip6}]:" in err_c and "over IPv6" in err_c, err_c
        assert "predicted path ipv6" in err_c, err_c
        coordination = rdv_bytes.read()[1]
        v6_before = lab.forwarded6("a"), lab.forwarded6("b")
        round_trip(lab.b1)
        v6_after = lab.forwarded6("a"), lab.forwarded6("b")
    for before, after in zip(v6_before, v6_after, strict=True):
        assert after - before > 2 * SIZE, (v6_before, v6_after)  # the bytes, as IPv6
    total = rdv_bytes.read()[1]
    assert total - coordination < 10_000 and total < 60_000, (coordination, total)


def test_an_ipv6_only_host_pairs_with_an_ipv4_only_sharer_through_the_relay(
        lab_factory: LabFactory) -> None:
    lab = lab_factory("rst", "rst", ipv6=True, ipv6_only=("b",))
    drop_ipv6(lab.a1)  # the sharer's host: IPv4 only
    rdv_bytes = lab.tcp_counter(lab.rdv, 3012)
    # The IPv6-only connector is given the rendezvous' IPv6 address, in brackets: used
    # as it is (no name to resolve, no race).
    with named_pair(lab, RDV_IP, RDV_IP6, connector_rdv=f"[{RDV_IP6}]:3012") as (s, c):
        err_s, err_c = s.stderr(), c.stderr()
        assert f"contacting rendezvous [{RDV_IP6}]:3012" in err_c, err_c
        assert "answered first" not in err_c, err_c
        assert "IPv6 candidates" not in err_s, err_s  # it has none to offer
        assert (f"tunnel up over the relay at {RDV_IP}:3012 (the peer reached the "
                "rendezvous over IPv6 only, no IPv4 punch)") in err_s, err_s
        assert (f"tunnel up over the relay at [{RDV_IP6}]:3012 (we reached the "
                "rendezvous over IPv6 only, no IPv4 punch)") in err_c, err_c
        assert "SYN" not in err_s + err_c and "punching to" not in err_s + err_c
        before = rdv_bytes.read()[1]
        round_trip(lab.b1, 1 << 20)
        relayed = rdv_bytes.read()[1] - before
    assert relayed > 4 * (1 << 20)  # both ways, in and out of the relay


def test_a_dual_stack_client_skips_an_unreachable_first_address_and_names_the_one_that_answered(
        lab_factory: LabFactory) -> None:
    lab = lab_factory("drop", "rst", ipv6=True)
    with named_pair(lab, DEAD_IP, RDV_IP, RDV_IP6) as (s, c):
        order = lab.a1.run(["getent", "ahosts", RDV_HOST]).stdout.decode()
        assert order.index(DEAD_IP) < order.index(RDV_IP), order  # the resolver's order
        # The dead IPv4 address had its 250 ms, then the next IPv4 one answered (before
        # any IPv6 address: IPv4 first, every IPv4 address of the name).
        for peer in (s, c):
            assert (f"rendezvous {RDV_NAME}: {RDV_IP}:3012 answered first of 3 addresses "
                    "(2 IPv4, 1 IPv6; IPv4 tried first)") in peer.stderr(), peer.stderr()
        round_trip(lab.b1, 256 * 1024)
