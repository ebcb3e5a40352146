"""Shipper building blocks: the batcher, the JSONL sink and the HTTPS sink.

The HTTPS sink talks to a real TLS server on 127.0.0.1 that requires a client
certificate; the JSONL sink fills a real (tiny) tmpfs to see ENOSPC.
"""

from __future__ import annotations

import datetime
import email.utils
import gzip
import json
import os
import socket
import ssl
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from agent.shipper.batcher import Batcher
from agent.shipper.sinks import (
    CredentialsRejectedError,
    HttpsSink,
    JsonlSink,
    RejectedBatchError,
    RetryableSinkError,
    SinkError,
    parse_retry_after,
    system_trust_store,
)
from tests import tlsutil
from tests.conftest import fill

IO_TIMEOUT = 5.0
DEVICE_ID = "dev-0f3a"
VERSION = "1.2.3"
# Appears only in response bodies; no error message may repeat it.
SERVER_BODY_MARKER = "server-body-marker-7c1e"


def make_events(count: int, start: int = 0) -> list[dict]:
    return [
        {
            "event_id": f"ev-{n}",
            "conn_id": f"conn-{n}",
            "final": True,
            "comm": "python3",
            "dst_hostname": "api.openai.com",
            "bytes_sent": 100 + n,
        }
        for n in range(start, start + count)
    ]


# --- Batcher -----------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_batcher_empty() -> None:
    batcher = Batcher(max_events=3, max_seconds=5, clock=FakeClock())
    assert len(batcher) == 0
    assert not batcher.due()
    assert batcher.seconds_until_due() is None
    assert batcher.take() == []


def test_batcher_due_when_full() -> None:
    batcher = Batcher(max_events=3, max_seconds=100, clock=FakeClock())
    for event in make_events(2):
        batcher.add(event)
    assert not batcher.due()
    batcher.add(make_events(1, start=2)[0])
    assert batcher.due()
    assert batcher.seconds_until_due() == 0.0
    assert len(batcher) == 3


def test_batcher_due_when_oldest_is_old_enough() -> None:
    clock = FakeClock()
    batcher = Batcher(max_events=50, max_seconds=5, clock=clock)
    first, second = make_events(2)
    batcher.add(first)
    clock.now += 3
    batcher.add(second)
    assert batcher.seconds_until_due() == pytest.approx(2.0)
    clock.now += 1.9
    assert not batcher.due()
    assert batcher.seconds_until_due() == pytest.approx(0.1)
    clock.now += 0.1
    assert batcher.due()
    assert batcher.seconds_until_due() == 0.0
    clock.now += 60
    assert batcher.seconds_until_due() == 0.0


def test_batcher_take_returns_oldest_first_and_at_most_max() -> None:
    clock = FakeClock()
    batcher = Batcher(max_events=2, max_seconds=5, clock=clock)
    events = make_events(5)
    for event in events:
        batcher.add(event)
        clock.now += 1
    assert batcher.take() == events[0:2]
    assert batcher.take() == events[2:4]
    assert len(batcher) == 1
    assert batcher.take() == events[4:5]
    assert batcher.take() == []


def test_batcher_age_counts_from_oldest_remaining_event() -> None:
    clock = FakeClock()
    batcher = Batcher(max_events=2, max_seconds=5, clock=clock)
    events = make_events(3)
    batcher.add(events[0])
    batcher.add(events[1])
    clock.now += 3
    batcher.add(events[2])
    assert batcher.take() == events[0:2]
    assert not batcher.due()
    assert batcher.seconds_until_due() == pytest.approx(5.0)
    clock.now += 4.9
    assert not batcher.due()
    clock.now += 0.1
    assert batcher.due()


def test_batcher_rejects_bad_limits() -> None:
    with pytest.raises(ValueError, match="max_events"):
        Batcher(max_events=0, max_seconds=5)
    with pytest.raises(ValueError, match="max_seconds"):
        Batcher(max_events=1, max_seconds=-1)


# --- JsonlSink -----------------------------------------------------------------


def read_lines(path: Path) -> list[str]:
    return path.read_bytes().decode().splitlines()


