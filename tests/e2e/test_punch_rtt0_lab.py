"""The punch at near-zero RTT: coordinated between NATs that refuse, and seed mode.

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

Seed mode between drop NATs at 0 ms: the two users' SYNs meet within microseconds,
and before the punch handled a peer SYN clipped by the arming TTL (see
``test_clipped_arm_lab``) about one punch in 100 never connected.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.punch_rtt0 import pair
from tests.lab.fixtures import LabFactory, require_lab

from .peers import start_rendezvous

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[2]

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


def test_seed_mode_between_drop_nats_at_zero_delay(tmp_path: Path) -> None:
    """``bench.seed_rtt0`` (real ``nopf -t server|client`` in its own lab): every seed
    punch at 0 ms per hop connects, and the tool reports each run."""
    require_lab()
    out = tmp_path / "seed.json"
    proc = subprocess.run([sys.executable, "-m", "bench.seed_rtt0", "--runs", "5",
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=180, check=False)
    assert proc.returncode == 0, proc.stderr[-800:]
    result = json.loads(out.read_text())
    assert result["connected"] == result["runs"] == 5, result["failures"]
    assert 0 < result["median_ms"] < 4000
    assert proc.stderr.count("ms\n") == 5 and "5/5 connected" in proc.stdout
