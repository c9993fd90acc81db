"""nopf_web.sockets' Windows and macOS paths, run here: the option plans per system,
the code nopf takes without sendmsg, MSG_DONTWAIT, SO_REUSEPORT, IP_MINTTL or TCP_INFO
(taken away from the socket module) on real loopback sockets, and the macOS
TCP_CONNECTION_INFO parser on bytes laid out as macOS' struct is."""

from __future__ import annotations

import select
import socket
import struct
import sys

import pytest

from nopf_web import sockets
from nopf_web.sockets import (
    TCP_ESTABLISHED,
    TCP_SYN_RECV,
    TCP_SYN_SENT,
    exclusive_listener_options,
    ignore_syn_errors,
    keepalive_plan,
    option,
    parse_darwin_connection_info,
    parse_linux_tcp_info,
    peek_nonblocking,
    port_sharing_options,
    reusable_socket,
    send_gathered,
    syn_error_shield,
    tcp_facts,
)
from tests.unit.platform_support import SO_REUSEPORT_LINUX, SocketWithoutSendmsg, take_away

# -- port sharing ------------------------------------------------------------------------


def test_windows_shares_ports_with_so_reuseaddr_alone() -> None:
    assert port_sharing_options("win32") == ("SO_REUSEADDR",)
    assert "SO_REUSEPORT" not in port_sharing_options("win32")
    assert port_sharing_options("darwin") == port_sharing_options("linux")
    # Listeners that must not be shared: exclusive on Windows, restartable elsewhere.
    assert exclusive_listener_options("win32") == ("SO_EXCLUSIVEADDRUSE",)
    assert exclusive_listener_options("linux") == exclusive_listener_options("darwin") \
        == ("SO_REUSEADDR",)
    # winsock2.h: SO_EXCLUSIVEADDRUSE is ~SO_REUSEADDR (4 there).
    assert option("SO_EXCLUSIVEADDRUSE", "win32") == ~4


@pytest.mark.linux_only("checks Linux's SO_REUSEPORT on the sockets")
def test_windows_options_on_real_sockets_set_reuseaddr_only_and_still_share_a_port() -> None:
    # The Windows branch's options, applied here: exactly SO_REUSEADDR, never
    # SO_REUSEPORT. Linux then lets sockets share the port as long as none
    # listens, which is what discovery and each punch attempt do (Windows also
    # lets a listener share it: that part cannot be reproduced here).
    with socket.create_server(("127.0.0.1", 0)) as one, \
            socket.create_server(("127.0.0.1", 0)) as two:
        shared: list[socket.socket] = []
        try:
            for _ in range(2):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                shared.append(sock)
                for name in port_sharing_options("win32"):
                    sock.setsockopt(socket.SOL_SOCKET, getattr(socket, name), 1)
                sock.bind(("127.0.0.1", shared[0].getsockname()[1] if len(shared) > 1 else 0))
            for sock in shared:
                assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
                assert sock.getsockopt(socket.SOL_SOCKET, SO_REUSEPORT_LINUX) == 0
            port = shared[0].getsockname()[1]
            assert shared[1].getsockname()[1] == port
            shared[0].connect(one.getsockname())
            shared[1].connect(two.getsockname())
            for server in (one, two):
                conn, addr = server.accept()
                conn.close()
                assert addr[1] == port  # both connections left from the one port
        finally:
            for sock in shared:
                sock.close()


@pytest.mark.linux_only("checks Linux's SO_REUSEPORT on the socket")
def test_reusable_socket_without_so_reuseport_sets_only_reuseaddr(
        monkeypatch: pytest.MonkeyPatch) -> None:
    take_away(monkeypatch, "SO_REUSEPORT")
    assert port_sharing_options() == ("SO_REUSEADDR",)
    with reusable_socket("127.0.0.1", 0) as a:
        assert a.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
        assert a.getsockopt(socket.SOL_SOCKET, SO_REUSEPORT_LINUX) == 0
        with reusable_socket("127.0.0.1", a.getsockname()[1]) as b:  # not listening: shared
            assert b.getsockname() == a.getsockname()


# -- ICMP errors about low-TTL SYNs ------------------------------------------------------


def test_which_systems_can_shield_a_low_ttl_syn() -> None:
    assert syn_error_shield("linux") == "min_ttl"
    assert syn_error_shield("win32") == "not_needed"  # no abort on ICMP unless asked for
    assert syn_error_shield("darwin") == "exposed"  # icmp_may_rst drops SYN_SENT sockets


def test_without_ip_minttl_nothing_is_set_and_the_system_is_exposed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    take_away(monkeypatch, "IP_MINTTL")
    if sys.platform != "win32":
        assert syn_error_shield() == "exposed"
    with socket.socket() as sock:
        assert ignore_syn_errors(sock, 2) is False
        assert ignore_syn_errors(sock, None) is False


# -- TCP facts ---------------------------------------------------------------------------


