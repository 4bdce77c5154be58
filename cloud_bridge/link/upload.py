"""The event upload: the journal (`Outbox`) sent in order on the events topic, released only by the cloud's
signed acknowledgements (go-back-N).

`window` batches go ahead of the acknowledgements; after a reconnect, an ack timeout or a duplicate
acknowledgement while batches are in flight (the cloud lacks what follows it), the upload starts again from the
last acknowledged sequence number (`EventUpload._go_back`, the one place that does it). An acknowledgement
releases only events actually sent, and its clock is passed on (`on_cloud_time`) only when it answers a batch
of this process (`ref`), with the round trip measured.

Congestion (as TCP does it): after an ack timeout only one batch goes ahead of the acknowledgements, one more
with each acknowledgement up to `window` (a connect starts with the whole window); each timeout in a row
doubles the wait (jittered, at most `ACK_TIMEOUT_MAX_FACTOR` x `ack_timeout_s`), and an acknowledgement or a
new connection brings it back. A fleet whose cloud is slow (a broker node died, the ingest is behind) then
sends its backlog once rather than a window of copies every `ack_timeout_s` (bench/fleet_cluster.py: with a
fixed timeout and the full window, a node kill made the ingest receive 375,810 events twice for 1,000,000).

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
import random
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
#: The longest wait for an acknowledgement, as a multiple of `ack_timeout_s` (the wait doubles per timeout in a row).
ACK_TIMEOUT_MAX_FACTOR = 8.0
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
        self._round_at = 0.0  # monotonic time the current round began (a connect, a go-back)
        #: Batches allowed ahead of the acknowledgements now (1 .. window) and the wait for one (s).
        self._cwnd = cfg.window
        self._ack_wait = cfg.ack_timeout_s
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
            # A repeated acknowledgement. It shows a gap only when it names a batch of the current round that
            # lies beyond it: the cloud received that batch and cannot join it to what it holds (a batch
            # before it was lost). Then go back now rather than after ack_timeout_s, at most once a second.
            # One that names a duplicate (a broker's redelivery, a batch already acknowledged, one sent before
            # the last go-back) shows nothing: going back on those fed a storm of resends after a broker node
            # died (each resend's duplicates were acknowledged again, and each such ack sent the window again).
            if not self._shows_gap(ack.ref, sent, ack.upto_seq):
                self.stats["repeated_acks"] += 1
                return
            now = time.monotonic()
            if self._sent > self._acked and now - self._last_rewind > 1.0:
                self._last_rewind = now
                self._rewind = True
                self._wake.set()
            return
        await self.outbox.ack(upto)
        self._acked = upto
        self._last_ack_at = time.monotonic()
        self._cwnd = min(self.cfg.window, self._cwnd + 1)
        self._ack_wait = self.cfg.ack_timeout_s
        self._wake.set()

    def _shows_gap(self, ref: str, sent: tuple[int, float] | None, upto_seq: int) -> bool:
        """Whether a repeated acknowledgement answering the batch `ref` (`sent`: its (last_seq, time sent), None
        when it is not one this upload is waiting for) shows that the cloud lacks events before that batch. An
        ack that names no batch (a cloud saying only "I hold up to here", e.g. when it connects) does."""
        if not ref:
            return True
        return sent is not None and sent[0] > upto_seq and sent[1] >= self._round_at

    async def _woken(self, timeout_s: float) -> None:
        """Wait for `wake` (or an acknowledgement), at most `timeout_s`. Not `asyncio.wait_for`: on Python 3.11
        it swallows a cancellation that comes while the event is being set, and the upload then never stops (the
        link's task hung at shutdown)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._wake.wait()

    def _overdue(self) -> bool:
        return time.monotonic() - self._last_ack_at > self._ack_wait

    def _timed_out(self, inflight: list[int]) -> None:
        """No acknowledgement within the wait: go back with one batch ahead, and wait twice as long next time."""
        log.info("no event ack for %.0f s: resending from seq %d", self._ack_wait, self._acked)
        self.stats["ack_timeouts"] += 1
        self._go_back(inflight)
        self._cwnd = 1
        cap = self.cfg.ack_timeout_s * ACK_TIMEOUT_MAX_FACTOR
        self._ack_wait = min(cap, self._ack_wait * 2 * random.uniform(1.0, 1.25))

    def _go_back(self, inflight: list[int]) -> None:
        """Go-back-N: forget what is in flight and send again from the last acknowledged seq."""
        self.stats["resends"] += 1
        self._sent = self._acked
        inflight.clear()
        self._last_ack_at = self._round_at = time.monotonic()

    async def run(self, client: aiomqtt.Client) -> None:
        """Send the journal in order, `window` batches ahead of the acknowledgements; after a reconnect
        or an ack timeout, start again from the last acknowledged sequence number (go-back-N)."""
        cfg = self.cfg
        self._sent = self._acked
        inflight: list[int] = []  # last_seq of batches sent and not yet acknowledged
        self._last_ack_at = self._round_at = time.monotonic()
        self._cwnd = cfg.window  # a new connection (perhaps to another node): the whole window, the wait at its base
        self._ack_wait = cfg.ack_timeout_s
        while True:
            self._wake.clear()
            await self._send_priority(client)
            if self._rewind:
                self._rewind = False
                self._go_back(inflight)
            inflight = [s for s in inflight if s > self._acked]
            if len(inflight) >= self._cwnd:
                if self._overdue():
                    self._timed_out(inflight)
                    continue
                await self._woken(cfg.ack_timeout_s / 4)
                continue
            events = await self.outbox.read(self._sent, cfg.batch_events)
            if not events:
                if inflight and self._overdue():
                    self._timed_out(inflight)
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
