"""The BPF object on Debian 12's own kernel (6.1), booted under qemu.

One boot (tests/kernels.py) serves every test here: the guest runs the
capture suites against this checkout's object and reports what it loaded
and how; the host checks the report, and its own send hook beside it.
Building the guest (debootstrap, the kernel's .deb) takes about two
minutes once; a boot under software emulation about four.
"""

from __future__ import annotations

import os

import pytest

from agent.collector import probes
from tests import kernels, nspawn
from tests.conftest import needs_root_and_bpf
from tests.harness import free_port

# Well below the 29 the three suites hold, so a run that quietly
# collected nothing cannot pass.
MIN_PASSED = 25
# Fixture setup counts against the first test: a first build and a boot.
pytestmark = pytest.mark.timeout(
    nspawn.BUILD_TIMEOUT_S + max(kernels.DEADLINE_S.values()) + 120
)


@pytest.fixture(scope="module")
def guest() -> kernels.Run:
    try:
        return kernels.run()
    except kernels.Unavailable as e:
        pytest.skip(f"qemu cannot run here: {e}")


def test_the_guest_ran_debian_12s_kernel(guest):
    report = guest.report
    assert report["release"] == guest.kernel.release
    assert report["release"].startswith("6.1."), report["release"]
    assert f"Debian {guest.kernel.version} " in report["version"]
    assert report["btf"] is True
    # sock_diag (progress reports, adoption) is a module there
    assert {"inet_diag", "tcp_diag"} <= set(report["modules"])


def test_the_guest_loaded_this_checkouts_object(guest):
    host = kernels.sha256(kernels.OBJECT)
    assert report_of(guest, "object")["sha256"] == host
    # and what the loader itself opened, found as the collector finds it
    assert report_of(guest, "auto")["object_sha256"] == host


def test_the_capture_suites_pass_on_6_1(guest):
    run = guest.report["pytest"]
    tests = run["tests"]
    bad = {
        nodeid: result
        for nodeid, result in tests.items()
        if result["outcome"] not in ("passed", "skipped")
    }
    assert not bad, bad
    assert run["exit_code"] == 0, f"pytest in the guest exited {run['exit_code']}"
    passed = [nodeid for nodeid, r in tests.items() if r["outcome"] == "passed"]
    assert len(passed) >= MIN_PASSED, tests
    for suite in kernels.GUEST_SUITES:
        assert any(nodeid.startswith(f"{suite}::") for nodeid in passed), suite
    # Anything left out is left out on purpose, with the reason.
    assert run["deselected"] == kernels.DESELECTED
    assert all(kernels.DESELECTED.values())


def test_auto_send_hook_on_6_1_is_fexit(guest):
    """6.1 has no sock/sock_send_length (6.3+), and Debian's kernel lets
    tracing programs load (BTF, ftrace direct calls, no lockdown), so the
    loader's second choice, fexit on tcp_sendmsg, is what it gets."""
    auto = report_of(guest, "auto")
    assert guest.report["sock_send_length"] is False
    assert auto["send_hook"] == "fexit"
    assert "6.3" in auto["refused"]["tracepoint"]


def test_a_forced_tracepoint_is_refused_and_falls_back(guest):
    """send_hook = tracepoint is tried on 6.1: the kernel refuses it (no
    such tracepoint to attach to) and the auto order takes over."""
    forced = report_of(guest, "forced")
    assert forced["requested"] == "tracepoint"
    assert forced["fell_back"] is True
    assert forced["send_hook"] == "fexit"
    assert "sock_send_length" in forced["refused"]["tracepoint"]


def test_the_host_auto_send_hook_is_the_tracepoint():
    """Beside the guest: the host's kernel (6.3+) has the tracepoint."""
    needs_root_and_bpf()
    major, minor = (int(x) for x in os.uname().release.split(".")[:2])
    if (major, minor) < (6, 3):
        pytest.skip(f"the host's kernel {os.uname().release} predates 6.3")
    capture = probes.load([free_port()])
    try:
        assert capture.send_hook == "tracepoint"
        assert capture.refused == {}
    finally:
        capture.close()


def report_of(guest: kernels.Run, key: str) -> dict:
    """One part of the report; a part the guest could not make fails here."""
    part = guest.report[key]
    assert "error" not in part, part["error"]
    return part
