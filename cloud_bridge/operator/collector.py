"""Event collection through an MQTT shared subscription: run several collectors (processes) on one site
and the broker splits the gateways' event batches between them (`$share/<group>/acs/v1/<site>/+/events`).

Each batch is stored (de-duplicated) and its range `(prev_seq, last_seq]` recorded in the shared database,
in one transaction; the gateway's contiguous high-water mark is then advanced over every recorded range that
joins it, and acknowledged, only once that transaction is committed. A batch that arrived at another
collector first, or out of order, is therefore never lost: it is acknowledged once the ranges before it are
in, and a repeated acknowledgement makes the gateway resend what nobody holds. A batch that cannot be stored
(the database refused it) is not acknowledged: the gateway sends it again after its ack timeout.

Where the batches go is a `BatchStore`: the site database of `cloud-bridge collect` (`ModelStore`, an
`operator.db.Model`; a `Model` passed as such is wrapped), or the operator service's database
(`cloud_bridge.service.events.EventService`, which also takes the gateways' births and deaths).

The collector keeps its connection: when the broker goes away it reconnects with a jittered backoff and
subscribes again (`mqtt.reconnecting`); `connected` is set while it is subscribed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from typing import Protocol

import aiomqtt
import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud_bridge import mqtt
from cloud_bridge.protocol import (
    Birth,
    Death,
    EventAck,
    EventBatch,
    ProtocolError,
    decode_events,
    decode_status,
    encode,
)
from cloud_bridge.signing import sign_downlink
from cloud_bridge.topics import Leaf, Topics, parse, site_wildcard

from .db import Model

log = logging.getLogger("cloud_bridge.operator.collector")
_enc = msgspec.msgpack.Encoder()


def store_batch(db: Model, gw: str, batch: EventBatch) -> int:
    """Store one batch; return the gateway's contiguous high-water mark after it (what to acknowledge)."""
    with db.tx() as c:
        db.ensure_gateway(gw)
        c.executemany(
            "INSERT OR IGNORE INTO events (id, gateway, seq, type, ts, body) VALUES (?,?,?,?,?,?)",
            [(e.id, gw, e.seq, e.type, e.ts, _enc.encode(e)) for e in batch.events],
        )
        c.execute("INSERT INTO event_ranges VALUES (?,?,?)", (gw, batch.prev_seq, batch.last_seq))
        return _advance(c, gw)


def _advance(c: sqlite3.Connection, gw: str) -> int:
    upto = int(c.execute("SELECT events_upto FROM gateways WHERE id=?", (gw,)).fetchone()[0])
    while True:
        row = c.execute(
            "SELECT max(last_seq) FROM event_ranges WHERE gateway=? AND prev_seq<=? AND last_seq>?", (gw, upto, upto)
        ).fetchone()
        if row[0] is None:
            break
        upto = int(row[0])
    c.execute("DELETE FROM event_ranges WHERE gateway=? AND last_seq<=?", (gw, upto))
    c.execute("UPDATE gateways SET events_upto=? WHERE id=?", (upto, gw))
    return upto


class BatchStore(Protocol):
    async def store(self, gateway: str, batch: EventBatch) -> int:
        """Store `batch` of `gateway` and commit; return the high-water mark to acknowledge. Raises when the
        batch could not be stored (then nothing is acknowledged)."""
        ...


class StatusSink(Protocol):
    async def status(self, gateway: str, status: Birth | Death) -> None:
        """A gateway's retained birth or will (or a clean shutdown's death)."""
        ...


class ModelStore:
    """The site database of `cloud-bridge collect` (one SQLite file, several collector processes)."""

    def __init__(self, db: Model) -> None:
        self.db = db

    async def store(self, gateway: str, batch: EventBatch) -> int:
        return store_batch(self.db, gateway, batch)


