"""What a user can try after a failure, by error type (the engine's messages say what failed)."""

from __future__ import annotations

from nopf_web.errors import NopfError
from nopf_web.punch.machine import PunchTimeout
from nopf_web.rendezvous.errors import RendezvousProtocolError, RendezvousUnreachable
from nopf_web.session import LocalPortInUse, ServiceUnavailable, TunnelLost

_HINTS: tuple[tuple[type[BaseException], str], ...] = (
    (RendezvousUnreachable,
     "Check the rendezvous address (Settings holds the default) and that nopf-server runs "
     "there and is reachable from this machine."),
    (RendezvousProtocolError,
     "Something answers at that address, but it is not a nopf rendezvous: check the port."),
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
