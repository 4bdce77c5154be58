"""The gateway's side of the cloud link (docs/protocol.md), one module per job:

- `connection`: `CloudLink`, the connection owner (reconnect loop, session, birth and death, the reader that
  hands each message to one of the parts below);
- `rights`: change sets, snapshot manifests and chunks (`RightsSync`); `staging`: `SnapshotStaging`;
- `upload`: the event upload, go-back-N (`EventUpload`, `split_events`);
- `gate`: the command gate: signatures (`SiteKeys`), nonces, key rotation, execution (`CommandGate`);
- `reply`: publishing replies and journalling refusals (`Replies`, `RefusalLog`);
- `ports`: what the link needs from the gateway (`Rights`, `Outbox`, `CommandHandler`), as Protocols.

Settings: `cloud_bridge.settings.LinkConfig`; MQTT plumbing and the backoff: `cloud_bridge.mqtt`.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from cloud_bridge.mqtt import Backoff
from cloud_bridge.settings import LinkConfig
from edge.events import COMMAND_EXECUTED, KEY_ROTATED, SECURITY_MESSAGE_REJECTED

from .connection import CloudLink
from .gate import KEY_FILE, CommandGate, SiteKeys
from .ports import Applied, CommandHandler, Outbox, Rights
from .reply import RefusalLog, Replies
from .rights import RightsSync, join_chunks
from .staging import SnapshotStaging, StagingFull
from .upload import EventUpload, split_events


def backoff_delays(lo: float, hi: float, rng: random.Random | None = None) -> Callable[[], float]:
    """The link's reconnect delays (`mqtt.Backoff`): each call returns the next one."""
    return Backoff(lo, hi, rng)


__all__ = [
    "COMMAND_EXECUTED",
    "KEY_FILE",
    "KEY_ROTATED",
    "SECURITY_MESSAGE_REJECTED",
    "Applied",
    "CloudLink",
    "CommandGate",
    "CommandHandler",
    "EventUpload",
    "LinkConfig",
    "Outbox",
    "RefusalLog",
    "Replies",
    "Rights",
    "RightsSync",
    "SiteKeys",
    "SnapshotStaging",
    "StagingFull",
    "backoff_delays",
    "join_chunks",
    "split_events",
]
