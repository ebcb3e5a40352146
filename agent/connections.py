"""The connections table: open and recently closed LLM connections, on a socket.

In: classified connections from the classifier (open ones, replaced on every
snapshot, and closed ones). Out: rows with the columns of the osquery table
`toktra_connections`, served on `{run_dir}/connections.sock`.

Protocol (one request per connection, Unix stream socket):

    client: {"v": 1, "where": {"provider": "openai", "pid": 123}}\\n
    server: {"v": 1, "rows": [{"pid": ..., "comm": ..., ...}, ...]}\\n

`where` is optional; each entry is an equality on one column, applied here
before anything crosses the socket. An answer with "error" instead of "rows"
says why the request was refused. The server answers from its own thread,
with a deadline per client, so a slow or dead client never stalls the stage
that feeds the table. The socket is 0660 in run_dir (0750): only root and
the agent's group can reach it. Up to MAX_CLIENTS clients are served at
once, each in its own thread.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterable
from typing import Any

from agent.runtime import accept_each

log = logging.getLogger("toktra.connections")

VERSION = 1
SOCKET_NAME = "connections.sock"
# name -> type, exactly the osquery table's columns, in its order.
COLUMNS: dict[str, type] = {
    "pid": int,
    "comm": str,
    "dst_hostname": str,
    "dst_ip": str,
    "dst_port": int,
    "bytes_sent": int,
    "bytes_received": int,
    "timestamp": int,
    "provider": str,
    "category": str,
}
MAX_REQUEST_BYTES = 4096
CLIENT_DEADLINE_S = 2.0
MAX_CLIENTS = 8
MAX_CLOSED_ROWS = 10_000


class ConnectionsError(Exception):
    """The table could not be read; str() says why."""


def row_of(event: dict[str, Any]) -> dict[str, Any]:
    return {name: event.get(name) for name in COLUMNS}


def matches(row: dict[str, Any], where: dict[str, Any]) -> bool:
    return all(row.get(k) == v for k, v in where.items())


def check_where(where: object) -> dict[str, Any]:
    """The request's filter, checked; raises ValueError with the reason."""
    if where is None:
        return {}
    if not isinstance(where, dict):
        raise ValueError("where must be an object")
    for key, value in where.items():
        if key not in COLUMNS:
            raise ValueError(f"unknown column {key!r}")
        want = COLUMNS[key]
        if isinstance(value, bool) or not isinstance(value, want):
            raise ValueError(f"{key} takes {'an integer' if want is int else 'text'}")
    return where


class Table:
    """Open connections (replaced wholesale) and a window of closed ones."""

    def __init__(self, closed_window_s: float, clock=time.monotonic) -> None:
        self.closed_window_s = closed_window_s
        self._clock = clock
        self._lock = threading.Lock()
        self._open: dict[str, dict[str, Any]] = {}
        self._closed: collections.deque[tuple[float, str, dict[str, Any]]] = (
            collections.deque()
        )

    def set_open(self, events: Iterable[dict[str, Any]]) -> None:
        rows = {e["conn_id"]: row_of(e) for e in events}
        with self._lock:
            self._open = rows

    def closed(self, event: dict[str, Any]) -> None:
        with self._lock:
            self._open.pop(event["conn_id"], None)
            self._closed.append((self._clock(), event["conn_id"], row_of(event)))
            self._expire()

    def _expire(self) -> None:
        horizon = self._clock() - self.closed_window_s
        while self._closed and (
            self._closed[0][0] < horizon or len(self._closed) > MAX_CLOSED_ROWS
        ):
            self._closed.popleft()

    def rows(self, where: dict[str, Any]) -> list[dict[str, Any]]:
        with self._lock:
            self._expire()
            closed_ids = {conn_id for _, conn_id, _ in self._closed}
            # A connection that closed since the last open snapshot is shown
            # once, closed.
            candidates = [r for c, r in self._open.items() if c not in closed_ids] + [
                r for _, _, r in self._closed
            ]
        return [r for r in candidates if matches(r, where)]