def darwin_info(state: int, srtt_ms: int) -> bytes:
    """A ``struct tcp_connection_info`` as macOS fills it (112 bytes, little-endian)."""
    head = struct.pack("<BBBBIIIIIIIIIIIII", state, 6, 6, 0, 0x7, 0, 200, 1448, 0xFFFF,
                       14480, 131072, 0, 131072, srtt_ms + 3, srtt_ms, srtt_ms // 2, 0)
    assert len(head) == 56
    return head + struct.pack("<7Q", 10, 2000, 0, 9, 1500, 0, 0)


@pytest.mark.parametrize(("bsd_state", "linux_state"), [
    (4, TCP_ESTABLISHED), (2, TCP_SYN_SENT), (3, TCP_SYN_RECV), (1, None), (0, None)])
def test_macos_connection_info_states_are_translated(bsd_state: int,
                                                     linux_state: int | None) -> None:
    facts = parse_darwin_connection_info(darwin_info(bsd_state, 37))
    assert facts is not None
    assert facts.state == linux_state
    assert facts.rtt == pytest.approx(0.037)  # tcpi_srtt is in milliseconds
    assert facts.syn_data is False


def test_macos_connection_info_edge_cases() -> None:
    assert parse_darwin_connection_info(darwin_info(4, 0)).rtt is None  # type: ignore[union-attr]
    assert parse_darwin_connection_info(darwin_info(4, 12)[:47]) is None  # no tcpi_srtt
    short = parse_darwin_connection_info(darwin_info(4, 12)[:48])
    assert short is not None and short.rtt == pytest.approx(0.012)
    # Not read as Linux's layout: Linux's RTT field (offset 68) holds rx bytes here.
    linux_view = parse_linux_tcp_info(darwin_info(4, 12))
    assert linux_view is not None and linux_view.rtt != pytest.approx(0.012)


@pytest.mark.linux_only("reads Linux's TCP_INFO")
def test_linux_tcp_info_of_a_real_connection() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server, \
            socket.create_connection(server.getsockname()) as client:
        conn, _ = server.accept()
        with conn:
            facts = tcp_facts(client)
            assert facts is not None and facts.state == TCP_ESTABLISHED
            assert facts.rtt is not None and 0 < facts.rtt < 1


def test_without_tcp_info_there_are_no_facts(monkeypatch: pytest.MonkeyPatch) -> None:
    take_away(monkeypatch, "TCP_INFO")
    with socket.create_server(("127.0.0.1", 0)) as server, \
            socket.create_connection(server.getsockname()) as client:
        conn, _ = server.accept()
        with conn:
            if sys.platform.startswith("linux"):
                assert tcp_facts(client) is None
            assert sockets.kernel_rtt(None) is None and not sockets.syn_had_data(None)
            monkeypatch.setattr(sys, "platform", "win32")  # no SIO_TCP_INFO from Python
            assert tcp_facts(client) is None and sockets.tcp_state(client) is None


# -- peeks and gathered writes -----------------------------------------------------------


def test_peek_without_msg_dontwait_never_blocks_and_leaves_the_bytes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    take_away(monkeypatch, "MSG_DONTWAIT")
    a, b = socket.socketpair()
    with a, b:
        a.settimeout(None)  # blocking, as a socket may be before the peek
        with pytest.raises(BlockingIOError):
            peek_nonblocking(a)  # nothing there: at once, not a hang
        assert a.gettimeout() == 0.0
        b.sendall(b"banner")
        select.select([a], [], [], 5)  # arrived (a TCP pair on Windows takes a moment)
        a.setblocking(True)
        assert peek_nonblocking(a, 3) == b"ban"
        assert a.recv(10) == b"banner"  # still there after the peek
        b.close()
        select.select([a], [], [], 5)  # the FIN may take a moment (a TCP pair on Windows)
        assert peek_nonblocking(a) == b""  # EOF


def test_gathered_send_without_sendmsg_sends_one_joined_buffer() -> None:
    a, b = socket.socketpair()
    with b:
        plain = SocketWithoutSendmsg(a.family, a.type, fileno=a.detach())
        with plain:
            assert not hasattr(plain, "sendmsg")
            parts: list[bytes | memoryview] = [b"one ", memoryview(b"two "), b"three"]
            assert send_gathered(plain, parts) == 13
            got = b""
            while len(got) < 13:
                got += b.recv(100)
            assert got == b"one two three"


# -- keepalive and Fast Open ---------------------------------------------------------------


def test_keepalive_plans_per_system() -> None:
    win = keepalive_plan(15, 5, 4, "win32")
    assert win.windows_vals == (1, 15_000, 5_000)  # SIO_KEEPALIVE_VALS takes ms
    assert win.tcp_options == (("TCP_KEEPCNT", 4),)
    mac = keepalive_plan(15, 5, 4, "darwin")
    assert mac.windows_vals is None
    assert mac.tcp_options == (("TCP_KEEPALIVE", 15), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 4))
    assert option("TCP_KEEPALIVE", "darwin") == 0x10  # netinet/tcp.h
    linux = keepalive_plan(15, 5, 4, "linux")
    assert dict(linux.tcp_options)["TCP_USER_TIMEOUT"] == 35_000


@pytest.mark.linux_only("reads Linux's keepalive options back")
def test_keepalive_on_a_real_linux_socket() -> None:
    with socket.socket() as sock:
        sockets.enable_keepalive(sock, idle=15, interval=5, count=4)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 15
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 5
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 4


@pytest.mark.parametrize("platform", ["win32", "darwin"])
def test_fast_open_is_off_outside_linux(monkeypatch: pytest.MonkeyPatch, platform: str) -> None:
    with socket.socket() as sock:
        monkeypatch.setattr(sys, "platform", platform)
        assert sockets.try_fastopen(sock) is False
        assert sockets.enable_fastopen_server(sock) is False
        monkeypatch.undo()
        if sys.platform.startswith("linux"):
            assert sock.getsockopt(socket.IPPROTO_TCP, 30) == 0  # TCP_FASTOPEN_CONNECT unset
