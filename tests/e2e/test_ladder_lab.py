"""The ladder in the namespace lab: pairs that hole punching cannot connect get a tunnel
through nopf-server's relay, with the real programs (``nopf share`` / ``nopf connect``)
and the real ``nopf-server``.

- symmetric x symmetric and symmetric x ordinary NATs connect through the relay, and
  say so on stderr; several concurrent connections carry random data intact both ways
  (SHA-256); a capture on the rendezvous host (the relay) holds none of it;
- the time to tunnel-up of a symmetric pair against a punched pair, in one run;
- a resume meeting (``meet_again``) through the real rendezvous;
- a stolen relay token does not get a third party into a tunnel.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import queue
import signal
import socket
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from nopf_web.roles import PeerRole
from nopf_web.sessions.coordination import NewPath, meet_again
from nopf_web.tunnel.errors import TunnelError
from nopf_web.tunnel.secure import open_channel
from nopf_web.wire.address import Endpoint
from nopf_web.wire.discovery import REPLY_SIZE
from nopf_web.wire.rendezvous import (
    ErrorReply,
    Fire,
    FrameReader,
    Hello,
    Relay,
    decode_client_message,
    decode_server_message,
    encode,
)
from tests.lab import Host, Lab
from tests.lab.fixtures import LabFactory
from tests.loopback import accepted

from .coord_harness import exchange, pair
from .pcap import read_streams
from .peers import connect, start_coordinated, start_rendezvous, wait_for
from .relay_clients import Coordination, recv_exactly

pytestmark = pytest.mark.lab

start = start_coordinated

RELAY = "198.51.100.2:3012"
PORT = 3012
STREAMS = 6
UP = 1 << 20  # bytes each connection sends to the service
DOWN = 768 * 1024  # bytes the service sends back on each


@contextlib.contextmanager
def rdv_capture(lab: Lab, path: Path) -> Iterator[None]:
    """Every TCP segment of the rendezvous' port on the rendezvous host (the relay)."""
    dump = lab.rdv.popen(["tcpdump", "-i", "eth0", "-s", "0", "-B", "32768", "-U", "-n",
                          "--immediate-mode", "-w", str(path), "tcp", "port", str(PORT)],
                         stderr=subprocess.PIPE)
    assert dump.stderr is not None
    assert "listening on" in dump.stderr.readline().decode()
    try:
        yield
    finally:
        time.sleep(0.3)  # the last segments
        dump.terminate()
        dump.communicate(timeout=10)


@dataclass
class Flow:
    """One application connection's bytes, known both ways."""

    up: bytes
    down: bytes
    service_got: str = ""
    client_got: str = ""


def send_all(sock: socket.socket, data: bytes) -> None:
    sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)


def send_and_hash(sock: socket.socket, data: bytes) -> str:
    """Send ``data`` and EOF (in a thread) while hashing what comes back until EOF."""
    sender = threading.Thread(target=send_all, args=(sock, data))
    sender.start()
    digest = hashlib.sha256()
    while chunk := sock.recv(1 << 16):
        digest.update(chunk)
    sender.join(30)
    return digest.hexdigest()


@contextlib.contextmanager
def exchange_service(host: Host, port: int, flows: queue.Queue[Flow]) -> Iterator[list[int]]:
    """In ``host``: for each connection, take the next flow, send its ``down`` bytes
    while hashing everything received until EOF. Yields the list of connections
    accepted (their numbers)."""
    arrivals: list[int] = []
    with host.enter():
        listener = socket.create_server(("127.0.0.1", port), backlog=64)
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        flow = flows.get(timeout=5)
        with conn:
            flow.service_got = send_and_hash(conn, flow.down)

    def accept() -> None:
        for conn in accepted(listener, stop):
            conn.settimeout(60)
            arrivals.append(len(arrivals) + 1)
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        yield arrivals
    finally:
        stop.set()
        acceptor.join(2)
        listener.close()


