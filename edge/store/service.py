"""The rights store service: `Store` owns the rights file and the in-memory index it feeds (open, verify and
recover; apply a change set; replace by a snapshot; compaction; the periodic integrity check; the verified copy).

`Store.apply(change_set)` validates the whole change set against the current rights first (`plan.py`), writes it
in one transaction, and only after the commit stages it into the `RightsIndex` in small slices (yielding to
the event loop between slices) and publishes it in one step: a decision sees either the old rights or
the new ones, never a mix, and is never held up by more than one slice. A change set that fails
validation, or whose transaction fails (full disk, read-only file system), leaves both the disk and the
index exactly as they were.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Self, TypeVar
from zoneinfo import ZoneInfo

import msgspec
import numpy as np

from edge._sqlite import (
    SqliteService,
    bulk_delete,
    bulk_insert,
    copy_file_atomic,
    dispose,
    fsync_dir,
    fsync_file,
    gc_paused,
    in_background,
    move_aside,
    pause,
    quick_check,
    read_only,
)
from edge.access_state import AccessState, Delta
from edge.errors import ChangeRejected, StoreError, VersionGap
from edge.events import RIGHTS_DAMAGED  # noqa: F401  (re-exported)
from edge.index import (
    STATUS_CODES,
    Columns,
    CredRow,
    Digest,
    RightsIndex,
    Tables,
    UserRow,
    cred_hash,
    index_digest,
    table_hashes,
    user_hash,
)
from edge.index_image import ImageError, ImageMeta, read_image, write_image
from edge.model import (
    ChangeSet,
    PutArea,
    PutCredential,
    PutDoor,
    PutGroup,
    PutInterlock,
    PutSchedule,
    PutSiteRules,
    PutUser,
    Snapshot,
    User,
)
from edge.tasks import cancel_and_wait

from .plan import Plan, index_from_plan, plan_changes
from .schema import (
    CHANGED_CRED,
    CHANGED_USER,
    DAMAGE_ERRORS,
    META_DIGEST,
    META_EPOCH,
    RULE_TABLES,
    SCHEMA_VERSION,
    STAGE_SLICE,
    Damaged,
    changed_rows,
    check_digest,
    digest_after,
    load_access_state,
    load_arrays,
    load_index,
    load_tables,
    migrate,
    next_uid,
    read_digest,
    rows,
    write_access_state,
)

log = logging.getLogger(__name__)

#: Overlay size that triggers folding it into the base arrays (in a worker thread).
COMPACT_AT = 200_000
#: `Store.needs_snapshot` after a damaged store: the reason the link gives the cloud when asking for one.
DAMAGED = "damaged"


class ApplyResult(msgspec.Struct, frozen=True):
    version: int
    applied: bool  # False: a duplicate or older change set, acknowledged without applying it again
    changes: int = 0


class Store(SqliteService):
    """Rights on disk + the in-memory index. Use as `async with Store(path, tz) as store`."""

    what = "store"

    def __init__(
        self, path: Path | str, site_tz: ZoneInfo | str = "UTC", *, synchronous: str = "FULL",
        verify_at_open: bool = True,
    ) -> None:  # fmt: skip
        """`verify_at_open`: check the whole file at open (SQLite's `quick_check` and the rights checksum
        over every row: seconds at 10^6 credentials) and build the index from the rows. False (the agent):
        boot from the index image when it is sound and current (see `_open_from_image`), leaving the file's
        own check to `check_integrity`, which the agent runs soon after."""
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
        self.verify_at_open = verify_at_open
        #: How the index was built at open: "image" (mapped, change sets since replayed) or "rows" (rebuilt).
        self.booted_from = ""
        #: An index image found at open and not used (damaged: discarded; or stale), the detail of the
        #: `INDEX_IMAGE_DAMAGED` alarm, else None.
        self.image_problem: dict[str, Any] | None = None
        self._epoch = ""
        self._imaging: asyncio.Task[None] | None = None
        #: The rights versions of the sound images on disk: `image_path` (the newest) and `prev_image_path`
        #: (the one before it, kept as the fallback when the newest is found damaged), None when there is
        #: none or it is not known to be sound. `changed` keeps the rows a boot from the older one replays.
        self._image_version: int | None = None
        self._prev_image_version: int | None = None

    @property
    def image_path(self) -> Path:
        """The index image (`edge/index_image.py`): the index's columns, mapped at boot."""
        return self.path.with_name(self.path.name + ".idx")

    @property
    def prev_image_path(self) -> Path:
        """The image written before `image_path`: what a boot maps when the newest image is damaged or stale
        (the change sets since its version are replayed from `changed`, checksum-checked as for the newest)."""
        return self.path.with_name(self.path.name + ".idx.1")

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
        except DAMAGE_ERRORS as e:
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
            if existed and not self.verify_at_open and await self._open_from_image():
                return
            problem = await quick_check(db)
            if problem is not None:
                raise Damaged(f"integrity check failed: {problem}")
            have = await migrate(db, self.path, existed=existed)
            index, self._next_uid = await load_index(db, self.site_tz)
            digest = await asyncio.to_thread(in_background(index_digest, index))
            stored = await self.get_meta(META_DIGEST)
            check_digest(stored, digest, have)
            if stored is None:  # a new file, or one written before schema 3: checksum what is there
                await self.db.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (META_DIGEST, digest.text())
                )
            self._digest = digest
            self._tab_hash = await asyncio.to_thread(in_background(table_hashes, index.tables))
            self._epoch = str(await self.get_meta(META_EPOCH))
            self._swap(index)
            self.booted_from = "rows"
        except BaseException:
            await self.close()
            raise
        self._imaging = asyncio.get_running_loop().create_task(self._image_task(), name="store.image")

    async def _open_from_image(self) -> bool:
        """Boot from the index image: map it (every checksum checked), replay the rows the change sets since
        its version wrote, and check that the result carries the rights checksum the file holds. The newest
        image first; damaged or stale, the one before it (`prev_image_path`), which gives exactly the same
        rights when sound: the doors answer at once instead of after a rebuild from the rows. True when one
        did; False to build the index from the rows (`image_problem` says why, when there was an image)."""
        if not self.image_path.exists() and not self.prev_image_path.exists():
            return False
        await migrate(self.db, self.path, existed=True)
        if self.image_path.exists() and await self._boot_image(self.image_path):
            return True
        first = self.image_problem
        if not self.prev_image_path.exists() or not await self._boot_image(self.prev_image_path):
            if first is not None:
                self.image_problem = first
            return False
        self._prev_image_version = self._image_version
        self._image_version = None
        if first is not None:
            self.image_problem = {**first, "booted_from": "previous image"}
        return True

    async def _boot_image(self, path: Path) -> bool:
        """`_open_from_image` for the image at `path`."""
        try:
            meta, cols = await asyncio.to_thread(read_image, path)
            Digest.parse(meta.digest)
        except (ImageError, ValueError) as e:
            self._image_unusable(path, "damaged", str(e))
            return False
        m = dict(await self._rows("SELECT key, value FROM meta WHERE key IN ('rights_version', ?, ?)",
                                  (META_DIGEST, META_EPOCH)))  # fmt: skip
        version, stored, epoch = int(m["rights_version"]), m.get(META_DIGEST), m.get(META_EPOCH)
        why = None
        if meta.schema != SCHEMA_VERSION:
            why = f"built for schema {meta.schema}, the rights file has {SCHEMA_VERSION}"
        elif epoch is None or meta.epoch != epoch:
            why = "built from other rights (a snapshot or a recovery since)"
        elif meta.version > version:
            why = f"its version {meta.version} is ahead of the rights' ({version})"
        elif stored is None:
            why = "the rights file holds no checksum"
        if why is not None:
            self._image_unusable(path, "stale", why)
            return False
        tables = await load_tables(self.db, self.site_tz, meta.numbering)
        index = RightsIndex(tables, cols, version=meta.version)
        creds, users = await changed_rows(self.db, tables, meta.version)
        digest = await asyncio.to_thread(in_background(_replayed_digest, index, meta, version, creds, users))
        if digest.text() != stored:
            self._image_unusable(path, "stale", f"image + change sets since give {digest.text()}, the rights {stored}")
            return False
        if version != meta.version:
            index.begin(version)
            for uid, urow in users:
                index.stage_user(uid, urow)
            for card, crow in creds:
                index.stage_cred(card, crow)
            index.publish()
        self._digest = digest
        self._tab_hash = await asyncio.to_thread(in_background(table_hashes, tables))
        self._next_uid = await next_uid(self.db)
        self._epoch = str(epoch)
        self._swap(index)
        self.booted_from = "image"
        self._image_version = meta.version  # (of the file at `path`: `_open_from_image` says which one that is)
        log.info("rights index mapped from %s (version %d, %d change rows replayed to version %d)", path.name,
                 meta.version, len(creds) + len(users), version)  # fmt: skip
        return True

    def _image_unusable(self, path: Path, what: str, why: str) -> None:
        log.error("index image %s is %s (%s): not used", path.name, what, why)
        self.image_problem = {"image": what, "error": why[:300]}
        if what == "damaged":
            with contextlib.suppress(OSError):
                path.unlink()

    async def image_written(self) -> None:
        """Wait until the index image written in the background after a boot from the rows is on disk."""
        if self._imaging is not None:
            await asyncio.shield(self._imaging)

    async def _image_task(self) -> None:
        try:
            async with self._lock:
                await self._write_image_locked()
        except Exception:  # an image is a faster boot, never a reason to stop
            log.exception("writing the index image failed")
        finally:
            self._imaging = None

    async def _write_image_locked(self) -> None:
        """Write the index's base as the image, atomically (a worker thread), then read the base from the
        image's mapping (file-backed pages instead of anonymous memory). Only for an index with nothing in
        its overlay (just built from rows, by a snapshot or by compaction): the image is its base."""
        idx = self.index
        if idx.overlay_size or self._digest.version != idx.visible:
            return
        base = idx._base
        t = idx.tables
        numbering = [""] * len(t.gidx)
        for g, i in t.gidx.items():
            numbering[i] = g
        meta = ImageMeta(idx.visible, SCHEMA_VERSION, self._epoch, self._digest.text(), t.gid, tuple(numbering))
        try:
            prev = await asyncio.to_thread(self._keep_previous_image)
            await asyncio.to_thread(in_background(write_image, self.image_path, base.arrays, meta))
            _, cols = await asyncio.to_thread(in_background(read_image, self.image_path))
        except (OSError, ImageError) as e:
            log.error("could not write the index image: %s", e)
            return
        self._image_version, self._prev_image_version = meta.version, prev
        if self.index is idx and idx._base is base:
            idx.rebase(cols)
        # what a boot from the previous image replays stays; with none, what a boot from this one replays
        await self.db.execute("DELETE FROM changed WHERE version <= ?", (meta.version if prev is None else prev,))

    def _keep_previous_image(self) -> int | None:
        """Before a new image replaces the newest: that one (when sound) becomes the previous image, else a
        sound previous image stays, else there is none (one of other rights, or not known sound, is
        removed). Returns the previous image's version. A hard link: the newest stays in place until the
        new one replaces it (`write_image`), so a kill at any point leaves both files usable."""
        prev = self.prev_image_path
        if self._image_version is not None and self.image_path.exists():
            tmp = prev.with_name(prev.name + ".tmp")
            tmp.unlink(missing_ok=True)
            os.link(self.image_path, tmp)
            os.replace(tmp, prev)
            fsync_dir(prev.parent)
            return self._image_version
        if self._prev_image_version is not None and prev.exists():
            return self._prev_image_version
        prev.unlink(missing_ok=True)
        self._prev_image_version = None
        return None

    async def _recover(self, error: BaseException) -> None:
        """The file at `self.path` is damaged: move it aside and open the verified copy, or nothing."""
        reason = f"{type(error).__name__}: {error}"[:300]
        moved = move_aside(self.path)
        for image in (self.image_path, self.prev_image_path):  # of the damaged file: never used for the copy
            with contextlib.suppress(OSError):
                image.unlink()
        self._image_version = self._prev_image_version = None
        log.error("rights store %s is damaged (%s); moved aside to %s", self.path, reason, moved.name)
        fallback = "empty"
        copy_error: str | None = None
        if self.verified_path.exists():
            await asyncio.to_thread(copy_file_atomic, self.verified_path, self.path)
            try:
                await self._open()
                fallback = "verified_copy"
            except DAMAGE_ERRORS as e:
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
            got, stored, problem = await asyncio.to_thread(read_digest, self.path, self.site_tz)
        except DAMAGE_ERRORS as e:
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
        try:
            if self._imaging is not None:
                await cancel_and_wait(self._imaging)
                self._imaging = None
            if self._compacting is not None:
                try:
                    await cancel_and_wait(self._compacting)
                except Exception:  # a failed compaction changes nothing on disk: report it, close anyway
                    log.exception("index compaction failed")
                self._compacting = None
        finally:  # whatever happened above: an open connection's thread would keep the process from exiting
            await self._close_db()

    @property
    def version(self) -> int:
        return self.index.visible

    async def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        return await rows(self.db, sql, params)

    async def load_arrays(self, tables: Tables) -> Columns:
        """The index columns of the rows on disk (see `schema.load_arrays`)."""
        return await load_arrays(self.db, tables)

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

    # --- the access state (issue 19; not rights: outside the checksum) -----------------------------------

    async def load_access_state(self) -> AccessState:
        """The access rules' state as last saved (user locations, credential uses)."""
        return await load_access_state(self.db)

    async def save_access_state(self, state: AccessState, delta: Delta) -> None:
        """Write the entries `delta` names (after a door opened; never on the tap path before the relay
        acts). Under the store's lock, so it never lands inside a change set's transaction."""
        if not delta:
            return
        async with self._lock:
            await write_access_state(self.db, state, delta)

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
        plan = await plan_changes(cs, index=self.index, site_tz=self.site_tz, next_uid=self._next_uid, rows=self._rows)
        digest, tab_hash = await digest_after(
            self.index, self._digest, self._tab_hash, cs.to_version, creds=plan.creds, users=plan.users,
            tables=plan.tables, table_changes=plan.table_changes(),
        )  # fmt: skip
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
            changes += [PutArea(area=a) for a in snap.areas]
            changes += [PutInterlock(interlock=il) for il in snap.interlocks]
            changes += [PutSiteRules(rules=r) for r in snap.site_rules]
            changes += [PutUser(user=u) for u in snap.users]
            changes += [PutCredential(credential=c) for c in snap.credentials]
            return changes

        changes = await asyncio.to_thread(in_background(as_changes))  # 100k objects: off the loop thread
        empty = RightsIndex(Tables(self.site_tz))
        plan = await plan_changes(
            ChangeSet(from_version=0, to_version=max(snap.version, 1), changes=changes),
            index=empty,
            site_tz=self.site_tz,
            next_uid=1,
            rows=None,
        )
        assert plan.tables is not None or not (snap.doors or snap.schedules or snap.groups or snap.areas
                                                or snap.interlocks or snap.site_rules)  # fmt: skip
        tables = plan.tables or Tables(self.site_tz)
        new = await asyncio.to_thread(in_background(index_from_plan, tables, plan, snap.version))
        digest = await asyncio.to_thread(in_background(index_digest, new))
        await self._write(plan, snap.version, digest, wipe=True)
        self._next_uid = plan.next_uid
        self._digest, self._tab_hash = digest, {k: v[1] for k, v in plan.bodies.items()}
        old = self.index
        self._swap(new)
        await dispose(*old.detach_overlay(), changes, plan.creds, plan.users)
        await self._write_image_locked()
        if self.needs_snapshot is not None:
            log.warning("rights replaced by a snapshot (version %d): the store is whole again", snap.version)
            self.needs_snapshot = None
        await self._save_verified_copy()
        return ApplyResult(snap.version, applied=True, changes=len(changes))

    async def _write(self, plan: Plan, version: int, digest: Digest, *, wipe: bool = False) -> None:
        """Write `plan` in one transaction, durable on return. The rows go to SQLite a chunk at a time as JSON
        (`bulk_insert`): built on the loop thread, run by the connection's thread without the GIL."""
        db = self.db
        creds = await _key_order(plan.creds)  # cards in order: one pass along each B-tree (see `_key_order`)
        try:
            await db.execute("BEGIN IMMEDIATE")
            if wipe:
                for t in ("doors", "schedules", "groups", "users", "assignments", "credentials", "changed",
                          *RULE_TABLES):  # fmt: skip
                    await db.execute(f"DELETE FROM {t}")
                self._epoch = secrets.token_hex(8)  # every image built before is of other rights now
                self._image_version = self._prev_image_version = None
                await db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (META_EPOCH, self._epoch))
            else:  # what a boot from an older image replays
                await bulk_insert(db, "INSERT OR REPLACE INTO changed (kind, key, version)", 3,
                                  ((CHANGED_CRED, card, version) for card in creds))  # fmt: skip
                await bulk_insert(db, "INSERT OR REPLACE INTO changed (kind, key, version)", 3,
                                  ((CHANGED_USER, uid, version) for uid in plan.users))  # fmt: skip
            small = plan.small()
            for _kind, table, _puts, dels in small:
                await db.executemany(f"DELETE FROM {table} WHERE id=?", [(k,) for k in dels])
            for kind, table, puts, _dels in small:
                await db.executemany(
                    f"INSERT OR REPLACE INTO {table} VALUES (?, ?)", [(k, plan.bodies[(kind, k)][0]) for k in puts]
                )
            if not wipe:  # (after a wipe the table is empty: 10^5 no-op deletes for a snapshot)
                await bulk_delete(db, "assignments", "uid", plan.users)
            await bulk_delete(db, "users", "uid", plan.deleted_users)
            await bulk_delete(db, "credentials", "uid", plan.deleted_users)

            def live() -> Iterator[tuple[int, tuple[User, UserRow]]]:
                return ((uid, v) for uid, v in plan.users.items() if v is not None)

            await bulk_insert(
                db, "INSERT INTO users (uid, ext_id, name, flags, vfrom, vuntil, pin_hash)", 7,
                ((uid, u.id, u.name, r[1], r[2], r[3], u.pin_hash) for uid, (u, r) in live()),
                "ON CONFLICT(uid) DO UPDATE SET name=excluded.name, flags=excluded.flags, vfrom=excluded.vfrom, "
                "vuntil=excluded.vuntil, pin_hash=excluded.pin_hash",
            )  # fmt: skip
            await bulk_insert(
                db, "INSERT INTO assignments (uid, pos, group_id, vfrom, vuntil)", 5,
                ((uid, j, u.assignments[j].group, a[1], a[2]) for uid, (u, r) in live() for j, a in enumerate(r[5])),
            )  # fmt: skip
            await bulk_delete(db, "credentials", "card", (c for c in creds if plan.creds[c] is None))
            await bulk_insert(
                db, "INSERT OR REPLACE INTO credentials (card, uid, format, status, vfrom, vuntil, facility, max_uses)",
                8,
                ((card, v[1], v[0].format, STATUS_CODES[v[0].status], v[2][2], v[2][3], v[0].facility, v[0].max_uses)
                 for card in creds if (v := plan.creds[card]) is not None),
            )  # fmt: skip
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

    async def _stage(self, plan: Plan, version: int) -> None:
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
            await self._write_image_locked()
        if await self._check_locked() is None and await self._copy_version() != self.version:
            await self._save_verified_copy()


