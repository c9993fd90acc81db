"""Application connections through a tunnel in the lab, random bytes both ways, every
byte checked by SHA-256 at both ends.

A service in one host (the sharer's side) and clients in another (the connector's
side). Each client connects, sends an 8-byte flow number, then its bytes, while
the service sends its own; each side hashes what it sends and what it receives.
Flows have a size each way, or run until :meth:`Flows.stop` (the senders then
half-close). Any socket error (a reset above all) is recorded, never raised in
a thread: :meth:`Flows.check` reports them with the hashes.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

from tests.lab import Host

CHUNK = 64 * 1024


@dataclass
class _End:
    """One end of one flow: what it sent and received, hashed."""

    sent: hashlib._Hash = field(default_factory=hashlib.sha256)
    received: hashlib._Hash = field(default_factory=hashlib.sha256)
    sent_bytes: int = 0
    received_bytes: int = 0
    done: bool = False


class Flows:
    """``count`` flows from ``client`` (to 127.0.0.1:``client_port``) to a service on
    ``service``'s 127.0.0.1:``service_port``; ``size`` bytes each way per flow (None:
    until :meth:`stop`); ``pace``: seconds to sleep after each 64 KiB chunk."""

    def __init__(self, service: Host, service_port: int, client: Host, client_port: int,
                 count: int, size: int | None, *, pace: float = 0.0) -> None:
        self.service_host, self.client_host = service, client
        self.service_port, self.client_port = service_port, client_port
        self.count, self.size, self.pace = count, size, pace
        self.clients = [_End() for _ in range(count)]
        self.services: dict[int, _End] = {}
        self.errors: list[str] = []
        self.accepted = 0
        self._stop = threading.Event()
        self._closed = False
        self._threads: list[threading.Thread] = []
        with service.enter():
            self._listener = socket.create_server(("127.0.0.1", service_port), backlog=64)
        self._listener.settimeout(0.2)

    # -- running --------------------------------------------------------------------

    def start(self) -> Flows:
        self._spawn(self._accept, "flows-accept")
        for i in range(self.count):
            self._spawn(self._client, f"flow-{i}", i)
        return self

    def stop(self) -> None:
        """Senders of open-ended flows send what they have and half-close."""
        self._stop.set()

    def received(self) -> int:
        """Bytes received so far at both ends of every flow."""
        return sum(e.received_bytes for e in self.clients) + sum(
            e.received_bytes for e in list(self.services.values()))

    def wait_received(self, at_least: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.received() < at_least:
            if time.monotonic() > deadline:
                raise AssertionError(f"only {self.received()} of {at_least} bytes received "
                                     f"within {timeout} s; errors: {self.errors[:3]}")
            time.sleep(0.02)

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self._stop.set()
        self._closed = True
        self._listener.close()
        alive = [t.name for t in self._threads if t.is_alive()]
        assert not alive, f"flows still running after {timeout} s: {alive}; {self.errors[:3]}"

    def check(self) -> None:
        """Every flow complete, both ways intact, no error (no reset)."""
        assert not self.errors, self.errors[:5]
        assert self.accepted == self.count, f"{self.accepted} connections reached the service"
        for i, c in enumerate(self.clients):
            s = self.services.get(i)
            assert s is not None and c.done and s.done, f"flow {i} did not finish"
            assert c.sent_bytes == s.received_bytes and s.sent_bytes == c.received_bytes, (
                f"flow {i}: sent {c.sent_bytes}/{s.sent_bytes}, received "
                f"{s.received_bytes}/{c.received_bytes}")
            assert c.sent.digest() == s.received.digest(), f"flow {i}: upload corrupted"
            assert s.sent.digest() == c.received.digest(), f"flow {i}: download corrupted"
            if self.size is not None:
                assert c.sent_bytes == s.sent_bytes == self.size

    # -- threads --------------------------------------------------------------------

    def _spawn(self, target: object, name: str, *args: object) -> None:
        t = threading.Thread(target=target, args=args, name=name, daemon=True)  # type: ignore[arg-type]
        self._threads.append(t)
        t.start()

    def _accept(self) -> None:
        while self.accepted < self.count and not self._closed:
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if not self._closed:
                    self.errors.append(f"service accept: {exc}")
                return
            self.accepted += 1
            self._spawn(self._serve, f"flow-service-{self.accepted}", conn)

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(120)
            try:
                head = _recv_exactly(conn, 8)
                (i,) = struct.unpack("!Q", head)
                end = self.services[i] = _End()
                self._exchange(conn, end, f"service of flow {i}")
            except (OSError, ValueError) as exc:
                self.errors.append(f"service: {type(exc).__name__}: {exc}")

    def _client(self, i: int) -> None:
        end = self.clients[i]
        try:
            with self.client_host.enter():
                sock = socket.create_connection(("127.0.0.1", self.client_port), timeout=30)
            with sock:
                sock.settimeout(120)
                sock.sendall(struct.pack("!Q", i))
                self._exchange(sock, end, f"flow {i}")
        except OSError as exc:
            self.errors.append(f"flow {i}: {type(exc).__name__}: {exc}")

    def _exchange(self, sock: socket.socket, end: _End, name: str) -> None:
        sender = threading.Thread(target=self._send, args=(sock, end, name),
                                  name=f"{name}-send", daemon=True)
        sender.start()
        while data := sock.recv(1 << 16):
            end.received.update(data)
            end.received_bytes += len(data)
        sender.join(120)
        end.done = not sender.is_alive()

    def _send(self, sock: socket.socket, end: _End, name: str) -> None:
        try:
            left = self.size
            while (left is None and not self._stop.is_set()) or (left is not None and left > 0):
                n = CHUNK if left is None else min(CHUNK, left)
                data = os.urandom(n)
                end.sent.update(data)
                sock.sendall(data)
                end.sent_bytes += n
                if left is not None:
                    left -= n
                if self.pace:
                    time.sleep(self.pace)
            sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self.errors.append(f"{name} send: {type(exc).__name__}: {exc}")
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ValueError(f"the connection ended after {len(data)} of {n} bytes")
        data += chunk
    return data
