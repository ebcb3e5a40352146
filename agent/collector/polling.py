"""Degraded capture: connections found by polling sock_diag, for hosts where
the BPF object cannot load (no BTF, no privilege for BPF).

In: a dump of the TCP sockets on the watched ports at each `poll`. Out:
`connection` messages (agent.wire): one with final false every progress
interval while a connection is open, one with final true once it is gone.

What this mode cannot see, where BPF capture would:
- bytes after the last poll that still found the socket: the final counts
  are the last ones seen, so a connection's closing exchange (at least the
  FIN's sequence byte) is missing from them;
- connections opened and closed between two polls, entirely;
- the server name: sni is always null, so the classifier files these under
  `empty` (no name seen);
- the start: `timestamp` is when a poll first found the connection, up to
  one poll late, and the pid, comm and exe are those of whoever holds the
  socket then (pid 0, comm "" and exe null when no process holds it);
- sockets of other network namespaces (containers with their own network).
"""

from __future__ import annotations

import collections
import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.collector import sockdiag
from agent.collector.sockdiag import SockDiagError, TcpSocket, TcpState
from agent.collector.tracker import boottime_offset_ns, proc_comm, proc_exe

log = logging.getLogger("toktra.collector")

MAX_TRACKED = 65536
# A connection is followed from establishment until its socket is released
# or becomes a TIME_WAIT remnant (which has no counters left to read).
WATCHED_STATES = sockdiag.state_mask(
    TcpState.ESTABLISHED,
    TcpState.FIN_WAIT1,
    TcpState.FIN_WAIT2,
    TcpState.CLOSE_WAIT,
    TcpState.LAST_ACK,
    TcpState.CLOSING,
)

Dump = Callable[[Sequence[int], int], list[TcpSocket]]


@dataclass
class PollerStats:
    polls: int = 0
    errors: int = 0  # dumps that failed; that poll changed nothing
    tracked: int = 0  # connections followed now
    evicted: int = 0  # dropped, oldest first, to stay within max_tracked


@dataclass
class _Conn:
    sock: TcpSocket  # as last seen, with counters
    first_seen_ns: int  # CLOCK_BOOTTIME
    start_unix_ns: int
    pid: int
    comm: str
    exe: str | None
    next_report_ns: int


@dataclass
class Poller:
    ports: Sequence[int]
    boot_id: str
    progress_interval_ns: int
    max_tracked: int = MAX_TRACKED
    proc_root: str = "/proc"
    dump: Dump = sockdiag.sockets_everywhere
    offset_ns: Callable[[], int] = boottime_offset_ns
    stats: PollerStats = field(default_factory=PollerStats)
    # cookie -> connection, oldest first
    _conns: collections.OrderedDict[int, _Conn] = field(
        init=False, default_factory=collections.OrderedDict
    )
    _out: list[dict[str, Any]] = field(init=False, default_factory=list)
    _exe: Callable[[int], str | None] = field(init=False)
    _failing: bool = field(init=False, default=False)  # logged once per episode
    _evicting: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        sockdiag.port_filter(self.ports)  # bad ports fail here, not at each poll
        if self.progress_interval_ns <= 0 or self.max_tracked <= 0:
            raise ValueError("progress_interval_ns and max_tracked must be positive")
        self._exe = proc_exe(self.proc_root)

    def poll(self, now_ns: int) -> None:
        """Reads the sockets once; `now_ns` is CLOCK_BOOTTIME."""
        self.stats.polls += 1
        try:
            sockets = self.dump(self.ports, WATCHED_STATES)
        except SockDiagError as e:
            # Taking every connection for closed would invent finals: wait.
            self.stats.errors += 1
            if not self._failing:
                log.warning("socket poll failed, retrying at the next: %s", e)
            self._failing = True
            return
        if self._failing:
            log.info("socket poll works again")
            self._failing = False
        live = {s.cookie: s for s in sockets if s.has_counters}

        # Gone: released, or only a TIME_WAIT remnant without counters left.
        for cookie in [c for c in self._conns if c not in live]:
            self._out.append(self._message(self._conns.pop(cookie), now_ns, True))

        new = [s for cookie, s in live.items() if cookie not in self._conns]
        held = {s.inode for s in new if s.inode}  # 0: no process holds it
        pids = sockdiag.pids_by_inode(held, self.proc_root) if held else {}
        for sock in new:
            self._track(sock, pids.get(sock.inode, 0), now_ns)

        for cookie, conn in self._conns.items():
            conn.sock = live[cookie]
            if now_ns >= conn.next_report_ns:
                self._out.append(self._message(conn, now_ns, False))
                conn.next_report_ns = now_ns + self.progress_interval_ns
        self.stats.tracked = len(self._conns)
        if self._evicting and len(self._conns) < self.max_tracked:
            self._evicting = False

    def _track(self, sock: TcpSocket, pid: int, now_ns: int) -> None:
        if len(self._conns) >= self.max_tracked:
            # Still open, so a later poll finds it again as a new connection
            # (same conn_id, a later timestamp) and evicts the next oldest.
            self._conns.popitem(last=False)
            self.stats.evicted += 1
            if not self._evicting:
                log.warning(
                    "more than %d connections on watched ports: dropping the "
                    "oldest; they lose their final report",
                    self.max_tracked,
                )
            self._evicting = True
        self._conns[sock.cookie] = _Conn(
            sock=sock,
            first_seen_ns=now_ns,
            start_unix_ns=now_ns + self.offset_ns(),
            pid=pid,
            comm=proc_comm(pid, self.proc_root) if pid else "",
            exe=self._exe(pid) if pid else None,
            next_report_ns=now_ns + self.progress_interval_ns,
        )

    def _message(self, conn: _Conn, now_ns: int, final: bool) -> dict[str, Any]:
        sock = conn.sock
        conn_id = hashlib.blake2b(
            f"{self.boot_id}:{sock.cookie:x}".encode(), digest_size=12
        ).hexdigest()
        return {
            "conn_id": conn_id,
            "final": final,
            "timestamp": conn.start_unix_ns,
            # At the close, up to the poll that found it gone.
            "duration_ns": max(now_ns - conn.first_seen_ns, 0),
            "pid": conn.pid,
            "tid": conn.pid,
            "comm": conn.comm,
            "exe": conn.exe,
            "uid": sock.uid,
            "src_port": sock.src_port,
            "dst_ip": sock.dst_ip,
            "dst_port": sock.dst_port,
            "sni": None,
            "sni_truncated": False,
            "sni_source": None,
            "bytes_sent": sock.bytes_acked,
            "bytes_received": sock.bytes_received,
        }

    def take(self) -> list[dict[str, Any]]:
        out, self._out = self._out, []
        return out
