"""Agent configuration: one strict TOML file decoded into typed Structs, validated once at start.

Every error names the key (`policy.pin_max_attempts: expected int, got str`). Unknown keys are errors,
so a typo never silently falls back to a default. Default path: /etc/edge/edge.toml (EDGE_CONFIG or
--config override it).
The top-level `version` names the file's format (1, the default); a file of another version is refused
before any key is checked. The `[link]` keys shared with the link are defined once, in
`cloud_bridge.settings.LinkSettings`.

Validation has two layers, both run by `edge run` and `edge check-config` before anything starts (exit 2):
`parse_config` checks every value on its own and against the others without touching the disk (types,
ranges: every number is finite and bounded, identifiers, card formats, the command key is a valid Ed25519
public key, OSDP lines); `check_files` checks what the config names on this machine (the CA and client
certificate, a PEM command key, OSDP serial ports, that the state directory and the control socket can be
created, the socket path fits a Unix socket address). Secrets are checked by `edge.cli._check_secrets`.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
import tomllib
from pathlib import Path
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec
from msgspec import Meta

from cloud_bridge.settings import LinkSettings

from .decision import OfflinePolicy, SitePolicy, TimePolicy
from .errors import ConfigError
from .readers.formats import FormatSpec, FormatTable

DEFAULT_PATH = Path("/etc/edge/edge.toml")
#: The format of the config file this agent reads (the top-level `version` key; absent means this one).
CONFIG_VERSION = 1
#: Card formats a reader accepts unless its config says otherwise (H10302 needs an explicit choice).
DEFAULT_FORMATS = ("h10301", "h10304", "corp1000_35", "corp1000_48", "csn32", "csn56")  # no two one bit apart


class Strict(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    pass


#: Identifiers (doors, groups): the gateway model's `Ident`.
Id = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:@\-]+$")]
#: A display name, a file or credential name, a host name: never empty, never unbounded.
Text = Annotated[str, Meta(min_length=1, max_length=256)]
PathText = Annotated[str, Meta(min_length=1, max_length=4096)]
#: Durations in seconds: finite (TOML allows inf and nan) and bounded.
Seconds = Annotated[float, Meta(ge=0, le=30 * 86400)]
PositiveSeconds = Annotated[float, Meta(gt=0, le=30 * 86400)]
#: Serial speeds an OSDP reader may use (SIA OSDP 2.2, osdp_COMSET: 9600 .. 230400).
OSDP_BAUDS = (9600, 19200, 38400, 57600, 115200, 230400)
#: A Unix socket address holds at most 107 bytes of path (sun_path is 108 bytes with its NUL).
UNIX_PATH_MAX = 107


class SiteSection(Strict, frozen=True, kw_only=True):
    id: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_\-]{1,64}$")]
    gateway: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_\-]{1,64}$")]
    timezone: Annotated[str, Meta(min_length=1, max_length=64)] = "UTC"


class PolicySection(Strict, frozen=True, kw_only=True):
    offline_grace_s: Seconds = 300.0
    offline_policy: OfflinePolicy = OfflinePolicy.FLAGGED
    pin_max_attempts: Annotated[int, Meta(ge=1, le=20)] = 3
    pin_lockout_s: Annotated[float, Meta(ge=0, le=86400)] = 300.0
    lockdown_override_group: Id | None = None
    time_policy: TimePolicy = TimePolicy.ALWAYS_ONLY
    max_offline_age_days: Annotated[float, Meta(gt=0, le=3650)] | None = None
    max_clock_skew_s: Annotated[float, Meta(gt=0, le=86400)] = 600.0
    #: "ntp": the clock is trusted once NTP (or the cloud) confirms it after a boot (a Pi has no RTC);
    #: "system": always trust the system clock (a board with a battery-backed RTC, or a development PC).
    clock_source: Literal["ntp", "system"] = "ntp"
    #: While NTP is not synchronised, take the cloud's time when it differs by more than max_clock_skew_s.
    adopt_cloud_time: bool = True


class StorageSection(Strict, frozen=True, kw_only=True):
    state_dir: PathText = "/var/lib/edge"
    #: SQLite `synchronous` for the rights store and the journal (see docs/operations.md).
    synchronous: Literal["FULL", "NORMAL"] = "FULL"
    journal_max_events: Annotated[int, Meta(ge=100, le=100_000_000)] = 1_000_000
    #: Events kept in memory while the disk refuses writes (at most journal_max_events).
    journal_memory_events: Annotated[int, Meta(ge=100, le=10_000_000)] = 100_000
    #: Events are written in batches this often (or every 500 events): a power cut loses at most this
    #: much; longer batches mean fewer SD-card writes (see docs/operations.md).
    journal_flush_s: Annotated[float, Meta(gt=0, le=10)] = 0.2
    #: Secrets (OSDP keys, MQTT password, TLS client key) are systemd credentials, encrypted at rest; plain
    #: files on disk are refused unless this is true (see edge/secrets.py and docs/operations.md).
    plaintext_secrets: bool = False
    #: Where the OSDP readers' Secure Channel keys are written by a key rotation (a reader's key_file names
    #: the file; the directory is made 0700, its files are 0600): systemd credentials `<key_store>/NAME.cred`
    #: encrypted with systemd-creds (the unit's LoadCredentialEncrypted= lines name these files), or with
    #: plaintext_secrets = true plain files `<key_store>/NAME`, read from there too. Default
    #: `<state_dir>/credentials` (`<state_dir>/keys` with plaintext_secrets). A path, never a key.
    key_store: PathText | None = None
    #: The key `systemd-creds encrypt --with-key=` seals a rotated key with ("auto": systemd-creds' choice).
    key_store_with_key: Literal["auto", "host", "tpm2", "host+tpm2"] = "auto"


class WiegandReaderConfig(Strict, tag="wiegand", tag_field="driver", frozen=True, kw_only=True):
    """A Wiegand reader on the D0/D1 pins of its door in the hardware profile."""

    door: Id
    name: Text | None = None
    #: Accepted formats by name; two of one length (h10302 / h10304) is an error: choose one.
    formats: list[str] = msgspec.field(default_factory=lambda: list(DEFAULT_FORMATS))
    #: Further formats declared here without code (bit ranges and parity masks).
    extra_formats: list[FormatSpec] = []
    end_of_frame: Literal["adaptive", "fixed"] = "adaptive"
    keypad: bool = True
    #: Nibble order of 8-bit keypad bursts; vendors differ and one byte cannot tell (docs/hardware.md).
    keypad_order: Literal["key_low", "key_high"] = "key_low"
    pin_timeout_s: Annotated[float, Meta(gt=0, le=120)] = 10.0
    #: The side of its door this reader reads (access rules): "in" passes from the door's `from_area` into its
    #: `to_area`, "out" back. A door with one reader has it "in".
    side: Literal["in", "out"] = "in"


class OsdpReaderConfig(Strict, tag="osdp", tag_field="driver", frozen=True, kw_only=True):
    door: Id
    port: PathText
    address: Annotated[int, Meta(ge=0, le=126)] = 0
    name: Text | None = None
    #: One of OSDP_BAUDS.
    baud: int = 115200
    secure: bool = True
    allow_install_mode: bool = False
    allow_plaintext: bool = False
    #: Name of the systemd credential holding the Secure Channel key (32 hex digits), or with
    #: storage.plaintext_secrets a file under the state directory's `keys/`; never the key itself.
    key_file: Text | None = None
    formats: list[str] = msgspec.field(default_factory=lambda: list(DEFAULT_FORMATS))
    #: The side of its door this reader reads (as for a Wiegand reader).
    side: Literal["in", "out"] = "in"
    #: RS-485 direction control: "auto" (the adapter switches), "kernel" (TIOCSRS485), "rts" (RTS keyed).
    direction: Literal["auto", "kernel", "rts"] = "auto"
    #: Send the 0xFF mark byte before every command (SIA OSDP 2.2; SIA test 050-07-01). A line setting.
    mark: bool = True
    #: A reader is reported offline after this long without a valid reply (docs/hardware.md). A line setting.
    offline_after_s: Annotated[float, Meta(gt=0, le=30)] = 1.5
    #: One OSDP line is polled by one bus: readers with the same `port` share it (and its baud rate, mark
    #: and offline_after_s).


ReaderConfig = WiegandReaderConfig | OsdpReaderConfig


class LinkSection(LinkSettings, Strict, frozen=True, kw_only=True):
    """The cloud link (see docs/protocol.md): the settings shared with the link itself are defined once, in
    `cloud_bridge.settings.LinkSettings`; these are the file's own. Secrets are files, never values here."""

    enabled: bool = True
    #: This gateway's TLS client key (and the password below): systemd credential names (see edge/secrets.py).
    key: PathText | None = None
    password_file: PathText | None = None
    #: The site's Ed25519 public key that signs commands and provisioning: 64 hex digits, or a path to a PEM
    #: file. Without it every command and change set is refused; set, it must be a valid key (checked at start).
    command_key: Annotated[str, Meta(max_length=4096)] | None = None


