"""The reader seam: what every kind of card reader (Wiegand, OSDP, virtual) gives the agent.

A reader turns wire traffic into `ReaderEvent`s and hands each one to a synchronous `sink` on the
event-loop thread, in the same loop turn that completed it: the sink decides and drives the relay at
once (the tap path never waits on a queue, a disk or the network). Feedback (LED, beeper, text) goes
the other way through `feedback()`, which never blocks.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Callable
from types import TracebackType
from typing import Self

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
    kind: str  # "parity", "length", "noise", "stuck_line", "partial", "crc", "mac", "handshake", ...
    detail: str = ""
    at: float = 0.0


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


class Reader(abc.ABC):
    """Base of every reader driver. Use as `async with reader: await reader.run()`."""

    kind: str = "abstract"

    def __init__(self, name: str, sink: ReaderSink) -> None:
        self.name = name
        self.sink = sink

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None

    @abc.abstractmethod
    async def run(self) -> None:
        """Serve the reader until cancelled (poll loops, watchdogs). Raises on a fatal fault."""

    @abc.abstractmethod
    def feedback(self, what: Feedback, *, text: str | None = None) -> None:
        """Show a result on the reader (LED, beeper, display). Must not block."""
