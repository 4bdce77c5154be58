"""One async engine for embedded SQLite (aiosqlite, the default) or PostgreSQL (asyncpg), and its migrations.

    db = Database("sqlite+aiosqlite:///site.db")       # or "postgresql+asyncpg://user@host/dbname"
    await db.migrate()                                  # Alembic: upgrade to the newest revision
    async with db.write() as c:                         # one transaction: committed, or rolled back on error
        await c.execute(schema.users.insert().values(id="alice"))
    async with db.read() as c:
        rows = (await c.execute(select(schema.users))).all()

SQLite: foreign keys on, WAL, a busy timeout, and write transactions begin IMMEDIATE (a read transaction
that later writes could otherwise fail with "database is locked" under WAL whatever the timeout); reads
begin deferred. The driver's own transaction handling is turned off so that SQLAlchemy's BEGIN is the one
that runs.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from .errors import ServiceError

MIGRATIONS = Path(__file__).with_name("migrations")


def alembic_config(connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


def sqlite_url(path: Path | str) -> str:
    return f"sqlite+aiosqlite:///{Path(path)}"


class Database:
    """The service's database. `url` is an SQLAlchemy URL; a plain path means an SQLite file."""

    def __init__(self, url: str | Path, *, pool_size: int = 10) -> None:
        text = str(url)
        if "://" not in text:
            text = sqlite_url(text)
        self.url = make_url(text)
        self.dialect = self.url.get_backend_name()
        if self.dialect not in ("sqlite", "postgresql"):
            raise ServiceError(f"database url {self.url.render_as_string()!r}: use sqlite+aiosqlite or "
                               "postgresql+asyncpg")  # fmt: skip
        kw: dict[str, Any] = {}
        if self.dialect == "postgresql":
            kw = {"pool_size": pool_size, "max_overflow": pool_size, "pool_pre_ping": True}
        elif self.url.database:
            Path(self.url.database).parent.mkdir(parents=True, exist_ok=True)
        self.engine: AsyncEngine = create_async_engine(self.url, **kw)
        #: Counts the write transactions this process has ended (committed or not): what a cache of this
        #: process read before a write is stale after it (core.authorizer, auth.principal_for).
        self.generation = 0
        if self.dialect == "sqlite":
            self._sqlite_hooks()
            # aiosqlite logs every statement with its parameters at DEBUG: session CSRF tokens and hashes
            # would end up in a debug log. Never below INFO.
            logging.getLogger("aiosqlite").setLevel(logging.INFO)

    def _sqlite_hooks(self) -> None:
        sync = self.engine.sync_engine

        @event.listens_for(sync, "connect")
        def _connect(dbapi_con: Any, _record: Any) -> None:
            dbapi_con.isolation_level = None  # SQLAlchemy emits BEGIN itself (below)
            cur = dbapi_con.cursor()
            for pragma in ("foreign_keys=ON", "journal_mode=WAL", "synchronous=NORMAL", "busy_timeout=30000"):
                cur.execute(f"PRAGMA {pragma}")
            cur.close()

        @event.listens_for(sync, "begin")
        def _begin(con: Connection) -> None:
            mode = con.get_execution_options().get("sqlite_begin", "DEFERRED")
            con.exec_driver_sql(f"BEGIN {mode}")

    async def close(self) -> None:
        await self.engine.dispose()

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        """One write transaction: committed when the block ends, rolled back on any exception."""
        try:
            async with self.engine.connect() as c:
                if self.dialect == "sqlite":
                    await c.execution_options(sqlite_begin="IMMEDIATE")
                async with c.begin():
                    yield c
        finally:
            self.generation += 1

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        """One read transaction (a consistent view of the data)."""
        async with self.engine.connect() as c, c.begin():
            yield c

    # --- migrations -----------------------------------------------------------------------------------

    async def migrate(self, revision: str = "head") -> None:
        """Bring the schema to `revision` (Alembic upgrade); a no-op when it is there already."""
        async with self.engine.connect() as c:
            await c.run_sync(lambda sync: command.upgrade(alembic_config(sync), revision))
            await c.commit()

    async def revision(self) -> str | None:
        """The schema revision the database is at (None: empty, never migrated)."""
        async with self.engine.connect() as c:
            return await c.run_sync(lambda sync: MigrationContext.configure(sync).get_current_revision())

    @staticmethod
    def head() -> str:
        head = ScriptDirectory.from_config(alembic_config()).get_current_head()
        assert head is not None
        return head
