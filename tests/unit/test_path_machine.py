"""The coordinated engine's path keeper as a machine: which meetings, when, and what the
event log says (resume after a loss, background upgrade from the relay)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings, strategies as st

from nopf_web.sessions.path_machine import (
    Cancel,
    Meet,
    PathAction,
    PathMachine,
    Report,
    backoff,
)
from nopf_web.tunnel.resume_machine import PathKind


def meets(actions: list[PathAction]) -> list[Meet]:
    return [a for a in actions if isinstance(a, Meet)]


def reports(actions: list[PathAction]) -> list[str]:
    return [a.text for a in actions if isinstance(a, Report)]


def test_backoff_doubles_up_to_the_cap() -> None:
    assert backoff(5) == (5, 10, 20, 30)
    assert backoff(1) == (1, 2, 4, 8, 16, 30)
    assert backoff(45) == (30,)
    with pytest.raises(ValueError):
        backoff(0)


def test_a_direct_tunnel_never_meets_anyone_while_its_path_is_fine() -> None:
    m = PathMachine("public", 0.0, resume_budget=60)
    assert m.next_deadline is None
    assert m.timer(1000.0) == []
    assert m.running is None


def test_a_relayed_tunnel_tries_direct_at_5_10_20_30_30_seconds() -> None:
    m = PathMachine("relay", 100.0, resume_budget=60)
    starts = []
    for i in range(6):
        at = m.next_deadline
        assert at is not None
        assert m.timer(at - 0.01) == []  # not before it is due
        (meet,) = meets(m.timer(at))
        assert (meet.kind, meet.direct_only, meet.deadline) == ("upgrade", True, None)
        assert meet.timeout == 5.0
        starts.append(at)
        assert m.next_deadline is None  # one meeting at a time
        failed = m.met(meet.attempt, at + 2.0,
                       error=f"no connection to port {40000 + i} within 5.{i} s")
        if i == 0:
            assert reports(failed) == ["no direct path yet: no connection to port 40000 "
                                       "within 5.0 s (next try in 8.0 s)"]
        else:
            assert reports(failed) == []  # the same failure (numbers aside) is said once
    gaps = [round(b - a, 6) for a, b in itertools.pairwise(starts)]
    assert starts[0] == 105.0
    assert gaps == [10, 20, 30, 30, 30]


def test_a_failed_upgrade_that_outlasts_its_slot_is_followed_at_once() -> None:
    m = PathMachine("relay", 0.0, resume_budget=60, upgrade_delays=(5, 10))
    (meet,) = meets(m.timer(5.0))
    out = m.met(meet.attempt, 40.0, error="the peer did not resume")  # waited 35 s
    assert reports(out) == ["no direct path yet: the peer did not resume (trying again now)"]
    assert m.next_deadline == 40.0


def test_an_upgrade_that_joined_ends_with_back_to_direct() -> None:
    m = PathMachine("relay", 0.0, resume_budget=60)
    (meet,) = meets(m.timer(5.0))
    # The leader selected the direct path before the meeting's add_path returned.
    out = m.selected("public", "relay", None, 5.3)
    assert reports(out) == ["back to direct (public) after 5.3 s over the relay"]
    assert m.met(meet.attempt, 5.31) == []
    assert m.next_deadline is None and m.kind == "public"
    assert m.timer(100.0) == []


def test_a_loss_resumes_within_the_budget_retrying_every_second() -> None:
    m = PathMachine("public", 0.0, resume_budget=20)
    out = m.lost("public", "nothing arrived for 2.0 s", 2.04, True, 10.0)
    assert reports(out) == [
        "the public path was lost (no answer for 2.0 s); resuming through the rendezvous"]
    assert meets(out) == []
    (meet,) = meets(m.need(10.0))
    assert (meet.kind, meet.direct_only, meet.deadline) == ("resume", False, 30.0)
    assert meet.timeout == 20.0  # what the budget has left (at most 30 s)
    assert m.need(10.1) == []  # the meeting running covers it
    out = m.met(meet.attempt, 10.2, error="rendezvous 198.51.100.2:3012: Connection refused")
    assert reports(out) == ["resume attempt failed: rendezvous 198.51.100.2:3012: "
                            "Connection refused (retrying in 1.0 s)"]
    assert m.next_deadline == pytest.approx(11.2)
    assert m.need(10.5) == []  # NeedPath again (a candidate failed): the retry is due soon
    (again,) = meets(m.timer(11.2))
    assert again.timeout == pytest.approx(18.8) and again.deadline == 30.0
    assert reports(m.met(again.attempt, 11.3, error="rendezvous 198.51.100.2:3012: "
                         "Connection refused")) == []  # said once
    assert m.timer(12.29) == []
    (third,) = meets(m.timer(12.3))
    assert m.met(third.attempt, 13.0) == []  # joined: the leader selects it
    out = m.selected("relay", "public", 3.1, 13.1)
    assert reports(out) == ["resumed over the relay in 3.1 s (3 tries)"]
    # Now relayed: the first try of a direct path 5 s later.
    assert m.next_deadline == pytest.approx(18.1)


def test_a_loss_during_an_upgrade_cancels_it_and_resumes_at_once() -> None:
    m = PathMachine("relay", 0.0, resume_budget=60)
    (up,) = meets(m.timer(5.0))
    out = m.lost("relay", "the connection ended without a goodbye", 0.0, False, 6.0)
    assert reports(out) == ["the relay was lost (the connection ended without a goodbye); "
                            "resuming through the rendezvous"]
    assert Cancel(up.attempt) in out
    assert m.need(6.0) == []  # the upgrade must end first
    (resume,) = meets(m.met(up.attempt, 6.01, cancelled=True))
    assert (resume.kind, resume.direct_only, resume.deadline) == ("resume", False, 66.0)


def test_a_resume_that_ended_on_the_relay_schedules_the_upgrade() -> None:
    m = PathMachine("public", 0.0, resume_budget=60)
    m.lost("public", "x", 1.0, True, 1.0)
    (resume,) = meets(m.need(1.0))
    m.selected("relay", "public", 0.8, 1.8)  # before the meeting's add_path returned
    assert m.next_deadline is None  # the meeting still runs
    assert m.met(resume.attempt, 1.9) == []
    assert m.next_deadline == pytest.approx(6.8)


def test_direct_selected_while_an_upgrade_meets_cancels_it() -> None:
    m = PathMachine("relay", 0.0, resume_budget=60)
    (up,) = meets(m.timer(5.0))
    out = m.selected("lan", "relay", None, 5.5)
    assert Cancel(up.attempt) in out
    assert m.met(up.attempt, 5.6, cancelled=True) == []
    assert m.next_deadline is None


def test_stop_cancels_the_running_meeting_and_starts_nothing_more() -> None:
    m = PathMachine("relay", 0.0, resume_budget=60)
    (up,) = meets(m.timer(5.0))
    assert m.stop() == [Cancel(up.attempt)]
    assert m.met(up.attempt, 5.1, cancelled=True) == []
    assert m.need(6.0) == [] and m.timer(100.0) == [] and m.next_deadline is None
    assert m.stop() == []


KINDS: tuple[PathKind, ...] = ("public", "lan", "relay")
inputs = st.lists(st.tuples(
    st.sampled_from(["selected", "lost", "need", "met_ok", "met_fail", "met_cancel", "timer"]),
    st.sampled_from(KINDS), st.floats(0.0, 40.0)), max_size=60)


@settings(max_examples=300, deadline=None)
@given(first=st.sampled_from(KINDS), steps=inputs)
def test_one_meeting_at_a_time_and_upgrades_only_from_the_relay(
        first: PathKind, steps: list[tuple[str, PathKind, float]]) -> None:
    budget = 60.0
    m = PathMachine(first, 0.0, resume_budget=budget)
    now = 0.0
    running: Meet | None = None
    relay_since: float | None = 0.0 if first == "relay" else None
    last_upgrade: float | None = None
    for name, kind, dt in steps:
        now += dt
        if name == "timer" and m.next_deadline is not None:
            now = max(now, m.next_deadline)
        before = m.kind
        if name == "selected":
            out = m.selected(kind, before, None, now)
            relay_since = now if kind == "relay" else None
            last_upgrade = None
        elif name == "lost":
            if before is None:
                continue
            out = m.lost(before, "why", 1.0, True, now)
            relay_since = None
        elif name == "need":
            out = m.need(now)
            relay_since = None
        elif name.startswith("met"):
            if running is None:
                continue
            out = m.met(running.attempt, now, error="no" if name == "met_fail" else None,
                        cancelled=name == "met_cancel")
            running = None
        else:
            out = m.timer(now)
        for meet in meets(out):
            assert running is None, "two meetings at once"
            running = meet
            assert meet.direct_only == (meet.kind == "upgrade")
            if meet.kind == "upgrade":
                assert m.kind == "relay"
                if last_upgrade is not None:
                    assert now - last_upgrade >= 0
                last_upgrade = now
            else:
                assert m.kind is None and meet.deadline is not None
                assert meet.timeout <= 30.0
        if running is None and m.kind == "relay" and relay_since is not None:
            at = m.next_deadline
            assert at is not None, "a relayed tunnel always has its next direct try"
            assert at - max(now, last_upgrade if last_upgrade is not None else relay_since) \
                <= 30.0 + 1e-9
        if m.kind in ("public", "lan") and running is None:
            assert m.next_deadline is None
