"""A relay connection's conversation, up to the peer's first byte, as a pure machine.

The relay stage of a plan (:class:`~nopf_web.wire.rendezvous.RelayStage`) is a
path of its own: a new TCP connection to the relay's address (from a fresh local
port, not the punch port), on which, as on every connection to ``nopf-server``:

    relay -> peer   the seed's 10-byte discovery reply (nopf_web.wire.discovery; 22 bytes over IPv6)
    peer  -> relay  one frame {"type":"relay","version":2,"token":"<base64>"}
                    (first, so it can ride in the SYN with TCP Fast Open), then
                    nothing until the answer
    relay -> peer   one frame: {"type":"relayed"} (both sides are here: from the
                    next byte on, the connection carries the peer's bytes), or
                    {"type":"error",...} and the relay's close (a refusal)

(frames: a u32 big-endian length, then that many bytes of JSON, as in
:mod:`nopf_web.wire.rendezvous`.) The bytes after ``relayed`` belong to the
tunnel. So that a driver never reads them by mistake, :meth:`RelayJoinMachine.want`
says how many bytes the next read may take: the rest of the discovery reply,
then of the frame's length, then of the frame. Whatever arrives after
``relayed`` all the same (a test, or a driver reading freely) is handed over
in :class:`RelayJoined` ``.early``: the tunnel's first bytes.

Each wait is bounded and its error names it: the discovery reply by the
network timeout (and the stage's budget), ``relayed`` by the stage's budget
from the start (the first side to arrive waits for the other, which may still
be finishing its own punch stages).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from nopf_web.errors import NopfError
from nopf_web.rendezvous.errors import RendezvousProtocolError
from nopf_web.wire.address import Endpoint
from nopf_web.wire.discovery import REPLY6_SIZE, REPLY_SIZE, decode_reply, decode_reply6
from nopf_web.wire.errors import WireError
from nopf_web.wire.rendezvous import (
    LENGTH,
    MAX_FRAME,
    ErrorReply,
    MessageError,
    Relay,
    Relayed,
    RelayStage,
    decode_server_message,
    encode,
)

from .coordination_machine import refusal
from .errors import PairingError, RelayRefused, RelayTimeout, RendezvousBusy


@dataclass(frozen=True)
class RelayJoined:
    """The relay joined us with the peer; the connection is the tunnel's from here."""

    public: Endpoint  # our address as the relay saw it (its discovery reply)
    early: bytes  # bytes after "relayed" already received: the tunnel's first ones


@dataclass(frozen=True)
class RelayFailed:
    error: NopfError


RelayOutcome = RelayJoined | RelayFailed


class _Step(enum.Enum):
    REPLY = "its discovery reply"
    LENGTH = "a frame's length"
    FRAME = "a frame"


