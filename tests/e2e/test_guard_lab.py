"""The packet guard at packet level, inside lab namespaces, as root.

What leaves a host is counted by nftables counters on the host's NAT, where
its packets enter from the LAN (``NatCounters``), and by what the other end
of the connection sees. The guard is the real pydivert one; a test thread
moves into a host's namespace (``host.enter()``) and the guard's receive
threads, started from it, live there too.
"""

from __future__ import annotations

import asyncio
import itertools
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nopf_web.guard import Protection, divert, guard_status, make_guard
from nopf_web.guard.filters import WindowRule, window_filter
from nopf_web.guard.service import DivertGuard
from nopf_web.punch.machine import PunchConfig, Tactic
from tests.e2e.guard_harness import NatCounters, Side, close_rules, punch_pair, rendezvous
from tests.lab.fixtures import LabFactory, require_lab
from tests.lab.topology import Host, Lab
from tests.programs import argv

pytestmark = pytest.mark.lab

PEER_PORT = 5000


def tc_filters(host: Host) -> str:
    """Every TC filter on every interface of ``host``'s namespace."""
    out = []
    for dev in ("lo", "eth0"):
        for hook in ("ingress", "egress"):
            out.append(host.run(["tc", "filter", "show", "dev", dev, hook]).stdout.decode())
    return "".join(out).strip()


def connect_from(host: Host, port: int, peer: tuple[str, int]) -> socket.socket:
    with host.enter():
        sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("0.0.0.0", port))
    sock.settimeout(5)
    sock.connect(peer)
    return sock


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "unexpected EOF"
        data += chunk
    return data


def sees_eof(sock: socket.socket, within: float) -> bool:
    """True if ``sock`` reads EOF (the peer's FIN arrived) within ``within`` s."""
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False


@pytest.fixture
def open_lab(lab_factory: LabFactory) -> Lab:
    """Site A behind a dropping NAT; site B public (no NAT), so A can reach B directly."""
    return lab_factory("drop", "none")


@pytest.mark.parametrize("close", ["fin", "rst"])
def test_only_the_punch_ports_close_is_kept_in_and_only_during_the_window(
        open_lab: Lab, close: str) -> None:
    lab = open_lab
    a1, a2, b1 = lab.a1, lab.a2, lab.b1
    punch_port, other_port = 41000, 41001
    peer = (b1.ip, PEER_PORT)
    server = b1.listener(PEER_PORT)
    rules = {f"punch_{k}": v for k, v in close_rules(a1.ip, sport=punch_port).items()}
    rules |= {f"other_{k}": v for k, v in close_rules(a1.ip, sport=other_port).items()}
    rules |= {f"a2_{k}": v for k, v in close_rules(a2.ip, sport=punch_port).items()}
    guard = DivertGuard()

    async def in_the_window() -> tuple[Protection, dict[str, int], list[socket.socket]]:
        async with guard.protect(punch_port, peer) as window:
            assert window.guarded, window.error
            # The connection the punch port would close: established through the window
            # (SYN, SYN-ACK and ACK pass), then closed.
            punch = connect_from(a1, punch_port, peer)
            punch_far, _ = server.accept()
            # The same port number on another host (another namespace), and another
            # port on this host: both close normally.
            neighbour = connect_from(a2, punch_port, peer)
            neighbour_far, _ = server.accept()
            other = connect_from(a1, other_port, peer)
            other_far, _ = server.accept()
            if close == "rst":
                # Linger 0: close() sends an RST instead of a FIN.
                punch.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            punch.close()
            neighbour.close()
            other.close()
            assert sees_eof(other_far, 3), "another port's FIN must pass"
            assert sees_eof(neighbour_far, 3), "another namespace's FIN must pass"
            # Long enough for the FIN's retransmission (RTO >= 200 ms): all kept in.
            assert not sees_eof(punch_far, 1.0), "the punch port's close leaked"
            during = counters.read()
            assert tc_filters(a1), "the guard's filter should be attached in a1"
            assert tc_filters(a2) == "", "a1's guard must not reach into a2's namespace"
        return window, during, [punch_far, neighbour_far, other_far]

    with NatCounters(lab.nata, rules) as counters, a1.enter():
        guard.start()
        # The window's receive thread starts from this thread's loop: in a1's namespace.
        window, during, far_ends = asyncio.run(in_the_window())
        punch_far = far_ends[0]
        after_window = counters.read()
        assert tc_filters(a1) == "", "the window's filter must be gone when it ends"
        if close == "fin":
            # The socket retransmits its FIN; once the window is over it leaves normally.
            assert sees_eof(punch_far, 5)
        else:
            # An RST is never retransmitted: the peer learns of the close only when it
            # speaks to the dead connection and our kernel answers with a fresh RST.
            punch_far.sendall(b"?")
            with pytest.raises(ConnectionResetError):
                punch_far.settimeout(5)
                punch_far.recv(1)
        guard.stop()
        final = counters.read()
    assert during["punch_rst"] == 0 and during["punch_finack"] == 0, during
    assert during["other_finack"] >= 1 and during["a2_finack"] >= 1, during
    assert after_window["punch_rst"] == 0, after_window
    if close == "fin":
        assert final["punch_finack"] >= 1, final
    else:
        assert final["punch_rst"] >= 1, final
    assert window.dropped >= 1
    assert guard.dropped == window.dropped
    assert guard_status(guard) == {"active": False, "reason": "the guard was stopped",
                                   "dropped": window.dropped}
    for s in (server, *far_ends):
        s.close()


