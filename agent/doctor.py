"""`toktra-agent doctor`: can this host run the agent, and how well?

In: the configuration, the running kernel and this process's privileges.
Out: one line per check, in a fixed order, each problem with what to do
about it, and an exit code that sums them up:

  0  every check is ok
  1  warnings: the agent runs and captures with BPF, but something needs
     attention or works only in part (a certificate near its end, a libssl
     its probes cannot reach, a run_dir it has yet to create)
  2  the agent cannot run: no BPF object, no such user, the metrics port
     held by another program, BPF unusable while capture_mode = bpf; a
     configuration error exits 2 as well, from the command line, before
     any check
  3  the agent runs only degraded: BPF cannot run here (or capture_mode =
     sockdiag), so the collector polls sock_diag and reports connections
     without names, and nothing classifies as a provider or ships

The worst finding decides, in the order 2, 3, 1. A check that cannot be
made is a failure line; one that depends on an earlier failure is skipped
and counts for nothing, since the earlier one already does.

Run it as root, as the collector runs. It changes one thing: like the
collector at start, it mounts tracefs when it is not mounted. Its
end-to-end checks load the probes on a port of their own and talk TLS to a
server of their own on 127.0.0.1, with a certificate made for the run; no
other host is contacted, and no secret is printed.
"""

from __future__ import annotations

import contextlib
import datetime
import enum
import errno
import http.client
import logging
import os
import pwd
import socket
import ssl
import stat
import tempfile
import threading
import time
import urllib.error
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent import status
from agent.collector import libssl, probes, sockdiag
from agent.collector.kernel import (
    CAP_BPF,
    CAP_PERFMON,
    CAP_SYS_ADMIN,
    Kernel,
    KernelSupportError,
)
from agent.collector.libbpf import BpfError, Libbpf
from agent.collector.tracker import Tracker, boot_id, proc_exe
from agent.config import Config
from agent.runtime import lookup_account
from agent.shipper.identity import (
    CERT_NAME,
    DEVICE_ID_NAME,
    KEY_NAME,
    Credentials,
    Identity,
    common_name,
)
from agent.supervisor import unreadable_paths

MIN_KERNEL = (5, 10)
CERT_WARN_DAYS = 14
# Reserved names (RFC 2606): they can never reach a real server.
TLS_NAME = "doctor.toktra.invalid"
HELLO_NAME = "hello.doctor.toktra.invalid"
TIMEOUT_S = 5.0
METRICS_TIMEOUT_S = 2.0
DETAIL_MAX = 320  # a refused variant's reason can hold libbpf's whole log
# What the send hook must have before it is worth loading.
LOAD_NEEDS = ("btf", "tracefs", "libbpf", "privilege", "object")
HOOKS = {
    "tracepoint": "tracepoint sock/sock_send_length",
    "fexit": "fexit on tcp_sendmsg",
    "syscalls": "the send syscalls' tracepoints",
}


# The inode the kernel gives the initial pid namespace (PROC_PID_INIT_INO).
INITIAL_PID_NS_INO = 0xEFFFFFFC


class Status(enum.Enum):
    OK = "ok"
    WARN = "warn"
    FAIL = "FAIL"
    SKIP = "skip"


class Effect(enum.IntEnum):
    """What a finding means for the agent; the value is the exit code."""

    NONE = 0
    PARTIAL = 1
    BROKEN = 2
    DEGRADED = 3


# Worst last; not the numeric order, which follows the CLI's exit codes.
_RANK = (Effect.NONE, Effect.PARTIAL, Effect.DEGRADED, Effect.BROKEN)


def worst(effects: list[Effect]) -> Effect:
    return max(effects, key=_RANK.index, default=Effect.NONE)


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    advice: str = ""  # what to do, for a warning or a failure
    effect: Effect = Effect.NONE

    def line(self) -> str:
        text = f"{self.detail}; {self.advice}" if self.advice else self.detail
        text = " ".join(text.split())  # one line, whatever a reason held
        return f"{self.status.value:<6}{self.name:<13}{text}"


def ok(name: str, detail: str) -> Check:
    return Check(name, Status.OK, detail)


