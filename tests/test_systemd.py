"""The agent's units under a real systemd (252, Debian 12) in systemd-nspawn.

The agent is installed in a booted container as a package would install
it (`tests/nspawn.py`): /usr/bin/toktra-agent, the units in
/etc/systemd/system, sysusers and tmpfiles entries, /etc/toktra/agent.conf.
Every check reads systemd's own state (`systemctl show`, the journal) or
the processes it started, through the container's /proc.

The units are tested exactly as shipped; drop-ins are added only where a
test changes one setting on purpose (a missing BPF object, a shorter
watchdog).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from agent.supervisor import COMM, START_ORDER
from tests import nspawn
from tests.harness import ROOT, free_port
from tests.nspawn import (
    LLM_HOST,
    WAIT_S,
    T,
    active,
    curl_https,
    poll,
    start_tls_server,
)

AGENT = "toktra-agent.service"
TARGET = "toktra-stages.target"
STAGE_UNITS = {stage: f"toktra-{stage}.service" for stage in START_ORDER}
ALL_UNITS = [AGENT, TARGET, *STAGE_UNITS.values()]
UNPRIVILEGED = ("metrics", "shipper", "classifier")
UNIT_DIR = "/etc/systemd/system"
EVENTS = "/var/lib/toktra/events.jsonl"
# The first run builds the container tree (debootstrap, about 90 s) in the
# first test's setup; every wait below has its own, shorter timeout.
pytestmark = pytest.mark.timeout(600)

# linux/capability.h, by number.
# fmt: off
CAPABILITIES = [
    "chown", "dac_override", "dac_read_search", "fowner", "fsetid", "kill",
    "setgid", "setuid", "setpcap", "linux_immutable", "net_bind_service",
    "net_broadcast", "net_admin", "net_raw", "ipc_lock", "ipc_owner", "sys_module",
    "sys_rawio", "sys_chroot", "sys_ptrace", "sys_pacct", "sys_admin", "sys_boot",
    "sys_nice", "sys_resource", "sys_time", "sys_tty_config", "mknod", "lease",
    "audit_write", "audit_control", "setfcap", "mac_override", "mac_admin",
    "syslog", "wake_alarm", "block_suspend", "audit_read", "perfmon", "bpf",
    "checkpoint_restore",
]
# fmt: on


# -- the container --


@dataclass
class Box:
    """The booted container and what the tests need to know about it."""

    c: nspawn.Container
    port: int  # the watched port; the TLS server inside listens on it
    metrics_port: int


@pytest.fixture(scope="module")
def box(tmp_path_factory) -> Iterator[Box]:
    if os.geteuid() != 0:
        pytest.skip("needs root to boot a container and load BPF programs")
    if not os.path.exists("/sys/kernel/btf/vmlinux"):
        pytest.skip("this kernel has no BTF")
    if not (ROOT / "build/toktra_socket.bpf.o").exists():
        pytest.skip("no build/toktra_socket.bpf.o: run `make bpf`")
    try:
        tree = nspawn.build_tree()
    except nspawn.Unavailable as e:
        pytest.skip(f"no container: {e}")
    hidden = nspawn.unreadable_by_others(ROOT, [ROOT / "agent", ROOT / ".venv/lib"])
    if hidden:
        pytest.skip(f"the toktra user could not read {', '.join(hidden)}")
    port, metrics_port = free_port(), free_port()
    files = nspawn.install_agent(
        tmp_path_factory.mktemp("package"),
        {
            "ports": [port],
            "metrics_port": metrics_port,
            "batch_max_seconds": 0.5,
            "log_level": "debug",
        },
    )
    log = tmp_path_factory.mktemp("nspawn") / "console.log"
    c = nspawn.Container(tree, log, files).boot()
    try:
        start_tls_server(c, port)
        yield Box(c, port, metrics_port)
    finally:
        c.stop()


@pytest.fixture(autouse=True)
def clean(box: Box) -> None:
    """Every test starts with no toktra unit running, no drop-in, no state."""
    c = box.c
    c.systemctl("stop", *ALL_UNITS, check=False)
    c.systemctl("reset-failed", *ALL_UNITS, check=False)
    for dropins in c.file(UNIT_DIR).glob("toktra*.d"):
        shutil.rmtree(dropins)
    c.run(["rm", "-rf", "/var/lib/toktra", "/run/toktra"])
    c.run(["systemd-tmpfiles", "--create", "/usr/lib/tmpfiles.d/toktra.conf"])
    c.systemctl("daemon-reload")
    c.mark_journal()


# -- helpers --


def dropin(c: nspawn.Container, unit: str, name: str, directives: str) -> None:
    section = "Unit" if unit.endswith(".target") else "Service"
    c.write(f"{UNIT_DIR}/{unit}.d/{name}.conf", f"[{section}]\n{directives}\n")


def journal(c: nspawn.Container, *units: str) -> str:
    """The journal's tail without libbpf's debug chatter, for failure messages."""
    lines = c.journal(*(units or ALL_UNITS)).splitlines()
    kept = [line for line in lines if "DEBUG toktra.libbpf" not in line]
    return "\njournal:\n" + "\n".join(kept[-60:])


def wait(c: nspawn.Container, what: str, check: Callable[[], T], timeout=WAIT_S) -> T:
    """Like poll, but a timeout is an error naming `what`, with the journal."""
    result = poll(check, timeout)
    if result is None:
        raise TimeoutError(f"{what}: not within {timeout}s" + journal(c))
    return result


def start(c: nspawn.Container, unit: str) -> None:
    done = c.systemctl("start", unit, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"systemctl start {unit} failed: {done.stderr}" + journal(c))


def events(c: nspawn.Container) -> list[dict]:
    path = c.file(EVENTS)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def llm_connection(box: Box, host: str = LLM_HOST) -> dict:
    """A TLS connection to `host` from inside; the event the agent wrote for it."""
    code, local_port = curl_https(box.c, box.port, host)
    if code != "200":
        raise RuntimeError(f"the test TLS server answered {code}")

    def found() -> dict | None:
        for e in events(box.c):
            if e["src_port"] == local_port and e["dst_hostname"] == host:
                return e
        return None

    return wait(box.c, f"an event for {host} from port {local_port}", found)


def has_event(box: Box, host: str = LLM_HOST, timeout: float = 4) -> bool:
    code, local_port = curl_https(box.c, box.port, host)
    if code != "200":
        raise RuntimeError(f"the test TLS server answered {code}")
    return bool(
        poll(
            lambda: [e for e in events(box.c) if e["src_port"] == local_port],
            timeout,
        )
    )


def metric(box: Box, name: str) -> float:
    """The sum of a metric's samples, fetched from inside the container."""
    done = box.c.run(
        ["curl", "--silent", "--fail", f"http://127.0.0.1:{box.metrics_port}/metrics"]
    )
    total = 0.0
    for line in done.stdout.splitlines():
        if line.startswith((name + "{", name + " ")):
            total += float(line.rsplit(" ", 1)[1])
    return total


