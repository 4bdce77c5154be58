"""What keeps the list endpoints quick at 100,000 users and 1,000,000 events (migrations 0007 and 0009,
listing.py, events.page_query, reports.py, auth.touch_token), on SQLite and PostgreSQL: the query plans read
the indexes (plans, not timings: the figures are bench/operator.py's and bench/console.py's), the users
search still finds what it found before (on SQLite through the trigram index, which follows every change),
`event_counts` always equals the events counted, a paged report has the rows and totals of the whole one
(also for an operator who may not read every user), and many requests with one API token write its
`last_used` once.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import Engine, Select, event, select, text
from sqlalchemy.ext.asyncio import AsyncConnection

from cloud_bridge.permissions import (
    SYSTEM_ADMINISTRATOR,
    Action,
    Authorizer,
    ObjectType,
    Operator,
    PermissionGroup,
    deny,
    grant,
)
from cloud_bridge.service import auth, schema
from cloud_bridge.service.database import Database
from cloud_bridge.service.events import Filters, insert_ignore, page_query
from cloud_bridge.service.listing import user_ids, user_ids_query
from cloud_bridge.service.reports import access_requests

from .postgres import db_url, postgres_server  # noqa: F401
from .service_harness import admin_client, config, running

NOW = 1_800_000_000.0
DAY = 86400.0


async def _fill(db: Database, users: int = 3000, events: int = 6000) -> None:
    async with db.write() as c:
        await c.execute(schema.users.insert(), [{"id": f"u{i:05d}", "name": f"Person {i} Hopper" if i % 10 == 0
                                                 else f"Person {i}"} for i in range(users)])  # fmt: skip
        await c.execute(schema.events.insert(), [{
            "id": f"{i:032x}", "gateway": "gw1", "seq": i + 1, "type": "access.granted" if i % 9 else "access.denied",
            "ts": NOW - 30 * DAY + i * 30 * DAY / events, "body": b"", "door": f"d{i % 20:02d}", "reader": "r",
            "user_id": f"u{i % users:05d}", "card": 1000 + i % users, "result": "granted" if i % 9 else "denied",
            "reason": "ok"} for i in range(events)])  # fmt: skip
    async with db.write() as c:
        await c.execute(text("ANALYZE"))


async def _plan(c: AsyncConnection, q: Select[Any], off: tuple[str, ...] = ("seqscan", "bitmapscan", "sort")) -> str:
    sql = str(q.compile(dialect=c.dialect, compile_kwargs={"literal_binds": True}))
    if c.dialect.name == "sqlite":
        return "\n".join(str(r[-1]) for r in (await c.execute(text("EXPLAIN QUERY PLAN " + sql))).all())
    # a small table is read whole or sorted even with an index at hand; the question is which index can
    # give the rows in order, as the planner uses it at 100,000 rows: a Sort left in the plan means none can
    for knob in off:
        await c.execute(text(f"SET LOCAL enable_{knob} = off"))
    return "\n".join(str(r[0]) for r in (await c.execute(text("EXPLAIN " + sql))).all())


def _sorted_extra(plan: str) -> bool:
    """Whether the plan sorts rows itself (the index order not enough)."""
    return "TEMP B-TREE FOR ORDER BY" in plan or "RIGHT PART OF ORDER BY" in plan or " Sort " in f" {plan}"


async def test_event_pages_read_their_index_in_order(db_url: str) -> None:  # noqa: F811
    db = Database(db_url)
    try:
        await db.migrate()
        await _fill(db)
        async with db.read() as c:
            cases = [
                (Filters(user="u00042", since=NOW - 7 * DAY, until=NOW), None, "ix_events_user_id_ts_id"),
                (Filters(gateway="gw1", door="d03", result="denied"), None, "ix_events_gateway_door_ts_id"),
                (Filters(kinds=["access.denied"]), None, "ix_events_type_ts_id"),
                (Filters(), (NOW - 3 * DAY, "f" * 32), "ix_events_ts_id"),  # a later page: keyset, a range
                (Filters(user="u00042"), (NOW - 3 * DAY, "f" * 32), "ix_events_user_id_ts_id"),
            ]
            for f, after, index in cases:
                plan = await _plan(c, page_query(f, after, 100))
                assert index in plan and not _sorted_extra(plan), (f, plan)
                if after is not None:  # the keyset condition bounds the index scan (not a filter on every row)
                    bound = "(ts,id)<(?,?)" if c.dialect.name == "sqlite" else "(ROW(ts, (id)::text) < ROW("
                    cond = next(line for line in plan.splitlines() if "SEARCH" in line or "Index Cond" in line)
                    assert bound in cond, plan
            # and the pages are right: newest first, no event twice or left out
            f = Filters(user="u00042")
            ev = schema.events
            want = list((await c.execute(select(ev.c.id).where(ev.c.user_id == "u00042")
                                         .order_by(ev.c.ts.desc(), ev.c.id.desc()))).scalars())  # fmt: skip
            got: list[str] = []
            last: tuple[float, str] | None = None
            while True:
                rows = (await c.execute(page_query(f, last, 1))).all()
                if not rows:
                    break
                got.append(rows[0].id)
                last = (rows[0].ts, rows[0].id)
            assert got == want and len(want) == 2
    finally:
        await db.close()


async def test_users_search_uses_indexes_and_finds_the_same(db_url: str) -> None:  # noqa: F811
    db = Database(db_url)
    try:
        await db.migrate()
        await _fill(db)
        async with db.write() as c:
            await c.execute(schema.users.insert(), [{"id": "ada", "name": "Ada LOVELACE"},
                                                    {"id": "x_1", "name": "100% sure"},
                                                    {"id": "xa1", "name": "Xavier"}])  # fmt: skip
        async with db.read() as c:
            dialect = c.dialect.name
            plan = await _plan(c, user_ids_query(dialect, search="u0001", after=None, limit=100), ("seqscan",))
            assert "ix_users_id_prefix" in plan, plan
            if dialect == "postgresql":  # a part of the name: the trigram index (pg_trgm) answers the ILIKE
                u = schema.users
                plan = await _plan(c, select(u.c.id).where(u.c.name.ilike("%hopper%")), ("seqscan", "indexscan"))
                assert "Bitmap Index Scan on ix_users_name_trgm" in plan, plan
        async with db.read() as c:
            # id prefix, or a part of the name in any case; in id order; paged by `after`
            assert await user_ids(c, search="lovelace", after=None, limit=10) == ["ada"]
            assert await user_ids(c, search="u0001", after=None, limit=3) == ["u00010", "u00011", "u00012"]
            hop = await user_ids(c, search="hOPPER", after=None, limit=500)
            assert hop == [f"u{i:05d}" for i in range(0, 3000, 10)]
            assert await user_ids(c, search="hopper", after="u02970", limit=5) == ["u02980", "u02990"]
            # both halves at once: "u0299" is an id prefix; "Person 2990" etc. are no match for it
            assert await user_ids(c, search="u0299", after=None, limit=20) == [f"u0299{d}" for d in range(10)]
            # LIKE's wildcards are plain characters
            assert await user_ids(c, search="x_", after=None, limit=10) == ["x_1"]
            assert await user_ids(c, search="0%", after=None, limit=10) == ["x_1"]
            assert await user_ids(c, search="zzz", after=None, limit=10) == []
            assert len(await user_ids(c, search="", after=None, limit=50)) == 50
    finally:
        await db.close()


async def test_many_requests_with_one_token_write_last_used_once(db_url: str, tmp_path: Path) -> None:  # noqa: F811
    updates: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_a: Any) -> None:
        if statement.lstrip().upper().startswith("UPDATE API_TOKENS"):
            updates.append(statement)

    cfg = config(db_url, tmp_path)
    async with running(cfg) as svc:
        admin = await admin_client(svc)
        token = (await admin.post("/api/v1/tokens", json={"name": "bench", "expires_days": 1})).json()["token"]
        event.listen(Engine, "before_cursor_execute", count)
        try:
            t0 = time.time()
            clients = [httpx.AsyncClient(base_url=svc.url, timeout=60, headers={"authorization": f"Bearer {token}"})
                       for _ in range(20)]  # fmt: skip
            answers = await asyncio.gather(*(c.get("/api/v1/users") for c in clients for _ in range(3)))
            assert [r.status_code for r in answers] == [200] * 60
            await auth.touch_writes()
            assert len(updates) == 1, updates
            await asyncio.gather(*(c.aclose() for c in clients))
        finally:
            event.remove(Engine, "before_cursor_execute", count)
        listed = (await admin.get("/api/v1/tokens")).json()
        used = [t["last_used"] for t in (listed if isinstance(listed, list) else listed["items"])]
        assert used[0] is not None and used[0] >= t0 - 1
        await admin.aclose()


async def _counted(c: AsyncConnection) -> dict[tuple[str, str, str, float], int]:
    ec = schema.event_counts
    rows = (await c.execute(select(ec.c.bucket, ec.c.gateway, ec.c.door, ec.c.type, ec.c.n))).tuples()
    return {(gw, door, typ, float(b)): int(n) for b, gw, door, typ, n in rows if n}


async def _recount(c: AsyncConnection) -> dict[tuple[str, str, str, float], int]:
    """What `event_counts` must hold: the events counted by door, type and 15-minute bucket."""
    ev = schema.events
    out: dict[tuple[str, str, str, float], int] = {}
    for gw, door, typ, ts in (await c.execute(select(ev.c.gateway, ev.c.door, ev.c.type, ev.c.ts))).tuples():
        key = (gw, door or "", typ, float(ts // schema.COUNT_BUCKET * schema.COUNT_BUCKET))
        out[key] = out.get(key, 0) + 1
    return out


async def test_event_counts_follow_the_events_stored_and_deleted(db_url: str) -> None:  # noqa: F811
    db = Database(db_url)
    try:
        await db.migrate()
        await _fill(db, users=50, events=3000)
        async with db.write() as c:  # a repeat stores nothing and counts nothing; an event without a door
            await insert_ignore(c, schema.events, [
                {"id": f"{7:032x}", "gateway": "gw1", "seq": 8, "type": "access.granted", "ts": NOW, "body": b""},
                {"id": "e-nodoor", "gateway": "gw1", "seq": 90_000, "type": "gateway.started", "ts": NOW - 1.5,
                 "body": b""}])  # fmt: skip
        async with db.read() as c:
            counted = await _counted(c)
            assert counted == await _recount(c) and sum(counted.values()) == 3001
            assert counted[("gw1", "", "gateway.started", float((NOW - 1.5) // 900 * 900))] == 1
        async with db.write() as c:
            await c.execute(schema.events.delete().where(schema.events.c.door == "d03"))
        async with db.read() as c:
            assert await _counted(c) == await _recount(c)
            ec = schema.event_counts  # a day is one range of the key (it starts with the bucket)
            plan = await _plan(c, select(ec.c.n).where(ec.c.bucket >= NOW - DAY, ec.c.bucket < NOW))
            assert "pk_event_counts" in plan or "sqlite_autoindex_event_counts" in plan, plan
    finally:
        await db.close()


async def test_sqlite_name_search_reads_the_trigram_index_and_follows_changes(db_url: str) -> None:  # noqa: F811
    db = Database(db_url)
    try:
        await db.migrate()
        await _fill(db)
        async with db.read() as c:
            if c.dialect.name == "sqlite":
                plan = await _plan(c, user_ids_query("sqlite", search="Hopper", after=None, limit=50, trigram=True))
                assert "VIRTUAL TABLE" in plan and "users_fts" in plan, plan
            # 300 Hoppers (fewer than PROBE: the index) and 3,000 Persons (as many: the id-ordered scan)
            assert len(await user_ids(c, search="hopper", after=None, limit=500)) == 300
            assert await user_ids(c, search="PERSON", after="u00100", limit=3) == ["u00101", "u00102", "u00103"]
            assert await user_ids(c, search='"Hop', after=None, limit=5) == []  # a quote is a character
        u = schema.users
        async with db.write() as c:  # a rename, a new user, a deleted one: the index follows
            await c.execute(u.update().where(u.c.id == "u00010").values(name="Grace Brewster"))
            await c.execute(u.insert().values(id="zed", name="Zed Hopper-Murray"))
            await c.execute(u.delete().where(u.c.id == "u00020"))
        async with db.read() as c:
            hop = await user_ids(c, search="hopper", after=None, limit=500)
            assert len(hop) == 299 and "u00010" not in hop and "u00020" not in hop and hop[-1] == "zed"
            assert await user_ids(c, search="brewster", after=None, limit=5) == ["u00010"]
    finally:
        await db.close()


async def test_a_paged_report_has_the_rows_and_totals_of_the_whole_one(db_url: str) -> None:  # noqa: F811
    db = Database(db_url)
    try:
        await db.migrate()
        await _fill(db, users=300, events=6000)
        day = time.strftime("%Y-%m-%d", time.gmtime(NOW - 3 * DAY))
        everyone = Authorizer([])
        root = Operator(id="root", groups=[SYSTEM_ADMINISTRATOR.id])
        some = Authorizer([PermissionGroup(id="some", permissions=[
            grant(ObjectType.ALL, Action.READ), deny(ObjectType.USER, Action.READ, applies_to=["user:u00007"]),
            deny(ObjectType.EVENT, Action.READ, applies_to=["gw1/d05"])])])  # fmt: skip
        limited = Operator(id="limited", groups=["some"])
        async with db.read() as c:
            for authz, op in ((everyone, root), (some, limited)):
                for reader, person in ((None, None), ("gw1/d03", None), (None, "u00007"), (None, "u00008")):
                    whole = await access_requests(c, authz, op, day=day, tz="UTC", person=person, reader=reader)
                    rows, cursor, pages = [], None, 0
                    while True:
                        part = await access_requests(c, authz, op, day=day, tz="UTC", person=person, reader=reader,
                                                     limit=7, cursor=cursor)  # fmt: skip
                        rows += part.rows
                        pages += 1
                        assert part.totals == whole.totals and part.by_reader == whole.by_reader, (op, reader)
                        if person is not None:
                            assert part.by_person == whole.by_person
                        cursor = part.next_cursor
                        if cursor is None:
                            break
                    assert rows == whole.rows and pages >= len(rows) // 7, (op.id, reader, person)
                    if op is limited:
                        assert all(r.person != "u00007" and r.door != "d05" for r in rows)
                    else:
                        assert whole.totals.granted + whole.totals.denied == len(rows) > 0 or person is not None
    finally:
        await db.close()


async def test_a_remembered_token_is_refused_at_once_after_a_revoke(db_url: str, tmp_path: Path) -> None:  # noqa: F811
    """auth.principal_for remembers a verified token for a second: a revoke in this process applies to the very
    next request; one written by another process (another Database on the same data) within that second."""
    cfg = config(db_url, tmp_path)
    async with running(cfg) as svc:
        admin = await admin_client(svc)
        me = {"authorization": ""}
        for other_process in (False, True):
            made = (await admin.post("/api/v1/tokens", json={"name": "t", "expires_days": 1})).json()
            me["authorization"] = f"Bearer {made['token']}"
            async with httpx.AsyncClient(base_url=svc.url, timeout=60, headers=me) as c:
                assert (await c.get("/api/v1/users")).status_code == 200  # verified and remembered
                assert (await c.get("/api/v1/users")).status_code == 200
                if other_process:
                    other = Database(db_url)
                    try:
                        async with other.write() as w:
                            await w.execute(schema.api_tokens.update().where(schema.api_tokens.c.id == made["id"])
                                            .values(revoked=time.time()))  # fmt: skip
                    finally:
                        await other.close()
                    await asyncio.sleep(auth.CACHE_S + 0.2)
                else:
                    assert (await admin.delete(f"/api/v1/tokens/{made['id']}")).status_code == 200
                assert (await c.get("/api/v1/users")).status_code == 401
        await admin.aclose()
