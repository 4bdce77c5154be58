"""The door controller: lock relay, door-position switch, exit button, reader LED and beeper.

Two layers, as everywhere in the agent:

* `DoorLogic` is the pure, synchronous core. It knows nothing of GPIO or asyncio: every input carries the
  time it happened (`now`, seconds on the controller's monotonic clock) and the core answers with the state
  the outputs must be in (`relay_energised`, `annunciation`), the journal events to record (`drain()`) and
  the next time it must be woken (`next_deadline()`).
* `DoorController` is the I/O shell: gpiozero devices on an injected pin factory, one asyncio timer handle
  for the core's deadline, and LED/beeper patterns.

Lock semantics (docs/hardware.md): the relay *energised* means **unlocked** for a fail-secure strike and
**locked** for a fail-safe maglock. `relay_active_high` only says how the driver is wired (which GPIO level
energises the coil). On start the relay is created already in the locked state, before any other device;
on stop (including an exception inside ``async with``) it is driven explicitly to **de-energised** — the
state the hardware also falls into when the agent dies and the pin reverts to its pulled-down input: a
fail-secure strike stays locked, a fail-safe maglock releases.

Door states and alarms (every change goes to the journal):

* ``grant(strike_s)`` unlocks at once, in the same call; relock when the strike time ends, or as soon as the
  door closes after it opened during the strike.
* The contact is debounced: a level counts once it has held for `debounce_s`. Edges closer together than
  that by their own timestamps are bounces and are dropped, so a noise spike never raises an alarm.
* Forced open: the door opened while it was not unlocked, not granted and not covered by a REX press.
  The time of an opening is the arrival of its first edge, so an opening just before a strike ends is legit.
* Held open: open longer than the door's `held_open_s` after a legitimate opening; a pre-alarm at
  `prealarm_fraction` of it. Free passage (an unlock hold) suspends the held-open timer.
  Alarms end (``state = "cleared"``) when the door closes.
* REX ``unlock`` works like a grant; REX ``shadow`` only covers the opening that follows for a window.
  REX keeps working in lockdown: egress is a life-safety matter.
* Modes: UNLOCKED holds the door unlocked while its schedule is active; FIRST_CARD arms during the
  schedule and the first grant holds it unlocked until the schedule ends; LOCKED and LOCKDOWN relock at
  once and suspend every hold (grants still work: who may pass in lockdown is decided upstream).
* **Lockdown wins**, and this is the one place that enforces it: while the door is in LOCKDOWN (the agent
  sets it for a site lockdown and for a door's own lockdown mode), a remote unlock (`unlock_for`) or a
  hold is refused with `DoorLockdownError`, whose message the command's result carries. Lifting it is a
  command of its own: `lockdown` off for the site, or `door_mode` null/normal for a door locked down by
  its own mode. During a site lockdown a door's mode may be set, but takes effect when the lockdown ends:
  there is no per-door release of a site lockdown.
* Feedback (LED, beeper) is never shown by a grant itself: the agent decides what a reader shows for a
  decision in one place (`edge.agent.feedback_for`), the same for Wiegand and OSDP readers.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self

from gpiozero import InputDevice, OutputDevice

from edge.errors import ConfigError, EdgeError
from edge.events import (
    DOOR_FORCED_OPEN,
    DOOR_HELD_OPEN,
    DOOR_HELD_OPEN_PREALARM,
    DOOR_REX,
    DOOR_STATE,
    Detail,
    EventSink,
)
from edge.hw import DoorIO
from edge.model import Door, DoorMode
from edge.readers.base import Feedback

log = logging.getLogger(__name__)

INF = math.inf


class DoorLockdownError(EdgeError, ValueError):
    """A remote unlock or a hold was refused: the door is in lockdown."""


class Annunciation(enum.StrEnum):
    """What the reader's beeper/LED must keep showing, apart from one-shot results."""

    NONE = "none"
    PREALARM = "prealarm"
    ALARM = "alarm"


# --- pure core ----------------------------------------------------------------------------------------


