"""Socket helpers for the rendezvous client, the punch, the sessions and the server.

The platform-specific spots of the data path live here, together: each has its
Linux path and, next to it, the Windows and macOS ones (the README's "Windows
and macOS" section says what each costs). The choices are plain functions of
``sys.platform`` and of what the ``socket``/``os`` modules offer, looked up at
call time, so the tests can take a feature away and run the other path.

- Port reuse: the discovery connection, every punch attempt and (in
  coordinated mode) a listener all use the same local port P. On Linux/BSD
  that needs SO_REUSEADDR + SO_REUSEPORT; on Windows SO_REUSEADDR alone has
  the "share the port" meaning (there is no SO_REUSEPORT). Listeners that must
  not be shared (the client's local port, the dashboard) take
  SO_EXCLUSIVEADDRUSE there instead.
- TTL: the first SYN of an arming attempt may go out with a low TTL so it
  opens our own NAT without reaching the peer's; ICMP errors about such a SYN
  are ignored (IP_MINTTL, Linux only; see :func:`syn_error_shield`).
- TCP state and RTT: TCP_INFO (Linux), TCP_CONNECTION_INFO (macOS); Windows
  has them only through WSAIoctl(SIO_TCP_INFO), which Python does not expose:
  no facts there, and the rendezvous measures with a ping instead.
- TCP Fast Open (Linux) for the coordination connection's hello; off elsewhere.
- Readiness waits (``loop.add_reader``/``add_writer``) need a selector event
  loop: Windows' default Proactor loop has none (the CLI picks the selector
  loop there; :class:`ReadinessUnsupported` says so in one line otherwise).
- The event loop's transports: asyncio's (Windows, macOS, the tests' own loops)
  and uvloop's (the CLI on Linux), which are not ``asyncio.Transport``
  subclasses (:func:`stream_transport`).
- Gathered writes (sendmsg) and non-blocking peeks (MSG_DONTWAIT), which
  Windows lacks: a joined buffer and a non-blocking socket instead.
- Keepalive timing: TCP_KEEPIDLE/INTVL/CNT (Linux), TCP_KEEPALIVE/INTVL/CNT
  (macOS), SIO_KEEPALIVE_VALS (Windows).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import socket
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

from nopf_web.errors import NopfError

# Option numbers for names a Python build may lack, from each system's headers
# (ABI-stable): Linux include/uapi/linux/{in,tcp}.h, macOS netinet/tcp.h, Windows
# ws2ipdef.h/winsock2.h. Looked up only on that system, after the socket module.
_KNOWN_OPTIONS: dict[str, dict[str, int]] = {
    "linux": {"IP_MINTTL": 21, "TCP_INFO": 11, "TCP_FASTOPEN": 23, "TCP_USER_TIMEOUT": 18,
              "TCP_KEEPIDLE": 4, "TCP_KEEPINTVL": 5, "TCP_KEEPCNT": 6},
    "darwin": {"TCP_KEEPALIVE": 0x10, "TCP_KEEPINTVL": 0x101, "TCP_KEEPCNT": 0x102,
               "TCP_CONNECTION_INFO": 0x106},
    "win32": {"TCP_KEEPIDLE": 3, "TCP_KEEPINTVL": 17, "TCP_KEEPCNT": 16,
              "SO_EXCLUSIVEADDRUSE": ~4},  # ~SO_REUSEADDR, as winsock2.h defines it
}

Family = Literal["linux", "darwin", "win32", "other"]


def family(platform: str | None = None) -> Family:
    """``sys.platform`` (or ``platform``) reduced to the systems nopf knows."""
    name = sys.platform if platform is None else platform
    if name.startswith("linux"):
        return "linux"
    if name == "darwin":
        return "darwin"
    if name == "win32":
        return "win32"
    return "other"


def option(name: str, platform: str | None = None) -> int | None:
    """The number of socket option ``name`` on this system, or on ``platform``
    (None: it has none): the socket module's, else the headers' (above)."""
    fam = family(platform)
    if fam == family():
        value = getattr(socket, name, None)
        if isinstance(value, int):
            return value
    return _KNOWN_OPTIONS.get(fam, {}).get(name)


# -- readiness ---------------------------------------------------------------


class ReadinessUnsupported(NopfError):
    """The running event loop cannot wait for socket readiness (Windows' Proactor)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(
            f"the {type(loop).__name__} event loop cannot wait for socket readiness "
            "(add_reader/add_writer), which the punch needs: run nopf's commands, which "
            "choose asyncio's selector loop, or pass loop_factory=asyncio.SelectorEventLoop")


