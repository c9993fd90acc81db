"""Coordinated mode through the namespace lab's NATs, with per-hop delay and jitter.

The peers run in-process (threads entered into the lab's hosts); the
rendezvous is the real ``nopf-server``. The success rates over many runs are
in docs/coord-matrix.md (``python -m bench.coord_matrix``).
"""

from __future__ import annotations

import itertools
import time

import pytest

from nopf_web.rendezvous.coord import CoordinatedPunchTimeout, SymmetricNat
from tests.lab.fixtures import LabFactory

from .coord_harness import exchange, pair
from .peers import start_rendezvous

pytestmark = pytest.mark.lab

FILTERING = ("drop", "rst", "icmp")


@pytest.mark.parametrize(("left", "right"), list(itertools.product(FILTERING, repeat=2)))
def test_every_pair_of_filtering_nats_connects(
    lab_factory: LabFactory, left: str, right: str
) -> None:
    lab = lab_factory(left, right, delay_ms=20, jitter_ms=5)
    start_rendezvous(lab)
    out = pair(lab.a1, lab.b1, punch_timeout=10)
    try:
        assert out.ok, out.errors
        assert out.sharer is not None and out.joiner is not None
        assert out.sharer.path == out.joiner.path == "public"
        assert out.joiner.peer.host == lab.a.public_ip
        exchange(out.sharer, out.joiner)
    finally:
        out.close()


def test_same_nat_connects_over_the_lan(lab_factory: LabFactory) -> None:
    lab = lab_factory("rst", "drop", delay_ms=20, jitter_ms=5)
    start_rendezvous(lab)
    out = pair(lab.a1, lab.a2, punch_timeout=10)
    try:
        assert out.ok, out.errors
        assert out.sharer is not None and out.joiner is not None
        assert out.sharer.path == out.joiner.path == "lan"
        assert out.joiner.peer.host == lab.a1.ip and out.sharer.peer.host == lab.a2.ip
        exchange(out.sharer, out.joiner)
    finally:
        out.close()


def test_two_symmetric_nats_fail_at_once_naming_the_cause(lab_factory: LabFactory) -> None:
    lab = lab_factory("symmetric", "symmetric", delay_ms=20, jitter_ms=5)
    start_rendezvous(lab)
    out = pair(lab.a1, lab.b1, punch_timeout=10)
    assert not out.ok
    assert out.up_at - out.ready_at < 2  # no punch attempted
    for err in (out.sharer_error, out.joiner_error):
        assert isinstance(err, SymmetricNat), out.errors
        assert "both peers are behind symmetric NATs" in str(err)


def test_one_symmetric_nat_fails_within_its_short_budget_naming_it(
    lab_factory: LabFactory,
) -> None:
    lab = lab_factory("symmetric", "rst", delay_ms=20, jitter_ms=5)
    start_rendezvous(lab)
    t0 = time.monotonic()
    out = pair(lab.a1, lab.b1, punch_timeout=10)
    assert time.monotonic() - t0 < 9
    assert isinstance(out.sharer_error, CoordinatedPunchTimeout), out.errors
    assert "your NAT is symmetric" in str(out.sharer_error)
    assert "peer's NAT is symmetric" in str(out.joiner_error)
