"""When to try the ingest service again: jittered backoff and a circuit breaker.

`Backoff` spaces retries of one batch: exponential with full jitter, so that
a fleet that lost its ingest service at the same moment does not come back in
lockstep. `CircuitBreaker` stops sending altogether after a run of failures:

    closed --(`failures` in a row)--> open --(`open_s` later)--> half open
    half open --(the one probe succeeds)--> closed
    half open --(the probe fails)--> open again, for another `open_s`

While half open exactly one request is allowed: `allow()` hands out one probe
and refuses everything else until that probe's outcome is reported. Each
change of state is logged once, with the reason.
"""

from __future__ import annotations

import enum
import logging
import random
import time
from collections.abc import Callable

log = logging.getLogger("toktra.shipper")


class Backoff:
    """Delays for consecutive failures: uniform in [0, min(cap, base * 2**n))."""

    def __init__(
        self,
        base_s: float,
        cap_s: float,
        rng: Callable[[float, float], float] = random.uniform,
    ) -> None:
        self.base_s = base_s
        self.cap_s = cap_s
        self.failures = 0
        self._rng = rng

    def next_delay(self) -> float:
        ceiling = min(self.cap_s, self.base_s * 2 ** min(self.failures, 32))
        self.failures += 1
        return self._rng(0.0, ceiling)

    def reset(self) -> None:
        self.failures = 0


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half open"


class CircuitBreaker:
    def __init__(
        self,
        failures: int,
        open_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = failures
        self.open_s = open_s
        self.state = BreakerState.CLOSED
        self.failures = 0
        self.opened = 0  # times the breaker opened, for metrics
        self._clock = clock
        self._reopen_at = 0.0
        self._probe_out = False

    @property
    def is_open(self) -> bool:
        """True unless closed: what the gauge `circuit_breaker_open` reports."""
        return self.state is not BreakerState.CLOSED

    def seconds_until_allowed(self) -> float:
        if self.state is BreakerState.OPEN:
            return max(0.0, self._reopen_at - self._clock())
        return 0.0

    def allow(self) -> bool:
        """Whether one request may go now; when half open, at most one does."""
        if self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.OPEN:
            if self._clock() < self._reopen_at:
                return False
            self._to(BreakerState.HALF_OPEN, f"{self.open_s:g}s passed; one probe")
        if self._probe_out:
            return False
        self._probe_out = True
        return True

    def release(self) -> None:
        """Hands back a probe that was not used; the state stays as it is."""
        self._probe_out = False

    def success(self) -> None:
        self.failures = 0
        self._probe_out = False
        if self.state is not BreakerState.CLOSED:
            self._to(BreakerState.CLOSED, "a request succeeded")

    def failure(self, why: str) -> None:
        self.failures += 1
        self._probe_out = False
        if self.state is BreakerState.HALF_OPEN:
            self._open(f"the probe failed: {why}")
        elif self.state is BreakerState.CLOSED and self.failures >= self.threshold:
            self._open(f"{self.failures} failures in a row, the last: {why}")

    def _open(self, why: str) -> None:
        self._reopen_at = self._clock() + self.open_s
        self.opened += 1
        self._to(BreakerState.OPEN, f"{why}; next probe in {self.open_s:g}s")

    def _to(self, state: BreakerState, why: str) -> None:
        level = logging.WARNING if state is BreakerState.OPEN else logging.INFO
        log.log(level, "circuit breaker %s: %s", state.value, why)
        self.state = state
