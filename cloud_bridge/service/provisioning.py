"""Provisioning inside the service: the existing planner and `SiteLink` (cloud_bridge/operator/provision.py),
signed with the site key, fed from the service's database.

`plan` and `SiteLink` work on a synchronous `operator.db.Model` (one SQLite file). Until they take the new
data layer (docs/operator.md, "Moving over"), the service keeps a *workspace*: a `Model` file that holds
what the link needs at run time (gateway versions and acks, shadow, outbox, command keys). A publish is

1. the site model (users, cards, assignments, groups, schedules, settings) copied from the service's
   database into the workspace, one transaction;
2. the existing `plan()` for the gateways the operator may update, then `SiteLink.push_all` (each message
   signed with the site key; the gateway's own result awaited);
3. gateways, doors, shadow and outbox copied back into the service's database (so the API shows versions
   and acks, and a lost workspace is rebuilt from there).

A birth (a gateway back online) runs a publish of what was last published; gateway status (online, last
seen, software) is copied back every `status_s`. One publish at a time (a lock). The copy is O(site): fine
for thousands of users, the first thing to go when the planner reads the data layer itself.
"""

# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Table, delete, select

from cloud_bridge.operator import rules as access_rules
from cloud_bridge.operator.db import Model
from cloud_bridge.operator.provision import SiteLink, plan

from . import rules_db, schema
from .database import Database

log = logging.getLogger("cloud_bridge.service.provisioning")

#: What the planner reads: copied into the workspace before every plan.
SITE_MODEL = (schema.meta, schema.schedules, schema.groups, schema.group_doors, schema.users,
              schema.credentials, schema.assignments, schema.badges)  # fmt: skip
#: What the link owns at run time: copied back after every publish (and into a new workspace at start).
LINK_STATE = (schema.gateways, schema.doors, schema.shadow, schema.outbox, schema.gateway_keys, schema.site_keys)


def _cols(t: Table) -> list[str]:
    return [c.name for c in t.columns]


async def _rows(db: Database, tables: Iterable[Table]) -> dict[Table, list[tuple[Any, ...]]]:
    out: dict[Table, list[tuple[Any, ...]]] = {}
    async with db.read() as c:
        for t in tables:
            out[t] = [tuple(r) for r in (await c.execute(select(*t.columns))).all()]
    return out


def _write_model(m: Model, data: dict[Table, list[tuple[Any, ...]]]) -> None:
    with m.tx() as c:
        for t, rows in data.items():
            cols = _cols(t)
            c.execute(f"DELETE FROM {t.name}")  # table names from our own schema
            c.executemany(f"INSERT INTO {t.name} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})", rows)


def _read_model(m: Model, tables: Iterable[Table]) -> dict[Table, list[dict[str, Any]]]:
    out: dict[Table, list[dict[str, Any]]] = {}
    for t in tables:
        cols = _cols(t)
        out[t] = [dict(zip(cols, r, strict=True)) for r in m.con.execute(f"SELECT {', '.join(cols)} FROM {t.name}")]
    return out


class Provisioner:
    """The site link of a running service (async context manager)."""

    def __init__(self, db: Database, *, site: str, host: str, port: int, key: Ed25519PrivateKey, workspace: Path,
                 resend_s: float = 5.0, status_s: float = 1.0) -> None:  # fmt: skip
        self.db, self.site, self.host, self.port, self.key = db, site, host, port, key
        self.workspace, self.resend_s, self.status_s = workspace, resend_s, status_s
        self.lock = asyncio.Lock()
        self.model: Model | None = None
        self.link: SiteLink | None = None
        self._stack = contextlib.AsyncExitStack()
        self._tasks: list[asyncio.Task[None]] = []
        self._birth = asyncio.Event()
        self.last_not_sent: list[str] = []

    async def __aenter__(self) -> Self:
        fresh = not self.workspace.exists()
        self.model = Model(self.workspace)
        if fresh:  # rebuild what the link owns from the last copy in the service's database
            _write_model(self.model, await _rows(self.db, (*SITE_MODEL, *LINK_STATE)))
        self.link = await self._stack.enter_async_context(
            SiteLink(self.model, host=self.host, port=self.port, site=self.site, resend_s=self.resend_s,
                     signing_key=self.key))  # fmt: skip
        self.link.on_birth.append(lambda _b: self._birth.set())
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._catch_up(), name="provisioning.catch_up"),
                       loop.create_task(self._status(), name="provisioning.status")]  # fmt: skip
        await self.copy_back()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:  # fmt: skip
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        await self._stack.aclose()
        if self.model is not None:
            self.model.close()

    async def publish(self, gateways: list[str] | None = None, *, timeout: float = 60.0) -> dict[str, int | str]:
        """Copy the site model in, plan (for `gateways`, None: every gateway), push, copy the state back."""
        assert self.model is not None and self.link is not None
        async with self.lock:
            data = await _rows(self.db, SITE_MODEL)
            async with self.db.read() as c:  # the access rules, as one row of the workspace's meta
                data[schema.meta].append((access_rules.META_KEY, access_rules.encode(await rules_db.access_rules(c))))
            _write_model(self.model, data)
            gws = self.model.gateways() if gateways is None else gateways
            self.last_not_sent = []
            plan(self.model, gateways=gws, refused=self.last_not_sent)
            try:
                return await self.link.push_all(gws, timeout=timeout)
            finally:
                await self.copy_back()

    async def copy_back(self, tables: Iterable[Table] = LINK_STATE) -> None:
        assert self.model is not None
        data = _read_model(self.model, tables)
        async with self.db.write() as c:
            for t, rows in data.items():
                await c.execute(delete(t))
                if rows:
                    await c.execute(t.insert(), rows)

    async def _catch_up(self) -> None:
        while True:
            await self._birth.wait()
            self._birth.clear()
            try:
                assert self.link is not None and self.model is not None
                async with self.lock:  # what was last published (the workspace's copy), nothing newer
                    plan(self.model)
                    await self.link.push_all(timeout=30.0)
                    await self.copy_back()
            except (OSError, sqlite3.Error, TimeoutError) as e:
                log.warning("catch-up after a birth failed: %s", e)

    async def _status(self) -> None:
        last: list[dict[str, Any]] = []
        while True:
            await asyncio.sleep(self.status_s)
            assert self.model is not None
            now = _read_model(self.model, (schema.gateways,))[schema.gateways]
            if now != last and not self.lock.locked():
                with contextlib.suppress(sqlite3.Error, OSError):
                    await self.copy_back((schema.gateways, schema.doors))
                    last = now