class Debouncer:
    """A two-level input debounced on its edges' own timestamps.

    `edge(now, edge_t, level)` takes a raw edge: `edge_t` is the edge's timestamp (seconds, any origin, from
    the GPIO driver) and `now` the controller time it reached the loop. A new level is confirmed when it has
    held for `window_s`: either the next edge comes at least `window_s` later by edge time, or `tick(now)` is
    called `window_s` after it arrived. An edge back to the stable level within `window_s` cancels it (a
    bounce or a spike). Confirmed changes are returned as ``(start, level)``: `start` is the arrival time of
    the first edge of the burst that led to the change (when the door really started to move).
    """

    def __init__(self, window_s: float, level: bool) -> None:
        self.window_s = window_s
        self.level = level
        self._pending: tuple[float, bool, float, float] | None = None  # (edge_t, level, arrived, start)
        self._last_edge_t: float | None = None
        self._burst_start = 0.0

    @property
    def deadline(self) -> float | None:
        return None if self._pending is None else self._pending[2] + self.window_s

    def edge(self, now: float, edge_t: float, level: bool) -> list[tuple[float, bool]]:
        out: list[tuple[float, bool]] = []
        in_burst = self._last_edge_t is not None and edge_t - self._last_edge_t < self.window_s
        self._last_edge_t = edge_t
        p = self._pending
        if p is not None and level == p[1]:
            return out  # the same level reported twice (an edge was missed in between)
        if p is not None and edge_t - p[0] >= self.window_s:
            # The pending level held long enough before this edge (the loop was just late): it was real.
            self._pending = None
            self.level = p[1]
            out.append((p[3], p[1]))
        if not in_burst:
            self._burst_start = now
        if level == self.level:
            self._pending = None  # bounced back: nothing happened
        else:
            self._pending = (edge_t, level, now, self._burst_start)
        return out

    def tick(self, now: float) -> list[tuple[float, bool]]:
        p = self._pending
        if p is None or now < p[2] + self.window_s:
            return []
        self._pending = None
        self.level = p[1]
        return [(p[3], p[1])]