def stream_transport(transport: asyncio.BaseTransport) -> asyncio.Transport:
    """A stream protocol's transport as the ``asyncio.Transport`` it is: uvloop's
    implement that interface without subclassing it, so ``isinstance`` cannot say."""
    return cast(asyncio.Transport, transport)


def require_readiness(loop: asyncio.AbstractEventLoop | None = None) -> None:
    """Raise :class:`ReadinessUnsupported` on a loop known to lack add_reader/add_writer."""
    loop = loop or asyncio.get_running_loop()
    proactor = getattr(asyncio, "ProactorEventLoop", None)  # exists on Windows only
    if proactor is not None and isinstance(loop, proactor):
        raise ReadinessUnsupported(loop)


# -- port sharing ------------------------------------------------------------


def port_sharing_options(platform: str | None = None) -> tuple[str, ...]:
    """The SOL_SOCKET options that let several sockets use one local port.

    Windows: SO_REUSEADDR alone means "share this port" there (and it has no
    SO_REUSEPORT); elsewhere SO_REUSEADDR + SO_REUSEPORT, where the socket
    module has the latter (without it only sockets that do not listen share).
    """
    if family(platform) == "win32":
        return ("SO_REUSEADDR",)
    if hasattr(socket, "SO_REUSEPORT"):
        return ("SO_REUSEADDR", "SO_REUSEPORT")
    return ("SO_REUSEADDR",)


def exclusive_listener_options(platform: str | None = None) -> tuple[str, ...]:
    """The SOL_SOCKET options of a listener no other socket may share.

    Unix: SO_REUSEADDR only lets a restarted program bind past TIME_WAIT; it
    never shares a listening port. Windows: SO_REUSEADDR would let another
    program bind the same port and take connections, so SO_EXCLUSIVEADDRUSE.
    """
    if family(platform) == "win32":
        return ("SO_EXCLUSIVEADDRUSE",)
    return ("SO_REUSEADDR",)


def _set_options(sock: socket.socket, names: Sequence[str]) -> None:
    for name in names:
        number = option(name)
        if number is not None:
            sock.setsockopt(socket.SOL_SOCKET, number, 1)


def set_exclusive_address(sock: socket.socket) -> None:
    """Before ``bind``: a listener that must not share its port (see above)."""
    _set_options(sock, exclusive_listener_options())


def reusable_socket(host: str, port: int) -> socket.socket:
    """A non-blocking TCP socket bound to ``host:port`` with port sharing enabled
    (an IPv6 one, IPv6 only, when ``host`` is an IPv6 address)."""
    v6 = ":" in host
    sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_STREAM)
    try:
        if v6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        _set_options(sock, port_sharing_options())
        sock.setblocking(False)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


DEFAULT_TTL = 64


def set_ttl(sock: socket.socket, ttl: int) -> None:
    """The TTL of the next packets (IPv6: the hop limit)."""
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, ttl)
    else:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)


# A reset nopf sends on purpose is marked with this TOS byte (DSCP 1, "lower effort",
# RFC 8622; no connection of the punch port uses it otherwise): the packet guard,
# which drops every other RST of the punch port, lets it pass (nopf_web.guard.filters).
RESET_TOS = 0x04
LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST


