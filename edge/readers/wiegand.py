"""Wiegand readers on two GPIO lines: a pure frame assembler, the gpiozero driver and a transmitter.

Wire: D0 and D1 idle high (pulled up); the reader sends a 0 as a short low pulse on D0 and a 1 as one on
D1 (pulses 20-100 us, 200 us to 20 ms apart), first bit first. A frame ends when the lines stay quiet.

`WiegandAssembler` is the pure core. It is fed edges `(timestamp, line, level)` with the timestamps the
kernel put on them (never the time a callback woke up) and `poll(now)` when the clock has reached its
`deadline`; both return the `ReaderEvent`s completed by then.

End of frame (the silence after the last edge that closes a frame) is adaptive by default:
`clamp(k * median bit interval, floor_s, ceiling_s)` with k = 2.5, floor 1.5 ms, ceiling 50 ms.
Readers clock their bits from a crystal, so the intervals of one frame are regular (a few % of jitter):
a silence of 2.5 median intervals is a missing bit 1.5 intervals overdue, which no reader does inside a
frame, while it costs only 3.75 ms after the last bit at the common 1.5 ms spacing (k = 8 cost 12 ms).
The median (not the mean or the minimum) keeps one noise pulse or one late bit from moving the estimate;
the floor (15x the longest 100 us pulse) covers fast 200 us spacing, where 2.5 intervals would be shorter
than a pulse is wide plus the GPIO driver's timestamp granularity; the ceiling bounds the wait at slow
spacing (2.5 x 20 ms, the slowest the spec allows). A frame is never completed before that silence, even
at the longest accepted length: a longer frame (a reader sending a format this one does not accept) must
be reported as "length", not read as a card made of its first bits. "fixed" mode waits a fixed 25 ms
(the classic approach, kept as the benchmark baseline).
Edges of one frame are sorted by timestamp before decoding, so edges of the two lines delivered out of
order (they come from two line requests) still assemble right.

Everything that is not a clean frame is a `ReaderFault` and never a `CardRead`:

* "noise": a pulse shorter than `glitch_s`, both lines low at once, a pulse still low when the frame ends,
  edges out of time order across a frame boundary;
* "parity" / "length" / "partial": from the card formats (a frame shorter than the longest accepted
  format is "partial", longer or in between lengths "length"), and a bad 8-bit key complement is "parity";
* "stuck_line": a line held low longer than `stuck_s` (reported once per low period);
* "bit_gap": an interval between two bits of >= `max_gap_ratio` (1.6) times the frame's median interval,
  what a lost pulse leaves (a crystal-clocked reader never pauses mid-frame); an interval of <= median /
  1.6, what a pulse picked up between two bits leaves, is "noise". Checked before the formats, so a frame
  one pulse short or long is a fault even if its length and parity fit another format.

A frame that begins less than `max(ceiling_s, fixed_gap_s)` after the end of a previous frame that was
not a card read (a fault or a key) is refused as "noise": noise can shrink the interval estimate and cut
a slow frame early, and its tail must not read as a shorter valid card (a pending PIN entry is dropped too).
A frame that ends as a fault, or as a 4/8-bit burst read as a key, is held for 150 ms before it counts
and reopened if edges that belong to it (by their timestamps) arrive late: when the thread that delivers
edges stalls after 4 bits of a card frame, the head reads as a key, and typing it would make the rest
"noise" and lose the tap (seen once in 300 taps under load before keys were held). A key reaching the
PIN pad 150 ms late is not noticeable; a card read is never held. Instead, the frame of the last card
read is kept until the next frame starts: an edge stamped inside its end-of-frame gap proves the read was
the head of a longer frame, so a "cut" fault is reported (the agent takes back the decision made on the
read) and the frame is reopened and read whole.

`WiegandReader` runs the assembler on gpiozero pins: the pin callback (lgpio's thread on a Pi) only does
`loop.call_soon_threadsafe(...)` with the edge's timestamp; an end-of-frame timer on the loop
(`loop.call_at`) calls `poll`, and events reach `sink` synchronously in that loop turn.

`VirtualClockFactory` + `WiegandTransmitter` are the simulator's side: a MockFactory whose `ticks()` is a
forward-only settable clock, so MockPins stamp edges with exact "kernel" timestamps, and a transmitter
that pulls the lines low and high with realistic pulse widths, either instantly (tests, benchmarks) or
paced in real time by a worker thread (the simulated gateway: see `WiegandTransmitter.send`).
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import logging
import math
import random
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from time import monotonic
from types import TracebackType
from typing import Any, Literal, Self

import msgspec
from gpiozero import InputDevice, OutputDevice
from gpiozero.pins.mock import MockFactory, MockPin, PinState

from edge.readers.base import (
    CardRead,
    Feedback,
    PinEntry,
    Reader,
    ReaderEvent,
    ReaderFault,
    ReaderSink,
)
from edge.readers.formats import Decoded, FormatTable
from edge.readers.keypad import KeyOrder, PinPad, decode_key4, decode_key8

log = logging.getLogger(__name__)

D0, D1 = 0, 1
#: How early the end-of-frame timer wakes the loop (epoll's 1 ms rounding), then sleeps the rest.
TIMER_SLACK_S = 0.001
_LINE = ("D0", "D1")
_NO_EVENTS: tuple[ReaderEvent, ...] = ()


class FrameTiming(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How the assembler cuts frames (seconds)."""

    mode: Literal["adaptive", "fixed"] = "adaptive"
    #: adaptive: a frame ends after max(k * median bit interval, floor_s), at most ceiling_s
    #: (see the module docstring for why 2.5 and 1.5 ms)
    k: float = 2.5
    floor_s: float = 0.0015
    ceiling_s: float = 0.05
    #: fixed: a frame ends after this long without an edge
    fixed_gap_s: float = 0.025
    #: pulses shorter than this are noise (only when rising edges are reported)
    glitch_s: float = 5e-6
    #: a line low for longer than this is stuck
    stuck_s: float = 1.0
    #: frames longer than this are cut off and reported as "length"
    max_bits: int = 128
    #: bit-start intervals shorter than this are noise, not samples of the bit spacing
    min_interval_s: float = 100e-6
    #: a frame with an interval between two bits >= this many times its median interval is missing a bit
    #: ("bit_gap"); one <= median / this has an extra pulse ("noise"). A lost pulse leaves 2x (1.73x with
    #: the simulator's +-0.2 ms jitter at 1.5 ms), the widest regular interval seen in the tests is 1.3x
    #: (+-30 % jitter): 1.6 sits between them. See `WiegandAssembler._irregular`.
    max_gap_ratio: float = 1.6

    def __post_init__(self) -> None:
        if not (0 < self.floor_s <= self.ceiling_s and self.k > 0 and self.fixed_gap_s > 0
                and self.glitch_s >= 0 and self.stuck_s > self.ceiling_s and self.max_bits >= 4
                and self.max_gap_ratio > 1):
            raise ValueError("invalid Wiegand frame timing")


class KeypadOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Keypad handling of one reader. 4-bit and 8-bit bursts are told apart by their length."""

    enabled: bool = True
    order: KeyOrder = "key_low"  # nibble order of 8-bit bursts (see edge.readers.keypad)
    timeout_s: float = 10.0
    max_digits: int = 12


@dataclass(frozen=True, slots=True)
class _Key:
    """A keypad burst, not yet given to the PIN pad."""

    key: int
    at: float


@dataclass(slots=True)
class _Held:
    """A frame that may have been cut short (a fault, or a 4/8-bit burst read as a key) waiting `hold_s`
    before it counts (it may still be reopened by late edges that belong to it)."""

    result: ReaderFault | _Key | CardRead  # a CardRead only in `_read` (already reported, never released)
    edges: list[tuple[float, int, bool]]
    intervals: list[float]
    last_ts: float
    last_fall: float
    gap: float
    start_low: tuple[bool, bool]
    tainted: float
    prev_end: float
    prev_bad: bool


class WiegandAssembler:
    """Pure Wiegand frame assembler and decoder for one reader (see the module docstring).

    `pulse_edges=True` means rising edges are reported too (edges "both"): pulse widths are checked,
    which catches glitches and stuck lines. With `pulse_edges=False` every edge is a bit start.
    """

    def __init__(
        self,
        reader: str,
        formats: FormatTable,
        *,
        timing: FrameTiming | None = None,
        keypad: KeypadOptions | None = None,
        pulse_edges: bool = True,
    ) -> None:
        self.reader = reader
        self.formats = formats
        self.timing = timing or FrameTiming()
        self.keypad = keypad or KeypadOptions()
        self.pinpad = PinPad(reader, timeout_s=self.keypad.timeout_s, max_digits=self.keypad.max_digits)
        self.pulse_edges = pulse_edges
        self._max_len = max(formats)
        # the current frame
        self._edges: list[tuple[float, int, bool]] = []
        self._intervals: list[float] = []  # sorted bit-start intervals of the frame
        self._last_ts = -math.inf  # latest edge timestamp of the frame
        self._last_fall = -math.inf
        self._gap = self.timing.ceiling_s
        self._start_low: tuple[bool, bool] = (False, False)
        # the previous frame: a frame that starts soon after a faulty one may be its cut-off tail
        self._prev_end = -math.inf
        self._prev_bad = False
        self._tainted = 0.0  # > 0: ms since the faulty frame before this one
        # A faulty frame is held back for `hold_s` before its fault is reported: if edges that belong to
        # it arrive late (their delivery thread was starved), the frame is reopened and completed.
        self._held: _Held | None = None
        self.hold_s = min(0.15, self.timing.stuck_s / 2)
        # The frame of the last card read, until the next frame starts: an edge stamped inside its end-of-
        # frame gap proves the read was cut short (its last edges were late): the frame is reopened.
        self._read: _Held | None = None
        # line levels, across frames (arrival order)
        self._low_since: list[float | None] = [None, None]
        self._stuck_reported = [False, False]
        self._clock = -math.inf  # latest time seen (edge or poll)

    # --- inputs ---------------------------------------------------------------------------------------

    @property
    def frame_open(self) -> bool:
        return bool(self._edges)

    def set_initial(self, ts: float, *, d0_high: bool, d1_high: bool) -> None:
        """The line levels read when the driver starts (a line low at start may be stuck)."""
        self._low_since = [None if d0_high else ts, None if d1_high else ts]
        self._clock = max(self._clock, ts)

    def edge(self, ts: float, line: int, level: bool = False) -> Sequence[ReaderEvent]:
        """One edge on `line` (D0 = 0, D1 = 1) at kernel time `ts`; `level` is the level after it."""
        out = self.poll(ts) if ts > self._clock else _NO_EVENTS
        read, self._read = self._read, None
        if not self._edges and read is not None and ts <= read.last_ts + read.gap:
            # An edge of the frame just read as a card: that read was the head of a longer frame whose last
            # edges came late. Say so (the decision made on it is taken back), and read the whole frame.
            assert isinstance(read.result, CardRead)
            self._reopen(read)
            why = f"late edges: the {read.result.bits}-bit read before was the head of a longer frame"
            out = [*out, ReaderFault(reader=self.reader, kind="cut", detail=why, at=ts)]
        held = self._held
        if not self._edges and held is not None:
            self._held = None
            if ts <= held.last_ts + held.gap:
                self._reopen(held)  # an edge of the held frame that arrived after its end was declared
            else:
                out = [*out, *self._release(held)]
        low_since = self._low_since
        if not self.pulse_edges:
            level = False
        elif level:
            if low_since[line] is None:
                return out  # a rise we never saw fall: nothing to time
            low_since[line] = None
            self._stuck_reported[line] = False
            if not self._edges:
                return out  # the end of a long low (stuck) period, not part of a frame
        if not self._edges:
            self._start_low = (low_since[0] is not None, low_since[1] is not None)
            since_prev = ts - self._prev_end
            window = max(self.timing.ceiling_s, self.timing.fixed_gap_s)
            self._tainted = max(since_prev * 1e3, 1e-3) if self._prev_bad and since_prev < window else 0.0
        if not level and self.pulse_edges and low_since[line] is None:
            low_since[line] = ts
        self._edges.append((ts, line, level))
        self._last_ts = max(self._last_ts, ts)
        if not level and ts > self._last_fall:
            if ts - self._last_fall >= self.timing.min_interval_s:
                bisect.insort(self._intervals, ts - self._last_fall)
                self._update_gap()
            self._last_fall = ts
        return out

    def _reopen(self, held: _Held) -> None:
        self._edges, self._intervals = held.edges, held.intervals
        self._last_ts, self._last_fall, self._gap = held.last_ts, held.last_fall, held.gap
        self._start_low = held.start_low
        self._tainted = held.tainted
        self._prev_end, self._prev_bad = held.prev_end, held.prev_bad

    def poll(self, now: float) -> Sequence[ReaderEvent]:
        """The clock reached `now` (kernel time domain) with no edge since the last one fed."""
        self._clock = max(self._clock, now)
        out: list[ReaderEvent] | None = None
        if self._edges and now > self._last_ts + self._gap:
            ev = self._finish()
            out = [ev] if ev is not None else []
        held = self._held
        if held is not None and now > held.result.at + self.hold_s:
            self._held = None
            out = [*self._release(held), *(out or ())]
        for line in (D0, D1):
            since = self._low_since[line]
            if since is not None and not self._stuck_reported[line] and now - since > self.timing.stuck_s:
                self._stuck_reported[line] = True
                fault = ReaderFault(reader=self.reader, kind="stuck_line",
                                    detail=f"{_LINE[line]} held low for more than {self.timing.stuck_s:g} s",
                                    at=now)
                out = [*(out or ()), fault]
        if self.pinpad.pending:
            stale = self.pinpad.expire(now)
            if stale is not None:
                out = [*(out or ()), stale]
        return out if out is not None else _NO_EVENTS

    @property
    def deadline(self) -> float | None:
        """The next time `poll` has something to do (kernel time domain), or None."""
        d = math.inf
        if self._edges:
            d = self._last_ts + self._gap
        if self._held is not None:
            d = min(d, self._held.result.at + self.hold_s)
        for line in (D0, D1):
            since = self._low_since[line]
            if since is not None and not self._stuck_reported[line]:
                d = min(d, since + self.timing.stuck_s)
        pin_d = self.pinpad.deadline
        if pin_d is not None:
            d = min(d, pin_d)
        # poll() needs now > deadline: add a microsecond
        return None if d == math.inf else d + 1e-6

    # --- frame decoding -------------------------------------------------------------------------------

    def _update_gap(self) -> None:
        t = self.timing
        if t.mode == "fixed":
            self._gap = t.fixed_gap_s
            return
        iv = self._intervals
        self._gap = min(max(t.k * iv[len(iv) // 2], t.floor_s), t.ceiling_s)

    def _reset_frame(self) -> None:
        self._edges = []
        self._intervals = []
        self._last_ts = -math.inf
        self._last_fall = -math.inf
        self._gap = self.timing.fixed_gap_s if self.timing.mode == "fixed" else self.timing.ceiling_s

    def _fault(self, kind: str, detail: str, at: float) -> ReaderFault:
        return ReaderFault(reader=self.reader, kind=kind, detail=detail, at=at)

    def _finish(self) -> ReaderEvent | None:
        at = self._last_ts
        held = _Held(
            result=ReaderFault(reader=self.reader, kind="", at=at), edges=list(self._edges),
            intervals=list(self._intervals), last_ts=self._last_ts, last_fall=self._last_fall, gap=self._gap,
            start_low=self._start_low, tainted=self._tainted, prev_end=self._prev_end, prev_bad=self._prev_bad,
        )  # fmt: skip
        ev = self._assemble()
        self._prev_end = at
        # anything but a card read (a fault, a key) may have been cut short: see `edge`
        self._prev_bad = not isinstance(ev, CardRead)
        if isinstance(ev, ReaderFault | _Key):
            held.result = ev
            self._held = held
            return None
        if isinstance(ev, CardRead):
            held.result = ev
            self._read = held
        return ev

    def _release(self, held: _Held) -> Sequence[ReaderEvent]:
        """The held frame stands: its fault is reported, or its key goes to the PIN pad."""
        if isinstance(held.result, ReaderFault):
            return (held.result,)
        assert isinstance(held.result, _Key)  # a card read is never held, only kept in `_read`
        ev = self.pinpad.key(held.result.key, held.result.at)
        return (ev,) if ev is not None else _NO_EVENTS

    def _assemble(self) -> ReaderEvent | _Key | None:
        edges = self._edges
        edges.sort(key=lambda e: e[0])
        at = self._last_ts
        self._reset_frame()
        glitch = self.timing.glitch_s
        low_at: list[float | None] = [
            -math.inf if self._start_low[0] else None,
            -math.inf if self._start_low[1] else None,
        ]
        bits = 0
        nbits = 0
        noise = ""
        for ts, line, level in edges:
            if level:
                fell = low_at[line]
                if fell is not None and ts - fell < glitch and not noise:
                    noise = f"{(ts - fell) * 1e6:.1f} us pulse on {_LINE[line]}"
                low_at[line] = None
            else:
                if low_at[line ^ 1] is not None and not noise:
                    noise = "both lines low at once"
                if low_at[line] is None and self.pulse_edges:
                    low_at[line] = ts
                bits = bits << 1 | line
                nbits += 1
        if not noise and self.pulse_edges:
            for line in (D0, D1):
                if low_at[line] is not None and self._low_since[line] is not None:
                    noise = f"{_LINE[line]} still low at the end of the frame"
        if noise:
            return self._fault("noise", f"{noise} ({nbits} bits)", at)
        if nbits > self.timing.max_bits:
            return self._fault("length", f"{nbits} bits: longer than any frame", at)
        if self._tainted:  # maybe the tail of a frame cut too early: never a read, never a key
            self.pinpad.clear()  # the key before may have been the head of this frame
            return self._fault("noise", f"{nbits} bits beginning {self._tainted:.1f} ms after a faulty frame",
                               at)
        irregular = self._irregular(edges)
        if irregular is not None:
            return self._fault(*irregular, at)
        return self._decode(bits, nbits, at)

    def _irregular(self, edges: list[tuple[float, int, bool]]) -> tuple[str, str] | None:
        """(kind, detail) if the bit spacing of a frame (its edges sorted) shows a missing or an extra bit.

        A reader clocks its bits from a crystal: every interval between two bit starts is the same to a
        few %. A dropped pulse leaves one interval of ~2x the median ("bit_gap"), an extra pulse between two
        bits splits one into two whose shorter is at most half of it ("noise"). Either way the bits are
        not the card's, and the frame is a fault even when its length and parity happen to fit a format
        (H10306 34 bits and Corporate 1000 35 bits are one pulse apart). Frames under 4 bits have too few
        intervals for a median; a missing or extra pulse at either end of a frame leaves no trace in the
        spacing at all (which is why no two default formats are one bit apart: docs/hardware.md).
        """
        falls = [ts for ts, _line, level in edges if not level]
        if len(falls) < 4:
            return None
        intervals = [b - a for a, b in itertools.pairwise(falls)]
        median = sorted(intervals)[len(intervals) // 2]
        ratio = self.timing.max_gap_ratio
        widest = max(range(len(intervals)), key=intervals.__getitem__)
        if intervals[widest] >= ratio * median:
            return ("bit_gap", f"{intervals[widest] * 1e3:.2f} ms between bits {widest + 1} and {widest + 2} "
                               f"({intervals[widest] / median:.1f}x the {median * 1e3:.2f} ms bit interval): "
                               f"a bit is missing ({len(falls)} bits)")
        narrowest = min(range(len(intervals)), key=intervals.__getitem__)
        if intervals[narrowest] * ratio <= median:
            return ("noise", f"extra pulse: {intervals[narrowest] * 1e3:.2f} ms between bits {narrowest + 1} "
                             f"and {narrowest + 2} in a frame clocked at {median * 1e3:.2f} ms ({len(falls)} bits)")
        return None

    def _decode(self, bits: int, nbits: int, at: float) -> ReaderEvent | _Key | None:
        fmt = self.formats.get(nbits)
        if fmt is not None:
            res = fmt.decode(bits, nbits)
            if isinstance(res, Decoded):
                return CardRead(reader=self.reader, card=res.card, format=res.format, bits=nbits,
                                facility=res.facility, at=at)
            return self._fault(res.kind, res.detail, at)
        if self.keypad.enabled and nbits in (4, 8):
            key = decode_key4(bits) if nbits == 4 else decode_key8(bits, self.keypad.order)
            if key is None:
                return self._fault("parity", f"invalid {nbits}-bit key code", at)
            # Held like a fault: the head of a card frame whose last edges are late reads as a key too.
            return _Key(key, at)
        kind = "partial" if nbits < self._max_len else "length"
        return self._fault(kind, f"{nbits} bits (accepted: {self.formats.names})", at)


# --- the gpiozero driver ---------------------------------------------------------------------------------

#: Output patterns: (led on, beeper on, seconds) steps, played once; the outputs end off.
PATTERNS: dict[Feedback, tuple[tuple[bool, bool, float], ...]] = {
    Feedback.GRANTED: ((True, True, 0.15), (True, False, 1.85)),
    Feedback.DENIED: ((False, True, 0.1), (False, False, 0.1)) * 3,
    Feedback.PIN_NEEDED: ((False, True, 0.05), *(((True, False, 0.25), (False, False, 0.25)) * 4)),
    Feedback.ALARM: ((True, True, 0.25), (False, False, 0.25)) * 10,
    Feedback.IDLE: (),
}


class WiegandReader(Reader):
    """A Wiegand reader on two GPIO inputs, with optional LED and beeper outputs.

    D0/D1 are gpiozero `InputDevice`s with the pull-up on, no debounce and edge detection on both
    edges; LED and beeper are `OutputDevice`s (active low by default, as reader control inputs are).
    `at` of the events it emits is loop time (`loop.time()`), mapped from the edge timestamps.
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
        led: int | str | None = None,
        beeper: int | str | None = None,
        outputs_active_high: bool = False,
        pin_factory: Any = None,
    ) -> None:
        super().__init__(name, sink)
        self.assembler = WiegandAssembler(name, formats, timing=timing, keypad=keypad)
        self._pins = (d0, d1, led, beeper)
        self._outputs_active_high = outputs_active_high
        self._factory = pin_factory
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inputs: list[Any] = []
        self._led: Any = None
        self._beeper: Any = None
        self._timer: asyncio.TimerHandle | None = None
        self._soon: asyncio.Handle | None = None  # a poll queued behind edges that arrived during a sleep
        self._offset = 0.0  # loop.time() - edge timestamp, minimum over the current frame
        self._feedback_task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        loop = asyncio.get_running_loop()
        self._loop = loop
        d0, d1, led, beeper = self._pins
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
            ah = self._outputs_active_high
            if led is not None:
                self._led = OutputDevice(led, active_high=ah, initial_value=False, pin_factory=self._factory)
            if beeper is not None:
                self._beeper = OutputDevice(beeper, active_high=ah, initial_value=False,
                                            pin_factory=self._factory)
        except BaseException:
            self._close()
            raise
        self._arm()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        task, self._feedback_task = self._feedback_task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
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
        for out in (self._led, self._beeper):
            if out is not None:
                out.off()
                out.close()
        self._led = self._beeper = None

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
        self._emit(self.assembler.edge(ticks, line, bool(state)))
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
        self._emit(self.assembler.poll(loop.time() - self._offset))
        self._arm()

    def _emit(self, events: Sequence[ReaderEvent]) -> None:
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
        """Play `what` on the LED and beeper (replacing whatever was playing). Never blocks."""
        loop = self._loop
        if loop is None or (self._led is None and self._beeper is None):
            return
        if self._feedback_task is not None:
            self._feedback_task.cancel()
            self._feedback_task = None
        self._set_outputs(False, False)
        steps = PATTERNS.get(what, ())
        if steps:
            self._feedback_task = loop.create_task(self._play(steps), name=f"reader[{self.name}].feedback")

    def _set_outputs(self, led: bool, beep: bool) -> None:
        if self._led is not None:
            self._led.value = led
        if self._beeper is not None:
            self._beeper.value = beep

    async def _play(self, steps: Sequence[tuple[bool, bool, float]]) -> None:
        try:
            for led, beep, seconds in steps:
                self._set_outputs(led, beep)
                await asyncio.sleep(seconds)
        finally:
            self._set_outputs(False, False)


