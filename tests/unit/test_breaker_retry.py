"""Backoff and circuit breaker: pure state machines driven by a fake clock."""

from __future__ import annotations

import itertools
import random
from datetime import timedelta

import pytest

from kotel.resilience.breaker import BreakerState, CircuitBreaker
from kotel.resilience.retry import Backoff
from kotel.topology.exporters import CircuitBreakerConfig, RetryConfig


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- Backoff ---------------------------------------------------------------------------------------


def test_backoff_doubles_up_to_max_interval_without_jitter() -> None:
    clock = Clock()
    backoff = Backoff(RetryConfig(randomization_factor=0), clock=clock)
    assert list(itertools.islice(backoff, 8)) == [1, 2, 4, 8, 16, 30, 30, 30]


def test_backoff_defaults_stop_once_five_minutes_would_pass() -> None:
    clock = Clock()
    backoff = Backoff(RetryConfig(randomization_factor=0), clock=clock)
    delays = []
    for delay in backoff:
        delays.append(delay)
        clock.now += delay
    # 1+2+4+8+16 = 31, then 30 s steps: 31 + 9*30 = 301 > 300, so eight 30 s waits fit.
    assert delays == [1, 2, 4, 8, 16] + [30] * 8
    assert sum(delays) == 271
    assert backoff.elapsed == 271


def test_backoff_jitter_stays_within_randomization_factor() -> None:
    config = RetryConfig(randomization_factor=0.5, max_elapsed_time=timedelta(0))
    delays = list(itertools.islice(Backoff(config, clock=Clock(), rng=random.Random(7)), 200))
    nominal = [min(2.0**n, 30.0) for n in range(200)]
    for delay, base in zip(delays, nominal, strict=True):
        assert base * 0.5 <= delay <= base * 1.5
    assert len({round(d / b, 6) for d, b in zip(delays, nominal, strict=True)}) > 100  # really random


def test_backoff_reset_starts_over() -> None:
    clock = Clock()
    backoff = Backoff(RetryConfig(randomization_factor=0), clock=clock)
    next(backoff), next(backoff)
    clock.now += 299
    backoff.reset()
    assert backoff.elapsed == 0
    assert next(backoff) == 1


def test_backoff_zero_max_elapsed_never_stops_and_disabled_never_starts() -> None:
    clock = Clock()
    endless = Backoff(RetryConfig(randomization_factor=0, max_elapsed_time=timedelta(0)), clock=clock)
    clock.now += 10**9
    assert next(endless) == 1
    assert list(Backoff(RetryConfig(enabled=False), clock=clock)) == []


# --- CircuitBreaker --------------------------------------------------------------------------------


def make_breaker(**config: object) -> tuple[CircuitBreaker, Clock, list[BreakerState]]:
    clock = Clock()
    changes: list[BreakerState] = []
    breaker = CircuitBreaker(CircuitBreakerConfig(**config), clock=clock, on_change=changes.append)
    return breaker, clock, changes


def test_breaker_needs_minimum_requests_before_opening() -> None:
    breaker, _, changes = make_breaker(minimum_requests=10)
    for _ in range(9):
        breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    assert changes == [BreakerState.OPEN]


def test_breaker_opens_only_when_the_rate_exceeds_the_threshold() -> None:
    breaker, _, _ = make_breaker(minimum_requests=10, failure_rate_threshold=0.5)
    for _ in range(5):
        breaker.record_success()
        breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED  # exactly 50 %: not above the threshold
    breaker.record_failure()  # 6 of 11
    assert breaker.state is BreakerState.OPEN


def test_breaker_forgets_outcomes_older_than_the_window() -> None:
    breaker, clock, _ = make_breaker(minimum_requests=10, window=timedelta(seconds=30))
    for _ in range(9):
        breaker.record_failure()
    clock.now += 30
    breaker.record_failure()  # the nine have slid out: 1 of 1, below minimum_requests
    assert breaker.state is BreakerState.CLOSED
    for _ in range(9):
        breaker.record_failure()
    assert breaker.state is BreakerState.OPEN


def test_open_breaker_lets_one_probe_through_after_open_duration_and_success_closes() -> None:
    breaker, clock, changes = make_breaker(minimum_requests=1, open_duration=timedelta(seconds=30))
    breaker.record_failure()
    assert not breaker.allow()
    assert breaker.retry_in() == 30
    clock.now += 29.9
    assert not breaker.allow()
    clock.now += 0.1
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.allow()  # the probe
    assert not breaker.allow()  # only one
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED
    assert breaker.allow() and breaker.allow()
    breaker.record_failure()  # the window was cleared on closing: 1 of 1 with minimum 1 re-opens
    assert changes == [BreakerState.OPEN, BreakerState.HALF_OPEN, BreakerState.CLOSED, BreakerState.OPEN]


def test_failed_probe_reopens_for_a_full_open_duration() -> None:
    breaker, clock, _ = make_breaker(minimum_requests=1, open_duration=timedelta(seconds=30))
    breaker.record_failure()
    clock.now += 30
    assert breaker.allow()
    clock.now += 5
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    assert breaker.retry_in() == 30
    clock.now += 29
    assert not breaker.allow()


def test_a_probe_that_never_reports_is_replaced_after_open_duration() -> None:
    breaker, clock, _ = make_breaker(minimum_requests=1, open_duration=timedelta(seconds=30))
    breaker.record_failure()
    clock.now += 30
    assert breaker.allow()
    clock.now += 29
    assert not breaker.allow()
    clock.now += 1
    assert breaker.allow()


def test_trip_opens_at_once_and_restarts_the_wait() -> None:
    breaker, clock, changes = make_breaker(open_duration=timedelta(seconds=30))
    breaker.trip()
    assert breaker.state is BreakerState.OPEN and not breaker.allow()
    clock.now += 20
    breaker.trip()
    assert breaker.retry_in() == 30
    assert changes == [BreakerState.OPEN]


@pytest.mark.parametrize("action", ["trip", "failures"])
def test_disabled_breaker_always_allows(action: str) -> None:
    breaker, _, changes = make_breaker(enabled=False, minimum_requests=1)
    if action == "trip":
        breaker.trip()
    else:
        for _ in range(20):
            breaker.record_failure()
    assert breaker.allow()
    assert breaker.retry_in() == 0
    assert breaker.state is BreakerState.CLOSED
    assert changes == []
