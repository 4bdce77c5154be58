"""Event ingest that scales out without shared subscriptions: the fleet's sites are split into shards
(`shard_of`, a CRC32 of the site name), and each ingest process subscribes to the events of its shard's
sites only (`acs/v1/<site>/+/events`, one filter per site). By default on a clean session: what the broker drops
while the ingest reconnects is sent again by the gateways (nothing leaves a journal unacknowledged), and a
persistent session cannot move to another node on RabbitMQ 3.10 while its last node is dead
(docs/scaling.md). `persistent=True` keeps one (on RabbitMQ with `mqtt.durable_queue_type = quorum`, a
queue replicated on every node: fewer resends when the ingest itself restarts).

Each round takes the batches received so far (up to `max_batches`), stores their events in the service's
`events` table (`INSERT ... ON CONFLICT DO NOTHING`: an event sent twice, by a gateway's go-back-N resend or
a broker's redelivery, is stored once; `duplicates` counts them), advances each gateway's contiguous
high-water mark (`gateways.events_upto`) over the batches that join it, and commits, all in one
transaction. Only then is each gateway sent a signed `events_ack` up to its mark: an event is acknowledged
(and deleted from the gateway's journal) only once it is committed. A batch after a gap (an earlier one was
lost) is stored but not acknowledged: the repeated acknowledgement, naming that batch, makes the gateway go back.

Several ingest processes share one PostgreSQL: a gateway belongs to one shard, so no two processes write the
same gateway's mark.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

import aiomqtt
import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import func, select
from sqlalchemy.dialects import postgresql, sqlite

from cloud_bridge import mqtt
from cloud_bridge.protocol import EventAck, EventBatch, ProtocolError, decode_events, encode
from cloud_bridge.service import schema
from cloud_bridge.service.database import Database
from cloud_bridge.signing import sign_downlink
from cloud_bridge.topics import Leaf, Topics, parse, site_wildcard

#: The cloud processes' clients warn of unanswered publishes only past this many (`mqtt.client(pending_warn=)`):
#: acknowledgements and change sets to thousands of gateways keep hundreds in flight by design.
PENDING_WARN = 5_000

log = logging.getLogger("cloud_bridge.fleet.ingest")
_enc = msgspec.msgpack.Encoder()


def shard_of(site: str, shards: int) -> int:
    """The shard (0..shards-1) that serves `site` (stable across processes and restarts)."""
    return zlib.crc32(site.encode()) % shards


def sites_of(sites: list[str], shard: int, shards: int) -> list[str]:
    return [s for s in sites if shard_of(s, shards) == shard]


@dataclass
class IngestStats:
    batches: int = 0
    events: int = 0  # received, duplicates included
    inserted: int = 0
    duplicates: int = 0
    acks: int = 0
    gaps: int = 0
    commits: int = 0
    bad: int = 0
    connects: list[str] = field(default_factory=list)


class Endpoints:
    """A broker's nodes in order of preference; `next()` after a failed or dropped connection."""

    def __init__(self, endpoints: list[tuple[str, int]]) -> None:
        if not endpoints:
            raise ValueError("no broker endpoint")
        self.all = endpoints
        self.at = 0

    @property
    def current(self) -> tuple[str, int]:
        return self.all[self.at]

    def next(self) -> None:
        self.at = (self.at + 1) % len(self.all)


