"""The neutral socket helpers (nopf_web.sockets) on real sockets."""

from __future__ import annotations

import socket

import pytest

from nopf_web.sockets import ignore_syn_errors, reset_close

IP_MINTTL = getattr(socket, "IP_MINTTL", 21)


@pytest.mark.linux_only("IP_MINTTL is Linux's")
def test_syn_errors_are_ignored_just_above_the_syn_ttl_and_then_no_more() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # ICMP errors quote our SYN with at most the TTL it left with: IP_MINTTL
        # one above it ignores them all, and no packet that arrives with more.
        assert ignore_syn_errors(sock, 32)
        assert sock.getsockopt(socket.IPPROTO_IP, IP_MINTTL) == 33
        assert ignore_syn_errors(sock, 2)
        assert sock.getsockopt(socket.IPPROTO_IP, IP_MINTTL) == 3
        # Never more than 33: a peer 31 hops away (TTL 64 - 31) must get through.
        assert ignore_syn_errors(sock, 64)
        assert sock.getsockopt(socket.IPPROTO_IP, IP_MINTTL) == 33
        assert ignore_syn_errors(sock, None)
        assert sock.getsockopt(socket.IPPROTO_IP, IP_MINTTL) == 0


@pytest.mark.parametrize("ttl", [None, 2])
def test_reset_close_resets_the_peer(ttl: int | None) -> None:
    """An abortive close: the peer's next read fails with ECONNRESET (no FIN, no EOF)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        ours = socket.create_connection(server.getsockname(), timeout=5)
        theirs, _ = server.accept()
        with theirs:
            reset_close(ours, ttl)
            assert ours.fileno() == -1
            theirs.settimeout(5)
            with pytest.raises(ConnectionResetError):
                theirs.recv(1)
