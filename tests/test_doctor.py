"""`toktra-agent doctor` on this host, run as an operator would run it.

Each test runs the real command against a configuration of its own (a free
metrics port, private state and run directories) and reads its lines and
exit code. The host here can run everything, so a healthy configuration is
all ok; each other test breaks one thing and checks that exactly that is
named, with its consequence in the exit code.
"""

from __future__ import annotations

import datetime
import http.server
import json
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from agent import doctor
from agent.doctor import Effect
from tests.conftest import needs_root_and_bpf
from tests.harness import AGENT, Agent, free_port

ORDER = [
    "kernel",
    "btf",
    "tracefs",
    "libbpf",
    "privilege",
    "object",
    "send-hook",
    "libssl",
    "end-to-end",
    "clienthello",
    "sock_diag",
    "enrollment",
    "metrics",
    "run_dir",
    "user",
]
TOKEN = "doctor-test-token-must-never-show"
DEVICE = "doctor-test-device"
UNPRIVILEGED = [
    "setpriv",
    "--reuid=nobody",
    "--regid=nogroup",
    "--clear-groups",
    "--inh-caps=-all",
]


@pytest.fixture(autouse=True)
def _root():
    needs_root_and_bpf()
    try:
        pwd.getpwnam("toktra")
    except KeyError:
        pytest.skip("needs the toktra user (make user)")


@dataclass
class Report:
    code: int
    lines: list[str]
    stderr: str

    def names(self) -> list[str]:
        """Check names in order, a repeated one (libssl) once."""
        seen = [line[6:19].strip() for line in self.lines]
        return [n for i, n in enumerate(seen) if i == 0 or seen[i - 1] != n]

    def line(self, name: str) -> str:
        (found,) = [ln for ln in self.lines if ln[6:19].strip() == name]
        return found

    def status(self, name: str) -> str:
        return self.line(name)[:6].strip()


@pytest.fixture
def base() -> Iterator[Path]:
    # Not under pytest's 0700 temp root: nobody (and toktra) must reach it.
    path = Path(tempfile.mkdtemp(prefix="toktra-doctor-"))
    os.chmod(path, 0o755)
    toktra = pwd.getpwnam("toktra")
    for sub in ("run", "state"):
        (path / sub).mkdir(mode=0o750)
        os.chown(path / sub, toktra.pw_uid, toktra.pw_gid)
        os.chmod(path / sub, 0o750)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def write_config(base: Path, **keys: object) -> Path:
    values: dict[str, object] = {
        "state_dir": str(base / "state"),
        "run_dir": str(base / "run"),
        "metrics_port": free_port(),
    }
    values.update(keys)
    path = base / "agent.conf"
    path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))
    os.chmod(path, 0o644)
    return path


