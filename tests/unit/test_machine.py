"""The punch state machine, driven by events and a fake clock."""

from __future__ import annotations

import functools
import itertools

import pytest
from hypothesis import given, settings, strategies as st

from nopf_web.punch.machine import (
    ACCEPTED,
    Abandon,
    Failure,
    GiveUp,
    PunchConfig,
    PunchMachine,
    StartAttempt,
    Succeed,
    Tactic,
)

CFG = PunchConfig(timeout=10, arm_ttl=2, rearm_interval=0.8, connect_interval=0.5,
                  retry_delay=0.2)


def machine(role: Tactic, cfg: PunchConfig = CFG) -> PunchMachine:
    # rand 0.5: the retry jitter's midpoint, so delays are exactly retry_delay.
    return PunchMachine(role, cfg, "203.0.113.2:4000", rand=lambda: 0.5)


def test_arm_fires_low_ttl_and_rearms_before_the_kernel_retransmits() -> None:
    m = machine(Tactic.ARM)
    assert m.start(0.0) == [StartAttempt(1, 2)]
    assert m.wake_at == pytest.approx(0.8)
    assert m.timer(0.5) == []
    # At 0.8 s (< the kernel's 1 s SYN RTO) the socket is replaced by a fresh low-TTL one.
    assert m.timer(0.8) == [Abandon(1), StartAttempt(2, 2)]
    assert m.outcomes[Failure.SILENT] == 1


def test_connect_fires_full_ttl() -> None:
    m = machine(Tactic.CONNECT)
    assert m.start(0.0) == [StartAttempt(1, None)]
    assert m.timer(0.5) == [Abandon(1), StartAttempt(2, None)]


def test_arm_ttl_zero_means_full_ttl() -> None:
    m = machine(Tactic.ARM, PunchConfig(arm_ttl=0))
    assert m.start(0.0) == [StartAttempt(1, None)]


def test_refusal_retries_after_delay() -> None:
    m = machine(Tactic.CONNECT)
    m.start(0.0)
    assert m.failed(1, Failure.REFUSED, 0.01) == [Abandon(1)]
    assert m.wake_at == pytest.approx(0.21)
    assert m.timer(0.1) == []
    assert m.timer(m.wake_at or 0) == [StartAttempt(2, None)]


def test_stale_events_are_ignored() -> None:
    m = machine(Tactic.CONNECT)
    m.start(0.0)
    m.timer(0.5)  # attempt 1 replaced by 2
    assert m.failed(1, Failure.REFUSED, 0.6) == []
    assert m.connected(1, 0.6) == []
    assert m.connected(2, 0.7) == [Succeed(2)]
    assert m.done and m.wake_at is None
    assert m.timer(100) == []


def test_handshake_in_progress_is_not_abandoned() -> None:
    m = machine(Tactic.ARM)
    m.start(0.0)
    assert m.timer(0.8, handshaking=True) == []
    assert m.wake_at == pytest.approx(1.0)
    assert m.connected(1, 0.9) == [Succeed(1)]


def test_listener_acceptance_abandons_the_current_attempt() -> None:
    m = machine(Tactic.ARM)
    m.start(0.0)
    assert m.accepted(0.3) == [Abandon(1), Succeed(ACCEPTED)]


def test_deadline_gives_up_with_a_cause() -> None:
    m = machine(Tactic.CONNECT)
    m.start(0.0)
    t = 0.0
    attempt = 1
    while True:
        t += 0.05
        m.failed(attempt, Failure.REFUSED, t)
        t += 0.2
        actions = m.timer(t)
        if any(isinstance(a, GiveUp) for a in actions):
            break
        assert actions == [StartAttempt(attempt + 1, None)]
        attempt += 1
    give_up = actions[-1]
    assert isinstance(give_up, GiveUp)
    assert t >= 10
    text = str(give_up.error)
    assert "within 10 s" in text and "refused with RST" in text and "203.0.113.2:4000" in text
    assert give_up.error.outcomes[Failure.REFUSED] == attempt