class ControlSection(Strict, frozen=True, kw_only=True):
    #: Unix socket for `edge status` and the simulator commands.
    socket: PathText = "/run/edge/control.sock"


class MetricsSection(Strict, frozen=True, kw_only=True):
    """The Prometheus endpoint (edge/metrics.py; docs/operations.md, "Observability"). The metrics name doors
    and readers, so they are never open to every local user: a Unix socket (mode 0660) and/or a TCP port on
    127.0.0.1 that needs a bearer token."""

    #: Unix socket the metrics are served on; a relative path is in control.socket's directory; "" turns it off.
    socket: Annotated[str, Meta(max_length=4096)] = "metrics.sock"
    #: The socket's group (the agent must be a member: `SupplementaryGroups=` in a drop-in); None: the agent's.
    socket_group: Annotated[str, Meta(min_length=1)] | None = None
    #: TCP port on 127.0.0.1 (0: none). Needs `token`, or `allow_unauthenticated = true`.
    port: Annotated[int, Meta(ge=0, le=65535)] = 0
    #: Name of the systemd credential holding the bearer token every scrape must send (socket and TCP).
    token: Annotated[str, Meta(min_length=1)] | None = None
    #: Serve TCP without a token: every local user can then read the metrics (warned at every start).
    allow_unauthenticated: bool = False
    #: A scrape within this many seconds of the last one gets the same body (rendered once).
    cache_s: Annotated[float, Meta(ge=0, le=60)] = 1.0
    #: Connections held at once; a new one past this drops the oldest that has not sent its request yet.
    max_clients: Annotated[int, Meta(ge=1, le=1024)] = 16

    def __post_init__(self) -> None:
        if self.port and self.token is None and not self.allow_unauthenticated:
            raise ValueError(
                f"port = {self.port} (TCP) needs metrics.token (a systemd credential) or, to let every local "
                "user read the metrics, metrics.allow_unauthenticated = true"
            )


