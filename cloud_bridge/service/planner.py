"""The site link's store on the service's data layer (SQLite or PostgreSQL): gateways, shadow, outbox and the
planner, with no copy of the site anywhere else (this replaced the SQLite *workspace* of earlier versions).

A publish (`plan`) is

1. the site model read with one set-based query per table (users, cards, assignments, groups and their
   doors, schedules, doors, access rules, export settings), in one read transaction;
2. per gateway, its shadow (one query) and the pure planning step shared with the CLI's `Model`
   (`operator.provision.plan_gateway`: desired state, held-back users, diff, change set or snapshot), run in
   a worker thread so the event loop (the MQTT reader, the API) keeps going;
3. per gateway one write transaction: the outbox entry, the version (only if it is still the one planned
   from: a birth that moved it in between wins, and the gateway is planned again next time) and only the
   shadow rows that changed (deleted in batches, inserted with COPY on PostgreSQL / executemany on SQLite).

The link's own writes (births, deaths, acks, errors) go straight to the `gateways`, `doors` and `outbox`
tables, so the API shows versions and acknowledgements as they happen.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import Any

import msgspec
from sqlalchemy import Table, delete, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from cloud_bridge.operator import identity
from cloud_bridge.operator.provision import GatewayPlan, plan_gateway
from edge.model import Schedule, Snapshot

from . import rules_db, schema
from .database import Database

_sched_dec = msgspec.msgpack.Decoder(Schedule)
#: Keys per DELETE ... IN (...) statement (below both engines' parameter limits).
BATCH = 5000


async def bulk_insert(c: AsyncConnection, table: Table, cols: tuple[str, ...], rows: list[tuple[Any, ...]]) -> None:
    """Many rows into `table` in `c`'s transaction, at the driver: PostgreSQL's COPY (asyncpg), SQLite's
    executemany; SQLAlchemy's per-row parameter handling costs twice the time at 100,000 rows. Column
    names come from our schema, values go as parameters."""
    if not rows:
        return
    for col in cols:
        assert col in table.c, col
    if c.dialect.name == "postgresql":
        raw = (await c.get_raw_connection()).driver_connection
        assert raw is not None
        await raw.copy_records_to_table(table.name, records=rows, columns=list(cols))
    else:
        marks = ", ".join("?" * len(cols))
        await c.exec_driver_sql(f"INSERT INTO {table.name} ({', '.join(cols)}) VALUES ({marks})", rows)


async def load_site(c: AsyncConnection) -> identity.SiteModel:
    """Everything the planner reads, one query per table (the service's version of `provision.load_site`)."""
    s = schema
    site = identity.SiteModel()
    for gw, did, name in (await c.execute(select(s.doors.c.gateway, s.doors.c.id, s.doors.c.name))).all():
        site.doors.setdefault(gw, {})[did] = name
    for sid, body in (await c.execute(select(s.schedules.c.id, s.schedules.c.body))).all():
        site.schedules[sid] = _sched_dec.decode(body)
    for gid, name, sched in (await c.execute(select(s.groups.c.id, s.groups.c.name, s.groups.c.schedule))).all():
        site.groups[gid] = (name, sched)
    gd = s.group_doors
    for gid, gw, door in (await c.execute(select(gd.c.group_id, gd.c.gateway, gd.c.door))).all():
        site.group_doors.setdefault(gid, []).append((gw, door))
    # The three big tables at the driver (plain SQL, no parameters, no result processing: a third of the
    # time at 100,000 users); column names from our schema.
    users: dict[str, identity.UserRow] = {}
    q = "SELECT id, name, active, offline_access, valid_from, valid_until FROM users ORDER BY id"
    for uid, name, active, off, vf, vu in (await c.exec_driver_sql(q)).all():
        users[uid] = identity.UserRow(uid, name, bool(active), bool(off), vf, vu)
    q = "SELECT user_id, group_id, valid_from, valid_until FROM assignments ORDER BY id"
    for uid, gid, vf, vu in (await c.exec_driver_sql(q)).all():
        users[uid].assignments.append((gid, vf, vu))
    q = "SELECT card, user_id, status, format, valid_from, valid_until FROM credentials ORDER BY card"
    for card, uid, status, fmt, vf, vu in (await c.exec_driver_sql(q)).all():
        users[uid].credentials.append((int(card), status, fmt, vf, vu))
    site.users = list(users.values())
    site.access = await rules_db.access_rules(c)
    m = s.meta
    mq = select(m.c.key, m.c.value).where(m.c.key.in_(("deleteUserOnNoAccessToken", "deleteUserOnNoEntitlement")))
    settings: dict[str, str] = {str(k): str(v) for k, v in (await c.execute(mq)).all()}
    site.rules = identity.ExportRules(
        delete_user_on_no_token=settings.get("deleteUserOnNoAccessToken", "1") == "1",
        delete_user_on_no_entitlement=settings.get("deleteUserOnNoEntitlement", "1") == "1",
    )
    return site


async def read_shadow(c: AsyncConnection, gw: str) -> dict[tuple[str, str], bytes]:
    sh = schema.shadow
    rows = await c.execute(select(sh.c.kind, sh.c.key, sh.c.body).where(sh.c.gateway == gw))
    return {(k, key): bytes(b) for k, key, b in rows.all()}


def _batches(items: list[Any]) -> Iterable[list[Any]]:
    for i in range(0, len(items), BATCH):
        yield items[i : i + BATCH]


async def write_plan(c: AsyncConnection, p: GatewayPlan, shadow: dict[tuple[str, str], bytes]) -> bool:
    """One gateway's planned version into the outbox and its shadow, in `c`'s transaction. False (nothing
    written) when the gateway's version moved since it was planned from."""
    g, ob, sh = schema.gateways, schema.outbox, schema.shadow
    moved = await c.execute(update(g).where(g.c.id == p.gateway, g.c.version == p.version)
                            .values(version=p.version + 1))  # fmt: skip
    if moved.rowcount != 1:
        return False
    if p.kind == "snap":  # supersedes every entry before it
        await c.execute(delete(ob).where(ob.c.gateway == p.gateway))
    await c.execute(ob.insert().values(gateway=p.gateway, to_version=p.version + 1, from_version=p.version,
                                       kind=p.kind, body=p.body))  # fmt: skip
    gone: dict[str, list[str]] = {}
    for kind, key in [*p.shadow_deletes, *((k, key) for k, key, _b in p.shadow_puts if (k, key) in shadow)]:
        gone.setdefault(kind, []).append(key)
    for kind, keys in gone.items():
        for part in _batches(keys):
            await c.execute(delete(sh).where(sh.c.gateway == p.gateway, sh.c.kind == kind, sh.c.key.in_(part)))
    rows = [(p.gateway, k, key, b) for k, key, b in p.shadow_puts]
    await bulk_insert(c, sh, ("gateway", "kind", "key", "body"), rows)
    return True


class ServiceStore:
    """`operator.provision.LinkStore` on the service's `Database`."""

    def __init__(self, db: Database) -> None:
        self.db = db
        #: Gateways whose shadow `reconcile` forgot (it reported a version ahead of ours): plan them again.
        self.reset: set[str] = set()
        #: gateway -> (to_version, snapshot) of the snapshot last planned here, handed to the link by `pending`
        #: once instead of its 27 MB encoding read from the outbox and decoded again (100,000 users); the
        #: outbox keeps the encoding (a restart, a resend). One per gateway, dropped once used or superseded.
        self._snaps: dict[str, tuple[int, Snapshot]] = {}

    async def gateways(self) -> list[str]:
        async with self.db.read() as c:
            g = schema.gateways
            return [str(x) for x in (await c.execute(select(g.c.id).order_by(g.c.id))).scalars()]

    async def versions(self, gw: str) -> tuple[int, int] | None:
        g = schema.gateways
        async with self.db.read() as c:
            row = (await c.execute(select(g.c.acked, g.c.version).where(g.c.id == gw))).first()
        return None if row is None else (int(row[0]), int(row[1]))

    async def record_birth(self, gw: str, *, session: int, version: int, doors: list[tuple[str, str]],
                           software: str, ts: float) -> None:  # fmt: skip
        g, d = schema.gateways, schema.doors
        async with self.db.write() as c:
            if (await c.execute(select(g.c.id).where(g.c.id == gw))).first() is None:
                await c.execute(g.insert().values(id=gw))
            await c.execute(update(g).where(g.c.id == gw).values(online=True, session=session, reported_version=version,
                                                                  software=software, last_seen=ts))  # fmt: skip
            await c.execute(delete(d).where(d.c.gateway == gw))
            if doors:
                await c.execute(d.insert(), [{"gateway": gw, "id": i, "name": n} for i, n in doors])

    async def record_death(self, gw: str, session: int) -> None:
        g = schema.gateways
        async with self.db.write() as c:
            await c.execute(update(g).where(g.c.id == gw, g.c.session <= session).values(online=False))

    async def reconcile(self, gw: str, have: int) -> None:
        g, ob, sh = schema.gateways, schema.outbox, schema.shadow
        async with self.db.write() as c:
            version = (await c.execute(select(g.c.version).where(g.c.id == gw))).scalar_one()
            if have > int(version):
                await c.execute(update(g).where(g.c.id == gw).values(version=have + 1, acked=have))
                await c.execute(delete(ob).where(ob.c.gateway == gw))
                await c.execute(delete(sh).where(sh.c.gateway == gw))
                self.reset.add(gw)
                self._snaps.pop(gw, None)
            else:
                await c.execute(update(g).where(g.c.id == gw).values(acked=have))

    async def set_acked(self, gw: str, version: int) -> None:
        g, ob = schema.gateways, schema.outbox
        async with self.db.write() as c:
            await c.execute(update(g).where(g.c.id == gw).values(acked=version, error=None))
            await c.execute(delete(ob).where(ob.c.gateway == gw, ob.c.to_version <= version))

    async def set_error(self, gw: str, message: str | None) -> None:
        g = schema.gateways
        async with self.db.write() as c:
            await c.execute(update(g).where(g.c.id == gw).values(error=message))

    async def pending(self, gw: str, have: int) -> list[tuple[str, int, bytes | Snapshot]] | None:
        ob = schema.outbox
        held = self._snaps.pop(gw, None)
        async with self.db.read() as c:
            rows = (await c.execute(select(ob.c.kind, ob.c.from_version, ob.c.to_version)
                                    .where(ob.c.gateway == gw, ob.c.to_version > have)
                                    .order_by(ob.c.to_version))).all()  # fmt: skip
            if not rows:
                return []
            kind, frm, _to = rows[0]
            if kind == "cs" and frm != have:
                return None
            out: list[tuple[str, int, bytes | Snapshot]] = []
            for k, _f, to in rows:
                if k == "snap" and held is not None and held[0] == to:
                    out.append((str(k), int(to), held[1]))
                    continue
                q = select(ob.c.body).where(ob.c.gateway == gw, ob.c.to_version == to)
                out.append((str(k), int(to), bytes((await c.execute(q)).scalar_one())))
        return out

    async def shadow_snapshot(self, gw: str) -> Snapshot:
        g = schema.gateways
        async with self.db.read() as c:
            version = (await c.execute(select(g.c.version).where(g.c.id == gw))).scalar()
            shadow = await read_shadow(c, gw)
        objs = ((k, identity.decode(k, b)) for (k, _key), b in shadow.items())
        return identity.snapshot(int(version or 0), objs)

    async def plan(self, *, now: float | None = None, max_bytes: int = 256 * 1024, gateways: list[str] | None = None,
                   refused: list[str] | None = None) -> dict[str, int]:  # fmt: skip
        """`provision.plan` on the data layer (module docstring): {gateway: changes} of those planned."""
        t = time.time() if now is None else now
        gws = gateways if gateways is not None else await self.gateways()
        async with self.db.read() as c:
            site = await load_site(c)
        out: dict[str, int] = {}
        people: dict[frozenset[str], identity.Desired] = {}
        g = schema.gateways
        for gw in gws:
            async with self.db.read() as c:
                version = (await c.execute(select(g.c.version).where(g.c.id == gw))).scalar()
                if version is None:
                    continue
                shadow = await read_shadow(c, gw)
            p = await asyncio.to_thread(plan_gateway, site, gw, int(version), shadow, t=t, people=people,
                                        max_bytes=max_bytes, refused=refused)  # fmt: skip
            if p is None:
                self.reset.discard(gw)
                continue
            async with self.db.write() as c:
                written = await write_plan(c, p, shadow)
            if written:
                out[gw] = p.changes
                self.reset.discard(gw)
                if p.snap is not None:  # kept for `pending` (the transaction is committed: it is in the outbox)
                    self._snaps[gw] = (p.version + 1, p.snap)
                else:
                    self._snaps.pop(gw, None)
        return out