def warn(name: str, detail: str, advice: str, effect: Effect = Effect.PARTIAL) -> Check:
    return Check(name, Status.WARN, detail, advice, effect)


def fail(name: str, detail: str, advice: str, effect: Effect) -> Check:
    return Check(name, Status.FAIL, detail, advice, effect)


def skip(name: str, detail: str) -> Check:
    return Check(name, Status.SKIP, detail)


@dataclass
class Exchange:
    """The end-to-end check's two loopback connections, as the capture saw them."""

    port: int
    hello_capture: bool  # the loaded object copies ClientHellos
    tls_port: int = 0  # each client's source port, once connected
    hello_port: int = 0
    tls_error: str = ""
    hello_error: str = ""
    finals: dict[int, dict[str, Any]] = field(default_factory=dict)  # by src_port


class LogLines(logging.Handler):
    """Keeps what the agent's modules log while the doctor runs.

    The loader logs what it does and what it skips; here the check lines say
    it instead, and the libssl check quotes its reasons.
    """

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@dataclass
class Doctor:
    """What the checks share: the configuration and what earlier ones found."""

    config: Config
    kernel: Kernel = field(default_factory=Kernel)
    found: dict[str, Check] = field(default_factory=dict)  # first line per check
    libbpf: Libbpf | None = None
    capture: probes.Capture | None = None  # loaded by send-hook on a free port
    exchange: Exchange | None = None
    log: LogLines = field(default_factory=LogLines)

    def capture_effect(self) -> Effect:
        """What BPF not working means under the configured capture_mode."""
        by_mode = {"auto": Effect.DEGRADED, "bpf": Effect.BROKEN}
        return by_mode.get(self.config.capture_mode, Effect.PARTIAL)

    def capture_problem(self, name: str, detail: str, advice: str) -> Check:
        """A problem that only costs BPF capture; how much depends on the mode."""
        mode = self.config.capture_mode
        if mode == "sockdiag":
            return warn(name, detail, f"{advice} (capture_mode = sockdiag: unused)")
        then = {
            "auto": "until then the collector runs degraded, without names",
            "bpf": "until then the collector does not start (capture_mode = bpf)",
        }[mode]
        return fail(name, detail, f"{advice} ({then})", self.capture_effect())

    def failed(self, names: tuple[str, ...]) -> list[str]:
        return [n for n in names if n in self.found and not self._ok(n)]

    def _ok(self, name: str) -> bool:
        return self.found[name].status is Status.OK

    def bpf_works(self) -> bool:
        hook = self.found.get("send-hook")
        return hook is not None and hook.status is Status.OK

    def close(self) -> None:
        if self.capture is not None:
            self.capture.close()
            self.capture = None


# --- kernel and privileges ---------------------------------------------------


