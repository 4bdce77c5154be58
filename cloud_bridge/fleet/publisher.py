"""The fleet's downlink publisher: one process per shard of sites (`ingest.shard_of`), on one PostgreSQL.

It pushes each gateway's pending change sets (the service's `outbox` table, rows above `gateways.acked`) in
version order, signed for that gateway, and resends every `resend_s` until the gateway's own `result`
arrives; the acknowledged version is written back to `gateways.acked`. At most `window` gateways have a change
set in flight at once (`window.SendWindow`: the others wait, oldest first; None or 0: no limit), so that a
publisher of thousands of gateways does not queue them all behind its one connection at once. Nothing
depends on the broker keeping a message: a gateway on a clean session that was away simply gets the resend.

Presence does not depend on retained messages (RabbitMQ keeps them per node): gateways publish their birth on
every connect, and on every connect of its own the publisher asks each gateway of its roster for a fresh one
(a signed `rebirth`), so it learns who is online from live messages whichever node it is on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass, field

import aiomqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import bindparam, select, update

from cloud_bridge import mqtt
from cloud_bridge.protocol import (
    Birth,
    ChangeSetMsg,
    ProtocolError,
    Rebirth,
    RightsResult,
    SignedMsg,
    decode_downlink,
    decode_rights_reply,
    decode_status,
    encode,
)
from cloud_bridge.service import schema
from cloud_bridge.service.database import Database
from cloud_bridge.signing import sign_downlink
from cloud_bridge.topics import Leaf, Topics, parse, site_wildcard

from .ingest import PENDING_WARN, Endpoints
from .window import SendWindow

log = logging.getLogger("cloud_bridge.fleet.publisher")


@dataclass
class PublisherStats:
    births: int = 0
    sent: int = 0
    resent: int = 0
    results: int = 0
    refused: int = 0
    #: the window (`SendWindow`): gateways in flight now and at most, waiting for a slot now, waits for a
    #: slot (once per wait), slots given up by gateways that did not answer
    in_flight: int = 0
    peak_in_flight: int = 0
    waiting: int = 0
    deferred: int = 0
    released: int = 0
    connects: list[str] = field(default_factory=list)


class Publisher:
    """`await Publisher(...).run()`; `push()` loads the outbox and sends; stop by cancelling."""

    def __init__(self, db: Database, *, endpoints: list[tuple[str, int]], roster: dict[str, str],
                 signing_key: Ed25519PrivateKey, identifier: str | None = None, version: mqtt.Version = "5",
                 resend_s: float = 5.0, qos: int = 1, publish_qos: int = 1, window: int | None = None,
                 window_tries: int = 3) -> None:  # fmt: skip
        self.db = db
        self.endpoints = Endpoints(endpoints)
        #: gateway -> site, the gateways this publisher serves
        self.roster = roster
        self.sites = sorted(set(roster.values()))
        self.signing_key = signing_key
        self.identifier = identifier or f"publisher-{os.urandom(4).hex()}"
        self.version = version
        self.resend_s = resend_s
        self.qos = qos  # of the status and rights/reply subscriptions (0: no JetStream consumer on NATS)
        #: QoS of the downlink publishes. 0 is enough (the gateway's `result` is the acknowledgement, and
        #: everything is resent every `resend_s` until it arrives) and much cheaper: no PUBACK to wait for, and
        #: on NATS no JetStream write per message (docs/scaling.md).
        self.publish_qos = publish_qos
        #: At most `window` gateways with an unacknowledged change set in flight (None or 0: no limit); one that
        #: does not answer within `window_tries` sends (`resend_s` apart) gives its slot up to the back of the
        #: queue (docs/scaling.md, "The publisher's window").
        self.window = SendWindow(window, resend_s=resend_s, tries=window_tries)
        self.stats = PublisherStats()
        #: gateway -> (session, wall time) of the newest birth seen
        self.presence: dict[str, tuple[int, float]] = {}
        #: gateway -> wall times of every birth seen
        self.births: dict[str, list[float]] = {}
        self.acked: dict[str, int] = {}
        #: gateway -> {version: wall time its result arrived}
        self.acked_at: dict[str, dict[int, float]] = {}
        self._pending: dict[str, list[tuple[int, ChangeSetMsg]]] = {}
        self._dirty: set[str] = set()
        self._client: aiomqtt.Client | None = None
        self._kick = asyncio.Event()

    async def _connect(self) -> aiomqtt.Client:
        host, port = self.endpoints.current
        subs = [site_wildcard(s, leaf) for s in self.sites for leaf in (Leaf.STATUS, Leaf.RIGHTS_REPLY)]
        # a clean session: a new client id per connection (RabbitMQ 3.10 blocks an id last seen on a dead node)
        c = mqtt.client(host, port, identifier=f"{self.identifier}-{os.urandom(3).hex()}", clean_start=True,
                        keepalive=15, version=self.version, pending_warn=PENDING_WARN)  # fmt: skip
        try:
            return await mqtt.connect(c, subs, qos=self.qos)
        except aiomqtt.MqttError:
            self.endpoints.next()
            raise

    async def _serve(self, client: aiomqtt.Client) -> None:
        self.stats.connects.append(f"{self.endpoints.current[0]}:{self.endpoints.current[1]}")
        self._client = client
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._read(client), name="publisher.read")
                tg.create_task(self._rebirth_all(client), name="publisher.rebirth")
                tg.create_task(self._send_loop(client), name="publisher.send")
                tg.create_task(self._flush_loop(), name="publisher.flush")
        except BaseException:
            self.endpoints.next()
            raise
        finally:
            self._client = None

    async def run(self) -> None:
        await self.load()
        await mqtt.reconnecting(self._connect, self._serve, mqtt.Backoff(0.25, 5.0), log=log,
                                what=f"publisher {self.identifier}")  # fmt: skip

    async def load(self) -> None:
        """Read the acknowledged versions and the pending change sets of the roster's gateways."""
        gws = list(self.roster)
        async with self.db.read() as c:
            cur = await c.execute(select(schema.gateways.c.id, schema.gateways.c.acked)
                                  .where(schema.gateways.c.id.in_(gws)))  # fmt: skip
            for gw, acked in cur.all():
                self.acked[str(gw)] = max(self.acked.get(str(gw), 0), int(acked))
            o = schema.outbox.c
            cur = await c.execute(select(o.gateway, o.to_version, o.body)
                                  .where(o.gateway.in_(gws), o.kind == "change_set")
                                  .order_by(o.gateway, o.to_version))  # fmt: skip
            pending: dict[str, list[tuple[int, ChangeSetMsg]]] = {}
            for gw, to_version, body in cur.all():
                if int(to_version) > self.acked.get(str(gw), 0):
                    msg = _change_set_msg(bytes(body))
                    pending.setdefault(str(gw), []).append((int(to_version), msg))
        self._pending = pending
        self.window.sync({gw: todo[0][0] for gw, todo in pending.items()})

    async def push(self) -> int:
        """Load the outbox again and send what is pending now; returns the gateways with something pending."""
        await self.load()
        self.window.reset()
        self._kick.set()
        return len(self._pending)

    def _publish(self, client: aiomqtt.Client, gw: str, msg: SignedMsg) -> asyncio.Task[None]:
        site = self.roster[gw]
        signed = sign_downlink(self.signing_key, msg, site=site, gateway=gw)
        return asyncio.get_running_loop().create_task(mqtt.publish(client, Topics(site, gw).rights, encode(signed),
                                                                         qos=self.publish_qos))  # fmt: skip

    async def _rebirth_all(self, client: aiomqtt.Client) -> None:
        for i, gw in enumerate(self.roster):
            await self._publish(client, gw, Rebirth())
            if i % 200 == 199:
                await asyncio.sleep(0)

    async def _send_loop(self, client: aiomqtt.Client) -> None:
        while True:
            self._kick.clear()  # before the round: an ack that arrives while it sends starts the next one
            # (the window is told of every acknowledgement as it arrives, `_settle`: a round costs what is due,
            # not the number of gateways pending)
            batch: list[asyncio.Task[None]] = []
            for send in self.window.due(time.monotonic()):
                # (a push may have reloaded `_pending` while a batch went out: send only what is still pending)
                msg = next((m for v, m in self._pending.get(send.gateway, []) if v == send.version), None)
                if msg is None:
                    continue
                if send.resend:
                    self.stats.resent += 1
                else:
                    self.stats.sent += 1
                batch.append(self._publish(client, send.gateway, msg))
                if len(batch) >= 500:
                    await asyncio.gather(*batch)
                    batch = []
            if batch:
                await asyncio.gather(*batch)
            w, st = self.window, self.stats
            st.in_flight, st.peak_in_flight, st.waiting = w.in_flight, w.peak, w.waiting
            st.deferred, st.released = w.deferred, w.released
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(1.0, self.resend_s / 4)):
                    await self._kick.wait()

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            await self.flush()

    async def flush(self) -> None:
        """Write the acknowledged versions back (one transaction)."""
        if not self._dirty:
            return
        dirty, self._dirty = self._dirty, set()
        g = schema.gateways.c
        stmt = (update(schema.gateways).where(g.id == bindparam("b_gateway"), g.acked < bindparam("b_acked"))
                .values(acked=bindparam("b_acked")))  # fmt: skip
        try:
            async with self.db.write() as c:  # one statement, executed for many rows
                await c.execute(stmt, [{"b_gateway": gw, "b_acked": self.acked[gw]} for gw in sorted(dirty)])
        except Exception:
            self._dirty |= dirty
            log.exception("writing acknowledged versions failed")

    async def _read(self, client: aiomqtt.Client) -> None:
        async for m in client.messages:
            p = parse(m.topic.value)
            if p is None or p[0] not in self.sites or p[1] not in self.roster:
                continue
            _site, gw, leaf = p
            data = mqtt.payload(m)
            try:
                if leaf is Leaf.STATUS and data:
                    st = decode_status(data)
                    if isinstance(st, Birth):
                        self.stats.births += 1
                        now = time.time()
                        self.births.setdefault(gw, []).append(now)
                        prev = self.presence.get(gw)
                        if prev is None or st.session > prev[0]:
                            self.presence[gw] = (st.session, now)
                            if gw in self._pending:
                                self.window.expedite(gw)  # back online: send again now (or soon)
                                self._kick.set()
                elif leaf is Leaf.RIGHTS_REPLY:
                    r = decode_rights_reply(data)
                    if isinstance(r, RightsResult):
                        self.stats.results += 1
                        if r.ok and r.version > self.acked.get(gw, 0):
                            self.acked[gw] = r.version
                            self.acked_at.setdefault(gw, {})[r.version] = time.time()
                            self._dirty.add(gw)
                            self._settle(gw)
                            self._kick.set()
                        elif not r.ok:
                            self.stats.refused += 1
            except ProtocolError as e:
                log.warning("bad message on %s: %s", m.topic.value, e)

    def _settle(self, gw: str) -> None:
        """`gw` acknowledged a version: drop what it has, tell the window what it is to be sent next."""
        todo = self._pending.get(gw)
        if todo is None:
            return
        acked = self.acked.get(gw, 0)
        todo[:] = [(v, m) for v, m in todo if v > acked]
        if not todo:
            del self._pending[gw]
        self.window.settle(gw, todo[0][0] if todo else None)


def _change_set_msg(body: bytes) -> ChangeSetMsg:
    """An outbox row's body: the encoded `ChangeSetMsg` (as `encode` writes it)."""
    msg = decode_downlink(body)
    if not isinstance(msg, ChangeSetMsg):
        raise ProtocolError(f"outbox row holds {type(msg).__name__}, not a change_set")
    return msg
