"""The relay path's conversation on bytes: the seed reply and "relayed" in any split,
the tunnel's first bytes never taken by a reader that reads what the machine wants and
handed over when they come anyway, refusals by type, closes, garbage, and timeouts
naming what they waited for. No sockets."""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from hypothesis import given, settings, strategies as st

from nopf_web.rendezvous.errors import RendezvousProtocolError
from nopf_web.sessions import errors
from nopf_web.sessions.relay_join_machine import (
    RelayFailed,
    RelayJoined,
    RelayJoinMachine,
    RelayOutcome,
)
from nopf_web.wire.address import Endpoint
from nopf_web.wire.discovery import REPLY_SIZE, encode_reply
from nopf_web.wire.rendezvous import (
    LENGTH,
    ErrorReply,
    FrameReader,
    Ping,
    Relay,
    Relayed,
    RelayStage,
    Welcome,
    decode_client_message,
    encode,
)

RELAY = Endpoint("198.51.100.2", 3012)
TOKEN = bytes(range(16))
STAGE = RelayStage(RELAY, 8.0, TOKEN)
PUBLIC = Endpoint("203.0.113.2", 40123)
REPLY = encode_reply(PUBLIC.host, PUBLIC.port)
RELAYED = encode(Relayed())
NET = 5.0


def machine(now: float = 0.0, stage: RelayStage = STAGE) -> RelayJoinMachine:
    return RelayJoinMachine(stage, now, net_timeout=NET)


