"""What the installer page and Home Assistant watch: the last journal events and the last reader events.

`Feed.event` is called by the journal for every event it records, `Feed.reader_event` by the agent after the
tap path has acted on a reader event; both only append to a bounded deque and hand the item to each
subscriber's bounded queue (a slow subscriber loses items, it never holds anything up). Readers of the feed
take snapshots (`list(feed.events)`) or subscribe (`with feed.subscribe() as q: await q.get()`).

A PIN entry is kept as its length only: the digits never leave the tap path. Key presses reach the feed from
the readers' PIN pads (`Feed.watch_keys` sets each pad's `on_key`), masked: a digit is "digit", only "*" and "#"
are shown; the tap path never sees them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import msgspec

from edge.events import Event
from edge.readers.events import KeyPressed, PinEntry, ReaderEvent
from edge.readers.keypad import PinPad

#: Journal events kept in memory for the pages (the journal itself drops what the cloud acknowledged).
EVENTS_KEPT = 1000
#: Reader events kept for the "present a card" view.
READS_KEPT = 100


class ReaderSeen(msgspec.Struct, frozen=True, kw_only=True):
    """One reader event as the installer sees it: when (agent clock), which door, and the event (a PIN entry
    reduced to its length, a key press masked)."""

    ts: float
    door: str | None
    event: ReaderEvent | KeyPressed
    pin_digits: int | None = None


class Feed:
    def __init__(self, clock: Callable[[], float], *, events: int = EVENTS_KEPT, reads: int = READS_KEPT) -> None:
        self._clock = clock
        self.events: deque[Event] = deque(maxlen=events)
        self.reads: deque[ReaderSeen] = deque(maxlen=reads)
        self._subscribers: set[asyncio.Queue[Any]] = set()
        #: Events dropped because a subscriber was not reading (all subscribers together).
        self.dropped = 0

    def event(self, ev: Event) -> None:
        """A journal event (`Journal.on_record`): never raises, never waits."""
        self.events.append(ev)
        self._hand_on(ev)

    def reader_event(self, ev: ReaderEvent, door: str | None) -> None:
        """A reader event, after the tap path acted on it."""
        if isinstance(ev, PinEntry):
            seen = ReaderSeen(ts=self._clock(), door=door, event=PinEntry(reader=ev.reader, pin="", at=ev.at),
                              pin_digits=len(ev.pin))  # fmt: skip
        else:
            seen = ReaderSeen(ts=self._clock(), door=door, event=ev)
        self.reads.append(seen)
        self._hand_on(seen)

    def key_pressed(self, ev: KeyPressed, door: str | None) -> None:
        """A key pressed on a reader's keypad (a `PinPad.on_key` listener): never raises, never waits."""
        key = ev.key if ev.key in ("*", "#") else "digit"  # masked again: nothing else may pass
        seen = ReaderSeen(ts=self._clock(), door=door, event=KeyPressed(reader=ev.reader, key=key, at=ev.at))
        self.reads.append(seen)
        self._hand_on(seen)

    def watch_keys(self, reader: object, door: str | None) -> bool:
        """Show the key presses of `reader` (its PIN pad: `reader.pinpad`, or a Wiegand reader's
        `reader.assembler.pinpad`) in the feed; False if it has none."""
        pad = getattr(reader, "pinpad", None)
        if not isinstance(pad, PinPad):
            pad = getattr(getattr(reader, "assembler", None), "pinpad", None)
        if not isinstance(pad, PinPad):
            return False
        pad.on_key = lambda ev: self.key_pressed(ev, door)
        return True

    def _hand_on(self, item: Event | ReaderSeen) -> None:
        for q in self._subscribers:
            try:
                q.put_nowait(item)
            except asyncio.QueueFull:
                self.dropped += 1

    @contextlib.contextmanager
    def subscribe(self, maxsize: int = 256, *, queue: asyncio.Queue[Any] | None = None) -> Iterator[asyncio.Queue[Any]]:
        """A queue that receives every event and reader event from now on (`queue`: one of the caller's, which
        may carry other items of its own too)."""
        q: asyncio.Queue[Any] = queue if queue is not None else asyncio.Queue(maxsize)
        self._subscribers.add(q)
        try:
            yield q
        finally:
            self._subscribers.discard(q)

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)


__all__ = ["EVENTS_KEPT", "READS_KEPT", "Feed", "ReaderSeen"]
