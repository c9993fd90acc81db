"""Sessions: one Engine contract, its seed and coordinated implementations.

- :mod:`.engine`: the contract (``Engine``, ``Snapshot``, ``State``, ``Event``)
  and the small base both engines share;
- :mod:`.seed`: the seed's plaintext mode (manual address exchange, one pipe);
- :mod:`.coordinated`: pairing codes, the encrypted multiplexed tunnel;
- :mod:`.coordination_machine` / :mod:`.coordination`: the coordinated peer's
  conversation with the rendezvous and the ladder of its paths (punches, then the
  relay), and resume meetings (``meet_again``), as a pure machine and its asyncio
  driver; :mod:`.relay_join_machine`: a relay path's conversation up to "relayed";
- :mod:`.factory`: the one place that picks an engine for a spec;
- :mod:`.local`: the client's local listener; :mod:`.errors`: what ends a session.
"""
