"""The osquery extension: the agent's connections table as `toktra_connections`.

In: calls from osquery's extension manager, over the Thrift interface that the
`osquery` package on PyPI ships (Unix socket `{manager socket}.{uuid}`): the
table's columns, and its rows for a query context. Out: rows read from the
agent's connections socket (see agent/connections.py), asked for with the
query's simple equalities (`WHERE provider = 'openai'`, `WHERE pid = 123`) so
the agent filters before anything crosses that socket. osquery checks every
row against the whole WHERE clause afterwards, so a constraint that is not
passed on only costs a larger answer, never a wrong one.

Started by hand or by a service manager:

    toktra-agent osquery-extension --socket /var/osquery/osquery.em

or by osqueryd itself (autoload). osqueryd runs each executable listed in its
`--extensions_autoload` file (default /etc/osquery/extensions.load) as a
child, with `--socket PATH --timeout S --interval S` and `--verbose`, and
loads only files that end in `.ext`, belong to root and are writable by no
one else; a two-line wrapper does:

    #!/bin/sh
    exec /usr/bin/toktra-agent osquery-extension "$@"

When the agent is down a query gets no rows within QUERY_TIMEOUT_S, and the
reason is logged once until the agent answers again.

Recovery: the extension checks every --interval seconds that the manager
still lists its registration. When the manager has forgotten it (osqueryd
restarted and recreated its socket, or dropped the extension after missed
pings), the extension registers again under a new uuid and serves on the new
socket; an osqueryd worker restarted by its watchdog gets the table back
without the extension being restarted. When the manager does not answer at
all, the extension keeps trying for --grace seconds and then exits 1, so an
extension whose osqueryd is gone for good does not linger and a supervisor
(osqueryd's watcher, systemd) may start a fresh one. A manager that refuses
the registration (an extension named "toktra" is already registered) also
means exit 1. The manager's shutdown request, SIGTERM and SIGINT stop it
with 0.

Exit codes: 0 stopped, 1 no manager or registration refused, 2 bad usage or
configuration.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import json
import logging
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import osquery
from osquery.extensions import Extension as extension_api
from osquery.extensions import ExtensionManager as manager_api
from osquery.extensions.ttypes import (
    ExtensionResponse,
    ExtensionStatus,
    InternalExtensionInfo,
)
from thrift.protocol import TBinaryProtocol
from thrift.Thrift import TException
from thrift.transport import TSocket, TTransport

from agent import __version__
from agent.config import ConfigError, load_config
from agent.connections import SOCKET_NAME, ConnectionsError, query
from agent.runtime import StopSignals, accept_each, setup_logging

log = logging.getLogger("toktra.osquery")

PROG = "toktra-agent osquery-extension"
EXTENSION_NAME = "toktra"
TABLE_NAME = "toktra_connections"
# name -> osquery column type, in the table's order (agent/connections.py
# COLUMNS has the same names; timestamps are nanoseconds, hence BIGINT).
TABLE_COLUMNS: dict[str, str] = {
    "pid": "INTEGER",
    "comm": "TEXT",
    "dst_hostname": "TEXT",
    "dst_ip": "TEXT",
    "dst_port": "INTEGER",
    "bytes_sent": "BIGINT",
    "bytes_received": "BIGINT",
    "timestamp": "BIGINT",
    "provider": "TEXT",
    "category": "TEXT",
}
# osquery's constraint operator for `=`.
OP_EQUALS = 2
# The agent answers within this or the query gets no rows, so osquery has its
# answer within 2 s even from a hung agent.
QUERY_TIMEOUT_S = 1.5
# Each Thrift call to the manager (register, list, deregister).
MANAGER_CALL_TIMEOUT_S = 2.0
# How often a missing manager is looked for, at start and after losing it.
RETRY_S = 0.2
_INTEGER = re.compile(r"-?[0-9]{1,19}")


class ManagerError(Exception):
    """osquery's extension manager cannot be reached or refused a call."""


class Refused(ManagerError):
    """The manager answered and said no."""


# -- the table ---------------------------------------------------------------