class DemoSection(Strict, frozen=True, kw_only=True):
    """Provisioning applied at first start of a simulated gateway (empty store only)."""

    enabled: bool = False


class InstallerSection(Strict, frozen=True, kw_only=True):
    """The local installer page (edge/installer/; docs/operations.md, "The installer page"): off unless enabled.
    On 127.0.0.1 it is plain HTTP (reach it with an SSH tunnel); on any other address it is HTTPS with a
    certificate the agent makes at first start (its fingerprint: `edge status`)."""

    enabled: bool = False
    #: The address to listen on: 127.0.0.1 (default), or a LAN address of this gateway (then HTTPS).
    listen: Annotated[str, Meta(min_length=1, max_length=64)] = "127.0.0.1"
    port: Annotated[int, Meta(ge=1, le=65535)] = 8088
    #: How long a login lasts.
    session_hours: Annotated[float, Meta(gt=0, le=24 * 30)] = 8.0
    #: How long the one-time setup code (journal and `edge status`) is valid; a new one at each start.
    setup_code_hours: Annotated[float, Meta(gt=0, le=24 * 7)] = 24.0

    @property
    def loopback(self) -> bool:
        return ipaddress.ip_address(self.listen).is_loopback

    def __post_init__(self) -> None:
        try:
            ipaddress.ip_address(self.listen)
        except ValueError:
            raise ValueError(f"listen = {self.listen!r} is not an IP address of this gateway") from None


