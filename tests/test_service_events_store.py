"""The service's event store on both databases: every event once (a batch sent again, or received twice, is
counted, not stored twice), out-of-order batches acknowledged once the gap closes, live door state, alarms
raised and cleared, gateway status from births and deaths, history pages stable under inserts, CSV cells
that a spreadsheet would run are neutralised; and the collector reconnecting after a broker outage."""

# ruff: noqa: F811

from __future__ import annotations

import asyncio
import csv
import io
import time
from pathlib import Path

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import select

from cloud_bridge.operator.collector import Collector, store_batch
from cloud_bridge.operator.db import Model
from cloud_bridge.permissions import (
    SYSTEM_ADMINISTRATOR,
    Action,
    Authorizer,
    ObjectType,
    Operator,
    PermissionGroup,
    grant,
)
from cloud_bridge.protocol import Birth, Death, EventBatch
from cloud_bridge.service import schema
from cloud_bridge.service.database import Database
from cloud_bridge.service.events import CSV_COLUMNS, EventService, Filters, csv_cell, csv_rows, event_out, page
from cloud_bridge.service.importer import import_site_db
from edge.events import Event

from .broker import broker, gateway, site_key  # noqa: F401
from .mosquitto import Mosquitto
from .postgres import db_url, postgres_server  # noqa: F401
from .test_service_db import make_site_db

T0 = 1_795_425_700.0
ADMIN = Operator(id="root", groups=[SYSTEM_ADMINISTRATOR.id])


def ev(seq: int, type: str = "access.denied", door: str | None = "front", **kw: object) -> Event:
    base: dict[str, object] = {"id": f"{seq:032x}", "seq": seq, "type": type, "ts": T0 + seq,
                               "local": "2026-11-23T09:00:00+01:00", "link_up": True, "door": door}  # fmt: skip
    base.update(kw)
    return msgspec.convert(base, Event)


def batch(events: list[Event], prev: int) -> EventBatch:
    return EventBatch(first_seq=events[0].seq, last_seq=events[-1].seq, events=events, prev_seq=prev, ref="r")


async def _db(url: str) -> Database:
    db = Database(url)
    await db.migrate()
    return db


async def test_every_event_once_out_of_order_acknowledged_when_the_gap_closes(db_url: str) -> None:
    db = await _db(db_url)
    try:
        svc = EventService(db)
        s = await svc.store_batch("gw1", batch([ev(1), ev(2)], 0))
        assert s.upto == 2 and len(s.new) == 2 and s.duplicates == 0
        # batch 5..6 before 3..4: stored, but the acknowledgement stays at 2 until the gap closes
        s = await svc.store_batch("gw1", batch([ev(5), ev(6)], 4))
        assert s.upto == 2 and len(s.new) == 2
        s = await svc.store_batch("gw1", batch([ev(3), ev(4)], 2))
        assert s.upto == 6
        # the same batch again (a resend after a lost ack): nothing stored twice, counted
        s = await svc.store_batch("gw1", batch([ev(3), ev(4)], 2))
        assert s.upto == 6 and s.new == [] and s.duplicates == 2
        # the same seq with another id is not a second event either
        s = await svc.store_batch("gw1", batch([msgspec.structs.replace(ev(6), id="f" * 32), ev(7)], 5))
        assert [e.seq for e in s.new] == [7] and s.duplicates == 1 and s.upto == 7
        # another gateway's seq 1 is its own
        assert (await svc.store_batch("gw2", batch([ev(1, id="e" * 32)], 0))).upto == 1
        async with db.read() as c:
            n = len((await c.execute(select(schema.events.c.id))).all())
            st = (await c.execute(select(schema.gateway_status).where(schema.gateway_status.c.gateway == "gw1"))).one()
        assert n == 8
        assert (st.events_upto, st.events_stored, st.duplicates) == (7, 7, 3)
    finally:
        await db.close()


async def test_an_imported_high_water_mark_carries_over(db_url: str) -> None:
    """A site database of `cloud-bridge collect` imported into the service: its collector acknowledged up to
    10, so the gateway's next batch starts after 10 and is acknowledged (not held for a gap that never closes)."""
    db = await _db(db_url)
    try:
        async with db.write() as c:
            await c.execute(schema.gateways.insert().values(
                id="gw1", online=False, session=0, reported_version=0, version=0, acked=0, events_upto=10,
                software=""))  # fmt: skip
        s = await EventService(db).store_batch("gw1", batch([ev(11), ev(12)], 10))
        assert s.upto == 12
    finally:
        await db.close()


