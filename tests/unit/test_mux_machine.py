"""The stream mux machine, on bytes: a server and a client machine back to back
in memory (their records cut and merged arbitrarily), the flow control and
scheduling rules, every way a peer can break the protocol, and keepalive on an
injected clock."""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable

import pytest
from hypothesis import given, strategies as st

from nopf_web.roles import PeerRole
from nopf_web.tunnel.errors import (
    NoSuchService,
    PeerLost,
    StreamClosed,
    StreamReset,
    TunnelClosed,
    TunnelError,
    TunnelProtocolError,
)
from nopf_web.tunnel.mux_machine import (
    AUTO_WINDOW_BUDGET,
    AUTO_WINDOW_MAX,
    DEFAULT_MIN_TURN,
    GROWING_STREAMS,
    RATE_INTERVAL,
    RECORD_TIME,
    STREAM_SEND_BUFFER,
    MuxEvent,
    MuxMachine,
    PeerServices,
    StreamData,
    StreamDone,
    StreamEof,
    StreamFailed,
    StreamOpened,
    StreamState,
    StreamWritable,
    TunnelEnded,
)
from nopf_web.wire import frames as fr
from nopf_web.wire.frames import (
    BASE_RECORD_BUDGET,
    INITIAL_WINDOW,
    RECORD_BUDGET,
    FrameDecoder,
    ResetCode,
)

from .budget import FEW


class End:
    """One machine and what it reported, per stream."""

    def __init__(self, role: PeerRole, *, now: float = 0.0, **options: float) -> None:
        self.m = MuxMachine(role=role, **options)  # type: ignore[arg-type]
        self.m.start(now)
        self.now = now  # the time data_to_send is given
        self.consume = True  # the application takes data as it arrives
        self.received: dict[int, bytearray] = {}
        self.opened: list[int] = []
        self.eof: list[int] = []
        self.done: list[int] = []
        self.failed: dict[int, StreamReset] = {}
        self.writable: list[int] = []
        self.ended: list[TunnelEnded] = []
        self.peer_services: list[int] = []
        # The first record, the record-size announcement: kept out of the tests' frames
        # (pair() delivers it; an End made alone stands for an older peer's partner).
        self.hello = self.wire()

    def take(self, events: Iterable[MuxEvent]) -> None:
        arrived: dict[int, int] = {}
        for event in events:
            if isinstance(event, StreamData):
                self.received.setdefault(event.stream_id, bytearray()).extend(event.data)
                arrived[event.stream_id] = arrived.get(event.stream_id, 0) + len(event.data)
            elif isinstance(event, StreamOpened):
                self.opened.append(event.stream_id)
            elif isinstance(event, StreamEof):
                self.eof.append(event.stream_id)
            elif isinstance(event, StreamDone):
                self.done.append(event.stream_id)
            elif isinstance(event, StreamFailed):
                self.failed[event.stream_id] = event.error
            elif isinstance(event, StreamWritable):
                self.writable.append(event.stream_id)
            elif isinstance(event, PeerServices):
                self.peer_services.append(event.count)
            else:
                self.ended.append(event)
        if self.consume:  # all that arrived, at once (as the forwarders do)
            for sid, n in arrived.items():
                self.m.consumed(sid, n)

    def records(self) -> list[list[bytes | memoryview]]:
        """Everything there is to send, one record's frames at a time."""
        out: list[list[bytes | memoryview]] = []
        while True:
            parts, events = self.m.data_to_send(self.now)
            if not parts:
                return out
            out.append(parts)
            self.take(events)

    def wire(self) -> bytes:
        return b"".join(b"".join(parts) for parts in self.records())

    def frames(self) -> list[fr.Frame]:
        return FrameDecoder().feed(self.wire())

    def receive(self, data: bytes, now: float = 0.0, cuts: Iterable[int] = ()) -> None:
        bounds = [0, *sorted(c for c in cuts if 0 < c < len(data)), len(data)]
        for start, end in itertools.pairwise(bounds):
            self.take(self.m.receive(data[start:end], now))


def cuts_of(data: st.DataObject | None, size: int) -> list[int]:
    if data is None or size <= 1:
        return []
    return data.draw(st.lists(st.integers(1, size - 1), max_size=6), label="cuts")


def exchange(a: End, b: End, data: st.DataObject | None = None, now: float = 0.0) -> None:
    """Until neither has anything to send; records merged and cut arbitrarily."""
    while a.m.wants_to_send or b.m.wants_to_send:
        for src, dst in ((a, b), (b, a)):
            wire = src.wire()
            dst.receive(wire, now, cuts_of(data, len(wire)))


def pair(**options: float) -> tuple[End, End]:
    """Two ends that have exchanged their first records (the record-size announcements)."""
    a, b = End("server", **options), End("client", **options)
    a.receive(b.hello)
    b.receive(a.hello)
    exchange(a, b)  # the PONGs
    return a, b


MIB = bytes(1 << 20)  # queued by reference: no copy per send