class HassSection(Strict, frozen=True, kw_only=True):
    """Home Assistant MQTT discovery (edge/hass.py; docs/operations.md, "Home Assistant"): off unless enabled."""

    enabled: bool = False
    #: "cloud": the broker of [link] (its address, TLS and credentials); "local": the broker given here.
    broker: Literal["cloud", "local"] = "cloud"
    host: Annotated[str, Meta(min_length=1, max_length=253)] = "localhost"
    port: Annotated[int, Meta(ge=1, le=65535)] = 1883
    ca: PathText | None = None
    username: Text | None = None
    #: The systemd credential holding the local broker's password.
    password_file: PathText | None = None
    #: Home Assistant's discovery prefix.
    prefix: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_\-/]{1,64}$")] = "homeassistant"
    #: Where the gateway's states go: <base_topic>/<site>/<gateway>/...
    base_topic: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_\-/]{1,64}$")] = "edge-access"
    #: Doors Home Assistant may pulse (commands are unsigned: none by default). Never modes or lockdown.
    commands: list[Id] = []
    #: Put the user's id into the tap events (privacy: off by default).
    publish_user: bool = False


class Config(Strict, frozen=True, kw_only=True):
    #: The config file's format (`CONFIG_VERSION`); a file written for another version is refused at start.
    version: int = CONFIG_VERSION
    site: SiteSection
    hardware: PathText = "sim"  # a profile name under hw/ or a path to a profile file
    policy: PolicySection = PolicySection()
    storage: StorageSection = StorageSection()
    readers: list[ReaderConfig] = []
    link: LinkSection = LinkSection()
    control: ControlSection = ControlSection()
    metrics: MetricsSection = MetricsSection()
    demo: DemoSection = DemoSection()
    installer: InstallerSection = InstallerSection()
    hass: HassSection = HassSection()

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.site.timezone)

    @property
    def state_dir(self) -> Path:
        return Path(self.storage.state_dir)

    @property
    def key_store_dir(self) -> Path:
        """Where rotated OSDP keys are written (`storage.key_store`, or its default under the state dir)."""
        st = self.storage
        if st.key_store is not None:
            return Path(st.key_store)
        return self.state_dir / ("keys" if st.plaintext_secrets else "credentials")

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
    version = raw.get("version", CONFIG_VERSION)
    if type(version) is int and version != CONFIG_VERSION:
        # before the keys are checked: a file for another version would otherwise fail on a key it renamed
        raise ConfigError(f"{source}: version: {version} is not a config version this agent reads (it reads "
                          f"version {CONFIG_VERSION}; see docs/operations.md)")  # fmt: skip
    try:
        cfg = msgspec.convert(raw, Config, strict=True)
    except msgspec.ValidationError as e:
        raise ConfigError(f"{source}: {_humanise(str(e))}") from None
    try:
        ZoneInfo(cfg.site.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"{source}: site.timezone: unknown time zone {cfg.site.timezone!r}") from None
    try:
        _check_values(cfg)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return cfg