def pushdown(context: object) -> dict[str, Any]:
    """The equalities in osquery's query context that the agent can apply.

    The context is osquery's JSON: {"constraints": [{"name": column, "list":
    [{"op": 2, "expr": "openai"}, ...], "affinity": "TEXT"}, ...], ...}. A
    column is passed on only when its one constraint is an equality whose
    value fits the column's type. Ranges, LIKE, anything malformed and
    several constraints on one column are left to osquery: several may be
    alternatives (the values of an IN list), not all required.
    """
    where: dict[str, Any] = {}
    if not isinstance(context, dict):
        return where
    constraints = context.get("constraints")
    if not isinstance(constraints, list):
        return where
    for entry in constraints:
        if not isinstance(entry, dict):
            continue
        name, items = entry.get("name"), entry.get("list")
        if not isinstance(name, str) or name not in TABLE_COLUMNS:
            continue
        if not isinstance(items, list):
            continue
        if len(items) != 1 or not isinstance(items[0], dict):
            where.pop(name, None)
            continue
        op, expr = items[0].get("op"), items[0].get("expr")
        if op != OP_EQUALS or not isinstance(expr, str):
            where.pop(name, None)
            continue
        if TABLE_COLUMNS[name] == "TEXT":
            where[name] = expr
        elif _INTEGER.fullmatch(expr) and -(2**63) <= int(expr) < 2**63:
            where[name] = int(expr)
        else:
            # SQLite may still match it (`pid = 1.0`); osquery decides.
            where.pop(name, None)
    return where


def osquery_row(row: dict[str, Any]) -> dict[str, str]:
    """A row as osquery takes it: text values; a missing one reads as NULL."""
    out = {}
    for name in TABLE_COLUMNS:
        value = row.get(name)
        if value is None:
            continue
        out[name] = str(int(value)) if isinstance(value, bool) else str(value)
    return out


class ConnectionsTable:
    """`toktra_connections`, answered from the agent's connections socket.

    Not the SDK's TablePlugin: that one is a process-wide singleton whose
    constructor takes no arguments, and it turns a missing value into the
    text "None".
    """

    def __init__(self, path: str, timeout: float = QUERY_TIMEOUT_S) -> None:
        self.path = path
        self.timeout = timeout
        self._lock = threading.Lock()
        self._down_reason: str | None = None

    def routes(self) -> list[dict[str, str]]:
        """The columns as osquery's registry takes them (options 0: plain)."""
        return [
            {"id": "column", "name": name, "type": sql_type, "op": "0"}
            for name, sql_type in TABLE_COLUMNS.items()
        ]

    def generate(self, context: object) -> list[dict[str, str]]:
        where = pushdown(context)
        try:
            rows = query(self.path, where, timeout=self.timeout)
        except ConnectionsError as err:
            self._agent_down(str(err))
            return []
        self._agent_up()
        return [osquery_row(r) for r in rows if isinstance(r, dict)]

    def _agent_down(self, reason: str) -> None:
        with self._lock:
            first = self._down_reason is None
            self._down_reason = reason
        if first:
            log.warning(
                "agent not answering, %s answers no rows until it does: %s",
                TABLE_NAME,
                reason,
            )
        else:
            log.debug("agent still not answering: %s", reason)

    def _agent_up(self) -> None:
        with self._lock:
            was_down = self._down_reason is not None
            self._down_reason = None
        if was_down:
            log.info("agent answers again at %s", self.path)


# -- the extension's Thrift service ------------------------------------------


def _answer(code: int, message: str, uuid: int, rows: list) -> ExtensionResponse:
    status = ExtensionStatus(code=code, message=message, uuid=uuid)
    return ExtensionResponse(status=status, response=rows)


class Handler(extension_api.Iface):
    """What osquery may call on the extension: ping, call, shutdown."""

    def __init__(self, table: ConnectionsTable) -> None:
        self.table = table
        self.uuid = 0
        self.shutdown_requested = threading.Event()

    def ping(self) -> ExtensionStatus:
        return ExtensionStatus(code=0, message="pong", uuid=self.uuid)

    def call(self, registry: str, item: str, request: dict) -> ExtensionResponse:
        if registry != "table" or item != TABLE_NAME:
            return self._failure(f"this extension has no {registry} plugin {item!r}")
        action = request.get("action")
        if action == "columns":
            return _answer(0, "OK", self.uuid, self.table.routes())
        if action != "generate":
            return self._failure(f"unknown table action {action!r}")
        try:
            context = json.loads(request.get("context") or "{}")
        except (ValueError, RecursionError) as err:
            log.debug("query context is not JSON: %s", err)
            return self._failure(f"query context is not JSON: {err}")
        return _answer(0, "OK", self.uuid, self.table.generate(context))

    def _failure(self, message: str) -> ExtensionResponse:
        return _answer(1, message, self.uuid, [])

    def shutdown(self) -> None:
        log.info("the extension manager asked this extension to stop")
        self.shutdown_requested.set()


