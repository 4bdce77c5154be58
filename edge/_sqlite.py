"""SQLite plumbing shared by the rights store and the journal, and the GIL hand-over of bulk work.

* `SqliteService`: the one aiosqlite connection a service owns, opened in WAL with its pragmas and its worker
  thread at background priority (`open_wal`), closed once; `async with` closes it.
* `quick_check`, `read_only`, `move_aside`, `fsync_dir`, `copy_file_atomic`: checking, reading and keeping the
  files (a damaged file is moved aside with its -wal/-shm, never deleted).
* `pause`, `gc_paused`, `dispose`, `in_background`: bulk work (10^5 rows) that must not hold the
  event loop, nor the GIL the thread that delivers GPIO edges waits for.
* `bulk_insert`, `bulk_delete`: bulk writes whose rows reach SQLite as JSON text, so that the connection's
  worker thread runs them in C without the GIL (see `bulk_insert`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import aiosqlite
import msgspec

from .errors import StoreError
from .index import drain

T = TypeVar("T")

# --- background priority ----------------------------------------------------------------------------------

#: Nice value of the threads that do bulk work (SQLite, index builds). On a small board the cores are
#: shared with the thread that delivers GPIO edges and with the event loop: the scheduler must prefer them.
BACKGROUND_NICE = 10


def lower_thread_priority() -> int:
    """Make the calling thread a background thread (Linux: nice is per thread). Returns 1 when done."""
    if hasattr(os, "setpriority") and hasattr(threading, "get_native_id"):
        with contextlib.suppress(OSError):
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, max(os.getpriority(os.PRIO_PROCESS, tid), BACKGROUND_NICE))
            return 1
    return 0


async def background_connection(db: aiosqlite.Connection) -> None:
    """Run the connection's worker thread at background priority (via a SQL function it executes)."""
    await db.create_function("edge_background", 0, lower_thread_priority)
    async with db.execute("SELECT edge_background()") as cur:
        await cur.fetchone()


def in_background(fn: Callable[..., T], *args: Any) -> Callable[[], T]:
    """`fn(*args)` for `asyncio.to_thread`, run at background priority."""

    def run() -> T:
        lower_thread_priority()
        return fn(*args)

    return run


# --- connections -------------------------------------------------------------------------------------------


async def open_wal(path: Path, *, synchronous: str, pragmas: Sequence[str] = ()) -> aiosqlite.Connection:
    """An autocommit connection (transactions are explicit `BEGIN IMMEDIATE`) in WAL mode, its worker thread
    at background priority; `pragmas` are run after `synchronous`. Closed again if any of this fails."""
    db = await aiosqlite.connect(path, isolation_level=None)
    try:
        await background_connection(db)
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute(f"PRAGMA synchronous={synchronous}")
        for p in pragmas:
            await db.execute(f"PRAGMA {p}")
    except BaseException:
        await db.close()
        raise
    return db


class SqliteService:
    """A service that owns one aiosqlite connection (the rights store, the journal). Subclasses open it with
    `_open_db` in their `__aenter__`; `close()` (and leaving `async with`) closes it once."""

    #: What "... is not open" names.
    what = "database"

    def __init__(self) -> None:
        self._db: aiosqlite.Connection | None = None

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise StoreError(f"{self.what} is not open")
        return self._db

    async def _open_db(self, path: Path, *, synchronous: str, pragmas: Sequence[str] = ()) -> aiosqlite.Connection:
        self._db = await open_wal(path, synchronous=synchronous, pragmas=pragmas)
        return self._db

    async def _close_db(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await db.close()

    async def close(self) -> None:
        await self._close_db()

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


def _problem(rows: Iterable[Any]) -> str | None:
    found = [r[0] for r in rows]
    return None if found == ["ok"] else "; ".join(str(r) for r in found[:5])


async def quick_check(db: aiosqlite.Connection) -> str | None:
    """SQLite's `PRAGMA quick_check`: None when sound, else its first five findings."""
    async with db.execute("PRAGMA quick_check") as cur:
        return _problem(await cur.fetchall())


def quick_check_sync(con: sqlite3.Connection) -> str | None:
    """`quick_check` on a blocking connection (worker threads)."""
    return _problem(con.execute("PRAGMA quick_check").fetchall())


def read_only(path: Path) -> sqlite3.Connection:
    """A blocking read-only connection of its own (worker threads: checks, salvage, the verified copy)."""
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)


# --- files -------------------------------------------------------------------------------------------------


def _stamp() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def move_aside(path: Path, what: str = "damaged") -> Path:
    """Rename `path` (and its -wal/-shm files) to `path.<what>-<UTC time>`, kept for forensics."""
    stamp = _stamp()
    dest = path.with_name(f"{path.name}.{what}-{stamp}")
    n = 1
    while dest.exists():
        n += 1
        dest = path.with_name(f"{path.name}.{what}-{stamp}.{n}")
    for suffix in ("", "-wal", "-shm"):
        src = Path(f"{path}{suffix}")
        if src.exists():
            os.replace(src, f"{dest}{suffix}")
    fsync_dir(path.parent)
    return dest


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def copy_file_atomic(src: Path, dst: Path) -> None:
    tmp = dst.with_name(dst.name + ".tmp")
    with open(src, "rb") as f, open(tmp, "wb") as g:
        shutil.copyfileobj(f, g, 1 << 20)
        g.flush()
        os.fsync(g.fileno())
    os.replace(tmp, dst)
    fsync_dir(dst.parent)


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


