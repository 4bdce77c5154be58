"""Shared MQTT fixtures: a real Mosquitto per test and a gateway harness (Store + Journal + CloudLink).

Use in a test module: `from .broker import broker, site_key  # noqa: F401` (pytest finds fixtures by name).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud_bridge.cloud import CloudPeer
from cloud_bridge.link import CloudLink, LinkConfig
from cloud_bridge.protocol import AreaMove, Birth, DeviceInfo, ReaderAction
from cloud_bridge.signing import public_bytes
from edge.events import Detail
from edge.journal import Journal
from edge.model import DoorMode
from edge.store import Store
from edge.tasks import cancel_and_wait

from .mosquitto import Mosquitto

_names = itertools.count(1)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    m = Mosquitto(tmp_path / "broker")
    m.start()
    try:
        yield m
    finally:
        m.stop()


@pytest.fixture
def site_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def unique(prefix: str) -> str:
    return f"{prefix}{os.getpid()}-{next(_names)}"


class RecordingCommands:
    """A CommandHandler that records calls; doors not in `doors` raise ValueError like the agent."""

    def __init__(self, doors: set[str]) -> None:
        self.doors = doors
        self.calls: list[tuple[Any, ...]] = []

    def _door(self, door: str) -> None:
        if door not in self.doors:
            raise ValueError(f"no door {door!r} on this gateway")

    async def unlock(self, door: str, seconds: float) -> None:
        self._door(door)
        self.calls.append(("unlock", door, seconds))

    async def set_door_mode(self, door: str, mode: DoorMode | None) -> None:
        self._door(door)
        self.calls.append(("door_mode", door, mode))

    async def lockdown(self, active: bool) -> None:
        self.calls.append(("lockdown", active))

    async def resync(self) -> None:
        self.calls.append(("resync",))

    async def reader_command(self, action: ReaderAction) -> Detail:
        self.calls.append(("reader_command", action))
        raise ValueError("no OSDP reader on this gateway")

    async def reset_anti_passback(self, user: str | None, area: str | None) -> int:
        self.calls.append(("reset_anti_passback", user, area))
        return 0

    async def area_moves(self, moves: Sequence[AreaMove]) -> int:
        self.calls.append(("area_moves", list(moves)))
        return len(moves)


def birth_info() -> Birth:
    return Birth(
        site="", gateway="", software="edge 0.1.0", config_hash="sha256:0123",
        doors=[DeviceInfo(id="front", name="Front door"), DeviceInfo(id="lab")],
        readers=[DeviceInfo(id="front.wiegand0", kind="wiegand", door="front")],
    )  # fmt: skip


@dataclass
class Gateway:
    cfg: LinkConfig
    store: Store
    journal: Journal
    link: CloudLink
    commands: RecordingCommands
    task: asyncio.Task[None]
    state_dir: Path
    states: list[bool] = field(default_factory=list)


def link_config(broker: Mosquitto, site: str, gateway: str, **kw: Any) -> LinkConfig:
    base: dict[str, Any] = {
        "site": site, "gateway": gateway, "host": broker.host, "port": broker.port,
        "backoff_min_s": 0.1, "backoff_max_s": 0.5, "keepalive_s": 5, "ack_timeout_s": 3.0,
    }  # fmt: skip
    base.update(kw)
    return msgspec.convert(base, LinkConfig)


@contextlib.asynccontextmanager
async def gateway(
    broker: Mosquitto, state_dir: Path, site_key: Ed25519PrivateKey, *, site: str, gw: str, **kw: Any
) -> AsyncIterator[Gateway]:
    cfg = link_config(broker, site, gw, **kw)
    commands = RecordingCommands({"front", "lab"})
    holder: dict[str, CloudLink] = {}
    async with (
        Store(state_dir / "rights.db", "Europe/Berlin", synchronous="NORMAL") as store,
        Journal(
            state_dir / "journal.db", link_up=lambda: holder["l"].online, interval_s=0.01, synchronous="NORMAL"
        ) as journal,
        CloudLink(
            cfg, store=store, journal=journal, commands=commands, birth=birth_info,
            site_public_key=public_bytes(site_key), state_dir=state_dir,
        ) as link,
    ):  # fmt: skip
        holder["l"] = link
        states: list[bool] = []
        link.on_state.append(states.append)
        task = asyncio.get_running_loop().create_task(link.run(), name="link")
        g = Gateway(cfg, store, journal, link, commands, task, state_dir, states)
        try:
            yield g
        finally:
            await cancel_and_wait(task)


def cloud_peer(broker: Mosquitto, key: Ed25519PrivateKey | None, *, site: str, gw: str, **kw: Any) -> CloudPeer:
    kw.setdefault("resend_s", 2.0)
    return CloudPeer(host=broker.host, port=broker.port, site=site, gateway=gw, signing_key=key, **kw)
