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

from agent import __version__, stats, wire
from agent.config import Config
from agent.outbox import configure as outbox_socket
from agent.outbox import received
from agent.runtime import Episode, Readiness, StopSignals, endpoint
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
from agent.shipper.spool import Spool
from agent.stats import Histogram
from agent.tap import Tap

log = logging.getLogger("toktra.shipper")

POLL_CAP_MS = 100
RETRY_BASE_S = 1.0
# A server may ask for a pause with Retry-After, but not for an hour.
RETRY_AFTER_CAP_S = 300.0
ENROLL_RETRY_BASE_S = 5.0
ENROLL_RETRY_CAP_S = 300.0
EARLY_RENEWAL_PAUSE_S = 300.0
FLUSH_DEADLINE_S = 10.0
STEP_BUDGET_S = 1.0
RECV_BURST = 64  # messages taken per pass; each may hold a whole batch


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


# Upper bounds of the send-duration histogram, in seconds.
SEND_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class ShipperStats:
    sent: int = 0  # events the destination acknowledged
    batches_sent: int = 0
    send_errors: dict[str, int] = field(
        default_factory=lambda: {"retryable": 0, "credentials": 0, "rejected": 0}
    )
    invalid: int = 0  # messages from upstream that failed validation
    send_seconds: Histogram = field(
        default_factory=lambda: Histogram(
            "toktra_batch_send_duration_seconds", SEND_BUCKETS
        )
    )


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
    if not config.enrollment_token:
        log.warning(
            "enrollment_token is empty: only a certificate already in %s can be "
            "renewed; a first enrollment will be refused",
            config.state_dir,
        )
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
        self.on_delivered: Callable[[list[dict]], None] = lambda events: None
        self.creds: Credentials | None = None
        self._enroll_backoff = Backoff(ENROLL_RETRY_BASE_S, ENROLL_RETRY_CAP_S)
        self._enroll_at = 0.0  # no attempt before this, after a failure
        self._renew_after = 0.0  # no early renewal before this
        self._refused = False  # the server refused the current certificate
        self._enroll_trouble = Episode(
            log, "cannot get a device certificate", "device certificate obtained"
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
        if usable and self.clock() < self._renew_after:
            return True  # due early, and paused: see below
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
        if self.wallclock() >= new.renew_at:
            # Due again at once: a skewed clock or an odd issuer. Renewing
            # before every batch would not help; wait a while.
            self._renew_after = self.clock() + EARLY_RENEWAL_PAUSE_S
            log.warning(
                "the new certificate is already due for renewal (valid %s to %s; "
                "is this host's clock right?); next try in %.0fs",
                new.not_before.isoformat(timespec="seconds"),
                new.not_after.isoformat(timespec="seconds"),
                EARLY_RENEWAL_PAUSE_S,
            )
        return True

    # --- output ---------------------------------------------------------------

    def step(self) -> None:
        """Seals what is due, then sends the oldest batches while allowed.

        Returns after about STEP_BUDGET_S even with a backlog, so the loop
        keeps receiving, reporting and feeding the watchdog.
        """
        self.seal()
        budget_end = self.clock() + STEP_BUDGET_S
        while self.spool.head() is not None and self.clock() < budget_end:
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
            self.stats.send_errors["rejected"] += 1
            self.breaker.success()  # the server works; it refused this batch
            self.spool.reject(batch)
            log.error("batch of %d events rejected, set aside: %s", len(events), err)
            return True
        except CredentialsRejectedError as err:
            self.stats.send_errors["credentials"] += 1
            self.breaker.failure(str(err))
            if self.identity is not None:
                self._refused = True
                self._enroll_at = 0.0
            self._retry_later(len(events), err)
            return False
        except RetryableSinkError as err:
            self.stats.send_errors["retryable"] += 1
            self.breaker.failure(str(err))
            self._retry_later(len(events), err)
            return False
        self.stats.send_seconds.observe(self.clock() - started)
        self.breaker.success()
        self.backoff.reset()
        self.spool.done(batch)
        self.stats.sent += len(events)
        self.stats.batches_sent += 1
        self.on_delivered(events)
        return True

    def _retry_later(self, count: int, err: RetryableSinkError) -> None:
        wait = self.backoff.next_delay()
        if err.retry_after is not None:
            wait = max(wait, min(err.retry_after, RETRY_AFTER_CAP_S))
        self.retry_at = self.clock() + wait
        log.warning("sending %d events failed (%s); retry in %.1fs", count, err, wait)

    def samples(self) -> list[stats.Sample]:
        spool = self.spool.stats
        out: list[stats.Sample] = [
            ("toktra_events_sent_total", {}, self.stats.sent),
            ("toktra_buffered_events", {}, self.spool.buffered_events()),
            ("toktra_circuit_breaker_open", {}, 1 if self.breaker.is_open else 0),
            ("toktra_spool_bytes", {}, self.spool.bytes_used()),
            ("toktra_events_dropped_total", {"reason": "rejected"}, spool.rejected),
            (
                "toktra_events_dropped_total",
                {"reason": "invalid_message"},
                self.stats.invalid,
            ),
        ]
        out += [
            ("toktra_events_dropped_total", {"reason": reason}, n)
            for reason, n in spool.dropped.items()
        ]
        out += [
            ("toktra_send_errors_total", {"kind": kind}, n)
            for kind, n in self.stats.send_errors.items()
        ]
        out += self.stats.send_seconds.samples()
        if self.creds is not None:
            expiry = self.creds.not_after.timestamp()
            out.append(("toktra_certificate_expiry_timestamp_seconds", {}, expiry))
        return out

    def timeout_ms(self) -> int:
        waits = [POLL_CAP_MS / 1000]
        due = self.batcher.seconds_until_due()
        if due is not None:
            waits.append(due)
        if self.spool.head() is not None:
            # Sending waits for the latest of these; the earliest would spin.
            now = self.clock()
            blocked = max(self.retry_at - now, self.breaker.seconds_until_allowed())
            if self.identity is not None and not self._usable_credentials():
                blocked = max(blocked, self._enroll_at - now)
            waits.append(max(blocked, 0.0))
        return int(min(waits) * 1000)

    def _usable_credentials(self) -> bool:
        creds = self.creds
        return (
            creds is not None
            and not creds.expired(self.wallclock())
            and not self._refused
        )

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
        ready.failed(str(err))
        return 1
    ctx = zmq.Context.instance()
    inp = ctx.socket(zmq.PULL)
    outbox_socket(inp)
    inp.setsockopt(zmq.LINGER, 0)
    inp.bind(endpoint(config.run_dir, "shipper"))
    tap = Tap(ctx, config.run_dir, "shipper", config.taps)
    shipper.on_delivered = lambda events: _publish(tap, events)
    reporter = stats.Reporter(ctx, config.run_dir, "shipper", shipper.samples)
    ready.ready("shipping")
    try:
        while True:
            reporter.tick()
            ready.alive()
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
        reporter.close()
        tap.close()
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


def _publish(tap: Tap, events: list[dict]) -> None:
    if not tap.wanted():
        return  # nobody is listening: spare the encoding
    for start in range(0, len(events), wire.MAX_BATCH):
        tap.publish(wire.encode_batch("event", events[start : start + wire.MAX_BATCH]))


def _receive_burst(inp: zmq.Socket, stats: ShipperStats) -> list[dict]:
    events: list[dict] = []
    for data in received(inp, RECV_BURST):
        try:
            batch = wire.decode_batch("event", data)
        except wire.WireError as err:
            stats.invalid += err.bodies
            log.error("dropped an invalid event message: %s", err)
            continue
        events += batch.bodies
        for error in batch.errors:
            stats.invalid += 1
            log.error("dropped an invalid event message: %s", error)
    return events
