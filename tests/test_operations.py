"""Operating the agent: the metrics endpoint, status, taps, failing stages.

Everything here runs the real agent on the real BPF object and scrapes its
real endpoint; expected values come from the traffic the test makes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families

from agent.runtime import endpoint
from tests.conftest import needs_root_and_bpf
from tests.harness import AGENT, Agent, free_port, run_pyclient
from tests.test_classifier_stage import connection

NINE = {
    "toktra_events_received_total": "counter",
    "toktra_events_sent_total": "counter",
    "toktra_events_dropped_total": "counter",
    "toktra_bpf_errors_total": "counter",
    "toktra_send_errors_total": "counter",
    "toktra_batch_send_duration_seconds": "histogram",
    "toktra_active_connections": "gauge",
    "toktra_buffered_events": "gauge",
    "toktra_circuit_breaker_open": "gauge",
}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*AGENT, *args], capture_output=True, text=True, timeout=30, check=False
    )


def scrape(agent: Agent) -> tuple[dict[str, str], dict[str, list[tuple[dict, float]]]]:
    url = f"http://127.0.0.1:{agent.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as answer:
        text = answer.read().decode()
    types: dict[str, str] = {}
    samples: dict[str, list[tuple[dict, float]]] = {}
    for family in text_string_to_metric_families(text):
        # The parser names counter families without their _total suffix.
        name = family.name + ("_total" if family.type == "counter" else "")
        types[name] = family.type
        for s in family.samples:
            samples.setdefault(s.name, []).append((s.labels, s.value))
    return types, samples


def value(samples, name: str, **labels: str) -> float:
    return sum(
        v
        for got, v in samples.get(name, [])
        if all(got.get(k) == want for k, want in labels.items())
    )


def wait_for_value(agent: Agent, name: str, want: float, **labels: str):
    deadline = time.monotonic() + 20
    while True:
        _, samples = scrape(agent)
        if value(samples, name, **labels) == want:
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{name}{labels} is {value(samples, name, **labels)}, not {want}"
            )
        time.sleep(0.3)


def test_scrape_shows_the_nine_metrics_matching_real_traffic(
    agent, tls_server, pki
) -> None:
    _, before = scrape(agent)
    llm = ["api.openai.com", "api.anthropic.com"] * 6
    other = ["www.example.org"] * 4
    proc = run_pyclient("threads", "127.0.0.1", tls_server.port, pki, "s", llm + other)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert len(out.splitlines()) == 16

    # Each process reports once a second, so each count is awaited.
    sent_before = value(before, "toktra_events_sent_total")
    wait_for_value(agent, "toktra_events_sent_total", sent_before + len(llm))
    # An OPEN, a CLOSE and one ClientHello record (written whole by
    # OpenSSL) for each of the 16 connections.
    received_before = value(before, "toktra_events_received_total")
    wait_for_value(agent, "toktra_events_received_total", received_before + 48)
    classified_before = value(
        before, "toktra_connections_classified_total", result="llm"
    )
    wait_for_value(
        agent,
        "toktra_connections_classified_total",
        classified_before + len(llm),
        result="llm",
    )
    types, samples = scrape(agent)
    for name, kind in NINE.items():
        assert types.get(name) == kind, (name, types.get(name))
    assert value(samples, "toktra_events_dropped_total") == 0
    assert value(samples, "toktra_bpf_errors_total") == 0
    assert value(samples, "toktra_send_errors_total") == 0
    assert value(samples, "toktra_buffered_events") == 0
    assert value(samples, "toktra_circuit_breaker_open") == 0
    assert value(samples, "toktra_active_connections") == 0
    batches = value(samples, "toktra_batch_send_duration_seconds_count")
    assert batches >= 1
    assert value(samples, "toktra_batch_send_duration_seconds_bucket", le="+Inf") == (
        batches
    )
    assert (
        value(samples, "toktra_probe_mode", send_hook="tracepoint", configured="auto")
        == 1
    )
    for stage in ("collector", "classifier", "shipper"):
        assert value(samples, "toktra_stage_up", stage=stage) == 1


def test_active_connections_counts_open_connections(agent, tls_server, pki):
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    held = []
    try:
        for _ in range(3):
            raw = socket.create_connection(("127.0.0.1", tls_server.port))
            held.append(ctx.wrap_socket(raw, server_hostname="api.openai.com"))
        wait_for_value(agent, "toktra_active_connections", 3)
    finally:
        for tls in held:
            tls.close()
    wait_for_value(agent, "toktra_active_connections", 0)


def test_counters_keep_growing_across_a_stage_restart(agent, tls_server, pki):
    _, start = scrape(agent)
    baseline = value(start, "toktra_connections_classified_total", result="llm")
    proc = run_pyclient(
        "threads", "127.0.0.1", tls_server.port, pki, "s", ["api.openai.com"] * 5
    )
    assert proc.wait(60) == 0
    classified = baseline + 5
    before = wait_for_value(
        agent, "toktra_connections_classified_total", classified, result="llm"
    )
    restarts = value(before, "toktra_stage_restarts_total", stage="classifier")
    os.kill(agent.stage_pids()["classifier"], signal.SIGKILL)
    wait_for_value(
        agent, "toktra_stage_restarts_total", restarts + 1, stage="classifier"
    )
    wait_for_value(agent, "toktra_stage_up", 1, stage="classifier")
    # The new classifier counts from zero; the endpoint keeps the old count.
    wait_for_value(
        agent, "toktra_connections_classified_total", classified, result="llm"
    )
    proc = run_pyclient(
        "threads", "127.0.0.1", tls_server.port, pki, "s", ["api.openai.com"] * 2
    )
    assert proc.wait(60) == 0
    wait_for_value(
        agent, "toktra_connections_classified_total", classified + 2, result="llm"
    )


def test_status_shows_each_stage(agent) -> None:
    config = agent.dir / "agent.conf"
    done = run_cli("status", "--config", str(config))
    assert done.returncode == 0, done.stdout + done.stderr
    pids = agent.stage_pids()
    lines = {line.split()[0]: line.split() for line in done.stdout.splitlines() if line}
    for stage in ("collector", "classifier", "shipper"):
        assert lines[stage][1] == "up"
        assert int(lines[stage][2]) == pids[stage]
    assert "probe mode          tracepoint" in done.stdout


def test_a_refused_send_hook_falls_back_and_status_says_so() -> None:
    """fexit is refused on this kernel: the agent runs on the next variant."""
    needs_root_and_bpf()
    # Not under pytest's own 0700 temp root: the stages' user must reach it.
    base = Path(tempfile.mkdtemp(prefix="toktra-test-"))
    agent = Agent(base, [free_port()], {"send_hook": "fexit"}).start()
    try:
        samples = wait_for_value(agent, "toktra_probe_mode", 1)
        done = run_cli("status", "--config", str(agent.dir / "agent.conf"))
        log = agent.log_file.read_text()
    finally:
        agent.stop()
        shutil.rmtree(base, ignore_errors=True)
    chosen = [
        (labels["send_hook"], labels["configured"])
        for labels, v in samples["toktra_probe_mode"]
        if v == 1
    ]
    if chosen == [("fexit", "fexit")]:
        pytest.skip("tracing programs load on this kernel")
    assert chosen == [("tracepoint", "fexit")]
    assert done.returncode == 0, done.stdout + done.stderr
    assert (
        "probe mode          tracepoint (send_hook = fexit did not load; see doctor)"
        in done.stdout
    )
    assert "configured send_hook = fexit does not load on" in log
    assert "send hook: tracepoint" in log


def test_status_when_the_agent_is_not_running(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "agent.conf"
    config.write_text(f"metrics_port = {port}\n")
    done = run_cli("status", "--config", str(config))
    assert done.returncode == 3
    assert "not running" in done.stdout


def test_tap_prints_each_stage_output_without_disturbing_it(
    agent, tls_server, pki
) -> None:
    config = agent.dir / "agent.conf"
    taps = {
        stage: subprocess.Popen(
            [*AGENT, "tap", stage, "--config", str(config), "--seconds", "15"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for stage in ("collector", "classifier", "shipper")
    }
    # A tap that never reads: its queue fills, the pipeline does not care.
    stuck = subprocess.Popen(
        [*AGENT, "tap", "classifier", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(1.5)  # subscriptions reach the publishers
        names = ["api.openai.com"] * 4 + ["www.example.org"] * 2
        proc = run_pyclient("threads", "127.0.0.1", tls_server.port, pki, "s", names)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        ports = {json.loads(line)["src_port"] for line in out.splitlines()}
        llm_ports = {
            json.loads(line)["src_port"]
            for line in out.splitlines()
            if json.loads(line)["sni"] == "api.openai.com"
        }
        agent.wait_events(
            lambda evs: llm_ports <= {e["src_port"] for e in evs}, timeout=20
        )
        seen = {}
        for stage, tap in taps.items():
            stdout, stderr = tap.communicate(timeout=30)
            assert tap.returncode == 0, stderr
            seen[stage] = {json.loads(line)["src_port"] for line in stdout.splitlines()}
    finally:
        stuck.send_signal(signal.SIGINT)
        stuck.wait(10)
    assert ports <= seen["collector"]  # every connection
    assert llm_ports <= seen["classifier"] and llm_ports <= seen["shipper"]
    assert not (ports - llm_ports) & (seen["classifier"] | seen["shipper"])


def test_a_batch_with_bad_bodies_costs_only_those(agent) -> None:
    """What reaches the classifier is checked body by body."""
    _, before = scrape(agent)
    invalid = value(before, "toktra_events_dropped_total", reason="invalid_message")
    good = [
        connection(b"api.openai.com", conn_id=f"batch{i:019x}", src_port=61000 + i)
        for i in range(3)
    ]
    bad = dict(good[0], conn_id="bad", pid=True)
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 2000)
    push.connect(endpoint(str(agent.run_dir), "classifier"))
    try:
        push.send(
            json.dumps(
                {"type": "connection", "v": 1, "bodies": [good[0], bad, *good[1:]]}
            ).encode()
        )
        push.send(b'{"type": "connection", "v": 1, "bodies": []}')
    finally:
        push.close()
        ctx.term()
    ids = {c["conn_id"] for c in good}
    agent.wait_events(lambda evs: ids <= {e["conn_id"] for e in evs}, timeout=20)
    assert "bad" not in {e["conn_id"] for e in agent.events()}
    wait_for_value(
        agent,
        "toktra_events_dropped_total",
        invalid + 2,
        reason="invalid_message",
    )
    log = agent.log_file.read_text()
    assert "dropped an invalid connection message: connection.pid is a boolean" in log


def test_tap_without_an_agent_says_why(tmp_path: Path) -> None:
    config = tmp_path / "agent.conf"
    config.write_text(f'run_dir = "{tmp_path}"\n')
    done = run_cli("tap", "shipper", "--config", str(config))
    assert done.returncode == 1
    assert "no tap at" in done.stderr


def test_metrics_port_in_use_fails_start_with_a_clear_message(tls_server) -> None:
    needs_root_and_bpf()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        agent = Agent(
            Path(tempfile.mkdtemp(prefix="toktra-test-")),
            [tls_server.port],
            metrics_port=port,
        )
        with pytest.raises(RuntimeError, match="agent not ready"):
            agent.start(timeout=15)
    log = agent.log_text()
    assert f"metrics address 127.0.0.1:{port} is already in use" in log
    assert "start-up failed: metrics failed to start" in log
    status = [m for m in agent.notify.messages if "STATUS=start-up failed" in m]
    assert "already in use" in status[0]
    assert agent.proc is not None and agent.proc.returncode == 1


def test_a_stage_that_keeps_dying_is_reported_and_the_others_run(tls_server):
    needs_root_and_bpf()
    agent = Agent(Path(tempfile.mkdtemp(prefix="toktra-test-")), [tls_server.port])
    agent.start()
    try:
        first = agent.stage_pids()
        killed: set[int] = set()
        deadline = time.monotonic() + 40
        while len(killed) < 3:
            assert time.monotonic() < deadline, agent.log_text()[-3000:]
            pid = agent.stage_pids().get("classifier")
            if pid and pid not in killed:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            time.sleep(0.1)
        status = agent.notify.wait_for("classifier keeps failing", 10)
        assert status.startswith("STATUS=degraded: classifier keeps failing")
        wait_for_value(agent, "toktra_stage_failing", 1, stage="classifier")
        assert "stage classifier is failing: died 3 times in a row" in agent.log_text()
        now = agent.stage_pids()
        for stage in ("collector", "shipper", "metrics"):
            assert now[stage] == first[stage], stage
        # It is still retried, and comes back.
        wait_for_value(agent, "toktra_stage_up", 1, stage="classifier")
    finally:
        agent.stop()


def test_a_start_that_fails_says_why_in_status(tls_server):
    needs_root_and_bpf()
    agent = Agent(
        Path(tempfile.mkdtemp(prefix="toktra-test-")),
        [tls_server.port],
        {"bpf_object": "/nonexistent/toktra_socket.bpf.o"},
    )
    with pytest.raises(RuntimeError, match="agent not ready"):
        agent.start(timeout=15)
    assert agent.proc is not None and agent.proc.returncode == 1
    status = [m for m in agent.notify.messages if "STATUS=start-up failed" in m]
    assert status, agent.notify.messages
    assert "collector failed to start" in status[0]
    assert "/nonexistent/toktra_socket.bpf.o" in status[0]


def test_status_refuses_an_endpoint_that_is_not_the_agent(tmp_path: Path) -> None:
    """Another program on the metrics port, serving made-up numbers."""
    import http.server
    import threading

    fake = (
        b"toktra_events_sent_total 999999\n"
        b'toktra_stage_up{stage="collector"} 1\n'
        b'toktra_stage_pid{stage="collector"} 1\n'
    )

    class Fake(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(fake)))
            self.end_headers()
            self.wfile.write(fake)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Fake)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        config = tmp_path / "agent.conf"
        config.write_text(f"metrics_port = {server.server_address[1]}\n")
        done = run_cli("status", "--config", str(config))
    finally:
        server.shutdown()
        server.server_close()
    assert done.returncode == 1
    assert "not for this agent" in done.stdout
    assert "collector=1" in done.stdout and "999999" not in done.stdout
