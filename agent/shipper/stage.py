"""Shipper stage loop: events in, batches out to the configured sink.

Batches close at `batch_max_events` or after `batch_max_seconds`. A batch
that fails for a reason that may pass is kept and retried with capped,
jittered backoff; one the destination refuses for good is set aside and
counted. On SIGTERM everything held is flushed before exit.
"""

from __future__ import annotations

import collections
import logging
import os
import random
import time
import uuid
from collections.abc import Callable

import zmq

from agent import __version__, wire
from agent.config import Config
from agent.runtime import Readiness, StopSignals, endpoint
from agent.shipper.batcher import Batcher
from agent.shipper.sinks import (
    HttpsSink,
    JsonlSink,
    RejectedBatchError,
    RetryableSinkError,
    Sink,
)

log = logging.getLogger("toktra.shipper")

POLL_CAP_MS = 100
RETRY_BASE_S = 1.0
RETRY_CAP_S = 60.0
# A server may ask for a pause with Retry-After, but not for an hour.
RETRY_AFTER_CAP_S = 300.0
# Batches kept in memory while the destination is unreachable.
MAX_HELD_BATCHES = 1000
FLUSH_DEADLINE_S = 10.0
RECV_BURST = 1000


def device_id(config: Config) -> str:
    """The configured id, else one generated once and kept in state_dir."""
    if config.device_id:
        return config.device_id
    path = os.path.join(config.state_dir, "device_id")
    try:
        with open(path) as f:
            kept = f.read().strip()
        if kept:
            return kept
    except FileNotFoundError:
        pass
    new = str(uuid.uuid4())
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, new.encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    log.info("generated device id %s (kept in %s)", new, path)
    return new


def make_sink(config: Config) -> Sink:
    if not config.ingest_url:
        path = os.path.join(config.state_dir, "events.jsonl")
        log.info("local mode: events are appended to %s", path)
        return JsonlSink(path)
    log.info("shipping to %s", config.ingest_url)
    return HttpsSink(
        config.ingest_url, device_id(config), __version__, ca_file=config.ca_file
    )


class Shipper:
    def __init__(self, config: Config, sink: Sink, clock=time.monotonic) -> None:
        self.batcher = Batcher(
            config.batch_max_events, config.batch_max_seconds, clock=clock
        )
        self.sink = sink
        self.clock = clock
        self.held: collections.deque[list[dict]] = collections.deque()
        self.failures = 0
        self.retry_at = 0.0
        self.sent = self.rejected = self.dropped = 0

    def add(self, event: dict) -> None:
        self.batcher.add(event)

    def deliver(self, batch: list[dict]) -> bool:
        try:
            self.sink.send(batch)
        except RejectedBatchError as e:
            self.rejected += len(batch)
            log.error("batch of %d events rejected, set aside: %s", len(batch), e)
            return True
        except RetryableSinkError as e:
            self.failures += 1
            backoff = random.uniform(
                0, min(RETRY_CAP_S, RETRY_BASE_S * 2 ** min(self.failures, 16))
            )
            wait = max(backoff, min(e.retry_after or 0.0, RETRY_AFTER_CAP_S))
            self.retry_at = self.clock() + wait
            log.warning(
                "sending %d events failed (%s); retrying in %.1fs",
                len(batch),
                e,
                wait,
            )
            return False
        self.failures = 0
        self.sent += len(batch)
        log.debug("delivered %d events", len(batch))
        return True

    def hold(self, batch: list[dict]) -> None:
        self.held.append(batch)
        if len(self.held) > MAX_HELD_BATCHES:
            lost = self.held.popleft()
            self.dropped += len(lost)
            log.error(
                "more than %d batches waiting: dropped the oldest (%d events)",
                MAX_HELD_BATCHES,
                len(lost),
            )

    def step(self) -> None:
        """Sends what is due: held batches first, in order, then new ones."""
        if self.held and self.clock() < self.retry_at:
            while self.batcher.due():
                self.hold(self.batcher.take())
            return
        while self.held:
            if not self.deliver(self.held[0]):
                return
            self.held.popleft()
        while self.batcher.due():
            batch = self.batcher.take()
            if not self.deliver(batch):
                self.hold(batch)
                return

    def timeout_ms(self) -> int:
        waits = [POLL_CAP_MS / 1000]
        due = self.batcher.seconds_until_due()
        if due is not None:
            waits.append(due)
        if self.held:
            waits.append(max(0.0, self.retry_at - self.clock()))
        return int(min(waits) * 1000)

    def flush(self, deadline_s: float = FLUSH_DEADLINE_S) -> int:
        """Sends everything held; returns how many events could not go."""
        end = self.clock() + deadline_s
        while len(self.batcher):
            self.held.append(self.batcher.take())
        while self.held and self.clock() < end:
            if self.deliver(self.held[0]):
                self.held.popleft()
            else:
                time.sleep(min(0.5, max(0.0, end - self.clock())))
        return sum(len(b) for b in self.held)


def prepare(config: Config) -> Callable[[Readiness, StopSignals], int]:
    return lambda ready, signals: run(config, ready, signals)


def run(config: Config, ready: Readiness, signals: StopSignals) -> int:
    shipper = Shipper(config, make_sink(config))
    ctx = zmq.Context.instance()
    inp = ctx.socket(zmq.PULL)
    inp.setsockopt(zmq.RCVHWM, config.queue_max_messages)
    inp.setsockopt(zmq.LINGER, 0)
    inp.bind(endpoint(config.run_dir, "shipper"))
    ready.ready("shipping")
    invalid = 0
    try:
        while True:
            stopping = signals.stopping
            # Once stopping, take what is queued without waiting; an empty
            # queue then means everything upstream sent has arrived.
            ready = inp.poll(0 if stopping else shipper.timeout_ms())
            if not ready and stopping:
                break
            for _ in range(RECV_BURST):
                try:
                    data = inp.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                try:
                    shipper.add(wire.decode("event", data))
                except wire.WireError as e:
                    invalid += 1
                    log.error("dropped an invalid event message: %s", e)
            if not stopping:
                shipper.step()
        lost = shipper.flush()
        if lost:
            log.error("stopping with %d events undelivered: they are lost", lost)
    finally:
        inp.close()
        ctx.term()
        shipper.sink.close()
    log.info(
        "shipper stopped: sent=%d rejected=%d dropped=%d invalid=%d",
        shipper.sent,
        shipper.rejected,
        shipper.dropped,
        invalid,
    )
    return 0