def status(c: nspawn.Container, pid: int) -> dict[str, str]:
    """/proc/PID/status as the container sees it."""
    text = c.read(f"/proc/{pid}/status")
    return {k: v.strip() for k, _, v in (ln.partition(":") for ln in text.splitlines())}


def stage_pids(c: nspawn.Container, supervisor: int) -> dict[str, int]:
    """The supervisor's children, by stage, from their comm."""
    by_comm = {comm: stage for stage, comm in COMM.items()}
    listing = c.run(
        [
            "sh",
            "-c",
            f"for p in $(cat /proc/{supervisor}/task/{supervisor}/children); do "
            'echo "$p $(cat /proc/$p/comm 2>/dev/null)"; done',
        ]
    ).stdout
    pids = {}
    for line in listing.splitlines():
        pid, _, comm = line.partition(" ")
        if comm in by_comm:
            pids[by_comm[comm]] = int(pid)
    return pids


def cap_mask(names: str) -> int:
    mask = 0
    for name in names.split():
        mask |= 1 << CAPABILITIES.index(name.lower().removeprefix("cap_"))
    return mask


def toktra_uid(c: nspawn.Container) -> str:
    return c.run(["id", "-u", "toktra"]).stdout.strip()


# -- the container itself --


def test_boot_creates_the_user_and_the_directories(box: Box) -> None:
    c = box.c
    state = c.systemctl("is-system-running", check=False).stdout.strip()
    assert state == "running", c.systemctl("--failed", check=False).stdout
    assert toktra_uid(c).isdigit()
    for path in ("/var/lib/toktra", "/run/toktra"):
        owner = c.run(["stat", "-c", "%U:%G %a", path]).stdout.split()
        assert owner == ["toktra:toktra", "750"], path


