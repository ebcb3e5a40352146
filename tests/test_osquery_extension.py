"""The osquery extension (`toktra-agent osquery-extension`), end to end.

osquery itself cannot be installed on this machine (no package registry
here has it), so osqueryd's side is played by tests/osquery_manager.py: an
extension manager built from the Thrift interface that the `osquery` SDK
package ships, the same one osqueryd speaks. The extension runs as the real
command in a subprocess, and reads a real agent.connections.TableServer
holding known rows; the table records the filter each request carried, so
the tests can see what was applied before the rows crossed that socket.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from agent import __version__
from agent.connections import COLUMNS, Table, TableServer
from agent.osquery_extension import TABLE_COLUMNS, osquery_row, pushdown
from tests.osquery_manager import StandInManager, constraints

ROOT = Path(__file__).resolve().parent.parent
AGENT = str(ROOT / ".venv/bin/toktra-agent")
TABLE = "toktra_connections"
EQ, GT, LIKE = 2, 4, 65

SCHEMA = [
    ("pid", "INTEGER"),
    ("comm", "TEXT"),
    ("dst_hostname", "TEXT"),
    ("dst_ip", "TEXT"),
    ("dst_port", "INTEGER"),
    ("bytes_sent", "BIGINT"),
    ("bytes_received", "BIGINT"),
    ("timestamp", "BIGINT"),
    ("provider", "TEXT"),
    ("category", "TEXT"),
]

OPENAI = {
    "conn_id": "c1",
    "pid": 123,
    "comm": "python3",
    "dst_hostname": "api.openai.com",
    "dst_ip": "192.0.2.10",
    "dst_port": 443,
    "bytes_sent": 1200,
    "bytes_received": 34000,
    "timestamp": 1_700_000_000_123_456_789,
    "provider": "openai",
    "category": "llm",
}
ANTHROPIC = {
    "conn_id": "c2",
    "pid": 456,
    "comm": "node",
    "dst_hostname": "api.anthropic.com",
    "dst_ip": "2001:db8::7",
    "dst_port": 443,
    "bytes_sent": 5_000_000_000,
    "bytes_received": 17,
    "timestamp": 1_700_000_001_000_000_000,
    "provider": "anthropic",
    "category": "llm",
}
# Closed, and seen without a server name.
CLOSED = {
    "conn_id": "c3",
    "pid": 789,
    "comm": "curl",
    "dst_hostname": None,
    "dst_ip": "192.0.2.11",
    "dst_port": 8443,
    "bytes_sent": 0,
    "bytes_received": 0,
    "timestamp": 1_700_000_002_000_000_000,
    "provider": "openai",
    "category": "embeddings",
}


def as_osquery(event: dict) -> dict[str, str]:
    """What osqueryd should receive for an event: text, no NULL columns."""
    return {k: str(v) for k, v in event.items() if k != "conn_id" and v is not None}


class RecordingTable(Table):
    """A Table that remembers each filter it was asked for, and its answer."""

    def __init__(self) -> None:
        super().__init__(closed_window_s=3600)
        self.asked: list[tuple[dict, int]] = []

    def rows(self, where):
        rows = super().rows(where)
        self.asked.append((dict(where), len(rows)))
        return rows


class ExtensionProcess:
    """`toktra-agent osquery-extension` as a subprocess, logs to a file."""

    def __init__(self, base: Path, manager: str, connections: str | None, *extra: str):
        self.log_file = base / f"extension-{time.monotonic_ns()}.log"
        where = ["--connections", connections] if connections else []
        with open(self.log_file, "wb") as log:
            self.proc = subprocess.Popen(
                [AGENT, "osquery-extension", "--socket", manager, *where, *extra],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def log(self) -> str:
        return self.log_file.read_text()

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def wait_log(self, text: str, timeout: float = 10) -> str:
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not logged:\n{self.log()}")
            time.sleep(0.05)
        return self.log()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


@pytest.fixture
def base():
    # Short: a Unix socket path has 107 bytes, and `.uuid` is added to one.
    path = Path(tempfile.mkdtemp(prefix="toktra-osq-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def table():
    table = RecordingTable()
    table.set_open([OPENAI, ANTHROPIC, dict(CLOSED)])
    table.closed(CLOSED)
    return table


@pytest.fixture
def agent_socket(base, table):
    server = TableServer(table, str(base / "connections.sock")).start()
    yield server
    server.close()


@pytest.fixture
def manager(base):
    manager = StandInManager(str(base / "osquery.em")).start()
    yield manager
    manager.stop()


@pytest.fixture
def spawn(base, manager, agent_socket):
    started: list[ExtensionProcess] = []

    def spawn(*extra: str, socket_path: str | None = None) -> ExtensionProcess:
        ext = ExtensionProcess(
            base,
            socket_path or manager.path,
            agent_socket.path,
            "--interval",
            "0.2",
            *extra,
        )
        started.append(ext)
        return ext

    yield spawn
    for ext in started:
        ext.stop()


@pytest.fixture
def extension(spawn):
    return spawn()


def rows_of(response) -> list[dict[str, str]]:
    assert response.status.code == 0, response.status.message
    return sorted(response.response, key=lambda r: int(r["pid"]))


# -- registration and schema --------------------------------------------------


def test_registers_one_table(manager, extension):
    reg = manager.wait_registered()

    assert reg.name == "toktra"
    assert reg.version == __version__
    assert list(reg.registry) == ["table"]
    assert list(reg.registry["table"]) == [TABLE]
    extension.wait_log(f"table {TABLE} registered as uuid {reg.uuid}")


def test_schema_column_by_column(manager, extension):
    reg = manager.wait_registered()
    broadcast = reg.registry["table"][TABLE]
    answered = manager.columns(reg.uuid, TABLE)

    assert answered.status.code == 0
    for routes in (broadcast, answered.response):
        assert [r["id"] for r in routes] == ["column"] * len(SCHEMA)
        for (name, sql_type), route in zip(SCHEMA, routes, strict=True):
            assert (route["name"], route["type"]) == (name, sql_type)


def test_schema_matches_the_agents_table():
    assert list(TABLE_COLUMNS) == list(COLUMNS)
    for name, sql_type in TABLE_COLUMNS.items():
        assert (sql_type == "TEXT") == (COLUMNS[name] is str), name


# -- rows ---------------------------------------------------------------------


def test_full_scan(manager, extension, table):
    reg = manager.wait_registered()

    rows = rows_of(manager.generate(reg.uuid, TABLE, {"constraints": []}))

    assert rows == [as_osquery(e) for e in (OPENAI, ANTHROPIC, CLOSED)]
    # No server name is a missing column (NULL to osquery), not "None".
    assert "dst_hostname" not in rows[2]
    assert table.asked == [({}, 3)]


def test_generate_without_context(manager, extension, table):
    reg = manager.wait_registered()

    assert len(rows_of(manager.generate(reg.uuid, TABLE))) == 3
    assert table.asked == [({}, 3)]


def test_provider_filter_applied_by_the_agent(manager, extension, table):
    reg = manager.wait_registered()

    rows = rows_of(
        manager.generate(reg.uuid, TABLE, constraints(provider=(EQ, "openai")))
    )

    assert rows == [as_osquery(OPENAI), as_osquery(CLOSED)]
    assert table.asked == [({"provider": "openai"}, 2)]


def test_pid_filter_applied_by_the_agent(manager, extension, table):
    reg = manager.wait_registered()

    rows = rows_of(manager.generate(reg.uuid, TABLE, constraints(pid=(EQ, "123"))))

    assert rows == [as_osquery(OPENAI)]
    assert table.asked == [({"pid": 123}, 1)]


def test_several_equalities_combine(manager, extension, table):
    reg = manager.wait_registered()
    context = constraints(provider=(EQ, "openai"), dst_port=(EQ, "8443"))

    rows = rows_of(manager.generate(reg.uuid, TABLE, context))

    assert rows == [as_osquery(CLOSED)]
    assert table.asked == [({"provider": "openai", "dst_port": 8443}, 1)]


def test_other_constraints_are_left_to_osquery(manager, extension, table):
    reg = manager.wait_registered()
    context = constraints(
        provider=(EQ, "openai"),
        pid=(GT, "200"),  # a range
        comm=[(EQ, "curl"), (EQ, "node")],  # two values for one column
        dst_hostname=(LIKE, "api.%"),
    )

    rows = rows_of(manager.generate(reg.uuid, TABLE, context))

    # Only the equality went to the agent; osquery filters the rest itself.
    assert table.asked == [({"provider": "openai"}, 2)]
    assert len(rows) == 2


# -- what the table tolerates -------------------------------------------------


@pytest.mark.parametrize(
    "context",
    [
        constraints(no_such_column=(EQ, "x")),
        constraints(pid=(EQ, "not a number")),
        constraints(pid=(EQ, "1.0")),
        constraints(pid=(EQ, "99999999999999999999999")),
        {"constraints": "everything"},
        {"constraints": [17, None, {"name": "pid"}, {"name": "pid", "list": 3}]},
        {"constraints": [{"name": "pid", "list": [{"op": "2", "expr": 123}]}]},
        {"constraints": [{"name": "pid", "list": [None]}]},
        {"constraints": [{"name": ["pid"], "list": []}]},
        [],
        "just a string",
    ],
)
def test_garbage_constraints_mean_no_filter(context):
    assert pushdown(context) == {}


def test_garbage_does_not_break_the_extension(manager, extension, table):
    reg = manager.wait_registered()

    not_json = manager.generate(reg.uuid, TABLE, "{not json")
    odd = manager.generate(reg.uuid, TABLE, {"constraints": [{"name": 5}]})
    with manager.extension(reg.uuid) as client:
        other_table = client.call("table", "processes", {"action": "generate"})
        bad_action = client.call("table", TABLE, {"action": "insert"})
        no_action = client.call("table", TABLE, {})
        ping = client.ping()

    assert not_json.status.code == 1
    assert "not JSON" in not_json.status.message
    assert len(rows_of(odd)) == 3
    assert other_table.status.code == 1
    assert bad_action.status.code == 1
    assert no_action.status.code == 1
    assert ping.code == 0
    assert ping.uuid == reg.uuid
    assert len(rows_of(manager.generate(reg.uuid, TABLE))) == 3
    assert "Traceback" not in extension.log()


def test_values_become_text():
    row = osquery_row({"pid": 1, "comm": None, "provider": "x", "bytes_sent": 2**62})
    assert row == {"pid": "1", "provider": "x", "bytes_sent": str(2**62)}


# -- the agent stopped --------------------------------------------------------


def test_agent_stopped_answers_empty_within_2s(manager, extension, agent_socket):
    reg = manager.wait_registered()
    assert len(rows_of(manager.generate(reg.uuid, TABLE))) == 3
    agent_socket.close()  # the socket file is gone

    for _ in range(3):
        started = time.monotonic()
        response = manager.generate(reg.uuid, TABLE, constraints(pid=(EQ, "123")))
        assert time.monotonic() - started < 2
        assert rows_of(response) == []

    log = extension.wait_log("agent not answering")
    assert log.count("agent not answering") == 1, log
    assert agent_socket.path in log
    assert "Traceback" not in log


def test_agent_hung_answers_empty_within_2s(base, manager):
    # A socket that takes connections and never answers them.
    hung_path = str(base / "hung.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as hung:
        hung.bind(hung_path)
        hung.listen(16)
        ext = ExtensionProcess(
            base, manager.path, hung_path, "--interval", "0.2", "--timeout", "5"
        )
        try:
            reg = manager.wait_registered()
            started = time.monotonic()
            response = manager.generate(reg.uuid, TABLE)
            elapsed = time.monotonic() - started
        finally:
            ext.stop()

    assert elapsed < 2
    assert rows_of(response) == []
    assert ext.log().count("agent not answering") == 1


def test_agent_back_is_noticed(base, manager, extension, agent_socket, table):
    reg = manager.wait_registered()
    agent_socket.close()
    assert rows_of(manager.generate(reg.uuid, TABLE)) == []

    restarted = TableServer(table, agent_socket.path).start()
    try:
        rows = rows_of(manager.generate(reg.uuid, TABLE))
    finally:
        restarted.close()

    assert len(rows) == 3
    extension.wait_log("agent answers again")
    agent_socket.close()
    assert rows_of(manager.generate(reg.uuid, TABLE)) == []
    # A new episode, logged once again.
    log = extension.log()
    assert log.count("agent not answering") == 2, log


# -- the manager's lifecycle --------------------------------------------------


def test_reregisters_after_the_manager_restarts(manager, extension):
    first = manager.wait_registered(1)
    # The extension has its uuid (the answer was not lost in the stop).
    extension.wait_log(f"registered as uuid {first.uuid}")
    manager.stop()
    extension.wait_log("the manager does not answer")
    time.sleep(0.5)  # a few failed checks while osqueryd is away
    manager.start()

    second = manager.wait_registered(2)

    assert (second.name, list(second.registry["table"])) == ("toktra", [TABLE])
    assert len(rows_of(manager.generate(second.uuid, TABLE))) == 3
    assert extension.proc.poll() is None
    if second.uuid != first.uuid:
        assert not os.path.exists(f"{manager.path}.{first.uuid}")
    assert "Traceback" not in extension.log()


def test_reregisters_when_the_manager_forgets_it(manager, extension):
    # The manager answers, without us: osqueryd restarted between two checks,
    # or dropped the extension after missed pings.
    first = manager.wait_registered(1)
    manager.forget(first.uuid)

    second = manager.wait_registered(2)

    assert len(rows_of(manager.generate(second.uuid, TABLE))) == 3
    extension.wait_log(f"no longer lists uuid {first.uuid}")


def test_exits_1_when_the_manager_stays_away(manager, spawn):
    ext = spawn("--grace", "1")
    reg = manager.wait_registered()
    ext.wait_log(f"registered as uuid {reg.uuid}")
    manager.stop()

    assert ext.wait(10) == 1
    log = ext.log()
    assert "osquery extension manager gone for 1s" in log
    assert "Traceback" not in log


def test_exits_1_without_a_manager_at_start(base, spawn):
    ext = spawn("--timeout", "1", socket_path=str(base / "nothing.em"))

    started = time.monotonic()
    assert ext.wait(10) == 1
    assert time.monotonic() - started < 5
    log = ext.log()
    errors = [line for line in log.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1, log
    assert "no osquery extension manager within 1s" in errors[0]
    assert "Traceback" not in log


def test_unservable_socket_path_exits_1(base, spawn):
    # The manager's path fits a Unix socket; with ".uuid" added it does not.
    long_path = str(base / ("m" * (104 - len(str(base)) - 1)))
    manager = StandInManager(long_path).start()
    try:
        ext = spawn(socket_path=long_path)
        reg = manager.wait_registered()
        assert ext.wait(10) == 1
        manager.wait_deregistered(reg.uuid)
    finally:
        manager.stop()
    log = ext.log()
    assert "cannot serve the extension socket" in log
    assert "Traceback" not in log


def test_refused_registration_exits_1(manager, extension, spawn):
    manager.wait_registered(1)
    ext = spawn()

    assert ext.wait(10) == 1
    assert "Duplicate extension registered" in ext.log()


def test_stops_when_the_manager_asks(manager, extension):
    reg = manager.wait_registered()

    manager.shutdown_extension(reg.uuid)

    assert extension.wait(10) == 0
    assert "the extension manager asked this extension to stop" in extension.log()


def test_sigterm_deregisters(manager, extension):
    reg = manager.wait_registered()
    extension.wait_log("registered as uuid")

    assert extension.stop() == 0
    manager.wait_deregistered(reg.uuid)
    assert ("deregister", reg.uuid) in manager.calls
    assert not os.path.exists(f"{manager.path}.{reg.uuid}")


def test_takes_the_flags_osquery_passes(manager, spawn):
    # osqueryd's autoloader: --socket, --timeout, --interval, and --verbose.
    ext = spawn("--timeout", "3", "--interval", "3", "--verbose")
    reg = manager.wait_registered()

    assert len(rows_of(manager.generate(reg.uuid, TABLE))) == 3
    ext.wait_log("DEBUG")


def test_connections_socket_found_through_run_dir(base, manager, agent_socket):
    config = base / "agent.conf"
    config.write_text(f'run_dir = "{base}"\n')
    ext = ExtensionProcess(base, manager.path, None, "--config", str(config))
    try:
        reg = manager.wait_registered()
        rows = rows_of(manager.generate(reg.uuid, TABLE))
    finally:
        ext.stop()

    assert len(rows) == 3
    assert f"from {agent_socket.path} " in ext.log()


def test_bad_configuration_exits_2(base):
    config = base / "agent.conf"
    config.write_text("run_dri = 1\n")
    result = subprocess.run(
        [AGENT, "osquery-extension", "--socket", "x", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert "configuration error" in result.stderr
    assert "run_dri" in result.stderr


def test_bad_usage_exits_2(base):
    result = subprocess.run(
        [AGENT, "osquery-extension", "--connections", "x"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "--socket" in result.stderr


def test_real_connections_reach_osquery_with_their_bytes(
    base, manager, tls_server, pki
):
    """The whole path: real TLS clients, the real agent, the extension."""
    from tests.conftest import needs_root_and_bpf
    from tests.harness import Agent, run_pyclient

    needs_root_and_bpf()
    agent_dir = Path(tempfile.mkdtemp(prefix="toktra-test-"))
    agent = Agent(agent_dir, [tls_server.port]).start()
    ext = None
    try:
        table_path = str(agent.run_dir / "connections.sock")
        ext = ExtensionProcess(base, manager.path, table_path, "--interval", "0.2")
        uuid = manager.wait_registered().uuid
        ext.wait_log("registered as uuid")
        proc = run_pyclient(
            "threads",
            "127.0.0.1",
            tls_server.port,
            pki,
            "s",
            ["api.openai.com", "api.anthropic.com", "www.example.org"],
        )
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        pid = json.loads(out.splitlines()[0])["pid"]
        events = agent.wait_events(
            lambda evs: len([e for e in evs if e["pid"] == pid]) == 2
        )
        mine = {e["dst_hostname"]: e for e in events if e["pid"] == pid}
        context = constraints(pid=(EQ, str(pid)))
        deadline = time.monotonic() + 15
        while True:
            answer = manager.generate(uuid, TABLE, context)
            rows = {r["dst_hostname"]: r for r in answer.response}
            if set(rows) == set(mine):
                break
            assert time.monotonic() < deadline, answer.response
            time.sleep(0.2)
        for name, event in mine.items():
            row = rows[name]
            assert row["provider"] == event["provider"]
            assert int(row["bytes_sent"]) == event["bytes_sent"] > 0
            assert int(row["bytes_received"]) == event["bytes_received"] > 0
            assert int(row["pid"]) == pid and row["comm"] == event["comm"]
        openai = constraints(pid=(EQ, str(pid)), provider=(EQ, "openai"))
        only = manager.generate(uuid, TABLE, openai).response
        assert [r["dst_hostname"] for r in only] == ["api.openai.com"]
    finally:
        if ext is not None:
            ext.stop()
        agent.stop()