def run_flows(host: Host, port: int, flows: list[Flow], service: queue.Queue[Flow]) -> None:
    """STREAMS concurrent connections through the tunnel, each a flow; both ways checked."""
    failures: list[str] = []

    def one(flow: Flow) -> None:
        try:
            sock = connect(host, port, timeout=60)
            with sock:
                service.put(flow)  # the service serves connections in order of arrival
                flow.client_got = send_and_hash(sock, flow.up)
        except OSError as exc:
            failures.append(f"{exc}")

    threads = [threading.Thread(target=one, args=(f,)) for f in flows]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not failures, failures
    time.sleep(0.5)  # the service's last hashes
    # Flows may reach the service in another order than their connections were made:
    # match by what each side got.
    ups = {hashlib.sha256(f.up).hexdigest() for f in flows}
    downs = {hashlib.sha256(f.down).hexdigest() for f in flows}
    assert {f.service_got for f in flows} == ups, "the service did not get every upload intact"
    assert {f.client_got for f in flows} == downs, "a client did not get its download intact"


def plaintext_windows(data: bytes, count: int = 24, size: int = 24) -> list[bytes]:
    step = max(1, (len(data) - size) // count)
    return [data[i:i + size] for i in range(0, len(data) - size, step)][:count]


WHY = {  # (left, right) -> (the sharer's reason, the joiner's): the sharer is on the left
    ("symmetric", "symmetric"): ("our NAT is symmetric", "the peer's NAT is symmetric"),
    ("symmetric", "drop"): ("our NAT is symmetric", "the peer's NAT is symmetric"),
    ("symmetric", "rst"): ("our NAT is symmetric", "the peer's NAT is symmetric"),
    # A joiner makes no mapping check: its symmetric NAT costs the short punch first.
    ("rst", "symmetric"): ("no direct path within", "no direct path within"),
}


@pytest.mark.parametrize(("left", "right"), list(WHY))
def test_share_and_connect_behind_unpunchable_nats_go_through_the_relay(
        lab_factory: LabFactory, left: str, right: str, tmp_path: Path) -> None:
    lab = lab_factory(left, right, delay_ms=10, jitter_ms=2)
    start_rendezvous(lab)
    flows = [Flow(os.urandom(UP), os.urandom(DOWN)) for _ in range(STREAMS)]
    service: queue.Queue[Flow] = queue.Queue()
    capture = tmp_path / "rdv.pcap"
    with exchange_service(lab.a1, 3000, service), rdv_capture(lab, capture):
        s = start(lab.a1, "share", "-p", "3000")
        code = s.line(10)
        c = start(lab.b1, "connect", code, "-p", "3010")
        try:
            sharer_why, joiner_why = WHY[(left, right)]
            for peer, why in ((s, sharer_why), (c, joiner_why)):
                err = wait_for(peer, "encrypted tunnel to")
                assert f"tunnel up over the relay at {RELAY} ({why}" in err, err
                assert f"(over the relay at {RELAY}, {why}" in err, err
            run_flows(lab.b1, 3010, flows, service)
        finally:
            for peer in (c, s):
                peer.proc.send_signal(signal.SIGINT)
            codes = (c.wait(10), s.wait(10))
    assert codes == (0, 0), (c.stderr(), s.stderr())
    raw = capture.read_bytes()
    # The capture saw the relayed traffic (and its plaintext control frames)...
    assert len(raw) > STREAMS * (UP + DOWN)
    assert b'{"type":"relay","version":2,"token":' in raw
    # ...and nothing of the application's data in the clear.
    for flow in flows:
        for data in (flow.up, flow.down):
            leaked = [w.hex() for w in plaintext_windows(data) if w in raw]
            assert not leaked, f"plaintext on the relay host: {leaked[:3]}"


def test_a_symmetric_pair_is_up_about_one_round_trip_after_a_punched_pair(
        lab_factory: LabFactory) -> None:
    """Alternating runs of a punched pair (rst x rst) and a relayed one (symmetric x
    symmetric) in two labs with the same delays: time from the joiner's start to both
    tunnels up (coordinate() returned), and the relay's round trip on top."""
    punched = lab_factory("rst", "rst", delay_ms=10, jitter_ms=1)
    relayed = lab_factory("symmetric", "symmetric", delay_ms=10, jitter_ms=1)
    for lab in (punched, relayed):
        start_rendezvous(lab)
    times: dict[str, list[float]] = {"punched": [], "relayed": []}
    for _ in range(5):
        for name, lab, path in (("punched", punched, "public"),
                                ("relayed", relayed, "relay")):
            out = pair(lab.a1, lab.b1, punch_timeout=10)
            try:
                assert out.ok, out.errors
                assert out.sharer is not None and out.joiner is not None
                assert out.sharer.path == out.joiner.path == path
                times[name].append(out.up_at - out.ready_at)
                if name == "relayed":
                    exchange(out.sharer, out.joiner)
            finally:
                out.close()
    rtt = rdv_rtt(relayed.b1)
    p, r = statistics.median(times["punched"]), statistics.median(times["relayed"])
    print(f"\ntime to tunnel up (median of 5): punched {p * 1000:.0f} ms, relayed "
          f"{r * 1000:.0f} ms (+{(r - p) * 1000:.0f} ms; the joiner's RTT to the relay "
          f"{rtt * 1000:.0f} ms); punched {sorted(round(t * 1000) for t in times['punched'])}"
          f" relayed {sorted(round(t * 1000) for t in times['relayed'])}")
    # About a punched pair's time plus one round trip to the relay (and scheduling slack).
    assert r < p + 2 * rtt + 0.15, (times, rtt)


def rdv_rtt(host: Host) -> float:
    samples = []
    with host.enter():
        for _ in range(5):
            t0 = time.monotonic()
            socket.create_connection(("198.51.100.2", PORT), timeout=5).close()
            samples.append(time.monotonic() - t0)
    return statistics.median(samples)


@pytest.mark.parametrize(("left", "right", "direct_only", "path"), [
    ("symmetric", "symmetric", False, "relay"), ("rst", "drop", True, "public")])
def test_a_resume_meeting_through_the_real_rendezvous(
        lab_factory: LabFactory, left: str, right: str, direct_only: bool, path: str) -> None:
    lab = lab_factory(left, right, delay_ms=10)
    start_rendezvous(lab)
    rid = os.urandom(16)
    results: dict[str, NewPath | BaseException] = {}

    def side(host: Host, role: PeerRole) -> None:
        try:
            with host.enter():
                results[role] = asyncio.run(meet_again(
                    Endpoint("198.51.100.2", PORT), role, rid, direct_only=direct_only,
                    timeout=10))
        except BaseException as exc:  # reported below
            results[role] = exc

    threads = [threading.Thread(target=side, args=(lab.a1, "server")),
               threading.Thread(target=side, args=(lab.b1, "client"))]
    threads[0].start()
    time.sleep(1.0)  # the first one waits for the other
    threads[1].start()
    for t in threads:
        t.join(30)
    a, b = results.get("server"), results.get("client")
    assert isinstance(a, NewPath) and isinstance(b, NewPath), results
    try:
        assert a.path == b.path == path
        assert (a.role, b.role) == ("server", "client")
        # A plain connection to the peer: what one side sends, the other gets.
        for x, y in ((a, b), (b, a)):
            data = os.urandom(50_000)
            x.sock.setblocking(True)
            y.sock.setblocking(True)
            y.sock.settimeout(10)
            x.sock.sendall(data)
            assert recv_exactly(y.sock, len(data)) == data
    finally:
        a.sock.close()
        b.sock.close()


# -- relay abuse from the peers' side ---------------------------------------------------------


def tokens_in(capture: Path) -> dict[str, bytes]:
    """The relay tokens presented to the relay (client -> rendezvous), by client IP."""
    found: dict[str, bytes] = {}
    for (src, _, _, dport), streams in read_streams(capture).items():
        if dport != PORT:
            continue
        for stream in streams:
            data = stream.data()
            size = int.from_bytes(data[:4], "big")  # the first frame only: then the tunnel
            with contextlib.suppress(ValueError):
                msg = decode_client_message(data[4:4 + size])
                if isinstance(msg, Relay):
                    found[src] = msg.token
    return found


def present(host: Host, token: bytes) -> ErrorReply | str:
    """A thief's relay connection with ``token`` from ``host``: the refusal, or
    "joined"."""
    with host.enter():
        sock = socket.create_connection(("198.51.100.2", PORT), timeout=5)
    with sock:
        sock.settimeout(5)
        sock.sendall(encode(Relay(token)))
        data = b""
        while len(data) < REPLY_SIZE + 4:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
        with contextlib.suppress(TimeoutError):
            while chunk := sock.recv(4096):
                data += chunk
        [payload, *_] = FrameReader().feed(data[REPLY_SIZE:])
        msg = decode_server_message(payload)
        return msg if isinstance(msg, ErrorReply) else "joined"


def test_stolen_tokens_replayed_after_use_are_refused_and_the_tunnel_goes_on(
        lab_factory: LabFactory, tmp_path: Path) -> None:
    lab = lab_factory("symmetric", "symmetric", delay_ms=5)
    start_rendezvous(lab)
    flows = [Flow(os.urandom(UP), os.urandom(DOWN)) for _ in range(2)]
    service: queue.Queue[Flow] = queue.Queue()
    capture = tmp_path / "rdv.pcap"
    with exchange_service(lab.a1, 3000, service):
        with rdv_capture(lab, capture):
            s = start(lab.a1, "share", "-p", "3000")
            c = start(lab.b1, "connect", s.line(10), "-p", "3010")
            for peer in (s, c):
                wait_for(peer, "encrypted tunnel to")
        try:
            stolen = tokens_in(capture)  # what anyone on the path could read
            assert set(stolen) == {lab.a.public_ip, lab.b.public_ip}, stolen
            # From behind the sharer's NAT (its public IP, so the binding holds): used.
            refusal = present(lab.a2, stolen[lab.a.public_ip])
            assert isinstance(refusal, ErrorReply) and refusal.code == "relay_refused"
            assert "already used" in refusal.message
            # The joiner's token from another address: refused all the same.
            refusal = present(lab.a2, stolen[lab.b.public_ip])
            assert isinstance(refusal, ErrorReply) and refusal.code == "relay_refused"
            # The tunnel was not touched.
            run_flows(lab.b1, 3010, flows, service)
        finally:
            for peer in (c, s):
                peer.proc.send_signal(signal.SIGINT)
            assert (c.wait(10), s.wait(10)) == (0, 0)


def test_a_token_stolen_before_use_gets_a_thief_nothing_of_the_tunnel(
        lab_factory: LabFactory) -> None:
    """The joiner's token, read off its fire (the rendezvous' frames are not encrypted)
    before the joiner used it: from another address it is refused and stays usable; from
    behind the joiner's own NAT the relay joins the thief with the sharer, whose tunnel
    then fails its end-to-end authentication (the thief has no code): nothing reaches the
    shared service, and the joiner learns its token was used."""
    lab = lab_factory("symmetric", "drop", delay_ms=5)
    start_rendezvous(lab)
    with exchange_service(lab.a1, 3000, queue.Queue()) as arrivals:
        s = start(lab.a1, "share", "-p", "3000")
        code = s.line(10)
        nameplate = int(code.split("-")[0])

        async def joiner_fire() -> Fire:  # the joiner, up to its fire: a raw client here
            coord = await Coordination.open(("198.51.100.2", PORT), "0.0.0.0", Hello(
                "join", nameplate, (), None, 10.0, relay=True))
            try:
                msg = await coord.next()
                assert isinstance(msg, Fire), msg
                return msg
            finally:
                coord.close()

        with lab.b1.enter():
            fire = asyncio.run(joiner_fire())
        assert fire.plan == () and fire.relay is not None
        token = fire.relay.token
        # Another public address: refused, and not burnt.
        refusal = present(lab.a2, token)
        assert isinstance(refusal, ErrorReply) and refusal.code == "relay_refused"
        assert "another address" in refusal.message
        # Behind the joiner's NAT, first: the relay joins the thief with the sharer.
        thief_result: list[str] = []

        def thief() -> None:
            with lab.b2.enter():
                sock = socket.create_connection(("198.51.100.2", PORT), timeout=5)
            sock.sendall(encode(Relay(token)))
            head = recv_exactly(sock, REPLY_SIZE + 4)
            frame = recv_exactly(sock, int.from_bytes(head[REPLY_SIZE:], "big"))
            assert decode_server_message(frame).__class__.__name__ == "Relayed"

            async def handshake() -> None:  # in-band SPAKE2 with a guess of the words
                channel = await open_channel(sock, role="client",
                                             code=f"{nameplate}-orbit-lantern", timeout=8)
                await channel.confirmed()

            try:
                asyncio.run(handshake())
                thief_result.append("channel opened")
            except TunnelError as exc:
                thief_result.append(f"{type(exc).__name__}: {exc}")

        t = threading.Thread(target=thief)
        t.start()
        t.join(30)
        assert thief_result and "channel opened" not in thief_result[0], thief_result
        # The sharer refuses the thief end to end and ends with one line.
        assert s.wait(20) == 1
        err = s.stderr()
        assert "Traceback" not in err
        assert "pairing code did not match" in err or "handshake" in err, err
        assert arrivals == []  # nothing reached the shared service
        # The joiner's own token is spent now (used, or forgotten with its session).
        refusal = present(lab.b1, token)
        assert isinstance(refusal, ErrorReply) and refusal.code == "relay_refused", refusal
