"""Wiring of the cloud link into the agent (filled in by the MQTT link work)."""

from __future__ import annotations

import asyncio
from typing import Any


async def run_link(agent: Any) -> None:
    await asyncio.Event().wait()