class ExtensionServer:
    """Serves the Handler on a Unix socket, a thread per connection.

    Thrift's own servers cannot be stopped; this one closes when the
    extension registers again under a new uuid, or stops.
    """

    def __init__(self, handler: Handler, path: str) -> None:
        self.path = path
        self._processor = extension_api.Processor(handler)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a stale socket of an earlier registration
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.bind(path)
            self._sock.listen(16)
            st = os.stat(path)
        except OSError:
            self._sock.close()
            raise
        # The path is unlinked on close only while it is still this socket:
        # a restarted osqueryd removes stale `.uuid` sockets and may give the
        # same uuid to another extension.
        self._identity = (st.st_dev, st.st_ino)
        self._sock.settimeout(0.5)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._clients: dict[socket.socket, threading.Thread] = {}
        self._thread = threading.Thread(
            target=self._accept, name="osquery-extension", daemon=True
        )

    def start(self) -> ExtensionServer:
        self._thread.start()
        return self

    def _accept(self) -> None:
        accept_each(self._sock, self._stop, self._admit)

    def _admit(self, client: socket.socket) -> None:
        client.settimeout(None)
        thread = threading.Thread(
            target=self._serve, args=(client,), name="osquery-call", daemon=True
        )
        with self._lock:
            self._clients[client] = thread
        thread.start()

    def _serve(self, client: socket.socket) -> None:
        handle = TSocket.TSocket()
        handle.setHandle(client)
        transport = TTransport.TBufferedTransport(handle)
        protocol = TBinaryProtocol.TBinaryProtocol(transport)
        try:
            while True:
                self._processor.process(protocol, protocol)
        except (TException, OSError) as err:
            # The caller closed its connection (the usual end) or broke it.
            log.debug("osquery connection ended: %s", err)
        finally:
            with self._lock:
                self._clients.pop(client, None)
            client.close()

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(2)
        self._sock.close()
        with self._lock:
            clients = list(self._clients.items())
        for client, _ in clients:
            # Answers being written still go out; no new call is read.
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RD)
        for _, thread in clients:
            thread.join(1)
        with contextlib.suppress(FileNotFoundError):
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._identity:
                os.unlink(self.path)


# -- the manager -------------------------------------------------------------


