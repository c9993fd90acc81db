"""Record machines as their tests drive them: ``Peer`` keeps what one machine did
(bytes to send, plaintext, other events), ``move``/``settle`` carry the bytes between
two of them, cut arbitrarily where hypothesis says; the messages a test draws."""

from __future__ import annotations

import itertools
from collections.abc import Iterable

from hypothesis import strategies as st

from nopf_web.tunnel.record_machine import (
    DEFAULT_KEY_LIMITS,
    ChannelFailed,
    HandshakeDone,
    KeyLimits,
    PeerConfirmed,
    RecordEvent,
    RecordMachine,
    RecordReceived,
    Transmit,
)


class Peer:
    """One machine and what it did: bytes to send, plaintext, other events."""

    def __init__(self, machine: RecordMachine) -> None:
        self.m = machine
        self.out = bytearray()
        self.plain = bytearray()
        self.records: list[bytes] = []
        self.events: list[RecordEvent] = []

    def take(self, events: Iterable[RecordEvent]) -> None:
        for event in events:
            if isinstance(event, Transmit):
                self.out += event.data
            elif isinstance(event, RecordReceived):
                self.plain += event.plaintext
                self.records.append(bytes(event.plaintext))
            else:
                self.events.append(event)

    def start(self, now: float = 0.0) -> Peer:
        self.take(self.m.start(now))
        return self

    def seal(self, parts: Iterable[bytes | bytearray | memoryview]) -> list[bytes]:
        records = [bytes(r) for r in self.m.seal(parts)]
        for r in records:
            self.out += r
        return records

    def feed(self, data: bytes, cuts: Iterable[int] = ()) -> None:
        """``data`` in pieces cut at ``cuts``, each through get_buffer/buffer_updated."""
        bounds = [0, *sorted(c for c in cuts if 0 < c < len(data)), len(data)]
        for start, end in itertools.pairwise(bounds):
            piece = memoryview(data)[start:end]
            while piece:
                room = self.m.get_buffer(len(piece))
                assert len(room) > 0  # asyncio requires a non-empty buffer
                n = min(len(room), len(piece))
                room[:n] = piece[:n]
                del room
                self.take(self.m.buffer_updated(n))
                piece = piece[n:]

    def kinds(self) -> list[type]:
        return [type(e) for e in self.events]

    def failure(self) -> ChannelFailed:
        failures = [e for e in self.events if isinstance(e, ChannelFailed)]
        assert len(failures) == 1, self.events
        return failures[0]


def started(pair: tuple[Peer, Peer]) -> tuple[Peer, Peer]:
    """Both machines of ``pair`` started at time 0, A first (nothing carried yet)."""
    a, b = pair
    return a.start(), b.start()


def ready_pair(code: str = "7-orbit-lantern",
               limits: KeyLimits = DEFAULT_KEY_LIMITS) -> tuple[Peer, Peer]:
    """Two machines (server, client) whose in-band handshake is done and confirmed."""
    a, b = started((Peer(RecordMachine.handshake("server", code, limits=limits)),
                    Peer(RecordMachine.handshake("client", code, limits=limits))))
    settle(a, b)
    assert a.kinds() == b.kinds() == [HandshakeDone, PeerConfirmed]
    return a, b


def cuts_of(data: st.DataObject, size: int) -> list[int]:
    if size <= 1:
        return []
    return data.draw(st.lists(st.integers(1, size - 1), max_size=8), label="cuts")


def move(src: Peer, dst: Peer, data: st.DataObject | None = None) -> bytes:
    """Everything ``src`` has to send, into ``dst`` (cut arbitrarily with ``data``)."""
    wire = bytes(src.out)
    src.out.clear()
    dst.feed(wire, cuts_of(data, len(wire)) if data is not None else ())
    return wire


def settle(a: Peer, b: Peer, data: st.DataObject | None = None) -> None:
    while a.out or b.out:
        move(a, b, data)
        move(b, a, data)


messages = st.lists(st.lists(st.binary(max_size=3000), max_size=4), min_size=1, max_size=6)
