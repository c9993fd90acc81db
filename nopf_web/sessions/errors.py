"""What can end a session, as types; the message of each is one line for the user.

The web layer turns them into hints (``nopf_web.web.hints``), the CLI into an
exit code and an error line. Rendezvous transport problems are
``nopf_web.rendezvous.errors`` types; punch timeouts of seed mode are
``nopf_web.punch.machine.PunchTimeout``.
"""

from __future__ import annotations

from collections import Counter

from nopf_web.errors import NopfError
from nopf_web.punch.machine import Failure

# -- every mode ------------------------------------------------------------------


class LocalPortInUse(NopfError):
    """The client's local port cannot be listened on; ``error`` is the bind's (its
    ``errno`` says why: in use, not this machine's address...)."""

    def __init__(self, message: str, *, error: OSError) -> None:
        super().__init__(message)
        self.error = error


class ServiceUnavailable(NopfError):
    """The server's local service does not accept connections."""


class TunnelLost(NopfError):
    """The seed tunnel (or the local connection piped into it) broke."""


# -- coordinated mode: pairing through the rendezvous ----------------------------


class PairingError(NopfError):
    """Coordinated mode failed; the message is one line for the user."""


class UnknownCode(PairingError):
    """``unknown_code``: no open pairing code has that number."""


class CodeExpired(PairingError):
    """``expired``: the code's lifetime ended before a peer used it."""


class CodeUsed(PairingError):
    """``used``: codes work once, and this one was used."""


class TooManyGuesses(PairingError):
    """``too_many_guesses``: too many failed claims from our address."""


class SymmetricNat(PairingError):
    """``symmetric_nat``: the rendezvous found the pair cannot be punched."""


class RendezvousBusy(PairingError):
    """``busy``: the rendezvous is out of codes or connections for now."""


class PeerDidNotRetry(PairingError):
    """``timeout``: the peer did not coordinate again after a failed punch."""


class RendezvousRejected(PairingError):
    """``bad_request`` / ``unsupported_version``: the rendezvous refused what we sent."""


class RelayRefused(PairingError):
    """``relay_refused``: the relay did not take our token (unknown, used, expired, or
    presented from another address than the one we paired from)."""


class RelayTimeout(PairingError):
    """A relay connection waited its stage's budget (or the relay's token expiry) without
    being joined with the peer: the peer never reached the relay."""


class PeerDidNotResume(PairingError):
    """``timeout`` to a resume hello: the peer did not meet us again in time."""


class PeerNeverArrived(PairingError):
    """Nobody used the sharer's code within its lifetime."""


class RendezvousTooOld(PairingError):
    """The rendezvous speaks only the seed's discovery protocol."""


class CoordinatedPunchTimeout(PairingError):
    """Every stage of the rendezvous' plan ran out, in every attempt."""

    def __init__(self, message: str, outcomes: Counter[Failure]) -> None:
        super().__init__(message)
        self.outcomes = outcomes
