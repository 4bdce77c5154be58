"""The link for a fleet on a cluster, on real Mosquittos: MQTT 3.1.1 (nothing needs MQTT 5), clean or persistent
sessions, several broker endpoints with failover and back; the sharded ingest on SQLite and PostgreSQL
(events stored once, acknowledged only after the commit)."""
# ruff: noqa: F811  (pytest fixtures imported from tests.broker and tests.postgres are used as parameters)

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import func, select, text

from cloud_bridge import mqtt
from cloud_bridge.fleet.ingest import Ingest, shard_of, sites_of
from cloud_bridge.fleet.sim import Fleet
from cloud_bridge.protocol import EventBatch, Unlock
from cloud_bridge.service import schema
from cloud_bridge.service.database import Database
from cloud_bridge.signing import public_bytes
from edge.events import Event
from edge.tasks import cancel_and_wait

from .broker import broker, cloud_peer, gateway, link_config, site_key, unique  # noqa: F401
from .conftest import basic_site
from .mosquitto import Mosquitto
from .postgres import db_url, postgres_server  # noqa: F401


def connects(m: Mosquitto, client_prefix: str) -> list[tuple[str, str, str]]:
    """(client id, protocol, clean flag) of every connection Mosquitto logged for ids with the prefix (Mosquitto's
    protocol numbers: 2 is MQTT 3.1.1, 5 is MQTT 5)."""
    out = []
    for line in m.log.read_text(errors="replace").splitlines():
        hit = re.search(r"as (\S+) \(p(\d+), c(\d+)", line)
        if hit and hit.group(1).startswith(client_prefix):
            out.append((hit.group(1), hit.group(2), hit.group(3)))
    return out


async def test_the_link_speaks_mqtt_311(tmp_path: Path, site_key: Ed25519PrivateKey) -> None:
    """A gateway on MQTT 3.1.1 (RabbitMQ 3.10's only version): birth, change set, events, command, all as on MQTT
    5; the broker saw MQTT 3.1.1 and a persistent session (clean session 0)."""
    b = Mosquitto(tmp_path / "b", extra="log_type notice")
    b.start()
    try:
        site, gw = unique("s"), "gw1"
        async with (
            gateway(b, tmp_path / "gw", site_key, site=site, gw=gw, mqtt_version="3.1.1") as g,
            cloud_peer(b, site_key, site=site, gw=gw) as cloud,
        ):
            birth = await cloud.wait_online()
            assert birth.mqtt == "3.1.1" and birth.broker == f"{b.host}:{b.port}"
            r = await cloud.send_change_set(basic_site())
            assert r.ok and r.applied and g.store.version == 1
            for i in range(50):
                g.journal.record("access.granted", door="front", card=i, user="alice")
            await cloud.wait_events(50)
            await cloud.wait_for(lambda: g.journal.depth == 0)
            # the command travels with an MQTT 5 message expiry from the cloud; the 3.1.1 gateway relies on the
            # signed `expires` only
            res = await cloud.command(Unlock(door="front", seconds=2), operator="alice")
            assert res.ok and g.commands.calls[-1] == ("unlock", "front", 2)
        seen = connects(b, f"acs-{site}-{gw}")
        assert seen and all(level == "2" and clean == "0" for _id, level, clean in seen), seen
        assert {i for i, _l, _c in seen} == {f"acs-{site}-{gw}"}
    finally:
        b.stop()


async def test_clean_sessions_name_each_connection(tmp_path: Path, site_key: Ed25519PrivateKey) -> None:
    """session = "clean": clean session 1 and a client id per connection (RabbitMQ 3.10 blocks an id whose last
    node died); the downlink still works on QoS 0 subscriptions."""
    b = Mosquitto(tmp_path / "b", extra="log_type notice")
    b.start()
    try:
        site, gw = unique("s"), "gw1"
        kw = {"mqtt_version": "3.1.1", "session": "clean", "downlink_qos": 0}
        async with cloud_peer(b, site_key, site=site, gw=gw) as cloud:
            async with gateway(b, tmp_path / "gw", site_key, site=site, gw=gw, **kw):
                first = await cloud.wait_online()
            async with gateway(b, tmp_path / "gw", site_key, site=site, gw=gw, **kw) as g:
                await cloud.wait_online(after=first.session)
                r = await cloud.send_change_set(basic_site())
                assert r.ok and g.store.version == 1
        seen = connects(b, f"acs-{site}-{gw}")
        assert len({i for i, _l, _c in seen}) == 2, seen
        assert all(level == "2" and clean == "1" for _id, level, clean in seen), seen
        assert all(re.fullmatch(rf"acs-{site}-{gw}-[0-9a-f]+", i) for i, _l, _c in seen)
    finally:
        b.stop()


