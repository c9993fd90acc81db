"""A hostile rendezvous (or relay) in the lab cannot read, alter or hijack a coordinated
tunnel.

The rendezvous (tests/e2e/hostile_rendezvous.py) pairs two real peers, then
puts itself in the middle of the TCP connection: it tells each that the other
is at the rendezvous' own address, so both punch straight into it ("punch"),
or it gives both a relay-only plan, as nopf-server does for symmetric NATs, and
is the relay that joins them ("relay"). What the secure channel on top must
guarantee, either way:

- a pure relay carries a working tunnel but never sees the plaintext;
- a relay that flips one byte per direction, or injects a record of its own,
  makes both sides fail with ``TunnelTampered`` and delivers nothing of the
  altered records;
- a relay running its own SPAKE2 with a guessed code fails the handshake on
  both sides ("pairing code did not match"), before any data moves.

Each runs twice: SPAKE2 in-band on the tunnel, and SPAKE2 messages sent
through the (hostile) rendezvous with records following the key confirmation
at once ("early"); there the mitm substitutes its own SPAKE2 messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Iterator
from typing import Literal

import pytest

from nopf_web.roles import spake_side
from nopf_web.sessions.coordination import PairedTunnel
from nopf_web.tunnel.errors import PairingMismatch, TunnelTampered
from nopf_web.tunnel.secure import Pake, SecureChannel, open_channel
from nopf_web.wire.address import Endpoint
from tests.lab import Lab
from tests.lab.fixtures import LabFactory

from .coord_harness import PairOutcome, pair
from .hostile_rendezvous import (
    JOINER_SIDE,
    RELAY_PORT,
    SHARER_SIDE,
    HostileRendezvous,
    Mode,
    Via,
)

pytestmark = pytest.mark.lab
early = pytest.mark.parametrize("early", [False, True], ids=["in-band", "early"])
via = pytest.mark.parametrize("via", ["punch", "relay"])

MARKER = b"nopf-hostile-rdv-plaintext-5e1d"


def paired_through(lab: Lab, hostile: HostileRendezvous, halves: dict[str, Pake] | None,
                   ) -> tuple[PairOutcome, PairedTunnel, PairedTunnel]:
    def maker(role: Literal["A", "B"]) -> Callable[[str], Pake]:
        def make(code: str) -> Pake:
            assert halves is not None
            halves[role] = Pake("server" if role == "A" else "client", code)
            return halves[role]
        return make

    out = pair(lab.a1, lab.b1, punch_timeout=8,
               pakes=None if halves is None else (maker("A"), maker("B")))
    assert out.ok, out.errors
    assert out.sharer is not None and out.joiner is not None
    if hostile.via == "punch":
        # Both "peers" are the rendezvous itself: the lie worked, it is in the middle.
        assert out.sharer.peer == Endpoint(lab.rdv.ip, SHARER_SIDE)
        assert out.joiner.peer == Endpoint(lab.rdv.ip, JOINER_SIDE)
    else:
        # Both went through its relay (the real driver's relay path), which joined them.
        for t in (out.sharer, out.joiner):
            assert (t.path, t.relay) == ("relay", Endpoint(lab.rdv.ip, RELAY_PORT))
        assert hostile.relayed == 1
    assert hostile.pairs == 1
    if halves is not None:  # the SPAKE2 messages went through the rendezvous
        assert out.sharer.peer_pake is not None and out.joiner.peer_pake is not None
        assert hostile.forwarded == {"sharer": halves["A"].message,
                                     "joiner": halves["B"].message}
    return out, out.sharer, out.joiner


async def channels(a: PairedTunnel, b: PairedTunnel, halves: dict[str, Pake] | None,
                   ) -> tuple[SecureChannel | BaseException, SecureChannel | BaseException]:
    async def one(t: PairedTunnel) -> SecureChannel:
        pake = None if halves is None else halves[spake_side(t.role)]
        channel = await open_channel(t.sock, role=t.role, code=t.code, timeout=5, pake=pake)
        if pake is not None:
            await channel.confirmed()  # the verdict the in-band handshake gives at once
        return channel

    return await asyncio.gather(one(a), one(b), return_exceptions=True)


@contextlib.contextmanager
def hostile_pair(lab_factory: LabFactory, mode: Mode, early: bool, via: Via = "punch",
                 ) -> Iterator[tuple[HostileRendezvous, PairedTunnel, PairedTunnel,
                                     dict[str, Pake] | None]]:
    """A lab whose rendezvous is hostile (``mode``), a pair coordinated through it
    (``early``: with SPAKE2 in the hellos); yields the rendezvous, both tunnels and the
    SPAKE2 halves (None unless early) while the hostile rendezvous runs."""
    lab = lab_factory("rst", "drop", delay_ms=5)
    halves: dict[str, Pake] | None = {} if early else None
    with HostileRendezvous(lab.rdv, mode, via) as hostile:
        _, a, b = paired_through(lab, hostile, halves)
        yield hostile, a, b, halves


@via
@early
def test_a_relaying_rendezvous_carries_the_tunnel_but_reads_no_plaintext(
    lab_factory: LabFactory, early: bool, via: Via,
) -> None:
    with hostile_pair(lab_factory, "relay", early, via) as (hostile, a, b, halves):
        to_b = MARKER + os.urandom(20_000) + MARKER
        to_a = MARKER * 50

        async def talk() -> tuple[bytes, bytes]:
            ca, cb = await channels(a, b, halves)
            assert isinstance(ca, SecureChannel) and isinstance(cb, SecureChannel), (ca, cb)
            ca.write(to_b)
            cb.write(to_a)
            got_a, got_b = bytearray(), bytearray()
            async with asyncio.timeout(10):
                while len(got_b) < len(to_b):
                    got_b += await cb.recv()
                while len(got_a) < len(to_a):
                    got_a += await ca.recv()
            ca.close()
            cb.close()
            return bytes(got_a), bytes(got_b)

        got_a, got_b = asyncio.run(talk())
    assert got_b == to_b and got_a == to_a  # end to end, through the relay
    # The relay carried it all (from the SPAKE2 hello or the confirmation on), and
    # none of it in the clear.
    if not early:
        assert hostile.seen["a>b"].startswith(b"NOPF")
        assert hostile.seen["b>a"].startswith(b"NOPF")
    assert len(hostile.seen["a>b"]) > len(to_b) and len(hostile.seen["b>a"]) > len(to_a)
    for direction in ("a>b", "b>a"):
        assert MARKER not in hostile.seen[direction], f"plaintext visible {direction}"


@via
@early
@pytest.mark.parametrize("mode", ["flip", "inject"])
def test_a_relay_that_flips_a_byte_is_detected_on_both_sides(lab_factory: LabFactory,
                                                            early: bool, via: Via,
                                                            mode: Mode) -> None:
    """(Or that injects a record of its own.)"""
    with hostile_pair(lab_factory, mode, early, via) as (_, a, b, halves):
        async def talk() -> tuple[list[object], list[object]]:
            ca, cb = await channels(a, b, halves)  # the handshake is intact: it passes
            assert isinstance(ca, SecureChannel) and isinstance(cb, SecureChannel), (ca, cb)
            ca.write(MARKER * 10)  # the relay alters each side's first record
            cb.write(MARKER * 10)
            outcome: dict[str, list[object]] = {"a": [], "b": []}

            async def drain(name: str, ch: SecureChannel) -> None:
                async with asyncio.timeout(10):
                    while True:
                        try:
                            outcome[name].append(await ch.recv())
                        except Exception as exc:  # the record layer's verdict, checked below
                            outcome[name].append(exc)
                            return

            await asyncio.gather(drain("a", ca), drain("b", cb))
            ca.abort()
            cb.abort()
            return outcome["a"], outcome["b"]

        got_a, got_b = asyncio.run(talk())
    for got in (got_a, got_b):
        # Nothing delivered (not even the altered record's other bytes), then the verdict.
        assert len(got) == 1, got
        assert isinstance(got[0], TunnelTampered), got
        assert "failed authentication" in str(got[0])


@via
@early
def test_a_rendezvous_running_its_own_spake2_fails_both_handshakes(
    lab_factory: LabFactory, early: bool, via: Via,
) -> None:
    with hostile_pair(lab_factory, "mitm", early, via) as (hostile, a, b, halves):
        results = asyncio.run(channels(a, b, halves))
        deadline = time.monotonic() + 5  # its own handshakes end a moment after the peers'
        while len(hostile.mitm_results) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
    for res in results:
        assert isinstance(res, PairingMismatch), results
        assert str(res) == "pairing code did not match"
    # The hostile side failed too: its guess did not give it a channel either.
    assert len(hostile.mitm_results) == 2, hostile.mitm_results
    assert all("channel opened" not in r for r in hostile.mitm_results), hostile.mitm_results