def _version(release: str) -> tuple[int, int] | None:
    parts = release.split("-", 1)[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return None


def check_kernel(d: Doctor, name: str) -> Check:
    release = d.kernel.release()
    need = ".".join(map(str, MIN_KERNEL))
    version = _version(release)
    if version is None:
        return warn(
            name,
            f"{release}: no version number in it",
            f"make sure the kernel is {need} or later",
        )
    if version < MIN_KERNEL:
        return d.capture_problem(
            name,
            f"{release} is older than {need}",
            f"upgrade to a kernel {need} or later",
        )
    return ok(name, f"{release} ({need} or later needed)")


def check_btf(d: Doctor, name: str) -> Check:
    path = d.kernel.btf_path
    if not os.path.exists(path):
        return d.capture_problem(
            name,
            f"{path} missing: this kernel has no BTF",
            "install a kernel built with CONFIG_DEBUG_INFO_BTF=y",
        )
    return ok(name, f"{path} present")


def _mounted(kernel: Kernel, path: str, fstype: str) -> bool:
    with open(os.path.join(kernel.proc_root, "self/mounts")) as f:
        return any(line.split()[1:3] == [path, fstype] for line in f)


def check_tracefs(d: Doctor, name: str) -> Check:
    path = d.kernel.tracefs
    if _mounted(d.kernel, path, "tracefs"):
        if os.access(os.path.join(path, "events"), os.R_OK | os.X_OK):
            return ok(name, f"mounted at {path}")
        # ensure_tracefs would try to mount it again and blame the mount.
        return d.capture_problem(
            name,
            f"mounted at {path}, but this process cannot read it",
            "run the doctor as root, as the collector runs",
        )
    try:
        d.kernel.ensure_tracefs()
    except KernelSupportError as e:
        return d.capture_problem(
            name, str(e), f"mount it: mount -t tracefs tracefs {path}"
        )
    return ok(name, f"was not mounted; mounted it at {path}, as the collector would")


def _mapped_file(fragment: str) -> str:
    """The path of a file this process maps whose name holds `fragment`."""
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            if len(parts) == 6 and fragment in os.path.basename(parts[5]):
                return parts[5].strip()
    return ""


def check_libbpf(d: Doctor, name: str) -> Check:
    try:
        d.libbpf = Libbpf()
    except BpfError as e:
        return d.capture_problem(
            name,
            f"cannot load libbpf.so.1: {e.__cause__ or e}",
            "install libbpf 1.1 or later (Debian: apt-get install libbpf1)",
        )
    lib = d.libbpf.lib
    path = _mapped_file("libbpf.so") or "libbpf.so.1"
    try:
        version = f"{lib.libbpf_major_version()}.{lib.libbpf_minor_version()}"
    except AttributeError:  # before libbpf 0.6 it could not say
        return ok(name, f"{path} loads (its version is not available)")
    return ok(name, f"{path} loads, version {version}")


def check_privilege(d: Doctor, name: str) -> Check:
    caps = d.kernel.effective_caps()
    uid = os.geteuid()
    try:
        d.kernel.require_bpf_privilege()
    except KernelSupportError as e:
        # Its message names what the collector needs; this process is
        # standing in for the collector.
        return d.capture_problem(
            name, f"uid {uid}: {e}", "run the doctor as root, as the collector runs"
        )
    named = {
        "CAP_BPF": CAP_BPF,
        "CAP_PERFMON": CAP_PERFMON,
        "CAP_SYS_ADMIN": CAP_SYS_ADMIN,
    }
    held = [cap for cap, bit in named.items() if caps >> bit & 1]
    return ok(name, f"{', '.join(held)} effective (uid {uid})")


# --- the BPF object and what it attaches to ----------------------------------


def check_object(d: Doctor, name: str) -> Check:
    configured = d.config.bpf_object
    try:
        path = probes.find_object(configured)
    except probes.ProbeError:
        if configured:
            detail = f"{configured} (bpf_object) does not exist"
            advice = (
                f"point bpf_object at {probes.OBJECT_NAME}, or leave it empty to "
                "use the standard places"
            )
        else:
            places = ", ".join(probes.object_candidates())
            detail = f"{probes.OBJECT_NAME} not found; looked in {places}"
            advice = "build it with `make bpf` in the checkout, or install the package"
        if d.config.capture_mode == "sockdiag":
            return warn(name, detail, f"{advice} (capture_mode = sockdiag: unused)")
        return fail(name, detail, advice, Effect.BROKEN)
    return ok(name, path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clip(text: str) -> str:
    return text if len(text) <= DETAIL_MAX else text[: DETAIL_MAX - 3] + "..."


def _load(d: Doctor, port: int) -> probes.Capture:
    cfg = d.config
    return probes.load(
        [port],
        cfg.send_hook,
        cfg.bpf_object,
        cfg.libssl_paths,
        kernel=d.kernel,
        bpf=d.libbpf,
    )


def check_send_hook(d: Doctor, name: str) -> Check:
    cfg = d.config
    if cfg.capture_mode == "sockdiag":
        return warn(
            name,
            "not loaded: capture_mode = sockdiag polls sock_diag without BPF, so "
            "connections have no names and nothing ships",
            "set capture_mode = auto to capture with BPF",
            Effect.DEGRADED,
        )
    if blocked := d.failed(LOAD_NEEDS):
        return skip(name, f"not tried: needs {', '.join(blocked)} (see above)")
    try:
        d.capture = _load(d, _free_port())  # a port no one uses: it sees nothing
    except probes.ProbeError as e:
        if cfg.send_hook != "auto":
            advice = f"set send_hook = auto (it is {cfg.send_hook})"
        else:
            advice = "run the collector with log_level = debug for libbpf's log"
        if not e.environment:
            return fail(name, _clip(str(e)), advice, Effect.BROKEN)
        return d.capture_problem(name, _clip(str(e)), advice)
    capture = d.capture
    detail = f"{HOOKS[capture.send_hook]} (send_hook = {cfg.send_hook})"
    if capture.refused:
        passed = (f"{mode}: {_clip(why)}" for mode, why in capture.refused.items())
        detail += "; passed over: " + "; ".join(passed)
    if capture.fell_back:
        return warn(
            name,
            detail,
            f"set send_hook = auto: {cfg.send_hook} does not load on this kernel",
        )
    return ok(name, detail)


def _logged_reason(d: Doctor, seen_as: str) -> str:
    """What the loader logged about a libssl file it did not attach to."""
    said = [
        m
        for m in d.log.messages
        if seen_as in m and not m.startswith("OpenSSL uprobes attached")
    ]
    return _clip(said[-1]) if said else ""


def check_libssl(d: Doctor, name: str) -> list[Check]:
    capture = d.capture
    if capture is None:
        return [skip(name, "not tried: the probes did not load (see send-hook)")]
    lines = [
        warn(
            name,
            f"{path} (libssl_paths) does not exist",
            "fix or remove it in libssl_paths",
        )
        for path in d.config.libssl_paths
        if not os.path.exists(path)
    ]
    attached = {(lib.dev, lib.ino) for lib in capture.libraries}
    for lib in capture.libraries:
        via = f" (through {lib.path})" if lib.path != lib.seen_as else ""
        lines.append(ok(name, f"{lib.seen_as}{via}: the 4 OpenSSL uprobes attach"))
    # The loader keeps no list of what it passed over, only its log: find
    # the files again and quote it. One it said nothing about was mapped
    # after the load, which the collector attaches as it happens.
    left = [
        (lib, why)
        for lib in libssl.find_libraries(d.config.libssl_paths)
        if (lib.dev, lib.ino) not in attached
        and (why := _logged_reason(d, lib.seen_as))
    ]
    for lib, why in left:
        lines.append(
            warn(
                name,
                f"{lib.seen_as}: the OpenSSL uprobes are not attached: {why}",
                "its clients are named from their ClientHello only",
            )
        )
    if not attached and not left:
        lines.append(
            warn(
                name,
                "no libssl found (none mapped by a process, none in the usual places)",
                "OpenSSL clients are named from their ClientHello only; add a "
                "libssl elsewhere to libssl_paths",
            )
        )
    return lines


# --- end to end over loopback -------------------------------------------------


def _throwaway_certificate(names: tuple[str, ...]) -> tuple[bytes, bytes]:
    """A self-signed key and certificate (PEM) for the names, valid an hour."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


class LoopbackServer:
    """A TLS server on 127.0.0.1 that answers one line per client."""

    def __init__(self, names: tuple[str, ...]) -> None:
        key_pem, self.cert_pem = _throwaway_certificate(names)
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        # ssl loads a key only from a file: a private directory, gone at once.
        with tempfile.TemporaryDirectory(prefix="toktra-doctor-") as tmp:
            key_file, cert_file = f"{tmp}/key.pem", f"{tmp}/cert.pem"
            fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(key_pem)
            with open(cert_file, "wb") as f:
                f.write(self.cert_pem)
            self.context.load_cert_chain(cert_file, key_file)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(TIMEOUT_S)
        self.port: int = self.listener.getsockname()[1]
        self._thread: threading.Thread | None = None

    def serve(self, clients: int) -> None:
        self._thread = threading.Thread(
            target=self._serve, args=(clients,), name="doctor-tls", daemon=True
        )
        self._thread.start()

    def _serve(self, clients: int) -> None:
        for _ in range(clients):
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # closed, or no client came: the checks say so
            conn.settimeout(TIMEOUT_S)
            # The ClientHello-only client leaves mid-handshake: that error
            # is expected, and any other shows on the client's side.
            with (
                contextlib.suppress(OSError),
                conn,
                self.context.wrap_socket(conn, server_side=True) as tls,
            ):
                if tls.recv(64):
                    tls.sendall(b"pong\n")

    def close(self) -> None:
        self.listener.close()
        if self._thread is not None:
            self._thread.join(TIMEOUT_S)


def _client_hello(server_name: str) -> bytes:
    """The first record Python's OpenSSL would send, made without a socket."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    into, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(into, out, server_hostname=server_name)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return out.read()


def _send_hello(port: int, hello: bytes) -> int:
    """Writes a bare ClientHello on a plain socket; returns its source port."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as s:
        s.sendall(hello)
        with contextlib.suppress(OSError):
            s.recv(4096)  # the server's answer: it took the hello for TLS
        return s.getsockname()[1]


def _tls_client(port: int, cert_pem: bytes) -> int:
    """One verified TLS exchange through Python's ssl; returns its source port."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cadata=cert_pem.decode())
    with (
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as raw,
        ctx.wrap_socket(raw, server_hostname=TLS_NAME) as tls,
    ):
        tls.sendall(b"ping\n")
        tls.recv(64)
        return tls.getsockname()[1]


def _drain(capture: probes.Capture, tracker: Tracker, ex: Exchange) -> None:
    """Reads the ring until both clients' final messages are in, or time is up."""
    ring = capture.ring_buffer(tracker.on_record)
    wanted = {p for p in (ex.tls_port, ex.hello_port) if p}
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not wanted <= ex.finals.keys() and time.monotonic() < deadline:
            ring.poll(50)
            ring.consume()
            for msg in tracker.take():
                if msg["final"]:
                    ex.finals[msg["src_port"]] = msg
    finally:
        ring.free()


def _exchange(d: Doctor) -> Exchange:
    # Made before these probes exist, so no OpenSSL call names the bare hello.
    hello = _client_hello(HELLO_NAME)
    server = LoopbackServer((TLS_NAME, HELLO_NAME))
    try:
        capture = _load(d, server.port)
        try:
            ex = Exchange(server.port, capture.hello)
            tracker = Tracker(boot_id(), proc_exe())
            server.serve(2)
            try:
                ex.hello_port = _send_hello(server.port, hello)
            except OSError as e:
                ex.hello_error = str(e)
            try:
                ex.tls_port = _tls_client(server.port, server.cert_pem)
            except OSError as e:  # ssl.SSLError too
                ex.tls_error = str(e)
            _drain(capture, tracker, ex)
        finally:
            capture.close()
    finally:
        server.close()
    return ex


def _mismatches(msg: dict[str, Any], sni: str, source: str) -> list[str]:
    wrong = []
    if msg["sni"] != sni:
        wrong.append(f"named {msg['sni']!r}, not {sni}")
    if msg["sni_source"] != source:
        wrong.append(f"sni_source {msg['sni_source']}, not {source}")
    # The kernel names processes by their pid in the initial namespace; in
    # a container (a pid namespace of its own) ours differs and says nothing.
    if _in_initial_pid_namespace() and msg["pid"] != os.getpid():
        wrong.append(f"pid {msg['pid']}, not {os.getpid()}")
    return wrong


def _in_initial_pid_namespace() -> bool:
    try:
        return os.stat("/proc/self/ns/pid").st_ino == INITIAL_PID_NS_INO
    except OSError:
        return True


def check_end_to_end(d: Doctor, name: str) -> Check:
    if d.capture is None:
        return skip(name, "not tried: the probes did not load (see send-hook)")
    ex = d.exchange = _exchange(d)
    where = f"127.0.0.1:{ex.port}"
    if ex.tls_error:
        return fail(
            name,
            f"the TLS client to {where} failed: {ex.tls_error}",
            "make sure loopback TCP works here",
            Effect.PARTIAL,
        )
    msg = ex.finals.get(ex.tls_port)
    if msg is None:
        return fail(
            name,
            f"no message for a TLS connection to {where} within {TIMEOUT_S:.0f} s: "
            "the probes load but see nothing",
            "look at the collector's log with log_level = debug; try send_hook = "
            "syscalls",
            Effect.BROKEN,
        )
    wrong = _mismatches(msg, TLS_NAME, "openssl")
    if not (msg["bytes_sent"] and msg["bytes_received"]):
        wrong.append(
            f"bytes {msg['bytes_sent']} sent, {msg['bytes_received']} received"
        )
    if wrong:
        return fail(
            name,
            f"TLS to {where} as {TLS_NAME}: {', '.join(wrong)}",
            "check the libssl lines (this process's libssl must be attached)",
            Effect.PARTIAL,
        )
    return ok(
        name,
        f"TLS to {where} named {TLS_NAME} (sni_source openssl), pid {msg['pid']}, "
        f"{msg['bytes_sent']} bytes sent, {msg['bytes_received']} received",
    )


def check_clienthello(d: Doctor, name: str) -> Check:
    ex = d.exchange
    if ex is None:
        return skip(name, "not tried (see end-to-end)")
    where = f"127.0.0.1:{ex.port}"
    if not ex.hello_capture:
        return warn(
            name,
            "no ClientHello capture: this kernel has no send syscall tracepoints",
            "clients with their own TLS (Go, Java, Node.js, rustls) get no name",
        )
    if ex.hello_error:
        return fail(
            name,
            f"the ClientHello-only client to {where} failed: {ex.hello_error}",
            "make sure loopback TCP works here",
            Effect.PARTIAL,
        )
    msg = ex.finals.get(ex.hello_port)
    wrong = (
        ["no message"] if msg is None else _mismatches(msg, HELLO_NAME, "clienthello")
    )
    if wrong:
        return fail(
            name,
            f"a bare ClientHello to {where} for {HELLO_NAME}: {', '.join(wrong)}",
            "clients with their own TLS (Go, Java, Node.js) would go unnamed; "
            "look at the collector's log with log_level = debug",
            Effect.PARTIAL,
        )
    return ok(
        name,
        f"a bare ClientHello to {where} named {HELLO_NAME} (sni_source "
        f"clienthello), pid {msg['pid']}",
    )


# --- the rest of the agent ----------------------------------------------------


def check_sockdiag(d: Doctor, name: str) -> Check:
    ports = d.config.ports
    watched = f"port{'s' if len(ports) > 1 else ''} {', '.join(map(str, ports))}"
    start = time.monotonic()
    try:
        sockets = sockdiag.dump(ports)
    except (sockdiag.SockDiagError, ValueError) as e:
        # Without BPF, sock_diag is all the collector has left.
        effect = Effect.PARTIAL if d.bpf_works() else Effect.BROKEN
        return fail(
            name,
            str(e),
            "load inet_diag and tcp_diag (modprobe tcp_diag): progress reports, "
            "adoption at start and degraded capture need them",
            effect,
        )
    took = (time.monotonic() - start) * 1000
    return ok(
        name,
        f"{watched}: {len(sockets)} established connection(s), read in {took:.0f} ms",
    )


def _device_id(config: Config) -> str:
    if config.device_id:
        return config.device_id
    try:
        with open(os.path.join(config.state_dir, DEVICE_ID_NAME)) as f:
            return f.read().strip()
    except FileNotFoundError:
        return ""


def check_enrollment(d: Doctor, name: str) -> Check:
    cfg = d.config
    if not cfg.ingest_url:
        return ok(name, f"local mode: events go to {cfg.state_dir}/events.jsonl")
    if not cfg.enroll_url:
        return warn(
            name,
            "ingest_url is set without enroll_url: batches go without a client "
            "certificate",
            "set enroll_url and enrollment_token if the ingest wants mutual TLS",
        )
    # Whether the shipper can enroll again by itself decides how bad it is.
    if cfg.enrollment_token:
        again, bad = "the shipper enrolls with the token at start", Status.WARN
    else:
        again, bad = "set enrollment_token, then run `toktra-agent enroll`", Status.FAIL
    cert_file = os.path.join(cfg.state_dir, CERT_NAME)
    if not os.path.exists(cert_file):
        return Check(
            name, bad, f"not enrolled yet: no {cert_file}", again, Effect.PARTIAL
        )
    with open(cert_file, "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    device, cn = _device_id(cfg), common_name(cert)
    if device != cn:
        shown = device or "(none yet: one is generated at start)"
        detail = f"{cert_file} is for {cn!r}, the device id is {shown}"
        return Check(name, bad, detail, again, Effect.PARTIAL)
    # No token: current() reads the stored pair and never needs it.
    creds = Identity(cfg.state_dir, device, cfg.enroll_url, "").current()
    if creds is None:
        detail = f"{KEY_NAME} is missing, unreadable or not the key of {CERT_NAME}"
        return Check(name, bad, detail, again, Effect.PARTIAL)
    return _certificate_check(name, device, creds, again, bad)


def _certificate_check(
    name: str, device: str, creds: Credentials, again: str, bad: Status
) -> Check:
    now = datetime.datetime.now(datetime.UTC)
    days = (creds.not_after - now) // datetime.timedelta(days=1)
    about = (
        f"device {device}: certificate serial {creds.serial:x}, valid until "
        f"{creds.not_after:%Y-%m-%d}"
    )
    if creds.expired(now):
        ago = (now - creds.not_after) // datetime.timedelta(days=1)
        detail = f"{about}: expired {f'{ago} days ago' if ago else 'today'}"
        return Check(name, bad, detail, again, Effect.PARTIAL)
    about += f" ({days} days left, renewal due {creds.renew_at:%Y-%m-%d})"
    renew = (
        "the shipper renews it while it runs; check its log for why it has not, "
        "or run `toktra-agent enroll`"
    )
    if days < CERT_WARN_DAYS:
        return warn(name, f"{about}: under {CERT_WARN_DAYS} days left", renew)
    if now >= creds.renew_at:
        return warn(name, f"{about}: renewal is overdue", renew)
    mode = stat.S_IMODE(os.stat(creds.key_file).st_mode)
    if mode & 0o077:
        return warn(
            name,
            f"{about}; {creds.key_file} has mode {mode:04o}",
            f"chmod 0600 {creds.key_file}",
        )
    return ok(name, about)


def _serves_toktra(config: Config) -> bool:
    try:
        samples = status.fetch(status.metrics_url(config), METRICS_TIMEOUT_S)
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException):
        return False
    return any(sample.startswith("toktra_") for sample in samples)


def _listener(kernel: Kernel, port: int) -> str:
    """Which process listens on TCP `port`, as " (pid N, comm)", or ""."""
    inodes = set()
    for table in ("net/tcp", "net/tcp6"):
        try:
            with open(os.path.join(kernel.proc_root, table)) as f:
                rows = f.readlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            listening = cols[3] == "0A"  # TCP_LISTEN
            if listening and int(cols[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(int(cols[9]))
    for pid in sockdiag.pids_by_inode(inodes, kernel.proc_root).values():
        try:
            with open(os.path.join(kernel.proc_root, str(pid), "comm")) as f:
                return f" (pid {pid}, {f.read().strip()})"
        except OSError:
            continue
    return ""


def check_metrics(d: Doctor, name: str) -> Check:
    cfg = d.config
    host = cfg.metrics_address
    where = (
        f"[{host}]:{cfg.metrics_port}" if ":" in host else f"{host}:{cfg.metrics_port}"
    )
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # As the metrics server binds: a closing connection does not count.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, cfg.metrics_port))
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                return fail(
                    name,
                    f"cannot bind {where}: {e.strerror or e}",
                    "set metrics_address to an address of this host",
                    Effect.BROKEN,
                )
        else:
            return ok(name, f"{where} is free")
    if _serves_toktra(cfg):
        return ok(name, f"{where} is served by a running toktra agent")
    holder = _listener(d.kernel, cfg.metrics_port)
    return fail(
        name,
        f"{where} is held by another program{holder}, not a toktra agent",
        f"set metrics_port to a free port; the metrics stage cannot start on "
        f"{cfg.metrics_port}",
        Effect.BROKEN,
    )


def check_run_dir(d: Doctor, name: str) -> Check:
    cfg = d.config
    path, user = cfg.run_dir, cfg.user
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return warn(
            name,
            f"{path} does not exist",
            f"the agent creates it at start (owned by {user}, mode 0750); units "
            "run alone need units/toktra.tmpfiles.conf installed",
        )
    if not stat.S_ISDIR(st.st_mode):
        return fail(
            name,
            f"{path} exists and is not a directory",
            "remove it, or set run_dir",
            Effect.BROKEN,
        )
    try:
        uid = lookup_account(user).uid
    except LookupError:
        uid = None  # the user line says so
    wrong = []
    if uid is not None and st.st_uid != uid:
        wrong.append(f"owned by {_user_name(st.st_uid)}, not {user}")
    mode = stat.S_IMODE(st.st_mode)
    if mode != 0o750:
        wrong.append(f"mode {mode:04o}, not 0750")
    if not wrong:
        return ok(name, f"{path}: owned by {user}, mode 0750")
    if uid is not None and st.st_uid != uid and os.listdir(path):
        return fail(
            name,
            f"{path}: {', '.join(wrong)}, and not empty: the agent will not take "
            "it over",
            "point run_dir at a directory of the agent's own",
            Effect.BROKEN,
        )
    return warn(
        name,
        f"{path}: {', '.join(wrong)}",
        f"chown {user}: {path} && chmod 0750 {path} (the supervisor does this "
        "at start; units run alone rely on tmpfiles)",
    )


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def check_user(d: Doctor, name: str) -> Check:
    user = d.config.user
    try:
        account = lookup_account(user)
    except LookupError:
        return fail(
            name,
            f"user {user!r} does not exist",
            f"create it (useradd --system --no-create-home --shell "
            f"/usr/sbin/nologin {user}) or set user",
            Effect.BROKEN,
        )
    if account.uid == 0:
        return fail(
            name,
            f"user {user!r} is root",
            "set user to an unprivileged account: the classifier and shipper "
            "must not run as root",
            Effect.BROKEN,
        )
    if hidden := unreadable_paths(account):
        return fail(
            name,
            f"{user} cannot read {', '.join(hidden)}",
            "install the agent where that user can read it (the package, or a "
            "checkout outside /root)",
            Effect.BROKEN,
        )
    return ok(name, f"{user} (uid {account.uid}, gid {account.gid})")


# --- running them --------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    name: str
    check: Callable[[Doctor, str], Check | list[Check]]
    capture: bool = False  # failing costs BPF capture only (Doctor.capture_effect)
    stake: Effect = Effect.PARTIAL  # otherwise, what an unexpected error means


STEPS = (
    Step("kernel", check_kernel, capture=True),
    Step("btf", check_btf, capture=True),
    Step("tracefs", check_tracefs, capture=True),
    Step("libbpf", check_libbpf, capture=True),
    Step("privilege", check_privilege, capture=True),
    Step("object", check_object, stake=Effect.BROKEN),
    Step("send-hook", check_send_hook, capture=True),
    Step("libssl", check_libssl),
    Step("end-to-end", check_end_to_end),
    Step("clienthello", check_clienthello),
    Step("sock_diag", check_sockdiag),
    Step("enrollment", check_enrollment),
    Step("metrics", check_metrics, stake=Effect.BROKEN),
    Step("run_dir", check_run_dir),
    Step("user", check_user, stake=Effect.BROKEN),
)


def perform(d: Doctor, step: Step) -> list[Check]:
    try:
        result = step.check(d, step.name)
    except Exception as e:
        # The doctor reports, it never crashes: whatever went wrong in one
        # check is that check's line, and the others still run.
        if isinstance(e, PermissionError) and os.geteuid() != 0:
            advice = "run the doctor as root"
        else:
            advice = "unexpected; report this line with the agent's version"
        effect = d.capture_effect() if step.capture else step.stake
        why = _clip(f"{type(e).__name__}: {e}")
        result = fail(step.name, f"the check itself failed: {why}", advice, effect)
    checks = result if isinstance(result, list) else [result]
    d.found[step.name] = checks[0]
    return checks


@contextlib.contextmanager
def _kept_logs(handler: LogLines) -> Iterator[None]:
    logger = logging.getLogger("toktra")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def run(config: Config, out: TextIO, kernel: Kernel | None = None) -> int:
    """Runs every check in order, writing each line as it is known."""
    d = Doctor(config, kernel or Kernel())
    effects: list[Effect] = []
    with _kept_logs(d.log):
        try:
            for step in STEPS:
                for check in perform(d, step):
                    out.write(check.line() + "\n")
                    out.flush()
                    effects.append(check.effect)
        finally:
            d.close()
    return int(worst(effects))
