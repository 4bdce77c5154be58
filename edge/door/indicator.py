"""The one LED/beeper pattern player: what a reader's LED and beeper lines show, for every reader kind and
the door.

`Indicator.show(feedback)` plays a one-shot result (granted, denied, PIN needed) over the repeating
background that `annunciate` sets while a door alarm lasts (pre-alarm, forced/held open); the background
resumes when the one-shot ends. The door controller owns the lines (a Wiegand reader's LED and beeper
control inputs are wired to the door's GPIOs in the hardware profile) and gives its `Indicator` to the
reader, so a feedback request reaches the same player whoever makes it. An OSDP reader plays feedback on the
reader itself (osdp_LED / osdp_BUZ, edge.readers.osdp.panel).

Timers are asyncio handles on the loop (one kept handle per line); nothing blocks. Call on the loop thread.
"""

from __future__ import annotations

import asyncio
from typing import Any

from edge.door.logic import Annunciation
from edge.readers.events import Feedback

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


class Line:
    """One on/off output (a gpiozero `OutputDevice`, or anything with ``value`` and ``off()``) playing
    patterns on asyncio timers. A one-shot pattern plays over the repeating background pattern, which
    resumes when it ends."""

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


class Indicator:
    """A reader's LED and beeper lines (either may be absent): one-shot feedback over the alarm background."""

    def __init__(self, loop: asyncio.AbstractEventLoop, *, led: Any = None, beeper: Any = None) -> None:
        self._led = None if led is None else Line(led, loop)
        self._beeper = None if beeper is None else Line(beeper, loop)
        self._annunciation = Annunciation.NONE

    def show(self, what: Feedback) -> None:
        """Play a result once (never blocks). IDLE cuts a one-shot short; ALARM is not a one-shot (an alarm
        is shown by `annunciate` for as long as it lasts)."""
        if what == Feedback.ALARM:
            return
        if what == Feedback.IDLE:
            for line in (self._led, self._beeper):
                if line is not None:
                    line.once(())
            return
        if self._led is not None and what in LED_PATTERNS:
            self._led.once(LED_PATTERNS[what])
        if self._beeper is not None and what in BEEPER_PATTERNS:
            self._beeper.once(BEEPER_PATTERNS[what])

    def annunciate(self, what: Annunciation) -> None:
        """The repeating background while a door alarm lasts (NONE: dark and silent between one-shots)."""
        if what == self._annunciation:
            return
        self._annunciation = what
        if self._led is not None:
            self._led.background(ALARM_LED.get(what, ()))
        if self._beeper is not None:
            self._beeper.background(ALARM_BEEPER.get(what, ()))

    def close(self) -> None:
        """Stop every pattern and turn both lines off (the devices themselves belong to the caller)."""
        for line in (self._led, self._beeper):
            if line is not None:
                line.close()
        self._led = self._beeper = None


__all__ = [
    "ALARM_BEEPER",
    "ALARM_LED",
    "BEEPER_PATTERNS",
    "LED_PATTERNS",
    "Indicator",
    "Line",
    "Pattern",
]
