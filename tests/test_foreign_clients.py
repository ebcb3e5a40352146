"""The clients with their own TLS stack (Node, Go, Java), without the agent.

Each must really complete against the test server over IPv4 and IPv6, ask
for the name it was given (the server saw it), verify the certificate for
that name and not for the address, report its own pid, and never map the
host's libssl: that is what makes them the test of ClientHello capture.

A missing tool fails its tests with the Debian package to install.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.foreign import KINDS, read_line, run_foreign

RUN_TIMEOUT = 120  # a Java run compiles its source first: a few seconds
HOLD_S = 60  # long enough to look; the test ends the client sooner


def libssl_files(pid: int) -> set[str]:
    """The libssl files mapped in process `pid`."""
    files = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and Path(fields[5]).name.startswith("libssl"):
            files.add(fields[5])
    return files


def wait_seen(server, ports, timeout: float = 10):
    """The server's record of each port, once the client has closed it."""
    deadline = time.monotonic() + timeout
    while not set(ports) <= server.seen.keys():
        if time.monotonic() > deadline:
            missing = set(ports) - server.seen.keys()
            raise TimeoutError(
                f"the server never finished ports {sorted(missing)}: {server.errors}"
            )
        time.sleep(0.05)
    return [server.seen[p] for p in ports]


def finish(proc: subprocess.Popen) -> tuple[str, str]:
    """Waits for the client; its output. Fails naming the client."""
    try:
        out, err = proc.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate(timeout=10)
        pytest.fail(f"{proc.args[:2]} still running after {RUN_TIMEOUT} s: {err}")
    return out, err


@pytest.mark.parametrize(
    "host, sni",
    [("127.0.0.1", "api.openai.com"), ("::1", "www.example.org")],
    ids=["ipv4", "ipv6"],
)
@pytest.mark.parametrize("kind", KINDS)
def test_client_completes_with_the_name_it_asked_for(kind, host, sni, tls_server, pki):
    secret = f"TOKTRA-SECRET-{uuid.uuid4().hex}"
    proc = run_foreign(kind, host, tls_server.port, pki, sni, secret, count=2)
    out, err = finish(proc)
    assert proc.returncode == 0, f"{kind} client failed: {err}"

    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 2, out
    assert all(row["pid"] == proc.pid and row["sni"] == sni for row in rows), rows
    ports = [row["local_port"] for row in rows]
    assert len(set(ports)) == 2, f"one connection per request, not {ports}"
    for seen in wait_seen(tls_server, ports):
        assert seen.sni == sni
        # The request with its padded body came through, and the client
        # closed with a FIN rather than a reset.
        assert seen.bytes_received > 700
        assert seen.peer_fin


@pytest.mark.parametrize("kind", KINDS)
def test_client_maps_no_libssl(kind, tls_server, pki):
    proc = run_foreign(
        kind, "127.0.0.1", tls_server.port, pki, "api.openai.com", "s", hold_s=HOLD_S
    )
    try:
        row = json.loads(read_line(proc, RUN_TIMEOUT))
        assert row["pid"] == proc.pid
        # The connection is done and the process still lives, holding
        # whatever its TLS stack loaded.
        files = libssl_files(proc.pid)
        assert not files, (
            f"the {kind} client maps {sorted(files)}: it uses the host's libssl "
            "(for node: a build linked to the system OpenSSL, as Debian's nodejs "
            "is), so it cannot stand for a client the uprobes miss"
        )
    finally:
        proc.kill()
        proc.communicate(timeout=10)


def test_libssl_check_sees_a_client_that_uses_it():
    """The check above would notice libssl: Python's ssl module maps it."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import ssl, time; print('ready', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert read_line(proc, 30) == "ready\n"
        assert any("libssl.so" in f for f in libssl_files(proc.pid))
    finally:
        proc.kill()
        proc.communicate(timeout=10)


@pytest.mark.parametrize("kind", KINDS)
def test_client_refuses_a_name_the_certificate_lacks(kind, tls_server, pki):
    # The certificate is valid for 127.0.0.1 too: a client that checked the
    # address it dialled instead of the name it sent would accept it.
    proc = run_foreign(kind, "127.0.0.1", tls_server.port, pki, "wrong.example", "s")
    out, err = finish(proc)
    assert proc.returncode != 0
    assert out == ""
    assert "wrong.example" in err
