"""Tests of the namespace lab itself: topology, NAT behaviours, delay/loss, teardown, CLI."""

from __future__ import annotations

import errno
import json
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.lab.fixtures import LabFactory, require_lab
from tests.lab.topology import (
    NETNS_DIR,
    STATE_DIR,
    Host,
    Lab,
    LabError,
    _pids_in,
    cleanup_stale,
)

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
EXPECTED_UNSOLICITED = {
    "drop": "timeout",
    "symmetric": "timeout",
    "rst": "ECONNREFUSED",
    "icmp": "EHOSTUNREACH",  # ICMP admin-prohibited (code 13) -> EHOSTUNREACH, fatal
}


# --------------------------------------------------------------------------- helpers


def tcp_socket(host: Host) -> socket.socket:
    with host.enter():
        return socket.socket(socket.AF_INET, socket.SOCK_STREAM)


def connect_rtt(host: Host, addr: tuple[str, int]) -> float:
    """Seconds taken by one TCP handshake from ``host``."""
    sock = tcp_socket(host)
    sock.settimeout(5)
    try:
        start = time.monotonic()
        sock.connect(addr)
        return time.monotonic() - start
    finally:
        sock.close()


def seen_from(host: Host, listener: socket.socket, bind_port: int = 0) -> tuple[str, int, int]:
    """Connect from ``host`` to ``listener``: (source ip seen, source port seen, local port)."""
    sock = tcp_socket(host)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("0.0.0.0", bind_port))
    sock.settimeout(5)
    try:
        port = listener.getsockname()[1]
        sock.connect((RDV, port))
        conn, (ip, seen_port) = listener.accept()
        conn.close()
        return ip, seen_port, sock.getsockname()[1]
    finally:
        sock.close()


RDV = "198.51.100.2"


def nft_counters(host: Host, table: str) -> dict[str, int]:
    out = host.run(["nft", "-j", "list", "table", "ip", table]).stdout
    counters: dict[str, int] = {}
    for item in json.loads(out)["nftables"]:
        if "counter" in item:
            counters[item["counter"]["name"]] = int(item["counter"]["packets"])
    return counters


def netns_with_prefix(prefix: str) -> list[str]:
    if not NETNS_DIR.is_dir():
        return []
    return [name for name in os.listdir(NETNS_DIR) if name.startswith(prefix + "-")]


def udp_blast(src: Host, dst: Host, count: int, port: int = 9999) -> int:
    """Send ``count`` UDP datagrams src -> dst (paced); return how many arrived."""
    with dst.enter():
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    rx.bind(("0.0.0.0", port))
    rx.settimeout(0.5)
    with src.enter():
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    received = 0

    def drain() -> None:
        nonlocal received
        while True:
            try:
                rx.recv(2048)
            except TimeoutError:
                return
            received += 1

    reader = threading.Thread(target=drain)
    try:
        for i in range(count):
            tx.sendto(b"x" * 64, (dst.ip, port))
            if i % 50 == 49:
                time.sleep(0.002)
            if i == 0:
                reader.start()
        reader.join(10)
    finally:
        tx.close()
        rx.close()
    return received


