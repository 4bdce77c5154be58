"""The tap path: the sink of every reader. Decide, act on the lock, show the result, journal it.

`TapHandler.on_reader_event` is synchronous: decision and relay happen in the same loop turn as the reader's
last bit. The decision is journalled first (an append that only buffers in memory), so the `access.granted`
precedes the `door.state` it causes. Only a PIN check leaves that turn: its hash runs on a dedicated worker
thread (`hashlib.pbkdf2_hmac` releases the GIL), so the other doors keep deciding, and the door waiting on it
gets its decision when the hash completes. A read that proves cut short (`ReaderFault(kind="cut")`) takes
back the grant made on it.

Access rules (issue 19): `decide()` reads the `AccessState` (read only). After the relay acted,
`access_state.on_decision` records what the decision leaves (a first person waiting, an escort's tap, an
interlocked door released); a grant that moves a user between areas or uses a use-limited credential is
applied by `access_state.update` when its door opens (the contact's `door.state`), or at once for a door without
a contact; a grant whose door never opened (relocked unopened) moves nobody. The changed entries are saved by a
task of their own afterwards (`Store.save_access_state`), never before the relay acts. A duress PIN is
journalled as `alarm.duress` right after its `access.granted`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

import msgspec

from edge.access_state import (
    AccessState,
    Delta,
    door_contact,
    door_relocked,
    due_resets,
    on_decision,
    remote_move,
    reset,
    update,
)
from edge.clock import AgentClock
from edge.decision import Decider, Decision, Reason, Side
from edge.door import DoorController
from edge.events import (
    ACCESS_DENIED,
    ACCESS_GRANTED,
    ACCESS_REVOKED,
    ALARM_ANTI_PASSBACK,
    ALARM_DURESS,
    ALARM_PIN_LOCKOUT,
    AREA_PASSAGE,
    DOOR_STATE,
    READER_FAULT,
    READER_IO,
    READER_POWER,
    READER_STATUS,
    READER_TAMPER,
    SYSTEM,
    Event,
)
from edge.journal import Journal
from edge.metrics import EdgeMetrics
from edge.model import code_card
from edge.pin import verify_pin
from edge.readers.base import CardRead, Feedback, PinEntry, ReadCut, Reader, ReaderEvent, ReaderFault, ReaderStatus
from edge.readers.events import InputsChanged, OutputsChanged, PowerChanged, TamperChanged

from .connectivity import Connectivity
from .modes import DoorModes

log = logging.getLogger("edge.agent")

#: How long a card waits for its PIN at a card + PIN door.
PIN_WAIT_S = 20.0
#: A grant is taken back when its read proves cut short this soon after (late edges come within ms).
REVOKE_WITHIN_S = 5.0
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


class TapHandler:
    """The reader sink. `doors`, `readers` and `reader_door` are the agent's own (filled as they start)."""

    def __init__(
        self,
        *,
        decider: Decider,
        doors: Mapping[str, DoorController],
        readers: Mapping[str, Reader],
        reader_door: Mapping[str, str],
        modes: DoorModes,
        journal: Journal,
        clock: AgentClock,
        connectivity: Connectivity,
        metrics: EdgeMetrics,
        emit: Callable[..., None],
        access: AccessState | None = None,
        save_access: Callable[[AccessState, Delta], Awaitable[None]] | None = None,
        reader_side: Mapping[str, Side] | None = None,
    ) -> None:
        self.decider = decider
        self.doors = doors
        self.readers = readers
        self.reader_door = reader_door
        self.modes = modes
        self.journal = journal
        self.clock = clock
        self.connectivity = connectivity
        self.metrics = metrics
        self._journal = emit
        #: The PIN hashes run here, off the loop (one thread: a PIN check never competes with another's).
        self._pin_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pin-check")
        self._pin_tasks: set[asyncio.Task[None]] = set()
        self._pending_pin: dict[str, tuple[int, int | None, str, float]] = {}
        #: door -> (the last granted decision, its reader, monotonic time): taken back if the read was cut short
        self._last_grant: dict[str, tuple[Decision, str, float]] = {}
        self.decisions: list[Decision] = []  # the last few, for status
        self.decided = 0  # decisions made in this run (the simulator waits on it)
        #: The access rules' state (read by every decision) and where its changes are saved.
        self.access = access if access is not None else AccessState()
        self._save_access = save_access
        self.reader_side: Mapping[str, Side] = reader_side if reader_side is not None else {}
        #: door -> a grant waiting for its door to open (it moves the user / counts a use when it does)
        self._awaiting_open: dict[str, Decision] = {}
        self._unsaved = Delta()
        self._saver: asyncio.Task[None] | None = None
        self._reset_checked: datetime | None = None
        #: Called with each urgent event (`alarm.duress`) as it is journalled: the link's priority lane.
        self.on_urgent: list[Callable[[Event], None]] = []

    async def close(self) -> None:
        """Cancel the PIN checks in flight, stop the PIN thread, write the access state still unsaved."""
        for task in list(self._pin_tasks):
            task.cancel()
        for task in list(self._pin_tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._pin_pool.shutdown(wait=False, cancel_futures=True)
        if self._saver is not None:
            with contextlib.suppress(Exception):
                await self._saver
        if self._unsaved:
            await self._flush_access()

    def decide(
        self, door: str, card: int, *, pin: str | None = None, facility: int | None = None,
        pin_verified: tuple[str, bool] | None = None, duress_verified: tuple[str, str, bool] | None = None,
        reader: str | None = None,
    ) -> Decision:  # fmt: skip
        """Decide now. A PIN is never hashed here: a decision that needs it comes back with `pin_check`
        set (see `Decider.decide`), for `_check_pin` to run off the loop."""
        link = self.connectivity
        return self.decider.decide(
            door, card, self.clock.datetime(), pin=pin, link_online=link.online, offline_since=link.offline_since,
            clock_trusted=self.clock.trusted, rights_age_s=link.rights_age_s(), facility=facility, defer_pin=True,
            pin_verified=pin_verified, duress_verified=duress_verified, state=self.access,
            side=self.reader_side.get(reader, "in") if reader is not None else "in",
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
            self._journal(SYSTEM, door=door, reader=reader,
                       detail={"event": "tap_failed", "error": f"{type(e).__name__}: {e}"[:200]})  # fmt: skip
        except Exception:
            log.exception("door %s: the failure could not be reported", door)

    def _on_reader_event(self, door: str, ev: ReaderEvent) -> None:
        if isinstance(ev, CardRead):
            d = self.decide(door, ev.card, facility=ev.facility, reader=ev.reader)
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
                code = self._keypad_code(door, ev)  # a keypad-only code (a delivery), if the rights hold one
                if code is not None:
                    self._act(code, ev.reader)
                    return
                log.info("door %s: PIN entered with no card waiting for it", door)
                self.feedback(ev.reader, Feedback.DENIED)
                return
            d = self.decide(door, pending[0], pin=ev.pin, facility=pending[1], reader=ev.reader)
            if d.pin_check is not None:
                self._check_pin(d, ev.pin, pending[1], ev.reader)
                return
            self._act(d, ev.reader)
        elif isinstance(ev, ReaderFault):
            self.metrics.reader_faults.inc(reader=ev.reader, kind=ev.kind)
            if isinstance(ev, ReadCut):
                self._revoke(door, ev.reader)
            log.warning("reader %s fault: %s %s", ev.reader, ev.kind, ev.detail)
            self.journal.record(READER_FAULT, door=door, reader=ev.reader, reason=ev.kind, detail={"detail": ev.detail})
        elif isinstance(ev, ReaderStatus):
            log.info("reader %s: online=%s tamper=%s power_ok=%s", ev.reader, ev.online, ev.tamper, ev.power_ok)
            self.journal.record(
                READER_STATUS, door=door, reader=ev.reader,
                detail={"online": ev.online, "tamper": ev.tamper, "power_ok": ev.power_ok, "secure": ev.secure},
            )  # fmt: skip
        elif isinstance(ev, InputsChanged | OutputsChanged):
            kind = "input" if isinstance(ev, InputsChanged) else "output"
            self.journal.record(
                READER_IO, door=door, reader=ev.reader, reason=kind,
                detail={"states": "".join(map(str, ev.states)), "changed": ",".join(map(str, ev.changed))},
            )  # fmt: skip
        elif isinstance(ev, TamperChanged):
            log.log(
                logging.WARNING if ev.tamper else logging.INFO,
                "reader %s: tamper %s",
                ev.reader,
                "on" if ev.tamper else "off",
            )
            self.journal.record(READER_TAMPER, door=door, reader=ev.reader, detail={"tamper": ev.tamper})
        elif isinstance(ev, PowerChanged):
            log.log(
                logging.INFO if ev.power_ok else logging.WARNING,
                "reader %s: power %s",
                ev.reader,
                "ok" if ev.power_ok else "failed",
            )
            self.journal.record(READER_POWER, door=door, reader=ev.reader, detail={"power_ok": ev.power_ok})

    def _keypad_code(self, door: str, ev: PinEntry) -> Decision | None:
        """The decision on a keypad-only code (`edge.model.code_card`), or None when no credential is stored
        under it (then the entry is a PIN nobody asked for, as before)."""
        try:
            card = code_card(ev.pin)
        except ValueError:
            return None
        d = self.decide(door, card, reader=ev.reader)
        return None if d.reason is Reason.UNKNOWN_CARD else d

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
            self.modes.undo_first_card(door)
        else:
            ctl.revoke_grant()
        log.warning("door %s: grant for card %s taken back: the read was cut short", door, mask_card(d.card))
        self.journal.record(ACCESS_REVOKED, door=door, reader=reader, card=d.card, user=d.user, reason="cut_frame")

    def _check_pin(self, d: Decision, pin: str, facility: int | None, reader: str) -> None:
        """Verify the PIN against `d.pin_check` on the PIN thread; decide and act when the hash completes."""
        task = asyncio.get_running_loop().create_task(self._pin_task(d, pin, facility, reader), name=f"pin[{d.door}]")
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
                dv = None
                if not ok and d.duress_check is not None:  # the site's duress PIN: checked on the same thread
                    dpin, dhash = d.duress_check
                    dv = (dpin, dhash, await loop.run_in_executor(self._pin_pool, verify_pin, dpin, dhash))
                # Decided again now: the rights (or the PIN) may have changed while the hash ran.
                d = self.decide(d.door, d.card, pin=pin, facility=facility, pin_verified=(stored, ok),
                                duress_verified=dv, reader=reader)  # fmt: skip
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
        self._after(d, ctl)

    # --- the access rules' state (after the relay acted) ---------------------------------------------------

    def _after(self, d: Decision, ctl: DoorController | None) -> None:
        now = self.clock()
        on_decision(self.access, d, now)
        if not d.granted or (d.passage is None and not d.count_use):
            return
        if ctl is not None and ctl.is_open is False and d.reason is not Reason.FREE_PASSAGE:
            self._awaiting_open[d.door] = d  # moves the user when the contact opens; nobody if it relocks first
        else:  # no contact (or the door stands open already): the grant is the passage
            self._passed(d, now)

    def door_event(self, type: str, fields: Mapping[str, Any]) -> None:
        """A door's event (the agent's sink passes each one): its contact edges and relocking."""
        if type != DOOR_STATE:
            return
        door = fields.get("door")
        detail = fields.get("detail") or {}
        if not isinstance(door, str):
            return
        now = self.clock()
        contact = detail.get("contact")
        if contact in ("open", "closed"):
            door_contact(self.access, door, contact == "open", now)
        if contact == "open":
            d = self._awaiting_open.pop(door, None)
            if d is not None:
                self._passed(d, now)
        elif detail.get("lock") == "unlocked" and detail.get("cause") == "rex":
            if self._interlock_of(door) is not None:  # a REX unlock holds the interlock like a grant, till it relocks
                self.access.unlocked_until[door] = float("inf")
        elif detail.get("lock") == "locked":
            door_relocked(self.access, door)
            if door in self._awaiting_open:
                update(self.access, self._awaiting_open.pop(door), False, now)  # never opened: nobody moved

    def _interlock_of(self, door: str) -> tuple[bool, tuple[str, ...]] | None:
        """(REX overrides it, the other doors) of the interlock `door` is in, or None."""
        tables = self.decider.index.tables
        rules = tables.door_rules.get(door)
        if rules is None or rules.interlock is None:
            return None
        il = tables.interlocks.get(rules.interlock)
        return (il is None or il.rex_overrides), tuple(rules.peers)

    def rex_allowed(self, door: str) -> bool:
        """Whether a REX press may unlock `door` now (the door module asks): not while another door of its
        interlock is released or open, unless the interlock lets REX override it (`rex_overrides`, egress
        safety, the default). Any failure here lets the REX through: egress wins."""
        try:
            il = self._interlock_of(door)
            if il is None or il[0]:
                return True
            now = self.clock()
            if any(self.access.busy(p, now) for p in il[1]):
                log.info("door %s: REX refused: another door of its interlock is released or open", door)
                return False
            return True
        except Exception:
            log.exception("door %s: REX interlock check failed; REX allowed", door)
            return True

    def _passed(self, d: Decision, now: float) -> None:
        """The granted door opened: move the user, count the use, journal the passage (`area.passage`, which
        the cloud relays to the site's other gateways), save."""
        delta = update(self.access, d, True, now)
        if d.passage is not None and d.user is not None and d.user in delta.users:
            src, dst = d.passage
            occ = self.access.occupancy.get(dst, 0) if dst is not None else 0
            self.journal.record(AREA_PASSAGE, door=d.door, card=d.card, user=d.user,
                                detail={"from": src, "to": dst, "occupancy": occ, "at": now})  # fmt: skip
        self._save(delta)

    def reset_command(self, user: str | None, area: str | None) -> int:
        """The signed anti-passback reset: forget `user`, everyone in `area`, or (neither) everyone; saved.
        Returns how many users were forgotten."""
        delta = reset(self.access, user=user, area=area)
        self._save(delta)
        log.info("anti-passback reset (user %s, area %s): %d forgotten", user or "*", area or "*", len(delta.users))
        return len(delta.users)

    def remote_moves(self, moves: Iterable[tuple[str, str | None, float]]) -> int:
        """Passages (user, area, UTC seconds) another gateway of the site saw, relayed by the cloud: applied
        unless this gateway saw the user pass later; saved. Returns how many changed a location."""
        delta = Delta()
        for user, area, ts in moves:
            delta.merge(remote_move(self.access, user, area, ts))
        self._save(delta)
        return len(delta.users)

    def scheduled_resets(self, now: datetime) -> list[str]:
        """The nightly anti-passback resets (`Area.reset_daily`) due since the last call (the agent calls it
        every second); returns the areas reset. Nothing runs while the clock is not trusted."""
        last, self._reset_checked = self._reset_checked, now
        if last is None or not self.clock.trusted:
            return []
        tables = self.decider.index.tables
        resets = [(a.id, a.reset_daily) for a in tables.areas.values() if a.reset_daily is not None]
        due = due_resets(resets, tables.site_tz, last, now) if resets else []
        for area in due:
            self._save(reset(self.access, area=area))
            self._journal(SYSTEM, detail={"event": "anti_passback_reset", "area": area, "cause": "schedule"})
        return due

    def _save(self, delta: Delta) -> None:
        if not delta or self._save_access is None:
            return
        self._unsaved.merge(delta)
        if self._saver is None or self._saver.done():
            self._saver = asyncio.get_running_loop().create_task(self._flush_access(), name="access_state.save")

    async def _flush_access(self) -> None:
        while self._unsaved and self._save_access is not None:
            delta, self._unsaved = self._unsaved, Delta()
            try:
                await self._save_access(self.access, delta)
            except Exception:  # the state stays right in memory; the next save writes these entries again
                log.exception("the access state could not be saved")
                self._unsaved.merge(delta)
                return

    def feedback(self, reader: str, what: Feedback) -> None:
        """Show a result on a reader, the same call for every kind: a Wiegand reader plays it on its door's
        LED/beeper lines through the indicator it was built with, an OSDP reader on the reader itself."""
        r = self.readers.get(reader)
        if r is not None:
            r.feedback(what)

    def _log_decision(self, d: Decision) -> None:
        self.metrics.decisions.inc(door=d.door, result="granted" if d.granted else "denied", reason=d.reason.value)
        log.info(
            "door %s card %s: %s (%s)%s", d.door, mask_card(d.card), "GRANTED" if d.granted else "denied",
            d.reason.value, f" user {d.user}" if d.user else "",
        )  # fmt: skip

    def _journal_decision(self, d: Decision, reader: str | None) -> None:
        self.decisions = [*self.decisions[-19:], d]
        self.decided += 1
        self.journal.record(
            ACCESS_GRANTED if d.granted else ACCESS_DENIED, door=d.door, reader=reader, card=d.card,
            user=d.user, group=d.group, reason=d.reason.value,
        )  # fmt: skip
        if d.alarm == "pin_lockout":
            log.warning("door %s: PIN lockout for card %s", d.door, mask_card(d.card))
            self.journal.record(ALARM_PIN_LOCKOUT, door=d.door, reader=reader, card=d.card, user=d.user)
        if d.duress:  # silent: the reader shows the decision as usual; sent ahead of the backlog
            ev = self.journal.record(ALARM_DURESS, door=d.door, reader=reader, card=d.card, user=d.user,
                                     reason=d.reason.value)  # fmt: skip
            for cb in self.on_urgent:
                try:
                    cb(ev)
                except Exception:  # the alarm is in the journal anyway: it goes in order then
                    log.exception("door %s: the duress alarm could not be sent ahead", d.door)
        if d.alarm == "anti_passback":
            self.journal.record(ALARM_ANTI_PASSBACK, door=d.door, reader=reader, card=d.card, user=d.user)
