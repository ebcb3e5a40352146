"""Fixtures shared by the tests that run the real agent."""

from __future__ import annotations

import os
import shutil
import tempfile
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
