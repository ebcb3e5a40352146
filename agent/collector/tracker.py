"""Turns ring-buffer records into connection messages.

An OPEN record arrives while the connecting process most likely still
runs, so that is when its executable is resolved. HELLO records carry the
connection's ClientHello in pieces; the server name parsed from them is
used when OpenSSL's own name is missing. The CLOSE record carries the
final byte counts and becomes the `final` message. In between, progress
reports (`final` false) give the counts of long-lived connections, read
by the caller from sock_diag. Connections found open at start-up are
adopted: reported like the others, without a name and dated when seen.

The ClientHello is parsed here, in the collector, so that its bytes never
leave this process: only the name does.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.collector import clienthello
from agent.collector.carryover import Carried
from agent.collector.records import (
    Flag,
    Hello,
    Kind,
    Library,
    Record,
    RecordError,
    decode,
)

log = logging.getLogger("toktra.collector")

MAX_OPEN = 65536
OFFSET_STEP_NS = 1_000_000
OFFSET_REREAD_NS = 100_000_000  # how long one reading of the offset serves
# What a name may be, as the BPF side keeps it; a longer ClientHello name
# is cut to this and marked truncated, as OpenSSL names are.
SNI_MAX = 255

# (src_ip, src_port, dst_ip, dst_port): how sock_diag and records meet.
Endpoints = tuple[str, int, str, int]
# (acked, received) byte counts from sock_diag
Counts = tuple[int, int]


def boot_id(proc_root: str = "/proc") -> str:
    with open(os.path.join(proc_root, "sys/kernel/random/boot_id")) as f:
        return f.read().strip()


def boottime_offset_ns() -> int:
    """Unix time minus CLOCK_BOOTTIME, to date records taken on the latter.

    The two clocks are read between two reads of the other; of three tries
    the one with the shortest gap wins, so a preemption between reads (a
    loaded host) does not shift the offset by as long as it lasted.
    """
    best = None
    for _ in range(3):
        before = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
        wall = time.time_ns()
        after = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
        if best is None or after - before < best[0]:
            best = (after - before, wall - (before + after) // 2)
    return best[1]


def endpoints(rec: Record) -> Endpoints:
    return (rec.src_ip, rec.src_port, rec.dst_ip, rec.dst_port)


@dataclass
class TrackerStats:
    records: int = 0
    bad_records: int = 0
    open_evicted: int = 0
    connections: int = 0
    progress: int = 0
    adopted: int = 0
    hello_gaps: int = 0  # ClientHello pieces that arrived out of order
    hello: collections.Counter[str] = field(
        default_factory=lambda: collections.Counter(
            {str(o): 0 for o in clienthello.Outcome}
        )
    )


@dataclass
class Open:
    """An open connection: its OPEN record and what has been learned since."""

    key: tuple[int, int]  # names it in conn_id
    rec: Record
    exe: str | None
    # A name learned besides OpenSSL's: from the ClientHello, or kept from
    # the agent's previous run for a connection adopted at start.
    name: bytes | None = None
    name_truncated: bool = False
    name_source: str | None = None
    counts: Counts | None = None  # the last progress report's
    reported_ns: int = 0  # CLOCK_BOOTTIME of the last report (or the start)
    conn_id: str | None = None  # kept from the previous run, else from key


@dataclass
class Tracker:
    boot: str
    resolve_exe: Callable[[int], str | None]
    offset_ns: Callable[[], int] = boottime_offset_ns
    on_library: Callable[[Library], None] | None = None
    stats: TrackerStats = field(default_factory=TrackerStats)
    # (sock, start_ns) -> connection not yet closed; adopted ones are keyed
    # (cookie, 0), which no kernel record uses (start_ns is never 0).
    _open: collections.OrderedDict[tuple[int, int], Open] = field(
        default_factory=collections.OrderedDict
    )
    _hello: dict[tuple[int, int], bytearray] = field(default_factory=dict)
    _adopted: dict[Endpoints, tuple[int, int]] = field(default_factory=dict)
    _out: list[dict[str, Any]] = field(default_factory=list)
    _offset: int | None = None
    _offset_read: int = 0  # time.monotonic_ns() of the last reading

    # -- records ----------------------------------------------------------

    def on_record(self, data: bytes) -> None:
        self.stats.records += 1
        try:
            rec = decode(data)
        except RecordError as e:
            self.stats.bad_records += 1
            log.error("dropped a ring-buffer record: %s", e)
            return
        self.handle(rec)

    def handle(self, rec: Record | Hello | Library) -> None:
        """One decoded record."""
        if isinstance(rec, Hello):
            self.on_hello(rec)
        elif isinstance(rec, Library):
            if self.on_library is not None:
                self.on_library(rec)
        elif rec.kind is Kind.OPEN:
            key = (rec.sock, rec.start_ns)
            self._remember(key, Open(key, rec, self.exe(rec), reported_ns=rec.start_ns))
        elif rec.flags & Flag.ADOPTED:
            self._close_adopted(rec)
        else:
            key = (rec.sock, rec.start_ns)
            if self._hello.pop(key, None) is not None:
                # Pieces that never held the name: cut short, or lying.
                self.stats.hello["truncated"] += 1
            entry = self._open.pop(key, None) or Open(key, rec, self.exe(rec))
            self._out.append(self._final(entry, rec))
            self.stats.connections += 1

    def _remember(self, key: tuple[int, int], entry: Open) -> None:
        self._open[key] = entry
        if len(self._open) > MAX_OPEN:
            old, evicted = self._open.popitem(last=False)
            self._hello.pop(old, None)
            self._adopted.pop(endpoints(evicted.rec), None)
            self.stats.open_evicted += 1

    def on_hello(self, piece: Hello) -> None:
        """Joins the pieces of a ClientHello and parses what there is."""
        key = (piece.sock, piece.start_ns)
        entry = self._open.get(key)
        if entry is None or entry.name is not None:
            return
        if piece.chunk == 0 and piece.offset == 0:
            buf = self._hello[key] = bytearray(piece.data)
        else:
            buf = self._hello.get(key)
            if buf is None or len(buf) != piece.offset:
                self.stats.hello_gaps += 1
                self._hello.pop(key, None)
                return
            buf += piece.data
        parsed = clienthello.parse(bytes(buf))
        if parsed.outcome is clienthello.Outcome.TRUNCATED:
            return  # the next piece may complete it; freed at close if not
        del self._hello[key]
        self.stats.hello[str(parsed.outcome)] += 1
        if parsed.sni is not None:
            entry.name = parsed.sni[:SNI_MAX]
            entry.name_truncated = len(parsed.sni) > SNI_MAX
            entry.name_source = "clienthello"

    # -- progress and adoption ----------------------------------------------

    def progress(
        self,
        sockets: Mapping[Endpoints, Counts],
        now_ns: int,
        interval_ns: int,
        bound_sni: Callable[[int], bytes | None] = lambda sock: None,
    ) -> None:
        """Reports named open connections not reported for `interval_ns`.

        Only connections with a name are reported: nothing else can be
        classified, so a report of one would only load the queue. Their
        counts are kept all the same, for the table and for adopted ones.

        `sockets` is a sock_diag dump taken before the ring was last
        drained, so an adopted connection missing from it has closed
        without its close record (it went between the dump at start-up
        and the kernel side learning of it): it ends with the last counts.
        """
        for key, entry in list(self._open.items()):
            ends = endpoints(entry.rec)
            counts = sockets.get(ends)
            adopted = bool(entry.rec.flags & Flag.ADOPTED)
            if counts is None:
                if adopted:
                    del self._open[key]
                    self._adopted.pop(ends, None)
                    self._out.append(self._message(entry, final=True, now_ns=now_ns))
                    self.stats.connections += 1
                continue
            entry.counts = counts
            if now_ns - entry.reported_ns < interval_ns:
                continue
            if not self._named(entry, bound_sni):
                continue
            entry.reported_ns = now_ns
            self._out.append(self._message(entry, final=False, now_ns=now_ns))
            self.stats.progress += 1

    def adopt(
        self, rec: Record, cookie: int, counts: Counts, carried: Carried | None = None
    ) -> bool:
        """Tracks a connection found open at start-up; False if known already.

        `carried` is what the previous run knew of it: its conn_id and name.
        """
        ends = endpoints(rec)
        if ends in self._adopted or any(
            endpoints(e.rec) == ends for e in self._open.values()
        ):
            return False
        key = (cookie, 0)
        entry = Open(key, rec, self.exe(rec), counts=counts, reported_ns=rec.start_ns)
        if carried is not None:
            entry.conn_id = carried.conn_id
            entry.name = carried.sni
            entry.name_truncated = carried.sni_truncated
            entry.name_source = carried.sni_source
        self._remember(key, entry)
        self._adopted[ends] = key
        self.stats.adopted += 1
        return True

    def _close_adopted(self, rec: Record) -> None:
        key = self._adopted.pop(endpoints(rec), None)
        entry = self._open.pop(key, None) if key else None
        if entry is None:
            return  # already ended from a dump, or evicted
        entry.counts = (rec.bytes_acked, rec.bytes_received)
        self._out.append(self._message(entry, final=True, now_ns=rec.end_ns))
        self.stats.connections += 1

    # -- messages -------------------------------------------------------------

    def exe(self, rec: Record) -> str | None:
        """The full path while the process lives, else the kernel's file name.

        The path from /proc is taken only when its file name matches what
        the kernel saw at connect, so a recycled pid is not misattributed.
        """
        if not rec.pid:
            return None
        path = self.resolve_exe(rec.pid)
        if path and os.path.basename(path) == rec.exe_name:
            return path
        return rec.exe_name or None

    def _final(self, entry: Open, rec: Record) -> dict[str, Any]:
        """The message for a closed connection: the CLOSE record's view."""
        entry.rec = rec
        entry.counts = (rec.bytes_acked, rec.bytes_received)
        return self._message(entry, final=True, now_ns=rec.end_ns)

    def _named(self, entry: Open, bound_sni: Callable[[int], bytes | None]) -> bool:
        """Whether the connection has a name, asking the kernel side for
        OpenSSL's until it has it (it is bound at the handshake's first send,
        after the OPEN record), then keeping it."""
        if entry.rec.sni is not None or entry.name_source == "openssl":
            return True
        if not entry.rec.flags & Flag.ADOPTED:
            name = bound_sni(entry.rec.sock)
            if name is not None:
                entry.name, entry.name_truncated = name, False
                entry.name_source = "openssl"
        return entry.name is not None

    def _message(self, entry: Open, final: bool, now_ns: int) -> dict[str, Any]:
        rec = entry.rec
        conn_id = (
            entry.conn_id
            or hashlib.blake2b(
                f"{self.boot}:{entry.key[0]:x}:{entry.key[1]}".encode(), digest_size=12
            ).hexdigest()
        )
        # What the library was asked for wins over what went on the wire.
        sni, truncated, source = rec.sni, rec.sni_truncated, "openssl"
        if sni is None:
            sni, truncated, source = entry.name, entry.name_truncated, entry.name_source
        sent, received = entry.counts or (0, 0)
        return {
            "conn_id": conn_id,
            "final": final,
            "timestamp": rec.start_ns + self.offset(),
            "duration_ns": max(now_ns - rec.start_ns, 0),
            "pid": rec.pid,
            "tid": rec.tid,
            "comm": rec.comm,
            "exe": entry.exe,
            "uid": rec.uid,
            "src_port": rec.src_port,
            "dst_ip": rec.dst_ip,
            "dst_port": rec.dst_port,
            "sni": sni.decode("latin-1") if sni is not None else None,
            "sni_truncated": truncated if sni is not None else False,
            "sni_source": source if sni is not None else None,
            "bytes_sent": sent,
            "bytes_received": received,
        }

    def open_named(
        self, bound_sni: Callable[[int], bytes | None], now_ns: int, limit: int
    ) -> list[dict[str, Any]]:
        """Open connections that have a name by now, newest first, as messages.

        Their byte counts are those of the last progress report (0 before
        the first).
        """
        out = []
        for entry in reversed(self._open.values()):
            if not self._named(entry, bound_sni):
                continue
            out.append(self._message(entry, final=False, now_ns=now_ns))
            if len(out) >= limit:
                break
        return out

    def carry(
        self, bound_sni: Callable[[int], bytes | None]
    ) -> dict[Endpoints, Carried]:
        """The open named connections, for the next run (see carryover)."""
        out = {}
        for entry in self._open.values():
            if not self._named(entry, bound_sni):
                continue
            msg = self._message(entry, final=False, now_ns=entry.rec.start_ns)
            out[endpoints(entry.rec)] = Carried(
                msg["conn_id"],
                msg["timestamp"],
                msg["sni"].encode("latin-1"),
                msg["sni_truncated"],
                msg["sni_source"],
            )
        return out

    def open_endpoints(self) -> Iterable[Endpoints]:
        return (endpoints(e.rec) for e in self._open.values())

    def offset(self) -> int:
        """Unix time minus boot time, kept steady between clock steps.

        Read afresh each time it moves by microseconds, so the same
        connection reported twice (open, then closed) would show two start
        times; only a real step of the clock (over 1 ms) is taken up.
        """
        now = time.monotonic_ns()
        if self._offset is not None and now - self._offset_read < OFFSET_REREAD_NS:
            return self._offset  # a burst of records shares one reading
        self._offset_read = now
        fresh = self.offset_ns()
        if self._offset is None or abs(fresh - self._offset) > OFFSET_STEP_NS:
            self._offset = fresh
        return self._offset

    def take(self) -> list[dict[str, Any]]:
        out, self._out = self._out, []
        return out

    @property
    def adopted_open(self) -> int:
        return len(self._adopted)


def proc_exe(proc_root: str = "/proc") -> Callable[[int], str | None]:
    def resolve(pid: int) -> str | None:
        try:
            path = os.readlink(os.path.join(proc_root, str(pid), "exe"))
        except OSError:
            return None  # exited already, or a kernel thread
        return path.removesuffix(" (deleted)")

    return resolve


def proc_comm(pid: int, proc_root: str = "/proc") -> str:
    """The process's comm, or "" once it has exited."""
    try:
        with open(os.path.join(proc_root, str(pid), "comm"), "rb") as f:
            # prctl allows any bytes in a comm.
            return f.read().rstrip(b"\n").decode("utf-8", "replace")
    except OSError:
        return ""
