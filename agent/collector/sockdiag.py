"""TCP sockets to watched ports, read from the kernel over netlink sock_diag.

In: the destination ports to watch and the TCP states wanted. Out: one
`TcpSocket` per matching socket, with its cookie, owner (uid, inode) and
the kernel's byte counters (`tcp_info`), and a /proc scan that maps socket
inodes to the processes holding them.

This speaks netlink with `struct` rather than through pyroute2, because
what this module needs is exactly what pyroute2's sock_diag support does
not give, in both the Debian 12 package (0.7.2) and PyPI (0.9):
- its request has no attributes, so the port filter bytecode would have to
  be built by hand anyway and passed through a subclass of its internals;
- its DiagSocket hands an NLMSG_ERROR back as if it were a socket, so a
  request the kernel refused reads as an odd dump instead of an error;
- on a truncated answer 0.7.2 raises struct.error and 0.9 drops the
  message silently, and both accept an attribute that runs past its message;
- the rest is one fixed header, a 56-byte request and a 72-byte answer.

A netlink socket sees only the network namespace it was made in, so
`dump_all` makes one in each namespace some process is in (containers with
their own network), from a short-lived thread that enters it.
"""

from __future__ import annotations

import collections
import ctypes
import enum
import errno
import ipaddress
import os
import socket
import struct
import threading
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from agent.runtime import libc

MAX_PORTS = 16
RECV_BUFFER = 64 * 1024  # the kernel fills each dump datagram to 32 KiB at most
TIMEOUT_S = 5.0

NETLINK_SOCK_DIAG = 4
CLONE_NEWNET = 0x40000000
SOCK_DIAG_BY_FAMILY = 20
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_DUMP_INTR = 0x10
NLM_F_DUMP = 0x300  # NLM_F_ROOT | NLM_F_MATCH
NLA_TYPE_MASK = 0x3FFF  # the top two bits of an attribute's type are flags

INET_DIAG_REQ_BYTECODE = 1
INET_DIAG_INFO = 2
INET_DIAG_BC_JMP = 1
INET_DIAG_BC_D_EQ = 12

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, portid
_NLATTR = struct.Struct("=HH")  # len, type
_ERRNO = struct.Struct("=i")
# inet_diag_req_v2 up to its socket id, which stays zero: the bytecode filters.
_REQ = struct.Struct("=BBBBI48x")
# inet_diag_msg: ports are big-endian, the cookie two native u32 (low first).
_MSG = struct.Struct("=BBBB2s2s16s16sIIIIIIII")
_Msg = collections.namedtuple(
    "_Msg",
    "family state timer retrans sport dport src dst ifindex cookie_lo cookie_hi "
    "expires rqueue wqueue uid inode",
)
_PORT = struct.Struct(">H")
_BC_OP = struct.Struct("=BBH")  # code, yes, no
# struct tcp_info: tcpi_bytes_acked and tcpi_bytes_received (Linux 4.2+).
_TCPI_BYTES = struct.Struct("=QQ")
_TCPI_BYTES_OFFSET = 120


class TcpState(enum.IntEnum):
    """The kernel's TCP states (include/net/tcp_states.h)."""

    ESTABLISHED = 1
    SYN_SENT = 2
    SYN_RECV = 3
    FIN_WAIT1 = 4
    FIN_WAIT2 = 5
    TIME_WAIT = 6
    CLOSE = 7
    CLOSE_WAIT = 8
    LAST_ACK = 9
    LISTEN = 10
    CLOSING = 11


def state_mask(*states: TcpState) -> int:
    return sum(1 << state for state in set(states))


ESTABLISHED_ONLY = state_mask(TcpState.ESTABLISHED)


