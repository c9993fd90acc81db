"""Happy Eyeballs (RFC 8305) order and stagger, on the pure machine."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from nopf_web.happy_eyeballs_machine import (
    AllFailed,
    CancelAttempt,
    HappyEyeballs,
    StartAttempt,
    Won,
    interleave,
)

V6A, V6B = ("2001:db8::1", 3012), ("2001:db8::2", 3012)
V4A, V4B, V4C = ("198.51.100.2", 3012), ("198.51.100.3", 3012), ("198.51.100.4", 3012)


def test_order_interleaves_families_ipv6_first() -> None:
    assert interleave([V4A, V4B, V4C, V6A, V6B]) == [V6A, V4A, V6B, V4B, V4C]
    assert interleave([V4A, V4A, V4B]) == [V4A, V4B]  # duplicates dropped
    assert interleave([V6B, V6A]) == [V6B, V6A]  # the resolver's order within a family


def test_a_preferred_family_goes_first_and_may_try_several_before_the_other() -> None:
    # The coordinated peer prefers IPv4 (its IPv4 mapping is what its punch needs).
    assert interleave([V6A, V6B, V4A, V4B], first=4) == [V4A, V6A, V4B, V6B]
    assert interleave([V6A, V6B, V4A, V4B, V4C], first=4, first_count=3) == [
        V4A, V4B, V4C, V6A, V6B]
    assert interleave([V6A, V4A], first=4, first_count=5) == [V4A, V6A]
    assert interleave([V6A, V6B], first=4) == [V6A, V6B]  # none of it: the other family
    assert interleave([V4A, V6A, V6B, V4B], first_count=2) == [V6A, V6B, V4A, V4B]


def test_ipv6_follows_every_ipv4_attempt_by_the_stagger_or_at_once_on_failures() -> None:
    he = HappyEyeballs([V6A, V4A, V4B], first=4, first_count=2)
    assert he.start(0.0) == [StartAttempt(0, V4A)]
    assert he.timer(0.25) == [StartAttempt(1, V4B)]  # the first IPv4 is silent
    assert he.failed(1, "connection refused", 0.3) == [StartAttempt(2, V6A)]
    assert he.connected(2, 0.31) == [CancelAttempt(0), Won(2, V6A)]
    # A host without an IPv4 route: its attempts fail at once, IPv6 starts at once.
    he = HappyEyeballs([V6A, V4A], first=4)
    he.start(0.0)
    assert he.failed(0, "network unreachable", 0.0) == [StartAttempt(1, V6A)]


def test_a_failure_names_each_address_with_ipv6_in_brackets() -> None:
    failed = AllFailed(((V6A, "connection refused"), (V4A, "timed out")))
    assert failed.message == ("[2001:db8::1]:3012: connection refused; "
                              "198.51.100.2:3012: timed out")


def test_next_attempt_after_250_ms_and_the_first_to_connect_wins() -> None:
    he = HappyEyeballs([V4A, V6A, V4B])
    assert he.start(10.0) == [StartAttempt(0, V6A)]
    assert he.wake_at == pytest.approx(10.25)
    assert he.timer(10.2) == []
    assert he.timer(10.25) == [StartAttempt(1, V4A)]
    # The first attempt (still running) connects: the second is cancelled.
    assert he.connected(0, 10.3) == [CancelAttempt(1), Won(0, V6A)]
    assert he.done and he.wake_at is None
    assert he.timer(11.0) == [] and he.failed(1, "late", 11.0) == []


def test_a_failure_starts_the_next_at_once_and_all_failing_lists_each() -> None:
    he = HappyEyeballs([V6A, V4A])
    he.start(0.0)
    assert he.failed(0, "network unreachable", 0.01) == [StartAttempt(1, V4A)]
    assert he.wake_at is None  # nothing left to stagger
    [failed] = he.failed(1, "connection refused", 0.02)
    assert isinstance(failed, AllFailed)
    assert failed.message == ("[2001:db8::1]:3012: network unreachable; "
                              "198.51.100.2:3012: connection refused")


def test_a_late_winner_after_earlier_failures() -> None:
    he = HappyEyeballs([V6A, V4A, V6B])
    he.start(0.0)
    he.timer(0.25)  # attempt 1 (V4A)
    assert he.failed(0, "timed out", 0.3) == [StartAttempt(2, V6B)]
    assert he.connected(2, 0.31) == [CancelAttempt(1), Won(2, V6B)]


def test_no_address_is_an_error() -> None:
    with pytest.raises(ValueError, match="no address"):
        HappyEyeballs([])


@given(st.lists(st.sampled_from([V6A, V6B, V4A, V4B, V4C]), min_size=1, max_size=5),
       st.lists(st.sampled_from(["fail", "tick", "win"]), max_size=12),
       st.sampled_from([4, 6]), st.integers(0, 4))
def test_every_address_is_tried_at_most_once_and_one_outcome(
        addresses: list[tuple[str, int]], script: list[str], first: int, count: int) -> None:
    he = HappyEyeballs(addresses, first=first, first_count=count)  # type: ignore[arg-type]
    assert sorted(he.addresses) == sorted(set(addresses))  # each once, none lost
    if any((":" in a[0]) == (first == 6) for a in addresses):
        assert (":" in he.addresses[0][0]) == (first == 6)  # the preferred family first
    started: list[int] = []
    running: list[int] = []
    outcomes = 0
    now = 0.0
    actions = he.start(now)
    for step in [*script, *["fail"] * 6]:
        for action in actions:
            if isinstance(action, StartAttempt):
                started.append(action.index)
                running.append(action.index)
            elif isinstance(action, CancelAttempt):
                running.remove(action.index)
            elif isinstance(action, Won | AllFailed):
                outcomes += 1
        if he.done:
            break
        now += 0.1
        if step == "tick" or not running:
            actions = he.timer(he.wake_at or now)
        elif step == "fail":
            actions = he.failed(running.pop(0), "refused", now)
        else:
            actions = he.connected(running.pop(0), now)
    assert sorted(started) == sorted(set(started))  # no address twice
    assert outcomes <= 1 and (outcomes == 1) == he.done