def test_silent_timeout_names_symmetric_nat() -> None:
    m = PunchMachine(Tactic.ARM, CFG, "203.0.113.2:4000", nat_hint="our NAT changed the port")
    m.start(0.0)
    t = 0.0
    while not m.done:
        t = m.wake_at or t
        actions = m.timer(t)
    assert isinstance(actions[-1], GiveUp)
    assert isinstance(actions[0], Abandon)
    text = str(actions[-1].error)
    assert "symmetric" in text and "our NAT changed the port" in text


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        PunchConfig(timeout=0)
    with pytest.raises(ValueError):
        PunchConfig(arm_ttl=1)


def test_first_shot_reaches_the_peer_in_both_roles_then_the_seed_sequence() -> None:
    cfg = PunchConfig(timeout=10, arm_ttl=2, rearm_interval=0.8, first_shot=True)
    arm = machine(Tactic.ARM, cfg)
    assert arm.start(0.0) == [StartAttempt(1, None)]  # the rendezvous-timed simultaneous open
    assert arm.timer(0.8) == [Abandon(1), StartAttempt(2, 2)]  # then low-TTL arming as before
    connect = machine(Tactic.CONNECT, cfg)
    # TTL 32 crosses any NAT within 31 hops and stays below the TTL of the
    # sharer's packets (64 minus the hops), so the driver can have the kernel
    # ignore a refusal of it by the sharer's NAT (IP_MINTTL 33).
    assert connect.start(0.0) == [StartAttempt(1, 32)]
    assert connect.failed(1, Failure.REFUSED, 0.05) == [Abandon(1)]
    assert connect.timer(0.25) == [StartAttempt(2, None)]


def test_first_shot_ttl_is_configurable_and_checked() -> None:
    cfg = PunchConfig(timeout=10, first_shot=True, first_shot_ttl=20)
    assert machine(Tactic.CONNECT, cfg).start(0.0) == [StartAttempt(1, 20)]
    # Without first_shot the CONNECT role's first SYN keeps the system default.
    plain = machine(Tactic.CONNECT, PunchConfig(first_shot_ttl=20))
    assert plain.start(0.0) == [StartAttempt(1, None)]
    for bad in (0, 1, 255):
        with pytest.raises(ValueError):
            PunchConfig(first_shot_ttl=bad)


def test_first_shot_refused_falls_back_to_arming_at_once() -> None:
    # No moment without a socket in SYN_SENT: the peer's next SYN would meet the
    # listener (a SYN-ACK our NAT drops) or our kernel's RST.
    for how in (Failure.REFUSED, Failure.UNREACHABLE):
        m = machine(Tactic.ARM, PunchConfig(timeout=10, first_shot=True))
        m.start(0.0)
        assert m.failed(1, how, 0.03) == [Abandon(1), StartAttempt(2, 2)]
        assert m.wake_at == pytest.approx(0.03 + 0.8)


def test_only_the_first_shot_rearms_at_once() -> None:
    # A later refusal (or one without low-TTL arming, whose SYNs all reach the
    # peer's NAT) waits retry_delay: no storm of refused SYNs.
    m = machine(Tactic.ARM, PunchConfig(timeout=10, first_shot=True, retry_delay=0.2))
    m.start(0.0)
    m.failed(1, Failure.REFUSED, 0.03)
    assert m.failed(2, Failure.REFUSED, 0.05) == [Abandon(2)]
    assert m.wake_at == pytest.approx(0.25)
    plain = machine(Tactic.ARM, PunchConfig(timeout=10, first_shot=True, arm_ttl=0,
                                            retry_delay=0.2))
    plain.start(0.0)
    assert plain.failed(1, Failure.REFUSED, 0.03) == [Abandon(1)]
    assert plain.wake_at == pytest.approx(0.23)
    seed = machine(Tactic.ARM, PunchConfig(timeout=10, retry_delay=0.2))
    seed.start(0.0)
    assert seed.failed(1, Failure.UNREACHABLE, 0.03) == [Abandon(1)]
    assert seed.wake_at == pytest.approx(0.23)


