"""The door's I/O shell: `DoorController` runs `edge.door.logic.DoorLogic` on gpiozero devices.

gpiozero devices on an injected pin factory, one asyncio timer handle for the core's deadline, and the
reader's LED and beeper lines played by one `edge.door.indicator.Indicator` (door alarms in the background,
results the agent decides on top).

On start the relay is created already in the locked state, before any other device; on stop (including an
exception inside ``async with``) it is driven explicitly to **de-energised**, the state the hardware also
falls into when the agent dies and the pin reverts to its pulled-down input: a fail-secure strike stays
locked, a fail-safe maglock releases (docs/hardware.md).

Feedback (LED, beeper) is never shown by a grant itself: the agent decides what a reader shows for a
decision in one place (`edge.agent.feedback_for`), the same for Wiegand and OSDP readers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self

from gpiozero import InputDevice, OutputDevice

from edge.door.indicator import Indicator
from edge.door.logic import DoorLogic
from edge.errors import ConfigError
from edge.events import DOOR_STATE, Detail, EventSink
from edge.hw import DoorIO
from edge.model import Door, DoorMode
from edge.readers.events import Feedback

log = logging.getLogger(__name__)


class DoorController:
    """One door on gpiozero devices. Use as ``async with DoorController(...) as door:``.

    All methods must be called on the event-loop thread; GPIO edge callbacks hop onto it with
    `call_soon_threadsafe`, carrying the driver's edge timestamp.
    """

    def __init__(
        self,
        door: Door,
        io: DoorIO,
        *,
        factory: Any,
        emit: EventSink,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if door.id != io.door:
            raise ConfigError(f"door {door.id!r} given the wiring of door {io.door!r}")
        self.io = io
        self._door = door
        self._factory = factory
        self._record_event = emit
        self._clock = clock
        self._fail_safe = io.lock_type == "fail_safe"
        self._relay: Any = None
        self._contact: Any = None
        self._rex: Any = None
        self._devices: list[Any] = []
        self._indicator: Indicator | None = None
        self._logic: DoorLogic | None = None
        #: Whether a REX press may unlock now (set by the agent: the interlock); None: always.
        self.rex_allowed: Callable[[], bool] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        # Edge timestamps per input: (last ticks, accumulated seconds) so that wrapping ticks still work.
        self._edge_clock: dict[str, tuple[Any, float]] = {}

    # -- lifecycle --

    async def __aenter__(self) -> Self:
        io = self.io
        # FIRST: the relay, created already in its locked state (no glitch through "unlocked").
        self._relay = OutputDevice(
            io.relay_pin,
            active_high=io.relay_active_high,
            initial_value=self._fail_safe,  # energised = locked for a maglock, de-energised for a strike
            pin_factory=self._factory,
        )
        try:
            self._loop = asyncio.get_running_loop()
            contact_open: bool | None = None
            if io.contact_pin is not None:
                self._contact = self._input(io.contact_pin, io.contact_pull_up)
                contact_open = bool(self._contact.pin.state) == io.contact_closed_is_low
            rex_pressed = False
            if io.rex_pin is not None:
                self._rex = self._input(io.rex_pin, io.rex_pull_up)
                rex_pressed = bool(self._rex.pin.state) != io.rex_pressed_is_low
            led = None if io.led_pin is None else self._output(io.led_pin, io.led_active_high)
            beeper = None if io.beeper_pin is None else self._output(io.beeper_pin, io.beeper_active_high)
            self._indicator = Indicator(self._loop, led=led, beeper=beeper)
            self._logic = DoorLogic(
                self.door,
                now=self._clock(),
                contact_open=contact_open,
                rex_pressed=rex_pressed,
                rex_mode=io.rex_mode,
                rex_window_s=io.rex_window_s,
                debounce_s=io.debounce_s,
                prealarm_fraction=io.prealarm_fraction,
                fail_safe=self._fail_safe,
            )
            self._logic.rex_allowed = lambda: self.rex_allowed is None or self.rex_allowed()
            if self._contact is not None:
                self._contact.pin.when_changed = self._contact_changed
            if self._rex is not None:
                self._rex.pin.when_changed = self._rex_changed
            self._apply()
        except BaseException:
            self._shutdown()
            raise
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._shutdown()

    def _input(self, pin: int, pull_up: bool | None) -> Any:
        dev = InputDevice(
            pin,
            pull_up=pull_up,
            active_state=None if pull_up is not None else True,
            pin_factory=self._factory,
        )
        self._devices.append(dev)
        return dev

    def _output(self, pin: int, active_high: bool) -> Any:
        dev = OutputDevice(pin, active_high=active_high, initial_value=False, pin_factory=self._factory)
        self._devices.append(dev)
        return dev

    def _shutdown(self) -> None:
        """Drive the relay to its stop state (de-energised) explicitly, then release everything."""
        try:
            if self._relay is not None:
                self._relay.off()
        finally:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            for dev in (self._contact, self._rex):
                if dev is not None:
                    try:
                        dev.pin.when_changed = None
                    except Exception:  # the device may be half-built
                        log.debug("door %s: cannot unhook an input", self.door.id, exc_info=True)
            if self._indicator is not None:
                self._indicator.close()
                self._indicator = None
            for dev in reversed(self._devices):
                dev.close()
            self._devices.clear()
            self._contact = self._rex = None
            if self._relay is not None:
                stopped_locked = not self._fail_safe
                relay, self._relay = self._relay, None
                relay.close()
                if self._logic is not None:
                    self._record(
                        DOOR_STATE,
                        {"lock": "locked" if stopped_locked else "unlocked", "cause": "stop"},
                    )
            self._logic = None

    # -- public API --

    @property
    def locked(self) -> bool:
        return not self._core.unlocked

    @property
    def is_open(self) -> bool | None:
        return self._core.is_open

    @property
    def alarms(self) -> frozenset[str]:
        return self._core.alarms

    @property
    def relay_energised(self) -> bool:
        return bool(self._relay is not None and self._relay.value)

    def strike_time(self, *, extended: bool = False) -> float:
        return self.door.extended_strike_s if extended else self.door.strike_s

    def grant(self, strike_s: float | None = None, *, extended: bool = False) -> None:
        """Unlock now, in this call, for `strike_s` (default: the door's strike time, or its extended
        strike time for users with the extended-door-time flag). Shows nothing on the reader: `show`."""
        core = self._core
        core.grant(self._clock(), strike_s if strike_s is not None else self.strike_time(extended=extended))
        self._apply()

    def revoke_grant(self) -> None:
        """Take the last grant back (see `DoorLogic.revoke_grant`): locks now unless another hold remains."""
        self._core.revoke_grant(self._clock())
        self._apply()

    def deny(self) -> None:
        self.show(Feedback.DENIED)

    def hold_unlocked(self, reason: str = "hold") -> None:
        """Hold the door unlocked (free passage) until `release_hold` with this reason (or None)."""
        self._core.hold(self._clock(), reason)
        self._apply()

    def release_hold(self, reason: str | None = None) -> None:
        """End one hold, or with None every open-ended hold (a timed `unlock_for` runs on: use `relock`);
        relocks unless another hold or a strike remains."""
        self._core.release(self._clock(), reason)
        self._apply()

    def unlock_for(self, seconds: float) -> None:
        """A remote (or first-card) unlock for `seconds`; `DoorLockdownError` while in lockdown."""
        self._core.unlock_for(self._clock(), seconds)
        self._apply()

    @property
    def lockdown(self) -> bool:
        return self._core.lockdown

    def set_lockdown(self, on: bool) -> None:
        """Enter or leave lockdown (see `DoorLogic.set_lockdown`: lockdown wins, enforced here)."""
        self._core.set_lockdown(self._clock(), on)
        self._apply()

    @property
    def mode(self) -> DoorMode:
        """LOCKDOWN or NORMAL: every other door mode is the agent's (edge.door.logic)."""
        return self._core.mode

    def set_mode(self, mode: DoorMode) -> None:
        """`set_lockdown` by mode (the agent's call today): LOCKDOWN or NORMAL; any other mode is the
        agent's to apply as holds and relocks, and a `ValueError` here."""
        if mode not in (DoorMode.LOCKDOWN, DoorMode.NORMAL):
            raise ValueError(f"door {self.door.id!r}: mode {mode.value!r} is applied by the agent, not the door")
        self.set_lockdown(mode is DoorMode.LOCKDOWN)

    def relock(self) -> None:
        """Lock now: end any strike and every hold, timed unlocks included."""
        self._core.relock(self._clock())
        self._apply()

    @property
    def door(self) -> Door:
        return self._door

    @door.setter
    def door(self, door: Door) -> None:
        """New settings (strike and held-open times) from the cloud; see `DoorLogic.update_door`."""
        if door.id != self.io.door:
            raise ConfigError(f"door {self.io.door!r} cannot take the settings of door {door.id!r}")
        self._door = door
        if self._logic is not None:
            self._logic.update_door(door)

    def update_door(self, door: Door) -> None:
        self.door = door

    def status(self) -> dict[str, Any]:
        """A JSON-friendly snapshot for the control socket and the simulator."""
        out: dict[str, Any] = {"door": self.io.door, "started": self._logic is not None}
        if self._logic is not None:
            out.update(self._logic.status())
            until = self._logic.remote_until
            out["unlock_remaining_s"] = None if until is None else round(max(0.0, until - self._clock()), 1)
        return out

    @property
    def indicator(self) -> Indicator | None:
        """The player of this door's reader LED and beeper lines (None until started)."""
        return self._indicator

    def show(self, what: Feedback) -> None:
        """Show a result on the reader's LED and beeper lines (never blocks; nothing before start)."""
        if self._indicator is not None:
            self._indicator.show(what)

    def signal(self, what: Feedback) -> None:
        """The old name of `show`, kept while the agent still calls it."""
        self.show(what)

    # -- internals --

    @property
    def _core(self) -> DoorLogic:
        if self._logic is None:
            raise RuntimeError(f"door {self.door.id!r} is not started (use `async with`)")
        return self._logic

    def _record(self, type: str, detail: Detail) -> None:
        try:
            self._record_event(type, door=self.door.id, detail=detail)
        except Exception:
            # The journal failing must never stop the door from working.
            log.exception("door %s: could not record %s", self.door.id, type)

    def _apply(self) -> None:
        """Outputs first (relay, then annunciation), then the journal, then the next wake-up."""
        core = self._core
        want = core.relay_energised
        if bool(self._relay.value) != want:
            self._relay.value = want
        if self._indicator is not None:
            self._indicator.annunciate(core.annunciation)
        for type, detail in core.drain():
            self._record(type, detail)
        self._reschedule(core.next_deadline())

    def _reschedule(self, at: float | None) -> None:
        if at == self._timer_at and self._timer is not None:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = at
        if at is not None and self._loop is not None:
            self._timer = self._loop.call_later(max(0.0, at - self._clock()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        if self._logic is None:
            return
        self._logic.tick(self._clock())
        self._apply()

    def _edge_time(self, name: str, ticks: Any) -> float:
        prev = self._edge_clock.get(name)
        t = 0.0 if prev is None else prev[1] + self._factory.ticks_diff(ticks, prev[0])
        self._edge_clock[name] = (ticks, t)
        return t

    # GPIO callbacks: may run on the driver's thread; hop onto the loop with the edge's timestamp.

    def _contact_changed(self, ticks: Any, state: Any) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._contact_edge, ticks, bool(state))

    def _rex_changed(self, ticks: Any, state: Any) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._rex_edge, ticks, bool(state))

    def _contact_edge(self, ticks: Any, high: bool) -> None:
        if self._logic is None:
            return
        is_open = high == self.io.contact_closed_is_low
        self._logic.contact_edge(self._clock(), self._edge_time("contact", ticks), is_open)
        self._apply()

    def _rex_edge(self, ticks: Any, high: bool) -> None:
        if self._logic is None:
            return
        pressed = high != self.io.rex_pressed_is_low
        self._logic.rex_edge(self._clock(), self._edge_time("rex", ticks), pressed)
        self._apply()
