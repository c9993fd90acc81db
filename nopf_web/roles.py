"""The one vocabulary for the two peers' roles, above the crypto layer.

``server``: the peer that shares a local service (the seed's ``-t server``,
``nopf share``, a dashboard server session). ``client``: the peer that reaches
it (``-t client``, ``nopf connect``, a client session).

Where a protocol spells a role its own way, it is translated at that edge and
nowhere else:

- rendezvous v2 hello actions: ``share``/``reshare`` (server), ``join``/``rejoin``
  (client) — :mod:`nopf_web.wire.rendezvous`;
- the tunnel's SPAKE2 identities and key labels: ``A`` (server), ``B`` (client)
  — :func:`spake_side`;
- the punch's *tactic* (``arm``/``connect``) is not a role: the rendezvous' plan
  picks it per attempt, whatever the role.
"""

from __future__ import annotations

from typing import Literal

PeerRole = Literal["server", "client"]
SpakeSide = Literal["A", "B"]


def other(role: PeerRole) -> PeerRole:
    return "client" if role == "server" else "server"


def spake_side(role: PeerRole) -> SpakeSide:
    """The SPAKE2 identity of ``role`` on the wire (``A`` shares, ``B`` connects)."""
    return "A" if role == "server" else "B"