def reset_close(sock: socket.socket, ttl: int | None = None) -> None:
    """Close ``sock`` with an RST that the packet guard lets through (``RESET_TOS``),
    sent with TTL ``ttl`` (None: the system's).

    The punch uses it for a half-open socket (SYN_RECV) whose handshake failed, with
    the arming TTL: the RST ends our NAT's tracking of the pair, which would otherwise
    refuse every new SYN of it for a minute, and expires before the peer's NAT, so the
    peer's current socket never sees it (Linux answers an RST acking an older SYN by
    resending its SYN at once, which would meet our next socket late). It also frees
    the pair at once: a normal close would leave a FIN_WAIT1 socket holding it while
    the guard drops its FINs."""
    try:
        if sock.family == socket.AF_INET:
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, RESET_TOS)
        if ttl is not None:
            set_ttl(sock, ttl)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    except OSError:
        pass  # closed anyway: a plain close is the most we can do
    sock.close()


# -- ICMP errors about our own low-TTL SYNs ----------------------------------
#
# IP_MINTTL (RFC 5082 GTSM): Linux applies it to ICMP errors too, checking the TTL
# in the header they quote, i.e. our SYN as it reached the router that answered.
# A SYN sent with TTL t is quoted with at most t, while the peer's packets arrive
# with more (64 minus the hops): with IP_MINTTL t + 1 the kernel ignores the ICMP
# time-exceeded of an expired low-TTL arming SYN, and the ICMP refusal of a first
# shot by the peer's NAT, either of which would otherwise abort the socket. At
# most 33, so a peer up to 31 hops away always gets through, whatever t.
#
# Elsewhere there is no IP_MINTTL, and what an ICMP error does differs:
# - Windows does not fail a connect on ICMP errors unless the socket asks for it
#   (TCP_FAIL_CONNECT_ON_ICMP_ERROR, opt-in, never set here): nothing to shield.
# - macOS (XNU, like FreeBSD) drops a socket in SYN_SENT on ICMP port/protocol
#   unreachable, administratively prohibited and time exceeded in transit while
#   sysctl net.inet.tcp.icmp_may_rst is 1 (the default): the arming SYN may die
#   where its TTL runs out, and a first shot where the peer's NAT refuses it.
MAX_MIN_TTL = 33
IPV6_MINHOPCOUNT = 73  # Linux include/uapi/linux/in6.h

Shield = Literal["min_ttl", "not_needed", "exposed"]


def syn_error_shield(platform: str | None = None) -> Shield:
    """How ICMP errors about a low-TTL SYN are kept from aborting its socket here:
    ``min_ttl`` (the kernel ignores them), ``not_needed`` (they never abort a
    connect: Windows), ``exposed`` (nothing stops them: macOS, other BSDs)."""
    fam = family(platform)
    if fam == "win32":
        return "not_needed"
    if fam == "linux" and option("IP_MINTTL", platform) is not None:
        return "min_ttl"
    return "exposed"


SYN_ERRORS_NOTICE = (
    "this system cannot ignore ICMP errors about the punch's low-TTL SYNs (no IP_MINTTL): "
    "an arming SYN may be aborted where its TTL runs out, and a first shot where the peer's "
    "NAT refuses it; the punch retries, and if it keeps failing try --punch-ttl 0 (on "
    "macOS: sudo sysctl -w net.inet.tcp.icmp_may_rst=0)")


def ignore_syn_errors(sock: socket.socket, ttl: int | None) -> bool:
    """Make ``sock`` ignore ICMP errors about its own SYN sent with TTL ``ttl``
    (None: stop ignoring them); False if this system cannot (see :func:`syn_error_shield`)."""
    number = option("IP_MINTTL")
    if syn_error_shield() != "min_ttl" or number is None:
        return False
    min_ttl = 0 if ttl is None else min(ttl + 1, MAX_MIN_TTL)
    level = socket.IPPROTO_IP
    if sock.family == socket.AF_INET6:  # its IPv6 twin (Linux 4.1+), same semantics
        level, number = socket.IPPROTO_IPV6, IPV6_MINHOPCOUNT
    try:
        sock.setsockopt(level, number, min_ttl)
    except OSError:
        return False
    return True


# -- TCP state and RTT from the kernel ---------------------------------------
#
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

