"""``nopf share`` / ``nopf connect`` (the real programs) through the namespace lab.

Encryption is checked from the outside: a capture on the lab's internet
router must never contain the plaintext, while the same capture does contain
it in seed mode (so the capture itself is proven to work).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from nopf_web.pairing_words import WORDS
from tests.lab import Host, Lab
from tests.lab.fixtures import LabFactory
from tests.loopback import tcp_service

from .peers import (
    Peer,
    connect,
    echo_once,
    echo_service_on,
    listening,
    punch_pair,
    start_coordinated,
    start_rendezvous,
    wait_for,
)

pytestmark = pytest.mark.lab

MARKER = b"nopf-plaintext-marker-7f3a9c"


def start(host: Host, *args: str) -> Peer:
    return start_coordinated(host, *args, keepalive=1)


def share_and_connect(lab: Lab, sharer: Host, joiner: Host, code: str | None = None,
                      ) -> tuple[Peer, Peer]:
    s = start(sharer, "share", "-p", "3000")
    real = s.line(10)
    assert real, s.stderr()
    c = start(joiner, "connect", code or real, "-p", "3010")
    return s, c


def wait_connected(peer: Peer, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "encrypted tunnel to" in peer.stderr():
            return
        if peer.proc.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"{peer.role} did not connect: {peer.stderr()}")


@contextmanager
def capture(lab: Lab) -> Iterator[list[bytes]]:
    """Every TCP payload byte crossing the internet router, as raw pcap."""
    path = tempfile.mktemp(suffix=".pcap")
    # --immediate-mode: libpcap would otherwise hold packets in its ring buffer
    # until a block fills or times out, and lose the last second on exit.
    proc = lab.inet.popen(["tcpdump", "--immediate-mode", "-U", "-s", "0", "-i", "any",
                           "-w", path, "tcp"], stderr=subprocess.DEVNULL)
    time.sleep(0.5)  # tcpdump attaches
    out: list[bytes] = []
    try:
        yield out
    finally:
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        proc.wait(10)
        with open(path, "rb") as f:
            out.append(f.read())
        os.unlink(path)


def test_share_connect_200_streams_encrypted_on_the_wire(lab_factory: LabFactory) -> None:
    lab = lab_factory("rst", "icmp", delay_ms=10, jitter_ms=3)
    start_rendezvous(lab)
    with contextlib.ExitStack() as services:
        services.enter_context(echo_service_on(lab.a1, 3000))
        with capture(lab) as pcap:
            s, c = share_and_connect(lab, lab.a1, lab.b1)
            wait_connected(c)
            assert f"tunnel up to {lab.a.public_ip}:" in c.stderr()
            assert "over the public path" in c.stderr()  # punched: no relay needed
            failures: list[str] = []

            def stream(i: int) -> None:
                try:
                    sock = connect(lab.b1, 3010, timeout=60)
                    data = MARKER + os.urandom(64 * 1024)
                    got = bytearray()

                    def read_all() -> None:
                        while chunk := sock.recv(65536):
                            got.extend(chunk)

                    reader = threading.Thread(target=read_all)
                    reader.start()
                    sock.sendall(data)
                    sock.shutdown(socket.SHUT_WR)
                    reader.join(60)
                    sock.close()
                    if hashlib.sha256(got).digest() != hashlib.sha256(data).digest():
                        failures.append(f"stream {i}: {len(got)} of {len(data)} bytes echoed")
                except OSError as exc:
                    failures.append(f"stream {i}: {exc}")

            threads = [threading.Thread(target=stream, args=(i,)) for i in range(200)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            assert not failures, failures[:5]
            c.proc.send_signal(signal.SIGINT)
            assert c.wait(10) == 0
            assert s.wait(10) == 0  # the sharer ends when its peer closes
        (raw,) = pcap
        assert len(raw) > 200 * 64 * 1024  # the capture did see the traffic...
        assert MARKER not in raw  # ...and never the plaintext


def test_two_services_one_on_the_lan_reached_from_the_other_sides_lan(
        lab_factory: LabFactory) -> None:
    # The sharer a1 shares a2's echo service (a NAS on its LAN, say) and one of its own
    # over one code. The connector b1 listens on all its addresses for the first, so
    # its LAN neighbour b2 uses the tunnel as well as b1 itself, and on loopback for
    # the second; its third port has no service behind it.
    lab = lab_factory("rst", "drop")
    start_rendezvous(lab)

    def tag(conn: socket.socket) -> None:
        conn.sendall(b"a1 says: " + conn.recv(64))

    with echo_service_on(lab.a2, 3000, lan=True), contextlib.ExitStack() as own:
        with lab.a1.enter():
            own.enter_context(tcp_service(tag, 3001))
        s = start(lab.a1, "share", "-p", f"{lab.a2.ip}:3000", "-p", "3001")
        code = s.line(10)
        assert code, s.stderr()
        c = start(lab.b1, "connect", code, "-p", "0.0.0.0:3010", "-p", "3011", "-p", "3012")
        try:
            wait_connected(c)
            assert ("nopf: listening on 0.0.0.0:3010: other machines that can reach this "
                    "one can use the tunnel too") in c.stderr()
            assert ("connect your applications to 0.0.0.0:3010 (service 1), "
                    "127.0.0.1:3011 (service 2), 127.0.0.1:3012 (service 3)") in c.stderr()
            echo_once(lab.b2, 3010, to=lab.b1.ip)
            echo_once(lab.b1, 3010)
            with connect(lab.b1, 3011) as sock:
                sock.sendall(b"hello")
                assert sock.recv(64) == b"a1 says: hello"
            with connect(lab.b1, 3012) as sock:  # closed: the sharer has no third service
                sock.sendall(b"hello")
                with contextlib.suppress(ConnectionResetError):
                    assert sock.recv(64) == b""
            wait_for(c, "connections to 127.0.0.1:3012 are refused: the sharer shares 2 "
                     "services: there is no service 3")
            assert (f"nopf connect {code} -p PORT -p PORT (a port for each of the 2 services, "
                    "in order)") in s.stderr()
            assert (f"the peer's connections arrive at {lab.a2.ip}:3000 (service 1), "
                    "127.0.0.1:3001 (service 2)") in s.stderr()
            assert "listening on" not in s.stderr()
        finally:
            c.proc.send_signal(signal.SIGINT)
        assert c.wait(10) == 0
        assert s.wait(10) == 0


def test_seed_mode_plaintext_is_visible_to_the_same_capture(lab_factory: LabFactory) -> None:
    lab = lab_factory("drop", "drop")
    start_rendezvous(lab)
    with listening(lab.a1, 3000) as service, capture(lab) as pcap:
        pair = punch_pair(lab)
        assert pair.server.line(20).startswith("Started pipe")
        app = connect(lab.b1, 3010)
        conn, _ = service.accept()
        app.sendall(MARKER)
        assert conn.recv(100) == MARKER
        app.close()
        conn.close()
    assert MARKER in pcap[0]


def test_wrong_code_fails_on_both_sides_and_nothing_flows(lab_factory: LabFactory) -> None:
    lab = lab_factory("drop", "rst")
    start_rendezvous(lab)
    with listening(lab.a1, 3000) as service:
        s = start(lab.a1, "share", "-p", "3000")
        code = s.line(10)
        nameplate, *words = code.split("-")
        # Valid words from the list, but not the sharer's: only the PAKE can tell.
        wrong = "-".join([nameplate, *(w for w in WORDS if w not in words)][:3])
        c = start(lab.b1, "connect", wrong, "-p", "3010")
        assert s.wait(30) == 1 and c.wait(30) == 1
        for peer in (s, c):
            assert "pairing code did not match" in peer.stderr(), peer.stderr()
            assert "Traceback" not in peer.stderr()
        service.settimeout(0.2)
        with pytest.raises(TimeoutError):
            service.accept()  # no connection ever reached the shared service


def test_peer_killed_is_detected_by_keepalive(lab_factory: LabFactory) -> None:
    lab = lab_factory("drop", "drop")
    start_rendezvous(lab)
    s, c = share_and_connect(lab, lab.a1, lab.b1)
    wait_connected(c)
    wait_connected(s)
    # Freeze the joiner (no FIN, no RST, no keepalive answers): a vanished peer.
    c.proc.send_signal(signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        assert s.wait(15) == 1
        assert time.monotonic() - t0 < 10  # keepalive 1 s: lost after ~3 s
        err = s.stderr()
        assert "Traceback" not in err
        lines = [x for x in err.splitlines() if "error:" in x]
        assert len(lines) == 1 and "peer" in lines[0].lower(), err
    finally:
        c.proc.send_signal(signal.SIGCONT)
        c.proc.kill()