async def test_door_state_alarms_and_gateway_status(db_url: str) -> None:
    db = await _db(db_url)
    try:
        svc = EventService(db)
        await svc.status("gw1", Birth(site="s1", gateway="gw1", session=5, software="edge 1.2", rights_version=7,
                                      journal_depth=42, warnings=["plain MQTT"]))  # fmt: skip
        events = [
            ev(1, "door.state", detail={"lock": "unlocked", "cause": "grant"}),
            ev(2, "door.state", detail={"contact": "closed", "lock": "locked", "cause": "start"}),
            ev(3, "door.state", detail={"contact": "open"}),
            ev(4, "door.forced_open", detail={"state": "active"}),
            ev(5, "reader.status", reader="front.osdp", detail={"online": False}),
            ev(6, "alarm.pin_lockout", card=1001),
            ev(7, "command.executed", door=None, detail={"action": "lockdown", "active": True}),
            ev(8, "command.executed", detail={"action": "door_mode", "mode": "unlocked"}),
        ]
        await svc.store_batch("gw1", batch(events, 0))
        async with db.read() as c:
            ds = (await c.execute(select(schema.door_state))).one()
            alarms = {r.kind: r for r in (await c.execute(select(schema.alarms))).all()}
            gs = (await c.execute(select(schema.gateway_status))).one()
        assert (ds.lock, ds.contact, ds.forced, ds.mode) == ("locked", "open", True, "unlocked")
        assert set(alarms) == {"forced", "reader_offline", "pin_lockout"}
        assert alarms["forced"].state == "open" and alarms["forced"].cleared_at is None
        assert (gs.online, gs.software, gs.rights_version, gs.journal_depth, gs.lockdown) == (
            True, "edge 1.2", 7, 42, True)  # fmt: skip
        # the door closes: forced is cleared (the alarm stays listed until acknowledged)
        await svc.store_batch("gw1", batch([ev(9, "door.state", detail={"contact": "closed"}),
                                            ev(10, "door.forced_open", detail={"state": "cleared"})], 8))  # fmt: skip
        # an older event arriving late does not move the door back
        await svc.store_batch("gw1", batch([ev(0, "door.state", id="a" * 32, detail={"contact": "open"})], 0))
        async with db.read() as c:
            ds = (await c.execute(select(schema.door_state))).one()
            forced = (await c.execute(select(schema.alarms).where(schema.alarms.c.kind == "forced"))).one()
        assert (ds.contact, ds.forced) == ("closed", False)
        assert forced.cleared_at == T0 + 10 and forced.state == "open"
        # a stale will (older session) is ignored; the current one takes the gateway offline
        await svc.status("gw1", Death(site="s1", gateway="gw1", session=4))
        async with db.read() as c:
            assert (await c.execute(select(schema.gateway_status.c.online))).scalar() is True
        await svc.status("gw1", Death(site="s1", gateway="gw1", session=5))
        async with db.read() as c:
            assert (await c.execute(select(schema.gateway_status.c.online))).scalar() is False
    finally:
        await db.close()


async def test_history_pages_filters_and_permissions(db_url: str) -> None:
    db = await _db(db_url)
    try:
        svc = EventService(db)
        evs = [ev(i, "access.granted" if i % 2 else "access.denied", door="front" if i % 3 else "lab",
                  user=f"u{i % 4}") for i in range(1, 41)]  # fmt: skip
        await svc.store_batch("gw1", batch(evs, 0))
        authz = Authorizer()
        seen: list[int] = []
        cursor: str | None = None
        async with db.read() as c:
            first = await page(c, authz, ADMIN, Filters(), limit=7, cursor=None)
        # new events stored between pages (newer and older than the cursor) neither repeat nor skip a row
        await svc.store_batch("gw1", batch([ev(41), ev(42)], 40))
        seen = [e.seq for e in first.items]
        cursor = first.next_cursor
        while cursor is not None:
            async with db.read() as c:
                p = await page(c, authz, ADMIN, Filters(), limit=7, cursor=cursor)
            seen += [e.seq for e in p.items]
            cursor = p.next_cursor
        assert seen == list(range(40, 0, -1))
        async with db.read() as c:
            p = await page(c, authz, ADMIN, Filters(door="lab", result="denied", kinds=["access.*"]), limit=100,
                           cursor=None)  # fmt: skip
            assert [e.seq for e in p.items] == [i for i in range(40, 0, -1) if i % 3 == 0 and i % 2 == 0]
            p = await page(c, authz, ADMIN, Filters(user="u1", since=T0 + 10, until=T0 + 30), limit=100, cursor=None)
            assert [e.seq for e in p.items] == [29, 25, 21, 17, 13]
            # an operator who may read only the lab's events sees only those, in full pages
            lab = PermissionGroup(id="lab-watch", permissions=[grant(ObjectType.EVENT, Action.READ,
                                                                     applies_to=["gw1/lab"])])  # fmt: skip
            watcher = Operator(id="w", groups=["lab-watch"])
            a2 = Authorizer([lab])
            p = await page(c, a2, watcher, Filters(), limit=5, cursor=None)
            assert [e.seq for e in p.items] == [39, 36, 33, 30, 27]
            # by kind: a grant for granted decisions only (tag = the event's kind)
            only = PermissionGroup(id="granted", permissions=[grant(ObjectType.EVENT, Action.READ,
                                                                    tags=["access.granted"])])  # fmt: skip
            p = await page(c, Authorizer([only]), Operator(id="g", groups=["granted"]), Filters(), limit=3,
                           cursor=None)  # fmt: skip
            assert [e.type for e in p.items] == ["access.granted"] * 3
    finally:
        await db.close()


