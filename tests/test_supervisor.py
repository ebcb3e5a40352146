"""The supervisor with its real stages: readiness, privileges, restarts,
clean shutdown."""

from __future__ import annotations

import os
import pwd
import signal
import socket
import ssl
import stat
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.harness import AGENT, Agent, run_curl


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
    assert set(agent.stage_pids()) == {"collector", "classifier", "shipper", "metrics"}


def test_unprivileged_stages_hold_no_capabilities(agent):
    toktra = pwd.getpwnam("toktra")
    pids = agent.stage_pids()
    for name in ("classifier", "shipper", "metrics"):
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
    assert socks == [
        "classifier.sock",
        "connections.sock",
        "shipper.sock",
        "stats.sock",
        "tap-classifier.sock",
        "tap-collector.sock",
        "tap-shipper.sock",
    ]
    for name in socks:
        st = os.stat(agent.run_dir / name)
        # Only the collector's tap is bound by root.
        owner = 0 if name == "tap-collector.sock" else toktra.pw_uid
        assert st.st_uid == owner, name
        # The table and the taps are for root and the agent's group too.
        shared = name == "connections.sock" or name.startswith("tap-")
        if shared:
            assert st.st_gid == toktra.pw_gid, name
            assert stat.S_IMODE(st.st_mode) == 0o660, (name, oct(st.st_mode))
        else:
            assert stat.S_IMODE(st.st_mode) & 0o027 == 0, (name, oct(st.st_mode))


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

    a = _fresh_agent(tls_server.port).start()
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


def _fresh_agent(port: int, **extra) -> Agent:
    """An agent with its own directories, for tests that stop or break it."""
    return Agent(Path(tempfile.mkdtemp(prefix="toktra-test-")), [port], extra)


def test_ctrl_c_to_the_process_group_still_flushes(tls_server, pki):
    """SIGINT reaches every process of the group; only the supervisor acts."""

    a = _fresh_agent(tls_server.port).start()
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    raw = socket.create_connection(("127.0.0.1", tls_server.port))
    tls = ctx.wrap_socket(raw, server_hostname="api.openai.com")
    port = tls.getsockname()[1]
    tls.sendall(b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
    tls.recv(65536)
    os.killpg(a.proc.pid, signal.SIGINT)
    time.sleep(0.1)
    tls.close()  # closes while the agent is stopping
    assert a.proc.wait(30) == 0
    a.stop()
    assert port in {e["src_port"] for e in a.events()}, a.log_text()[-2000:]
    log = a.log_text()
    order = [
        log.index(f"stage {s}: running -> stopping")
        for s in ("collector", "classifier", "shipper")
    ]
    assert order == sorted(order)
    assert not list(a.run_dir.glob("*.sock")), "sockets left behind"


def refused_start(config: Path) -> str:
    """Runs the agent expecting it to refuse to start; returns its stderr."""
    p = subprocess.run(
        [*AGENT, "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 1, p.stderr
    assert "Traceback" not in p.stderr
    return p.stderr


def test_second_agent_on_the_same_run_dir_is_refused(agent):
    stderr = refused_start(agent.dir / "agent.conf")
    assert f"another agent is running with run_dir {agent.run_dir}" in stderr


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"user": "root"}, "user 'root' is root"),
        ({"user": "no-such-user-x"}, "user 'no-such-user-x' does not exist"),
        (
            {"state_dir": "/etc/hostname"},
            "state_dir '/etc/hostname': exists and is not a directory",
        ),
        (
            {"state_dir": "/etc"},
            "state_dir '/etc': exists, belongs to uid 0 and is not empty",
        ),
    ],
)
def test_bad_start_up_says_why_without_a_traceback(tls_server, extra, message):
    a = _fresh_agent(tls_server.port, **extra)
    a.dir.chmod(0o755)
    stderr = refused_start(a.write_config())
    assert message in stderr, stderr
    assert os.stat("/etc").st_uid == 0


def test_ca_file_the_stage_user_cannot_read_is_refused(tls_server, tmp_path):
    secret_ca = tmp_path / "ca.pem"  # under pytest's 0700 root: toktra is kept out
    secret_ca.write_text("not even read\n")
    a = _fresh_agent(
        tls_server.port,
        ingest_url="https://127.0.0.1:1",
        ca_file=str(secret_ca),
    )
    stderr = refused_start(a.write_config())
    assert (
        f"ca_file {secret_ca}: user toktra, who runs the shipper, cannot read it"
        in (stderr)
    )