# struct tcp_connection_info (macOS 10.11+, netinet/tcp.h; TCP_CONNECTION_INFO 0x106),
# host byte order (little-endian on every Mac), the fields read here:
#   offset 0  u8   tcpi_state  BSD state (netinet/tcp_fsm.h values below)
#   offset 44 u32  tcpi_srtt   smoothed RTT in milliseconds (0: not measured)
# (its Fast Open bits count only cookie-validated SYN data; nopf's Fast Open is Linux's.)
BSD_SYN_SENT = 2
BSD_SYN_RECEIVED = 3
BSD_ESTABLISHED = 4
TCPCI_SRTT = struct.Struct("=I")
TCPCI_SRTT_OFFSET = 44
TCPCI_SIZE = 112  # the whole struct (its last field ends at 112)
_BSD_TO_LINUX_STATE = {BSD_SYN_SENT: TCP_SYN_SENT, BSD_SYN_RECEIVED: TCP_SYN_RECV,
                       BSD_ESTABLISHED: TCP_ESTABLISHED}


@dataclass(frozen=True)
class TcpFacts:
    """What the kernel says of one connection. ``state`` in Linux's numbering
    (macOS states are translated; None: a state nopf never asks about)."""

    state: int | None
    rtt: float | None  # smoothed RTT in seconds; None: not measured yet
    syn_data: bool = False  # the peer's SYN carried data the kernel accepted


def parse_linux_tcp_info(info: bytes) -> TcpFacts | None:
    """Linux ``struct tcp_info`` bytes; None when too short to hold the state."""
    if not info:
        return None
    rtt = None
    if len(info) >= TCPI_SIZE:
        (micros,) = TCPI_RTT.unpack_from(info, TCPI_RTT_OFFSET)
        rtt = micros / 1e6 if micros else None
    syn_data = len(info) > TCPI_OPTIONS_OFFSET and bool(info[TCPI_OPTIONS_OFFSET]
                                                         & TCPI_OPT_SYN_DATA)
    return TcpFacts(info[0], rtt, syn_data)


def parse_darwin_connection_info(info: bytes) -> TcpFacts | None:
    """macOS ``struct tcp_connection_info`` bytes; None when too short for the RTT."""
    if len(info) < TCPCI_SRTT_OFFSET + TCPCI_SRTT.size:
        return None
    (millis,) = TCPCI_SRTT.unpack_from(info, TCPCI_SRTT_OFFSET)
    return TcpFacts(_BSD_TO_LINUX_STATE.get(info[0]), millis / 1e3 if millis else None)


def tcp_facts(sock: socket.socket | None) -> TcpFacts | None:
    """The kernel's facts about ``sock``; None where the system gives none.

    Windows keeps them behind WSAIoctl(SIO_TCP_INFO), which Python does not
    expose: None there, and callers do without (the rendezvous pings instead).
    """
    if sock is None:
        return None
    fam = family()
    if fam == "linux":
        number, size, parse = option("TCP_INFO"), TCPI_SIZE, parse_linux_tcp_info
    elif fam == "darwin":
        number, size, parse = (option("TCP_CONNECTION_INFO"), TCPCI_SIZE,
                               parse_darwin_connection_info)
    else:
        return None
    if number is None:
        return None
    try:
        return parse(sock.getsockopt(socket.IPPROTO_TCP, number, size))
    except OSError:
        return None


def tcp_state(sock: socket.socket) -> int | None:
    """The kernel's TCP state of ``sock`` (Linux numbering), or None where unknown."""
    facts = tcp_facts(sock)
    return None if facts is None else facts.state


def kernel_rtt(sock: socket.socket | None) -> float | None:
    """The kernel's smoothed RTT of ``sock`` in seconds, or None where unknown."""
    facts = tcp_facts(sock)
    return None if facts is None else facts.rtt


def syn_had_data(sock: socket.socket | None) -> bool:
    """Whether the peer's SYN carried data the kernel accepted (TCP Fast Open, Linux)."""
    facts = tcp_facts(sock)
    return facts is not None and facts.syn_data


