"""The development CA: device certificates from CSRs, and the server's own.

In: a state directory, and certificate signing requests from devices.
Out: `ca.key` (EC P-256, mode 0600) and `ca.crt` (self-signed, 10 years) in
that directory, a serverAuth leaf for the service (`server.key`,
`server.crt`), and clientAuth certificates for devices whose CSR passes the
checks in `DevCA.sign_csr`.

Every file is written to a temporary name, fsynced and then renamed into
place, so a crash leaves either the old file or the new one. The CA files are
only ever created, never replaced: when two processes set up the same
directory at once, the one that links its file first wins and the other loads
the winner's.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import re
import secrets

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger("toktra.ingest")

CA_KEY = "ca.key"
CA_CERT = "ca.crt"
SERVER_KEY = "server.key"
SERVER_CERT = "server.crt"

CA_LIFETIME = datetime.timedelta(days=3650)
SERVER_LIFETIME = datetime.timedelta(days=365)
# A server certificate this close to expiry is replaced at the next start.
SERVER_RENEW_BEFORE = datetime.timedelta(days=1)
# Issued certificates start a little in the past so that a device whose clock
# runs slightly behind can use its certificate at once.
BACKDATE = datetime.timedelta(seconds=60)

DEVICE_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
# X.509's upper bound for a CN (RFC 5280, ub-common-name): longer device ids
# pass the pattern above yet cannot be put in a certificate.
MAX_COMMON_NAME = 64


class CAError(Exception):
    """The CA's files cannot be used; the message names the file and why."""


class EnrollmentError(Exception):
    """A certificate request this CA will not sign; the message says why."""


def write_file_atomic(path: str, data: bytes, mode: int, *, replace: bool) -> None:
    """Write `data` to `path` through a fsynced temporary file.

    The temporary file is created with O_EXCL and its final `mode`, so a
    secret is never readable by others, not even for a moment. With
    `replace` false the file is only created: FileExistsError if `path`
    already exists (someone else won the race), and nothing is overwritten.
    """
    directory = os.path.dirname(path) or "."
    tmp = f"{path}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(
        tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode
    )
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if replace:
            os.replace(tmp, path)
        else:
            # link, unlike rename, fails when the target exists.
            os.link(tmp, path)
    finally:
        # After a replace the temporary name is gone already.
        if os.path.lexists(tmp):
            os.unlink(tmp)
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_usage(*, digital_signature: bool, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _same_key(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> bool:
    form = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    return cert.public_key().public_bytes(der, form) == key.public_key().public_bytes(
        der, form
    )


def _describe_key(key: object) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA-{key.key_size}"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC {key.curve.name}"
    return type(key).__name__


def _load_ec_key(path: str) -> ec.EllipticCurvePrivateKey:
    with open(path, "rb") as f:
        data = f.read()
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise CAError(f"{path} is not an unencrypted PEM private key: {err}") from err
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CAError(f"{path} holds a {type(key).__name__}, expected an EC key")
    return key


def _load_cert(path: str) -> x509.Certificate:
    with open(path, "rb") as f:
        data = f.read()
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as err:
        raise CAError(f"{path} is not a PEM certificate: {err}") from err


class DevCA:
    """A self-signed CA kept in one directory, for a development service."""

    def __init__(
        self,
        directory: str,
        key: ec.EllipticCurvePrivateKey,
        cert: x509.Certificate,
    ) -> None:
        self.directory = directory
        self.key = key
        self.cert = cert

    @classmethod
    def load_or_create(cls, directory: str) -> DevCA:
        """Load the CA in `directory`, creating the directory, key or cert.

        A key without a certificate (a crash between the two writes) gets a
        new certificate. A certificate without its key cannot be repaired and
        raises CAError, as do unreadable or mismatched files and an expired
        CA certificate.
        """
        # Readable by others: the agent's unprivileged user reads ca.crt from
        # here. The keys themselves are created 0600.
        os.makedirs(directory, mode=0o755, exist_ok=True)
        key_path = os.path.join(directory, CA_KEY)
        cert_path = os.path.join(directory, CA_CERT)
        if not os.path.exists(key_path):
            if os.path.exists(cert_path):
                raise CAError(
                    f"{cert_path} exists but its key {key_path} is missing; "
                    "remove both to start a new CA"
                )
            key = ec.generate_private_key(ec.SECP256R1())
            try:
                write_file_atomic(key_path, _key_pem(key), 0o600, replace=False)
                log.info("created CA key %s", key_path)
            except FileExistsError:
                pass
        key = _load_ec_key(key_path)

        if not os.path.exists(cert_path):
            try:
                cert = cls._self_signed(key)
                write_file_atomic(cert_path, _cert_pem(cert), 0o644, replace=False)
                log.info("created CA certificate %s", cert_path)
            except FileExistsError:
                pass
        cert = _load_cert(cert_path)

        if not _same_key(cert, key):
            raise CAError(f"{cert_path} does not belong to the key in {key_path}")
        expires = cert.not_valid_after_utc
        if expires <= datetime.datetime.now(datetime.UTC):
            raise CAError(
                f"CA certificate {cert_path} expired on {expires:%Y-%m-%d}; "
                f"remove {key_path} and {cert_path} to start a new CA"
            )
        return cls(directory, key, cert)

    @staticmethod
    def _self_signed(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
        # A random suffix keeps two development CAs apart in a trust store
        # that holds both: same subject, different keys confuses verifiers.
        name = x509.Name(
            [
                x509.NameAttribute(
                    NameOID.COMMON_NAME, f"toktra dev ingest CA {secrets.token_hex(4)}"
                )
            ]
        )
        now = datetime.datetime.now(datetime.UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + CA_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                _key_usage(digital_signature=False, cert_sign=True), critical=True
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                critical=False,
            )
            .sign(key, hashes.SHA256())
        )

    @property
    def ca_file(self) -> str:
        """Path of the CA certificate: the `ca_file` agents verify against."""
        return os.path.join(self.directory, CA_CERT)

    def chain_pem(self) -> bytes:
        """The chain above an issued certificate: just the CA certificate."""
        return _cert_pem(self.cert)

    def _leaf(
        self,
        subject: str,
        public_key: ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey,
        usage: x509.ObjectIdentifier,
        lifetime: datetime.timedelta,
    ) -> x509.CertificateBuilder:
        now = datetime.datetime.now(datetime.UTC)
        # A certificate cannot usefully outlive the CA that vouches for it.
        not_after = min(now + lifetime, self.cert.not_valid_after_utc)
        try:
            ski = self.cert.extensions.get_extension_for_class(
                x509.SubjectKeyIdentifier
            ).value
            aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
        except x509.ExtensionNotFound:
            aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self.key.public_key()
            )
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(not_after)
            .add_extension(
                x509.BasicConstraints(ca=False, path_length=None), critical=True
            )
            .add_extension(
                _key_usage(digital_signature=True, cert_sign=False), critical=True
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False
            )
            .add_extension(aki, critical=False)
        )

    def _server_cert_usable(
        self, cert_path: str, key_path: str, names: list[x509.GeneralName]
    ) -> bool:
        if not (os.path.exists(cert_path) and os.path.exists(key_path)):
            return False
        try:
            cert = _load_cert(cert_path)
            key = _load_ec_key(key_path)
            cert.verify_directly_issued_by(self.cert)
            san = cert.extensions.get_extension_for_class(
                x509.SubjectAlternativeName
            ).value
        except (
            CAError,
            ValueError,
            TypeError,
            InvalidSignature,
            x509.ExtensionNotFound,
        ):
            # Anything unexpected about the old pair just means a new one.
            return False
        soon = datetime.datetime.now(datetime.UTC) + SERVER_RENEW_BEFORE
        return (
            _same_key(cert, key)
            and cert.not_valid_after_utc > soon
            and all(name in san for name in names)
        )

    def server_credentials(
        self, hostnames: list[str], ips: list[str]
    ) -> tuple[str, str]:
        """Paths (cert, key) of a serverAuth certificate for these names.

        The pair already in the directory is kept when this CA issued it, it
        covers every name and it is valid for at least another day; otherwise
        a new key and certificate replace it.

        Shortcoming: the key and the certificate are replaced one after the
        other, so a second service starting on the same directory at that
        instant can read a mismatched pair and fail to start. One combined
        PEM file would close the gap.
        """
        names: list[x509.GeneralName] = [x509.DNSName(h) for h in hostnames]
        names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        if not names:
            raise ValueError("a server certificate needs at least one name")
        cert_path = os.path.join(self.directory, SERVER_CERT)
        key_path = os.path.join(self.directory, SERVER_KEY)
        if self._server_cert_usable(cert_path, key_path, names):
            return cert_path, key_path

        key = ec.generate_private_key(ec.SECP256R1())
        subject = hostnames[0] if hostnames else ips[0]
        cert = (
            self._leaf(
                subject,
                key.public_key(),
                ExtendedKeyUsageOID.SERVER_AUTH,
                SERVER_LIFETIME,
            )
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        write_file_atomic(key_path, _key_pem(key), 0o600, replace=True)
        write_file_atomic(cert_path, _cert_pem(cert), 0o644, replace=True)
        log.info(
            "issued server certificate %s for %s",
            cert_path,
            ", ".join([*hostnames, *ips]),
        )
        return cert_path, key_path

    def sign_csr(
        self, csr_pem: bytes, device_id: str, lifetime: datetime.timedelta
    ) -> bytes:
        """Check a device's CSR and return its clientAuth certificate (PEM).

        Only the CSR's public key is taken from it. The subject is rebuilt
        from `device_id` and the extensions are this CA's own, so a request
        cannot ask for more (a CA flag, other names) than a device gets.
        Raises EnrollmentError naming the first check that failed.
        """
        if not DEVICE_ID.fullmatch(device_id):
            raise EnrollmentError(
                "device_id must be 1 to 128 characters of A-Z, a-z, 0-9, '.', "
                "'_' and '-'"
            )
        if len(device_id) > MAX_COMMON_NAME:
            raise EnrollmentError(
                f"device_id is {len(device_id)} characters; a certificate's "
                f"common name holds at most {MAX_COMMON_NAME}"
            )
        if lifetime <= datetime.timedelta(0):
            raise ValueError(f"certificate lifetime must be positive, got {lifetime}")
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as err:
            raise EnrollmentError("csr is not a PEM certificate request") from err
        try:
            public_key = csr.public_key()
        except (ValueError, UnsupportedAlgorithm) as err:
            raise EnrollmentError("the CSR's public key cannot be read") from err
        if not isinstance(public_key, ed25519.Ed25519PublicKey):
            raise EnrollmentError(
                f"the CSR's key is {_describe_key(public_key)}; only Ed25519 "
                "device keys are accepted"
            )
        if not csr.is_signature_valid:
            raise EnrollmentError("the CSR's signature does not verify")
        common_names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if len(common_names) != 1 or common_names[0].value != device_id:
            raise EnrollmentError(
                "the CSR's subject must have exactly one CN, equal to device_id"
            )

        cert = self._leaf(
            device_id, public_key, ExtendedKeyUsageOID.CLIENT_AUTH, lifetime
        ).sign(self.key, hashes.SHA256())
        return _cert_pem(cert)
