"""The reader seam: what every kind of card reader (Wiegand, OSDP, virtual) gives the agent.

A reader turns wire traffic into `ReaderEvent`s (edge.readers.events) and hands each one to a synchronous
`sink` on the event-loop thread, in the same loop turn that completed it: the sink decides and drives the
relay at once (the tap path never waits on a queue, a disk or the network). Feedback (LED, beeper, text)
goes the other way through `feedback()`, which never blocks. Backends are chosen by name:
edge.readers.registry.
"""

from __future__ import annotations

import abc
from types import TracebackType
from typing import Protocol, Self

from edge.readers.events import (
    CardRead,
    Feedback,
    PinEntry,
    ReadCut,
    ReaderEvent,
    ReaderFault,
    ReaderSink,
    ReaderStatus,
)


class FeedbackPlayer(Protocol):
    """What plays a `Feedback` on LED and beeper lines (edge.door.indicator.Indicator). Must not block."""

    def show(self, what: Feedback) -> None: ...


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


__all__ = [
    "CardRead",
    "Feedback",
    "FeedbackPlayer",
    "PinEntry",
    "ReadCut",
    "Reader",
    "ReaderEvent",
    "ReaderFault",
    "ReaderSink",
    "ReaderStatus",
]
