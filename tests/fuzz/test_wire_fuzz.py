"""The network surfaces, fuzzed on bytes: the rendezvous machine, the NAT doctor's
responder machine and the frame codecs behind them (no sockets; the loopback test
with real connections is ``test_rendezvous_under_fuzz.py``).

The property of both servers: a connection that sends anything at all (raw bytes,
frames of hostile JSON, hostile fields in a valid hello, cut anywhere) costs only
itself: no exception escapes the machine, it is closed or reset within its
deadlines with at most one log line naming it, and an honest pair (or an honest
doctor client) beside it is served as if it were not there.
"""

from __future__ import annotations

import itertools
import json
import struct
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from hypothesis import example, given, strategies as st

from nopf_web.rendezvous import doctor_machine as dm
from nopf_web.rendezvous.server_machine import Log, ServerLimits
from nopf_web.tunnel.secure import Pake
from nopf_web.wire import doctor as dw, rendezvous as rw
from nopf_web.wire.address import Endpoint
from nopf_web.wire.frames import FrameDecoder, FrameError
from tests.fuzz.budget import fuzz, json_values, nasty_text
from tests.unit.server_harness import JOINER_IP, SHARER_IP, Harness

HOSTILE_IP = "192.0.2.66"
M = TypeVar("M")  # a decoded message


def frame(payload: bytes) -> bytes:
    return struct.pack("!I", len(payload)) + payload


def _json(value: Any) -> bytes:
    return json.dumps(value).encode("utf-8", "surrogatepass")


# A hello with each field possibly hostile: reaches the checks past the framing.
hostile_hellos = st.fixed_dictionaries(
    {"type": st.one_of(st.sampled_from(["hello", "pong", "pake", "probe", "relay"]), nasty_text)},
    optional={
        "version": st.one_of(st.just(2), json_values), "action": st.one_of(st.sampled_from(
            ["share", "join", "reshare", "rejoin", "resume"]), nasty_text),
        "nameplate": st.one_of(st.integers(), json_values, nasty_text),
        "lan": st.one_of(st.lists(st.one_of(nasty_text, st.just("10.0.0.1:²")), max_size=9),
                         json_values),
        "probe": st.one_of(st.just("1.2.3.4:²"), nasty_text, json_values),
        "punch_timeout": st.one_of(st.floats(), st.integers(), json_values),
        "pake": st.one_of(nasty_text, json_values), "relay": json_values,
        "resume_id": nasty_text, "side": nasty_text, "direct_only": json_values,
        "seq": st.one_of(st.integers(), json_values), "token": nasty_text,
    }).map(_json)
payloads = st.one_of(hostile_hellos, json_values.map(_json), st.binary(max_size=120),
                     st.integers(1, 20_000).map(lambda d: b"[" * d + b"]" * d))
streams = st.one_of(
    st.binary(max_size=300),
    st.lists(payloads.map(frame), min_size=1, max_size=3).map(b"".join),
    payloads.map(lambda p: struct.pack("!I", len(p) + 7) + p),  # announced longer than sent
    st.binary(min_size=4, max_size=4).map(lambda h: h + b"x" * 50),  # any length header
)


