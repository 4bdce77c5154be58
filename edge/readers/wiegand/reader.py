"""The Wiegand reader on gpiozero pins and the asyncio loop: `WiegandReader`.

`WiegandReader` runs the pure assembler (edge.readers.wiegand.frame) on gpiozero pins: the pin callback
(lgpio's thread on a Pi) only does `loop.call_soon_threadsafe(...)` with the edge's timestamp; an end-of-frame
timer on the loop (`loop.call_at`) calls `poll`, and events reach `sink` synchronously in that loop turn.

The reader has no LED or beeper of its own: those lines are the door's (edge.door.controller), and a
feedback request is played by the door's `Indicator` when the reader is given it (`indicator=`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Self

import msgspec
from gpiozero import InputDevice

from edge.readers.base import FeedbackPlayer, Reader
from edge.readers.events import CardRead, Feedback, PinEntry, ReaderEvent, ReaderFault, ReaderSink
from edge.readers.formats import FormatTable
from edge.readers.wiegand.frame import D0, D1, FrameTiming, KeypadOptions, WiegandAssembler

log = logging.getLogger(__name__)

#: How early the end-of-frame timer wakes the loop (epoll's 1 ms rounding), then sleeps the rest.
TIMER_SLACK_S = 0.001


class WiegandReader(Reader):
    """A Wiegand reader on two GPIO inputs.

    D0/D1 are gpiozero `InputDevice`s with the pull-up on, no debounce and edge detection on both
    edges. `at` of the events it emits is loop time (`loop.time()`), mapped from the edge timestamps.
    `feedback` is played by `indicator` (the door's LED/beeper player), if given.
    """

    kind = "wiegand"

    def __init__(
        self,
        name: str,
        sink: ReaderSink,
        *,
        d0: int | str,
        d1: int | str,
        formats: FormatTable,
        timing: FrameTiming | None = None,
        keypad: KeypadOptions | None = None,
        indicator: FeedbackPlayer | None = None,
        pin_factory: Any = None,
    ) -> None:
        super().__init__(name, sink)
        self.assembler = WiegandAssembler(name, formats, timing=timing, keypad=keypad)
        self.indicator = indicator
        self._pins = (d0, d1)
        self._factory = pin_factory
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inputs: list[Any] = []
        self._timer: asyncio.TimerHandle | None = None
        self._soon: asyncio.Handle | None = None  # a poll queued behind edges that arrived during a sleep
        self._offset = 0.0  # loop.time() - edge timestamp, minimum over the current frame

    async def __aenter__(self) -> Self:
        loop = asyncio.get_running_loop()
        self._loop = loop
        d0, d1 = self._pins
        try:
            for line, pin in ((D0, d0), (D1, d1)):
                dev = InputDevice(pin, pull_up=True, pin_factory=self._factory)
                self._inputs.append(dev)
                dev.pin.bounce = None
                dev.pin.edges = "both"
                dev.pin.when_changed = self._on_d0 if line == D0 else self._on_d1
            factory = self._inputs[0].pin_factory
            now_ticks = factory.ticks()
            self._offset = loop.time() - now_ticks
            self.assembler.set_initial(now_ticks, d0_high=bool(self._inputs[0].pin.state),
                                       d1_high=bool(self._inputs[1].pin.state))
        except BaseException:
            self._close()
            raise
        self._arm()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._close()

    def _close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._soon is not None:
            self._soon.cancel()
            self._soon = None
        for dev in self._inputs:
            dev.pin.when_changed = None
            dev.close()
        self._inputs = []

    async def run(self) -> None:
        if self._loop is None:
            raise RuntimeError("use `async with reader:` before run()")
        await self._loop.create_future()  # everything happens in callbacks; serve until cancelled

    # pin callbacks: on the GPIO library's thread; hop to the loop and do nothing else
    def _on_d0(self, ticks: float, state: int) -> None:
        loop = self._loop
        if loop is not None:
            loop.call_soon_threadsafe(self._edge, ticks, D0, state)

    def _on_d1(self, ticks: float, state: int) -> None:
        loop = self._loop
        if loop is not None:
            loop.call_soon_threadsafe(self._edge, ticks, D1, state)

    def _edge(self, ticks: float, line: int, state: int) -> None:
        loop = self._loop
        if loop is None:
            return
        off = loop.time() - ticks
        if not self.assembler.frame_open or off < self._offset:
            self._offset = off
        self._deliver(self.assembler.edge(ticks, line, bool(state)))
        self._arm()

    def _arm(self) -> None:
        loop = self._loop
        d = self.assembler.deadline
        if loop is None or d is None or self._soon is not None:
            return  # (a queued poll re-arms when it has run)
        # epoll waits in whole milliseconds, rounded up: a timer fires up to 1 ms late. Wake up to
        # TIMER_SLACK_S early instead and sleep the rest (see _on_timer): the end of a frame is then on
        # time to ~0.1 ms, which is most of what a tap waits after its last bit apart from the gap itself.
        when = d + self._offset - TIMER_SLACK_S
        if self._timer is not None:
            if self._timer.when() <= when:
                return  # fires first; re-armed then
            self._timer.cancel()
        self._timer = loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        loop = self._loop
        if loop is None:
            return
        d = self.assembler.deadline
        if d is not None:
            early = d + self._offset - loop.time()
            if 0 < early <= 2 * TIMER_SLACK_S:
                time.sleep(early)  # noqa: TID251  (at most ~1 ms, once per frame; releases the GIL)
                # Edges that reached the loop while it slept are queued ahead of this: feed them first.
                self._soon = loop.call_soon(self._poll_now)
                return
        self._poll_now()

    def _poll_now(self) -> None:
        self._soon = None
        loop = self._loop
        if loop is None:
            return
        self._deliver(self.assembler.poll(loop.time() - self._offset))
        self._arm()

    def _deliver(self, events: Sequence[ReaderEvent]) -> None:
        for ev in events:
            mapped: ReaderEvent = ev
            if isinstance(ev, CardRead | PinEntry | ReaderFault):
                mapped = msgspec.structs.replace(ev, at=ev.at + self._offset)
            try:
                self.sink(mapped)
            except Exception:
                log.exception("reader %s: sink failed on a %s", self.name, type(ev).__name__)

    # --- feedback ---------------------------------------------------------------------------------------

    def feedback(self, what: Feedback, *, text: str | None = None) -> None:
        """Play `what` on the door's LED and beeper lines (the `indicator`); never blocks. A Wiegand reader
        has no display: `text` is ignored."""
        if self.indicator is not None:
            self.indicator.show(what)


__all__ = ["TIMER_SLACK_S", "WiegandReader"]
