"""What a user can try after a failure, by error type (the engine's messages say what failed)."""

from __future__ import annotations

from nopf_web.errors import NopfError
from nopf_web.punch.machine import PunchTimeout
from nopf_web.rendezvous.errors import RendezvousProtocolError, RendezvousUnreachable
from nopf_web.sessions.errors import (
    CodeExpired,
    CodeUsed,
    CoordinatedPunchTimeout,
    LocalPortInUse,
    PeerDidNotResume,
    PeerDidNotRetry,
    PeerNeverArrived,
    RelayRefused,
    RelayTimeout,
    RendezvousBusy,
    RendezvousRejected,
    RendezvousTooOld,
    ServiceUnavailable,
    SymmetricNat,
    TooManyGuesses,
    TunnelLost,
    UnknownCode,
)
from nopf_web.tunnel.errors import HandshakeError, PairingMismatch, PeerLost

_HINTS: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], str], ...] = (
    (RendezvousUnreachable,
     "Check the rendezvous address (Settings holds the default) and that nopf-server runs "
     "there and is reachable from this machine."),
    (RendezvousProtocolError,
     "Something answers at that address, but it is not a nopf rendezvous: check the port."),
    (UnknownCode,
     "Check the code with the sharer (the number comes first) and that both of you use the "
     "same rendezvous."),
    ((CodeExpired, CodeUsed, TooManyGuesses),
     "A code works once and only for a while: ask the sharer to start a new server session "
     "and send you its new code."),
    (PairingMismatch,
     "The two sides typed different codes: check the words with the sharer, then start new "
     "sessions (the sharer's code is spent)."),
    (PeerNeverArrived,
     "Nobody joined with the code in time: start a new server session and send the new code."),
    (SymmetricNat,
     "A NAT that picks a new port for every destination (a symmetric NAT) cannot be punched, "
     "and this rendezvous does not relay: use a nopf-server that relays (the default; not "
     "--no-relay), or try from another network."),
    (CoordinatedPunchTimeout,
     "The NATs did not let the connection through in time, and this rendezvous does not "
     "relay: start new sessions to try again, or use a nopf-server that relays (the "
     "default; not --no-relay), which connects every pair."),
    (RelayRefused,
     "The rendezvous' relay refused this session (its token was used, expired, or came from "
     "another address): start new sessions on both sides."),
    (RelayTimeout,
     "The peer never reached the rendezvous' relay: check that the peer's nopf is running "
     "and can reach the rendezvous, then start new sessions on both sides."),
    (PeerDidNotResume,
     "The peer did not come back to resume the tunnel: start new sessions on both sides."),
    (RendezvousBusy, "The rendezvous is at its limit for now: try again in a minute."),
    (PeerDidNotRetry,
     "The peer stopped after the first punch failed: start new sessions on both sides."),
    (RendezvousRejected,
     "This nopf and the rendezvous' nopf-server do not understand each other: use the same "
     "version on both."),
    (RendezvousTooOld,
     "That rendezvous only speaks the seed's protocol: upgrade its nopf-server, or use "
     "\u201cmanual addresses (seed)\u201d mode."),
    (PeerLost,
     "The peer stopped answering (its machine slept, or its network changed): start new "
     "sessions on both sides."),
    (HandshakeError,
     "The peer did not complete the encrypted handshake: start new sessions on both sides."),
    (PunchTimeout,
     "Both sides must enter each other's public address before the punch times out; start "
     "two new sessions and exchange the addresses quickly. If it keeps failing, one of the "
     "NATs may choose a new port for every destination (a symmetric NAT), which hole "
     "punching cannot pass."),
    (LocalPortInUse, "Another program already uses that local port: choose another one."),
    (ServiceUnavailable,
     "Start the service you want to share on this machine, on that port, then start a new "
     "session."),
    (TunnelLost,
     "The peer's side stopped or the network dropped the connection: start new sessions on "
     "both sides to reconnect."),
)


def hint_for(exc: BaseException | None) -> str | None:
    if exc is None:
        return None
    for kind, hint in _HINTS:
        if isinstance(exc, kind):
            return hint
    if isinstance(exc, NopfError):
        return None
    return "This is a bug in nopf, not something you did: the dashboard's log has the details."
