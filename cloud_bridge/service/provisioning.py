"""Provisioning inside the service: the planner and `SiteLink` (cloud_bridge/operator/provision.py), signed
with the site key, on the service's database (`planner.ServiceStore`: SQLite or PostgreSQL).

A publish is `ServiceStore.plan` for the gateways the operator may update (set-based reads of the site,
only the changed shadow rows written; see service/planner.py), then `SiteLink.push_all` (each message
signed with the site key; the gateway's own result awaited). Births, deaths and acknowledgements are
written by the link as they come, so the API shows versions and acks at once.

A birth (a gateway back online, or announcing other doors) plans that gateway from the site as the
database has it now (as the CLI's `SiteLink.run` does: the doors of its birth, rights whose window ended
meanwhile, a shadow forgotten because it reported a version ahead of ours) and pushes it. One publish at a
time (a lock).
"""

# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from types import TracebackType
from typing import Self

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy.exc import SQLAlchemyError

from cloud_bridge.operator.provision import SiteLink
from cloud_bridge.protocol import Birth

from .database import Database
from .planner import ServiceStore

log = logging.getLogger("cloud_bridge.service.provisioning")


class Provisioner:
    """The site link of a running service (async context manager)."""

    def __init__(self, db: Database, *, site: str, host: str, port: int, key: Ed25519PrivateKey,
                 workspace: Path | None = None, resend_s: float = 5.0) -> None:  # fmt: skip
        self.db, self.site, self.host, self.port, self.key = db, site, host, port, key
        #: `workspace` is no longer used (the link works on the database itself); accepted for old configs.
        self.resend_s = resend_s
        self.store = ServiceStore(db)
        self.lock = asyncio.Lock()
        self.link: SiteLink | None = None
        self._stack = contextlib.AsyncExitStack()
        self._tasks: list[asyncio.Task[None]] = []
        self._birth = asyncio.Event()
        self._born: set[str] = set()
        self.last_not_sent: list[str] = []

    async def __aenter__(self) -> Self:
        self.link = await self._stack.enter_async_context(
            SiteLink(self.store, host=self.host, port=self.port, site=self.site, resend_s=self.resend_s,
                     signing_key=self.key))  # fmt: skip
        self.link.on_birth.append(self._on_birth)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._catch_up(), name="provisioning.catch_up")]
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:  # fmt: skip
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        await self._stack.aclose()

    async def publish(self, gateways: list[str] | None = None, *, timeout: float = 60.0) -> dict[str, int | str]:
        """Plan (for `gateways`, None: every gateway) on the database, then push and await the acks."""
        assert self.link is not None
        async with self.lock:
            gws = await self.store.gateways() if gateways is None else gateways
            self.last_not_sent = []
            await self.store.plan(gateways=gws, refused=self.last_not_sent, max_bytes=self.link.max_message_bytes)
            return await self.link.push_all(gws, timeout=timeout)

    def _on_birth(self, b: Birth) -> None:
        self._born.add(b.gateway)
        self._birth.set()

    async def _catch_up(self) -> None:
        while True:
            await self._birth.wait()
            self._birth.clear()
            try:
                assert self.link is not None
                async with self.lock:
                    gws = sorted(self._born | self.store.reset)
                    self._born.clear()
                    await self.store.plan(gateways=gws, max_bytes=self.link.max_message_bytes)
                    await self.link.push_all(timeout=30.0)
            except (OSError, SQLAlchemyError, TimeoutError) as e:
                log.warning("catch-up after a birth failed: %s", e)
