"""What the installer page (edge/installer/) and Home Assistant (edge/hass.py) need from the agent, and nothing
more: the `Agent` fills it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from edge.agent.status import AgentStatus
from edge.config import Config
from edge.door import DoorController
from edge.feed import Feed
from edge.hw import HardwareProfile
from edge.journal import Journal
from edge.readers.base import Reader


class GatewayPort(Protocol):
    cfg: Config
    profile: HardwareProfile
    feed: Feed
    started_mono: float

    @property
    def doors(self) -> Mapping[str, DoorController]: ...

    @property
    def readers(self) -> Mapping[str, Reader]: ...

    @property
    def reader_door(self) -> Mapping[str, str]: ...

    @property
    def journal(self) -> Journal | None: ...

    def status(self) -> AgentStatus: ...

    def local_pulse(self, door: str, *, source: str, by: str | None = None) -> float:
        """A relay pulse (never a mode or a lockdown), refused in lockdown; journalled by the agent."""

    def record_event(self, type: str, **fields: Any) -> None:
        """Journal an event (and log it) as the agent does its own."""


__all__ = ["GatewayPort"]
