"""Where batches of connection events go: a local JSONL file or the ingest service.

A sink takes one batch at a time and either delivers all of it or raises:

- `RetryableSinkError`: nothing is known to be lost; the caller keeps the batch
  and tries again later (after `retry_after` seconds when the server said so).
- `CredentialsRejectedError` (a retryable error): the server refused who we
  are, not what we sent (401, 403, or a TLS alert about our certificate); the
  caller keeps the batch and gets new credentials before trying again.
- `RejectedBatchError`: the batch will never be accepted as it is; the caller
  sets it aside and counts it. 404, 405, 410 and 421 are not taken as such:
  they say the URL is wrong, so the batch is kept and retried.

Delivery is at least once: a batch that failed may have partly or wholly
arrived, so a retry can repeat events. Each event carries a unique `event_id`
for readers to drop repeats.

Error messages name the destination and the reason, never event contents.
"""

from __future__ import annotations

import datetime
import email.utils
import errno
import gzip
import json
import logging
import os
import ssl
import time
from typing import Protocol

import requests

from agent.shipper import http

log = logging.getLogger(__name__)

EVENTS_PATH = "/v1/events"
# Answers about the address rather than the batch.
WRONG_PLACE = frozenset({404, 405, 410, 421})
# An ingest answer is a status and a few headers; its body is not needed.
MAX_ANSWER_BYTES = 64 * 1024


class SinkError(Exception):
    """A sink could not be set up or could not take a batch."""


class RetryableSinkError(SinkError):
    """Delivery failed for now; the same batch may succeed later."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class CredentialsRejectedError(RetryableSinkError):
    """The server refused the client's identity; enrolling again may help."""