@contextlib.contextmanager
def manager_client(
    path: str, timeout: float = MANAGER_CALL_TIMEOUT_S
) -> Iterator[manager_api.Client]:
    """A Thrift client of the manager; raises ManagerError when unreachable."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except OSError as err:
        sock.close()
        raise ManagerError(f"{path}: {err.strerror or err}") from None
    handle = TSocket.TSocket()
    handle.setHandle(sock)
    transport = TTransport.TBufferedTransport(handle)
    try:
        yield manager_api.Client(TBinaryProtocol.TBinaryProtocol(transport))
    except (TException, OSError) as err:
        raise ManagerError(f"{path}: {err}") from None
    finally:
        transport.close()


def register(path: str, table: ConnectionsTable) -> int:
    """Registers the table with the manager; its uuid, or ManagerError."""
    info = InternalExtensionInfo(
        name=EXTENSION_NAME,
        version=__version__,
        sdk_version=osquery.__version__,
        min_sdk_version="0.0.0",
    )
    with manager_client(path) as client:
        status = client.registerExtension(
            info=info, registry={"table": {TABLE_NAME: table.routes()}}
        )
    if status.code != 0:
        raise Refused(f"{path} refused the registration: {status.message}")
    return status.uuid


def registered_uuids(path: str) -> set[int]:
    """The uuids the manager lists as registered now; ManagerError if none."""
    with manager_client(path) as client:
        return set(client.extensions())


def deregister(path: str, uuid: int) -> None:
    with manager_client(path, timeout=0.5) as client:
        client.deregisterExtension(uuid)


class State(enum.Enum):
    STARTING = "starting"  # looking for the manager for the first time
    REGISTERED = "registered"  # the manager lists this extension
    LOST = "lost"  # the manager does not answer; looking for it again
    STOPPED = "stopped"


class Registration:
    """Keeps the table registered with one manager; see the module docstring."""

    def __init__(
        self,
        manager_path: str,
        table: ConnectionsTable,
        interval: float,
        timeout: float,
        grace: float,
        stopping=lambda: False,
        clock=time.monotonic,
    ) -> None:
        self.manager_path = manager_path
        self.table = table
        self.interval = interval
        self.timeout = timeout
        self.grace = grace
        self._stopping = stopping
        self._clock = clock
        self.handler = Handler(table)
        self.state = State.STARTING
        self.uuid: int | None = None
        self.server: ExtensionServer | None = None
        self._since = clock()

    def _enter(self, state: State, cause: str) -> None:
        level = logging.WARNING if state is State.LOST else logging.INFO
        log.log(level, "extension %s -> %s: %s", self.state.value, state.value, cause)
        self.state = state
        self._since = self._clock()

    def run(self) -> int:
        """Registers, serves and re-registers until stopped; the exit code."""
        try:
            while True:
                if self._stop_asked():
                    return self._stop()
                code = self._step()
                if code is not None:
                    return code
                self._sleep(
                    self.interval if self.state is State.REGISTERED else RETRY_S
                )
        finally:
            if self.server is not None:
                self.server.close()

    def _step(self) -> int | None:
        """One look at the manager, and what follows; an exit code to stop."""
        try:
            listed = registered_uuids(self.manager_path)
        except ManagerError as err:
            return self._unreachable(str(err))
        if self.uuid in listed:
            if self.state is not State.REGISTERED:
                self._enter(State.REGISTERED, "the manager answers and lists us")
            return None
        if self.state is State.REGISTERED:
            self._enter(
                State.LOST,
                f"the manager no longer lists uuid {self.uuid} "
                "(it restarted, or dropped us)",
            )
        try:
            self._register()
        except Refused as err:
            log.error("%s", err)
            return 1
        except ManagerError as err:
            return self._unreachable(str(err))
        except OSError as err:
            log.error("cannot serve the extension socket: %s", err)
            with contextlib.suppress(ManagerError):
                deregister(self.manager_path, self.uuid or 0)
            return 1
        return None

    def _unreachable(self, reason: str) -> int | None:
        """The manager did not answer: wait on, or the exit code."""
        if self.state is State.REGISTERED:
            self._enter(State.LOST, f"the manager does not answer: {reason}")
            return None
        limit = self.timeout if self.state is State.STARTING else self.grace
        if self._clock() - self._since < limit:
            log.debug("manager still not answering: %s", reason)
            return None
        if self.state is State.STARTING:
            log.error("no osquery extension manager within %gs: %s", limit, reason)
        else:
            log.error("osquery extension manager gone for %gs: %s", limit, reason)
        return 1

    def _register(self) -> None:
        uuid = register(self.manager_path, self.table)
        self.uuid = self.handler.uuid = uuid
        server = ExtensionServer(self.handler, f"{self.manager_path}.{uuid}")
        old, self.server = self.server, server.start()
        if old is not None:
            old.close()
        self._enter(State.REGISTERED, f"table {TABLE_NAME} registered as uuid {uuid}")

    def _stop_asked(self) -> bool:
        return self._stopping() or self.handler.shutdown_requested.is_set()

    def _sleep(self, seconds: float) -> None:
        """Waits, returning early when a stop is asked for."""
        end = self._clock() + seconds
        while not self._stop_asked() and (left := end - self._clock()) > 0:
            time.sleep(min(left, 0.1))

    def _stop(self) -> int:
        asked = self.handler.shutdown_requested.is_set()
        if not asked and self.uuid is not None:
            # Let osquery drop the table now rather than at its next ping.
            with contextlib.suppress(ManagerError):
                deregister(self.manager_path, self.uuid)
        self._enter(
            State.STOPPED, "the manager asked" if asked else "stop signal received"
        )
        return 0


# -- command line ------------------------------------------------------------


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 <= value < 86400:
        raise argparse.ArgumentTypeError(f"seconds out of range: {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description=f"Serve the agent's connections as the osquery table {TABLE_NAME}.",
    )
    p.add_argument(
        "--socket",
        required=True,
        metavar="PATH",
        help="osquery's extension manager socket (osqueryd --extensions_socket)",
    )
    p.add_argument(
        "--connections",
        metavar="PATH",
        help="the agent's connections socket "
        f"(default: {SOCKET_NAME} in the configuration's run_dir)",
    )
    p.add_argument(
        "--config",
        metavar="PATH",
        help="agent configuration, for run_dir "
        "(default: $TOKTRA_CONFIG or /etc/toktra/agent.conf)",
    )
    p.add_argument(
        "--timeout",
        type=_seconds,
        default=3.0,
        metavar="S",
        help="how long to wait for the manager at start (default 3)",
    )
    p.add_argument(
        "--interval",
        type=_seconds,
        default=3.0,
        metavar="S",
        help="seconds between checks that the manager still lists us (default 3)",
    )
    p.add_argument(
        "--grace",
        type=_seconds,
        default=60.0,
        metavar="S",
        help="how long to wait for a manager that stopped answering (default 60)",
    )
    p.add_argument("--verbose", action="store_true", help="log at debug level")
    return p


def _connections_path(args: argparse.Namespace) -> str | None:
    if args.connections:
        return args.connections
    try:
        config = load_config(args.config)
    except ConfigError as err:
        print(f"{PROG}: configuration error: {err}", file=sys.stderr)
        return None
    return os.path.join(config.run_dir, SOCKET_NAME)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    path = _connections_path(args)
    if path is None:
        return 2
    setup_logging("debug" if args.verbose else "info")
    signals = StopSignals()
    table = ConnectionsTable(path)
    extension = Registration(
        args.socket,
        table,
        interval=max(args.interval, RETRY_S),
        timeout=args.timeout,
        grace=args.grace,
        stopping=lambda: signals.stopping,
    )
    log.info(
        "serving %s from %s to the osquery extension manager at %s",
        TABLE_NAME,
        path,
        args.socket,
    )
    return extension.run()
