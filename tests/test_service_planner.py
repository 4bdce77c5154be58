"""The service's planner on its data layer (`service/planner.py`) against the CLI's reference planner on an
SQLite `Model` (`operator/provision.plan`), on random sites, on both databases: the same site in both, planned
at the same time, must give every gateway the same shadow (object for object, byte for byte) and an outbox
entry of the same kind carrying the same changes (a change set's changes as a multiset, a snapshot's objects);
then random edits (users added, deleted, renamed, cards lost, assignments ended, groups moved, doors gone,
export rules flipped) and a second plan, which must again agree; a third plan with nothing changed plans
nothing in either."""

# ruff: noqa: F811

from __future__ import annotations

import asyncio
import random
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec
import pytest
from sqlalchemy import delete, select

from cloud_bridge.cloud import chunk_snapshot
from cloud_bridge.operator.db import Model
from cloud_bridge.operator.provision import plan
from cloud_bridge.service import schema
from cloud_bridge.service.database import Database
from cloud_bridge.service.planner import ServiceStore
from edge.model import ChangeSet, Interval, Schedule, Snapshot

from .postgres import db_url, postgres_server  # noqa: F401

NOW = 1_800_000_000.0
_enc = msgspec.msgpack.Encoder()

#: The site tables both planners read, with their columns (as `Model` has them).
Rows = dict[str, list[dict[str, Any]]]


def random_site(r: random.Random) -> Rows:
    gws = [f"gw{i}" for i in range(r.randint(1, 3))]
    doors = [{"gateway": g, "id": f"d{j}", "name": f"Door {j}"} for g in gws for j in range(r.randint(1, 3))]
    scheds = [
        {
            "id": f"s{i}",
            "body": _enc.encode(
                Schedule(id=f"s{i}", intervals=[Interval(day=r.randint(0, 6), start="08:00", end="17:00")])
            ),
        }
        for i in range(2)
    ]
    groups = [
        {"id": f"g{i}", "name": f"Group {i}", "schedule": r.choice([None, "s0", "s1"]), "tags": ""}
        for i in range(r.randint(1, 5))
    ]
    gdoors = {(g["id"], d["gateway"], d["id"]) for g in groups for d in doors if r.random() < 0.4}
    users, creds, assigns = [], [], []
    card = 1000
    for i in range(r.randint(0, 60)):
        uid = f"u{i:03d}"
        users.append(
            {
                "id": uid,
                "name": r.choice(["", f"Person {i}"]),
                "active": r.random() < 0.9,
                "offline_access": r.random() < 0.3,
                "kind": "user",
                "valid_from": r.choice([None, NOW - 100]),
                "valid_until": r.choice([None, None, NOW - 1, NOW + 99]),
            }
        )
        for _ in range(r.randint(0, 2)):
            card += r.randint(1, 5)
            creds.append(
                {
                    "card": card,
                    "user_id": uid,
                    "status": r.choice(["active", "active", "lost", "suspended"]),
                    "format": "h10301",
                    "valid_from": None,
                    "valid_until": r.choice([None, NOW - 5, NOW + 50]),
                }
            )
        for g in r.sample(groups, r.randint(0, min(2, len(groups)))):
            assigns.append(
                {
                    "id": len(assigns) + 1,
                    "user_id": uid,
                    "group_id": g["id"],
                    "valid_from": r.choice([None, NOW + 10]),
                    "valid_until": r.choice([None, NOW - 3, NOW + 500]),
                }
            )
    meta = [
        {"key": "deleteUserOnNoAccessToken", "value": r.choice(["1", "0"])},
        {"key": "deleteUserOnNoEntitlement", "value": r.choice(["1", "1", "0"])},
    ]
    return {
        "gateways": [{"id": g} for g in gws],
        "doors": doors,
        "schedules": scheds,
        "groups": groups,
        "group_doors": [{"group_id": a, "gateway": b, "door": c} for a, b, c in sorted(gdoors)],
        "users": users,
        "credentials": creds,
        "assignments": assigns,
        "meta": meta,
    }


