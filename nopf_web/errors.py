"""The root of nopf's error types: each becomes a one-line message at the edges."""

from __future__ import annotations

import errno
from typing import Final


class NopfError(Exception):
    """An expected failure with a message meant for the user."""


# The socket errors users meet, in a few words; any other keeps the system's text.
_OS_ERRORS: Final = {
    errno.ECONNREFUSED: "connection refused",
    errno.EHOSTUNREACH: "host unreachable",
    errno.ENETUNREACH: "network unreachable",
    errno.ECONNRESET: "connection reset",
    errno.ETIMEDOUT: "connection timed out",
    errno.EADDRINUSE: "local port already in use",
    errno.EADDRNOTAVAIL: "local address/port not available",
}


def describe_os_error(exc: OSError) -> str:
    """A socket error as a message says it (``connection refused``, ...)."""
    return _OS_ERRORS.get(exc.errno or 0, exc.strerror or str(exc))
