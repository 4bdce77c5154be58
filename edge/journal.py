"""The event journal (outbox): every decision, alarm and state change, kept until the cloud acknowledges it.

`record()` is synchronous and cheap: it stamps the event (unique id, monotonic sequence number, UTC and
site-local time, link state) and appends it to an in-memory buffer. A flusher task writes the buffer to
SQLite in batches, so no disk write ever sits on the tap path. The uploader reads durable events in
sequence order with `read()` and deletes them with `ack()` once the cloud has confirmed them.

Retention (nothing is dropped silently):

* when the journal holds `near_full` x `max_events` events, an `alarm.journal_near_full` event is
  recorded (once per crossing);
* when it is full, the oldest events are deleted to make room and an `alarm.journal_overflow` event names
  how many and which sequence numbers were lost;
* when the disk refuses writes (full, read-only), events stay in memory (up to `memory_limit`; beyond that
  the oldest in memory go the same way, again with an overflow alarm), an `alarm.storage` event is
  raised, and writing resumes on its own when the disk accepts it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Self
from zoneinfo import ZoneInfo

import aiosqlite
import msgspec

from edge.events import JOURNAL_DAMAGED, JOURNAL_OVERFLOW, STORAGE_ALARM

from ._sqlite import SqliteService, move_aside, quick_check, read_only
from .errors import StoreError
from .events import JOURNAL_NEAR_FULL, Detail, Event
from .tasks import cancel_and_wait

log = logging.getLogger(__name__)


_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(Event)


class Journal(SqliteService):
    """Append-only event outbox on SQLite. `async with Journal(path, ...) as j: j.record(...)`."""

    what = "journal"

    def __init__(
        self,
        path: Path | str,
        *,
        site_tz: ZoneInfo | str = "UTC",
        link_up: Callable[[], bool] = lambda: False,
        clock: Callable[[], float] = time.time,
        max_events: int = 1_000_000,
        near_full: float = 0.9,
        memory_limit: int = 100_000,
        batch: int = 500,
        interval_s: float = 0.05,
        synchronous: str = "FULL",
    ) -> None:
        super().__init__()
        self.path = Path(path)
        self.site_tz = site_tz if isinstance(site_tz, ZoneInfo) else ZoneInfo(site_tz)
        self.link_up = link_up
        self.clock = clock
        self.max_events = max_events
        self.near_full = near_full
        self.memory_limit = memory_limit
        self.batch = batch
        self.interval_s = interval_s
        self.synchronous = synchronous
        self._pending: list[Event] = []
        self._next_seq = 1
        self._on_disk = 0
        self._lowest = 1  # lowest seq on disk (approximate after acks; refreshed on trim)
        self._wake = asyncio.Event()
        self._durable = asyncio.Event()  # set after each successful flush
        self._task: asyncio.Task[None] | None = None
        self._near_alarmed = False
        self.storage_ok = True
        self.last_error: str | None = None
        self._write_lock = asyncio.Lock()
        #: called (on the loop thread) after each batch becomes durable
        self.on_durable: list[Callable[[], None]] = []
        #: called (on the loop thread, in `record`) with each event; must not block or raise (edge/feed.py)
        self.on_record: list[Callable[[Event], None]] = []

    async def __aenter__(self) -> Self:
        """Open the journal. A damaged file (it fails SQLite's `quick_check`, or cannot be read at all) never
        stops the start: it is moved aside (`journal.db.damaged-<time>`, kept for forensics), a new journal
        is started, and its first event is a `JOURNAL_DAMAGED` alarm. Sequence numbers go on above the old
        file's when they can still be read from it, else from the current time in milliseconds (above any
        journal's count), so the cloud never sees a number twice."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            await self._open(check=True)
        except sqlite3.DatabaseError as e:
            reason = f"{type(e).__name__}: {e}"[:300]
            salvaged = await asyncio.to_thread(_salvage_next_seq, self.path)
            moved = move_aside(self.path)
            log.error("journal %s is damaged (%s); moved aside to %s, a new journal is started", self.path,
                      reason, moved.name)  # fmt: skip
            await self._open(check=False)
            self._next_seq = max(self._next_seq, salvaged or int(self.clock() * 1000))
            self.record(
                JOURNAL_DAMAGED,
                detail={"error": reason, "moved_to": moved.name, "seq_from": "old file" if salvaged else "clock"},
            )
        self._task = asyncio.get_running_loop().create_task(self._flusher(), name="journal.flush")
        return self

    async def _open(self, *, check: bool) -> None:
        db = await self._open_db(self.path, synchronous=self.synchronous)
        try:
            if check and (problem := await quick_check(db)) is not None:
                raise sqlite3.DatabaseError(f"integrity check failed: {problem}")
            await db.execute(
                "CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY, id TEXT NOT NULL, body BLOB NOT NULL)"
            )
            await db.execute("CREATE TABLE IF NOT EXISTS jmeta (key TEXT PRIMARY KEY, value) WITHOUT ROWID")
            async with db.execute("SELECT coalesce(max(seq), 0), count(*), coalesce(min(seq), 0) FROM events") as c:
                row = await c.fetchone()
            assert row is not None
            async with db.execute("SELECT value FROM jmeta WHERE key='next_seq'") as c:
                meta = await c.fetchone()
            self._next_seq = max(int(row[0]) + 1, int(meta[0]) if meta else 1)
            self._on_disk = int(row[1])
            self._lowest = int(row[2]) or self._next_seq
        except BaseException:
            await self._close_db()
            raise

    async def close(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None
        if self._db is not None:
            with contextlib.suppress(Exception):
                await self._write_pending()
        await self._close_db()

    # --- producing ------------------------------------------------------------------------------------

    def record(
        self,
        type: str,
        *,
        door: str | None = None,
        reader: str | None = None,
        card: int | None = None,
        user: str | None = None,
        group: str | None = None,
        reason: str | None = None,
        detail: Detail | None = None,
    ) -> Event:
        """Stamp and buffer one event. Never blocks, never touches the disk."""
        ts = self.clock()
        ev = Event(
            id=os.urandom(16).hex(),
            seq=self._next_seq,
            type=type,
            ts=ts,
            local=datetime.fromtimestamp(ts, self.site_tz).isoformat(timespec="milliseconds"),
            link_up=self.link_up(),
            door=door,
            reader=reader,
            card=card,
            user=user,
            group=group,
            reason=reason,
            detail=detail or {},
        )
        self._next_seq += 1
        self._pending.append(ev)
        for listener in self.on_record:
            listener(ev)
        if len(self._pending) > self.memory_limit:
            self._drop_memory()
        if len(self._pending) >= self.batch:
            self._wake.set()
        return ev

    __call__ = record

    def _drop_memory(self) -> None:
        n = len(self._pending) - self.memory_limit + max(1, self.memory_limit // 10)
        lost = self._pending[:n]
        del self._pending[:n]
        self.record(
            JOURNAL_OVERFLOW,
            detail={"lost": len(lost), "first_seq": lost[0].seq, "last_seq": lost[-1].seq, "where": "memory"},
        )
        log.error("journal memory buffer full: %d events lost (seq %d-%d)", len(lost), lost[0].seq, lost[-1].seq)

    @property
    def depth(self) -> int:
        """Events not yet acknowledged by the cloud (on disk + in memory)."""
        return self._on_disk + len(self._pending)

    @property
    def next_seq(self) -> int:
        return self._next_seq

    # --- writing --------------------------------------------------------------------------------------

    async def _flusher(self) -> None:
        backoff = self.interval_s
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(backoff if not self.storage_ok else self.interval_s):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self._write_pending()
                backoff = self.interval_s
            except StoreError:
                backoff = min(max(backoff * 2, 0.5), 30.0)

    async def flush(self) -> None:
        """Write everything recorded so far (raises StoreError if the disk refuses)."""
        await self._write_pending()

    async def _write_pending(self) -> None:
        async with self._write_lock:
            if not self._pending or self._db is None:
                return
            batch = self._pending[:]
            write = asyncio.ensure_future(self._insert(self._db, batch))
            try:
                await asyncio.shield(write)
            except asyncio.CancelledError:
                # Shutdown while the write is in flight: SQLite's thread runs it to the end whatever we do,
                # so wait for that end (a few ms) and account for it: the batch is then on disk exactly once,
                # or (it failed) still pending for close() to write. Never both.
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await write
                if write.done() and not write.cancelled() and write.exception() is None:
                    del self._pending[: len(batch)]
                    self._on_disk += len(batch)
                raise
            except (sqlite3.Error, OSError) as e:
                self.last_error = str(e)
                if self.storage_ok:
                    self.storage_ok = False
                    log.error("journal write failed, keeping events in memory: %s", e)
                    self.record(STORAGE_ALARM, detail={"state": "failing", "error": str(e)[:200]})
                raise StoreError(f"journal write failed: {e}") from e
            del self._pending[: len(batch)]
            self._on_disk += len(batch)
            if not self.storage_ok:
                self.storage_ok = True
                self.last_error = None
                log.warning("journal writes recovered")
                self.record(STORAGE_ALARM, detail={"state": "recovered"})
            await self._enforce_bound()
        self._durable.set()
        for cb in self.on_durable:
            cb()

    @staticmethod
    async def _insert(db: aiosqlite.Connection, batch: list[Event]) -> None:
        """One transaction; rolled back when SQLite or the disk refuses it."""
        try:
            await db.execute("BEGIN IMMEDIATE")
            await db.executemany(
                "INSERT INTO events (seq, id, body) VALUES (?, ?, ?)", ((e.seq, e.id, _enc.encode(e)) for e in batch)
            )
            await db.execute("COMMIT")
        except (sqlite3.Error, OSError):
            with contextlib.suppress(Exception):
                await db.execute("ROLLBACK")
            raise

    async def _enforce_bound(self) -> None:
        assert self._db is not None
        if self._on_disk >= self.near_full * self.max_events:
            if not self._near_alarmed:
                self._near_alarmed = True
                log.warning("journal near full: %d of %d events", self._on_disk, self.max_events)
                self.record(JOURNAL_NEAR_FULL, detail={"depth": self._on_disk, "max": self.max_events})
        else:
            self._near_alarmed = False
        if self._on_disk > self.max_events:
            excess = self._on_disk - self.max_events
            async with self._db.execute(
                "SELECT min(seq), max(seq) FROM (SELECT seq FROM events ORDER BY seq LIMIT ?)", (excess,)
            ) as c:
                lo_hi = await c.fetchone()
            assert lo_hi is not None
            await self._db.execute("DELETE FROM events WHERE seq <= ?", (lo_hi[1],))
            self._on_disk -= excess
            log.error("journal full: %d oldest events dropped (seq %s-%s)", excess, lo_hi[0], lo_hi[1])
            self.record(
                JOURNAL_OVERFLOW,
                detail={"lost": excess, "first_seq": lo_hi[0], "last_seq": lo_hi[1], "where": "disk"},
            )

    # --- consuming ------------------------------------------------------------------------------------

    async def read(self, after_seq: int = 0, limit: int = 500) -> list[Event]:
        """Durable events with seq > after_seq, in order, at most `limit`."""
        async with self.db.execute(
            "SELECT body FROM events WHERE seq > ? ORDER BY seq LIMIT ?", (after_seq, limit)
        ) as c:
            rows = await c.fetchall()
        return [_dec.decode(r[0]) for r in rows]

    async def ack(self, upto_seq: int) -> int:
        """Delete durable events with seq <= upto_seq (the cloud has them). Returns how many went."""
        db = self.db
        async with self._write_lock:
            # The table may become empty: remember the next sequence number so it is never reused (the
            # batches themselves do not write it, to save a page write per batch on an SD card).
            await db.execute("BEGIN IMMEDIATE")
            try:
                cur = await db.execute("DELETE FROM events WHERE seq <= ?", (upto_seq,))
                n = cur.rowcount if cur.rowcount is not None and cur.rowcount >= 0 else 0
                await cur.close()
                await db.execute(
                    "INSERT OR REPLACE INTO jmeta (key, value) VALUES ('next_seq', "
                    "max(?, coalesce((SELECT value FROM jmeta WHERE key='next_seq'), 0)))",
                    (upto_seq + 1,),
                )
                await db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(Exception):
                    await asyncio.shield(db.execute("ROLLBACK"))
                raise
        self._on_disk = max(0, self._on_disk - n)
        return n

    async def wait_durable(self) -> None:
        """Wait until the next batch has been written."""
        self._durable.clear()
        await self._durable.wait()


def _salvage_next_seq(path: Path) -> int | None:
    """The next sequence number of a damaged journal, if the file still tells (best effort)."""
    seqs: list[int] = []
    try:
        con = read_only(path)
    except sqlite3.Error:
        return None
    try:
        for q in ("SELECT max(seq) FROM events", "SELECT value FROM jmeta WHERE key='next_seq'"):
            with contextlib.suppress(sqlite3.Error, TypeError, ValueError):
                row = con.execute(q).fetchone()
                if row and row[0] is not None:
                    seqs.append(int(row[0]) + (1 if q.startswith("SELECT max") else 0))
    finally:
        con.close()
    return max(seqs) if seqs else None