class TableServer:
    """Serves a Table on a Unix socket from a thread of its own."""

    def __init__(self, table: Table, path: str, group_gid: int | None = None) -> None:
        self.table = table
        self.path = path
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(path)
        os.chmod(path, 0o660)
        if group_gid is not None:
            os.chown(path, -1, group_gid)
        self._sock.listen(16)
        self._sock.settimeout(0.5)
        self._stop = threading.Event()
        self._slots = threading.BoundedSemaphore(MAX_CLIENTS)
        self.served = self.refused = 0
        self._thread = threading.Thread(target=self._serve, name="connections")
        self._thread.daemon = True

    def start(self) -> TableServer:
        self._thread.start()
        return self

    def _serve(self) -> None:
        accept_each(self._sock, self._stop, self._admit)

    def _admit(self, client: socket.socket) -> None:
        # Each client in a thread of its own, so one that is slow to ask or
        # to read delays no other; a bounded number at once.
        if not self._slots.acquire(blocking=False):
            self.refused += 1
            client.close()
            return
        threading.Thread(target=self._client, args=(client,), daemon=True).start()

    def _client(self, client: socket.socket) -> None:
        try:
            with client:
                self._answer(client)
        finally:
            self._slots.release()

    def _answer(self, client: socket.socket) -> None:
        deadline = time.monotonic() + CLIENT_DEADLINE_S
        try:
            request = _read_line(client, deadline)
            try:
                message = json.loads(request)
                version = message.get("v") if isinstance(message, dict) else None
                if isinstance(version, bool) or version != VERSION:
                    raise ValueError(f"expected a v{VERSION} request object")
                where = check_where(message.get("where"))
            except (ValueError, RecursionError) as err:
                self.refused += 1
                _write(client, {"v": VERSION, "error": str(err)}, deadline)
                return
            rows = self.table.rows(where)
            _write(client, {"v": VERSION, "rows": rows}, deadline)
            self.served += 1
        except (OSError, TimeoutError) as err:
            self.refused += 1
            log.debug("connections client dropped: %s", err)

    def close(self) -> None:
        self._stop.set()
        self._sock.close()
        self._thread.join(5)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def _read_line(sock: socket.socket, deadline: float) -> bytes:
    data = b""
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no request line in time")
        sock.settimeout(left)
        chunk = sock.recv(MAX_REQUEST_BYTES)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_REQUEST_BYTES:
            raise OSError("request longer than 4096 bytes")
    return data.split(b"\n", 1)[0]


def _write(sock: socket.socket, message: dict[str, Any], deadline: float) -> None:
    data = json.dumps(message, separators=(",", ":")).encode() + b"\n"
    view = memoryview(data)
    while view:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("client does not read its answer")
        sock.settimeout(left)
        sent = sock.send(view)
        view = view[sent:]


def query(
    path: str, where: dict[str, Any] | None = None, timeout: float = 1.5
) -> list[dict[str, Any]]:
    """Asks the agent for rows; raises ConnectionsError when it cannot answer."""
    deadline = time.monotonic() + timeout
    request = {"v": VERSION, "where": where or {}}
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            _write(sock, request, deadline)
            data = b""
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no answer within {timeout:g}s")
                sock.settimeout(left)
                chunk = sock.recv(1 << 20)
                if not chunk:
                    break
                data += chunk
    except (OSError, TimeoutError) as err:
        raise ConnectionsError(f"{path}: {err}") from err
    try:
        answer = json.loads(data)
    except ValueError as err:
        raise ConnectionsError(f"{path}: answer is not JSON") from err
    if not isinstance(answer, dict) or answer.get("v") != VERSION:
        raise ConnectionsError(f"{path}: not a v{VERSION} answer")
    if "error" in answer:
        raise ConnectionsError(f"{path}: request refused: {answer['error']}")
    rows = answer.get("rows")
    if not isinstance(rows, list):
        raise ConnectionsError(f"{path}: answer has no rows")
    return rows