async def test_rights_replies_at_qos_0_still_reach_the_cloud(tmp_path: Path, site_key: Ed25519PrivateKey) -> None:
    """reply_qos = 0 (a fleet on NATS: no JetStream write per reply): the change set's result travels at QoS 0
    (a subscriber at QoS 1 receives it at 0) and the cloud still gets it; events stay at QoS 1."""
    b = Mosquitto(tmp_path / "b")
    b.start()
    try:
        site, gw = unique("s"), "gw1"
        spy = mqtt.client(b.host, b.port, identifier=unique("spy"), version="3.1.1")
        async with spy:
            await spy.subscribe(f"acs/v1/{site}/{gw}/#", qos=1)
            kw = {"mqtt_version": "3.1.1", "session": "clean", "downlink_qos": 0, "reply_qos": 0}
            async with (
                cloud_peer(b, site_key, site=site, gw=gw) as cloud,
                gateway(b, tmp_path / "gw", site_key, site=site, gw=gw, **kw) as g,
            ):
                await cloud.wait_online()
                r = await cloud.send_change_set(basic_site())
                assert r.ok and g.store.version == 1
                g.journal.record("access.granted", door="front", card=1, user="alice")
                await cloud.wait_events(1)
            seen: dict[str, set[int]] = {}
            async with asyncio.timeout(5):
                async for m in spy.messages:
                    seen.setdefault(m.topic.value.split(f"{gw}/", 1)[1], set()).add(m.qos)
                    if "rights/reply" in seen and "events" in seen:
                        break
        assert seen["rights/reply"] == {0} and seen["events"] == {1}, seen
    finally:
        b.stop()


async def test_failover_to_the_next_endpoint_and_back(tmp_path: Path, site_key: Ed25519PrivateKey) -> None:
    """Two brokers: the gateway connects to the first, moves to the second when the first dies (a new birth
    there), and back to the first once it answers again (`failback_s`)."""
    a, b = Mosquitto(tmp_path / "a"), Mosquitto(tmp_path / "b")
    a.start()
    b.start()
    try:
        site, gw = unique("s"), "gw1"
        async with (
            gateway(a, tmp_path / "gw", site_key, site=site, gw=gw, endpoints=[f"{b.host}:{b.port}"],
                    failback_s=1.0) as g,
            cloud_peer(a, site_key, site=site, gw=gw) as on_a,
            cloud_peer(b, site_key, site=site, gw=gw) as on_b,
        ):  # fmt: skip
            first = await on_a.wait_online()
            assert first.broker == f"{a.host}:{a.port}" and g.link.broker == first.broker
            a.stop(kill=True)
            moved = await on_b.wait_online(timeout=15)
            assert moved.broker == f"{b.host}:{b.port}" and moved.session > first.session
            r = await on_b.send_change_set(basic_site())
            assert r.ok and g.store.version == 1
            a.start()
            async with cloud_peer(a, site_key, site=site, gw=gw) as on_a2:
                back = await on_a2.wait_for(
                    lambda: next((x for x in on_a2.births if x.session > moved.session), None), timeout=20
                )
                assert back.broker == f"{a.host}:{a.port}"
            assert g.link.connects == [2, 1] and g.link.failovers >= 1
    finally:
        a.stop()
        b.stop()


