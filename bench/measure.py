"""What the benchmarks share: a counting/echo service, the two measurements, and an
environment variable set for the processes a benchmark starts.

Protocol of the service, per connection: the first byte ``T`` means "count
everything until EOF, then answer the count as 8 bytes big-endian"; any other
first byte means "echo until EOF, then half-close back".
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator

CHUNK = 1 << 20


def serve_conn(conn: socket.socket) -> None:
    """Serve one connection of the counting/echo protocol, then close it."""
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if conn.recv(1) == b"T":
            buf = bytearray(CHUNK)
            total = 0
            while n := conn.recv_into(buf):
                total += n
            conn.sendall(total.to_bytes(8, "big"))
        else:
            while data := conn.recv(65536):
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)


def send_bytes(sock: socket.socket, size: int) -> None:
    """Send ``size`` random bytes (one random chunk, repeated) with ``sendall``."""
    payload = memoryview(bytearray(os.urandom(CHUNK)))
    left = size
    while left:
        n = min(left, CHUNK)
        sock.sendall(payload[:n])
        left -= n


def send_counted(sock: socket.socket, size: int) -> float:
    """Send ``size`` bytes to the counting service, wait for its count; MB/s."""
    sock.sendall(b"T")
    t0 = time.perf_counter()
    send_bytes(sock, size)
    sock.shutdown(socket.SHUT_WR)
    got = int.from_bytes(sock.recv(8), "big")
    elapsed = time.perf_counter() - t0
    if got != size:
        raise SystemExit(f"bench: the service counted {got} bytes, expected {size}")
    return size / elapsed / 1e6


def echo_mode(sock: socket.socket) -> socket.socket:
    """Switch a fresh connection to echo (for :func:`round_trips`)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(b"E")
    return sock


def round_trips(sock: socket.socket, count: int) -> list[float]:
    """``count`` request/response round trips of 32 bytes on an echo connection, in ms."""
    samples = []
    for _ in range(count):
        t0 = time.perf_counter()
        sock.sendall(b"x" * 32)
        got = 0
        while got < 32:
            got += len(sock.recv(64))
        samples.append((time.perf_counter() - t0) * 1e3)
    return samples


@contextlib.contextmanager
def environ(name: str, value: str | None) -> Iterator[None]:
    """``name`` set to ``value`` (None: unset) for the processes started inside (spawn
    and Popen copy ``os.environ``); as it was after."""
    old = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old