def test_csv_cells_a_spreadsheet_would_run_are_neutralised() -> None:
    # OWASP "CSV Injection": cells starting with = + - @ tab or carriage return
    for bad in ('=HYPERLINK("http://x")', "+1+1", "-2+3", "@SUM(A1)", "\tx", "\rx"):
        assert csv_cell(bad) == "'" + bad
    assert csv_cell("alice") == "alice" and csv_cell(None) == "" and csv_cell(1001) == "1001"
    text = csv_rows([event_out("gw1", ev(1, user="=cmd|' /C calc'!A0", reason="@x"))])
    row = next(csv.reader(io.StringIO(text)))
    assert row[CSV_COLUMNS.index("user")] == "'=cmd|' /C calc'!A0"
    assert row[CSV_COLUMNS.index("reason")] == "'@x"


async def test_the_collector_reconnects_after_a_broker_outage(
    broker: Mosquitto, site_key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    db = await _db(f"sqlite+aiosqlite:///{tmp_path / 'svc.db'}")
    svc = EventService(db)
    col = Collector(svc, host=broker.host, port=broker.port, site="s1", signing_key=site_key, status=svc)
    task = asyncio.get_running_loop().create_task(col.run(), name="collector")
    try:
        async with gateway(broker, tmp_path / "gw", site_key, site="s1", gw="gw1") as g:
            await asyncio.wait_for(col.connected.wait(), 10)
            g.journal.record("access.denied", door="front", card=1)
            await _until(lambda: g.journal.depth == 0, 20)  # stored and acknowledged
            broker.stop()
            await _until(lambda: not col.connected.is_set(), 20)
            broker.start()
            await asyncio.wait_for(col.connected.wait(), 20)
            assert col.connects >= 2
            g.journal.record("access.denied", door="front", card=2)
            await _until(lambda: g.journal.depth == 0, 30)
        async with db.read() as c:
            cards = sorted((await c.execute(select(schema.events.c.card).where(
                schema.events.c.type == "access.denied"))).scalars())  # fmt: skip
        assert cards == [1, 2]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await db.close()


async def _until(pred: object, timeout: float) -> None:
    assert callable(pred)
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def test_a_batch_is_acknowledged_only_after_it_is_committed(
    broker: Mosquitto, site_key: Ed25519PrivateKey, tmp_path: Path, db_url: str
) -> None:
    """The database refuses the events (a trigger): nothing is acknowledged, the gateway keeps them; once the
    database takes them again, the gateway's resend is stored and acknowledged."""
    db = await _db(db_url)
    pg = db.dialect == "postgresql"
    async with db.write() as c:
        if pg:
            await c.exec_driver_sql("CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS "
                                    "$$ BEGIN RAISE EXCEPTION 'disk full'; END $$")  # fmt: skip
            await c.exec_driver_sql("CREATE TRIGGER refuse BEFORE INSERT ON events FOR EACH ROW EXECUTE FUNCTION "
                                    "refuse()")  # fmt: skip
        else:
            await c.exec_driver_sql("CREATE TRIGGER refuse BEFORE INSERT ON events BEGIN "
                                    "SELECT RAISE(ABORT, 'disk full'); END")  # fmt: skip
    svc = EventService(db)
    col = Collector(svc, host=broker.host, port=broker.port, site="s1", signing_key=site_key)
    task = asyncio.get_running_loop().create_task(col.run(), name="collector")
    try:
        async with gateway(broker, tmp_path / "gw", site_key, site="s1", gw="gw1", ack_timeout_s=1.0) as g:
            await asyncio.wait_for(col.connected.wait(), 10)
            g.journal.record("access.denied", door="front", card=7)
            await _until(lambda: col.failures >= 2, 20)  # refused, and refused again when resent
            assert g.journal.depth == 1  # never acknowledged
            async with db.write() as c:
                await c.exec_driver_sql("DROP TRIGGER refuse ON events" if pg else "DROP TRIGGER refuse")
            await _until(lambda: g.journal.depth == 0, 20)
        async with db.read() as c:
            rows = (await c.execute(select(schema.events.c.card))).scalars().all()
        assert list(rows) == [7]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await db.close()


async def test_events_of_an_imported_site_database_are_found_by_the_filters(db_url: str, tmp_path: Path) -> None:
    """`serve --init --import site.db`: the events `cloud-bridge collect` stored get the filter columns, and
    the gateway's next batch (after what that collector acknowledged) is acknowledged by the service."""
    src = tmp_path / "site.db"
    make_site_db(src)
    m = Model(src)
    assert store_batch(m, "gw1", batch([ev(1), ev(2, "access.granted", door="lab", user="alice")], 0)) == 2
    m.close()
    db = await _db(db_url)
    try:
        await import_site_db(src, db)
        async with db.read() as c:
            p = await page(c, Authorizer(), ADMIN, Filters(door="lab", result="granted", user="alice"), limit=10,
                           cursor=None)  # fmt: skip
        assert [e.seq for e in p.items] == [2]
        assert (await EventService(db).store_batch("gw1", batch([ev(3)], 2))).upto == 3
    finally:
        await db.close()
