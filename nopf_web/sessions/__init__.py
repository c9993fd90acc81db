"""Sessions: the peer's side of nopf, above the punch and the tunnel.

- :mod:`.coordination_machine`: the coordinated peer's conversation with the
  rendezvous and its punch attempts, as a pure machine;
- :mod:`.errors`: what ends a session.
"""