def blob(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


# -- round trips ----------------------------------------------------------------------

sizes = st.lists(st.integers(0, 300_000), max_size=3)


@FEW
@given(data=st.data(), server_streams=st.lists(sizes, max_size=3),
       client_streams=st.lists(sizes, max_size=3), window=st.sampled_from([INITIAL_WINDOW,
                                                                           1 << 20]))
def test_streams_both_ways_round_trip_with_any_cuts(
    data: st.DataObject, server_streams: list[list[int]], client_streams: list[list[int]],
    window: int,
) -> None:
    a, b = pair(window=window)
    sent: dict[int, list[bytes]] = {}  # stream id -> [opener's bytes, acceptor's bytes]
    for opener, acceptor, plans in ((a, b, server_streams), (b, a, client_streams)):
        for plan in plans:
            sid = opener.m.open_stream()
            chunks = [blob(sid * 10 + i, n) for i, n in enumerate(plan)]
            for chunk in chunks:
                opener.m.send(sid, chunk)
            opener.m.end_stream(sid)
            sent[sid] = [b"".join(chunks), blob(-sid, sum(plan) // 2)]
        exchange(a, b, data)
        for sid in (s for s in sent if s in acceptor.opened):  # the answer, then FIN
            acceptor.m.send(sid, sent[sid][1])
            acceptor.m.end_stream(sid)
    exchange(a, b, data)
    assert sorted(a.opened) == sorted(s for s in sent if s % 2 == 0)  # the client's: even
    assert sorted(b.opened) == sorted(s for s in sent if s % 2 == 1)  # the server's: odd
    for sid, (forth, back) in sent.items():
        opener, acceptor = (a, b) if sid % 2 else (b, a)
        assert bytes(acceptor.received.get(sid, b"")) == forth
        assert bytes(opener.received.get(sid, b"")) == back
    for end in (a, b):
        assert sorted(end.eof) == sorted(end.done) == sorted(sent)
        assert not end.failed and not end.ended
        assert end.m.open_streams == 0 and end.m.window_budget == AUTO_WINDOW_BUDGET
    assert a.m.total_streams == b.m.total_streams == len(sent)
    assert a.m.bytes_out == b.m.bytes_in and b.m.bytes_out == a.m.bytes_in


@FEW
@given(data=st.data(), size=st.integers(INITIAL_WINDOW + 1, 3 * INITIAL_WINDOW))
def test_a_reader_that_does_not_consume_stops_only_its_stream(data: st.DataObject,
                                                              size: int) -> None:
    a, b = pair()
    b.consume = False
    stalled, live = a.m.open_stream(), a.m.open_stream()
    a.m.send(stalled, blob(1, size))
    a.m.send(live, b"x" * 1000)
    exchange(a, b, data)
    assert len(b.received[stalled]) == INITIAL_WINDOW  # the credit, not one byte more
    assert bytes(b.received[live]) == b"x" * 1000
    assert not a.m.wants_to_send
    b.consume = True
    b.m.consumed(stalled, INITIAL_WINDOW)  # the application reads: credit returns
    exchange(a, b, data)
    assert bytes(b.received[stalled]) == blob(1, size)


def test_credit_returns_in_quarter_window_batches() -> None:
    a, b = pair()
    b.consume = False
    sid = a.m.open_stream()
    a.m.send(sid, bytes(INITIAL_WINDOW))
    exchange(a, b)
    for _ in range(INITIAL_WINDOW // 4 // 1000):  # just under a quarter: no frame yet
        b.m.consumed(sid, 1000)
    assert not b.m.wants_to_send
    b.m.consumed(sid, INITIAL_WINDOW // 4 - (INITIAL_WINDOW // 4 // 1000) * 1000)
    updates = [f for f in b.frames() if isinstance(f, fr.WindowUpdateFrame)]
    assert updates == [fr.WindowUpdateFrame(sid, INITIAL_WINDOW // 4)]


def test_a_larger_window_is_granted_right_after_open() -> None:
    a, b = pair(window=1 << 20)
    sid = a.m.open_stream()
    assert a.frames() == [fr.OpenFrame(sid), fr.WindowUpdateFrame(sid, (1 << 20) - INITIAL_WINDOW)]
    b.receive(fr.encode_open(3))
    assert b.frames() == [fr.WindowUpdateFrame(3, (1 << 20) - INITIAL_WINDOW)]


def test_a_lone_stream_that_keeps_up_grows_its_window_then_shrinks_back() -> None:
    a, b = pair()
    sid = a.m.open_stream()
    a.m.send(sid, bytes(16 << 20))
    exchange(a, b)
    state = b.m.stream(sid)
    assert state is not None and state.window == AUTO_WINDOW_MAX
    assert b.m.window_budget == AUTO_WINDOW_BUDGET - (AUTO_WINDOW_MAX - INITIAL_WINDOW)
    other = a.m.open_stream()  # another stream: the bulk one gives its growth back
    a.m.send(other, b"hello")
    a.m.send(sid, bytes(8 << 20))
    exchange(a, b)
    assert state.window == INITIAL_WINDOW and b.m.window_budget == AUTO_WINDOW_BUDGET
    assert len(b.received[sid]) == 24 << 20


def test_a_lone_stream_that_lags_does_not_grow() -> None:
    a, b = pair()
    b.consume = False
    sid = a.m.open_stream()
    a.m.send(sid, bytes(4 * INITIAL_WINDOW))
    for _ in range(12):
        exchange(a, b)
        state = b.m.stream(sid)
        assert state is not None
        b.m.consumed(sid, max(0, state.pending - 1000))  # 1000 bytes stay unread
    exchange(a, b)
    assert len(b.received[sid]) > 3 * INITIAL_WINDOW  # it went on, at the same window
    assert state is not None and state.window == INITIAL_WINDOW
    assert b.m.window_budget == AUTO_WINDOW_BUDGET


def test_the_growth_budget_bounds_the_windows() -> None:
    a, b = pair()
    b.m._window_budget = INITIAL_WINDOW  # as if other streams held the rest
    sid = a.m.open_stream()
    a.m.send(sid, bytes(16 << 20))
    exchange(a, b)
    state = b.m.stream(sid)
    assert state is not None and state.window == 2 * INITIAL_WINDOW  # one doubling only
    assert b.m.window_budget == 0
    a.m.end_stream(sid)
    b.m.end_stream(sid)
    exchange(a, b)
    assert b.done == [sid] and b.m.window_budget == INITIAL_WINDOW  # given back at the end


def bulk_streams(a: End, b: End, count: int, size: int, trips: int) -> list[int]:
    """``count`` streams from a to b with ``size`` bytes queued each, after
    ``trips`` round trips (data one way, credit back)."""
    sids = [a.m.open_stream() for _ in range(count)]
    for sid in sids:
        for _ in range(size >> 20):
            a.m.send(sid, MIB)
    for _ in range(trips):
        b.receive(a.wire())
        a.receive(b.wire())
    return sids


def grown(b: End, sids: list[int]) -> list[int]:
    """Each stream's receive window above the initial one, at b."""
    states = [b.m.stream(sid) for sid in sids]
    return [s.window - INITIAL_WINDOW for s in states if s is not None]


def test_busy_streams_that_keep_up_grow_their_windows_within_the_budget() -> None:
    a, b = pair()
    sids = bulk_streams(a, b, 10, 16 << 20, trips=8)
    growth = grown(b, sids)
    assert all(g > 0 for g in growth)  # every bulk stream grew, by its share of the budget
    assert sum(growth) == AUTO_WINDOW_BUDGET - b.m.window_budget <= AUTO_WINDOW_BUDGET
    assert max(growth) <= AUTO_WINDOW_BUDGET // 10
    exchange(a, b)
    assert all(len(b.received[sid]) == 16 << 20 for sid in sids)


def test_a_stream_that_is_not_busy_makes_the_others_give_their_growth_back() -> None:
    a, b = pair()
    sids = bulk_streams(a, b, 10, 16 << 20, trips=8)
    assert all(g > 0 for g in grown(b, sids))
    interactive = a.m.open_stream()  # a few bytes now and then: never busy
    for _ in range(20):
        a.m.send(interactive, b"ls\n")
        for sid in sids:  # the bulk goes on
            a.m.send(sid, MIB)
        b.receive(a.wire())
        a.receive(b.wire())
    assert grown(b, sids) == [0] * 10 and b.m.window_budget == AUTO_WINDOW_BUDGET
    assert bytes(b.received[interactive]) == b"ls\n" * 20


def test_more_streams_than_may_grow_keep_their_windows() -> None:
    a, b = pair()
    sids = bulk_streams(a, b, GROWING_STREAMS + 1, 16 << 20, trips=8)
    assert grown(b, sids) == [0] * (GROWING_STREAMS + 1)
    assert b.m.window_budget == AUTO_WINDOW_BUDGET


# -- scheduling -----------------------------------------------------------------------


def test_control_frames_first_then_the_queued_streams_share_the_record() -> None:
    a = End("server")
    s1, s2, s3 = a.m.open_stream(), a.m.open_stream(), a.m.open_stream()
    for sid in (s1, s2, s3):
        a.m.send(sid, bytes(120_000))
    a.m.end_stream(s3)
    first, second = a.records()
    frames = FrameDecoder().feed(b"".join(first))
    assert frames[:3] == [fr.OpenFrame(s1), fr.OpenFrame(s2), fr.OpenFrame(s3)]
    opens = 3 * fr.HEADER_SIZE
    turn = (BASE_RECORD_BUDGET - opens) // 3 - fr.HEADER_SIZE  # a third of the room each
    assert [(f.stream_id, len(f.data)) for f in frames[3:] if isinstance(f, fr.DataFrame)] == [
        (s1, turn), (s2, turn), (s3, turn)]
    assert len(frames) == 6
    frames = FrameDecoder().feed(b"".join(second))  # the rest, in the same order
    assert [(f.stream_id, len(f.data)) for f in frames if isinstance(f, fr.DataFrame)] == [
        (s1, 120_000 - turn), (s2, 120_000 - turn), (s3, 120_000 - turn)]
    assert frames[-1] == fr.FinFrame(s3)
    assert all(sum(len(p) for p in r) <= BASE_RECORD_BUDGET for r in (first, second))


def test_with_many_streams_queued_a_turn_is_min_turn() -> None:
    a = End("server")
    streams = [a.m.open_stream() for _ in range(20)]
    a.records()
    for sid in streams:
        a.m.send(sid, bytes(100_000))
    first = a.records()[0]
    frames = FrameDecoder().feed(b"".join(first))
    assert {len(f.data) for f in frames if isinstance(f, fr.DataFrame)} == {DEFAULT_MIN_TURN}
    assert len(frames) == BASE_RECORD_BUDGET // (fr.HEADER_SIZE + DEFAULT_MIN_TURN) == 16
    assert [f.stream_id for f in frames if isinstance(f, fr.DataFrame)] == streams[:16]


@given(reads=st.lists(st.lists(st.integers(1, 600_000), min_size=1, max_size=4),
                     min_size=1, max_size=12),
       credit=st.integers(1, 4 * 1024 * 1024), end=st.booleans(),
       announced=st.none() | st.integers(BASE_RECORD_BUDGET, RECORD_BUDGET),
       rate=st.sampled_from([5e6, 6e7, 2e8]))
@FEW
def test_a_record_stays_within_its_budget_and_holds_whole_frames(
        reads: list[list[int]], credit: int, end: bool, announced: int | None,
        rate: float) -> None:
    """However many streams share the tunnel, however large their reads and
    whatever the rate, a record's frames fit its budget (the resume layer carries
    one record's frames as one message, so an excess would travel as a record of
    its own), which never exceeds what the peer announced (the base if it did
    not); every frame starts and ends in its record; and unless 16 or more streams
    are queued, each queued stream has a frame in every record."""
    a = End("client")
    if announced is not None:
        a.receive(fr.encode_ping(fr.announce_records(announced)))
    # A bulk stream first, its records leaving at ``rate``: the records are sized for it.
    warm = a.m.open_stream()
    a.records()
    state = a.m.stream(warm)
    assert state is not None
    state.credit = 1 << 30
    for _ in range(int(rate * RATE_INTERVAL * 1.1) // len(MIB) + 1):
        a.m.send(warm, MIB)
    while record := a.m.data_to_send(a.now)[0]:
        a.now += sum(len(p) for p in record) / rate
    expected = min(announced or BASE_RECORD_BUDGET, max(BASE_RECORD_BUDGET,
                                                        int(rate * RECORD_TIME)))
    # (An interval ends with a record whose bytes it counts but whose time it does not.)
    assert expected <= a.m.record_budget <= expected * 1.1
    streams = [a.m.open_stream() for _ in reads]
    a.records()
    for sid, sizes in zip(streams, reads, strict=True):
        state = a.m.stream(sid)
        assert state is not None
        state.credit = credit  # as the peer's WINDOW_UPDATEs would give
        for size in sizes:
            a.m.send(sid, bytes(size))
        if end:
            a.m.end_stream(sid)
    sent: dict[int, int] = {}
    fins = set()
    limit = {sid: min(sum(sizes), credit) for sid, sizes in zip(streams, reads, strict=True)}
    while True:
        budget = a.m.record_budget
        assert budget <= (announced or BASE_RECORD_BUDGET)
        record, events = a.m.data_to_send(a.now)
        if not record:
            break
        a.take(events)
        queued = {sid for sid in streams if sent.get(sid, 0) < limit[sid]}
        size = sum(len(p) for p in record)
        a.now += size / rate
        assert size <= budget
        decoder = FrameDecoder()
        carried = set()
        for frame in decoder.feed(b"".join(record)):
            if isinstance(frame, fr.DataFrame):
                sent[frame.stream_id] = sent.get(frame.stream_id, 0) + len(frame.data)
                carried.add(frame.stream_id)
            elif isinstance(frame, fr.FinFrame):
                assert sent.get(frame.stream_id, 0) == limit[frame.stream_id]
                fins.add(frame.stream_id)
        assert decoder.buffered == 0  # no frame cut at the record's end
        if len(queued) < 16:
            assert carried == queued
    for sid, sizes in zip(streams, reads, strict=True):
        assert sent.get(sid, 0) == min(sum(sizes), credit)
    # A FIN follows all of a stream's data (so none while credit holds data back).
    assert fins == {sid for sid, sizes in zip(streams, reads, strict=True)
                    if end and sum(sizes) <= credit}


def test_the_first_record_announces_the_largest_record_we_take() -> None:
    a, b = End("server"), End("client")
    announcement = fr.announce_records(RECORD_BUDGET)
    assert FrameDecoder().feed(a.hello) == [fr.PingFrame(announcement)]
    assert a.m.peer_record_budget == a.m.record_budget == BASE_RECORD_BUDGET
    b.receive(a.hello)
    assert b.m.peer_record_budget == RECORD_BUDGET  # the records still start at the base
    assert b.m.record_budget == BASE_RECORD_BUDGET
    assert b.frames() == [fr.PongFrame(announcement)]  # answered as any PING
    a.receive(fr.encode_pong(announcement), now=3.0)
    assert a.m.rtt is None  # its PONG is no clock
    b.receive(fr.encode_ping(b"\xffxyz" + bytes(4)))  # a later kind: answered, ignored
    assert b.frames() == [fr.PongFrame(b"\xffxyz" + bytes(4))]
    assert b.m.peer_record_budget == RECORD_BUDGET and not b.ended


def bulk_sender(ends: tuple[End, End]) -> tuple[End, End, int, StreamState]:
    """The first end with one stream open and credit to spare (as the peer's
    WINDOW_UPDATEs would give)."""
    a, b = ends
    sid = a.m.open_stream()
    a.records()
    state = a.m.stream(sid)
    assert state is not None
    state.credit = 1 << 30
    return a, b, sid, state


def whole_frame(budget: int) -> int:
    """A lone bulk stream's record under ``budget``: one DATA frame as large as the
    budget allows. The control room left is not filled with a sliver of data."""
    return budget - fr.CONTROL_ROOM + fr.HEADER_SIZE


def bulk(end: End, sid: int, size: int, rate: float) -> list[int]:
    """Queue ``size`` bytes on ``sid`` and send them as a path carrying ``rate``
    bytes a second would let them go: the record sizes."""
    end.m.send(sid, bytes(size))
    sizes = []
    while record := end.m.data_to_send(end.now)[0]:
        for frame in FrameDecoder().feed(b"".join(record)):
            if isinstance(frame, fr.DataFrame):
                assert len(frame.data) <= end.m.peer_record_budget - 1024
        sizes.append(sum(len(p) for p in record))
        end.now += sizes[-1] / rate
    return sizes


def test_records_grow_with_the_rate_once_the_peer_announced() -> None:
    a, b, sid, _state = bulk_sender(pair())
    # 200 MB/s: more than RECORD_BUDGET in RECORD_TIME. Base records until a
    # RATE_INTERVAL has passed, then full ones.
    fast = bulk(a, sid, 32 << 20, 200e6)
    base, full = whole_frame(BASE_RECORD_BUDGET), whole_frame(RECORD_BUDGET)
    first = int(RATE_INTERVAL * 200e6) // base + 1
    assert fast[:first] == [base] * first
    assert fast[first + 1:-1] == [full] * (len(fast) - first - 2)
    # Ten idle seconds say nothing of the path: the next burst keeps the budget.
    a.now += 10.0
    assert bulk(a, sid, 4 << 20, 200e6)[:3] == [full] * 3
    # A path carrying 5 MB/s (what 8 ms carry is less than the base): base records
    # once a RATE_INTERVAL has passed (the second record ends it).
    slow = bulk(a, sid, 8 << 20, 5e6)
    assert slow[:2] == [full] * 2 and max(slow[2:]) == base
    assert a.m.record_budget == BASE_RECORD_BUDGET
    # 60 MB/s: records of what 8 ms carry, 480 KB, between the two budgets.
    between = bulk(a, sid, 16 << 20, 60e6)
    first = int(RATE_INTERVAL * 60e6) // base + 1
    assert between[:first] == [base] * first
    budgets = [size + fr.CONTROL_ROOM - fr.HEADER_SIZE for size in between[first + 1:-1]]
    for budget in [*budgets, a.m.record_budget]:
        assert 480_000 <= budget <= 1.05 * 480_000  # (an interval counts its last record too)
    b.receive(b"".join(b"".join(r) for r in a.records()))  # (nothing left)
    assert not b.ended


def test_a_lone_stream_s_frames_end_where_its_writes_end() -> None:
    """Where only the record's room stops a lone stream, its frame carries whole
    writes (a bulk sender's reads: each then sealed in place, one frame a record
    at the peer), never a write cut to fill the record's rest; a write larger than
    a record is still cut, one frame a record; all of the queue that fits goes at
    once. Every byte goes, in order."""
    a, _b, sid, _state = bulk_sender(pair())
    assert a.m.record_budget == BASE_RECORD_BUDGET
    most = BASE_RECORD_BUDGET - fr.CONTROL_ROOM  # the largest frame
    writes = [bytes([i]) * 100_000 for i in range(5)] + [b"L" * 600_000, b"t" * 100_000]
    for write in writes:
        a.m.send(sid, write)
    records, payloads = [], []
    while record := a.m.data_to_send(a.now)[0]:
        frames = [f for f in FrameDecoder().feed(b"".join(record)) if isinstance(f, fr.DataFrame)]
        records.append([len(f.data) for f in frames])
        payloads += [bytes(f.data) for f in frames]
    assert b"".join(payloads) == b"".join(writes)
    assert records == [[200_000], [200_000], [100_000], [most], [most],
                       [600_000 - 2 * most + 100_000]]


def test_a_bulk_stream_between_two_reads_is_not_idle() -> None:
    """A lone bulk stream's queue empties for a moment between two local reads:
    those gaps count as the path's time, and its records still grow."""
    a, _b, sid, _state = bulk_sender(pair())
    sizes = []
    for _ in range(40):  # 1 MiB reads, each sent at 200 MB/s, 1 ms apart
        sizes += bulk(a, sid, 1 << 20, 200e6)
        a.now += 0.001
    assert a.m.record_budget == RECORD_BUDGET and sizes[-2] == whole_frame(RECORD_BUDGET)


def test_waiting_for_credit_is_the_path_s_time_not_idle_time() -> None:
    """A stream with data but no credit is held back by the peer or the path: that
    time counts, and the records shrink to what the tunnel really carries."""
    a, _b, sid, state = bulk_sender(pair())
    bulk(a, sid, 32 << 20, 200e6)
    assert a.m.record_budget == RECORD_BUDGET
    state.credit = 100_000
    sizes = bulk(a, sid, 4 << 20, 200e6)
    assert sizes == [100_000 + fr.HEADER_SIZE]  # then it waits for credit
    for _ in range(3):
        a.now += 0.5
        a.receive(fr.encode_window_update(sid, 100_000), now=a.now)
        sizes += bulk(a, sid, 0, 200e6)
    assert a.m.record_budget == BASE_RECORD_BUDGET and len(sizes) == 4


def test_a_peer_that_never_announced_gets_base_records_however_fast() -> None:
    """An older peer takes records of BASE_RECORD_BUDGET and DATA of BASE_MAX_PAYLOAD."""
    a, _b, sid, state = bulk_sender((End("server"), End("client")))  # never announced
    sizes = bulk(a, sid, 64 << 20, 1e9)
    assert max(sizes) == whole_frame(BASE_RECORD_BUDGET)
    assert a.m.record_budget == BASE_RECORD_BUDGET
    assert state.bytes_out == 64 << 20  # all of it, in base records


def test_a_fin_that_does_not_fit_starts_the_next_record() -> None:
    a = End("server")
    s1, s2 = a.m.open_stream(), a.m.open_stream()
    a.records()
    a.m.send(s1, bytes(2000))
    room = BASE_RECORD_BUDGET - 2 * fr.HEADER_SIZE - 2000
    a.m.send(s2, bytes(room))  # fills the record to the byte
    a.m.end_stream(s2)
    first, second = a.records()
    assert sum(len(p) for p in first) == BASE_RECORD_BUDGET
    assert FrameDecoder().feed(b"".join(second)) == [fr.FinFrame(s2)]


def test_a_lone_stream_fills_the_record_with_one_frame() -> None:
    a = End("server")
    sid = a.m.open_stream()
    a.records()
    a.m.send(sid, bytes(200_000))
    a.m.send(sid, bytes(100_000))  # two local reads: one frame spans both, without a copy
    (first,) = a.records()  # then the initial credit is used up
    frames = FrameDecoder().feed(b"".join(first))
    assert [len(f.data) for f in frames if isinstance(f, fr.DataFrame)] == [INITIAL_WINDOW]
    assert [len(p) for p in first] == [fr.HEADER_SIZE, 200_000, INITIAL_WINDOW - 200_000]


def test_a_ping_goes_ahead_of_queued_data() -> None:
    a = End("server", keepalive=1.0, dead_after=3.0)
    sid = a.m.open_stream()
    a.records()
    a.m.send(sid, bytes(50_000))
    a.take(a.m.timer(1.0))
    frames = FrameDecoder().feed(b"".join(a.records()[0]))
    assert isinstance(frames[0], fr.PingFrame) and isinstance(frames[1], fr.DataFrame)


def test_writable_again_once_the_queue_falls_below_the_limit() -> None:
    a, b = pair()
    sid = a.m.open_stream()
    assert a.m.send(sid, bytes(STREAM_SEND_BUFFER - 1))
    assert not a.m.send(sid, bytes(10))  # at the limit now: the sender waits
    assert not a.m.writable(sid)
    exchange(a, b)
    assert a.writable == [sid] and a.m.writable(sid)


def test_an_eager_sender_waits_only_when_one_read_is_not_what_filled_the_queue() -> None:
    a, b = pair(window=4 * INITIAL_WINDOW)
    sid = a.m.open_stream()
    exchange(a, b)  # the peer's window grant: credit for more than one read
    assert a.m.send(sid, bytes(STREAM_SEND_BUFFER), eager=True)  # alone at the limit
    exchange(a, b)
    assert a.writable == []  # it never waited: no StreamWritable
    assert a.m.send(sid, bytes(STREAM_SEND_BUFFER), eager=True)
    assert not a.m.send(sid, bytes(10), eager=True)  # a second read before the flush
    exchange(a, b)
    assert a.writable == [sid]
    assert bytes(b.received[sid]) == bytes(2 * STREAM_SEND_BUFFER + 10)


def test_an_eager_sender_without_the_credit_waits() -> None:
    a, b = pair()
    sid = a.m.open_stream()
    b.consume = False  # no credit comes back
    assert a.m.send(sid, bytes(INITIAL_WINDOW), eager=True)  # credit for all of it
    assert a.records()
    assert not a.m.send(sid, bytes(STREAM_SEND_BUFFER), eager=True)  # no credit left
    assert a.writable == []


# -- ends of streams --------------------------------------------------------------


def test_fin_after_queued_data_and_half_close() -> None:
    a, b = pair()
    sid = a.m.open_stream()
    a.m.send(sid, b"request")
    a.m.end_stream(sid)
    with pytest.raises(StreamClosed, match="write after write_eof"):
        a.m.send(sid, b"more")
    assert [type(f) for f in a.frames()] == [fr.OpenFrame, fr.DataFrame, fr.FinFrame]
    b.receive(fr.encode_open(sid) + fr.encode_data(sid, b"request") + fr.encode_fin(sid))
    assert b.eof == [sid] and bytes(b.received[sid]) == b"request"
    b.m.send(sid, b"answer after your FIN")  # the other half still works
    b.m.end_stream(sid)
    exchange(a, b)
    assert bytes(a.received[sid]) == b"answer after your FIN" and a.eof == [sid]
    assert a.done == b.done == [sid] and a.m.open_streams == b.m.open_streams == 0


def test_reset_one_stream_others_unaffected() -> None:
    a, b = pair()
    s1, s2 = a.m.open_stream(), a.m.open_stream()
    exchange(a, b)
    error = a.m.reset_stream(s1, ResetCode.CANCEL, "user gave up")
    assert str(error) == f"stream {s1} was reset: user gave up" and error.code == 0
    assert a.m.stream(s1) is None
    exchange(a, b)
    assert str(b.failed[s1]) == f"stream {s1} was reset by the peer: user gave up"
    b.receive(fr.encode_data(s1, b"late"))  # DATA crossing the RST: dropped quietly
    a.receive(fr.encode_data(s1, b"late"))
    a.m.send(s2, b"still here")
    exchange(a, b)
    assert bytes(b.received[s2]) == b"still here" and not a.ended and not b.ended
    a.m.end_stream(s1)  # no effect on a stream that ended
    a.m.consumed(s1, 10)
    assert not a.m.wants_to_send


def test_a_stream_opened_and_reset_in_one_record_comes_with_its_state() -> None:
    """OPEN and RST of one stream in one record (its unsent data dropped): the
    machine has forgotten the stream by the time a driver reads StreamOpened, so the
    event carries its state."""
    a, b = pair()
    sid = a.m.open_stream()
    a.m.send(sid, b"hello")
    a.m.reset_stream(sid, ResetCode.CANCEL, "gone at once")
    wire = a.wire()
    assert [type(f).__name__ for f in FrameDecoder().feed(wire)] == ["OpenFrame",
                                                                     "ResetFrame"]
    events = b.m.receive(wire, 0.0)
    opened = [e for e in events if isinstance(e, StreamOpened)]
    assert [e.stream_id for e in opened] == [sid] and b.m.stream(sid) is None
    assert opened[0].state.stream_id == sid
    b.take(events)
    assert str(b.failed[sid]) == f"stream {sid} was reset by the peer: gone at once"


def test_over_credit_data_resets_that_stream_with_flow_control() -> None:
    b = End("client")
    b.receive(fr.encode_open(1) + fr.encode_open(3))
    b.consume = False
    b.receive(fr.encode_data(1, bytes(INITIAL_WINDOW)))
    b.receive(fr.encode_data(1, b"x"))  # one byte beyond the credit
    assert b.failed[1].code == ResetCode.FLOW_CONTROL
    assert str(b.failed[1]) == "stream 1 was reset: peer sent 1 bytes with 0 of credit"
    assert b.frames() == [fr.ResetFrame(1, ResetCode.FLOW_CONTROL,
                                        "peer sent 1 bytes with 0 of credit")]
    b.receive(fr.encode_data(3, b"ok"))
    assert bytes(b.received[3]) == b"ok" and not b.ended


def test_too_many_streams() -> None:
    a = End("server", max_streams=2)
    a.receive(fr.encode_open(2) + fr.encode_open(4) + fr.encode_open(6))
    assert a.opened == [2, 4]
    assert a.frames() == [fr.ResetFrame(6, ResetCode.TOO_MANY_STREAMS, "more than 2 open streams")]
    a.receive(fr.encode_data(6, b"dropped"))  # for the refused stream: dropped
    assert 6 not in a.received and not a.ended
    with pytest.raises(TunnelError, match=r"too many open streams \(2\)"):
        a.m.open_stream()


def test_stream_ids_by_role_and_their_end() -> None:
    a, b = pair()
    assert [a.m.open_stream() for _ in range(3)] == [1, 3, 5]
    assert [b.m.open_stream() for _ in range(2)] == [2, 4]
    c = End("client")
    c.m._next_id = fr.MAX_STREAM_ID + 1
    with pytest.raises(TunnelError, match="stream ids exhausted"):
        c.m.open_stream()
    with pytest.raises(ValueError, match="role must be"):
        MuxMachine(role="A")  # type: ignore[arg-type]


# -- services ---------------------------------------------------------------------------


def test_a_sharers_services_are_announced_and_a_stream_names_its_own() -> None:
    sharer = End("server", services=3)
    joiner = End("client")
    assert FrameDecoder().feed(sharer.hello)[:2] == [
        fr.PingFrame(fr.announce_services(3)), fr.PingFrame(fr.announce_records(RECORD_BUDGET))]
    with pytest.raises(TunnelError, match="services are not known yet"):
        joiner.m.open_stream(1)  # an older sharer would take its OPEN for a broken frame
    first = joiner.m.open_stream()  # service 0 needs no announcement
    joiner.receive(sharer.hello)
    assert joiner.peer_services == [3] and joiner.m.peer_services == 3
    third = joiner.m.open_stream(2)
    joiner.m.send(third, b"to the third")
    frames = joiner.frames()
    assert [f for f in frames if isinstance(f, fr.OpenFrame)] == [
        fr.OpenFrame(first), fr.OpenFrame(third, 2)]
    assert frames[-1] == fr.DataFrame(third, b"to the third")
    sharer.receive(joiner.hello + fr.encode_open(first) + fr.encode_open(third, 2)
                   + fr.encode_data(third, b"to the third"))
    assert sharer.opened == [first, third]
    states = [sharer.m.stream(sid) for sid in (first, third)]
    assert [state.service for state in states if state is not None] == [0, 2]
    assert bytes(sharer.received[third]) == b"to the third"
    assert sharer.peer_services == [1]  # the joiner shares nothing: its rec says 1, unused
    with pytest.raises(NoSuchService, match=r"^the sharer shares 3 services: there is no "
                       r"service 4$"):
        joiner.m.open_stream(3)


def test_an_older_sharer_is_known_by_its_record_announcement_alone() -> None:
    older = End("server")  # no services: announces rec only, as before services
    joiner = End("client")
    joiner.receive(older.hello)
    assert joiner.m.peer_services == 1 and joiner.peer_services == [1]
    with pytest.raises(NoSuchService, match=r"^the sharer shares 1 service: there is no "
                       r"service 2$"):
        joiner.m.open_stream(1)
    sid = joiner.m.open_stream()
    assert fr.encode_open(sid) in joiner.wire()  # the empty OPEN older sharers take


def test_a_stream_to_a_service_not_shared_is_refused_and_the_tunnel_goes_on() -> None:
    sharer = End("server", services=2)
    sharer.receive(fr.encode_open(2, 2) + fr.encode_open(4, 1) + fr.encode_data(4, b"ok"))
    assert sharer.opened == [4] and bytes(sharer.received[4]) == b"ok"
    assert sharer.frames()[-1] == fr.ResetFrame(
        2, ResetCode.REFUSED, "the sharer shares 2 services: there is no service 3")
    plain = End("client")  # not a sharer: only service 0 reaches it
    plain.receive(fr.encode_open(1, 1))
    assert plain.opened == [] and not plain.ended
    with pytest.raises(ValueError, match="services must be"):
        MuxMachine(role="server", services=fr.MAX_SERVICES + 1)


# -- a peer that breaks the protocol ----------------------------------------------------


@pytest.mark.parametrize(("wire", "message"), [
    (fr.encode_data(3, b"x"), "DATA for stream 3, which was never opened"),
    (fr.encode_window_update(5, 1), "WINDOW_UPDATE for stream 5, which was never opened"),
    (fr.encode_fin(7), "FIN for stream 7, which was never opened"),
    (fr.encode_data(2, b"x"), "DATA for stream 2, which was never opened"),  # ours, not yet
    (fr.encode_open(2), "the peer opened stream 2, which is one of our ids"),
    (fr.encode_open(3) + fr.encode_open(1), "the peer reopened stream 1"),
    (fr.encode_open(3) + fr.encode_open(3), "the peer reopened stream 3"),
    (fr.encode_open(1) + fr.encode_window_update(1, fr.MAX_INCREMENT),
     "stream 1: credit above 2^31-1"),
    (bytes([99]) + bytes(8), "the peer broke the tunnel protocol: unknown frame type 99"),
    (fr.HEADER.pack(fr.FrameType.DATA, 1, fr.MAX_PAYLOAD + 1),
     "the peer broke the tunnel protocol: DATA frame with a 1044481-byte payload"),
])
def test_protocol_violations_end_the_tunnel(wire: bytes, message: str) -> None:
    b = End("client")
    b.receive(wire)
    assert len(b.ended) == 1
    ended = b.ended[0]
    assert isinstance(ended.error, TunnelProtocolError) and message in str(ended.error)
    assert not ended.graceful and b.m.state == "failed" and b.m.error is ended.error
    b.receive(fr.encode_ping(bytes(8)))  # ignored from now on
    assert b.m.data_to_send(0.0) == ([], []) and len(b.ended) == 1
    with pytest.raises(TunnelProtocolError):
        b.m.open_stream()


def test_a_peer_that_ends_a_stream_twice_or_resets_an_unknown_one_is_tolerated() -> None:
    b = End("client")
    b.receive(fr.encode_open(1) + fr.encode_fin(1) + fr.encode_fin(1) + fr.encode_reset(9, 0))
    assert b.eof == [1] and not b.ended


def test_goaway_closes_cleanly_and_fails_open_streams() -> None:
    a, b = pair()
    sid = a.m.open_stream()
    exchange(a, b)
    a.m.goaway()
    exchange(a, b)
    assert len(b.ended) == 1 and b.ended[0].graceful
    assert isinstance(b.ended[0].error, TunnelClosed)
    assert str(b.ended[0].error) == "the peer closed the tunnel"
    assert b.m.state == "closed" and b.m.error is None and b.m.open_streams == 0
    with pytest.raises(TunnelClosed):
        b.m.open_stream()
    c = End("client")
    c.receive(fr.encode_goaway(0, "shutting down for maintenance"))
    assert str(c.ended[0].error) == "the peer closed the tunnel: shutting down for maintenance"
    assert a.m.stream(sid) is not None and b.m.stream(sid) is None


# -- liveness on an injected clock ---------------------------------------------------


def test_pings_every_keepalive_and_rtt_from_the_pong() -> None:
    a, b = pair(keepalive=15.0, dead_after=45.0)
    assert a.m.next_deadline == 15.0
    a.take(a.m.timer(14.9))
    assert not a.m.wants_to_send
    a.take(a.m.timer(15.0))
    ping = a.frames()
    assert len(ping) == 1 and isinstance(ping[0], fr.PingFrame)
    assert a.m.next_deadline == 30.0
    b.receive(fr.encode_ping(ping[0].opaque), now=15.1)
    assert b.frames() == [fr.PongFrame(ping[0].opaque)]  # echoed unchanged
    a.receive(fr.encode_pong(ping[0].opaque), now=15.25)
    assert a.m.rtt == pytest.approx(0.25)
    for t in (29.9, 30.0, 45.0):
        a.take(a.m.timer(t))
    kinds = [type(f) for f in a.frames()]
    assert kinds == [fr.PingFrame, fr.PingFrame]  # at 30 and 45, not at 29.9
    assert not a.ended  # input at 15.25 moved the dead-peer limit to 60.25


def test_a_silent_peer_is_declared_lost_after_dead_after() -> None:
    a = End("server", keepalive=0.1, dead_after=0.5, now=100.0)
    t = 100.0
    while not a.ended:
        t = a.m.next_deadline or t
        a.take(a.m.timer(t))
    assert t == pytest.approx(100.5)
    error = a.ended[0].error
    assert isinstance(error, PeerLost) and not a.ended[0].graceful
    assert str(error) == ("the peer went silent: nothing received for 0.5 s (limit 0.5 s); "
                          "the peer or the path is gone")
    assert a.m.next_deadline is None
    # Any input keeps it alive.
    b = End("client", keepalive=0.1, dead_after=0.5)
    for step in range(1, 20):
        b.take(b.m.timer(step * 0.3))
        b.receive(fr.encode_pong(bytes(8)), now=step * 0.3)
    assert not b.ended


@pytest.mark.parametrize(("exc", "kind", "message"), [
    (None, PeerLost, "the peer's connection ended without a goodbye"),
    (ConnectionResetError(104, "Connection reset by peer"), PeerLost,
     "the tunnel connection failed: Connection reset by peer"),
    (TunnelClosed("x"), TunnelClosed, "x"),
])
def test_the_channel_ending_ends_the_tunnel(exc: Exception | None, kind: type,
                                            message: str) -> None:
    a = End("server")
    a.m.open_stream()
    a.take(a.m.connection_lost(exc))
    assert isinstance(a.ended[0].error, kind) and message in str(a.ended[0].error)
    assert not a.ended[0].graceful and a.m.open_streams == 0
    a.take(a.m.end(TunnelClosed("again"), graceful=True))
    assert len(a.ended) == 1  # only the first end counts


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="keepalive < dead_after"):
        MuxMachine(role="server", keepalive=10, dead_after=5)
    with pytest.raises(ValueError, match="min_turn"):
        MuxMachine(role="server", min_turn=fr.BASE_MAX_PAYLOAD + 1)
    with pytest.raises(ValueError, match="window"):
        MuxMachine(role="server", window=INITIAL_WINDOW - 1)
    m = MuxMachine(role="server")
    with pytest.raises(TunnelError, match="not started"):
        m.open_stream()
    m.start(0.0)
    with pytest.raises(TunnelError, match="already started"):
        m.start(1.0)
