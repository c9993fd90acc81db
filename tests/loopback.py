"""Loopback sockets for the tests and benchmarks: a connected TCP pair, whether this host
has IPv6 loopback, everything a server sends until it closes, a service's accept loop."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two ends of one real loopback TCP connection."""
    with socket.create_server(("127.0.0.1", 0)) as lsock:
        a = socket.create_connection(lsock.getsockname())
        b, _ = lsock.accept()
    return a, b


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


async def read_until_close(addr: tuple[str, int],
                           source: str | None = None) -> tuple[bytes, int]:
    """Connect to ``addr`` (from ``source`` if given), read everything the server sends
    until it closes (5 s at most between reads); that and our local port."""
    sock = socket.socket(socket.AF_INET6 if ":" in addr[0] else socket.AF_INET)
    if source is not None:
        sock.bind((source, 0))
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, addr)
    port = sock.getsockname()[1]
    data = b""
    while chunk := await asyncio.wait_for(loop.sock_recv(sock, 100), 5):
        data += chunk
    sock.close()
    return data, port


def accepted(listener: socket.socket, stop: threading.Event) -> Iterator[socket.socket]:
    """Each connection ``listener`` accepts until ``stop`` is set or the listener is closed.

    The listener needs a timeout: it is how often ``stop`` is looked at."""
    while not stop.is_set():
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        except OSError:  # closed under us: the service is ending
            return
        yield conn
