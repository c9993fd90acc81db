"""The predicted path is the path taken, for every pair of the lab's NAT matrix.

Each site's NAT is measured once per kind by the real NAT doctor (against the real
``nopf-server`` and its responder), and its compact report goes with the peer's
hello, as the dashboard sends it. Then, for every ordered pair of kinds (sharer ×
joiner: none, drop, rst, icmp, symmetric) and for two hosts behind one NAT of each
kind, one pairing through the real ``nopf-server`` (relay on): both peers' predictions
(made at the fire, before the first SYN), the rendezvous' (its log) and the path the
ladder took must agree.

These sites have IPv4 alone and no mapping gateway, and the peers offer no
candidates: the IPv4 ladder. The candidate rungs' predictions (``ipv6``, ``mapped``)
are checked with their lab setups in tests/e2e/test_direct_paths_lab.py, and on
every pair by the NAT matrix benchmark (bench.scn_matrix, "as predicted").

Efficient on purpose (the suite runs on 2 cores): one lab per unordered pair of
kinds runs both directions (a1 shares to b1, then b1 shares to a1) and, for a kind
with itself, a1 shares to a2 behind the same NAT; 10 ms per hop, so a pairing takes well
under a second except where a symmetric joiner punches its short budget before the
relay (three pairs, about 3 s each).
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from nopf_web.doctor import run_doctor
from nopf_web.prediction import Prediction
from nopf_web.sessions.coordination import CoordinationSpec, PairedTunnel, coordinate
from nopf_web.wire.address import Endpoint
from nopf_web.wire.nat import NatSummary
from tests.lab.fixtures import require_lab
from tests.lab.topology import RDV_IP, Host, Lab, cleanup_stale

from .peers import start_rendezvous

pytestmark = pytest.mark.lab

KINDS = ("none", "drop", "rst", "icmp", "symmetric")
RDV = Endpoint(RDV_IP, 3012)
PUNCH_TIMEOUT = 8.0
DELAY_MS = 10.0
# The lab's kinds as the doctor must see them (tests/e2e/test_doctor_lab.py proves it).
MAPPING = {"none": "none", "drop": "endpoint-independent", "rst": "endpoint-independent",
           "icmp": "endpoint-independent", "symmetric": "address-and-port-dependent"}


def run_in(host: Host, main: object, timeout: float = 30.0) -> object:
    """Run the coroutine function ``main`` in a thread entered into ``host``."""
    box: queue.Queue[tuple[bool, object]] = queue.Queue()

    def target() -> None:
        try:
            with host.enter():
                box.put((True, asyncio.run(main())))  # type: ignore[operator]
        except BaseException as exc:  # handed to the test thread
            box.put((False, exc))

    threading.Thread(target=target, name=f"prediction-{host.name}", daemon=True).start()
    ok, value = box.get(timeout=timeout)
    if not ok:
        raise value  # type: ignore[misc]
    return value


@pytest.fixture(scope="module")
def reports() -> Iterator[dict[str, NatSummary]]:
    """Each kind's compact report, measured by the doctor from a1 and b1 of two labs
    and one more (the five kinds, two sites a lab), both sites at once."""
    require_lab()
    cleanup_stale()
    found: dict[str, NatSummary] = {}
    for left, right in (("none", "drop"), ("rst", "icmp"), ("symmetric", "drop")):
        with Lab(left, right) as lab:
            start_rendezvous(lab)
            results: dict[str, object] = {}

            def measure(host: Host, kind: str, into: dict[str, object] = results) -> None:
                into[kind] = run_in(host, lambda: run_doctor(RDV))

            threads = [threading.Thread(target=measure, args=(host, kind))
                       for host, kind in ((lab.a1, left), (lab.b1, right))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            for kind in (left, right):
                report = results[kind]
                summary = NatSummary.from_report(report)  # type: ignore[arg-type]
                assert summary.mapping == MAPPING[kind], (kind, report)
                found.setdefault(kind, summary)
    assert set(found) == set(KINDS)
    yield found


@dataclass
class Side:
    tunnel: PairedTunnel | None = None
    error: BaseException | None = None


def pair_once(sharer: Host, joiner: Host, nats: tuple[NatSummary, NatSummary]) -> tuple[
        PairedTunnel, PairedTunnel]:
    codes: queue.Queue[str] = queue.Queue()
    out = {"sharer": Side(), "joiner": Side()}

    def side(name: str, host: Host, spec: CoordinationSpec) -> None:
        try:
            out[name].tunnel = run_in(host, lambda: coordinate(  # type: ignore[assignment]
                spec, on_code=codes.put), timeout=40)
        except BaseException as exc:
            out[name].error = exc

    a = threading.Thread(target=side, args=("sharer", sharer, CoordinationSpec(
        RDV, "server", code_lifetime=20, punch_timeout=PUNCH_TIMEOUT, nat=nats[0])))
    a.start()
    code = codes.get(timeout=10)
    b = threading.Thread(target=side, args=("joiner", joiner, CoordinationSpec(
        RDV, "client", code=code, punch_timeout=PUNCH_TIMEOUT, nat=nats[1])))
    b.start()
    a.join(45)
    b.join(45)
    s, j = out["sharer"], out["joiner"]
    assert s.tunnel is not None and j.tunnel is not None, (s.error, j.error)
    return s.tunnel, j.tunnel


def expected(sharer: str, joiner: str, same: bool) -> str:
    """What the ladder takes in the lab (bench.scn_matrix.expected_path, with no-NAT sites)."""
    if same and sharer != "none":
        return "lan"
    if "none" in (sharer, joiner):
        return "public"
    return "relay" if "symmetric" in (sharer, joiner) else "public"


LABS = [(left, right) for left, right in itertools.combinations_with_replacement(KINDS, 2)]


@pytest.mark.parametrize(("left", "right"), LABS, ids=[f"{a}-{b}" for a, b in LABS])
def test_the_predicted_path_is_the_path_taken(reports: dict[str, NatSummary], left: str,
                                              right: str) -> None:
    runs: list[tuple[str, str, bool, Host, Host]] = []
    # 10 ms per pass through the internet router, as in the NAT matrix benchmark. (At
    # no delay at all an rst sharer facing an icmp joiner once missed its punch about
    # half the time: a real race of the punch's retries, fixed and proved at 0 ms by
    # test_punch_rtt0_lab.py; see "Near-zero round trips" in docs/protocol.md.)
    with Lab(left, right, delay_ms=DELAY_MS) as lab:
        server = start_rendezvous(lab)
        runs.append((left, right, False, lab.a1, lab.b1))
        if left != right:
            runs.append((right, left, False, lab.b1, lab.a1))
        else:
            runs.append((left, left, True, lab.a1, lab.a2))
        seen: list[tuple[str, Prediction, str]] = []
        for sharer_kind, joiner_kind, same, sharer, joiner in runs:
            t0 = time.monotonic()
            s, j = pair_once(sharer, joiner, (reports[sharer_kind], reports[joiner_kind]))
            try:
                label = f"{'same ' if same else ''}{sharer_kind} × {joiner_kind}"
                assert s.prediction is not None and s.prediction == j.prediction, label
                assert s.prediction.certain, label
                assert s.path == j.path == expected(sharer_kind, joiner_kind, same), (
                    label, s.path, j.path)
                assert s.prediction.path == s.path, (label, s.prediction, s.path)
                seen.append((label, s.prediction, s.path))
            finally:
                s.sock.close()
                j.sock.close()
            assert time.monotonic() - t0 < PUNCH_TIMEOUT + 3
        server.terminate()
        _, err = server.communicate(timeout=10)
    # The rendezvous predicted the same, one INFO line per pairing, in order.
    logged = re.findall(r"predicted path (\w+): ", err.decode())
    assert logged == [p.path for _, p, _ in seen], err.decode()[-2000:]

