"""Errors of the secure multiplexed tunnel; each message is meant for the user."""

from __future__ import annotations

from nopf_web.errors import NopfError


class TunnelError(NopfError):
    """Any failure of the secure tunnel or of one of its streams."""


class HandshakeError(TunnelError):
    """The secure handshake did not complete (protocol violation, peer gone)."""


class HandshakeTimeout(HandshakeError):
    """A handshake step waited longer than the handshake timeout."""


class PairingMismatch(HandshakeError):
    """Key confirmation failed: the two peers did not use the same pairing code."""


class PathRejected(HandshakeError):
    """A later path's handshake did not prove the tunnel's key (a stranger, or a
    hello replayed from another connection): that connection is dropped, the
    tunnel goes on."""


class TunnelTampered(TunnelError):
    """A record failed authentication: someone altered, injected or cut the data."""


class RecordCut(TunnelError):
    """The connection ended inside a record. Nothing of that record is delivered; a
    resumable tunnel takes it for a lost path (a relay or a NAT that dies mid-record
    cuts it so), and replays what the peer had not acknowledged over the next one."""


class TunnelProtocolError(TunnelError):
    """The peer sent a frame that breaks the multiplexing protocol."""


class PeerLost(TunnelError):
    """The peer went silent (no frame within the dead-peer delay) or vanished."""


class TunnelClosed(TunnelError):
    """The tunnel was closed (by us or cleanly by the peer)."""


class StreamReset(TunnelError):
    """One stream was reset, by the peer or locally; the tunnel itself goes on."""

    def __init__(self, message: str, *, code: int) -> None:
        super().__init__(message)
        self.code = code


class NoSuchService(TunnelError):
    """A stream to a service the sharer does not share (it shares ``count``: indexes
    0..count-1, in the order of its ``-p``)."""

    def __init__(self, service: int, count: int) -> None:
        shares = "1 service" if count == 1 else f"{count} services"
        super().__init__(f"the sharer shares {shares}: there is no service {service + 1}")
        self.service, self.count = service, count


class ServicesUnknown(TunnelError):
    """The peer did not say how many services it shares in time: a stream to any but
    the first cannot be opened (an older sharer says so by its first record)."""


class StreamClosed(TunnelError):
    """Writing to a stream whose sending half is already closed (FIN sent)."""
