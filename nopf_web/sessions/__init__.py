"""Sessions: one Engine contract, its seed and coordinated implementations.

- :mod:`.engine`: the contract (``Engine``, ``Snapshot``, ``State``, ``Event``)
  and the small base both engines share;
- :mod:`.seed`: the seed's plaintext mode (manual address exchange, one pipe);
- :mod:`.coordinated`: pairing codes, the encrypted multiplexed tunnel;
- :mod:`.coordination_machine` / :mod:`.coordination`: the coordinated peer's
  conversation with the rendezvous and its punch attempts, as a pure machine
  and its asyncio driver;
- :mod:`.factory`: the one place that picks an engine for a spec;
- :mod:`.local`: the client's local listener; :mod:`.errors`: what ends a session.
"""
