"""The metrics stage: every process's snapshots in, one Prometheus endpoint out.

In: `stats` messages (see `agent.stats`) on `ipc://{run_dir}/stats.sock`
from the supervisor and every stage. Out: `http://{metrics_address}:
{metrics_port}/metrics` in the Prometheus text format.

Counters never go backwards while this stage runs: when a stage comes back
with a new pid, what its previous life counted is kept as a base and the new
life's counts are added to it. Gauges are the newest value reported. A stage
that has not reported for `STALE_AFTER_S` shows as down.

It runs unprivileged, like the classifier and shipper, and serves nothing but
GET /metrics, on loopback by default.
"""

from __future__ import annotations

import contextlib
import errno
import http.server
import ipaddress
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import zmq
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric

from agent import stats
from agent.config import Config
from agent.runtime import Readiness, StopSignals, endpoint

log = logging.getLogger("toktra.metrics")

STALE_AFTER_S = 5.0
REQUEST_DEADLINE_S = 10.0
MAX_CLIENTS = 16
POLL_MS = 200
EXIT_CONFIG = 2

# name -> (type, help). Only these names are exported.
DEFINITIONS: dict[str, tuple[str, str]] = {
    "toktra_events_received_total": (
        "counter",
        "Records the collector read from the BPF ring buffer.",
    ),
    "toktra_events_sent_total": (
        "counter",
        "Events the destination acknowledged (2xx, or written to the local file).",
    ),
    "toktra_events_dropped_total": (
        "counter",
        "Events or records lost, by stage and reason.",
    ),
    "toktra_bpf_errors_total": (
        "counter",
        "Failures inside BPF programs and of attaching them, by kind.",
    ),
    "toktra_send_errors_total": (
        "counter",
        "Batch sends that failed, by kind (retryable, credentials, rejected).",
    ),
    "toktra_batch_send_duration_seconds": (
        "histogram",
        "Time to send one batch that the destination accepted.",
    ),
    "toktra_active_connections": (
        "gauge",
        "Connections in the BPF tracking map.",
    ),
    "toktra_buffered_events": (
        "gauge",
        "Events in the shipper's spool (or memory) awaiting delivery.",
    ),
    "toktra_circuit_breaker_open": (
        "gauge",
        "1 while the shipper's circuit breaker is open or half open.",
    ),
    "toktra_spool_bytes": ("gauge", "Bytes of the shipper's spool on disk."),
    "toktra_connections_sent_total": (
        "counter",
        "Connection messages the collector passed to the classifier.",
    ),
    "toktra_connections_classified_total": (
        "counter",
        "Connections the classifier judged, by result (llm or why not).",
    ),
    "toktra_probe_mode": (
        "gauge",
        "1 for the send hook the collector loaded (send_hook), and the one "
        "its configuration asked for (configured: auto, or a mode the kernel "
        "may have refused).",
    ),
    "toktra_libssl_attached": (
        "gauge",
        "libssl files the collector's uprobes are attached to.",
    ),
    "toktra_libssl_skipped_total": (
        "counter",
        "libssl files not hooked, by reason: limit (too many files) or "
        "untrusted (not owned by root, or writable by others).",
    ),
    "toktra_capture_degraded": (
        "gauge",
        "1 when BPF could not load and connections are polled from sock_diag "
        "(no SNI, no classification).",
    ),
    "toktra_clienthello_total": (
        "counter",
        "ClientHellos parsed for a server name, by outcome.",
    ),
    "toktra_progress_reports_total": (
        "counter",
        "Byte reports (final false) of connections still open.",
    ),
    "toktra_connections_adopted_total": (
        "counter",
        "Connections found open at start-up and tracked from then on.",
    ),
    "toktra_certificate_expiry_timestamp_seconds": (
        "gauge",
        "When the device certificate expires (Unix time).",
    ),
    "toktra_stage_up": ("gauge", "1 when the stage reported within 5 seconds."),
    "toktra_stage_pid": ("gauge", "Process id of the stage's current run."),
    "toktra_stage_restarts_total": (
        "counter",
        "Times the stage was started again after it died.",
    ),
    "toktra_stage_failing": (
        "gauge",
        "1 while the supervisor sees the stage dying again and again.",
    ),
}
_SUFFIXES = ("_bucket", "_count", "_sum")

