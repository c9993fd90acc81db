"""Errors raised while talking to a rendezvous server."""

from __future__ import annotations

from nopf_web.errors import NopfError


class RendezvousError(NopfError):
    """Any failure to learn our public address from the rendezvous."""


class RendezvousUnreachable(RendezvousError):
    """The rendezvous could not be resolved or connected to in time."""


class RendezvousProtocolError(RendezvousError):
    """The rendezvous connected but did not send a valid discovery reply in time."""
