"""The collector stage: kernel records in, `connection` messages out.

The only privileged stage. It loads the BPF object, drains the ring
buffer on a short timer (records are submitted without waking us, which
is far cheaper than a wake-up per record), and pushes what each drain
produced to the classifier as one batch, without ever blocking: when the
classifier falls behind, connections wait in a bounded outbox, and beyond
its bound they are dropped and counted.

Every progress interval it also reads the byte counts of open connections
from sock_diag and reports those open long enough (`final` false). At
start it adopts the connections that were already open. When BPF cannot
load at all, it falls back to polling sock_diag alone (degraded: bytes
and processes, no names), and says so in its log, status and metrics.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time

import zmq

from agent import stats, wire
from agent.collector import carryover, probes, sockdiag
from agent.collector.libbpf import BpfError
from agent.collector.polling import WATCHED_STATES, Poller
from agent.collector.records import Flag, Kind, Record, Stat
from agent.collector.tracker import (
    Counts,
    Endpoints,
    Tracker,
    boot_id,
    proc_comm,
    proc_exe,
)
from agent.config import Config
from agent.outbox import Outbox
from agent.outbox import configure as outbox_socket
from agent.runtime import (
    DropCounter,
    Episode,
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
        self.outbox: Outbox | None = None
        self.drops = DropCounter(log, "connections")
        self.diag_errors = 0
        # Logged once per run of failures: a missing tcp_diag module would
        # otherwise log the same line every progress tick.
        self.diag_trouble = Episode(
            log,
            "sock_diag dump failed, no progress reports until it works "
            '(counted in toktra_bpf_errors_total{kind="sock_diag"})',
            "sock_diag dumps work again",
        )
        self.netns_trouble = Episode(
            log,
            "sock_diag cannot read some network namespaces (containers): their "
            "connections get no progress reports and are not adopted",
            "every network namespace can be read again",
        )
        self._kernel_stats: dict[Stat, int] = {}

    @property
    def sent(self) -> int:
        return self.outbox.sent if self.outbox is not None else 0

    def send(self, outbox: Outbox, tracker: Tracker | Poller) -> None:
        """Everything the last drain produced, in as few messages as fit."""
        for conn in tracker.take():
            outbox.put(conn)
        outbox.flush()

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
                capture.watcher.errors,
            ),
            *(
                ("toktra_libssl_skipped_total", {"reason": reason}, n)
                for reason, n in sorted(capture.watcher.skipped.items())
            ),
            (
                "toktra_active_connections",
                {},
                capture.tracked_connections() + tracker.adopted_open,
            ),
            ("toktra_bpf_errors_total", {"kind": "sock_diag"}, self.diag_errors),
            (
                "toktra_probe_mode",
                {"send_hook": capture.send_hook, "configured": capture.requested},
                1,
            ),
            ("toktra_capture_degraded", {}, 0),
            ("toktra_libssl_attached", {}, len(capture.libraries)),
            ("toktra_progress_reports_total", {}, tracker.stats.progress),
            ("toktra_connections_adopted_total", {}, tracker.stats.adopted),
            *self.hello_samples(kernel, tracker),
        ]

    @staticmethod
    def hello_samples(kernel: dict[Stat, int], tracker: Tracker) -> list[stats.Sample]:
        """ClientHello outcomes: the kernel's (not TLS, given up) and ours."""
        counts = dict(tracker.stats.hello)
        counts["not_tls_record"] = kernel[Stat.HELLO_NOT_TLS]
        counts["incomplete"] = kernel[Stat.HELLO_PARTIAL]
        counts["out_of_order"] = tracker.stats.hello_gaps
        return [
            ("toktra_clienthello_total", {"outcome": outcome}, n)
            for outcome, n in sorted(counts.items())
        ]

    def run(self, ready: Readiness, signals: StopSignals) -> int:
        cfg = self.config
        if cfg.capture_mode == "sockdiag":
            return self.run_degraded(ready, signals, "capture_mode is sockdiag")
        try:
            capture = probes.load(
                cfg.ports, cfg.send_hook, cfg.bpf_object, cfg.libssl_paths
            )
        except probes.ProbeError as e:
            # A host that cannot run BPF still gets connections and bytes;
            # a broken install (no object, a bad path) is an error to fix.
            if cfg.capture_mode == "auto" and e.environment:
                return self.run_degraded(ready, signals, str(e))
            log.error("capture cannot start: %s", e)
            ready.failed(str(e))
            return 3
        return self.run_bpf(capture, ready, signals)

    def run_degraded(self, ready: Readiness, signals: StopSignals, why: str) -> int:
        """Connections and bytes from sock_diag polling, without names."""
        cfg = self.config
        log.error(
            "DEGRADED capture: %s. Polling sock_diag every %.1f s instead: "
            "connections, processes and bytes are reported, but no server "
            "names, so none classifies as an LLM provider and nothing is "
            "shipped; connections shorter than a poll are missed",
            why,
            cfg.poll_interval_seconds,
        )
        poller = Poller(cfg.ports, boot_id(), int(cfg.progress_interval_seconds * 1e9))
        ctx = zmq.Context.instance()
        out, tap, outbox = self._outputs(ctx)

        def samples() -> list[stats.Sample]:
            return [
                # No ring buffer: what the polls produced stands for it.
                (
                    "toktra_events_received_total",
                    {},
                    self.sent + len(outbox) + self.drops.total,
                ),
                ("toktra_connections_sent_total", {}, self.sent),
                (
                    "toktra_events_dropped_total",
                    {"reason": "queue_full"},
                    self.drops.total,
                ),
                ("toktra_bpf_errors_total", {"kind": "sock_diag"}, poller.stats.errors),
                ("toktra_active_connections", {}, poller.stats.tracked),
                (
                    "toktra_probe_mode",
                    {"send_hook": "none", "configured": cfg.send_hook},
                    1,
                ),
                ("toktra_capture_degraded", {}, 1),
                ("toktra_libssl_attached", {}, 0),
            ]

        reporter = stats.Reporter(ctx, cfg.run_dir, "collector", samples)
        ready.ready(
            "capture without BPF, polling sock_diag: no server names", degraded=True
        )
        next_poll = 0.0
        try:
            while not signals.stopping:
                if time.monotonic() >= next_poll:
                    poller.poll(time.clock_gettime_ns(time.CLOCK_BOOTTIME))
                    next_poll = time.monotonic() + cfg.poll_interval_seconds
                    self.send(outbox, poller)
                reporter.tick()
                ready.alive()
                time.sleep(min(max(next_poll - time.monotonic(), 0), 0.2))
        finally:
            outbox.drain(EXIT_LINGER_MS / 1000)
            reporter.close()
            tap.close()
            out.close()
            ctx.term()
        log.info("collector stopped (degraded): sent=%d", self.sent)
        return 0

    def run_bpf(
        self, capture: probes.Capture, ready: Readiness, signals: StopSignals
    ) -> int:
        cfg = self.config
        tracker = Tracker(
            boot_id(),
            proc_exe(),
            on_library=lambda lib: capture.on_mapped(lib.pid, lib.dev, lib.ino),
        )
        ctx = zmq.Context.instance()
        out, tap, outbox = self._outputs(ctx)
        reporter = stats.Reporter(
            ctx, cfg.run_dir, "collector", lambda: self.samples(capture, tracker)
        )
        ring = capture.ring_buffer(tracker.on_record)
        self.adopt_open(capture, tracker, ring)
        log.info("send hook: %s", capture.send_hook)
        ready.ready(f"capturing, send hook {capture.send_hook}")
        interval_ns = int(cfg.progress_interval_seconds * 1e9)
        next_stats = time.monotonic() + STATS_INTERVAL_S
        next_open_set = 0.0
        next_progress = time.monotonic() + cfg.progress_interval_seconds
        try:
            while not signals.stopping:
                ring.poll(DRAIN_INTERVAL_MS)
                ring.consume()
                if time.monotonic() >= next_progress:
                    self.report_progress(tracker, capture, ring, interval_ns)
                    next_progress = time.monotonic() + cfg.progress_interval_seconds
                self.send(outbox, tracker)
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
            # Stop what makes records, hand over the rest, and only then
            # let the uprobes go (slow: about 0.1 s each).
            capture.detach_events()
            ring.consume()
            self.send(outbox, tracker)
            outbox.drain(EXIT_LINGER_MS / 1000)
            self.save_open(tracker, capture)
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

    def _outputs(self, ctx: zmq.Context) -> tuple[zmq.Socket, Tap, Outbox]:
        cfg = self.config
        out = ctx.socket(zmq.PUSH)
        outbox_socket(out)
        out.setsockopt(zmq.LINGER, EXIT_LINGER_MS)
        out.connect(endpoint(cfg.run_dir, "classifier"))
        tap = Tap(ctx, cfg.run_dir, "collector", cfg.taps, _agent_group(cfg.user))
        self.outbox = Outbox(
            out, "connection", cfg.queue_max_messages, self.drops, tap, "classifier"
        )
        return out, tap, self.outbox

    def dump(self, states: int) -> list[sockdiag.TcpSocket] | None:
        """Watched sockets in every network namespace, or None if ours fails."""
        try:
            dumped = sockdiag.dump_all(self.config.ports, states)
        except sockdiag.SockDiagError as e:
            self.diag_errors += 1
            self.diag_trouble.happened(str(e))
            return None
        self.diag_trouble.over()
        if dumped.failed:
            self.diag_errors += len(dumped.failed)
            path, why = next(iter(dumped.failed.items()))
            self.netns_trouble.happened(
                f"{len(dumped.failed)} of {dumped.namespaces + len(dumped.failed)} "
                f"(first: {path}: {why})",
                logging.WARNING,
            )
        else:
            self.netns_trouble.over()
        return dumped.sockets

    def open_counts(self) -> dict[Endpoints, Counts] | None:
        """Byte counts of the open connections on watched ports, or None."""
        sockets = self.dump(WATCHED_STATES)
        if sockets is None:
            return None
        counts: dict[Endpoints, Counts] = {}
        twice: set[Endpoints] = set()
        for s in sockets:
            if not s.has_counters:
                continue
            key = _endpoints(s)
            if key in counts:
                twice.add(key)  # the same endpoints in two namespaces
            counts[key] = (s.bytes_acked, s.bytes_received)
        # Which of the two a kernel record means is unknown: report neither
        # rather than the wrong one's bytes; their finals are exact anyway.
        for key in twice:
            del counts[key]
        return counts

    def report_progress(
        self, tracker: Tracker, capture: probes.Capture, ring, interval_ns: int
    ) -> None:
        # Dump first, then drain: a connection missing from the dump has
        # its close record in the ring by then, if it has one at all.
        counts = self.open_counts()
        ring.consume()
        if counts is not None:
            now = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
            tracker.progress(counts, now, interval_ns, capture.bound_sni)
        self.save_open(tracker, capture)

    def save_open(self, tracker: Tracker, capture: probes.Capture) -> None:
        """Leaves the open named connections to the next run."""
        path = os.path.join(self.config.run_dir, carryover.FILE_NAME)
        try:
            carryover.save(path, tracker.boot, tracker.carry(capture.bound_sni))
        except OSError as e:
            log.warning("cannot save open connections to %s: %s", path, e.strerror)

    def adopt_open(self, capture: probes.Capture, tracker: Tracker, ring) -> None:
        """Tracks the connections that were open before the probes were."""
        sockets = self.dump(sockdiag.ESTABLISHED_ONLY)
        if sockets is None:
            log.error("cannot list connections open before start (see above)")
            return
        ring.consume()
        known = set(tracker.open_endpoints())
        fresh = [s for s in sockets if _endpoints(s) not in known]
        pids = sockdiag.pids_by_inode({s.inode for s in fresh})
        carried = carryover.load(
            os.path.join(self.config.run_dir, carryover.FILE_NAME), tracker.boot
        )
        now = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
        adopted = resumed = 0
        for s in fresh:
            pid = pids.get(s.inode, 0)
            before = carried.get(_endpoints(s))
            # A connection the previous run named keeps its start.
            start = before.start_unix_ns - tracker.offset() if before else now
            rec = _adopted_record(s, pid, start)
            counts = (s.bytes_acked, s.bytes_received)
            if not tracker.adopt(rec, s.cookie, counts, before):
                continue
            resumed += before is not None
            try:
                capture.adopt(s.cookie)
            except BpfError as e:
                log.warning("connection %s:%d not adopted: %s", s.dst_ip, s.dst_port, e)
                continue
            adopted += 1
        if adopted:
            log.info(
                "adopted %d connections open before start, %d of them named by "
                "the previous run (the others have no SNI: their handshakes "
                "happened before the probes)",
                adopted,
                resumed,
            )


def _agent_group(user: str) -> int | None:
    """The gid of the stages' user, whose group may use the collector's tap."""
    try:
        return lookup_account(user).gid
    except LookupError:
        return None


def _endpoints(s: sockdiag.TcpSocket) -> Endpoints:
    return (s.src_ip, s.src_port, s.dst_ip, s.dst_port)


def _adopted_record(s: sockdiag.TcpSocket, pid: int, now_ns: int) -> Record:
    """A stand-in OPEN record for a connection found open, dated `now_ns`."""
    return Record(
        kind=Kind.OPEN,
        flags=Flag.ADOPTED,
        pid=pid,
        tid=pid,
        uid=s.uid,
        sock=s.cookie,
        start_ns=now_ns,
        end_ns=now_ns,
        bytes_acked=s.bytes_acked,
        bytes_received=s.bytes_received,
        src_ip=s.src_ip,
        src_port=s.src_port,
        dst_ip=s.dst_ip,
        dst_port=s.dst_port,
        comm=proc_comm(pid) if pid else "",
        exe_name=os.path.basename(proc_exe()(pid) or "") if pid else "",
        sni=None,
    )
