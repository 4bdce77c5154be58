"""The on-disk rights store (SQLite through aiosqlite, WAL) and the in-memory index it feeds.

`Store.apply(change_set)` validates the whole change set against the current rights first, writes it in
one transaction, and only after the commit stages it into the `RightsIndex` in small slices (yielding to
the event loop between slices) and publishes it in one step: a decision sees either the old rights or
the new ones, never a mix, and is never held up by more than one slice. A change set that fails
validation, or whose transaction fails (full disk, read-only file system), leaves both the disk and the
index exactly as they were.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self, TypeVar
from zoneinfo import ZoneInfo

import msgspec
import numpy as np
import numpy.typing as npt

from ._sqlite import (
    SqliteService,
    breathing,
    copy_file_atomic,
    dispose,
    fsync_dir,
    fsync_file,
    gc_paused,
    in_background,
    lower_thread_priority,
    move_aside,
    pause,
    quick_check,
    quick_check_sync,
    read_only,
)
from .errors import ChangeRejected, StoreError, VersionGap
from .index import (
    F_ACTIVE,
    F_EMERGENCY,
    F_EXTENDED,
    F_OFFLINE,
    NO_END,
    NO_START,
    STATUS_CODES,
    AssignRow,
    CredRow,
    Digest,
    RightsIndex,
    Tables,
    UserRow,
    cred_hash,
    index_digest,
    status_word,
    table_hash,
    table_hashes,
    user_hash,
)
from .model import (
    MAX_DOORS,
    MAX_GROUPS,
    MAX_SCHEDULES,
    ChangeSet,
    Credential,
    DeleteCredential,
    DeleteDoor,
    DeleteGroup,
    DeleteSchedule,
    DeleteUser,
    Door,
    Group,
    PutCredential,
    PutDoor,
    PutGroup,
    PutSchedule,
    PutUser,
    Schedule,
    Snapshot,
    User,
    check_limits,
)
from .pin import valid_pin_hash
from .schedule import CompiledSchedule
from .tasks import cancel_and_wait

log = logging.getLogger(__name__)
T = TypeVar("T")
_ABSENT: Any = object()


SCHEMA_VERSION = 3
#: Index entries staged per loop turn while publishing a change set (keeps each turn well under 1 ms).
STAGE_SLICE = 250
#: Changes validated per loop turn.
PLAN_SLICE = 50
#: Intervals (plus holidays) up to which a schedule is compiled on the loop (~0.2 ms); larger ones in a thread.
INLINE_COMPILE = 64
#: Overlay size that triggers folding it into the base arrays (in a worker thread).
COMPACT_AT = 200_000

_MIGRATIONS: dict[int, list[str]] = {
    1: [
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID",
        "CREATE TABLE doors (id TEXT PRIMARY KEY, body BLOB NOT NULL) WITHOUT ROWID",
        "CREATE TABLE schedules (id TEXT PRIMARY KEY, body BLOB NOT NULL) WITHOUT ROWID",
        "CREATE TABLE groups (id TEXT PRIMARY KEY, body BLOB NOT NULL) WITHOUT ROWID",
        """CREATE TABLE users (
            uid INTEGER PRIMARY KEY, ext_id TEXT NOT NULL UNIQUE, name TEXT NOT NULL DEFAULT '',
            flags INTEGER NOT NULL, vfrom INTEGER NOT NULL, vuntil INTEGER NOT NULL, pin_hash TEXT)""",
        """CREATE TABLE assignments (
            uid INTEGER NOT NULL, pos INTEGER NOT NULL, group_id TEXT NOT NULL,
            vfrom INTEGER NOT NULL, vuntil INTEGER NOT NULL, PRIMARY KEY (uid, pos)) WITHOUT ROWID""",
        "CREATE INDEX assignments_group ON assignments (group_id)",
        """CREATE TABLE credentials (
            card INTEGER PRIMARY KEY, uid INTEGER NOT NULL, format TEXT NOT NULL, status INTEGER NOT NULL,
            vfrom INTEGER NOT NULL, vuntil INTEGER NOT NULL)""",
        "CREATE INDEX credentials_uid ON credentials (uid)",
        "INSERT INTO meta (key, value) VALUES ('rights_version', 0)",
    ],
    2: ["ALTER TABLE credentials ADD COLUMN facility INTEGER"],
    # 3: meta.rights_digest (see `index.Digest`), written after the migration from the rows as loaded.
    3: [],
}
META_DIGEST = "rights_digest"
#: The alarm the agent journals when the store was found damaged at open (`Store.damage` is its detail).
RIGHTS_DAMAGED = "alarm.rights_damaged"
#: `Store.needs_snapshot` after a damaged store: the reason the link gives the cloud when asking for one.
DAMAGED = "damaged"


class Damaged(StoreError):
    """The rights file fails its integrity check (SQLite structure, schema or the rights checksum)."""


#: What opening a damaged file raises: SQLite's own errors (not a database, malformed, ...), ours, and
#: the decoders' (a body that no longer decodes).
_DAMAGE_ERRORS = (sqlite3.DatabaseError, Damaged, msgspec.DecodeError, msgspec.ValidationError, ValueError,
                  KeyError, IndexError, TypeError)  # fmt: skip


def read_index(path: Path, site_tz: ZoneInfo) -> tuple[RightsIndex, str | None, str | None]:
    """(index, stored digest text, quick_check problem) read from the file with a connection of its own.

    Blocking: for a worker thread (`Store.check_integrity`). Reads the rows the way `Store` loads them."""
    lower_thread_priority()
    con = read_only(path)
    try:
        problem = quick_check_sync(con)
        meta = dict(con.execute("SELECT key, value FROM meta WHERE key IN ('rights_version', ?)", (META_DIGEST,)))
        doors = [_dec_door.decode(b) for (b,) in con.execute("SELECT body FROM doors")]
        scheds = [_dec_sched.decode(b) for (b,) in con.execute("SELECT body FROM schedules")]
        groups = [_dec_group.decode(b) for (b,) in con.execute("SELECT body FROM groups")]
        tables = Tables.build(site_tz, doors, scheds, groups)
        c = np.array(
            con.execute(
                "SELECT card, uid, status | (coalesce(facility + 1, 0) << 8), vfrom, vuntil FROM credentials "
                "ORDER BY card"
            ).fetchall(),
            dtype=np.int64,
        ).reshape(-1, 5)
        assigns: dict[int, list[AssignRow]] = {}
        for uid, g, f, u in con.execute("SELECT uid, group_id, vfrom, vuntil FROM assignments ORDER BY uid, pos"):
            assigns.setdefault(int(uid), []).append((tables.gidx.get(g, 0xFFFF), f, u))
        users: list[tuple[int, UserRow]] = [
            (int(uid), (ext, flags, f, u, pin, tuple(assigns.get(int(uid), ()))))
            for uid, ext, flags, f, u, pin in con.execute(
                "SELECT uid, ext_id, flags, vfrom, vuntil, pin_hash FROM users ORDER BY uid"
            )
        ]
    finally:
        con.close()
    from .index import build_arrays

    creds: list[tuple[int, CredRow]] = [(int(r[0]), (int(r[1]), int(r[2]), int(r[3]), int(r[4]))) for r in c]
    idx = RightsIndex(tables, build_arrays(creds, users), version=int(meta.get("rights_version", -1)))
    digest = meta.get(META_DIGEST)
    return idx, None if digest is None else str(digest), problem


_enc = msgspec.msgpack.Encoder()
_dec_door = msgspec.msgpack.Decoder(Door)
_dec_sched = msgspec.msgpack.Decoder(Schedule)
_dec_group = msgspec.msgpack.Decoder(Group)


class ApplyResult(msgspec.Struct, frozen=True):
    version: int
    applied: bool  # False: a duplicate or older change set, acknowledged without applying it again
    changes: int = 0


def _secs(dt: Any, default: int, path: str) -> int:
    if dt is None:
        return default
    if dt.tzinfo is None:
        raise ChangeRejected("bad_field", f"{path}: time has no UTC offset", path=path)
    v = int(dt.timestamp())
    if not 0 <= v < NO_END:
        raise ChangeRejected("bad_field", f"{path}: time {dt.isoformat()} is out of range", path=path)
    return v


def _window(obj: Any, path: str) -> tuple[int, int]:
    f = _secs(obj.valid_from, NO_START, f"{path}.valid_from")
    u = _secs(obj.valid_until, NO_END, f"{path}.valid_until")
    if f >= u:
        raise ChangeRejected("bad_field", f"{path}: valid_from must be before valid_until", path=path)
    return f, u


def user_flags(u: User) -> int:
    return (
        (F_ACTIVE if u.active else 0)
        | (F_OFFLINE if u.offline_access else 0)
        | (F_EXTENDED if u.extended_door_time else 0)
        | (F_EMERGENCY if u.emergency else 0)
    )


@dataclass
class _Plan:
    """What a validated change set does: SQL parameter lists and index rows."""

    tables: Tables | None = None
    #: The end state of each door, schedule and group the change set touches: an id is either put (its
    #: last value) or deleted, never both, so the order the writer runs them in cannot matter.
    put_doors: dict[str, Door] = field(default_factory=dict)
    del_doors: set[str] = field(default_factory=set)
    put_scheds: dict[str, Schedule] = field(default_factory=dict)
    del_scheds: set[str] = field(default_factory=set)
    put_groups: dict[str, Group] = field(default_factory=dict)
    del_groups: set[str] = field(default_factory=set)
    #: (kind, id) -> (encoded body, its `table_hash`) of every door, schedule and group put
    bodies: dict[tuple[str, str], tuple[bytes, int]] = field(default_factory=dict)
    users: dict[int, tuple[User, UserRow] | None] = field(default_factory=dict)
    deleted_users: list[int] = field(default_factory=list)
    #: card -> (credential, uid, index row, index of its change), or None for a deleted card
    creds: dict[int, tuple[Credential, int, CredRow, int] | None] = field(default_factory=dict)
    next_uid: int = 0


class Store(SqliteService):
    """Rights on disk + the in-memory index. Use as `async with Store(path, tz) as store`."""

    what = "store"

    def __init__(self, path: Path | str, site_tz: ZoneInfo | str = "UTC", *, synchronous: str = "FULL") -> None:
        super().__init__()
        self.path = Path(path)
        self.site_tz = site_tz if isinstance(site_tz, ZoneInfo) else ZoneInfo(site_tz)
        self.synchronous = synchronous
        self._lock = asyncio.Lock()
        self._next_uid = 1
        self.index = RightsIndex(Tables(self.site_tz))
        self._compacting: asyncio.Task[None] | None = None
        #: Called on the loop thread whenever the index object is replaced (snapshot, compaction).
        self.on_swap: list[Callable[[RightsIndex], None]] = []
        #: The checksum of the rights in force (kept in step with every change set and snapshot).
        self._digest = Digest(0)
        self._tab_hash: dict[tuple[str, str], int] = {}
        #: Set when the rights are not the ones last written (a damaged file: see `__aenter__`): the link
        #: must ask the cloud for a snapshot, with this as the reason. Cleared by the next snapshot.
        self.needs_snapshot: str | None = None
        #: What was found at open when the file was damaged (the detail of the `RIGHTS_DAMAGED` alarm the
        #: agent journals), else None.
        self.damage: dict[str, Any] | None = None

    @property
    def verified_path(self) -> Path:
        """The last verified copy of the rights (replaced atomically after each verified snapshot/compaction)."""
        return self.path.with_name(self.path.name + ".verified")

    def _swap(self, new: RightsIndex) -> None:
        self.index = new
        for cb in self.on_swap:
            cb(new)

    # --- lifecycle ------------------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        """Open and verify the rights; a damaged file never stops the start.

        The file must pass SQLite's `quick_check`, carry a known schema, decode, and match its rights
        checksum (`meta.rights_digest`, see `index.Digest`). Failing any of these, it is moved aside
        (`rights.db.damaged-<time>`, kept) and the last verified copy (`rights.db.verified`) is used instead;
        with none (or a damaged one too) the store starts empty: no door, no card, every door stays in its
        safe state. Either way `needs_snapshot` is set and `damage` says what happened, for the alarm.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            await self._open()
        except _DAMAGE_ERRORS as e:
            await self._recover(e)
        if self.damage is None and not self.verified_path.exists():
            await self._save_verified_copy()
        return self

    async def _open(self) -> None:
        existed = self.path.exists()
        if existed and self.path.stat().st_size == 0:
            raise Damaged(f"{self.path}: the file is empty (0 bytes)")
        try:
            db = await self._open_db(self.path, synchronous=self.synchronous, pragmas=("foreign_keys=OFF",))
            problem = await quick_check(db)
            if problem is not None:
                raise Damaged(f"integrity check failed: {problem}")
            have = await self._migrate(existed)
            index = await self._load_index()
            digest = await asyncio.to_thread(in_background(index_digest, index))
            stored = await self.get_meta(META_DIGEST)
            if stored is None and have >= 3:
                raise Damaged("the rights checksum is missing")
            if stored is not None and stored != digest.text():
                raise Damaged(f"the rights differ from their checksum (stored {stored}, rows {digest.text()})")
            if stored is None:  # a new file, or one written before schema 3: checksum what is there
                await self.db.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (META_DIGEST, digest.text())
                )
            self._digest = digest
            self._tab_hash = await asyncio.to_thread(in_background(table_hashes, index.tables))
            self._swap(index)
        except BaseException:
            await self.close()
            raise

    async def _recover(self, error: BaseException) -> None:
        """The file at `self.path` is damaged: move it aside and open the verified copy, or nothing."""
        reason = f"{type(error).__name__}: {error}"[:300]
        moved = move_aside(self.path)
        log.error("rights store %s is damaged (%s); moved aside to %s", self.path, reason, moved.name)
        fallback = "empty"
        copy_error: str | None = None
        if self.verified_path.exists():
            await asyncio.to_thread(copy_file_atomic, self.verified_path, self.path)
            try:
                await self._open()
                fallback = "verified_copy"
            except _DAMAGE_ERRORS as e:
                copy_error = f"{type(e).__name__}: {e}"[:300]
                log.error("the verified copy %s is damaged too (%s)", self.verified_path, copy_error)
                move_aside(self.path)
                move_aside(self.verified_path)
        if fallback == "empty":
            await self._open()  # a new, empty file
            log.error(
                "rights store started EMPTY: no doors, no credentials; every door stays in its safe state "
                "until the cloud sends a snapshot"
            )
        else:
            log.error("rights store runs on its last verified copy (version %d) until the cloud sends a snapshot",
                      self.version)  # fmt: skip
        self.needs_snapshot = DAMAGED
        self.damage = {
            "error": reason, "moved_to": moved.name, "fallback": fallback, "version": self.version,
            "credentials": len(self.index), **({"copy_error": copy_error} if copy_error else {}),
        }  # fmt: skip

    async def _save_verified_copy(self) -> None:
        """Write a consistent copy of the rights next to them, atomically (temp file, fsync, rename)."""
        tmp = self.verified_path.with_name(self.verified_path.name + ".tmp")
        try:
            tmp.unlink(missing_ok=True)
            await self.db.execute("VACUUM INTO ?", (str(tmp),))
            await asyncio.to_thread(fsync_file, tmp)
            os.replace(tmp, self.verified_path)
            await asyncio.to_thread(fsync_dir, self.path.parent)
        except (sqlite3.Error, OSError) as e:  # no copy is a loss of a fallback, never a reason to stop
            log.error("could not write the verified copy of the rights: %s", e)
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)

    async def check_integrity(self) -> str | None:
        """The periodic check (the agent calls it, e.g. hourly): None when the file is sound and holds
        exactly the rights in memory; else what is wrong (logged as an error; `needs_snapshot` is set).

        Runs SQLite's `quick_check` and recomputes the rights checksum from the rows, in a worker thread at
        background priority with a read-only connection of its own: the loop never waits on it. When sound
        and the verified copy is older than the rights, the copy is refreshed.
        """
        async with self._lock:
            problem = await self._check_locked()
            if problem is None and await self._copy_version() != self.version:
                await self._save_verified_copy()
            return problem

    async def _check_locked(self) -> str | None:
        want = self._digest.text()
        try:
            idx, stored, problem = await asyncio.to_thread(read_index, self.path, self.site_tz)
            got = await asyncio.to_thread(in_background(index_digest, idx))
        except _DAMAGE_ERRORS as e:
            problem = f"{type(e).__name__}: {e}"
        else:
            if problem is None and stored != want:
                problem = f"the stored checksum {stored} is not that of the rights in force ({want})"
            elif problem is None and got.text() != want:
                problem = f"the rows on disk differ from the rights in force ({got.text()} != {want})"
        if problem is not None:
            log.error("rights store %s failed its integrity check: %s", self.path, problem)
            self.needs_snapshot = DAMAGED
            return problem[:300]
        return None

    async def _copy_version(self) -> int | None:
        def read() -> int | None:
            if not self.verified_path.exists():
                return None
            con = read_only(self.verified_path)
            try:
                row = con.execute("SELECT value FROM meta WHERE key='rights_version'").fetchone()
                return int(row[0]) if row else None
            except sqlite3.Error:
                return None
            finally:
                con.close()

        return await asyncio.to_thread(read)

    async def close(self) -> None:
        if self._compacting is not None:
            try:
                await cancel_and_wait(self._compacting)
            except Exception:  # a failed compaction changes nothing on disk: report it, close anyway
                log.exception("index compaction failed")
            self._compacting = None
        await self._close_db()

    @property
    def version(self) -> int:
        return self.index.visible

    async def _migrate(self, existed: bool = False) -> int:
        """Bring the schema up to date; returns the version found. A file that existed but holds no schema
        (emptied, wiped) and one of an unknown (newer) schema are refused as damaged."""
        async with self.db.execute("PRAGMA user_version") as cur:
            row = await cur.fetchone()
        have = int(row[0]) if row else 0
        if have > SCHEMA_VERSION:
            raise Damaged(f"{self.path}: schema version {have} is newer than this software ({SCHEMA_VERSION})")
        if have == 0 and existed:
            raise Damaged(f"{self.path}: the file holds no rights schema (emptied or wiped)")
        for v in range(have + 1, SCHEMA_VERSION + 1):
            await self.db.execute("BEGIN IMMEDIATE")
            try:
                for stmt in _MIGRATIONS[v]:
                    await self.db.execute(stmt)
                await self.db.execute(f"PRAGMA user_version={v}")
                await self.db.execute("COMMIT")
            except BaseException:
                await self.db.execute("ROLLBACK")
                raise
            log.info("store schema migrated to version %d", v)
        return have

    async def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        async with self.db.execute(sql, params) as cur:
            return list(await cur.fetchall())

    async def _chunks(self, sql: str, size: int = 200_000) -> list[npt.NDArray[np.int64]]:
        out: list[npt.NDArray[np.int64]] = []
        async with self.db.execute(sql) as cur:
            cur.arraysize = size
            while rows := await cur.fetchmany(size):
                out.append(np.array(rows, dtype=np.int64))
        return out

    async def _load_index(self) -> RightsIndex:
        version = int((await self._rows("SELECT value FROM meta WHERE key='rights_version'"))[0][0])
        bodies = [[b for (b,) in await self._rows(f"SELECT body FROM {t}")] for t in ("doors", "schedules", "groups")]
        tables = await asyncio.to_thread(in_background(_decode_tables, self.site_tz, *bodies))
        arrays = await self.load_arrays(tables)
        mx = await self._rows("SELECT max(uid) FROM users")
        self._next_uid = int(mx[0][0] or 0) + 1
        return RightsIndex(tables, arrays, version=version)

    async def load_arrays(self, tables: Tables) -> tuple[dict[str, npt.NDArray[np.generic]], bytes, dict[int, str]]:
        def cols(chunks: list[npt.NDArray[np.int64]], n: int) -> npt.NDArray[np.int64]:
            return np.concatenate(chunks) if chunks else np.zeros((0, n), np.int64)

        c = cols(
            await self._chunks(
                "SELECT card, uid, status | (coalesce(facility + 1, 0) << 8), vfrom, vuntil "
                "FROM credentials ORDER BY card"
            ),
            5,
        )
        u = cols(await self._chunks("SELECT uid, flags, vfrom, vuntil FROM users ORDER BY uid"), 4)
        await self.db.execute("CREATE TEMP TABLE IF NOT EXISTS gmap (group_id TEXT PRIMARY KEY, gidx INTEGER)")
        await self.db.execute("DELETE FROM temp.gmap")
        await self.db.executemany("INSERT INTO temp.gmap VALUES (?, ?)", list(tables.gidx.items()))
        a = cols(
            await self._chunks(
                "SELECT a.uid, g.gidx, a.vfrom, a.vuntil FROM assignments a "
                "JOIN temp.gmap g ON g.group_id = a.group_id ORDER BY a.uid, a.pos"
            ),
            4,
        )
        ids: list[bytes] = []
        async with self.db.execute("SELECT ext_id FROM users ORDER BY uid") as cur:
            cur.arraysize = 200_000
            while rows := await cur.fetchmany(200_000):
                ids.extend(r[0].encode() for r in rows)
        pins = {
            int(uid): str(h)
            for uid, h in await self._rows("SELECT uid, pin_hash FROM users WHERE pin_hash IS NOT NULL")
        }
        uid_col = u[:, 0]
        counts = np.bincount(np.searchsorted(uid_col, a[:, 0]), minlength=len(uid_col))[: len(uid_col)]
        lens = np.fromiter(map(len, ids), np.int64, len(ids))
        arrays: dict[str, npt.NDArray[np.generic]] = {
            "c_card": c[:, 0].astype(np.uint64),
            "c_uid": c[:, 1].astype(np.uint32),
            "c_status": c[:, 2].astype(np.uint32),
            "c_from": c[:, 3].astype(np.uint32),
            "c_until": c[:, 4].astype(np.uint32),
            "u_uid": uid_col.astype(np.uint32),
            "u_flags": u[:, 1].astype(np.uint8),
            "u_from": u[:, 2].astype(np.uint32),
            "u_until": u[:, 3].astype(np.uint32),
            "u_aoff": np.concatenate([[0], np.cumsum(counts)]).astype(np.uint32),
            "u_idoff": np.concatenate([[0], np.cumsum(lens)]).astype(np.uint32),
            "a_gidx": a[:, 1].astype(np.uint16),
            "a_from": a[:, 2].astype(np.uint32),
            "a_until": a[:, 3].astype(np.uint32),
        }
        return arrays, b"".join(ids), pins

    # --- reads for support tools ------------------------------------------------------------------------

    async def get_meta(self, key: str) -> Any:
        rows = await self._rows("SELECT value FROM meta WHERE key=?", (key,))
        return rows[0][0] if rows else None

    async def set_meta(self, key: str, value: Any) -> None:
        """Write one meta value durably, in a transaction of its own: under the store's lock, so that it never
        lands inside a change set's open transaction (and is never rolled back with it)."""
        async with self._lock:
            await self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    async def counts(self) -> dict[str, int]:
        out = {}
        for t in ("doors", "schedules", "groups", "users", "credentials", "assignments"):
            out[t] = int((await self._rows(f"SELECT count(*) FROM {t}"))[0][0])
        return out

    # --- change sets ------------------------------------------------------------------------------------

    async def apply(self, cs: ChangeSet) -> ApplyResult:
        """Apply a change set all or nothing. Old or duplicate sets are acknowledged, not re-applied.

        Raises `VersionGap` when the set does not start at the current version, and `ChangeRejected`
        (naming the change and field) when anything in it is invalid; nothing is applied then.
        """
        async with self._lock:
            with gc_paused():
                return await self._apply(cs)

    async def _apply(self, cs: ChangeSet) -> ApplyResult:
        have = self.index.visible
        if cs.to_version <= have:
            return ApplyResult(have, applied=False)
        if cs.from_version != have:
            raise VersionGap(have, cs.from_version)
        if cs.to_version <= cs.from_version:
            raise ChangeRejected("bad_field", "to_version must be greater than from_version", path="to_version")
        plan = await self._plan(cs)
        digest, tab_hash = await self._digest_after(plan, cs.to_version)
        await self._write(plan, cs.to_version, digest)
        self._next_uid = plan.next_uid
        self._digest, self._tab_hash = digest, tab_hash
        await self._stage(plan, cs.to_version)
        self._maybe_compact()
        await dispose(plan.creds, plan.users)
        return ApplyResult(cs.to_version, applied=True, changes=len(cs.changes))

    async def replace(self, snap: Snapshot) -> ApplyResult:
        """Replace all rights with a snapshot, atomically on disk and in memory."""
        async with self._lock:
            with gc_paused():
                return await self._replace(snap)

    async def _replace(self, snap: Snapshot) -> ApplyResult:
        if snap.version < self.index.visible:
            return ApplyResult(self.index.visible, applied=False)

        def as_changes() -> list[Any]:
            changes: list[Any] = []
            changes += [PutSchedule(schedule=s) for s in snap.schedules]
            changes += [PutDoor(door=d) for d in snap.doors]
            changes += [PutGroup(group=g) for g in snap.groups]
            changes += [PutUser(user=u) for u in snap.users]
            changes += [PutCredential(credential=c) for c in snap.credentials]
            return changes

        changes = await asyncio.to_thread(in_background(as_changes))  # 100k objects: off the loop thread
        empty = RightsIndex(Tables(self.site_tz))
        plan = await self._plan(
            ChangeSet(from_version=0, to_version=max(snap.version, 1), changes=changes),
            base=empty,
            next_uid=1,
        )
        assert plan.tables is not None or not (snap.doors or snap.schedules or snap.groups)
        tables = plan.tables or Tables(self.site_tz)
        new = await asyncio.to_thread(in_background(_index_from_plan, tables, plan, snap.version))
        digest = await asyncio.to_thread(in_background(index_digest, new))
        await self._write(plan, snap.version, digest, wipe=True)
        self._next_uid = plan.next_uid
        self._digest, self._tab_hash = digest, {k: v[1] for k, v in plan.bodies.items()}
        old = self.index
        self._swap(new)
        await dispose(*old.detach_overlay(), changes, plan.creds, plan.users)
        if self.needs_snapshot is not None:
            log.warning("rights replaced by a snapshot (version %d): the store is whole again", snap.version)
            self.needs_snapshot = None
        await self._save_verified_copy()
        return ApplyResult(snap.version, applied=True, changes=len(changes))

    async def _uids(self, ext_ids: Iterable[str], out: dict[str, int | None]) -> None:
        """Fill `out` with the uids of the existing users among `ext_ids` (500 per query and loop turn)."""
        ids = list(ext_ids)
        for i in range(0, len(ids), 500):
            part = ids[i : i + 500]
            q = f"SELECT ext_id, uid FROM users WHERE ext_id IN ({','.join('?' * len(part))})"
            for e, u in await self._rows(q, part):
                out[e] = int(u)

    async def _cards_of(self, uids: Iterable[int]) -> dict[int, list[int]]:
        ids = list(uids)
        out: dict[int, list[int]] = {}
        for i in range(0, len(ids), 500):
            part = ids[i : i + 500]
            q = f"SELECT uid, card FROM credentials WHERE uid IN ({','.join('?' * len(part))})"
            for u, c in await self._rows(q, part):
                out.setdefault(int(u), []).append(int(c))
        return out

    async def _plan(self, cs: ChangeSet, *, base: RightsIndex | None = None, next_uid: int | None = None) -> _Plan:
        idx = base if base is not None else self.index
        tables = idx.tables
        plan = _Plan(next_uid=self._next_uid if next_uid is None else next_uid)
        doors = dict(tables.doors)
        scheds = dict(tables.schedule_models)
        groups = dict(tables.groups)
        compiled = dict(tables.schedules)  # reused by Tables.build for every schedule the set leaves alone
        small_changed = False

        uid_of: dict[str, int | None] = {}
        cards_of_user: dict[int, set[int]] = {}
        deleted_ids: list[str] = []
        if base is None:  # a snapshot starts from nothing: no existing user to look up
            # The uids of the users referenced, looked up 500 changes per query and loop turn: no set of all
            # referenced ids (10^5 of them would be a C call of several ms, that no thread can interrupt).
            for i in range(0, len(cs.changes), 500):
                part = cs.changes[i : i + 500]
                dels = [c.id for c in part if isinstance(c, DeleteUser)]
                deleted_ids += dels
                refs = {c.user.id for c in part if isinstance(c, PutUser)}
                refs.update(c.credential.user for c in part if isinstance(c, PutCredential))
                refs.update(dels)
                await self._uids([r for r in refs if r not in uid_of], uid_of)
            deleted_uids = [d for e in deleted_ids if (d := uid_of.get(e)) is not None]
            cards_of_user = {u: set(c) for u, c in (await self._cards_of(deleted_uids)).items()}
        ext_of: dict[int, str] = {}
        user_models: dict[int, tuple[User, int]] = {}  # uid -> (user, index of its change)
        track_cards = bool(deleted_ids)  # cards added per user matter only when users are deleted
        # Few dicts, filled once per change: each large dict costs a resize of several ms on the loop.
        creds = plan.creds

        def owner(card: int) -> int | None:
            e = creds.get(card, _ABSENT)
            if e is not _ABSENT:
                return None if e is None else e[1]
            row = idx.cred(card)
            return row[0] if row is not None else None

        for i, ch in enumerate(cs.changes):
            if i % PLAN_SLICE == PLAN_SLICE - 1:
                await pause()  # validation of a large set must not hold the loop
            p = f"changes[{i}]"
            if isinstance(ch, PutDoor):
                check_limits(ch.door, f"{p}.door")
                doors[ch.door.id] = ch.door
                plan.del_doors.discard(ch.door.id)
                plan.put_doors[ch.door.id] = ch.door
                small_changed = True
            elif isinstance(ch, DeleteDoor):
                if doors.pop(ch.id, None) is None:
                    raise ChangeRejected("unknown_reference", f"{p}.id: no door {ch.id!r}", path=f"{p}.id")
                plan.put_doors.pop(ch.id, None)
                plan.del_doors.add(ch.id)
                small_changed = True
            elif isinstance(ch, PutSchedule):
                check_limits(ch.schedule, f"{p}.schedule")
                sc = ch.schedule
                try:
                    if len(sc.intervals) + len(sc.holiday_intervals) + len(sc.holidays) <= INLINE_COMPILE:
                        compiled[sc.id] = CompiledSchedule(sc, self.site_tz)
                    else:  # a large schedule is compiled beside the loop, never on it
                        compiled[sc.id] = await asyncio.to_thread(in_background(CompiledSchedule, sc, self.site_tz))
                except (ValueError, KeyError) as e:
                    raise ChangeRejected("bad_field", f"{p}.schedule: {e}", path=f"{p}.schedule") from None
                scheds[ch.schedule.id] = ch.schedule
                plan.del_scheds.discard(ch.schedule.id)
                plan.put_scheds[ch.schedule.id] = ch.schedule
                small_changed = True
            elif isinstance(ch, DeleteSchedule):
                if scheds.pop(ch.id, None) is None:
                    raise ChangeRejected("unknown_reference", f"{p}.id: no schedule {ch.id!r}", path=f"{p}.id")
                plan.put_scheds.pop(ch.id, None)
                plan.del_scheds.add(ch.id)
                small_changed = True
            elif isinstance(ch, PutGroup):
                check_limits(ch.group, f"{p}.group")
                groups[ch.group.id] = ch.group
                plan.del_groups.discard(ch.group.id)
                plan.put_groups[ch.group.id] = ch.group
                small_changed = True
            elif isinstance(ch, DeleteGroup):
                if groups.pop(ch.id, None) is None:
                    raise ChangeRejected("unknown_reference", f"{p}.id: no group {ch.id!r}", path=f"{p}.id")
                plan.put_groups.pop(ch.id, None)
                plan.del_groups.add(ch.id)
                small_changed = True
            elif isinstance(ch, PutUser):
                u = ch.user
                check_limits(u, f"{p}.user")
                uid = uid_of.get(u.id)
                if uid is None:
                    uid = plan.next_uid
                    plan.next_uid += 1
                    uid_of[u.id] = uid
                if u.pin_hash is not None and not valid_pin_hash(u.pin_hash):
                    raise ChangeRejected(
                        "bad_field",
                        f"{p}.user.pin_hash: not a pbkdf2_sha256 PIN hash",
                        path=f"{p}.user.pin_hash",
                    )
                _window(u, f"{p}.user")
                for j, a in enumerate(u.assignments):
                    _window(a, f"{p}.user.assignments[{j}]")
                ext_of[uid] = u.id
                user_models[uid] = (u, user_models[uid][1] if uid in user_models else i)
            elif isinstance(ch, DeleteUser):
                uid = uid_of.get(ch.id)
                if uid is None:
                    raise ChangeRejected("unknown_reference", f"{p}.id: no user {ch.id!r}", path=f"{p}.id")
                for card in cards_of_user.pop(uid, set()):
                    if owner(card) == uid:
                        creds[card] = None
                uid_of[ch.id] = None
                user_models.pop(uid, None)
                plan.users[uid] = None
                plan.deleted_users.append(uid)
            elif isinstance(ch, PutCredential):
                c = ch.credential
                check_limits(c, f"{p}.credential")
                uid = uid_of.get(c.user)
                if uid is None:
                    raise ChangeRejected(
                        "unknown_reference",
                        f"{p}.credential.user: no user {c.user!r}",
                        path=f"{p}.credential.user",
                    )
                have = owner(c.card)
                if have is not None and have != uid:
                    who = ext_of.get(have) or (r[0] if (r := idx.user(have)) else str(have))
                    raise ChangeRejected(
                        "duplicate_card",
                        f"{p}.credential.card: card {c.card} already belongs to user {who!r}",
                        path=f"{p}.credential.card",
                    )
                f, un = _window(c, f"{p}.credential")
                if track_cards:
                    cards_of_user.setdefault(uid, set()).add(c.card)
                creds[c.card] = (c, uid, (uid, status_word(STATUS_CODES[c.status], c.facility), f, un), i)
            elif isinstance(ch, DeleteCredential):
                have = owner(ch.card)
                if have is None:
                    raise ChangeRejected("unknown_reference", f"{p}.card: no card {ch.card}", path=f"{p}.card")
                creds[ch.card] = None
            else:  # pragma: no cover - the union is closed
                raise ChangeRejected("malformed", f"{p}: unknown change")

        if small_changed:
            # The end state's references and limits, and the new tables: in a worker thread (with the
            # limits, up to ~10^6 group-door pairs; schedules compiled above are reused, not compiled again).
            plan.tables = await asyncio.to_thread(
                in_background(
                    functools.partial(_small_tables, gidx=tables.gidx, compiled=compiled),
                    self.site_tz,
                    doors,
                    scheds,
                    groups,
                )
            )
            plan.bodies = await asyncio.to_thread(
                in_background(_encode_bodies, plan.put_doors, plan.put_scheds, plan.put_groups)
            )
        new_tables = plan.tables or tables
        for n, (uid, (u, ui)) in enumerate(user_models.items()):
            if n % PLAN_SLICE == PLAN_SLICE - 1:
                await pause()
            rows: list[AssignRow] = []
            for j, a in enumerate(u.assignments):
                g = new_tables.gidx.get(a.group)
                if g is None or a.group not in new_tables.groups:
                    path = f"changes[{ui}].user.assignments[{j}].group"
                    raise ChangeRejected("unknown_reference", f"{path}: no group {a.group!r}", path=path)
                f, un = _window(a, path="assignment")
                rows.append((g, f, un))
            wf, wu = _window(u, "user")
            plan.users[uid] = (u, (u.id, user_flags(u), wf, wu, u.pin_hash, tuple(rows)))
        if plan.del_groups and base is None:
            touched = list(plan.users)
            gids = sorted(plan.del_groups)
            not_touched = f"AND a.uid NOT IN ({','.join('?' * len(touched))})" if touched else ""
            q = (
                f"SELECT u.ext_id, a.group_id FROM assignments a JOIN users u ON u.uid = a.uid "
                f"WHERE a.group_id IN ({','.join('?' * len(gids))}) {not_touched} LIMIT 1"
            )
            hit = await self._rows(q, [*gids, *touched])
            if hit:
                raise ChangeRejected(
                    "unknown_reference",
                    f"group {hit[0][1]!r} is still assigned to user {hit[0][0]!r}",
                    path=f"users[{hit[0][0]}].assignments",
                )
        # A credential may only point at a user that exists at the end.
        for n, entry in enumerate(plan.creds.values()):
            if n % (PLAN_SLICE * 10) == 0:
                await pause()
            if entry is not None and plan.users.get(entry[1], True) is None:
                path = f"changes[{entry[3]}].credential.user"
                raise ChangeRejected("unknown_reference", f"{path}: the user is deleted in this change set", path=path)
        await dispose(uid_of, user_models, ext_of, cards_of_user)
        return plan

    async def _digest_after(self, plan: _Plan, version: int) -> tuple[Digest, dict[tuple[str, str], int]]:
        """The rights checksum once `plan` is applied: the old rows' hashes out, the new rows' in."""
        idx = self.index
        d = self._digest
        nc, nu, c, u = d.n_creds, d.n_users, d.creds, d.users
        for n, (card, e) in enumerate(plan.creds.items()):
            if n % STAGE_SLICE == STAGE_SLICE - 1:
                await pause()
            old = idx.cred(card)
            if old is not None:
                c, nc = c - cred_hash(card, old), nc - 1
            if e is not None:
                c, nc = c + cred_hash(card, e[2]), nc + 1
        old_gid = idx.tables.gid
        new_gid = (plan.tables or idx.tables).gid
        for n, (uid, v) in enumerate(plan.users.items()):
            if n % STAGE_SLICE == STAGE_SLICE - 1:
                await pause()
            urow = idx.user(uid)
            if urow is not None:
                u, nu = u - user_hash(uid, urow, old_gid), nu - 1
            if v is not None:
                u, nu = u + user_hash(uid, v[1], new_gid), nu + 1
        tab = self._tab_hash
        if plan.tables is not None:
            tab = dict(tab)
            for kind, puts, dels in (
                ("door", plan.put_doors, plan.del_doors),
                ("schedule", plan.put_scheds, plan.del_scheds),
                ("group", plan.put_groups, plan.del_groups),
            ):
                for k in dels:
                    tab.pop((kind, k), None)
                for k in puts:
                    tab[(kind, k)] = plan.bodies[(kind, k)][1]
        m64 = (1 << 64) - 1
        return Digest(version, nc, nu, c & m64, u & m64, sum(tab.values()) & m64), tab

    async def _write(self, plan: _Plan, version: int, digest: Digest, *, wipe: bool = False) -> None:
        db = self.db
        try:
            await db.execute("BEGIN IMMEDIATE")
            if wipe:
                for t in ("doors", "schedules", "groups", "users", "assignments", "credentials"):
                    await db.execute(f"DELETE FROM {t}")
            await db.executemany("DELETE FROM doors WHERE id=?", [(d,) for d in plan.del_doors])
            await db.executemany("DELETE FROM schedules WHERE id=?", [(s,) for s in plan.del_scheds])
            await db.executemany("DELETE FROM groups WHERE id=?", [(g,) for g in plan.del_groups])
            for kind, table, puts in (
                ("door", "doors", plan.put_doors),
                ("schedule", "schedules", plan.put_scheds),
                ("group", "groups", plan.put_groups),
            ):
                await db.executemany(
                    f"INSERT OR REPLACE INTO {table} VALUES (?, ?)", [(k, plan.bodies[(kind, k)][0]) for k in puts]
                )
            touched = ((uid,) for uid in plan.users)
            await db.executemany("DELETE FROM assignments WHERE uid=?", touched)
            dead = [(uid,) for uid in plan.deleted_users]
            await db.executemany("DELETE FROM users WHERE uid=?", dead)
            await db.executemany("DELETE FROM credentials WHERE uid=?", dead)

            def live() -> Iterator[tuple[int, tuple[User, UserRow]]]:
                return ((uid, v) for uid, v in plan.users.items() if v is not None)

            await db.executemany(
                "INSERT INTO users (uid, ext_id, name, flags, vfrom, vuntil, pin_hash) VALUES (?,?,?,?,?,?,?) "
                "ON CONFLICT(uid) DO UPDATE SET name=excluded.name, flags=excluded.flags, vfrom=excluded.vfrom, "
                "vuntil=excluded.vuntil, pin_hash=excluded.pin_hash",
                breathing((uid, u.id, u.name, r[1], r[2], r[3], u.pin_hash) for uid, (u, r) in live()),
            )
            await db.executemany(
                "INSERT INTO assignments (uid, pos, group_id, vfrom, vuntil) VALUES (?,?,?,?,?)",
                ((uid, j, u.assignments[j].group, a[1], a[2]) for uid, (u, r) in live() for j, a in enumerate(r[5])),
            )
            await db.executemany(
                "DELETE FROM credentials WHERE card=?", breathing((c,) for c, v in plan.creds.items() if v is None)
            )
            await db.executemany(
                "INSERT OR REPLACE INTO credentials (card, uid, format, status, vfrom, vuntil, facility) "
                "VALUES (?,?,?,?,?,?,?)",
                breathing(
                    (card, v[1], v[0].format, STATUS_CODES[v[0].status], v[2][2], v[2][3], v[0].facility)
                    for card, v in plan.creds.items()
                    if v
                ),
            )
            await db.execute("UPDATE meta SET value=? WHERE key='rights_version'", (version,))
            await db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (META_DIGEST, digest.text()))
            await db.execute("COMMIT")
        except BaseException as e:
            try:
                await db.execute("ROLLBACK")
            except Exception:  # the transaction may already be gone (e.g. I/O error)
                pass
            if isinstance(e, Exception) and not isinstance(e, ChangeRejected):
                raise StoreError(f"writing the change set failed, nothing applied: {e}") from e
            raise

    async def _stage(self, plan: _Plan, version: int) -> None:
        idx = self.index
        idx.begin(version)
        try:
            if plan.tables is not None:
                idx.stage_tables(plan.tables)
            n = 0
            for uid, v in plan.users.items():
                idx.stage_user(uid, None if v is None else v[1])
                n += 1
                if n % STAGE_SLICE == 0:
                    await pause()
            for card, c in plan.creds.items():
                idx.stage_cred(card, None if c is None else c[2])
                n += 1
                if n % STAGE_SLICE == 0:
                    await pause()
        except BaseException:
            # Cancelled mid-way: the disk already holds the new version, so finish staging synchronously.
            for uid, v in plan.users.items():
                idx.stage_user(uid, None if v is None else v[1])
            for card, c in plan.creds.items():
                idx.stage_cred(card, None if c is None else c[2])
            idx.publish()
            raise
        idx.publish()

    def _maybe_compact(self) -> None:
        if self.index.overlay_size < COMPACT_AT or self._compacting is not None:
            return
        self._compacting = asyncio.get_running_loop().create_task(self._compact(), name="store.compact")

    async def _compact(self) -> None:
        try:
            async with self._lock:
                await self._compact_locked()
        finally:
            self._compacting = None

    async def compact(self) -> None:
        """Fold the overlay into the base arrays now (tests and maintenance)."""
        async with self._lock:
            await self._compact_locked()

    async def _compact_locked(self) -> None:
        """Compaction, verified: the new base must carry the rights checksum of the old index (else it is
        dropped, an error logged); then the file is checked and, sound, copied as the verified copy."""
        old = self.index
        with gc_paused():
            new = await asyncio.to_thread(in_background(old.compacted))
            got = await asyncio.to_thread(in_background(index_digest, new))
            if got != self._digest:
                log.error("index compaction dropped: its checksum %s is not the rights' %s", got.text(),
                          self._digest.text())  # fmt: skip
                return
            self._swap(new)
            await dispose(*old.detach_overlay())
        if await self._check_locked() is None and await self._copy_version() != self.version:
            await self._save_verified_copy()


