"""Event collection through an MQTT shared subscription: run several collectors (processes) on one site
and the broker splits the gateways' event batches between them (`$share/<group>/acs/v1/<site>/+/events`).

Each batch is stored (de-duplicated on the event id) and its range `(prev_seq, last_seq]` recorded in the
shared database, in one transaction; the gateway's contiguous high-water mark is then advanced over every
recorded range that joins it, and acknowledged. A batch that arrived at another collector first, or out of
order, is therefore never lost: it is acknowledged once the ranges before it are in, and a repeated
acknowledgement makes the gateway resend what nobody holds.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Callable

import aiomqtt
import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud_bridge import mqtt
from cloud_bridge.protocol import EventAck, EventBatch, ProtocolError, decode_events, encode
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


class Collector:
    """One collector process's loop (`await Collector(...).run()`); stop it by cancelling."""

    def __init__(self, db: Model, *, host: str, port: int, site: str, signing_key: Ed25519PrivateKey,
                 group: str = "collectors", identifier: str | None = None) -> None:  # fmt: skip
        self.db, self.host, self.port, self.site, self.group = db, host, port, site, group
        #: Acknowledgements release events on the gateway, so they are signed with the site key.
        self.signing_key = signing_key
        self.identifier = identifier or f"collector-{site}-{os.urandom(4).hex()}"
        self.batches = 0
        self.events = 0
        #: Called with (gateway, batch) after each batch is stored (e.g. `relay.AreaRelay.observe`).
        self.on_batch: list[Callable[[str, EventBatch], None]] = []

    @property
    def topic(self) -> str:
        return f"$share/{self.group}/{site_wildcard(self.site, Leaf.EVENTS)}"

    async def run(self) -> None:
        async with mqtt.client(self.host, self.port, identifier=self.identifier) as client:
            await client.subscribe(self.topic, qos=1)
            async for m in client.messages:
                p = parse(m.topic.value)
                data = mqtt.payload(m)
                if p is None or p[2] is not Leaf.EVENTS or not data:
                    continue
                try:
                    batch = decode_events(data)
                except ProtocolError as e:
                    log.warning("bad event batch from %s: %s", p[1], e)
                    continue
                upto = store_batch(self.db, p[1], batch)
                self.batches += 1
                self.events += len(batch.events)
                for cb in self.on_batch:
                    try:
                        cb(p[1], batch)
                    except Exception:  # a consumer's failure never stops the collection
                        log.exception("batch consumer failed on a batch from %s", p[1])
                with contextlib.suppress(aiomqtt.MqttError):
                    ack = EventAck(upto_seq=upto, ts=time.time(), ref=batch.ref)
                    signed = sign_downlink(self.signing_key, ack, site=self.site, gateway=p[1])
                    await mqtt.publish(client, Topics(self.site, p[1]).events_ack, encode(signed))
