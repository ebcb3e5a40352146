"""The collector stage: kernel records in, `connection` messages out.

The only privileged stage. It loads the BPF object, drains the ring
buffer on a short timer (records are submitted without waking us, which
is far cheaper than a wake-up per record), and pushes one message per
closed connection to the classifier without ever blocking: when the
classifier falls behind and the queue is full, messages are dropped and
counted.
"""

from __future__ import annotations

import contextlib
import logging
import time

import zmq

from agent import stats, wire
from agent.collector import probes
from agent.collector.records import Stat
from agent.collector.tracker import Tracker, boot_id, proc_exe
from agent.config import Config
from agent.runtime import (
    DropCounter,
    Readiness,
    StopSignals,
    endpoint,
    lookup_account,
)
from agent.tap import Tap

log = logging.getLogger("toktra.collector")

DRAIN_INTERVAL_MS = 50
STATS_INTERVAL_S = 10.0
OPEN_SET_INTERVAL_S = 1.0
EXIT_LINGER_MS = 3000


class Collector:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.sent = 0
        self.drops = DropCounter(log, "connections")
        self._kernel_stats: dict[Stat, int] = {}

    def send(self, out: zmq.Socket, tracker: Tracker, tap: Tap) -> None:
        for conn in tracker.take():
            data = wire.encode("connection", conn)
            tap.publish(data)
            try:
                out.send(data, zmq.NOBLOCK)
            except zmq.Again:
                self.drops.dropped(
                    f"the classifier's queue is full "
                    f"({self.config.queue_max_messages} messages)"
                )
                continue
            self.sent += 1
            self.drops.passed()

    def send_open_set(
        self, out: zmq.Socket, tracker: Tracker, capture: probes.Capture
    ) -> None:
        """The open, named connections, for the classifier's table."""
        now = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
        conns = tracker.open_named(capture.bound_sni, now, wire.MAX_OPEN_SET)
        # A lost snapshot is replaced by the next one; nothing to count.
        with contextlib.suppress(zmq.Again):
            out.send(wire.encode_open_set(conns), zmq.NOBLOCK)

    def read_kernel_stats(self, capture: probes.Capture) -> dict[Stat, int]:
        """The kernel's counters, read once per report; new drops are logged."""
        stats = capture.stats()
        full = stats[Stat.RINGBUF_FULL] - self._kernel_stats.get(Stat.RINGBUF_FULL, 0)
        if full:
            log.error(
                "ring buffer full: the kernel dropped %d records since the last "
                "look (counted as toktra_events_dropped_total{reason="
                '"ring_buffer_full"}); the collector is not draining fast enough',
                full,
            )
        self._kernel_stats = stats
        return stats

    def samples(self, capture: probes.Capture, tracker: Tracker) -> list[stats.Sample]:
        kernel = self.read_kernel_stats(capture)
        return [
            ("toktra_events_received_total", {}, tracker.stats.records),
            ("toktra_connections_sent_total", {}, self.sent),
            (
                "toktra_events_dropped_total",
                {"reason": "ring_buffer_full"},
                kernel[Stat.RINGBUF_FULL],
            ),
            ("toktra_events_dropped_total", {"reason": "queue_full"}, self.drops.total),
            (
                "toktra_events_dropped_total",
                {"reason": "bad_record"},
                tracker.stats.bad_records,
            ),
            ("toktra_bpf_errors_total", {"kind": "read"}, kernel[Stat.READ_ERRORS]),
            (
                "toktra_bpf_errors_total",
                {"kind": "libssl_attach"},
                len(capture.attach_failures),
            ),
            ("toktra_active_connections", {}, capture.tracked_connections()),
            ("toktra_probe_mode", {"send_hook": capture.send_hook}, 1),
            ("toktra_libssl_attached", {}, len(capture.libraries)),
        ]

    def run(self, ready: Readiness, signals: StopSignals) -> int:
        cfg = self.config
        try:
            capture = probes.load(
                cfg.ports, cfg.send_hook, cfg.bpf_object, cfg.libssl_paths
            )
        except probes.ProbeError as e:
            log.error("capture cannot start: %s", e)
            ready.failed(str(e))
            return 3
        tracker = Tracker(boot_id(), proc_exe())
        ctx = zmq.Context.instance()
        out = ctx.socket(zmq.PUSH)
        out.setsockopt(zmq.SNDHWM, cfg.queue_max_messages)
        out.setsockopt(zmq.LINGER, EXIT_LINGER_MS)
        out.connect(endpoint(cfg.run_dir, "classifier"))
        tap = Tap(ctx, cfg.run_dir, "collector", cfg.taps, _agent_group(cfg.user))
        reporter = stats.Reporter(
            ctx, cfg.run_dir, "collector", lambda: self.samples(capture, tracker)
        )
        ring = capture.ring_buffer(tracker.on_record)
        log.info("send hook: %s", capture.send_hook)
        ready.ready(f"capturing, send hook {capture.send_hook}")
        next_stats = time.monotonic() + STATS_INTERVAL_S
        next_open_set = 0.0
        try:
            while not signals.stopping:
                ring.poll(DRAIN_INTERVAL_MS)
                ring.consume()
                self.send(out, tracker, tap)
                if time.monotonic() >= next_open_set:
                    self.send_open_set(out, tracker, capture)
                    next_open_set = time.monotonic() + OPEN_SET_INTERVAL_S
                reporter.tick()
                ready.alive()
                if time.monotonic() >= next_stats:
                    log.debug(
                        "kernel counters: %s",
                        {k.name.lower(): v for k, v in self._kernel_stats.items()},
                    )
                    next_stats = time.monotonic() + STATS_INTERVAL_S
        finally:
            # Detach first so nothing new arrives, then hand over the rest.
            capture.detach()
            ring.consume()
            self.send(out, tracker, tap)
            reporter.close()
            ring.free()
            capture.close()
            tap.close()
            out.close()
            ctx.term()
        log.info(
            "collector stopped: records=%d connections=%d sent=%d dropped=%d",
            tracker.stats.records,
            tracker.stats.connections,
            self.sent,
            self.drops.total,
        )
        return 0


def _agent_group(user: str) -> int | None:
    """The gid of the stages' user, whose group may use the collector's tap."""
    try:
        return lookup_account(user).gid
    except LookupError:
        return None
