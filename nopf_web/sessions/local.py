"""The local side of a session: the client's listener for its applications."""

from __future__ import annotations

import contextlib
import errno
import socket

from nopf_web.sockets import set_exclusive_address
from nopf_web.wire.address import Endpoint, is_loopback

from .errors import LocalPortInUse


def listen_local(host: str, port: int, backlog: int = 8) -> socket.socket:
    """The client's local listener, bound before anything else so a busy port fails fast.

    ``host`` is an IP address (IPv6 without brackets): ``--localport``'s. ``::`` takes
    IPv4 connections too, as ``0.0.0.0`` and ``::`` both mean "every address" to users
    (Windows' default for an IPv6 socket is IPv6 only)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        set_exclusive_address(sock)  # never shared (on Windows SO_REUSEADDR would share)
        if host == "::":
            with contextlib.suppress(OSError):  # a host without IPv4: IPv6 alone, then
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise LocalPortInUse(
                f"local port {port} is already in use on {host}: choose another --localport",
                error=exc) from None
        why = ("not an address of this machine" if exc.errno == errno.EADDRNOTAVAIL
               else exc.strerror)
        raise LocalPortInUse(f"cannot listen on {Endpoint(host, port)}: {why}",
                             error=exc) from None
    return sock


def exposure(host: str, port: int) -> str | None:
    """The warning for a listener other machines can reach (``--localport
    0.0.0.0:PORT``, as ``ssh -L`` with a bind address): the tunnel carries whoever
    connects, with no login of its own. None for a loopback listener."""
    if is_loopback(host):
        return None
    return (f"listening on {Endpoint(host, port)}: other machines that can reach this one "
            "can use the tunnel too")
