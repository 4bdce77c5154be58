"""The rights file: its tables and migrations, the body codecs, reading the rows into a `RightsIndex`, and the
rights checksum (`meta.rights_digest`, an `index.Digest` of the rows) that proves the file holds what was written.

Every statement that knows a column of the rights tables lives here or in `Store._write` (the one writer).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiosqlite
import msgspec
import numpy as np
import numpy.typing as npt

from edge._sqlite import in_background, lower_thread_priority, pause, quick_check_sync, read_only
from edge.access_state import AccessState, Delta, Location
from edge.errors import StoreError
from edge.index import (
    AssignRow,
    Columns,
    CredRow,
    Digest,
    RightsIndex,
    Tables,
    UserRow,
    build_arrays,
    cred_hash,
    cred_hash_sum,
    pack,
    table_hash,
    table_hashes,
    unpack,
    user_hash,
    user_hash_sum,
)
from edge.model import Area, Door, Group, Interlock, Schedule, SiteRules

log = logging.getLogger(__name__)

SCHEMA_VERSION = 5
#: Index entries staged (or checksummed) per loop turn while a change set is published (each turn well under 1 ms).
STAGE_SLICE = 250
#: Rows checksummed per loop turn by `digest_after` (a row's old and new hashes: ~6 us each here, so a turn
#: stays well under 1 ms; 250 took 1.5-5 ms on a loaded machine).
DIGEST_SLICE = 64

#: The statements that bring a file from the previous schema version to each version.
MIGRATIONS: dict[int, list[str]] = {
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
    # 4: the access rules (issue 19): areas, interlocks, the site's rule settings (bodies, in the checksum as
    # the doors are), credentials' use limits; and the access state (not rights: outside the checksum),
    # written after each door opening.
    4: [
        "CREATE TABLE areas (id TEXT PRIMARY KEY, body BLOB NOT NULL) WITHOUT ROWID",
        "CREATE TABLE interlocks (id TEXT PRIMARY KEY, body BLOB NOT NULL) WITHOUT ROWID",
        "CREATE TABLE site_rules (id TEXT PRIMARY KEY, body BLOB NOT NULL) WITHOUT ROWID",
        "ALTER TABLE credentials ADD COLUMN max_uses INTEGER",
        "CREATE TABLE access_where (user_id TEXT PRIMARY KEY, area TEXT, since REAL NOT NULL) WITHOUT ROWID",
        "CREATE TABLE access_uses (card INTEGER PRIMARY KEY, used INTEGER NOT NULL)",
    ],
    # 5: the index image (issue 18): every credential (kind 0, by card) and user (kind 1, by uid) a change set
    # wrote, with its version, so that a boot from an image replays only what changed since; the image
    # epoch, renewed by every snapshot and recovery, ties an image to the rights it was built from.
    5: [
        "CREATE TABLE IF NOT EXISTS changed (kind INTEGER NOT NULL, key INTEGER NOT NULL, version INTEGER NOT NULL, "
        "PRIMARY KEY (kind, key)) WITHOUT ROWID",
        "INSERT OR REPLACE INTO meta (key, value) VALUES ('image_epoch', lower(hex(randomblob(8))))",
    ],
}
#: The rule tables (id, body) beside doors, schedules and groups.
RULE_TABLES = ("areas", "interlocks", "site_rules")
#: The meta key of the rights checksum (`Digest.text()`).
META_DIGEST = "rights_digest"
#: The meta key of the image epoch (see migration 5).
META_EPOCH = "image_epoch"
#: `changed.kind` of a credential row and of a user row.
CHANGED_CRED, CHANGED_USER = 0, 1


class Damaged(StoreError):
    """The rights file fails its integrity check (SQLite structure, schema or the rights checksum)."""


#: What opening a damaged file raises: SQLite's own errors (not a database, malformed, ...), ours, and
#: the decoders' (a body that no longer decodes).
DAMAGE_ERRORS = (sqlite3.DatabaseError, Damaged, msgspec.DecodeError, msgspec.ValidationError, ValueError,
                  KeyError, IndexError, TypeError)  # fmt: skip


async def migrate(db: aiosqlite.Connection, path: Path, *, existed: bool) -> int:
    """Bring the schema up to date; returns the version found. A file that existed but holds no schema
    (emptied, wiped) and one of an unknown (newer) schema are refused as damaged."""
    async with db.execute("PRAGMA user_version") as cur:
        row = await cur.fetchone()
    have = int(row[0]) if row else 0
    if have > SCHEMA_VERSION:
        raise Damaged(f"{path}: schema version {have} is newer than this software ({SCHEMA_VERSION})")
    if have == 0 and existed:
        raise Damaged(f"{path}: the file holds no rights schema (emptied or wiped)")
    for v in range(have + 1, SCHEMA_VERSION + 1):
        await db.execute("BEGIN IMMEDIATE")
        try:
            for stmt in MIGRATIONS[v]:
                await db.execute(stmt)
            await db.execute(f"PRAGMA user_version={v}")
            await db.execute("COMMIT")
        except BaseException:
            await db.execute("ROLLBACK")
            raise
        log.info("store schema migrated to version %d", v)
    return have


# --- bodies (doors, schedules, groups are stored as msgpack) -------------------------------------------------

encoder = msgspec.msgpack.Encoder()
_dec_door = msgspec.msgpack.Decoder(Door)
_dec_sched = msgspec.msgpack.Decoder(Schedule)
_dec_group = msgspec.msgpack.Decoder(Group)
_dec_area = msgspec.msgpack.Decoder(Area)
_dec_interlock = msgspec.msgpack.Decoder(Interlock)
_dec_site = msgspec.msgpack.Decoder(SiteRules)


def decode_tables(
    site_tz: ZoneInfo, doors: list[bytes], scheds: list[bytes], groups: list[bytes], *,
    areas: list[bytes] | None = None, interlocks: list[bytes] | None = None, site: list[bytes] | None = None,
    gidx: dict[str, int] | None = None,
) -> Tables:  # fmt: skip
    """Tables from stored bodies (blocking: a worker thread; a schedule at the limit decodes in ~4 ms)."""
    return Tables.build(
        site_tz,
        [_dec_door.decode(b) for b in doors],
        [_dec_sched.decode(b) for b in scheds],
        [_dec_group.decode(b) for b in groups],
        gidx,
        areas=[_dec_area.decode(b) for b in areas or ()],
        interlocks=[_dec_interlock.decode(b) for b in interlocks or ()],
        site_rules=_dec_site.decode(site[0]) if site else None,
    )


def encode_bodies(
    doors: dict[str, Door], scheds: dict[str, Schedule], groups: dict[str, Group], *,
    areas: dict[str, Area] | None = None, interlocks: dict[str, Interlock] | None = None,
    site: dict[str, SiteRules] | None = None,
) -> dict[tuple[str, str], tuple[bytes, int]]:  # fmt: skip
    """The stored body and checksum hash of each door, schedule, group, area, interlock and site setting put
    (blocking: a worker thread; a schedule at the interval limit takes ~0.2 ms)."""
    out: dict[tuple[str, str], tuple[bytes, int]] = {}
    kinds: tuple[tuple[str, Mapping[str, Any]], ...] = (
        ("door", doors), ("schedule", scheds), ("group", groups), ("area", areas or {}),
        ("interlock", interlocks or {}), ("site", site or {}),
    )  # fmt: skip
    for kind, models in kinds:
        for k, m in models.items():
            out[(kind, k)] = (encoder.encode(m), table_hash(kind, m))
    return out


# --- reading the rows -------------------------------------------------------------------------------------


async def rows(db: aiosqlite.Connection, sql: str, params: Sequence[Any] = ()) -> list[Any]:
    async with db.execute(sql, params) as cur:
        return list(await cur.fetchall())


async def _chunks(db: aiosqlite.Connection, sql: str, size: int = 200_000) -> list[npt.NDArray[np.int64]]:
    out: list[npt.NDArray[np.int64]] = []
    async with db.execute(sql) as cur:
        cur.arraysize = size
        while batch := await cur.fetchmany(size):
            out.append(np.array(batch, dtype=np.int64))
    return out


#: The index's status word of a credential row (`index.status_word`): status, use limit, facility + 1.
STATUS_WORD = "status | (coalesce(max_uses, 0) << 2) | (coalesce(facility + 1, 0) << 8)"


async def load_tables(db: aiosqlite.Connection, site_tz: ZoneInfo, gid: Sequence[str] | None = None) -> Tables:
    """The small tables on disk; `gid` (group number -> id, "" for a deleted group): the group numbering to
    carry forward (an index image's), new groups numbered after it."""
    bodies = [
        [b for (b,) in await rows(db, f"SELECT body FROM {t}")] for t in ("doors", "schedules", "groups", *RULE_TABLES)
    ]
    gidx = None if gid is None else {(g or f"\0{i}"): i for i, g in enumerate(gid)}
    decode = functools.partial(decode_tables, areas=bodies[3], interlocks=bodies[4], site=bodies[5], gidx=gidx)
    return await asyncio.to_thread(in_background(decode, site_tz, *bodies[:3]))


async def next_uid(db: aiosqlite.Connection) -> int:
    mx = await rows(db, "SELECT max(uid) FROM users")
    return int(mx[0][0] or 0) + 1


async def load_index(db: aiosqlite.Connection, site_tz: ZoneInfo) -> tuple[RightsIndex, int]:
    """The index of the rows on disk, and the next free internal user id."""
    version = int((await rows(db, "SELECT value FROM meta WHERE key='rights_version'"))[0][0])
    tables = await load_tables(db, site_tz)
    arrays = await load_arrays(db, tables)
    return RightsIndex(tables, arrays, version=version), await next_uid(db)


async def changed_rows(
    db: aiosqlite.Connection, tables: Tables, since: int
) -> tuple[list[tuple[int, CredRow | None]], list[tuple[int, UserRow | None]]]:
    """The rows, as they are now, of every credential and user a change set after version `since` wrote
    (None: deleted since): what a boot from an image of version `since` replays."""
    creds: list[tuple[int, CredRow | None]] = [
        (int(k), None if uid is None else (int(uid), int(sw), int(f), int(u)))
        for k, uid, sw, f, u in await rows(
            db,
            f"SELECT ch.key, c.uid, {STATUS_WORD}, c.vfrom, c.vuntil FROM changed ch "
            "LEFT JOIN credentials c ON c.card = ch.key WHERE ch.kind = ? AND ch.version > ?",
            (CHANGED_CRED, since),
        )
    ]
    gidx = tables.gidx
    assigns: dict[int, list[AssignRow]] = {}
    for uid, g, f, u in await rows(
        db,
        "SELECT a.uid, a.group_id, a.vfrom, a.vuntil FROM changed ch JOIN assignments a ON a.uid = ch.key "
        "WHERE ch.kind = ? AND ch.version > ? ORDER BY a.uid, a.pos",
        (CHANGED_USER, since),
    ):
        assigns.setdefault(int(uid), []).append((gidx.get(g, 0xFFFF), int(f), int(u)))
    users: list[tuple[int, UserRow | None]] = [
        (int(k), None if ext is None else (str(ext), int(fl), int(f), int(u), pin, tuple(assigns.get(int(k), ()))))
        for k, ext, fl, f, u, pin in await rows(
            db,
            "SELECT ch.key, u.ext_id, u.flags, u.vfrom, u.vuntil, u.pin_hash FROM changed ch "
            "LEFT JOIN users u ON u.uid = ch.key WHERE ch.kind = ? AND ch.version > ?",
            (CHANGED_USER, since),
        )
    ]
    return creds, users


async def load_arrays(db: aiosqlite.Connection, tables: Tables) -> Columns:
    """The index columns (`index.pack`) of the rows on disk, numbered by `tables.gidx`."""

    def cols(chunks: list[npt.NDArray[np.int64]], n: int) -> npt.NDArray[np.int64]:
        return np.concatenate(chunks) if chunks else np.zeros((0, n), np.int64)

    c = cols(
        await _chunks(
            db,
            f"SELECT card, uid, {STATUS_WORD}, vfrom, vuntil FROM credentials ORDER BY card",
        ),
        5,
    )
    u = cols(await _chunks(db, "SELECT uid, flags, vfrom, vuntil FROM users ORDER BY uid"), 4)
    await db.execute("CREATE TEMP TABLE IF NOT EXISTS gmap (group_id TEXT PRIMARY KEY, gidx INTEGER)")
    await db.execute("DELETE FROM temp.gmap")
    await db.executemany("INSERT INTO temp.gmap VALUES (?, ?)", list(tables.gidx.items()))
    a = cols(
        await _chunks(
            db,
            "SELECT a.uid, g.gidx, a.vfrom, a.vuntil FROM assignments a "
            "JOIN temp.gmap g ON g.group_id = a.group_id ORDER BY a.uid, a.pos",
        ),
        4,
    )
    ids: list[bytes] = []
    async with db.execute("SELECT ext_id FROM users ORDER BY uid") as cur:
        cur.arraysize = 200_000
        while batch := await cur.fetchmany(200_000):
            ids.extend(r[0].encode() for r in batch)
    pins = await rows(db, "SELECT uid, pin_hash FROM users WHERE pin_hash IS NOT NULL ORDER BY uid")
    uid_col = u[:, 0]
    counts = np.bincount(np.searchsorted(uid_col, a[:, 0]), minlength=len(uid_col))[: len(uid_col)]
    lens = np.fromiter(map(len, ids), np.int64, len(ids))
    p_hash = [str(h).encode() for _, h in pins]
    lg: Columns = {
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
        "u_id": np.frombuffer(b"".join(ids), np.uint8),
        "a_gidx": a[:, 1].astype(np.uint16),
        "a_from": a[:, 2].astype(np.uint32),
        "a_until": a[:, 3].astype(np.uint32),
        "p_uid": np.array([int(uid) for uid, _ in pins], np.uint32),
        "p_off": np.concatenate([[0], np.cumsum([len(h) for h in p_hash])]).astype(np.uint32),
        "p_hash": np.frombuffer(b"".join(p_hash), np.uint8),
    }
    return await asyncio.to_thread(in_background(pack, lg))


def read_index(path: Path, site_tz: ZoneInfo) -> tuple[RightsIndex, str | None, str | None]:
    """(index, stored digest text, quick_check problem) read from the file with a connection of its own.

    Blocking: for a worker thread (`Store.check_integrity`). Reads the rows the way `Store` loads them."""
    lower_thread_priority()
    con = read_only(path)
    try:
        problem = quick_check_sync(con)
        meta = dict(con.execute("SELECT key, value FROM meta WHERE key IN ('rights_version', ?)", (META_DIGEST,)))
        tables = _read_tables(con, site_tz)
        c = np.array(
            con.execute(f"SELECT card, uid, {STATUS_WORD}, vfrom, vuntil FROM credentials ORDER BY card").fetchall(),
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
    creds: list[tuple[int, CredRow]] = [(int(r[0]), (int(r[1]), int(r[2]), int(r[3]), int(r[4]))) for r in c]
    idx = RightsIndex(tables, build_arrays(creds, users), version=int(meta.get("rights_version", -1)))
    digest = meta.get(META_DIGEST)
    return idx, None if digest is None else str(digest), problem


#: Rows read per step by `read_digest`: its memory is bounded by one step's rows, whatever the file's size.
DIGEST_CHUNK = 65_536


def read_digest(path: Path, site_tz: ZoneInfo) -> tuple[Digest, str | None, str | None]:
    """(checksum of the rows, stored digest text, quick_check problem), read with a connection of its own.

    Streamed: the rows are hashed a chunk at a time (`DIGEST_CHUNK` credentials, or users with their
    assignments), each chunk as the index holds its rows (`build_arrays` then `unpack`: the same values
    `index_digest` hashes over an index read from the rows), so memory stays bounded and no Python object
    lives for every row. Blocking: for a worker thread (`Store.check_integrity`)."""
    lower_thread_priority()
    con = read_only(path)
    try:
        problem = quick_check_sync(con)
        meta = dict(con.execute("SELECT key, value FROM meta WHERE key IN ('rights_version', ?)", (META_DIGEST,)))
        tables = _read_tables(con, site_tz)
        creds = n_creds = 0
        cur = con.execute(f"SELECT card, uid, {STATUS_WORD}, vfrom, vuntil FROM credentials")
        while rows := cur.fetchmany(DIGEST_CHUNK):
            c = np.array(rows, dtype=np.int64).reshape(-1, 5)
            u32 = np.uint32
            creds += cred_hash_sum(c[:, 0].astype(np.uint64), *(c[:, k].astype(u32) for k in range(1, 5)))
            n_creds += len(c)
        users = n_users = 0
        lo = -(1 << 63)
        while True:
            urows = con.execute(
                "SELECT uid, ext_id, flags, vfrom, vuntil, pin_hash FROM users WHERE uid > ? ORDER BY uid LIMIT ?",
                (lo, DIGEST_CHUNK),
            ).fetchall()
            if not urows:
                break
            hi = int(urows[-1][0])
            assigns: dict[int, list[AssignRow]] = {}
            for uid, g, f, u in con.execute(
                "SELECT uid, group_id, vfrom, vuntil FROM assignments WHERE uid > ? AND uid <= ? ORDER BY uid, pos",
                (lo, hi),
            ):
                assigns.setdefault(int(uid), []).append((tables.gidx.get(g, 0xFFFF), f, u))
            chunk: list[tuple[int, UserRow]] = [
                (int(uid), (ext, flags, f, u, pin, tuple(assigns.get(int(uid), ()))))
                for uid, ext, flags, f, u, pin in urows
            ]
            h, k = user_hash_sum(unpack(build_arrays([], chunk)), None, tables.gid)
            users += h
            n_users += k
            lo = hi
            del urows, assigns, chunk
    finally:
        con.close()
    m64 = (1 << 64) - 1
    version = int(meta.get("rights_version", -1))
    digest = Digest(version, n_creds, n_users, creds & m64, users & m64, sum(table_hashes(tables).values()) & m64)
    stored = meta.get(META_DIGEST)
    return digest, None if stored is None else str(stored), problem


def _read_tables(con: sqlite3.Connection, site_tz: ZoneInfo) -> Tables:
    doors = [_dec_door.decode(b) for (b,) in con.execute("SELECT body FROM doors")]
    scheds = [_dec_sched.decode(b) for (b,) in con.execute("SELECT body FROM schedules")]
    groups = [_dec_group.decode(b) for (b,) in con.execute("SELECT body FROM groups")]
    areas = [_dec_area.decode(b) for (b,) in con.execute("SELECT body FROM areas")]
    interlocks = [_dec_interlock.decode(b) for (b,) in con.execute("SELECT body FROM interlocks")]
    site = [_dec_site.decode(b) for (b,) in con.execute("SELECT body FROM site_rules")]
    return Tables.build(site_tz, doors, scheds, groups, areas=areas, interlocks=interlocks,
                        site_rules=site[0] if site else None)  # fmt: skip


# --- the rights checksum ---------------------------------------------------------------------------------


def check_digest(stored: Any, digest: Digest, schema_found: int) -> None:
    """The stored checksum `stored` (None: not written yet) against `digest`, that of the rows as loaded."""
    if stored is None and schema_found >= 3:
        raise Damaged("the rights checksum is missing")
    if stored is not None and stored != digest.text():
        raise Damaged(f"the rights differ from their checksum (stored {stored}, rows {digest.text()})")


async def digest_after(
    idx: RightsIndex,
    digest: Digest,
    tab_hash: dict[tuple[str, str], int],
    version: int,
    *,
    creds: Mapping[int, tuple[Any, int, CredRow, int] | None],
    users: Mapping[int, tuple[Any, UserRow] | None],
    tables: Tables | None,
    table_changes: Iterable[tuple[tuple[str, str], int | None]],
) -> tuple[Digest, dict[tuple[str, str], int]]:
    """The rights checksum once a change set is applied to `idx` (whose checksum is `digest`, with `tab_hash`
    the hash of each door, schedule and group): the old rows' hashes out, the new rows' in. `creds` and
    `users` are the rows the set writes (None: deleted), `tables` its new tables (None: unchanged) and
    `table_changes` the new hash of each door, schedule and group it puts (None: deleted)."""
    nc, nu, c, u = digest.n_creds, digest.n_users, digest.creds, digest.users
    for n, (card, e) in enumerate(creds.items()):
        if n % DIGEST_SLICE == DIGEST_SLICE - 1:
            await pause()
        old = idx.cred(card)
        if old is not None:
            c, nc = c - cred_hash(card, old), nc - 1
        if e is not None:
            c, nc = c + cred_hash(card, e[2]), nc + 1
    old_gid = idx.tables.gid
    new_gid = (tables or idx.tables).gid
    for n, (uid, v) in enumerate(users.items()):
        if n % DIGEST_SLICE == DIGEST_SLICE - 1:
            await pause()
        urow = idx.user(uid)
        if urow is not None:
            u, nu = u - user_hash(uid, urow, old_gid), nu - 1
        if v is not None:
            u, nu = u + user_hash(uid, v[1], new_gid), nu + 1
    tab = tab_hash
    if tables is not None:
        tab = dict(tab)
        for key, h in table_changes:
            if h is None:
                tab.pop(key, None)
            else:
                tab[key] = h
    m64 = (1 << 64) - 1
    return Digest(version, nc, nu, c & m64, u & m64, sum(tab.values()) & m64), tab


# --- the access state (issue 19: where users are, uses of use-limited credentials) ---------------------------


async def load_access_state(db: aiosqlite.Connection) -> AccessState:
    """The persistent access state as last written (occupancy follows from the locations)."""
    where: dict[str, Location] = {
        str(u): (None if a is None else str(a), float(t))
        for u, a, t in await rows(db, "SELECT user_id, area, since FROM access_where")
    }
    used = {int(c): int(n) for c, n in await rows(db, "SELECT card, used FROM access_uses")}
    return AccessState.restore(where, used)


async def write_access_state(db: aiosqlite.Connection, state: AccessState, delta: Delta) -> None:
    """Write the entries `delta` names, as `state` holds them now, in one transaction."""
    gone = [(u,) for u in delta.users if u not in state.where]
    live = [(u, *state.where[u]) for u in delta.users if u in state.where]
    unused = [(c,) for c in delta.cards if c not in state.used]
    used = [(c, state.used[c]) for c in delta.cards if c in state.used]
    await db.execute("BEGIN IMMEDIATE")
    try:
        await db.executemany("DELETE FROM access_where WHERE user_id=?", gone)
        await db.executemany("INSERT OR REPLACE INTO access_where (user_id, area, since) VALUES (?,?,?)", live)
        await db.executemany("DELETE FROM access_uses WHERE card=?", unused)
        await db.executemany("INSERT OR REPLACE INTO access_uses (card, used) VALUES (?,?)", used)
        await db.execute("COMMIT")
    except BaseException:
        await db.execute("ROLLBACK")
        raise