@st.composite
def cut(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """``data`` split at arbitrary points (the network may deliver any split)."""
    points = sorted(draw(st.lists(st.integers(0, len(data)), max_size=4)))
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


@fuzz(ci=400)
@given(data=st.data(), stream=streams, when=st.integers(0, 3),
       ending=st.sampled_from(["close", "lost", "linger"]))
@example(data=None, stream=frame(b'{"type":"hello","version":2,"action":"join","nameplate":1,'
                                 b'"lan":["10.0.0.1:\xc2\xb2"],"probe":null,"punch_timeout":5}'),
         when=1, ending="linger").via("the issue: 1.2.3.4:²")
def test_rendezvous_machine(data: st.DataObject | None, stream: bytes, when: int,
                            ending: str) -> None:
    h = Harness(ServerLimits(log_interval=0.0))  # every problem logged: count them all
    chunks = [stream] if data is None else data.draw(cut(stream))
    pa, pb = Pake("server", "3-orbit-lantern").message, Pake("client", "3-orbit-lantern").message
    hostile = None
    sharer = joiner = None
    nameplate = 0
    for step in range(4):
        if step == when:
            hostile = h.connect(HOSTILE_IP)
            for chunk in chunks:
                h.send(hostile, chunk)
        if step == 1:
            sharer, nameplate = h.share(SHARER_IP, rtt=0.02, pake=pa)
        if step == 2:
            joiner = h.join(nameplate, JOINER_IP, rtt=0.06, pake=pb)
        h.advance(0.05)
    assert hostile is not None and sharer is not None and joiner is not None
    if ending == "close":
        h.close(hostile)
    elif ending == "lost":
        h.lost(hostile)
    h.advance(0.5)
    # The honest pair met as if nobody else were there.
    s, j = sharer.last(), joiner.last()
    assert isinstance(s, rw.Fire) and isinstance(j, rw.Fire), (s, j)
    assert s.peer_public == j.public and j.peer_public == s.public
    assert (s.peer_pake, j.peer_pake) == (pb, pa)
    # The hostile connection: no exception, at most one line naming it, and it ends
    # within its deadlines (unless what it sent was a valid hello: then it is served).
    assert not [x for x in h.logs if x.kind == "internal"], h.logs
    mine = [x for x in h.logs if HOSTILE_IP in x.line]
    assert len(mine) <= 1, mine
    h.invariants()
    if h.m.conns.get(hostile.id) is not None and h.m.conns[hostile.id].hello is None:
        h.advance(h.m.limits.hello_timeout + h.m.limits.write_timeout + 1)
        assert hostile.id not in h.m.conns
    # Everything it was answered is valid frames after the seed's reply.
    hostile.messages()


def test_a_framed_hello_with_a_superscript_port_is_one_refusal_and_one_line() -> None:
    h = Harness(ServerLimits(log_interval=0.0))
    hostile = h.connect(HOSTILE_IP)
    h.send(hostile, frame(b'{"type":"hello","version":2,"action":"share","nameplate":null,'
                          b'"lan":[],"probe":"1.2.3.4:\xc2\xb2","punch_timeout":5}'))
    reply = hostile.last()
    assert isinstance(reply, rw.ErrorReply) and reply.code == "bad_request", reply
    assert "1.2.3.4:²" in reply.message and hostile.fin
    assert [x.kind for x in h.logs] == ["bad-hello"] and HOSTILE_IP in h.logs[0].line


# -- the doctor's responder -------------------------------------------------------------------


def _doctor_check(value: Any) -> bytes:
    return _json(value)


hostile_checks = st.fixed_dictionaries(
    {"type": st.one_of(st.just("check"), nasty_text)},
    optional={"version": st.one_of(st.just(1), json_values),
              "dial_back": json_values, "wait_ms": st.one_of(st.integers(), json_values)},
).map(_doctor_check)
doctor_streams = st.one_of(
    st.binary(max_size=300),
    st.lists(st.one_of(hostile_checks, json_values.map(_json), st.binary(max_size=80)).map(
        frame), min_size=1, max_size=3).map(b"".join),
)


@fuzz(ci=400)
@given(data=st.data(), stream=doctor_streams, ending=st.sampled_from(["close", "lost", "linger"]))
def test_doctor_responder_machine(data: st.DataObject, stream: bytes, ending: str) -> None:
    m = dm.ResponderMachine(dm.DoctorLimits(log_interval=0.0, log_burst=10_000))
    actions: list[dm.Action] = []
    now = 0.0
    hostile_peer, local = (HOSTILE_IP, 40000), ("198.51.100.2", 3013)
    actions += m.handle(dm.Accepted(1, hostile_peer, now, local=local))
    for chunk in data.draw(cut(stream)):
        actions += m.handle(dm.Received(1, chunk, now))
    # An honest client beside it.
    actions += m.handle(dm.Accepted(2, (JOINER_IP, 50000), now, local=local))
    honest = m.handle(dm.Received(2, dw.encode(dw.Check(False)), now))
    reader = dw.FrameReader()
    seen = [dw.decode_responder_message(f) for a in honest if isinstance(a, dm.Send)
            and a.conn == 2 for f in reader.feed(a.data)]
    assert seen == [dw.Seen(Endpoint(JOINER_IP, 50000), ())]
    if ending == "close":
        actions += m.handle(dm.PeerClosed(1, now))
    elif ending == "lost":
        actions += m.handle(dm.Lost(1, now))
    # Dial-backs it may have asked for end as the driver reports them.
    for a in list(actions):
        if isinstance(a, dm.Dial):
            assert a.target == hostile_peer  # never anywhere else
            actions += m.handle(dm.Dialed(a.conn, "drop", (local[0], 1), 0.5, 0.5))
    deadline = now + 30
    while (at := m.next_deadline) is not None and at <= deadline:
        actions += m.handle(dm.Tick(at))
    lines = [a.line for a in actions if isinstance(a, dm.Log)]
    assert len([x for x in lines if HOSTILE_IP in x]) <= 1, lines
    assert m.open_connections == 0 or (ending == "linger" and m.open_connections <= 2)
    assert not [x for x in lines if "internal" in x or "Traceback" in x], lines


# -- the codecs ---------------------------------------------------------------------------------


def assert_round_trip_or_refusal(payload: bytes, decoders: tuple[Callable[[bytes], M], ...],
                                 encode: Callable[[M], bytes],
                                 refusal: type[Exception]) -> None:
    """Each decoder refuses ``payload`` with ``refusal`` or decodes a message that encodes
    (length prefix, then the payload) back to itself."""
    for decode in decoders:
        try:
            msg = decode(payload)
        except refusal:
            continue
        assert decode(encode(msg)[4:]) == msg


def pieces(stream: bytes, cuts: list[int]) -> Iterator[bytes]:
    """``stream`` in pieces of the ``cuts``' sizes, then the rest."""
    pos = 0
    for step in [*cuts, len(stream)]:
        yield stream[pos:pos + step]
        pos += step


@fuzz(ci=500)
@given(payload=payloads)
@example(payload=b'{"type":"welcome","nameplate":1,"expires_in":5,"public":"1.2.3.4:\xc2\xb2"}')
@example(payload=b'{"type":"fire","public":"1.2.3.4:1","peer_public":"1.2.3.4:\xd9\xa3",'
                 b'"plan":[],"rtt_ms":1}')
def test_rendezvous_codec(payload: bytes) -> None:
    """Both directions' decoders (a peer's and a hostile rendezvous'): a message that
    encodes back to itself, or MessageError; nothing else."""
    assert_round_trip_or_refusal(payload, (rw.decode_client_message, rw.decode_server_message),
                                 rw.encode, rw.MessageError)


@fuzz(ci=500)
@given(stream=st.binary(max_size=400), cuts=st.lists(st.integers(1, 64), max_size=8))
def test_frame_readers(stream: bytes, cuts: list[int]) -> None:
    for reader in (rw.FrameReader(), dw.FrameReader()):
        try:
            for piece in pieces(stream, cuts):
                for payload in reader.feed(piece):
                    assert 1 <= len(payload) <= rw.MAX_FRAME
        except rw.MessageError:
            pass


@fuzz(ci=500)
@given(payload=st.one_of(payloads, st.fixed_dictionaries(
    {"type": st.sampled_from(["seen", "dial_back", "error", "check"])},
    optional={"public": nasty_text, "others": st.lists(nasty_text, max_size=5),
              "outcome": nasty_text, "from": nasty_text, "ms": json_values,
              "icmp": json_values, "code": nasty_text, "message": nasty_text,
              "retry_in": json_values}).map(_json)))
@example(payload=b'{"type":"seen","public":"1.2.3.4:\xc2\xb2","others":[]}').via("the issue")
@example(payload=b'{"type":"seen","public":"1.2.3.4:1","others":["fe80::1%eth0"]}')
def test_doctor_codec(payload: bytes) -> None:
    assert_round_trip_or_refusal(payload,
                                 (dw.decode_client_message, dw.decode_responder_message),
                                 dw.encode, dw.DoctorMessageError)


@fuzz(ci=500)
@given(stream=st.binary(max_size=400), cuts=st.lists(st.integers(1, 64), max_size=8))
def test_tunnel_frame_decoder(stream: bytes, cuts: list[int]) -> None:
    decoder = FrameDecoder()
    try:
        for piece in pieces(stream, cuts):
            decoder.feed(piece)
    except FrameError:
        pass


def test_log_lines_from_the_machines_are_one_line() -> None:
    h = Harness(ServerLimits(log_interval=0.0))
    hostile = h.connect(HOSTILE_IP)
    h.send(hostile, frame(_json({"type": "hello", "version": 2, "action": "join",
                                 "nameplate": 1, "lan": ["a\nb:1"], "probe": None,
                                 "punch_timeout": 5})))
    assert h.logs and all(isinstance(x, Log) and "\n" not in x.line for x in h.logs)
