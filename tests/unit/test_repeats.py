"""Repeats: a burst of one problem said in a few lines, every message accounted for."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, strategies as st

from nopf_web.repeats import MAX_KINDS, Repeats, kind_of

DOWN = "cannot reach the shared service at 127.0.0.1:80 (nothing is listening there)"


def test_a_burst_is_its_first_line_then_its_count_once_the_interval_has_passed() -> None:
    r = Repeats(every=10.0)
    assert r.feed(DOWN, 0.0) == [DOWN]
    assert [r.feed(DOWN, 0.1 * i) for i in range(1, 30)] == [[]] * 29
    assert r.deadline() == 10.0
    assert r.due(9.9) == []
    assert r.due(10.0) == [f"{DOWN} (29 more like it in the last 10 s)"]
    # Quiet for a whole interval: forgotten, so the next one is said at once.
    assert r.deadline() == 20.0 and r.due(20.0) == [] and r.deadline() is None
    assert r.feed(DOWN, 21.0) == [DOWN]


def test_stream_ids_do_not_make_a_problem_new_and_the_last_one_is_said() -> None:
    r = Repeats(every=10.0)
    assert r.feed("stream 2 was reset by the peer: refused", 0.0) == [
        "stream 2 was reset by the peer: refused"]
    assert r.feed("stream 4 was reset by the peer: refused", 1.0) == []
    assert r.feed("stream 6 was reset by the peer: refused", 2.0) == []
    assert r.feed("stream 8 was reset by the peer: timed out", 3.0) == [
        "stream 8 was reset by the peer: timed out"]  # another problem
    assert r.flush(4.0) == ["stream 6 was reset by the peer: refused (2 more like it in the "
                            "last 4 s)"]
    assert r.deadline() is None and r.flush(5.0) == []
    assert kind_of("streams 3 and stream 12") == "streams 3 and stream"


def test_a_count_not_asked_for_in_time_comes_before_the_next_message() -> None:
    r = Repeats(every=10.0)
    r.feed(DOWN, 0.0)
    r.feed(DOWN, 1.0)
    assert r.feed(DOWN, 15.0) == [f"{DOWN} (1 more like it in the last 15 s)", DOWN]


def test_kinds_beyond_the_limit_say_the_oldest_count_and_forget_it() -> None:
    r = Repeats(every=10.0)
    r.feed("problem 0", 0.0)
    r.feed("problem 0", 0.5)
    for i in range(1, MAX_KINDS):
        assert r.feed(f"problem {i}", 1.0) == [f"problem {i}"]
    assert r.feed("one too many", 2.0) == ["problem 0 (1 more like it in the last 2 s)",
                                           "one too many"]
    assert r.feed("problem 0", 3.0) == ["problem 0"]  # forgotten: new again


def test_the_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        Repeats(every=0)


_COUNTED = re.compile(r" \((\d+) more like it in the last \d+ s\)$")


@given(st.lists(st.tuples(st.sampled_from(["a", "b", "stream 1 c", "stream 2 c"]),
                          st.floats(min_value=0, max_value=30, allow_nan=False),
                          st.booleans()),
                max_size=200))
def test_every_message_is_said_or_counted_and_a_kind_speaks_at_most_twice_an_interval(
        feeds: list[tuple[str, float, bool]]) -> None:
    """Whatever the order of messages and calls to ``due``: each message is said at
    once or counted in one count line, and before the final flush no kind says more
    than two lines (a count and a new first) in any interval."""
    r, now, said = Repeats(every=5.0), 0.0, []
    for message, step, ask in feeds:
        now += step
        if ask:
            said += [(now, line) for line in r.due(now)]
        said += [(now, line) for line in r.feed(message, now)]
    flushed = r.flush(now)
    counts = [int(m.group(1)) for _at, line in said + [(now, x) for x in flushed]
              if (m := _COUNTED.search(line))]
    firsts = [line for _at, line in said if not _COUNTED.search(line)]
    assert len(firsts) + sum(counts) == len(feeds)
    for kind in {kind_of(message) for message, _step, _ask in feeds}:
        times = [at for at, line in said if kind_of(_COUNTED.sub("", line)) == kind]
        for i, at in enumerate(times):
            assert sum(1 for t in times[i:] if t < at + 5.0) <= 2, (kind, times)
