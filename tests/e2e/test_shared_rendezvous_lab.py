"""Two ``nopf-server`` nodes sharing one Redis, in the namespace lab, with the real
programs: the nodes listen on the rendezvous host's two addresses (198.51.100.2 and
.3), Debian's ``redis-server`` runs on that host too (started here, stopped by PID),
and the peers know the rendezvous as one name that resolves to both addresses
(``rdv.lab``, in their namespaces' /etc/netns/NS/hosts, as ``ip netns exec`` mounts it).

- a sharer on one node and a connector on the other pair; SIGKILL the sharer's node:
  the tunnel keeps carrying, and new connections go through;
- SIGKILL the node of a waiting sharer: it registers its code again through the other
  node, and the code still pairs there, for a connector given the name with the dead
  node's address first (it tries every address);
- Redis SIGKILLed while tunnels carry and a sharer waits: the nodes refuse new pairings
  with the reason (logged, and said to the peer), stay up, recover when Redis is back,
  list the waiting sharer again, and it pairs.
- a pair that only a relay joins, paired across the nodes: SIGKILL the node whose relay
  carries it while streams run: both peers meet again through the name's other address,
  that node relays, and every byte arrives in order;
- a pair across the nodes gets the sharer's direct candidates (waiting with it in Redis)
  and the same prediction as on one node: two symmetric NATs with IPv6 connect over IPv6;
- a pair split across the nodes and the families (an IPv4-only sharer behind a
  symmetric NAT on one node, an IPv6-only connector on the other) is relayed by one
  node, each side reaching it in its own family.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator

import pytest

from nopf_web.wire.discovery import REPLY_SIZE
from nopf_web.wire.rendezvous import (
    ErrorReply,
    Fire,
    FrameReader,
    Hello,
    MessageError,
    ServerMessage,
    Welcome,
    decode_server_message,
    encode,
)
from tests.lab import Host, Lab
from tests.lab.fixtures import LabFactory
from tests.lab.topology import RDV_IP, RDV_IP2, RDV_IP6
from tests.programs import argv
from tests.redis_server import RedisServer, require_redis_server

from .flows import Flows
from .peers import (
    RDV_HOST,
    RDV_NAME,
    SERVICE,
    TUNNEL,
    Peer,
    close,
    drop_ipv6,
    echo_once,
    echo_service_on,
    named_pair,
    path_lines,
    read_all,
    resolving,
    round_trip,
    start_coordinated,
    stop,
    wait_for,
    wait_on_stderr,
)
from .relay_clients import take_message

pytestmark = pytest.mark.lab

PORT = 3012
REDIS_PORT = 6379
RDV2_IP6 = "2001:db8:100::3"  # node B's IPv6 address (shared_rendezvous(ipv6=True))


class Node:
    """One nopf-server node of the shared rendezvous, its stderr in a file."""

    def __init__(self, lab: Lab, ip: str, redis: str, ip6: str | None = None) -> None:
        self.ip, self.ip6 = ip, ip6
        self.err = tempfile.TemporaryFile()  # noqa: SIM115 - closed by close()
        six = () if ip6 is None else ("--host", ip6)
        self.proc = lab.rdv.popen(argv("nopf-server", "--host", ip, *six, "--port", str(PORT),
                                       "--no-doctor", "--redis", redis),
                                  stderr=self.err)
        found = re.search(r"node ([0-9a-f]{16}), sharing", self.wait_for(
            "shared state reachable: pairing"))
        assert found is not None
        self.node = found[1]

    def stderr(self) -> str:
        return read_all(self.err)

    def wait_for(self, text: str, timeout: float = 15) -> str:
        return wait_on_stderr(f"node {self.ip}", self.proc, self.err, text, timeout)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(5)

    def alive(self) -> bool:
        return self.proc.poll() is None


def holding_node(lab: Lab, code: str) -> str:
    """The id of the node that holds the waiting sharer of ``code`` (from Redis)."""
    import redis

    with lab.rdv.enter():
        client = redis.Redis(host=RDV_IP, port=REDIS_PORT, decode_responses=True)
        try:
            record = client.hget(f"nopf:np:{code.split('-')[0]}", "rec")
        finally:
            client.close()
    assert isinstance(record, str), f"code {code} is not in Redis"
    node = json.loads(record)["node"]
    assert isinstance(node, str)
    return node


@contextlib.contextmanager
def one_name(lab: Lab, *hosts: Host, second_first: tuple[Host, ...] = ()) -> Iterator[None]:
    """``rdv.lab`` resolves to both rendezvous addresses inside ``hosts``: RDV_IP
    first, or RDV_IP2 first in the hosts of ``second_first`` (so that two peers
    contact different nodes while both are up)."""
    with resolving(hosts, RDV_HOST, RDV_IP, RDV_IP2), \
            resolving(second_first, RDV_HOST, RDV_IP2, RDV_IP):
        yield


@contextlib.contextmanager
def shared_rendezvous(lab: Lab, *, ipv6: bool = False,
                      ) -> Iterator[tuple[RedisServer, Node, Node]]:
    """Redis and the two nodes; ``ipv6``: each node listens on an IPv6 address of the
    rendezvous host too (node A on RDV_IP6, node B on RDV2_IP6, added here)."""
    require_redis_server()
    if ipv6:
        lab.rdv.run(["ip", "-6", "addr", "add", f"{RDV2_IP6}/64", "dev", "eth0", "nodad"])
    redis = RedisServer(RDV_IP, REDIS_PORT, popen=lambda a: lab.rdv.popen(
        a, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE), inside=lab.rdv.enter)
    with redis:
        url = f"redis://{RDV_IP}:{REDIS_PORT}/0"
        a = Node(lab, RDV_IP, url, RDV_IP6 if ipv6 else None)
        b = Node(lab, RDV_IP2, url, RDV2_IP6 if ipv6 else None)
        try:
            yield redis, a, b
        finally:
            for node in (a, b):
                if node.alive():
                    node.proc.send_signal(signal.SIGTERM)
                    node.proc.wait(20)
                node.err.close()


class PairingLoad:
    """Pairings without punches, one after another from ``host``: a sharer's hello on
    node ``a``, its nameplate claimed on node ``b``, both fires read. Counts what each
    attempt got; a fire whose peer is not the one paired is a wrong pairing."""

    def __init__(self, host: Host, a: str, b: str) -> None:
        self.host, self.a, self.b = host, a, b
        self.paired = 0
        self.refused: list[str] = []  # busy refusals' messages
        self.wrong: list[str] = []  # anything else: must stay empty
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pairing-load", daemon=True)

    def start(self) -> PairingLoad:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        assert not self._thread.is_alive()

    def _run(self) -> None:
        with self.host.enter():
            while not self._stop.is_set():
                try:
                    self._once()
                except (OSError, MessageError, AssertionError) as exc:
                    self.wrong.append(f"{type(exc).__name__}: {exc}")
                time.sleep(0.02)

    def _once(self) -> None:
        with _Conn(self.a) as sharer:
            welcome = sharer.hello(Hello("share", None, (), None, 10, relay=True))
            if isinstance(welcome, ErrorReply):
                self._refused(welcome)
                return
            assert isinstance(welcome, Welcome), welcome
            with _Conn(self.b) as joiner:
                fire = joiner.hello(Hello("join", welcome.nameplate, (), None, 10,
                                          relay=True))
                if isinstance(fire, ErrorReply):
                    self._refused(fire)
                    return
                assert isinstance(fire, Fire), fire
                theirs = sharer.next()
                assert isinstance(theirs, Fire), theirs
                # Each side's peer is the other: never a third party's address.
                assert fire.peer_public == welcome.public, (fire, welcome)
                assert theirs.peer_public == fire.public, (theirs, fire)
                self.paired += 1

    def _refused(self, err: ErrorReply) -> None:
        if err.code != "busy":
            raise AssertionError(f"refused: {err.code}: {err.message}")
        self.refused.append(err.message)


class _Conn:
    """One blocking connection to a node speaking the coordinated protocol."""

    def __init__(self, ip: str) -> None:
        self.sock = socket.create_connection((ip, PORT), timeout=5)
        self.frames = FrameReader()
        self.queue: list[ServerMessage] = []

    def __enter__(self) -> _Conn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def hello(self, hello: Hello) -> ServerMessage:
        self.sock.sendall(encode(hello))
        got = b""
        while len(got) < REPLY_SIZE:
            chunk = self.sock.recv(REPLY_SIZE - len(got))
            assert chunk, "closed before the discovery reply"
            got += chunk
        return self.next()

    def next(self) -> ServerMessage:
        while (msg := take_message(self.queue, self.sock.sendall)) is None:
            chunk = self.sock.recv(4096)
            assert chunk, "closed before the message"
            self.queue += [decode_server_message(p) for p in self.frames.feed(chunk)]
        return msg


def start(host: Host, *args: str, rdv: str) -> Peer:
    return start_coordinated(host, *args, rdv=rdv)


def test_a_sharer_on_one_node_pairs_with_a_connector_on_the_other_and_outlives_its_node(
        lab_factory: LabFactory) -> None:
    lab = lab_factory("drop", "rst", delay_ms=5, rdv_second_ip=True)
    with shared_rendezvous(lab) as (_, node_a, node_b):
        s = start(lab.a1, "share", "-p", "3000", rdv=f"{RDV_IP}:{PORT}")
        c = start(lab.b1, "connect", s.line(10), "-p", "3010", rdv=f"{RDV_IP2}:{PORT}")
        for peer in (s, c):
            wait_for(peer, "encrypted tunnel to")
        assert f"contacting rendezvous {RDV_IP}:{PORT}" in s.stderr()
        assert f"contacting rendezvous {RDV_IP2}:{PORT}" in c.stderr()
        flows = Flows(lab.a1, 3000, lab.b1, 3010, 2, 4 << 20).start()
        try:
            flows.wait_received(1 << 20, timeout=30)
            node_a.kill()  # the sharer's node
            flows.join(60)
            flows.check()  # every byte, both ways: the tunnel never needed it
        finally:
            flows.join(5)
        after = Flows(lab.a1, 3000, lab.b1, 3010, 3, 1 << 20).start()  # new connections
        try:
            after.join(60)
            after.check()
        finally:
            after.join(5)
        assert node_b.alive()
        close(c, s)


def test_a_waiting_sharer_whose_node_dies_keeps_its_code_through_the_other_node(
        lab_factory: LabFactory) -> None:
    lab = lab_factory("drop", "drop", delay_ms=5, rdv_second_ip=True)
    with one_name(lab, lab.a1), shared_rendezvous(lab) as (_, node_a, node_b), \
            contextlib.ExitStack() as services:
        services.enter_context(echo_service_on(lab.a1, 3000))
        s = start(lab.a1, "share", "-p", "3000", rdv=RDV_NAME)
        code = s.line(10)
        holder = node_a if node_a.node == holding_node(lab, code) else node_b
        other = node_b if holder is node_a else node_a
        holder.kill()
        err = wait_for(s, f"pairing code {code} registered again through rendezvous")
        assert f"registering pairing code {code} again in 1 s" in err
        assert "nopf: pairing code" in err and code in err
        assert holding_node(lab, code) == other.node
        # The connector knows the name with the dead node's address first: it tries
        # every address, and the live node answers.
        dead_first = {"second_first": (lab.b1,)} if holder is node_b else {}
        with one_name(lab, *(() if dead_first else (lab.b1,)), **dead_first):
            c = start(lab.b1, "connect", code, "-p", "3010", rdv=RDV_NAME)
            for peer in (s, c):
                wait_for(peer, "encrypted tunnel to")
        assert (f"rendezvous {RDV_NAME}: {other.ip}:{PORT} answered first of 2 IPv4 "
                "addresses") in c.stderr(), c.stderr()
        echo_once(lab.b1, 3010)
        assert other.alive()
        close(c, s)


def test_redis_lost_and_back_under_load_refuses_clearly_then_pairs_again(
        lab_factory: LabFactory) -> None:
    lab = lab_factory("drop", "rst", delay_ms=5, rdv_second_ip=True)
    with shared_rendezvous(lab) as (redis, node_a, node_b), \
            contextlib.ExitStack() as services:
        services.enter_context(echo_service_on(lab.a2, 3002))
        s = start(lab.a1, "share", "-p", "3000", rdv=f"{RDV_IP}:{PORT}")
        c = start(lab.b1, "connect", s.line(10), "-p", "3010", rdv=f"{RDV_IP2}:{PORT}")
        for peer in (s, c):
            wait_for(peer, "encrypted tunnel to")
        waiting = start(lab.a2, "share", "-p", "3002", rdv=f"{RDV_IP}:{PORT}")
        code = waiting.line(10)
        flows = Flows(lab.a1, 3000, lab.b1, 3010, 2, None, pace=0.005).start()
        load = PairingLoad(lab.b2, RDV_IP, RDV_IP2).start()
        try:
            flows.wait_received(1 << 20, timeout=30)
            time.sleep(1.0)
            before = load.paired
            assert before > 0, load.wrong
            redis.stop()  # SIGKILL: nothing saved
            for node in (node_a, node_b):
                node.wait_for("shared state lost: Redis at redis://198.51.100.2:6379/0: ")
            refused = start(lab.b2, "share", "-p", "3004", rdv=f"{RDV_IP2}:{PORT}")
            assert refused.wait(15) != 0
            assert ("the rendezvous cannot pair now: Redis at redis://198.51.100.2:6379/0: "
                    in refused.stderr()), refused.stderr()
            assert re.search(r"refused [\d.]+:\d+: the rendezvous cannot pair now: Redis at "
                             r"redis://198\.51\.100\.2:6379/0: ", node_b.stderr()), (
                node_b.stderr())  # logged too
            time.sleep(1.0)
            during = load.paired
            redis.start()  # empty: a restart without persistence
            for node in (node_a, node_b):
                node.wait_for("shared state reachable: pairing", timeout=20)
            deadline = time.monotonic() + 15
            while load.paired < during + 20 and time.monotonic() < deadline:
                time.sleep(0.1)
            load.stop()
            assert load.paired >= during + 20, (load.paired, during, load.wrong[:3])
            assert not load.wrong, load.wrong[:5]  # never an error or a wrong pair
            assert load.refused and all(
                m.startswith("the rendezvous cannot pair now: Redis at redis://198.51.100.2:"
                             "6379/0: ") or "is reconnecting" in m for m in load.refused), (
                load.refused[:5])
            print(f"\npairings: {before} before the outage, {during - before} while Redis "
                  f"went away, {load.paired - during} after; {len(load.refused)} refused")
            moving = flows.received()
            flows.wait_received(moving + (1 << 20), timeout=20)  # carried all along
            flows.stop()
            flows.join(60)
            flows.check()
        finally:
            flows.join(5)
            load.stop()
        # The sharer that waited through the outage: listed again by its node, it pairs
        # through the other one.
        c2 = start(lab.b2, "connect", code, "-p", "3012", rdv=f"{RDV_IP2}:{PORT}")
        for peer in (waiting, c2):
            wait_for(peer, "encrypted tunnel to")
        echo_once(lab.b2, 3012)
        assert node_a.alive() and node_b.alive()
        for node in (node_a, node_b):
            assert "Traceback" not in node.stderr(), node.stderr()
        close(c2, waiting, c, s)


def relay_node_ip(*peers: Peer) -> str:
    """The node address every one of ``peers`` says its tunnel is relayed at (one)."""
    relays = set()
    for peer in peers:
        err = wait_for(peer, "encrypted tunnel to")
        found = re.search(r"over the relay at (198\.51\.100\.[23]):3012", err)
        assert found is not None, err
        relays.add(found[1])
    assert len(relays) == 1, relays
    return relays.pop()


def test_a_pair_that_must_relay_is_relayed_by_one_of_its_two_nodes(
        lab_factory: LabFactory) -> None:
    lab = lab_factory("symmetric", "symmetric", delay_ms=5, rdv_second_ip=True)
    with shared_rendezvous(lab):
        s = start(lab.a1, "share", "-p", "3000", rdv=f"{RDV_IP}:{PORT}")
        c = start(lab.b1, "connect", s.line(10), "-p", "3010", rdv=f"{RDV_IP2}:{PORT}")
        relay_node_ip(s, c)  # both sides at the node the pairing chose
        flows = Flows(lab.a1, 3000, lab.b1, 3010, 2, 2 << 20).start()
        try:
            flows.join(60)
            flows.check()
        finally:
            flows.join(5)
        close(c, s)


def test_a_relayed_tunnel_whose_relay_node_dies_resumes_through_the_other_node(
        lab_factory: LabFactory) -> None:
    """Symmetric NAT facing symmetric NAT: only the relay joins them. The sharer knows
    the rendezvous name with node A first, the connector with node B first, so they
    pair across the nodes; the pairing's relay runs on one of them. SIGKILL that node
    while streams run: both peers meet again through the name's other address (the
    one left), that node relays, and every byte arrives in order, no stream reset."""
    lab = lab_factory("symmetric", "symmetric", delay_ms=5, rdv_second_ip=True)
    with one_name(lab, lab.a1, second_first=(lab.b1,)), \
            shared_rendezvous(lab) as (_, node_a, node_b):
        s = start(lab.a1, "share", "-p", "3000", "--resume-budget", "30",
                  rdv=RDV_NAME)
        c = start(lab.b1, "connect", s.line(10), "-p", "3010", "--resume-budget", "30",
                  rdv=RDV_NAME)
        relay_ip = relay_node_ip(s, c)
        assert f"rendezvous {RDV_NAME}: {RDV_IP}:{PORT} answered first" in s.stderr()
        assert f"rendezvous {RDV_NAME}: {RDV_IP2}:{PORT} answered first" in c.stderr()
        dead, live = (node_a, node_b) if relay_ip == node_a.ip else (node_b, node_a)
        flows = Flows(lab.a1, 3000, lab.b1, 3010, 3, None, pace=0.005).start()
        try:
            flows.wait_received(1 << 20, timeout=30)
            dead.kill()  # its relay connections die with it
            for peer in (s, c):
                wait_for(peer, "the relay was lost (")
                err = wait_for(peer, "resumed over the relay in", timeout=30)
                assert re.search(r"resumed over the relay in \d+\.\d s", err), err
                assert f"a new connection over the relay at {live.ip}:{PORT}" in err, err
            moving = flows.received()
            flows.wait_received(moving + (1 << 20), timeout=20)  # carrying again
            flows.stop()
            flows.join(60)
            flows.check()  # every byte, both ways, in order; no stream reset
        finally:
            flows.join(5)
        assert live.alive()
        assert "Traceback" not in live.stderr(), live.stderr()
        print(f"\nrelay node {dead.ip} killed; resumed through {live.ip}\n{path_lines(s)}\n"
              f"{path_lines(c)}")
        close(c, s)


def test_a_pair_across_nodes_gets_the_direct_candidates_and_takes_ipv6(
        lab_factory: LabFactory) -> None:
    """Two sites behind symmetric IPv4 NATs with global IPv6 (as in
    test_direct_paths_lab): the sharer waits on node A, the connector comes to node B.
    The sharer's candidates and NAT report wait with it in Redis, so the pairing
    offers the IPv6 rung and predicts as one node would: the tunnel runs over IPv6,
    not through a relay."""
    lab = lab_factory("symmetric", "symmetric", ipv6=True, rdv_second_ip=True)
    with shared_rendezvous(lab) as (_, node_a, node_b):
        with echo_service_on(lab.a1):
            s = start(lab.a1, "share", "-p", str(SERVICE), rdv=f"{RDV_IP}:{PORT}")
            code = s.line(10)
            assert holding_node(lab, code) == node_a.node
            c = start(lab.b1, "connect", code, "-p", str(TUNNEL), rdv=f"{RDV_IP2}:{PORT}")
            err_s = wait_for(s, "encrypted tunnel to")
            err_c = wait_for(c, "encrypted tunnel to")
            assert f"tunnel up to [{lab.b1.ip6}]:" in err_s and "over IPv6" in err_s, err_s
            assert f"tunnel up to [{lab.a1.ip6}]:" in err_c and "over IPv6" in err_c, err_c
            round_trip(lab.b1)
            # The node that paired (the connector's) predicted the path the peers did,
            # and logged it as a node pairing its own two peers does.
            said = re.search(r"nopf: (predicted path .*)", err_c)
            assert said is not None and f"nopf: {said[1]}" in err_s, (err_s, err_c)
            assert re.search(rf"pairing [\d.:]+ with [\d.:]+: {re.escape(said[1])}",
                             node_b.wait_for("predicted path")), node_b.stderr()
            codes = (stop(s)[0], c.wait(10))  # the joiner sees the peer close and ends
        assert codes == (0, 0), (s.stderr(), c.stderr())


def test_a_pair_split_across_nodes_and_families_is_relayed_by_one_node_in_both(
        lab_factory: LabFactory) -> None:
    """An IPv4-only sharer behind a symmetric NAT waits on node A (reached over IPv4);
    an IPv6-only connector comes to node B over IPv6. No direct path can join them (no
    family in common): the pairing puts the relay on one node, and each side reaches
    that node in its own family."""
    lab = lab_factory("symmetric", "rst", ipv6=True, ipv6_only=("b",), rdv_second_ip=True)
    drop_ipv6(lab.a1)
    rdv_bytes = lab.tcp_counter(lab.rdv, PORT)
    with shared_rendezvous(lab, ipv6=True) as (_, node_a, node_b), \
            named_pair(lab, RDV_IP, rendezvous=False,
                       connector_rdv=f"[{RDV2_IP6}]:{PORT}") as (s, c):
        err_s, err_c = s.stderr(), c.stderr()
        assert f"contacting rendezvous [{RDV2_IP6}]:{PORT}" in err_c, err_c
        at_s = re.search(r"tunnel up over the relay at (\S+):3012", err_s)
        at_c = re.search(r"tunnel up over the relay at \[(\S+)\]:3012", err_c)
        assert at_s is not None and at_c is not None, (err_s, err_c)
        assert (at_s[1], at_c[1]) in ((node_a.ip, node_a.ip6), (node_b.ip, node_b.ip6))
        before = rdv_bytes.read()[1]
        round_trip(lab.b1, 1 << 20)
        relayed = rdv_bytes.read()[1] - before
        for node in (node_a, node_b):
            assert "Traceback" not in node.stderr(), node.stderr()
    assert relayed > 4 * (1 << 20)  # both ways, in and out of the relay
