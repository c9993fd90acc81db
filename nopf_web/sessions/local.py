"""The local side of a session: the client's listener for its applications."""

from __future__ import annotations

import errno
import socket

from nopf_web.sockets import set_exclusive_address

from .errors import LocalPortInUse


def listen_local(host: str, port: int, backlog: int = 8) -> socket.socket:
    """The client's local listener, bound before anything else so a busy port fails fast."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        set_exclusive_address(sock)  # never shared (on Windows SO_REUSEADDR would share)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise LocalPortInUse(
                f"local port {port} is already in use on {host}: choose another --localport"
            ) from None
        raise LocalPortInUse(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock
