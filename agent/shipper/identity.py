"""The device's identity: its id, its Ed25519 key and the certificate for it.

In: `enroll_url`, `enrollment_token`, `org_id` and the files below. Out: a
certificate and key the shipper presents on every ingest request.

Files in state_dir, owned by the shipper's user:

    device_id    generated once and kept (unless configured)
    device.key   Ed25519 private key, PKCS#8 PEM, created 0600; never logged
    device.crt   the signed certificate, then any intermediates of its chain
    chain.pem    the chain exactly as the enrollment service returned it

Enrollment posts a CSR whose subject CN is the device id, with the token. A
certificate is renewed once two thirds of its life has passed, over mutual
TLS with the current one; renewal makes a fresh key too. An expired, missing
or refused certificate is replaced by enrolling again with the token. Every
file is written atomically (temporary file, fsync, rename), so a crash leaves
the old pair or the new one; a key that does not match its certificate is
detected and treated as no certificate.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import uuid
from dataclasses import dataclass

import requests
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID

from agent.shipper import http
from agent.shipper.sinks import transport_reason

log = logging.getLogger("toktra.shipper")

KEY_NAME = "device.key"
CERT_NAME = "device.crt"
CHAIN_NAME = "chain.pem"
DEVICE_ID_NAME = "device_id"
RENEW_AT_FRACTION = 2 / 3
MAX_ANSWER_BYTES = 1024 * 1024


class EnrollmentError(Exception):
    """Enrolling or renewing failed; str() says why, never with the token."""


class TokenRefusedError(EnrollmentError):
    """The service refused the enrollment token (401 or 403)."""


@dataclass(frozen=True)
class Credentials:
    cert_file: str
    key_file: str
    serial: int
    not_before: datetime.datetime
    not_after: datetime.datetime
    obtained: datetime.datetime  # when this host stored it

    @property
    def renew_at(self) -> datetime.datetime:
        """Two thirds into the life it had when obtained.

        Counted from when it was obtained rather than from not_before, which
        issuers backdate to allow for clock skew: a short-lived certificate
        would otherwise be due for renewal the moment it arrives.
        """
        start = max(self.not_before, self.obtained)
        return start + (self.not_after - start) * RENEW_AT_FRACTION

    def expired(self, now: datetime.datetime) -> bool:
        return now >= self.not_after


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def write_atomically(path: str, data: bytes, mode: int) -> None:
    """Temporary file created with `mode`, fsync, rename, fsync of the dir."""
    directory = os.path.dirname(path) or "."
    tmp = f"{path}.{os.getpid()}.tmp"
    # A process killed here earlier may have left one under a reused pid.
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def device_id(state_dir: str, configured: str = "") -> str:
    """The configured id, else one generated once and kept in state_dir."""
    if configured:
        return configured
    path = os.path.join(state_dir, DEVICE_ID_NAME)
    try:
        with open(path) as f:
            kept = f.read().strip()
        if kept:
            return kept
    except FileNotFoundError:
        pass
    new = str(uuid.uuid4())
    write_atomically(path, new.encode() + b"\n", 0o640)
    log.info("generated device id %s (kept in %s)", new, path)
    return new


def common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


def _same_key(cert: x509.Certificate, key: ed25519.Ed25519PrivateKey) -> bool:
    raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
    public = cert.public_key()
    if not isinstance(public, ed25519.Ed25519PublicKey):
        return False
    return public.public_bytes(*raw) == key.public_key().public_bytes(*raw)


class Identity:
    """Enrolls, loads and renews the device certificate."""

    def __init__(
        self,
        state_dir: str,
        device_id: str,
        enroll_url: str,
        token: str,
        org_id: str = "",
        verify: str | bool = True,
        timeout: float = 15.0,
    ) -> None:
        self.state_dir = state_dir
        self.device_id = device_id
        self.enroll_url = enroll_url
        self._token = token
        self.org_id = org_id
        self.verify = verify
        self.timeout = timeout
        self.key_file = os.path.join(state_dir, KEY_NAME)
        self.cert_file = os.path.join(state_dir, CERT_NAME)
        self.chain_file = os.path.join(state_dir, CHAIN_NAME)

    def current(self) -> Credentials | None:
        """The stored certificate and key, if both exist and belong together."""
        try:
            with open(self.cert_file, "rb") as f:
                cert = x509.load_pem_x509_certificate(f.read())
            with open(self.key_file, "rb") as f:
                key = serialization.load_pem_private_key(f.read(), password=None)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            log.error("stored device certificate or key unreadable: %s", err)
            return None
        if not isinstance(key, ed25519.Ed25519PrivateKey) or not _same_key(cert, key):
            log.error("%s does not match %s; enrolling again", KEY_NAME, CERT_NAME)
            return None
        if common_name(cert) != self.device_id:
            log.error(
                "stored certificate is for %r, not device %r; enrolling again",
                common_name(cert),
                self.device_id,
            )
            return None
        return self._credentials(cert)

    def _credentials(self, cert: x509.Certificate) -> Credentials:
        stored = os.stat(self.cert_file).st_mtime
        return Credentials(
            self.cert_file,
            self.key_file,
            cert.serial_number,
            cert.not_valid_before_utc,
            cert.not_valid_after_utc,
            datetime.datetime.fromtimestamp(stored, datetime.UTC),
        )

    def refresh(self, current: Credentials | None) -> Credentials:
        """Renews `current` over mTLS while it is valid, else enrolls anew."""
        if current is not None and not current.expired(_now()):
            try:
                return self.enroll(current)
            except TokenRefusedError:
                log.warning("renewal refused; enrolling again with the token")
        return self.enroll(None)

    def enroll(self, renew_with: Credentials | None = None) -> Credentials:
        """Gets a certificate for a fresh key; over mTLS when renewing."""
        key = ed25519.Ed25519PrivateKey.generate()
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(
                x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.device_id)])
            )
            .sign(key, None)
        )
        request = {
            "csr": csr.public_bytes(serialization.Encoding.PEM).decode(),
            "enrollment_token": self._token,
            "device_id": self.device_id,
            "org_id": self.org_id,
        }
        answer = self._post(request, renew_with)
        cert, chain = self._check_answer(answer, key)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        leaf_and_intermediates = cert.public_bytes(
            serialization.Encoding.PEM
        ) + b"".join(
            c.public_bytes(serialization.Encoding.PEM)
            for c in chain
            if c.subject != c.issuer
        )
        try:
            write_atomically(self.chain_file, answer["chain"].encode(), 0o640)
            write_atomically(self.key_file, key_pem, 0o600)
            write_atomically(self.cert_file, leaf_and_intermediates, 0o640)
        except OSError as err:
            raise EnrollmentError(
                f"cannot store the certificate in {self.state_dir}: "
                f"{err.strerror or err}"
            ) from err
        log.info(
            "%s device %s: certificate serial %x valid until %s",
            "renewed" if renew_with else "enrolled",
            self.device_id,
            cert.serial_number,
            cert.not_valid_after_utc.isoformat(timespec="seconds"),
        )
        return self._credentials(cert)

    def _post(self, request: dict, renew_with: Credentials | None) -> dict:
        cert = (renew_with.cert_file, renew_with.key_file) if renew_with else None
        try:
            with requests.Session() as session:
                answer = http.post(
                    session,
                    self.enroll_url,
                    total_s=self.timeout,
                    read_timeout_s=self.timeout,
                    max_body=MAX_ANSWER_BYTES,
                    json=request,
                    verify=self.verify,
                    cert=cert,
                )
        except http.TransportError as err:
            reason = transport_reason(err, self.timeout)
            raise EnrollmentError(f"POST {self.enroll_url} failed: {reason}") from err
        status, body = answer.status, answer.body
        if status in (401, 403):
            raise TokenRefusedError(
                f"POST {self.enroll_url} answered {status}: "
                "the enrollment token (or the current certificate) was refused"
            )
        if status != 200:
            raise EnrollmentError(f"POST {self.enroll_url} answered {status}")
        if answer.truncated:
            raise EnrollmentError(f"answer from {self.enroll_url} is over 1 MiB")
        try:
            answer = json.loads(body)
        except ValueError as err:
            raise EnrollmentError(
                f"answer from {self.enroll_url} is not JSON: {err}"
            ) from err
        if not isinstance(answer, dict) or not all(
            isinstance(answer.get(k), str) for k in ("certificate", "chain")
        ):
            raise EnrollmentError(
                f"answer from {self.enroll_url} lacks the strings "
                "'certificate' and 'chain'"
            )
        return answer

    def _check_answer(
        self, answer: dict, key: ed25519.Ed25519PrivateKey
    ) -> tuple[x509.Certificate, list[x509.Certificate]]:
        where = f"certificate from {self.enroll_url}"
        try:
            cert = x509.load_pem_x509_certificate(answer["certificate"].encode())
            chain = (
                x509.load_pem_x509_certificates(answer["chain"].encode())
                if answer["chain"].strip()
                else []
            )
        except ValueError as err:
            raise EnrollmentError(f"{where} is not PEM: {err}") from err
        if not _same_key(cert, key):
            raise EnrollmentError(f"{where} is not for the key we sent")
        if common_name(cert) != self.device_id:
            raise EnrollmentError(
                f"{where} names {common_name(cert)!r}, not device {self.device_id!r}"
            )
        if cert.not_valid_after_utc <= _now():
            raise EnrollmentError(f"{where} has already expired")
        issuers = [c for c in chain if c.subject == cert.issuer]
        if chain and not issuers:
            raise EnrollmentError(f"{where} was not issued by the chain sent with it")
        for issuer in issuers:
            try:
                cert.verify_directly_issued_by(issuer)
            except (ValueError, TypeError, InvalidSignature) as err:
                why = str(err) or type(err).__name__
                raise EnrollmentError(f"{where} does not verify: {why}") from err
        return cert, chain