class Collector:
    """One collector's loop (`await Collector(...).run()`); stop it by cancelling. It reconnects on its own."""

    def __init__(self, db: Model | BatchStore, *, host: str, port: int, site: str, signing_key: Ed25519PrivateKey,
                 group: str = "collectors", identifier: str | None = None, status: StatusSink | None = None,
                 backoff: mqtt.Backoff | None = None) -> None:  # fmt: skip
        self.store: BatchStore = ModelStore(db) if isinstance(db, Model) else db
        self.host, self.port, self.site, self.group = host, port, site, group
        #: Acknowledgements release events on the gateway, so they are signed with the site key.
        self.signing_key = signing_key
        self.identifier = identifier or f"collector-{site}-{os.urandom(4).hex()}"
        #: Births and deaths go here too when given (a plain subscription: retained messages are not sent
        #: to shared subscriptions).
        self.status_sink = status
        self.backoff = backoff or mqtt.Backoff(0.2, 5.0)
        self.batches = 0
        self.events = 0
        #: Batches the store refused (not acknowledged), and connections made (1 + reconnects).
        self.failures = 0
        self.connects = 0
        self.connected = asyncio.Event()
        #: Called with (gateway, batch) after each batch is stored (e.g. `relay.AreaRelay.observe`).
        self.on_batch: list[Callable[[str, EventBatch], None]] = []

    @property
    def topic(self) -> str:
        return f"$share/{self.group}/{site_wildcard(self.site, Leaf.EVENTS)}"

    def _topics(self) -> list[str]:
        return [self.topic] + ([site_wildcard(self.site, Leaf.STATUS)] if self.status_sink is not None else [])

    async def _connect(self) -> aiomqtt.Client:
        c = await mqtt.connect(mqtt.client(self.host, self.port, identifier=self.identifier), self._topics())
        self.connects += 1
        self.connected.set()
        return c

    def _down(self) -> None:
        self.connected.clear()

    async def run(self) -> None:
        await mqtt.reconnecting(self._connect, self._serve, self.backoff, log=log, what="collector lost the broker",
                                down=self._down)  # fmt: skip

    async def _serve(self, client: aiomqtt.Client) -> None:
        async for m in client.messages:
            p = parse(m.topic.value)
            data = mqtt.payload(m)
            if p is None or p[0] != self.site or not data:
                continue
            if p[2] is Leaf.STATUS:
                await self._status(p[1], data)
            elif p[2] is Leaf.EVENTS:
                await self._batch(client, p[1], data)

    async def _status(self, gw: str, data: bytes) -> None:
        assert self.status_sink is not None
        try:
            st = decode_status(data)
        except ProtocolError:
            return  # a site link's probe, or garbage: nothing a gateway said
        try:
            await self.status_sink.status(gw, st)
        except Exception:  # one bad write must not stop the collector
            log.exception("gateway %s: status not stored", gw)

    async def _batch(self, client: aiomqtt.Client, gw: str, data: bytes) -> None:
        try:
            batch = decode_events(data)
        except ProtocolError as e:
            log.warning("bad event batch from %s: %s", gw, e)
            return
        try:
            upto = await self.store.store(gw, batch)
        except Exception as e:  # not stored, not acknowledged: the gateway resends it
            self.failures += 1
            log.error("event batch %d..%d of %s not stored (not acknowledged): %s", batch.first_seq,
                      batch.last_seq, gw, e)  # fmt: skip
            return
        self.batches += 1
        log.debug("batch %d..%d (after %d) of %s stored: acknowledging %d", batch.first_seq, batch.last_seq,
                  batch.prev_seq, gw, upto)  # fmt: skip
        self.events += len(batch.events)
        for cb in self.on_batch:
            try:
                cb(gw, batch)
            except Exception:  # a consumer's failure never stops the collection
                log.exception("batch consumer failed on a batch from %s", gw)
        with contextlib.suppress(aiomqtt.MqttError):
            ack = EventAck(upto_seq=upto, ts=time.time(), ref=batch.ref)
            signed = sign_downlink(self.signing_key, ack, site=self.site, gateway=gw)
            await mqtt.publish(client, Topics(self.site, gw).events_ack, encode(signed))
