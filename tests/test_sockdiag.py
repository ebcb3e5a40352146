"""sock_diag against real loopback sockets, and its parser against bad input.

The kernel's own answers are checked against what each client socket says
about itself (TCP_INFO, fstat); the parser is fed hand-made and broken
datagrams, and the port filter is run through a model of the kernel's
bytecode check and interpreter as well as through the kernel itself.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import select
import signal
import socket
import struct
import subprocess
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.collector import sockdiag
from agent.collector.sockdiag import SockDiagError, TcpState
from agent.collector.stage import Collector
from agent.config import Config

TIMEOUT_S = 10
NOBODY = 65534
CHILD = """
import os, socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
print(s.getsockname()[1], os.fstat(s.fileno()).st_ino, flush=True)
sys.stdin.read()  # hold the connection until the test closes stdin
"""


def tcp_info_bytes(sock: socket.socket) -> tuple[int, int]:
    """The socket's own tcpi_bytes_acked and tcpi_bytes_received."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    return struct.unpack_from("=QQ", info, 120)


def listener(backlog: int = 64) -> socket.socket:
    """A dual-stack listener on loopback's v4 and v6 addresses."""
    sock = socket.create_server(
        ("::", 0), family=socket.AF_INET6, dualstack_ipv6=True, backlog=backlog
    )
    sock.settimeout(TIMEOUT_S)
    return sock


def connect(host: str, server: socket.socket) -> tuple[socket.socket, socket.socket]:
    """A client connected to `server`, and the server's end of it."""
    client = socket.create_connection((host, server.getsockname()[1]), TIMEOUT_S)
    peer, _ = server.accept()
    peer.settimeout(TIMEOUT_S)
    return client, peer


def connect_only(host: str, server: socket.socket) -> socket.socket:
    """A client left in the server's accept queue: established all the same."""
    return socket.create_connection((host, server.getsockname()[1]), TIMEOUT_S)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "peer closed early"
        data += chunk
    return data


def exchange(client: socket.socket, peer: socket.socket, up: int, down: int) -> None:
    """Moves `up` bytes client to server and `down` back, both fully read.

    Once the client has read the answer, the server has acknowledged
    everything the client sent, so both counters are at rest.
    """
    client.sendall(b"u" * up)
    recv_exactly(peer, up)
    peer.sendall(b"d" * down)
    recv_exactly(client, down)


# (family, source port, destination port): clients of two families, or to
# two servers, may be given the same source port.
Source = tuple[int, int, int]


def source(sock: socket.socket) -> Source:
    return sock.family, sock.getsockname()[1], sock.getpeername()[1]


def by_source(sockets: list[sockdiag.TcpSocket]) -> dict[Source, sockdiag.TcpSocket]:
    found = {(s.family, s.src_port, s.dst_port): s for s in sockets}
    assert len(found) == len(sockets)
    return found


