"""A real systemd in a container, for testing the agent's units under it.

The container is a Debian bookworm tree made with debootstrap, built once
and kept in `build/nspawn-root` (a stamp names what it was built with; a
missing or different stamp rebuilds it). It boots with `systemd-nspawn -b`
on the host's network, with what loading BPF inside needs, and with this
checkout bound read-only at the same path, so the virtualenv's interpreter
(/usr/bin/python3, the same Debian one inside) and the agent's code work
there unchanged. The tree's root is an overlay on a tmpfs (`--volatile=
overlay`): every boot starts from the cached tree, and what the agent wrote
in one boot is gone in the next. The agent's own files (command, units,
configuration) are bound in read-only for each boot; the tree itself is
never written after it is built.

`python -m tests.nspawn build` builds the tree (the Makefile's
`nspawn-root` target).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

ROOT = Path(__file__).resolve().parent.parent
TREE = ROOT / "build/nspawn-root"
STAMP = ROOT / "build/nspawn-root.stamp"
SUITE = "bookworm"
PACKAGES = "systemd,systemd-sysv,dbus,python3,libbpf1,ca-certificates,curl,openssl"
HOST_PACKAGES = ("systemd-container", "debootstrap")
BUILD_TIMEOUT_S = 900
BOOT_TIMEOUT_S = 60
COMMAND_TIMEOUT_S = 60


class Unavailable(Exception):
    """The container cannot be had here; the message says why."""


# -- the host --


def host_tools() -> None:
    """debootstrap and systemd-nspawn, installed with apt when missing."""
    if os.geteuid() != 0:
        raise Unavailable("needs root to build and boot a container")
    if all(shutil.which(t) for t in ("debootstrap", "systemd-nspawn")):
        return
    apt_install(HOST_PACKAGES)
    if not all(shutil.which(t) for t in ("debootstrap", "systemd-nspawn")):
        raise Unavailable("debootstrap or systemd-nspawn still missing after apt")


def apt_install(packages: Sequence[str]) -> None:
    """Installs Debian packages on the host; Unavailable when apt cannot."""
    if shutil.which("apt-get") is None:
        raise Unavailable(f"{' '.join(packages)} needed and there is no apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages],
    ):
        done = subprocess.run(
            cmd, capture_output=True, text=True, env=env, timeout=600, check=False
        )
        if done.returncode != 0:
            raise Unavailable(
                f"cannot install {' '.join(packages)}: {done.stderr[-500:]}"
            )


def _sources() -> list[tuple[list[str], list[str]]]:
    """(URIs, suites) of each Debian archive apt is configured with."""
    found = []
    apt = Path("/etc/apt")
    files = [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*"))]
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields = {}
                for line in stanza.splitlines():
                    if line.startswith("#") or ":" not in line:
                        continue
                    key, value = line.split(":", 1)
                    fields[key.strip().lower()] = value.split()
                if "deb" in fields.get("types", []):
                    found.append((fields.get("uris", []), fields.get("suites", [])))
        else:
            for line in text.splitlines():
                words = line.split("#", 1)[0].split()
                if words[:1] != ["deb"]:
                    continue
                words = [w for w in words[1:] if not w.startswith("[")]
                if len(words) >= 2:
                    found.append(([words[0]], [words[1]]))
    return found


def mirror() -> str:
    """The Debian mirror this machine's apt uses for the bookworm suite."""
    for uris, suites in _sources():
        if SUITE in suites:
            for uri in uris:
                if uri.startswith(("http://", "https://")):
                    return uri
    raise Unavailable(f"no apt source for Debian {SUITE} in /etc/apt")


def _stamp_text(source: str) -> str:
    return json.dumps({"suite": SUITE, "packages": PACKAGES, "mirror": source}) + "\n"


