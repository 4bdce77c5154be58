"""The simulator's GPIO pins: a gpiozero MockFactory whose clock can be set forward.

`VirtualClockFactory` is a MockFactory whose `ticks()` is a forward-only settable clock, and its
`VirtualClockPin`s stamp their edges with it, so the transmitter (edge.sim.transmitter) can put exact
"kernel" timestamps on every edge it drives, as a GPIO driver does on real hardware. The hardware profile's
``factory = "mock"`` names it (edge.hw.PIN_FACTORIES).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from time import monotonic
from typing import Any

from gpiozero.pins.mock import MockFactory, MockPin, PinState


class VirtualClockPin(MockPin):  # type: ignore[misc]
    """A MockPin that stamps its state changes with its factory's `ticks()` (gpiozero's MockPin uses
    `time.monotonic()`), so a `VirtualClockFactory` decides the edge timestamps. It overrides
    `_change_state`, the hook gpiozero's own MockConnectedPin overrides for the same purpose."""

    _state: bool
    _last_change: float
    _function: str
    _edges: str
    _when_changed: Any
    states: list[PinState]

    def _change_state(self, value: bool) -> bool:
        if self._state != value:
            t = self.factory.ticks()
            self._state = value
            self.states.append(PinState(t - self._last_change, value))
            self._last_change = t
            return True
        return False

    def clear_states(self) -> None:
        self._last_change = self.factory.ticks()
        self.states = [PinState(0.0, self._state)]

    def drive_at(self, level: bool, at: float) -> None:
        """Drive this input to `level` as an edge that happened at `at` (factory ticks), delivered now.

        `at` is what a kernel timestamp is on real hardware: when the edge happened, which may be a
        little in the past by the time the GPIO library's thread gets to deliver it.
        """
        if self._function != "input" or self._state == level:
            return
        at = max(at, self._last_change)
        self._state = level
        self.states.append(PinState(at - self._last_change, level))
        self._last_change = at
        if self._when_changed is not None and self._edges in ("both", "rising" if level else "falling"):
            self._call_when_changed()


class VirtualClockFactory(MockFactory):  # type: ignore[misc]
    """A MockFactory whose clock runs at real speed but can be set forward (never back).

    `ticks()` is `monotonic() + skew`; `set_ticks(t)` moves it forward to `t` (an earlier `t` is a no-op),
    which lets a transmitter stamp each edge exactly where a real kernel timestamp would be. Inside
    `frozen()` only `set_ticks` moves it: a frame sent all at once is stamped exactly even when the
    sending process is descheduled half-way (on a busy machine the real clock would otherwise run on
    between two edges and open a gap in the frame that no reader sends).
    """

    def __init__(self, revision: str | None = None) -> None:
        self._skew = 0.0
        self._frozen: float | None = None
        super().__init__(revision=revision, pin_class=VirtualClockPin)

    def ticks(self) -> float:
        if self._frozen is not None:
            return self._frozen
        return monotonic() + self._skew

    @contextmanager
    def frozen(self) -> Iterator[float]:
        """Hold the clock still (only `set_ticks` moves it) for the block; yields its value. Afterwards it
        runs on from the later of where the block left it and real time: never back. Reentrant."""
        if self._frozen is not None:
            yield self._frozen
            return
        self._frozen = self.ticks()
        try:
            yield self._frozen
        finally:
            t, self._frozen = self._frozen, None
            now = monotonic()
            if t > now + self._skew:
                self._skew = t - now

    @staticmethod
    def ticks_diff(later: float, earlier: float) -> float:
        return later - earlier

    def set_ticks(self, t: float) -> float:
        """Move the clock forward to `t`; returns the clock's value afterwards."""
        if self._frozen is not None:
            self._frozen = max(self._frozen, t)
            return self._frozen
        now = monotonic()
        if t > now + self._skew:
            self._skew = t - now
        return now + self._skew


__all__ = ["VirtualClockFactory", "VirtualClockPin"]
