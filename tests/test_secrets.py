"""Secrets come from systemd credentials (encrypted at rest); plain secret files are refused unless allowed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edge.config import OsdpReaderConfig, parse_config
from edge.errors import ConfigError
from edge.link import link_config
from edge.readers.registry import read_key
from edge.secrets import CREDENTIALS_ENV, SecretSource

SCBK = "00112233445566778899aabbccddeeff"
ROOT = Path(__file__).resolve().parent.parent

CONFIG = """
hardware = "sim"
[site]
id = "s"
gateway = "g"
[storage]
state_dir = "{state}"
plaintext_secrets = {plain}
[link]
enabled = true
username = "gw"
password_file = "{password}"
[[readers]]
driver = "osdp"
door = "door1"
port = "/dev/null"  # check-config checks that the port exists
key_file = "door1.scbk"
"""


def config_file(tmp_path: Path, *, plain: bool = False, password: str = "mqtt-password") -> Path:
    p = tmp_path / "edge.toml"
    p.write_text(CONFIG.format(state=tmp_path / "state", plain=str(plain).lower(), password=password))
    return p


def edge(*args: str, cwd: Path, creds: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != CREDENTIALS_ENV}
    env["PYTHONPATH"] = str(ROOT)
    if creds is not None:
        env[CREDENTIALS_ENV] = str(creds)
    return subprocess.run(
        [sys.executable, "-m", "edge.cli", *args], cwd=cwd, check=False, capture_output=True, text=True, timeout=60,
        env=env,
    )  # fmt: skip


def credentials_dir(tmp_path: Path, secrets: dict[str, str]) -> Path:
    """What systemd makes at service start: a directory of decrypted credentials, mode 0400 each."""
    d = tmp_path / "credentials"
    d.mkdir(mode=0o700)
    for name, value in secrets.items():
        f = d / name
        f.write_text(value + "\n")
        f.chmod(0o400)
    return d


def test_secrets_are_read_from_the_credentials_directory(tmp_path: Path) -> None:
    creds = credentials_dir(tmp_path, {"door1.scbk": SCBK, "mqtt-password": "s3cret-pw"})
    assert sorted(p.name for p in creds.iterdir()) == ["door1.scbk", "mqtt-password"]
    r = edge("--config", str(config_file(tmp_path)), "check-config", cwd=tmp_path, creds=creds)
    assert r.returncode == 0, r.stderr
    assert SCBK not in r.stdout + r.stderr and "s3cret-pw" not in r.stdout + r.stderr
    src = SecretSource(creds, plaintext=False)
    assert src.read("door1.scbk", "k") == SCBK and src.read("mqtt-password", "p") == "s3cret-pw"


@pytest.mark.parametrize("command", ["check-config", "run"])
def test_a_plain_secret_file_is_refused_by_default(tmp_path: Path, command: str) -> None:
    keys = tmp_path / "state" / "keys"
    keys.mkdir(parents=True)
    (keys / "door1.scbk").write_text(SCBK)
    (keys / "door1.scbk").chmod(0o600)
    before = sorted(p.name for p in (tmp_path / "state").iterdir())
    r = edge("--config", str(config_file(tmp_path)), command, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "readers[0].key_file" in r.stderr and "not a systemd credential" in r.stderr
    assert "storage.plaintext_secrets" in r.stderr and SCBK not in r.stderr
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == before  # nothing created: no store, no journal


def test_a_missing_credential_is_named(tmp_path: Path) -> None:
    creds = credentials_dir(tmp_path, {"door1.scbk": SCBK})  # no MQTT password
    r = edge("--config", str(config_file(tmp_path)), "check-config", cwd=tmp_path, creds=creds)
    assert r.returncode == 2
    assert "link.password_file" in r.stderr and "has no credential 'mqtt-password'" in r.stderr


def test_plain_files_when_allowed_but_never_readable_by_others(tmp_path: Path) -> None:
    keys = tmp_path / "state" / "keys"
    keys.mkdir(parents=True)
    key = keys / "door1.scbk"
    key.write_text(SCBK + "\n")
    pw = tmp_path / "mqtt-password"
    pw.write_text("pw\n")
    for f in (key, pw):
        f.chmod(0o640)
    cfg = parse_config(config_file(tmp_path, plain=True, password=str(pw)).read_text())
    rc = cfg.readers[0]
    assert isinstance(rc, OsdpReaderConfig)
    env = os.environ.pop(CREDENTIALS_ENV, None)
    try:
        assert read_key(cfg, rc, "readers[0]") == SCBK
        assert link_config(cfg).password == "pw"
        key.chmod(0o644)
        with pytest.raises(ConfigError, match=r"readers\[0\]\.key_file: .* readable or writable by other users"):
            read_key(cfg, rc, "readers[0]")
    finally:
        if env is not None:
            os.environ[CREDENTIALS_ENV] = env


def test_a_credential_wins_over_a_plain_file_and_names_with_slashes_are_paths(tmp_path: Path) -> None:
    creds = credentials_dir(tmp_path, {"door1.scbk": SCBK})
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "door1.scbk").write_text("ff" * 16)
    (plain / "door1.scbk").chmod(0o600)
    src = SecretSource(creds, plaintext=True)
    assert src.read("door1.scbk", "k", plain_dir=plain) == SCBK
    assert src.read(str(plain / "door1.scbk"), "k") == "ff" * 16  # an explicit path is a plain file
    with pytest.raises(ConfigError, match="plain secret files are refused"):
        SecretSource(creds, plaintext=False).read(str(plain / "door1.scbk"), "k")


@pytest.mark.skipif(shutil.which("systemd-creds") is None or os.geteuid() != 0,
                    reason="needs systemd-creds (systemd >= 250) and root for the host key")  # fmt: skip
def test_systemd_creds_round_trip(tmp_path: Path) -> None:
    """The deployment path of docs/operations.md: `systemd-creds encrypt` keeps only ciphertext on disk,
    and what systemd decrypts into $CREDENTIALS_DIRECTORY at service start is what the agent reads."""
    plain = tmp_path / "door1.scbk.plain"
    plain.write_text(SCBK)
    enc = tmp_path / "door1.scbk.cred"
    subprocess.run(["systemd-creds", "encrypt", "--name=door1.scbk", "--with-key=host", str(plain), str(enc)],
                   check=True, capture_output=True)  # fmt: skip
    plain.unlink()
    data = enc.read_bytes()
    assert SCBK.encode() not in data and bytes.fromhex(SCBK) not in data
    creds = tmp_path / "credentials"
    creds.mkdir(mode=0o700)
    subprocess.run(["systemd-creds", "decrypt", "--name=door1.scbk", str(enc), str(creds / "door1.scbk")],
                   check=True, capture_output=True)  # fmt: skip
    (creds / "mqtt-password").write_text("pw")
    r = edge("--config", str(config_file(tmp_path)), "check-config", cwd=tmp_path, creds=creds)
    assert r.returncode == 0, r.stderr
    assert SecretSource(creds, plaintext=False).read("door1.scbk", "k") == SCBK
    # a credential decrypted under another name is refused (the name is authenticated)
    bad = subprocess.run(["systemd-creds", "decrypt", "--name=door2.scbk", str(enc), "-"],
                         check=False, capture_output=True)  # fmt: skip
    assert bad.returncode != 0
