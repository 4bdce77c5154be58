"""The one owner of door modes: mode overrides, the site lockdown and first-card unlocks, on the locks and on disk.

Nothing else in the agent writes them. The decider reads them for each decision (`Decider.effective_mode`);
`DoorModes` sets them (commands from the cloud, a restart, a first-card unlock taken back) and keeps each
lock in line with its effective mode every second (`sync`): held unlocked by an unlock schedule or a first
card, and told when it is in lockdown, so the door logic itself refuses remote unlocks and holds there
(`DoorLockdownError`, edge/door.py): "lockdown wins" is enforced in that one place.

Overrides act first and are saved after (a broken disk must not hold up a lockdown), and are restored
before any reader starts, so a lockdown does not end with a power cut.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Callable, Mapping
from typing import Any

from edge.decision import Decider
from edge.door import DoorController, DoorLockdownError
from edge.errors import StoreError
from edge.events import SYSTEM
from edge.model import DoorMode
from edge.store import Store

log = logging.getLogger("edge.agent")

#: Store meta key of the door-mode overrides and the lockdown flag (JSON), restored at start.
META_DOOR_MODES = "door_modes"


class DoorModes:
    def __init__(
        self,
        decider: Decider,
        doors: Mapping[str, DoorController],
        store: Store,
        *,
        clock: Callable[[], float],
        clock_trusted: Callable[[], bool],
        emit: Callable[..., None],
    ) -> None:
        self._decider = decider
        self._doors = doors
        self._store = store
        self._clock = clock
        self._clock_trusted = clock_trusted
        self._journal = emit
        self._last_mode: dict[str, DoorMode] = {}

    @property
    def lockdown(self) -> bool:
        return self._decider.lockdown

    # --- commands ---------------------------------------------------------------------------------------

    async def set_mode(self, door: str, mode: DoorMode | None) -> None:
        """Override a door's mode (None: back to its configured mode); in force at once, then saved."""
        if door not in self._doors:
            raise ValueError(f"no door {door!r} on this gateway")
        self._decider.set_door_mode(door, mode)
        self.sync()
        await self._persist()

    async def set_lockdown(self, active: bool) -> None:
        self._decider.lockdown = active
        self.sync()
        await self._persist()

    def pulse(self, door: str) -> float:
        """A momentary unlock asked on the gateway itself (the installer page, Home Assistant) for the door's
        strike time, which it returns: never a mode, never a hold. Refused in lockdown (`DoorLockdownError`,
        here and by the door itself) and for a door of no rights."""
        ctl = self._doors.get(door)
        if ctl is None:
            raise ValueError(f"no door {door!r} on this gateway")
        mode, _free = self._decider.effective_mode(door, self._clock(), clock_trusted=self._clock_trusted()) \
            if door in self._decider.index.tables.doors else (None, False)  # fmt: skip
        if self.lockdown or mode is DoorMode.LOCKDOWN:
            raise DoorLockdownError(f"door {door!r} is in lockdown: a pulse is refused (lift the lockdown first)")
        seconds = ctl.strike_time()
        ctl.unlock_for(seconds)
        return seconds

    def undo_first_card(self, door: str) -> None:
        """A first-card unlock for the day was granted on a read that proved cut short: undone whole. Holds
        of other origins (an unlock schedule) come back at once."""
        self._decider.first_card_until.pop(door, None)
        ctl = self._doors.get(door)
        if ctl is not None:
            ctl.relock()
        self.sync()

    # --- the locks --------------------------------------------------------------------------------------

    def sync(self) -> None:
        """Keep each lock's hold state in line with its mode (unlocked by schedule, lockdown, first card)."""
        decider = self._decider
        ts = self._clock()
        trusted = self._clock_trusted()
        for door_id, ctl in self._doors.items():
            if door_id not in decider.index.tables.doors:
                continue
            mode, free = decider.effective_mode(door_id, ts, clock_trusted=trusted)
            lockdown = mode is DoorMode.LOCKDOWN
            if (ctl.mode is DoorMode.LOCKDOWN) is not lockdown:
                if lockdown:
                    ctl.relock()
                ctl.set_lockdown(lockdown)
            if free:
                ctl.hold_unlocked(mode.value)
            else:
                for held in (DoorMode.UNLOCKED, DoorMode.FIRST_CARD):
                    ctl.release_hold(held.value)
                entering = self._last_mode.get(door_id) is not mode
                if mode in (DoorMode.LOCKDOWN, DoorMode.LOCKED) and entering:
                    ctl.relock()  # once, on entering: a grant for the override group must still work
            self._last_mode[door_id] = mode

    # --- persistence ------------------------------------------------------------------------------------

    async def _persist(self) -> None:
        """Save the overrides. A failed save is journalled and raised, so the command's result says the
        override is in force but will not survive a restart."""
        modes = {d: m.value for d, m in sorted(self._decider.mode_override.items())}
        state: dict[str, Any] = {"lockdown": self._decider.lockdown, "modes": modes}
        try:
            await self._store.set_meta(META_DOOR_MODES, json.dumps(state))
        except (StoreError, sqlite3.Error, OSError) as e:
            log.error("door modes are in force but could not be saved: %s", e)
            self._journal(SYSTEM, detail={"event": "door_modes_not_saved", "error": str(e)[:200]})
            raise StoreError(f"applied, but not saved (it will not survive a restart): {e}") from e

    async def restore(self) -> None:
        """The overrides in force when the agent stopped (before any reader starts)."""
        raw = await self._store.get_meta(META_DOOR_MODES)
        if raw is None:
            return
        try:
            state = json.loads(raw)
            lockdown = state["lockdown"]
            modes = {str(d): DoorMode(m) for d, m in state["modes"].items()}
            if not isinstance(lockdown, bool):
                raise TypeError("lockdown is not a boolean")
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            # Unreadable: neither invent a lockdown nor drop one silently; the cloud must set the modes again.
            log.error("the saved door modes are unreadable (%s): starting without overrides", e)
            self._journal(SYSTEM, detail={"event": "door_modes_unreadable", "error": str(e)[:200]})
            return
        self._decider.lockdown = lockdown
        for door, mode in modes.items():
            if door in self._doors:
                self._decider.set_door_mode(door, mode)
            else:
                log.warning("saved mode %s for door %s: no such door on this gateway", mode.value, door)
        if lockdown or modes:
            log.warning("restored door overrides: lockdown=%s modes=%s", lockdown,
                        {d: m.value for d, m in modes.items()})  # fmt: skip
