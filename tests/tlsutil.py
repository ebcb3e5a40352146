"""Throwaway certificates for tests: a CA, the leaves it signs, and PEM files.

Keys are EC P-256 unless the caller brings its own (an Ed25519 device key, for
instance). Nothing here is fit for production use: validity is one day.
"""

from __future__ import annotations

import datetime
import ipaddress
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
KeyAndCert = tuple[PrivateKey, x509.Certificate]


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _hash_for(signer: PrivateKey) -> hashes.HashAlgorithm | None:
    # Ed25519 signs without a separate digest; cryptography wants None.
    if isinstance(signer, ed25519.Ed25519PrivateKey):
        return None
    return hashes.SHA256()


def _validity(
    builder: x509.CertificateBuilder,
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return builder.not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(
        now + datetime.timedelta(days=1)
    )


def make_ca(common_name: str) -> KeyAndCert:
    """Return a fresh self-signed CA key and certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
            critical=False,
        )
    )
    cert = _validity(builder).sign(key, _hash_for(key))
    return key, cert


def make_cert(
    ca: KeyAndCert,
    hostnames: list[str],
    ips: list[str],
    client: bool = False,
    *,
    key: PrivateKey | None = None,
    common_name: str | None = None,
) -> KeyAndCert:
    """Return a leaf key and certificate signed by `ca`.

    `client` selects the clientAuth extended key usage instead of serverAuth.
    `key` signs an existing key (for example an Ed25519 device key); by default
    a new P-256 key is made. The subject CN defaults to the first name given.
    """
    ca_key, ca_cert = ca
    if key is None:
        key = ec.generate_private_key(ec.SECP256R1())
    if common_name is None:
        names = [*hostnames, *ips]
        common_name = names[0] if names else "test client"
    usage = (
        ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    alt_names: list[x509.GeneralName] = [x509.DNSName(h) for h in hostnames]
    alt_names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    if alt_names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(alt_names), critical=False
        )
    cert = _validity(builder).sign(ca_key, _hash_for(ca_key))
    return key, cert


def write_pem(path: str | os.PathLike[str], key_or_cert: object) -> None:
    """Write a certificate (mode 0644) or an unencrypted PKCS#8 key (0600)."""
    if isinstance(key_or_cert, x509.Certificate):
        data = key_or_cert.public_bytes(serialization.Encoding.PEM)
        mode = 0o644
    elif isinstance(
        key_or_cert, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
    ):
        data = key_or_cert.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        mode = 0o600
    else:
        raise TypeError(f"cannot write {type(key_or_cert).__name__} as PEM")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
