"""The real programs punching through the namespace lab's NATs.

The NAT-pair matrix here is the one documented in docs/nat-matrix.md
(regenerate with ``python -m bench.nat_matrix``).
"""

from __future__ import annotations

import contextlib
import itertools
import signal
import socket
import time
from collections.abc import Iterator

import pytest

from tests.lab import Lab
from tests.lab.fixtures import LabFactory
from tests.programs import argv

from .peers import Exchange, Pair, connect, listening, punch_pair, start_rendezvous

pytestmark = pytest.mark.lab

PUNCHABLE = ("drop", "rst", "icmp", "none")


@contextlib.contextmanager
def piped(lab: Lab, app_timeout: float = 10) -> Iterator[tuple[Pair, socket.socket,
                                                              socket.socket]]:
    """The lab's rendezvous and a seed pair punched in front of a service on a1:3000;
    yields the pair, an application connected at b1:3010 and the service's end of that
    connection (both closed on exit)."""
    start_rendezvous(lab)
    with listening(lab.a1, 3000) as service:
        pair = punch_pair(lab)
        assert pair.server.line(20).startswith("Started pipe"), pair.server.stderr()
        app = connect(lab.b1, 3010, timeout=app_timeout)
        conn, _ = service.accept()
        with app, conn:
            yield pair, app, conn


@pytest.mark.parametrize(("left", "right"), list(itertools.product(PUNCHABLE, repeat=2)))
def test_seed_order_connects_every_punchable_nat_pair(
    lab_factory: LabFactory, left: str, right: str
) -> None:
    lab = lab_factory(left, right)
    start_rendezvous(lab)
    with listening(lab.a1, 3000) as service:
        pair = punch_pair(lab)
        started = pair.server.line(20)
        assert started == f"Started pipe between localhost:3000 - {pair.client_public}", (
            pair.server.stderr(), pair.client.stderr())
        app = connect(lab.b1, 3010)
        assert pair.client.line(10) == f"Started pipe between localhost:3010 - {pair.server_public}"
        conn, _ = service.accept()
        app.sendall(b"ping through two NATs")
        assert conn.recv(100) == b"ping through two NATs"
        conn.sendall(b"pong")
        assert app.recv(100) == b"pong"
        app.close()
        conn.close()
    assert pair.server.wait(10) == 0
    assert pair.client.wait(10) == 0


@pytest.mark.parametrize(("left", "right"), [("rst", "rst"), ("icmp", "drop"), ("drop", "rst")])
def test_client_may_enter_first_seconds_ahead(
    lab_factory: LabFactory, left: str, right: str
) -> None:
    lab = lab_factory(left, right)
    start_rendezvous(lab)
    with listening(lab.a1, 3000):
        pair = punch_pair(lab, order="client-first", gap=3.0)
        assert pair.server.line(20).startswith("Started pipe"), pair.server.stderr()
        pair.server.proc.send_signal(signal.SIGTERM)
        pair.client.proc.send_signal(signal.SIGTERM)


def test_with_delay_and_jitter(lab_factory: LabFactory) -> None:
    lab = lab_factory("rst", "icmp", delay_ms=20, jitter_ms=5)
    start_rendezvous(lab)
    with listening(lab.a1, 3000):
        pair = punch_pair(lab, gap=0.5)
        assert pair.server.line(20).startswith("Started pipe"), pair.server.stderr()


def test_symmetric_nats_fail_within_the_timeout_naming_the_cause(lab_factory: LabFactory) -> None:
    lab = lab_factory("symmetric", "symmetric")
    start_rendezvous(lab)
    t0 = time.monotonic()
    pair = punch_pair(lab, timeout=4, gap=0.2)
    codes = pair.server.wait(15), pair.client.wait(15)
    assert time.monotonic() - t0 < 12
    assert codes == (1, 1)
    for peer in (pair.server, pair.client):
        err = peer.stderr()
        assert "Traceback" not in err
        assert "symmetric" in err and "within 4 s" in err
    # Each side asked the rendezvous twice from one port and got two public ports.
    for peer in (pair.server, pair.client):
        assert "your NAT is symmetric" in peer.stderr()


