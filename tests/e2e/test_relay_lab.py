"""The relay in the namespace lab: peers behind NATs that hole punching cannot
connect get relay plans from the real ``nopf-server`` and are joined through it.

Raw clients (tests/e2e/relay_clients.py: the NAT mapping check, a relay-capable
hello, the relay message), no tunnel yet. A capture on the rendezvous host shows
the relay adds nothing and reads nothing: each relay connection carries, from
the client, its relay message and then exactly the bytes sent; to the client,
the seed reply, ``relayed``, then exactly the other peer's bytes.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from nopf_web.wire.address import Endpoint
from nopf_web.wire.discovery import REPLY_SIZE
from nopf_web.wire.rendezvous import Relay, encode
from tests.lab.fixtures import LabFactory

from .pcap import read_streams
from .peers import start_rendezvous
from .relay_clients import RELAYED, receive_all, relayed_pair, send_and_close

pytestmark = pytest.mark.lab

PORT = 3012


@pytest.mark.parametrize(("left", "right"), [("symmetric", "symmetric"),
                                             ("symmetric", "rst")])
def test_peers_no_punch_can_connect_are_relayed_and_the_relay_adds_and_reads_nothing(
        lab_factory: LabFactory, left: str, right: str, tmp_path: Path) -> None:
    lab = lab_factory(left, right)
    start_rendezvous(lab)
    capture = tmp_path / "rdv.pcap"
    dump = lab.rdv.popen(["tcpdump", "-i", "eth0", "-s", "0", "-B", "32768", "-U", "-n",
                          "--immediate-mode",
                          "-w", str(capture), "tcp", "port", str(PORT)],
                         stderr=subprocess.PIPE)
    assert dump.stderr is not None
    assert "listening on" in dump.stderr.readline().decode()

    pair = relayed_pair(lab.a1, lab.b1, (lab.rdv.ip, PORT))
    fs, fj = pair.sharer_fire, pair.joiner_fire
    # Unpunchable: the relay at once, at the address each reached the rendezvous on.
    assert fs.mapping == ("symmetric", "symmetric" if right == "symmetric" else "stable")
    assert fs.hopeless and fj.hopeless
    assert fs.plan == fj.plan == ()
    assert fs.relay is not None and fj.relay is not None
    assert fs.relay.relay == fj.relay.relay == Endpoint(lab.rdv.ip, PORT)
    assert pair.seconds < 5, pair.seconds
    a, b = pair.sharer, pair.joiner
    to_b, to_a = os.urandom(3 << 20), os.urandom(2 << 20)
    out: dict[str, object] = {}
    movers = [
        threading.Thread(target=lambda: out.update(ab=send_and_close(a, to_b))),
        threading.Thread(target=lambda: out.update(b=receive_all(b))),
        threading.Thread(target=lambda: out.update(ba=send_and_close(b, to_a))),
        threading.Thread(target=lambda: out.update(a=receive_all(a))),
    ]
    for t in movers:
        t.start()
    for t in movers:
        t.join(60)
    a.close()
    b.close()
    assert out["b"][:2] == (hashlib.sha256(to_b).hexdigest(), len(to_b))  # type: ignore[index]
    assert out["a"][:2] == (hashlib.sha256(to_a).hexdigest(), len(to_a))  # type: ignore[index]

    time.sleep(0.3)  # the last ACKs and FINs
    dump.terminate()
    _, err = dump.communicate(timeout=10)
    # Every segment the streams need is checked below (a gap fails): none may be lost.
    assert "\n0 packets dropped by kernel" in err.decode(), err.decode()
    streams = read_streams(capture)

    def relay_streams(token: bytes) -> tuple[tuple[str, int], bytes, bytes]:
        """(client address, client -> relay bytes, relay -> client bytes) of the
        connection that presented ``token``."""
        hello = encode(Relay(token))
        found = [(f, i) for f, of_flow in streams.items() for i, s in enumerate(of_flow)
                 if f[3] == PORT and s.isn is not None
                 and s.segments and s.data().startswith(hello)]
        ((flow, i),) = found
        back = streams[(flow[2], flow[3], flow[0], flow[1])][i]
        return (flow[0], flow[1]), streams[flow][i].data(), back.data()

    (a_ip, _), a_up, a_down = relay_streams(fs.relay.token)
    (b_ip, _), b_up, b_down = relay_streams(fj.relay.token)
    assert (a_ip, b_ip) == (lab.a.public_ip, lab.b.public_ip)  # the NATs' addresses
    # From each client: its relay message, then exactly what it sent.
    assert a_up == encode(Relay(fs.relay.token)) + to_b
    assert b_up == encode(Relay(fj.relay.token)) + to_a
    # To each client: the seed reply, "relayed", then exactly what the other sent.
    for down, payload in ((a_down, to_a), (b_down, to_b)):
        assert down[REPLY_SIZE - 4:REPLY_SIZE] == b"END\x00"
        assert down[REPLY_SIZE:] == RELAYED + payload
