"""The coordinated punch goes direct at near-zero RTT between NATs that refuse.

At 0 ms per hop (a LAN, a data centre) the joiner's first SYN reaches the sharer's
NAT before the sharer's first SYN has left it (the rendezvous fires the sharer a
few ms after the joiner). An ``rst`` NAT kills it with a reset; that reset, crossing
the joiner's NAT, closes its tracking, so the sharer's first SYN is refused there
in turn. Before the punch's retry rules handled this (docs/protocol.md, "Near-zero
round trips"), an rst sharer facing an icmp joiner fell back to the relay in about
two runs of three: the joiner's next SYN met the sharer's listener, whose SYN-ACK
the sharer's NAT dropped (a sequence number it never saw) and whose half-open
socket then held the address pair (every re-arm failed with EADDRNOTAVAIL).

One lab per pair of sites, both directions (a1 shares to b1, then b1 to a1), five
pairings each; every one must be punched, never relayed.
"""

from __future__ import annotations

import pytest

from bench.punch_rtt0 import pair
from tests.lab.fixtures import LabFactory

from .peers import start_rendezvous

pytestmark = pytest.mark.lab

RUNS = 5
LABS = [("rst", "icmp"), ("rst", "rst"), ("icmp", "icmp")]


@pytest.mark.parametrize(("left", "right"), LABS, ids=[f"{a}-{b}" for a, b in LABS])
def test_refusing_nats_punch_direct_at_zero_delay(lab_factory: LabFactory, left: str,
                                                  right: str) -> None:
    lab = lab_factory(left, right)  # no delay: the RTT between the sites is ~0.1 ms
    server = start_rendezvous(lab)
    try:
        for sharer, joiner, label in ((lab.a1, lab.b1, f"{left} × {right}"),
                                      (lab.b1, lab.a1, f"{right} × {left}")):
            for run in range(RUNS):
                s, j = pair(sharer, joiner)
                try:
                    assert s.tunnel is not None and j.tunnel is not None, (
                        label, run, s.error, j.error)
                    assert s.path == j.path == "public", (label, run, s.path, j.path)
                    # The signature of the listener's half-open socket holding the pair.
                    assert "other" not in s.answers(), (label, run, s.answers())
                finally:
                    s.close()
                    j.close()
    finally:
        server.terminate()
        server.communicate(timeout=10)