class RejectedBatchError(SinkError):
    """The destination refused the batch for good; retrying cannot help."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class Sink(Protocol):
    def send(self, events: list[dict]) -> None: ...

    def close(self) -> None: ...


def _json_bytes(value: object, what: str) -> bytes:
    # Strict JSON: NaN and Infinity are not JSON, and a reader would choke.
    try:
        text = json.dumps(value, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as err:
        raise RejectedBatchError(f"{what} is not valid JSON: {err}") from err
    return text.encode("ascii")


def _errno_text(err: OSError) -> str:
    name = errno.errorcode.get(err.errno or 0, str(err.errno))
    return f"{name} ({err.strerror})"


class JsonlSink:
    """Appends each event as one JSON line to a local file (local mode).

    A batch is written with a single `write` on an `O_APPEND` descriptor, so it
    lands in one piece after whatever another writer appended, then fsynced.
    If the file is renamed or removed (log rotation), the next batch reopens
    the path.

    A short write (disk full part-way) leaves a torn last line; the next batch
    then starts with a newline so that only that one line is unreadable, and
    the complete lines before it will be written again on retry. A file found
    ending mid-line when opened is treated the same way.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None
        self._identity: tuple[int, int] | None = None
        self._torn = False
        self._closed = False
        try:
            self._open()
        except OSError as err:
            raise SinkError(f"cannot open {path}: {_errno_text(err)}") from err

    def _open(self) -> int:
        fd = os.open(
            self.path,
            os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
            0o640,
        )
        try:
            st = os.fstat(fd)
            torn = self._ends_mid_line(st.st_size)
        except OSError:
            os.close(fd)
            raise
        self._fd = fd
        self._identity = (st.st_dev, st.st_ino)
        self._torn = torn
        return fd

    def _ends_mid_line(self, size: int) -> bool:
        """Whether the file's last byte is not a newline (an earlier torn write)."""
        if size == 0:
            return False
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return os.pread(fd, 1, size - 1) != b"\n"
        finally:
            os.close(fd)

    def _current_fd(self) -> int:
        """The open descriptor, reopened if the path no longer names its file."""
        if self._fd is not None:
            try:
                st = os.stat(self.path)
                identity: tuple[int, int] | None = (st.st_dev, st.st_ino)
            except FileNotFoundError:
                identity = None
            if identity == self._identity:
                return self._fd
            log.info("events file %s was moved or removed; reopening", self.path)
            os.close(self._fd)
            self._fd = None
        return self._open()

    def send(self, events: list[dict]) -> None:
        if self._closed:
            raise SinkError(f"sink for {self.path} is closed")
        if not events:
            return
        lines = b"".join(
            _json_bytes(event, f"event {index} of the batch") + b"\n"
            for index, event in enumerate(events)
        )
        try:
            fd = self._current_fd()
        except OSError as err:
            raise RetryableSinkError(
                f"cannot open {self.path}: {_errno_text(err)}"
            ) from err
        data = b"\n" + lines if self._torn else lines

        # One write for the whole batch; a loop over short writes could
        # interleave the rest with another writer's lines.
        try:
            written = os.write(fd, data)
        except OSError as err:
            raise RetryableSinkError(
                f"write to {self.path} failed: {_errno_text(err)}"
            ) from err
        if written < len(data):
            self._torn = not data[:written].endswith(b"\n")
            raise RetryableSinkError(
                f"short write to {self.path}: {written} of {len(data)} bytes "
                "(disk full?); the file holds part of the batch"
            )
        self._torn = False

        try:
            os.fsync(fd)
        except OSError as err:
            raise RetryableSinkError(
                f"fsync of {self.path} failed: {_errno_text(err)}"
            ) from err
        log.debug(
            "appended %d events (%d bytes) to %s", len(events), written, self.path
        )

    def close(self) -> None:
        self._closed = True
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delay-seconds or an HTTP-date.

    Returns None when the header is absent or unreadable. A date in the past
    gives 0.0. No upper bound is applied; the caller caps the wait.
    """
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        # A long run of digits means "a very long time"; the caller caps it.
        return float(int(value)) if len(value) <= 12 else 1e12
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        # HTTP-dates are always GMT; "-0000" parses as naive.
        when = when.replace(tzinfo=datetime.UTC)
    if now is None:
        now = time.time()
    return max(0.0, when.timestamp() - now)


def system_trust_store() -> str | bool:
    """The platform's CA bundle (file or directory) as OpenSSL would find it.

    requests on its own trusts the certifi bundle it ships with, not the
    system's; this returns the system's so that an operator's CA additions
    apply. Falls back to True (requests' default) when none is found.
    """
    paths = ssl.get_default_verify_paths()
    if paths.cafile:
        return paths.cafile
    if paths.capath and os.path.isdir(paths.capath):
        return paths.capath
    return True


def _causes(exc: BaseException) -> list[BaseException]:
    """`exc` and everything it wraps, breadth first, each once."""
    seen: set[int] = set()
    found: list[BaseException] = []
    queue: list[BaseException] = [exc]
    while queue:
        current = queue.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        found.append(current)
        # urllib3 keeps the underlying error in `reason` or in args.
        linked = [
            current.__cause__,
            current.__context__,
            getattr(current, "reason", None),
        ]
        linked += list(current.args)
        queue += [item for item in linked if isinstance(item, BaseException)]
    return found


def describe_transport_error(exc: BaseException, timeout: float) -> str:
    """Why a request failed, in words an operator can act on."""
    causes = _causes(exc)
    for cause in causes:
        if isinstance(cause, ssl.SSLCertVerificationError):
            detail = cause.verify_message or cause.reason or "unknown reason"
            return f"certificate verify failed: {detail}"
    for cause in causes:
        if isinstance(cause, ssl.SSLError):
            reason = cause.reason or cause.strerror or str(cause)
            if "_ALERT_" in reason:
                return f"TLS alert from the server: {reason}"
            return f"TLS error: {reason}"
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return f"connect timed out after {timeout:g}s"
    if isinstance(exc, requests.exceptions.ReadTimeout):
        return f"no answer within {timeout:g}s"
    for cause in causes:
        if isinstance(cause, OSError) and cause.errno is not None and cause.strerror:
            return _errno_text(cause)
    for cause in causes:
        if isinstance(cause, OSError) and str(cause):
            return f"{type(cause).__name__}: {cause}"
    return f"{type(exc).__name__}: {exc}"


# TLS alerts a server sends when it does not accept the client certificate.
_CLIENT_CERT_ALERTS = (
    "ALERT_BAD_CERTIFICATE",
    "ALERT_CERTIFICATE_EXPIRED",
    "ALERT_CERTIFICATE_REVOKED",
    "ALERT_CERTIFICATE_UNKNOWN",
    "ALERT_UNKNOWN_CA",
    "ALERT_CERTIFICATE_REQUIRED",
    "ALERT_ACCESS_DENIED",
)


def _refuses_client_cert(reason: str) -> bool:
    return reason.startswith("TLS alert") and any(
        alert in reason for alert in _CLIENT_CERT_ALERTS
    )


def transport_reason(err: http.TransportError, timeout: float) -> str:
    """Why a request got no answer, in words an operator can act on."""
    if isinstance(err.__cause__, http.DeadlineExceeded) or err.__cause__ is None:
        return str(err)
    return describe_transport_error(err.__cause__, timeout)


class HttpsSink:
    """POSTs each batch, gzipped, to the ingest service over (mutual) TLS.

    The server is verified against `ca_file` when set, else the system store;
    verification is never turned off. The client certificate is presented when
    both `cert_file` and `key_file` are set. One keep-alive session is reused;
    the certificate files are read again for each new connection, so a renewed
    certificate takes effect once the pooled connection is closed.
    """

    def __init__(
        self,
        ingest_url: str,
        device_id: str,
        agent_version: str,
        ca_file: str = "",
        cert_file: str = "",
        key_file: str = "",
        timeout: float = 10.0,
    ) -> None:
        if not ingest_url.lower().startswith("https://"):
            raise SinkError(f"ingest_url must be an https:// URL, got {ingest_url!r}")
        if bool(cert_file) != bool(key_file):
            raise SinkError("cert_file and key_file must be set together")
        for name, path in (
            ("ca_file", ca_file),
            ("cert_file", cert_file),
            ("key_file", key_file),
        ):
            if path and not os.path.isfile(path):
                raise SinkError(f"{name} {path} does not exist or is not a file")
        self.url = ingest_url.rstrip("/") + EVENTS_PATH
        self.device_id = device_id
        self.agent_version = agent_version
        self.timeout = timeout
        self._verify: str | bool = ca_file or system_trust_store()
        self._cert: tuple[str, str] | None = (
            (cert_file, key_file) if cert_file else None
        )
        self._session = requests.Session()
        self._session.headers["User-Agent"] = f"toktra-agent/{agent_version}"

    def _body(self, events: list[dict]) -> bytes:
        sent_at = datetime.datetime.now(datetime.UTC)
        envelope = {
            "device_id": self.device_id,
            "agent_version": self.agent_version,
            "sent_at": sent_at.isoformat(timespec="milliseconds").replace(
                "+00:00", "Z"
            ),
            "events": events,
        }
        return gzip.compress(_json_bytes(envelope, f"batch of {len(events)} events"))

    def send(self, events: list[dict]) -> None:
        if not events:
            return
        body = self._body(events)
        started = time.monotonic()
        status, reason, retry_after_header = self._post(body)
        answered = f"POST {self.url} answered {status} {reason}".rstrip()
        if 200 <= status < 300:
            log.debug(
                "delivered %d events (%d bytes gzip) to %s: %d in %.3fs",
                len(events),
                len(body),
                self.url,
                status,
                time.monotonic() - started,
            )
            return
        if status in (401, 403):
            why = (
                "the device certificate was refused"
                if self._cert is not None
                else "no client certificate is configured (set enroll_url)"
            )
            raise CredentialsRejectedError(f"{answered}: {why}", status=status)
        if status in WRONG_PLACE:
            # Says the URL is wrong, not the batch: keep it for when the
            # configuration is fixed, instead of discarding every batch.
            raise RetryableSinkError(
                f"{answered} (check ingest_url: nothing takes events there)",
                status=status,
            )
        if status in (408, 429) or status >= 500:
            retry_after = parse_retry_after(retry_after_header)
            raise RetryableSinkError(answered, status=status, retry_after=retry_after)
        if 400 <= status < 500:
            raise RejectedBatchError(answered, status=status)
        # A redirect or other surprise: most likely a wrong ingest_url. Keep the
        # batch so nothing is lost while an operator fixes the configuration.
        raise RetryableSinkError(
            f"{answered} (redirects are not followed; check ingest_url)",
            status=status,
        )

    def _post(self, body: bytes) -> tuple[int, str, str | None]:
        """POST one body; return status, reason phrase and Retry-After.

        Only plain values leave this function: an error raised from a frame
        that still held the response would keep its connection pool, and so
        the keep-alive socket, open for as long as the error is kept.
        """
        try:
            # verify and cert go on every call: set only on the session, they
            # would be overridden by REQUESTS_CA_BUNDLE in the environment.
            answer = http.post(
                self._session,
                self.url,
                total_s=self.timeout,
                read_timeout_s=self.timeout,
                max_body=MAX_ANSWER_BYTES,
                data=body,
                headers={
                    "Content-Type": "application/json",
                    "Content-Encoding": "gzip",
                },
                verify=self._verify,
                cert=self._cert,
            )
        except http.TransportError as err:
            reason = transport_reason(err, self.timeout)
            if isinstance(err.__cause__, http.DeadlineExceeded):
                self._new_session()  # the interrupted connection is unusable
            if self._cert is None and reason.startswith("TLS"):
                reason += " (no client certificate is configured)"
            message = f"POST {self.url} failed: {reason}"
            if self._cert is not None and _refuses_client_cert(reason):
                raise CredentialsRejectedError(message) from err
            raise RetryableSinkError(message) from err
        return answer.status, answer.reason, answer.headers.get("Retry-After")

    def _new_session(self) -> None:
        self._session.close()
        self._session = requests.Session()
        self._session.headers["User-Agent"] = f"toktra-agent/{self.agent_version}"

    def use_credentials(self, cert_file: str, key_file: str) -> None:
        """Presents this certificate from the next connection on."""
        self._cert = (cert_file, key_file)
        # Pooled connections keep the identity they were opened with.
        self._new_session()

    def close(self) -> None:
        self._session.close()
