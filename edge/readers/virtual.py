"""The virtual reader: a real `Reader` driven by an in-process feed instead of a wire (tests, the simulator).

What is fed goes the way a wire read goes: a card frame is decoded by the project's card formats
(edge.readers.formats, as an OSDP RAW read or a Wiegand frame is), keys go through the same `PinPad`, and every
event reaches the sink synchronously on the event-loop thread (from another thread, in the loop's next turn).
Feedback is recorded in `shown` and played by `indicator` (the door's LED/beeper player), if given.

    async with VirtualReader("front.virtual", sink, formats=FormatTable(["h10301"])) as r:
        r.card(4567, facility=123)   # -> CardRead(format="h10301", facility=123, card=4567)
        r.keys("1234#")              # -> PinEntry(pin="1234")
"""

from __future__ import annotations

import asyncio
import logging
import threading
from types import TracebackType
from typing import Self

from edge.readers.base import FeedbackPlayer, Reader
from edge.readers.events import (
    CardRead,
    Feedback,
    ReaderEvent,
    ReaderFault,
    ReaderSink,
    ReaderStatus,
)
from edge.readers.formats import FormatError, FormatTable, decode, encode
from edge.readers.keypad import KEY_CLEAR, KEY_ENTER, PinPad

log = logging.getLogger(__name__)

DEFAULT_FORMATS = ("h10301",)


class VirtualReader(Reader):
    kind = "virtual"

    def __init__(
        self,
        name: str,
        sink: ReaderSink,
        *,
        formats: FormatTable | None = None,
        pin_timeout_s: float = 10.0,
        indicator: FeedbackPlayer | None = None,
    ) -> None:
        super().__init__(name, sink)
        self.formats = formats if formats is not None else FormatTable(DEFAULT_FORMATS)
        self.pinpad = PinPad(name, timeout_s=pin_timeout_s)
        self.indicator = indicator
        #: Every feedback asked of this reader, oldest first: (what, text).
        self.shown: list[tuple[Feedback, str | None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: int | None = None
        self._closed: asyncio.Event | None = None

    def __repr__(self) -> str:
        return f"VirtualReader({self.name!r})"

    async def __aenter__(self) -> Self:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()
        self._closed = asyncio.Event()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._closed is not None:
            self._closed.set()
        self._loop = None
        self.pinpad.clear()

    @property
    def open(self) -> bool:
        return self._loop is not None

    async def run(self) -> None:
        if self._closed is None or self._loop is None:
            raise RuntimeError(f"reader {self.name}: use `async with reader:` before run()")
        await self._closed.wait()  # everything happens in the feed's calls; serve until closed or cancelled

    # --- the feed ----------------------------------------------------------------------------------------

    def frame(self, bits: int, nbits: int) -> None:
        """A card frame of `nbits` bits (first bit most significant), decoded by the accepted formats."""
        at = self._now()
        result = decode(bits, nbits, self.formats)
        if isinstance(result, FormatError):
            self._deliver(ReaderFault(reader=self.name, kind=result.kind, detail=result.detail, at=at))
        else:
            self._deliver(CardRead(reader=self.name, card=result.card, format=result.format, bits=result.nbits,
                                   facility=result.facility, at=at))  # fmt: skip

    def card(self, card: int, *, fmt: str | None = None, facility: int | None = None) -> None:
        """Present a card: encoded in `fmt` (default: the shortest accepted format), then read as a frame."""
        f = self.formats[min(self.formats)] if fmt is None else next(
            (f for f in self.formats.values() if f.name == fmt), None)  # fmt: skip
        if f is None:
            raise ValueError(f"reader {self.name}: does not accept format {fmt!r} (accepts {self.formats.names})")
        fac = facility if facility is not None else (0 if f.has_facility else None)
        self.frame(encode(f, fac, card), f.length)

    def keys(self, typed: str) -> None:
        """Keys pressed in order: digits, "*" (clear) and "#" (enter, which submits the PIN)."""
        codes = {"*": KEY_CLEAR, "#": KEY_ENTER}
        if any(not (c.isdigit() and c.isascii()) and c not in codes for c in typed):
            raise ValueError(f"reader {self.name}: keys must be digits, '*' or '#'")
        for c in typed:
            ev = self.pinpad.key(codes[c] if c in codes else int(c), self._now())
            if ev is not None:
                self._deliver(ev)

    def fault(self, kind: str, detail: str = "") -> None:
        """Something on the wire that is not a read (noise, a tamper, a lost handshake)."""
        self._deliver(ReaderFault(reader=self.name, kind=kind, detail=detail, at=self._now()))

    def status(self, *, online: bool, tamper: bool | None = None, power_ok: bool | None = None) -> None:
        self._deliver(ReaderStatus(reader=self.name, online=online, tamper=tamper, power_ok=power_ok))

    # --- feedback ----------------------------------------------------------------------------------------

    def feedback(self, what: Feedback, *, text: str | None = None) -> None:
        self.shown.append((what, text))
        if self.indicator is not None:
            self.indicator.show(what)

    # --- internals ---------------------------------------------------------------------------------------

    def _now(self) -> float:
        if self._loop is None:
            raise RuntimeError(f"reader {self.name}: not open (use `async with reader:`)")
        return self._loop.time()

    def _deliver(self, ev: ReaderEvent) -> None:
        loop = self._loop
        if loop is None:
            raise RuntimeError(f"reader {self.name}: not open (use `async with reader:`)")
        if threading.get_ident() == self._thread:
            self._call_sink(ev)
        else:
            loop.call_soon_threadsafe(self._call_sink, ev)

    def _call_sink(self, ev: ReaderEvent) -> None:
        try:
            self.sink(ev)
        except Exception:
            log.exception("reader %s: sink failed on a %s", self.name, type(ev).__name__)


__all__ = ["VirtualReader"]
