"""Shipper stage loop: events in, batches out to the configured sink.

Every event is written to the spool as it arrives; batches close at
`batch_max_events` or after `batch_max_seconds` and leave the spool only once
the destination took them (at least once; receivers drop repeats by
`event_id`). A batch that failed for a reason that may pass is retried, oldest
first, after a jittered backoff and behind a circuit breaker; one the
destination refuses for good is set aside and counted. With `enroll_url` set,
the shipper enrolls itself and renews its certificate before sending.

On SIGTERM the open batch is sealed and what is due goes out while there is
time; whatever is left stays in the spool for the next start.
"""

from __future__ import annotations

import datetime
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import zmq

from agent import __version__, wire
from agent.config import Config
from agent.runtime import Readiness, StopSignals, endpoint
from agent.shipper.batcher import Batcher
from agent.shipper.breaker import Backoff, CircuitBreaker
from agent.shipper.identity import (
    Credentials,
    EnrollmentError,
    Identity,
    device_id,
)
from agent.shipper.sinks import (
    CredentialsRejectedError,
    HttpsSink,
    JsonlSink,
    RejectedBatchError,
    RetryableSinkError,
    Sink,
    SinkError,
    system_trust_store,
)
from agent.shipper.spool import Episode, Spool

log = logging.getLogger("toktra.shipper")

POLL_CAP_MS = 100
RETRY_BASE_S = 1.0
# A server may ask for a pause with Retry-After, but not for an hour.
RETRY_AFTER_CAP_S = 300.0
ENROLL_RETRY_BASE_S = 5.0
ENROLL_RETRY_CAP_S = 300.0
FLUSH_DEADLINE_S = 10.0
RECV_BURST = 1000


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclass
class ShipperStats:
    sent: int = 0  # events the destination acknowledged
    batches_sent: int = 0
    send_errors: int = 0  # failed attempts, whatever the cause
    invalid: int = 0  # messages from upstream that failed validation
    send_seconds: list[float] = field(default_factory=list)  # since last read


def make_sink(config: Config) -> Sink:
    if not config.ingest_url:
        path = os.path.join(config.state_dir, "events.jsonl")
        log.info("local mode: events are appended to %s", path)
        return JsonlSink(path)
    log.info("shipping to %s", config.ingest_url)
    return HttpsSink(
        config.ingest_url,
        device_id(config.state_dir, config.device_id),
        __version__,
        ca_file=config.ca_file,
    )


def make_identity(config: Config) -> Identity | None:
    if not (config.ingest_url and config.enroll_url):
        if config.ingest_url:
            log.warning("no enroll_url: sending without a client certificate")
        return None
    return Identity(
        config.state_dir,
        device_id(config.state_dir, config.device_id),
        config.enroll_url,
        config.enrollment_token,
        config.org_id,
        verify=config.ca_file or system_trust_store(),
    )