def wait_dead(pid: int, timeout: float = 2.0) -> bool:
    """Wait until ``pid`` is gone or a zombie (its reaper is not ours to control)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return True
        if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)


def run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tests.lab", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# --------------------------------------------------------------------------- topology


def test_build_is_fast_and_complete(lab_factory: LabFactory) -> None:
    lab = lab_factory("drop", "rst")
    assert lab.build_seconds is not None and lab.build_seconds < 1.0
    assert sorted(netns_with_prefix(lab.prefix)) == sorted(lab.namespaces)
    assert len(lab.namespaces) == 8
    state = json.loads((STATE_DIR / f"{lab.prefix}.pid").read_text())
    assert state["pid"] == os.getpid()
    # a1 and a2 share a bridged LAN: they reach each other directly (no NAT between).
    with lab.a2.listener() as srv:
        ip, _, _ = _accepting(lab.a1, srv, lab.a2.ip)
        assert ip == lab.a1.ip


def _accepting(host: Host, srv: socket.socket, dst_ip: str,
               dst_port: int | None = None) -> tuple[str, int, int]:
    sock = tcp_socket(host)
    sock.settimeout(5)
    try:
        sock.connect((dst_ip, dst_port or srv.getsockname()[1]))
        conn, (ip, port) = srv.accept()
        conn.close()
        return ip, port, sock.getsockname()[1]
    finally:
        sock.close()


def test_enter_switches_only_the_calling_thread(lab_factory: LabFactory) -> None:
    lab = lab_factory()
    root_ino = os.stat("/proc/thread-self/ns/net").st_ino
    a1_ino = os.stat(NETNS_DIR / lab.a1.ns).st_ino
    assert root_ino != a1_ino
    seen_by_other: list[int] = []
    go, done = threading.Event(), threading.Event()

    def other() -> None:
        go.wait(5)
        seen_by_other.append(os.stat("/proc/thread-self/ns/net").st_ino)
        done.set()

    thread = threading.Thread(target=other)
    thread.start()
    with lab.a1.enter():
        assert os.stat("/proc/thread-self/ns/net").st_ino == a1_ino
        assert sorted(name for _, name in socket.if_nameindex()) == ["eth0", "lo"]
        sock = socket.socket()
        go.set()
        assert done.wait(5)
    thread.join()
    assert seen_by_other == [root_ino]
    assert os.stat("/proc/thread-self/ns/net").st_ino == root_ino
    # the socket made inside lives in a1: it can bind a1's address...
    sock.bind((lab.a1.ip, 0))
    sock.close()
    # ...which the root namespace does not have.
    outside = socket.socket()
    with pytest.raises(OSError) as info:
        outside.bind((lab.a1.ip, 0))
    outside.close()
    assert info.value.errno == errno.EADDRNOTAVAIL


@pytest.mark.parametrize(
    ("left", "right"), [("drop", "none"), ("rst", "icmp"), ("symmetric", "none")]
)
def test_rdv_reachable_and_sees_public_source(
    lab_factory: LabFactory, left: str, right: str
) -> None:
    lab = lab_factory(left, right)
    with lab.rdv.listener() as srv:
        for site in (lab.a, lab.b):
            for host in site.hosts:
                ip, port, local_port = seen_from(host, srv)
                if site.natted:
                    assert ip == site.public_ip, host
                    if site.mode != "symmetric":
                        assert port == local_port  # masquerade keeps a free port
                else:
                    assert ip == host.ip, host
                    assert port == local_port


def test_ttl_2_dies_in_the_internet_before_the_peer_nat(lab_factory: LabFactory) -> None:
    lab = lab_factory("drop", "drop")
    watch = """table ip watch {
        counter ttl2 {}
        counter ttl64 {}
        chain pre {
            type filter hook prerouting priority raw; policy accept;
            tcp dport 4444 counter name "ttl2"
            tcp dport 4445 counter name "ttl64"
        }
    }"""
    for host in (lab.natb, lab.inet):
        host.run(["nft", "-f", "-"], input=watch.encode())
    socks = []
    for ttl, port in ((2, 4444), (64, 4445)):
        sock = tcp_socket(lab.a1)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)
        sock.setblocking(False)
        sock.connect_ex((lab.b.public_ip, port))
        socks.append(sock)
    time.sleep(0.3)
    for sock in socks:
        sock.close()
    at_inet = nft_counters(lab.inet, "watch")
    at_natb = nft_counters(lab.natb, "watch")
    assert at_inet["ttl2"] >= 1, "the TTL=2 SYN should pass nata and reach the internet router"
    assert at_natb["ttl2"] == 0, "the TTL=2 SYN must die before natb"
    assert at_inet["ttl64"] >= 1 and at_natb["ttl64"] >= 1


# --------------------------------------------------------------------------- NAT behaviours


@pytest.mark.parametrize(("left", "right"), [("drop", "rst"), ("icmp", "symmetric")])
def test_unsolicited_inbound_syn_per_mode(lab_factory: LabFactory, left: str, right: str) -> None:
    lab = lab_factory(left, right)
    for site in (lab.a, lab.b):
        expected = EXPECTED_UNSOLICITED[site.mode]
        # 1. to the NAT's public address, no mapping: the NAT's INPUT path
        assert lab.rdv.attempt((site.public_ip, 4444)) == expected, site.mode
        # 2. routed straight at a LAN host that does listen: the NAT's FORWARD path
        with site.hosts[0].listener(5555):
            lab.inet.run(["ip", "route", "add", site.lan, "via", site.public_ip])
            assert lab.rdv.attempt((site.hosts[0].ip, 5555)) == expected, site.mode
            # ...while outbound connections of that host still work
            with lab.rdv.listener() as srv:
                assert seen_from(site.hosts[0], srv)[0] == site.public_ip


def test_icmp_answers_are_rate_limited_unless_disabled(lab_factory: LabFactory) -> None:
    default = lab_factory("icmp", "icmp")
    unlimited = lab_factory("icmp", "icmp", icmp_ratelimit=False)
    limited = [default.rdv.attempt((default.a.public_ip, 4000 + i), 0.2) for i in range(12)]
    assert limited[0] == "EHOSTUNREACH"
    assert "timeout" in limited, limited  # Linux: burst of 6, then 1/s per destination
    every = [unlimited.rdv.attempt((unlimited.a.public_ip, 4000 + i)) for i in range(12)]
    assert every == ["EHOSTUNREACH"] * 12


def test_none_mode_is_a_plain_router(lab_factory: LabFactory) -> None:
    lab = lab_factory("none", "none")
    routes = lab.inet.run(["ip", "route"]).stdout.decode()
    assert "100.64.1.0/24 via 203.0.113.2" in routes and "100.64.2.0/24 via 192.0.2.2" in routes
    with lab.a1.listener(6000) as srv:
        ip, _, _ = _accepting(lab.rdv, srv, lab.a1.ip)
        assert ip == lab.rdv.ip
        ip, _, _ = _accepting(lab.b2, srv, lab.a1.ip)
        assert ip == lab.b2.ip


def test_mapping_endpoint_independent_vs_symmetric(lab_factory: LabFactory) -> None:
    lab = lab_factory("drop", "symmetric")
    listeners = [lab.rdv.listener() for _ in range(3)]
    try:
        for host, symmetric in ((lab.a1, False), (lab.b1, True)):
            local = 40000 + secrets.randbelow(20000)
            seen = [seen_from(host, srv, bind_port=local) for srv in listeners]
            assert all(s[2] == local for s in seen)
            ports = {s[1] for s in seen}
            if symmetric:
                assert len(ports) >= 2, f"symmetric NAT kept one port: {seen}"
            else:
                assert ports == {local}, f"endpoint-independent NAT changed the port: {seen}"
    finally:
        for srv in listeners:
            srv.close()


@pytest.mark.parametrize("mode", ["drop", "rst"])
def test_a_rebind_breaks_connections_through_the_nat_and_moves_new_ones(
        lab_factory: LabFactory, mode: str) -> None:
    lab = lab_factory(mode, "drop")
    local_port = 40000 + secrets.randbelow(20000)
    with lab.rdv.listener() as srv, lab.rdv.listener() as other:
        sock = tcp_socket(lab.a1)
        sock.settimeout(5)
        sock.connect((RDV, srv.getsockname()[1]))
        conn, (ip, port) = srv.accept()
        assert (ip, port) == (lab.a.public_ip, sock.getsockname()[1])  # the port kept
        conn.settimeout(1.0)
        sock.sendall(b"before")
        assert conn.recv(100) == b"before"
        assert lab.rebind("a") == 0x2000
        # Ours leaves from a new public port: the rendezvous' kernel resets that
        # unknown connection, and nothing reaches the old one.
        sock.sendall(b"after")
        with pytest.raises(ConnectionResetError):
            sock.recv(100)
        with pytest.raises(TimeoutError):
            conn.recv(100)
        # The other way, the old mapping is gone: the NAT's mode answers.
        conn.sendall(b"late")
        sock.close()
        conn.close()
        for key in (0x2000, 0x4000):
            for _ in range(2):  # the same mapping to any destination: still punchable
                for server in (srv, other):
                    ip, port, local = seen_from(lab.a1, server, bind_port=local_port)
                    assert (ip, port) == (lab.a.public_ip, local ^ key), (port, local)
            if key == 0x2000:
                assert lab.rebind("a") == 0x4000  # the next key, not the same
        ip, port, local = seen_from(lab.b1, srv)
        assert port == local  # the other site is untouched
    assert lab.a.rebind_key == 0x4000
    with pytest.raises(LabError, match="no NAT"):
        lab_factory("none", "drop").rebind("a")


def test_blocking_the_direct_path_leaves_the_rendezvous_reachable(
        lab_factory: LabFactory) -> None:
    lab = lab_factory("none", "none")
    with lab.a1.listener(6000) as srv:
        assert lab.b1.attempt((lab.a1.ip, 6000)) == "ok"
        srv.accept()[0].close()
        lab.block_direct()
        lab.block_direct()  # idempotent
        assert lab.direct_blocked
        assert lab.b1.attempt((lab.a1.ip, 6000)) == "timeout"
        assert lab.a2.attempt((lab.b1.ip, 6001)) == "timeout"  # not even b1's RST comes
        with lab.rdv.listener() as rdv_srv:
            for host in (lab.a1, lab.b1):
                assert seen_from(host, rdv_srv)[0] == host.ip  # the rendezvous still is
        lab.unblock_direct()
        lab.unblock_direct()
        assert not lab.direct_blocked
        assert lab.b1.attempt((lab.a1.ip, 6000)) == "ok"


def test_a_tcp_counter_counts_one_port_both_ways(lab_factory: LabFactory) -> None:
    lab = lab_factory("drop", "drop")
    counter = lab.tcp_counter(lab.rdv, 7000)
    with lab.rdv.listener(7000) as srv, lab.rdv.listener(7001) as other:
        assert counter.read() == (0, 0)
        for port, server in ((7000, srv), (7001, other)):
            sock = tcp_socket(lab.a1)
            sock.settimeout(5)
            sock.connect((RDV, port))
            conn, _ = server.accept()
            sock.sendall(b"x" * 10_000)
            got = 0
            while got < 10_000:
                got += len(conn.recv(65536))
            conn.sendall(b"y" * 5_000)
            sock.recv(65536)
            sock.close()
            conn.close()
            if port == 7000:
                packets, size = counter.read()
                assert packets >= 6 and size >= 15_000
                after_first = (packets, size)
        time.sleep(0.2)  # the FINs of 7000 are in already; 7001 never counts
    assert counter.read()[1] - after_first[1] < 500
    counter.close()


@pytest.mark.parametrize("mode", ["drop", "symmetric"])
def test_a_hairpinning_nat_brings_its_own_mappings_back_inside(
        lab_factory: LabFactory, mode: str) -> None:
    lab = lab_factory(mode, mode, hairpin=("a",))
    with lab.rdv.listener() as rdv:
        for site in (lab.a, lab.b):
            host = site.hosts[0]
            with host.listener(share=True) as own:
                local = own.getsockname()[1]
                public_ip, public_port, _ = seen_from(host, rdv, bind_port=local)  # a mapping
                for client in site.hosts:  # the host itself, and its LAN neighbour
                    if not site.hairpin:
                        # the NAT's own kernel answers: nothing listens there
                        assert client.attempt((public_ip, public_port)) == "ECONNREFUSED"
                        continue
                    ip, _, _ = _accepting(client, own, public_ip, public_port)
                    assert ip == site.public_ip, "hairpinned with the public address as source"
                # a port the NAT never mapped is still its own kernel's
                assert host.attempt((public_ip, 1)) == "ECONNREFUSED"
    rules = lab.nata.run(["nft", "list", "ruleset"]).stdout.decode()
    assert "map hairpin" in rules and "map hairpin" not in \
        lab.natb.run(["nft", "list", "ruleset"]).stdout.decode()
    assert "hairpin" in lab.describe()


def test_rdv_second_address_is_reachable_and_not_the_source(lab_factory: LabFactory) -> None:
    lab = lab_factory("drop", "none", rdv_second_ip=True)
    assert lab.rdv_ips == ["198.51.100.2", "198.51.100.3"]
    with lab.rdv.listener() as srv:
        port = srv.getsockname()[1]
        sock = tcp_socket(lab.a1)
        sock.settimeout(5)
        try:
            sock.connect(("198.51.100.3", port))
            conn, _ = srv.accept()
            assert conn.getsockname()[0] == "198.51.100.3"
            conn.close()
        finally:
            sock.close()
    with lab.b1.listener() as b1:  # rdv's own connections come from the primary
        ip, _, _ = _accepting(lab.rdv, b1, lab.b1.ip)
        assert ip == "198.51.100.2"
    out = lab.rdv.run(["ip", "-4", "-o", "addr", "show", "dev", "eth0"]).stdout.decode()
    assert out.index("198.51.100.2") < out.index("198.51.100.3")


def test_an_ipv6_only_site_has_no_ipv4_but_loopback(lab_factory: LabFactory) -> None:
    lab = lab_factory("drop", "drop", ipv6=True, ipv6_only=("a",))
    for host in lab.a.hosts:
        out = host.run(["ip", "-4", "-o", "addr", "show"]).stdout.decode()
        assert "inet " in out and all(" lo " in line for line in out.splitlines()), out
        assert host.run(["ip", "-4", "route", "show"]).stdout.strip() == b""
    with lab.a1.enter():
        v4 = socket.socket()
        v6 = socket.socket(socket.AF_INET6)
    try:
        with pytest.raises(OSError) as caught:
            v4.connect(("198.51.100.2", 3012))
        assert caught.value.errno == errno.ENETUNREACH
        with lab.rdv.listener(family=socket.AF_INET6) as srv:
            v6.settimeout(5)
            v6.connect((lab.rdv.ip6, srv.getsockname()[1]))
            conn, peer = srv.accept()
            assert peer[0] == lab.a1.ip6  # no NAT on IPv6
            conn.close()
    finally:
        v4.close()
        v6.close()
    assert "inet 10.0.2.2/24" in lab.b1.run(["ip", "-4", "-o", "addr"]).stdout.decode()
    with pytest.raises(LabError, match="ipv6_only"):
        Lab("drop", "drop", ipv6_only=("a",))  # IPv6-only needs IPv6


def test_private_addresses_not_routable_on_the_internet(lab_factory: LabFactory) -> None:
    lab = lab_factory("drop", "rst")
    assert "10." not in lab.inet.run(["ip", "route"]).stdout.decode()
    assert lab.inet.run(["ip", "route", "get", "10.0.1.2"], check=False).returncode != 0
    assert lab.inet.attempt(("10.0.1.2", 80)) == "ENETUNREACH"
    # from rdv: the router answers ICMP net unreachable
    assert lab.rdv.attempt(("10.0.2.2", 80)) in {"ENETUNREACH", "EHOSTUNREACH"}
    # and site b cannot reach site a's private addresses either
    assert lab.b1.attempt(("10.0.1.2", 80)) in {"ENETUNREACH", "EHOSTUNREACH"}


# --------------------------------------------------------------------------- delay and loss


def test_delay_applies_per_pass_through_the_router(lab_factory: LabFactory) -> None:
    fast = lab_factory()
    slow = lab_factory(delay_ms=20)
    with fast.rdv.listener(7000), slow.rdv.listener(7000):
        fast_rtts = [connect_rtt(fast.a1, (RDV, 7000)) for _ in range(3)]
        slow_rtts = [connect_rtt(slow.a1, (RDV, 7000)) for _ in range(3)]
    assert max(fast_rtts) < 0.005, fast_rtts
    assert min(slow_rtts) >= 0.040, slow_rtts
    assert max(slow_rtts) < 0.200, slow_rtts


def test_jitter_spreads_rtts(lab_factory: LabFactory) -> None:
    lab = lab_factory(delay_ms=20, jitter_ms=10)
    with lab.rdv.listener(7000):
        rtts = [connect_rtt(lab.a1, (RDV, 7000)) for _ in range(12)]
    assert min(rtts) >= 0.020, rtts
    assert max(rtts) < 0.150, rtts
    assert statistics.pstdev(rtts) > 0.002, rtts


def test_delayer_survives_thousands_of_packets(lab_factory: LabFactory) -> None:
    lab = lab_factory(delay_ms=5)
    assert lab.delayer is not None
    received = udp_blast(lab.a1, lab.rdv, 3000)
    assert lab.delayer.poll() is None, "the delayer died"
    assert received >= 2970, received
    with lab.inet.enter():
        stats = Path("/proc/thread-self/net/netfilter/nfnetlink_queue").read_text().split()
    # queue_num portid queue_total copy_mode copy_range queue_dropped user_dropped id_seq 1
    assert int(stats[0]) == 0
    assert int(stats[5]) == 0 and int(stats[6]) == 0, stats
    assert int(stats[7]) >= 3000, stats
    with lab.rdv.listener(7000):
        assert connect_rtt(lab.a1, (RDV, 7000)) >= 0.010


def test_loss_drops_roughly_the_given_share(lab_factory: LabFactory) -> None:
    lab = lab_factory(loss=0.5)
    received = udp_blast(lab.a1, lab.rdv, 200)
    assert 60 <= received <= 140, received


# --------------------------------------------------------------------------- teardown


def test_teardown_removes_namespaces_and_processes(lab_factory: LabFactory) -> None:
    lab = lab_factory("rst", "drop", delay_ms=1)
    sleeper = lab.rdv.popen(["sleep", "60"])
    stubborn = lab.a1.popen(
        ["sh", "-c", "trap '' TERM; sleep 61 & echo $!; wait"], stdout=subprocess.PIPE
    )
    assert stubborn.stdout is not None
    grandchild = int(stubborn.stdout.readline())
    delayer = lab.delayer
    assert delayer is not None and delayer.poll() is None
    start = time.monotonic()
    lab.down()
    assert time.monotonic() - start < 4
    assert netns_with_prefix(lab.prefix) == []
    assert not (STATE_DIR / f"{lab.prefix}.pid").exists()
    for proc in (sleeper, stubborn, delayer):
        assert proc.poll() is not None
    assert wait_dead(grandchild), "grandchild left alive"
    lab.down()  # idempotent
    assert not lab.is_up


def test_atexit_and_stale_cleanup(lab_factory: LabFactory) -> None:
    mine = lab_factory()
    code = (
        "import os, signal, sys\n"
        "from tests.lab import Lab\n"
        "lab = Lab(delay_ms=1).up()\n"
        "print(lab.prefix, lab.delayer.pid, flush=True)\n"
        "if sys.argv[1] == 'kill': os.kill(os.getpid(), signal.SIGKILL)\n"
    )

    def owner(end: str) -> subprocess.CompletedProcess[str]:
        """A process that brings a lab up and prints it, then ends by ``end`` (exit, kill)."""
        return subprocess.run([sys.executable, "-c", code, end], cwd=REPO,
                              capture_output=True, text=True, timeout=30, check=False)

    # normal exit without down(): the atexit hook removes the lab
    proc = owner("exit")
    assert proc.returncode == 0, proc.stderr
    assert netns_with_prefix(proc.stdout.split()[0]) == []
    # SIGKILLed owner: namespaces stay, the delayer exits by itself, cleanup_stale removes it
    proc = owner("kill")
    assert proc.returncode == -signal.SIGKILL
    prefix, delayer_pid = proc.stdout.split()[0], int(proc.stdout.split()[1])
    assert len(netns_with_prefix(prefix)) == 8
    assert wait_dead(delayer_pid, 5.0), "delayer outlived its lab owner"
    removed = cleanup_stale()
    assert prefix in removed
    assert mine.prefix not in removed
    assert netns_with_prefix(prefix) == []
    assert sorted(netns_with_prefix(mine.prefix)) == sorted(mine.namespaces)


# --------------------------------------------------------------------------- command line


def test_cli_rejects_bad_input_in_one_line() -> None:
    require_lab()
    for args in (
        ("up", "--left", "bogus"),
        ("up", "--loss", "2"),
        ("frobnicate",),
        ("down", "nosuchlab"),
    ):
        proc = run_cli(*args)
        assert proc.returncode != 0, args
        assert "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_cli_refuses_non_root() -> None:
    require_lab()
    proc = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            sys.executable,
            "-m",
            "tests.lab",
            "up",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if "Permission denied" in proc.stderr and "root" not in proc.stderr:
        pytest.skip("repository not readable by nobody")
    assert proc.returncode != 0
    assert "root" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_cli_detach_then_down() -> None:
    require_lab()
    prefix = "t" + secrets.token_hex(3)
    try:
        proc = run_cli("up", "--detach", "--prefix", prefix, "--right", "rst", "--delay-ms", "10")
        assert proc.returncode == 0, proc.stderr
        assert f"python -m tests.lab down {prefix}" in proc.stdout
        assert f"ip netns exec {prefix}-a1" in proc.stdout
        assert len(netns_with_prefix(prefix)) == 8
        # the delayer outlives the CLI process in detached mode
        rdv = Host("rdv", f"{prefix}-rdv", RDV)
        a1 = Host("a1", f"{prefix}-a1", "10.0.1.2")
        with rdv.listener(7000):
            assert connect_rtt(a1, (RDV, 7000)) >= 0.020
        assert _pids_in([f"{prefix}-inet"]), "no delayer in the detached lab"
        down = run_cli("down", prefix)
        assert down.returncode == 0, down.stderr
        assert netns_with_prefix(prefix) == []
    finally:
        run_cli("down", prefix)


def test_cli_foreground_tears_down_on_sigterm() -> None:
    require_lab()
    prefix = "t" + secrets.token_hex(3)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.lab", "up", "--prefix", prefix, "--left", "icmp"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "Ctrl-C" in line:
                break
        assert len(netns_with_prefix(prefix)) == 8, "".join(lines)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert netns_with_prefix(prefix) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        run_cli("down", prefix)


def test_lab_rejects_bad_arguments() -> None:
    from tests.lab.topology import LabError

    with pytest.raises(LabError):
        Lab("bogus")
    with pytest.raises(LabError):
        Lab(loss=1.5)
    with pytest.raises(LabError):
        Lab(prefix="bad prefix!")
    with pytest.raises(LabError, match="nothing to hairpin"):
        Lab("none", "drop", hairpin=("a",))
    with pytest.raises(LabError, match="sites a or b"):
        Lab(hairpin=("c",))
