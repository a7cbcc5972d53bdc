"""The TLS certificate of the daemon's TCP listener: self-signed, made on first use.

Kept in ``$WARDEN_HOME/tls/`` (``server.crt``; ``server.key`` is 0600). Clients pin it: copy
``server.crt`` to them and point ``WARDEN_CA_CERT`` (or ``connect(ca_cert=...)``) at it. A new
certificate is made when the old one expires within a month or does not name the listen host.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from warden.config import private_dir

VALID_DAYS = 365
RENEW_BEFORE = datetime.timedelta(days=30)


def cert_paths(home: Path) -> tuple[Path, Path]:
    """(certificate, private key) of the daemon of ``home``."""
    return home / "tls" / "server.crt", home / "tls" / "server.key"


def _names(host: str) -> list[x509.GeneralName]:
    """The subject alternative names: the listen host, plus this machine's usual names."""
    hosts = {host, "localhost", "127.0.0.1", "::1", socket.gethostname()}
    if host in ("0.0.0.0", "::", ""):  # noqa: S104 - a wildcard is no name to certify
        hosts.discard(host)
    names: list[x509.GeneralName] = []
    for h in sorted(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return names


def _usable(cert_path: Path, host: str) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError):
        return False
    if cert.not_valid_after_utc - RENEW_BEFORE < datetime.datetime.now(datetime.UTC):
        return False
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    return all(name in san for name in _names(host))


def ensure_cert(home: Path, host: str) -> tuple[Path, Path]:
    """A certificate and key for a listener on ``host``: the existing ones, or new ones."""
    cert_path, key_path = cert_paths(home)
    if key_path.exists() and _usable(cert_path, host):
        return cert_path, key_path
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"warden daemon {host}")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(_names(host)), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    private_dir(cert_path.parent)
    key_bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write(key_path, key_bytes, 0o600)
    # 0600 too: clients pin a copy they were given; nothing else on the host needs to read it.
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o600)
    return cert_path, key_path


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
