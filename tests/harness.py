"""Real parts for the end-to-end tests: a TLS server, the agent, systemd's
notify socket. Each fails with a clear message instead of hanging.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from agent.supervisor import COMM
from tests import tlsutil

ROOT = Path(__file__).resolve().parent.parent
AGENT = [str(ROOT / ".venv/bin/toktra-agent")]
PYCLIENT = ROOT / "tests/clients/pyclient.py"
RESPONSE_BODY = b"y" * 3000
TCP_INFO_BYTES = struct.Struct("<QQ")  # tcpi_bytes_acked, tcpi_bytes_received
TCP_CLOSE = 7
TCP_CLOSE_WAIT = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dual_stack_port() -> int:
    """A port free on both 127.0.0.1 and ::1."""
    for _ in range(50):
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s6:
            s6.bind(("::1", 0))
            port = s6.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s4:
                try:
                    s4.bind(("127.0.0.1", port))
                except OSError:
                    continue
        return port
    raise RuntimeError("no port free on both 127.0.0.1 and ::1")


@dataclass
class Pki:
    dir: Path
    ca_file: Path
    cert_file: Path
    key_file: Path


def make_pki(path: Path, names: list[str]) -> Pki:
    path.mkdir(parents=True, exist_ok=True)
    ca = tlsutil.make_ca("toktra test CA")
    key, cert = tlsutil.make_cert(ca, names, ["127.0.0.1", "::1"])
    pki = Pki(path, path / "ca.pem", path / "server.pem", path / "server.key")
    tlsutil.write_pem(pki.ca_file, ca[1])
    tlsutil.write_pem(pki.cert_file, cert)
    tlsutil.write_pem(pki.key_file, key)
    return pki


@dataclass
class ServerSide:
    """What the server measured on one connection, after the client left."""

    peer_port: int
    sni: str | None
    bytes_received: int
    bytes_acked: int
    # False when the client reset the connection instead of closing it (a
    # client that exits with unread data, such as a late session ticket).
    peer_fin: bool


def _wait_peer_close(sock: socket.socket, timeout: float) -> int:
    """Waits for the peer's FIN (CLOSE_WAIT) or reset (CLOSE); the state."""
    deadline = time.monotonic() + timeout
    while True:
        state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)[0]
        if state in (TCP_CLOSE_WAIT, TCP_CLOSE) or time.monotonic() > deadline:
            return state
        time.sleep(0.002)


def _remember_sni(sslsock, name, _ctx) -> None:
    sslsock.sni = name


@dataclass
class TlsServer:
    """An HTTPS-like server on 127.0.0.1 and ::1, one thread per client.

    It reads one request, answers with RESPONSE_BODY, waits for the client
    to close, reads its own TCP_INFO, then closes: the server's counters
    are a second source of truth for clients that cannot report theirs.
    """

    pki: Pki
    port: int
    seen: dict[int, ServerSide] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    _socks: list[socket.socket] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> TlsServer:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.pki.cert_file, self.pki.key_file)
        ctx.sni_callback = _remember_sni
        self._ctx = ctx
        for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            s = socket.socket(family, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, self.port))
            s.listen(512)
            s.settimeout(0.2)
            self._socks.append(s)
            threading.Thread(target=self._accept, args=(s,), daemon=True).start()
        return self

    def _accept(self, s: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = s.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        raw.settimeout(20)
        # The session tickets and the response are separate writes; Nagle
        # would hold the second back for a delayed ACK (~40 ms).
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = raw.getpeername()[1]
        try:
            tls = self._ctx.wrap_socket(raw, server_side=True)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = tls.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, body = data.split(b"\r\n\r\n", 1)
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            while len(body) < length:
                body += tls.recv(65536)
            tls.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(RESPONSE_BODY)
                + RESPONSE_BODY
            )
            sock: socket.socket = tls
            with contextlib.suppress(OSError, ssl.SSLError):
                while tls.recv(65536):
                    pass
            # A TLS close_notify can come before the TCP FIN: wait for the
            # FIN itself so the counts include it. No close_notify is sent
            # back: the client has closed, and data arriving at a closed
            # socket makes its kernel answer with a reset.
            state = _wait_peer_close(sock, 10)
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
            acked, received = TCP_INFO_BYTES.unpack_from(info, 120)
            self.seen[peer] = ServerSide(
                peer,
                getattr(tls, "sni", None),
                received,
                acked,
                state == TCP_CLOSE_WAIT,
            )
            sock.close()
        except (OSError, ssl.SSLError) as e:
            self.errors.append(f"{peer}: {e!r}")
            raw.close()

    def stop(self) -> None:
        self._stop.set()
        for s in self._socks:
            s.close()