# -- toktra-agent.service: the supervisor and its stages --


def test_agent_service_runs_each_stage_with_its_privileges(box: Box) -> None:
    c = box.c
    start(c, AGENT)
    shown = c.show(
        AGENT, "ActiveState", "SubState", "StatusText", "MainPID", "Type",
        "CapabilityBoundingSet",
    )  # fmt: skip
    assert shown["Type"] == "notify"
    assert (shown["ActiveState"], shown["SubState"]) == ("active", "running")
    assert shown["StatusText"].startswith("running"), shown
    supervisor = int(shown["MainPID"])
    assert "run" in c.read(f"/proc/{supervisor}/cmdline").split("\0")
    pids = stage_pids(c, supervisor)
    assert sorted(pids) == sorted(START_ORDER), pids

    uid = toktra_uid(c)
    for stage in UNPRIVILEGED:
        st = status(c, pids[stage])
        assert st["Uid"].split() == [uid] * 4, (stage, st["Uid"])
        assert int(st["CapEff"], 16) == 0 and int(st["CapPrm"], 16) == 0, stage
        assert st["NoNewPrivs"] == "1", stage
    collector = status(c, pids["collector"])
    allowed = cap_mask(shown["CapabilityBoundingSet"])
    assert collector["Uid"].split() == ["0"] * 4
    assert int(collector["CapBnd"], 16) == allowed
    assert int(collector["CapEff"], 16) == allowed
    # Nothing beyond what the unit names.
    named = (ROOT / "units" / AGENT).read_text().split("CapabilityBoundingSet=")[1]
    assert allowed == cap_mask(named.splitlines()[0])


def test_agent_service_reports_an_llm_connection(box: Box) -> None:
    c = box.c
    start(c, AGENT)
    event = llm_connection(box)
    assert event["provider"] == "openai" and event["comm"] == "curl"
    assert event["dst_port"] == box.port and event["dst_ip"] == "127.0.0.1"
    assert event["user"] == "root" and event["sni_source"] == "openssl"
    wait(
        c,
        "toktra_events_sent_total >= 1",
        lambda: metric(box, "toktra_events_sent_total") >= 1,
    )


def test_agent_service_restarts_a_killed_stage_and_stays_active(box: Box) -> None:
    c = box.c
    start(c, AGENT)
    supervisor = int(c.show(AGENT, "MainPID")["MainPID"])
    before = stage_pids(c, supervisor)
    c.run(["sh", "-c", f"kill -KILL {before['classifier']}"])

    def restarted() -> dict[str, int] | None:
        now = stage_pids(c, supervisor)
        new = now.get("classifier", before["classifier"]) != before["classifier"]
        running = c.show(AGENT, "StatusText")["StatusText"].startswith("running")
        return now if new and running else None

    after = wait(c, "the classifier back, status running", restarted)
    shown = c.show(AGENT, "ActiveState", "MainPID", "NRestarts")
    assert shown["ActiveState"] == "active", journal(c, AGENT)
    assert int(shown["MainPID"]) == supervisor
    assert shown["NRestarts"] == "0"
    for stage in ("metrics", "shipper", "collector"):
        assert after[stage] == before[stage], stage
    assert "stage classifier died (killed by SIGKILL)" in c.journal(AGENT)
    llm_connection(box)  # the new classifier passes events on


def test_agent_service_stops_cleanly(box: Box) -> None:
    c = box.c
    start(c, AGENT)
    llm_connection(box)
    done = c.systemctl("stop", AGENT, check=False)
    shown = c.show(AGENT, "ActiveState", "Result", "ExecMainStatus", "MainPID")
    assert done.returncode == 0, done.stderr
    assert shown["ActiveState"] == "inactive"
    assert (shown["Result"], shown["ExecMainStatus"]) == ("success", "0"), (
        f"{shown}{journal(c, AGENT)}"
    )
    assert "agent stopped" in c.journal(AGENT)