T = TypeVar("T")


async def _key_order(rows: dict[int, Any]) -> list[int]:
    """The keys of `rows` in order, for a bulk write: one pass along each B-tree instead of a random walk,
    so each page is read and written once, not once per row (10^4 random rows in a file of 10^6 touch
    almost as many pages, each spilled and rewritten). Sorted by numpy, not `sorted()` (one C call over
    every key, holding the GIL); the keys are collected a slice at a time between loop turns."""
    keys = np.empty(len(rows), np.int64)
    for i, k in enumerate(rows):
        keys[i] = k
        if i % 2048 == 2047:
            await pause()
    keys.sort()
    return keys.tolist()


def _replayed_digest(
    index: RightsIndex, meta: ImageMeta, version: int, creds: list[tuple[int, CredRow | None]],
    users: list[tuple[int, UserRow | None]],
) -> Digest:  # fmt: skip
    """The rights checksum of `index` (an image's base, of checksum `meta.digest`) once `creds` and `users`
    replace its rows: the old rows' hashes out (group names as at the image), the new rows' in."""
    d = Digest.parse(meta.digest)
    nc, nu, c, u = d.n_creds, d.n_users, d.creds, d.users
    for card, row in creds:
        old = index.cred(card)
        if old is not None:
            c, nc = c - cred_hash(card, old), nc - 1
        if row is not None:
            c, nc = c + cred_hash(card, row), nc + 1
    gid = index.tables.gid
    for uid, urow in users:
        was = index.user(uid)
        if was is not None:
            u, nu = u - user_hash(uid, was, meta.gid), nu - 1
        if urow is not None:
            u, nu = u + user_hash(uid, urow, gid), nu + 1
    m64 = (1 << 64) - 1
    return Digest(version, nc, nu, c & m64, u & m64, sum(table_hashes(index.tables).values()) & m64)