# --- handing the loop and the GIL over during bulk work --------------------------------------------------

#: How long `pause()` lets other threads run, holding neither the GIL nor the loop.
BREATHE_S = 0.0001
BREATHE_EVERY_S = 0.002
_last_breath = 0.0


async def pause() -> None:
    """Between two slices of bulk work on the loop thread: let other tasks and other threads run.

    `await asyncio.sleep(0)` alone hands the loop to other tasks but not the GIL to other threads: the
    loop releases the GIL in a zero-timeout epoll and takes it back at once, before a waiting thread
    (the one that delivers GPIO edges) has woken up; and each such release resets that thread's claim
    to a forced switch. Measured here: a thread that sleeps 1 ms woke up to 118 ms late while a 100k
    change set was validated. A 100 us real sleep every 2 ms of work gives it the GIL (~7 % of the time).
    """
    global _last_breath
    now = time.perf_counter()
    if now - _last_breath > BREATHE_EVERY_S:
        time.sleep(BREATHE_S)  # noqa: TID251, ASYNC251  (intentional: hands the GIL to other threads, 100 us)
        _last_breath = time.perf_counter()
    await asyncio.sleep(0)


async def dispose(*containers: Any) -> None:
    """Free large temporaries (dicts, lists, sets of 10^5 entries) a step at a time between loop turns:
    freed in one go they hold the GIL for 5-20 ms (see `index.drain`)."""
    for c in containers:
        while drain(c):
            await pause()


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No automatic garbage collection while a large change set or snapshot is processed.

    CPython's collector runs while holding the GIL; a full collection over the ~10^5 objects of a large
    snapshot stops every thread, the event loop (and so the tap path) included, for 100 ms or more.
    The rights code creates no reference cycles, so refcounting frees everything anyway; the collector
    resumes afterwards. Nested use is fine (only the outermost re-enables).
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.freeze()  # what survived is long-lived: keep it out of the next collections' scans
            gc.enable()


# --- bulk writes: the rows as JSON, expanded inside SQLite --------------------------------------------------

#: Rows per statement of a bulk write: one chunk is built and encoded on the loop thread in ~0.05 ms, and
#: runs in SQLite's thread in ~1 ms at 2*10^6 rows (a burst short enough not to keep the loop off a CPU).
BULK_ROWS = 50
_encode = msgspec.json.Encoder().encode


async def bulk_insert(db: aiosqlite.Connection, head: str, width: int, rows: Iterable[Sequence[Any]],
                      tail: str = "") -> None:  # fmt: skip
    """`head` (``INSERT [OR REPLACE] INTO t (a, b, ...)``) over `rows` of `width` values, `BULK_ROWS` rows per
    statement: ``head SELECT json_extract(value, '$[0]'), ... FROM json_each(?) WHERE true tail``, with the
    chunk as one JSON text parameter (`tail`: an ``ON CONFLICT`` clause).

    Not an `executemany`: that binds every row's parameters in the connection's worker thread, taking the
    GIL once per row, from a thread at background priority. On a busy machine that thread was preempted
    while it held the GIL, and the event loop, waiting for the GIL, stalled for 10-30 ms; and every row
    waited for the loop to hand the GIL back (a 10^4-row change set took 4 s beside a busy loop instead of
    0.7 s). Here the rows are built and encoded on the loop thread, a chunk at a time, and the worker thread
    takes the GIL once per statement: the statement itself runs in C with the GIL released.

    Integers (up to 64 bits), NULLs and text round-trip through JSON; a text holding U+0000 would be cut
    there by SQLite's JSON functions, so such a chunk is written with `executemany` instead."""
    cols = ", ".join(f"json_extract(value, '$[{i}]')" for i in range(width))
    sql = f"{head} SELECT {cols} FROM json_each(?) WHERE true {tail}"
    per_row = f"{head} VALUES ({', '.join('?' * width)}) {tail}"
    for chunk in _chunks(rows):
        text = _encode(chunk)
        if b"\\u0000" in text:
            await db.executemany(per_row, chunk)
        else:
            await db.execute(sql, (text,))


async def bulk_delete(db: aiosqlite.Connection, table: str, column: str, keys: Iterable[int]) -> None:
    """``DELETE FROM table WHERE column = key`` for every integer key, `BULK_ROWS` keys per statement (as
    `bulk_insert`: the keys as one JSON array, no per-row work in the worker thread)."""
    sql = f"DELETE FROM {table} WHERE {column} IN (SELECT value FROM json_each(?))"
    for chunk in _chunks(keys):
        await db.execute(sql, (_encode(chunk),))


def _chunks(items: Iterable[T]) -> Iterator[list[T]]:
    """`items` in lists of `BULK_ROWS` (the last one shorter)."""
    chunk: list[T] = []
    for x in items:
        chunk.append(x)
        if len(chunk) == BULK_ROWS:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
