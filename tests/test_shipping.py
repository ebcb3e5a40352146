"""Shipping through outages, restarts and bad servers, end to end.

A real shipper process (dropped to the `toktra` user) sends to the project's
own reference service (`agent/ingest`) over mutual TLS; faults are scripted
through the service's test hooks. Every test checks what arrived against what
was pushed, by `event_id`.
"""

from __future__ import annotations

import datetime
import itertools
import json
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ed25519

from agent import wire
from agent.ingest.server import IncomingBatch, IngestServer
from tests.conftest import LLM_NAMES, needs_root_and_bpf
from tests.harness import AGENT, Agent, run_pyclient
from tests.shipper_harness import (
    STAGE_USER,
    ShipperStage,
    base_dir,
    make_event,
    wait_until,
)

TOKEN = "test-enrollment-token"


@pytest.fixture
def workdir() -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("needs root to run the stage as its own user")
    path = base_dir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def ingest(workdir: Path) -> Iterator[IngestServer]:
    server = IngestServer(str(workdir / "ingest"), token=TOKEN).start()
    yield server
    server.stop()


def shipper_settings(server: IngestServer, **extra: object) -> dict[str, object]:
    settings: dict[str, object] = {
        "ingest_url": server.url,
        "enroll_url": server.enroll_url,
        "enrollment_token": TOKEN,
        "ca_file": server.ca_file,
        "retry_max_seconds": 1.0,
        "breaker_failures": 5,
        "breaker_open_seconds": 2.0,
    }
    settings.update(extra)
    return settings


@pytest.fixture
def make_shipper(workdir: Path):
    made: list[ShipperStage] = []

    def make(server: IngestServer, **extra: object) -> ShipperStage:
        stage = ShipperStage(workdir, shipper_settings(server, **extra))
        made.append(stage)
        return stage

    yield make
    for stage in made:
        stage.close()


def received_ids(server: IngestServer) -> list[str]:
    return [e["event_id"] for e in server.received()]


def spooled_events(stage: ShipperStage) -> int:
    """Events in the spool: sealed batches (named for their count) and open."""
    spool = stage.state_dir / "spool"
    sealed = sum(int(p.stem.rsplit("-", 1)[1]) for p in spool.glob("b*-*.jsonl"))
    opened = spool / "open.jsonl"
    return sealed + (len(opened.read_bytes().splitlines()) if opened.exists() else 0)


def wait_delivered(server: IngestServer, stage: ShipperStage, timeout: float = 30):
    want = {e["event_id"] for e in stage.pushed}
    wait_until(
        lambda: want <= set(received_ids(server)),
        timeout,
        f"{len(want)} events at the ingest service",
        stage.log_text,
    )


def event_requests(server: IngestServer):
    return [r for r in server.requests if r.path == "/v1/events"]


def test_enrolls_then_delivers_over_mtls(ingest: IngestServer, make_shipper) -> None:
    stage = make_shipper(ingest).start()
    stage.push_new(120)
    wait_delivered(ingest, stage)

    key = stage.state_dir / "device.key"
    info = key.stat()
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert info.st_uid == stage.state_dir.stat().st_uid  # the stage's user
    cert = x509.load_pem_x509_certificate((stage.state_dir / "device.crt").read_bytes())
    device_id = (stage.state_dir / "device_id").read_text().strip()
    assert cert.subject.rfc4514_string() == f"CN={device_id}"
    assert isinstance(cert.public_key(), ed25519.Ed25519PublicKey)
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert abs(life - datetime.timedelta(days=90)) < datetime.timedelta(minutes=2)

    # Every batch went over mTLS as this device, and nothing arrived twice.
    batches = event_requests(ingest)
    assert batches and {r.client_cn for r in batches} == {device_id}
    assert sorted(received_ids(ingest)) == sorted(e["event_id"] for e in stage.pushed)
    assert {e["device_id"] for e in ingest.received()} == {device_id}
    assert TOKEN not in stage.log_text()

    # The service refuses the same request without a client certificate.
    answer = requests.post(
        ingest.url + "/v1/events",
        data=b"",
        headers={"Content-Encoding": "gzip"},
        verify=ingest.ca_file,
        timeout=10,
    )
    assert answer.status_code == 401
    assert stage.stop() == 0