def test_jsonl_lines_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text('{"event_id":"earlier"}\n')
    sink = JsonlSink(str(path))
    try:
        first, second = make_events(3), make_events(2, start=3)
        sink.send(first)
        sink.send([])
        sink.send(second)
    finally:
        sink.close()
    lines = read_lines(path)
    assert [json.loads(line) for line in lines] == [
        {"event_id": "earlier"},
        *first,
        *second,
    ]
    # Compact: no padding after separators.
    assert lines[1] == json.dumps(first[0], separators=(",", ":"))


def test_jsonl_starts_on_a_new_line_after_a_torn_file(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text('{"event_id":"earlier"}\n{"event_id":"to')
    sink = JsonlSink(str(path))
    try:
        sink.send(make_events(2))
    finally:
        sink.close()
    lines = read_lines(path)
    assert lines[1] == '{"event_id":"to'
    assert [json.loads(line) for line in lines[2:]] == make_events(2)


def test_jsonl_creates_file_0640(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    old_umask = os.umask(0o022)
    try:
        sink = JsonlSink(str(path))
    finally:
        os.umask(old_umask)
    sink.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_jsonl_reopens_after_rotation(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    sink = JsonlSink(str(path))
    try:
        sink.send(make_events(1))
        path.rename(tmp_path / "events.jsonl.1")
        sink.send(make_events(1, start=1))
    finally:
        sink.close()
    assert json.loads(read_lines(tmp_path / "events.jsonl.1")[0])["event_id"] == "ev-0"
    assert json.loads(read_lines(path)[0])["event_id"] == "ev-1"


def test_jsonl_refuses_unserializable_batch(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    sink = JsonlSink(str(path))
    try:
        with pytest.raises(RejectedBatchError, match="not valid JSON"):
            sink.send([{"event_id": "a", "raw": b"\x00"}])
        with pytest.raises(RejectedBatchError):
            sink.send([{"event_id": "b", "duration_ns": float("nan")}])
    finally:
        sink.close()
    assert path.read_bytes() == b""


def test_jsonl_closed_sink_refuses(tmp_path: Path) -> None:
    sink = JsonlSink(str(tmp_path / "events.jsonl"))
    sink.close()
    sink.close()
    with pytest.raises(SinkError, match="closed"):
        sink.send(make_events(1))


def test_jsonl_open_failure_names_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir" / "events.jsonl"
    with pytest.raises(SinkError, match="ENOENT") as caught:
        JsonlSink(str(missing))
    assert str(missing) in str(caught.value)


def test_jsonl_disk_full_is_retryable_and_batch_can_be_resent(tiny_fs: Path) -> None:
    path = tiny_fs / "events.jsonl"
    sink = JsonlSink(str(path))
    try:
        fill(tiny_fs / "filler")
        batch = make_events(3)
        with pytest.raises(RetryableSinkError) as caught:
            sink.send(batch)
        assert "ENOSPC" in str(caught.value)
        assert str(path) in str(caught.value)
        assert path.read_bytes() == b""

        (tiny_fs / "filler").unlink()
        sink.send(batch)
    finally:
        sink.close()
    assert [json.loads(line) for line in read_lines(path)] == batch


def test_jsonl_short_write_tears_one_line_only(tiny_fs: Path) -> None:
    # Three of the four pages go to a filler, so a 6 KB batch gets 4 KiB in;
    # with the filler gone there is room for the whole batch after that.
    filler = tiny_fs / "filler"
    filler.write_bytes(b"x" * 3 * 4096)
    path = tiny_fs / "events.jsonl"
    batch = [dict(event, pad="p" * 900) for event in make_events(6)]
    sink = JsonlSink(str(path))
    try:
        with pytest.raises(RetryableSinkError, match="short write"):
            sink.send(batch)
        filler.unlink()
        sink.send(batch)
    finally:
        sink.close()

    parsed, torn = [], 0
    for line in read_lines(path):
        try:
            parsed.append(json.loads(line))
        except json.JSONDecodeError:
            torn += 1
    assert torn == 1
    assert parsed[-len(batch) :] == batch


# --- HttpsSink: a real mutual-TLS ingest server ------------------------------


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    envelope: dict
    client_port: int
    client_cn: str


class IngestServer(ThreadingHTTPServer):
    """HTTPS on 127.0.0.1, client certificate required, replies as told."""

    daemon_threads = False  # server_close() joins the handler threads

    def __init__(self, context: ssl.SSLContext) -> None:
        super().__init__(("127.0.0.1", 0), IngestHandler)
        self.context = context
        self.received: list[Received] = []
        self.handshake_errors: list[str] = []
        self.reply_status = 200
        self.reply_headers: dict[str, str] = {}

    @property
    def port(self) -> int:
        return self.server_address[1]

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        sock, address = self.socket.accept()
        sock.settimeout(IO_TIMEOUT)
        # The handshake runs in the handler thread, not in the accept loop.
        wrapped = self.context.wrap_socket(
            sock, server_side=True, do_handshake_on_connect=False
        )
        return wrapped, address

    def handle_error(self, request: object, client_address: object) -> None:
        # Failures are recorded by the handler; keep test output clean.
        pass


class IngestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: IngestServer

    def setup(self) -> None:
        try:
            self.request.do_handshake()
        except (ssl.SSLError, OSError) as err:
            self.server.handshake_errors.append(str(err))
            raise
        super().setup()

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers["Content-Length"]))
        peer = self.request.getpeercert()
        subject = dict(item for rdn in peer["subject"] for item in rdn)
        self.server.received.append(
            Received(
                path=self.path,
                headers=dict(self.headers.items()),
                envelope=json.loads(gzip.decompress(raw)),
                client_port=self.client_address[1],
                client_cn=subject["commonName"],
            )
        )
        body = json.dumps({"error": SERVER_BODY_MARKER}).encode()
        self.send_response(self.server.reply_status)
        for name, value in self.server.reply_headers.items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@dataclass
class Pki:
    ca_file: str
    client_cert: str
    client_key: str
    stranger_cert: str  # a client certificate from a CA the server does not know
    stranger_key: str
    server: tuple[str, str]  # (cert, key) for localhost and 127.0.0.1
    wrong_host: tuple[str, str]  # signed by the CA, for another name
    unknown_ca: tuple[str, str]  # right name, signed by another CA


@pytest.fixture(scope="module")
def ingest_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    out = tmp_path_factory.mktemp("ingest_pki")

    def save(name: str, key_and_cert: tlsutil.KeyAndCert) -> tuple[str, str]:
        key, cert = key_and_cert
        tlsutil.write_pem(out / f"{name}.crt", cert)
        tlsutil.write_pem(out / f"{name}.key", key)
        return str(out / f"{name}.crt"), str(out / f"{name}.key")

    ca = tlsutil.make_ca("toktra test CA")
    other_ca = tlsutil.make_ca("someone else's CA")
    tlsutil.write_pem(out / "ca.crt", ca[1])
    # The device key is Ed25519, as enrollment makes it.
    client_cert, client_key = save(
        "client",
        tlsutil.make_cert(
            ca,
            [],
            [],
            client=True,
            key=ed25519.Ed25519PrivateKey.generate(),
            common_name=DEVICE_ID,
        ),
    )
    stranger_cert, stranger_key = save(
        "stranger", tlsutil.make_cert(other_ca, [], [], client=True)
    )
    return Pki(
        ca_file=str(out / "ca.crt"),
        client_cert=client_cert,
        client_key=client_key,
        stranger_cert=stranger_cert,
        stranger_key=stranger_key,
        server=save("server", tlsutil.make_cert(ca, ["localhost"], ["127.0.0.1"])),
        wrong_host=save("wrong", tlsutil.make_cert(ca, ["ingest.example"], [])),
        unknown_ca=save(
            "unknown", tlsutil.make_cert(other_ca, ["localhost"], ["127.0.0.1"])
        ),
    )


StartServer = Callable[..., IngestServer]


@pytest.fixture
def start_server(ingest_pki: Pki) -> Iterator[StartServer]:
    started: list[tuple[IngestServer, threading.Thread]] = []

    def start(server_pair: tuple[str, str] | None = None) -> IngestServer:
        cert, key = server_pair or ingest_pki.server
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        context.load_verify_locations(ingest_pki.ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
        server = IngestServer(context)
        thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"ingest-{server.port}",
        )
        thread.start()
        started.append((server, thread))
        return server

    yield start
    for server, thread in started:
        server.shutdown()
        server.server_close()
        thread.join(timeout=IO_TIMEOUT)
        assert not thread.is_alive(), "ingest server thread did not stop"


MakeSink = Callable[..., HttpsSink]


@pytest.fixture
def make_sink(ingest_pki: Pki) -> Iterator[MakeSink]:
    """HttpsSink factory; every sink is closed before the servers stop."""
    sinks: list[HttpsSink] = []

    def make(port: int, client: str = "device", **overrides: object) -> HttpsSink:
        files = {
            "device": (ingest_pki.client_cert, ingest_pki.client_key),
            "stranger": (ingest_pki.stranger_cert, ingest_pki.stranger_key),
            "none": ("", ""),
        }[client]
        options: dict = {
            "ca_file": ingest_pki.ca_file,
            "cert_file": files[0],
            "key_file": files[1],
            "timeout": IO_TIMEOUT,
        }
        options.update(overrides)
        sink = HttpsSink(f"https://localhost:{port}/", DEVICE_ID, VERSION, **options)
        sinks.append(sink)
        return sink

    yield make
    for sink in sinks:
        sink.close()


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + IO_TIMEOUT
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def test_https_delivers_gzip_envelope_over_mtls(
    start_server: StartServer, make_sink: MakeSink
) -> None:
    server = start_server()
    sink = make_sink(server.port)
    batch = make_events(3)
    before = datetime.datetime.now(datetime.UTC)
    sink.send(batch)
    sink.send(make_events(1, start=3))

    assert len(server.received) == 2
    first = server.received[0]
    assert first.path == "/v1/events"
    assert first.headers["Content-Type"] == "application/json"
    assert first.headers["Content-Encoding"] == "gzip"
    assert first.headers["User-Agent"] == f"toktra-agent/{VERSION}"
    assert first.client_cn == DEVICE_ID
    envelope = first.envelope
    assert set(envelope) == {"device_id", "agent_version", "sent_at", "events"}
    assert envelope["device_id"] == DEVICE_ID
    assert envelope["agent_version"] == VERSION
    assert envelope["events"] == batch
    assert envelope["sent_at"].endswith("Z")
    sent_at = datetime.datetime.fromisoformat(envelope["sent_at"])
    assert abs(sent_at - before) < datetime.timedelta(minutes=1)
    # Keep-alive: both batches went over one connection.
    assert server.received[1].client_port == first.client_port


@pytest.mark.parametrize(
    ("status", "headers", "error", "retry_after"),
    [
        (500, {}, RetryableSinkError, None),
        (503, {"Retry-After": "7"}, RetryableSinkError, 7.0),
        (408, {}, RetryableSinkError, None),
        (429, {"Retry-After": "3"}, RetryableSinkError, 3.0),
        (400, {}, RejectedBatchError, None),
        (401, {}, CredentialsRejectedError, None),
        (403, {}, CredentialsRejectedError, None),
        (413, {}, RejectedBatchError, None),
        (404, {}, RetryableSinkError, None),  # the URL is wrong, not the batch
        (405, {}, RetryableSinkError, None),
        (302, {"Location": "https://elsewhere.example/"}, RetryableSinkError, None),
    ],
)
def test_https_status_handling(
    start_server: StartServer,
    make_sink: MakeSink,
    status: int,
    headers: dict[str, str],
    error: type[SinkError],
    retry_after: float | None,
) -> None:
    server = start_server()
    server.reply_status = status
    server.reply_headers = headers
    sink = make_sink(server.port)
    with pytest.raises(error) as caught:
        sink.send(make_events(2))
    assert type(caught.value) is error
    assert caught.value.status == status
    if isinstance(caught.value, RetryableSinkError):
        assert caught.value.retry_after == retry_after
    message = str(caught.value)
    assert f"https://localhost:{server.port}/v1/events" in message
    assert str(status) in message
    assert SERVER_BODY_MARKER not in message
    assert "api.openai.com" not in message
    assert len(server.received) == 1


def test_https_wrong_hostname_is_retryable(
    start_server: StartServer, make_sink: MakeSink, ingest_pki: Pki
) -> None:
    server = start_server(ingest_pki.wrong_host)
    sink = make_sink(server.port)
    with pytest.raises(RetryableSinkError) as caught:
        sink.send(make_events(1))
    message = str(caught.value).lower()
    assert "certificate verify failed" in message
    assert "hostname mismatch" in message
    assert server.received == []


def test_https_unknown_server_ca_fails_verify(
    start_server: StartServer, make_sink: MakeSink, ingest_pki: Pki
) -> None:
    server = start_server(ingest_pki.unknown_ca)
    sink = make_sink(server.port)
    with pytest.raises(RetryableSinkError, match="certificate verify failed"):
        sink.send(make_events(1))
    assert server.received == []


def test_https_unknown_server_ca_fails_with_system_store(
    start_server: StartServer, make_sink: MakeSink
) -> None:
    # Without ca_file the system store is used, and it does not know our CA.
    server = start_server()
    sink = make_sink(server.port, ca_file="")
    with pytest.raises(RetryableSinkError, match="certificate verify failed"):
        sink.send(make_events(1))


@pytest.mark.parametrize("client", ["none", "stranger"])
def test_https_server_refuses_missing_or_foreign_client_cert(
    start_server: StartServer, make_sink: MakeSink, client: str
) -> None:
    server = start_server()
    sink = make_sink(server.port, client=client)
    with pytest.raises(RetryableSinkError, match="failed: TLS") as caught:
        sink.send(make_events(1))
    if client == "none":
        assert "no client certificate is configured" in str(caught.value)
    elif "TLS alert" in str(caught.value):
        # A certificate the server says it does not trust is a reason to
        # enroll again. Under TLS 1.3 the alert can lose the race with the
        # server's close, and then the client sees only an EOF: that stays
        # an ordinary retry.
        assert isinstance(caught.value, CredentialsRejectedError)
    else:
        assert type(caught.value) is RetryableSinkError
    wait_for(lambda: server.handshake_errors, "the server to refuse the handshake")
    assert server.received == []


def test_https_connection_refused(make_sink: MakeSink) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sink = make_sink(port)
    with pytest.raises(RetryableSinkError, match="ECONNREFUSED"):
        sink.send(make_events(1))


def test_https_silent_server_times_out(make_sink: MakeSink) -> None:
    # Listening but never accepting: TCP connects, TLS never answers.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        sink = make_sink(silent.getsockname()[1], timeout=0.3)
        started = time.monotonic()
        with pytest.raises(RetryableSinkError, match=r"0\.3s"):
            sink.send(make_events(1))
        assert time.monotonic() - started < IO_TIMEOUT


def test_https_configuration_errors(ingest_pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(SinkError, match="https://"):
        HttpsSink("http://localhost:1", DEVICE_ID, VERSION)
    with pytest.raises(SinkError, match="together"):
        HttpsSink(
            "https://localhost:1", DEVICE_ID, VERSION, cert_file=ingest_pki.client_cert
        )
    missing = str(tmp_path / "missing-ca.pem")
    with pytest.raises(SinkError, match=r"missing-ca\.pem"):
        HttpsSink("https://localhost:1", DEVICE_ID, VERSION, ca_file=missing)


def test_https_unserializable_batch_is_rejected_without_sending(
    start_server: StartServer, make_sink: MakeSink
) -> None:
    server = start_server()
    sink = make_sink(server.port)
    with pytest.raises(RejectedBatchError, match="not valid JSON"):
        sink.send([{"event_id": "a", "raw": object()}])
    assert server.received == []


# --- Helpers -------------------------------------------------------------------


def test_parse_retry_after() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after(None, now) is None
    assert parse_retry_after("3", now) == 3.0
    assert parse_retry_after(" 120 ", now) == 120.0
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after("-5", now) is None
    assert parse_retry_after("9" * 400, now) == 1e12  # the caller caps it
    later = email.utils.formatdate(now + 90, usegmt=True)
    assert parse_retry_after(later, now) == pytest.approx(90.0)
    earlier = email.utils.formatdate(now - 90, usegmt=True)
    assert parse_retry_after(earlier, now) == 0.0


def test_system_trust_store_is_a_real_location() -> None:
    store = system_trust_store()
    assert store is True or os.path.exists(store)
