"""The installer page's HTTPS certificate: self-signed, made at first start (the `cryptography` package).

The key (P-256) and the certificate are kept in `<state_dir>/installer/` (the key mode 0600) and reused at
every start; the certificate names the listening address and the gateway. A browser cannot check a
self-signed certificate, so the installer compares its SHA-256 fingerprint with the one `edge status` prints.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

CERT = "cert.pem"
KEY = "key.pem"


def fingerprint(cert_pem: bytes) -> str:
    """SHA-256 of the certificate's DER, as browsers show it (AB:CD:...)."""
    der = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
    digest = hashes.Hash(hashes.SHA256())
    digest.update(der)
    return ":".join(f"{b:02X}" for b in digest.finalize())


def ensure_certificate(directory: Path, *, address: str, name: str) -> tuple[Path, Path, str]:
    """(certificate path, key path, fingerprint); made now when missing or not for `address`. Blocking."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    cert_path, key_path = directory / CERT, directory / KEY
    ip = ipaddress.ip_address(address)
    if cert_path.exists() and key_path.exists():
        pem = cert_path.read_bytes()
        cert = x509.load_pem_x509_certificate(pem)
        try:
            sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            ips = sans.get_values_for_type(x509.IPAddress)
        except x509.ExtensionNotFound:
            ips = []
        if ip in ips and cert.not_valid_after_utc > dt.datetime.now(dt.UTC) + dt.timedelta(days=30):
            return cert_path, key_path, fingerprint(pem)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"edge installer {name}"[:64])])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ip)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())  # fmt: skip
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, key_pem)
    finally:
        os.close(fd)
    pem = cert.public_bytes(serialization.Encoding.PEM)
    cert_path.write_bytes(pem)
    return cert_path, key_path, fingerprint(pem)


__all__ = ["ensure_certificate", "fingerprint"]
