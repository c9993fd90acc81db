"""The relay's rate limit (a token bucket on an injected clock) and the --relay-rate
option's units."""

from __future__ import annotations

import threading

import pytest

from nopf_web.cli.server import describe_rate, parse_rate
from nopf_web.inputs import InputError
from nopf_web.rendezvous.relay import QUANTUM_MIN, TokenBucket
from tests.unit.fake_clock import Clock


def test_the_bucket_grants_a_quantum_at_once_then_the_rate() -> None:
    clock = Clock()
    bucket = TokenBucket(1_000_000, clock=clock)
    stopped = threading.Event()
    assert bucket.quantum == QUANTUM_MIN and bucket.burst == 250_000
    assert bucket.allowance(stopped) == QUANTUM_MIN  # the first read goes at once
    bucket.spend(100_000)  # a read may take more than the balance: a debt
    stopped.set()  # so that a wait returns at once instead of sleeping
    assert bucket.allowance(stopped) == 0  # in debt: it would wait
    clock.now += (100_000 - QUANTUM_MIN) / 1e6 - 0.001  # the debt is nearly paid
    assert bucket.allowance(stopped) == 0
    clock.now += 0.002  # paid: a read of a quantum at least (the debt keeps the rate)
    assert bucket.allowance(stopped) == QUANTUM_MIN
    clock.now += 0.049
    assert bucket.allowance(stopped) == pytest.approx(50_000, abs=1)
    clock.now += 60
    assert bucket.allowance(stopped) == 250_000  # at most the burst after idling


def test_over_any_interval_the_bucket_allows_rate_times_time_plus_one_burst() -> None:
    clock = Clock()
    rate = 2_000_000
    bucket = TokenBucket(rate, clock=clock)
    stopped = threading.Event()
    stopped.set()
    moved = 0
    for step in range(10_000):
        clock.now += 0.0007 * (1 + step % 5)  # reads at uneven times
        if (n := bucket.allowance(stopped)) > 0:
            take = min(n, 64 * 1024)
            bucket.spend(take)
            moved += take
    elapsed = clock.now - 1000.0
    assert rate * elapsed * 0.97 <= moved <= rate * elapsed + bucket.burst + 64 * 1024


def test_a_wait_ends_when_stopped() -> None:
    bucket = TokenBucket(1000)  # the real clock: a debt of 1,000 s
    bucket.spend(bucket.quantum + 1_000_000)
    stopped = threading.Event()
    threading.Timer(0.05, stopped.set).start()
    assert bucket.allowance(stopped) == 0


def test_a_bucket_needs_a_rate() -> None:
    with pytest.raises(ValueError):
        TokenBucket(0)


@pytest.mark.parametrize(("text", "value"), [
    ("0", 0.0), ("1M", 1e6), ("12.5M", 12.5e6), ("500K", 5e5), ("500k", 5e5), ("1Gi", 2**30),
    ("64Ki", 65536), ("3Mi", 3 * 2**20), ("100", 100.0), ("1MB/s", 1e6), ("2 MB", 2e6),
])
def test_rates_with_units(text: str, value: float) -> None:
    assert parse_rate(text) == value


@pytest.mark.parametrize("text", ["", "M", "1.5.2M", "-1M", "1T", "fast", "1e6", "nan"])
def test_bad_rates_name_the_option(text: str) -> None:
    with pytest.raises(InputError, match=r"--relay-rate .* is not a rate") as caught:
        parse_rate(text)
    assert caught.value.field == "--relay-rate"


def test_rates_are_described_for_people() -> None:
    assert [describe_rate(r) for r in (2e6, 12.5e6, 512e3, 1.5e9, 999)] == [
        "2 MB/s", "12.5 MB/s", "512 KB/s", "1.5 GB/s", "999 B/s"]