# --- the simulator's side ----------------------------------------------------------------------------


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
    which lets a transmitter stamp each edge exactly where a real kernel timestamp would be.
    """

    def __init__(self, revision: str | None = None) -> None:
        self._skew = 0.0
        super().__init__(revision=revision, pin_class=VirtualClockPin)

    def ticks(self) -> float:
        return monotonic() + self._skew

    @staticmethod
    def ticks_diff(later: float, earlier: float) -> float:
        return later - earlier

    def set_ticks(self, t: float) -> float:
        """Move the clock forward to `t`; returns the clock's value afterwards."""
        now = monotonic()
        if t > now + self._skew:
            self._skew = t - now
        return now + self._skew


class WiegandTransmitter:
    """Sends Wiegand frames by driving MockPins low and high (the reader side of the wire).

    `send_now` stamps every edge at its exact virtual time in one go (tests, benchmarks); `send` paces
    the bits in real time from a worker thread (the simulated gateway). `jitter_s` varies each interval
    uniformly by +-jitter_s; `noise` is the chance, per bit, of an extra 1 us glitch pulse after it.
    """

    def __init__(
        self,
        factory: VirtualClockFactory,
        d0: int | str,
        d1: int | str,
        *,
        pulse_s: float = 50e-6,
        interval_s: float = 1.5e-3,
        jitter_s: float = 0.0,
        noise: float = 0.0,
        rng: random.Random | None = None,
    ) -> None:
        if not isinstance(factory, VirtualClockFactory):
            raise TypeError("WiegandTransmitter needs a VirtualClockFactory")
        if not 0 < pulse_s < interval_s:
            raise ValueError("need 0 < pulse_s < interval_s")
        self.factory = factory
        self.pins: tuple[MockPin, MockPin] = (factory.pin(d0), factory.pin(d1))
        self.pulse_s = pulse_s
        self.interval_s = interval_s
        self.jitter_s = jitter_s
        self.noise = noise
        self.rng = rng or random.Random()
        self._held = [False, False]

    def _pulse(self, line: int, t: float, width: float) -> float:
        pin = self.pins[line]
        t = self.factory.set_ticks(t)
        if self._held[line]:
            return t  # a line held low cannot pulse
        # Both edges stamped exactly (a 1 us glitch stays 1 us wide however long the callbacks take).
        pin.drive_at(False, t)
        self.factory.set_ticks(t + width)
        pin.drive_at(True, t + width)
        return t + width

    def _noise_after(self, t: float, interval: float) -> None:
        if self.noise and self.rng.random() < self.noise:
            self._pulse(self.rng.randrange(2), t + interval * self.rng.uniform(0.2, 0.8), 1e-6)

    def _interval(self, interval_s: float | None) -> float:
        iv = self.interval_s if interval_s is None else interval_s
        if self.jitter_s:
            iv += self.rng.uniform(-self.jitter_s, self.jitter_s)
        return max(iv, self.pulse_s * 2)

    def send_now(self, bits: int, nbits: int, *, interval_s: float | None = None, drop: Collection[int] = (),
                 extra: Collection[tuple[int, int]] = ()) -> float:
        """Send a frame with virtual timestamps, all at once; returns the time of its last edge.

        Faults of the wire, for tests: `drop` = positions (0 = first bit) whose pulse is lost (its time
        slot stays empty); `extra` = (position, line) pairs: a full-width pulse on `line` half an interval
        after that bit (a pulse picked up between two bits).
        """
        t = self.factory.ticks()
        end = t
        for i in range(nbits - 1, -1, -1):
            pos = nbits - 1 - i
            start = t
            if pos not in drop:
                end = self._pulse((bits >> i) & 1, start, self.pulse_s)
            iv = self._interval(interval_s)
            for where, line in extra:
                if where == pos:
                    end = self._pulse(line, start + iv / 2, self.pulse_s)
            if i:
                self._noise_after(start, iv)
            t = start + iv
        return end

    async def send(self, bits: int, nbits: int, *, interval_s: float | None = None) -> float:
        """Send a frame in real time (one bit per `interval_s`); returns the time of its last edge.

        A worker thread stands in for the reader and the kernel: it wakes at each bit's time and
        delivers the edges stamped with the time they are due (`VirtualClockPin.drive_at`), as GPIO
        drivers deliver kernel-timestamped edges. A busy event loop or GIL then delays the delivery of
        edges, as on real hardware, but never stretches a bit interval (pacing on the loop with
        asyncio.sleep did, which no reader does and a tight end-of-frame gap rightly refuses).
        Cancelling the await does not stop a frame half-way: it is sent whole.
        """
        return await asyncio.to_thread(self._send_paced, bits, nbits, interval_s)

    def _send_paced(self, bits: int, nbits: int, interval_s: float | None) -> float:
        factory = self.factory
        t = factory.ticks()  # when the current bit is due (the schedule never drifts with late wake-ups)
        end = t
        for i in range(nbits - 1, -1, -1):
            wait = t - factory.ticks()
            if wait > 0:
                time.sleep(wait)  # noqa: TID251 -- a worker thread standing in for the reader hardware
            line = (bits >> i) & 1
            if not self._held[line]:
                end = t + self.pulse_s
                self.pins[line].drive_at(False, t)
                self.pins[line].drive_at(True, end)
            t += self._interval(interval_s)
        return end

    def send_bitstring(self, text: str, *, interval_s: float | None = None) -> float:
        """`send_now` of a string of "0"/"1" (first character first)."""
        return self.send_now(int(text, 2), len(text), interval_s=interval_s)

    def glitch(self, line: int, *, width_s: float = 1e-6, after_s: float = 0.0) -> float:
        """A short noise pulse on `line`, `after_s` from now (virtual time)."""
        return self._pulse(line, self.factory.ticks() + after_s, width_s)

    def hold_low(self, line: int, *, after_s: float = 0.0) -> float:
        """Hold `line` low (a stuck line or a short to ground) until `release`; pulses on it are lost."""
        t = self.factory.set_ticks(self.factory.ticks() + after_s)
        self._held[line] = True
        self.pins[line].drive_low()
        return t

    def release(self, line: int, *, after_s: float = 0.0) -> float:
        t = self.factory.set_ticks(self.factory.ticks() + after_s)
        self._held[line] = False
        self.pins[line].drive_high()
        return t

    def idle(self, seconds: float) -> float:
        """Advance the virtual clock by `seconds` with the lines idle."""
        return self.factory.set_ticks(self.factory.ticks() + seconds)


__all__ = [
    "PATTERNS",
    "CardRead",
    "FrameTiming",
    "KeypadOptions",
    "PinEntry",
    "VirtualClockFactory",
    "VirtualClockPin",
    "WiegandAssembler",
    "WiegandReader",
    "WiegandTransmitter",
]