def test_the_kernel_diverts_nothing_but_the_closes(open_lab: Lab) -> None:
    """eBPFDivert lowers the window's filter into the kernel exactly: data, ACKs and the
    handshake on the punch port are not even taken to user space (and re-injected);
    only the closing segment is diverted."""
    lab = open_lab
    server = lab.b1.listener(PEER_PORT)
    with lab.a1.enter():
        handle = divert.Handle(window_filter(WindowRule(41004, (lab.b1.ip, PEER_PORT))))
    try:
        conn = connect_from(lab.a1, 41004, (lab.b1.ip, PEER_PORT))
        far, _ = server.accept()
        for _ in range(20):  # data both ways, all read (so the close is a FIN)
            conn.sendall(b"x" * 1000)
            far.sendall(recv_exactly(far, 1000))
            assert recv_exactly(conn, 1000) == b"x" * 1000
        assert handle.stats()["diverted"] == 0
        assert handle.recv(0.2) is None
        conn.close()
        captured = handle.recv(2.0)
        assert captured is not None and captured.segment is not None
        assert captured.segment.fin and captured.segment.ack
        assert captured.segment.src_port == 41004 and captured.segment.outbound
        assert handle.stats()["diverted"] >= 1
    finally:
        handle.close()
    assert tc_filters(lab.a1) == ""
    for s in (server, far):
        s.close()


def test_stop_ends_open_windows_and_leaves_no_filter(open_lab: Lab) -> None:
    lab = open_lab
    guard = DivertGuard()
    entered = threading.Event()
    release = threading.Event()
    windows = []

    async def hold() -> None:
        async with guard.protect(41002, (lab.b1.ip, PEER_PORT)) as window:
            windows.append(window)
            entered.set()
            await asyncio.to_thread(release.wait, 10)

    def punching() -> None:
        with lab.a1.enter():
            asyncio.run(hold())

    thread = threading.Thread(target=punching)
    thread.start()
    assert entered.wait(10)
    assert windows[0].guarded and tc_filters(lab.a1)
    started = time.monotonic()
    guard.stop()  # from another thread, while the window is open (shutdown of nopf-web)
    assert time.monotonic() - started < 1.0
    assert tc_filters(lab.a1) == ""
    async def late_window() -> None:
        async with guard.protect(41003, (lab.b1.ip, PEER_PORT)) as late:
            assert not late.guarded and late.error == "the guard was stopped"
            assert tc_filters(lab.a1) == ""

    with lab.a1.enter():
        asyncio.run(late_window())
    release.set()
    thread.join(10)
    assert not guard.active