def run_doctor(config: Path, prefix: list[str] | None = None) -> Report:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKTRA_")}
    p = subprocess.run(
        [*(prefix or []), *AGENT, "doctor", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert "Traceback" not in p.stderr + p.stdout, p.stderr
    return Report(p.returncode, p.stdout.splitlines(), p.stderr)


def test_a_healthy_host_is_all_ok(base):
    report = run_doctor(write_config(base))
    assert report.code == 0, "\n".join(report.lines)
    assert report.names() == ORDER
    assert all(line.startswith("ok    ") for line in report.lines), report.lines
    e2e = report.line("end-to-end")
    assert doctor.TLS_NAME in e2e and "sni_source openssl" in e2e
    assert "bytes sent" in e2e
    hello = report.line("clienthello")
    assert doctor.HELLO_NAME in hello and "sni_source clienthello" in hello


def test_a_running_agent_holding_the_metrics_port_is_fine(base):
    """After installing: the agent runs, its own port is not a conflict."""
    agent = Agent(base / "agent", [free_port()]).start()
    try:
        report = run_doctor(agent.write_config())
    finally:
        agent.stop()
    assert report.code == 0, "\n".join(report.lines)
    assert "served by a running toktra agent" in report.line("metrics")


def test_a_missing_object_means_the_agent_cannot_run(base):
    missing = base / "gone" / "toktra_socket.bpf.o"
    report = run_doctor(write_config(base, bpf_object=str(missing)))
    assert report.code == Effect.BROKEN == 2
    line = report.line("object")
    assert line.startswith("FAIL  object")
    assert str(missing) in line and "does not exist" in line
    assert "; point bpf_object at" in line  # what to do
    # What needs the object is not tried, and does not pile on.
    for name in ("send-hook", "libssl", "end-to-end", "clienthello"):
        assert report.status(name) == "skip"


def test_a_configured_send_hook_the_kernel_refuses_is_a_warning(base):
    """The agent still captures with the next variant; doctor says to fix it."""
    report = run_doctor(write_config(base, send_hook="fexit"))
    line = report.line("send-hook")
    if line.startswith("ok    "):
        pytest.skip("tracing programs load on this kernel")
    assert report.code == Effect.PARTIAL == 1, "\n".join(report.lines)
    assert line.startswith("warn  send-hook")
    assert "(send_hook = fexit)" in line and "passed over: fexit: " in line
    assert "set send_hook = auto" in line
    # Capture still works end to end on the variant that did load.
    assert report.status("end-to-end") == "ok"


class _PlainHttp(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.end_headers()
        self.wfile.write(b"<html>not an agent</html>\n")

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_a_foreign_program_on_the_metrics_port_is_named(base):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _PlainHttp)
    port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        report = run_doctor(write_config(base, metrics_port=port))
    finally:
        server.shutdown()
        server.server_close()
    assert report.code == 2
    line = report.line("metrics")
    assert line.startswith("FAIL  metrics")
    assert f"127.0.0.1:{port}" in line and f"pid {os.getpid()}" in line
    assert "set metrics_port" in line


def _device_files(state: Path, not_before, not_after) -> None:
    """A CA-signed Ed25519 device certificate and key, as enrollment leaves them."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "doctor test CA")])
    key = ed25519.Ed25519PrivateKey.generate()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, DEVICE)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .sign(ca_key, hashes.SHA256())
    )
    (state / "device_id").write_text(DEVICE + "\n")
    fd = os.open(state / "device.key", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    (state / "device.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _shipping(base: Path, token: str = TOKEN) -> Path:
    # Reserved names: the doctor reads the files and contacts neither.
    return write_config(
        base,
        ingest_url="https://ingest.doctor.invalid",
        enroll_url="https://ingest.doctor.invalid/enroll",
        enrollment_token=token,
    )


@pytest.mark.parametrize(
    ("days_left", "expect"),
    [(5, r"\b[45] days left.*under 14 days left"), (-3, r"expired 3 days ago")],
)
def test_a_certificate_near_or_past_its_end_is_a_warning(base, days_left, expect):
    now = datetime.datetime.now(datetime.UTC)
    end = now + datetime.timedelta(days=days_left)
    _device_files(base / "state", end - datetime.timedelta(days=90), end)
    report = run_doctor(_shipping(base))
    assert report.code == 1, "\n".join(report.lines)
    line = report.line("enrollment")
    assert line.startswith("warn  enrollment"), line
    assert DEVICE in line
    assert re.search(expect, line), line
    assert TOKEN not in "\n".join(report.lines) + report.stderr


def test_an_expired_certificate_without_a_token_fails(base):
    now = datetime.datetime.now(datetime.UTC)
    end = now - datetime.timedelta(days=1)
    _device_files(base / "state", end - datetime.timedelta(days=90), end)
    report = run_doctor(_shipping(base, token=""))
    assert report.code == 1  # the agent runs, and keeps what it cannot send
    line = report.line("enrollment")
    assert line.startswith("FAIL  enrollment") and "set enrollment_token" in line


def test_a_valid_certificate_is_ok(base):
    now = datetime.datetime.now(datetime.UTC)
    _device_files(base / "state", now, now + datetime.timedelta(days=90))
    report = run_doctor(_shipping(base))
    assert report.code == 0, "\n".join(report.lines)
    assert "89 days left" in report.line("enrollment")


def test_without_bpf_privilege_the_agent_runs_degraded(base):
    report = run_doctor(write_config(base), prefix=UNPRIVILEGED)
    assert report.code == Effect.DEGRADED == 3, "\n".join(report.lines)
    line = report.line("privilege")
    assert line.startswith("FAIL  privilege") and "CAP_BPF" in line
    assert "runs degraded" in line
    assert report.status("send-hook") == "skip"
    # Only what BPF needs failed; sock_diag, which degraded mode uses, works.
    failed = {ln[6:19].strip() for ln in report.lines if ln.startswith("FAIL")}
    assert failed <= {"privilege", "tracefs"}
    assert report.status("sock_diag") == "ok"


def test_without_bpf_privilege_capture_mode_bpf_cannot_run(base):
    report = run_doctor(write_config(base, capture_mode="bpf"), prefix=UNPRIVILEGED)
    assert report.code == 2
    assert "does not start (capture_mode = bpf)" in report.line("privilege")


def test_help_explains_the_exit_codes():
    p = subprocess.run(
        [*AGENT, "doctor", "--help"], capture_output=True, text=True, timeout=30
    )
    assert p.returncode == 0
    for code in ("0 ", "1 ", "2 ", "3 "):
        assert f"\n  {code}" in p.stdout, p.stdout


def test_a_configuration_error_exits_2_before_any_check(base):
    config = base / "agent.conf"
    config.write_text('metrics_port = "ninety"\n')
    report = run_doctor(config)
    assert report.code == 2 and report.lines == []
    assert "metrics_port" in report.stderr


def test_the_worst_finding_decides():
    assert doctor.worst([]) is Effect.NONE
    assert doctor.worst([Effect.PARTIAL, Effect.DEGRADED]) is Effect.DEGRADED
    assert doctor.worst([Effect.DEGRADED, Effect.BROKEN]) is Effect.BROKEN
