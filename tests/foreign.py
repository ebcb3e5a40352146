"""TLS clients that bring their own TLS stack, for the tests.

Node's https (OpenSSL built into the node binary), Go's crypto/tls (a
static binary) and Java's JSSE (TLS written in Java) never load the host's
libssl, so the agent can name their connections only from the ClientHello
on the socket. All three take the same arguments and print the same JSON
lines (see tests/clients/nodeclient.js):

    HOST PORT CAFILE SNI SECRET [COUNT]  ->  {"pid", "local_port", "sni"}

With TOKTRA_CLIENT_HOLD_S=N in its environment a client stays alive N
seconds after its last line, so a test can look at the process after its
TLS stack has certainly run.

The Go client is compiled on first use into build/clients/goclient, offline
and from the standard library only, with Go's caches under build/go-cache.
"""

from __future__ import annotations

import os
import selectors
import shutil
import subprocess
import time
from pathlib import Path

from tests.harness import Pki

ROOT = Path(__file__).resolve().parent.parent
CLIENTS = ROOT / "tests/clients"
NODE_CLIENT = CLIENTS / "nodeclient.js"
JAVA_CLIENT = CLIENTS / "JavaClient.java"
GO_SOURCE = CLIENTS / "goclient"
GO_BINARY = ROOT / "build/clients/goclient"
GO_CACHE = ROOT / "build/go-cache"
GO_BUILD_TIMEOUT = 600
KINDS = ("node", "go", "java")
HOLD_ENV = "TOKTRA_CLIENT_HOLD_S"

# The command each kind needs, and the Debian package that provides it.
# Debian's own nodejs links the system libssl3; node must be a build with
# OpenSSL inside (nodesource's nodejs, or an upstream build) for these
# clients to stay off libssl, which the tests check.
TOOLS = {
    "node": (("node",), "nodejs (a build with OpenSSL built in, such as nodesource's)"),
    "go": (("go",), "golang-go"),
    # `java File.java` compiles in memory: it needs the JDK, not only a JRE.
    "java": (("java", "javac"), "openjdk-17-jdk-headless"),
}


class ForeignClientError(RuntimeError):
    """A client cannot be built or started here; the message says why."""


def require_tools(kind: str) -> dict[str, str]:
    """The paths of the commands `kind` needs; fails naming the package."""
    commands, package = TOOLS[kind]
    found = {command: shutil.which(command) for command in commands}
    missing = [command for command, path in found.items() if path is None]
    if missing:
        raise ForeignClientError(
            f"the {kind} client needs {', '.join(missing)}, not found on PATH: "
            f"install the Debian package {package}"
        )
    return found


def go_environment() -> dict[str, str]:
    """Go's settings for an offline, stdlib-only build that leaves $HOME alone."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GO")}
    env.update(
        GOCACHE=str(GO_CACHE / "cache"),
        GOPATH=str(GO_CACHE / "path"),
        GOENV="off",
        GOFLAGS="-mod=mod",
        GOTOOLCHAIN="local",
        GOPROXY="off",
        CGO_ENABLED="0",  # a static binary: not even libc is loaded
    )
    return env


def go_client_binary() -> Path:
    """build/clients/goclient, compiled first if missing or older than its source."""
    sources = [p for p in GO_SOURCE.iterdir() if p.suffix in (".go", ".mod")]
    newest = max(p.stat().st_mtime for p in sources)
    if GO_BINARY.exists() and GO_BINARY.stat().st_mtime >= newest:
        return GO_BINARY
    go = require_tools("go")["go"]
    GO_BINARY.parent.mkdir(parents=True, exist_ok=True)
    # Built under a name of its own, then renamed: a concurrent run never
    # starts a half-written binary.
    partial = GO_BINARY.with_name(f".goclient.{os.getpid()}")
    # -buildvcs=false: no git lookup, so the build works outside a checkout.
    command = [go, "build", "-buildvcs=false", "-o", str(partial), "."]
    try:
        result = subprocess.run(
            command,
            cwd=GO_SOURCE,
            env=go_environment(),
            capture_output=True,
            text=True,
            timeout=GO_BUILD_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        partial.unlink(missing_ok=True)
        raise ForeignClientError(
            f"go build of {GO_SOURCE} took over {GO_BUILD_TIMEOUT} s"
        ) from None
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise ForeignClientError(
            f"go build of {GO_SOURCE} failed ({result.returncode}):\n{result.stderr}"
        )
    os.replace(partial, GO_BINARY)
    return GO_BINARY


def client_command(kind: str) -> list[str]:
    """The command line of a client, before its arguments."""
    if kind == "go":
        return [str(go_client_binary())]
    tools = require_tools(kind)
    if kind == "node":
        return [tools["node"], str(NODE_CLIENT)]
    if kind == "java":
        return [tools["java"], str(JAVA_CLIENT)]
    raise ValueError(f"unknown client kind {kind!r}; known: {', '.join(KINDS)}")


def run_foreign(
    kind: str,
    host: str,
    port: int,
    pki: Pki,
    sni: str,
    secret: str,
    count: int = 1,
    hold_s: float = 0,
) -> subprocess.Popen:
    """Starts a client process; returns the Popen (stdout is JSON lines).

    `hold_s` keeps the process alive that long after its last connection.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown client kind {kind!r}; known: {', '.join(KINDS)}")
    env = {k: v for k, v in os.environ.items() if k != HOLD_ENV}
    if hold_s:
        env[HOLD_ENV] = str(hold_s)
    return subprocess.Popen(
        [
            *client_command(kind),
            host,
            str(port),
            str(pki.ca_file),
            sni,
            secret,
            str(count),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def read_line(proc: subprocess.Popen, timeout: float) -> str:
    """The client's next line of output; fails if none comes in time.

    Read the first lines with this, before any other read of stdout: the
    lines a readline has buffered are invisible to select.
    """
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if sel.select(0.2):
                line = proc.stdout.readline()
                if line:
                    return line
                break  # end of output: the client exited
    proc.kill()
    _, err = proc.communicate(timeout=10)
    raise TimeoutError(
        f"{proc.args[:2]} printed no line within {timeout} s "
        f"(exit code {proc.returncode}): {err.strip()}"
    )
