"""The kernel side of ClientHello capture, with the real object.

A client here builds a real ClientHello with Python's ssl module on memory
BIOs and writes it itself, so each test decides how the bytes leave (one
write, two writes, writev, sendmsg, sendto) and what follows them. What
the object copies must be exactly the first TLS record: never a byte
before a connection's first send is known to be TLS, never a byte after
the record. The object copies per system call, so each `sendall` here is
one piece as it sees it, however TCP then packs the bytes.
"""

from __future__ import annotations

import os
import socket
import time

import pytest

from agent.collector import probes
from agent.collector.clienthello import Outcome, parse
from agent.collector.records import HELLO_MAX, Hello, Kind, Record, Stat, decode
from tests.conftest import needs_root_and_bpf
from tests.harness import free_port, real_hello

SECRET = b"TOKTRA-SECRET-after-the-hello"


@pytest.fixture(autouse=True)
def _root():
    needs_root_and_bpf()


@pytest.fixture
def listener():
    """A plain TCP server that accepts and reads everything (no TLS)."""
    port = free_port()
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(64)
    yield srv, port
    srv.close()


class Captured:
    """Runs the object on one port and gathers its records by source port."""

    def __init__(self, port: int) -> None:
        self.capture = probes.load([port])
        self.records: list[Record | Hello] = []
        self.ring = self.capture.ring_buffer(
            lambda data: self.records.append(decode(data))
        )

    def close(self) -> None:
        self.ring.free()
        self.capture.close()

    def wait_close(self, src_port: int) -> Record:
        deadline = time.monotonic() + 10
        while True:
            self.ring.poll(50)
            self.ring.consume()
            for r in self.records:
                if (
                    isinstance(r, Record)
                    and r.kind is Kind.CLOSE
                    and r.src_port == src_port
                ):
                    return r
            assert time.monotonic() < deadline, "no close record"

    def hello_of(self, src_port: int) -> list[Hello]:
        opens = [
            r
            for r in self.records
            if isinstance(r, Record) and r.kind is Kind.OPEN and r.src_port == src_port
        ]
        assert len(opens) == 1
        key = (opens[0].sock, opens[0].start_ns)
        return [
            r
            for r in self.records
            if isinstance(r, Hello) and (r.sock, r.start_ns) == key
        ]


@pytest.fixture
def captured(listener):
    _, port = listener
    c = Captured(port)
    yield c
    c.close()


def connect(listener) -> tuple[socket.socket, socket.socket]:
    srv, port = listener
    client = socket.create_connection(("127.0.0.1", port))
    server, _ = srv.accept()
    return client, server


def finish(client: socket.socket, server: socket.socket) -> int:
    port = client.getsockname()[1]
    client.close()
    server.close()
    return port


def test_one_write_copies_the_record_and_nothing_after(listener, captured):
    hello = real_hello("api.openai.com")
    client, server = connect(listener)
    client.sendall(hello + SECRET)  # one write: the hello, then more
    client.sendall(SECRET)
    port = finish(client, server)
    captured.wait_close(port)
    pieces = captured.hello_of(port)
    data = b"".join(p.data for p in pieces)
    assert data == hello
    assert SECRET not in data
    assert parse(data).sni == b"api.openai.com"
    assert captured.capture.stats()[Stat.HELLO_CAPTURED] == 1


def test_a_hello_split_over_two_writes_is_joined(listener, captured):
    hello = real_hello("api.anthropic.com")
    client, server = connect(listener)
    client.sendall(hello[:40])
    client.sendall(hello[40:] + SECRET)
    port = finish(client, server)
    captured.wait_close(port)
    pieces = captured.hello_of(port)
    assert [(p.chunk, p.offset, len(p.data)) for p in pieces] == [
        (0, 0, 40),
        (1, 40, len(hello) - 40),
    ]
    assert b"".join(p.data for p in pieces) == hello


