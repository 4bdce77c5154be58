"""Agent configuration: one strict TOML file decoded into typed Structs, validated once at start.

Every error names the key (`policy.pin_max_attempts: expected int, got str`). Unknown keys are errors,
so a typo never silently falls back to a default. Default path: /etc/edge/edge.toml (EDGE_CONFIG or
--config override it).
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec
from msgspec import Meta

from .decision import OfflinePolicy, SitePolicy, TimePolicy
from .errors import ConfigError
from .readers.formats import FormatSpec

DEFAULT_PATH = Path("/etc/edge/edge.toml")
#: Card formats a reader accepts unless its config says otherwise (H10302 needs an explicit choice).
DEFAULT_FORMATS = ("h10301", "h10304", "corp1000_35", "corp1000_48", "csn32", "csn56")  # no two one bit apart


class Strict(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    pass


class SiteSection(Strict, frozen=True, kw_only=True):
    id: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_\-]{1,64}$")]
    gateway: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_\-]{1,64}$")]
    timezone: str = "UTC"


class PolicySection(Strict, frozen=True, kw_only=True):
    offline_grace_s: Annotated[float, Meta(ge=0)] = 300.0
    offline_policy: OfflinePolicy = OfflinePolicy.FLAGGED
    pin_max_attempts: Annotated[int, Meta(ge=1, le=20)] = 3
    pin_lockout_s: Annotated[float, Meta(ge=0)] = 300.0
    lockdown_override_group: str | None = None
    time_policy: TimePolicy = TimePolicy.ALWAYS_ONLY
    max_offline_age_days: Annotated[float, Meta(gt=0)] | None = None
    max_clock_skew_s: Annotated[float, Meta(gt=0)] = 600.0
    #: "ntp": the clock is trusted once NTP (or the cloud) confirms it after a boot (a Pi has no RTC);
    #: "system": always trust the system clock (a board with a battery-backed RTC, or a development PC).
    clock_source: Literal["ntp", "system"] = "ntp"
    #: While NTP is not synchronised, take the cloud's time when it differs by more than max_clock_skew_s.
    adopt_cloud_time: bool = True


class StorageSection(Strict, frozen=True, kw_only=True):
    state_dir: str = "/var/lib/edge"
    #: SQLite `synchronous` for the rights store and the journal (see docs/operations.md).
    synchronous: Literal["FULL", "NORMAL"] = "FULL"
    journal_max_events: Annotated[int, Meta(ge=100)] = 1_000_000
    journal_memory_events: Annotated[int, Meta(ge=100)] = 100_000
    #: Events are written in batches this often (or every 500 events): a power cut loses at most this
    #: much; longer batches mean fewer SD-card writes (see docs/operations.md).
    journal_flush_s: Annotated[float, Meta(gt=0, le=10)] = 0.2
    #: Secrets (OSDP keys, MQTT password, TLS client key) are systemd credentials, encrypted at rest; plain
    #: files on disk are refused unless this is true (see edge/secrets.py and docs/operations.md).
    plaintext_secrets: bool = False


class WiegandReaderConfig(Strict, tag="wiegand", tag_field="driver", frozen=True, kw_only=True):
    """A Wiegand reader on the D0/D1 pins of its door in the hardware profile."""

    door: str
    name: str | None = None
    #: Accepted formats by name; two of one length (h10302 / h10304) is an error: choose one.
    formats: list[str] = msgspec.field(default_factory=lambda: list(DEFAULT_FORMATS))
    #: Further formats declared here without code (bit ranges and parity masks).
    extra_formats: list[FormatSpec] = []
    end_of_frame: Literal["adaptive", "fixed"] = "adaptive"
    keypad: bool = True
    #: Nibble order of 8-bit keypad bursts; vendors differ and one byte cannot tell (docs/hardware.md).
    keypad_order: Literal["key_low", "key_high"] = "key_low"
    pin_timeout_s: Annotated[float, Meta(gt=0, le=120)] = 10.0


class OsdpReaderConfig(Strict, tag="osdp", tag_field="driver", frozen=True, kw_only=True):
    door: str
    port: str
    address: Annotated[int, Meta(ge=0, le=126)] = 0
    name: str | None = None
    baud: int = 115200
    secure: bool = True
    allow_install_mode: bool = False
    allow_plaintext: bool = False
    #: Name of the systemd credential holding the Secure Channel key (32 hex digits), or with
    #: storage.plaintext_secrets a file under the state directory's `keys/`; never the key itself.
    key_file: str | None = None
    formats: list[str] = msgspec.field(default_factory=lambda: list(DEFAULT_FORMATS))
    #: RS-485 direction control: "auto" (the adapter switches), "kernel" (TIOCSRS485), "rts" (RTS keyed).
    direction: Literal["auto", "kernel", "rts"] = "auto"
    #: One OSDP line is polled by one bus: readers with the same `port` share it (and its baud rate).


ReaderConfig = WiegandReaderConfig | OsdpReaderConfig


class LinkSection(Strict, frozen=True, kw_only=True):
    """The cloud link (see docs/protocol.md). Secrets are files, never values in this config."""

    enabled: bool = True
    host: str = "localhost"
    port: Annotated[int, Meta(ge=1, le=65535)] = 1883
    #: TLS: the CA that signed the broker's certificate, and this gateway's client certificate and key
    #: (the key, and the password below, are systemd credential names: see edge/secrets.py).
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    username: str | None = None
    password_file: str | None = None
    keepalive_s: Annotated[int, Meta(ge=5, le=3600)] = 30
    session_expiry_s: Annotated[int, Meta(ge=0)] = 7 * 24 * 3600
    backoff_min_s: Annotated[float, Meta(gt=0)] = 0.5
    backoff_max_s: Annotated[float, Meta(gt=0)] = 60.0
    batch_events: Annotated[int, Meta(ge=1, le=100_000)] = 1000
    max_message_bytes: Annotated[int, Meta(ge=4096)] = 256 * 1024
    encoding: Literal["msgpack", "json"] = "msgpack"
    #: The site's Ed25519 public key that signs commands: 64 hex digits, or a path to a PEM file.
    #: Without it every command is refused.
    command_key: str | None = None


class ControlSection(Strict, frozen=True, kw_only=True):
    #: Unix socket for `edge status` and the simulator commands.
    socket: str = "/run/edge/control.sock"
    metrics_port: Annotated[int, Meta(ge=0, le=65535)] = 9105


class DemoSection(Strict, frozen=True, kw_only=True):
    """Provisioning applied at first start of a simulated gateway (empty store only)."""

    enabled: bool = False


class Config(Strict, frozen=True, kw_only=True):
    site: SiteSection
    hardware: str = "sim"  # a profile name under hw/ or a path to a profile file
    policy: PolicySection = PolicySection()
    storage: StorageSection = StorageSection()
    readers: list[ReaderConfig] = []
    link: LinkSection = LinkSection()
    control: ControlSection = ControlSection()
    demo: DemoSection = DemoSection()

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.site.timezone)

    @property
    def state_dir(self) -> Path:
        return Path(self.storage.state_dir)

    def site_policy(self) -> SitePolicy:
        p = self.policy
        return SitePolicy(
            offline_grace_s=p.offline_grace_s,
            offline_policy=p.offline_policy,
            pin_max_attempts=p.pin_max_attempts,
            pin_lockout_s=p.pin_lockout_s,
            lockdown_override_group=p.lockdown_override_group,
            time_policy=p.time_policy,
            max_offline_age_s=None if p.max_offline_age_days is None else p.max_offline_age_days * 86400,
        )


_PATH = re.compile(r" - at `\$(.*)`$")


def _key_of(msg: str) -> tuple[str, str]:
    m = _PATH.search(msg)
    if not m:
        return "", msg
    raw = m.group(1)
    key = re.sub(r"\[(\d+)\]", r"[\1]", raw).lstrip(".")
    return key, msg[: m.start()]


def _humanise(msg: str) -> str:
    key, what = _key_of(msg)
    unknown = re.match(r"Object contains unknown field `(.+)`", what)
    if unknown:
        full = f"{key}.{unknown.group(1)}" if key else unknown.group(1)
        return f"{full}: unknown key (check the spelling; see docs/operations.md)"
    missing = re.match(r"Object missing required field `(.+)`", what)
    if missing:
        full = f"{key}.{missing.group(1)}" if key else missing.group(1)
        return f"{full}: required key is missing"
    what = what[0].lower() + what[1:] if what else what
    return f"{key or '(top level)'}: {what}"


def parse_config(text: str, *, source: str = "<config>") -> Config:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from None
    try:
        cfg = msgspec.convert(raw, Config, strict=True)
    except msgspec.ValidationError as e:
        raise ConfigError(f"{source}: {_humanise(str(e))}") from None
    try:
        ZoneInfo(cfg.site.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"{source}: site.timezone: unknown time zone {cfg.site.timezone!r}") from None
    doors_seen: set[str] = set()
    for i, r in enumerate(cfg.readers):
        if r.door in doors_seen and isinstance(r, WiegandReaderConfig):
            raise ConfigError(f"{source}: readers[{i}].door: a second Wiegand reader for door {r.door!r}")
        doors_seen.add(r.door)
    if bool(cfg.link.cert) != bool(cfg.link.key):
        raise ConfigError(f"{source}: link.cert: cert and key go together")
    if cfg.link.cert and not cfg.link.ca:
        raise ConfigError(f"{source}: link.ca: required with a client certificate (TLS)")
    if cfg.link.backoff_min_s > cfg.link.backoff_max_s:
        raise ConfigError(f"{source}: link.backoff_min_s: must not exceed link.backoff_max_s")
    return cfg


def config_path(explicit: str | Path | None = None) -> Path:
    if explicit:
        return Path(explicit)
    env = os.environ.get("EDGE_CONFIG")
    return Path(env) if env else DEFAULT_PATH


def load_config(path: str | Path | None = None) -> Config:
    p = config_path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found (pass --config or set EDGE_CONFIG)") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config: {e.strerror}") from None
    return parse_config(text, source=str(p))