# -- TCP Fast Open (Linux only) ----------------------------------------------
#
# For the coordination connection: connect() only records the peer and the first
# write sends the SYN with the hello in it (one round trip less when the rendezvous
# accepts data in SYNs; a normal handshake, the hello resent after it, when it does
# not). No cookie: a peer meets its rendezvous too rarely for a cached one to help,
# so the rendezvous accepts data without (docs/protocol.md). macOS' Fast Open needs
# connectx() and Windows' overlapped ConnectEx, neither in Python: off there.
_TCP_FASTOPEN_CONNECT = 30
_TCP_FASTOPEN_NO_COOKIE = 34
# Server: pending (SYN-data, handshake not yet complete) connections the kernel accepts
# before falling back to plain handshakes; bounds spoofed SYN-data.
FASTOPEN_QUEUE = 256


def try_fastopen(sock: socket.socket) -> bool:
    """Defer ``sock``'s connect to its first write (Fast Open); False where unavailable."""
    if family() != "linux":
        return False
    try:
        sock.setsockopt(socket.IPPROTO_TCP, _TCP_FASTOPEN_CONNECT, 1)
        sock.setsockopt(socket.IPPROTO_TCP, _TCP_FASTOPEN_NO_COOKIE, 1)
    except OSError:  # client Fast Open off in this host's sysctl, or an old kernel
        return False
    return True


def enable_fastopen_server(sock: socket.socket) -> bool:
    """Accept data in SYNs on listener ``sock`` (Linux); False where unavailable."""
    number = option("TCP_FASTOPEN") if family() == "linux" else None
    if number is None:
        return False
    try:
        sock.setsockopt(socket.IPPROTO_TCP, number, FASTOPEN_QUEUE)
    except OSError:
        return False
    return True


# -- non-blocking connects and readiness --------------------------------------


def start_connect(sock: socket.socket, addr: tuple[str, int]) -> None:
    """Send the SYN now (non-blocking connect); raise OSError on immediate failure."""
    err = sock.connect_ex(addr)
    # 10035: WSAEWOULDBLOCK, Windows' answer to a non-blocking connect under way.
    if err not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EALREADY, 10035):
        raise OSError(err, errno.errorcode.get(err, str(err)))


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def wait_ready(sock: socket.socket, *, write: bool) -> None:
    """Wait until ``sock`` is readable (or writable): a one-shot selector wait.

    Needs a selector event loop (on Windows, select() also reports a failed
    connect as writable); ReadinessUnsupported, in one line, on a Proactor loop.
    """
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()
    try:
        (loop.add_writer if write else loop.add_reader)(fd, _wake, fut)
    except NotImplementedError:
        raise ReadinessUnsupported(loop) from None
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


async def connect_tcp(host: str, port: int) -> socket.socket:
    """A connected non-blocking socket to ``host`` (an address or a name): each of its
    addresses in turn, the last error if none answers. Made here, not by
    ``create_connection``, so that the caller holds the socket itself (the forwarder's
    zero-copy sends, the seed's pipe)."""
    loop = asyncio.get_running_loop()
    try:  # a literal address needs no resolver thread (as in create_connection)
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
        infos: list[Any] = [(family, socket.SOCK_STREAM, 0, "", (host, port))]
    except ValueError:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    error: OSError = OSError(f"no address found for {host}")
    for family, kind, proto, _name, addr in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, addr)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    raise error


def peek_nonblocking(sock: socket.socket, size: int = 1) -> bytes:
    """Up to ``size`` bytes waiting on ``sock``, left there; BlockingIOError if none.

    MSG_DONTWAIT where the system has it; Windows has not, so the socket is
    made non-blocking instead (sockets nopf peeks at are non-blocking already).
    """
    dontwait = getattr(socket, "MSG_DONTWAIT", None)
    if dontwait is None:
        sock.setblocking(False)
        return sock.recv(size, socket.MSG_PEEK)
    return sock.recv(size, socket.MSG_PEEK | dontwait)