def test_64_mib_each_way_at_once_intact(lab_factory: LabFactory) -> None:
    size = 64 * 1024 * 1024
    with piped(lab_factory("drop", "drop"), app_timeout=60) as (pair, app, conn):
        conn.settimeout(60)
        at_app = Exchange(app, size)
        at_service = Exchange(conn, size)
        at_app.join(120)
        at_service.join(120)
        assert at_service.received_bytes == size == at_app.received_bytes
        assert at_service.received.hexdigest() == at_app.sent.hexdigest()
        assert at_app.received.hexdigest() == at_service.sent.hexdigest()
    assert pair.server.wait(10) == 0 and pair.client.wait(10) == 0


def test_half_close_keeps_the_other_direction_flowing(lab_factory: LabFactory) -> None:
    with piped(lab_factory("drop", "rst")) as (pair, app, conn):
        conn.settimeout(30)
        # The app sends 1 MiB and half-closes; the service answers only after EOF.
        at_service = Exchange(conn, 0, reply_after_eof=True)
        at_app = Exchange(app, 1 << 20)
        at_app.join(30)
        at_service.join(30)
        assert at_app.tail.decode() == at_app.sent.hexdigest()
    assert pair.server.wait(10) == 0 and pair.client.wait(10) == 0


def test_peer_killed_mid_transfer_fails_the_other_side_clearly(lab_factory: LabFactory) -> None:
    # The service accepts and never reads: buffers fill up.
    with piped(lab_factory("drop", "drop")) as (pair, app, _service):
        app.settimeout(0.2)
        sent = 0
        try:
            while sent < 256 << 20:
                sent += app.send(b"\0" * 65536)
        except TimeoutError:
            pass  # everything is full; the server's tunnel socket has unread data
        pair.server.proc.send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        assert pair.client.wait(30) == 1
        assert time.monotonic() - t0 < 30
        err = pair.client.stderr()
        assert "Traceback" not in err
        assert "lost mid-transfer" in err and pair.server_public in err


def test_local_service_not_listening(lab_factory: LabFactory) -> None:
    lab = lab_factory("drop", "drop")
    start_rendezvous(lab)
    pair = punch_pair(lab)
    assert pair.server.wait(30) == 1
    assert pair.client.wait(30) == 1
    assert "cannot reach the local service at 127.0.0.1:3000" in pair.server.stderr()
    assert "closed the tunnel before a local application connected" in pair.client.stderr()


@pytest.mark.parametrize(
    ("target", "needle"),
    [("198.51.100.99:3012", "rendezvous 198.51.100.99:3012"),  # no such host on the link
     ("198.51.100.2:3999", "connection refused")],
)
def test_rendezvous_unreachable_from_behind_a_nat(
    lab_factory: LabFactory, target: str, needle: str
) -> None:
    lab = lab_factory("drop", "drop")
    t0 = time.monotonic()
    proc = lab.a1.run(argv("nopf", "-p", "3000", "-a", target), check=False, timeout=30)
    assert time.monotonic() - t0 < 12
    err = proc.stderr.decode()
    assert proc.returncode == 1 and "Traceback" not in err
    (line,) = [x for x in err.splitlines() if "error:" in x]
    assert needle in line


def test_rendezvous_black_hole_times_out_saying_what_it_waited_for(
    lab_factory: LabFactory,
) -> None:
    lab = lab_factory("drop", "drop")
    lab.rdv.run(["nft", "add table ip bh; add chain ip bh in { type filter hook input "
                 "priority 0; policy drop; }"])
    proc = lab.a1.run(argv("nopf", "-p", "3000", "-a", "198.51.100.2:3012"), check=False,
                      timeout=30)
    err = proc.stderr.decode()
    assert proc.returncode == 1 and "Traceback" not in err
    assert "did not answer the connection within 5 s" in err
