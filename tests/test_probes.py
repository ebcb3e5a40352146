"""The loader and the BPF object, without the rest of the agent.

Each send-hook variant that loads on this kernel is driven with real
clients, asyncio's memory BIOs included; variants that cannot load here
must fail with a message that says why, and the loader must fall back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from agent.collector import probes
from agent.collector.kernel import Kernel
from agent.collector.records import Kind, Record, Stat, decode
from tests.conftest import needs_root_and_bpf
from tests.harness import run_pyclient

NAMES = ["api.openai.com", "api.anthropic.com", "www.example.org"] * 4


@pytest.fixture(autouse=True)
def _root():
    needs_root_and_bpf()


def keep_connection(records: list[Record], data: bytes) -> None:
    """Keeps the OPEN and CLOSE records; ClientHello pieces are not looked at."""
    rec = decode(data)
    if isinstance(rec, Record):
        records.append(rec)


def capture_clients(capture, tls_server, pki, mode: str, host: str) -> dict[int, dict]:
    """Runs one client process; returns {src_port: (client row, record)}."""
    records = []
    ring = capture.ring_buffer(lambda data: keep_connection(records, data))
    try:
        p = run_pyclient(mode, host, tls_server.port, pki, "x", NAMES)
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        rows = [json.loads(line) for line in out.splitlines()]
        deadline = time.monotonic() + 10
        want = {r["src_port"] for r in rows}
        while {r.src_port for r in records if r.kind is Kind.CLOSE} < want:
            assert time.monotonic() < deadline, "records missing"
            ring.poll(50)
            ring.consume()
    finally:
        ring.free()
    closes = {r.src_port: r for r in records if r.kind is Kind.CLOSE}
    opens = {r.src_port for r in records if r.kind is Kind.OPEN}
    assert want <= opens
    return {row["src_port"]: (row, closes[row["src_port"]]) for row in rows}


@pytest.fixture(scope="module")
def loadable_modes() -> list[str]:
    """Modes to drive here: every variant that loads, probed once."""
    needs_root_and_bpf()
    modes = []
    for mode in probes.SEND_HOOK_ORDER:
        capture = probes.load([1], send_hook=mode)
        if capture.send_hook == mode:
            modes.append(mode)
        capture.close()
    return modes


@pytest.mark.parametrize("client", ["threads", "asyncio"])
@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_every_loadable_send_hook_binds_each_clients_own_sni(
    tls_server, pki, client, host, loadable_modes
):
    modes = loadable_modes
    # The tracepoint exists on this kernel (6.3+); syscalls always does.
    assert "syscalls" in modes
    for mode in modes:
        capture = probes.load([tls_server.port], send_hook=mode)
        try:
            assert capture.send_hook == mode
            seen = capture_clients(capture, tls_server, pki, client, host)
            stats = capture.stats()
        finally:
            capture.close()
        for row, rec in seen.values():
            assert rec.sni == row["sni"].encode(), (mode, row, rec)
            assert rec.pid == row["pid"]
            assert rec.comm == row["comm"]
            assert rec.dst_ip == host
            assert rec.bytes_acked == row["acked"] + 1  # its FIN
        assert stats[Stat.SNI_BOUND] >= len(NAMES)
        assert stats[Stat.RINGBUF_FULL] == 0


def test_auto_prefers_the_tracepoint_where_it_exists(tls_server):
    capture = probes.load([tls_server.port])
    try:
        expected = (
            "tracepoint"
            if Kernel().has_tracepoint("sock", "sock_send_length")
            else None
        )
        if expected:
            assert capture.send_hook == expected
        assert capture.libraries, "the system libssl should be attached"
    finally:
        capture.close()


def test_refused_variant_fails_cleanly_and_auto_falls_back(tls_server):
    """fexit loads only where tracing programs may: here they are refused."""
    capture = probes.load([tls_server.port], send_hook="fexit")
    try:
        if capture.send_hook == "fexit":
            pytest.skip("tracing programs load on this kernel")
        assert capture.requested == "fexit" and capture.fell_back
        assert "send_fexit" in capture.refused["fexit"]
        assert capture.send_hook == "tracepoint"  # the next in the auto order
    finally:
        capture.close()


def test_no_variant_names_every_refusal(tls_server, tmp_path):
    """With no tracepoints listed and fexit refused, the error says all."""
    fake_sys = tmp_path / "sys"
    (fake_sys / "kernel/btf").mkdir(parents=True)
    (fake_sys / "kernel/btf/vmlinux").touch()
    (fake_sys / "kernel/tracing/events").mkdir(parents=True)
    try:
        capture = probes.load(
            [tls_server.port], send_hook="fexit", kernel=Kernel(sys_root=str(fake_sys))
        )
    except probes.ProbeError as e:
        message = str(e)
    else:
        capture.close()
        pytest.skip("tracing programs load on this kernel")
    assert message.startswith(f"no send hook variant loads on {os.uname().release}")
    assert "fexit: " in message and "send_fexit" in message
    assert "tracepoint: tracepoint sock/sock_send_length does not exist" in message
    assert "syscalls: syscall tracepoints are not available" in message


def test_skipped_tracepoint_falls_back(tls_server, tmp_path):
    """A kernel without sock_send_length (before 6.3) gets the next variant."""
    fake_sys = tmp_path / "sys"
    (fake_sys / "kernel/btf").mkdir(parents=True)
    (fake_sys / "kernel/btf/vmlinux").touch()
    # tracefs that lists the syscall tracepoints but not sock_send_length
    events = fake_sys / "kernel/tracing/events"
    (events / "syscalls/sys_enter_write").mkdir(parents=True)
    capture = probes.load([tls_server.port], kernel=Kernel(sys_root=str(fake_sys)))
    try:
        assert capture.send_hook in ("fexit", "syscalls")
        assert "tracepoint" in capture.refused
        assert "6.3" in capture.refused["tracepoint"]
    finally:
        capture.close()


def test_missing_object_is_named():
    with pytest.raises(
        probes.ProbeError, match=r"/nonexistent/x\.bpf\.o .*does not exist"
    ):
        probes.load([443], object_path="/nonexistent/x.bpf.o")


def test_kernel_without_btf_is_named(tmp_path):
    with pytest.raises(probes.ProbeError, match="has no BTF"):
        probes.load([443], kernel=Kernel(sys_root=str(tmp_path)))


def test_missing_privilege_is_named():
    """The loader run as an unprivileged user says which capability is missing."""
    code = (
        "import os, sys\n"
        "os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
        "from agent.collector import probes\n"
        "try:\n"
        "    probes.load([443])\n"
        "except probes.ProbeError as e:\n"
        "    print(e); sys.exit(0)\n"
        "sys.exit('loaded without privileges?')\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30
    )
    assert p.returncode == 0, p.stderr
    assert "lacks CAP_BPF and CAP_PERFMON" in p.stdout


def test_unfinished_handshake_never_names_a_later_connection(tls_server, pki):
    """A memory-BIO handshake that never sends leaves a name pending on
    its thread; the thread's next, unrelated connection must not get it."""
    code = (
        "import socket, ssl, sys\n"
        "ctx = ssl.create_default_context()\n"
        "bio = ssl.MemoryBIO\n"
        "obj = ctx.wrap_bio(bio(), bio(), server_hostname='claude.ai')\n"
        "try:\n"
        "    obj.do_handshake()\n"
        "except ssl.SSLWantReadError:\n"
        "    pass\n"
        "s = socket.create_connection(('127.0.0.1', int(sys.argv[1])))\n"
        "s.sendall(b'not tls at all\\r\\n')\n"
        "print(s.getsockname()[1], flush=True)\n"
        "s.close()\n"
    )
    capture = probes.load([tls_server.port])
    records = []
    ring = capture.ring_buffer(lambda data: keep_connection(records, data))
    try:
        p = subprocess.run(
            [sys.executable, "-c", code, str(tls_server.port)],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        port = int(p.stdout)
        deadline = time.monotonic() + 10
        while not any(r.src_port == port and r.kind is Kind.CLOSE for r in records):
            assert time.monotonic() < deadline
            ring.poll(50)
            ring.consume()
    finally:
        ring.free()
        capture.close()
    (rec,) = [r for r in records if r.src_port == port and r.kind is Kind.CLOSE]
    assert rec.sni is None
