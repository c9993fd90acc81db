"""A coordinated first shot refused by the peer's NAT must still connect.

In coordinated mode both peers fire a SYN at the rendezvous' signal. When ours
reaches the peer's NAT a few ms before the peer's own SYN has left it, a NAT
that refuses with ICMP (lab mode ``icmp``) answers, and the kernel would abort
our socket. The peer's SYN then arrives at our NAT, which now tracks a
simultaneous open with our dead socket's sequence number, and marks every
later SYN from our port (a new socket, a new ISN) invalid: both punches time
out. This test forces that order (our SYN first, the peer's 50 ms later) with
no delay or loss in the lab, so its outcome does not depend on chance.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest

from nopf_web.punch.driver import PunchDriver
from nopf_web.punch.machine import PunchConfig, PunchTimeout, Tactic
from tests.lab import Host
from tests.lab.fixtures import LabFactory

pytestmark = pytest.mark.lab

PORT_A, PORT_B = 41000, 42000  # local punch ports; the lab's NATs keep them
TIMEOUT = 3.0  # s per punch: the refused-then-poisoned case never connects at all


def _min_ttl_drops(host: Host) -> int:
    """The host's count of packets and ICMP errors ignored because of IP_MINTTL."""
    lines = host.run(["cat", "/proc/net/netstat"]).stdout.decode().splitlines()
    names, values = next((a.split(), b.split()) for a, b in zip(lines[::2], lines[1::2],
                                                                strict=True)
                         if a.startswith("TcpExt:"))
    return int(values[names.index("TCPMinTTLDrop")])


class _Side(threading.Thread):
    def __init__(self, host: Host, local_port: int, peer: tuple[str, int], role: Tactic,
                 go: threading.Event | None, fired: threading.Event) -> None:
        super().__init__(daemon=True, name=f"punch-{host.name}")
        self.host, self.local_port, self.peer, self.role = host, local_port, peer, role
        self.go, self.fired = go, fired
        self.sock: socket.socket | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        config = PunchConfig(timeout=TIMEOUT, first_shot=True)

        def attempt(n: int, ttl: int | None) -> None:
            if n == 1:
                self.fired.set()

        try:
            with self.host.enter():
                if self.go is not None:
                    assert self.go.wait(10), "the other side never fired"
                    time.sleep(0.05)  # its SYN has been refused by our NAT by now
                driver = PunchDriver(("0.0.0.0", self.local_port), self.peer, self.role,
                                     config, on_attempt=attempt)
                self.sock = asyncio.run(driver.run())
        except (PunchTimeout, OSError, AssertionError) as exc:
            self.error = exc


def test_first_shot_refused_with_icmp_before_the_peer_fires_still_connects(
    lab_factory: LabFactory,
) -> None:
    lab = lab_factory("icmp", "icmp")
    pub_a, pub_b = lab.site("a").public_ip, lab.site("b").public_ip
    ignored_before = _min_ttl_drops(lab.b1)
    b_fired, a_fired = threading.Event(), threading.Event()
    # b1 fires first: its SYN reaches natA before a1 has opened it, and is refused.
    b = _Side(lab.b1, PORT_B, (pub_a, PORT_A), Tactic.CONNECT, None, b_fired)
    a = _Side(lab.a1, PORT_A, (pub_b, PORT_B), Tactic.ARM, b_fired, a_fired)
    a.start()
    b.start()
    for side in (a, b):
        side.join(TIMEOUT + 15)
        assert not side.is_alive(), f"{side.name} still punching"
    try:
        assert a.error is None and b.error is None, (a.error, b.error)
        assert a.sock is not None and b.sock is not None
        # The refusal reached b1 and was ignored, rather than aborting its socket.
        assert _min_ttl_drops(lab.b1) > ignored_before
        # One connection, end to end: bytes cross both ways.
        for x, y in ((a.sock, b.sock), (b.sock, a.sock)):
            x.setblocking(True)
            y.setblocking(True)
            y.settimeout(5)
            x.sendall(b"punched")
            assert y.recv(16) == b"punched"
    finally:
        for s in (a.sock, b.sock):
            if s is not None:
                s.close()