def test_a_window_opens_and_closes_without_holding_the_event_loop(open_lab: Lab) -> None:
    """Opening a window (a pydivert handle: tens of ms) and closing it (its receive
    thread joined, the filter detached) happen off the event loop: the dashboard and the
    other sessions keep being served. A ticker on the loop keeps ticking throughout."""
    lab = open_lab
    guard = DivertGuard()
    tick = 0.002

    async def main() -> tuple[list[float], float, float, float, float]:
        ticks: list[float] = []

        async def ticker() -> None:
            while True:
                ticks.append(time.monotonic())
                await asyncio.sleep(tick)

        async with asyncio.TaskGroup() as tg:
            ticking = tg.create_task(ticker(), name="test-ticker")
            await asyncio.sleep(0.05)
            start = time.monotonic()
            async with guard.protect(41005, (lab.b1.ip, PEER_PORT)) as window:
                opened = time.monotonic()
                assert window.guarded, window.error
                # (tc runs as a subprocess: off the loop too, and out of the timed parts)
                assert await asyncio.to_thread(tc_filters, lab.a1)
                closing = time.monotonic()
            closed = time.monotonic()
            await asyncio.sleep(0.05)
            ticking.cancel()
        return ticks, start, opened, closing, closed

    with lab.a1.enter():
        ticks, start, opened, closing, closed = asyncio.run(main())
    guard.stop()
    assert tc_filters(lab.a1) == ""

    def gaps(lo: float, hi: float) -> list[float]:
        inside = [lo, *(t for t in ticks if lo < t < hi), hi]
        return [b - a for a, b in itertools.pairwise(inside)]

    # A loop held by the open (or the close) would show one gap as long as all of it.
    for what, lo, hi in (("open", start, opened), ("close", closing, closed)):
        took = hi - lo
        longest = max(gaps(lo, hi))
        assert longest < max(0.02, took / 2), (
            f"the event loop stood still for {longest * 1000:.1f} ms of the "
            f"{took * 1000:.1f} ms {what}")
    assert len([t for t in ticks if start < t < opened or closing < t < closed]) >= 3


def test_punch_through_nats_then_the_tunnel_closes_normally(lab_factory: LabFactory) -> None:
    """nopf's punch with the guard on both peers: it connects, no RST ever leaves either
    host, and the tunnel's close after the window is an ordinary FIN exchange."""
    lab = lab_factory("rst", "icmp", delay_ms=20, jitter_ms=5)
    config = PunchConfig(timeout=10)
    with rendezvous(lab.rdv) as rdv, \
            NatCounters(lab.nata, close_rules(lab.a1.ip, not_dst=lab.rdv.ip)) as ca, \
            NatCounters(lab.natb, close_rules(lab.b1.ip, not_dst=lab.rdv.ip)) as cb:
        result = punch_pair(Side(lab.a1, Tactic.ARM, True, 0.0, config),
                            Side(lab.b1, Tactic.CONNECT, True, 0.5, config), rdv)
        time.sleep(0.3)
        a, b = ca.read(), cb.read()
    for side in (result.server, result.client):
        assert side.guarded, side.guard_error
        assert side.ok and side.echoed, side.error
        assert side.closed_cleanly, side.error
        # The symmetric-NAT probe's close happened inside the discovery window.
        assert side.dropped_discovery >= 1
    # Towards the peer each host sent the tunnel's FIN (after the window) and
    # never an RST.
    assert a["rst"] == 0 and b["rst"] == 0, (a, b)
    assert a["finack"] >= 1 and b["finack"] >= 1, (a, b)
    assert tc_filters(lab.a1) == "" and tc_filters(lab.b1) == ""


# -- the real programs ------------------------------------------------------------


def _line(proc: subprocess.Popen[bytes], timeout: float = 15) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "no output in time"
    return proc.stdout.readline().decode().strip()