def test_agent_service_sends_watchdog_keep_alives(box: Box) -> None:
    c = box.c
    start(c, AGENT)  # systemd shows the interval in force only while it runs
    assert c.show(AGENT, "WatchdogUSec")["WatchdogUSec"] == "30s"
    c.systemctl("stop", AGENT)
    dropin(c, AGENT, "60-test-watchdog", "WatchdogSec=3s")
    c.systemctl("daemon-reload")
    start(c, AGENT)
    first = c.show(AGENT, "MainPID", "WatchdogUSec", "WatchdogTimestampMonotonic")
    assert first["WatchdogUSec"] == "3s"
    time.sleep(10)
    later = c.show(
        AGENT, "ActiveState", "MainPID", "NRestarts", "WatchdogTimestampMonotonic"
    )
    assert later["ActiveState"] == "active", journal(c, AGENT)
    assert (later["MainPID"], later["NRestarts"]) == (first["MainPID"], "0")
    # The timestamp moves with each WATCHDOG=1 systemd receives.
    assert int(later["WatchdogTimestampMonotonic"]) > int(
        first["WatchdogTimestampMonotonic"]
    )
    assert "watchdog timeout" not in c.journal(AGENT).lower()


def test_agent_service_fails_to_start_without_its_bpf_object(box: Box) -> None:
    c = box.c
    dropin(c, AGENT, "60-test-no-object", "Environment=TOKTRA_BPF_OBJECT=/nonexistent")
    c.systemctl("daemon-reload")
    done = c.systemctl("start", AGENT, check=False)
    assert done.returncode != 0
    shown = c.show(AGENT, "Result", "ExecMainStatus")
    assert shown["Result"] != "success" and shown["ExecMainStatus"] == "1", shown
    log = c.journal(AGENT)
    assert "BPF object /nonexistent (bpf_object) does not exist" in log, journal(c)


def test_agent_service_status_says_why_it_failed_to_start(box: Box) -> None:
    c = box.c
    dropin(c, AGENT, "60-test-no-object", "Environment=TOKTRA_BPF_OBJECT=/nonexistent")
    c.systemctl("daemon-reload")
    c.systemctl("start", AGENT, check=False)
    status_text = c.show(AGENT, "StatusText")["StatusText"]
    assert "/nonexistent" in status_text, status_text


def test_collector_unit_fails_to_start_without_its_bpf_object(box: Box) -> None:
    c = box.c
    unit = STAGE_UNITS["collector"]
    dropin(c, unit, "60-test-no-object", "Environment=TOKTRA_BPF_OBJECT=/nonexistent")
    c.systemctl("daemon-reload")
    done = c.systemctl("start", unit, check=False)
    assert done.returncode != 0
    shown = c.show(unit, "Result", "StatusText")
    assert shown["Result"] != "success"
    assert shown["StatusText"] == (
        "start-up failed: BPF object /nonexistent (bpf_object) does not exist"
    ), f"{shown}{journal(c, unit)}"


# -- toktra-stages.target: one unit per stage --


def test_stages_target_runs_one_unit_per_stage(box: Box) -> None:
    c = box.c
    start(c, AGENT)
    c.systemctl("stop", AGENT)
    start(c, TARGET)
    uid = toktra_uid(c)
    for stage, unit in STAGE_UNITS.items():
        shown = c.show(
            unit, "ActiveState", "SubState", "Type", "MainPID", "User",
            "NRestarts", "CapabilityBoundingSet", "WatchdogUSec",
        )  # fmt: skip
        where = f"{unit}: {shown}{journal(c, unit)}"
        assert (shown["ActiveState"], shown["SubState"]) == ("active", "running"), where
        assert shown["Type"] == "notify" and shown["NRestarts"] == "0", where
        assert shown["WatchdogUSec"] == "30s", where
        st = status(c, int(shown["MainPID"]))
        assert st["Name"] == COMM[stage]
        assert st["NoNewPrivs"] == "1"
        if stage == "collector":
            allowed = cap_mask(shown["CapabilityBoundingSet"])
            assert shown["User"] == "" and st["Uid"].split() == ["0"] * 4
            assert int(st["CapBnd"], 16) == allowed == int(st["CapEff"], 16)
        else:
            assert shown["User"] == "toktra" and st["Uid"].split() == [uid] * 4
            assert int(st["CapBnd"], 16) == 0 and int(st["CapEff"], 16) == 0
            assert st["Seccomp"] == "2"  # SystemCallFilter= is in force
    event = llm_connection(box, "api.anthropic.com")
    assert event["provider"] == "anthropic"
    assert wait(c, "events sent", lambda: metric(box, "toktra_events_sent_total") >= 1)
    # PartOf= the target: its stop stops them too, but returns before they
    # are down (the target is ordered after them, so it stops first).
    c.systemctl("stop", TARGET)
    wait(
        c,
        "every stage unit stopped with the target",
        lambda: not any(active(c, unit) for unit in STAGE_UNITS.values()),
    )


