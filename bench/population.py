"""A deterministic benchmark population: N users with one card each, written into a rights store.

The population every bench figure uses (see bench/README.md):

* 8 doors (all NORMAL), 10 schedules in Europe/Berlin (office hours, shifts, weekend, night...), all
  but "always" with the German public holidays of 2025 and 2026 plus one extra holiday inside the probe
  week (Wed 2025-03-05), so probes do hit holidays;
* 200 groups, each opening 1 to 4 doors on one of the schedules;
* N users, each in 1 to 3 distinct groups, with one card each (random unique 56-bit CSNs, format
  "csn56"); 1% inactive users;
* 10% of the credentials and 5% of the assignments carry a validity window placed around the probe
  week (some already over, some not yet started, some starting or ending inside the week); 3% of the
  credentials are suspended / lost / revoked.

Everything is drawn from one seeded numpy generator, so the same (N, seed) always gives the same rows.

Two ways into a `Store` file:

* `write_store_snapshot()`: model objects -> `Snapshot` -> `Store.replace` (the real write path; fine
  up to ~100k users);
* `write_store_bulk()`: open a `Store` once to create the schema, close it, then bulk-insert the rows
  with plain sqlite3 `executemany` using the same column meanings as `edge/store/schema.py`. Everything is then
  loaded by the real `Store` boot path. `python bench/population.py --check` builds a small population
  both ways and compares what the two stores load.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import aiosqlite
import msgspec
import numpy as np
import numpy.typing as npt

from edge.index import NO_END, NO_START, STATUS_CODES, STATUS_NAMES, index_digest
from edge.model import (
    Assignment,
    Credential,
    CredentialStatus,
    Door,
    Group,
    Interval,
    Schedule,
    Snapshot,
    TimeRange,
    User,
)
from edge.store import META_DIGEST, Store
from edge.store.schema import load_index

SITE_TZ = "Europe/Berlin"
#: Start of the probe week: Monday 2025-03-03 00:00 local time. Probes fall in [WEEK_START, +7 days).
WEEK_START = datetime(2025, 3, 3, tzinfo=ZoneInfo(SITE_TZ))
WEEK_START_TS = int(WEEK_START.timestamp())
WEEK_S = 7 * 86400
DAY_S = 86400
N_DOORS = 8
N_GROUPS = 200
CARD_FORMAT = "csn56"
CARD_LIMIT = 2**56
#: Bump when the generator changes: cached store files are keyed by it.
GENERATOR_VERSION = 2  # 2: bulk-written stores carry their rights checksum

_HOLIDAYS = [
    date(2025, 1, 1), date(2025, 3, 5), date(2025, 4, 18), date(2025, 4, 21), date(2025, 5, 1),
    date(2025, 5, 29), date(2025, 6, 9), date(2025, 10, 3), date(2025, 12, 25), date(2025, 12, 26),
    date(2026, 1, 1), date(2026, 4, 3), date(2026, 4, 6), date(2026, 5, 1), date(2026, 5, 14),
    date(2026, 5, 25), date(2026, 10, 3), date(2026, 12, 25), date(2026, 12, 26),
]  # fmt: skip


def _weekly(days: range | list[int], *spans: tuple[str, str]) -> list[Interval]:
    return [Interval(day=d, start=a, end=b) for d in days for a, b in spans]


def schedules() -> list[Schedule]:
    wd = range(5)
    h = _HOLIDAYS
    return [
        Schedule(id="always", name="Always", intervals=_weekly(range(7), ("00:00", "24:00"))),
        Schedule(id="office", name="Office hours", intervals=_weekly(wd, ("07:00", "19:00")), holidays=h),
        Schedule(id="core", name="Core hours", intervals=_weekly(wd, ("08:00", "18:00")), holidays=h),
        Schedule(id="early", name="Early shift", intervals=_weekly(wd, ("06:00", "14:30")), holidays=h),
        Schedule(id="late", name="Late shift", intervals=_weekly(wd, ("13:30", "22:00")), holidays=h),
        Schedule(id="weekend", name="Weekend", intervals=_weekly([5, 6], ("09:00", "17:00")), holidays=h),
        Schedule(
            id="extended",
            name="Extended",
            intervals=_weekly(range(6), ("06:00", "22:00")),
            holidays=h,
            holiday_intervals=[TimeRange(start="08:00", end="12:00")],
        ),
        Schedule(
            id="cleaning",
            name="Cleaning",
            intervals=_weekly(wd, ("05:00", "07:00"), ("18:00", "21:00")),
            holidays=h,
        ),
        Schedule(id="night", name="Night", intervals=_weekly(range(7), ("00:00", "06:00"), ("22:00", "24:00"))),
        Schedule(id="lunch", name="Canteen", intervals=_weekly(wd, ("11:00", "14:00")), holidays=h),
    ]


def doors() -> list[Door]:
    return [Door(id=f"door{i}", name=f"Door {i}") for i in range(N_DOORS)]


def _secs_dt(s: int) -> datetime | None:
    return None if s in (NO_START, NO_END) else datetime.fromtimestamp(s, UTC)


@dataclass
class Population:
    """Column arrays of one population. User i (0-based) has uid i + 1, ext id `u{i+1:07d}`, card cards[i]."""

    n: int
    seed: int
    groups: list[Group]
    cards: npt.NDArray[np.uint64]  # (n,) unique, random order
    c_status: npt.NDArray[np.uint8]
    c_from: npt.NDArray[np.uint32]
    c_until: npt.NDArray[np.uint32]
    u_flags: npt.NDArray[np.uint8]
    a_count: npt.NDArray[np.int64]  # (n,) 1..3
    a_off: npt.NDArray[np.int64]  # (n + 1,) CSR offsets into the a_* arrays
    a_gidx: npt.NDArray[np.int64]  # group number 0..199 (group id f"g{gidx:03d}")
    a_from: npt.NDArray[np.uint32]
    a_until: npt.NDArray[np.uint32]

    @property
    def n_assignments(self) -> int:
        return len(self.a_gidx)

    @staticmethod
    def ext_id(i: int) -> str:
        return f"u{i + 1:07d}"

    # --- model objects -------------------------------------------------------------------------------

    def users(self) -> Iterator[User]:
        flags, off, g, af, au = (
            self.u_flags.tolist(), self.a_off.tolist(), self.a_gidx.tolist(), self.a_from.tolist(),
            self.a_until.tolist(),
        )  # fmt: skip
        for i in range(self.n):
            f = flags[i]
            yield User(
                id=self.ext_id(i),
                name=f"User {i + 1}",
                active=bool(f & 1),
                offline_access=bool(f & 2),
                extended_door_time=bool(f & 4),
                assignments=[
                    Assignment(group=f"g{g[j]:03d}", valid_from=_secs_dt(af[j]), valid_until=_secs_dt(au[j]))
                    for j in range(off[i], off[i + 1])
                ],
            )

    def credentials(self) -> Iterator[Credential]:
        cards, st, cf, cu = self.cards.tolist(), self.c_status.tolist(), self.c_from.tolist(), self.c_until.tolist()
        for i in range(self.n):
            yield Credential(
                card=cards[i],
                user=self.ext_id(i),
                format=CARD_FORMAT,
                status=STATUS_NAMES[st[i]],
                valid_from=_secs_dt(cf[i]),
                valid_until=_secs_dt(cu[i]),
            )

    def snapshot(self, version: int = 1) -> Snapshot:
        return Snapshot(
            version=version,
            doors=doors(),
            schedules=schedules(),
            groups=self.groups,
            users=list(self.users()),
            credentials=list(self.credentials()),
        )


def _windows(rng: np.random.Generator, n: int, share: float) -> tuple[npt.NDArray[np.uint32], npt.NDArray[np.uint32]]:
    """Validity windows for `share` of n rows, placed around the probe week (start 60 days before to 7 days
    into it, length 1 to 90 days; one in five open-ended on one side)."""
    vf = np.full(n, NO_START, np.uint32)
    vu = np.full(n, NO_END, np.uint32)
    has = rng.random(n) < share
    k = int(has.sum())
    start = WEEK_START_TS + rng.integers(-60 * DAY_S, 7 * DAY_S, k)
    length = rng.integers(DAY_S, 90 * DAY_S, k)
    kind = rng.integers(0, 10, k)  # 0: no start, 1: no end, else both
    f = np.where(kind == 0, NO_START, start)
    u = np.where(kind == 1, NO_END, start + length)
    vf[has] = f.astype(np.uint32)
    vu[has] = u.astype(np.uint32)
    return vf, vu


def generate(n: int, seed: int = 1) -> Population:
    rng = np.random.default_rng([seed, n])
    sched_ids = [s.id for s in schedules()]
    groups = []
    for gi in range(N_GROUPS):
        k = int(rng.integers(1, 5))
        ds = sorted(int(x) for x in rng.choice(N_DOORS, k, replace=False))
        groups.append(
            Group(id=f"g{gi:03d}", name=f"Group {gi}", doors=[f"door{d}" for d in ds],
                  schedule=sched_ids[int(rng.integers(0, len(sched_ids)))])
        )  # fmt: skip
    # unique random cards, in random order
    cards = np.zeros(0, np.uint64)
    while len(cards) < n:
        cards = np.unique(np.concatenate([cards, rng.integers(0, CARD_LIMIT, n - len(cards) + 64, np.uint64)]))
    cards = rng.permutation(cards)[:n]
    status = rng.choice(4, n, p=[0.97, 0.01, 0.01, 0.01]).astype(np.uint8)
    c_from, c_until = _windows(rng, n, 0.10)
    active = rng.random(n) >= 0.01
    offline = rng.random(n) < 0.2
    extended = rng.random(n) < 0.05
    flags = (active * 1 | offline * 2 | extended * 4).astype(np.uint8)
    # 1..3 distinct groups per user
    count = rng.integers(1, 4, n)
    g1 = rng.integers(0, N_GROUPS, n)
    k2 = rng.integers(1, N_GROUPS, n)
    k3 = rng.integers(1, N_GROUPS - 1, n)
    k3 = k3 + (k3 >= k2)
    gmat = np.stack([g1, (g1 + k2) % N_GROUPS, (g1 + k3) % N_GROUPS], axis=1)
    mask = np.arange(3)[None, :] < count[:, None]
    a_gidx = gmat[mask]  # row-major: user by user, pos 0..count-1
    a_off = np.concatenate([[0], np.cumsum(count)]).astype(np.int64)
    a_from, a_until = _windows(rng, len(a_gidx), 0.05)
    return Population(
        n=n, seed=seed, groups=groups, cards=cards, c_status=status, c_from=c_from, c_until=c_until,
        u_flags=flags, a_count=count, a_off=a_off, a_gidx=a_gidx, a_from=a_from, a_until=a_until,
    )  # fmt: skip


# --- writing a store ---------------------------------------------------------------------------------


async def write_store_snapshot(path: Path, pop: Population, *, version: int = 1) -> None:
    """The real write path: `Store.replace(Snapshot)` (validates everything; slow for large N)."""
    async with Store(path, SITE_TZ, synchronous="NORMAL") as store:
        await store.replace(pop.snapshot(version))


async def create_schema(path: Path) -> None:
    async with Store(path, SITE_TZ):
        pass


def bulk_insert(path: Path, pop: Population, *, version: int = 1, chunk: int = 200_000) -> None:
    """Rows straight into an empty store file made by `create_schema` (same columns as edge/store/schema.py)."""
    enc = msgspec.msgpack.Encoder()
    db = sqlite3.connect(path, isolation_level=None)
    try:
        if db.execute("SELECT count(*) FROM users").fetchone()[0]:
            raise RuntimeError(f"{path}: store is not empty")
        db.execute("PRAGMA journal_mode=DELETE")
        db.execute("PRAGMA synchronous=OFF")
        db.execute("PRAGMA cache_size=-262144")
        indexes = db.execute("SELECT name, sql FROM sqlite_master WHERE type='index' AND sql IS NOT NULL").fetchall()
        db.execute("BEGIN")
        for name, _ in indexes:
            db.execute(f"DROP INDEX {name}")
        db.executemany("INSERT INTO doors VALUES (?, ?)", [(d.id, enc.encode(d)) for d in doors()])
        db.executemany("INSERT INTO schedules VALUES (?, ?)", [(s.id, enc.encode(s)) for s in schedules()])
        db.executemany("INSERT INTO groups VALUES (?, ?)", [(g.id, enc.encode(g)) for g in pop.groups])
        gnames = [f"g{i:03d}" for i in range(N_GROUPS)]
        for lo in range(0, pop.n, chunk):
            hi = min(pop.n, lo + chunk)
            uids = range(lo + 1, hi + 1)
            db.executemany(
                "INSERT INTO users (uid, ext_id, name, flags, vfrom, vuntil, pin_hash) VALUES (?,?,?,?,?,?,NULL)",
                zip(uids, (f"u{u:07d}" for u in uids), (f"User {u}" for u in uids), pop.u_flags[lo:hi].tolist(),
                    [NO_START] * (hi - lo), [NO_END] * (hi - lo), strict=True),
            )  # fmt: skip
            a0, a1 = int(pop.a_off[lo]), int(pop.a_off[hi])
            cnt = pop.a_count[lo:hi]
            a_uid = np.repeat(np.arange(lo + 1, hi + 1), cnt)
            a_pos = np.arange(a1 - a0) - np.repeat(pop.a_off[lo:hi] - a0, cnt)
            db.executemany(
                "INSERT INTO assignments (uid, pos, group_id, vfrom, vuntil) VALUES (?,?,?,?,?)",
                zip(a_uid.tolist(), a_pos.tolist(), [gnames[g] for g in pop.a_gidx[a0:a1].tolist()],
                    pop.a_from[a0:a1].tolist(), pop.a_until[a0:a1].tolist(), strict=True),
            )  # fmt: skip
        order = np.argsort(pop.cards)  # rowid order: much faster inserts
        for lo in range(0, pop.n, chunk):
            sel = order[lo : lo + chunk]
            db.executemany(
                "INSERT INTO credentials (card, uid, format, status, vfrom, vuntil) VALUES (?,?,?,?,?,?)",
                zip(pop.cards[sel].tolist(), (sel + 1).tolist(), [CARD_FORMAT] * len(sel),
                    pop.c_status[sel].tolist(), pop.c_from[sel].tolist(), pop.c_until[sel].tolist(), strict=True),
            )  # fmt: skip
        for _, sql in indexes:
            db.execute(sql)
        db.execute("UPDATE meta SET value=? WHERE key='rights_version'", (version,))
        db.execute("COMMIT")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("ANALYZE")
    finally:
        db.close()


async def write_store_bulk(path: Path, pop: Population, *, version: int = 1) -> None:
    await create_schema(path)
    await asyncio.to_thread(bulk_insert, path, pop, version=version)
    await write_digest(path)


async def write_digest(path: Path) -> None:
    """Store the rights checksum of the rows (bulk-inserted behind the store's back) in `meta`, as the store
    keeps it: without it the store would rightly find the file damaged at open."""
    async with aiosqlite.connect(path) as db:
        index, _ = await load_index(db, ZoneInfo(SITE_TZ))
        digest = await asyncio.to_thread(index_digest, index)
        await db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (META_DIGEST, digest.text()))
        await db.commit()


async def write_store(path: Path, pop: Population, *, method: str = "auto", version: int = 1) -> str:
    """Write `pop` into a new store file at `path` (replaced if present). Returns the method used."""
    if method == "auto":
        method = "snapshot" if pop.n <= 20_000 else "bulk"
    for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        p.unlink(missing_ok=True)
    if method == "snapshot":
        await write_store_snapshot(path, pop, version=version)
    elif method == "bulk":
        await write_store_bulk(path, pop, version=version)
    else:
        raise ValueError(f"unknown method {method!r}")
    return method


def cache_path(cache_dir: Path, n: int, seed: int) -> Path:
    return cache_dir / f"rights-n{n}-s{seed}-g{GENERATOR_VERSION}.db"


async def cached_store(cache_dir: Path, pop: Population) -> tuple[Path, float, str]:
    """The store file for `pop`, built on first use: (path, seconds spent building (0 if cached), method)."""
    path = cache_path(cache_dir, pop.n, pop.seed)
    if path.exists():
        return path, 0.0, "cached"
    cache_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # two runs building at once: each its own, one rename wins
    t0 = time.perf_counter()
    method = await write_store(tmp, pop)
    for suffix in ("-wal", "-shm", ".idx", ".idx.1", ".verified"):  # (a snapshot-built store's own files)
        Path(f"{tmp}{suffix}").unlink(missing_ok=True)  # noqa: ASYNC240
    tmp.rename(path)
    return path, time.perf_counter() - t0, method


# --- self-check --------------------------------------------------------------------------------------


async def _check(n: int, seed: int, workdir: Path) -> int:
    """Build the same population both ways and compare what the real boot path loads."""
    pop = generate(n, seed)
    seen = []
    for method in ("snapshot", "bulk"):
        path = workdir / f"check-{method}.db"
        t0 = time.perf_counter()
        await write_store(path, pop, method=method)
        t1 = time.perf_counter()
        async with Store(path, SITE_TZ) as store:
            idx = store.index
            creds = sorted(idx.credentials())
            users = sorted(idx.users())
            seen.append((store.version, sorted(idx.tables.groups.items()), creds, users, await store.counts()))
        print(f"{method}: wrote {n} users in {t1 - t0:.2f} s; {len(creds)} credentials loaded", file=sys.stderr)
    assert len(seen[0][2]) == n
    ok = seen[0] == seen[1]
    assert STATUS_CODES[CredentialStatus.ACTIVE] == 0
    print("snapshot and bulk stores load identically" if ok else "MISMATCH between snapshot and bulk stores",
          file=sys.stderr)  # fmt: skip
    return 0 if ok else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", type=int, metavar="N", default=5000, help="users in the self-check (default 5000)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/edge-bench/population-check"))
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    return asyncio.run(_check(args.check, args.seed, args.dir))


if __name__ == "__main__":
    raise SystemExit(main())
