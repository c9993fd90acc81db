"""The punch state machine, driven by events and a fake clock."""

from __future__ import annotations

import functools

import pytest

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


def test_first_shot_refused_falls_back_to_arming_quickly() -> None:
    m = machine(Tactic.ARM, PunchConfig(timeout=10, first_shot=True))
    m.start(0.0)
    assert m.failed(1, Failure.REFUSED, 0.03) == [Abandon(1)]
    assert m.timer(0.23) == [StartAttempt(2, 2)]


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
