"""What `Agent.status()` returns: typed, encoded as JSON by the control socket (`edge status`) and read by the
metrics (as builtins). The JSON keys are the ones `edge status --json` has always printed."""

from __future__ import annotations

from typing import Any

import msgspec

from edge.timetrust import ClockStatus


class LinkStatus(msgspec.Struct, frozen=True, kw_only=True):
    online: bool
    #: ISO 8601 on the agent's clock; None while online.
    offline_since: str | None


class ReaderInfo(msgspec.Struct, frozen=True, kw_only=True):
    door: str
    kind: str
    online: bool


class InstallerInfo(msgspec.Struct, frozen=True, kw_only=True):
    """The installer page, for `edge status`: where it is, its certificate's fingerprint (HTTPS only), and the
    one-time setup code while no account exists."""

    url: str
    fingerprint: str | None = None
    setup_code: str | None = None


class AgentStatus(msgspec.Struct, frozen=True, kw_only=True):
    version: str
    site: str
    gateway: str
    simulated: bool
    #: None until the store is open (and likewise the journal's fields).
    rights_version: int | None
    credentials: int | None
    journal_depth: int | None
    storage_ok: bool | None
    link: LinkStatus
    clock_trusted: bool
    clock: ClockStatus
    rights_age_s: float | None
    #: Each door controller's own snapshot (`DoorController.status()`).
    doors: dict[str, dict[str, Any]]
    readers: dict[str, ReaderInfo]
    lockdown: bool
    #: Users counted in each area (access rules), on this gateway.
    occupancy: dict[str, int] = {}
    installer: InstallerInfo | None = None