class DoorLogic:
    """The door's state machine. Pure: no I/O, no clock; `now` is passed in. See the module docstring."""

    #: How long past windows are kept to judge a late-confirmed opening (far more than any debounce).
    WINDOW_MEMORY_S = 60.0

    def __init__(
        self,
        door: Door,
        *,
        now: float,
        contact_open: bool | None = None,
        rex_pressed: bool = False,
        rex_mode: str = "unlock",
        rex_window_s: float | None = None,
        debounce_s: float = 0.05,
        prealarm_fraction: float = 0.8,
        fail_safe: bool = False,
    ) -> None:
        if rex_mode not in ("unlock", "shadow"):
            raise ValueError(f"rex_mode must be 'unlock' or 'shadow', got {rex_mode!r}")
        self.door = door
        self.fail_safe = fail_safe
        self.rex_mode = rex_mode
        self.rex_window_s = rex_window_s
        self.prealarm_fraction = prealarm_fraction
        self.mode = DoorMode.NORMAL
        self.schedule_active = False
        self._events: list[tuple[str, Detail]] = []
        self._contact = None if contact_open is None else Debouncer(debounce_s, contact_open)
        self._rex = Debouncer(debounce_s, rex_pressed)
        # A strike (grant or REX unlock): relocks at `_strike_until`, or when the door closes after opening.
        self._strike_until: float | None = None
        self._strike_opened = False
        self._strike_window: list[float] | None = None
        # Holds: free passage while any is set and the mode allows it.
        self._holds: set[str] = set()  # "schedule", "first_card", "remote", or a caller's reason
        self._remote_until: float | None = None
        self._first_card_armed = False
        self._first_card_by_grant = False  # the last grant started the first-card unlock
        self._hold_open = False
        self._hold_since = 0.0
        # Past and present [from, until] times during which the door could legitimately open.
        self._windows: list[list[float]] = []
        # Alarms.
        self._forced = False
        self._opened_at: float | None = None
        self._prealarm_at: float | None = None
        self._held_at: float | None = None
        self._prealarm = False
        self._held = False
        self._unlocked = False
        self._emit(DOOR_STATE, lock="locked", cause="start", contact=_contact_word(contact_open))
        if contact_open:
            # Open at start: we cannot know why. No forced alarm, but the held-open timer runs.
            self._opened_at = now
            self._arm_held(now)
        self.set_mode(now, door.mode, schedule_active=door.unlock_schedule is None)

    # -- outputs --

    @property
    def unlocked(self) -> bool:
        return self._unlocked

    @property
    def relay_energised(self) -> bool:
        """Energised = unlocked for a fail-secure strike, = locked for a fail-safe maglock."""
        return self._unlocked != self.fail_safe

    @property
    def is_open(self) -> bool | None:
        return None if self._contact is None else self._contact.level

    @property
    def alarms(self) -> frozenset[str]:
        out = set()
        if self._forced:
            out.add(DOOR_FORCED_OPEN)
        if self._held:
            out.add(DOOR_HELD_OPEN)
        if self._prealarm:
            out.add(DOOR_HELD_OPEN_PREALARM)
        return frozenset(out)

    @property
    def annunciation(self) -> Annunciation:
        if self._forced or self._held:
            return Annunciation.ALARM
        if self._prealarm:
            return Annunciation.PREALARM
        return Annunciation.NONE

    @property
    def remote_until(self) -> float | None:
        """When a timed unlock (`unlock_for`: remote, or a first-card unlock) ends, on the controller clock."""
        return self._remote_until

    def drain(self) -> list[tuple[str, Detail]]:
        """The journal events produced since the last call, oldest first."""
        out, self._events = self._events, []
        return out

    def next_deadline(self) -> float | None:
        cands = [
            self._strike_until,
            self._remote_until,
            None if self._prealarm else self._prealarm_at,
            None if self._held else self._held_at,
            self._rex.deadline,
            None if self._contact is None else self._contact.deadline,
        ]
        live = [c for c in cands if c is not None]
        return min(live) if live else None

    # -- commands --

    def grant(self, now: float, strike_s: float, *, cause: str = "grant") -> None:
        """Unlock for `strike_s` seconds (relock earlier when the door closes after opening)."""
        if not (strike_s > 0 and math.isfinite(strike_s)):
            raise ValueError(f"strike time must be a positive number of seconds, got {strike_s!r}")
        if self._strike_window is not None:
            self._strike_window[1] = now
        self._strike_window = [now, now + strike_s]
        self._windows.append(self._strike_window)
        self._strike_until = now + strike_s
        self._strike_opened = bool(self.is_open)  # already open: relock when it closes
        self._first_card_by_grant = False
        if self._first_card_armed and cause == "grant":
            self._first_card_armed = False
            self._first_card_by_grant = True
            self._holds.add("first_card")
        self._recompute(now, cause)

    def revoke_grant(self, now: float) -> None:
        """Take the last grant back (its card read turned out to be the head of a longer frame): end its
        strike, and undo the first-card unlock it started. Holds of other origins stay."""
        self._end_strike(now)
        if self._first_card_by_grant:
            self._first_card_by_grant = False
            self._holds.discard("first_card")
            self._first_card_armed = self.mode == DoorMode.FIRST_CARD and self.schedule_active
        self._recompute(now, "revoked")

    def _refuse_in_lockdown(self, what: str) -> None:
        if self.mode == DoorMode.LOCKDOWN:
            raise DoorLockdownError(
                f"door {self.door.id!r} is in lockdown: {what} refused (lift the lockdown first)"
            )

    def hold(self, now: float, reason: str) -> None:
        """Hold the door unlocked for `reason`; refused in lockdown."""
        self._refuse_in_lockdown(f"hold {reason!r}")
        self._holds.add(reason)
        self._recompute(now, f"hold:{reason}")

    def release(self, now: float, reason: str | None = None) -> None:
        """End the hold `reason`; None ends every open-ended hold, but a timed `unlock_for` runs to its end
        (end it with ``release(now, "remote")`` or `relock`)."""
        if reason is None:
            self._holds = {"remote"} & self._holds if self._remote_until is not None else set()
        else:
            self._holds.discard(reason)
        if "remote" not in self._holds:
            self._remote_until = None
        self._recompute(now, "release" if reason is None else f"release:{reason}")

    def relock(self, now: float) -> None:
        """Lock now: end the strike and every hold (a first-card door re-arms only with `set_mode`)."""
        self._end_strike(now)
        self._holds.clear()
        self._remote_until = None
        self._first_card_armed = False
        self._recompute(now, "relock")

    def unlock_for(self, now: float, seconds: float) -> None:
        """A remote unlock: held unlocked (no relock on close, no held-open alarm) for `seconds`."""
        if not (seconds > 0 and math.isfinite(seconds)):
            raise ValueError(f"unlock time must be a positive number of seconds, got {seconds!r}")
        self._refuse_in_lockdown("remote unlock")
        self._holds.add("remote")
        self._remote_until = now + seconds
        self._recompute(now, "hold:remote")

    def set_mode(self, now: float, mode: DoorMode, *, schedule_active: bool = True) -> None:
        """Apply the door's mode; the caller says whether its `unlock_schedule` is active now."""
        changed = mode != self.mode or schedule_active != self.schedule_active
        self.mode = mode
        self.schedule_active = schedule_active
        if mode == DoorMode.UNLOCKED and schedule_active:
            self._holds.add("schedule")
        else:
            self._holds.discard("schedule")
        if mode == DoorMode.FIRST_CARD and schedule_active:
            if "first_card" not in self._holds:
                self._first_card_armed = True
        else:
            self._first_card_armed = False
            self._holds.discard("first_card")
        if mode in (DoorMode.LOCKED, DoorMode.LOCKDOWN):
            self._end_strike(now)
        if changed:
            self._emit(DOOR_STATE, mode=str(mode), schedule_active=schedule_active)
        self._recompute(now, f"mode:{mode}")

    def update_door(self, door: Door) -> None:
        """New settings from the cloud: the times apply from the next grant or opening. The mode is not
        applied here (it depends on the schedule): the caller uses `set_mode` or holds for that."""
        self.door = door

    def status(self) -> dict[str, Any]:
        return {
            "locked": not self._unlocked,
            "relay_energised": self.relay_energised,
            "contact": _contact_word(self.is_open),
            "mode": str(self.mode),
            "holds": sorted(self._holds) if self._hold_open else [],
            "alarms": sorted(self.alarms),
        }

    # -- inputs --

    def contact_edge(self, now: float, edge_t: float, is_open: bool) -> None:
        if self._contact is None:
            return
        for start, level in self._contact.edge(now, edge_t, is_open):
            self._contact_changed(start, now, level)

    def rex_edge(self, now: float, edge_t: float, pressed: bool) -> None:
        for start, level in self._rex.edge(now, edge_t, pressed):
            self._rex_changed(start, now, level)

    def tick(self, now: float) -> None:
        """Wake-up at (or after) `next_deadline()`."""
        if self._contact is not None:
            for start, level in self._contact.tick(now):
                self._contact_changed(start, now, level)
        for start, level in self._rex.tick(now):
            self._rex_changed(start, now, level)
        if self._strike_until is not None and now >= self._strike_until:
            self._end_strike(self._strike_until)
            self._recompute(now, "strike_ended")
        if self._remote_until is not None and now >= self._remote_until:
            self._remote_until = None
            self._holds.discard("remote")
            self._recompute(now, "unlock_ended")
        if self._prealarm_at is not None and not self._prealarm and now >= self._prealarm_at:
            self._prealarm = True
            self._emit(DOOR_HELD_OPEN_PREALARM, state="active", open_s=self._open_s(now))
        if self._held_at is not None and not self._held and now >= self._held_at:
            self._held = True
            self._emit(DOOR_HELD_OPEN, state="active", open_s=self._open_s(now))
        cutoff = now - self.WINDOW_MEMORY_S
        self._windows = [w for w in self._windows if w[1] >= cutoff]

    # -- internals --

    def _emit(self, type: str, **detail: str | int | float | bool | None) -> None:
        self._events.append((type, detail))

    def _open_s(self, now: float) -> float:
        return round(now - self._opened_at, 3) if self._opened_at is not None else 0.0

    def _allowed(self, t: float) -> bool:
        if self._hold_open and t >= self._hold_since:
            return True
        return any(f <= t <= u for f, u in self._windows)

    def _end_strike(self, at: float) -> None:
        if self._strike_until is None:
            return
        self._strike_until = None
        self._strike_opened = False
        if self._strike_window is not None:
            self._strike_window[1] = min(self._strike_window[1], at)
            self._strike_window = None

    def _recompute(self, now: float, cause: str) -> None:
        hold = bool(self._holds) and self.mode not in (DoorMode.LOCKED, DoorMode.LOCKDOWN)
        if hold != self._hold_open:
            self._hold_open = hold
            if hold:
                self._hold_since = now
                self._clear_held(now)  # free passage: no held-open alarm
            else:
                self._windows.append([self._hold_since, now])
                if self.is_open and not self._forced:
                    self._opened_at = now  # held-open counts from the end of free passage
                    self._arm_held(now)
        unlocked = hold or self._strike_until is not None
        if unlocked != self._unlocked:
            self._unlocked = unlocked
            self._emit(DOOR_STATE, lock="unlocked" if unlocked else "locked", cause=cause)

    def _arm_held(self, start: float) -> None:
        if self._hold_open:
            return
        held = self.door.held_open_s
        self._held_at = start + held
        self._prealarm_at = start + held * self.prealarm_fraction

    def _clear_held(self, now: float) -> None:
        if self._held:
            self._emit(DOOR_HELD_OPEN, state="cleared", open_s=self._open_s(now))
        if self._prealarm:
            self._emit(DOOR_HELD_OPEN_PREALARM, state="cleared", open_s=self._open_s(now))
        self._held = self._prealarm = False
        self._held_at = self._prealarm_at = None

    def _contact_changed(self, start: float, now: float, is_open: bool) -> None:
        self._emit(DOOR_STATE, contact=_contact_word(is_open))
        if is_open:
            self._opened_at = start
            if self._allowed(start):
                if self._strike_until is not None:
                    self._strike_opened = True
                self._arm_held(start)
            else:
                self._forced = True
                self._emit(DOOR_FORCED_OPEN, state="active")
            return
        if self._forced:
            self._forced = False
            self._emit(DOOR_FORCED_OPEN, state="cleared", open_s=self._open_s(now))
        self._clear_held(now)
        self._opened_at = None
        if self._strike_until is not None and self._strike_opened:
            self._end_strike(now)
            self._recompute(now, "closed")

    def _rex_changed(self, start: float, now: float, pressed: bool) -> None:
        if not pressed:
            return
        window = self.rex_window_s if self.rex_window_s is not None else self.door.strike_s
        self._emit(DOOR_REX, mode=self.rex_mode)
        if self.rex_mode == "unlock":
            self.grant(now, window, cause="rex")
        else:
            self._windows.append([start, start + window])


