"""Loopback sockets for the tests and benchmarks: a connected TCP pair, whether this host
has IPv6 loopback, everything a server sends until it closes, a service's accept loop, an echo
service, a service that tags its answers (and a client of it), a fake rendezvous."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Awaitable, Callable, Iterator

from nopf_web.wire.discovery import encode_reply


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


@contextlib.contextmanager
def tcp_service(handle: Callable[[socket.socket], None], port: int = 0,
                host: str = "127.0.0.1") -> Iterator[int]:
    """A TCP service on ``host`` (loopback unless told) that runs ``handle`` on each
    connection in a thread of its own (an ``OSError`` there, such as a reset, ends that
    connection quietly) and closes the connection after it; yields its port.

    The listener lives in the network namespace current when this is entered.
    """
    listener = socket.create_server((host, port), backlog=256)
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            handle(conn)

    def accept() -> None:
        for conn in accepted(listener, stop):
            conn.settimeout(None)
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    acceptor = threading.Thread(target=accept, name="service-accept", daemon=True)
    acceptor.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stop.set()
        acceptor.join(2)
        listener.close()


@contextlib.contextmanager
def echo_service(port: int = 0, host: str = "127.0.0.1") -> Iterator[int]:
    """A TCP echo service on ``host`` (one thread per connection); yields its port.
    Reset connections (a tunnel that stops) end quietly."""

    def echo(conn: socket.socket) -> None:
        while data := conn.recv(65536):
            conn.sendall(data)

    with tcp_service(echo, port, host) as bound:
        yield bound


@contextlib.contextmanager
def fake_rendezvous(behaviour: str) -> Iterator[int]:
    """A loopback rendezvous for ``nopf``: ``behaviour`` "seed" is a seed server written from
    the spec; "garbage" and "short" answer wrong; anything else accepts and stays silent.
    Yields its port."""
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(16)
    lsock.settimeout(0.2)
    stop = threading.Event()
    held: list[socket.socket] = []

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, (ip, port) = lsock.accept()
            except TimeoutError:
                continue
            if behaviour == "seed":  # an independent seed server: 4+2 bytes, END\0, close
                conn.sendall(socket.inet_aton(ip) + port.to_bytes(2, "big") + b"END\0")
                conn.close()
            elif behaviour == "garbage":
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
                conn.close()
            elif behaviour == "short":
                conn.sendall(encode_reply(ip, port)[:7])
                conn.close()
            else:  # silent: accept and say nothing
                held.append(conn)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield lsock.getsockname()[1]
    finally:
        stop.set()
        t.join(2)
        for c in held:
            c.close()
        lsock.close()


def tagged_service(tag: bytes) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                                           Awaitable[None]]:
    """An ``asyncio.start_server`` handler that answers what it read, after ``tag``, then
    closes: which of several services a connection reached."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(tag + await reader.read())
        await writer.drain()
        writer.close()
    return handle


async def ask_service(addr: tuple[str, int]) -> bytes:
    """``hello`` to ``addr``, then all that comes back (b"": refused or reset)."""
    r, w = await asyncio.open_connection(*addr)
    try:  # a refused one may be closed before our EOF leaves
        w.write(b"hello")
        w.write_eof()
        return await r.read()
    except OSError:
        return b""
    finally:
        w.close()
