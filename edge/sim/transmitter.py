"""The simulator's Wiegand reader: `WiegandTransmitter` pulls D0/D1 low and high on `VirtualClockFactory` pins
with realistic pulse widths, stamping every edge with an exact "kernel" timestamp (see edge.sim.pins), either
all at once (tests, benchmarks: `send_now`) or paced in real time by a worker thread (the simulated gateway:
`send`).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Collection

from gpiozero.pins.mock import MockPin

from edge.sim.pins import VirtualClockFactory


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
        with self.factory.frozen():  # both edges stamped exactly, however long the callbacks take
            t = self.factory.set_ticks(t)
            if self._held[line]:
                return t  # a line held low cannot pulse
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
        after that bit (a pulse picked up between two bits). The clock is held still while the frame is
        sent (`VirtualClockFactory.frozen`): the timestamps are exact however slowly this code runs.
        """
        with self.factory.frozen() as start_t:
            t = end = start_t
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


__all__ = ["WiegandTransmitter"]