def _small_tables(
    site_tz: ZoneInfo,
    doors: dict[str, Door],
    scheds: dict[str, Schedule],
    groups: dict[str, Group],
    *,
    gidx: dict[str, int],
    compiled: dict[str, CompiledSchedule],
) -> Tables:
    """Check the end state of doors, schedules and groups (references, per-site limits) and build its tables.
    Pure and blocking: run in a worker thread."""
    for what, n, limit in (("doors", len(doors), MAX_DOORS), ("schedules", len(scheds), MAX_SCHEDULES),
                           ("groups", len(groups), MAX_GROUPS)):  # fmt: skip
        if n > limit:
            raise ChangeRejected("bad_field", f"{what}: the site would have {n}, more than the limit of {limit}",
                                 path=what)  # fmt: skip
    # Paths name the object of the resulting site (`groups[staff].doors[1]`): these are end-state checks,
    # so the change that broke the reference may be any of several.
    for grp in groups.values():
        for i, door_id in enumerate(grp.doors):
            if door_id not in doors:
                raise ChangeRejected("unknown_reference", f"group {grp.id!r}: no door {door_id!r}",
                                     path=f"groups[{grp.id}].doors[{i}]")  # fmt: skip
        if grp.schedule is not None and grp.schedule not in scheds:
            raise ChangeRejected("unknown_reference", f"group {grp.id!r}: no schedule {grp.schedule!r}",
                                 path=f"groups[{grp.id}].schedule")  # fmt: skip
    for door in doors.values():
        for attr, s in (("unlock_schedule", door.unlock_schedule), ("pin_schedule", door.pin_schedule)):
            if s is not None and s not in scheds:
                raise ChangeRejected("unknown_reference", f"door {door.id!r}: no schedule {s!r}",
                                     path=f"doors[{door.id}].{attr}")  # fmt: skip
    try:
        return Tables.build(site_tz, doors.values(), scheds.values(), groups.values(), gidx=gidx, compiled=compiled)
    except ValueError as e:
        raise ChangeRejected("bad_field", str(e)) from None


