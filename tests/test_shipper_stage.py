"""The shipper's loop logic on a real spool and the real local sink."""

from __future__ import annotations

import dataclasses
import datetime
import json
from pathlib import Path

from agent.config import Config
from agent.shipper.sinks import JsonlSink
from agent.shipper.spool import BATCH_NAME, Spool
from agent.shipper.stage import Shipper
from tests.shipper_harness import make_event


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(tmp_path: Path, clock: Clock, **overrides: object) -> Shipper:
    config = dataclasses.replace(
        Config(), state_dir=str(tmp_path), batch_max_events=50, **overrides
    )
    spool = Spool(str(tmp_path / "spool"), config.spool_max_bytes)
    spool.open()
    return Shipper(config, spool, JsonlSink(str(tmp_path / "out.jsonl")), clock=clock)


def written(tmp_path: Path) -> list[str]:
    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    return [json.loads(line)["event_id"] for line in lines]


def test_a_large_burst_becomes_whole_batches_each_spooled_once(tmp_path: Path) -> None:
    clock = Clock()
    shipper = make(tmp_path, clock)
    events = [make_event(n) for n in range(175)]
    shipper.receive(events)
    sealed = sorted(
        p.name for p in (tmp_path / "spool").iterdir() if BATCH_NAME.fullmatch(p.name)
    )
    assert [name.rsplit("-", 1)[1] for name in sealed] == ["50.jsonl"] * 3
    for name in sealed:
        assert len((tmp_path / "spool" / name).read_text().splitlines()) == 50
    assert len(shipper.batcher) == 25
    shipper.step()
    assert written(tmp_path) == [e["event_id"] for e in events[:150]]
    clock.now += 5.0  # the last 25 are due by age
    shipper.step()
    assert written(tmp_path) == [e["event_id"] for e in events]
    assert shipper.spool.buffered_events() == 0
    assert shipper.stats.sent == 175 and shipper.stats.batches_sent == 4


def test_events_spooled_but_not_sent_survive_a_new_shipper(tmp_path: Path) -> None:
    clock = Clock()
    first = make(tmp_path, clock)
    events = [make_event(n) for n in range(80)]
    first.receive(events)  # one sealed batch, 30 in the open one; nothing sent
    second = make(tmp_path, clock)
    second.step()
    assert written(tmp_path) == [e["event_id"] for e in events]


def test_an_open_breaker_is_waited_for_not_polled(tmp_path: Path) -> None:
    clock = Clock()
    shipper = make(tmp_path, clock, breaker_failures=1, breaker_open_seconds=30.0)
    shipper.receive([make_event(n) for n in range(50)])  # one sealed batch
    shipper.breaker.failure("500")  # open for 30 s
    shipper.retry_at = clock.now + 0.5
    clock.now += 1.0  # the retry delay has passed; the breaker is still open
    # The loop would spin with a zero timeout; it must sleep the rest instead.
    assert shipper.timeout_ms() == 100  # POLL_CAP_MS: nothing else is due
    shipper.batcher.add(make_event(99))
    assert shipper.timeout_ms() == 100
    shipper.step()
    assert written(tmp_path) == []  # nothing sent while open


def test_a_clock_far_ahead_does_not_renew_before_every_batch(tmp_path: Path) -> None:
    """Real enrollment against the reference service, on a skewed clock."""
    from agent.ingest.server import IngestServer
    from agent.shipper.identity import Identity
    from agent.shipper.sinks import HttpsSink

    server = IngestServer(
        str(tmp_path / "ingest"), token="t", cert_lifetime=datetime.timedelta(hours=1)
    ).start()
    try:
        # This host believes it is 50 minutes later than it is: each new
        # one-hour certificate looks due for renewal the moment it arrives.
        skew = datetime.timedelta(minutes=50)
        clock = Clock()
        config = dataclasses.replace(
            Config(), state_dir=str(tmp_path), batch_max_events=5
        )
        spool = Spool(str(tmp_path / "spool"), config.spool_max_bytes)
        spool.open()
        identity = Identity(
            str(tmp_path), "dev-1", server.enroll_url, "t", verify=server.ca_file
        )
        sink = HttpsSink(server.url, "dev-1", "0", ca_file=server.ca_file)
        shipper = Shipper(
            config,
            spool,
            sink,
            identity,
            clock=clock,
            wallclock=lambda: datetime.datetime.now(datetime.UTC) + skew,
        )
        for n in range(4):
            shipper.receive([make_event(n * 5 + i) for i in range(5)])
            shipper.step()
            clock.now += 1.0
        enrolls = [r for r in server.requests if r.path == "/v1/enroll"]
        events = [r for r in server.requests if r.path == "/v1/events"]
        assert len(enrolls) == 1 and len(events) == 4
        clock.now += 301.0  # the pause is over: one more try
        shipper.receive([make_event(99 + i) for i in range(5)])
        shipper.step()
        assert len([r for r in server.requests if r.path == "/v1/enroll"]) == 2
        sink.close()
    finally:
        server.stop()
