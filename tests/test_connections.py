"""The connections table served by the real agent, fed by real connections."""

from __future__ import annotations

import json
import os
import pwd
import socket
import ssl
import stat
import time

import pytest

from agent import connections
from agent.connections import COLUMNS, ConnectionsError
from tests.harness import Agent, run_pyclient


def sock_path(agent: Agent) -> str:
    return str(agent.run_dir / connections.SOCKET_NAME)


def wait_rows(agent: Agent, predicate, where=None, timeout: float = 15):
    deadline = time.monotonic() + timeout
    while True:
        rows = connections.query(sock_path(agent), where)
        if predicate(rows):
            return rows
        assert time.monotonic() < deadline, f"table never matched: {rows}"
        time.sleep(0.2)


def test_closed_connections_appear_with_their_bytes(agent, tls_server, pki):
    names = ["api.openai.com", "api.anthropic.com", "www.example.org"]
    proc = run_pyclient("threads", "127.0.0.1", tls_server.port, pki, "s", names)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    clients = [json.loads(line) for line in out.splitlines()]
    llm = [c for c in clients if c["sni"] != "www.example.org"]
    events = agent.wait_events(
        lambda evs: {c["src_port"] for c in llm} <= {e["src_port"] for e in evs}
    )
    by_port = {e["src_port"]: e for e in events}
    rows = wait_rows(
        agent,
        lambda rows: len([r for r in rows if r["pid"] == llm[0]["pid"]]) == 2,
    )
    mine = [r for r in rows if r["pid"] == llm[0]["pid"]]
    assert sorted(r["dst_hostname"] for r in mine) == sorted(c["sni"] for c in llm)
    for row in mine:
        assert list(row) == list(COLUMNS)
        # The row has no port; its start and name pick its event (two
        # connections opened at once may share a start time).
        (event,) = [
            e
            for e in by_port.values()
            if (e["timestamp"], e["dst_hostname"])
            == (row["timestamp"], row["dst_hostname"])
        ]
        for column in COLUMNS:
            assert row[column] == event[column], column
        assert row["bytes_sent"] > 700 and row["bytes_received"] > 3000
    # Only LLM connections are in the table.
    assert all(r["dst_hostname"] != "www.example.org" for r in rows)


def test_filters_apply_on_the_agent_side(agent, tls_server, pki):
    proc = run_pyclient(
        "threads",
        "127.0.0.1",
        tls_server.port,
        pki,
        "s",
        ["api.openai.com", "api.anthropic.com"],
    )
    out, _ = proc.communicate(timeout=60)
    pid = json.loads(out.splitlines()[0])["pid"]
    rows = wait_rows(agent, lambda rows: len(rows) == 2, {"pid": pid})
    assert {r["provider"] for r in rows} == {"openai", "anthropic"}
    only = connections.query(sock_path(agent), {"pid": pid, "provider": "openai"})
    assert [r["dst_hostname"] for r in only] == ["api.openai.com"]
    with pytest.raises(ConnectionsError, match="unknown column"):
        connections.query(sock_path(agent), {"secret": "x"})
    with pytest.raises(ConnectionsError, match="pid takes an integer"):
        connections.query(sock_path(agent), {"pid": "1"})


def test_open_connections_are_in_the_table(agent, tls_server, pki):
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    raw = socket.create_connection(("127.0.0.1", tls_server.port))
    tls = ctx.wrap_socket(raw, server_hostname="api.anthropic.com")
    port = tls.getsockname()[1]
    try:
        rows = wait_rows(
            agent,
            lambda rows: any(r["dst_hostname"] == "api.anthropic.com" for r in rows),
            {"pid": os.getpid()},
        )
        (row,) = rows
        assert row["provider"] == "anthropic" and row["dst_port"] == tls_server.port
        # Bytes of an open connection are known only at close.
        assert (row["bytes_sent"], row["bytes_received"]) == (0, 0)
    finally:
        tls.close()
    closed = wait_rows(
        agent,
        lambda rows: len(rows) == 1 and rows[0]["bytes_sent"] > 0,
        {"pid": os.getpid()},
    )
    # The same connection, now with its bytes, and the same start time.
    assert closed[0]["timestamp"] == row["timestamp"], port
    assert closed[0]["dst_hostname"] == "api.anthropic.com"


def test_socket_is_for_root_and_the_agent_group(agent):
    st = os.stat(sock_path(agent))
    toktra = pwd.getpwnam("toktra")
    assert stat.S_ISSOCK(st.st_mode)
    assert (st.st_uid, st.st_gid) == (toktra.pw_uid, toktra.pw_gid)
    assert stat.S_IMODE(st.st_mode) == 0o660


def test_a_silent_client_does_not_stall_the_pipeline(agent, tls_server, pki):
    silent = socket.socket(socket.AF_UNIX)
    silent.connect(sock_path(agent))  # connects, never asks
    try:
        proc = run_pyclient(
            "threads", "127.0.0.1", tls_server.port, pki, "s", ["api.openai.com"]
        )
        out, _ = proc.communicate(timeout=60)
        port = json.loads(out)["src_port"]
        agent.wait_events(lambda evs: port in {e["src_port"] for e in evs})
    finally:
        silent.close()
    # And the table answers again once the silent client is gone.
    assert isinstance(connections.query(sock_path(agent)), list)


def test_query_without_an_agent_says_why(tmp_path):
    missing = tmp_path / "missing.sock"
    with pytest.raises(ConnectionsError, match="No such file"):
        connections.query(str(missing))


def test_a_silent_client_does_not_delay_others(tmp_path):
    from agent.connections import Table, TableServer

    table = Table(60)
    table.set_open([{"conn_id": "c", "pid": 7, "provider": "openai"}])
    server = TableServer(table, str(tmp_path / "t.sock")).start()
    silent = socket.socket(socket.AF_UNIX)
    try:
        silent.connect(server.path)  # asks nothing, holds its slot for 2 s
        # Served one after another, this query would wait out the silent
        # client's 2 s deadline and its own 1.5 s timeout would fail it.
        rows = connections.query(server.path, {"pid": 7})
        assert [r["provider"] for r in rows] == ["openai"]
    finally:
        silent.close()
        server.close()
