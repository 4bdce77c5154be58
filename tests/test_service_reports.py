"""Seed 003's reports on both databases, over real HTTP: the access request report per person / reader /
site-local day from the `events` table, access rights for a person and for a reader, as JSON and as CSV with
formula cells neutralised, and rows filtered to what the operator may read."""

# ruff: noqa: F811

from __future__ import annotations

import csv
import io
import time
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx

from cloud_bridge.permissions import Action, ObjectType, PermissionGroup, grant
from cloud_bridge.protocol import EventBatch
from cloud_bridge.service.database import Database
from cloud_bridge.service.events import EventService
from cloud_bridge.service.reports import neutralise
from edge.events import Event

from .postgres import db_url, postgres_server  # noqa: F401
from .service_harness import PASSWORD, admin_client, config, login, running
from .test_service_integ import add_operator, announce

TZ = ZoneInfo("Europe/Berlin")  # the harness's site time zone
EVIL = ['=HYPERLINK("http://x","y")', "+1+1", "-2+3", "@SUM(A1)", "\tx", "\rx"]


def at(day: str, hhmm: str) -> float:
    return datetime.fromisoformat(f"{day}T{hhmm}:00").replace(tzinfo=TZ).timestamp()


async def store_events(db_url: str, rows: list[tuple[float, str, str, int, str | None, str | None]]) -> None:
    """(ts, type, door, card, user, reason) on gw1, stored as the service's collector stores a batch."""
    db = Database(db_url)
    try:
        events = [Event(id=f"{i:032x}", seq=i, type=typ, ts=ts, local=datetime.fromtimestamp(ts, TZ).isoformat(),
                        link_up=True, door=door, reader=f"{door}.wiegand", card=card, user=user, reason=reason)
                  for i, (ts, typ, door, card, user, reason) in enumerate(rows, 1)]  # fmt: skip
        await EventService(db).store_batch("gw1", EventBatch(first_seq=1, last_seq=len(rows), events=events))
    finally:
        await db.close()


def table(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text)))


def test_formula_cells_are_neutralised() -> None:
    # OWASP "CSV Injection": cells starting with = + - @ tab or CR are prefixed with an apostrophe
    assert [neutralise(v) for v in EVIL] == ["'" + v for v in EVIL]
    assert [neutralise(v) for v in ("alice", "12", "", None, 5, "a=b")] == ["alice", "12", "", "", "5", "a=b"]


async def test_access_request_report_per_person_reader_and_day(db_url: str, tmp_path: Path) -> None:
    cfg = config(db_url, tmp_path)
    async with running(cfg) as svc:
        await announce(db_url, "gw1", {"front": "Front", "lab": "Lab"})
        c = await admin_client(svc)
        for uid, name in (("alice", EVIL[0]), ("bob", "Bob")):
            assert (await c.post("/api/v1/users", json={"id": uid, "name": name})).status_code == 201
        d1, d2 = "2026-03-28", "2026-03-29"  # Europe/Berlin moves to summer time in the night to the 29th
        await store_events(db_url, [
            (at(d1, "08:00"), "access.granted", "front", 11, "alice", "granted"),
            (at(d1, "08:05"), "access.denied", "lab", 11, "alice", "no_group_for_door"),
            (at(d1, "09:00"), "access.granted", "front", 22, "bob", "granted"),
            (at(d1, "23:59"), "access.denied", "front", 99, None, "unknown_card"),
            (at(d1, "10:00"), "door.forced_open", "front", 0, None, None),  # not an access request
            (at(d2, "00:00"), "access.granted", "front", 11, "alice", "granted"),  # the next local day
        ])  # fmt: skip
        r = await c.get("/api/v1/reports/access-requests", params={"day": d1})
        assert r.status_code == 200, r.text
        rep = r.json()
        assert [(x["person"], x["door"], x["result"]) for x in rep["rows"]] == [
            ("alice", "front", "granted"), ("alice", "lab", "denied"), ("bob", "front", "granted"),
            ("", "front", "denied")]  # fmt: skip
        assert rep["totals"] == {"granted": 2, "denied": 2}
        assert rep["by_person"]["alice"] == {"granted": 1, "denied": 1}
        assert rep["by_reader"]["gw1/front"] == {"granted": 2, "denied": 1}
        assert rep["rows"][0]["person_name"] == EVIL[0] and rep["rows"][0]["local"].startswith(f"{d1}T08:00")
        # one person; one reader; the next day
        alice = (await c.get("/api/v1/reports/access-requests", params={"day": d1, "person": "alice"})).json()
        assert [x["door"] for x in alice["rows"]] == ["front", "lab"]
        lab = (await c.get("/api/v1/reports/access-requests", params={"day": d1, "reader": "gw1/lab"})).json()
        assert [x["person"] for x in lab["rows"]] == ["alice"]
        nxt = (await c.get("/api/v1/reports/access-requests", params={"day": d2})).json()
        assert [x["person"] for x in nxt["rows"]] == ["alice"]
        # CSV: the formula in the name is neutralised
        r = await c.get("/api/v1/reports/access-requests", params={"day": d1, "person": "alice", "format": "csv"})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
        assert f'filename="access-requests-{d1}.csv"' in r.headers["content-disposition"]
        rows = table(r.text)
        assert rows[0] == ["time", "gateway", "door", "reader", "card", "person", "name", "result", "reason"]
        assert rows[1][5:8] == ["alice", "'" + EVIL[0], "granted"] and rows[2][8] == "no_group_for_door"
        # bad input is named
        r = await c.get("/api/v1/reports/access-requests", params={"day": "28.03.2026"})
        assert r.status_code == 400 and r.json()["field"] == "query.day"
        r = await c.get("/api/v1/reports/access-requests", params={"reader": "front"})
        assert r.status_code == 400 and r.json()["field"] == "query.reader"
        r = await c.get("/api/v1/reports/access-requests", params={"format": "xlsx"})
        assert r.status_code == 400 and r.json()["field"] == "query.format"

        # an operator who may read events and doors but only bob: alice's rows are not in the report
        await add_operator(db_url, cfg, "auditor", PermissionGroup(id="bob-only", permissions=[
            grant(ObjectType.EVENT, Action.READ), grant(ObjectType.DOOR, Action.READ),
            grant(ObjectType.GROUP, Action.READ),
            grant(ObjectType.USER, Action.READ, applies_to=["user:bob"])]))  # fmt: skip
        a = httpx.AsyncClient(base_url=svc.url, timeout=30)
        await login(a, "auditor", PASSWORD)
        rep = (await a.get("/api/v1/reports/access-requests", params={"day": d1})).json()
        assert {x["person"] for x in rep["rows"]} == {"bob", ""}
        # without event read: 403 naming it
        await add_operator(db_url, cfg, "clerk", PermissionGroup(id="people", permissions=[
            grant(ObjectType.USER, Action.READ)]))  # fmt: skip
        k = httpx.AsyncClient(base_url=svc.url, timeout=30)
        await login(k, "clerk", PASSWORD)
        r = await k.get("/api/v1/reports/access-requests")
        assert r.status_code == 403 and r.json()["missing"]["object_type"] == "event"
        for x in (a, k, c):
            await x.aclose()


