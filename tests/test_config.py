"""Bad configuration: each kind of error names the key, and the process exits non-zero touching nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from edge.config import parse_config
from edge.errors import ConfigError

GOOD = """
hardware = "sim"
[site]
id = "hq"
gateway = "gw-1"
timezone = "Europe/Berlin"
[storage]
state_dir = "{state}"
[control]
socket = "{state}/control.sock"
"""

CASES = {
    "syntax": ("[site\nid=1", "not valid TOML"),
    "missing_key": ('[site]\nid = "hq"\n', "site.gateway: required key is missing"),
    "wrong_type": ('[site]\nid="hq"\ngateway="g"\n[policy]\npin_max_attempts = "three"\n',
                   "policy.pin_max_attempts: expected `int`, got `str`"),
    "out_of_range": ('[site]\nid="hq"\ngateway="g"\n[policy]\npin_max_attempts = 0\n',
                     "policy.pin_max_attempts: expected `int` >= 1"),
    "unknown_key": ('[site]\nid="hq"\ngateway="g"\n[policy]\npin_max_atempts = 3\n',
                    "policy.pin_max_atempts: unknown key"),
    "bad_enum": ('[site]\nid="hq"\ngateway="g"\n[policy]\noffline_policy = "sometimes"\n',
                 "policy.offline_policy: invalid enum value 'sometimes'"),
    "bad_timezone": ('[site]\nid="hq"\ngateway="g"\ntimezone = "Mars/Olympus"\n', "site.timezone: unknown time zone"),
    "bad_reader_driver": ('[site]\nid="hq"\ngateway="g"\n[[readers]]\ndriver = "nfc"\ndoor = "front"\n',
                          "readers[0].driver: invalid value 'nfc'"),
    "reader_missing_port": ('[site]\nid="hq"\ngateway="g"\n[[readers]]\ndriver = "osdp"\ndoor = "front"\n',
                            "readers[0].port: required key is missing"),
    "tls_without_ca": ('[site]\nid="hq"\ngateway="g"\n[link]\ncert = "c.pem"\nkey = "k.pem"\n', "link.ca: required"),
    "cert_without_key": (
        '[site]\nid="hq"\ngateway="g"\n[link]\ncert = "c.pem"\n', "link.cert: cert and key go together"
    ),
    "bad_site_id": ('[site]\nid="h q"\ngateway="g"\n', "site.id: expected `str` matching regex"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_error_names_the_key(name: str) -> None:
    text, message = CASES[name]
    with pytest.raises(ConfigError) as ei:
        parse_config(text, source="edge.toml")
    assert message in str(ei.value)
    assert str(ei.value).startswith("edge.toml: ")


def test_good_config_parses(tmp_path: Path) -> None:
    cfg = parse_config(GOOD.format(state=tmp_path))
    assert cfg.site.gateway == "gw-1" and cfg.policy.pin_max_attempts == 3
    assert cfg.site_policy().offline_grace_s == 300.0


def _edge(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge.cli", *args], cwd=cwd, check=False, capture_output=True, text=True, timeout=60,
        env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent)),
    )  # fmt: skip


@pytest.mark.parametrize("command", ["run", "check-config"])
@pytest.mark.parametrize("name", ["wrong_type", "unknown_key", "bad_reader_driver"])
def test_process_exits_nonzero_and_touches_nothing(tmp_path: Path, command: str, name: str) -> None:
    state = tmp_path / "state"
    text, message = CASES[name]
    cfg = tmp_path / "edge.toml"
    cfg.write_text(text + f'\n[storage]\nstate_dir = "{state}"\n' if "[storage]" not in text else text)
    before = sorted(p.name for p in tmp_path.iterdir())
    r = _edge("--config", str(cfg), command, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert not state.exists()


def test_check_config_accepts_a_good_file(tmp_path: Path) -> None:
    cfg = tmp_path / "edge.toml"
    cfg.write_text(GOOD.format(state=tmp_path / "state"))
    r = _edge("--config", str(cfg), "check-config", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout
    assert not (tmp_path / "state").exists()


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    r = _edge("--config", str(tmp_path / "nope.toml"), "check-config", cwd=tmp_path)
    assert r.returncode == 2 and "config file not found" in r.stderr
