"""Coverage beyond the host's libssl, with the whole agent running.

- Clients with their own TLS (Node.js, Go, Java) are named from the
  ClientHello they send; their pid and bytes are checked against the
  process and the server's own TCP_INFO.
- A client in its own mount namespace, whose libssl is a different file
  bind-mounted over the usual path, is attached to when it maps it.
- A connection held open reports growing byte counts (final false), then
  its close (final true).
- A connection opened before the agent started is adopted and reported
  with its bytes when it closes.
- Without BPF, the agent polls sock_diag, reports connections and bytes,
  and says it is degraded in its log, status and metrics.

Byte counts: see tests/test_capture_e2e.py for why the event is the
server's count plus the client's SYN, and the server's FIN may be missing.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import needs_root_and_bpf
from tests.foreign import run_foreign
from tests.harness import AGENT, Agent, NotifySocket
from tests.test_operations import scrape, value

SYSTEM_LIBSSL = "/usr/lib/x86_64-linux-gnu/libssl.so.3"
PROGRESS_S = 1.0
NOBODY = pwd.getpwnam("nobody")
EXE_NAMES = {"node": "node", "go": "goclient", "java": "java"}

# A client that holds one TLS connection open: it sends its request, reads
# the answer, then sends `rounds` more pieces `pause` seconds apart (the
# test server reads and discards them), and closes after a line on stdin
# when told to wait. It prints {"pid", "src_port"} first and its TCP_INFO
# byte counts last.
HOLDER = r"""
import json, os, socket, ssl, struct, sys, time
host, port, ca, sni, rounds, pause, wait = sys.argv[1:8]
ctx = ssl.create_default_context(cafile=ca)
raw = socket.create_connection((host, int(port)))
tls = ctx.wrap_socket(raw, server_hostname=sni)
print(json.dumps({"pid": os.getpid(), "src_port": tls.getsockname()[1]}), flush=True)
body = b"x" * 500
head = b"POST / HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n\r\n"
tls.sendall(head % (sni.encode(), len(body)) + body)
data = b""
while b"\r\n\r\n" not in data:
    data += tls.recv(65536)
if wait == "1":
    sys.stdin.readline()
for _ in range(int(rounds)):
    time.sleep(float(pause))
    tls.sendall(b"y" * 2000)
info = tls.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
acked, received = struct.unpack_from("<QQ", info, 120)
print(json.dumps({"acked": acked, "received": received}), flush=True)
tls.close()
"""


def holder(
    host, port, pki, sni, rounds, pause, wait=False, prefix=()
) -> subprocess.Popen:
    return subprocess.Popen(
        [
            *prefix,
            sys.executable,
            "-c",
            HOLDER,
            host,
            str(port),
            str(pki.ca_file),
            sni,
            str(rounds),
            str(pause),
            "1" if wait else "0",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def first_line(proc: subprocess.Popen) -> dict:
    line = proc.stdout.readline()
    assert line, proc.stderr.read()
    return json.loads(line)


def collector_tap(config: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [*AGENT, "tap", "collector", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def until_final(tap: subprocess.Popen, src_port: int) -> list[dict]:
    """The tap's messages about one connection, up to its final one."""
    seen: list[dict] = []
    while not (seen and seen[-1]["final"]):
        msg = json.loads(tap.stdout.readline())
        if msg["src_port"] == src_port:
            seen.append(msg)
    return seen


def held_through_tap(config: Path, port: int, pki, rounds: int):
    """A held connection's start, its TCP_INFO, and what the tap showed."""
    tap = collector_tap(config)
    try:
        time.sleep(1)  # the tap subscribes
        proc = holder("127.0.0.1", port, pki, "api.openai.com", rounds, 0.5)
        start = first_line(proc)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        return (
            start,
            json.loads(out.splitlines()[-1]),
            until_final(tap, start["src_port"]),
        )
    finally:
        tap.kill()
        tap.communicate(timeout=10)


