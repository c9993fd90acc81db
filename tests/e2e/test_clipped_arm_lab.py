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

To hit a window every time, the test holds the server's thread right after its
first arming ``connect()`` for 0.65 s (longer than the client's 0.5 s between
SYNs, so one of them surely arrives meanwhile), or right after restoring its TTL
until a SYN has arrived;
everything else is real: nopf's punch driver on both sides, the pydivert guard on
both, drop NATs, no delay.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from nopf_web.punch import driver
from nopf_web.punch.machine import PunchConfig, Tactic
from nopf_web.sockets import (
    DEFAULT_TTL,
    RESET_TOS,
    TCP_SYN_RECV,
    set_ttl,
    start_connect,
    tcp_state,
)
from tests.e2e.guard_harness import NatCounters, Side, close_rules, punch_pair, rendezvous
from tests.lab.fixtures import LabFactory

pytestmark = pytest.mark.lab

ARM_TTL = PunchConfig().arm_ttl


@pytest.mark.parametrize(("hold", "resets"), [("before", 1), ("after", 0)])
def test_a_peer_syn_around_the_ttl_restore_connects(
        lab_factory: LabFactory, monkeypatch: pytest.MonkeyPatch, hold: str,
        resets: int) -> None:
    """``before``: the peer's SYN meets the arming socket before its TTL is restored,
    so our SYN-ACK expires: after clip_grace the socket is reset (the one RST a1
    sends, marked, past its guard, with the arming TTL) and a re-arm connects. ``after``:
    it comes between the restore and the driver's look at the socket, so the
    SYN-ACK leaves at full TTL and the driver cannot tell the two apart: the
    handshake completes within the grace, and nothing is reset (an immediate reset
    would kill the connection the peer already has)."""
    # 25 ms a hop: the peer's ACK comes ~50 ms after our SYN-ACK, well within the grace.
    lab = lab_factory("drop", "drop", delay_ms=25)
    held = threading.Event()

    def start_then_hold(sock: socket.socket, addr: tuple[str, int]) -> None:
        start_connect(sock, addr)
        ttl = sock.getsockopt(socket.IPPROTO_IP, socket.IP_TTL)
        if ttl == ARM_TTL and not held.is_set():  # only the server's first arm
            held.set()
            time.sleep(0.65)

    def restore_then_hold(sock: socket.socket, ttl: int) -> None:
        set_ttl(sock, ttl)
        if ttl == DEFAULT_TTL and not held.is_set():  # the first arm's TTL just restored
            held.set()
            # Until the peer's SYN arrives (its next comes within 0.5 s): the SYN-ACK
            # leaves at full TTL, and the driver then finds the socket mid-handshake.
            deadline = time.monotonic() + 2
            while tcp_state(sock) != TCP_SYN_RECV and time.monotonic() < deadline:
                time.sleep(0.001)
            assert tcp_state(sock) == TCP_SYN_RECV

    if hold == "before":
        monkeypatch.setattr(driver, "start_connect", start_then_hold)
    else:
        monkeypatch.setattr(driver, "set_ttl", restore_then_hold)
    config = PunchConfig(timeout=8)
    # Counted where a1's and b1's packets enter their NATs: what left each host. The
    # reset is marked, and sent with the arming TTL (the forward hook sees it already
    # decremented by the NAT): it dies at the next router, never reaching b's NAT.
    reset = (f"ip saddr {lab.a1.ip} ip dscp {RESET_TOS >> 2} ip ttl {ARM_TTL - 1} "
             "tcp flags & rst == rst")
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
    # Every other RST stayed behind both guards.
    assert a["reset"] == a["rst"] == resets, a
    assert b["rst"] == 0, b