def _decode_tables(site_tz: ZoneInfo, doors: list[bytes], scheds: list[bytes], groups: list[bytes]) -> Tables:
    """Tables from stored bodies (blocking: a worker thread; a schedule at the limit decodes in ~4 ms)."""
    return Tables.build(
        site_tz,
        [_dec_door.decode(b) for b in doors],
        [_dec_sched.decode(b) for b in scheds],
        [_dec_group.decode(b) for b in groups],
    )


def _encode_bodies(
    doors: dict[str, Door], scheds: dict[str, Schedule], groups: dict[str, Group]
) -> dict[tuple[str, str], tuple[bytes, int]]:
    """The stored body and checksum hash of each door, schedule and group put (blocking: a worker thread;
    a schedule at the interval limit takes ~0.2 ms)."""
    out: dict[tuple[str, str], tuple[bytes, int]] = {}
    for kind, models in (("door", doors), ("schedule", scheds), ("group", groups)):
        for k, m in models.items():
            out[(kind, k)] = (_enc.encode(m), table_hash(kind, m))
    return out


def _index_from_plan(tables: Tables, plan: _Plan, version: int) -> RightsIndex:
    from .index import build_arrays

    creds = [(card, v[2]) for card, v in plan.creds.items() if v is not None]
    users = [(uid, v[1]) for uid, v in plan.users.items() if v is not None]
    return RightsIndex(tables, build_arrays(creds, users), version=version)
