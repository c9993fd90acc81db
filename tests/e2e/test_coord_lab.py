"""Coordinated mode through the namespace lab's NATs, with per-hop delay and jitter.

The peers run in-process (threads entered into the lab's hosts); the
rendezvous is the real ``nopf-server``. The failures of symmetric NATs and the
retry after a failed punch are those of a rendezvous without relay
(``--no-relay``): with the relay those pairs connect through it
(test_ladder_lab.py). The success rates over many runs are
in docs/coord-matrix.md (``python -m bench.coord_matrix``).
"""

from __future__ import annotations

import contextlib
import itertools
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Literal

import pytest

from nopf_web.sessions.coordination import PairedTunnel
from nopf_web.sessions.errors import CoordinatedPunchTimeout, SymmetricNat
from nopf_web.tunnel.secure import Pake
from tests.lab import Host, Lab
from tests.lab.fixtures import LabFactory

from .coord_harness import PairOutcome, exchange, pair
from .peers import start_rendezvous

pytestmark = pytest.mark.lab

FILTERING = ("drop", "rst", "icmp")


@contextlib.contextmanager
def paired(lab: Lab, joiner: Host) -> Iterator[tuple[PairedTunnel, PairedTunnel]]:
    """The lab's rendezvous, then a sharer on a1 paired with ``joiner``: both ends of
    their tunnel (closed on exit)."""
    start_rendezvous(lab)
    out = pair(lab.a1, joiner, punch_timeout=10)
    try:
        assert out.ok, out.errors
        assert out.sharer is not None and out.joiner is not None
        yield out.sharer, out.joiner
    finally:
        out.close()


@pytest.mark.parametrize(("left", "right"), list(itertools.product(FILTERING, repeat=2)))
def test_every_pair_of_filtering_nats_connects(
    lab_factory: LabFactory, left: str, right: str
) -> None:
    lab = lab_factory(left, right, delay_ms=20, jitter_ms=5)
    with paired(lab, lab.b1) as (sharer, joiner):
        assert sharer.path == joiner.path == "public"
        assert joiner.peer.host == lab.a.public_ip
        exchange(sharer, joiner)


def test_same_nat_connects_over_the_lan(lab_factory: LabFactory) -> None:
    lab = lab_factory("rst", "drop", delay_ms=20, jitter_ms=5)
    with paired(lab, lab.a2) as (sharer, joiner):
        assert sharer.path == joiner.path == "lan"
        assert joiner.peer.host == lab.a1.ip and sharer.peer.host == lab.a2.ip
        exchange(sharer, joiner)


def test_two_symmetric_nats_fail_at_once_naming_the_cause(lab_factory: LabFactory) -> None:
    lab = lab_factory("symmetric", "symmetric", delay_ms=20, jitter_ms=5)
    start_rendezvous(lab, "--no-relay")
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
    start_rendezvous(lab, "--no-relay")
    t0 = time.monotonic()
    out = pair(lab.a1, lab.b1, punch_timeout=10)
    assert time.monotonic() - t0 < 9
    assert isinstance(out.sharer_error, CoordinatedPunchTimeout), out.errors
    assert "your NAT is symmetric" in str(out.sharer_error)
    assert "peer's NAT is symmetric" in str(out.joiner_error)


def test_a_failed_first_punch_is_coordinated_again_and_connects(
    lab_factory: LabFactory,
) -> None:
    lab = lab_factory("icmp", "rst", delay_ms=20, jitter_ms=5)
    start_rendezvous(lab, "--no-relay")
    # The sites cannot reach each other (the rendezvous can reach both) until the
    # first attempt has failed on one side: then the path opens for the retry.
    a, b = lab.a.public_ip, lab.b.public_ip
    lab.inet.run(["nft", "-f", "-"], input=(
        "table inet nopf_test_block {\n"
        "  chain block { type filter hook forward priority -5; policy accept;\n"
        f"    ip saddr {a} ip daddr {b} drop\n"
        f"    ip saddr {b} ip daddr {a} drop\n"
        "  }\n"
        "}\n").encode())
    events: list[str] = []
    retrying = threading.Event()

    def seen(side: str, message: str) -> None:
        events.append(f"{side}: {message}")
        if "coordinating again" in message:
            retrying.set()

    halves: dict[str, Pake] = {}

    def maker(role: Literal["A", "B"]) -> Callable[[str], Pake]:
        def make(code: str) -> Pake:
            halves[role] = Pake("server" if role == "A" else "client", code)
            return halves[role]
        return make

    outcome: list[PairOutcome] = []
    runner = threading.Thread(target=lambda: outcome.append(
        pair(lab.a1, lab.b1, punch_timeout=10, on_event=seen,
             pakes=(maker("A"), maker("B")))), daemon=True)
    t0 = time.monotonic()
    runner.start()
    try:
        assert retrying.wait(15), f"no retry announced; events: {events}"
        blocked_for = time.monotonic() - t0
    finally:
        lab.inet.run(["nft", "delete", "table", "inet", "nopf_test_block"])
    runner.join(45)
    assert outcome, "pair() did not return"
    out = outcome[0]
    try:
        assert out.ok, (out.errors, events)
        assert out.sharer is not None and out.joiner is not None
        assert blocked_for > 4  # the first attempt really ran out (half of the 10 s)
        assert (out.sharer.attempt, out.joiner.attempt) == (2, 2), events
        for side in ("sharer", "joiner"):
            assert any(e.startswith(f"{side}: punch attempt 1 failed") for e in events), events
        # Fresh sockets: each side's retry coordinated and punched from a new port.
        for side, tunnel in (("sharer", out.sharer), ("joiner", out.joiner)):
            ports = [int(p) for e in events if e.startswith(f"{side}: public address")
                     for p in re.findall(r"local port (\d+)", e)]
            assert len(ports) == 2 and ports[0] != ports[1], events
            assert tunnel.local.port == ports[1]
        # The SPAKE2 messages went with the retry's coordination too (the same
        # ones: no tunnel had used them), and both sides derived one key.
        assert out.sharer.peer_pake == halves["B"].message
        assert out.joiner.peer_pake == halves["A"].message
        assert halves["A"].key() == halves["B"].key()
        exchange(out.sharer, out.joiner)
    finally:
        out.close()
