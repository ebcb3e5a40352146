"""Backoff and circuit breaker, driven by a hand-moved clock."""

from __future__ import annotations

import logging

import pytest

from agent.shipper.breaker import Backoff, BreakerState, CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_backoff_ceiling_doubles_to_the_cap() -> None:
    ceilings: list[float] = []
    backoff = Backoff(1.0, 20.0, rng=lambda low, high: ceilings.append(high) or high)
    for _ in range(7):
        backoff.next_delay()
    assert ceilings == [1.0, 2.0, 4.0, 8.0, 16.0, 20.0, 20.0]
    backoff.reset()
    assert backoff.next_delay() == 1.0


def test_backoff_jitter_is_full_range() -> None:
    backoff = Backoff(1.0, 8.0)
    delays = []
    for _ in range(400):
        backoff.failures = 3  # ceiling 8 s every time
        delays.append(backoff.next_delay())
    assert all(0.0 <= d <= 8.0 for d in delays)
    assert min(delays) < 1.0 and max(delays) > 7.0


def test_breaker_opens_after_threshold_and_lets_one_probe(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    breaker = CircuitBreaker(failures=3, open_s=10.0, clock=clock)
    caplog.set_level(logging.INFO, "toktra.shipper")
    for _ in range(2):
        assert breaker.allow()
        breaker.failure("500")
    assert breaker.state is BreakerState.CLOSED and not breaker.is_open
    assert breaker.allow()
    breaker.failure("500")
    assert breaker.state is BreakerState.OPEN and breaker.is_open
    assert not breaker.allow()
    assert breaker.seconds_until_allowed() == pytest.approx(10.0)

    clock.now += 9.9
    assert not breaker.allow()
    clock.now += 0.1
    assert breaker.allow()  # the probe
    assert breaker.state is BreakerState.HALF_OPEN
    assert not breaker.allow() and not breaker.allow()  # only one
    breaker.failure("500 again")
    assert breaker.state is BreakerState.OPEN
    assert not breaker.allow()
    clock.now += 10.0
    assert breaker.allow()
    breaker.success()
    assert breaker.state is BreakerState.CLOSED and breaker.allow() and breaker.allow()
    changes = [r.getMessage() for r in caplog.records]
    assert [m.split(":")[0] for m in changes] == [
        "circuit breaker open",
        "circuit breaker half open",
        "circuit breaker open",
        "circuit breaker half open",
        "circuit breaker closed",
    ]
    assert breaker.opened == 2


def test_breaker_success_resets_the_run_of_failures() -> None:
    breaker = CircuitBreaker(failures=2, open_s=5.0, clock=Clock())
    breaker.failure("x")
    breaker.success()
    breaker.failure("x")
    assert breaker.state is BreakerState.CLOSED


def test_breaker_release_hands_back_the_probe() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failures=1, open_s=1.0, clock=clock)
    breaker.failure("x")
    clock.now += 1.0
    assert breaker.allow()
    breaker.release()
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.allow()
