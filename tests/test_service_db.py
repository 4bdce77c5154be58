"""The service's data layer on both databases: migrations, and the import of an existing site database."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import func, inspect, select

from cloud_bridge.operator.service import Service
from cloud_bridge.permissions import Action, ObjectType, PermissionGroup, grant
from cloud_bridge.service import schema
from cloud_bridge.service.database import Database
from cloud_bridge.service.errors import Conflict, ServiceError
from cloud_bridge.service.importer import import_site_db

from .postgres import db_url, postgres_server  # noqa: F401

PW = "correct horse"


async def test_migrate_creates_the_schema_and_is_idempotent(db_url: str) -> None:  # noqa: F811
    db = Database(db_url)
    try:
        assert await db.revision() is None
        await db.migrate()
        assert await db.revision() == Database.head()
        await db.migrate()  # nothing to do
        async with db.read() as c:
            names = set(await c.run_sync(lambda s: inspect(s).get_table_names()))
            # the migrations create exactly what schema.py describes (no drift between the two), beside
            # SQLite's FTS5 name index (migration 0009: a virtual table and its shadow tables, which SQLAlchemy
            # Core does not describe)
            fts = {n for n in names if n == "users_fts" or n.startswith("users_fts_")}
            assert (fts != set()) == (db.dialect == "sqlite")

            def outside_fts(name: str | None, type_: str, _parent: object) -> bool:
                return not (type_ == "table" and name in fts)

            diff = await c.run_sync(lambda s: compare_metadata(MigrationContext.configure(
                s, opts={"include_name": outside_fts}), schema.metadata))  # fmt: skip
        assert names - fts == set(schema.metadata.tables) | {"alembic_version"}
        assert diff == []
    finally:
        await db.close()


async def test_a_write_transaction_is_all_or_nothing(db_url: str) -> None:  # noqa: F811
    db = Database(db_url)
    try:
        await db.migrate()
        with pytest.raises(RuntimeError):
            async with db.write() as c:
                await c.execute(schema.users.insert().values(id="alice"))
                raise RuntimeError("boom")
        async with db.read() as c:
            assert (await c.execute(select(func.count()).select_from(schema.users))).scalar() == 0
        with pytest.raises(Exception, match=r"(?i)foreign key"):  # foreign keys are enforced on SQLite too
            async with db.write() as c:
                await c.execute(schema.credentials.insert().values(card=1, user_id="nobody"))
    finally:
        await db.close()


def make_site_db(path: Path) -> None:
    """A site database as today's `cloud-bridge init` and CLI leave it."""
    svc = Service.init(path, site="s1", admin="root", tz="Europe/Berlin", passphrase=PW)
    svc.put_permission_group(PermissionGroup(id="viewer", permissions=[grant(ObjectType.USER, Action.READ)]))
    svc.add_operator("guard", ["viewer"], name="Guard")
    svc.db.record_birth("gw1", session=3, version=0, doors=[("door1", "Front")], software="edge 1", ts=1.0)
    svc.put_group("staff", [("gw1", "door1")], tags=["hq"])
    svc.add_user("alice", name="Alice", card=1001, groups=["staff"], offline_access=True)
    svc.add_user("bob", card=1002)
    svc.assign("bob", "staff", valid_from=10.0, valid_until=20.0)
    svc.add_badge("lobby", "5001", name="V1", badge_type="temporary")
    svc.issue_visitor("Vera", location="lobby", badge=5001, groups=["staff"], until=2e9)
    svc.plan()  # shadow + outbox for gw1
    svc.close()


async def test_import_an_existing_site_database(db_url: str, tmp_path: Path) -> None:  # noqa: F811
    src = tmp_path / "site.db"
    make_site_db(src)
    db = Database(db_url)
    try:
        await db.migrate()
        counts = await import_site_db(src, db)
        con = sqlite3.connect(src)
        for table in schema.SITE_TABLES:
            (n,) = con.execute(f"SELECT count(*) FROM {table.name}").fetchone()
            assert counts[table.name] == n, table.name
        async with db.read() as c:
            users = {r.id: r for r in (await c.execute(select(schema.users))).all()}
            assert users["alice"].name == "Alice" and users["alice"].offline_access is True
            assert users["bob"].offline_access is False
            site_key = (await c.execute(select(schema.meta.c.value).where(schema.meta.c.key == "site_key"))).scalar()
            assert site_key == con.execute("SELECT value FROM meta WHERE key='site_key'").fetchone()[0]
            gw = (await c.execute(select(schema.gateways))).one()
            assert (gw.id, gw.version, gw.software) == ("gw1", 1, "edge 1")
            shadow = (await c.execute(select(func.count()).select_from(schema.shadow))).scalar()
            assert shadow == con.execute("SELECT count(*) FROM shadow").fetchone()[0] > 0
            body = (await c.execute(select(schema.outbox.c.body))).scalar()
            assert body == con.execute("SELECT body FROM outbox").fetchone()[0]
        # new rows get fresh ids after the copied ones (PostgreSQL's sequences were moved past them)
        async with db.write() as c:
            r = await c.execute(schema.assignments.insert().values(user_id="alice", group_id="staff"))
            assert r.inserted_primary_key is not None
            assert r.inserted_primary_key[0] > max(x for (x,) in con.execute("SELECT id FROM assignments"))
        with pytest.raises(Conflict, match="already holds site 's1'"):
            await import_site_db(src, db)
    finally:
        await db.close()


async def test_a_bad_row_imports_nothing_and_names_the_table(db_url: str, tmp_path: Path) -> None:  # noqa: F811
    src = tmp_path / "site.db"
    make_site_db(src)
    con = sqlite3.connect(src)  # a card of a user that does not exist (foreign keys were off once)
    con.execute("PRAGMA foreign_keys=OFF")
    con.execute("INSERT INTO credentials (card, user_id) VALUES (77, 'ghost')")
    con.commit()
    con.close()
    db = Database(db_url)
    try:
        await db.migrate()
        with pytest.raises(ServiceError, match="table credentials"):
            await import_site_db(src, db)
        async with db.read() as c:
            for t in (schema.meta, schema.users, schema.groups):
                assert (await c.execute(select(func.count()).select_from(t))).scalar() == 0, t.name
        with pytest.raises(ServiceError, match="no such site database"):
            await import_site_db(tmp_path / "missing.db", db)
    finally:
        await db.close()
