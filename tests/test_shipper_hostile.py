"""Hostile ingest and enrollment servers: the shipper neither hangs nor crashes.

Each server here is a real TLS socket on 127.0.0.1 that reads one request and
then answers however the test scripts it: cut short, one byte at a time,
endlessly, or compressed though nobody asked.
"""

from __future__ import annotations

import gzip
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.shipper.identity import EnrollmentError, Identity
from agent.shipper.sinks import HttpsSink, RetryableSinkError
from tests import tlsutil

Script = Callable[[ssl.SSLSocket], None]


class ScriptedServer:
    def __init__(self, pki_dir: Path, script: Script) -> None:
        ca = tlsutil.make_ca("hostile test CA")
        key, cert = tlsutil.make_cert(ca, ["localhost"], ["127.0.0.1"])
        self.ca_file = pki_dir / "ca.crt"
        tlsutil.write_pem(self.ca_file, ca[1])
        tlsutil.write_pem(pki_dir / "server.crt", cert)
        tlsutil.write_pem(pki_dir / "server.key", key)
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(pki_dir / "server.crt", pki_dir / "server.key")
        self.script = script
        self.requests: list[bytes] = []
        self.written = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            raw, _ = self.listener.accept()
        except OSError:
            return
        raw.settimeout(30)
        try:
            with self.context.wrap_socket(raw, server_side=True) as tls:
                head = b""
                while b"\r\n\r\n" not in head:
                    head += tls.recv(4096)
                top, body = head.split(b"\r\n\r\n", 1)
                length = int(
                    top.lower().split(b"content-length: ")[1].split(b"\r\n")[0]
                )
                while len(body) < length:
                    body += tls.recv(65536)
                self.requests.append(top)
                self.script(tls)
        except OSError:
            pass  # the client gave up: what these tests expect of it

    def close(self) -> None:
        self.listener.close()
        self.thread.join(30)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[[Script], ScriptedServer]]:
    servers: list[ScriptedServer] = []

    def start(script: Script) -> ScriptedServer:
        server = ScriptedServer(tmp_path, script)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def identity(server: ScriptedServer, tmp_path: Path, timeout: float = 5.0):
    return Identity(
        str(tmp_path),
        "device-1",
        f"https://127.0.0.1:{server.port}/v1/enroll",
        "token",
        verify=str(server.ca_file),
        timeout=timeout,
    )


def sink(server: ScriptedServer, timeout: float = 5.0) -> HttpsSink:
    return HttpsSink(
        f"https://127.0.0.1:{server.port}",
        "device-1",
        "0",
        ca_file=str(server.ca_file),
        timeout=timeout,
    )


def cut_short(tls: ssl.SSLSocket) -> None:
    tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1032\r\n\r\n" + b'{"certif' * 8)


def trickle(tls: ssl.SSLSocket) -> None:
    for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}":
        tls.sendall(bytes([byte]))
        time.sleep(0.4)


def test_enrollment_answer_cut_short_is_an_error(serve, tmp_path: Path) -> None:
    server = serve(cut_short)
    with pytest.raises(EnrollmentError, match="failed"):
        identity(server, tmp_path).enroll()
    assert not (tmp_path / "device.key").exists()


def test_trickling_enrollment_answer_hits_the_deadline(serve, tmp_path: Path) -> None:
    server = serve(trickle)
    with pytest.raises(EnrollmentError, match="no complete answer within 1s"):
        identity(server, tmp_path, timeout=1.0).enroll()


def test_trickling_ingest_answer_hits_the_deadline(serve) -> None:
    server = serve(trickle)
    with pytest.raises(RetryableSinkError, match="no complete answer within 1s"):
        sink(server, timeout=1.0).send([{"event_id": "1"}])


def test_endless_answer_is_not_read(serve) -> None:
    huge = 256 * 1024 * 1024

    def endless(tls: ssl.SSLSocket) -> None:
        tls.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {huge}\r\n\r\n".encode())
        chunk = b"x" * 65536
        for _ in range(huge // len(chunk)):
            tls.sendall(chunk)
            server.written += len(chunk)

    server = serve(endless)
    sink(server).send([{"event_id": "1"}])  # 200: delivered
    server.thread.join(30)
    # The client stopped reading after 64 KiB and closed; socket buffers
    # hold a few MiB at most.
    assert server.written < huge // 8


def test_no_compressed_answer_is_asked_for(serve, tmp_path: Path) -> None:
    bomb = gzip.compress(b"\0" * (64 * 1024 * 1024))

    def gzipped(tls: ssl.SSLSocket) -> None:
        tls.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\n"
            + f"Content-Length: {len(bomb)}\r\n\r\n".encode()
            + bomb
        )

    server = serve(gzipped)
    with pytest.raises(EnrollmentError, match=r"over 1 MiB|not JSON"):
        identity(server, tmp_path).enroll()
    assert b"accept-encoding: identity" in server.requests[0].lower()
