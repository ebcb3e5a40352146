"""The reference ingest and enrollment service, over real HTTPS on 127.0.0.1.

Each test gets its own IngestServer on a free port with a fresh directory.
Well-behaved clients are `requests` sessions that ignore the environment's
proxy settings; misbehaving ones are raw `ssl` sockets closed with linger 0.
The command line runs in a subprocess, as an operator would start it.
"""

from __future__ import annotations

import contextlib
import datetime
import gzip
import json
import os
import queue
import signal
import socket
import ssl
import stat
import struct
import subprocess
import threading
import time
import tomllib
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.ingest.ca import CAError, DevCA, EnrollmentError
from agent.ingest.cli import READY_LINE
from agent.ingest.server import IncomingBatch, IngestServer
from tests import tlsutil

IO_TIMEOUT = 5.0
TOKEN = "enroll-token-5b2e91"
DEVICE_ID = "dev-0f3a"
ROOT = Path(__file__).resolve().parent.parent
PYTHON = str(ROOT / ".venv/bin/python")
CLI_CODE = "import sys; from agent.ingest.cli import main; sys.exit(main(sys.argv[1:]))"


@dataclass
class Device:
    device_id: str
    key: ed25519.Ed25519PrivateKey
    cert: x509.Certificate
    cert_file: str
    key_file: str


@pytest.fixture
def server(tmp_path: Path) -> Iterator[IngestServer]:
    running = IngestServer(str(tmp_path / "ingest"), token=TOKEN).start()
    yield running
    running.stop()


@pytest.fixture
def http() -> Iterator[requests.Session]:
    session = requests.Session()
    # No proxies and no REQUESTS_CA_BUNDLE from the environment: every
    # request goes straight to the test server.
    session.trust_env = False
    yield session
    session.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_csr(key: tlsutil.PrivateKey | rsa.RSAPrivateKey, common_name: str) -> str:
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .sign(key, algorithm)
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def enroll_body(
    csr: str, device_id: str = DEVICE_ID, token: str | None = TOKEN
) -> dict[str, str]:
    body = {"csr": csr, "device_id": device_id, "org_id": "org-1"}
    if token is not None:
        body["enrollment_token"] = token
    return body


def post_enroll(
    http: requests.Session,
    server: IngestServer,
    body: object,
    device: Device | None = None,
) -> requests.Response:
    return http.post(
        server.enroll_url,
        json=body,
        verify=server.ca_file,
        cert=(device.cert_file, device.key_file) if device else None,
        timeout=IO_TIMEOUT,
    )


def enroll_device(
    http: requests.Session, server: IngestServer, directory: Path, device_id: str
) -> Device:
    key = ed25519.Ed25519PrivateKey.generate()
    response = post_enroll(
        http, server, enroll_body(make_csr(key, device_id), device_id)
    )
    assert response.status_code == 200, response.text
    cert = x509.load_pem_x509_certificate(response.json()["certificate"].encode())
    cert_file, key_file = directory / f"{device_id}.crt", directory / f"{device_id}.key"
    tlsutil.write_pem(cert_file, cert)
    tlsutil.write_pem(key_file, key)
    return Device(device_id, key, cert, str(cert_file), str(key_file))


@pytest.fixture
def device(server: IngestServer, http: requests.Session, tmp_path: Path) -> Device:
    return enroll_device(http, server, tmp_path, DEVICE_ID)


def make_events(count: int, start: int = 0) -> list[dict]:
    return [
        {"event_id": f"ev-{n}", "conn_id": f"conn-{n}", "bytes_sent": 100 + n}
        for n in range(start, start + count)
    ]


def envelope(events: list[dict], device_id: str = DEVICE_ID) -> dict:
    return {
        "device_id": device_id,
        "agent_version": "1.2.3",
        "sent_at": "2026-01-01T00:00:00.000Z",
        "events": events,
    }


def gz(value: object) -> bytes:
    return gzip.compress(json.dumps(value).encode())


