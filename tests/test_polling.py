"""The degraded capture: real loopback connections polled through sock_diag.

The poller's clock is the argument to `poll`, so these tests step it past
the progress interval instead of sleeping; only the kernel's own state
changes (a close reaching the peer) are waited for. Every message is
checked against the wire schema the classifier applies.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import select
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

from agent import wire
from agent.collector import sockdiag
from agent.collector.polling import WATCHED_STATES, Poller
from agent.collector.sockdiag import SockDiagError, TcpSocket, TcpState

TIMEOUT_S = 10
INTERVAL_NS = 10 * 1_000_000_000
BOOT = "5b1e1d3c-0f4e-4a53-9c0e-6f1d2b3a4c5d"
NOBODY = 65534
COMM = "toktra-pollcli"  # 14 characters: the kernel keeps up to 15

# A client in its own process: it connects, then on each command sends,
# reads the answer and prints its own TCP_INFO byte counters, or closes.
CHILD = f"""
import ctypes, socket, struct, sys
ctypes.CDLL(None).prctl(15, b"{COMM}", 0, 0, 0)  # PR_SET_NAME
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
print(s.getsockname()[1], flush=True)
for line in sys.stdin:
    cmd, *args = line.split()
    if cmd == "close":
        s.close()
        print("closed", flush=True)
        continue
    up, down = map(int, args)
    s.sendall(b"u" * up)
    got = 0
    while got < down:
        chunk = s.recv(down - got)
        if not chunk:
            sys.exit("server closed early")
        got += len(chunk)
    info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    print(*struct.unpack_from("=QQ", info, 120), flush=True)