def _check_values(cfg: Config) -> None:
    """Every value against the others (no I/O). Raises ConfigError("key: why")."""
    lk = cfg.link
    if cfg.site.gateway.startswith("_probe-"):
        raise ConfigError("site.gateway: names starting with '_probe-' are reserved (the operator side's probes)")
    wiegand_doors: dict[str, int] = {}
    osdp_lines: dict[str, tuple[int, int]] = {}  # port -> (baud, reader index)
    osdp_addresses: dict[tuple[str, int], int] = {}
    for i, r in enumerate(cfg.readers):
        where = f"readers[{i}]"
        try:
            FormatTable(r.formats, r.extra_formats if isinstance(r, WiegandReaderConfig) else ())
        except ConfigError as e:
            raise ConfigError(f"{where}.formats: {e}") from None
        if isinstance(r, WiegandReaderConfig):
            if r.door in wiegand_doors:
                raise ConfigError(f"{where}.door: a second Wiegand reader for door {r.door!r} "
                                  f"(readers[{wiegand_doors[r.door]}])")  # fmt: skip
            wiegand_doors[r.door] = i
            continue
        if r.baud not in OSDP_BAUDS:
            raise ConfigError(f"{where}.baud: {r.baud} is not an OSDP speed ({', '.join(map(str, OSDP_BAUDS))})")
        if r.secure and r.key_file is None and not r.allow_install_mode:
            raise ConfigError(f"{where}.key_file: secure = true needs key_file (or allow_install_mode = true to "
                              "install a key on the reader; or secure = false)")  # fmt: skip
        line = osdp_lines.setdefault(r.port, (r.baud, i))
        if line[0] != r.baud:
            raise ConfigError(f"{where}.baud: {r.baud} differs from readers[{line[1]}] on the same port {r.port} "
                              f"({line[0]}): one OSDP line has one speed")  # fmt: skip
        first = cfg.readers[line[1]]
        assert isinstance(first, OsdpReaderConfig)
        for key in ("mark", "offline_after_s"):
            if getattr(first, key) != getattr(r, key):
                raise ConfigError(f"{where}.{key}: differs from readers[{line[1]}] on the same port {r.port}: "
                                  "a line setting")  # fmt: skip
        other = osdp_addresses.setdefault((r.port, r.address), i)
        if other != i:
            raise ConfigError(f"{where}.address: {r.address} is already readers[{other}] on {r.port}")
    if bool(lk.cert) != bool(lk.key):
        raise ConfigError("link.cert: cert and key go together")
    if lk.cert and not lk.ca:
        raise ConfigError("link.ca: required with a client certificate (TLS)")
    if lk.backoff_min_s > lk.backoff_max_s:
        raise ConfigError("link.backoff_min_s: must not exceed link.backoff_max_s")
    if lk.connect_timeout_s > lk.connect_timeout_max_s:
        raise ConfigError("link.connect_timeout_s: must not exceed link.connect_timeout_max_s")
    if lk.downlink_filter == "one" and lk.mqtt_version != "5":
        raise ConfigError('link.downlink_filter: "one" needs link.mqtt_version = "5" (No Local is MQTT 5 only)')
    if lk.command_key is not None and not _looks_like_path(lk.command_key):
        ed25519_public_key(lk.command_key, "link.command_key")
    if len(os.fsencode(cfg.control.socket)) > UNIX_PATH_MAX:
        raise ConfigError(f"control.socket: {len(os.fsencode(cfg.control.socket))} bytes is too long for a Unix "
                          f"socket path (at most {UNIX_PATH_MAX})")  # fmt: skip


def _looks_like_path(text: str) -> bool:
    """A command key given as a file: it names a PEM file (has a slash or ends in .pem)."""
    return "/" in text or text.endswith(".pem")


# --- Ed25519 public keys (RFC 8032, section 5.1.3), pure: cryptography loads any 32 bytes as a key -------

_P = 2**255 - 19
_D = -121665 * pow(121666, _P - 2, _P) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)


