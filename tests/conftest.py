"""Fixtures shared by the tests that run the real agent."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Agent, TlsServer, dual_stack_port, make_pki

LLM_NAMES = ["api.openai.com", "api.anthropic.com"]
OTHER_NAMES = ["www.example.org"]


def needs_root_and_bpf() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to load BPF programs")
    if not os.path.exists("/sys/kernel/btf/vmlinux"):
        pytest.skip("this kernel has no BTF")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"), LLM_NAMES + OTHER_NAMES)


@pytest.fixture(scope="module")
def tls_server(pki):
    server = TlsServer(pki, dual_stack_port()).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def agent(tls_server):
    """One running agent watching the test server's port, per module."""
    needs_root_and_bpf()
    # Not under pytest's own 0700 temp root: the stages' user must reach it.
    base = Path(tempfile.mkdtemp(prefix="toktra-test-"))
    running = Agent(base, [tls_server.port]).start()
    yield running
    running.stop()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 16 KiB tmpfs (four pages), unmounted afterwards."""
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16k,mode=0700", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], timeout=10, check=True)


def fill(path: Path) -> None:
    """Write to `path` until the file system is full."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"x" * 4096)
    except OSError as err:
        assert err.errno == errno.ENOSPC
    finally:
        os.close(fd)
