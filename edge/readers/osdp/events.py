"""Reader I/O as typed events: a reader's inputs (door contact, REX...), its outputs (an aux relay), its
tamper switch and its power. Delivered to `OsdpReader(io_sink=...)` in the loop turn that decoded them,
each only when the state changed (the first report of a state after a reader comes online counts).

These live in the OSDP package until the reader events have one home (edge/readers/events.py).
"""

from __future__ import annotations

import msgspec


class InputsChanged(msgspec.Struct, frozen=True, kw_only=True):
    """osdp_ISTATR: one state per input (0 = inactive, 1 = active); `changed` are the inputs that moved."""

    reader: str
    states: tuple[int, ...]
    changed: tuple[int, ...] = ()
    at: float = 0.0


class OutputsChanged(msgspec.Struct, frozen=True, kw_only=True):
    """osdp_OSTATR: one state per output (0 = off, 1 = on); `changed` are the outputs that moved."""

    reader: str
    states: tuple[int, ...]
    changed: tuple[int, ...] = ()
    at: float = 0.0


class TamperChanged(msgspec.Struct, frozen=True, kw_only=True):
    reader: str
    tamper: bool
    at: float = 0.0


class PowerChanged(msgspec.Struct, frozen=True, kw_only=True):
    reader: str
    power_ok: bool
    at: float = 0.0


ReaderIoEvent = InputsChanged | OutputsChanged | TamperChanged | PowerChanged