class Ingest:
    """One ingest process's loop (`await Ingest(...).run()`); stop it by cancelling."""

    def __init__(self, db: Database, *, endpoints: list[tuple[str, int]], sites: list[str],
                 signing_key: Ed25519PrivateKey, identifier: str | None = None, version: mqtt.Version = "5",
                 max_batches: int = 512, backoff: tuple[float, float] = (0.25, 5.0),
                 persistent: bool = False, qos: int = 1, ack_qos: int = 1) -> None:  # fmt: skip
        self.db = db
        self.endpoints = Endpoints(endpoints)
        self.sites = sites
        self.signing_key = signing_key
        self.identifier = identifier or f"ingest-{os.urandom(4).hex()}"
        self.version = version
        self.max_batches = max_batches
        self.backoff = backoff
        self.persistent = persistent
        #: QoS of the events subscriptions: 0 costs NATS no JetStream consumer, and loses nothing end to end
        #: (an unacknowledged batch is sent again by its gateway).
        self.qos = qos
        #: QoS of the `events_ack` publishes: 0 loses nothing either (a lost ack makes the gateway resend after
        #: its ack timeout; the resent events are stored once).
        self.ack_qos = ack_qos
        self.stats = IngestStats()
        self._queue: asyncio.Queue[tuple[str, str, EventBatch]] = asyncio.Queue()
        self._upto: dict[str, int] = {}

    async def _connect(self) -> aiomqtt.Client:
        host, port = self.endpoints.current
        if self.persistent:
            c = mqtt.client(host, port, identifier=self.identifier, clean_start=False, session_expiry_s=86400,
                            keepalive=15, version=self.version, pending_warn=PENDING_WARN)  # fmt: skip
        else:  # a new client id per connection (RabbitMQ 3.10 blocks an id last seen on a dead node)
            c = mqtt.client(host, port, identifier=f"{self.identifier}-{os.urandom(3).hex()}", clean_start=True,
                            keepalive=15, version=self.version, pending_warn=PENDING_WARN)  # fmt: skip
        try:
            return await mqtt.connect(c, [site_wildcard(s, Leaf.EVENTS) for s in self.sites], qos=self.qos)
        except aiomqtt.MqttError:
            self.endpoints.next()
            raise

    async def _serve(self, client: aiomqtt.Client) -> None:
        self.stats.connects.append(f"{self.endpoints.current[0]}:{self.endpoints.current[1]}")
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._read(client), name="ingest.read")
                tg.create_task(self._write(client), name="ingest.write")
        except BaseException:
            self.endpoints.next()
            raise

    async def run(self) -> None:
        await mqtt.reconnecting(self._connect, self._serve, mqtt.Backoff(*self.backoff), log=log,
                                what=f"ingest {self.identifier}")  # fmt: skip

    async def _read(self, client: aiomqtt.Client) -> None:
        async for m in client.messages:
            p = parse(m.topic.value)
            data = mqtt.payload(m)
            if p is None or p[2] is not Leaf.EVENTS or not data:
                continue
            try:
                batch = decode_events(data)
            except ProtocolError as e:
                self.stats.bad += 1
                log.warning("bad event batch from %s/%s: %s", p[0], p[1], e)
                continue
            self._queue.put_nowait((p[0], p[1], batch))

    async def _write(self, client: aiomqtt.Client) -> None:
        while True:
            items = [await self._queue.get()]
            while len(items) < self.max_batches and not self._queue.empty():
                items.append(self._queue.get_nowait())
            try:
                acks = await self.store(items)
            except Exception:
                # nothing committed, nothing acknowledged: the gateways resend after their ack timeout
                self.stats.bad += len(items)
                log.exception("storing %d batches failed", len(items))
                continue
            # sent together, not one PUBACK round trip after another; a failure ends the connection (not
            # acknowledged: the gateways resend after their ack timeout; stored events are not lost)
            pubs = []
            for (site, gw), (upto, ref) in acks.items():
                ack = EventAck(upto_seq=upto, ts=time.time(), ref=ref)
                signed = sign_downlink(self.signing_key, ack, site=site, gateway=gw)
                pubs.append(mqtt.publish(client, Topics(site, gw).events_ack, encode(signed), qos=self.ack_qos))
            await asyncio.gather(*pubs)
            self.stats.acks += len(pubs)

    async def store(self, items: list[tuple[str, str, EventBatch]]) -> dict[tuple[str, str], tuple[int, str]]:
        """Store the batches in one transaction; returns, per gateway, (its high-water mark, the ref of its newest
        batch): what to acknowledge once committed. The newest (highest `last_seq`), not the last to arrive: a
        broker's late redelivery of an old batch must not hide a gap from the gateway (it goes back only when
        the ack names a batch beyond the mark, docs/protocol.md)."""
        rows: dict[str, dict[str, Any]] = {}
        offered = 0
        for _site, gw, batch in items:
            for e in batch.events:
                offered += 1
                rows.setdefault(e.id, {"id": e.id, "gateway": gw, "seq": e.seq, "type": e.type[:64], "ts": e.ts,
                                       "body": _enc.encode(e)})  # fmt: skip
        gws = sorted({gw for _s, gw, _b in items})
        dialect = self.db.dialect
        async with self.db.write() as c:
            unknown = [g for g in gws if g not in self._upto]
            if unknown:
                cur = await c.execute(select(schema.gateways.c.id, schema.gateways.c.events_upto)
                                      .where(schema.gateways.c.id.in_(unknown)))  # fmt: skip
                found = {str(r[0]): int(r[1]) for r in cur.all()}
                for g in unknown:
                    self._upto[g] = found.get(g, 0)
            inserted = 0
            if rows:
                ins: Any = (postgresql.insert(schema.events) if dialect == "postgresql"
                            else sqlite.insert(schema.events))  # fmt: skip
                res = await c.execute(ins.on_conflict_do_nothing().returning(schema.events.c.id), list(rows.values()))
                inserted = len(res.all())
            upto = dict(self._upto)
            newest: dict[tuple[str, str], EventBatch] = {}
            for site, gw, batch in items:
                if batch.prev_seq <= upto[gw]:
                    upto[gw] = max(upto[gw], batch.last_seq)
                else:
                    self.stats.gaps += 1
                k = (site, gw)
                if k not in newest or batch.last_seq >= newest[k].last_seq:
                    newest[k] = batch
            up: Any = (postgresql.insert(schema.gateways) if dialect == "postgresql"
                       else sqlite.insert(schema.gateways))  # fmt: skip
            greatest = func.greatest if dialect == "postgresql" else func.max
            up = up.on_conflict_do_update(
                index_elements=[schema.gateways.c.id],
                set_={"events_upto": greatest(schema.gateways.c.events_upto, up.excluded.events_upto)},
            )
            await c.execute(up, [{"id": g, "events_upto": upto[g]} for g in gws])
        # committed
        self._upto.update(upto)
        self.stats.commits += 1
        self.stats.batches += len(items)
        self.stats.events += offered
        self.stats.inserted += inserted
        self.stats.duplicates += offered - inserted
        return {k: (upto[k[1]], b.ref) for k, b in newest.items()}
