"""The publisher's in-flight window (pure, no I/O): which gateways to send their pending change set to now.

A gateway is *in flight* from the send of its pending change set until its result acknowledges that version;
at most `size` gateways are in flight at once (None or 0: no limit, every pending gateway at once). The others
wait in a queue, oldest first: in the order they became pending in this publisher (a gateway whose next
version became pending when its previous one was acknowledged joins at the back). An acknowledgement frees the
slot for the head of the queue.

An in-flight gateway is resent its change set every `resend_s` in its slot (a resend counts against the window
like a first send). A gateway that does not answer within `tries` sends gives its slot up and goes to the back
of the queue (`released`): it is not dropped, it gets another slot on its next turn, so gateways that never
answer slow the others (each holds a slot for `tries * resend_s` per turn) but never stop them, even when
there are more of them than slots. A birth from such a released gateway puts it at the head of the queue
(`expedite`), and a birth from an in-flight gateway makes its resend due at once (in its slot, which it still
gives up `resend_s` after that send if no answer comes). Without a limit nothing is ever released: every
pending gateway is resent every `resend_s`, as before the window existed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass
class Slot:
    version: int
    #: monotonic time of the newest send in this slot
    last: float
    #: sends in this slot (the first one and the resends)
    tries: int


@dataclass(frozen=True)
class Send:
    gateway: str
    version: int
    #: this gateway was already sent this version (a resend, in this slot or an earlier one)
    resend: bool


class SendWindow:
    """`sync(pending)` after the pending change sets were (re)loaded, `settle(gw, version)` after one gateway's
    changed (an acknowledgement), then `due(now)`: the sends to make now. Every call costs what changed (and
    `due` the slots), never the number of gateways pending: a publisher of thousands calls `settle` and `due`
    once per acknowledgement."""

    def __init__(self, size: int | None, *, resend_s: float, tries: int = 3) -> None:
        if size is not None and size < 0:
            raise ValueError(f"window size {size} < 0")
        if tries < 1:
            raise ValueError(f"tries {tries} < 1")
        #: None: no limit
        self.size = size or None
        self.resend_s = resend_s
        self.tries = tries
        self.slots: dict[str, Slot] = {}  # in the order the slots were taken
        self._queue: dict[str, None] = {}  # an ordered set: insertion order is the waiting order
        self._version: dict[str, int] = {}  # gateway -> the version to send it now
        self._sent: dict[str, int] = {}  # gateway -> the newest version ever sent to it
        # queued gateways not yet counted in `deferred` (joined the queue since the last `due`; the others in
        # the queue were counted for this wait)
        self._uncounted: dict[str, None] = {}
        self._released: set[str] = set()  # queued gateways that gave a slot up
        #: the most gateways in flight at once
        self.peak = 0
        #: waits for a slot: a gateway ready to be sent found the window full (once per wait)
        self.deferred = 0
        #: slots given up by gateways that did not answer within `tries` sends
        self.released = 0

    @property
    def in_flight(self) -> int:
        return len(self.slots)

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def sync(self, pending: Mapping[str, int]) -> None:
        """`pending`: gateway -> the version it is to be sent now (its oldest unacknowledged change set), for
        every gateway with something pending, in the order they are to join the queue; any other gateway is
        done (acknowledged) and leaves its slot or the queue."""
        for gw, slot in list(self.slots.items()):
            v = pending.get(gw)
            if v != slot.version:  # acknowledged: the slot is free
                del self.slots[gw]
                if v is not None:  # and its next version waits at the back
                    self._enqueue(gw)
        for gw in [g for g in self._queue if g not in pending]:
            self._dequeue(gw)
        for gw in pending:
            if gw not in self.slots and gw not in self._queue:
                self._enqueue(gw)
        self._version = dict(pending)
        for gw in [g for g in self._sent if g not in pending]:
            del self._sent[gw]

    def settle(self, gw: str, version: int | None) -> None:
        """One gateway's pending version is now `version` (None: nothing pending, it is done): what `sync`
        does for that gateway alone, the others untouched."""
        slot = self.slots.get(gw)
        if slot is not None and slot.version != version:  # acknowledged: the slot is free
            del self.slots[gw]
            if version is not None:  # and its next version waits at the back
                self._enqueue(gw)
        elif slot is None:
            if version is None:
                if gw in self._queue:
                    self._dequeue(gw)
            elif gw not in self._queue:
                self._enqueue(gw)
        if version is None:
            self._version.pop(gw, None)
            self._sent.pop(gw, None)
        else:
            self._version[gw] = version

    def due(self, now: float) -> list[Send]:
        """The sends to make now (resends in their slots first, then new slots in queue order), recorded as
        made at `now`."""
        out: list[Send] = []
        for gw, slot in list(self.slots.items()):
            if now - slot.last < self.resend_s:
                continue
            if self.size is not None and slot.tries >= self.tries:
                del self.slots[gw]  # no answer: to the back of the queue
                self._enqueue(gw)
                self._released.add(gw)
                self.released += 1
                continue
            slot.last = now
            slot.tries += 1
            out.append(Send(gw, slot.version, True))
        while self._queue and (self.size is None or len(self.slots) < self.size):
            gw = next(iter(self._queue))
            self._dequeue(gw)
            v = self._version[gw]
            self.slots[gw] = Slot(v, now, 1)
            out.append(Send(gw, v, self._sent.get(gw) == v))
            self._sent[gw] = v
        if self._queue:  # the window is full: whoever is left waits (counted once per wait)
            self.deferred += len(self._uncounted)
            self._uncounted.clear()
        self.peak = max(self.peak, len(self.slots))
        return out

    def expedite(self, gw: str) -> None:
        """`gw` came online (a new birth): its resend is due now if it is in flight; if it gave its slot up
        earlier, it moves to the head of the queue."""
        slot = self.slots.get(gw)
        if slot is not None:
            slot.last = float("-inf")
            slot.tries = min(slot.tries, self.tries - 1)  # one resend now, not a release
        elif gw in self._released and gw in self._queue:
            del self._queue[gw]
            self._queue = {gw: None, **self._queue}  # (a birth of a released gateway: rare)

    def reset(self) -> None:
        """Every in-flight gateway's resend is due now, with a full slot's tries again (a push)."""
        for slot in self.slots.values():
            slot.last = float("-inf")
            slot.tries = 0

    def _enqueue(self, gw: str) -> None:
        self._queue[gw] = None
        self._uncounted[gw] = None

    def _dequeue(self, gw: str) -> None:
        del self._queue[gw]
        self._uncounted.pop(gw, None)
        self._released.discard(gw)
