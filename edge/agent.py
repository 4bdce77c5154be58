"""The gateway agent: composes doors, store, journal, readers, cloud link and control socket.

Start order matters: every lock is driven to its safe state first (door controllers), then the store
loads the rights index, then the journal opens, and only then do readers start delivering taps. One
`asyncio.TaskGroup` owns the long-running tasks, each named (`reader[front]`, `link`, ...); a reader
or the link that fails is journalled and restarted with backoff while the doors keep working.

The tap path (`on_reader_event`) is synchronous: decision and relay happen in the same loop turn as the
reader's last bit. The decision is journalled first (an append that only buffers in memory), so the
`access.granted` precedes the `door.state` it causes. Only a PIN check leaves that turn: its hash runs on
a dedicated worker thread (`hashlib.pbkdf2_hmac` releases the GIL), so the other doors keep deciding, and
the door waiting on it gets its decision when the hash completes.

Time: `self.clock` (`edge.clock.AgentClock`) is the one notion of "now" (value and trust) for the
decision, door schedules and holds, the cloud link's command checks, the journal and metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import random
import signal
import sqlite3
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from typing import Any

import msgspec

from . import __version__
from .clock import AgentClock, load_clock_state, read_boot_id, read_ntp_synchronised, save_clock_state
from .config import Config, OsdpReaderConfig, ReaderConfig, WiegandReaderConfig
from .control import ControlServer, DoorRequest, RexRequest, StatusRequest, TapRequest
from .decision import Decider, Decision, Reason
from .door import DoorController
from .errors import StoreError
from .events import (
    ACCESS_DENIED,
    ACCESS_GRANTED,
    ACCESS_REVOKED,
    ALARM_PIN_LOCKOUT,
    READER_FAULT,
    READER_STATUS,
    SYSTEM,
)
from .hw import HardwareProfile, load_profile, make_factory
from .journal import Journal
from .metrics import EdgeMetrics, serve_metrics
from .model import ChangeSet, Door, DoorMode
from .pin import verify_pin
from .readers.base import CardRead, Feedback, PinEntry, Reader, ReaderEvent, ReaderFault, ReaderStatus
from .sdnotify import Heartbeat, Notifier, watchdog_task
from .store import RIGHTS_DAMAGED, Store
from .timetrust import ClockTrust, clock_trust_at_boot, sane_ts

log = logging.getLogger("edge.agent")

#: How long a card waits for its PIN at a card + PIN door.
PIN_WAIT_S = 20.0
#: A grant is taken back when its read proves cut short this soon after (late edges come within ms).
REVOKE_WITHIN_S = 5.0
#: Store meta key of the door-mode overrides and the lockdown flag (JSON), restored at start.
META_DOOR_MODES = "door_modes"
#: A PIN check whose stored hash changes while it runs is redone against the new hash at most this often.
PIN_ROUNDS = 3


def feedback_for(d: Decision) -> Feedback:
    """What a reader shows for a decision: the one place that decides it, for every kind of reader."""
    if d.granted:
        return Feedback.GRANTED
    if d.reason is Reason.PIN_REQUIRED:
        return Feedback.PIN_NEEDED
    return Feedback.DENIED


def mask_card(card: int | None) -> str:
    """Card numbers in logs show only their last three digits."""
    if card is None:
        return "-"
    s = str(card)
    return "*" * max(0, len(s) - 3) + s[-3:]


class Agent:
    def __init__(
        self,
        cfg: Config,
        *,
        profile: HardwareProfile | None = None,
        factory: Any = None,
        clock: Callable[[], float] = time.time,
        ntp: Callable[[], Awaitable[bool | None]] = read_ntp_synchronised,
        demo: ChangeSet | None = None,
    ) -> None:
        """`clock` is the system's wall clock (raw); `ntp` reads whether NTP has synchronised it."""
        self.cfg = cfg
        self.profile = profile or load_profile(cfg.hardware)
        self.factory = factory if factory is not None else make_factory(self.profile)
        self.simulated = self.profile.factory == "mock"
        #: The one clock of the agent: corrected UTC seconds (`self.clock()`) and whether to trust them.
        self.clock = AgentClock(wall=clock, mono=time.monotonic)
        self.read_ntp = ntp
        self.demo = demo
        self.doors: dict[str, DoorController] = {}
        self.readers: dict[str, Reader] = {}
        self.reader_door: dict[str, str] = {}
        self.store: Store | None = None
        self.journal: Journal | None = None
        self.decider: Decider | None = None
        self.link: Any = None
        self.link_online = False
        #: Monotonic time the link went offline (an offline age measured on the monotonic clock does not
        #: jump when the clock's cloud offset is adopted); None while online.
        self._offline_mono: float | None = time.monotonic()
        self.boot_id = read_boot_id()
        self.heartbeat = Heartbeat(max_age_s=4.0)
        self.notifier = Notifier.from_env()
        self.metrics = EdgeMetrics()
        self._bg: set[asyncio.Task[None]] = set()
        #: The PIN hashes run here, off the loop (one thread: a PIN check never competes with another's).
        self._pin_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pin-check")
        self._pin_tasks: set[asyncio.Task[None]] = set()
        self._pending_pin: dict[str, tuple[int, int | None, str, float]] = {}
        #: door -> (the last granted decision, its reader, monotonic time): taken back if the read was cut short
        self._last_grant: dict[str, tuple[Decision, str, float]] = {}
        self.started = asyncio.Event()
        self.decisions: list[Decision] = []  # the last few, for status
        self.decided = 0  # decisions made in this run (the simulator waits on it)
        #: How often the rights on disk are checked against memory (Store.check_integrity).
        self.integrity_check_s = 3600.0
        self._stop = asyncio.Event()
        self._last_mode: dict[str, DoorMode] = {}

    # --- the tap path -----------------------------------------------------------------------------------

    @property
    def trust(self) -> ClockTrust | None:
        return self.clock.trust

    def now(self) -> datetime:
        """The best estimate of now (see edge/clock.py): corrected by any adopted cloud offset; while the
        clock is not trusted, never before the last-good time."""
        return self.clock.datetime()

    @property
    def clock_trusted(self) -> bool:
        return self.clock.trusted

    def decide(
        self, door: str, card: int, *, pin: str | None = None, facility: int | None = None,
        pin_verified: tuple[str, bool] | None = None,
    ) -> Decision:  # fmt: skip
        """Decide now. A PIN is never hashed here: a decision that needs it comes back with `pin_check`
        set (see `Decider.decide`), for `_check_pin` to run off the loop."""
        assert self.decider is not None
        now = self.now()
        age = self.rights_age_s()
        return self.decider.decide(
            door, card, now, pin=pin, link_online=self.link_online, offline_since=self.offline_since,
            clock_trusted=self.clock_trusted, rights_age_s=age, facility=facility, defer_pin=True,
            pin_verified=pin_verified,
        )  # fmt: skip

    def on_reader_event(self, ev: ReaderEvent) -> None:
        """The sink of every reader: runs on the loop thread in the turn that completed the read.

        Nothing a read causes may kill the sink: an exception is logged, journalled and shown as "denied"."""
        door = self.reader_door.get(ev.reader)
        if door is None:
            log.error("event from unknown reader %s", ev.reader)
            return
        try:
            self._on_reader_event(door, ev)
        except Exception as e:
            self._tap_failed(door, ev.reader, e)

    def _tap_failed(self, door: str, reader: str | None, e: Exception) -> None:
        log.exception("door %s: a read from %s could not be decided", door, reader)
        try:
            if reader is not None:
                self.feedback(reader, Feedback.DENIED)
            self._emit(SYSTEM, door=door, reader=reader,
                       detail={"event": "tap_failed", "error": f"{type(e).__name__}: {e}"[:200]})  # fmt: skip
        except Exception:
            log.exception("door %s: the failure could not be reported", door)

    def _on_reader_event(self, door: str, ev: ReaderEvent) -> None:
        if isinstance(ev, CardRead):
            d = self.decide(door, ev.card, facility=ev.facility)
            if d.reason is Reason.PIN_REQUIRED:
                self._pending_pin[door] = (ev.card, ev.facility, ev.reader, time.monotonic() + PIN_WAIT_S)
                self._journal_decision(d, ev.reader)
                self.feedback(ev.reader, feedback_for(d))
                self._log_decision(d)
                return
            self._pending_pin.pop(door, None)
            self._act(d, ev.reader)
        elif isinstance(ev, PinEntry):
            pending = self._pending_pin.pop(door, None)
            if pending is None or pending[3] < time.monotonic():
                log.info("door %s: PIN entered with no card waiting for it", door)
                self.feedback(ev.reader, Feedback.DENIED)
                return
            d = self.decide(door, pending[0], pin=ev.pin, facility=pending[1])
            if d.pin_check is not None:
                self._check_pin(d, ev.pin, pending[1], ev.reader)
                return
            self._act(d, ev.reader)
        elif isinstance(ev, ReaderFault):
            self.metrics.reader_faults.inc(reader=ev.reader, kind=ev.kind)
            if ev.kind == "cut":
                self._revoke(door, ev.reader)
            log.warning("reader %s fault: %s %s", ev.reader, ev.kind, ev.detail)
            if self.journal is not None:
                self.journal.record(
                    READER_FAULT, door=door, reader=ev.reader, reason=ev.kind, detail={"detail": ev.detail}
                )
        elif isinstance(ev, ReaderStatus):
            log.info("reader %s: online=%s tamper=%s power_ok=%s", ev.reader, ev.online, ev.tamper, ev.power_ok)
            if self.journal is not None:
                self.journal.record(
                    READER_STATUS, door=door, reader=ev.reader,
                    detail={"online": ev.online, "tamper": ev.tamper, "power_ok": ev.power_ok, "secure": ev.secure},
                )  # fmt: skip

    def _revoke(self, door: str, reader: str) -> None:
        """The last card read of `reader` was the head of a longer frame (its last edges came late): take
        back what was decided on it. The whole frame is decided next, as a read of its own."""
        self._pending_pin.pop(door, None)  # a PIN asked for the cut read is not wanted either
        last = self._last_grant.pop(door, None)
        if last is None or last[1] != reader or time.monotonic() - last[2] > REVOKE_WITHIN_S:
            return
        d = last[0]
        ctl = self.doors.get(door)
        if ctl is None:
            return
        if d.unlock_until is not None:  # a first-card unlock for the day: undone whole
            if self.decider is not None:
                self.decider.first_card_until.pop(door, None)
            ctl.relock()
            self._sync_door_holds()  # holds of other origins (an unlock schedule) come back at once
        else:
            ctl.revoke_grant()
        log.warning("door %s: grant for card %s taken back: the read was cut short", door, mask_card(d.card))
        if self.journal is not None:
            self.journal.record(ACCESS_REVOKED, door=door, reader=reader, card=d.card, user=d.user,
                                reason="cut_frame")  # fmt: skip

    def _check_pin(self, d: Decision, pin: str, facility: int | None, reader: str) -> None:
        """Verify the PIN against `d.pin_check` on the PIN thread; decide and act when the hash completes."""
        task = asyncio.get_running_loop().create_task(
            self._pin_task(d, pin, facility, reader), name=f"pin[{d.door}]"
        )
        self._pin_tasks.add(task)
        task.add_done_callback(self._pin_tasks.discard)

    async def _pin_task(self, d: Decision, pin: str, facility: int | None, reader: str) -> None:
        loop = asyncio.get_running_loop()
        try:
            for _ in range(PIN_ROUNDS):
                stored = d.pin_check
                if stored is None:
                    break
                ok = await loop.run_in_executor(self._pin_pool, verify_pin, pin, stored)
                # Decided again now: the rights (or the PIN) may have changed while the hash ran.
                d = self.decide(d.door, d.card, pin=pin, facility=facility, pin_verified=(stored, ok))
            if d.pin_check is not None:  # the PIN hash kept changing under us: ask for the PIN again
                d = msgspec.structs.replace(d, pin_check=None)
            self._act(d, reader)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._tap_failed(d.door, reader, e)

    def _act(self, d: Decision, reader: str | None) -> None:
        self._journal_decision(d, reader)  # first: the access event precedes the door.state it causes
        ctl = self.doors.get(d.door)
        if reader is not None:
            if d.granted:
                self._last_grant[d.door] = (d, reader, time.monotonic())
            else:
                self._last_grant.pop(d.door, None)
        if d.granted and ctl is not None:
            if d.unlock_until is not None:
                ctl.unlock_for(max(0.0, d.unlock_until - self.clock()))
            elif d.reason is not Reason.FREE_PASSAGE:
                ctl.grant(d.strike_s)
        if reader is not None:
            self.feedback(reader, feedback_for(d))
        self._log_decision(d)

    def _log_decision(self, d: Decision) -> None:
        self.metrics.decisions.inc(door=d.door, result="granted" if d.granted else "denied", reason=d.reason.value)
        log.info(
            "door %s card %s: %s (%s)%s", d.door, mask_card(d.card), "GRANTED" if d.granted else "denied",
            d.reason.value, f" user {d.user}" if d.user else "",
        )  # fmt: skip

    def _journal_decision(self, d: Decision, reader: str | None) -> None:
        self.decisions = [*self.decisions[-19:], d]
        self.decided += 1
        if self.journal is None:
            return
        self.journal.record(
            ACCESS_GRANTED if d.granted else ACCESS_DENIED, door=d.door, reader=reader, card=d.card,
            user=d.user, group=d.group, reason=d.reason.value,
        )  # fmt: skip
        if d.alarm == "pin_lockout":
            log.warning("door %s: PIN lockout for card %s", d.door, mask_card(d.card))
            self.journal.record(ALARM_PIN_LOCKOUT, door=d.door, reader=reader, card=d.card, user=d.user)

    # --- commands (cloud link, control socket) ----------------------------------------------------------

    async def unlock(self, door: str, seconds: float) -> None:
        """A remote unlock. Refused by the door itself while it is in lockdown (`DoorLockdownError`)."""
        ctl = self.doors.get(door)
        if ctl is None:
            raise ValueError(f"no door {door!r} on this gateway")
        ctl.unlock_for(seconds)

    async def set_door_mode(self, door: str, mode: DoorMode | None) -> None:
        if door not in self.doors:
            raise ValueError(f"no door {door!r} on this gateway")
        assert self.decider is not None
        self.decider.set_door_mode(door, mode)
        self._sync_door_holds()
        await self._persist_door_modes()

    async def lockdown(self, active: bool) -> None:
        assert self.decider is not None
        self.decider.lockdown = active
        self._sync_door_holds()
        await self._persist_door_modes()

    async def _persist_door_modes(self) -> None:
        """Make the overrides survive a restart: a lockdown must not end with a power cut.

        They act first and are saved after: a broken disk must not hold up a lockdown. A failed save is
        journalled and raised, so the command's result says the override will not survive a restart."""
        assert self.decider is not None and self.store is not None
        state = {"lockdown": self.decider.lockdown,
                 "modes": {d: m.value for d, m in sorted(self.decider.mode_override.items())}}  # fmt: skip
        try:
            await self.store.set_meta(META_DOOR_MODES, json.dumps(state))
        except (StoreError, sqlite3.Error, OSError) as e:
            log.error("door modes are in force but could not be saved: %s", e)
            self._emit(SYSTEM, detail={"event": "door_modes_not_saved", "error": str(e)[:200]})
            raise StoreError(f"applied, but not saved (it will not survive a restart): {e}") from e

    async def _restore_door_modes(self) -> None:
        """The overrides in force when the agent stopped (before any reader starts)."""
        assert self.decider is not None and self.store is not None
        raw = await self.store.get_meta(META_DOOR_MODES)
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
            self._emit(SYSTEM, detail={"event": "door_modes_unreadable", "error": str(e)[:200]})
            return
        self.decider.lockdown = lockdown
        for door, mode in modes.items():
            if door in self.doors:
                self.decider.set_door_mode(door, mode)
            else:
                log.warning("saved mode %s for door %s: no such door on this gateway", mode.value, door)
        if lockdown or modes:
            log.warning("restored door overrides: lockdown=%s modes=%s", lockdown,
                        {d: m.value for d, m in modes.items()})  # fmt: skip

    def _sync_door_holds(self) -> None:
        """Keep each lock's hold state in line with its mode (unlocked by schedule, lockdown, first card).

        A door in lockdown (site-wide or its own mode) is told so: the door logic then refuses remote
        unlocks and holds (see edge/door.py), so the rule "lockdown wins" is enforced in that one place."""
        if self.decider is None:
            return
        ts = self.clock()
        trusted = self.clock_trusted
        for door_id, ctl in self.doors.items():
            if door_id not in self.decider.index.tables.doors:
                continue
            mode, free = self.decider.effective_mode(door_id, ts, clock_trusted=trusted)
            lockdown = DoorMode.LOCKDOWN if mode is DoorMode.LOCKDOWN else DoorMode.NORMAL
            if ctl.mode is not lockdown:
                if lockdown is DoorMode.LOCKDOWN:
                    ctl.relock()
                ctl.set_mode(lockdown)
            if free:
                ctl.hold_unlocked(mode.value)
            else:
                for held in (DoorMode.UNLOCKED, DoorMode.FIRST_CARD):
                    ctl.release_hold(held.value)
                entering = self._last_mode.get(door_id) is not mode
                if mode in (DoorMode.LOCKDOWN, DoorMode.LOCKED) and entering:
                    ctl.relock()  # once, on entering: a grant for the override group must still work
            self._last_mode[door_id] = mode

    async def resync(self) -> None:
        """The cloud asked for a resync: the link requests the rights again; nothing to do locally."""
        log.info("resync requested by the cloud")

    def link_state_changed(self, online: bool) -> None:
        if online == self.link_online:
            return
        self.link_online = online
        if online:
            self._offline_mono = None
            log.info("cloud link online")
        else:
            self._offline_mono = time.monotonic()
            log.warning(
                "cloud link OFFLINE: deciding from the local store (offline policy %s after %.0f s)",
                self.cfg.policy.offline_policy.value, self.cfg.policy.offline_grace_s,
            )  # fmt: skip
        self._persist_last_online()

    def cloud_time(self, server_ts: float, rtt: float) -> None:
        """A time sample from the cloud (an event acknowledgement): skew alarm, time source when untrusted."""
        self.clock.cloud_time(server_ts, rtt)
        self._drain_clock_alarms()

    def _persist_last_online(self) -> None:
        """Remember when the link was last up, so the offline age survives a restart (best effort)."""
        if self.store is None:
            return
        ts = self.clock() if self.link_online else (self.offline_since.timestamp() if self.offline_since else None)
        if ts is None:
            return
        task = asyncio.get_running_loop().create_task(self._write_meta("last_online", ts), name="persist-last-online")
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    async def _write_meta(self, key: str, value: float) -> None:
        assert self.store is not None
        try:
            await self.store.set_meta(key, value)
        except Exception as e:  # a full disk must not take the agent down: report it
            log.error("cannot persist %s: %s", key, e)

    @property
    def offline_since(self) -> datetime | None:
        """When the link went offline, on the agent's clock now (None while online)."""
        if self.link_online or self._offline_mono is None:
            return None
        return datetime.fromtimestamp(max(0.0, self.clock() - (time.monotonic() - self._offline_mono)), UTC)

    def rights_age_s(self) -> float | None:
        """How long the rights have gone without a cloud connection (None while online)."""
        if self.link_online or self._offline_mono is None:
            return None
        return time.monotonic() - self._offline_mono

    # --- status -----------------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        store, journal = self.store, self.journal
        return {
            "version": __version__,
            "site": self.cfg.site.id,
            "gateway": self.cfg.site.gateway,
            "simulated": self.simulated,
            "rights_version": store.version if store else None,
            "credentials": len(store.index) if store else None,
            "journal_depth": journal.depth if journal else None,
            "storage_ok": journal.storage_ok if journal else None,
            "link": {
                "online": self.link_online,
                "offline_since": self.offline_since.isoformat() if self.offline_since else None,
            },
            "clock_trusted": self.clock_trusted,
            "clock": self.clock.status(),
            "rights_age_s": self.rights_age_s(),
            "doors": {k: v.status() for k, v in self.doors.items()},
            "readers": {
                k: {"door": self.reader_door[k], "kind": r.kind, "online": bool(getattr(r, "online", True))}
                for k, r in self.readers.items()
            },
            "lockdown": self.decider.lockdown if self.decider else False,
        }

    # --- simulator --------------------------------------------------------------------------------------

    async def _sim_tap(self, req: TapRequest) -> dict[str, Any]:
        from .simulator import tap

        if req.door not in self.doors:
            raise ValueError(f"no door {req.door!r} on this gateway")
        reader = next((r for r, d in self.reader_door.items() if d == req.door), None)
        if reader is None:
            raise ValueError(f"door {req.door!r} has no reader")
        # Counted, not measured on `self.decisions` (which keeps only the last few).
        before = self.decided
        await tap(self, reader, req.card, fmt=req.format, facility=req.facility, pin=req.pin)
        for _ in range(300):
            if self.decided > before and (req.pin is None or self.decisions[-1].reason is not Reason.PIN_REQUIRED):
                break
            await asyncio.sleep(0.01)
        n = min(self.decided - before, len(self.decisions))
        new = self.decisions[len(self.decisions) - n :]
        return {"decisions": [{"granted": d.granted, "reason": d.reason.value, "user": d.user} for d in new]}

    async def _sim_door(self, req: DoorRequest) -> dict[str, Any]:
        from .simulator import set_contact

        set_contact(self, req.door, opened=req.action == "open")
        await asyncio.sleep(0.1)
        return {"door": self.doors[req.door].status()}

    async def _sim_rex(self, req: RexRequest) -> dict[str, Any]:
        from .simulator import press_rex

        await press_rex(self, req.door)
        return {"door": self.doors[req.door].status()}

    async def _status(self, req: StatusRequest) -> dict[str, Any]:
        return self.status()

    # --- lifecycle --------------------------------------------------------------------------------------

    def _make_readers(self) -> tuple[list[Reader], list[Any]]:
        """The configured readers (one Wiegand reader per wired door if none are configured), and the
        OSDP buses that poll them: readers on the same serial port share one bus."""
        from .readers.osdp import osdp_bus
        from .readers.registry import build_reader

        configs: list[tuple[str, ReaderConfig]] = []
        for i, rc in enumerate(self.cfg.readers):
            configs.append(
                (rc.name or f"{rc.door}.{'wiegand' if isinstance(rc, WiegandReaderConfig) else 'osdp'}{i}", rc)
            )
        if not self.cfg.readers:
            for io in self.profile.doors:
                if io.reader_d0_pin is not None and io.reader_d1_pin is not None:
                    configs.append((f"{io.door}.wiegand", WiegandReaderConfig(door=io.door)))
        readers: list[Reader] = []
        by_port: dict[str, list[Any]] = {}
        port_cfg: dict[str, OsdpReaderConfig] = {}
        for i, (name, rc) in enumerate(configs):
            r = build_reader(
                rc, name, self.on_reader_event, profile=self.profile, factory=self.factory, cfg=self.cfg, index=i
            )
            readers.append(r)
            self.reader_door[name] = rc.door
            if isinstance(rc, OsdpReaderConfig):
                by_port.setdefault(rc.port, []).append(r)
                port_cfg.setdefault(rc.port, rc)
        buses = [
            osdp_bus(port, rs, baudrate=port_cfg[port].baud, direction=port_cfg[port].direction)
            for port, rs in by_port.items()
        ]
        return readers, buses

    def feedback(self, reader: str, what: Feedback) -> None:
        """Show a result on a reader. A Wiegand reader's LED and beeper lines belong to its door controller."""
        r = self.readers.get(reader)
        if r is None:
            return
        if r.kind == "wiegand":
            ctl = self.doors.get(self.reader_door[reader])
            if ctl is not None:
                ctl.signal(what)
        else:
            r.feedback(what)

    async def run(self) -> None:
        cfg = self.cfg
        # Exit order matters too: the journal (outermost) closes after the doors have recorded the state
        # they left each lock in; the doors close after everything that could act on them.
        async with AsyncExitStack() as journal_stack, AsyncExitStack() as door_stack, AsyncExitStack() as stack:
            # 1. Locks to their safe state before anything else.
            for io in self.profile.doors:
                ctl = DoorController(Door(id=io.door), io, factory=self.factory, emit=self._emit, clock=time.monotonic)
                self.doors[io.door] = await door_stack.enter_async_context(ctl)
            if self.simulated:  # simulated doors start closed (the contact must hold past its debounce)
                from .simulator import set_contact

                for io in self.profile.doors:
                    if io.contact_pin is not None:
                        set_contact(self, io.door, opened=False)
                await asyncio.sleep(max((io.debounce_s for io in self.profile.doors), default=0.0) + 0.02)
            # 2. Rights and journal.
            state = cfg.state_dir
            self.store = await stack.enter_async_context(
                Store(state / "rights.db", cfg.tz, synchronous=cfg.storage.synchronous)
            )
            self.journal = await journal_stack.enter_async_context(
                Journal(
                    state / "journal.db", site_tz=cfg.tz, link_up=lambda: self.link_online, clock=self.clock,
                    max_events=cfg.storage.journal_max_events, memory_limit=cfg.storage.journal_memory_events,
                    interval_s=cfg.storage.journal_flush_s, synchronous=cfg.storage.synchronous,
                )
            )  # fmt: skip
            stack.callback(self._pin_pool.shutdown, wait=False, cancel_futures=True)
            stack.push_async_callback(self._cancel_pin_checks)
            if cfg.policy.clock_source == "ntp":
                clock_state = await load_clock_state(self.store)
                self.clock.trust = clock_trust_at_boot(
                    clock_state, self.boot_id, wall=self.clock.wall(), mono=self.clock.mono(),
                    max_skew_s=cfg.policy.max_clock_skew_s, adopt_cloud_time=cfg.policy.adopt_cloud_time,
                )  # fmt: skip
                self._drain_clock_alarms()
            if self.demo is not None and self.store.version == 0:
                await self.store.apply(self.demo)
                log.info("demo provisioning applied: rights version %d", self.store.version)
            self.decider = Decider(self.store.index, cfg.site_policy())
            decider = self.decider
            self.store.on_swap.append(lambda idx: setattr(decider, "index", idx))
            await self._restore_door_modes()
            self._refresh_door_models()
            self._sync_door_holds()
            last = await self.store.get_meta("last_online")
            self._offline_mono = time.monotonic()
            try:
                if last is not None and sane_ts(float(last)):  # offline since before this start
                    self._offline_mono -= max(0.0, self.clock() - float(last))
            except (TypeError, ValueError):
                log.warning("ignoring an unreadable last_online time in the store: %r", last)
            self.journal.record(
                SYSTEM, detail={"event": "started", "version": __version__, "rights_version": self.store.version}
            )
            if self.store.damage is not None:  # the rights file was damaged: say so where the cloud sees it
                self.journal.record(RIGHTS_DAMAGED, detail=self.store.damage)
            # 3. Readers (and the OSDP buses that poll them).
            readers, buses = self._make_readers()
            for r in readers:
                self.readers[r.name] = await stack.enter_async_context(r)
            for bus in buses:
                await stack.enter_async_context(bus)
            handlers: dict[type, Callable[[Any], Awaitable[dict[str, Any]]]] = {StatusRequest: self._status}
            if self.simulated:
                handlers |= {TapRequest: self._sim_tap, DoorRequest: self._sim_door, RexRequest: self._sim_rex}
            await stack.enter_async_context(ControlServer(cfg.control.socket, handlers))
            if cfg.metrics.port or cfg.metrics.socket:  # a failure to serve is logged, never fatal
                self.metrics.registry.on_collect.append(lambda: self.metrics.update_from_status(self.status()))
                await stack.enter_async_context(serve_metrics(cfg, self.metrics.registry.render))
            stack.callback(self.notifier.stopping, "stopping: locks to their safe state")
            log.info(
                "gateway %s/%s up: %d doors, %d readers, %d credentials, rights version %d%s",
                cfg.site.id, cfg.site.gateway, len(self.doors), len(self.readers), len(self.store.index),
                self.store.version, " (simulated hardware)" if self.simulated else "",
            )  # fmt: skip
            log.warning(
                "running OFFLINE until the cloud link connects: taps are decided from the local store "
                "(offline policy %s after %.0f s)", cfg.policy.offline_policy.value, cfg.policy.offline_grace_s,
            )  # fmt: skip
            gc.freeze()  # boot-time objects are long-lived: keep them out of every later collection
            self.started.set()
            self.notifier.ready(f"{len(self.doors)} doors, {len(self.readers)} readers, rights v{self.store.version}")
            async with asyncio.TaskGroup() as tg:
                for name, r in self.readers.items():
                    tg.create_task(self._supervise(f"reader[{name}]", r.run), name=f"reader[{name}]")
                for bus in buses:
                    tg.create_task(self._supervise(f"osdp[{bus.port}]", bus.run), name=f"osdp[{bus.port}]")
                tg.create_task(self._supervise("link", self._run_link), name="link")
                tg.create_task(self._supervise("door-modes", self._door_modes), name="door-modes")
                tg.create_task(self._supervise("integrity", self._check_integrity), name="integrity")
                tg.create_task(self._watchdog(), name="watchdog")
                tg.create_task(self._supervise("loop-lag", self.metrics.track_loop_lag), name="loop-lag")
                stop = tg.create_task(self._stop.wait(), name="stop")
                await stop
                raise _Stop

    def stop(self) -> None:
        self._stop.set()

    def _emit(self, type: str, **fields: Any) -> None:
        detail = fields.get("detail") or {}
        level = logging.WARNING if type in ("door.forced_open", "door.held_open") else logging.INFO
        log.log(
            level,
            "door %s: %s %s",
            fields.get("door", "-"),
            type.removeprefix("door."),
            " ".join(f"{k}={v}" for k, v in detail.items()),
        )
        if self.journal is not None:
            self.journal.record(type, **fields)

    def _refresh_door_models(self) -> None:
        assert self.decider is not None
        tables = self.decider.index.tables
        for door_id, ctl in self.doors.items():
            model = tables.doors.get(door_id)
            if model is not None:
                ctl.door = model

    async def _door_modes(self) -> None:
        """Apply scheduled modes to the locks (unlocked by schedule, first-card windows) every second."""
        tick = 0
        while True:
            self.heartbeat.beat()
            if self.trust is not None:
                self.clock.observe()
                if tick % 30 == 0:
                    await self._check_clock()
                self._drain_clock_alarms()
            self._refresh_door_models()
            self._sync_door_holds()
            tick += 1
            if self.link_online and tick % 60 == 0:
                self._persist_last_online()
            await asyncio.sleep(1.0)

    async def _check_integrity(self) -> None:
        """Check the rights on disk against the rights in memory every `integrity_check_s` (a cheap
        `quick_check` and the rights checksum): silently changed rows are an alarm, the verified copy is
        refreshed when sound, and the link asks the cloud for a snapshot when not."""
        assert self.store is not None and self.journal is not None
        while True:
            await asyncio.sleep(self.integrity_check_s)
            problem = await self.store.check_integrity()
            if problem is not None:
                self.journal.record(RIGHTS_DAMAGED, detail={"error": problem, "when": "periodic"})
                if self.link is not None:
                    self.link.request_snapshot()

    async def _check_clock(self) -> None:
        """Ask NTP whether the clock is synchronised, and persist the last-good time while trusted."""
        assert self.trust is not None and self.store is not None
        synced = await self.read_ntp()
        if synced is not None:
            self.clock.ntp_synchronised(synced)
        try:
            await save_clock_state(self.store, self.trust, self.boot_id)
        except Exception as e:  # a full disk: report, keep deciding
            log.error("cannot persist the last-good time: %s", e)

    async def _cancel_pin_checks(self) -> None:
        for task in list(self._pin_tasks):
            task.cancel()
        for task in list(self._pin_tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def _drain_clock_alarms(self) -> None:
        for a in self.clock.alarms():
            (log.info if a.kind == "clock_trusted" else log.warning)("clock: %s (%s)", a.kind, a.message)
            self.metrics.clock_alarms.inc(kind=a.kind)
            if self.journal is not None:
                self.journal.record(f"alarm.{a.kind}", detail={"message": a.message, "skew_s": a.skew_s})

    async def _watchdog(self) -> None:
        def healthy() -> bool:
            ok = self.heartbeat.healthy()
            if ok:
                self.metrics.watchdog_pings.inc()
            return ok

        await watchdog_task(self.notifier, healthy)

    async def _run_link(self) -> None:
        if not self.cfg.link.enabled:
            log.warning("cloud link disabled in the config: running offline")
            await asyncio.Event().wait()
        from .link import run_link

        await run_link(self)

    async def _supervise(self, name: str, fn: Callable[[], Awaitable[None]]) -> None:
        """Run a subsystem; when it fails, journal it and restart it with jittered backoff."""
        delay = 0.5
        while True:
            started = time.monotonic()
            try:
                await fn()
                return
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.exception("%s failed; restarting", name)
                self._emit(SYSTEM, detail={"event": "subsystem_failed", "subsystem": name, "error": str(e)[:200]})
            if time.monotonic() - started > 60:
                delay = 0.5
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, 30.0)


class _Stop(Exception):
    pass


async def run_agent(agent: Agent) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, agent.stop)
    try:
        await agent.run()
    except* _Stop:
        log.info("agent stopped")