def release_if_closed(transport: asyncio.BaseTransport, sock: socket.socket) -> None:
    """Detach ``sock`` if ``transport``, just made from it, has closed its descriptor.

    uvloop's ``create_connection(sock=...)`` hands ``sock`` to the transport only after
    ``connection_made``; a transport that closed in between (its protocol wrote at
    once to a connection the other end had reset: the forwarder with what a stream
    already holds, the secure channel with its confirmation) has closed the
    descriptor without detaching ``sock``. Collected later, ``sock`` would close that
    number again, by then another connection's (seen: "File descriptor 135 is used by
    transport", EBADF, an abort in libuv). asyncio's transports own ``sock`` and close
    it themselves: nothing to do there.
    """
    if not transport.is_closing():
        return
    try:
        held = transport.get_extra_info("socket")
        gone = held is None or held.fileno() < 0
    except OSError:  # uvloop, once closed: EBADF
        gone = True
    if gone:
        sock.detach()


def send_gathered(sock: socket.socket, parts: list[bytes | memoryview]) -> int:
    """Send ``parts`` in one call: sendmsg without copying them where the system
    has it; Windows has no sendmsg, so one joined buffer there. Bytes sent."""
    sendmsg = getattr(sock, "sendmsg", None)
    if sendmsg is None:
        return sock.send(b"".join(parts))
    return int(sendmsg(parts))


# -- stream options ---------------------------------------------------------------


def tune_stream(sock: socket.socket) -> None:
    """Options for a data-carrying connection: no Nagle delay for small exchanges.

    Buffer sizes are left to the kernel: a fixed SO_RCVBUF disables Linux's
    autotuning and is capped by rmem_max, which measured slower.
    """
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


@dataclass(frozen=True)
class KeepalivePlan:
    """How one system is told the keepalive timing (see :func:`keepalive_plan`)."""

    tcp_options: tuple[tuple[str, int], ...]  # IPPROTO_TCP option name, value
    # Windows: SIO_KEEPALIVE_VALS (on/off, idle ms, interval ms) through ioctl
    windows_vals: tuple[int, int, int] | None = None


def keepalive_plan(idle: int, interval: int, count: int,
                   platform: str | None = None) -> KeepalivePlan:
    """The keepalive settings for ``platform`` (default: this one).

    Linux: TCP_KEEPIDLE/INTVL/CNT and TCP_USER_TIMEOUT (unacknowledged data for
    that long means the peer is gone). macOS: TCP_KEEPALIVE is the idle time,
    with TCP_KEEPINTVL/CNT. Windows: SIO_KEEPALIVE_VALS, which every version
    takes (its probe count is fixed at 10), then TCP_KEEPCNT where Windows 10
    1703+ accepts it.
    """
    fam = family(platform)
    if fam == "win32":
        return KeepalivePlan((("TCP_KEEPCNT", count),), (1, idle * 1000, interval * 1000))
    if fam == "darwin":
        return KeepalivePlan((("TCP_KEEPALIVE", idle), ("TCP_KEEPINTVL", interval),
                              ("TCP_KEEPCNT", count)))
    options: tuple[tuple[str, int], ...] = (
        ("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", interval), ("TCP_KEEPCNT", count))
    if fam == "linux":
        options += (("TCP_USER_TIMEOUT", (idle + interval * count) * 1000),)
    return KeepalivePlan(options)


def enable_keepalive(
    sock: socket.socket, idle: int = 15, interval: int = 5, count: int = 4
) -> None:
    """Keep NAT mappings warm and notice a vanished peer (about idle + interval*count s).
    Best effort: an option this system refuses is left at its default."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    plan = keepalive_plan(idle, interval, count)
    if plan.windows_vals is not None and sys.platform == "win32":
        with contextlib.suppress(OSError, ValueError):
            sock.ioctl(socket.SIO_KEEPALIVE_VALS, plan.windows_vals)
    for name, value in plan.tcp_options:
        number = option(name)
        if number is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, number, value)
