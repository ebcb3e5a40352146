"""The HTTPS side of the reference service: enrollment and event intake.

In: `POST /v1/enroll` with JSON `{"csr", "enrollment_token", "device_id",
"org_id"}`, authorized by the enrollment token or, for a renewal, by the
device's current client certificate; `POST /v1/events` with a gzip JSON
envelope `{"device_id", "agent_version", "sent_at", "events": [...]}` over
mutual TLS.
Out: `{"certificate", "chain"}` for an enrollment; for a batch, one line per
event appended to `{directory}/received.jsonl` (the event plus the device id
from the client certificate) and `{"accepted": N}`. Every refusal is a JSON
`{"error": ...}` with a status the shipper knows how to treat: 4xx means the
batch will never be accepted, 408, 429 and 5xx mean try again.

Tests steer the service through `IngestServer.responder` (answer a batch with
a chosen status and headers instead of storing it) and `IngestServer.stall_s`
(hold each events request before its body is read), and read what happened
from `IngestServer.requests` and `IngestServer.received()`.

Each connection is served by its own thread, and the TLS handshake happens in
that thread too, so a client that connects and says nothing holds up only
itself. Logs carry the path, the client's certificate CN, the status and the
event count; never tokens or event contents.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import hmac
import ipaddress
import json
import logging
import os
import socket
import socketserver
import ssl
import threading
import time
import urllib.parse
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast

from agent.ingest.ca import DevCA, EnrollmentError

log = logging.getLogger("toktra.ingest")

ENROLL_PATH = "/v1/enroll"
EVENTS_PATH = "/v1/events"
EVENTS_FILE = "received.jsonl"

MAX_ENROLL_BODY = 64 * 1024
MAX_EVENTS_BODY = 8 * 1024 * 1024
MAX_EVENTS_INFLATED = 64 * 1024 * 1024
# Output per inflate call: a gzip bomb is refused after at most this much
# beyond the limit has been produced.
INFLATE_STEP = 1024 * 1024
HANDSHAKE_TIMEOUT = 10.0
# A refused request's body up to this size is read and dropped, keeping the
# connection open; a larger one closes it.
DISCARD_LIMIT = MAX_EVENTS_BODY
# Before closing a connection whose body was not read: how long and how much
# more to read from it (see _Handler._linger).
LINGER_S = 2.0
LINGER_BYTES = 2 * MAX_EVENTS_BODY
# An idle keep-alive connection is dropped after this long.
IDLE_TIMEOUT = 30.0


@dataclass(frozen=True)
class RequestRecord:
    """One answered request, as tests see it."""

    at: float  # time.monotonic() when the answer was sent
    method: str
    path: str
    client_cn: str | None  # CN of the verified client certificate, if any
    status: int
    events: int  # events in a batch that passed validation, else 0


@dataclass(frozen=True)
class IncomingBatch:
    """A batch that passed every check, as `IngestServer.responder` sees it."""

    at: float  # time.monotonic() when the batch was read
    client_cn: str
    agent_version: str
    sent_at: str
    events: list[dict[str, Any]]


# Returns (status, extra headers) to answer instead of storing, or None.
Responder = Callable[[IncomingBatch], tuple[int, dict[str, str]] | None]


class _Refusal(Exception):
    """Ends a request with an error status and a JSON `{"error": message}`."""

    def __init__(
        self,
        status: int,
        message: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


class _BodyTooLarge(Exception):
    pass


def _gunzip(data: bytes, limit: int) -> bytes:
    """Inflate gzip `data` (one or more members) to at most `limit` bytes.

    Output is produced in bounded steps, so a small body that would inflate
    to gigabytes costs no more than `limit` plus one step of memory. Raises
    _BodyTooLarge past the limit and ValueError or zlib.error for data that
    is not complete gzip.
    """
    parts: list[bytes] = []
    total = 0
    rest = data
    while True:
        inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        pending = rest
        while not inflater.eof:
            chunk = inflater.decompress(pending, INFLATE_STEP)
            pending = inflater.unconsumed_tail
            if not chunk and not pending:
                raise ValueError("gzip data ends before the end of its stream")
            total += len(chunk)
            if total > limit:
                raise _BodyTooLarge
            parts.append(chunk)
        # Concatenated members are valid gzip (and what `cat a.gz b.gz` makes).
        rest = inflater.unused_data
        if not rest:
            return b"".join(parts)


def _reject_constant(name: str) -> Any:
    # NaN and Infinity are not JSON; stored, they would break strict readers.
    raise ValueError(f"{name} is not allowed in JSON")


def _loads(data: bytes) -> Any:
    try:
        return json.loads(data, parse_constant=_reject_constant)
    except RecursionError as err:
        raise ValueError("JSON nested too deeply") from err


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "toktra-dev-ingest"
    timeout = IDLE_TIMEOUT

    # --- plumbing shared by both endpoints ---------------------------------

    @property
    def _ingest(self) -> IngestServer:
        return cast(_TLSServer, self.server).ingest

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        # Replaced by the one line per request in _dispatch.
        pass

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s: %s", self.client_address[0], format % args)

    def send_error(
        self, code: int, message: str | None = None, explain: str | None = None
    ) -> None:
        # Requests too broken to reach _dispatch (bad request line, unknown
        # method) still get JSON, and the connection is not trusted further.
        self.close_connection = True
        text = message or HTTPStatus(code).phrase
        log.debug("%s: answered %d: %s", self.client_address[0], code, text)
        self._reply(code, {"error": text}, {})

    def _reply(
        self, status: int, body: dict[str, Any], headers: dict[str, str]
    ) -> None:
        data = json.dumps(body, separators=(",", ":")).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers.items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _client_cn(self) -> str | None:
        """CN of the client certificate; only verified ones are visible here."""
        conn = cast(ssl.SSLSocket, self.connection)
        cert = conn.getpeercert()
        if not cert:
            return None
        names = [
            value
            for rdn in cert.get("subject", ())
            for key, value in rdn
            if key == "commonName"
        ]
        return names[0] if len(names) == 1 else None

    def _content_length(self, limit: int) -> int:
        # Every refusal here leaves a body of unknown or unwanted size
        # behind, so the connection cannot carry another request.
        if "Transfer-Encoding" in self.headers:
            self.close_connection = True
            raise _Refusal(411, "chunked bodies are not accepted; send Content-Length")
        value = self.headers.get("Content-Length")
        if value is None:
            self.close_connection = True
            raise _Refusal(411, "Content-Length is required")
        if not (value.isascii() and value.isdigit()):
            self.close_connection = True
            raise _Refusal(400, "Content-Length is not a number")
        length = int(value)
        if length > limit:
            self.close_connection = True
            raise _Refusal(413, f"body larger than {limit} bytes")
        return length

    def _read_body(self, length: int) -> bytes:
        try:
            data = self.rfile.read(length)
        except TimeoutError as err:
            self.close_connection = True
            raise _Refusal(408, "request body not received in time") from err
        except OSError as err:
            self.close_connection = True
            raise _Refusal(400, "connection failed while reading the body") from err
        self._body_read = True
        if len(data) < length:
            self.close_connection = True
            raise _Refusal(400, "request body ended early")
        return data

    def _body_pending(self) -> bool:
        """Whether the client sent, or may still send, a body not yet read."""
        if self._body_read:
            return False
        return "Transfer-Encoding" in self.headers or (
            self.headers.get("Content-Length", "0").strip() != "0"
        )

    def _discard_body(self) -> bool:
        """Read and drop a refused request's body; False if that failed."""
        if "Transfer-Encoding" in self.headers:
            return False
        value = self.headers.get("Content-Length", "0")
        if not (value.isascii() and value.isdigit()) or int(value) > DISCARD_LIMIT:
            return False
        left = int(value)
        try:
            while left:
                chunk = self.rfile.read(min(left, 65536))
                if not chunk:
                    return False
                left -= len(chunk)
        except OSError:
            return False
        self._body_read = True
        return True

    def _linger(self) -> None:
        """Half-close, then swallow what the client still sends, for a while.

        Closed with unread data in its receive queue, a socket sends a reset
        instead of a FIN, and a reset can destroy the answer in the client's
        kernel before the client has read it: the client would see a broken
        connection instead of, say, 413.
        """
        conn = cast(ssl.SSLSocket, self.connection)
        deadline = time.monotonic() + LINGER_S
        swallowed = 0
        try:
            socket.socket.shutdown(conn, socket.SHUT_WR)
            conn.settimeout(LINGER_S)
            while swallowed < LINGER_BYTES and time.monotonic() < deadline:
                chunk = self.rfile.read1(65536)
                if not chunk:
                    return
                swallowed += len(chunk)
        except OSError:
            pass

    def _dispatch(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        cn = self._client_cn()
        self._body_read = False
        self._batch_size = 0
        routes = {ENROLL_PATH: self._enroll, EVENTS_PATH: self._events}
        route = routes.get(path)
        status = 500
        try:
            try:
                if route is None:
                    raise _Refusal(404, "no such endpoint")
                if self.command != "POST":
                    raise _Refusal(405, "only POST is allowed", {"Allow": "POST"})
                status, body, headers = route(cn)
            except _Refusal as refusal:
                status = refusal.status
                body, headers = {"error": refusal.message}, refusal.headers
            # An unread body would be parsed as the next request: drop it,
            # or close the connection after the answer.
            if not (self._body_read or self.close_connection):
                self.close_connection = not self._discard_body()
            self._reply(status, body, headers)
            if self.close_connection and self._body_pending():
                self._linger()
        finally:
            self._ingest._record(
                RequestRecord(
                    at=time.monotonic(),
                    method=self.command,
                    path=path,
                    client_cn=cn,
                    status=status,
                    events=self._batch_size,
                )
            )
            log.info(
                "%s %.100r from %s cn=%s: %d, %d events",
                self.command,
                path,
                self.client_address[0],
                cn or "-",
                status,
                self._batch_size,
            )

    do_POST = _dispatch
    do_GET = _dispatch
    do_HEAD = _dispatch
    do_PUT = _dispatch
    do_DELETE = _dispatch
    do_PATCH = _dispatch
    do_OPTIONS = _dispatch

    # --- POST /v1/enroll ---------------------------------------------------

    def _enroll(self, cn: str | None) -> tuple[int, dict[str, Any], dict[str, str]]:
        ingest = self._ingest
        body = self._read_body(self._content_length(MAX_ENROLL_BODY))
        try:
            request = _loads(body)
        except ValueError as err:
            raise _Refusal(400, "body is not JSON") from err
        if not isinstance(request, dict):
            raise _Refusal(400, "body must be a JSON object")
        csr = request.get("csr")
        device_id = request.get("device_id")
        token = request.get("enrollment_token")
        org_id = request.get("org_id")
        if not isinstance(csr, str) or not csr:
            raise _Refusal(400, "csr must be a non-empty string")
        if not isinstance(device_id, str) or not device_id:
            raise _Refusal(400, "device_id must be a non-empty string")
        if token is not None and not isinstance(token, str):
            raise _Refusal(400, "enrollment_token must be a string")
        if org_id is not None and not isinstance(org_id, str):
            raise _Refusal(400, "org_id must be a string")

        # A token, or the device's own certificate for a renewal. Bytes for
        # compare_digest: with str it refuses anything outside ASCII.
        token_ok = bool(token and ingest.token) and hmac.compare_digest(
            str(token).encode(), ingest.token.encode()
        )
        if not (token_ok or cn == device_id):
            if token:
                raise _Refusal(403, "enrollment token is not valid")
            if cn is not None:
                raise _Refusal(403, "client certificate is for another device")
            raise _Refusal(401, "enrollment token or client certificate required")

        try:
            certificate = ingest.ca.sign_csr(
                csr.encode(), device_id, ingest.cert_lifetime
            )
        except EnrollmentError as err:
            raise _Refusal(400, str(err)) from err
        answer = {
            "certificate": certificate.decode(),
            "chain": ingest.ca.chain_pem().decode(),
        }
        return 200, answer, {}

    # --- POST /v1/events ---------------------------------------------------

    def _events(self, cn: str | None) -> tuple[int, dict[str, Any], dict[str, str]]:
        ingest = self._ingest
        if cn is None:
            raise _Refusal(401, "client certificate required")
        encoding = self.headers.get("Content-Encoding", "").strip().lower()
        if encoding != "gzip":
            raise _Refusal(415, "body must be sent with Content-Encoding: gzip")
        length = self._content_length(MAX_EVENTS_BODY)

        # Before the body is read, so that a test can kill the client while
        # its request is in flight.
        stall = ingest.stall_s
        if stall > 0:
            ingest.stalled.set()
            ingest._stopping.wait(stall)

        compressed = self._read_body(length)
        try:
            raw = _gunzip(compressed, MAX_EVENTS_INFLATED)
        except _BodyTooLarge as err:
            raise _Refusal(
                413, f"body inflates to more than {MAX_EVENTS_INFLATED} bytes"
            ) from err
        except (ValueError, zlib.error) as err:
            raise _Refusal(400, "body is not valid gzip") from err
        try:
            envelope = _loads(raw)
        except ValueError as err:
            raise _Refusal(400, "body is not JSON") from err

        if not isinstance(envelope, dict):
            raise _Refusal(400, "body must be a JSON object")
        for key in ("device_id", "agent_version", "sent_at"):
            if not isinstance(envelope.get(key), str):
                raise _Refusal(400, f"{key} must be a string")
        events = envelope.get("events")
        if not isinstance(events, list):
            raise _Refusal(400, "events must be a list")
        if envelope["device_id"] != cn:
            raise _Refusal(403, "device_id does not match the client certificate")
        for index, event in enumerate(events):
            if not isinstance(event, dict):
                raise _Refusal(400, f"event {index} is not an object")
            event_id = event.get("event_id")
            if not isinstance(event_id, str) or not event_id:
                raise _Refusal(400, f"event {index} has no string event_id")
        self._batch_size = len(events)

        responder = ingest.responder
        if responder is not None:
            batch = IncomingBatch(
                at=time.monotonic(),
                client_cn=cn,
                agent_version=envelope["agent_version"],
                sent_at=envelope["sent_at"],
                events=events,
            )
            try:
                scripted = responder(batch)
            except Exception as err:
                # A test's hook is arbitrary code; its bug must show, as a
                # 500 and a logged traceback, not kill the connection.
                log.error("responder raised", exc_info=True)
                raise _Refusal(500, "responder failed") from err
            if scripted is not None:
                status, headers = scripted
                body = {"accepted": 0} if status < 400 else {"error": "injected fault"}
                return status, body, headers

        # The device id comes from the certificate, after the event's own
        # keys, so that no event can claim another device.
        lines = b"".join(
            json.dumps({**event, "device_id": cn}, separators=(",", ":")).encode()
            + b"\n"
            for event in events
        )
        try:
            ingest._append(lines)
        except OSError as err:
            log.error("cannot store a batch in %s: %s", ingest.events_path, err)
            raise _Refusal(500, "could not store the batch") from err
        return 200, {"accepted": len(events)}, {}


class _TLSServer(ThreadingHTTPServer):
    """ThreadingHTTPServer that does TLS per connection and can drop them all."""

    allow_reuse_address = True
    daemon_threads = True
    # server_close() joins the connection threads, so stop() returns only
    # once every one of them has ended.
    block_on_close = True

    def __init__(
        self,
        address: tuple[str, int],
        family: socket.AddressFamily,
        context: ssl.SSLContext,
        ingest: IngestServer,
    ) -> None:
        self.address_family = family
        self.ssl_context = context
        self.ingest = ingest
        self._open: set[ssl.SSLSocket] = set()
        self._open_lock = threading.Lock()
        self._closing = False
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer's version resolves the host name (a DNS query), and
        # nothing here needs it.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def finish_request(self, request: Any, client_address: Any) -> None:
        raw = cast(socket.socket, request)
        raw.settimeout(HANDSHAKE_TIMEOUT)
        try:
            # Raises already when the client has reset the connection.
            tls = self.ssl_context.wrap_socket(
                raw, server_side=True, do_handshake_on_connect=False
            )
        except OSError as err:
            log.debug("connection from %s ended: %s", client_address[0], err)
            return
        with self._open_lock:
            if self._closing:
                tls.close()
                return
            self._open.add(tls)
        try:
            tls.do_handshake()
            self.RequestHandlerClass(tls, client_address, self)
        except (OSError, ValueError) as err:
            # Handshake failures, resets, timeouts and sockets closed by
            # stop(): the client's problem, never the server's.
            log.debug("connection from %s ended: %s", client_address[0], err)
        finally:
            with self._open_lock:
                self._open.discard(tls)
            tls.close()

    def close_connections(self) -> None:
        """Wake every connection thread by shutting its socket down."""
        with self._open_lock:
            self._closing = True
            sockets = list(self._open)
        for tls in sockets:
            # socket.socket's shutdown, not SSLSocket's: that one drops the
            # TLS state under a thread that may still be using it.
            with contextlib.suppress(OSError):
                socket.socket.shutdown(tls, socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.error("unexpected error serving %s", client_address[0], exc_info=True)


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class IngestServer:
    """The enrollment and ingest service on (host, port), in background threads.

    `directory` holds the CA, the server certificate and received.jsonl.
    `token` is the enrollment token; an empty one allows renewals only. The
    server certificate names `server_names` (default "localhost") and the
    listen host. Port 0 picks a free port; `port` holds the real one once
    started.

    Test hooks, settable at any time:
    - `responder`: called with each valid batch; when it returns
      (status, headers) that is the answer and the batch is not stored.
    - `stall_s`: each events request waits this long, after its headers and
      before its body is read; `stalled` is set when a request starts to
      wait, so a test can act while it does (it stays set: clear it before
      waiting for the next one). stop() ends every wait.

    The responder runs in the connection's thread; one that never returns
    keeps stop() waiting for that thread.
    """

    def __init__(
        self,
        directory: str,
        *,
        token: str,
        host: str = "127.0.0.1",
        port: int = 0,
        cert_lifetime: datetime.timedelta = datetime.timedelta(days=90),
        server_names: list[str] | None = None,
    ) -> None:
        self.directory = directory
        self.token = token
        self.host = host
        self.port = port
        self.cert_lifetime = cert_lifetime
        self.server_names = ["localhost"] if server_names is None else server_names
        self.responder: Responder | None = None
        self.stall_s = 0.0
        self.stalled = threading.Event()
        self.ca = DevCA.load_or_create(directory)
        self._requests: list[RequestRecord] = []
        self._requests_lock = threading.Lock()
        self._append_lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd: _TLSServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def ca_file(self) -> str:
        return self.ca.ca_file

    @property
    def url(self) -> str:
        host = self.host
        if host in ("", "0.0.0.0", "::"):
            # A wildcard address is no place to connect to; a name is.
            host = self.server_names[0] if self.server_names else "localhost"
        if ":" in host:
            host = f"[{host}]"
        return f"https://{host}:{self.port}"

    @property
    def enroll_url(self) -> str:
        return self.url + ENROLL_PATH

    @property
    def events_path(self) -> str:
        return os.path.join(self.directory, EVENTS_FILE)

    @property
    def requests(self) -> list[RequestRecord]:
        """A snapshot of the requests answered so far, oldest first."""
        with self._requests_lock:
            return list(self._requests)

    def received(self) -> list[dict[str, Any]]:
        """Every event stored so far, in the order written."""
        try:
            with open(self.events_path, "rb") as f:
                return [json.loads(line) for line in f if line.strip()]
        except FileNotFoundError:
            return []

    def _record(self, record: RequestRecord) -> None:
        with self._requests_lock:
            self._requests.append(record)

    def _append(self, lines: bytes) -> None:
        """Append whole lines with one write, or leave the file as it was."""
        with self._append_lock:
            fd = os.open(
                self.events_path,
                os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                0o600,
            )
            try:
                size = os.fstat(fd).st_size
                written = os.write(fd, lines)
                if written < len(lines):
                    # The lock makes this the only writer, so cutting back to
                    # the old size removes exactly the torn part.
                    os.ftruncate(fd, size)
                    raise OSError(errno.ENOSPC, "short write")
                os.fsync(fd)
            finally:
                os.close(fd)

    def _tls_context(self) -> ssl.SSLContext:
        dns = [name for name in self.server_names if not _is_ip(name)]
        ips = [name for name in self.server_names if _is_ip(name)]
        if self.host not in ("", "0.0.0.0", "::"):
            (ips if _is_ip(self.host) else dns).append(self.host)
        cert_file, key_file = self.ca.server_credentials(
            list(dict.fromkeys(dns)), list(dict.fromkeys(ips))
        )
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(cert_file, key_file)
        # Optional: enrollment comes without a certificate; the events
        # endpoint refuses requests that lack one. A certificate that is
        # presented but does not verify fails the handshake.
        context.verify_mode = ssl.CERT_OPTIONAL
        context.load_verify_locations(cafile=self.ca.ca_file)
        return context

    def start(self) -> IngestServer:
        """Bind and serve in a background thread; OSError if the bind fails."""
        if self._httpd is not None:
            raise RuntimeError(f"ingest service on {self.url} is already running")
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self._stopping.clear()
        httpd = _TLSServer((self.host, self.port), family, self._tls_context(), self)
        self.port = httpd.server_address[1]
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.1},
            name=f"ingest-{self.port}",
            daemon=True,
        )
        self._thread.start()
        log.info("ingest service listening on %s", self.url)
        return self

    def stop(self) -> None:
        """Stop accepting, end every connection and thread, free the port."""
        httpd, thread = self._httpd, self._thread
        if httpd is None or thread is None:
            return
        self._stopping.set()
        httpd.shutdown()
        httpd.close_connections()
        httpd.server_close()
        thread.join()
        self._httpd = self._thread = None
        log.info("ingest service on %s stopped", self.url)

    def __enter__(self) -> IngestServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