def chunks(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    points = sorted({c for c in cuts if 0 < c < len(data)})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


def test_the_message_is_one_relay_frame_with_our_token() -> None:
    [payload] = FrameReader().feed(machine().message)
    assert decode_client_message(payload) == Relay(TOKEN)


@settings(max_examples=300)
@given(tunnel=st.binary(min_size=1, max_size=300), cuts=st.lists(st.integers(1, 400),
                                                                  max_size=10))
def test_a_reader_of_what_it_wants_never_takes_the_tunnels_bytes(tunnel: bytes,
                                                                 cuts: list[int]) -> None:
    """The relay's bytes arrive in any segments; the reader (the driver) reads at most
    want() at a time from what arrived: it stops exactly before the tunnel's first byte."""
    stream = REPLY + RELAYED + tunnel
    m = machine()
    pending = bytearray()
    outcome: RelayOutcome | None = None
    taken = 0
    for segment in chunks(stream, cuts):
        pending += segment
        while pending and outcome is None:
            want = m.want()
            assert want > 0
            data = bytes(pending[:want])
            del pending[:len(data)]
            taken += len(data)
            outcome = m.received(data, 1.0)
        if outcome is not None:
            break
    assert outcome == RelayJoined(PUBLIC, b"")
    assert taken == len(REPLY) + len(RELAYED)  # not one byte of the tunnel's
    assert m.want() == 0 and m.done


@settings(max_examples=300)
@given(tunnel=st.binary(max_size=300), cuts=st.lists(st.integers(1, 400), max_size=10))
def test_bytes_after_relayed_read_anyway_are_handed_over(tunnel: bytes,
                                                         cuts: list[int]) -> None:
    stream = REPLY + RELAYED + tunnel
    m = machine()
    rest = b""
    outcome: RelayOutcome | None = None
    for i, segment in enumerate(parts := chunks(stream, cuts)):
        outcome = m.received(segment, 1.0)
        if outcome is not None:
            rest = b"".join(parts[i + 1:])
            break
    assert isinstance(outcome, RelayJoined)
    assert outcome.public == PUBLIC
    assert outcome.early + rest == tunnel  # in order, none lost, none twice
    assert m.received(b"more", 2.0) is None  # done: it takes nothing more


REFUSALS = [
    ("relay_refused", errors.RelayRefused,
     f"relay {RELAY} refused our token: relay token already used"),
    ("timeout", errors.RelayTimeout,
     f"relay {RELAY}: relay token already used (the peer never reached it)"),
    ("busy", errors.RendezvousBusy, f"relay {RELAY}: relay token already used"),
    ("bad_request", errors.RendezvousRejected,
     f"rendezvous {RELAY} (relay): relay token already used"),
]


@pytest.mark.parametrize(("code", "kind", "says"), REFUSALS)
@given(cuts=st.lists(st.integers(1, 200), max_size=6))
def test_a_refusal_is_its_type_in_any_split(code: str, kind: type[Exception], says: str,
                                            cuts: list[int]) -> None:
    m = machine()
    outcome = None
    for segment in chunks(REPLY + encode(ErrorReply(code, "relay token already used")),
                          cuts):
        outcome = outcome or m.received(segment, 1.0)
    assert isinstance(outcome, RelayFailed)
    assert type(outcome.error) is kind
    assert str(outcome.error) == says


def test_the_address_wait_is_the_network_timeout_and_named() -> None:
    m = machine(10.0)
    assert m.deadline == 10.0 + NET
    assert m.timer(10.0 + NET - 0.01) is None
    failed = m.timer(10.0 + NET)
    assert isinstance(failed, RelayFailed)
    assert isinstance(failed.error, RendezvousProtocolError)
    assert str(failed.error) == (f"relay {RELAY} sent no address within {NET:g} s (is it a "
                                 "nopf-server?)")


def test_the_wait_for_the_peer_is_the_stages_budget_from_the_start_and_named() -> None:
    m = machine(10.0)
    assert m.received(REPLY, 10.2) is None
    assert m.deadline == 10.0 + STAGE.budget  # the peer may still be punching
    assert m.timer(10.0 + NET) is None
    failed = m.timer(18.0)
    assert isinstance(failed, RelayFailed)
    assert isinstance(failed.error, errors.RelayTimeout)
    assert str(failed.error) == (f"the relay at {RELAY} did not join us with the peer within "
                                 "8 s: the peer never reached it")
    assert m.timer(30.0) is None and m.received(RELAYED, 30.0) is None  # over


def test_a_short_budget_bounds_the_address_wait_too() -> None:
    m = machine(0.0, RelayStage(RELAY, 2.0, TOKEN))
    assert m.deadline == 2.0
    failed = m.timer(2.0)
    assert isinstance(failed, RelayFailed) and isinstance(failed.error, errors.RelayTimeout)


@pytest.mark.parametrize(("data", "error", "says"), [
    (b"", None, f"relay {RELAY} closed the connection before its discovery reply"),
    (REPLY[:4], None, f"relay {RELAY} closed the connection before its discovery reply"),
    (REPLY, None, f"relay {RELAY} closed the connection before joining us with the peer"),
    (REPLY + RELAYED[:7], None,
     f"relay {RELAY} closed the connection before joining us with the peer"),
    (b"", "Connection reset by peer", f"relay {RELAY} broke the connection (Connection "
     "reset by peer) while we waited for its discovery reply"),
    (REPLY, "Connection reset by peer", f"relay {RELAY} broke the connection (Connection "
     "reset by peer) while we waited for the peer (\"relayed\")"),
])
def test_a_close_is_named_by_what_it_cut(data: bytes, error: str | None, says: str) -> None:
    m = machine()
    assert m.received(data, 1.0) is None
    failed = m.closed(error, 1.0)
    assert isinstance(failed, RelayFailed)
    assert isinstance(failed.error, RendezvousProtocolError)
    assert str(failed.error) == says
    assert m.closed(None, 2.0) is None


@pytest.mark.parametrize(("data", "says"), [
    (b"HTTP/1.1 400 Bad", "discovery reply has no END\\0 trailer"),
    (REPLY + LENGTH.pack(0), "frame length 0 is out of range"),
    (REPLY + LENGTH.pack(1 << 20), "frame length 1048576 is out of range"),
    (REPLY + LENGTH.pack(3) + b"{x}", "not JSON"),
    (REPLY + encode(Ping(1)), "sent Ping where \"relayed\" was due"),
    (REPLY + encode(Welcome(3, 60.0, PUBLIC)), "sent Welcome where \"relayed\" was due"),
])
def test_what_is_not_the_relays_protocol_is_named(data: bytes, says: str) -> None:
    outcome = machine().received(data, 1.0)
    assert isinstance(outcome, RelayFailed), outcome
    assert isinstance(outcome.error, RendezvousProtocolError)
    assert says in str(outcome.error) and str(outcome.error).startswith(f"relay {RELAY}")


def test_want_asks_for_the_reply_then_a_length_then_the_frame() -> None:
    m = machine()
    assert m.want() == REPLY_SIZE
    m.received(REPLY[:3], 0.0)
    assert m.want() == REPLY_SIZE - 3
    m.received(REPLY[3:], 0.0)
    assert m.want() == LENGTH.size
    m.received(RELAYED[:LENGTH.size], 0.0)
    assert m.want() == len(RELAYED) - LENGTH.size
