"""The tap path: the sink of every reader. Decide, act on the lock, show the result, journal it.

`TapHandler.on_reader_event` is synchronous: decision and relay happen in the same loop turn as the reader's
last bit. The decision is journalled first (an append that only buffers in memory), so the `access.granted`
precedes the `door.state` it causes. Only a PIN check leaves that turn: its hash runs on a dedicated worker
thread (`hashlib.pbkdf2_hmac` releases the GIL), so the other doors keep deciding, and the door waiting on it
gets its decision when the hash completes. A read that proves cut short (`ReaderFault(kind="cut")`) takes
back the grant made on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor

import msgspec

from edge.clock import AgentClock
from edge.decision import Decider, Decision, Reason
from edge.door import DoorController
from edge.events import (
    ACCESS_DENIED,
    ACCESS_GRANTED,
    ACCESS_REVOKED,
    ALARM_PIN_LOCKOUT,
    READER_FAULT,
    READER_IO,
    READER_POWER,
    READER_STATUS,
    READER_TAMPER,
    SYSTEM,
)
from edge.journal import Journal
from edge.metrics import EdgeMetrics
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
        self._emit = emit
        #: The PIN hashes run here, off the loop (one thread: a PIN check never competes with another's).
        self._pin_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pin-check")
        self._pin_tasks: set[asyncio.Task[None]] = set()
        self._pending_pin: dict[str, tuple[int, int | None, str, float]] = {}
        #: door -> (the last granted decision, its reader, monotonic time): taken back if the read was cut short
        self._last_grant: dict[str, tuple[Decision, str, float]] = {}
        self.decisions: list[Decision] = []  # the last few, for status
        self.decided = 0  # decisions made in this run (the simulator waits on it)

    async def close(self) -> None:
        """Cancel the PIN checks in flight and stop the PIN thread."""
        for task in list(self._pin_tasks):
            task.cancel()
        for task in list(self._pin_tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._pin_pool.shutdown(wait=False, cancel_futures=True)

    def decide(
        self, door: str, card: int, *, pin: str | None = None, facility: int | None = None,
        pin_verified: tuple[str, bool] | None = None,
    ) -> Decision:  # fmt: skip
        """Decide now. A PIN is never hashed here: a decision that needs it comes back with `pin_check`
        set (see `Decider.decide`), for `_check_pin` to run off the loop."""
        link = self.connectivity
        return self.decider.decide(
            door, card, self.clock.datetime(), pin=pin, link_online=link.online, offline_since=link.offline_since,
            clock_trusted=self.clock.trusted, rights_age_s=link.rights_age_s(), facility=facility, defer_pin=True,
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
            log.log(logging.WARNING if ev.tamper else logging.INFO, "reader %s: tamper %s", ev.reader,
                    "on" if ev.tamper else "off")
            self.journal.record(READER_TAMPER, door=door, reader=ev.reader, detail={"tamper": ev.tamper})
        elif isinstance(ev, PowerChanged):
            log.log(logging.INFO if ev.power_ok else logging.WARNING, "reader %s: power %s", ev.reader,
                    "ok" if ev.power_ok else "failed")
            self.journal.record(READER_POWER, door=door, reader=ev.reader, detail={"power_ok": ev.power_ok})

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


