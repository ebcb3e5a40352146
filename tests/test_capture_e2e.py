"""The whole agent on real input: real TLS clients, the real BPF object.

Every LLM connection must come out exactly once, attributed to the right
process, with the SNI the client asked for and the kernel's byte counts;
every other connection must not come out at all.

About the byte counts: the agent reports the kernel's tcp_sock counters at
close, which count the sequence space acknowledged and received: payload,
plus one byte for each SYN and FIN the counter saw. For the client:

  bytes_sent     = payload sent + its SYN + its FIN (both acknowledged)
  bytes_received = payload received + the server's FIN

A client that reads TCP_INFO just before it closes has not sent its FIN
and has not received the server's, so the event is exactly one higher in
each.
The server here reads its TCP_INFO after the client's FIN arrived and
before sending its own; its bytes_acked starts after the handshake (a
passive open counts no SYN), so the event's bytes_sent is the server's
bytes_received plus the client's SYN, and its bytes_received is the
server's bytes_acked plus the server's FIN. A client that exits with data
still unread resets the connection instead: then neither FIN is counted.

The server's FIN is the one byte that may be missing on a normal close
too: a client that closes first gets its own FIN acknowledged, and if
that ACK arrives without the server's FIN, the kernel retires the socket
(to a timewait entry) before the server's FIN is counted. Both outcomes
occur here; the tests accept exactly that byte and nothing else.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import pytest

from tests.conftest import LLM_NAMES, OTHER_NAMES
from tests.harness import run_curl, run_pyclient

PROVIDERS = {"api.openai.com": "openai", "api.anthropic.com": "anthropic"}


def mixed_names(n: int, offset: int = 0) -> list[str]:
    names = LLM_NAMES + OTHER_NAMES
    # Mixed case and a trailing dot on some: the classifier normalizes.
    out = []
    for i in range(n):
        name = names[(i + offset) % len(names)]
        if i % 5 == 4:
            name = name.upper() + "."
        out.append(name)
    return out


def canonical(name: str) -> str:
    return name.lower().rstrip(".")


@pytest.fixture(scope="module")
def traffic(agent, tls_server, pki):
    """50 concurrent clients: Python threads, asyncio and curl, v4 and v6."""
    secret = f"TOKTRA-SECRET-{uuid.uuid4().hex}"
    procs = [
        (
            "threads",
            run_pyclient(
                "threads", "127.0.0.1", tls_server.port, pki, secret, mixed_names(10)
            ),
        ),
        (
            "threads",
            run_pyclient(
                "threads", "::1", tls_server.port, pki, secret, mixed_names(10, 1)
            ),
        ),
        (
            "asyncio",
            run_pyclient(
                "asyncio", "127.0.0.1", tls_server.port, pki, secret, mixed_names(10, 2)
            ),
        ),
        (
            "asyncio",
            run_pyclient(
                "asyncio", "::1", tls_server.port, pki, secret, mixed_names(10, 3)
            ),
        ),
    ]
    curls = []
    for i, name in enumerate(mixed_names(10, 1)):
        host = "127.0.0.1" if i % 2 else "::1"
        curls.append((name, host, run_curl(host, tls_server.port, pki, name, secret)))

    clients = []  # one dict per connection, from the client's own view
    for kind, p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, f"{kind} client failed: {err}"
        for line in out.splitlines():
            row = json.loads(line)
            row["kind"] = kind
            clients.append(row)
    for name, host, p in curls:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, f"curl {name} via {host} failed: {err}"
        clients.append(
            {
                "sni": name,
                "pid": p.pid,
                "comm": "curl",
                "src_port": int(out),
                "acked": None,
                "received": None,
                "kind": "curl",
            }
        )
    assert len(clients) == 50
    llm = [c for c in clients if canonical(c["sni"]) in PROVIDERS]
    ports = {c["src_port"] for c in llm}
    agent.wait_events(
        lambda evs: (
            ports <= {e["src_port"] for e in evs if e["dst_port"] == tls_server.port}
        )
    )
    deadline = time.monotonic() + 20
    while not ports <= tls_server.seen.keys():
        assert time.monotonic() < deadline, ("server never finished", tls_server.errors)
        time.sleep(0.1)
    time.sleep(1.5)  # let a duplicate, if the agent made one, arrive too
    return {"clients": clients, "llm": llm, "events": agent.events(), "secret": secret}


def test_every_llm_connection_yields_exactly_one_correct_event(traffic, tls_server):
    by_port: dict[int, list[dict]] = {}
    for e in traffic["events"]:
        by_port.setdefault(e["src_port"], []).append(e)
    kinds = {c["kind"] for c in traffic["llm"]}
    assert kinds == {"threads", "asyncio", "curl"}
    for c in traffic["llm"]:
        found = by_port.get(c["src_port"], [])
        assert len(found) == 1, f"{c}: {len(found)} events"
        e = found[0]
        host = canonical(c["sni"])
        assert e["dst_hostname"] == host, (c, e)
        assert e["provider"] == PROVIDERS[host]
        assert e["category"] == "api"
        assert e["sni_source"] == "openssl"
        assert e["final"] is True
        assert e["pid"] == c["pid"], (c, e)
        assert e["comm"] == c["comm"], (c, e)
        assert e["uid"] == os.getuid()
        assert e["user"] == "root"
        assert e["dst_port"] == tls_server.port
        assert e["dst_ip"] in ("127.0.0.1", "::1")
        server = tls_server.seen.get(c["src_port"])
        assert server is not None, (c, tls_server.errors)
        assert e["dst_ip"] == ("::1" if ":" in e["dst_ip"] else "127.0.0.1")
        assert canonical(server.sni) == host
        # Server's view, for every client (see the module docstring).
        assert e["bytes_sent"] == server.bytes_received + 1, (c, e, server)
        # The server's FIN counts unless the client reset, or the kernel
        # retired the client's socket before that FIN came (see above).
        fin = {0, 1} if server.peer_fin else {0}
        assert e["bytes_received"] - server.bytes_acked in fin, (c, e, server)
        # The client's own TCP_INFO, where it could read it.
        if c["acked"] is not None:
            assert e["bytes_sent"] == c["acked"] + 1, (c, e)
            assert e["bytes_received"] - c["received"] in {0, 1}, (c, e)
        assert e["est_tokens_in"] > 0 and e["est_tokens_out"] > 0
        assert len(e["event_id"]) == 32 and len(e["conn_id"]) == 24
        assert e["duration_ns"] > 0
        assert abs(e["timestamp"] / 1e9 - time.time()) < 300


def test_event_ids_are_unique(traffic):
    ids = [e["event_id"] for e in traffic["events"]]
    assert len(ids) == len(set(ids))
    conns = [e["conn_id"] for e in traffic["events"]]
    assert len(conns) == len(set(conns))


def test_connections_to_other_hosts_never_come_out(traffic):
    other = {
        c["src_port"] for c in traffic["clients"] if canonical(c["sni"]) in OTHER_NAMES
    }
    assert len(other) >= 10
    leaked = [e for e in traffic["events"] if e["src_port"] in other]
    assert leaked == []
    assert not any("example" in (e["dst_hostname"] or "") for e in traffic["events"])


def test_secret_in_request_body_appears_nowhere_the_agent_writes(traffic, agent):
    secret = traffic["secret"].encode()
    written = [agent.log_file, agent.dir / "agent.conf"]
    for d in (agent.state_dir, agent.run_dir):
        written += [p for p in d.rglob("*") if p.is_file()]
    assert agent.events_file in written
    for path in written:
        assert secret not in path.read_bytes(), f"secret found in {path}"


def test_short_lived_process_is_attributed(agent, tls_server, pki):
    """Connect, handshake, exit at once: pid and comm still right."""
    code = (
        "import socket, ssl, os, sys\n"
        "ctx = ssl.create_default_context(cafile=sys.argv[1])\n"
        "s = socket.create_connection(('127.0.0.1', int(sys.argv[2])))\n"
        "t = ctx.wrap_socket(s, server_hostname='api.openai.com')\n"
        "print(t.getsockname()[1], flush=True)\n"
        "os._exit(0)\n"
    )
    p = subprocess.Popen(
        [sys.executable, "-c", code, str(pki.ca_file), str(tls_server.port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    out, _ = p.communicate(timeout=30)
    assert p.returncode == 0
    port = int(out)
    events = agent.wait_events(lambda evs: any(e["src_port"] == port for e in evs))
    (e,) = [e for e in events if e["src_port"] == port]
    assert e["pid"] == p.pid
    assert e["comm"] == os.path.basename(sys.executable)[:15]
    assert e["dst_hostname"] == "api.openai.com"
    # Gone long before the collector looked: the kernel's file name remains.
    assert e["exe"] in (
        os.path.realpath(sys.executable),
        os.path.basename(os.path.realpath(sys.executable)),
    )
