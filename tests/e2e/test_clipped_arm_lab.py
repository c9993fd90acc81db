"""A peer's SYN that meets our arming socket before its low TTL is restored.

The arming SYN leaves with TTL 2 and the driver restores the default right after
``connect()``; a peer SYN arriving in between (microseconds, but at ~0 ms RTT with
both peers starting together about one seed-mode punch in 50-100 did) is answered
with a SYN-ACK that still carries TTL 2 and dies at the first router. Before the
fix the punch then never connected: the peer replaced its socket before our
kernel resent the SYN-ACK (1 s), our NAT tracked the pair in SYN_RECV and dropped
every new SYN of it (the peer's, and ours: invalid), and the abandoned socket
lingered in FIN_WAIT1 (its FIN dropped by the guard) holding the pair, so every
re-arm failed with EADDRNOTAVAIL.

To hit the window every time, the test holds the server's thread for 0.65 s right
after its first arming ``connect()`` (longer than the client's 0.5 s between SYNs,
so one of them surely arrives meanwhile); everything else is real: nopf's punch
driver on both sides, the pydivert guard on both, drop NATs, no delay.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from nopf_web.punch import driver
from nopf_web.punch.machine import PunchConfig, Tactic
from nopf_web.sockets import RESET_TTL, start_connect
from tests.e2e.guard_harness import NatCounters, Side, close_rules, punch_pair, rendezvous
from tests.lab.fixtures import LabFactory

pytestmark = pytest.mark.lab

ARM_TTL = PunchConfig().arm_ttl


def test_a_synack_clipped_by_the_arming_ttl_recovers_with_one_reset(
        lab_factory: LabFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    lab = lab_factory("drop", "drop")
    held = threading.Event()

    def start_then_hold(sock: socket.socket, addr: tuple[str, int]) -> None:
        start_connect(sock, addr)
        if sock.getsockopt(socket.IPPROTO_IP, socket.IP_TTL) == ARM_TTL and not held.is_set():
            held.set()  # only the server's first arm: its TTL is still the arming one
            time.sleep(0.65)

    monkeypatch.setattr(driver, "start_connect", start_then_hold)
    config = PunchConfig(timeout=8)
    # Counted where a1's and b1's packets enter their NATs: what left each host (the
    # forward hook sees the TTL already decremented by the NAT).
    reset = f"ip saddr {lab.a1.ip} ip ttl {RESET_TTL - 1} tcp flags & rst == rst"
    with rendezvous(lab.rdv) as rdv, \
            NatCounters(lab.nata, close_rules(lab.a1.ip, not_dst=lab.rdv.ip)
                        | {"reset": reset}) as ca, \
            NatCounters(lab.natb, close_rules(lab.b1.ip, not_dst=lab.rdv.ip)) as cb:
        result = punch_pair(Side(lab.a1, Tactic.ARM, True, 0.0, config),
                            Side(lab.b1, Tactic.CONNECT, True, 0.0, config), rdv)
        time.sleep(0.3)
        a, b = ca.read(), cb.read()
    assert held.is_set()
    for side in (result.server, result.client):
        assert side.guarded, side.guard_error
        assert side.ok and side.echoed, (side.error, side.outcomes)
    # The clipped attempt's socket was reset with the marked TTL, which the guard let
    # pass (the one RST a1 sent the peer); every other RST stayed behind both guards.
    assert a["reset"] == 1 and a["rst"] == 1, a
    assert b["rst"] == 0, b