def _contact_word(is_open: bool | None) -> str:
    return "unknown" if is_open is None else ("open" if is_open else "closed")


# --- reader LED and beeper ----------------------------------------------------------------------------

#: A pattern: (on, seconds) steps.
Pattern = tuple[tuple[bool, float], ...]

LED_PATTERNS: dict[Feedback, Pattern] = {
    Feedback.GRANTED: ((True, 2.0),),
    Feedback.DENIED: ((False, 1.0),),
    Feedback.PIN_NEEDED: ((True, 0.15), (False, 0.15)) * 3,
}
BEEPER_PATTERNS: dict[Feedback, Pattern] = {
    Feedback.GRANTED: ((True, 0.1),),
    Feedback.DENIED: ((True, 0.1), (False, 0.1)) * 3,
    Feedback.PIN_NEEDED: ((True, 0.05),),
}
#: Repeating patterns while an alarm is up.
ALARM_LED: dict[Annunciation, Pattern] = {
    Annunciation.ALARM: ((True, 0.25), (False, 0.25)),
    Annunciation.PREALARM: ((True, 0.1), (False, 0.9)),
}
ALARM_BEEPER: dict[Annunciation, Pattern] = {
    Annunciation.ALARM: ((True, 0.5), (False, 0.5)),
    Annunciation.PREALARM: ((True, 0.1), (False, 0.9)),
}


