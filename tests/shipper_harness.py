"""The shipper stage as a real process, fed through its real ZeroMQ socket.

`ShipperStage` runs `toktra-agent stage shipper` as root, which drops to the
`toktra` user as it would under the supervisor; the test pushes event
messages into the stage's socket the way the classifier does.
"""

from __future__ import annotations

import json
import os
import pwd
import signal
import subprocess
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from agent import wire
from agent.runtime import endpoint
from tests.harness import AGENT, NotifySocket, free_port

STAGE_USER = "toktra"


def make_event(n: int, **overrides: object) -> dict:
    event = {
        "event_id": uuid.uuid4().hex,
        "conn_id": f"conn-{n}",
        "final": True,
        "timestamp": time.time_ns(),
        "duration_ns": 1_000_000,
        "pid": 4242,
        "comm": "python3",
        "exe": "/usr/bin/python3",
        "uid": 1000,
        "user": "alice",
        "src_port": 40000 + n % 20000,
        "dst_ip": "127.0.0.1",
        "dst_port": 443,
        "dst_hostname": "api.openai.com",
        "sni_source": "openssl",
        "bytes_sent": 1000 + n,
        "bytes_received": 5000 + n,
        "provider": "openai",
        "category": "llm_api",
        "est_tokens_in": 250,
        "est_tokens_out": 1250,
    }
    event.update(overrides)
    return event


def owned_dir(path: Path) -> Path:
    """A directory the stages' user owns, as the supervisor would make it."""
    path.mkdir(parents=True, exist_ok=True)
    account = pwd.getpwnam(STAGE_USER)
    os.chown(path, account.pw_uid, account.pw_gid)
    os.chmod(path, 0o750)
    return path


def base_dir() -> Path:
    # Not under pytest's 0700 temp root: the stage's user must reach it.
    path = Path(tempfile.mkdtemp(prefix="toktra-ship-"))
    os.chmod(path, 0o755)
    return path


@dataclass
class ShipperStage:
    dir: Path
    settings: dict[str, object] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    pushed: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.state_dir = owned_dir(self.dir / "state")
        self.run_dir = owned_dir(self.dir / "run")
        self.log_file = self.dir / "shipper.log"
        self._ctx = zmq.Context()
        self._push: zmq.Socket | None = None

    def write_config(self) -> Path:
        values: dict[str, object] = {
            "state_dir": str(self.state_dir),
            "run_dir": str(self.run_dir),
            "batch_max_events": 50,
            "batch_max_seconds": 0.3,
            "log_level": "debug",
        }
        values.update(self.settings)
        path = self.dir / "agent.conf"
        path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))
        return path

    def start(self, timeout: float = 20) -> ShipperStage:
        self.proc = self._start_stage("shipper", timeout)
        if self._push is None:
            self._push = self._ctx.socket(zmq.PUSH)
            self._push.setsockopt(zmq.LINGER, 0)
            self._push.setsockopt(zmq.SNDTIMEO, 5000)
            self._push.connect(endpoint(str(self.run_dir), "shipper"))
        return self

    def start_metrics(self) -> int:
        """The real metrics stage beside the shipper; returns its port."""
        self.metrics_port = free_port()
        self.settings["metrics_port"] = self.metrics_port
        self.metrics_proc = self._start_stage("metrics", 20)
        return self.metrics_port

    def gauge(self, name: str) -> float | None:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as answer:
            for line in answer.read().decode().splitlines():
                if line.startswith(name + "{") or line.startswith(name + " "):
                    return float(line.rsplit(" ", 1)[1])
        return None

    def _start_stage(self, stage: str, timeout: float) -> subprocess.Popen:
        config = self.write_config()
        notify_path = self.dir / f"notify-{stage}.sock"
        notify_path.unlink(missing_ok=True)
        notify = NotifySocket(notify_path)
        # The stage notifies after dropping root, as systemd's socket allows.
        os.chmod(notify_path, 0o777)
        env = {k: v for k, v in os.environ.items() if not k.startswith("TOKTRA_")}
        env["NOTIFY_SOCKET"] = str(notify_path)
        with open(self.log_file, "ab") as log:
            proc = subprocess.Popen(
                [*AGENT, "stage", stage, "--config", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        try:
            notify.wait_for("READY=1", timeout)
        except TimeoutError:
            proc.kill()
            proc.wait(10)
            raise RuntimeError(f"{stage} not ready; log:\n{self.log_text()}") from None
        finally:
            notify.close()
        return proc

    def push(self, events: list[dict]) -> None:
        assert self._push is not None
        for event in events:
            self._push.send(wire.encode("event", event))
            self.pushed.append(event)

    def push_raw(self, data: bytes) -> None:
        """Any bytes, as a hostile or broken upstream might send them."""
        assert self._push is not None
        self._push.send(data)

    def push_new(self, count: int) -> list[dict]:
        events = [make_event(len(self.pushed) + i) for i in range(count)]
        self.push(events)
        return events

    def stop(self, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(5)

    def kill(self) -> None:
        """SIGKILL, to the stage's pid only."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def close(self) -> None:
        self.kill()
        metrics = getattr(self, "metrics_proc", None)
        if metrics is not None and metrics.poll() is None:
            metrics.kill()
            metrics.wait(10)
        if self._push is not None:
            self._push.close()
        self._ctx.term()

    def log_text(self) -> str:
        return (
            self.log_file.read_text(errors="replace") if self.log_file.exists() else ""
        )

    def spool_files(self) -> list[str]:
        spool = self.state_dir / "spool"
        return sorted(p.name for p in spool.glob("b*.jsonl")) if spool.exists() else []


def wait_until(predicate, timeout: float, what: str, log=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout}s for {what}\n{log()[-4000:]}")
        time.sleep(0.05)