Key = tuple[str, tuple[tuple[str, str], ...]]  # (sample name, sorted labels)


def _family(sample_name: str) -> str | None:
    if sample_name in DEFINITIONS:
        return sample_name
    for suffix in _SUFFIXES:
        base = sample_name.removesuffix(suffix)
        if base != sample_name and DEFINITIONS.get(base, ("",))[0] == "histogram":
            return base
    return None


def _monotonic(sample_name: str) -> bool:
    family = _family(sample_name)
    return family is not None and DEFINITIONS[family][0] in ("counter", "histogram")


@dataclass
class Life:
    """One run of one stage, as its newest snapshot describes it."""

    pid: int
    started: float
    seen_at: float
    samples: dict[Key, float] = field(default_factory=dict)


class Aggregator:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.lives: dict[str, Life] = {}
        self.base: dict[tuple[str, Key], float] = {}
        self.restarts: dict[str, int] = {}
        self.ignored: set[str] = set()

    def update(
        self, stage: str, pid: int, started: float, samples: list[stats.Sample]
    ) -> None:
        current = self.lives.get(stage)
        if current is not None and (current.pid, current.started) != (pid, started):
            # A new life: what the old one counted becomes part of the base.
            for key, value in current.samples.items():
                if _monotonic(key[0]):
                    self.base[(stage, key)] = self.base.get((stage, key), 0.0) + value
            self.restarts[stage] = self.restarts.get(stage, 0) + 1
            current = None
        life = current or Life(pid, started, self.clock())
        life.seen_at = self.clock()
        for name, labels, value in samples:
            if _family(name) is None:
                if name not in self.ignored:
                    self.ignored.add(name)
                    log.warning("stage %s reports unknown metric %s", stage, name)
                continue
            key = (name, tuple(sorted(labels.items())))
            if _monotonic(name):
                # Within one life a counter only grows, even if a message
                # arrives out of order.
                value = max(value, life.samples.get(key, 0.0))
            life.samples[key] = value
        self.lives[stage] = life

    def up(self, stage: str) -> bool:
        life = self.lives.get(stage)
        return life is not None and self.clock() - life.seen_at < STALE_AFTER_S

    def values(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every exported sample: name and labels (stage included) -> value."""
        out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}

        def add(stage: str, key: Key, value: float) -> None:
            name, labels = key
            merged = dict(labels)
            merged.setdefault("stage", stage)
            full = (name, tuple(sorted(merged.items())))
            out[full] = out.get(full, 0.0) + value

        for (stage, key), value in self.base.items():
            add(stage, key, value)
        for stage, life in self.lives.items():
            for key, value in life.samples.items():
                add(stage, key, value)
        for stage in stats.STAGES:
            if stage not in ("supervisor", "metrics"):
                up = 1.0 if self.up(stage) else 0.0
                add(stage, ("toktra_stage_up", ()), up)
        for stage, life in self.lives.items():
            add(stage, ("toktra_stage_pid", ()), float(life.pid))
        add("metrics", ("toktra_stage_pid", ()), float(os.getpid()))
        if "supervisor" not in self.lives:
            # Without a supervisor (one unit per stage) a new pid is the only
            # sign of a restart; with one, it reports its own count.
            for stage, count in self.restarts.items():
                add(stage, ("toktra_stage_restarts_total", ()), float(count))
        return out


class AggregatorCollector:
    """Presents the aggregator to prometheus_client's exposition code."""

    def __init__(self, aggregator: Aggregator, lock: threading.Lock) -> None:
        self.aggregator = aggregator
        self.lock = lock

    def collect(self) -> Iterator[Metric]:
        with self.lock:
            values = self.aggregator.values()
        families: dict[str, Metric] = {}
        for (name, labels), value in sorted(values.items()):
            family = _family(name)
            assert family is not None
            if family not in families:
                kind, text = DEFINITIONS[family]
                families[family] = Metric(family.removesuffix("_total"), text, kind)
            families[family].add_sample(name, dict(labels), value)
        yield from families.values()


class _Handler(http.server.BaseHTTPRequestHandler):
    server: MetricsServer
    timeout = REQUEST_DEADLINE_S

    def setup(self) -> None:
        super().setup()
        # A per-read timeout does not stop a client that sends a byte every
        # few seconds; this ends the whole exchange at the deadline.
        self._deadline = threading.Timer(REQUEST_DEADLINE_S, self._cut)
        self._deadline.daemon = True
        self._deadline.start()

    def _cut(self) -> None:
        with contextlib.suppress(OSError):
            self.request.shutdown(socket.SHUT_RDWR)

    def finish(self) -> None:
        self._deadline.cancel()
        with contextlib.suppress(OSError):
            super().finish()

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] != "/metrics":
            self._reply(404, b"only /metrics is served here\n", "text/plain")
            return
        body = generate_latest(self.server.registry)
        self._reply(200, body, "text/plain; version=0.0.4; charset=utf-8")

    def _reply(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("metrics request from %s: " + format, self.client_address[0], *args)


class MetricsServer(http.server.ThreadingHTTPServer):
    """One thread per scrape, at most MAX_CLIENTS at once; more are closed."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def process_request(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def __init__(self, address: tuple[str, int], registry: CollectorRegistry) -> None:
        self.registry = registry
        self._slots = threading.BoundedSemaphore(MAX_CLIENTS)
        ipv6 = ":" in address[0]
        self.address_family = socket.AF_INET6 if ipv6 else socket.AF_INET
        super().__init__(address, _Handler)


def prepare(config: Config) -> Callable[[Readiness, StopSignals], int]:
    return lambda ready, signals: run(config, ready, signals)


def run(config: Config, ready: Readiness, signals: StopSignals) -> int:
    aggregator = Aggregator()
    lock = threading.Lock()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AggregatorCollector(aggregator, lock))
    where = f"{config.metrics_address}:{config.metrics_port}"
    try:
        server = MetricsServer((config.metrics_address, config.metrics_port), registry)
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            why = (
                f"metrics address {where} is already in use (a Prometheus server "
                "listens on 9090 by default); set metrics_port to a free port"
            )
        else:
            why = f"cannot serve metrics on {where}: {err.strerror or err}"
        log.error("%s", why)
        ready.failed(why)
        return EXIT_CONFIG
    if not ipaddress.ip_address(config.metrics_address).is_loopback:
        log.warning(
            "metrics served on %s, beyond this host: anyone who can reach it "
            "sees the agent's counters",
            where,
        )
    thread = threading.Thread(target=server.serve_forever, name="metrics-http")
    thread.daemon = True
    thread.start()
    ctx = zmq.Context.instance()
    inp = ctx.socket(zmq.PULL)
    inp.setsockopt(zmq.RCVHWM, 1000)
    inp.setsockopt(zmq.LINGER, 0)
    inp.bind(endpoint(config.run_dir, "stats"))
    ready.ready(f"metrics on http://{where}/metrics")
    invalid = 0
    try:
        while not signals.stopping:
            ready.alive()
            if not inp.poll(POLL_MS):
                continue
            while True:
                try:
                    data = inp.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                try:
                    message = stats.decode(data)
                except stats.StatsError as err:
                    invalid += 1
                    if invalid == 1:
                        log.error("ignored an invalid stats message: %s", err)
                    continue
                with lock:
                    aggregator.update(*message)
    finally:
        server.shutdown()
        server.server_close()
        inp.close()
        ctx.term()
    log.info("metrics stopped (%d invalid stats messages)", invalid)
    return 0