def test_a_refused_first_shot_is_retried_soon() -> None:
    # The sharer fires a few ms after the joiner; at a near-zero round trip the
    # joiner's first shot beat the sharer's SYN and was refused: try again once the
    # sharer has surely armed, not retry_delay later. A silent one is not retried early.
    cfg = PunchConfig(timeout=10, first_shot=True, first_retry_delay=0.03, retry_delay=0.2)
    for how in (Failure.REFUSED, Failure.UNREACHABLE):
        m = machine(Tactic.CONNECT, cfg)
        m.start(0.0)
        assert m.failed(1, how, 0.001) == [Abandon(1)]
        assert m.wake_at == pytest.approx(0.031)
        assert m.timer(0.031) == [StartAttempt(2, None)]
        # The second refusal is an ordinary one.
        assert m.failed(2, how, 0.032) == [Abandon(2)]
        assert m.wake_at == pytest.approx(0.232)
    plain = machine(Tactic.CONNECT, PunchConfig(timeout=10, retry_delay=0.2))
    plain.start(0.0)
    plain.failed(1, Failure.REFUSED, 0.001)
    assert plain.wake_at == pytest.approx(0.201)
    with pytest.raises(ValueError):
        PunchConfig(first_retry_delay=-0.1)


def test_retry_delay_is_jittered_within_bounds() -> None:
    for r, expected in ((0.0, 0.15), (0.999999, 0.25)):
        m = PunchMachine(Tactic.CONNECT, CFG, "203.0.113.2:4000", rand=functools.partial(float, r))
        m.start(0.0)
        m.failed(1, Failure.REFUSED, 1.0)
        assert m.wake_at == pytest.approx(1.0 + expected, abs=1e-4)


def test_a_socket_stuck_mid_handshake_is_abandoned_after_the_limit() -> None:
    m = machine(Tactic.ARM)
    m.start(0.0)
    t = 0.8
    while not (actions := m.timer(t, handshaking=True)):
        t = m.wake_at or t
    assert actions == [Abandon(1), StartAttempt(2, 2)]
    assert t >= 0.8 + CFG.handshake_limit


_EVENT = st.tuples(st.sampled_from(["refused", "unreachable", "silent", "timer"]),
                   st.floats(min_value=0.0, max_value=0.3))


def test_a_clipped_arming_attempt_gets_a_grace_then_is_reset_and_rearmed() -> None:
    m = machine(Tactic.ARM)
    m.start(0.0)
    # Mid-handshake as the arming TTL was restored: our SYN-ACK may have expired.
    assert m.clipped(1, 0.001) == []
    assert m.wake_at == pytest.approx(0.301)  # clip_grace (0.3 s)
    assert m.timer(0.2, handshaking=True) == []
    # Still half-open after the grace: no ACK came, the SYN-ACK expired.
    assert m.timer(0.301, handshaking=True) == [Abandon(1, clipped=True), StartAttempt(2, 2)]
    assert m.outcomes[Failure.CLIPPED] == 1
    assert m.wake_at == pytest.approx(1.101)  # the new arm's own re-arm time
    assert m.clipped(1, 0.4) == []  # stale: attempt 1 is gone


def test_a_clipped_suspect_that_completes_is_a_success() -> None:
    m = machine(Tactic.ARM)
    m.start(0.0)
    assert m.clipped(1, 0.001) == []
    # The SYN-ACK had left after the restore, at full TTL: the ACK came back.
    assert m.connected(1, 0.002) == [Succeed(1)]
    assert m.outcomes[Failure.CLIPPED] == 0 and m.wake_at is None


