"""A real Mosquitto for the tests and benchmarks: free loopback port, own config, stop/start for outages.

The port, the executable and the config come from cloud_bridge/service/broker.py (what `cloud-bridge demo`
runs); the config is written to a temp folder. `tls_extra(...)` makes a TLS listener with
`require_certificate`, the certificate's CN as user name, and an ACL file. Certificates come from `make_pki()`
(a throwaway CA).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cloud_bridge.service.broker import config_text, free_port, mosquitto_path

__all__ = ["Mosquitto", "Pki", "free_port", "make_pki", "mosquitto_path", "tls_extra"]


class Mosquitto:
    """One broker process. `start()`, `stop()` (SIGTERM or kill), `restart()`; same port every time."""

    def __init__(self, workdir: Path, *, port: int | None = None, extra: str = "") -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        self.conf = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"

    def write_config(self) -> None:
        self.conf.write_text(config_text(self.port, self.extra))

    def start(self, timeout: float = 10.0) -> None:
        self.write_config()
        with self.log.open("ab") as logf:
            self.proc = subprocess.Popen([mosquitto_path(), "-c", str(self.conf)], stdout=logf, stderr=logf)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.02)  # noqa: TID251 - fixture setup, not in an event loop
        raise RuntimeError(f"mosquitto did not listen on {self.port}")

    def stop(self, *, kill: bool = False) -> None:
        if self.proc is None:
            return
        if kill:
            self.proc.kill()
        else:
            self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


@dataclass
class Pki:
    dir: Path
    ca: Path

    def client(self, name: str) -> tuple[str, str]:
        return str(self.dir / f"{name}.crt"), str(self.dir / f"{name}.key")


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    path.chmod(0o600)


def make_pki(d: Path, clients: list[str]) -> Pki:
    """A throwaway CA, a server certificate for 127.0.0.1/localhost and one client certificate per name
    (CN = the name)."""
    d.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    (d / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))

    def leaf(name: str, *, server: bool) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        b = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        )
        if server:
            b = b.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        cert = b.sign(ca_key, hashes.SHA256())
        (d / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(d / f"{name}.key", key)

    leaf("server", server=True)
    for c in clients:
        leaf(c, server=False)
    return Pki(d, d / "ca.crt")


def tls_extra(pki: Pki, acl: str) -> str:
    """Config lines for a TLS-only broker: client certificates required, CN as user name, an ACL."""
    (pki.dir / "acl").write_text(acl)
    return "\n".join(
        [
            f"cafile {pki.ca}",
            f"certfile {pki.dir / 'server.crt'}",
            f"keyfile {pki.dir / 'server.key'}",
            "require_certificate true",
            "use_identity_as_username true",
            f"acl_file {pki.dir / 'acl'}",
        ]
    )