def test_a_batch_with_a_bad_body_delivers_the_rest(
    ingest: IngestServer, make_shipper
) -> None:
    """Upstream sends batches; one off-schema body costs only itself."""
    stage = make_shipper(ingest).start()
    good = [make_event(n) for n in range(60)]
    bad = dict(make_event(99), bytes_sent=-1)
    stage.push_raw(wire.encode_batch("event", good[:30]))
    stage.push_raw(
        json.dumps({"type": "event", "v": 1, "bodies": [*good[30:], bad]}).encode()
    )
    stage.push_raw(b'{"type": "event", "v": 1, "bodies": "x"}')
    stage.pushed.extend(good)
    wait_delivered(ingest, stage)
    assert sorted(received_ids(ingest)) == sorted(e["event_id"] for e in good)
    log = stage.log_text()
    assert "dropped an invalid event message: event.bytes_sent is negative" in log
    assert "dropped an invalid event message: event: bodies is not a list" in log
    assert "Traceback" not in log
    assert stage.stop() == 0


def test_sigkill_during_a_send_loses_nothing(
    ingest: IngestServer, make_shipper
) -> None:
    # One batch of everything, sealed by time: all of it is on disk before
    # the request that hangs begins. (Events still in the ZeroMQ queue when
    # the shipper dies are the documented unacknowledged hop, not this.)
    stage = make_shipper(ingest, batch_max_events=500, batch_max_seconds=1.0)
    stage.start()
    stage.push_new(30)
    wait_delivered(ingest, stage)

    ingest.stall_s = 30.0  # the next request hangs before its body is read
    ingest.stalled.clear()
    stage.push_new(130)
    assert ingest.stalled.wait(20), stage.log_text()
    assert spooled_events(stage) == 130, stage.log_text()
    stage.kill()
    ingest.stall_s = 0.0
    # The batch in flight and the ones behind it are in the spool.
    assert stage.spool_files(), stage.log_text()

    stage.start()
    wait_delivered(ingest, stage)
    ids = received_ids(ingest)
    assert set(ids) == {e["event_id"] for e in stage.pushed}
    assert stage.stop() == 0
    assert stage.spool_files() == []


def test_breaker_opens_probes_once_per_window_and_closes(
    ingest: IngestServer, make_shipper
) -> None:
    failing = True

    def answer(batch: IncomingBatch):
        return (500, {}) if failing else None

    ingest.responder = answer
    stage = make_shipper(
        ingest, breaker_failures=3, breaker_open_seconds=2.0, retry_max_seconds=0.2
    )
    stage.start_metrics()
    stage.start()
    wait_until(lambda: stage.gauge("toktra_circuit_breaker_open") == 0, 10, "gauge")
    stage.push_new(200)
    wait_until(
        lambda: "circuit breaker open" in stage.log_text(), 20, "the breaker to open"
    )
    wait_until(lambda: stage.gauge("toktra_circuit_breaker_open") == 1, 5, "gauge 1")
    opened = time.monotonic()
    time.sleep(9.0)
    during = [r.at for r in event_requests(ingest) if r.at > opened]
    gaps = [b - a for a, b in itertools.pairwise(during)]
    # One probe per 2 s window: 4 or 5 in 9 s, never two close together.
    assert 3 <= len(during) <= 5, during
    assert all(gap > 1.8 for gap in gaps), gaps
    assert stage.log_text().count("circuit breaker half open") >= 3

    failing = False
    wait_delivered(ingest, stage)
    assert "circuit breaker closed" in stage.log_text()
    wait_until(lambda: stage.gauge("toktra_circuit_breaker_open") == 0, 5, "gauge 0")
    # Refused batches were not stored, so each event arrived exactly once.
    assert sorted(received_ids(ingest)) == sorted(e["event_id"] for e in stage.pushed)
    assert stage.stop() == 0