class NotifySocket:
    """The receiving end of sd_notify, as systemd would hold it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[str] = []

    def wait_for(self, key: str, timeout: float) -> str:
        """Returns the first message containing `key`; fails after timeout."""
        deadline = time.monotonic() + timeout
        for m in self.messages:
            if key in m:
                return m
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.sock], [], [], 0.2)
            if ready:
                msg = self.sock.recv(4096).decode()
                self.messages.append(msg)
                if key in msg:
                    return msg
        raise TimeoutError(f"no {key!r} from the agent in {timeout}s: {self.messages}")

    def drain(self) -> None:
        while select.select([self.sock], [], [], 0)[0]:
            self.messages.append(self.sock.recv(4096).decode())

    def close(self) -> None:
        self.drain()
        self.sock.close()


@dataclass
class Agent:
    """`toktra-agent run` as a subprocess with its own dirs and config."""

    dir: Path
    ports: list[int]
    extra: dict[str, object] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    metrics_port: int = field(default_factory=lambda: free_port())

    @property
    def state_dir(self) -> Path:
        return self.dir / "state"

    @property
    def run_dir(self) -> Path:
        return self.dir / "run"

    @property
    def log_file(self) -> Path:
        return self.dir / "agent.log"

    @property
    def events_file(self) -> Path:
        return self.state_dir / "events.jsonl"

    def write_config(self) -> Path:
        values: dict[str, object] = {
            "ports": self.ports,
            "state_dir": str(self.state_dir),
            "run_dir": str(self.run_dir),
            "batch_max_seconds": 0.5,
            "log_level": "debug",
            "metrics_port": self.metrics_port,
        }
        values.update(self.extra)
        lines = [f"{k} = {json.dumps(v)}" for k, v in values.items()]
        path = self.dir / "agent.conf"
        path.write_text("\n".join(lines) + "\n")
        return path

    def start(self, timeout: float = 30) -> Agent:
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o755)  # the stages' user must reach run/ and state/
        config = self.write_config()
        self.notify = NotifySocket(self.dir / "notify.sock")
        env = {k: v for k, v in os.environ.items() if not k.startswith("TOKTRA_")}
        env["NOTIFY_SOCKET"] = str(self.notify.path)
        self.log = open(self.log_file, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [*AGENT, "run", "--config", str(config)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own process group, as under a shell
        )
        try:
            self.notify.wait_for("READY=1", timeout)
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"agent not ready; log:\n{self.log_text()}") from None
        return self

    def stop(self, timeout: float = 30) -> int:
        code = -1
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                code = self.proc.wait(5)
        elif self.proc:
            code = self.proc.returncode
        self.log.close()
        self.notify.close()
        return code

    def log_text(self) -> str:
        return self.log_file.read_text(errors="replace")

    def events(self) -> list[dict]:
        if not self.events_file.exists():
            return []
        return [json.loads(line) for line in self.events_file.read_text().splitlines()]

    def wait_events(self, predicate, timeout: float = 20) -> list[dict]:
        """Waits until predicate(events) holds; returns the events."""
        deadline = time.monotonic() + timeout
        while True:
            events = self.events()
            if predicate(events):
                return events
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"events never satisfied the test; {len(events)} seen; "
                    f"log tail:\n{self.log_text()[-3000:]}"
                )
            time.sleep(0.2)

    def stage_pids(self) -> dict[str, int]:
        """The supervisor's children by stage, from their comm."""
        assert self.proc
        pids = {}
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        for pid in children.read_text().split():
            with contextlib.suppress(OSError):
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
                for stage, name in COMM.items():
                    if comm == name:
                        pids[stage] = int(pid)
        return pids


def run_pyclient(mode: str, host: str, port: int, pki: Pki, secret: str, snis):
    """Starts a client process; returns the Popen (stdout is JSON lines)."""
    return subprocess.Popen(
        [
            sys.executable,
            str(PYCLIENT),
            mode,
            host,
            str(port),
            str(pki.ca_file),
            secret,
            *snis,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_curl(host: str, port: int, pki: Pki, sni: str, secret: str):
    """curl with --resolve, so SNI and Host say `sni` but it dials `host`."""
    addr = f"[{host}]" if ":" in host else host
    return subprocess.Popen(
        [
            "curl",
            "--silent",
            "--show-error",
            "--max-time",
            "20",
            "--cacert",
            str(pki.ca_file),
            "--resolve",
            f"{sni}:{port}:{addr}",
            "--data-binary",
            f"prompt={secret}",
            "--output",
            "/dev/null",
            "--write-out",
            "%{local_port}",
            f"https://{sni}:{port}/v1/chat",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def real_hello(name: str | None, **options) -> bytes:
    """The ClientHello Python's OpenSSL sends first, through memory BIOs.

    `options` are set on the context (maximum_version, for instance).
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    for key, value in options.items():
        setattr(ctx, key, value)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=name)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        return outgoing.read()
    raise AssertionError("a handshake cannot finish without a server")
