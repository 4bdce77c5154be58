"""Wires the cloud link (`cloud_bridge.link.CloudLink`) into the agent.

The link is one supervised task of the agent: when it fails, the doors keep deciding from the index,
the failure is journalled, and the link is restarted. Its online/offline state feeds the decision's
offline policy; the instant it was last online is persisted, so the offline age (and the maximum
offline age of cached rights) survives a restart.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from cloud_bridge.link import CloudLink, LinkConfig
from cloud_bridge.protocol import Birth, DeviceInfo

from . import __version__
from .errors import ConfigError
from .secrets import SecretSource

if TYPE_CHECKING:
    from .agent import Agent
    from .config import Config

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


def birth_info(agent: Agent) -> Birth:
    """The agent's part of the birth (the link adds versions, depth, limits, key, transport)."""
    doors = [DeviceInfo(id=d, kind="door", name=c.door.name or d) for d, c in agent.doors.items()]
    readers = [DeviceInfo(id=r, kind=rd.kind, door=agent.reader_door[r]) for r, rd in agent.readers.items()]
    return Birth(
        site=agent.cfg.site.id, gateway=agent.cfg.site.gateway, software=f"edge {__version__}",
        config_hash=f"sha256:{config_hash(agent.cfg)}", doors=doors, readers=readers,
    )  # fmt: skip


async def run_link(agent: Agent) -> None:
    cfg = agent.cfg
    assert agent.store is not None and agent.journal is not None
    key = command_public_key(cfg)
    if key is None:
        log.warning("link.command_key is not set: every command from the cloud will be refused")
        key = (
            Ed25519PrivateKey.generate()
            .public_key()
            .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        )  # a key nobody holds
    link = CloudLink(
        link_config(cfg), store=agent.store, journal=agent.journal, commands=agent, birth=lambda: birth_info(agent),
        site_public_key=key, state_dir=cfg.state_dir, clock=agent.clock,
    )  # fmt: skip
    agent.link = link
    link.on_state.append(agent.link_state_changed)
    link.on_cloud_time.append(agent.cloud_time)
    log.info("cloud link: connecting to %s:%d%s", cfg.link.host, cfg.link.port, " (TLS)" if cfg.link.ca else "")
    try:
        async with link:
            await link.run()
    finally:
        agent.link = None
        agent.link_state_changed(False)