def test_stage_units_restart_only_the_killed_one(box: Box) -> None:
    c = box.c
    start(c, TARGET)
    before = {u: c.show(u, "MainPID")["MainPID"] for u in STAGE_UNITS.values()}
    classifier = STAGE_UNITS["classifier"]
    c.systemctl("kill", "--signal=SIGKILL", "--kill-who=main", classifier)

    def back() -> dict[str, str] | None:
        shown = c.show(classifier, "ActiveState", "MainPID", "NRestarts")
        ok = shown["ActiveState"] == "active" and shown["NRestarts"] == "1"
        return shown if ok else None

    shown = wait(c, "systemd restarting the classifier", back)
    assert shown["MainPID"] != before[classifier]
    for unit, pid in before.items():
        if unit != classifier:
            now = c.show(unit, "MainPID", "NRestarts")
            assert (now["MainPID"], now["NRestarts"]) == (pid, "0"), unit
    llm_connection(box)  # the new classifier is in the pipeline


def watched_stage_units(c: nspawn.Container, units: list[str], seconds: int):
    """Starts the target with WatchdogSec=`seconds` on `units`; their state."""
    for unit in units:
        dropin(c, unit, "60-test-watchdog", f"WatchdogSec={seconds}s")
    c.systemctl("daemon-reload")
    start(c, TARGET)
    first = {u: c.show(u, "MainPID", "WatchdogUSec") for u in units}
    if not all(s["WatchdogUSec"] == f"{seconds}s" for s in first.values()):
        raise RuntimeError(f"the test's WatchdogSec is not in force: {first}")
    return first


def test_stage_units_send_watchdog_keep_alives(box: Box) -> None:
    c = box.c
    units = [u for s, u in STAGE_UNITS.items() if s != "metrics"]
    first = watched_stage_units(c, units, 3)
    time.sleep(10)
    for unit, shown in first.items():
        now = c.show(unit, "ActiveState", "MainPID", "NRestarts")
        assert now["ActiveState"] == "active", f"{unit}{journal(c, unit)}"
        assert (now["MainPID"], now["NRestarts"]) == (shown["MainPID"], "0"), unit


# -- regressions: what broke these units once under a real systemd --


def test_shipped_metrics_unit_sends_watchdog_keep_alives(box: Box) -> None:
    c = box.c
    unit = STAGE_UNITS["metrics"]
    first = watched_stage_units(c, [unit], 2)[unit]
    time.sleep(5)
    now = c.show(unit, "ActiveState", "MainPID", "NRestarts")
    assert (now["MainPID"], now["NRestarts"]) == (first["MainPID"], "0"), journal(
        c, unit
    )


def test_shipped_agent_unit_starts(box: Box) -> None:
    c = box.c
    done = c.systemctl("start", AGENT, check=False)
    assert done.returncode == 0, journal(c, AGENT)


def test_shipped_agent_unit_sees_openssl_clients(box: Box) -> None:
    c = box.c
    start(c, AGENT)
    assert has_event(box), journal(c, AGENT)


def test_shipped_agent_unit_stops_cleanly(box: Box) -> None:
    c = box.c
    start(c, AGENT)
    c.systemctl("stop", AGENT, check=False)
    shown = c.show(AGENT, "Result", "ExecMainStatus")
    assert (shown["Result"], shown["ExecMainStatus"]) == ("success", "0"), journal(c)


def test_shipped_agent_unit_starts_again(box: Box) -> None:
    c = box.c
    start(c, AGENT)
    llm_connection(box)
    c.systemctl("stop", AGENT)
    done = c.systemctl("start", AGENT, check=False)
    assert done.returncode == 0, journal(c, AGENT)


def test_shipped_stage_units_start_after_the_agent_unit(box: Box) -> None:
    c = box.c
    start(c, AGENT)
    c.systemctl("stop", AGENT)
    c.systemctl("start", TARGET, check=False)
    down = [u for u in STAGE_UNITS.values() if not active(c, u)]
    assert not down, journal(c, *down)


def test_shipped_collector_unit_starts(box: Box) -> None:
    c = box.c
    c.systemctl("start", TARGET, check=False)
    unit = STAGE_UNITS["collector"]
    assert poll(lambda: active(c, unit), 4), journal(c, unit)