class Shipper:
    def __init__(
        self,
        config: Config,
        spool: Spool,
        sink: Sink,
        identity: Identity | None = None,
        clock: Callable[[], float] = time.monotonic,
        wallclock: Callable[[], datetime.datetime] = _utcnow,
    ) -> None:
        self.batcher = Batcher(
            config.batch_max_events, config.batch_max_seconds, clock=clock
        )
        self.spool = spool
        self.sink = sink
        self.identity = identity
        self.clock = clock
        self.wallclock = wallclock
        self.breaker = CircuitBreaker(
            config.breaker_failures, config.breaker_open_seconds, clock
        )
        self.backoff = Backoff(RETRY_BASE_S, config.retry_max_seconds)
        self.retry_at = 0.0
        self.stats = ShipperStats()
        self.creds: Credentials | None = None
        self._enroll_backoff = Backoff(ENROLL_RETRY_BASE_S, ENROLL_RETRY_CAP_S)
        self._enroll_at = 0.0
        self._refused = False  # the server refused the current certificate
        self._enroll_trouble = Episode(
            "cannot get a device certificate", "device certificate obtained"
        )
        if identity is not None:
            self.creds = identity.current()
            if self.creds is not None:
                self._use(self.creds)

    # --- input ----------------------------------------------------------------

    def receive(self, events: list[dict]) -> None:
        """Spools arriving events; the open batch on disk never exceeds one batch."""
        while events:
            room = self.batcher.max_events - len(self.batcher)
            chunk, events = events[:room], events[room:]
            self.spool.append(chunk)
            for event in chunk:
                self.batcher.add(event)
            if len(self.batcher) >= self.batcher.max_events:
                self.spool.seal(self.batcher.take())

    def seal(self, everything: bool = False) -> None:
        while self.batcher.due() or (everything and len(self.batcher)):
            self.spool.seal(self.batcher.take())

    # --- credentials ----------------------------------------------------------

    def _use(self, creds: Credentials) -> None:
        use = getattr(self.sink, "use_credentials", None)
        if use is not None:
            use(creds.cert_file, creds.key_file)

    def credentials_ready(self) -> bool:
        """True when a request may go; enrolls or renews first when due."""
        if self.identity is None:
            return True
        now = self.wallclock()
        creds = self.creds
        usable = creds is not None and not creds.expired(now) and not self._refused
        if usable and creds is not None and now < creds.renew_at:
            return True
        if self.clock() < self._enroll_at:
            return usable
        try:
            new = self.identity.refresh(creds if usable else None)
        except (EnrollmentError, OSError) as err:
            self._enroll_at = self.clock() + self._enroll_backoff.next_delay()
            self._enroll_trouble.happened(str(err))
            return usable
        self._enroll_trouble.over()
        self._enroll_backoff.reset()
        self.creds = new
        self._refused = False
        self._use(new)
        return True

    # --- output ---------------------------------------------------------------

    def step(self) -> None:
        """Seals what is due, then sends the oldest batches while allowed."""
        self.seal()
        while self.spool.head() is not None:
            if self.clock() < self.retry_at or not self.credentials_ready():
                return
            if not self.breaker.allow():
                return
            if not self.send_head():
                return

    def send_head(self) -> bool:
        """Sends the oldest batch; True when the next may follow at once."""
        batch = self.spool.head()
        assert batch is not None
        events = self.spool.load(batch)
        if not events:
            self.spool.done(batch)
            self.breaker.release()  # nothing was asked of the server
            return True
        started = self.clock()
        try:
            self.sink.send(events)
        except RejectedBatchError as err:
            self.stats.send_errors += 1
            self.breaker.success()  # the server works; it refused this batch
            self.spool.reject(batch)
            log.error("batch of %d events rejected, set aside: %s", len(events), err)
            return True
        except CredentialsRejectedError as err:
            self.stats.send_errors += 1
            self.breaker.failure(str(err))
            if self.identity is not None:
                self._refused = True
                self._enroll_at = 0.0
            self._retry_later(len(events), err)
            return False
        except RetryableSinkError as err:
            self.stats.send_errors += 1
            self.breaker.failure(str(err))
            self._retry_later(len(events), err)
            return False
        self.stats.send_seconds.append(self.clock() - started)
        self.breaker.success()
        self.backoff.reset()
        self.spool.done(batch)
        self.stats.sent += len(events)
        self.stats.batches_sent += 1
        return True

    def _retry_later(self, count: int, err: RetryableSinkError) -> None:
        wait = self.backoff.next_delay()
        if err.retry_after is not None:
            wait = max(wait, min(err.retry_after, RETRY_AFTER_CAP_S))
        self.retry_at = self.clock() + wait
        log.warning("sending %d events failed (%s); retry in %.1fs", count, err, wait)

    def timeout_ms(self) -> int:
        waits = [POLL_CAP_MS / 1000]
        due = self.batcher.seconds_until_due()
        if due is not None:
            waits.append(due)
        if self.spool.head() is not None:
            now = self.clock()
            waits.append(max(self.retry_at - now, 0.0))
            waits.append(self.breaker.seconds_until_allowed())
            if self.identity is not None and self._enroll_at > now:
                waits.append(self._enroll_at - now)
        return int(min(waits) * 1000)

    def flush(self, deadline_s: float = FLUSH_DEADLINE_S) -> None:
        """Seals everything and sends while the destination takes it."""
        self.seal(everything=True)
        end = self.clock() + deadline_s
        while self.spool.head() is not None and self.clock() < end:
            if self.clock() < self.retry_at or not self.breaker.allow():
                break
            if not self.credentials_ready() or not self.send_head():
                break
        in_memory = sum(b.count for b in self.spool.queue if b.path is None)
        if in_memory:
            log.error("stopping with %d events held only in memory: lost", in_memory)
        left = self.spool.buffered_events() - in_memory
        if left:
            log.info("%d events stay in the spool for the next start", left)


def prepare(config: Config) -> Callable[[Readiness, StopSignals], int]:
    return lambda ready, signals: run(config, ready, signals)


def run(config: Config, ready: Readiness, signals: StopSignals) -> int:
    spool = Spool(os.path.join(config.state_dir, "spool"), config.spool_max_bytes)
    try:
        spool.open()
        shipper = Shipper(config, spool, make_sink(config), make_identity(config))
    except (SinkError, OSError) as err:
        log.error("shipper cannot start: %s", err)
        return 1
    ctx = zmq.Context.instance()
    inp = ctx.socket(zmq.PULL)
    inp.setsockopt(zmq.RCVHWM, config.queue_max_messages)
    inp.setsockopt(zmq.LINGER, 0)
    inp.bind(endpoint(config.run_dir, "shipper"))
    ready.ready("shipping")
    try:
        while True:
            stopping = signals.stopping
            # Once stopping, take what is queued without waiting; an empty
            # queue then means everything upstream sent has arrived.
            if not inp.poll(0 if stopping else shipper.timeout_ms()) and stopping:
                break
            shipper.receive(_receive_burst(inp, shipper.stats))
            if not stopping:
                shipper.step()
        shipper.flush()
    finally:
        inp.close()
        ctx.term()
        spool.close()
        shipper.sink.close()
    log.info(
        "shipper stopped: sent=%d rejected=%d dropped=%s invalid=%d",
        shipper.stats.sent,
        spool.stats.rejected,
        spool.stats.dropped,
        shipper.stats.invalid,
    )
    return 0


def _receive_burst(inp: zmq.Socket, stats: ShipperStats) -> list[dict]:
    events = []
    for _ in range(RECV_BURST):
        try:
            data = inp.recv(zmq.NOBLOCK)
        except zmq.Again:
            break
        try:
            events.append(wire.decode("event", data))
        except wire.WireError as err:
            stats.invalid += 1
            log.error("dropped an invalid event message: %s", err)
    return events