def test_a_clipped_suspect_no_longer_mid_handshake_keeps_its_schedule() -> None:
    m = machine(Tactic.ARM)
    m.start(0.0)
    assert m.clipped(1, 0.001) == []
    # At the grace's end the socket is not half-open (its outcome is on its way):
    # nothing happens until its own re-arm time.
    assert m.timer(0.301, handshaking=False) == []
    assert m.wake_at == pytest.approx(0.8)
    assert m.timer(0.8) == [Abandon(1), StartAttempt(2, 2)]
    assert m.outcomes[Failure.CLIPPED] == 0


def test_clip_grace_is_checked() -> None:
    with pytest.raises(ValueError, match="clip grace"):
        PunchConfig(clip_grace=0)


@pytest.mark.parametrize(("tactic", "cfg"), [
    (Tactic.ARM, PunchConfig(timeout=10, arm_ttl=0)),  # full-TTL SYNs: the SYN-ACK arrives
    (Tactic.ARM, PunchConfig(timeout=10, first_shot=True)),  # the first shot: full TTL
    (Tactic.CONNECT, PunchConfig(timeout=10, first_shot=True)),  # TTL 32 reaches the peer
])
def test_only_an_arming_ttl_clips(tactic: Tactic, cfg: PunchConfig) -> None:
    m = machine(tactic, cfg)
    m.start(0.0)
    assert m.clipped(1, 0.001) == []
    assert m.outcomes[Failure.CLIPPED] == 0 and m.attempts == 1


def test_a_clipped_rearm_after_the_first_shot_counts() -> None:
    m = machine(Tactic.ARM, PunchConfig(timeout=10, first_shot=True, arm_ttl=2))
    m.start(0.0)
    assert m.timer(0.8) == [Abandon(1), StartAttempt(2, 2)]
    assert m.clipped(2, 0.8001) == []
    assert m.timer(1.1001, handshaking=True) == [Abandon(2, clipped=True), StartAttempt(3, 2)]


def test_clipped_after_the_end_does_nothing() -> None:
    m = machine(Tactic.ARM)
    m.start(0.0)
    assert m.connected(1, 0.1) == [Succeed(1)]
    assert m.clipped(1, 0.2) == []


@settings(max_examples=300, deadline=None)
@given(tactic=st.sampled_from(list(Tactic)), arm_ttl=st.sampled_from([0, 2]),
       first_shot=st.booleans(), events=st.lists(_EVENT, max_size=40))
def test_no_storm_of_syns_that_reach_the_peer(tactic: Tactic, arm_ttl: int, first_shot: bool,
                                                events: list[tuple[str, float]]) -> None:
    """Whatever comes back and when: at most one attempt starts the moment another
    ends (the first shot's re-arm), and SYNs that can reach the peer's NAT (any but a
    low-TTL arming one) leave at least first_retry_delay apart."""
    cfg = PunchConfig(timeout=10, arm_ttl=arm_ttl, first_shot=first_shot,
                      first_retry_delay=0.03, retry_delay=0.2, retry_jitter=0.5)
    m = PunchMachine(tactic, cfg, "203.0.113.2:4000", rand=lambda: 0.0)
    now = 0.0
    starts: list[tuple[float, int | None]] = []
    instant = 0

    def record(actions: list[object], *, after_failure: bool) -> None:
        nonlocal instant
        new = [a for a in actions if isinstance(a, StartAttempt)]
        if after_failure and new:
            instant += 1
        starts.extend((now, a.ttl) for a in new)

    record(list(m.start(now)), after_failure=False)
    hows = {"refused": Failure.REFUSED, "unreachable": Failure.UNREACHABLE,
            "silent": Failure.SILENT}
    for kind, dt in events:
        now += dt
        if kind == "timer" or m._current is None:
            record(list(m.timer(now)), after_failure=False)
        else:
            record(list(m.failed(m.attempts, hows[kind], now)), after_failure=True)
        if m.done:
            break
    assert instant <= 1
    reaching = [t for t, ttl in starts if not (arm_ttl and ttl == arm_ttl)]
    assert all(b - a >= 0.03 - 1e-9 for a, b in itertools.pairwise(reaching))
