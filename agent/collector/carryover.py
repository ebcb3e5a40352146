"""What the collector knows of open connections, kept across its restarts.

A connection's name is learned once, at its handshake. A collector that
restarts (an upgrade, a crash, a stop and start of the agent) would find
its open connections again through sock_diag, but nameless and under new
conn_ids: their earlier progress reports would never get a final event,
and the rest of their life would not be classified. So the collector
writes, at every progress tick and when it stops, each open named
connection's identity (endpoints, conn_id, start, name) to run_dir, and
the next run adopts them with it.

The file lives in run_dir (tmpfs: a reboot ends the connections too),
belongs to root, and is read back only if root still owns it and it comes
from the same boot; every field is checked, because the directory is the
unprivileged stages' too.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("toktra.collector")

FILE_NAME = "open-connections.json"
VERSION = 1
MAX_ENTRIES = 20000
MAX_BYTES = 16 * 1024 * 1024
SNI_MAX = 255
SOURCES = ("openssl", "clienthello")
_CONN_ID = re.compile(r"[0-9a-f]{24}")

Endpoints = tuple[str, int, str, int]


@dataclass(frozen=True, slots=True)
class Carried:
    conn_id: str
    start_unix_ns: int
    sni: bytes
    sni_truncated: bool
    sni_source: str


def save(path: str, boot: str, entries: dict[Endpoints, Carried]) -> None:
    """Writes the entries atomically, readable by root only."""
    body = {
        "version": VERSION,
        "boot": boot,
        "connections": [
            {
                "endpoints": list(ends),
                "conn_id": c.conn_id,
                "start_unix_ns": c.start_unix_ns,
                "sni": c.sni.decode("latin-1"),
                "sni_truncated": c.sni_truncated,
                "sni_source": c.sni_source,
            }
            for ends, c in list(entries.items())[:MAX_ENTRIES]
        ],
    }
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, json.dumps(body, separators=(",", ":")).encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def load(path: str, boot: str) -> dict[Endpoints, Carried]:
    """The entries an earlier run of this boot left; {} when none is usable."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return {}
    except OSError as e:
        log.warning("not reading %s: %s", path, e.strerror)
        return {}
    try:
        st = os.fstat(fd)
        if st.st_uid != 0 or st.st_mode & 0o077:
            log.warning(
                "not reading %s: it is not root's own (uid %d, mode %o)",
                path,
                st.st_uid,
                st.st_mode & 0o7777,
            )
            return {}
        data = os.read(fd, MAX_BYTES + 1)
    finally:
        os.close(fd)
    try:
        body = json.loads(data)
        if len(data) > MAX_BYTES or body.get("version") != VERSION:
            raise ValueError("unknown layout")
        if body.get("boot") != boot:
            return {}  # connections of another boot are gone
        return dict(_entry(item) for item in body["connections"][:MAX_ENTRIES])
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        log.warning("ignoring %s: %s", path, e)
        return {}


def _entry(item: Any) -> tuple[Endpoints, Carried]:
    src_ip, src_port, dst_ip, dst_port = item["endpoints"]
    if not all(isinstance(v, str) for v in (src_ip, dst_ip)):
        raise TypeError("addresses must be strings")
    if not all(type(v) is int and 0 < v < 65536 for v in (src_port, dst_port)):
        raise ValueError("bad port")
    sni = item["sni"]
    if not isinstance(sni, str) or not 0 < len(sni) <= SNI_MAX:
        raise ValueError("bad name")
    conn_id, start = item["conn_id"], item["start_unix_ns"]
    if not isinstance(conn_id, str) or not _CONN_ID.fullmatch(conn_id):
        raise ValueError("bad conn_id")
    if type(start) is not int or start < 0:
        raise ValueError("bad start")
    if item["sni_source"] not in SOURCES or type(item["sni_truncated"]) is not bool:
        raise ValueError("bad name source")
    carried = Carried(
        conn_id, start, sni.encode("latin-1"), item["sni_truncated"], item["sni_source"]
    )
    return (src_ip, src_port, dst_ip, dst_port), carried