@pytest.fixture
def lab_with_service(lab_factory: LabFactory) -> Iterator[tuple[Lab, int]]:
    lab = lab_factory("drop", "drop", delay_ms=10, jitter_ms=2)
    echo = ("import socket\n"
            "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
            "s.bind(('127.0.0.1', 7000)); s.listen(1)\n"
            "c, _ = s.accept()\n"
            "while data := c.recv(4096): c.sendall(data)\n")
    service = lab.a1.popen([sys.executable, "-c", echo])
    server = lab.rdv.popen(argv("nopf-server"), stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    yield lab, 7000
    for proc in (service, server):
        proc.terminate()
        proc.wait(5)


def test_nopf_cli_runs_the_guard_and_removes_it(lab_with_service: tuple[Lab, int]) -> None:
    lab, service_port = lab_with_service
    rdv = f"{lab.rdv.ip}:3012"
    opts = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    srv = lab.a1.popen(argv("nopf", "-p", str(service_port), "-a", rdv, "-t", "s"), **opts)
    cli = lab.b1.popen(argv("nopf", "-p", "7100", "-a", rdv), **opts)
    srv_public, cli_public = _line(srv), _line(cli)
    assert srv.stdin is not None and cli.stdin is not None
    srv.stdin.write(cli_public.encode() + b"\n")
    srv.stdin.flush()
    cli.stdin.write(srv_public.encode() + b"\n")
    cli.stdin.flush()
    with lab.b1.enter():
        app = socket.create_connection(("127.0.0.1", 7100), timeout=20)
    app.sendall(b"through the tunnel")
    assert app.recv(100) == b"through the tunnel"
    assert _line(srv).startswith("Started pipe between localhost:7000 - ")
    assert _line(cli).startswith("Started pipe between localhost:7100 - ")
    assert tc_filters(lab.a1) == "" and tc_filters(lab.b1) == "", "filters outlived the punch"
    app.close()
    for proc in (srv, cli):
        try:
            _, raw = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, raw = proc.communicate()
        err = raw.decode()
        assert "guard inactive" not in err, err
        assert "Traceback" not in err, err
        assert "guard dropped" in err and "during the discovery" in err, err
    assert tc_filters(lab.a1) == "" and tc_filters(lab.b1) == ""


def test_nopf_cli_says_why_the_guard_is_inactive(tmp_path: Path) -> None:
    """--no-guard, and a process without the capabilities: one stderr line each."""
    require_lab()
    rdv = socket.socket()
    rdv.bind(("127.0.0.1", 0))  # bound, never listening: discovery is refused at once
    port = rdv.getsockname()[1]
    base = argv("nopf", "-p", "7200", "-a", f"127.0.0.1:{port}")
    no_guard = subprocess.run([*base, "--no-guard"], capture_output=True, text=True,
                              timeout=30, stdin=subprocess.DEVNULL)
    assert "nopf: guard inactive: disabled with --no-guard" in no_guard.stderr.splitlines()
    no_caps = subprocess.run(["setpriv", "--bounding-set=-all", "--inh-caps=-all", *base],
                             capture_output=True, text=True, timeout=30,
                             stdin=subprocess.DEVNULL)
    lines = [x for x in no_caps.stderr.splitlines() if "guard inactive" in x]
    assert len(lines) == 1 and "CAP_BPF" in lines[0] and "CAP_NET_ADMIN" in lines[0], \
        no_caps.stderr
    rdv.close()
    for proc in (no_guard, no_caps):
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr


def test_make_guard_inside_a_namespace(lab_factory: LabFactory) -> None:
    """As root, in a namespace: the real guard, active; its probe leaves nothing behind."""
    lab = lab_factory("drop", "drop")
    with lab.a1.enter():
        guard = make_guard()
    assert isinstance(guard, DivertGuard) and guard.active and guard.reason is None
    assert tc_filters(lab.a1) == ""
    guard.stop()
