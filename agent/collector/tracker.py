"""Turns ring-buffer records into connection messages.

An OPEN record arrives while the connecting process most likely still
runs, so that is when its executable is resolved; the CLOSE record carries
the final byte counts and becomes one `connection` message.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent.collector.records import Kind, Record, RecordError, decode

log = logging.getLogger("toktra.collector")

MAX_OPEN = 65536
OFFSET_STEP_NS = 1_000_000


def boot_id(proc_root: str = "/proc") -> str:
    with open(os.path.join(proc_root, "sys/kernel/random/boot_id")) as f:
        return f.read().strip()


def boottime_offset_ns() -> int:
    """Unix time minus CLOCK_BOOTTIME, to date records taken on the latter."""
    return time.time_ns() - time.clock_gettime_ns(time.CLOCK_BOOTTIME)


@dataclass
class TrackerStats:
    records: int = 0
    bad_records: int = 0
    open_evicted: int = 0
    connections: int = 0


@dataclass
class Tracker:
    boot: str
    resolve_exe: Callable[[int], str | None]
    offset_ns: Callable[[], int] = boottime_offset_ns
    stats: TrackerStats = field(default_factory=TrackerStats)
    # (sock, start_ns) -> (record at OPEN, exe), connections not yet closed
    _open: collections.OrderedDict[tuple[int, int], tuple[Record, str | None]] = field(
        default_factory=collections.OrderedDict
    )
    _out: list[dict[str, Any]] = field(default_factory=list)
    _offset: int | None = None

    def on_record(self, data: bytes) -> None:
        self.stats.records += 1
        try:
            rec = decode(data)
        except RecordError as e:
            self.stats.bad_records += 1
            log.error("dropped a ring-buffer record: %s", e)
            return
        key = (rec.sock, rec.start_ns)
        if rec.kind is Kind.OPEN:
            self._open[key] = (rec, self.exe(rec))
            if len(self._open) > MAX_OPEN:
                self._open.popitem(last=False)
                self.stats.open_evicted += 1
            return
        exe = self._open.pop(key)[1] if key in self._open else self.exe(rec)
        self._out.append(self.connection(rec, exe))
        self.stats.connections += 1

    def exe(self, rec: Record) -> str | None:
        """The full path while the process lives, else the kernel's file name.

        The path from /proc is taken only when its file name matches what
        the kernel saw at connect, so a recycled pid is not misattributed.
        """
        path = self.resolve_exe(rec.pid)
        if path and os.path.basename(path) == rec.exe_name:
            return path
        return rec.exe_name or None

    def connection(self, rec: Record, exe: str | None) -> dict[str, Any]:
        conn_id = hashlib.blake2b(
            f"{self.boot}:{rec.sock:x}:{rec.start_ns}".encode(), digest_size=12
        ).hexdigest()
        return {
            "conn_id": conn_id,
            "final": True,
            "timestamp": rec.start_ns + self.offset(),
            "duration_ns": max(rec.end_ns - rec.start_ns, 0),
            "pid": rec.pid,
            "tid": rec.tid,
            "comm": rec.comm,
            "exe": exe,
            "uid": rec.uid,
            "src_port": rec.src_port,
            "dst_ip": rec.dst_ip,
            "dst_port": rec.dst_port,
            "sni": rec.sni.decode("latin-1") if rec.sni is not None else None,
            "sni_truncated": rec.sni_truncated,
            "sni_source": "openssl" if rec.sni is not None else None,
            "bytes_sent": rec.bytes_acked,
            "bytes_received": rec.bytes_received,
        }

    def open_named(
        self, bound_sni: Callable[[int], bytes | None], now_ns: int, limit: int
    ) -> list[dict[str, Any]]:
        """Open connections that have a name by now, newest first, as messages.

        Their byte counts are not known before they close: they show as 0.
        """
        out = []
        for (sock, _), (rec, exe) in reversed(self._open.items()):
            name = bound_sni(sock)
            if name is None:
                continue
            conn = self.connection(rec, exe)
            conn.update(
                final=False,
                duration_ns=max(now_ns - rec.start_ns, 0),
                sni=name.decode("latin-1"),
                sni_truncated=False,
                sni_source="openssl",
                bytes_sent=0,
                bytes_received=0,
            )
            out.append(conn)
            if len(out) >= limit:
                break
        return out

    def offset(self) -> int:
        """Unix time minus boot time, kept steady between clock steps.

        Read afresh each time it moves by microseconds, so the same
        connection reported twice (open, then closed) would show two start
        times; only a real step of the clock (over 1 ms) is taken up.
        """
        fresh = self.offset_ns()
        if self._offset is None or abs(fresh - self._offset) > OFFSET_STEP_NS:
            self._offset = fresh
        return self._offset

    def take(self) -> list[dict[str, Any]]:
        out, self._out = self._out, []
        return out

    @property
    def open_connections(self) -> int:
        return len(self._open)


def proc_exe(proc_root: str = "/proc") -> Callable[[int], str | None]:
    def resolve(pid: int) -> str | None:
        try:
            path = os.readlink(os.path.join(proc_root, str(pid), "exe"))
        except OSError:
            return None  # exited already, or a kernel thread
        return path.removesuffix(" (deleted)")

    return resolve