class RelayJoinMachine:
    """One relay connection (see the module docstring). Send :attr:`message` first;
    read at most :meth:`want` bytes at a time and feed them to :meth:`received`; call
    :meth:`timer` at :attr:`deadline`. Every method may return the outcome; after it,
    the machine takes nothing more."""

    def __init__(self, stage: RelayStage, now: float, *, net_timeout: float) -> None:
        self.stage = stage
        self.where = str(stage.relay)
        # A relay reached over IPv6 (the peer came over IPv6) sends the 22-byte reply.
        self._ipv6 = ":" in stage.relay.host
        self._reply_size = REPLY6_SIZE if self._ipv6 else REPLY_SIZE
        self.message = encode(Relay(stage.token))
        self.started = now
        self.net_timeout = net_timeout
        self.done = False
        self._step = _Step.REPLY
        self._buf = bytearray()
        self._frame_size = 0
        self._public: Endpoint | None = None
        self.deadline = now + min(net_timeout, stage.budget)

    def want(self) -> int:
        """How many bytes the next read may take without reading past ``relayed`` (0:
        none, the outcome is known)."""
        if self.done:
            return 0
        if self._step is _Step.REPLY:
            return self._reply_size - len(self._buf)
        if self._step is _Step.LENGTH:
            return LENGTH.size - len(self._buf)
        return self._frame_size - len(self._buf)

    def received(self, data: bytes, now: float) -> RelayOutcome | None:
        """Bytes from the relay (any split); the outcome once it is known."""
        view = memoryview(data)
        while view and not self.done:
            take = self.want()
            chunk = view[:take]
            self._buf += chunk
            view = view[len(chunk):]
            if len(chunk) < take:
                return None  # the current unit is not complete yet (all of data is in)
            outcome = self._unit(now)
            if outcome is not None:
                self.done = True
                if isinstance(outcome, RelayJoined):
                    return RelayJoined(outcome.public, bytes(view))
                return outcome
        return None

    def closed(self, error: str | None, now: float) -> RelayFailed | None:
        """The relay closed the connection (EOF) or it broke (``error``: why)."""
        if self.done:
            return None
        self.done = True
        where = self.where
        if error is not None:
            return RelayFailed(RendezvousProtocolError(
                f"relay {where} broke the connection ({error}) while we waited for "
                f"{self._waiting()}"))
        if self._step is _Step.REPLY:
            return RelayFailed(RendezvousProtocolError(
                f"relay {where} closed the connection before its discovery reply"))
        return RelayFailed(RendezvousProtocolError(
            f"relay {where} closed the connection before joining us with the peer"))

    def timer(self, now: float) -> RelayFailed | None:
        if self.done or now < self.deadline:
            return None
        self.done = True
        if self._step is _Step.REPLY and self.deadline < self.started + self.stage.budget:
            return RelayFailed(RendezvousProtocolError(
                f"relay {self.where} sent no address within {self.net_timeout:g} s (is it a "
                "nopf-server?)"))
        return RelayFailed(RelayTimeout(
            f"the relay at {self.where} did not join us with the peer within "
            f"{self.stage.budget:g} s: the peer never reached it"))

    # -- inside -------------------------------------------------------------------------

    def _waiting(self) -> str:
        return _Step.REPLY.value if self._step is _Step.REPLY else "the peer (\"relayed\")"

    def _unit(self, now: float) -> RelayOutcome | None:
        """The current unit is complete: act on it."""
        data = bytes(self._buf)
        self._buf.clear()
        if self._step is _Step.REPLY:
            try:
                self._public = Endpoint(*(decode_reply6 if self._ipv6 else decode_reply)(data))
            except WireError as exc:
                return RelayFailed(RendezvousProtocolError(f"relay {self.where}: {exc}"))
            self._step = _Step.LENGTH
            self.deadline = self.started + self.stage.budget  # now: the peer's arrival
            return None
        if self._step is _Step.LENGTH:
            (size,) = LENGTH.unpack(data)
            if not 1 <= size <= MAX_FRAME:
                return RelayFailed(RendezvousProtocolError(
                    f"relay {self.where}: frame length {size} is out of range "
                    f"(1-{MAX_FRAME}): not a nopf relay"))
            self._frame_size, self._step = size, _Step.FRAME
            return None
        self._step = _Step.LENGTH
        try:
            msg = decode_server_message(data)
        except MessageError as exc:
            return RelayFailed(RendezvousProtocolError(f"relay {self.where}: {exc}"))
        if isinstance(msg, Relayed):
            assert self._public is not None
            return RelayJoined(self._public, b"")
        if isinstance(msg, ErrorReply):
            return RelayFailed(relay_refusal(msg, self.where))
        return RelayFailed(RendezvousProtocolError(
            f"relay {self.where} sent {type(msg).__name__} where \"relayed\" was due"))


def relay_refusal(reply: ErrorReply, where: str) -> PairingError:
    """The typed error of an ``error`` frame on a relay connection."""
    if reply.code == "relay_refused":
        return RelayRefused(f"relay {where} refused our token: {reply.message}")
    if reply.code == "timeout":
        return RelayTimeout(f"relay {where}: {reply.message} (the peer never reached it)")
    if reply.code == "busy":
        return RendezvousBusy(f"relay {where}: {reply.message}")
    return refusal(reply, f"{where} (relay)")
