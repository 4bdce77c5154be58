"""Wires the cloud link (`cloud_bridge.link.CloudLink`) into the agent, through `LinkPorts`: what the link
needs from the agent (store, journal, clock, command handler, birth, state callbacks), passed in by it.

The link is one supervised task of the agent: when it fails, the doors keep deciding from the index,
the failure is journalled, and the link is restarted. Its online/offline state feeds the decision's
offline policy; the instant it was last online is persisted, so the offline age (and the maximum
offline age of cached rights) survives a restart.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import msgspec
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from cloud_bridge.link import CloudLink, CommandHandler, LinkConfig
from cloud_bridge.protocol import Birth, DeviceInfo

from . import __version__
from .errors import ConfigError
from .secrets import SecretSource

if TYPE_CHECKING:
    from .config import Config
    from .events import Event
    from .journal import Journal
    from .store import Store

log = logging.getLogger("edge.link")


def command_public_key(cfg: Config) -> bytes | None:
    """The site's raw 32-byte Ed25519 public key from `link.command_key` (hex or a PEM file)."""
    text = cfg.link.command_key
    if text is None:
        return None
    if len(text) == 64 and all(c in "0123456789abcdefABCDEF" for c in text):
        return bytes.fromhex(text)
    try:
        key = serialization.load_pem_public_key(Path(text).read_bytes())
    except (OSError, ValueError) as e:
        raise ConfigError(f"link.command_key: not 64 hex digits and not a readable PEM public key: {e}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError("link.command_key: the PEM key is not an Ed25519 public key")
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def link_config(cfg: Config) -> LinkConfig:
    lk = cfg.link
    secrets = SecretSource.from_env(plaintext=cfg.storage.plaintext_secrets)
    password = secrets.read(lk.password_file, "link.password_file") if lk.password_file else None
    key = str(secrets.path(lk.key, "link.key")) if lk.key else None
    return LinkConfig.of(lk, site=cfg.site.id, gateway=cfg.site.gateway, key=key, password=password,
                         synchronous=cfg.storage.synchronous)  # fmt: skip


def config_hash(cfg: Config) -> str:
    return hashlib.sha256(msgspec.json.encode(cfg)).hexdigest()[:16]


def birth_info(cfg: Config, doors: Mapping[str, str], readers: Mapping[str, tuple[str, str]],
               occupancy: Mapping[str, int] | None = None) -> Birth:  # fmt: skip
    """The agent's part of the birth (the link adds versions, depth, limits, key, transport): `doors` maps a
    door to its name, `readers` a reader to (kind, door); `occupancy` the users counted per area."""
    return Birth(
        site=cfg.site.id, gateway=cfg.site.gateway, software=f"edge {__version__}",
        config_hash=f"sha256:{config_hash(cfg)}",
        doors=[DeviceInfo(id=d, kind="door", name=name) for d, name in doors.items()],
        readers=[DeviceInfo(id=r, kind=kind, door=door) for r, (kind, door) in readers.items()],
        occupancy=dict(occupancy or {}),
    )  # fmt: skip


class LinkPorts(NamedTuple):
    """What the link needs from the agent, and nothing more."""

    store: Store
    journal: Journal
    #: The agent's one clock (`edge.clock.AgentClock`): command validity, offline times.
    clock: Callable[[], float]
    #: Cloud commands (unlock, door mode, lockdown, resync).
    commands: CommandHandler
    birth: Callable[[], Birth]
    #: Called with the new state whenever the link goes online or offline.
    on_state: Callable[[bool], None]
    #: Called with (cloud UTC time, round trip s) from each timestamped event acknowledgement.
    on_cloud_time: Callable[[float, float], None]


class EdgeLink:
    """The cloud link as a task of the agent: `run()` connects and serves until cancelled (the agent
    supervises it: a failure restarts it while the doors keep deciding)."""

    def __init__(self, cfg: Config, ports: LinkPorts) -> None:
        self.cfg = cfg
        self.ports = ports
        self._link: CloudLink | None = None

    def request_snapshot(self) -> None:
        """Ask the cloud for a snapshot now (if connected; the link asks again at every connect anyway)."""
        if self._link is not None:
            self._link.request_snapshot()

    def send_urgent(self, ev: Event) -> None:
        """Send an urgent event (`alarm.duress`) ahead of the journal's backlog (the link's priority lane)."""
        if self._link is not None:
            self._link.send_urgent(ev)

    async def run(self) -> None:
        cfg, ports = self.cfg, self.ports
        key = command_public_key(cfg)
        if key is None:
            log.warning("link.command_key is not set: every command from the cloud will be refused")
            key = (
                Ed25519PrivateKey.generate()
                .public_key()
                .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            )  # a key nobody holds
        link = CloudLink(
            link_config(cfg), store=ports.store, journal=ports.journal, commands=ports.commands, birth=ports.birth,
            site_public_key=key, state_dir=cfg.state_dir, clock=ports.clock,
        )  # fmt: skip
        link.on_state.append(ports.on_state)
        link.on_cloud_time.append(ports.on_cloud_time)
        log.info("cloud link: connecting to %s:%d%s", cfg.link.host, cfg.link.port, " (TLS)" if cfg.link.ca else "")
        self._link = link
        try:
            async with link:
                await link.run()
        finally:
            self._link = None
            ports.on_state(False)
