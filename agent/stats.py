"""What each process reports about itself, and how it reaches the metrics stage.

In: a stage's own counters and gauges. Out: one `stats` message per second
on `ipc://{run_dir}/stats.sock`, which the metrics stage binds.

A message carries the sender's whole state, not increments: a lost message
costs nothing, and the metrics stage can tell a restarted stage (a new pid)
from a live one and keep counters going up across restarts. Sending never
blocks: with no metrics stage listening, snapshots are simply not kept.

Message (JSON, versioned like the others in `agent.wire`):

    {"type": "stats", "v": 1, "body": {
        "stage": "shipper", "pid": 1234, "started": 1764800000.5,
        "samples": [["toktra_events_sent_total", {}, 50], ...]}}
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import zmq

from agent.runtime import endpoint

VERSION = 1
INTERVAL_S = 1.0
MAX_SAMPLES = 2000
MAX_MESSAGE_BYTES = 512 * 1024
STAGES = ("supervisor", "metrics", "shipper", "classifier", "collector")

# (metric name, labels, value)
Sample = tuple[str, dict[str, str], float]


class StatsError(ValueError):
    """A stats message that does not match its schema."""


def encode(stage: str, pid: int, started: float, samples: list[Sample]) -> bytes:
    body = {
        "stage": stage,
        "pid": pid,
        "started": started,
        "samples": [[n, labels, v] for n, labels, v in samples],
    }
    return json.dumps(
        {"type": "stats", "v": VERSION, "body": body}, separators=(",", ":")
    ).encode()


def decode(data: bytes) -> tuple[str, int, float, list[Sample]]:
    """Parses and checks one message; raises StatsError on anything odd."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise StatsError(f"stats message of {len(data)} bytes is too large")
    try:
        msg: Any = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise StatsError("stats message is not JSON") from None
    if not isinstance(msg, dict) or msg.get("type") != "stats":
        raise StatsError("not a stats message")
    if msg.get("v") != VERSION or isinstance(msg.get("v"), bool):
        raise StatsError(f"stats message version {msg.get('v')!r}")
    body = msg.get("body")
    if not isinstance(body, dict):
        raise StatsError("stats body is not an object")
    stage, pid, started = body.get("stage"), body.get("pid"), body.get("started")
    if stage not in STAGES:
        raise StatsError(f"unknown stage {stage!r}")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        raise StatsError("pid is not a positive integer")
    if not isinstance(started, int | float) or isinstance(started, bool):
        raise StatsError("started is not a number")
    raw = body.get("samples")
    if not isinstance(raw, list) or len(raw) > MAX_SAMPLES:
        raise StatsError("samples is not a list of a sane length")
    samples: list[Sample] = []
    for item in raw:
        if not (isinstance(item, list) and len(item) == 3):
            raise StatsError("a sample is not [name, labels, value]")
        name, labels, value = item
        if not isinstance(name, str) or not name.startswith("toktra_"):
            raise StatsError(f"sample name {name!r}")
        if not isinstance(labels, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and len(v) <= 200
            for k, v in labels.items()
        ):
            raise StatsError(f"labels of {name} are not strings")
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise StatsError(f"value of {name} is not a finite number")
        samples.append((name, labels, float(value)))
    return stage, pid, float(started), samples


class Reporter:
    """Sends a stage's snapshot at most once per interval, never blocking."""

    def __init__(
        self,
        ctx: zmq.Context,
        run_dir: str,
        stage: str,
        snapshot: Callable[[], list[Sample]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stage = stage
        self.snapshot = snapshot
        self.pid = os.getpid()
        self.started = time.time()
        self._clock = clock
        self._next = 0.0
        self._sock = ctx.socket(zmq.PUSH)
        # Only the newest snapshots matter; an old one is worth nothing.
        self._sock.setsockopt(zmq.SNDHWM, 4)
        self._sock.setsockopt(zmq.LINGER, 500)
        self._sock.connect(endpoint(run_dir, "stats"))

    def tick(self) -> None:
        if self._clock() >= self._next:
            self.send()

    def send(self) -> None:
        self._next = self._clock() + INTERVAL_S
        data = encode(self.stage, self.pid, self.started, self.snapshot())
        # No metrics stage, or one that is behind: the next snapshot will do.
        with contextlib.suppress(zmq.Again):
            self._sock.send(data, zmq.NOBLOCK)

    def close(self) -> None:
        self.send()  # the final counts, for a clean stop
        self._sock.close()


class Histogram:
    """Cumulative bucket counts, reported as the three Prometheus series."""

    def __init__(self, name: str, buckets: tuple[float, ...]) -> None:
        self.name = name
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.sum += value
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
                return
        self.counts[-1] += 1

    def samples(self) -> list[Sample]:
        out: list[Sample] = []
        running = 0
        for bound, count in zip(self.buckets, self.counts, strict=False):
            running += count
            out.append((f"{self.name}_bucket", {"le": repr(bound)}, running))
        running += self.counts[-1]
        out.append((f"{self.name}_bucket", {"le": "+Inf"}, running))
        out.append((f"{self.name}_count", {}, running))
        out.append((f"{self.name}_sum", {}, self.sum))
        return out
