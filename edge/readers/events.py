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


class ReaderFault(msgspec.Struct, frozen=True, kw_only=True):
    """Something on the wire that is not a valid read: never turns into a decision."""

    reader: str
    kind: str  # "parity", "length", "noise", "stuck_line", "partial", "crc", "mac", "handshake", "cut", ...
    detail: str = ""
    at: float = 0.0


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


ReaderEvent = CardRead | PinEntry | ReaderFault | ReaderStatus
ReaderSink = Callable[[ReaderEvent], None]


class Feedback(enum.StrEnum):
    GRANTED = "granted"
    DENIED = "denied"
    PIN_NEEDED = "pin_needed"
    ALARM = "alarm"
    IDLE = "idle"


__all__ = [
    "CardRead",
    "Feedback",
    "PinEntry",
    "ReadCut",
    "ReaderEvent",
    "ReaderFault",
    "ReaderSink",
    "ReaderStatus",
]