def post_events(
    http: requests.Session,
    server: IngestServer,
    device: Device | None,
    body: bytes,
    headers: dict[str, str] | None = None,
) -> requests.Response:
    return http.post(
        server.url + "/v1/events",
        data=body,
        headers={
            "Content-Type": "application/json",
            "Content-Encoding": "gzip",
            **(headers or {}),
        },
        verify=server.ca_file,
        cert=(device.cert_file, device.key_file) if device else None,
        timeout=IO_TIMEOUT,
    )


@contextlib.contextmanager
def raw_connection(port: int) -> Iterator[socket.socket]:
    """A TCP connection that resets instead of closing politely."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    try:
        yield sock
    finally:
        sock.close()


@contextlib.contextmanager
def tls_connection(
    server: IngestServer, cert: tuple[str, str] | None = None
) -> Iterator[ssl.SSLSocket]:
    context = ssl.create_default_context(cafile=server.ca_file)
    if cert:
        context.load_cert_chain(*cert)
    with raw_connection(server.port) as sock:
        tls = context.wrap_socket(sock, server_hostname="127.0.0.1")
        try:
            yield tls
        finally:
            tls.close()


def read_response(sock: ssl.SSLSocket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a full answer: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    status_line, *header_lines = head.decode().split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    while len(body) < int(headers.get("content-length", "0")):
        chunk = sock.recv(65536)
        assert chunk, "connection closed inside the body"
        body += chunk
    return int(status_line.split()[1]), headers, body


def wait_for(condition, what: str, timeout: float = IO_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


# --- The CA ------------------------------------------------------------------------


def test_ca_is_created_once_and_then_reused(tmp_path: Path) -> None:
    ca = DevCA.load_or_create(str(tmp_path / "ca"))
    cert = x509.load_pem_x509_certificate(Path(ca.ca_file).read_bytes())
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    years = (cert.not_valid_after_utc - cert.not_valid_before_utc).days / 365
    assert 9.9 < years < 10.1
    assert not (tmp_path / "ca").stat().st_mode & 0o022
    assert stat.S_IMODE((tmp_path / "ca/ca.key").stat().st_mode) == 0o600
    assert not [p.name for p in (tmp_path / "ca").iterdir() if ".tmp" in p.name]

    again = DevCA.load_or_create(str(tmp_path / "ca"))
    assert again.chain_pem() == ca.chain_pem() == Path(ca.ca_file).read_bytes()


def test_ca_key_without_certificate_is_repaired(tmp_path: Path) -> None:
    first = DevCA.load_or_create(str(tmp_path))
    os.unlink(first.ca_file)
    second = DevCA.load_or_create(str(tmp_path))
    assert second.cert.public_key() == first.key.public_key()


def test_ca_certificate_without_key_is_an_error(tmp_path: Path) -> None:
    DevCA.load_or_create(str(tmp_path))
    os.unlink(tmp_path / "ca.key")
    with pytest.raises(CAError, match=r"key .* is missing"):
        DevCA.load_or_create(str(tmp_path))


def test_server_credentials_are_reused_until_the_names_change(tmp_path: Path) -> None:
    ca = DevCA.load_or_create(str(tmp_path))
    cert_file, key_file = ca.server_credentials(["localhost"], ["127.0.0.1"])
    first = Path(cert_file).read_bytes()
    assert ca.server_credentials(["localhost"], ["127.0.0.1"]) == (cert_file, key_file)
    assert Path(cert_file).read_bytes() == first
    ca.server_credentials(["localhost"], ["::1"])
    renewed = x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
    san = renewed.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert [str(ip) for ip in san.value.get_values_for_type(x509.IPAddress)] == ["::1"]
    eku = renewed.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    renewed.verify_directly_issued_by(ca.cert)


@pytest.mark.parametrize(
    "device_id", ["", "x" * 65, "x" * 129, "a/b", "dev 1", "dév", "a\nb"]
)
def test_sign_csr_refuses_odd_device_ids(tmp_path: Path, device_id: str) -> None:
    ca = DevCA.load_or_create(str(tmp_path))
    csr = make_csr(ed25519.Ed25519PrivateKey.generate(), "placeholder").encode()
    with pytest.raises(EnrollmentError, match="device_id"):
        ca.sign_csr(csr, device_id, datetime.timedelta(days=1))


def test_sign_csr_accepts_the_whole_device_id_alphabet(tmp_path: Path) -> None:
    ca = DevCA.load_or_create(str(tmp_path))
    device_id = "Az09._-" + "x" * 57  # 64, the most a CN can hold
    csr = make_csr(ed25519.Ed25519PrivateKey.generate(), device_id).encode()
    cert = x509.load_pem_x509_certificate(
        ca.sign_csr(csr, device_id, datetime.timedelta(days=1))
    )
    assert cert.subject.rfc4514_string() == f"CN={device_id}"


# --- Enrollment ----------------------------------------------------------------


def test_enroll_with_token_issues_a_device_certificate(
    server: IngestServer, http: requests.Session
) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    response = post_enroll(http, server, enroll_body(make_csr(key, DEVICE_ID)))
    assert response.status_code == 200, response.text
    answer = response.json()
    now = datetime.datetime.now(datetime.UTC)

    cert = x509.load_pem_x509_certificate(answer["certificate"].encode())
    ca_pem = Path(server.ca_file).read_bytes()
    assert answer["chain"].encode() == ca_pem
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca_pem))
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert [attr.value for attr in cn] == [DEVICE_ID]
    assert isinstance(cert.public_key(), ed25519.Ed25519PublicKey)
    assert cert.public_key() == key.public_key()
    lifetime = cert.not_valid_after_utc - now
    assert abs(lifetime - datetime.timedelta(days=90)) < datetime.timedelta(minutes=1)
    backdate = now - cert.not_valid_before_utc
    assert datetime.timedelta(seconds=55) < backdate < datetime.timedelta(seconds=90)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.extensions.get_extension_for_class(
        x509.KeyUsage
    ).value.digital_signature

    ca_dir = Path(server.directory)
    assert stat.S_IMODE((ca_dir / "ca.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((ca_dir / "server.key").stat().st_mode) == 0o600
    [record] = server.requests
    assert (record.path, record.client_cn, record.status) == ("/v1/enroll", None, 200)


@pytest.mark.parametrize(
    ("token", "status"),
    [("wrong-token", 403), (None, 401), ("", 401), (TOKEN + "x", 403), ("ü", 403)],
)
def test_enroll_refuses_a_missing_or_wrong_token(
    server: IngestServer, http: requests.Session, token: str | None, status: int
) -> None:
    csr = make_csr(ed25519.Ed25519PrivateKey.generate(), DEVICE_ID)
    response = post_enroll(http, server, enroll_body(csr, token=token))
    assert response.status_code == status
    assert "error" in response.json()
    assert TOKEN not in response.text


def test_enroll_lifetime_follows_the_setting(
    tmp_path: Path, http: requests.Session
) -> None:
    lifetime = datetime.timedelta(hours=2)
    with IngestServer(str(tmp_path), token=TOKEN, cert_lifetime=lifetime) as server:
        device = enroll_device(http, server, tmp_path, DEVICE_ID)
    left = device.cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
    assert abs(left - lifetime) < datetime.timedelta(minutes=1)


@pytest.mark.parametrize(
    "key",
    [
        pytest.param(lambda: rsa.generate_private_key(65537, 2048), id="rsa"),
        pytest.param(lambda: ec.generate_private_key(ec.SECP256R1()), id="ec"),
    ],
)
def test_enroll_rejects_keys_other_than_ed25519(
    server: IngestServer, http: requests.Session, key
) -> None:
    response = post_enroll(http, server, enroll_body(make_csr(key(), DEVICE_ID)))
    assert response.status_code == 400
    assert "only Ed25519" in response.json()["error"]


def test_enroll_rejects_a_csr_for_another_name(
    server: IngestServer, http: requests.Session
) -> None:
    csr = make_csr(ed25519.Ed25519PrivateKey.generate(), "someone-else")
    response = post_enroll(http, server, enroll_body(csr))
    assert response.status_code == 400
    assert "CN" in response.json()["error"]


def _tampered_csr() -> str:
    der = x509.load_pem_x509_csr(
        make_csr(ed25519.Ed25519PrivateKey.generate(), DEVICE_ID).encode()
    ).public_bytes(serialization.Encoding.DER)
    # The Ed25519 signature is the last 64 bytes; change one of them.
    broken = x509.load_der_x509_csr(der[:-1] + bytes([der[-1] ^ 1]))
    return broken.public_bytes(serialization.Encoding.PEM).decode()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        pytest.param(b"{not json", "not JSON", id="not-json"),
        pytest.param(b"[1, 2]", "JSON object", id="not-object"),
        pytest.param(
            {"device_id": DEVICE_ID, "enrollment_token": TOKEN}, "csr", id="no-csr"
        ),
        pytest.param(
            {"csr": "x", "enrollment_token": TOKEN}, "device_id", id="no-device"
        ),
        pytest.param(
            enroll_body("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n"),
            "PEM",
            id="bad-pem",
        ),
        pytest.param(
            enroll_body(
                make_csr(ed25519.Ed25519PrivateKey.generate(), "../x"), device_id="../x"
            ),
            "device_id",
            id="bad-device-id",
        ),
        pytest.param(enroll_body(_tampered_csr()), "signature", id="bad-signature"),
    ],
)
def test_enroll_rejects_malformed_requests(
    server: IngestServer, http: requests.Session, body: object, message: str
) -> None:
    if isinstance(body, bytes):
        response = http.post(
            server.enroll_url, data=body, verify=server.ca_file, timeout=IO_TIMEOUT
        )
    else:
        response = post_enroll(http, server, body)
    assert response.status_code == 400
    assert message in response.json()["error"]


def test_renewal_over_mtls_needs_no_token(
    server: IngestServer, http: requests.Session, device: Device
) -> None:
    new_key = ed25519.Ed25519PrivateKey.generate()
    body = enroll_body(make_csr(new_key, DEVICE_ID), token=None)
    response = post_enroll(http, server, body, device=device)
    assert response.status_code == 200, response.text
    renewed = x509.load_pem_x509_certificate(response.json()["certificate"].encode())
    assert renewed.public_key() == new_key.public_key()
    assert renewed.serial_number != device.cert.serial_number
    assert server.requests[-1].client_cn == DEVICE_ID


def test_renewal_with_another_devices_certificate_is_refused(
    server: IngestServer, http: requests.Session, device: Device
) -> None:
    csr = make_csr(ed25519.Ed25519PrivateKey.generate(), "dev-other")
    response = post_enroll(
        http, server, enroll_body(csr, "dev-other", token=None), device=device
    )
    assert response.status_code == 403
    assert "another device" in response.json()["error"]


# --- Events ----------------------------------------------------------------------


def test_events_need_a_client_certificate(
    server: IngestServer, http: requests.Session
) -> None:
    response = post_events(http, server, None, gz(envelope(make_events(1))))
    assert response.status_code == 401
    assert response.json() == {"error": "client certificate required"}
    assert server.received() == []


def test_events_are_stored_with_the_certificates_device_id(
    server: IngestServer, http: requests.Session, device: Device
) -> None:
    events = make_events(3)
    events[1]["device_id"] = "someone-else"  # the certificate wins
    first = post_events(http, server, device, gz(envelope(events[:2])))
    second = post_events(http, server, device, gz(envelope(events[2:])))
    assert (first.status_code, first.json()) == (200, {"accepted": 2})
    assert (second.status_code, second.json()) == (200, {"accepted": 1})

    stored = server.received()
    assert stored == [{**event, "device_id": DEVICE_ID} for event in events]
    assert stat.S_IMODE(os.stat(server.events_path).st_mode) == 0o600
    records = [r for r in server.requests if r.path == "/v1/events"]
    assert [(r.client_cn, r.status, r.events) for r in records] == [
        (DEVICE_ID, 200, 2),
        (DEVICE_ID, 200, 1),
    ]


def test_events_for_another_device_are_forbidden(
    server: IngestServer, http: requests.Session, device: Device
) -> None:
    body = gz(envelope(make_events(1), device_id="dev-other"))
    response = post_events(http, server, device, body)
    assert response.status_code == 403
    assert server.received() == []


@pytest.mark.parametrize(
    ("body", "status"),
    [
        pytest.param(b"plain bytes, not gzip", 400, id="not-gzip"),
        pytest.param(gz(envelope(make_events(2)))[:-12], 400, id="truncated-gzip"),
        pytest.param(gzip.compress(b"{not json"), 400, id="not-json"),
        pytest.param(gzip.compress(b'{"x": NaN}'), 400, id="nan"),
        pytest.param(gz([1, 2]), 400, id="not-object"),
        pytest.param(gz({**envelope([]), "events": {}}), 400, id="events-not-list"),
        pytest.param(gz({"device_id": DEVICE_ID, "events": []}), 400, id="no-version"),
        pytest.param(gz(envelope([{"conn_id": "c"}])), 400, id="no-event-id"),
        pytest.param(gz(envelope(["not an object"])), 400, id="event-not-object"),
        pytest.param(gzip.compress(b"[" * 100_000), 400, id="deep-nesting"),
    ],
)
def test_malformed_batches_are_refused(
    server: IngestServer,
    http: requests.Session,
    device: Device,
    body: bytes,
    status: int,
) -> None:
    response = post_events(http, server, device, body)
    assert response.status_code == status
    assert "error" in response.json()
    assert server.received() == []


def test_events_must_be_gzip_encoded(
    server: IngestServer, http: requests.Session, device: Device
) -> None:
    body = json.dumps(envelope(make_events(1))).encode()
    response = post_events(http, server, device, body, {"Content-Encoding": "identity"})
    assert response.status_code == 415


def test_gzip_bomb_is_refused(
    server: IngestServer, http: requests.Session, device: Device
) -> None:
    # 65 MiB of zeros squeezes into about 65 KiB.
    deflater = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = bytes(1024 * 1024)
    bomb = b"".join(deflater.compress(zeros) for _ in range(65)) + deflater.flush()
    assert len(bomb) < 1024 * 1024
    response = post_events(http, server, device, bomb)
    assert response.status_code == 413
    assert server.received() == []
    after = post_events(http, server, device, gz(envelope(make_events(1))))
    assert after.status_code == 200


@pytest.mark.parametrize(
    ("length_headers", "status"),
    [
        pytest.param("Content-Length: 9000000\r\n", 413, id="too-large"),
        pytest.param("Transfer-Encoding: chunked\r\n", 411, id="chunked"),
        pytest.param("", 411, id="no-length"),
    ],
)
def test_events_body_size_is_checked_before_reading(
    server: IngestServer, device: Device, length_headers: str, status: int
) -> None:
    head = (
        "POST /v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Encoding: gzip\r\n{length_headers}\r\n"
    )
    with tls_connection(server, (device.cert_file, device.key_file)) as tls:
        tls.sendall(head.encode())
        got, headers, _ = read_response(tls)
    assert got == status
    assert headers["connection"] == "close"


def test_responder_scripts_answers(
    server: IngestServer, http: requests.Session, device: Device
) -> None:
    seen: list[IncomingBatch] = []

    def flaky(batch: IncomingBatch) -> tuple[int, dict[str, str]] | None:
        seen.append(batch)
        if batch.events[0]["event_id"] == "ev-0":
            return 500, {}
        if batch.events[0]["event_id"] == "ev-1":
            return 429, {"Retry-After": "7"}
        if batch.events[0]["event_id"] == "ev-2":
            return 400, {}
        return None

    server.responder = flaky
    answers = [
        post_events(http, server, device, gz(envelope(make_events(1, start=n))))
        for n in range(4)
    ]
    assert [a.status_code for a in answers] == [500, 429, 400, 200]
    assert answers[1].headers["Retry-After"] == "7"
    assert [e["event_id"] for e in server.received()] == ["ev-3"]
    assert [b.client_cn for b in seen] == [DEVICE_ID] * 4
    assert seen[0].agent_version == "1.2.3"

    server.responder = None
    again = post_events(http, server, device, gz(envelope(make_events(1))))
    assert again.status_code == 200


def test_stall_holds_events_requests(
    server: IngestServer, http: requests.Session, device: Device
) -> None:
    server.stall_s = 0.5
    started = time.monotonic()
    response = post_events(http, server, device, gz(envelope(make_events(1))))
    assert response.status_code == 200
    assert time.monotonic() - started >= 0.5
    assert server.stalled.is_set()


def test_a_client_killed_while_stalled_leaves_the_server_serving(
    server: IngestServer, http: requests.Session, device: Device
) -> None:
    body = gz(envelope(make_events(5)))
    server.stall_s = 1.0
    with tls_connection(server, (device.cert_file, device.key_file)) as tls:
        tls.sendall(
            b"POST /v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Encoding: gzip\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body[: len(body) // 2]
        )
        assert server.stalled.wait(IO_TIMEOUT)
    # The connection was reset; the stalled handler wakes to a torn body.
    server.stall_s = 0.0
    wait_for(lambda: any(r.path == "/v1/events" for r in server.requests), "record")
    [record] = [r for r in server.requests if r.path == "/v1/events"]
    assert (record.status, record.events) == (400, 0)
    assert server.received() == []

    response = post_events(http, server, device, gz(envelope(make_events(1))))
    assert response.status_code == 200


# --- Routing, lifecycle, robustness ----------------------------------------------


def test_unknown_paths_and_methods(
    server: IngestServer, http: requests.Session
) -> None:
    missing = http.post(
        server.url + "/v2/nothing", json={}, verify=server.ca_file, timeout=IO_TIMEOUT
    )
    assert (missing.status_code, missing.json()) == (404, {"error": "no such endpoint"})
    wrong = http.get(
        server.url + "/v1/events", verify=server.ca_file, timeout=IO_TIMEOUT
    )
    assert wrong.status_code == 405
    assert wrong.headers["Allow"] == "POST"
    assert (
        http.put(
            server.enroll_url, data=b"x", verify=server.ca_file, timeout=IO_TIMEOUT
        ).status_code
        == 405
    )


def test_stop_frees_the_port_and_a_new_server_can_take_it(
    tmp_path: Path, http: requests.Session
) -> None:
    first = IngestServer(str(tmp_path), token=TOKEN).start()
    port = first.port
    ca_pem = Path(first.ca_file).read_bytes()
    enroll_device(http, first, tmp_path, "dev-a")  # leaves a keep-alive connection
    with tls_connection(first):  # and an idle one
        started = time.monotonic()
        first.stop()
        assert time.monotonic() - started < 3
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT).close()

    second = IngestServer(str(tmp_path), token=TOKEN, port=port).start()
    try:
        assert second.port == port
        assert Path(second.ca_file).read_bytes() == ca_pem  # the CA is kept
        http.close()  # drop the pooled connection to the old server
        enroll_device(http, second, tmp_path, "dev-b")
    finally:
        second.stop()


def test_stop_ends_a_stalled_request(tmp_path: Path, http: requests.Session) -> None:
    server = IngestServer(str(tmp_path), token=TOKEN).start()
    device = enroll_device(http, server, tmp_path, DEVICE_ID)
    server.stall_s = 60
    failed: list[BaseException] = []

    def send() -> None:
        try:
            post_events(http, server, device, gz(envelope(make_events(1))))
        except requests.RequestException as err:
            failed.append(err)

    sender = threading.Thread(target=send)
    sender.start()
    assert server.stalled.wait(IO_TIMEOUT)
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 3
    sender.join(IO_TIMEOUT)
    assert not sender.is_alive()


def test_garbage_clients_do_not_hurt_the_server(
    server: IngestServer, http: requests.Session, tmp_path: Path
) -> None:
    # Not TLS at all.
    with raw_connection(server.port) as sock:
        sock.sendall(b"\x00\xffGET / HTTP/1.1\r\n\r\n" * 10)
    # Connects and leaves at once.
    with raw_connection(server.port):
        pass
    # Half a TLS ClientHello.
    with raw_connection(server.port) as sock:
        sock.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
    # TLS, then a method nobody knows.
    with tls_connection(server) as tls:
        tls.sendall(b"BREW /pot HTTP/1.1\r\n\r\n")
        status, _, body = read_response(tls)
        assert status == 501
        assert "error" in json.loads(body)
    # TLS, then bytes that are no request line at all.
    with tls_connection(server) as tls:
        tls.sendall(b"\x01\x02 nonsense\r\n\r\n")
        assert b"error" in tls.recv(65536)
    # TLS, then half a request.
    with tls_connection(server) as tls:
        tls.sendall(b"POST /v1/enroll HTTP/1.1\r\nContent-Len")
    # A client certificate from a CA the server does not trust.
    stranger_ca = tlsutil.make_ca("stranger CA")
    key, cert = tlsutil.make_cert(
        stranger_ca, [], [], client=True, common_name=DEVICE_ID
    )
    tlsutil.write_pem(tmp_path / "s.key", key)
    tlsutil.write_pem(tmp_path / "s.crt", cert)
    with (
        pytest.raises((ssl.SSLError, ConnectionError)),
        tls_connection(
            server, (str(tmp_path / "s.crt"), str(tmp_path / "s.key"))
        ) as tls,
    ):
        # TLS 1.3: the refusal arrives with the first read.
        tls.sendall(b"GET / HTTP/1.1\r\n\r\n")
        tls.recv(1)

    enroll_device(http, server, tmp_path, DEVICE_ID)


def test_serves_on_ipv6_loopback(tmp_path: Path, http: requests.Session) -> None:
    try:
        server = IngestServer(str(tmp_path), token=TOKEN, host="::1").start()
    except OSError as err:
        pytest.skip(f"no IPv6 loopback here: {err}")
    try:
        assert server.url == f"https://[::1]:{server.port}"
        enroll_device(http, server, tmp_path, DEVICE_ID)
    finally:
        server.stop()


# --- Command line ----------------------------------------------------------------


@contextlib.contextmanager
def cli(*args: str) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [PYTHON, "-c", CLI_CODE, *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=IO_TIMEOUT)


def read_until_ready(proc: subprocess.Popen[str], timeout: float = 20) -> list[str]:
    """stdout lines up to the ready line; fails if the process ends first."""
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
            if line.rstrip("\n") == READY_LINE:
                return
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        assert line is not None, f"exited {proc.wait()} before ready: {seen}"
        seen.append(line)
        if line == READY_LINE:
            return seen


def snippet(lines: list[str]) -> dict:
    start = lines.index("# agent.conf")
    end = lines.index("", start)
    return tomllib.loads("\n".join(lines[start:end]))


def test_cli_serves_until_sigterm(tmp_path: Path, http: requests.Session) -> None:
    state = tmp_path / "state"
    port = free_port()
    with cli("--dir", str(state), "--listen", f"127.0.0.1:{port}") as proc:
        lines = read_until_ready(proc)
        conf = snippet(lines)
        token = (state / "token").read_text().strip()
        assert conf == {
            "ingest_url": f"https://127.0.0.1:{port}",
            "enroll_url": f"https://127.0.0.1:{port}/v1/enroll",
            "ca_file": str(state / "ca.crt"),
            "enrollment_token": token,
        }
        assert stat.S_IMODE((state / "token").stat().st_mode) == 0o600

        key = ed25519.Ed25519PrivateKey.generate()
        response = http.post(
            conf["enroll_url"],
            json=enroll_body(make_csr(key, DEVICE_ID), token=conf["enrollment_token"]),
            verify=conf["ca_file"],
            timeout=IO_TIMEOUT,
        )
        assert response.status_code == 200, response.text

        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=10)
        assert proc.returncode == 0, stderr
        assert "Traceback" not in stderr
        assert token not in stderr

    # A second run keeps the token and does not print it.
    with cli("--dir", str(state), "--listen", f"127.0.0.1:{port}") as proc:
        lines = read_until_ready(proc)
        assert not any(token in line for line in lines)
        assert "enrollment_token" not in snippet(lines)
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=10)
        assert proc.returncode == 0


def test_cli_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with cli("--dir", str(tmp_path), "--listen", f"127.0.0.1:{port}") as proc:
            _, stderr = proc.communicate(timeout=20)
    assert proc.returncode == 1
    assert "Traceback" not in stderr
    [line] = [line for line in stderr.splitlines() if "in use" in line]
    assert f"127.0.0.1:{port}" in line


def test_cli_refuses_a_non_loopback_address(tmp_path: Path) -> None:
    port = free_port()
    with cli("--dir", str(tmp_path / "d"), "--listen", f"0.0.0.0:{port}") as proc:
        _, stderr = proc.communicate(timeout=20)
    assert proc.returncode == 2
    assert "--allow-remote" in stderr
    assert not (tmp_path / "d").exists()