@pytest.fixture(scope="module")
def agent(tls_server):
    """The agent with progress reports every second."""
    needs_root_and_bpf()
    base = Path(tempfile.mkdtemp(prefix="toktra-test-"))
    running = Agent(
        base, [tls_server.port], {"progress_interval_seconds": PROGRESS_S}
    ).start()
    yield running
    running.stop()
    shutil.rmtree(base, ignore_errors=True)


def finals_for(agent: Agent, ports: set[int], dst_port: int) -> dict[int, dict]:
    events = agent.wait_events(
        lambda evs: (
            ports
            <= {e["src_port"] for e in evs if e["final"] and e["dst_port"] == dst_port}
        ),
        timeout=30,
    )
    return {
        e["src_port"]: e
        for e in events
        if e["final"] and e["dst_port"] == dst_port and e["src_port"] in ports
    }


def assert_bytes_match_server(event: dict, server) -> None:
    assert event["bytes_sent"] == server.bytes_received + 1, (event, server)
    fin = {0, 1} if server.peer_fin else {0}
    assert event["bytes_received"] - server.bytes_acked in fin, (event, server)


@pytest.mark.parametrize(
    "kind, host",
    [("node", "127.0.0.1"), ("go", "::1"), ("java", "127.0.0.1")],
)
def test_client_with_its_own_tls_is_named_from_its_clienthello(
    kind, host, agent, tls_server, pki
):
    secret = f"TOKTRA-SECRET-{uuid.uuid4().hex}"
    proc = run_foreign(kind, host, tls_server.port, pki, "api.openai.com", secret, 2)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    ports = {r["local_port"] for r in rows}
    assert len(ports) == 2
    events = finals_for(agent, ports, tls_server.port)
    for port, e in events.items():
        assert e["dst_hostname"] == "api.openai.com"
        assert e["sni_source"] == "clienthello", e
        assert e["provider"] == "openai"
        assert e["pid"] == proc.pid
        assert os.path.basename(e["exe"] or "") == EXE_NAMES[kind], e
        assert e["dst_ip"] == host
        assert_bytes_match_server(e, tls_server.seen[port])
    assert secret not in agent.events_file.read_text()


@pytest.mark.parametrize("layout", ["mount-namespace", "lib64"])
def test_a_libssl_file_mapped_after_start_is_attached(layout, agent, tls_server, pki):
    """Another libssl file: attached when a process maps it.

    mount-namespace: a copy bind-mounted over the system path, in a mount
    namespace of its own (as in a container); lib64: a copy in a lib64
    directory found through LD_LIBRARY_PATH.
    """
    copy = Path(tempfile.mkdtemp(dir=agent.dir)) / "lib64" / "libssl.so.3"
    copy.parent.mkdir()
    shutil.copy(SYSTEM_LIBSSL, copy)
    assert os.stat(copy).st_ino != os.stat(SYSTEM_LIBSSL).st_ino
    # Two connections a second apart: the first may race the attach (its
    # name then comes from the ClientHello); the second is OpenSSL's.
    code = (
        "import json, os, socket, ssl, sys, time\n"
        "ctx = ssl.create_default_context(cafile=sys.argv[2])\n"
        "for name in ('api.anthropic.com', 'api.openai.com'):\n"
        "    raw = socket.create_connection(('127.0.0.1', int(sys.argv[1])))\n"
        "    tls = ctx.wrap_socket(raw, server_hostname=name)\n"
        "    tls.sendall(b'GET / HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n')\n"
        "    tls.recv(65536)\n"
        "    print(tls.getsockname()[1], flush=True)\n"
        "    tls.close()\n"
        "    time.sleep(1)\n"
        "maps = open('/proc/self/maps').read().splitlines()\n"
        "print(json.dumps([l.split()[4] for l in maps if 'libssl.so' in l]))\n"
    )
    python = [sys.executable, "-c", code, str(tls_server.port), str(pki.ca_file)]
    if layout == "mount-namespace":
        script = f'mount --bind {copy} {SYSTEM_LIBSSL} && exec "$@"'
        command = ["unshare", "--mount", "--propagation", "private"]
        command += ["sh", "-c", script, "sh", *python]
        env = dict(os.environ)
        seen_as = SYSTEM_LIBSSL
    else:
        command = python
        env = {**os.environ, "LD_LIBRARY_PATH": str(copy.parent)}
        seen_as = str(copy)
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    *ports, inodes = out.splitlines()
    # The client really ran on the copy, not the host's file.
    assert set(json.loads(inodes)) == {str(os.stat(copy).st_ino)}
    events = finals_for(agent, {int(p) for p in ports}, tls_server.port)
    first, second = (events[int(p)] for p in ports)
    assert first["dst_hostname"] == "api.anthropic.com"
    assert first["sni_source"] in ("openssl", "clienthello")
    assert second["dst_hostname"] == "api.openai.com"
    assert second["sni_source"] == "openssl", second
    assert f"attached to {seen_as} (pid {proc.pid} mapped it)" in agent.log_text()
    _, samples = scrape(agent)
    assert value(samples, "toktra_libssl_attached") >= 2