def test_rejected_batch_is_set_aside_and_the_rest_flow(
    ingest: IngestServer, make_shipper
) -> None:
    stage = make_shipper(ingest).start()
    poisoned = stage.push_new(50)  # exactly one batch
    poison = {e["event_id"] for e in poisoned}
    ingest.responder = lambda b: (
        (400, {}) if b.events[0]["event_id"] in poison else None
    )
    wait_until(
        lambda: any(r.status == 400 for r in event_requests(ingest)),
        20,
        "the 400",
        stage.log_text,
    )
    good = stage.push_new(120)
    want = {e["event_id"] for e in good}
    wait_until(lambda: want <= set(received_ids(ingest)), 30, "the later batches")
    time.sleep(1.5)  # a retry of the rejected batch would show up by now
    assert sum(r.status == 400 for r in event_requests(ingest)) == 1
    assert not poison & set(received_ids(ingest))
    rejected = list((stage.state_dir / "spool" / "rejected").iterdir())
    assert len(rejected) == 1 and rejected[0].name.endswith("-50.jsonl")
    assert "rejected, set aside" in stage.log_text()
    assert stage.stop() == 0


def test_429_retry_after_is_honoured(ingest: IngestServer, make_shipper) -> None:
    answers = [(429, {"Retry-After": "3"})]
    ingest.responder = lambda b: answers.pop() if answers else None
    stage = make_shipper(ingest, retry_max_seconds=0.2).start()
    stage.push_new(10)
    wait_delivered(ingest, stage)
    first, second = event_requests(ingest)[:2]
    assert first.status == 429 and second.status == 200
    assert second.at - first.at >= 3.0
    assert stage.stop() == 0


@pytest.mark.parametrize("fault", ["wrong_name", "unknown_ca"])
def test_untrusted_ingest_server_gets_nothing(
    workdir: Path, make_shipper, fault: str
) -> None:
    # Enrollment goes to a trusted server; ingest_url names one the shipper
    # must not trust: the same server under a name its certificate lacks, or
    # a server whose certificate comes from another CA.
    server = IngestServer(
        str(workdir / "ingest"), token=TOKEN, server_names=["ingest.example"]
    ).start()
    rogue = IngestServer(str(workdir / "rogue"), token=TOKEN).start()
    try:
        if fault == "wrong_name":
            ingest_url = f"https://localhost:{server.port}"
            expect = "Hostname mismatch, certificate is not valid for 'localhost'"
        else:
            ingest_url = rogue.url
            expect = "self-signed certificate in certificate chain"
        stage = make_shipper(server, ingest_url=ingest_url).start()
        stage.push_new(20)
        wait_until(lambda: expect in stage.log_text(), 20, expect, stage.log_text)
        assert "enrolled device" in stage.log_text()
        assert "certificate verify failed" in stage.log_text()
        assert event_requests(server) == [] and rogue.requests == []
        assert stage.stop() == 0
        kept = [int(n.rsplit("-", 1)[1].split(".")[0]) for n in stage.spool_files()]
        assert sum(kept) == 20  # nothing lost either
    finally:
        rogue.stop()
        server.stop()


def test_expiring_certificate_is_renewed_without_loss(
    workdir: Path, make_shipper
) -> None:
    # A 6-second certificate: renewal is due after 4 s.
    server = IngestServer(
        str(workdir / "ingest"),
        token=TOKEN,
        cert_lifetime=datetime.timedelta(seconds=6),
    ).start()
    try:
        stage = make_shipper(server).start()
        serials = set()
        end = time.monotonic() + 14
        while time.monotonic() < end:
            stage.push_new(10)
            cert = stage.state_dir / "device.crt"
            if cert.exists():
                serials.add(
                    x509.load_pem_x509_certificate(cert.read_bytes()).serial_number
                )
            time.sleep(0.25)
        wait_delivered(server, stage)
        assert len(serials) >= 3, stage.log_text()
        assert "renewed device" in stage.log_text()
        enrolls = [r for r in server.requests if r.path == "/v1/enroll"]
        # The first enrollment had no certificate; renewals presented one.
        assert enrolls[0].client_cn is None
        assert all(r.client_cn for r in enrolls[1:]) and len(enrolls) >= 3
        assert stage.stop() == 0

        # Stopped past expiry: the next start enrolls anew with the token.
        time.sleep(6.5)
        stage.start()
        stage.push_new(10)
        wait_delivered(server, stage)
        assert stage.log_text().count("enrolled device") >= 2
        assert stage.stop() == 0
    finally:
        server.stop()