async def test_a_dead_nodes_gateways_spread_over_the_survivors(tmp_path: Path, site_key: Ed25519PrivateKey) -> None:
    """Three brokers, 16 gateways on the first, each listing the other two in the same order. When the first
    dies, `failover = "spread"` (the default) sends them to both survivors; "in_order" sends every one of them
    to the next in the list (bench/fleet_cluster.py: one survivor took the 3,333 reconnects of a killed node)."""
    for failover in ("spread", "in_order"):
        nodes = [Mosquitto(tmp_path / f"{failover}-{i}") for i in range(3)]
        for m in nodes:
            m.start()
        try:
            ends = [f"{m.host}:{m.port}" for m in nodes]
            cfgs = [link_config(nodes[0], "alpha", f"g{i}", session="clean", endpoints=ends[1:], failover=failover,
                                failback_s=3600.0, backoff_min_s=0.05, backoff_max_s=0.2)
                    for i in range(16)]  # fmt: skip
            async with Fleet(cfgs, public_bytes(site_key), tmp_path / f"fleet-{failover}", stagger_s=0.0) as fleet:
                async with asyncio.timeout(20):
                    while fleet.online() < 16 or {g.link.broker for g in fleet.gateways} != {ends[0]}:
                        await asyncio.sleep(0.05)
                nodes[0].stop(kill=True)
                async with asyncio.timeout(20):
                    while fleet.online() < 16 or any(g.link.broker == ends[0] for g in fleet.gateways):
                        await asyncio.sleep(0.05)
                where = Counter(g.link.broker for g in fleet.gateways)
            if failover == "spread":
                assert where[ends[1]] >= 2 and where[ends[2]] >= 2, where  # P(fewer than 2 on one) ~ 0.05 %
            else:
                assert where == {ends[1]: 16}, where
        finally:
            for m in nodes:
                m.stop()


def test_sites_are_split_into_stable_shards() -> None:
    sites = [f"s{i:03d}" for i in range(200)]
    parts = [sites_of(sites, i, 4) for i in range(4)]
    assert sorted(s for p in parts for s in p) == sites and all(len(p) > 20 for p in parts)
    assert all(shard_of(s, 4) == i for i, p in enumerate(parts) for s in p)


async def test_ingest_stores_each_event_once_and_acknowledges_after_the_commit(
    broker: Mosquitto, tmp_path: Path, site_key: Ed25519PrivateKey, db_url: str
) -> None:
    """Simulated gateways on two sites, two ingest processes' loops (one shard each) on one database. While the
    events table cannot be written, nothing is acknowledged (every journal keeps its events); once it can,
    everything is stored exactly once and every journal drains."""
    db = Database(db_url)
    await db.migrate()
    sites = ["alpha", "beta"]
    assert shard_of("alpha", 2) != shard_of("beta", 2)
    cfgs = [link_config(broker, s, f"{s}-g{i}", ack_timeout_s=1.0, session="clean") for s in sites for i in range(3)]
    ingests = [Ingest(db, endpoints=[(broker.host, broker.port)], sites=sites_of(sites, i, 2), signing_key=site_key)
               for i in range(2)]  # fmt: skip
    async with db.write() as c:  # the table the ingest writes is away: every commit fails
        await c.execute(text("ALTER TABLE events RENAME TO events_away"))
    tasks = [asyncio.get_running_loop().create_task(i.run()) for i in ingests]
    try:
        async with Fleet(cfgs, public_bytes(site_key), tmp_path / "fleet") as fleet:
            while fleet.online() < len(cfgs) or not all(i.stats.connects for i in ingests):
                await asyncio.sleep(0.05)
            await fleet.record_events(20, duration_s=0.2, steps=4)
            while sum(i.stats.bad for i in ingests) < 6:
                await asyncio.sleep(0.05)
            assert all(g.outbox.depth == 20 for g in fleet.gateways)  # nothing acknowledged without a commit
            assert sum(i.stats.acks for i in ingests) == 0
            async with db.write() as c:
                await c.execute(text("ALTER TABLE events_away RENAME TO events"))
            async with asyncio.timeout(30):
                while fleet.depth() > 0:
                    await asyncio.sleep(0.05)
            recorded = {g.name: g.outbox.recorded for g in fleet.gateways}
        async with db.read() as c:
            e = schema.events.c
            rows = (await c.execute(select(e.gateway, func.count(), func.count(e.seq.distinct()))
                                    .group_by(e.gateway))).all()  # fmt: skip
            upto = dict((await c.execute(select(schema.gateways.c.id, schema.gateways.c.events_upto))).all())
        assert {r[0]: (r[1], r[2]) for r in rows} == {g: (n, n) for g, n in recorded.items()}
        assert upto == recorded
        assert all(i.stats.inserted > 0 for i in ingests)  # both shards did work
        assert sum(i.stats.inserted for i in ingests) == sum(recorded.values())
    finally:
        for t in tasks:
            await cancel_and_wait(t)
        await db.close()


