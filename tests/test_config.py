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


# --- every setting checked at check time (issue 12: `link.command_key = ""` was accepted) ----------------

#: RFC 8032 section 7.1, test 1: a valid Ed25519 public key.
RFC8032_PUB = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
#: libsodium's list of small-order encodings (crypto_core/ed25519/ref10, `has_small_order`): points of order
#: 1 (the identity), 2, 4 and 8; none of them is a key anyone can hold the private half of.
SMALL_ORDER = (
    "0100000000000000000000000000000000000000000000000000000000000000",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "0000000000000000000000000000000000000000000000000000000000000000",
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
)


def _off_curve() -> str:
    """y = 2: (y^2 - 1) / (d y^2 + 1) is not a square mod p (Euler's criterion), so no x exists."""
    p = 2**255 - 19
    d = -121665 * pow(121666, p - 2, p) % p
    x2 = (4 - 1) * pow(d * 4 + 1, p - 2, p) % p
    assert pow(x2, (p - 1) // 2, p) == p - 1
    return (2).to_bytes(32, "little").hex()


def _full_config(state: Path, **sections: str) -> str:
    """A valid config using every section; `sections` sets keys of one section (`link='port = 0'`: a key
    given replaces the default one; `readers` and a value starting with "!" replace the whole section)."""
    base = {
        "top": 'hardware = "sim"',
        "site": 'id = "hq"\ngateway = "gw-1"\ntimezone = "Europe/Berlin"',
        "policy": "offline_grace_s = 300\npin_lockout_s = 60",
        "storage": f'state_dir = "{state}"',
        "link": f'host = "127.0.0.1"\ncommand_key = "{RFC8032_PUB}"',
        "control": f'socket = "{state}/control.sock"',
        "metrics": 'cache_s = 1.0',
        "readers": '[[readers]]\ndriver = "wiegand"\ndoor = "door1"',
    }
    for k, v in sections.items():
        if k == "readers" or v.startswith("!"):
            base[k] = v.lstrip("!")
            continue
        lines = {ln.split("=", 1)[0].strip(): ln for ln in base[k].splitlines()}
        lines |= {ln.split("=", 1)[0].strip(): ln for ln in v.splitlines()}
        base[k] = "\n".join(lines.values())
    return (
        f"{base['top']}\n[site]\n{base['site']}\n[policy]\n{base['policy']}\n[storage]\n{base['storage']}\n"
        f"[link]\n{base['link']}\n[control]\n{base['control']}\n[metrics]\n{base['metrics']}\n{base['readers']}\n"
    )


OSDP = '[[readers]]\ndriver = "osdp"\ndoor = "door2"\nport = "/dev/null"\nsecure = false\n'
#: (section, lines added to it, text the error must contain: the key first)
BAD_VALUES: dict[str, tuple[str, str, str]] = {
    "command_key_empty": ("link", 'command_key = ""', "link.command_key: expected 64 hex digits"),
    "command_key_short": ("link", 'command_key = "abcd"', "link.command_key: expected 64 hex digits"),
    "command_key_not_hex": ("link", f'command_key = "{"zz" * 32}"', "link.command_key: expected 64 hex digits"),
    "command_key_non_canonical": ("link", f'command_key = "{"ff" * 32}"', "link.command_key: not an Ed25519"),
    "command_key_off_curve": ("link", f'command_key = "{_off_curve()}"', "link.command_key: not an Ed25519 public "
                              "key (not a point of the curve)"),
    "command_key_missing_pem": ("link", 'command_key = "/nonexistent/site.pem"', "link.command_key: cannot read"),
    **{
        f"command_key_small_order_{i}": ("link", f'command_key = "{k}"', "link.command_key: not a usable Ed25519")
        for i, k in enumerate(SMALL_ORDER)
    },
    "host_empty": ("link", 'host = ""', "link.host: expected `str` of length >= 1"),
    "port_zero": ("link", "port = 0", "link.port: expected `int` >= 1"),
    "keepalive_huge": ("link", "keepalive_s = 100000", "link.keepalive_s: expected `int` <= 3600"),
    "session_expiry_overflow": ("link", "session_expiry_s = 4294967296", "link.session_expiry_s"),
    "backoff_inf": ("link", "backoff_max_s = inf", "link.backoff_max_s: expected `float` <= 3600"),
    "backoff_nan": ("link", "backoff_min_s = nan", "link.backoff_min_s"),
    "backoff_order": ("link", "backoff_min_s = 10.0\nbackoff_max_s = 5.0", "link.backoff_min_s: must not exceed"),
    "connect_timeout_order": ("link", "connect_timeout_s = 200.0", "link.connect_timeout_s: must not exceed"),
    "connect_timeout_zero": ("link", "connect_timeout_s = 0", "link.connect_timeout_s: expected `float` > 0"),
    "downlink_filter_one_on_3": ("link", 'downlink_filter = "one"\nmqtt_version = "3.1.1"',
                                 'link.downlink_filter: "one" needs link.mqtt_version = "5"'),
    "downlink_filter_bad": ("link", 'downlink_filter = "all"', "link.downlink_filter: invalid enum value"),
    "max_message_small": ("link", "max_message_bytes = 100", "link.max_message_bytes: expected `int` >= 4096"),
    "max_message_huge": ("link", "max_message_bytes = 1000000000", "link.max_message_bytes: expected `int` <="),
    "batch_zero": ("link", "batch_events = 0", "link.batch_events"),
    "encoding": ("link", 'encoding = "xml"', "link.encoding: invalid enum value"),
    "ca_missing": ("link", 'ca = "/nonexistent/ca.pem"', "link.ca: cannot read /nonexistent/ca.pem"),
    "username_empty": ("link", 'username = ""', "link.username: expected `str` of length >= 1"),
    "grace_inf": ("policy", "offline_grace_s = inf", "policy.offline_grace_s: expected `float` <="),
    "grace_negative": ("policy", "offline_grace_s = -1.0", "policy.offline_grace_s: expected `float` >= 0"),
    "lockout_nan": ("policy", "pin_lockout_s = nan", "policy.pin_lockout_s"),
    "offline_age_zero": ("policy", "max_offline_age_days = 0", "policy.max_offline_age_days: expected `float` > 0"),
    "skew_inf": ("policy", "max_clock_skew_s = inf", "policy.max_clock_skew_s"),
    "override_group_bad": ("policy", 'lockdown_override_group = "a b"', "policy.lockdown_override_group"),
    "clock_source": ("policy", 'clock_source = "gps"', "policy.clock_source: invalid enum value"),
    "time_policy": ("policy", 'time_policy = "never"', "policy.time_policy: invalid enum value"),
    "tz_empty": ("site", '!id = "hq"\ngateway = "g"\ntimezone = ""', "site.timezone"),
    "gateway_reserved": ("site", '!id = "hq"\ngateway = "_probe-1"', "site.gateway: names starting with '_probe-'"),
    "gateway_id_long": ("site", f'!id = "hq"\ngateway = "{"g" * 65}"', "site.gateway"),
    "state_dir_empty": ("storage", '!state_dir = ""', "storage.state_dir: expected `str` of length >= 1"),
    "state_dir_is_a_file": ("storage", '!state_dir = "/etc/hostname/state"', "storage.state_dir: /etc/hostname is"),
    "synchronous": ("storage", 'synchronous = "OFF"', "storage.synchronous: invalid enum value"),
    "journal_small": ("storage", "journal_max_events = 10", "storage.journal_max_events: expected `int` >= 100"),
    "flush_zero": ("storage", "journal_flush_s = 0", "storage.journal_flush_s: expected `float` > 0"),
    "socket_too_long": ("control", f'!socket = "/tmp/{"s" * 120}.sock"', "control.socket: 130 bytes is too long"),
    "socket_dir_is_a_file": ("control", '!socket = "/etc/hostname/control.sock"', "control.socket: /etc/hostname is"),
    "metrics_port": ("metrics", "port = 70000", "metrics.port: expected `int` <= 65535"),
    "window_zero": ("link", "window = 0", "link.window: expected `int` >= 1"),
    "ack_timeout_inf": ("link", "ack_timeout_s = inf", "link.ack_timeout_s"),
    "hardware_missing": ("top", 'hardware = "nope"', "hardware: hardware profile 'nope': cannot read"),
    "hardware_empty": ("top", 'hardware = ""', "hardware: expected `str` of length >= 1"),
    "reader_unknown_door": ("readers", '[[readers]]\ndriver = "wiegand"\ndoor = "door9"',
                            "readers[0].door: hardware profile 'sim' has no door 'door9'"),
    "reader_bad_door_id": ("readers", '[[readers]]\ndriver = "wiegand"\ndoor = "door 1"', "readers[0].door"),
    "reader_two_wiegand": ("readers", '[[readers]]\ndriver = "wiegand"\ndoor = "door1"\n'
                           '[[readers]]\ndriver = "wiegand"\ndoor = "door1"', "readers[1].door: a second Wiegand"),
    "reader_unknown_format": ("readers", '[[readers]]\ndriver = "wiegand"\ndoor = "door1"\nformats = ["h99"]',
                              "readers[0].formats: unknown card format 'h99'"),
    "reader_no_format": ("readers", '[[readers]]\ndriver = "wiegand"\ndoor = "door1"\nformats = []',
                         "readers[0].formats: a reader must accept at least one"),
    "reader_ambiguous_formats": ("readers", '[[readers]]\ndriver = "wiegand"\ndoor = "door1"\n'
                                 'formats = ["h10302", "h10304"]', "readers[0].formats: card formats"),
    "reader_extra_format_too_wide": ("readers", '[[readers]]\ndriver = "wiegand"\ndoor = "door1"\n'
                                     'formats = ["x8"]\n[[readers.extra_formats]]\nname = "x8"\nlength = 8\n'
                                     "card = {start = 4, length = 8}", "readers[0].formats: card format 'x8'"),
    "reader_pin_timeout": ("readers", '[[readers]]\ndriver = "wiegand"\ndoor = "door1"\npin_timeout_s = 0',
                           "readers[0].pin_timeout_s"),
    "reader_name_empty": ("readers", '[[readers]]\ndriver = "wiegand"\ndoor = "door1"\nname = ""',
                          "readers[0].name"),
    "osdp_baud": ("readers", OSDP + "baud = 12345", "readers[0].baud: 12345 is not an OSDP speed"),
    "osdp_address": ("readers", OSDP + "address = 127", "readers[0].address: expected `int` <= 126"),
    "osdp_port_missing": ("readers", OSDP.replace("/dev/null", "/dev/ttyNOPE0"),
                          "readers[0].port: /dev/ttyNOPE0 does not exist"),
    "osdp_port_empty": ("readers", OSDP.replace("/dev/null", ""), "readers[0].port"),
    "osdp_secure_without_key": ("readers", OSDP.replace("secure = false", "secure = true"),
                                "readers[0].key_file: secure = true needs key_file"),
    "osdp_two_speeds_one_line": ("readers", OSDP + OSDP.replace("door2", "door1") + "address = 1\nbaud = 9600",
                                 "readers[1].baud: 9600 differs from readers[0] on the same port"),
    "osdp_same_address": ("readers", OSDP + OSDP.replace("door2", "door1"),
                          "readers[1].address: 0 is already readers[0] on /dev/null"),
    "osdp_direction": ("readers", OSDP + 'direction = "up"', "readers[0].direction: invalid enum value"),
}


def _check_config(tmp_path: Path, text: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    from edge.cli import main

    cfg = tmp_path / "edge.toml"
    cfg.write_text(text)
    code = main(["--config", str(cfg), "check-config"])
    out = capsys.readouterr()
    return code, out.err + out.out


def test_the_full_config_is_good(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _check_config(tmp_path, _full_config(tmp_path / "state"), capsys)
    assert code == 0, out
    code, out = _check_config(tmp_path, _full_config(tmp_path / "state", readers="!" + OSDP), capsys)
    assert code == 0, out
    assert not (tmp_path / "state").exists()  # checking creates nothing


@pytest.mark.parametrize("name", sorted(BAD_VALUES))
def test_check_config_refuses_every_bad_value_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    section, lines, message = BAD_VALUES[name]
    code, out = _check_config(tmp_path, _full_config(tmp_path / "state", **{section: lines}), capsys)
    assert code == 2, out
    assert out.startswith(f"config error: {tmp_path / 'edge.toml'}: "), out
    assert message in out, out


def test_command_key_as_a_pem_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.asymmetric.rsa import generate_private_key

    def pem(key: object, name: str) -> Path:
        p = tmp_path / name
        p.write_bytes(key.public_key().public_bytes(  # type: ignore[attr-defined]
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        return p

    good = pem(Ed25519PrivateKey.generate(), "site.pem")
    rsa = pem(generate_private_key(public_exponent=65537, key_size=2048), "rsa.pem")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a key")
    state = tmp_path / "state"
    assert _check_config(tmp_path, _full_config(state, link=f'!command_key = "{good}"'), capsys)[0] == 0
    code, out = _check_config(tmp_path, _full_config(state, link=f'!command_key = "{rsa}"'), capsys)
    assert code == 2 and f"link.command_key: {rsa} is not an Ed25519 public key" in out
    code, out = _check_config(tmp_path, _full_config(state, link=f'!command_key = "{junk}"'), capsys)
    assert code == 2 and f"link.command_key: {junk} is not a PEM public key" in out


@pytest.mark.parametrize("command", ["run", "check-config"])
def test_an_empty_command_key_stops_the_start(tmp_path: Path, command: str) -> None:
    """The reported bug: `command_key = ""` passed check-config and the link then restarted for ever."""
    state = tmp_path / "state"
    cfg = tmp_path / "edge.toml"
    cfg.write_text(_full_config(state, link='command_key = ""'))
    r = _edge("--config", str(cfg), command, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "link.command_key: expected 64 hex digits" in r.stderr
    assert not state.exists()


HW_DIR = Path(__file__).resolve().parent.parent / "hw"


@pytest.mark.parametrize("profile", sorted(p.stem for p in HW_DIR.glob("*.toml")))
def test_every_shipped_hardware_profile_checks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], profile: str
) -> None:
    text = _full_config(tmp_path / "state", top=f'hardware = "{profile}"',
                        readers='!\n[[readers]]\ndriver = "wiegand"\ndoor = "door1"\n'
                                '[[readers]]\ndriver = "wiegand"\ndoor = "door2"')  # fmt: skip
    code, out = _check_config(tmp_path, text, capsys)
    assert code == 0, out
    assert f"profile {profile}, 2 doors, 2 readers" in out


SIM_PROFILE = (HW_DIR / "sim.toml").read_text()
#: (replace this text of hw/sim.toml, by this, the key the error names)
BAD_PROFILE: dict[str, tuple[str, str, str]] = {
    "version": ("version = 1", "version = 2", "version: Invalid enum value 2"),
    "factory": ('factory = "mock"', 'factory = "gpio"', "factory: Invalid enum value 'gpio'"),
    "name": ('name = "sim"', 'name = "s i m"', "name: Expected `str` matching"),
    "unknown_key": ("relay_pin = 17\n", "relay_pin = 17\nrelay_pins = 3\n", "doors[0]: Object contains unknown field"),
    "pin_out_of_range": ("relay_pin = 17\n", "relay_pin = 28\n", "doors[0].relay_pin: Expected `int` <= 27"),
    "pin_twice": ("contact_pin = 22\n", "contact_pin = 17\n", "doors[0].contact_pin: GPIO17 is already"),
    "relay_pulled_up": ("relay_pin = 17\n", "relay_pin = 4\n", "doors[0].relay_pin: GPIO4 is pulled HIGH"),
    "door_twice": ('door = "door2"', 'door = "door1"', "doors[1].door: door 'door1' is already doors[0]"),
    "lock_type": ('lock_type = "fail_secure"', 'lock_type = "magnetic"', "doors[0].lock_type: Invalid enum value"),
    "d0_without_d1": ("reader_d1_pin = 25\n", "", "doors[0].reader_d0_pin: reader_d0_pin and reader_d1_pin go"),
    "debounce_nan": ("led_pin = 12\n", "led_pin = 12\ndebounce_s = nan\n", "doors[0].debounce_s"),
    "prealarm_one": ("led_pin = 12\n", "led_pin = 12\nprealarm_fraction = 1.0\n", "doors[0].prealarm_fraction"),
}


@pytest.mark.parametrize("name", sorted(BAD_PROFILE))
def test_check_config_refuses_a_bad_hardware_profile_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    old, new, message = BAD_PROFILE[name]
    assert old in SIM_PROFILE
    prof = tmp_path / "board.toml"
    prof.write_text(SIM_PROFILE.replace(old, new, 1))
    code, out = _check_config(tmp_path, _full_config(tmp_path / "state", top=f'hardware = "{prof}"'), capsys)
    assert code == 2, out
    assert f"hardware: {prof}: {message}" in out, out


# --- the config's version (issue 13) and the link settings defined once -------------------------------------

VERSIONS = {
    "other": ("version = 2", "version: 2 is not a config version this agent reads (it reads version 1"),
    "zero": ("version = 0", "version: 0 is not a config version"),
    "text": ('version = "1"', "version: expected `int`, got `str`"),
    "bool": ("version = true", "version: expected `int`, got `bool`"),
    # a file written for another version is refused for its version, not for a key that version renamed
    "other_with_new_keys": ("version = 2\n[doors]\nfront = {}", "version: 2 is not a config version"),
}


@pytest.mark.parametrize("name", sorted(VERSIONS))
def test_a_config_of_another_version_is_refused_naming_the_version(name: str) -> None:
    top, message = VERSIONS[name]
    with pytest.raises(ConfigError) as ei:
        parse_config(f"{top}\n{GOOD.format(state='/tmp/x')}", source="edge.toml")
    assert str(ei.value).startswith(f"edge.toml: {message}"), str(ei.value)


def test_version_1_and_no_version_are_the_same_config(tmp_path: Path) -> None:
    plain = parse_config(GOOD.format(state=tmp_path))
    assert plain.version == 1
    assert parse_config("version = 1\n" + GOOD.format(state=tmp_path)) == plain


def test_every_shared_link_setting_reaches_the_link(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The `[link]` keys shared with `cloud_bridge.settings.LinkSettings` are one definition: a value set in the
    file arrives unchanged in the link's `LinkConfig`, for every shared key (none is copied by hand)."""
    from cloud_bridge.settings import LinkSettings
    from edge.link import link_config

    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "gw.key").write_text("not a real key")
    (creds / "gw.password").write_text("s3cret\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    defaults = LinkSettings()
    values: dict[str, str] = {"host": '"mqtt.example.net"', "ca": '"/etc/ca.pem"', "cert": '"/etc/gw.pem"',
                              "username": '"gw-1"', "encoding": '"json"'}  # fmt: skip
    values |= {"endpoints": '["mqtt2.example.net:8883"]', "mqtt_version": '"3.1.1"', "session": '"clean"',
               "downlink_qos": "0", "reply_qos": "0", "failover": '"in_order"'}  # fmt: skip
    # downlink_filter = "one" needs MQTT 5, which the values below leave (3.1.1): checked on its own after
    alone = {"downlink_filter": '"one"'}
    for f in LinkSettings.__struct_fields__:
        d = getattr(defaults, f)
        if f not in values and f not in alone:
            assert isinstance(d, int | float) and not isinstance(d, bool), f
            values[f] = repr(d + 1 if isinstance(d, int) else d + 0.5)
    lines = "\n".join(f"{k} = {v}" for k, v in values.items())
    secrets = 'key = "gw.key"\npassword_file = "gw.password"'
    cfg = parse_config(GOOD.format(state=tmp_path) + f"[link]\n{lines}\n{secrets}\n")
    lc = link_config(cfg)
    for f in LinkSettings.__struct_fields__:
        if f not in alone:
            assert getattr(lc, f) == getattr(cfg.link, f) != getattr(defaults, f), f
    assert (lc.site, lc.gateway, lc.password, lc.key) == ("hq", "gw-1", "s3cret", str(creds / "gw.key"))
    lines = "\n".join(f"{k} = {v}" for k, v in alone.items())
    lc = link_config(parse_config(GOOD.format(state=tmp_path) + f"[link]\n{lines}\n"))
    for f in alone:
        assert getattr(lc, f) != getattr(defaults, f), f
    assert lc.synchronous == cfg.storage.synchronous