def _ed_add(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    (x1, y1), (x2, y2) = a, b
    t = _D * x1 * x2 * y1 * y2 % _P
    x3 = (x1 * y2 + x2 * y1) * pow(1 + t, _P - 2, _P) % _P
    y3 = (y1 * y2 + x1 * x2) * pow(1 - t, _P - 2, _P) % _P
    return x3, y3


def ed25519_public_key(text: str, where: str) -> bytes:
    """The 32 raw bytes of an Ed25519 public key given as 64 hex digits; a ConfigError naming `where` unless
    they decode to a point of the curve (RFC 8032 5.1.3, canonical y) that is not of small order (a small-order
    key is no key: the libsodium / RFC 8032 "weak key" list)."""
    if len(text) != 64 or any(c not in "0123456789abcdefABCDEF" for c in text):
        raise ConfigError(f"{where}: expected 64 hex digits (the site's Ed25519 public key, as `cloud-bridge key "
                          f"show` prints it) or the path of a PEM file; got {len(text)} characters")  # fmt: skip
    raw = bytes.fromhex(text)
    n = int.from_bytes(raw, "little")
    sign, y = n >> 255, n & ((1 << 255) - 1)
    if y >= _P:
        raise ConfigError(f"{where}: not an Ed25519 public key (non-canonical encoding)")
    u, v = (y * y - 1) % _P, (_D * y * y + 1) % _P
    x = u * pow(v, 3, _P) * pow(u * pow(v, 7, _P), (_P - 5) // 8, _P) % _P
    if v * x * x % _P == (-u) % _P:
        x = x * _SQRT_M1 % _P
    if v * x * x % _P != u or (x == 0 and sign):
        raise ConfigError(f"{where}: not an Ed25519 public key (not a point of the curve)")
    if x & 1 != sign:
        x = _P - x
    pt = (x, y)
    for _ in range(3):
        pt = _ed_add(pt, pt)
    if pt == (0, 1):
        raise ConfigError(f"{where}: not a usable Ed25519 public key (a point of small order)")
    return raw


def command_key_bytes(cfg: Config) -> bytes | None:
    """The site's raw 32-byte Ed25519 public key from `link.command_key` (hex, or a PEM file read now)."""
    text = cfg.link.command_key
    if text is None:
        return None
    if not _looks_like_path(text):
        return ed25519_public_key(text, "link.command_key")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = serialization.load_pem_public_key(Path(text).read_bytes())
    except OSError as e:
        raise ConfigError(f"link.command_key: cannot read {text}: {e.strerror}") from None
    except ValueError:
        raise ConfigError(f"link.command_key: {text} is not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"link.command_key: {text} is not an Ed25519 public key")
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return ed25519_public_key(raw.hex(), f"link.command_key ({text})")


def _creatable_dir(path: Path, where: str) -> None:
    """`path` is a writable directory, or can be made one (its nearest existing ancestor is writable)."""
    p = path if path.is_absolute() else Path.cwd() / path
    while not p.exists():
        p = p.parent
    if not p.is_dir():
        raise ConfigError(f"{where}: {p} is not a directory")
    if not os.access(p, os.W_OK | os.X_OK) or os.statvfs(p).f_flag & os.ST_RDONLY:
        raise ConfigError(f"{where}: {p} is not writable by this user (uid {os.getuid()})")


def _private_key_dir(path: Path, where: str) -> None:
    """The key store: a directory only its owner can enter (0700), or one that can be made."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        _creatable_dir(path, where)
        return
    except OSError as e:
        raise ConfigError(f"{where}: cannot read {path}: {e.strerror}") from None
    if not stat.S_ISDIR(mode):
        raise ConfigError(f"{where}: {path} is not a directory")
    if mode & 0o077:
        raise ConfigError(f"{where}: {path} is open to other users (mode {stat.S_IMODE(mode):04o}): chmod 700 {path}")
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{where}: {path} is not writable by this user (uid {os.getuid()})")


def _readable_file(name: str, where: str) -> None:
    p = Path(name)
    try:
        with p.open("rb") as f:
            f.read(1)
    except OSError as e:
        raise ConfigError(f"{where}: cannot read {p}: {e.strerror}") from None


def check_files(cfg: Config, *, ports: bool = True) -> None:
    """What the config names on this machine: files that must exist and be readable, directories that the
    agent must be able to create, and (`ports`) the OSDP serial ports. No file is created or changed.
    Raises ConfigError("key: why"). `edge run` passes ports=False: a reader whose USB adapter is missing
    at boot is retried by its own task while the other doors work."""
    lk = cfg.link
    if lk.enabled:
        if lk.ca:
            _readable_file(lk.ca, "link.ca")
        if lk.cert:
            _readable_file(lk.cert, "link.cert")
        command_key_bytes(cfg)
    for i, r in enumerate(cfg.readers):
        if ports and isinstance(r, OsdpReaderConfig) and not Path(r.port).exists():
            raise ConfigError(f"readers[{i}].port: {r.port} does not exist (is the RS-485 adapter plugged in?)")
    _creatable_dir(cfg.state_dir, "storage.state_dir")
    if any(isinstance(r, OsdpReaderConfig) and r.key_file for r in cfg.readers):
        _private_key_dir(cfg.key_store_dir, "storage.key_store")
    _creatable_dir(Path(cfg.control.socket).parent, "control.socket")


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