async def test_the_ingest_names_the_newest_batch_so_a_late_redelivery_does_not_hide_a_gap(
    tmp_path: Path, site_key: Ed25519PrivateKey
) -> None:
    """One round holds a gateway's batch 1-10, a batch 21-30 after a gap (11-20 lost with a broker node) and a
    broker's late copy of 1-10: the ack goes up to 10 and names 21-30, the batch the gateway goes back for
    (docs/protocol.md: a repeated ack naming a duplicate changes nothing, so naming the late copy would leave the
    gap until the ack timeout)."""
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'ingest.db'}")
    await db.migrate()
    try:
        ingest = Ingest(db, endpoints=[("127.0.0.1", 1)], sites=["alpha"], signing_key=site_key)

        def batch(prev: int, last: int, ref: str) -> EventBatch:
            evs = [Event(id=f"{s:032x}", seq=s, type="access.granted", ts=1.0e9 + s, local="", link_up=True)
                   for s in range(prev + 1, last + 1)]  # fmt: skip
            return EventBatch(first_seq=prev + 1, last_seq=last, events=evs, prev_seq=prev, ref=ref)

        acks = await ingest.store([("alpha", "g1", batch(0, 10, "first")), ("alpha", "g1", batch(20, 30, "past-gap")),
                                   ("alpha", "g1", batch(0, 10, "late-copy"))])  # fmt: skip
        assert acks == {("alpha", "g1"): (10, "past-gap")}
        assert (ingest.stats.gaps, ingest.stats.inserted, ingest.stats.duplicates) == (1, 20, 10)
        # the gap filled: up to 30, naming the newest batch again
        acks = await ingest.store([("alpha", "g1", batch(10, 20, "refill")), ("alpha", "g1", batch(20, 30, "again"))])
        assert acks == {("alpha", "g1"): (30, "again")}
    finally:
        await db.close()


async def test_an_even_event_flow_spreads_each_gateways_events_over_the_duration(
    broker: Mosquitto, tmp_path: Path, site_key: Ed25519PrivateKey
) -> None:
    """`record_events(smooth=True)` (bench/fleet_cluster.py `--event-flow even`): every gateway journals its k
    events, and the fleet's count grows with the time through the duration (the steps of the default flow put
    a whole step's events of every gateway at once)."""
    cfgs = [link_config(broker, "alpha", f"g{i}", session="clean") for i in range(50)]
    async with Fleet(cfgs, public_bytes(site_key), tmp_path / "fleet", stagger_s=0.0) as fleet:
        seen: list[tuple[float, int]] = []
        t0 = time.monotonic()

        async def sample() -> None:
            while True:
                seen.append((time.monotonic() - t0, sum(g.outbox.recorded for g in fleet.gateways)))
                await asyncio.sleep(0.05)

        t = asyncio.get_running_loop().create_task(sample())
        await fleet.record_events(2, duration_s=2.0, smooth=True)
        await cancel_and_wait(t)
        assert [g.outbox.recorded for g in fleet.gateways] == [2] * 50
    # 100 events over 2 s: about 50 t of them at t s (0.05 s of lateness allowed, and the phases' randomness)
    for at, n in seen:
        assert 50 * (at - 0.1) - 20 <= n <= 50 * at + 20, seen


async def test_a_311_client_never_sends_mqtt5_properties(broker: Mosquitto) -> None:
    """`mqtt.publish` with a message expiry on a 3.1.1 client publishes without it (paho refuses properties
    on 3.1.1), and a subscriber gets the message."""
    got: list[bytes] = []
    sub = await mqtt.connect(mqtt.client(broker.host, broker.port, identifier=unique("sub"), version="3.1.1"),
                             ["t/expiry"])  # fmt: skip
    pub = await mqtt.connect(mqtt.client(broker.host, broker.port, identifier=unique("pub"), version="3.1.1"))
    try:
        assert mqtt.version_of(pub) == "3.1.1"
        await mqtt.publish(pub, "t/expiry", b"x", expiry_s=5)
        async with asyncio.timeout(10):
            async for m in sub.messages:
                got.append(mqtt.payload(m))
                break
        assert got == [b"x"]
    finally:
        await mqtt.close(pub)
        await mqtt.close(sub)
