"""Circuit breaker, latency window and tier counters (esper_assets.storage.cache.resilience).

Covers: CircuitBreaker driven by a fake clock (closed -> open after the threshold
of consecutive failures, no calls while open, exactly one probe once half-open,
the probe's success closing and its failure reopening the breaker, trip count
and last error); LatencyWindow percentiles and its bounded window; TierStats
counters staying exact under threads.
"""

from __future__ import annotations

import random
import threading

import pytest

from esper_assets.storage.cache.resilience import (
    CLOSED,
    HALF_OPEN,
    OPEN,
    CircuitBreaker,
    LatencyWindow,
    TierStats,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def open_breaker(clock: FakeClock, threshold: int = 3, reset_after_s: float = 5.0):
    breaker = CircuitBreaker(failure_threshold=threshold, reset_after_s=reset_after_s, clock=clock)
    for _ in range(threshold):
        breaker.failure("connection refused")
    assert breaker.state == OPEN
    return breaker


# -- CircuitBreaker -------------------------------------------------------------------------
def test_new_breaker_is_closed_and_allows(clock):
    breaker = CircuitBreaker(clock=clock)
    assert breaker.state == CLOSED
    assert breaker.allow()
    assert breaker.trips == 0


def test_opens_after_threshold_failures(clock):
    breaker = CircuitBreaker(failure_threshold=3, reset_after_s=5, clock=clock)
    breaker.failure("e1")
    breaker.failure("e2")
    assert breaker.state == CLOSED
    assert breaker.allow()
    breaker.failure(TimeoutError("e3"))
    assert breaker.state == OPEN
    assert breaker.trips == 1
    assert breaker.last_error == "e3"


def test_only_consecutive_failures_count(clock):
    breaker = CircuitBreaker(failure_threshold=3, clock=clock)
    for _ in range(5):
        breaker.failure("flaky")
        breaker.failure("flaky")
        breaker.success()
    assert breaker.state == CLOSED


def test_threshold_below_one_means_one(clock):
    breaker = CircuitBreaker(failure_threshold=0, clock=clock)
    breaker.failure("boom")
    assert breaker.state == OPEN


def test_open_breaker_refuses_until_reset_time(clock):
    breaker = open_breaker(clock, reset_after_s=5)
    assert not breaker.allow()
    clock.advance(4.999)
    assert not breaker.allow()
    assert breaker.state == OPEN


def test_one_probe_allowed_after_reset_time(clock):
    breaker = open_breaker(clock, reset_after_s=5)
    clock.advance(5)
    assert breaker.allow() is True
    assert breaker.state == HALF_OPEN
    assert [breaker.allow() for _ in range(10)] == [False] * 10  # the probe is still out


def test_probe_success_closes_breaker(clock):
    breaker = open_breaker(clock, reset_after_s=5)
    clock.advance(5)
    assert breaker.allow()
    breaker.success()
    assert breaker.state == CLOSED
    assert all(breaker.allow() for _ in range(3))
    breaker.failure("one failure after recovery")
    assert breaker.state == CLOSED  # the failure count restarted from zero


def test_probe_failure_reopens_for_another_reset_period(clock):
    breaker = open_breaker(clock, reset_after_s=5)
    clock.advance(5)
    assert breaker.allow()
    breaker.failure("still down")
    assert breaker.state == OPEN
    assert breaker.trips == 2
    assert breaker.last_error == "still down"
    clock.advance(4)
    assert not breaker.allow()
    clock.advance(1)
    assert breaker.allow()
    assert breaker.state == HALF_OPEN


def test_half_open_reopens_after_a_single_failure_even_with_high_threshold(clock):
    breaker = open_breaker(clock, threshold=5, reset_after_s=1)
    clock.advance(1)
    breaker.allow()
    breaker.failure("probe failed")
    assert breaker.state == OPEN


def test_only_one_of_many_threads_gets_the_probe(clock):
    breaker = open_breaker(clock, reset_after_s=1)
    clock.advance(1)
    barrier = threading.Barrier(16)
    allowed: list[bool] = []

    def race() -> None:
        barrier.wait()
        allowed.append(breaker.allow())

    threads = [threading.Thread(target=race) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert allowed.count(True) == 1


# -- LatencyWindow -------------------------------------------------------------------------
def test_empty_window_has_no_percentiles():
    assert LatencyWindow().percentiles_us() == {"p50_us": None, "p99_us": None}


def test_single_sample():
    window = LatencyWindow()
    window.record(0.000250)
    assert window.percentiles_us() == {"p50_us": 250.0, "p99_us": 250.0}


def test_percentiles_of_a_skewed_distribution():
    window = LatencyWindow()
    samples = [10e-6] * 98 + [5e-3] * 2  # 2% slow calls
    random.Random(1).shuffle(samples)
    for s in samples:
        window.record(s)
    assert window.percentiles_us() == {"p50_us": 10.0, "p99_us": 5000.0}


def test_percentiles_of_a_uniform_distribution():
    window = LatencyWindow()
    samples = [i * 1e-6 for i in range(1, 1001)]  # 1..1000 us
    random.Random(2).shuffle(samples)
    for s in samples:
        window.record(s)
    result = window.percentiles_us()
    assert result["p50_us"] == pytest.approx(500, abs=1.01)
    assert result["p99_us"] == pytest.approx(990, abs=1.01)


def test_window_keeps_only_the_last_size_samples():
    window = LatencyWindow(size=4)
    for s in [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]:  # old slow samples
        window.record(s)
    for s in [1e-6, 2e-6, 3e-6, 4e-6]:
        window.record(s)
    assert window.percentiles_us() == {"p50_us": 3.0, "p99_us": 4.0}


# -- TierStats --------------------------------------------------------------------------------
def test_tier_stats_snapshot_has_every_counter_and_latency():
    stats = TierStats()
    stats.add("hits")
    stats.add("misses", 3)
    stats.latency.record(0.001)
    snap = stats.snapshot()
    assert set(snap) == set(TierStats.FIELDS) | {"p50_us", "p99_us"}
    assert (snap["hits"], snap["misses"], snap["errors"]) == (1, 3, 0)
    assert snap["p50_us"] == 1000.0


def test_tier_stats_rejects_unknown_counter():
    with pytest.raises(KeyError):
        TierStats().add("hitz")


def test_tier_stats_counts_are_exact_under_threads():
    stats = TierStats()
    per_thread = 5000

    def work() -> None:
        for _ in range(per_thread):
            stats.add("hits")
            stats.add("writes", 2)
            stats.latency.record(1e-4)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = stats.snapshot()
    assert snap["hits"] == 8 * per_thread
    assert snap["writes"] == 16 * per_thread
    assert snap["p50_us"] == 100.0
