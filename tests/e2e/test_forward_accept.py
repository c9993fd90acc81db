"""The connector's accept loop takes every local connection already queued in one
wake-up: a burst larger than the kernel's accept queue, drained one connection
per turn of a busy event loop, overflowed it and the kernel reset the rest
(93-118 of 1,000 with a backlog of 128; bench.scn_streams records the kernel's
counters)."""

from __future__ import annotations

import socket

from nopf_web.tunnel.forward import ACCEPT_BURST, _accepted_now


def test_every_queued_connection_is_taken_at_once_without_blocking() -> None:
    with socket.create_server(("127.0.0.1", 0), backlog=64) as listener:
        listener.setblocking(False)
        clients = [socket.create_connection(listener.getsockname()) for _ in range(40)]
        taken: list[socket.socket] = []
        try:
            first, _ = listener.accept()
            taken = list(_accepted_now(listener, first))
            assert len(taken) == 40 and taken[0] is first
            assert all(not s.getblocking() for s in taken[1:])
            # Each is a distinct connection that carries bytes.
            for i, client in enumerate(clients):
                client.sendall(b"%d" % i)
            for conn in taken:
                conn.settimeout(5)
            got = sorted(int(conn.recv(16)) for conn in taken)
            assert got == list(range(40))
            assert list(_accepted_now(listener, first)) == [first]  # nothing more queued
        finally:
            for s in clients + taken:
                s.close()


def test_a_burst_is_bounded_per_wake_up() -> None:
    assert 256 <= ACCEPT_BURST <= 4096
