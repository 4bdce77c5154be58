"""The event upload: the journal (`Outbox`) sent in order on the events topic, released only by the cloud's
signed acknowledgements (go-back-N).

`window` batches go ahead of the acknowledgements; after a reconnect, an ack timeout or a duplicate
acknowledgement while batches are in flight (the cloud lacks what follows it), the upload starts again from the
last acknowledged sequence number (`EventUpload._go_back`, the one place that does it). An acknowledgement
releases only events actually sent, and its clock is passed on (`on_cloud_time`) only when it answers a batch
of this process (`ref`), with the round trip measured.

The priority lane: an urgent event (`alarm.duress`, `EventUpload.urgent`) is published at once as a batch of
its own marked `priority`, ahead of every older event still unsent or unacknowledged (and, while the link is
down, first thing after it is up again). It stays in the journal too and travels again in order; the cloud
de-duplicates on the event id. The lane is memory only: after a restart the event goes in journal order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable

import aiomqtt

from cloud_bridge import mqtt
from cloud_bridge.protocol import Encoding, EventAck, EventBatch, ProtocolError, Signed, decode_event_ack, encode
from cloud_bridge.settings import LinkConfig
from cloud_bridge.signing import CommandRejected
from cloud_bridge.topics import Leaf
from edge.events import Event

from .gate import SiteKeys
from .ports import Outbox
from .reply import Replies, decode_off_loop

log = logging.getLogger("cloud_bridge.link")

#: Urgent events held for the priority lane at most (while the link is down).
PRIORITY_LANE = 64
#: How often an idle upload (nothing to send, nothing in flight) looks at the journal without being woken
#: (every durable event, urgent event and ack wakes it): a safety net, not the path events take.
IDLE_LOOK_S = 30.0


def split_events(
    events: list[Event], prev_seq: int, max_bytes: int, encoding: Encoding
) -> list[tuple[EventBatch, bytes]]:
    """Encode events read after `prev_seq` into batches that each fit in `max_bytes` (halving a batch that
    does not fit)."""
    out: list[tuple[EventBatch, bytes]] = []
    todo = [events]
    while todo:
        part = todo.pop(0)
        prev = out[-1][0].last_seq if out else prev_seq
        b = EventBatch(first_seq=part[0].seq, last_seq=part[-1].seq, events=part, prev_seq=prev,
                       ref=os.urandom(8).hex())  # fmt: skip
        data = encode(b, encoding)
        if len(data) <= max_bytes or len(part) == 1:
            out.append((b, data))
        else:
            mid = len(part) // 2
            todo[:0] = [part[:mid], part[mid:]]
    return out


class EventUpload:
    """Sends the journal (`run`, one per connection) and takes the cloud's acknowledgements (`on_event_ack`)."""

    def __init__(self, cfg: LinkConfig, *, outbox: Outbox, keys: SiteKeys, replies: Replies) -> None:
        self.cfg = cfg
        self.outbox = outbox
        self.keys = keys
        self.replies = replies
        self.stats = replies.stats
        #: Called with (cloud UTC time, round trip s) from each timestamped event acknowledgement.
        self.on_cloud_time: list[Callable[[float, float], None]] = []
        self.sent_refs: dict[str, tuple[int, float]] = {}  # batch ref -> (last_seq, monotonic time sent)
        self._wake = asyncio.Event()
        self._acked = 0  # highest seq the cloud acknowledged (this process)
        self._sent = 0  # highest seq sent in the current round
        self._sent_max = 0  # highest seq ever sent by this process
        self._last_ack_at = 0.0
        self._last_rewind = 0.0
        self._rewind = False
        #: The priority lane: urgent events not yet sent ahead of the backlog (newest kept when it overflows).
        self._priority: list[Event] = []

    def urgent(self, ev: Event) -> None:
        """Send `ev` ahead of the backlog, now if connected, else first thing after the next connect."""
        self._priority.append(ev)
        del self._priority[:-PRIORITY_LANE]
        self._wake.set()

    async def _send_priority(self, client: aiomqtt.Client) -> None:
        """Publish the priority lane: each event as a one-event batch marked `priority`. Its `prev_seq` is the
        event's own seq - 1, which is true of any batch of one event (so a cloud that ignores `priority` still
        knows nothing more than it does); it is never acknowledged. An event the cloud already acknowledged
        in order is not sent again."""
        while self._priority:
            ev = self._priority[0]
            if ev.seq > self._acked:
                b = EventBatch(first_seq=ev.seq, last_seq=ev.seq, events=[ev], prev_seq=ev.seq - 1, priority=True)
                await mqtt.publish(client, self.replies.topics.events, encode(b, self.cfg.encoding))
                self.stats["priority_sent"] = self.stats.get("priority_sent", 0) + 1
            self._priority.pop(0)

    def wake(self) -> None:
        """New events are durable (the outbox's `on_durable`)."""
        self._wake.set()

    async def on_event_ack(self, payload: bytes) -> None:
        """Only a signed acknowledgement releases events, and only those actually sent; its clock is used
        only when it answers a batch sent by this process (`ref`), with the round trip measured."""
        too_large = self.replies.too_large(payload)  # unread: even the depth check of 16 MB held the loop
        if too_large is not None:
            self.replies.refused(Leaf.EVENTS_ACK, "too_large", None, too_large.message)
            return
        try:
            msg = await decode_off_loop(decode_event_ack, payload)
            if not isinstance(msg, Signed):
                raise CommandRejected("unsigned", "events_ack must be signed (inside 'signed')")
            p = self.keys.open(msg)
            if not isinstance(p.msg, EventAck):
                raise CommandRejected("malformed", f"{type(p.msg).__struct_config__.tag} on events/ack")
        except ProtocolError as e:
            self.replies.refused(Leaf.EVENTS_ACK, "malformed", None, str(e))
            return
        except CommandRejected as e:
            self.replies.refused(Leaf.EVENTS_ACK, e.code, None, str(e))
            return
        ack = p.msg
        sent = self.sent_refs.pop(ack.ref, None) if ack.ref else None
        if ack.ts is not None and sent is not None and sent[0] <= ack.upto_seq:
            rtt = time.monotonic() - sent[1]
            for cb in self.on_cloud_time:
                cb(ack.ts, rtt)
        for ref in [r for r, (last, _t) in self.sent_refs.items() if last <= ack.upto_seq]:
            del self.sent_refs[ref]
        upto = min(ack.upto_seq, self._sent_max)
        if upto <= self._acked:
            # A duplicate acknowledgement while batches are in flight: the cloud lacks what follows it (it
            # reconnected, or a batch was lost). Go back to it now rather than after ack_timeout_s, at most
            # once a second so that the batches of the previous round still arriving do not cause a storm.
            now = time.monotonic()
            if self._sent > self._acked and now - self._last_rewind > 1.0:
                self._last_rewind = now
                self._rewind = True
                self._wake.set()
            return
        await self.outbox.ack(upto)
        self._acked = upto
        self._last_ack_at = time.monotonic()
        self._wake.set()

    async def _woken(self, timeout_s: float) -> None:
        """Wait for `wake` (or an acknowledgement), at most `timeout_s`. Not `asyncio.wait_for`: on Python 3.11
        it swallows a cancellation that comes while the event is being set, and the upload then never stops (the
        link's task hung at shutdown)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._wake.wait()

    def _overdue(self) -> bool:
        return time.monotonic() - self._last_ack_at > self.cfg.ack_timeout_s

    def _go_back(self, inflight: list[int], why: str | None = None) -> None:
        """Go-back-N: forget what is in flight and send again from the last acknowledged seq."""
        if why is not None:
            log.info("%s: resending from seq %d", why, self._acked)
        self.stats["resends"] += 1
        self._sent = self._acked
        inflight.clear()
        self._last_ack_at = time.monotonic()

    async def run(self, client: aiomqtt.Client) -> None:
        """Send the journal in order, `window` batches ahead of the acknowledgements; after a reconnect
        or an ack timeout, start again from the last acknowledged sequence number (go-back-N)."""
        cfg = self.cfg
        self._sent = self._acked
        inflight: list[int] = []  # last_seq of batches sent and not yet acknowledged
        self._last_ack_at = time.monotonic()
        timeout = f"no event ack for {cfg.ack_timeout_s:.0f} s"
        while True:
            self._wake.clear()
            await self._send_priority(client)
            if self._rewind:
                self._rewind = False
                self._go_back(inflight)
            inflight = [s for s in inflight if s > self._acked]
            if len(inflight) >= cfg.window:
                if self._overdue():
                    self._go_back(inflight, timeout)
                    continue
                await self._woken(cfg.ack_timeout_s / 4)
                continue
            events = await self.outbox.read(self._sent, cfg.batch_events)
            if not events:
                if inflight and self._overdue():
                    self._go_back(inflight, timeout)
                    continue
                # in flight: look again for an overdue ack; else nothing to do until woken (a new event, an
                # urgent one, an ack), with a slow look at the journal anyway
                await self._woken(cfg.ack_timeout_s / 4 if inflight else max(cfg.ack_timeout_s / 4, IDLE_LOOK_S))
                continue
            if not inflight:
                self._last_ack_at = time.monotonic()
            for batch, data in split_events(events, self._sent, cfg.max_message_bytes, cfg.encoding):
                await self._send_priority(client)  # an alarm raised meanwhile goes before the next batch
                await mqtt.publish(client, self.replies.topics.events, data)
                inflight.append(batch.last_seq)
                self.sent_refs[batch.ref] = (batch.last_seq, time.monotonic())
                while len(self.sent_refs) > 4 * cfg.window + 16:  # answers that never came
                    del self.sent_refs[next(iter(self.sent_refs))]
                self._sent = batch.last_seq
                self._sent_max = max(self._sent_max, batch.last_seq)
                self.stats["events_sent"] += len(batch.events)
                self.stats["batches_sent"] += 1