"""


class Child:
    """The client process, driven line by line over its stdin and stdout."""

    def __init__(self, host: str, server: socket.socket, user: int | None) -> None:
        self.proc = subprocess.Popen(
            ["/usr/bin/python3", "-c", CHILD, host, str(server.getsockname()[1])],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            user=user,
        )
        self.src_port = int(self._line())
        self.peer, _ = server.accept()
        self.peer.settimeout(TIMEOUT_S)

    def _line(self) -> str:
        ready, _, _ = select.select([self.proc.stdout], [], [], TIMEOUT_S)
        assert ready, "the client did not answer"
        line = self.proc.stdout.readline()
        assert line, "the client exited"
        return line.strip()

    def exchange(self, up: int, down: int) -> tuple[int, int]:
        """Client sends `up`, server answers `down`: the client's counters after."""
        self.proc.stdin.write(f"send {up} {down}\n")
        self.proc.stdin.flush()
        got = 0
        while got < up:
            chunk = self.peer.recv(up - got)
            assert chunk, "the client closed early"
            got += len(chunk)
        self.peer.sendall(b"d" * down)
        acked, received = map(int, self._line().split())
        return acked, received

    def close(self) -> None:
        self.proc.stdin.write("close\n")
        self.proc.stdin.flush()
        assert self._line() == "closed"

    def stop(self) -> None:
        self.peer.close()
        self.proc.stdin.close()
        try:
            self.proc.wait(TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()


@pytest.fixture
def server() -> Iterator[socket.socket]:
    with socket.create_server(
        ("::", 0), family=socket.AF_INET6, dualstack_ipv6=True
    ) as sock:
        sock.settimeout(TIMEOUT_S)
        yield sock


@contextlib.contextmanager
def child(host: str, server: socket.socket) -> Iterator[Child]:
    c = Child(host, server, NOBODY if os.geteuid() == 0 else None)
    try:
        yield c
    finally:
        c.stop()


def wait_counters_gone(port: int, src_port: int) -> None:
    """Until the kernel keeps no counters for the client's socket: the close
    has been acknowledged and the socket is released or a TIME_WAIT remnant."""
    deadline = time.monotonic() + TIMEOUT_S
    while any(
        s.src_port == src_port and s.has_counters
        for s in sockdiag.dump([port], WATCHED_STATES)
    ):
        assert time.monotonic() < deadline, "the client's socket did not close"
        time.sleep(0.01)


def checked(messages: list[dict]) -> list[dict]:
    for msg in messages:
        wire.encode("connection", msg)
    return messages


def cookie_of(port: int, src_port: int) -> int:
    (sock,) = [s for s in sockdiag.dump([port]) if s.src_port == src_port]
    return sock.cookie


# --- real connections ---------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_progress_then_final_for_a_child_process_client(server, host):
    port = server.getsockname()[1]
    poller = Poller([port], BOOT, INTERVAL_NS)
    t0 = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
    with child(host, server) as client:
        client.exchange(1000, 2000)
        conn_id = hashlib.blake2b(
            f"{BOOT}:{cookie_of(port, client.src_port):x}".encode(), digest_size=12
        ).hexdigest()

        # First sight: tracked, nothing to say yet.
        poller.poll(t0)
        assert poller.take() == []
        assert poller.stats.tracked == 1

        # Not before the interval has passed; then cumulative counts.
        first = client.exchange(3000, 5000)
        poller.poll(t0 + INTERVAL_NS - 1)
        assert poller.take() == []
        poller.poll(t0 + INTERVAL_NS)
        (progress,) = checked(poller.take())

        second = client.exchange(7000, 11000)
        poller.poll(t0 + 2 * INTERVAL_NS)
        (later,) = checked(poller.take())

        # The last send: seen by a poll between progress reports, then closed.
        last = client.exchange(13, 17)
        poller.poll(t0 + 2 * INTERVAL_NS + 1)
        assert poller.take() == []
        client.close()
        wait_counters_gone(port, client.src_port)
        poller.poll(t0 + 3 * INTERVAL_NS)
        (final,) = checked(poller.take())
        pid = client.proc.pid

    # The client's SYN is one byte of what the server acknowledged.
    assert first == (1 + 1000 + 3000, 2000 + 5000)
    assert (progress["bytes_sent"], progress["bytes_received"]) == first
    assert (later["bytes_sent"], later["bytes_received"]) == second
    assert second > first
    # Exactly the counters at the last send: the FIN the client sent after
    # the last poll that saw its socket is not counted in this mode.
    assert (final["bytes_sent"], final["bytes_received"]) == last

    assert [m["final"] for m in (progress, later, final)] == [False, False, True]
    assert [m["duration_ns"] for m in (progress, later, final)] == [
        INTERVAL_NS,
        2 * INTERVAL_NS,
        3 * INTERVAL_NS,
    ]
    for msg in (progress, later, final):
        assert msg["conn_id"] == conn_id
        assert abs(msg["timestamp"] - time.time_ns()) < 60 * 1_000_000_000
        assert (msg["pid"], msg["tid"], msg["comm"]) == (pid, pid, COMM)
        assert msg["exe"] == os.path.realpath("/usr/bin/python3")
        assert msg["uid"] == (NOBODY if os.geteuid() == 0 else os.getuid())
        assert (msg["src_port"], msg["dst_ip"], msg["dst_port"]) == (
            client.src_port,
            host,
            port,
        )
        assert (msg["sni"], msg["sni_truncated"], msg["sni_source"]) == (
            None,
            False,
            None,
        )
    assert progress["timestamp"] == later["timestamp"] == final["timestamp"]
    assert poller.stats.tracked == 0
    assert (poller.stats.polls, poller.stats.errors, poller.stats.evicted) == (6, 0, 0)


def test_a_connection_closed_by_the_server_is_followed_until_it_is_gone(server):
    port = server.getsockname()[1]
    poller = Poller([port], BOOT, INTERVAL_NS)
    t0 = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
    with child("127.0.0.1", server) as client:
        client.exchange(100, 200)
        poller.poll(t0)
        # The server closes first: the client's socket waits in CLOSE_WAIT,
        # counters and all, with the server's FIN as one byte received.
        client.peer.close()
        deadline = time.monotonic() + TIMEOUT_S
        while not any(
            s.state == TcpState.CLOSE_WAIT
            for s in sockdiag.dump([port], WATCHED_STATES)
        ):
            assert time.monotonic() < deadline, "no CLOSE_WAIT"
            time.sleep(0.01)
        poller.poll(t0 + INTERVAL_NS)
        (progress,) = checked(poller.take())
        assert (progress["bytes_sent"], progress["bytes_received"]) == (101, 201)

        client.close()
        wait_counters_gone(port, client.src_port)
        poller.poll(t0 + INTERVAL_NS + 1)
        (final,) = checked(poller.take())
    assert final["final"]
    assert (final["bytes_sent"], final["bytes_received"]) == (101, 201)


def test_connections_to_other_ports_are_not_reported(server):
    with socket.create_server(("127.0.0.1", 0)) as other:
        poller = Poller([other.getsockname()[1]], BOOT, INTERVAL_NS)
        with child("127.0.0.1", server):
            poller.poll(0)
            poller.poll(INTERVAL_NS)
        poller.poll(2 * INTERVAL_NS)
    assert poller.take() == []
    assert poller.stats.tracked == 0


# --- the bookkeeping, with a scripted dump ------------------------------------


def tcp(cookie: int, sent: int = 1, received: int = 0, **kw) -> TcpSocket:
    fields = {
        "cookie": cookie,
        "inode": 0,
        "uid": 1000,
        "family": socket.AF_INET,
        "src_ip": "10.0.0.1",
        "src_port": 40000 + cookie,
        "dst_ip": "192.0.2.7",
        "dst_port": 443,
        "state": TcpState.ESTABLISHED,
        "bytes_acked": sent,
        "bytes_received": received,
        "has_counters": True,
    }
    fields.update(kw)
    return TcpSocket(**fields)


class ScriptedDump:
    """Stands in for sockdiag.dump: returns what the test set, or fails."""

    def __init__(self) -> None:
        self.sockets: list[TcpSocket] | SockDiagError = []
        self.calls: list[tuple[list[int], int]] = []

    def __call__(self, ports, states) -> list[TcpSocket]:
        self.calls.append((list(ports), states))
        if isinstance(self.sockets, SockDiagError):
            raise self.sockets
        return list(self.sockets)


@pytest.fixture
def scripted(tmp_path) -> tuple[Poller, ScriptedDump]:
    dump = ScriptedDump()
    poller = Poller(
        [443],
        BOOT,
        INTERVAL_NS,
        max_tracked=3,
        proc_root=str(tmp_path),
        dump=dump,
        offset_ns=lambda: 1_700_000_000_000_000_000,
    )
    return poller, dump


def test_a_failed_dump_changes_nothing(scripted):
    poller, dump = scripted
    dump.sockets = [tcp(1), tcp(2)]
    poller.poll(0)
    dump.sockets = SockDiagError("no answer")
    poller.poll(INTERVAL_NS)
    poller.poll(2 * INTERVAL_NS)
    # No finals invented for connections the failed dumps could not show.
    assert poller.take() == []
    assert (poller.stats.polls, poller.stats.errors, poller.stats.tracked) == (3, 2, 2)
    dump.sockets = [tcp(1, sent=50)]
    poller.poll(3 * INTERVAL_NS)
    messages = checked(poller.take())
    assert [(m["src_port"], m["final"]) for m in messages] == [
        (40002, True),
        (40001, False),
    ]
    assert messages[1]["bytes_sent"] == 50
    assert dump.calls[0] == ([443], WATCHED_STATES)


def test_a_remnant_without_counters_is_gone_and_never_new(scripted):
    poller, dump = scripted
    dump.sockets = [tcp(1, sent=9, received=4)]
    poller.poll(0)
    remnant = tcp(1, 0, 0, uid=0, state=TcpState.FIN_WAIT2, has_counters=False)
    dump.sockets = [remnant, tcp(2, 0, 0, state=TcpState.TIME_WAIT, has_counters=False)]
    poller.poll(1)
    (final,) = checked(poller.take())
    assert final["final"]
    assert (final["bytes_sent"], final["bytes_received"], final["uid"]) == (9, 4, 1000)
    assert final["duration_ns"] == 1
    assert final["timestamp"] == 1_700_000_000_000_000_000
    assert poller.stats.tracked == 0
    poller.poll(INTERVAL_NS * 2)
    assert poller.take() == []


def test_each_connection_reports_once_per_interval_and_one_final(scripted):
    poller, dump = scripted
    dump.sockets = [tcp(1)]
    poller.poll(0)
    dump.sockets = [tcp(1), tcp(2)]
    poller.poll(INTERVAL_NS // 2)
    for n in range(1, 4):
        poller.poll(n * INTERVAL_NS)
    poller.poll(3 * INTERVAL_NS + INTERVAL_NS // 2)
    dump.sockets = []
    poller.poll(4 * INTERVAL_NS)
    poller.poll(5 * INTERVAL_NS)
    messages = checked(poller.take())
    reports = [(m["src_port"], m["final"], m["duration_ns"]) for m in messages]
    half = INTERVAL_NS // 2
    assert reports == [
        (40001, False, INTERVAL_NS),
        (40001, False, 2 * INTERVAL_NS),
        (40002, False, 2 * INTERVAL_NS - half),
        (40001, False, 3 * INTERVAL_NS),
        (40002, False, 3 * INTERVAL_NS - half),
        (40001, True, 4 * INTERVAL_NS),
        (40002, True, 4 * INTERVAL_NS - half),
    ]
    assert len({m["conn_id"] for m in messages}) == 2
    assert poller.take() == []


def test_the_table_is_bounded_and_evicts_the_oldest(scripted):
    poller, dump = scripted
    dump.sockets = [tcp(1), tcp(2), tcp(3)]
    poller.poll(0)
    dump.sockets = [tcp(1), tcp(2), tcp(3), tcp(4)]
    poller.poll(1)
    assert (poller.stats.tracked, poller.stats.evicted) == (3, 1)
    dump.sockets = [tcp(2), tcp(3), tcp(4)]  # the evicted one closes
    poller.poll(2)
    assert poller.take() == []  # it was no longer followed: no final
    assert (poller.stats.tracked, poller.stats.evicted) == (3, 1)


def test_the_owner_is_resolved_once_for_new_sockets(tmp_path, monkeypatch):
    proc = tmp_path / "4242"
    (proc / "fd").mkdir(parents=True)
    os.symlink("socket:[77]", proc / "fd" / "3")
    os.symlink("/opt/tool/bin/agentcli (deleted)", proc / "exe")
    (proc / "comm").write_bytes(b"agent\xffcli\n")  # a name is any bytes
    asked = []
    real = sockdiag.pids_by_inode
    monkeypatch.setattr(
        sockdiag,
        "pids_by_inode",
        lambda inodes, root: asked.append(set(inodes)) or real(inodes, root),
    )
    dump = ScriptedDump()
    poller = Poller([443], BOOT, INTERVAL_NS, proc_root=str(tmp_path), dump=dump)

    dump.sockets = [tcp(1, inode=77), tcp(2, inode=0), tcp(3, inode=88)]
    poller.poll(0)
    dump.sockets = [*dump.sockets, tcp(4, inode=99)]
    poller.poll(INTERVAL_NS)
    owners = {
        m["src_port"]: (m["pid"], m["tid"], m["comm"], m["exe"]) for m in poller.take()
    }
    assert asked == [{77, 88}, {99}]  # 0: held by no process
    assert owners == {
        40001: (4242, 4242, "agent\ufffdcli", "/opt/tool/bin/agentcli"),
        40002: (0, 0, "", None),  # no process holds it
        40003: (0, 0, "", None),  # held by none that /proc shows
    }


@pytest.mark.parametrize(
    "kwargs",
    [
        {"ports": []},
        {"ports": [70000]},
        {"progress_interval_ns": 0},
        {"max_tracked": 0},
    ],
)
def test_bad_settings_fail_at_construction(kwargs):
    settings = {"ports": [443], "boot_id": BOOT, "progress_interval_ns": 1} | kwargs
    with pytest.raises(ValueError):
        Poller(**settings)
