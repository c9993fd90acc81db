"""Tunnels that survive path changes, in the namespace lab, with the real programs
(``nopf share`` / ``nopf connect`` and ``nopf-server``):

- a NAT that flushes its connection tracking and moves to new public ports in the
  middle of several transfers: every byte arrives, no connection is reset, and the
  event log says the tunnel resumed;
- a relayed tunnel (the direct path cut) whose direct path opens again moves to it
  while the transfers go on, and the rendezvous host then carries none of its bytes;
- ``nopf-server`` killed with SIGKILL: a direct tunnel goes on and carries new
  connections, and a new pair meets once it is back; a relayed tunnel (whose relay
  connection died with the server) resumes through the restarted server.
"""

from __future__ import annotations

import contextlib
import re
import signal
import time

import pytest

from tests.lab import Host, Lab
from tests.lab.fixtures import LabFactory

from .flows import Flows
from .peers import (
    Peer,
    close,
    echo_once,
    echo_service_on,
    path_lines,
    start_coordinated,
    start_rendezvous,
    wait_for,
)

pytestmark = pytest.mark.lab

PORT = 3012
FLOWS = 6
SIZE = 12 * 1024 * 1024  # each way, per flow


def start(host: Host, *args: str, extra: tuple[str, ...] = ()) -> Peer:
    return start_coordinated(host, *args, extra=("--resume-budget", "30", *extra))


def pair(lab: Lab, sharer: Host, joiner: Host, *, port: int = 3000, local: int = 3010,
         extra: tuple[str, ...] = ()) -> tuple[Peer, Peer]:
    s = start(sharer, "share", "-p", str(port), extra=extra)
    c = start(joiner, "connect", s.line(10), "-p", str(local), extra=extra)
    for peer in (s, c):
        wait_for(peer, "encrypted tunnel to")
    return s, c


def test_a_nat_rebind_mid_transfer_loses_no_byte_and_resets_no_connection(
        lab_factory: LabFactory) -> None:
    lab = lab_factory("drop", "rst", delay_ms=5)
    start_rendezvous(lab)
    s, c = pair(lab, lab.a1, lab.b1)
    flows = Flows(lab.a1, 3000, lab.b1, 3010, FLOWS, SIZE).start()
    try:
        flows.wait_received(FLOWS * SIZE // 2, timeout=60)  # a quarter of it all
        key = lab.rebind("a")  # the sharer's NAT: new public ports, every mapping gone
        flows.join(120)
        flows.check()  # every byte, both ways, and no connection reset
    finally:
        flows.join(5)
    for peer in (s, c):
        err = wait_for(peer, "resumed over")
        assert "the public path was lost (" in err, err
        assert re.search(r"resumed over the public path in \d+\.\d s", err), err
    # The new path goes through the sharer's new public port (local port XOR key).
    new_peer = re.findall(r"a new connection over the public path to ([\d.]+):(\d+)",
                          c.stderr())
    assert new_peer and new_peer[-1][0] == lab.a.public_ip, c.stderr()
    assert key in (0x2000, 0x4000)
    print(f"\n{path_lines(s)}\n{path_lines(c)}")
    close(c, s)


def test_a_relayed_tunnel_moves_to_the_direct_path_once_it_opens_while_streams_run(
        lab_factory: LabFactory) -> None:
    lab = lab_factory("drop", "drop", delay_ms=5)
    lab.block_direct()  # the punch fails: the ladder takes the relay
    start_rendezvous(lab)
    s, c = pair(lab, lab.a1, lab.b1, extra=("--retry-direct", "1"))
    for peer in (s, c):
        assert "over the relay at 198.51.100.2:3012" in peer.stderr()
    relay = lab.tcp_counter(lab.rdv, PORT)
    flows = Flows(lab.a1, 3000, lab.b1, 3010, FLOWS, None, pace=0.005).start()
    try:
        flows.wait_received(2 << 20, timeout=30)
        assert relay.read()[1] > 1 << 20  # the tunnel's bytes cross the relay host
        for peer in (s, c):  # a try while the direct path is still cut: it fails
            wait_for(peer, "no direct path yet: ", timeout=20)
        lab.unblock_direct()
        for peer in (s, c):  # the next one (2 s after the first) gets through
            err = wait_for(peer, "back to direct (public) after", timeout=40)
            assert re.search(r"back to direct \(public\) after \d+\.\d s over the relay", err)
        # The relay connection closes after the switch (within the 2 s grace, or at
        # once); from then on the rendezvous host sees nothing of the tunnel.
        time.sleep(4.5)
        before, moving = relay.read(), flows.received()
        time.sleep(2.0)
        after = relay.read()
        assert flows.received() - moving > 1 << 20, "the streams stalled"
        assert after == before, f"the rendezvous host carried {after[1] - before[1]} bytes"
        flows.stop()
        flows.join(60)
        flows.check()
    finally:
        flows.join(5)
        relay.close()
    print(f"\n{path_lines(s)}\n{path_lines(c)}")
    close(c, s)


def test_nopf_server_killed_a_direct_tunnel_goes_on_and_a_new_pair_meets_after_restart(
        lab_factory: LabFactory) -> None:
    lab = lab_factory("drop", "icmp", delay_ms=5)
    server = start_rendezvous(lab)
    with contextlib.ExitStack() as services:
        for host, port in ((lab.a1, 3001), (lab.a2, 3002)):
            services.enter_context(echo_service_on(host, port))
        s, c = pair(lab, lab.a1, lab.b1, port=3001)
        echo_once(lab.b1, 3010)
        server.send_signal(signal.SIGKILL)
        server.wait(5)
        time.sleep(3)  # beyond a probe and its verdict (2 s at this RTT): no loss
        for _ in range(3):
            echo_once(lab.b1, 3010)  # new connections through the tunnel
        for peer in (s, c):
            assert "was lost" not in peer.stderr() and peer.proc.poll() is None
        start_rendezvous(lab)
        s2, c2 = pair(lab, lab.a2, lab.b2, port=3002)  # a new pair meets
        echo_once(lab.b2, 3010)
        close(c2, s2)
        echo_once(lab.b1, 3010)
        close(c, s)


def test_a_relayed_tunnel_resumes_through_the_restarted_server(
        lab_factory: LabFactory) -> None:
    lab = lab_factory("symmetric", "symmetric", delay_ms=5)
    server = start_rendezvous(lab)
    s, c = pair(lab, lab.a1, lab.b1)
    flows = Flows(lab.a1, 3000, lab.b1, 3010, 3, None, pace=0.005).start()
    try:
        flows.wait_received(1 << 20, timeout=30)
        server.send_signal(signal.SIGKILL)  # the relay connections die with it
        server.wait(5)
        for peer in (s, c):
            wait_for(peer, "the relay was lost (")
            wait_for(peer, "resume attempt failed: rendezvous 198.51.100.2:3012")
        start_rendezvous(lab)
        for peer in (s, c):
            err = wait_for(peer, "resumed over the relay in", timeout=20)
            assert re.search(r"resumed over the relay in \d+\.\d s \(\d+ tries\)", err), err
        moving = flows.received()
        flows.wait_received(moving + (1 << 20), timeout=20)
        flows.stop()
        flows.join(60)
        flows.check()
    finally:
        flows.join(5)
    print(f"\n{path_lines(s)}\n{path_lines(c)}")
    close(c, s)
