"""The door's pure state machine: lock relay, door-position switch, exit button, alarms.

`DoorLogic` knows nothing of GPIO or asyncio: every input carries the time it happened (`now`, seconds on
the controller's monotonic clock) and the core answers with the state the outputs must be in
(`relay_energised`, `annunciation`), the journal events to record (`drain()`) and the next time it must be
woken (`next_deadline()`). The I/O shell is `edge.door.controller.DoorController`; the LED and beeper
patterns are played by `edge.door.indicator`.

Lock semantics (docs/hardware.md): the relay *energised* means **unlocked** for a fail-secure strike and
**locked** for a fail-safe maglock (`fail_safe`).

Door states and alarms (every change goes to the journal):

* ``grant(strike_s)`` unlocks at once, in the same call; relock when the strike time ends, or as soon as the
  door closes after it opened during the strike.
* The contact is debounced: a level counts once it has held for `debounce_s`. Edges closer together than
  that by their own timestamps are bounces and are dropped, so a noise spike never raises an alarm.
* Forced open: the door opened while it was not unlocked, not granted and not covered by a REX press.
  The time of an opening is the arrival of its first edge, so an opening just before a strike ends is legit.
* Held open: open longer than the door's `held_open_s` after a legitimate opening; a pre-alarm at
  `prealarm_fraction` of it. Free passage (a hold) suspends the held-open timer.
  Alarms end (``state = "cleared"``) when the door closes.
* REX ``unlock`` works like a grant; REX ``shadow`` only covers the opening that follows for a window.
  ``rex_allowed`` (the access rules' interlock) may refuse a REX unlock while another door of its interlock
  is released or open, unless the interlock lets REX override it (egress safety).
  REX keeps working in lockdown: egress is a life-safety matter.
* Holds: free passage while any hold is set (``hold(reason)``: the agent's unlock schedules and first-card
  unlocks, or a timed remote ``unlock_for``). Door modes (unlocked by schedule, first card, locked) are the
  agent's: it turns them into holds, relocks and lockdown; the door keeps no mode of its own but lockdown.
* **Lockdown wins**, and this is the one place that enforces it: while the door is in lockdown
  (`set_lockdown`; the agent sets it for a site lockdown and for a door's own lockdown mode) it relocks at
  once, every hold is suspended, and a remote unlock (`unlock_for`) or a hold is refused with
  `DoorLockdownError`, whose message the command's result carries. Grants still work: who may pass in
  lockdown is decided upstream.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from typing import Any

from edge.errors import EdgeError
from edge.events import (
    DOOR_FORCED_OPEN,
    DOOR_HELD_OPEN,
    DOOR_HELD_OPEN_PREALARM,
    DOOR_REX,
    DOOR_STATE,
    Detail,
)
from edge.model import Door, DoorMode


class DoorLockdownError(EdgeError, ValueError):
    """A remote unlock or a hold was refused: the door is in lockdown."""


class Annunciation(enum.StrEnum):
    """What the reader's beeper/LED must keep showing, apart from one-shot results."""

    NONE = "none"
    PREALARM = "prealarm"
    ALARM = "alarm"


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
        self.lockdown = False
        #: Whether a REX press may unlock now (the access rules' interlock, unless it lets REX override it for
        #: egress safety); None: always. A press it refuses is recorded (`door.rex`, refused "interlock").
        self.rex_allowed: Callable[[], bool] | None = None
        self._events: list[tuple[str, Detail]] = []
        self._contact = None if contact_open is None else Debouncer(debounce_s, contact_open)
        self._rex = Debouncer(debounce_s, rex_pressed)
        # A strike (grant or REX unlock): relocks at `_strike_until`, or when the door closes after opening.
        self._strike_until: float | None = None
        self._strike_opened = False
        self._strike_window: list[float] | None = None
        # Holds: free passage while any is set, outside lockdown.
        self._holds: set[str] = set()  # "remote", or the caller's reason ("unlocked", "first_card", ...)
        self._remote_until: float | None = None
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
        self._record_event(DOOR_STATE, lock="locked", cause="start", contact=_contact_word(contact_open))
        if contact_open:
            # Open at start: we cannot know why. No forced alarm, but the held-open timer runs.
            self._opened_at = now
            self._arm_held(now)

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
        """When a timed unlock (`unlock_for`: remote, or the agent's first-card unlock) ends, on the
        controller clock."""
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
        self._recompute(now, cause)

    def revoke_grant(self, now: float) -> None:
        """Take the last grant back (its card read turned out to be the head of a longer frame): end its
        strike. Holds stay (the agent undoes a first-card unlock it started)."""
        self._end_strike(now)
        self._recompute(now, "revoked")

    def _refuse_in_lockdown(self, what: str) -> None:
        if self.lockdown:
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
        """Lock now: end the strike and every hold, timed unlocks included."""
        self._end_strike(now)
        self._holds.clear()
        self._remote_until = None
        self._recompute(now, "relock")

    def unlock_for(self, now: float, seconds: float) -> None:
        """A remote unlock: held unlocked (no relock on close, no held-open alarm) for `seconds`."""
        if not (seconds > 0 and math.isfinite(seconds)):
            raise ValueError(f"unlock time must be a positive number of seconds, got {seconds!r}")
        self._refuse_in_lockdown("remote unlock")
        self._holds.add("remote")
        self._remote_until = now + seconds
        self._recompute(now, "hold:remote")

    @property
    def mode(self) -> DoorMode:
        """The door's own view of its mode: LOCKDOWN or NORMAL (every other mode is the agent's)."""
        return DoorMode.LOCKDOWN if self.lockdown else DoorMode.NORMAL

    def set_lockdown(self, now: float, on: bool) -> None:
        """Enter (relock at once, suspend every hold, refuse remote unlocks and holds) or leave lockdown."""
        changed = on != self.lockdown
        self.lockdown = on
        if on:
            self._end_strike(now)
        if changed:
            self._record_event(DOOR_STATE, mode=str(self.mode))
        self._recompute(now, f"mode:{self.mode}")

    def update_door(self, door: Door) -> None:
        """New settings from the cloud: the times apply from the next grant or opening. The door's mode is
        not applied here: the agent turns it into holds, relocks and lockdown."""
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
            self._record_event(DOOR_HELD_OPEN_PREALARM, state="active", open_s=self._open_s(now))
        if self._held_at is not None and not self._held and now >= self._held_at:
            self._held = True
            self._record_event(DOOR_HELD_OPEN, state="active", open_s=self._open_s(now))
        cutoff = now - self.WINDOW_MEMORY_S
        self._windows = [w for w in self._windows if w[1] >= cutoff]

    # -- internals --

    def _record_event(self, type: str, **detail: str | int | float | bool | None) -> None:
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
        hold = bool(self._holds) and not self.lockdown
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
            self._record_event(DOOR_STATE, lock="unlocked" if unlocked else "locked", cause=cause)

    def _arm_held(self, start: float) -> None:
        if self._hold_open:
            return
        held = self.door.held_open_s
        self._held_at = start + held
        self._prealarm_at = start + held * self.prealarm_fraction

    def _clear_held(self, now: float) -> None:
        if self._held:
            self._record_event(DOOR_HELD_OPEN, state="cleared", open_s=self._open_s(now))
        if self._prealarm:
            self._record_event(DOOR_HELD_OPEN_PREALARM, state="cleared", open_s=self._open_s(now))
        self._held = self._prealarm = False
        self._held_at = self._prealarm_at = None

    def _contact_changed(self, start: float, now: float, is_open: bool) -> None:
        self._record_event(DOOR_STATE, contact=_contact_word(is_open))
        if is_open:
            self._opened_at = start
            if self._allowed(start):
                if self._strike_until is not None:
                    self._strike_opened = True
                self._arm_held(start)
            else:
                self._forced = True
                self._record_event(DOOR_FORCED_OPEN, state="active")
            return
        if self._forced:
            self._forced = False
            self._record_event(DOOR_FORCED_OPEN, state="cleared", open_s=self._open_s(now))
        self._clear_held(now)
        self._opened_at = None
        if self._strike_until is not None and self._strike_opened:
            self._end_strike(now)
            self._recompute(now, "closed")

    def _rex_changed(self, start: float, now: float, pressed: bool) -> None:
        if not pressed:
            return
        window = self.rex_window_s if self.rex_window_s is not None else self.door.strike_s
        if self.rex_mode == "unlock" and self.rex_allowed is not None and not self.rex_allowed():
            self._record_event(DOOR_REX, mode=self.rex_mode, refused="interlock")
            return
        self._record_event(DOOR_REX, mode=self.rex_mode)
        if self.rex_mode == "unlock":
            self.grant(now, window, cause="rex")
        else:
            self._windows.append([start, start + window])


def _contact_word(is_open: bool | None) -> str:
    return "unknown" if is_open is None else ("open" if is_open else "closed")