def edit(r: random.Random, s: Rows) -> Rows:
    s = {k: [dict(x) for x in v] for k, v in s.items()}
    gone = {u["id"] for u in s["users"] if r.random() < 0.15}
    s["users"] = [u for u in s["users"] if u["id"] not in gone]
    s["credentials"] = [c for c in s["credentials"] if c["user_id"] not in gone]
    s["assignments"] = [a for a in s["assignments"] if a["user_id"] not in gone]
    for u in s["users"]:
        if r.random() < 0.2:
            u["name"] = f"Renamed {u['id']}"
    for c in s["credentials"]:
        if r.random() < 0.15:
            c["status"] = "lost"
        elif r.random() < 0.1:  # the card moves to another user
            c["user_id"] = r.choice(s["users"])["id"]
    for a in s["assignments"]:
        if r.random() < 0.15:
            a["valid_until"] = NOW - 1
    for i in range(r.randint(0, 15)):
        uid = f"n{i:03d}"
        s["users"].append(
            {
                "id": uid,
                "name": "",
                "active": True,
                "offline_access": False,
                "kind": "user",
                "valid_from": None,
                "valid_until": None,
            }
        )
        s["credentials"].append(
            {
                "card": 900_000 + i,
                "user_id": uid,
                "status": "active",
                "format": "h10301",
                "valid_from": None,
                "valid_until": None,
            }
        )
        if s["groups"]:
            s["assignments"].append(
                {
                    "id": 10_000 + i,
                    "user_id": uid,
                    "group_id": r.choice(s["groups"])["id"],
                    "valid_from": None,
                    "valid_until": None,
                }
            )
    if r.random() < 0.5 and s["doors"]:  # a door gone from its gateway's birth
        d = s["doors"].pop(r.randrange(len(s["doors"])))
        s["group_doors"] = [x for x in s["group_doors"] if (x["gateway"], x["door"]) != (d["gateway"], d["id"])]
    if r.random() < 0.5 and s["groups"]:  # a group opens other doors
        g = r.choice(s["groups"])["id"]
        s["group_doors"] = [x for x in s["group_doors"] if x["group_id"] != g]
        s["group_doors"] += [
            {"group_id": g, "gateway": d["gateway"], "door": d["id"]} for d in s["doors"] if r.random() < 0.5
        ]
    if r.random() < 0.3:
        s["meta"][0]["value"] = "1" if s["meta"][0]["value"] == "0" else "0"
    return s


ORDER = ("meta", "gateways", "doors", "schedules", "groups", "group_doors", "users", "credentials", "assignments")


def write_model(m: Model, s: Rows) -> None:
    with m.tx() as c:
        for t in reversed(ORDER):
            if t != "gateways":  # the link's versions stay
                c.execute(f"DELETE FROM {t}")
        for t in ORDER:
            for row in s[t]:
                if t == "gateways":
                    c.execute("INSERT OR IGNORE INTO gateways (id) VALUES (?)", (row["id"],))
                    continue
                cols = list(row)
                vals = [int(v) if isinstance(v, bool) else v for v in row.values()]
                c.execute(f"INSERT INTO {t} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})", vals)


async def write_db(db: Database, s: Rows) -> None:
    async with db.write() as c:
        for t in reversed(ORDER):
            if t != "gateways":
                await c.execute(delete(schema.metadata.tables[t]))
        for t in ORDER:
            table = schema.metadata.tables[t]
            for row in s[t]:
                if t == "gateways":
                    if (await c.execute(select(table.c.id).where(table.c.id == row["id"]))).first() is None:
                        await c.execute(table.insert().values(id=row["id"]))
                    continue
                await c.execute(table.insert().values(**row))


def model_state(m: Model) -> tuple[dict[str, dict[tuple[str, str], bytes]], dict[str, tuple[int, list[Any]]]]:
    shadow: dict[str, dict[tuple[str, str], bytes]] = {}
    for gw, kind, key, body in m.con.execute("SELECT gateway, kind, key, body FROM shadow"):
        shadow.setdefault(gw, {})[(kind, key)] = bytes(body)
    out = {
        gw: (
            int(v),
            list(
                m.con.execute(
                    "SELECT to_version, from_version, kind, body FROM outbox WHERE gateway=? ORDER BY to_version", (gw,)
                )
            ),
        )
        for gw, v in m.con.execute("SELECT id, version FROM gateways")
    }
    return shadow, out


async def db_state(db: Database) -> tuple[dict[str, dict[tuple[str, str], bytes]], dict[str, tuple[int, list[Any]]]]:
    sh, ob, g = schema.shadow, schema.outbox, schema.gateways
    shadow: dict[str, dict[tuple[str, str], bytes]] = {}
    async with db.read() as c:
        for gw, kind, key, body in (await c.execute(select(sh.c.gateway, sh.c.kind, sh.c.key, sh.c.body))).all():
            shadow.setdefault(gw, {})[(kind, key)] = bytes(body)
        out = {}
        for gw, v in (await c.execute(select(g.c.id, g.c.version))).all():
            rows = (
                await c.execute(
                    select(ob.c.to_version, ob.c.from_version, ob.c.kind, ob.c.body)
                    .where(ob.c.gateway == gw)
                    .order_by(ob.c.to_version)
                )
            ).all()
            out[gw] = (int(v), [tuple(x) for x in rows])
    return shadow, out


def content(kind: str, body: bytes) -> Counter[bytes]:
    """What an outbox entry carries, independent of the order within a kind."""
    if kind == "cs":
        cs = msgspec.msgpack.decode(body, type=ChangeSet)
        return Counter(_enc.encode(ch) for ch in cs.changes) + Counter([f"{cs.from_version}>{cs.to_version}".encode()])
    snap = msgspec.msgpack.decode(body, type=Snapshot)
    return Counter(
        _enc.encode(o) for f in snap.__struct_fields__ if isinstance(v := getattr(snap, f), list) for o in v
    ) + Counter([f"v{snap.version}".encode()])