def run_enroll(config: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKTRA_")}
    return subprocess.run(
        [*AGENT, "enroll", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


def test_enroll_command(ingest: IngestServer, workdir: Path) -> None:
    stage = ShipperStage(workdir, shipper_settings(ingest))
    config = stage.write_config()
    done = run_enroll(config)
    assert done.returncode == 0, done.stderr
    assert "device " in done.stdout and "renews after" in done.stdout
    key = stage.state_dir / "device.key"
    assert key.owner() == STAGE_USER and stat.S_IMODE(key.stat().st_mode) == 0o600
    assert TOKEN not in done.stdout + done.stderr
    # Run again: a renewal over mTLS, and a new serial.
    again = run_enroll(config)
    assert again.returncode == 0, again.stderr
    assert "renewed device" in again.stderr
    assert done.stdout.split("serial ")[1] != again.stdout.split("serial ")[1]
    enrolls = [r for r in ingest.requests if r.path == "/v1/enroll"]
    assert [r.client_cn is None for r in enrolls] == [True, False]
    stage.close()


def test_enroll_command_with_a_wrong_token_says_so(
    ingest: IngestServer, workdir: Path
) -> None:
    stage = ShipperStage(workdir, shipper_settings(ingest, enrollment_token="nope"))
    done = run_enroll(stage.write_config())
    assert done.returncode == 1
    assert "answered 403" in done.stderr and "token" in done.stderr
    assert "Traceback" not in done.stderr
    stage.close()


def test_ingest_down_for_30_seconds_loses_nothing(workdir: Path, tls_server, pki):
    """The whole agent on real TLS clients while the ingest service is away."""
    needs_root_and_bpf()
    server = IngestServer(str(workdir / "ingest"), token=TOKEN).start()
    port = server.port
    agent = Agent(
        workdir / "agent",
        [tls_server.port],
        shipper_settings(server, batch_max_seconds=1.0),
    ).start()
    try:
        # Enrolled and delivering before the outage.
        warmup = run_pyclient(
            "threads", "127.0.0.1", tls_server.port, pki, "warmup", ["api.openai.com"]
        )
        assert warmup.wait(60) == 0
        wait_until(lambda: len(server.received()) == 1, 30, "the warm-up event")
        server.stop()
        down_at = time.monotonic()

        # 500 LLM connections over about 20 s, from 20 processes.
        clients: list[dict] = []
        for round_no in range(20):
            mode = "asyncio" if round_no % 2 else "threads"
            names = [LLM_NAMES[(round_no + i) % len(LLM_NAMES)] for i in range(25)]
            proc = run_pyclient(mode, "127.0.0.1", tls_server.port, pki, "x", names)
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
            clients += [json.loads(line) for line in out.splitlines()]
            time.sleep(max(0.0, down_at + round_no + 1 - time.monotonic()))
        assert len(clients) == 500
        time.sleep(max(0.0, down_at + 30 - time.monotonic()))
        assert "sending" in agent.log_text() and "failed" in agent.log_text()

        server = IngestServer(str(workdir / "ingest"), token=TOKEN, port=port).start()
        want = {(c["pid"], c["src_port"]) for c in clients}

        def arrived() -> set[tuple[int, int]]:
            return {(e["pid"], e["src_port"]) for e in server.received()}

        # The breaker may be open for up to breaker_open_seconds.
        wait_until(lambda: want <= arrived(), 60, "all 500 events", agent.log_text)
        events = server.received()
        unique = {e["event_id"]: e for e in events}
        repeats = len(events) - len(unique)
        after = [e for e in unique.values() if (e["pid"], e["src_port"]) in want]
        assert len(after) == 500, f"{len(after)} unique events, {repeats} repeats"
        assert len({e["conn_id"] for e in after}) == 500
        by_client = {(e["pid"], e["src_port"]): e for e in after}
        for c in clients:
            assert by_client[(c["pid"], c["src_port"])]["dst_hostname"] == c["sni"]
    finally:
        agent.stop()
        server.stop()
