"""The pure Wiegand frame assembler and its timing (no I/O, no clock: every time is an argument).

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

Everything that is not a clean frame is a `ReaderFault` and never a `CardRead`; a fault of one frame carries
its bits (`ReaderFault.bits`, for the installer page), except a 4- or 8-bit burst (it may be a PIN digit):

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

The gpiozero/asyncio driver is `edge.readers.wiegand.reader.WiegandReader`; the simulator's pins and
transmitter are in `edge.sim`.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import msgspec

from edge.readers.events import CardRead, ReadCut, ReaderEvent, ReaderFault, raw_bits
from edge.readers.formats import Decoded, FormatTable
from edge.readers.keypad import KeyOrder, PinPad, decode_key4, decode_key8

D0, D1 = 0, 1
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
            out = [*out, ReadCut(reader=self.reader, detail=why, at=ts)]
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

    def _fault(self, kind: str, detail: str, at: float, frame: tuple[int, int] = (0, 0)) -> ReaderFault:
        """A fault; `frame` (bits, nbits) is the refused frame, carried as its bits for the installer."""
        return ReaderFault(reader=self.reader, kind=kind, detail=detail, at=at, bits=raw_bits(*frame))

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
            return self._fault("noise", f"{noise} ({nbits} bits)", at, self._frame(bits, nbits))
        if nbits > self.timing.max_bits:
            return self._fault("length", f"{nbits} bits: longer than any frame", at, self._frame(bits, nbits))
        if self._tainted:  # maybe the tail of a frame cut too early: never a read, never a key
            self.pinpad.clear()  # the key before may have been the head of this frame
            return self._fault("noise", f"{nbits} bits beginning {self._tainted:.1f} ms after a faulty frame",
                               at, self._frame(bits, nbits))
        irregular = self._irregular(edges)
        if irregular is not None:
            return self._fault(*irregular, at, self._frame(bits, nbits))
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
            return self._fault(res.kind, res.detail, at, (bits, nbits))
        if self.keypad.enabled and nbits in (4, 8):
            key = decode_key4(bits) if nbits == 4 else decode_key8(bits, self.keypad.order)
            if key is None:
                return self._fault("parity", f"invalid {nbits}-bit key code", at)
            # Held like a fault: the head of a card frame whose last edges are late reads as a key too.
            return _Key(key, at)
        kind = "partial" if nbits < self._max_len else "length"
        return self._fault(kind, f"{nbits} bits (accepted: {self.formats.names})", at, self._frame(bits, nbits))

    def _frame(self, bits: int, nbits: int) -> tuple[int, int]:
        """The frame to carry in a fault: none for a 4- or 8-bit burst that is not a configured format, keypad
        on or off (its bits may be a PIN digit, which never leaves the PIN pad)."""
        return (0, 0) if nbits in (4, 8) and self.formats.get(nbits) is None else (bits, nbits)


__all__ = ["D0", "D1", "FrameTiming", "KeypadOptions", "WiegandAssembler"]
