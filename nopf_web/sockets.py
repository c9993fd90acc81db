"""Socket helpers for the rendezvous client, the punch, the sessions and the server.

The platform-specific spots of the data path live here, together (another
platform's path is added next to Linux's, in this one module):

- Port reuse: the discovery connection, every punch attempt and (in
  coordinated mode) a listener all use the same local port P. On Linux/BSD
  that needs SO_REUSEADDR + SO_REUSEPORT; on Windows SO_REUSEADDR alone has
  the "share the port" meaning (there is no SO_REUSEPORT).
- TTL: the first SYN of an arming attempt may go out with a low TTL so it
  opens our own NAT without reaching the peer's; ICMP errors about such a SYN
  are ignored (IP_MINTTL).
- TCP_INFO (Linux): the TCP state, so the punch never abandons a socket that
  is already completing a handshake; the rendezvous' RTT and Fast Open checks.
- TCP Fast Open (Linux) for the coordination connection's hello.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import struct
import sys

# struct tcp_info (Linux, include/uapi/linux/tcp.h), the fields read here:
#   offset 0  u8   tcpi_state    TCP state (include/net/tcp_states.h values below)
#   offset 5  u8   tcpi_options  TCPI_OPT_SYN_DATA: the SYN carried data the kernel
#                                accepted (TCP Fast Open)
#   offset 68 u32  tcpi_rtt      smoothed RTT in microseconds, host byte order (on an
#                                accepted socket: the handshake's SYN-ACK -> ACK time)
TCP_ESTABLISHED = 1
TCP_SYN_SENT = 2
TCP_SYN_RECV = 3
TCPI_OPTIONS_OFFSET = 5
TCPI_OPT_SYN_DATA = 0x20
TCPI_RTT = struct.Struct("=I")
TCPI_RTT_OFFSET = 68
TCPI_SIZE = TCPI_RTT_OFFSET + TCPI_RTT.size  # bytes of TCP_INFO the fields above need

_TCP_INFO = getattr(socket, "TCP_INFO", 11)

DEFAULT_TTL = 64


def reusable_socket(host: str, port: int) -> socket.socket:
    """A non-blocking TCP socket bound to ``host:port`` with port sharing enabled."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT") and sys.platform != "win32":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setblocking(False)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def set_ttl(sock: socket.socket, ttl: int) -> None:
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)


# IP_MINTTL (RFC 5082 GTSM): Linux applies it to ICMP errors too, checking the TTL
# in the header they quote, i.e. our SYN as it reached the router that answered.
# A SYN sent with TTL t is quoted with at most t, while the peer's packets arrive
# with more (64 minus the hops): with IP_MINTTL t + 1 the kernel ignores the ICMP
# time-exceeded of an expired low-TTL arming SYN, and the ICMP refusal of a first
# shot by the peer's NAT, either of which would otherwise abort the socket. At
# most 33, so a peer up to 31 hops away always gets through, whatever t.
_IP_MINTTL = getattr(socket, "IP_MINTTL", 21 if sys.platform.startswith("linux") else None)
MAX_MIN_TTL = 33


def ignore_syn_errors(sock: socket.socket, ttl: int | None) -> bool:
    """Make ``sock`` ignore ICMP errors about its own SYN sent with TTL ``ttl``
    (None: stop ignoring them); False if unsupported."""
    if _IP_MINTTL is None:
        return False
    min_ttl = 0 if ttl is None else min(ttl + 1, MAX_MIN_TTL)
    try:
        sock.setsockopt(socket.IPPROTO_IP, _IP_MINTTL, min_ttl)
    except OSError:
        return False
    return True


def tcp_info(sock: socket.socket | None, size: int) -> bytes:
    """The first ``size`` bytes of the socket's TCP_INFO; empty where there is none."""
    if sock is None or not sys.platform.startswith("linux"):
        return b""
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, size)
    except OSError:
        return b""


def tcp_state(sock: socket.socket) -> int | None:
    """The kernel's TCP state of ``sock`` (Linux), or None where unknown."""
    info = tcp_info(sock, 8)
    return info[0] if info else None


