"""An unruly service and applications, for the chaos tests: connections that close,
reset, flood, half-close or answer late, on loopback, from a seeded generator."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import struct
import threading
import time
from collections.abc import Iterator

from tests.loopback import accepted

CLIENT_KINDS = ("close", "reset", "send_reset", "half_close", "echo")
SERVICE_KINDS = ("echo", "echo", "close", "reset", "flood", "late")
RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends an RST


@contextlib.contextmanager
def unruly_service(seed: int) -> Iterator[tuple[int, list[socket.socket]]]:
    """A service on loopback that treats each connection one of SERVICE_KINDS' ways;
    yields its port and the connections it accepted (closed as they end)."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
    listener.settimeout(0.2)
    stop = threading.Event()
    rng = random.Random(seed)
    conns: list[socket.socket] = []

    def serve(conn: socket.socket, how: str) -> None:
        with conn, contextlib.suppress(OSError):
            if how == "reset":
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET)
                return
            if how == "close":
                return
            if how == "flood":
                conn.sendall(os.urandom(1 << 20))
                return
            if how == "late":
                time.sleep(0.5)
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept() -> None:
        for conn in accepted(listener, stop):
            conn.settimeout(30)  # a connection the sharer forgot still ends the thread
            conns.append(conn)
            threading.Thread(target=serve, args=(conn, rng.choice(SERVICE_KINDS)),
                             daemon=True).start()

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        yield int(listener.getsockname()[1]), conns
    finally:
        stop.set()
        acceptor.join(2)
        listener.close()


def unruly_client(port: int, how: str, size: int) -> None:
    """One application connection, ``how`` (CLIENT_KINDS); errors the tunnel passes
    on (a reset from the service) are its business, not the test's."""
    with contextlib.suppress(OSError), \
            socket.create_connection(("127.0.0.1", port), timeout=10) as app:
        if how == "reset":
            app.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET)
        elif how == "send_reset":
            app.sendall(os.urandom(size))
            app.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET)
        elif how == "half_close":
            app.sendall(os.urandom(size))
            app.shutdown(socket.SHUT_WR)
            while app.recv(65536):
                pass
        elif how == "echo":
            app.sendall(os.urandom(size))
            got = 0
            while got < size and (data := app.recv(65536)):
                got += len(data)
