"""Migrate an existing SQLite site database (made by today's `cloud-bridge init`, `cloud_bridge/operator/db.py`)
into the service's database, SQLite or PostgreSQL.

    db = Database("postgresql+asyncpg://...")
    await db.migrate()
    counts = await import_site_db(Path("site.db"), db)      # {"users": 1200, "credentials": 1300, ...}

The tables have the same names and columns (`schema.SITE_TABLES`): every row of every table is copied, the
site key stays encrypted as it was, operators keep their permission groups, gateways keep their rights
versions, shadow and outbox (so nothing is re-sent that a gateway already holds), events stay. The whole copy
is one transaction on the target: a row the target refuses (the message names the table) leaves nothing
imported. The source is opened read-only and never changed. The target must be migrated and hold no site.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from sqlalchemy import func, select, text

from . import schema
from .database import Database
from .errors import Conflict, ServiceError
from .events import filter_columns

CHUNK_ROWS = 5000


def _open(src: Path) -> sqlite3.Connection:
    if not src.is_file():
        raise ServiceError(f"{src}: no such site database")
    con = sqlite3.connect(f"file:{src}?mode=ro", uri=True, check_same_thread=False)  # used serially
    try:
        row = con.execute("SELECT value FROM meta WHERE key='site'").fetchone()
    except sqlite3.DatabaseError as e:
        con.close()
        raise ServiceError(f"{src}: not a cloud-bridge site database ({e})") from None
    if row is None:
        con.close()
        raise ServiceError(f"{src}: not initialised (no site in its meta table)")
    return con


async def import_site_db(src: Path, db: Database) -> dict[str, int]:
    """Copy `src` into `db`; returns the number of rows per table."""
    con = await asyncio.to_thread(_open, src)
    counts: dict[str, int] = {}
    try:
        present = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        async with db.write() as c:
            have = (await c.execute(select(schema.meta.c.value).where(schema.meta.c.key == "site"))).scalar()
            if have is not None:
                raise Conflict(f"the service database already holds site {have!r}: import into an empty one")
            for table in schema.SITE_TABLES:
                if table.name not in present:
                    continue  # an older site database (e.g. before key rotation): nothing to copy
                src_cols = [r[1] for r in con.execute(f"PRAGMA table_info({table.name})")]
                cols = [col for col in src_cols if col in table.c]
                cur = con.execute(f"SELECT {', '.join(cols)} FROM {table.name}")  # names from our own schema
                n = 0
                while rows := await asyncio.to_thread(cur.fetchmany, CHUNK_ROWS):
                    try:
                        batch = [dict(zip(cols, r, strict=True)) for r in rows]
                        if table is schema.events:  # the columns the events API filters on (events.py)
                            batch = [{**x, **filter_columns(x["body"])} for x in batch]
                        await c.execute(table.insert(), batch)
                    except Exception as e:
                        raise ServiceError(f"import of {src}: table {table.name}: {type(e).__name__}: "
                                           f"{str(e).splitlines()[0][:300]}") from None  # fmt: skip
                    n += len(rows)
                counts[table.name] = n
            if db.dialect == "postgresql":  # explicit ids were copied: move the id sequences past them
                for table in (schema.assignments, schema.visits, schema.event_ranges):
                    top = (await c.execute(select(func.max(table.c.id)))).scalar()
                    if top is not None:
                        await c.execute(text("SELECT setval(pg_get_serial_sequence(:t, 'id'), :v)"),
                                        {"t": table.name, "v": int(top)})  # fmt: skip
    finally:
        con.close()
    return counts