def rtt_of(info: bytes) -> float | None:
    """The smoothed RTT in seconds from TCP_INFO bytes (None: not there, or not measured)."""
    if len(info) < TCPI_SIZE:
        return None
    (micros,) = TCPI_RTT.unpack_from(info, TCPI_RTT_OFFSET)
    return micros / 1e6 if micros else None


def syn_data_of(info: bytes) -> bool:
    """Whether TCP_INFO bytes say the peer's SYN carried data the kernel accepted."""
    return len(info) > TCPI_OPTIONS_OFFSET and bool(info[TCPI_OPTIONS_OFFSET]
                                                     & TCPI_OPT_SYN_DATA)


def kernel_rtt(sock: socket.socket | None) -> float | None:
    """The kernel's smoothed RTT of ``sock`` in seconds (Linux), or None where unknown."""
    return rtt_of(tcp_info(sock, TCPI_SIZE))


def syn_had_data(sock: socket.socket | None) -> bool:
    """Whether the peer's SYN carried data the kernel accepted (TCP Fast Open, Linux)."""
    return syn_data_of(tcp_info(sock, TCPI_SIZE))


# Linux TCP Fast Open for the coordination connection: connect() only records the
# peer and the first write sends the SYN with the hello in it (one round trip less
# when the rendezvous accepts data in SYNs; a normal handshake, the hello resent
# after it, when it does not). No cookie: a peer meets its rendezvous too rarely
# for a cached one to help, so the rendezvous accepts data without (docs/protocol.md).
_TCP_FASTOPEN_CONNECT = 30
_TCP_FASTOPEN_NO_COOKIE = 34


def try_fastopen(sock: socket.socket) -> bool:
    """Defer ``sock``'s connect to its first write (Fast Open); False where unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        sock.setsockopt(socket.IPPROTO_TCP, _TCP_FASTOPEN_CONNECT, 1)
        sock.setsockopt(socket.IPPROTO_TCP, _TCP_FASTOPEN_NO_COOKIE, 1)
    except OSError:  # client Fast Open off in this host's sysctl, or an old kernel
        return False
    return True


def start_connect(sock: socket.socket, addr: tuple[str, int]) -> None:
    """Send the SYN now (non-blocking connect); raise OSError on immediate failure."""
    err = sock.connect_ex(addr)
    if err not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EALREADY, 10035):
        raise OSError(err, errno.errorcode.get(err, str(err)))


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def wait_ready(sock: socket.socket, *, write: bool) -> None:
    """Wait until ``sock`` is readable (or writable): a one-shot selector wait."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()
    (loop.add_writer if write else loop.add_reader)(fd, _wake, fut)
    try:
        await fut
    finally:
        (loop.remove_writer if write else loop.remove_reader)(fd)


async def wait_connected(sock: socket.socket) -> None:
    """Wait until a started connect completes; raise OSError with the kernel's reason."""
    while True:
        await wait_ready(sock, write=True)
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, errno.errorcode.get(err, str(err)))
        # Writable with no error: connected, unless it was a spurious wake-up.
        with contextlib.suppress(OSError):
            sock.getpeername()
            return


async def connect_nonblocking(sock: socket.socket, addr: tuple[str, int]) -> None:
    start_connect(sock, addr)
    await wait_connected(sock)


def tune_stream(sock: socket.socket) -> None:
    """Options for a data-carrying connection: no Nagle delay for small exchanges.

    Buffer sizes are left to the kernel: a fixed SO_RCVBUF disables Linux's
    autotuning and is capped by rmem_max, which measured slower.
    """
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def enable_keepalive(
    sock: socket.socket, idle: int = 15, interval: int = 5, count: int = 4
) -> None:
    """Keep NAT mappings warm and notice a vanished peer (about idle + interval*count s)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", interval),
                        ("TCP_KEEPCNT", count)):
        opt = getattr(socket, name, None)
        if opt is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, opt, value)
    user_timeout = getattr(socket, "TCP_USER_TIMEOUT", None)
    if user_timeout is not None:
        # Unacknowledged data for this long means the peer is gone.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, user_timeout, (idle + interval * count) * 1000)
