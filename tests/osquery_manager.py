"""A stand-in for osqueryd's extension manager, for the extension's tests.

No osquery binary can be installed here, so this plays osqueryd's part with
the Thrift interface the `osquery` package from PyPI generated from
osquery.thrift (ExtensionManager.Processor on the manager's socket,
Extension.Client towards each extension), behaving as osqueryd's
ExtensionManagerHandler does where the extension can tell: a random 16-bit
uuid per registration, duplicate names refused, `extensions()` listing the
registrations (forget() drops one, as osqueryd does after missed pings),
stale `{socket}.*` files removed when (re)started, and calls to an
extension on `{socket}.{uuid}`. What it leaves out: SQL, and the pings
osqueryd sends its extensions.

Every wait has a deadline, and stop() closes every socket it opened.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import random
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from osquery.extensions import Extension, ExtensionManager
from osquery.extensions.ttypes import (
    ExtensionResponse,
    ExtensionStatus,
    InternalExtensionInfo,
)
from thrift.protocol import TBinaryProtocol
from thrift.Thrift import TException
from thrift.transport import TSocket, TTransport

from agent.runtime import accept_each


@dataclass
class Registration:
    name: str
    version: str
    registry: dict
    uuid: int


class _Handler(ExtensionManager.Iface):
    def __init__(self, owner: StandInManager) -> None:
        self._owner = owner

    def ping(self) -> ExtensionStatus:
        return ExtensionStatus(code=0, message="pong", uuid=0)

    def call(self, registry, item, request) -> ExtensionResponse:
        return ExtensionResponse(
            status=ExtensionStatus(code=1, message="no core plugins here"),
            response=[],
        )

    def shutdown(self) -> None:
        pass

    def extensions(self) -> dict:
        with self._owner.lock:
            return {
                r.uuid: InternalExtensionInfo(name=r.name, version=r.version)
                for r in self._owner.active.values()
            }

    def options(self) -> dict:
        return {}

    def registerExtension(self, info, registry) -> ExtensionStatus:
        owner = self._owner
        with owner.lock:
            owner.calls.append(("register", info.name))
            if any(r.name == info.name for r in owner.active.values()):
                return ExtensionStatus(code=1, message="Duplicate extension registered")
            uuid = random.randint(1, 65535)
            while uuid in owner.active:
                uuid = random.randint(1, 65535)
            reg = Registration(info.name, info.version, registry, uuid)
            owner.active[uuid] = reg
            owner.registrations.append(reg)
            owner.changed.notify_all()
        return ExtensionStatus(code=0, message="OK", uuid=uuid)

    def deregisterExtension(self, uuid) -> ExtensionStatus:
        with self._owner.lock:
            self._owner.calls.append(("deregister", uuid))
            if self._owner.active.pop(uuid, None) is None:
                return ExtensionStatus(code=1, message="No extension UUID registered")
            self._owner.changed.notify_all()
        return ExtensionStatus(code=0, message="OK", uuid=uuid)

    def query(self, sql) -> ExtensionResponse:
        return ExtensionResponse(
            status=ExtensionStatus(code=1, message="no SQL in the stand-in"),
            response=[],
        )

    def getQueryColumns(self, sql) -> ExtensionResponse:
        return self.query(sql)


class StandInManager:
    """The manager's socket at `path`; start(), stop(), start() again."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.active: dict[int, Registration] = {}
        # Every registration and every register/deregister call, in order,
        # across restarts.
        self.registrations: list[Registration] = []
        self.calls: list[tuple[str, object]] = []
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._clients: set[socket.socket] = set()

    def start(self) -> StandInManager:
        # A new osqueryd knows no extension and removes their old sockets.
        with self.lock:
            self.active.clear()
        for stale in glob.glob(glob.escape(self.path) + ".*"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(stale)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(self.path)
        sock.listen(16)
        sock.settimeout(0.2)
        self._sock = sock
        processor = ExtensionManager.Processor(_Handler(self))
        self._thread = threading.Thread(
            target=self._accept, args=(sock, processor), daemon=True
        )
        self._thread.start()
        return self

    def _accept(self, sock: socket.socket, processor) -> None:
        def admit(client: socket.socket) -> None:
            client.settimeout(5)
            with self.lock:
                self._clients.add(client)
            threading.Thread(
                target=self._serve, args=(client, processor), daemon=True
            ).start()

        # Runs until the socket is closed; the event is never set.
        accept_each(sock, threading.Event(), admit)

    def _serve(self, client: socket.socket, processor) -> None:
        handle = TSocket.TSocket()
        handle.setHandle(client)
        transport = TTransport.TBufferedTransport(handle)
        protocol = TBinaryProtocol.TBinaryProtocol(transport)
        try:
            while True:
                processor.process(protocol, protocol)
        except (TException, OSError):
            pass
        finally:
            with self.lock:
                self._clients.discard(client)
            client.close()

    def stop(self) -> None:
        """As osqueryd dying: the socket goes away, open connections break."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        if self._thread is not None:
            self._thread.join(5)
        with self.lock:
            clients = list(self._clients)
        for client in clients:
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def forget(self, uuid: int) -> None:
        """As osqueryd dropping an extension that missed its pings."""
        with self.lock:
            del self.active[uuid]

    def wait_registered(self, count: int = 1, timeout: float = 10) -> Registration:
        """The count-th registration ever made, waiting for it."""
        deadline = time.monotonic() + timeout
        with self.lock:
            while len(self.registrations) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"{len(self.registrations)} registrations after "
                        f"{timeout}s, expected {count}"
                    )
                self.changed.wait(left)
            return self.registrations[count - 1]

    def wait_deregistered(self, uuid: int, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        with self.lock:
            while uuid in self.active:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"uuid {uuid} still registered")
                self.changed.wait(left)

    @contextlib.contextmanager
    def extension(self, uuid: int, timeout: float = 5) -> Iterator[Extension.Client]:
        """A client of the extension registered as uuid, as osqueryd makes one."""
        path = f"{self.path}.{uuid}"
        deadline = time.monotonic() + timeout
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        while True:
            try:
                sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    sock.close()
                    raise AssertionError(f"no extension socket at {path}") from None
                time.sleep(0.05)
        handle = TSocket.TSocket()
        handle.setHandle(sock)
        transport = TTransport.TBufferedTransport(handle)
        try:
            yield Extension.Client(TBinaryProtocol.TBinaryProtocol(transport))
        finally:
            transport.close()

    def columns(self, uuid: int, table: str) -> ExtensionResponse:
        with self.extension(uuid) as client:
            return client.call("table", table, {"action": "columns"})

    def generate(
        self, uuid: int, table: str, context: dict | str | None = None
    ) -> ExtensionResponse:
        """osqueryd's request for rows; context is its query context JSON."""
        request = {"action": "generate"}
        if context is not None:
            request["context"] = (
                context if isinstance(context, str) else json.dumps(context)
            )
        with self.extension(uuid) as client:
            return client.call("table", table, request)

    def shutdown_extension(self, uuid: int) -> None:
        """What osqueryd asks of each extension when it stops cleanly."""
        with self.extension(uuid) as client:
            client.shutdown()


def constraints(**columns: tuple[int, str] | list[tuple[int, str]]) -> dict:
    """A query context as osqueryd sends it: column=(op, expr) or a list."""
    affinity = {
        "pid": "INTEGER",
        "dst_port": "INTEGER",
        "bytes_sent": "BIGINT",
        "bytes_received": "BIGINT",
        "timestamp": "BIGINT",
    }
    out = []
    for name, given in columns.items():
        items = given if isinstance(given, list) else [given]
        out.append(
            {
                "name": name,
                "list": [{"op": op, "expr": expr} for op, expr in items],
                "affinity": affinity.get(name, "TEXT"),
            }
        )
    return {"constraints": out}