@pytest.mark.parametrize("how", ["writev", "sendmsg", "sendto", "write"])
def test_every_send_call_is_seen(listener, captured, how):
    hello = real_hello("api.mistral.ai")
    client, server = connect(listener)
    if how == "writev":
        os.writev(client.fileno(), [hello, SECRET])
    elif how == "sendmsg":
        client.sendmsg([hello, SECRET])
    elif how == "sendto":
        client.sendto(hello, ("127.0.0.1", listener[1]))
    else:
        os.write(client.fileno(), hello)
    port = finish(client, server)
    captured.wait_close(port)
    assert b"".join(p.data for p in captured.hello_of(port)) == hello


def test_a_first_send_that_is_not_tls_is_never_copied(listener, captured):
    client, server = connect(listener)
    client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + SECRET)
    client.sendall(real_hello("api.openai.com"))  # too late: not the first
    port = finish(client, server)
    captured.wait_close(port)
    assert captured.hello_of(port) == []
    assert captured.capture.stats()[Stat.HELLO_NOT_TLS] == 1


def test_a_first_send_shorter_than_a_record_header_stops_capture(listener, captured):
    hello = real_hello("api.openai.com")
    client, server = connect(listener)
    client.sendall(hello[:3])
    client.sendall(hello[3:])
    port = finish(client, server)
    captured.wait_close(port)
    assert captured.hello_of(port) == []
    assert captured.capture.stats()[Stat.HELLO_PARTIAL] == 1


def test_a_huge_clienthello_is_bounded_by_the_cap(listener, captured):
    """Record and handshake both claim 16 KiB: HELLO_MAX bytes are copied."""
    body = bytes([1]) + (0x4000 - 4).to_bytes(3, "big") + b"\x00" * 3000
    record = bytes([22, 3, 1, 0x40, 0x00]) + body
    client, server = connect(listener)
    client.sendall(record)
    port = finish(client, server)
    captured.wait_close(port)
    data = b"".join(p.data for p in captured.hello_of(port))
    assert data == record[:HELLO_MAX]
    assert parse(data).outcome in (Outcome.TRUNCATED, Outcome.MALFORMED)


def test_a_record_longer_than_its_clienthello_stops_at_the_hello(listener, captured):
    """A record header that claims more than the ClientHello inside it holds
    must not pull the process's next writes into the copy."""
    hello = real_hello("api.openai.com")
    handshake = hello[5:]
    lying = bytes([22, 3, 1]) + (len(handshake) + 500).to_bytes(2, "big") + handshake
    client, server = connect(listener)
    client.sendall(lying)
    client.sendall(SECRET * 10)
    port = finish(client, server)
    captured.wait_close(port)
    data = b"".join(p.data for p in captured.hello_of(port))
    assert data == lying
    assert SECRET not in data
    # The ClientHello itself is whole: its name is found all the same.
    assert parse(data).sni == b"api.openai.com"


def test_a_handshake_that_is_not_a_clienthello_is_not_copied(listener, captured):
    hello = bytearray(real_hello("api.openai.com"))
    hello[5] = 2  # ServerHello
    client, server = connect(listener)
    client.sendall(bytes(hello))
    port = finish(client, server)
    captured.wait_close(port)
    assert captured.hello_of(port) == []
    assert captured.capture.stats()[Stat.HELLO_NOT_TLS] == 1


def test_writes_to_other_files_are_not_copied(listener, captured, tmp_path):
    """A process waiting for a ClientHello writes elsewhere first."""
    hello = real_hello("api.openai.com")
    client, server = connect(listener)
    with open(tmp_path / "log", "wb", buffering=0) as f:
        f.write(hello)  # the same bytes, to a file: not a socket
    r, w = os.pipe()
    os.write(w, hello)
    os.close(r)
    os.close(w)
    client.sendall(hello)
    port = finish(client, server)
    captured.wait_close(port)
    pieces = captured.hello_of(port)
    assert len(pieces) == 1 and pieces[0].data == hello