def same(old: Any, new: Any) -> None:
    (osh, oob), (nsh, nob) = old, new
    assert osh == nsh
    assert oob.keys() == nob.keys()
    for gw in oob:
        (ov, orows), (nv, nrows) = oob[gw], nob[gw]
        assert ov == nv, gw
        assert [r[:3] for r in orows] == [tuple(r[:3]) for r in nrows], gw
        for o, n in zip(orows, nrows, strict=True):
            assert content(o[2], bytes(o[3])) == content(n[2], bytes(n[3])), gw


@pytest.mark.parametrize("seed", range(6))
def test_the_service_planner_gives_every_gateway_what_the_reference_planner_gives(
    db_url: str, tmp_path: Path, seed: int
) -> None:
    async def go() -> None:
        r = random.Random(seed)
        m = Model(tmp_path / "ref.db")
        db = Database(db_url)
        await db.migrate()
        store = ServiceStore(db)
        try:
            s = random_site(r)
            for round_ in range(3):
                write_model(m, s)
                await write_db(db, s)
                ref_refused: list[str] = []
                new_refused: list[str] = []
                a = plan(m, now=NOW + round_, refused=ref_refused)
                b = await store.plan(now=NOW + round_, refused=new_refused)
                assert a == b
                assert ref_refused == new_refused
                same(model_state(m), await db_state(db))
                if round_ == 0:
                    s = edit(r, s)
                elif round_ == 2:
                    assert a == {}  # nothing changed: nothing planned
                # the gateways acknowledge (the outbox empties the same way)
                for gw in list(a):
                    v = int(m.con.execute("SELECT version FROM gateways WHERE id=?", (gw,)).fetchone()[0])
                    m.set_acked(gw, v)
                    await store.set_acked(gw, v)
        finally:
            m.close()
            await db.close()

    asyncio.run(go())


def test_a_gateway_ahead_of_the_database_is_sent_everything_as_a_snapshot(db_url: str) -> None:
    """A birth reporting a version ahead of ours (a gateway restored from a backup): its shadow and outbox are
    forgotten, the numbering moves past it, and the next plan leads to a snapshot of the whole site (no change
    set chain starts at the version the gateway holds)."""

    async def go() -> None:
        db = Database(db_url)
        await db.migrate()
        store = ServiceStore(db)
        try:
            s = random_site(random.Random(7))
            await write_db(db, s)
            gw = s["gateways"][0]["id"]
            await store.plan(now=NOW)
            await store.reconcile(gw, 41)
            assert store.reset == {gw}
            assert await store.versions(gw) == (41, 42)
            assert await store.pending(gw, 41) == []
            await store.plan(now=NOW, gateways=[gw])
            assert gw not in store.reset
            assert await store.versions(gw) == (41, 43)
            assert await store.pending(gw, 41) is None  # no change-set chain from 41: the link sends a snapshot
            snap = await store.shadow_snapshot(gw)
            shadow, _ = await db_state(db)
            assert snap.version == 43 and len(shadow[gw]) == sum(
                len(getattr(snap, f)) for f in snap.__struct_fields__ if isinstance(getattr(snap, f), list)
            )
        finally:
            await db.close()

    asyncio.run(go())


def test_a_planned_snapshot_is_handed_to_the_link_as_the_outbox_holds_it(db_url: str) -> None:
    """The snapshot just planned is given to the link as an object (not read back and decoded): it encodes to
    the outbox's bytes and chunks to the same messages; once used (or after a restart) the outbox's copy is read."""

    async def go() -> None:
        db = Database(db_url)
        await db.migrate()
        store = ServiceStore(db)
        try:
            s = random_site(random.Random(3))
            await write_db(db, s)
            gw = s["gateways"][0]["id"]
            await store.plan(now=NOW, gateways=[gw], max_bytes=1024)  # far past one message: a snapshot
            first = await store.pending(gw, 0)
            assert first is not None and [(k, to) for k, to, _ in first] == [("snap", 1)]
            held = first[0][2]
            assert isinstance(held, Snapshot)
            _, outbox = await db_state(db)
            stored = bytes(outbox[gw][1][0][3])
            assert _enc.encode(held) == stored
            decoded = msgspec.msgpack.decode(stored, type=Snapshot)
            assert chunk_snapshot(held, "t", 4096) == chunk_snapshot(decoded, "t", 4096)
            again = await store.pending(gw, 0)  # used once: now the outbox's bytes
            assert again == [("snap", 1, stored)]
            assert await ServiceStore(db).pending(gw, 0) == [("snap", 1, stored)]  # a restarted service
        finally:
            await db.close()

    asyncio.run(go())
