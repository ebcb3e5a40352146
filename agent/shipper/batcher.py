"""Group events into batches by count or by age.

The batcher holds events in arrival order and says when a batch is due: when it
holds `max_events`, or when the oldest event it holds has waited `max_seconds`.
It has no thread and no timer; the caller polls `due()` and uses
`seconds_until_due()` as its poll timeout. The clock is injected so tests can
move time by hand.

It is unbounded: the caller decides what to keep when delivery stalls.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable


class Batcher:
    """Events in arrival order, each stamped with the clock when added."""

    def __init__(
        self,
        max_events: int,
        max_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_events < 1:
            raise ValueError(f"max_events must be at least 1, got {max_events}")
        if max_seconds < 0:
            raise ValueError(f"max_seconds must not be negative, got {max_seconds}")
        self.max_events = max_events
        self.max_seconds = max_seconds
        self._clock = clock
        self._held: deque[tuple[float, dict]] = deque()

    def __len__(self) -> int:
        return len(self._held)

    def add(self, event: dict) -> None:
        self._held.append((self._clock(), event))

    def due(self) -> bool:
        """True when a full batch is held or the oldest event is old enough."""
        if not self._held:
            return False
        if len(self._held) >= self.max_events:
            return True
        return self._clock() - self._held[0][0] >= self.max_seconds

    def seconds_until_due(self) -> float | None:
        """Seconds until `due()` turns true by age; 0.0 if due; None if empty."""
        if not self._held:
            return None
        if len(self._held) >= self.max_events:
            return 0.0
        waited = self._clock() - self._held[0][0]
        return max(0.0, self.max_seconds - waited)

    def take(self) -> list[dict]:
        """Remove and return up to `max_events` of the oldest events."""
        count = min(self.max_events, len(self._held))
        return [self._held.popleft()[1] for _ in range(count)]