def build_tree(log=sys.stderr) -> Path:
    """The cached container tree, made with debootstrap when it is missing."""
    host_tools()
    source = mirror()
    TREE.parent.mkdir(parents=True, exist_ok=True)
    with open(TREE.parent / "nspawn-root.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time
        if (
            TREE.is_dir()
            and STAMP.exists()
            and json.loads(STAMP.read_text())["packages"] == PACKAGES
        ):
            return TREE
        STAMP.unlink(missing_ok=True)
        debootstrap(TREE, PACKAGES, source, log)
        STAMP.write_text(_stamp_text(source))
    return TREE


def debootstrap(tree: Path, packages: str, source: str, log=sys.stderr) -> None:
    """A fresh Debian tree at `tree` with `packages` (comma-separated).

    It is made beside `tree` and renamed into place once complete, so an
    interrupted build never leaves a tree that looks finished.
    """
    shutil.rmtree(tree, ignore_errors=True)
    partial = tree.with_name(tree.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    cmd = [
        "debootstrap",
        "--variant=minbase",
        f"--include={packages}",
        SUITE,
        str(partial),
        source,
    ]
    print("building a Debian tree:", " ".join(cmd), file=log, flush=True)
    started = time.monotonic()
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        shutil.rmtree(partial, ignore_errors=True)
        raise Unavailable(
            f"debootstrap took over {BUILD_TIMEOUT_S}s; tree not built"
        ) from None
    if done.returncode != 0:
        tail = (done.stdout + done.stderr)[-1500:]
        shutil.rmtree(partial, ignore_errors=True)
        raise Unavailable(f"debootstrap failed ({done.returncode}):\n{tail}")
    partial.rename(tree)
    print(
        f"{tree.name} built in {time.monotonic() - started:.0f}s",
        file=log,
        flush=True,
    )


# -- the agent, installed as a package would install it --

# The checkout is bound here, outside /tmp: the container mounts its own
# /tmp, and the units' PrivateTmp would hide a checkout under it anyway.
SOURCE_IN_BOX = "/opt/toktra"


def _wrapper() -> str:
    """/usr/bin/toktra-agent inside: Debian's python3 on the bound checkout.

    The venv's own scripts name its path on the host in their first line,
    so the wrapper puts the checkout and the venv's packages on the path.
    """
    site = next((ROOT / ".venv/lib").glob("python3*/site-packages"))
    inside = f"{SOURCE_IN_BOX}/{site.relative_to(ROOT)}"
    return (
        "#!/bin/sh\n"
        f'PYTHONPATH={SOURCE_IN_BOX}:{inside} exec /usr/bin/python3 -m agent.cli "$@"\n'
    )


def install_agent(stage: Path, config: dict[str, object]) -> dict[str, Path]:
    """The agent's files as a package installs them: container path -> file.

    They are written under `stage` and bound read-only into the container
    at boot, so the cached tree stays as debootstrap made it and two runs
    at once each have their own configuration.
    """
    units = ROOT / "units"
    files = {"/usr/bin/toktra-agent": (_wrapper(), 0o755)}
    for unit in sorted(units.glob("*.service")) + sorted(units.glob("*.target")):
        files[f"/etc/systemd/system/{unit.name}"] = (unit.read_text(), 0o644)
    files["/usr/lib/sysusers.d/toktra.conf"] = (
        (units / "toktra.sysusers.conf").read_text(),
        0o644,
    )
    files["/usr/lib/tmpfiles.d/toktra.conf"] = (
        (units / "toktra.tmpfiles.conf").read_text(),
        0o644,
    )
    conf = "".join(f"{key} = {json.dumps(value)}\n" for key, value in config.items())
    files["/etc/toktra/agent.conf"] = (conf, 0o644)
    installed = {}
    for path, (text, mode) in files.items():
        installed[path] = stage / path.lstrip("/")
        _write(installed[path], text, mode)
    return installed


def _write(path: Path, text: str, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.chmod(tmp, mode)
    tmp.rename(path)


def unreadable_by_others(base: Path, paths: list[Path]) -> list[str]:
    """Directories from `base` down to each path that others cannot enter.

    Inside the container `base` is bound at the same path under
    directories nspawn makes 0755; what lies below must let the stages'
    user through.
    """
    bad: list[str] = []
    for path in paths:
        rel = path.relative_to(base).parts
        for i in range(len(rel) + 1):
            part = base.joinpath(*rel[:i])
            if os.stat(part).st_mode & 0o005 != 0o005 and str(part) not in bad:
                bad.append(str(part))
    return bad


# -- the container --


@dataclass
class Container:
    """A booted systemd in `tree`, driven through nsenter and systemctl."""

    tree: Path
    log_path: Path
    files: dict[str, Path] = field(default_factory=dict)  # bound read-only
    proc: subprocess.Popen | None = None
    leader: int = 0
    journal_mark: str = ""
    _log: object = field(default=None, repr=False)

    def boot(self) -> Container:
        for host_path in ("/sys/kernel/tracing", "/sys/fs/bpf"):
            if not os.path.isdir(host_path):
                raise Unavailable(f"{host_path} does not exist on this host")
        if not os.path.ismount("/sys/kernel/tracing"):
            subprocess.run(
                ["mount", "-t", "tracefs", "tracefs", "/sys/kernel/tracing"],
                check=True,
                timeout=10,
            )
        cmd = [
            "systemd-nspawn",
            "--boot",
            f"--directory={self.tree}",
            f"--machine=toktra-test-{os.getpid()}",
            "--register=no",
            "--keep-unit",
            "--volatile=overlay",
            "--console=read-only",
            "--capability=CAP_BPF,CAP_PERFMON",
            "--system-call-filter=bpf perf_event_open",
            "--bind=/sys/kernel/tracing",
            "--bind=/sys/fs/bpf",
            f"--bind-ro={ROOT}:{SOURCE_IN_BOX}",
            *(f"--bind-ro={src}:{dst}" for dst, src in self.files.items()),
        ]
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            self.leader = self._find_leader(BOOT_TIMEOUT_S)
            self._wait_running(BOOT_TIMEOUT_S)
        except BaseException:
            self.stop()
            raise
        return self

    def _find_leader(self, timeout: float) -> int:
        """The container's init: a descendant of nspawn that is pid 1 inside."""
        assert self.proc
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"systemd-nspawn exited with {self.proc.returncode}:\n"
                    + self.console_tail()
                )
            for pid in _descendants(self.proc.pid):
                with contextlib.suppress(OSError):
                    status = Path(f"/proc/{pid}/status").read_text()
                    nspid = re.search(r"^NSpid:\s*(.*)$", status, re.M)
                    if nspid and nspid.group(1).split()[-1] == "1":
                        return pid
            time.sleep(0.05)
        raise TimeoutError(f"no container init in {timeout}s:\n{self.console_tail()}")

    def _wait_running(self, timeout: float) -> None:
        """Waits until systemd finished booting (running, or degraded)."""
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            done = self.run(["systemctl", "is-system-running"], check=False, timeout=10)
            state = done.stdout.strip()
            if state in ("running", "degraded"):
                return
            time.sleep(0.2)
        raise TimeoutError(
            f"container not booted in {timeout}s (state {state!r}):\n"
            + self.console_tail()
        )

    def stop(self, timeout: float = 30) -> None:
        """Powers the container off; kills what it started if it lingers.

        The container's init is the pid namespace's first process: killing
        it ends every process inside, and nspawn then exits by itself.
        """
        if self.proc and self.proc.poll() is None:
            if self.leader:
                with contextlib.suppress(subprocess.SubprocessError, OSError):
                    self.run(["systemctl", "--no-block", "poweroff"], timeout=10)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                if self.leader:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.leader, signal.SIGKILL)
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    os.kill(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(10)
        if self._log:
            self._log.close()
            self._log = None

    # -- commands inside --

    def run(
        self,
        cmd: list[str],
        check: bool = True,
        timeout: float = COMMAND_TIMEOUT_S,
        input: str | None = None,
    ) -> subprocess.CompletedProcess:
        """Runs `cmd` in every namespace of the container."""
        done = subprocess.run(
            ["nsenter", "-t", str(self.leader), "-a", *cmd],
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            check=False,
        )
        if check and done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(cmd)} exited {done.returncode}:\n"
                f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
            )
        return done

    def systemctl(self, *args: str, check: bool = True, timeout: float = 90):
        return self.run(["systemctl", *args], check=check, timeout=timeout)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        done = self.systemctl("show", unit, *(f"--property={p}" for p in props))
        values = {}
        for line in done.stdout.splitlines():
            key, _, value = line.partition("=")
            values[key] = value
        return values

    def journal(self, *units: str, lines: int | None = None) -> str:
        """The journal since mark_journal() (its last `lines`), of `units` if named."""
        cmd = ["journalctl", "--no-pager", "--no-hostname"]
        for unit in units:
            cmd += ["-u", unit]
        # With a cursor, -n would count from the cursor, not back from the end.
        if self.journal_mark:
            cmd.append(f"--after-cursor={self.journal_mark}")
        text = self.run(cmd, check=False, timeout=20).stdout
        return text if lines is None else "\n".join(text.splitlines()[-lines:])

    def mark_journal(self) -> None:
        """From now on journal() shows only what comes after this point."""
        done = self.run(["journalctl", "--show-cursor", "-n", "0", "-q"], timeout=20)
        self.journal_mark = done.stdout.strip().removeprefix("-- cursor: ")

    def read(self, path: str) -> str:
        """A file as the container sees it (its /proc, its mounts)."""
        return self.run(["cat", path], timeout=10).stdout

    def write(self, path: str, text: str, mode: int = 0o644) -> None:
        """Writes a file inside the running container (into its overlay)."""
        _write(self.file(path), text, mode)

    def file(self, path: str) -> Path:
        """A path inside the running container, reachable from the host."""
        return Path(f"/proc/{self.leader}/root") / path.lstrip("/")

    def console_tail(self, size: int = 4000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-size:]
        return ""


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        parent = todo.pop()
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{parent}/task").iterdir():
                children = (task / "children").read_text().split()
                out += [int(c) for c in children]
                todo += [int(c) for c in children]
    return out