class Indicator:
    """One on/off line (LED or beeper) playing patterns on asyncio timers (one kept handle).

    A one-shot pattern plays over the repeating background pattern, which resumes when it ends.
    """

    def __init__(self, device: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._device = device
        self._loop = loop
        self._handle: asyncio.TimerHandle | None = None
        self._background: Pattern = ()
        self._steps: Pattern = ()
        self._i = 0
        self._once = False

    def background(self, pattern: Pattern) -> None:
        if pattern == self._background:
            return
        self._background = pattern
        if not self._once:
            self._start(pattern, once=False)

    def once(self, pattern: Pattern) -> None:
        """Play `pattern` once, then the background again (an empty pattern: back to the background now)."""
        if pattern:
            self._start(pattern, once=True)
        else:
            self._start(self._background, once=False)

    def close(self) -> None:
        self._cancel()
        self._device.off()

    def _cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _start(self, pattern: Pattern, *, once: bool) -> None:
        self._cancel()
        self._steps, self._i, self._once = pattern, 0, once
        if not pattern:
            self._once = False
            self._device.off()
            return
        self._step()

    def _step(self) -> None:
        self._handle = None
        if self._i >= len(self._steps):
            if self._once:
                self._start(self._background, once=False)
                return
            self._i = 0
        on, seconds = self._steps[self._i]
        self._i += 1
        self._device.value = on
        self._handle = self._loop.call_later(seconds, self._step)


# --- the I/O shell ------------------------------------------------------------------------------------


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
        self._emit = emit
        self._clock = clock
        self._fail_safe = io.lock_type == "fail_safe"
        self._relay: Any = None
        self._contact: Any = None
        self._rex: Any = None
        self._devices: list[Any] = []
        self._led: Indicator | None = None
        self._beeper: Indicator | None = None
        self._logic: DoorLogic | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._annunciation = Annunciation.NONE
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
            if io.led_pin is not None:
                led = self._output(io.led_pin, io.led_active_high)
                self._led = Indicator(led, self._loop)
            if io.beeper_pin is not None:
                beeper = self._output(io.beeper_pin, io.beeper_active_high)
                self._beeper = Indicator(beeper, self._loop)
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
            for ind in (self._led, self._beeper):
                if ind is not None:
                    ind.close()
            self._led = self._beeper = None
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
        strike time for users with the extended-door-time flag). Shows nothing on the reader: `signal`."""
        core = self._core
        core.grant(self._clock(), strike_s if strike_s is not None else self.strike_time(extended=extended))
        self._apply()

    def revoke_grant(self) -> None:
        """Take the last grant back (see `DoorLogic.revoke_grant`): locks now unless another hold remains."""
        self._core.revoke_grant(self._clock())
        self._apply()

    def deny(self) -> None:
        self.signal(Feedback.DENIED)

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
    def mode(self) -> DoorMode:
        return self._core.mode

    def set_mode(self, mode: DoorMode, *, schedule_active: bool = True) -> None:
        self._core.set_mode(self._clock(), mode, schedule_active=schedule_active)
        self._apply()

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

    def signal(self, what: Feedback) -> None:
        """Show a result on the reader's LED and beeper lines (never blocks)."""
        if what == Feedback.ALARM:
            return  # alarms are shown by the door itself while they last
        if what == Feedback.IDLE:
            for ind in (self._led, self._beeper):
                if ind is not None:
                    ind.once(())
            return
        if self._led is not None and what in LED_PATTERNS:
            self._led.once(LED_PATTERNS[what])
        if self._beeper is not None and what in BEEPER_PATTERNS:
            self._beeper.once(BEEPER_PATTERNS[what])

    # -- internals --

    @property
    def _core(self) -> DoorLogic:
        if self._logic is None:
            raise RuntimeError(f"door {self.door.id!r} is not started (use `async with`)")
        return self._logic

    def _record(self, type: str, detail: Detail) -> None:
        try:
            self._emit(type, door=self.door.id, detail=detail)
        except Exception:
            # The journal failing must never stop the door from working.
            log.exception("door %s: could not record %s", self.door.id, type)

    def _apply(self) -> None:
        """Outputs first (relay, then annunciation), then the journal, then the next wake-up."""
        core = self._core
        want = core.relay_energised
        if bool(self._relay.value) != want:
            self._relay.value = want
        ann = core.annunciation
        if ann != self._annunciation:
            self._annunciation = ann
            if self._led is not None:
                self._led.background(ALARM_LED.get(ann, ()))
            if self._beeper is not None:
                self._beeper.background(ALARM_BEEPER.get(ann, ()))
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