def test_a_long_lived_connection_reports_progress_then_closes(agent, tls_server, pki):
    proc = holder("127.0.0.1", tls_server.port, pki, "api.anthropic.com", 8, 0.5)
    start = first_line(proc)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    port = start["src_port"]
    events = finals_for(agent, {port}, tls_server.port)
    final = events[port]
    mine = [e for e in agent.events() if e["conn_id"] == final["conn_id"]]
    progress = [e for e in mine if not e["final"]]
    assert len(progress) >= 2, mine
    assert [e for e in mine if e["final"]] == [final]
    sent = [e["bytes_sent"] for e in progress]
    assert sent == sorted(sent) and sent[0] < sent[-1], sent
    assert sent[-1] <= final["bytes_sent"]
    assert all(e["pid"] == start["pid"] for e in mine)
    assert {e["dst_hostname"] for e in mine} == {"api.anthropic.com"}
    assert len({e["event_id"] for e in mine}) == len(mine)
    assert_bytes_match_server(final, tls_server.seen[port])


# A TLS server for a network namespace of its own: it answers the first
# request, then reads and discards until the client closes.
NETNS_SERVER = r"""
import socket, ssl, sys, threading
port, cert, key = int(sys.argv[1]), sys.argv[2], sys.argv[3]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
srv = socket.create_server(("127.0.0.1", port))
print("listening", flush=True)
def serve(conn):
    with ctx.wrap_socket(conn, server_side=True) as tls:
        data = b""
        while b"\r\n\r\n" not in data:
            data += tls.recv(65536)
        tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        while tls.recv(65536):
            pass
while True:
    conn, _ = srv.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""


@pytest.fixture
def netns():
    """A network namespace of the test's own, with loopback up; removed after."""
    name = f"toktra-t-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(
            ["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True
        )
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_a_connection_in_another_network_namespace_reports_progress(
    agent, tls_server, pki, netns
):
    """A container with its own network: sock_diag is read inside it."""
    inside = ["ip", "netns", "exec", netns]
    server = subprocess.Popen(
        [
            *inside,
            sys.executable,
            "-c",
            NETNS_SERVER,
            str(tls_server.port),  # the same number: the namespace has its own
            str(pki.cert_file),
            str(pki.key_file),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout.readline().strip() == "listening", server.stderr.read()
        proc = holder(
            "127.0.0.1",
            tls_server.port,
            pki,
            "api.anthropic.com",
            8,
            0.5,
            prefix=inside,
        )
        start = first_line(proc)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        truth = json.loads(out.splitlines()[-1])
    finally:
        server.kill()
        server.communicate(timeout=10)
    port = start["src_port"]
    final = finals_for(agent, {port}, tls_server.port)[port]
    mine = [e for e in agent.events() if e["conn_id"] == final["conn_id"]]
    progress = [e for e in mine if not e["final"]]
    assert len(progress) >= 2, mine
    sent = [e["bytes_sent"] for e in progress]
    assert sent == sorted(sent) and sent[0] < sent[-1], sent
    assert sent[-1] <= final["bytes_sent"]
    assert all(e["pid"] == start["pid"] for e in mine)
    assert {e["dst_hostname"] for e in mine} == {"api.anthropic.com"}
    assert final["bytes_sent"] == truth["acked"] + 1  # its FIN
    assert "cannot read some network namespaces" not in agent.log_text()


def test_a_connection_opened_before_the_agent_is_adopted(tls_server, pki):
    needs_root_and_bpf()
    proc = holder("127.0.0.1", tls_server.port, pki, "api.openai.com", 2, 0.2, True)
    start = first_line(proc)
    comm = Path(f"/proc/{start['pid']}/comm").read_text().strip()
    base = Path(tempfile.mkdtemp(prefix="toktra-test-"))
    agent = Agent(base, [tls_server.port], {"progress_interval_seconds": PROGRESS_S})
    try:
        agent.start()
        tap = collector_tap(base / "agent.conf")
        try:
            # Without a name it gets no progress reports (nothing could
            # classify them); its close is what counts.
            time.sleep(1)  # the tap subscribes
            proc.stdin.write("go\n")
            proc.stdin.flush()
            out, err = proc.communicate(timeout=30)
            assert proc.returncode == 0, err
            truth = json.loads(out.splitlines()[-1])
            msg = until_final(tap, start["src_port"])[-1]
        finally:
            tap.kill()
            tap.communicate(timeout=10)
        assert msg["pid"] == start["pid"]
        assert msg["comm"] == comm
        assert msg["sni"] is None and msg["sni_source"] is None
        # Read from the kernel at close: the client's counts plus its FIN,
        # and the server's FIN when it was counted in time.
        assert msg["bytes_sent"] == truth["acked"] + 1, (msg, truth)
        assert msg["bytes_received"] - truth["received"] in (0, 1), (msg, truth)
        _, samples = scrape(agent)
        assert value(samples, "toktra_connections_adopted_total") >= 1
        assert "adopted 1 connections open before start" in agent.log_text()
    finally:
        agent.stop()
        if proc.poll() is None:
            proc.kill()
        shutil.rmtree(base, ignore_errors=True)


def test_a_named_connection_keeps_its_identity_across_an_agent_restart(tls_server, pki):
    """Progress reports in one run, the final in the next: one conn_id."""
    needs_root_and_bpf()
    base = Path(tempfile.mkdtemp(prefix="toktra-test-"))
    settings = {"progress_interval_seconds": PROGRESS_S}
    first = Agent(base, [tls_server.port], settings).start()
    proc = holder("127.0.0.1", tls_server.port, pki, "api.openai.com", 2, 0.2, True)
    try:
        start = first_line(proc)
        reports = first.wait_events(
            lambda evs: any(e["src_port"] == start["src_port"] for e in evs)
        )
        (report,) = [e for e in reports if e["src_port"] == start["src_port"]][:1]
        assert report["final"] is False
        first.stop()
        (base / "notify.sock").unlink()
        second = Agent(base, [tls_server.port], settings).start()
        try:
            proc.stdin.write("go\n")
            proc.stdin.flush()
            _, err = proc.communicate(timeout=30)
            assert proc.returncode == 0, err
            events = finals_for(second, {start["src_port"]}, tls_server.port)
        finally:
            second.stop()
    finally:
        if proc.poll() is None:
            proc.kill()
    final = events[start["src_port"]]
    assert final["conn_id"] == report["conn_id"]
    assert final["timestamp"] == report["timestamp"]
    assert (final["dst_hostname"], final["sni_source"]) == ("api.openai.com", "openssl")
    assert final["provider"] == "openai"
    assert "1 of them named by the previous run" in second.log_text()
    shutil.rmtree(base, ignore_errors=True)


def test_without_bpf_the_agent_polls_and_says_it_is_degraded(tls_server, pki):
    needs_root_and_bpf()
    base = Path(tempfile.mkdtemp(prefix="toktra-test-"))
    agent = Agent(
        base,
        [tls_server.port],
        {
            "capture_mode": "sockdiag",
            "poll_interval_seconds": 0.2,
            "progress_interval_seconds": PROGRESS_S,
        },
    )
    try:
        agent.start()
        start, truth, seen = held_through_tap(
            base / "agent.conf", tls_server.port, pki, 6
        )
        assert len(seen) >= 2 and not any(m["final"] for m in seen[:-1])
        assert all(m["pid"] == start["pid"] and m["sni"] is None for m in seen)
        sent = [m["bytes_sent"] for m in seen]
        assert sent == sorted(sent)
        # The last poll that found it open came after the last round was
        # sent or just before it (the client closes right after it): short
        # by at most that round's TLS record (2000 bytes, 5 of header, 1 of
        # content type, 16 of tag), never more than the client's own count.
        assert truth["acked"] - 2022 <= seen[-1]["bytes_sent"] <= truth["acked"]

        _, samples = scrape(agent)
        assert value(samples, "toktra_capture_degraded") == 1
        status = subprocess.run(
            [*AGENT, "status", "--config", str(base / "agent.conf")],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert status.returncode == 1, status.stdout
        assert "DEGRADED" in status.stdout
        assert "DEGRADED capture: capture_mode is sockdiag" in agent.log_text()
        # systemd's STATUS says it too (systemctl status shows it).
        ready = agent.notify.wait_for("READY=1", 1)
        assert "STATUS=degraded: collector capture without BPF" in ready, ready
    finally:
        agent.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_an_unprivileged_collector_falls_back_to_polling(tls_server, pki):
    """No CAP_BPF: the collector stage alone, as nobody, degrades by itself."""
    needs_root_and_bpf()
    base = Path(tempfile.mkdtemp(prefix="toktra-test-"))
    os.chmod(base, 0o755)
    run_dir = base / "run"
    run_dir.mkdir()
    os.chown(run_dir, NOBODY.pw_uid, NOBODY.pw_gid)
    config = base / "agent.conf"
    config.write_text(
        f"ports = [{tls_server.port}]\n"
        f'run_dir = "{run_dir}"\n'
        f'state_dir = "{base / "state"}"\n'
        "poll_interval_seconds = 0.2\n"
        f"progress_interval_seconds = {PROGRESS_S}\n"
    )
    notify = NotifySocket(base / "notify.sock")
    os.chmod(notify.path, 0o777)
    stage = subprocess.Popen(
        [
            "setpriv",
            f"--reuid={NOBODY.pw_uid}",
            f"--regid={NOBODY.pw_gid}",
            "--clear-groups",
            "--inh-caps=-all",
            *AGENT,
            "stage",
            "collector",
            "--config",
            str(config),
        ],
        env={**os.environ, "NOTIFY_SOCKET": str(notify.path)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ready = notify.wait_for("READY=1", 30)
        assert "STATUS=degraded: capture without BPF" in ready, ready
        _, _, seen = held_through_tap(config, tls_server.port, pki, 4)
        msg = seen[-1]
        # The request and at least three of the four rounds (the last may
        # go out after the last poll that found the connection open).
        assert msg["bytes_sent"] > 500 + 3 * 2000 and msg["sni"] is None
    finally:
        stage.terminate()
        _, err = stage.communicate(timeout=30)
        notify.close()
        shutil.rmtree(base, ignore_errors=True)
    assert "lacks CAP_BPF" in err and "DEGRADED capture" in err, err
    assert "Traceback" not in err, err
