"""The supervisor with its real stages: readiness, privileges, restarts,
clean shutdown."""

from __future__ import annotations

import os
import pwd
import signal
import stat
import threading
import time

import pytest

from tests.harness import run_curl


def status_fields(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def test_ready_only_after_capture_is_attached(agent):
    # READY=1 was received by the fixture; by then the log must show the
    # probes attached and every stage running.
    log = agent.log_text()
    assert "capture attached: send_hook=" in log
    assert "agent ready: all stages running" in log
    assert any("READY=1" in m for m in agent.notify.messages)
    assert set(agent.stage_pids()) == {"collector", "classifier", "shipper"}


def test_unprivileged_stages_hold_no_capabilities(agent):
    toktra = pwd.getpwnam("toktra")
    pids = agent.stage_pids()
    for name in ("classifier", "shipper"):
        fields = status_fields(pids[name])
        assert fields["Uid"].split() == [str(toktra.pw_uid)] * 4, name
        assert fields["Gid"].split() == [str(toktra.pw_gid)] * 4, name
        assert fields["Groups"].strip() == "", name
        for cap in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
            assert int(fields[cap], 16) == 0, (name, cap)
    assert status_fields(pids["collector"])["Uid"].split()[0] == "0"


def test_stage_sockets_only_reachable_by_the_agent(agent):
    toktra = pwd.getpwnam("toktra")
    st = os.stat(agent.run_dir)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (toktra.pw_uid, 0o750)
    socks = sorted(p.name for p in agent.run_dir.iterdir() if p.is_socket())
    assert socks == ["classifier.sock", "shipper.sock"]
    for name in socks:
        st = os.stat(agent.run_dir / name)
        assert st.st_uid == toktra.pw_uid
        assert stat.S_IMODE(st.st_mode) & 0o027 == 0, oct(st.st_mode)


def test_killed_classifier_is_restarted_alone(agent, tls_server, pki):
    before = agent.stage_pids()
    stop = threading.Event()
    ports: list[int] = []

    def traffic():
        while not stop.is_set():
            p = run_curl("127.0.0.1", tls_server.port, pki, "api.openai.com", "s")
            out, _ = p.communicate(timeout=30)
            if p.returncode == 0:
                ports.append(int(out))

    t = threading.Thread(target=traffic)
    t.start()
    try:
        time.sleep(0.5)
        os.kill(before["classifier"], signal.SIGKILL)
        deadline = time.monotonic() + 20
        while True:
            now = agent.stage_pids()
            if now.get("classifier") not in (None, before["classifier"]):
                break
            assert time.monotonic() < deadline, "classifier was not restarted"
            time.sleep(0.1)
        restarted_at = len(ports)
        time.sleep(2.5)  # the restarted classifier is up within its backoff
        after_restart = ports[restarted_at:]
    finally:
        stop.set()
        t.join(30)
    assert now["collector"] == before["collector"]
    assert now["shipper"] == before["shipper"]
    assert "stage classifier died (killed by SIGKILL)" in agent.log_text()
    # Connections made once the new classifier runs are all recorded.
    later = set(ports[restarted_at + len(after_restart) // 2 :])
    assert later, "no traffic after the restart"
    agent.wait_events(lambda evs: later <= {e["src_port"] for e in evs})


@pytest.mark.usefixtures("agent")
def test_sigterm_stops_everything_cleanly(tls_server, pki):
    """A separate agent, so the module's agent keeps running for others."""
    import tempfile
    from pathlib import Path

    from tests.harness import Agent

    a = Agent(Path(tempfile.mkdtemp(prefix="toktra-test-")), [tls_server.port]).start()
    pids = a.stage_pids()
    p = run_curl("127.0.0.1", tls_server.port, pki, "api.anthropic.com", "s")
    out, _ = p.communicate(timeout=30)
    # Stop right away: the event is still in flight and must be flushed.
    code = a.stop()
    assert code == 0
    for pid in pids.values():
        assert not os.path.exists(f"/proc/{pid}"), "a stage outlived the agent"
    assert int(out) in {e["src_port"] for e in a.events()}
    assert any("STOPPING=1" in m for m in a.notify.messages)
