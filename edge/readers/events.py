"""What readers report and what they are asked to show: the reader events and the feedback words (pure).

A reader turns wire traffic into `ReaderEvent`s and hands each one to a synchronous `ReaderSink` on the
event-loop thread, in the same loop turn that completed it. The other way, `Feedback` says what a reader
must show (LED, beeper, text); the agent decides it in one place for every reader kind.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

import msgspec


class CardRead(msgspec.Struct, frozen=True, kw_only=True):
    reader: str
    card: int
    format: str  # e.g. "h10301", "h10304", "csn32", or a format declared in config
    bits: int
    facility: int | None = None
    #: Monotonic time (s) of the last bit/byte of the read, from the driver's own timestamps.
    at: float = 0.0


class PinEntry(msgspec.Struct, frozen=True, kw_only=True):
    """A completed PIN entry on a reader's keypad. Never log `pin`."""

    reader: str
    pin: str
    at: float = 0.0

    def __repr__(self) -> str:
        return f"PinEntry(reader={self.reader!r}, pin=<{len(self.pin)} digits>)"


class KeyPressed(msgspec.Struct, frozen=True, kw_only=True):
    """A key pressed on a reader's keypad, masked: `key` is "digit" for 0-9 (which digit never leaves the PIN
    pad), "*" or "#". Not a `ReaderEvent`: the tap path never sees it; a `PinPad`'s `on_key` listener hands it
    to the installer's feed. `at` is the time the PIN pad was given (the reader driver's clock)."""

    reader: str
    key: str
    at: float = 0.0


class ReaderFault(msgspec.Struct, frozen=True, kw_only=True):
    """Something on the wire that is not a valid read: never turns into a decision."""

    reader: str
    kind: str  # "parity", "length", "noise", "stuck_line", "partial", "crc", "mac", "handshake", "cut", ...
    detail: str = ""
    at: float = 0.0
    #: The refused frame as sent, first bit first ("0"/"1"; its length is the bit count), at most
    #: `FAULT_BITS_MAX` of them (see `raw_bits`); "" when the fault is not one frame (a stuck line, a PIN
    #: timeout, a key burst: a keypad's bits would be its digit) or the reader kind has no bits.
    bits: str = ""


#: The most bits a `ReaderFault` carries (the Wiegand assembler's default `max_bits`).
FAULT_BITS_MAX = 128


def raw_bits(bits: int, nbits: int) -> str:
    """A frame of `nbits` bits as a `ReaderFault.bits` string: its first `FAULT_BITS_MAX` bits."""
    if nbits <= 0:
        return ""
    text = format(bits & ((1 << nbits) - 1), f"0{nbits}b")
    return text[:FAULT_BITS_MAX]


class ReadCut(ReaderFault, frozen=True, kw_only=True):
    """The last `CardRead` of this reader was the head of a longer frame (its last edges came late): what
    was decided on it must be taken back. The whole frame follows as a read of its own. A `ReaderFault`
    of kind "cut", so that a sink may match either the type or the kind."""

    kind: str = "cut"


class ReaderStatus(msgspec.Struct, frozen=True, kw_only=True):
    reader: str
    online: bool
    tamper: bool | None = None
    power_ok: bool | None = None
    secure: bool | None = None
    detail: str = ""


class InputsChanged(msgspec.Struct, frozen=True, kw_only=True):
    """A reader's inputs (door contact, REX, ... wired to an OSDP reader: osdp_ISTATR), one state each
    (0 = inactive, 1 = active); `changed` are the inputs that moved (every one at the first report)."""

    reader: str
    states: tuple[int, ...]
    changed: tuple[int, ...] = ()
    at: float = 0.0


class OutputsChanged(msgspec.Struct, frozen=True, kw_only=True):
    """A reader's outputs (an aux relay: osdp_OSTATR), one state each (0 = off, 1 = on)."""

    reader: str
    states: tuple[int, ...]
    changed: tuple[int, ...] = ()
    at: float = 0.0


class TamperChanged(msgspec.Struct, frozen=True, kw_only=True):
    """A reader's tamper switch moved (osdp_LSTATR)."""

    reader: str
    tamper: bool
    at: float = 0.0


class PowerChanged(msgspec.Struct, frozen=True, kw_only=True):
    """A reader's power supply failed or came back (osdp_LSTATR)."""

    reader: str
    power_ok: bool
    at: float = 0.0


#: Reader I/O: what a reader reports besides credentials and its own health.
ReaderIoEvent = InputsChanged | OutputsChanged | TamperChanged | PowerChanged
ReaderEvent = CardRead | PinEntry | ReaderFault | ReaderStatus | InputsChanged | OutputsChanged | TamperChanged \
    | PowerChanged
ReaderSink = Callable[[ReaderEvent], None]


class Feedback(enum.StrEnum):
    GRANTED = "granted"
    DENIED = "denied"
    PIN_NEEDED = "pin_needed"
    ALARM = "alarm"
    IDLE = "idle"


__all__ = [
    "FAULT_BITS_MAX",
    "CardRead",
    "Feedback",
    "InputsChanged",
    "KeyPressed",
    "OutputsChanged",
    "PinEntry",
    "PowerChanged",
    "ReadCut",
    "ReaderEvent",
    "ReaderFault",
    "ReaderIoEvent",
    "ReaderSink",
    "ReaderStatus",
    "TamperChanged",
    "raw_bits",
]