class SockDiagError(Exception):
    """The kernel refused the dump, or answered something unreadable."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.errno = code


@dataclass(frozen=True, slots=True)
class TcpSocket:
    cookie: int  # the kernel's 64-bit socket cookie, unique per boot
    inode: int  # 0 once no process holds the socket (closed, orphaned)
    uid: int
    family: int  # AF_INET or AF_INET6
    src_ip: str
    src_port: int
    dst_ip: str  # an IPv4-mapped IPv6 peer shows as plain IPv4
    dst_port: int
    state: int  # a TcpState number
    bytes_acked: int
    bytes_received: int
    # False for the remains of a closed connection (TIME_WAIT, and FIN_WAIT2
    # once the owner closed): the kernel keeps no tcp_info for those, so
    # their byte counts, uid and inode all read 0.
    has_counters: bool


def port_filter(ports: Sequence[int]) -> bytes:
    """Bytecode that keeps a socket whose destination port is one of `ports`.

    The kernel runs it per socket: an op moves `yes` bytes on when its test
    holds and `no` bytes otherwise; ending exactly at the end keeps the
    socket, ending past it drops it. Each port's test falls through to a
    jump to the end, or skips that jump to try the next port; the last
    port's miss lands past the end. The kernel's check of the program
    follows the `yes` moves, so every op sits on that path.
    """
    unique = sorted(set(ports))
    if not unique or len(unique) > MAX_PORTS:
        raise ValueError(f"watch 1 to {MAX_PORTS} ports, not {len(unique)}")
    bad = [p for p in unique if not 0 < p < 65536]
    if bad:
        raise ValueError(f"not TCP ports: {bad}")
    # Per port: the test (8 bytes: op, then the port in a second op's `no`)
    # and, except after the last, a 4-byte jump.
    size = 12 * len(unique) - 4
    ops = []
    for i, port in enumerate(unique):
        ops.append(_BC_OP.pack(INET_DIAG_BC_D_EQ, 8, 12))
        ops.append(_BC_OP.pack(0, 0, port))
        if i < len(unique) - 1:
            jump_at = 12 * i + 8
            ops.append(_BC_OP.pack(INET_DIAG_BC_JMP, 4, size - jump_at))
    return b"".join(ops)


def request(family: int, states: int, ports: Sequence[int], seq: int) -> bytes:
    """One SOCK_DIAG_BY_FAMILY dump request for TCP, asking for tcp_info."""
    bytecode = port_filter(ports)
    body = _REQ.pack(family, socket.IPPROTO_TCP, 1 << (INET_DIAG_INFO - 1), 0, states)
    attr = _NLATTR.pack(_NLATTR.size + len(bytecode), INET_DIAG_REQ_BYTECODE)
    length = _NLMSGHDR.size + len(body) + len(attr) + len(bytecode)
    header = _NLMSGHDR.pack(
        length, SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq, 0
    )
    return header + body + attr + bytecode


def _align(n: int) -> int:
    return (n + 3) & ~3


def _address(raw: bytes, family: int) -> str:
    if family == socket.AF_INET:
        return str(ipaddress.IPv4Address(raw[:4]))
    addr = ipaddress.IPv6Address(raw)
    return str(addr.ipv4_mapped or addr)


def parse_socket(payload: bytes) -> TcpSocket:
    """One inet_diag_msg and its attributes."""
    if len(payload) < _MSG.size:
        raise SockDiagError(
            f"truncated inet_diag_msg: {len(payload)} of {_MSG.size} bytes"
        )
    msg = _Msg._make(_MSG.unpack_from(payload))
    if msg.family not in (socket.AF_INET, socket.AF_INET6):
        raise SockDiagError(f"inet_diag_msg of address family {msg.family}")
    info = None
    offset = _MSG.size
    while offset < len(payload):
        if len(payload) - offset < _NLATTR.size:
            raise SockDiagError(f"truncated attribute header at byte {offset}")
        length, kind = _NLATTR.unpack_from(payload, offset)
        if length < _NLATTR.size or offset + length > len(payload):
            raise SockDiagError(
                f"attribute of {length} bytes at byte {offset} overruns its "
                f"{len(payload)}-byte message"
            )
        if kind & NLA_TYPE_MASK == INET_DIAG_INFO:
            info = payload[offset + _NLATTR.size : offset + length]
        offset += _align(length)
    has_counters = info is not None and len(info) >= _TCPI_BYTES_OFFSET + 16
    acked, received = (
        _TCPI_BYTES.unpack_from(info, _TCPI_BYTES_OFFSET) if has_counters else (0, 0)
    )
    return TcpSocket(
        cookie=msg.cookie_lo | msg.cookie_hi << 32,
        inode=msg.inode,
        uid=msg.uid,
        family=msg.family,
        src_ip=_address(msg.src, msg.family),
        src_port=_PORT.unpack(msg.sport)[0],
        dst_ip=_address(msg.dst, msg.family),
        dst_port=_PORT.unpack(msg.dport)[0],
        state=msg.state,
        bytes_acked=acked,
        bytes_received=received,
        has_counters=has_counters,
    )


def parse(data: bytes, seq: int) -> tuple[list[TcpSocket], bool]:
    """The sockets in one datagram of a dump's answer, and whether it ended.

    Messages of another sequence number (an earlier request's leftovers)
    are skipped; anything that does not add up raises SockDiagError.
    """
    sockets = []
    offset = 0
    while offset < len(data):
        if len(data) - offset < _NLMSGHDR.size:
            raise SockDiagError(f"truncated netlink header at byte {offset}")
        length, kind, flags, msg_seq, _ = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > len(data):
            raise SockDiagError(
                f"netlink message of {length} bytes at byte {offset} overruns "
                f"its {len(data)}-byte datagram"
            )
        payload = data[offset + _NLMSGHDR.size : offset + length]
        offset += _align(length)
        if msg_seq != seq:
            continue
        if flags & NLM_F_DUMP_INTR:
            # Sockets came and went while the kernel walked its tables: some
            # may be missing, which a caller would take for closed.
            raise SockDiagError("the kernel interrupted the dump; try again")
        if kind in (NLMSG_ERROR, NLMSG_DONE):
            if len(payload) < _ERRNO.size:
                raise SockDiagError(f"truncated netlink message of type {kind}")
            (status,) = _ERRNO.unpack_from(payload)
            if status < 0:
                raise SockDiagError(
                    f"sock_diag dump failed: {os.strerror(-status)}", -status
                )
            if kind == NLMSG_DONE:
                return sockets, True
            continue  # an acknowledgement (error 0)
        if kind == SOCK_DIAG_BY_FAMILY:
            sockets.append(parse_socket(payload))
    return sockets, False


def _dump_family(
    sock: socket.socket, family: int, states: int, ports: Sequence[int], seq: int
) -> list[TcpSocket]:
    sock.sendto(request(family, states, ports, seq), (0, 0))
    sockets = []
    while True:
        # Python retries a receive interrupted by a signal (EINTR) itself.
        data, _, flags, (sender, _) = sock.recvmsg(RECV_BUFFER)
        if flags & socket.MSG_TRUNC:
            raise SockDiagError(f"a dump datagram exceeded {RECV_BUFFER} bytes")
        if sender != 0:
            continue  # from a process (one with CAP_NET_ADMIN), not the kernel
        batch, done = parse(data, seq)
        sockets.extend(batch)
        if done:
            return sockets


def dump(
    ports: Sequence[int],
    states: int = ESTABLISHED_ONLY,
    timeout_s: float = TIMEOUT_S,
    netns: str | None = None,
) -> list[TcpSocket]:
    """TCP sockets of both families whose destination port is in `ports`.

    The kernel applies the port filter, so unwatched sockets never cross
    into user space. `states` is a mask of 1 << TcpState (see state_mask).
    A netlink socket answers for the network namespace it was made in:
    `netns` (a /proc/PID/ns/net path) names another one than ours.
    Raises ValueError for bad ports, SockDiagError for anything else.
    """
    port_filter(ports)  # bad ports are the caller's error, not the kernel's
    try:
        sock = _socket() if netns is None else _socket_in(netns)
    except OSError as e:
        raise SockDiagError(f"cannot open a sock_diag socket: {e}", e.errno) from None
    sockets = []
    with sock:
        sock.settimeout(timeout_s)
        for seq, family in enumerate((socket.AF_INET, socket.AF_INET6), start=1):
            try:
                sockets += _dump_family(sock, family, states, ports, seq)
            except SockDiagError as e:
                if e.errno != errno.ENOENT:
                    raise
                # The modules are not loaded and could not be (a container).
                raise SockDiagError(
                    f"{e}: this kernel has no sock_diag for TCP (inet_diag and "
                    "tcp_diag, built in or as modules)",
                    e.errno,
                ) from None
            except TimeoutError:
                raise SockDiagError(f"no answer to the dump in {timeout_s} s") from None
            except OSError as e:
                raise SockDiagError(f"sock_diag dump failed: {e}", e.errno) from None
    return sockets


def _socket() -> socket.socket:
    return socket.socket(
        socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG
    )


def _socket_in(netns: str) -> socket.socket:
    """A sock_diag socket made inside another network namespace.

    setns() moves only the calling thread, so a thread of its own enters
    the namespace, makes the socket and ends: the rest of the process
    never leaves its namespace, even if something fails halfway.
    """
    made: list[socket.socket | OSError] = []

    def enter() -> None:
        try:
            fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc().setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns into {netns}: {os.strerror(err)}")
            finally:
                os.close(fd)
            made.append(_socket())
        except OSError as e:
            made.append(e)

    thread = threading.Thread(target=enter, name="toktra-netns", daemon=True)
    thread.start()
    thread.join()
    (result,) = made
    if isinstance(result, OSError):
        raise result
    return result


def namespaces(proc_root: str = "/proc") -> dict[int, str]:
    """Network namespaces other than ours that some process is in.

    Maps each namespace's inode to a /proc/PID/ns/net path that enters it.
    Containers with their own network (Docker's default bridge) are found
    this way; sockets in a namespace no process is in are not.
    """
    own = os.stat(os.path.join(proc_root, "self/ns/net")).st_ino
    found: dict[int, str] = {}
    for name in os.listdir(proc_root):
        if not name.isdigit():
            continue
        path = os.path.join(proc_root, name, "ns/net")
        try:
            inode = os.stat(path).st_ino
        except OSError:
            continue  # exited, or a kernel thread without one
        if inode != own and inode not in found:
            found[inode] = path
    return found


@dataclass
class Dumped:
    """Sockets from every namespace, and the other namespaces that failed."""

    sockets: list[TcpSocket]
    namespaces: int  # how many were dumped, ours included
    failed: dict[str, str]  # path -> why


def dump_all(
    ports: Sequence[int], states: int = ESTABLISHED_ONLY, proc_root: str = "/proc"
) -> Dumped:
    """`dump` in our namespace, then in each other one a process is in.

    A failure in our own namespace raises; one in another (its last
    process exited meanwhile, or setns is not allowed) is reported in
    `failed` and the others go on.
    """
    out = Dumped(dump(ports, states), 1, {})
    for path in namespaces(proc_root).values():
        try:
            out.sockets += dump(ports, states, netns=path)
        except SockDiagError as e:
            if os.path.exists(path):
                out.failed[path] = str(e)
            # else its process exited since the listing: nothing was missed
            continue
        out.namespaces += 1
    return out


def sockets_everywhere(
    ports: Sequence[int], states: int = ESTABLISHED_ONLY
) -> list[TcpSocket]:
    """`dump_all`'s sockets; namespaces that could not be read are left out."""
    return dump_all(ports, states).sockets


def pids_by_inode(inodes: Collection[int], proc_root: str = "/proc") -> dict[int, int]:
    """The pid of a process holding each socket inode, as far as /proc shows.

    Newest processes are looked at first and the scan stops once every
    inode is placed. A socket shared by several processes (inherited across
    fork) goes to the first one seen. Kernel threads hold no descriptors:
    their listing is empty and costs one read.
    """
    wanted = set(inodes) - {0}
    found: dict[int, int] = {}
    if not wanted:
        return found
    pids = sorted((int(n) for n in os.listdir(proc_root) if n.isdigit()), reverse=True)
    for pid in pids:
        try:
            fd_dir = os.open(
                os.path.join(proc_root, str(pid), "fd"),
                os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC,
            )
        except OSError:
            continue  # exited since the listing
        try:
            names = os.listdir(fd_dir)
            for name in names:
                try:
                    target = os.readlink(name, dir_fd=fd_dir)
                except OSError:
                    continue  # closed meanwhile, or the process exited
                if not target.startswith("socket:["):
                    continue
                inode = int(target[8:-1])
                if inode in wanted and inode not in found:
                    found[inode] = pid
                    if len(found) == len(wanted):
                        return found
        except OSError:
            continue  # the process exited while being read
        finally:
            os.close(fd_dir)
    return found