@contextlib.contextmanager
def child_client(host: str, port: int, user: int | None) -> Iterator[tuple]:
    """Another process holding a connection: yields (process, src_port, inode)."""
    proc = subprocess.Popen(
        ["/usr/bin/python3", "-c", CHILD, host, str(port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        user=user,
    )
    try:
        ready, _, _ = select.select([proc.stdout], [], [], TIMEOUT_S)
        assert ready, "the child did not connect"
        src_port, inode = map(int, proc.stdout.readline().split())
        yield proc, src_port, inode
    finally:
        proc.stdin.close()
        try:
            proc.wait(TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()


@pytest.fixture
def server() -> Iterator[socket.socket]:
    with listener() as sock:
        yield sock


@pytest.fixture
def other_server() -> Iterator[socket.socket]:
    with listener() as sock:
        yield sock


# --- against the kernel -----------------------------------------------------


def test_dump_keeps_watched_port_of_both_families_and_filters_others(
    server, other_server
):
    port, other = server.getsockname()[1], other_server.getsockname()[1]
    with contextlib.ExitStack() as stack:

        def client(host: str, srv: socket.socket) -> Source:
            sock, peer = connect(host, srv)
            stack.enter_context(sock)
            stack.enter_context(peer)
            assert sock.family == (socket.AF_INET6 if ":" in host else socket.AF_INET)
            return source(sock)

        c4 = client("127.0.0.1", server)
        c6 = client("::1", server)
        # A dual-stack socket reaching an IPv4 peer: family 6, IPv4 addresses.
        mapped = client("::ffff:127.0.0.1", server)
        o4 = client("127.0.0.1", other_server)
        o6 = client("::1", other_server)

        seen = by_source(sockdiag.dump([port]))
        # The server's accepted ends have the watched port as source: not kept.
        assert set(seen) == {c4, c6, mapped}
        assert all(
            s.state == TcpState.ESTABLISHED and s.has_counters for s in seen.values()
        )
        addresses = {
            p: (s.family, s.src_ip, s.dst_ip, s.dst_port) for p, s in seen.items()
        }
        assert addresses == {
            c4: (socket.AF_INET, "127.0.0.1", "127.0.0.1", port),
            c6: (socket.AF_INET6, "::1", "::1", port),
            mapped: (socket.AF_INET6, "127.0.0.1", "127.0.0.1", port),
        }
        assert set(by_source(sockdiag.dump([other, port]))) == {
            c4,
            c6,
            mapped,
            o4,
            o6,
        }


def test_byte_counts_equal_the_clients_own_tcp_info(server):
    with contextlib.ExitStack() as stack:
        pairs = [
            tuple(stack.enter_context(s) for s in connect(host, server))
            for host in ("127.0.0.1", "::1")
        ]
        for n, (client, peer) in enumerate(pairs):
            exchange(client, peer, 10_000 + n, 70_001 * (n + 1))
        seen = by_source(sockdiag.dump([server.getsockname()[1]]))
        for n, (client, _) in enumerate(pairs):
            entry = seen[source(client)]
            # At rest: the client's SYN is one byte of the acknowledged count.
            assert (entry.bytes_acked, entry.bytes_received) == tcp_info_bytes(client)
            assert entry.bytes_acked == 10_000 + n + 1
            assert entry.bytes_received == 70_001 * (n + 1)


def test_owner_uid_inode_and_pid(server):
    port = server.getsockname()[1]
    user = NOBODY if os.geteuid() == 0 else None
    with (
        contextlib.ExitStack() as stack,
        child_client("127.0.0.1", port, user) as (child, child_port, child_inode),
    ):
        mine = stack.enter_context(connect_only("::1", server))
        seen = by_source(sockdiag.dump([port]))
        own, theirs = seen[source(mine)], seen[socket.AF_INET, child_port, port]

        assert own.uid == os.getuid()
        assert own.inode == os.fstat(mine.fileno()).st_ino
        assert theirs.uid == (NOBODY if user else os.getuid())
        assert theirs.inode == child_inode

        pids = sockdiag.pids_by_inode([own.inode, theirs.inode])
        assert pids == {own.inode: os.getpid(), theirs.inode: child.pid}


def test_cookies_are_stable_across_dumps_and_distinct_per_socket(server):
    with contextlib.ExitStack() as stack:
        clients = [
            stack.enter_context(connect_only(host, server))
            for host in ["127.0.0.1", "::1"] * 5
        ]
        first = by_source(sockdiag.dump([server.getsockname()[1]]))
        second = by_source(sockdiag.dump([server.getsockname()[1]]))
        ports = [source(c) for c in clients]
        cookies = [first[p].cookie for p in ports]
        assert cookies == [second[p].cookie for p in ports]
        assert len(set(cookies)) == len(clients)
        assert all(cookies)


@pytest.mark.parametrize("size", [1, 2, 3, 8, 15, 16])
def test_kernel_runs_the_filter_for_every_number_of_ports(server, size):
    port = server.getsockname()[1]
    rng = random.Random(size)
    with connect_only("127.0.0.1", server) as client:
        src = source(client)
        # The filter sorts its ports: ours is tested first, in the middle, last.
        for below in sorted({0, size // 2, size - 1}):
            others = rng.sample(range(1, port), below)
            others += rng.sample(range(port + 1, 65536), size - 1 - below)
            assert src in by_source(sockdiag.dump([*others, port]))
            if others:
                assert src not in by_source(sockdiag.dump(others))


@pytest.fixture(scope="module")
def thousand() -> Iterator[tuple[int, list[socket.socket]]]:
    """1000 established clients (the kernel completes them without accept)."""
    with listener(backlog=1100) as server, contextlib.ExitStack() as stack:
        clients = [
            stack.enter_context(connect_only(("127.0.0.1", "::1")[n % 2], server))
            for n in range(1000)
        ]
        yield server.getsockname()[1], clients


def test_dump_of_a_thousand_connections(thousand):
    port, clients = thousand
    # Some 370 bytes a socket: the answer spans a dozen datagrams.
    seen = by_source(sockdiag.dump([port]))
    assert set(seen) == {source(c) for c in clients}
    assert all(s.has_counters and s.bytes_acked == 1 for s in seen.values())
    assert len({s.cookie for s in seen.values()}) == len(clients)


def test_dump_survives_signals(thousand):
    """Signals landing all through a dump do not disturb it.

    The kernel builds each part of its answer inside the receive call, so
    that call seldom sleeps; when a signal interrupts it (EINTR), Python
    resumes it. strace shows no EINTR here: this guards the handling, it
    cannot force the case.
    """
    port, clients = thousand
    delivered = []
    old = signal.signal(signal.SIGALRM, lambda *_: delivered.append(1))
    signal.setitimer(signal.ITIMER_REAL, 0.0005, 0.0005)
    try:
        results = [len(sockdiag.dump([port])) for _ in range(20)]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert results == [len(clients)] * 20
    assert delivered


def test_a_request_the_kernel_refuses_raises(monkeypatch, server):
    # An op code the kernel does not know: its check refuses the program.
    monkeypatch.setattr(sockdiag, "port_filter", lambda ports: b"\xff\x04\x04\x00")
    with pytest.raises(SockDiagError, match="Invalid argument") as err:
        sockdiag.dump([server.getsockname()[1]])
    assert err.value.errno == errno.EINVAL


@pytest.mark.parametrize("ports", [[], list(range(1, 18)), [0], [65536], [-1]])
def test_bad_ports_are_refused_before_the_kernel(ports):
    with pytest.raises(ValueError):
        sockdiag.dump(ports)


# --- pids_by_inode on a prepared /proc ----------------------------------------


def fake_proc(root, processes: dict[int, dict[int, str]]) -> None:
    """A /proc with fd links: {pid: {fd: target}}; an empty dict is a kthread."""
    for pid, fds in processes.items():
        fd_dir = root / str(pid) / "fd"
        fd_dir.mkdir(parents=True)
        for fd, target in fds.items():
            os.symlink(target, fd_dir / str(fd))
    (root / "self").symlink_to(str(max(processes)))
    (root / "meminfo").write_text("")


def test_pids_by_inode_finds_owners_and_stops_when_all_are_found(tmp_path, monkeypatch):
    fake_proc(
        tmp_path,
        {
            2: {},  # a kernel thread: no descriptors
            10: {0: "/dev/null", 3: "socket:[111]", 4: "pipe:[5]"},
            20: {3: "socket:[222]", 5: "socket:[111]"},  # 111 inherited too
            30: {1: "anon_inode:[eventfd]", 7: "socket:[333]"},
        },
    )
    (tmp_path / "40").mkdir()  # exited between listing and reading: no fd dir
    opened = []
    real_open = os.open
    monkeypatch.setattr(
        os,
        "open",
        lambda path, *a, **k: opened.append(path) or real_open(path, *a, **k),
    )

    assert sockdiag.pids_by_inode([222, 333], str(tmp_path)) == {222: 20, 333: 30}
    # Newest first, and done once both were found: 10 and 2 never read.
    assert [os.path.basename(os.path.dirname(p)) for p in opened] == ["40", "30", "20"]

    opened.clear()
    found = sockdiag.pids_by_inode([111, 999, 0], str(tmp_path))
    assert found == {111: 20}  # the first holder seen; 999 has none
    assert len(opened) == 5  # every process read when one inode stays missing
    assert sockdiag.pids_by_inode([], str(tmp_path)) == {}
    assert sockdiag.pids_by_inode([0], str(tmp_path)) == {}


# --- the port filter's bytecode -----------------------------------------------

OP = struct.Struct("=BBH")
NOP, JMP, D_GE, D_LE, D_EQ = 0, 1, 4, 5, 12


def kernel_audit(code: bytes) -> bool:
    """The kernel's check of a filter program, for the ops used here."""

    def valid_cc(length: int, cc: int) -> bool:
        at = 0
        while length >= 0:
            if cc > length:
                return False
            if cc == length:
                return True
            _, yes, _ = OP.unpack_from(code, at)
            if yes < 4 or yes & 3:
                return False
            length -= yes
            at += yes
        return False

    at, length = 0, len(code)
    while length > 0:
        if length < OP.size:
            return False
        op, yes, no = OP.unpack_from(code, at)
        min_len = OP.size
        if op in (D_GE, D_LE, D_EQ):
            min_len += OP.size
            if length < min_len:
                return False
        elif op not in (NOP, JMP):
            return False
        if op != NOP:
            if no < min_len or no > length + 4 or no & 3:
                return False
            if no < length and not valid_cc(len(code), length - no):
                return False
        if yes < min_len or yes > length + 4 or yes & 3:
            return False
        at += yes
        length -= yes
    return length == 0


def kernel_run(code: bytes, dport: int) -> bool:
    """The kernel's interpreter: does the socket pass the filter?"""
    at, length = 0, len(code)
    while length > 0:
        op, yes, no = OP.unpack_from(code, at)
        if op == JMP:
            taken = False
        elif op == D_EQ:
            taken = dport == OP.unpack_from(code, at + 4)[2]
        else:
            raise AssertionError(f"unexpected op {op}")
        step = yes if taken else no
        at += step
        length -= step
    return length == 0


@given(st.sets(st.integers(1, 65535), min_size=1, max_size=16), st.integers(1, 65535))
def test_filter_passes_the_kernels_check_and_keeps_exactly_its_ports(ports, probe):
    code = sockdiag.port_filter(sorted(ports))
    assert kernel_audit(code)
    assert len(code) == 12 * len(ports) - 4
    for port in ports:
        assert kernel_run(code, port)
    assert kernel_run(code, probe) == (probe in ports)


def test_filter_ignores_duplicates_and_order():
    assert sockdiag.port_filter([443, 8443, 443]) == sockdiag.port_filter([8443, 443])


def test_request_layout():
    data = sockdiag.request(socket.AF_INET6, 0b10, [443], seq=7)
    length, kind, flags, seq, portid = struct.unpack_from("=IHHII", data)
    assert (length, kind, seq, portid) == (len(data), 20, 7, 0)
    assert flags == 0x301  # request, dump
    family, proto, ext, _, states = struct.unpack_from("=BBBBI", data, 16)
    assert (family, proto, ext, states) == (socket.AF_INET6, 6, 0b10, 0b10)
    assert data[24:72] == bytes(48)  # no socket id: the bytecode filters
    attr_len, attr_type = struct.unpack_from("=HH", data, 72)
    assert (attr_len, attr_type) == (4 + 8, 1)
    assert data[76:] == sockdiag.port_filter([443])


# --- the parser, fed bytes ----------------------------------------------------

SEQ = 5


def nlmsg(kind: int, payload: bytes, seq: int = SEQ, flags: int = 2) -> bytes:
    data = struct.pack("=IHHII", 16 + len(payload), kind, flags, seq, 4242) + payload
    return data + bytes(-len(data) % 4)


def attr(kind: int, payload: bytes) -> bytes:
    data = struct.pack("=HH", 4 + len(payload), kind) + payload
    return data + bytes(-len(data) % 4)


def tcp_info(acked: int, received: int, size: int = 232) -> bytes:
    info = bytearray(max(size, 136))
    struct.pack_into("=QQ", info, 120, acked, received)
    return bytes(info[:size])


def diag_msg(
    family: int = socket.AF_INET6,
    src: str = "::ffff:10.0.0.1",
    dst: str = "::ffff:192.0.2.7",
    sport: int = 40000,
    dport: int = 443,
    cookie: int = 0x1_0000_0002,
    uid: int = 1000,
    inode: int = 777,
    attrs: bytes = attr(2, tcp_info(1843, 52311)),
) -> bytes:
    def raw(addr: str) -> bytes:
        return socket.inet_pton(family, addr).ljust(16, b"\0")

    head = struct.pack("=BBBB", family, 1, 0, 0) + struct.pack(">HH", sport, dport)
    tail = struct.pack("=III", 0, cookie & 0xFFFFFFFF, cookie >> 32)
    tail += struct.pack("=IIIII", 0, 0, 0, uid, inode)
    return head + raw(src) + raw(dst) + tail + attrs


DONE = nlmsg(3, struct.pack("=i", 0))


def test_parse_reads_every_field():
    v4 = diag_msg(socket.AF_INET, "10.0.0.2", "203.0.113.9", 1, 65535, 3, 0, 0)
    sockets, done = sockdiag.parse(nlmsg(20, diag_msg()) + nlmsg(20, v4) + DONE, SEQ)
    assert done
    assert sockets[0] == sockdiag.TcpSocket(
        cookie=0x1_0000_0002,
        inode=777,
        uid=1000,
        family=socket.AF_INET6,
        src_ip="10.0.0.1",
        src_port=40000,
        dst_ip="192.0.2.7",
        dst_port=443,
        state=1,
        bytes_acked=1843,
        bytes_received=52311,
        has_counters=True,
    )
    assert (sockets[1].src_ip, sockets[1].dst_ip) == ("10.0.0.2", "203.0.113.9")
    assert (sockets[1].src_port, sockets[1].dst_port) == (1, 65535)


def test_parse_follows_a_dump_over_several_datagrams():
    first, done = sockdiag.parse(nlmsg(20, diag_msg()) * 3, SEQ)
    assert (len(first), done) == (3, False)
    last, done = sockdiag.parse(nlmsg(20, diag_msg()) + DONE, SEQ)
    assert (len(last), done) == (1, True)
    assert sockdiag.parse(DONE, SEQ) == ([], True)


def test_parse_skips_other_sequence_numbers_and_acknowledgements():
    data = nlmsg(20, diag_msg(), seq=SEQ - 1) + nlmsg(
        2, struct.pack("=i", 0) + bytes(16)
    )
    assert sockdiag.parse(data + DONE, SEQ) == ([], True)


def test_parse_without_counters():
    bare, _ = sockdiag.parse(nlmsg(20, diag_msg(attrs=b"")), SEQ)
    old_kernel, _ = sockdiag.parse(
        nlmsg(20, diag_msg(attrs=attr(2, tcp_info(5, 6, size=104)))), SEQ
    )
    for sock in bare + old_kernel:
        assert (sock.has_counters, sock.bytes_acked, sock.bytes_received) == (
            False,
            0,
            0,
        )
    # An unknown attribute, and flag bits in a known one's type, are fine.
    flagged = attr(0x8000 | 2, tcp_info(8, 9)) + attr(42, b"\x01")
    (sock,), _ = sockdiag.parse(
        nlmsg(20, diag_msg(attrs=attr(42, b"x") + flagged)), SEQ
    )
    assert (sock.bytes_acked, sock.bytes_received) == (8, 9)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (nlmsg(2, struct.pack("=i", -errno.EACCES) + bytes(16)), "Permission denied"),
        (nlmsg(3, struct.pack("=i", -errno.ENOMEM)), "Cannot allocate memory"),
        (nlmsg(3, b"\x00\x00"), "truncated netlink message of type 3"),
        (nlmsg(2, b""), "truncated netlink message of type 2"),
        (nlmsg(20, diag_msg())[:10], "truncated netlink header"),
        (nlmsg(20, diag_msg())[:100], "overruns"),
        (struct.pack("=IHHII", 0, 20, 2, SEQ, 0), "0 bytes at byte 0 overruns"),
        (struct.pack("=IHHII", 8, 20, 2, SEQ, 0), "8 bytes"),
        (nlmsg(20, diag_msg()[:71]), "truncated inet_diag_msg: 71 of 72"),
        (nlmsg(20, diag_msg(attrs=b"\x08\x00")), "truncated attribute header"),
        (nlmsg(20, diag_msg(attrs=b"\xf0\x00\x02\x00" + bytes(8))), "overruns its"),
        (nlmsg(20, diag_msg(attrs=b"\x02\x00\x02\x00")), "attribute of 2 bytes"),
        (nlmsg(20, b"\x01" + diag_msg()[1:]), "family 1"),
        (nlmsg(20, diag_msg(), flags=0x12), "interrupted"),
    ],
)
def test_parse_refuses_what_does_not_add_up(data, message):
    with pytest.raises(SockDiagError, match=message):
        sockdiag.parse(data, SEQ)


def test_every_cut_of_an_answer_parses_or_raises_sockdiagerror():
    data = nlmsg(20, diag_msg()) + nlmsg(
        20, diag_msg(socket.AF_INET, "1.2.3.4", "5.6.7.8")
    )
    for cut in range(len(data) + 1):
        with contextlib.suppress(SockDiagError):
            sockdiag.parse(data[:cut] + DONE, SEQ)


@given(st.binary(max_size=400))
def test_random_bytes_never_raise_anything_else(data):
    with contextlib.suppress(SockDiagError):
        sockdiag.parse(data, SEQ)
    with contextlib.suppress(SockDiagError):
        sockdiag.parse(nlmsg(20, data), SEQ)


def test_datagrams_not_from_the_kernel_are_ignored(server):
    """Only the kernel's answer counts, not a datagram another process sent.

    Sending to another netlink socket needs CAP_NET_ADMIN: skipped without.
    """
    port = server.getsockname()[1]
    diag = (socket.AF_NETLINK, socket.SOCK_RAW, sockdiag.NETLINK_SOCK_DIAG)
    with (
        connect_only("127.0.0.1", server) as client,
        socket.socket(*diag) as sock,
        socket.socket(*diag) as impostor,
    ):
        sock.bind((0, 0))
        sock.settimeout(TIMEOUT_S)
        # A forged, empty end of dump, queued before the kernel's answer.
        try:
            impostor.sendto(nlmsg(3, struct.pack("=i", 0), seq=1), sock.getsockname())
        except PermissionError:
            pytest.skip("needs CAP_NET_ADMIN to send to a netlink socket")
        found = sockdiag._dump_family(
            sock, socket.AF_INET, sockdiag.ESTABLISHED_ONLY, [port], seq=1
        )
        assert [s.src_port for s in found] == [client.getsockname()[1]]


# -- other network namespaces (containers) --

# Inside a namespace: listen on a port, connect to it from a fixed source
# port, print the pid, and hold the connection until stdin closes.
PAIR = """
import os, socket, sys
port, source = int(sys.argv[1]), int(sys.argv[2])
srv = socket.create_server(("127.0.0.1", port))
cli = socket.socket()
cli.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
cli.bind(("127.0.0.1", source))
cli.connect(("127.0.0.1", port))
peer, _ = srv.accept()
cli.sendall(b"x" * 1000)
peer.recv(65536)
print(os.getpid(), flush=True)
sys.stdin.read()
"""


@contextlib.contextmanager
def held_in_namespace(port: int, source: int) -> Iterator[tuple[str, int]]:
    """A namespace of the test's own holding one connection; removed after."""
    name = f"toktra-sd-{random.randrange(16**8):08x}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    proc = None
    try:
        inside = ["ip", "netns", "exec", name]
        subprocess.run([*inside, "ip", "link", "set", "lo", "up"], check=True)
        proc = subprocess.Popen(
            [*inside, "python3", "-c", PAIR, str(port), str(source)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        pid = int(proc.stdout.readline())
        yield f"/run/netns/{name}", pid
    finally:
        if proc is not None:
            proc.stdin.close()
            proc.wait(10)
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_dump_all_reads_each_network_namespace_a_process_is_in():
    port, source = 45601, 45602
    with held_in_namespace(port, source) as (path, _pid):
        inode = os.stat(path).st_ino
        found = sockdiag.namespaces()
        assert inode in found  # by whichever of its processes came first
        assert os.stat(found[inode]).st_ino == inode
        assert os.stat("/proc/self/ns/net").st_ino not in found
        ours = [s for s in sockdiag.dump([port]) if s.src_port == source]
        assert ours == [], "our own namespace has no such socket"
        dumped = sockdiag.dump_all([port])
        theirs = [s for s in dumped.sockets if s.src_port == source]
        assert len(theirs) == 1 and theirs[0].bytes_acked >= 1000
        assert dumped.namespaces >= 2 and dumped.failed == {}
        # Entering by the namespace's own path works the same way.
        direct = sockdiag.dump([port], netns=path)
        assert [s.cookie for s in direct if s.src_port == source] == [theirs[0].cookie]
    assert inode not in sockdiag.namespaces()  # gone with its last process


def test_a_namespace_that_cannot_be_entered_is_an_error_not_a_crash(tmp_path):
    before = os.stat("/proc/thread-self/ns/net").st_ino
    not_a_namespace = tmp_path / "plain-file"
    not_a_namespace.write_text("")
    with pytest.raises(SockDiagError, match="setns into"):
        sockdiag.dump([443], netns=str(not_a_namespace))
    with pytest.raises(SockDiagError, match="No such file"):
        sockdiag.dump([443], netns=str(tmp_path / "missing"))
    # Only the short-lived thread ever tried to move.
    assert os.stat("/proc/thread-self/ns/net").st_ino == before


def test_the_same_endpoints_in_two_namespaces_get_no_progress_counts():
    """Which one a kernel record means is unknown: neither is reported."""
    port, source = 45611, 45612
    collector = Collector(Config(ports=(port,)))
    with held_in_namespace(port, source), held_in_namespace(port, source):
        sockets = collector.dump(sockdiag.ESTABLISHED_ONLY)
        assert sockets is not None
        assert len([s for s in sockets if s.src_port == source]) == 2
        counts = collector.open_counts()
    assert counts is not None
    assert ("127.0.0.1", source, "127.0.0.1", port) not in counts