async def test_access_rights_for_a_person_and_for_a_reader(db_url: str, tmp_path: Path) -> None:
    cfg = config(db_url, tmp_path)
    async with running(cfg) as svc:
        await announce(db_url, "gw1", {"front": "Front", "lab": "Lab"})
        c = await admin_client(svc)
        await c.put("/api/v1/groups/staff", json={"doors": [{"gateway": "gw1", "door": "front"}]})
        await c.put("/api/v1/groups/labs", json={"doors": [{"gateway": "gw1", "door": "lab"},
                                                          {"gateway": "gw1", "door": "front"}]})  # fmt: skip
        await c.post("/api/v1/users", json={"id": "alice", "name": "@alice", "cards": [{"card": 11}],
                                            "groups": ["staff", "labs"]})  # fmt: skip
        await c.post("/api/v1/users", json={"id": "bob", "cards": [{"card": 22}]})
        until = time.time() + 3600
        r = await c.put("/api/v1/integrations/identity/assignments/A-9", json={
            "user_id": "bob", "entitlement": "labs", "valid_until": until})  # fmt: skip
        assert r.status_code == 200, r.text
        # an ended assignment is no right
        await c.put("/api/v1/integrations/identity/assignments/A-10", json={
            "user_id": "bob", "entitlement": "staff", "valid_from": 1.0, "valid_until": 2.0})  # fmt: skip

        r = await c.get("/api/v1/reports/access-rights/person/alice")
        assert r.status_code == 200, r.text
        assert [(x["group"], x["door"], x["exported"]) for x in r.json()["rows"]] == [
            ("labs", "front", True), ("labs", "lab", True), ("staff", "front", True)]  # fmt: skip
        assert r.json()["rows"][0]["cards"] == [11] and r.json()["rows"][0]["door_name"] == "Front"
        r = await c.get("/api/v1/reports/access-rights/reader/gw1/front")
        assert [(x["person"], x["group"]) for x in r.json()["rows"]] == [
            ("alice", "labs"), ("alice", "staff"), ("bob", "labs")]  # fmt: skip
        assert r.json()["rows"][2]["valid_until"] == until
        r = await c.get("/api/v1/reports/access-rights/reader/gw1/lab", params={"format": "csv"})
        rows = table(r.text)
        assert rows[0][:5] == ["person", "name", "group", "gateway", "door"]
        assert [x[0] for x in rows[1:]] == ["alice", "bob"] and rows[1][1] == "'@alice"
        assert (await c.get("/api/v1/reports/access-rights/person/nobody")).status_code == 404
        await c.aclose()
