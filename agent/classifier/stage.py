"""Classifier stage loop: receive, classify, forward; count what is left.

It takes whatever batches are queued, classifies every connection in them
and forwards the events of the whole pass as one batch.
"""

from __future__ import annotations

import collections
import logging
import os
import pwd
import uuid
from collections.abc import Callable
from typing import Any

import zmq

from agent import stats, wire
from agent.classifier.catalog import Catalog, estimate_tokens
from agent.classifier.normalize import normalize_sni
from agent.config import Config
from agent.connections import SOCKET_NAME, Table, TableServer
from agent.outbox import Outbox, received
from agent.outbox import configure as outbox_socket
from agent.runtime import DropCounter, Readiness, StopSignals, endpoint
from agent.tap import Tap

log = logging.getLogger("toktra.classifier")

POLL_MS = 100
RETRY_MS = 10
RECV_BURST = 64  # messages taken per pass; each may hold a whole batch
EXIT_LINGER_MS = 3000


class Classifier:
    """Connection metadata in, a provider event or nothing out."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.unmatched: collections.Counter[str] = collections.Counter()
        self.matched = 0
        self._users: dict[int, str | None] = {}

    def user(self, uid: int) -> str | None:
        if uid not in self._users:
            try:
                self._users[uid] = pwd.getpwuid(uid).pw_name
            except KeyError:
                self._users[uid] = None
        return self._users[uid]

    def classify(
        self, conn: dict[str, Any], count: bool = True
    ) -> dict[str, Any] | None:
        """The event for a connection to an LLM provider, else None.

        `count` is false for open connections (the table's open set and
        progress reports): they are counted once, when they close.
        """
        raw = conn["sni"].encode("latin-1") if conn["sni"] is not None else None
        sni = normalize_sni(raw, conn["sni_truncated"])
        if sni.hostname is None:
            if count:
                self.unmatched[str(sni.reason)] += 1
            return None
        match = self.catalog.match(sni.hostname)
        if match is None:
            if count:
                self.unmatched["no_provider"] += 1
            return None
        if count:
            self.matched += 1
        return {
            "event_id": uuid.uuid4().hex,
            "conn_id": conn["conn_id"],
            "final": conn["final"],
            "timestamp": conn["timestamp"],
            "duration_ns": conn["duration_ns"],
            "pid": conn["pid"],
            "comm": conn["comm"],
            "exe": conn["exe"],
            "uid": conn["uid"],
            "user": self.user(conn["uid"]),
            "src_port": conn["src_port"],
            "dst_ip": conn["dst_ip"],
            "dst_port": conn["dst_port"],
            "dst_hostname": sni.hostname,
            "sni_source": conn["sni_source"],
            "bytes_sent": conn["bytes_sent"],
            "bytes_received": conn["bytes_received"],
            "provider": match.provider,
            "category": match.category,
            "est_tokens_in": estimate_tokens(
                conn["bytes_sent"], match.bytes_per_token_in
            ),
            "est_tokens_out": estimate_tokens(
                conn["bytes_received"], match.bytes_per_token_out
            ),
        }


def prepare(config: Config) -> Callable[[Readiness, StopSignals], int]:
    classifier = Classifier(Catalog.load())
    return lambda ready, signals: run(config, classifier, ready, signals)


def run(
    config: Config, classifier: Classifier, ready: Readiness, signals: StopSignals
) -> int:
    ctx = zmq.Context.instance()
    inp = ctx.socket(zmq.PULL)
    outbox_socket(inp)
    inp.setsockopt(zmq.LINGER, 0)
    inp.bind(endpoint(config.run_dir, "classifier"))
    out = ctx.socket(zmq.PUSH)
    outbox_socket(out)
    out.setsockopt(zmq.LINGER, EXIT_LINGER_MS)
    out.connect(endpoint(config.run_dir, "shipper"))
    tap = Tap(ctx, config.run_dir, "classifier", config.taps)
    table = Table(config.connections_window_seconds)
    server = TableServer(
        table, os.path.join(config.run_dir, SOCKET_NAME), os.getgid()
    ).start()
    invalid = {"messages": 0}
    drops = DropCounter(log, "events")
    outbox = Outbox(out, "event", config.queue_max_messages, drops, tap, "shipper")

    def samples() -> list[stats.Sample]:
        out: list[stats.Sample] = [
            (
                "toktra_connections_classified_total",
                {"result": "llm"},
                classifier.matched,
            ),
            ("toktra_events_dropped_total", {"reason": "queue_full"}, drops.total),
            (
                "toktra_events_dropped_total",
                {"reason": "invalid_message"},
                invalid["messages"],
            ),
        ]
        for reason, n in classifier.unmatched.items():
            out.append(("toktra_connections_classified_total", {"result": reason}, n))
        return out

    debug = log.isEnabledFor(logging.DEBUG)  # spares formatting per event

    def take(data: bytes) -> None:
        if wire.kind_of(data) == "open_set":
            opened = wire.decode_open_set(data)
            table.set_open(
                e
                for e in (classifier.classify(c, count=False) for c in opened)
                if e is not None
            )
            return
        batch = wire.decode_batch("connection", data)
        for error in batch.errors:
            invalid["messages"] += 1
            log.error("dropped an invalid connection message: %s", error)
        for conn in batch.bodies:
            # A progress report (final false) is shipped like the close, but
            # the connection is counted once, when it closes; the table
            # learns its counts from the next open set.
            event = classifier.classify(conn, count=conn["final"])
            if event is None:
                continue
            if event["final"]:
                table.closed(event)
            if debug:
                log.debug(
                    "classified conn=%s pid=%d host=%s provider=%s",
                    event["conn_id"],
                    event["pid"],
                    event["dst_hostname"],
                    event["provider"],
                )
            outbox.put(event)

    reporter = stats.Reporter(ctx, config.run_dir, "classifier", samples)
    ready.ready("classifying")
    draining = False
    try:
        while True:
            reporter.tick()
            ready.alive()
            if signals.stopping and not draining:
                # The supervisor stops the collector first; what it sent
                # is already queued here, so empty the queue, then leave.
                draining = True
            # With events waiting for the shipper, look again soon.
            wait_ms = 0 if draining else (RETRY_MS if len(outbox) else POLL_MS)
            if not inp.poll(wait_ms):
                outbox.flush()
                if draining:
                    break
                continue
            for data in received(inp, RECV_BURST):
                try:
                    take(data)
                except wire.WireError as e:
                    invalid["messages"] += e.bodies
                    log.error("dropped an invalid connection message: %s", e)
            outbox.flush()
        outbox.drain(EXIT_LINGER_MS / 1000)
    finally:
        server.close()
        reporter.close()
        tap.close()
        inp.close()
        out.close()
        ctx.term()
    log.info(
        "classifier stopped: matched=%d forwarded=%d dropped=%d invalid=%d "
        "unmatched=%s",
        classifier.matched,
        outbox.sent,
        drops.total,
        invalid["messages"],
        dict(classifier.unmatched),
    )
    return 0
