"""Wiegand readers on two GPIO lines: the pure frame assembler (`frame`) and the gpiozero driver (`reader`).

The simulator's pins and transmitter live in edge.sim (edge.sim.pins, edge.sim.transmitter). Their old
names here (`VirtualClockFactory`, `VirtualClockPin`, `WiegandTransmitter`) still resolve, by name at run
time, for code not yet moved: a production module never imports the simulator.
"""

from __future__ import annotations

import importlib
from typing import Any

from edge.readers.events import CardRead, PinEntry
from edge.readers.wiegand.frame import D0, D1, FrameTiming, KeypadOptions, WiegandAssembler
from edge.readers.wiegand.reader import TIMER_SLACK_S, WiegandReader

#: Old names of the simulator's parts, resolved on first use (a table of names, not an import).
_MOVED = {
    "VirtualClockFactory": "edge.sim.pins",
    "VirtualClockPin": "edge.sim.pins",
    "WiegandTransmitter": "edge.sim.transmitter",
}


def __getattr__(name: str) -> Any:
    module = _MOVED.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


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
