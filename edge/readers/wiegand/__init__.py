"""Wiegand readers on two GPIO lines: the pure frame assembler (`frame`) and the gpiozero driver (`reader`).

The simulator's pins and transmitter live in edge.sim (edge.sim.pins, edge.sim.transmitter).
"""

from __future__ import annotations

from edge.readers.events import CardRead, PinEntry
from edge.readers.wiegand.frame import D0, D1, FrameTiming, KeypadOptions, WiegandAssembler
from edge.readers.wiegand.reader import TIMER_SLACK_S, WiegandReader

__all__ = [
    "D0",
    "D1",
    "TIMER_SLACK_S",
    "CardRead",
    "FrameTiming",
    "KeypadOptions",
    "PinEntry",
    "WiegandAssembler",
    "WiegandReader",
]
