"""The resume machine, on bytes and events: two peers back to back in memory
(each a mux machine over a resume machine over a record machine per
connection, see ``resume_world``), with connections cut at any point,
frozen and replaced, and every message, ack, timer and path decision checked
on an injected clock."""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from nopf_web.tunnel.errors import (
    HandshakeTimeout,
    PairingMismatch,
    PeerLost,
    TunnelProtocolError,
    TunnelTampered,
)
from nopf_web.tunnel.record_machine import MAX_RECORD, KeyLimits, RecordMachine
from nopf_web.tunnel.resume_machine import (
    DATA_HEADER_SIZE,
    MAX_DATA_PAYLOAD,
    ClosePath,
    Deliver,
    NeedPath,
    PathFailed,
    PathLost,
    PathSelected,
    ResumeEvent,
    ResumeMachine,
    Send,
    TunnelFailed,
    path_rank,
)

from .resume_world import End, World

FEW = settings(max_examples=int(__import__("os").environ.get("SOAK", "60")), deadline=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def blob(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def open_streams(world: World, sizes: list[tuple[int, int]]) -> dict[int, tuple[bytes, bytes]]:
    """One stream per entry, opened by A (up, down bytes): A sends ``up``, B
    answers ``down`` once the stream reaches it; both end their side."""
    sent: dict[int, tuple[bytes, bytes]] = {}
    for i, (up, down) in enumerate(sizes):
        sid = world.a.mux.open_stream()
        data = blob(i, up)
        if data:
            world.a.mux.send(sid, data)
        world.a.mux.end_stream(sid)
        sent[sid] = (data, blob(1000 + i, down))
    world.a.pump()
    return sent


def answer_streams(world: World, sent: dict[int, tuple[bytes, bytes]]) -> None:
    for sid, (_up, down) in sent.items():
        state = world.b.mux.stream(sid)
        if sid in world.b.got and state is not None and not state.fin_pending:
            if down:
                world.b.mux.send(sid, down)
            world.b.mux.end_stream(sid)
    world.b.pump()


def check_streams(world: World, sent: dict[int, tuple[bytes, bytes]]) -> None:
    for sid, (up, down) in sent.items():
        assert bytes(world.b.got.get(sid, b"")) == up, f"stream {sid} up"
        assert bytes(world.a.got.get(sid, b"")) == down, f"stream {sid} down"
        assert sid in world.a.eof and sid in world.b.eof
    assert world.a.failed == world.b.failed == []
    assert world.a.mux.state == world.b.mux.state == "open"


def finish(world: World, sent: dict[int, tuple[bytes, bytes]], *,
           max_bytes: int | None = None) -> None:
    for _ in range(50):
        world.settle(max_bytes=max_bytes)
        answer_streams(world, sent)
        if all(sid in world.a.eof for sid in sent):
            break
    world.settle(max_bytes=max_bytes)
    check_streams(world, sent)


def kinds(events: list[ResumeEvent]) -> list[str]:
    return [type(e).__name__ for e in events]


def of(events: list[ResumeEvent], kind: type) -> list[ResumeEvent]:
    return [e for e in events if isinstance(e, kind)]


# -- every byte exactly once, whatever happens to the connections -----------------

stream_sizes = st.lists(st.tuples(st.integers(0, 600_000), st.integers(0, 300_000)),
                        min_size=1, max_size=5)
op = st.one_of(
    st.tuples(st.just("carry"), st.integers(0, 3), st.integers(1, 400_000)),
    st.tuples(st.just("advance"), st.floats(0.001, 3.0)),
    st.tuples(st.just("cut"), st.integers(0, 3), st.integers(0, 200_000),
              st.integers(0, 200_000)),
    st.tuples(st.just("freeze"), st.integers(0, 3)),
    st.tuples(st.just("connect"), st.sampled_from(["lan", "public", "relay"])),
    st.tuples(st.just("answer")),
)


def apply(world: World, action: tuple[object, ...], sent: dict[int, tuple[bytes, bytes]]) -> None:
    live = [c for c in world.conns if c.alive and not c.frozen]
    if world.a.secrets is None or world.b.secrets is None:
        live = []  # a tunnel never confirmed is not resumed (see the test below)
    match action:
        case ("carry", int(which), int(n)):
            ends = [e for c in live for e in c.ends]
            if ends:
                world.carry(ends[which % len(ends)], n)
        case ("advance", float(dt)):
            world.advance(dt)
        case ("cut", int(which), int(keep_a), int(keep_b)):
            if live:  # any live connection: the active one, a candidate, an old one
                world.cut(live[-1 - which % len(live)], (keep_a, keep_b))
        case ("freeze", int(which)):
            if live:
                live[-1 - which % len(live)].frozen = True
        case ("connect", kind):
            if world.a.secrets is not None and world.b.secrets is not None:
                world.connect(kind)  # type: ignore[arg-type]
        case ("answer",):
            answer_streams(world, sent)


@FEW
@given(sizes=stream_sizes, ops=st.lists(op, max_size=25), seed=st.integers(0, 2**32),
       small_cap=st.booleans())
def test_every_byte_of_every_stream_arrives_once_in_order_across_cut_connections(
        sizes: list[tuple[int, int]], ops: list[tuple[object, ...]], seed: int,
        small_cap: bool) -> None:
    world = World(seed, **({"replay_cap": MAX_DATA_PAYLOAD} if small_cap else {}))
    world.connect("public")
    sent = open_streams(world, sizes)
    world.step()
    world.step()  # both confirmations crossed: from now on the tunnel can resume
    for action in ops:
        apply(world, action, sent)
    finish(world, sent)
    for side in (world.a, world.b):
        lost = of(side.events, PathLost)
        selected = of(side.events, PathSelected)
        assert side.resume.resumes == len(selected)
        assert all(isinstance(e, PathLost) and e.silent_for >= 0 for e in lost)
        assert not of(side.events, TunnelFailed)
    assert world.a.resume.stats().unacked_bytes == world.b.resume.stats().unacked_bytes == 0


@FEW
@given(data=st.data(), seed=st.integers(0, 2**32))
def test_records_cut_and_merged_anywhere_on_each_connection(data: st.DataObject,
                                                            seed: int) -> None:
    world = World(seed)
    world.connect("public")
    sent = open_streams(world, [(300_000, 200_000), (5, 0), (70_000, 1)])
    first = data.draw(st.integers(1, 100_000), label="chunk")
    # Resuming needs the tunnel's keys: cuts come once both sides have confirmed
    # (a first connection lost before that is a failed setup, not a path change).
    for _ in range(10_000):
        if world.a.secrets is not None and world.b.secrets is not None:
            break
        world.step(first)
    assert world.a.secrets is not None and world.b.secrets is not None
    for _ in range(data.draw(st.integers(0, 3), label="cuts")):
        for _ in range(data.draw(st.integers(0, 20), label="steps")):
            world.step(data.draw(st.integers(1, 100_000), label="chunk"))
        live = [c for c in world.conns if c.alive]
        if live:
            world.cut(live[-1], (data.draw(st.integers(0, 300_000)),
                                 data.draw(st.integers(0, 300_000))))
        world.settle(max_bytes=data.draw(st.integers(2000, 300_000), label="max"))
    finish(world, sent, max_bytes=data.draw(st.integers(2000, 300_000), label="max"))


def test_a_frozen_path_is_found_by_liveness_and_replaced_without_a_byte_lost() -> None:
    world = World(1)
    world.connect("public")
    sent = open_streams(world, [(2_000_000, 500_000)])
    for _ in range(5):
        world.step(100_000)
    world.conns[0].frozen = True
    t0 = world.now
    world.settle()
    lost = [e for s in (world.a, world.b) for e in of(s.events, PathLost)]
    assert lost and all(isinstance(e, PathLost) and e.timed_out for e in lost)
    # Detection: a probe after T of silence, the verdict T later (T = 1 s here).
    assert all(isinstance(e, PathLost) and 2.0 <= e.silent_for < 2.1 for e in lost)
    assert world.now - t0 < 10
    finish(world, sent)


# -- selection: the leader decides, SELECT races, upgrades ---------------------------


@FEW
@given(seed=st.integers(0, 2**32), kinds_=st.lists(
    st.sampled_from(["lan", "public", "relay"]), min_size=2, max_size=5),
    steps=st.lists(st.integers(1, 5000), min_size=1, max_size=30))
def test_paths_added_at_once_end_on_one_path_chosen_by_the_leader(
        seed: int, kinds_: list[str], steps: list[int]) -> None:
    world = World(seed)
    world.connect("relay")
    world.settle()
    sent = open_streams(world, [(400_000, 400_000), (10, 10)])
    for kind in kinds_:  # several connections authenticate at about the same time
        world.connect(kind)  # type: ignore[arg-type]
    for n in steps:
        world.step(n)
    finish(world, sent)
    world.advance(10.0)  # past the switch grace: old connections are closed
    world.settle()
    a, b = world.a.resume, world.b.resume
    assert a.active is not None and b.active is not None
    a_end, b_end = world.a.ends[a.active.id], world.b.ends[b.active.id]
    assert a_end.conn is b_end.conn  # both on the same connection
    best = max(path_rank(k) for k in ["relay", *kinds_])  # type: ignore[arg-type]
    assert path_rank(a.active.kind) == best  # direct beats the relay
    # Among equals the newest: the last of that rank that the leader confirmed.
    assert a_end.conn is [c for c in world.a.confirmed if path_rank(c.kind) == best][-1]
    assert [c for c in world.conns if c.alive] == [a_end.conn]


def test_a_relay_tunnel_moves_to_a_direct_path_and_closes_the_relay() -> None:
    world = World(2)
    relay = world.connect("relay")
    sent = open_streams(world, [(1_000_000, 1_000_000)])
    for _ in range(4):
        world.step(50_000)
    direct = world.connect("public")
    world.step(50_000)
    world.step(50_000)
    assert world.a.resume.active is not None and world.a.resume.active.kind == "public"
    finish(world, sent)
    assert not relay.alive and direct.alive
    selected = of(world.b.events, PathSelected)
    assert len(selected) == 1
    assert selected[0] == PathSelected(selected[0].path, "public", "relay", None,  # type: ignore[union-attr]
                                       selected[0].replayed)  # type: ignore[union-attr]
    assert not of(world.a.events, PathLost) and not of(world.b.events, PathLost)


def test_a_relay_candidate_is_kept_while_the_leader_checks_its_direct_path() -> None:
    # The follower lost the direct path and came back over the relay; the
    # leader still sees the direct path alive: it probes it.
    world = World(3)
    direct = world.connect("public")
    world.settle()
    world.connect("relay")
    world.step()
    world.step()
    a = world.a.resume
    assert a.active is not None and a.active.kind == "public"
    assert a.active.probe_at is not None  # a probe is out
    world.settle()  # the direct path answers: the relay is not needed
    assert direct.alive and not world.conns[1].alive
    assert [e.why for e in of(world.a.events, PathFailed)] == [  # type: ignore[union-attr]
        "the public path is alive"]
    # Now the direct path is dead, silently, when the relay comes back.
    direct.frozen = True
    world.connect("relay")
    world.step()
    world.step()
    world.advance(1.0)  # T = 1 s after the probe: the direct path is lost
    lost = of(world.a.events, PathLost)
    assert len(lost) == 1 and lost[0].timed_out  # type: ignore[union-attr]
    assert active_kind(a) == "relay"


def active_kind(m: ResumeMachine) -> str | None:
    return m.active.kind if m.active is not None else None


def test_a_late_select_never_undoes_a_newer_one() -> None:
    a = ResumeMachine("client")
    first = a.add_path("public", 0.0, first=True)
    a.path_confirmed(first, 0.0)
    p2 = a.add_path("public", 1.0)
    p3 = a.add_path("lan", 1.0)
    select = struct.pack("!BQI", 3, 0, 2)
    events = a.receive(p3, select, 1.1)
    assert a.active is not None and a.active.id == p3
    assert of(events, PathSelected)
    events = a.receive(p2, struct.pack("!BQI", 3, 0, 1), 1.2)  # epoch 1 arrives late
    assert a.active.id == p3 and not of(events, PathSelected)
    assert not of(a.receive(p3, select, 1.3), PathSelected)  # the same epoch again
    del first


def test_the_leader_closes_the_old_path_when_the_follower_shows_up_or_after_2_s() -> None:
    world = World(4)
    old = world.connect("public")
    world.settle()
    new = world.connect("lan")
    # Hellos, confirms: the leader selects; the follower's ACK comes back.
    for _ in range(3):
        world.step()
    assert not old.alive or old.ends[0].closed
    why = [e.why for e in of(world.a.events, ClosePath)]  # type: ignore[union-attr]
    assert why == ["the peer moved to the new path"]
    # If the follower never shows up on the new path, the leader waits 2 s.
    world2 = World(5)
    world2.connect("public")
    world2.settle()
    new2 = world2.connect("lan")
    world2.carry(new2.ends[0])  # A's hello
    world2.carry(new2.ends[1])  # B's hello and confirm: A confirms, selects
    assert world2.a.resume.active is not None and world2.a.resume.active.kind == "lan"
    new2.frozen = True  # nothing more arrives
    world2.advance(1.9)
    assert not of(world2.a.events, ClosePath)
    world2.advance(0.2)
    assert [e.why for e in of(world2.a.events, ClosePath)] == [  # type: ignore[union-attr]
        "replaced by a newer path"]
    del new


# -- the resume machine alone: messages, acks, replay cap, liveness -------------------


def pair(confirm: bool = True, **options: object) -> tuple[ResumeMachine, ResumeMachine, int, int]:
    """Two machines on their first path (confirmed at 0 unless not ``confirm``,
    the first PINGs dropped); records move only by hand."""
    a = ResumeMachine("server", **options)  # type: ignore[arg-type]
    b = ResumeMachine("client", **options)  # type: ignore[arg-type]
    pa = a.add_path("public", 0.0, first=True)
    pb = b.add_path("public", 0.0, first=True)
    if confirm:
        a.path_confirmed(pa, 0.0)
        b.path_confirmed(pb, 0.0)
    return a, b, pa, pb


def sends(events: list[ResumeEvent]) -> list[bytes]:
    return [b"".join(bytes(p) for p in e.parts) for e in events if isinstance(e, Send)]


def test_the_message_layouts_are_the_documented_ones() -> None:
    a, b, pa, pb = pair(confirm=False)
    (ping,) = sends(a.path_confirmed(pa, 1.5))
    assert ping == struct.pack("!BQ", 4, 1_500_000_000)
    sends(b.path_confirmed(pb, 1.5))
    (pong,) = sends(b.receive(pb, ping, 1.6))
    assert pong == struct.pack("!BQ", 5, 1_500_000_000)
    (data,) = sends(a.send([b"frames", memoryview(b" and more")], 2.0))
    assert data == struct.pack("!BQQ", 1, 0, 0) + b"frames and more"
    assert len(struct.pack("!BQQ", 1, 0, 0)) == DATA_HEADER_SIZE == 17
    events = b.receive(pb, data, 2.0)
    assert [bytes(e.data) for e in of(events, Deliver)] == [b"frames and more"]  # type: ignore[union-attr]
    (ack,) = sends(b.timer(2.02))  # 20 ms later, nothing to carry it
    assert ack == struct.pack("!BQ", 2, 1)
    (back,) = sends(b.send([b"reply"], 3.0))
    assert back[:DATA_HEADER_SIZE] == struct.pack("!BQQ", 1, 0, 1)  # seq 0, ack 1
    (close,) = sends(a.close(4.0)[:1])
    assert close == b"\x06"
    assert kinds(b.receive(pb, close, 4.0)) == ["PeerClosed", "ClosePath"]
    assert b.state == "closed"


def test_acks_ride_on_data_and_come_alone_after_20_ms_or_a_quarter_of_the_cap() -> None:
    a, b, pa, pb = pair(replay_cap=4 * MAX_DATA_PAYLOAD)
    for _ in range(3):
        for record in sends(a.send([bytes(1000)], 1.0)):
            b.receive(pb, record, 1.0)
    assert b.next_deadline == pytest.approx(1.02)
    (reply,) = sends(b.send([b"r"], 1.01))  # the ack rides on it
    assert struct.unpack_from("!Q", reply, 9)[0] == 3
    assert sends(b.timer(1.02)) == []  # nothing left to acknowledge
    a.receive(pa, reply, 1.02)
    assert a.unacked_bytes == 0
    # A quarter of the cap unacknowledged: an ACK at once (the driver runs the
    # timer in the same loop iteration).
    big = bytes(MAX_DATA_PAYLOAD)
    for record in sends(a.send([big], 2.0)):
        b.receive(pb, record, 2.0)
    assert b.next_deadline == 2.0
    (ack,) = sends(b.timer(2.0))
    assert ack == struct.pack("!BQ", 2, 4)


def test_a_full_replay_buffer_pauses_writing_until_an_ack_frees_it() -> None:
    a, b, pa, pb = pair(replay_cap=2 * MAX_DATA_PAYLOAD)
    chunk = bytes(MAX_DATA_PAYLOAD)
    records = sends(a.send([chunk], 0.0))
    assert not a.writing_paused
    records += sends(a.send([chunk], 0.0))
    assert a.writing_paused and a.unacked_bytes == 2 * MAX_DATA_PAYLOAD
    b.receive(pb, records[0], 0.1)
    (ack,) = sends(b.timer(0.1))
    assert kinds(a.receive(pa, ack, 0.2)) == ["Writable"]
    assert not a.writing_paused and a.unacked_bytes == MAX_DATA_PAYLOAD


def test_big_writes_are_cut_into_records_and_kept_without_copies() -> None:
    a, b, _pa, pb = pair()
    data = bytes(range(256)) * (MAX_DATA_PAYLOAD // 256 + 100)  # more than a record
    mutable = bytearray(b"changed later")
    events = a.send([data, mutable], 0.0)
    records = [e for e in events if isinstance(e, Send)]
    assert len(records) == 2
    assert records[0].parts[1:] == [memoryview(data)[:MAX_DATA_PAYLOAD]]
    mutable[:] = b"X" * len(mutable)  # the caller reuses its buffer: the copy is safe
    got = b"".join(bytes(e.data) for r in sends(events)  # type: ignore[union-attr]
                   for e in of(b.receive(pb, r, 0.0), Deliver))
    assert got == data + b"changed later"
    assert a.send([b"", memoryview(b"")], 0.0) == []


@pytest.mark.parametrize(("message", "what"), [
    (struct.pack("!BQQ", 1, 1, 0) + b"x", "DATA 1 when 0 was expected (a gap)"),
    (struct.pack("!BQQ", 1, 0, 0), "a DATA message without data"),
    (struct.pack("!BQ", 2, 5), "an ack of 5 when 0 were sent"),
    (struct.pack("!BQQ", 1, 0, 9) + b"x", "an ack of 9 when 0 were sent"),
    (struct.pack("!BQ", 9, 0), "a message of kind 9 and 9 bytes"),
    (struct.pack("!BQ", 4, 0) + b"!", "a message of kind 4 and 10 bytes"),
    (struct.pack("!BQI", 3, 0, 1), "SELECT from the follower"),
])
def test_protocol_violations_fail_the_tunnel(message: bytes, what: str) -> None:
    a, _b, pa, _pb = pair()
    events = a.receive(pa, message, 0.0)
    assert kinds(events) == ["ClosePath", "TunnelFailed"]
    error = events[-1].error  # type: ignore[union-attr]
    assert isinstance(error, TunnelProtocolError)
    assert str(error) == f"the peer broke the resume protocol: {what}"
    assert a.state == "failed" and a.next_deadline is None
    with pytest.raises(TunnelProtocolError):
        a.send([b"late"], 0.0)
    assert a.receive(pa, message, 0.0) == [] and a.timer(100.0) == []


def test_a_replayed_copy_is_dropped_and_counted() -> None:
    a, b, _pa, pb = pair()
    (record,) = sends(a.send([b"once"], 0.0))
    assert len(of(b.receive(pb, record, 0.0), Deliver)) == 1
    assert of(b.receive(pb, record, 0.0), Deliver) == []
    assert b.duplicates == 1


def test_liveness_probe_after_t_and_loss_after_2t_on_an_injected_clock() -> None:
    a, b, pa, pb = pair(confirm=False)
    (ping,) = sends(a.path_confirmed(pa, 0.0))
    b.path_confirmed(pb, 0.0)
    (pong,) = sends(b.receive(pb, ping, 0.0))
    a.receive(pa, pong, 0.3)  # RTT 0.3 s: T = max(1 s, 4 x RTT) = 1.2 s
    assert a.patience(a.active) == pytest.approx(1.2)  # type: ignore[arg-type]
    sends(a.send([b"unacknowledged"], 1.0))
    assert a.next_deadline == pytest.approx(2.2)
    assert a.timer(2.1) == []
    (probe,) = sends(a.timer(2.2))
    assert probe[0] == 4
    assert a.next_deadline == pytest.approx(3.4)
    assert a.timer(3.39) == []
    events = a.timer(3.4 + 1e-9)
    assert kinds(events) == ["ClosePath", "PathLost", "NeedPath"]
    lost = events[1]
    assert isinstance(lost, PathLost) and lost.timed_out and lost.kind == "public"
    assert lost.silent_for == pytest.approx(3.1)  # since the PONG at 0.3
    assert lost.why == "nothing arrived for 3.1 s (a probe went unanswered for 1.2 s)"
    assert a.active is None and a.next_deadline == pytest.approx(3.4 + 60)


def test_anything_arriving_answers_a_probe() -> None:
    a, _b, pa, _pb = pair()
    sends(a.send([b"x"], 0.0))
    (probe,) = sends(a.timer(1.0))
    assert probe[0] == 4
    a.progress(pa, 1.5)  # part of a record arrived
    assert sends(a.timer(2.0)) == [struct.pack("!BQ", 2, 0)]  # we show we are alive too
    assert a.active is not None and a.active.probe_at is None
    assert a.next_deadline == pytest.approx(2.5)  # a new probe T after the last sign
    assert sends(a.timer(2.5))[0][0] == 4


def test_an_idle_path_pings_every_keepalive_and_is_lost_when_unanswered() -> None:
    a, b, pa, pb = pair(confirm=False, keepalive=15.0)
    (ping,) = sends(a.path_confirmed(pa, 0.0))
    b.path_confirmed(pb, 0.0)
    (pong,) = sends(b.receive(pb, ping, 0.0))
    a.receive(pa, pong, 0.001)
    assert a.next_deadline == pytest.approx(15.001)
    (keepalive,) = sends(a.timer(15.001))
    assert keepalive[0] == 4
    assert sends(a.timer(16.0)) == []
    (probe,) = sends(a.timer(16.001))  # the keepalive is outstanding: T = 1 s
    assert probe[0] == 4
    assert kinds(a.timer(17.001)) == ["ClosePath", "PathLost", "NeedPath"]


def test_a_peer_receiving_a_slow_record_shows_it_is_alive() -> None:
    a, b, pa, pb = pair()
    b.progress(pb, 1.0)  # bytes of a long record arrive; we sent nothing since 0
    assert b.next_deadline == pytest.approx(1.0)
    (heartbeat,) = sends(b.timer(1.0))
    assert heartbeat == struct.pack("!BQ", 2, 0)
    b.progress(pb, 1.2)
    assert b.next_deadline == pytest.approx(1.5)  # at most every T/2
    assert sends(b.timer(1.5)) == [struct.pack("!BQ", 2, 0)]
    del a, pa


def test_the_resume_budget_ends_the_tunnel_with_what_was_tried() -> None:
    a, _b, pa, _pb = pair(resume_budget=60.0)
    events = a.path_closed(pa, ConnectionResetError(104, "Connection reset by peer"), 5.0)
    assert kinds(events) == ["PathLost", "NeedPath"]
    lost = events[0]
    assert isinstance(lost, PathLost) and not lost.timed_out
    assert lost.why == "the connection failed (Connection reset by peer)"
    p2 = a.add_path("relay", 10.0)
    assert kinds(a.path_closed(p2, HandshakeTimeout("no path hello"), 20.0)) == [
        "PathFailed", "NeedPath"]
    assert a.timer(64.9) == []
    events = a.timer(65.0)
    assert kinds(events) == ["TunnelFailed"]
    error = events[0].error  # type: ignore[union-attr]
    assert isinstance(error, PeerLost)
    assert str(error) == (
        "the tunnel's public path was lost (the connection failed (Connection reset by "
        "peer)) and no new path carried it within 60 s (tried: relay: no path hello)")


def test_the_first_path_failing_before_confirmation_fails_the_tunnel_as_before() -> None:
    a, _b, pa, _pb = pair(confirm=False)
    mismatch = PairingMismatch("pairing code did not match")
    assert kinds(a.path_closed(pa, mismatch, 1.0)) == ["TunnelFailed"]
    a, _b, pa, _pb = pair()
    events = a.path_closed(pa, TunnelTampered("tunnel data rejected"), 1.0)
    assert kinds(events) == ["TunnelFailed"]  # tampering is never resumed over


def test_a_path_with_a_wrong_tag_is_dropped_without_harming_the_tunnel() -> None:
    world = World(6)
    world.connect("public")
    sent = open_streams(world, [(200_000, 100_000)])
    world.step(30_000)
    world.step(30_000)
    # A stranger (another tunnel's secret) answers B on a new connection.
    other = World(99)
    other.connect("public")
    other.settle()
    assert other.a.secrets is not None
    stranger = RecordMachine.path("server", other.a.secrets)
    conn = world.connect("relay")
    conn.frozen = True  # A never hears of it
    b_end = conn.ends[1]
    hello = stranger.start(world.now)
    b_end.side.record_events(b_end, b_end.rm.receive_data(hello[0].data))  # type: ignore[union-attr]
    confirm = stranger.receive_data(bytes(b_end.out[:22]))  # B's hello: its confirm
    b_end.side.record_events(b_end, b_end.rm.receive_data(confirm[0].data))  # type: ignore[union-attr]
    (failed,) = of(world.b.events, PathFailed)
    assert isinstance(failed, PathFailed) and failed.kind == "relay"
    assert "did not prove the tunnel's key" in failed.why
    assert not of(world.b.events, PathLost) and not of(world.b.events, NeedPath)
    finish(world, sent)


def test_a_replayed_path_handshake_from_another_connection_gives_nothing() -> None:
    world = World(7)
    world.connect("public")
    world.settle()
    sent = open_streams(world, [(100_000, 100_000)])
    genuine = world.connect("lan")
    world.carry(genuine.ends[1])  # B's hello reaches A: A's confirm follows its hello
    seen = bytes(genuine.ends[0].out)  # as an eavesdropper saw them
    assert len(seen) == 22 + 32
    world.settle()
    # Replayed to B on a new connection: B's nonce is fresh, A's confirm does not fit.
    replay = world.connect("relay")
    replay.frozen = True
    b_end: End = replay.ends[1]
    b_end.side.record_events(b_end, b_end.rm.receive_data(seen))
    assert not b_end.rm.confirmed and b_end.rm.secrets is None
    failures = [e for e in world.b.events if isinstance(e, PathFailed) and e.path == b_end.path]
    assert len(failures) == 1 and "did not prove the tunnel's key" in failures[0].why
    assert world.b.resume.active is not None
    assert world.b.resume.active.kind == "lan"  # the genuine path still carries the tunnel
    finish(world, sent)


def test_inputs_are_checked() -> None:
    with pytest.raises(ValueError, match="role"):
        ResumeMachine("A")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="replay_cap"):
        ResumeMachine("server", replay_cap=1000)
    m = ResumeMachine("server")
    with pytest.raises(ValueError, match="first path first"):
        m.add_path("public", 0.0)
    with pytest.raises(ValueError, match="kind"):
        m.add_path("carrier-pigeon", 0.0, first=True)  # type: ignore[arg-type]
    m.add_path("lan", 0.0, first=True)
    with pytest.raises(ValueError, match="first path must be added first"):
        m.add_path("lan", 0.0, first=True)
    assert m.abort(PeerLost("gone"))[0] == ClosePath(1, abort=True, why="gone")
    with pytest.raises(PeerLost):
        m.add_path("lan", 1.0)


def test_the_driver_rearms_only_for_a_deadline_earlier_than_its_timer() -> None:
    a, b, _pa, pb = pair()
    b.armed(10.0)  # the driver's timer is set for 10 s
    b.rearm = False
    (record,) = sends(a.send([b"x"], 1.0))
    b.receive(pb, record, 1.0)  # an ack is due at 1.02: earlier
    assert b.rearm and b.next_deadline == pytest.approx(1.02)
    b.armed(1.02)
    b.rearm = False
    (record,) = sends(a.send([b"y"], 1.01))
    b.receive(pb, record, 1.01)
    assert not b.rearm  # still 1.02: the timer set is right
    sends(b.send([b"z"], 1.5))  # now waiting for an ack: liveness at 1.5 + T
    assert not b.rearm  # later than the timer: it will re-arm when it fires
    b.armed(None)
    sends(b.send([b"w"], 1.6))
    assert not b.rearm  # nothing new to wait for (already waiting since 1.5)
    b.receive(pb, sends(a.send([b"v"], 1.7))[0], 1.7)
    assert b.rearm  # no timer at all: any deadline is earlier


def test_a_probe_answered_closes_the_worse_candidate_whatever_the_clock_reads() -> None:
    # now * 1e9 through an integer and back may come out a hair early.
    for now in (1234.567891234, 98765.4321, 0.1 + 0.2, 7.0):
        a, b, pa, pb = pair()
        relay = a.add_path("relay", now)
        events = a.path_confirmed(relay, now)  # worse than the live public path
        probe = [s for s in sends(events) if s[0] == 4][-1]
        (pong,) = sends(b.receive(pb, probe, now))
        events = a.receive(pa, pong, now + 0.001)
        assert kinds(events) == ["ClosePath", "PathFailed"], now


def test_the_owners_failed_attempts_are_named_once_each_with_repeats_counted() -> None:
    a, _b, pa, _pb = pair(resume_budget=10.0)
    a.attempt_failed("not lost: ignored")
    a.path_closed(pa, ConnectionResetError(104, "Connection reset by peer"), 5.0)
    for _ in range(3):
        a.attempt_failed("meeting through the rendezvous: Connection refused")
    a.attempt_failed("meeting through the rendezvous: the peer did not resume")
    events = a.timer(15.0)
    assert kinds(events) == ["TunnelFailed"]
    assert str(events[0].error).endswith(  # type: ignore[union-attr]
        "(tried: meeting through the rendezvous: Connection refused (3 times); meeting "
        "through the rendezvous: the peer did not resume)")


def test_a_receiver_notices_the_stream_stopping_within_2t_not_at_its_keepalive() -> None:
    a, b, pa, pb = pair(keepalive=15.0)
    for t in (1.0, 1.5, 2.0):  # a one-way transfer: b only receives (and acks)
        for record in sends(a.send([bytes(1000)], t)):
            b.receive(pb, record, t)
        for ack in sends(b.timer(t + 0.02)):
            a.receive(pa, ack, t + 0.03)
    assert b.unacked_bytes == 0  # nothing of b's own outstanding
    assert b.next_deadline == pytest.approx(3.0)  # T after the peer's last byte
    (probe,) = sends(b.timer(3.0))
    assert probe[0] == 4
    events = b.timer(4.0)
    assert kinds(events) == ["ClosePath", "PathLost", "NeedPath"]
    assert events[1].silent_for == pytest.approx(2.0)  # type: ignore[union-attr]


def test_a_stream_that_merely_stopped_costs_one_ping_then_idles() -> None:
    a, b, pa, pb = pair(keepalive=15.0)
    (record,) = sends(a.send([b"the last bytes for a while"], 1.0))
    b.receive(pb, record, 1.0)
    for ack in sends(b.timer(1.02)):
        a.receive(pa, ack, 1.03)
    (probe,) = sends(b.timer(2.0))
    (pong,) = sends(a.receive(pa, probe, 2.01))
    b.receive(pb, pong, 2.02)  # alive: the silence that follows is no news
    assert b.next_deadline == pytest.approx(2.02 + 15.0)


# -- key updates under the resumable channel -------------------------------------------


@FEW
@given(sizes=stream_sizes, ops=st.lists(op, max_size=25), seed=st.integers(0, 2**32),
       records=st.integers(1, 6), nbytes=st.integers(1, 300_000))
def test_key_updates_cross_path_changes_and_replays_without_a_byte_lost(
        sizes: list[tuple[int, int]], ops: list[tuple[object, ...]], seed: int,
        records: int, nbytes: int) -> None:
    """Low key limits: every connection updates its keys many times, connections
    are cut, frozen and replaced in between, and what the resume layer replays
    after a key update goes out on the new path under that path's fresh keys."""
    limits = KeyLimits(records=records, bytes=nbytes)
    world = World(seed)
    world.key_limits = limits
    world.connect("public")
    sent = open_streams(world, sizes)
    world.step()
    world.step()
    for action in ops:
        apply(world, action, sent)
    finish(world, sent)
    updates = 0
    for conn in world.conns:
        a, b = conn.ends
        sent_ab, sent_ba = a.rm.key_updates[0], b.rm.key_updates[0]
        carried = not conn.frozen and not any(e.closed or e.out for e in conn.ends)
        if not carried:  # cut or frozen: what was in flight never arrived
            assert b.rm.key_updates[1] <= sent_ab and a.rm.key_updates[1] <= sent_ba
        else:
            assert (b.rm.key_updates[1], a.rm.key_updates[1]) == (sent_ab, sent_ba)
        updates += sent_ab + sent_ba
        for end in conn.ends:
            sealing, opening = end.rm.sealing, end.rm.opening
            if sealing is not None:  # no key sealed past its limits (+1 record)
                assert sealing.records <= limits.records
                assert sealing.bytes < limits.bytes + MAX_RECORD
                assert sealing.generation == end.rm.key_updates[0]
            if opening is not None:
                assert opening.generation == end.rm.key_updates[1]
    if not ops:  # one connection: a direction that carried more than one key may
        up = sum(len(u) for u, _ in sent.values())  # seal had to update it
        down = sum(len(d) for _, d in sent.values())
        if max(up, down) >= nbytes + MAX_RECORD:
            assert updates > 0


def test_a_replay_after_a_key_update_goes_out_under_the_new_paths_keys() -> None:
    limits = KeyLimits(records=3, bytes=50_000)
    world = World(11)
    world.key_limits = limits
    first = world.connect("public")
    sent = open_streams(world, [(400_000, 300_000)])
    world.step()
    world.step()
    a_end, b_end = first.ends
    for _ in range(100):
        if b_end.rm.key_updates[1] >= 2:
            break
        world.step(60_000)
        answer_streams(world, sent)
    assert a_end.rm.key_updates[0] >= 2 and b_end.rm.key_updates[1] >= 2
    world.cut(first, (7_000, 0))  # cut inside a record, after key updates
    assert world.a.resume.unacked_bytes > 0  # something to replay
    finish(world, sent)
    later = world.conns[1:]
    assert later and any(c.ends[0].rm.key_updates[0] > 0 for c in later)
    assert world.a.resume.resumes >= 1
