"""Errors of the port mapper; each one's text is a single line for the user."""

from __future__ import annotations

from nopf_web.errors import NopfError


class PortMapError(NopfError):
    """The port mapper cannot do what was asked."""


class NoGatewayError(PortMapError):
    """No default IPv4 gateway in the routing table, and none was given."""


class AlreadyMappedError(PortMapError):
    """map_tcp() called while this PortMapper already holds a mapping."""


class AttemptFailed(PortMapError):
    """One protocol could not map, renew or delete; the text is the reason, one line."""
