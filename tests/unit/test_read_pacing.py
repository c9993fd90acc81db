"""The pacing of local bulk reads (nopf_web.tunnel.read_pacing), on numbers alone."""

from __future__ import annotations

from hypothesis import given, strategies as st

from nopf_web.tunnel.read_pacing import BULK_READ, ITERATION_BUDGET, ReadPacer

BULK = 256 * 1024  # one of uvloop's reads of a bulk sender's socket
SMALL = 32  # a keystroke


def test_bulk_readers_without_an_interactive_one_are_never_held() -> None:
    pacer = ReadPacer()
    for _ in range(3):
        for stream_id in (1, 3, 5):
            assert pacer.read(stream_id, BULK)
    assert not pacer.holding


def test_one_bulk_reader_beside_an_interactive_one_is_never_held() -> None:
    pacer = ReadPacer()
    assert pacer.read(7, SMALL)
    for _ in range(3):
        assert pacer.read(1, BULK)
    assert not pacer.holding


def test_bulk_readers_beside_an_interactive_one_are_released_a_budget_at_a_time() -> None:
    pacer = ReadPacer()
    assert pacer.read(21, SMALL)  # the interactive stream
    first = pacer.read(1, BULK)  # the only bulk reader so far
    held = [stream_id for stream_id in range(3, 21, 2) if not pacer.read(stream_id, BULK)]
    assert first and held == list(range(3, 21, 2))
    assert pacer.read(21, SMALL)  # the interactive stream reads on
    turns = []
    while pacer.holding:
        turns.append(pacer.release())
    assert ITERATION_BUDGET == 2 * BULK
    assert [len(turn) for turn in turns] == [2, 2, 2, 2, 1]  # two such reads an iteration
    assert [s for turn in turns for s in turn] == held  # oldest first, each once


def test_a_read_larger_than_the_budget_is_still_released_alone() -> None:
    pacer = ReadPacer(budget=BULK // 2)
    assert pacer.read(9, SMALL)
    assert pacer.read(1, BULK)
    assert not pacer.read(3, BULK)
    assert not pacer.read(1, BULK)
    assert pacer.release() == [3]
    assert pacer.release() == [1]
    assert pacer.release() == []


def test_a_reader_whose_credit_came_back_is_held_only_if_it_reads_bulk() -> None:
    pacer = ReadPacer()
    assert pacer.read(9, SMALL)
    assert pacer.read(1, BULK)
    assert not pacer.read(3, BULK)
    assert pacer.release() == [3]
    assert pacer.hold(1)  # a bulk reader: its turn comes
    assert not pacer.hold(9)  # the interactive one reads at once
    assert not pacer.hold(5)  # a stream that has read nothing yet
    assert pacer.release() == [1]


def test_streams_change_kind_with_their_last_read() -> None:
    pacer = ReadPacer()
    assert pacer.read(5, BULK_READ - 1)  # just under a bulk read: interactive
    assert pacer.read(1, BULK)
    assert not pacer.read(3, BULK_READ)
    assert pacer.release() == [3]
    assert pacer.read(5, BULK)  # 5 turns bulk: nobody is interactive now
    assert pacer.read(3, SMALL)  # 3 turns interactive: 1 and 5 read bulk
    assert not pacer.read(1, BULK)
    assert pacer.release() == [1]


def test_ended_streams_stop_counting() -> None:
    pacer = ReadPacer()
    assert pacer.read(9, SMALL)
    assert pacer.read(1, BULK)
    assert not pacer.read(3, BULK)
    pacer.forget(3)  # 1 is the only bulk reader now
    assert pacer.read(1, BULK)
    assert pacer.release() == [3]  # its held reader is named; the driver finds no stream
    assert not pacer.read(5, BULK)  # with 1, two bulk readers again, and 9 is interactive
    assert pacer.release() == [5]
    pacer.forget(9)  # the interactive stream ended
    assert pacer.read(1, BULK) and pacer.read(5, BULK)
    pacer.clear()
    assert not pacer.holding


@given(st.lists(st.tuples(st.sampled_from([1, 3, 5, 7]),
                          st.sampled_from([SMALL, BULK_READ, BULK, 1 << 20]),
                          st.booleans()),
                max_size=60))
def test_every_held_reader_is_released_within_a_bounded_number_of_iterations(
        reads: list[tuple[int, int, bool]]) -> None:
    """Reads and credit returns in any order: a reader is held at most once at a
    time (the driver's rule: a held reader does not read), and releasing every
    iteration frees them all, each iteration no more than the budget's worth of
    expected reads unless one alone exceeds it."""
    pacer = ReadPacer()
    held: set[int] = set()
    sizes: dict[int, int] = {}
    for stream_id, size, credit in reads:
        if stream_id in held:
            continue
        if credit:
            if pacer.hold(stream_id):
                held.add(stream_id)
            continue
        sizes[stream_id] = size
        if not pacer.read(stream_id, size):
            assert size >= BULK_READ
            held.add(stream_id)
    for _ in range(len(held)):  # at least one a release
        if not held:
            break
        turn = pacer.release()
        assert turn and set(turn) <= held
        assert len(turn) == 1 or sum(sizes[s] for s in turn) <= ITERATION_BUDGET
        held -= set(turn)
    assert not held and not pacer.holding