def main(argv: list[str]) -> int:
    if argv != ["build"]:
        print("usage: python -m tests.nspawn build", file=sys.stderr)
        return 2
    try:
        print(build_tree())
    except Unavailable as e:
        print(f"nspawn: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


# -- helpers the systemd and package tests share --

LLM_HOST = "api.openai.com"
TLS_UNIT = "toktra-test-tls.service"
TLS_DIR = "/srv/toktra-test"
WAIT_S = 20
T = TypeVar("T")


def poll(check: Callable[[], T], timeout: float = WAIT_S) -> T | None:
    """check()'s first truthy result within timeout, else None."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result or None
        time.sleep(0.2)


def active(c: Container, unit: str) -> bool:
    return c.show(unit, "ActiveState")["ActiveState"] == "active"


def curl_https(
    c: Container, port: int, host: str, check: bool = True
) -> tuple[str, int]:
    """One HTTPS request from inside, `host` resolved to 127.0.0.1.

    Returns the HTTP status and the client's local port.
    """
    done = c.run(
        [
            "curl", "--silent", "--show-error", "--insecure", "--max-time", "10",
            "--resolve", f"{host}:{port}:127.0.0.1",
            "--output", "/dev/null", "--write-out", "%{http_code} %{local_port}",
            f"https://{host}:{port}/",
        ],
        check=check,
    )  # fmt: skip
    code, _, local_port = done.stdout.partition(" ")
    return code, int(local_port or 0)


def start_tls_server(c: Container, port: int) -> None:
    """openssl s_server for LLM_HOST on 127.0.0.1:port, a transient unit."""
    c.run(["mkdir", "-p", TLS_DIR])
    c.run(
        [
            "openssl", "req", "-x509", "-nodes", "-days", "2",
            "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-subj", f"/CN={LLM_HOST}",
            "-keyout", f"{TLS_DIR}/key.pem", "-out", f"{TLS_DIR}/cert.pem",
        ]
    )  # fmt: skip
    c.systemctl("reset-failed", TLS_UNIT, check=False)  # a leftover from an earlier run
    c.run(
        [
            "systemd-run", f"--unit={TLS_UNIT}", "--quiet",
            "openssl", "s_server", "-quiet", "-www",
            "-accept", f"127.0.0.1:{port}",
            "-cert", f"{TLS_DIR}/cert.pem", "-key", f"{TLS_DIR}/key.pem",
        ]
    )  # fmt: skip
    # Ours answering, not another server that took the port first.
    answering = poll(lambda: curl_https(c, port, "localhost", check=False)[0] == "200")
    if not answering or not active(c, TLS_UNIT):
        raise RuntimeError(
            f"the test TLS server did not answer on port {port}:\n"
            + c.journal(TLS_UNIT, lines=40)
        )
