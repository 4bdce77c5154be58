"""Rights index and `decide()` benchmark against an aiosqlite baseline (JSON lines on stdout).

    .venv/bin/python bench/decide.py [--quick] [--sizes 10k,100k,1M,2M,5M] [--seed 1] [--diagnose]

For each population size N (bench/population.py: N users with one card each, 1-3 of 200 groups, 8 doors,
10 schedules with holidays, 10% of credentials and 5% of assignments with validity windows) the store file
is built once and cached under --cache-dir (keyed by N, seed and generator version), copied to a work file,
and then, in this one process:

* boot to the first decision, each in a fresh process (`--child-boot`): first the current design's boot
  (`Store(verify_at_open=True)`: quick_check, the rights checksum over every row, the index built from the
  rows), which then writes the index image; then the boot from the image, with the files' pages dropped from
  the page cache first (posix_fadvise DONTNEED on those files only: "cold") and again without ("warm");
* memory: RssAnon (and RssFile) from /proc/self/status of that fresh process, before `Store()` and after the
  first decision, per credential, for both boots; the image's size; `RightsIndex.nbytes()` beside the old
  layout's (`bench/legacy_index.py`), the bytes per column on stderr; tracemalloc across an image boot;
* `decide()` latency (beside the old layout, `bench/legacy_index.py`, rounds interleaved): probes of 80% known
  / 20% unknown cards at random doors, at random instants over one week (so the per-minute local-clock cache
  rarely hits: the worst case), each call timed on its own with perf_counter_ns (not corrected for the timer's
  own cost, which is given in params); several rounds; p50 / p99 / p99.9 are medians over rounds,
  `*_max_round` the worst round. A second series with the clock moving forward 10 ms per tap (like a live
  door) is reported as `decide_p99_live_clock`;
* access rules (issue 19): the same probes through a Decider over the same base arrays with every rule enabled
  (areas with hard, soft and timed anti-passback, exempt groups and occupancy limits on six doors, a two-person
  door, an escort door, an interlock, duress by PIN + 1, 10% of credentials use-limited) and an `AccessState`
  holding a location for 20% of the users, beside the same run without them, rounds interleaved:
  `decide_rules_p50` / `decide_rules_p99` and their ratio to the run without (target: p99 within 1.5x);
* baseline: the same decisions answered by an indexed SQLite query through aiosqlite (credential -> user
  -> assignments joined with a group->door table on the door, windows and schedules checked in Python),
  what a design without an in-memory index does; answers checked against `decide()`; ratio of p50s/p99s;
* change sets of 10,000 credential changes (40% new cards, 40% status changes, 20% deletes) through
  `Store.apply` (synchronous=FULL, durable on return): once alone, then twice with a loop-lag monitor (a task
  spinning on `asyncio.sleep(0)`; a gap between its turns is a stall of the event loop) and a task making
  decisions on the changed cards every loop turn (checks no decision sees the new rights and then the old).

`sys.setswitchinterval(0.0005)` is set, as the agent does. `--diagnose` samples the loop thread's stack during
the monitored change sets and prints, to stderr, where the loop thread was during the gaps in which it spent
more than 1 ms of CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
import traceback
import tracemalloc
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosqlite
import msgspec
import numpy as np
from legacy_index import LegacyIndex
from population import (
    CARD_FORMAT,
    CARD_LIMIT,
    SITE_TZ,
    WEEK_S,
    WEEK_START_TS,
    Population,
    cached_store,
    doors,
    generate,
    schedules,
)

from edge.access_state import AccessState
from edge.decision import Decider, Reason
from edge.index import NO_END, STATUS_NAMES, USES_SHIFT, RightsIndex, Tables
from edge.model import (
    AntiPassback,
    Area,
    ChangeSet,
    Credential,
    CredentialStatus,
    DeleteCredential,
    DuressMode,
    Group,
    Interlock,
    PutCredential,
    SiteRules,
)
from edge.schedule import CompiledSchedule
from edge.store import Store

SWITCH_INTERVAL = 0.0005
DEFAULT_SIZES = [10_000, 100_000, 1_000_000, 2_000_000, 5_000_000]
QUICK_SIZES = [10_000, 100_000]
CHANGES = 10_000
PROBE_NOW = datetime.fromtimestamp(WEEK_START_TS + 36000, UTC)  # Monday 11:00 local
#: Every store opened, closed on the way out even after an error (aiosqlite's thread would keep us alive).
_OPENED: list[Store] = []

Probe = tuple[str, int, datetime]


def emit(metric: str, value: float, unit: str, **params: Any) -> None:
    print(json.dumps({"metric": metric, "value": round(value, 4), "unit": unit, "params": params}), flush=True)


def note(msg: str) -> None:
    print(f"[decide] {msg}", file=sys.stderr, flush=True)


def parse_size(s: str) -> int:
    s = s.strip().lower()
    mult = {"k": 1_000, "m": 1_000_000}.get(s[-1:], 1)
    return int(float(s[:-1] if mult > 1 else s) * mult)


def drop_file_cache(path: Path) -> None:
    """Evict one file's pages from the page cache (only this file: the machine is shared)."""
    for p in (path, Path(f"{path}-wal")):
        if p.exists():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def pct(sorted_vals: Sequence[float], q: float) -> float:
    if not sorted_vals:
        return float("nan")
    return sorted_vals[min(len(sorted_vals) - 1, int(q * len(sorted_vals)))]


# --- probes ----------------------------------------------------------------------------------------------


def make_probes(pop: Population, m: int, seed: int) -> list[Probe]:
    rng = np.random.default_rng([seed, pop.n, 7])
    known = rng.random(m) < 0.8
    cards = pop.cards[rng.integers(0, pop.n, m)]
    unknown = rng.integers(0, CARD_LIMIT, m, np.uint64)
    while True:  # unknown cards must really be unknown
        bad = np.isin(unknown, pop.cards)
        if not bad.any():
            break
        unknown[bad] = rng.integers(0, CARD_LIMIT, int(bad.sum()), np.uint64)
    cards = np.where(known, cards, unknown)
    door_no = rng.integers(0, len(doors()), m)
    ts = WEEK_START_TS + rng.random(m) * WEEK_S
    return [
        (f"door{d}", c, datetime.fromtimestamp(t, UTC))
        for d, c, t in zip(door_no.tolist(), cards.tolist(), ts.tolist(), strict=True)
    ]


def live_probes(probes: list[Probe]) -> list[Probe]:
    """The same doors and cards with a clock moving forward 10 ms per tap from Tuesday 10:00 local."""
    t0 = WEEK_START_TS + 86400 + 10 * 3600
    return [(d, c, datetime.fromtimestamp(t0 + i * 0.01, UTC)) for i, (d, c, _) in enumerate(probes)]


def timer_overhead_ns() -> int:
    pc = time.perf_counter_ns
    vals = []
    for _ in range(20_000):
        t0 = pc()
        vals.append(pc() - t0)
    return int(statistics.median(vals))


def time_decisions(decide: Callable[[str, int, datetime], Any], probes: list[Probe]) -> list[int]:
    pc = time.perf_counter_ns
    out = [0] * len(probes)
    for i, (door, card, now) in enumerate(probes):
        t0 = pc()
        decide(door, card, now)
        out[i] = pc() - t0
    out.sort()
    return out


# --- access rules (issue 19) ----------------------------------------------------------------------------


def rules_decider(index: RightsIndex, pop: Population, seed: int) -> tuple[Decider, AccessState]:
    """A Decider over `index`'s base arrays with every access rule enabled, and a populated state."""
    t = index.tables
    gids = [g for g in t.gid if g]
    areas = [
        Area(id="building", anti_passback=AntiPassback.HARD, exempt_groups=gids[:2], max_occupancy=1_000_000),
        Area(id="yard", anti_passback=AntiPassback.SOFT),
        Area(id="lab", anti_passback=AntiPassback.TIMED, timed_s=600.0, exempt_groups=gids[2:3], max_occupancy=500),
    ]
    ds = dict(t.doors)
    rules = {
        "door0": {"to_area": "building"}, "door1": {"to_area": "building", "from_area": "yard"},
        "door2": {"to_area": "lab", "from_area": "building"}, "door3": {"to_area": "yard"},
        "door4": {"two_person_s": 10.0, "to_area": "lab"}, "door5": {"escort_group": gids[0],
        "visitor_groups": gids[1:4], "to_area": "building"},
    }  # fmt: skip
    for d, kw in rules.items():
        ds[d] = msgspec.structs.replace(ds[d], **kw)
    tables = Tables.build(
        t.site_tz, ds.values(), t.schedule_models.values(), t.groups.values(), t.gidx, compiled=t.schedules,
        areas=areas, interlocks=[Interlock(id="trap", doors=["door6", "door7"])],
        site_rules=SiteRules(duress=DuressMode.PIN_PLUS_ONE),
    )  # fmt: skip
    base = index._base
    arrays = dict(base.arrays)
    rng = np.random.default_rng([seed, pop.n, 19])
    limited = rng.random(base.n_creds) < 0.1
    arrays["c_status"] = np.where(limited, arrays["c_status"] | np.uint32(3 << USES_SHIFT), arrays["c_status"]).astype(
        np.uint32
    )
    rindex = RightsIndex(tables, arrays, version=index.visible)
    state = AccessState()
    uid_rows = rng.choice(base.n_users, size=max(1, base.n_users // 5), replace=False)
    for n, i in enumerate(uid_rows.tolist()):
        row = base.user(base.uid_at(int(i)))
        assert row is not None
        area = ("building", "yard", "lab", None)[n % 4]
        state.where[row[0]] = (area, float(WEEK_START_TS + (n % 1000)))
        if area is not None:
            state.occupancy[area] = state.occupancy.get(area, 0) + 1
    cards = base.arrays["c_card"][limited]
    state.used = {int(c): int(k) for c, k in zip(cards.tolist(), rng.integers(0, 4, len(cards)).tolist(), strict=True)}
    state.unlocked_until["door6"] = float(WEEK_START_TS + WEEK_S / 2)
    return Decider(rindex), state


# --- the aiosqlite baseline ------------------------------------------------------------------------------

BASELINE_SQL = """
SELECT c.uid, c.status, c.vfrom, c.vuntil, u.ext_id, u.flags, u.vfrom, u.vuntil, gd.group_id, a.vfrom,
       a.vuntil
FROM credentials c
JOIN users u ON u.uid = c.uid
LEFT JOIN assignments a ON a.uid = c.uid
LEFT JOIN temp.group_doors gd ON gd.group_id = a.group_id AND gd.door_id = ?
WHERE c.card = ?
ORDER BY a.pos
"""


class SqlDecider:
    """What a design without an in-memory index does: one indexed query per tap, the rest in Python."""

    def __init__(self, db: aiosqlite.Connection, groups: list[Group]) -> None:
        self.db = db
        from zoneinfo import ZoneInfo

        tz = ZoneInfo(SITE_TZ)
        compiled = {s.id: CompiledSchedule(s, tz) for s in schedules()}
        self.gsched = {g.id: compiled[g.schedule] if g.schedule else None for g in groups}
        self.groups = groups
        self.doors = {d.id for d in doors()}

    async def setup(self) -> None:
        await self.db.execute(
            "CREATE TEMP TABLE group_doors (group_id TEXT, door_id TEXT, PRIMARY KEY (group_id, door_id)) WITHOUT ROWID"
        )
        await self.db.executemany(
            "INSERT INTO temp.group_doors VALUES (?, ?)", [(g.id, d) for g in self.groups for d in g.doors]
        )

    async def decide(self, door: str, card: int, now: datetime) -> tuple[Reason, str | None]:
        ts = now.timestamp()
        if door not in self.doors:
            return Reason.UNKNOWN_DOOR, None
        rows = list(await self.db.execute_fetchall(BASELINE_SQL, (door, card)))
        if not rows:
            return Reason.UNKNOWN_CARD, None
        _, status, cf, cu, _, flags, uf, uu = rows[0][:8]
        if status:
            name = STATUS_NAMES[status]
            return {
                CredentialStatus.SUSPENDED: Reason.CREDENTIAL_SUSPENDED,
                CredentialStatus.LOST: Reason.CREDENTIAL_LOST,
            }.get(name, Reason.CREDENTIAL_REVOKED), None
        if ts < cf:
            return Reason.CREDENTIAL_NOT_YET_VALID, None
        if ts >= cu:
            return Reason.CREDENTIAL_EXPIRED, None
        if not flags & 1:
            return Reason.USER_INACTIVE, None
        if ts < uf:
            return Reason.USER_NOT_YET_VALID, None
        if ts >= uu:
            return Reason.USER_EXPIRED, None
        any_door = any_active = False
        for r in rows:
            g, af, au = r[8], r[9], r[10]
            if g is None:
                continue
            any_door = True
            if not af <= ts < au:
                continue
            any_active = True
            sched = self.gsched[g]
            if sched is not None and not sched.allows_ts(ts):
                continue
            return Reason.GRANTED, g
        if not any_door:
            return Reason.NO_GROUP_FOR_DOOR, None
        if not any_active:
            return Reason.ASSIGNMENT_NOT_ACTIVE, None
        return Reason.OUTSIDE_SCHEDULE, None


# --- change sets -----------------------------------------------------------------------------------------


def change_sets(pop: Population, seed: int, version: int) -> tuple[ChangeSet, ChangeSet, list[tuple[int, Reason]]]:
    """(A, undo of A, [(card, reason for its probe after A)]). A: 40% new cards, 40% status changes, 20%
    deletes; B puts everything back, so A can be applied again after it."""
    rng = np.random.default_rng([seed, pop.n, 11])
    n_new, n_status, n_del = CHANGES * 4 // 10, CHANGES * 4 // 10, CHANGES // 5
    n_existing = min(pop.n, n_status + n_del)
    idx = rng.choice(pop.n, n_existing, replace=False)
    st_idx, del_idx = idx[:n_status], idx[n_status:]
    owners = rng.integers(0, pop.n, n_new)
    new_cards = rng.integers(0, CARD_LIMIT, n_new * 2, np.uint64)
    new_cards = np.unique(new_cards[~np.isin(new_cards, pop.cards)])[:n_new]
    new_cards = rng.permutation(new_cards)

    def cred(i: int, card: int, status: CredentialStatus) -> Credential:
        def dt(s: int) -> datetime | None:
            return None if s in (0, NO_END) else datetime.fromtimestamp(s, UTC)

        return Credential(
            card=card, user=Population.ext_id(i), format=CARD_FORMAT, status=status,
            valid_from=dt(int(pop.c_from[i])), valid_until=dt(int(pop.c_until[i])),
        )  # fmt: skip

    a: list[Any] = []
    b: list[Any] = []
    checks: list[tuple[int, Reason]] = []
    for i, card in zip(owners.tolist(), new_cards.tolist(), strict=True):
        a.append(PutCredential(credential=Credential(card=card, user=Population.ext_id(i), format=CARD_FORMAT)))
        b.append(DeleteCredential(card=card))
    for i in st_idx.tolist():
        card = int(pop.cards[i])
        old = STATUS_NAMES[int(pop.c_status[i])]
        new = CredentialStatus.ACTIVE if old is not CredentialStatus.ACTIVE else CredentialStatus.SUSPENDED
        a.append(PutCredential(credential=cred(i, card, new)))
        b.append(PutCredential(credential=cred(i, card, old)))
        if new is CredentialStatus.SUSPENDED:
            checks.append((card, Reason.CREDENTIAL_SUSPENDED))
    for i in del_idx.tolist():
        card = int(pop.cards[i])
        a.append(DeleteCredential(card=card))
        b.append(PutCredential(credential=cred(i, card, STATUS_NAMES[int(pop.c_status[i])])))
        checks.append((card, Reason.UNKNOWN_CARD))
    order = rng.permutation(len(a))
    ca = ChangeSet(from_version=version, to_version=version + 1, changes=[a[j] for j in order.tolist()])
    cb = ChangeSet(from_version=version + 1, to_version=version + 2, changes=[b[j] for j in order.tolist()])
    return ca, cb, checks


async def apply_monitored(
    store: Store, decider: Decider, cs: ChangeSet, target: dict[int, Reason], *, diagnose: bool
) -> dict[str, Any]:
    """Apply `cs` with a loop-lag monitor and a task deciding on changed cards every loop turn."""
    gaps: list[float] = []
    lat: list[int] = []
    seen_new_then_old = 0
    n_decisions = 0
    done = asyncio.Event()
    before = reasons_now(decider, target)

    long_gaps: list[tuple[float, float]] = []
    wall_gaps: list[tuple[float, float, float]] = []  # (start, end, loop CPU) of gaps over 2 ms wall

    cpu_gaps: list[float] = []

    async def monitor() -> None:
        pc, tt = time.perf_counter, time.thread_time
        last, last_cpu = pc(), tt()
        while not done.is_set():
            await asyncio.sleep(0)
            t, cpu = pc(), tt()
            gaps.append(t - last)
            cpu_gaps.append(cpu - last_cpu)
            if cpu - last_cpu > 0.001:
                long_gaps.append((last, t))
            if t - last > 0.002:
                wall_gaps.append((last, t, cpu - last_cpu))
            last, last_cpu = t, cpu

    async def decisions() -> None:
        nonlocal seen_new_then_old, n_decisions
        now = PROBE_NOW
        cards = [c for c in target if before[c] != target[c]] or list(target)
        pc = time.perf_counter_ns
        switched = False
        i = 0
        while not done.is_set():
            card = cards[i % len(cards)]
            i += 1
            t0 = pc()
            r = decider.decide("door0", card, now).reason
            lat.append(pc() - t0)
            if r == target[card]:
                switched = True
            elif switched:
                seen_new_then_old += 1
            await asyncio.sleep(0)
        n_decisions = i

    sampler = StackSampler() if diagnose else None
    gc_pauses: list[tuple[int, float]] = []  # (generation, seconds) of each collection during the apply
    gc_t0 = 0.0

    def on_gc(phase: str, info: dict[str, int]) -> None:
        nonlocal gc_t0
        if phase == "start":
            gc_t0 = time.perf_counter()
        else:
            gc_pauses.append((info["generation"], time.perf_counter() - gc_t0))

    tasks = [asyncio.create_task(monitor(), name="bench.monitor"), asyncio.create_task(decisions(), name="bench.dec")]
    await asyncio.sleep(0.05)
    gaps.clear()
    await asyncio.sleep(0.3)  # noise floor: the same tasks with no change set running
    idle = gaps.copy()
    for _ in range(3):  # leave our own bookkeeping out of the measured gaps
        gaps.clear()
        cpu_gaps.clear()
        long_gaps.clear()
        wall_gaps.clear()
        await asyncio.sleep(0)
    gc.callbacks.append(on_gc)
    t0 = time.perf_counter()
    try:
        await store.apply(cs)
        elapsed = time.perf_counter() - t0
    finally:
        gc.callbacks.remove(on_gc)
        done.set()
        await asyncio.gather(*tasks)
        if sampler is not None:
            sampler.stop()
            sampler.report(long_gaps)
            sampler.report_wall(wall_gaps)
    idle.sort()
    gaps.sort()
    cpu_gaps.sort()
    lat.sort()
    return {
        "elapsed": elapsed,
        "max_gap": gaps[-1] if gaps else float("nan"),
        "p99_gap": pct(gaps, 0.99),
        "p999_gap": pct(gaps, 0.999),
        "gaps_over_1ms": sum(g > 0.001 for g in gaps),
        "turns": len(gaps),
        "max_cpu_gap": cpu_gaps[-1] if cpu_gaps else float("nan"),
        "cpu_gaps_over_1ms": sum(g > 0.001 for g in cpu_gaps),
        "idle_max_gap": idle[-1] if idle else float("nan"),
        "idle_gaps_over_1ms": sum(g > 0.001 for g in idle),
        "decisions": n_decisions,
        "decision_p99_us": pct(lat, 0.99) / 1e3,
        "new_then_old": seen_new_then_old,
        "gc_max": max((d for _, d in gc_pauses), default=0.0),
        "gc_gen2": sum(g == 2 for g, _ in gc_pauses),
    }


class StackSampler:
    """--diagnose: samples every thread's stack, and each thread's scheduler counters
    (/proc/self/task/TID/schedstat: ns on a CPU, ns waiting for one), every ~0.2 ms: what the loop thread ran
    during each gap with > 1 ms of its CPU, and, for the gaps over 2 ms wall, where the other threads were and
    whether they ran (held the GIL) or waited for a CPU (preempted, the GIL possibly held) meanwhile."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, str]] = []
        #: (time, {thread name: (run ns, runqueue wait ns)}, {thread name: where})
        self.threads: list[tuple[float, dict[str, tuple[int, int]], dict[str, str]]] = []
        self.main = threading.main_thread().ident
        self._fds: dict[int, tuple[str, int]] = {}  # ident -> (name, fd of its schedstat)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench.sampler", daemon=True)
        self._thread.start()

    @staticmethod
    def _where(frame: Any, main: bool) -> str:
        where: list[str] = []
        depth = 0
        while frame is not None and len(where) < 4:
            code = frame.f_code
            if depth < 2 or "/edge/" in code.co_filename:
                where.append(f"{Path(code.co_filename).name}:{frame.f_lineno}:{code.co_name}")
            frame = frame.f_back
            depth += 1
        return " < ".join(where) or ("(bench/asyncio)" if main else "(idle)")

    def _fd(self, ident: int) -> tuple[str, int] | None:
        got = self._fds.get(ident)
        if got is None:
            th = threading._active.get(ident)  # type: ignore[attr-defined]
            if th is None or th.native_id is None:
                return None
            try:
                fd = os.open(f"/proc/self/task/{th.native_id}/schedstat", os.O_RDONLY)
            except OSError:
                return None
            name = "loop" if ident == self.main else th.name
            got = self._fds[ident] = (f"{name}#{th.native_id}", fd)
        return got

    def _run(self) -> None:
        me = threading.get_ident()
        while not self._stop.wait(0.0002):
            frames = sys._current_frames()
            t = time.perf_counter()
            stat: dict[str, tuple[int, int]] = {}
            where: dict[str, str] = {}
            for ident, frame in frames.items():
                if ident == me:
                    continue
                nf = self._fd(ident)
                if nf is None:
                    continue
                name, fd = nf
                run, wait, _ = os.pread(fd, 100, 0).split()
                stat[name] = (int(run), int(wait))
                w = self._where(frame, ident == self.main)
                where[name] = w
                if ident == self.main:
                    self.samples.append((t, w))
            self.threads.append((t, stat, where))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        for _, fd in self._fds.values():
            os.close(fd)

    def report(self, long_gaps: list[tuple[float, float]]) -> None:
        spent: Counter[str] = Counter()
        times = [t for t, _ in self.samples]  # in time order: each gap's samples found by bisection, not a scan
        for a, b in long_gaps:
            for _, where in self.samples[bisect.bisect_left(times, a) : bisect.bisect_right(times, b)]:
                spent[where] += 1
        wall = sum(b - a for a, b in long_gaps) * 1e3
        note(f"{len(long_gaps)} loop gaps with > 1 ms of loop-thread CPU, {wall:.1f} ms wall in all; samples:")
        for where, k in spent.most_common(12):
            note(f"  {k:5d}  {where}")

    def report_wall(self, wall_gaps: list[tuple[float, float, float]]) -> None:
        """For each gap over 2 ms wall: each thread's CPU time and runqueue wait across it (the samples just
        before and just after), and where the other threads were in the samples taken inside it."""
        times = [t for t, _, _ in self.threads]
        total: dict[str, list[float]] = {}
        where_all: Counter[tuple[str, str]] = Counter()
        wall = sum(b - a for a, b, _ in wall_gaps) * 1e3
        note(f"{len(wall_gaps)} loop gaps over 2 ms wall, {wall:.1f} ms in all; per thread across them "
             f"(ms on a CPU / ms waiting for a CPU), then the 8 longest:")  # fmt: skip
        lines: list[str] = []
        for a, b, cpu in sorted(wall_gaps, key=lambda g: g[0] - g[1]):
            i = max(0, bisect.bisect_left(times, a) - 1)
            j = min(len(times) - 1, bisect.bisect_right(times, b))
            if not times or i >= j:
                continue
            s0, s1 = self.threads[i][1], self.threads[j][1]
            per = []
            for name, (r1, w1) in s1.items():
                r0, w0 = s0.get(name, (r1, w1))
                dr, dw = (r1 - r0) / 1e6, (w1 - w0) / 1e6
                tot = total.setdefault(name, [0.0, 0.0])
                tot[0] += dr
                tot[1] += dw
                if dr > 0.05 or dw > 0.05:
                    per.append(f"{name} {dr:.1f}/{dw:.1f}")
            inside: Counter[tuple[str, str]] = Counter()
            for _, _, wh in self.threads[i + 1 : j]:
                for name, w in wh.items():
                    if not name.startswith("loop") and w != "(idle)":
                        inside[(name, w)] += 1
            where_all.update(inside)
            if len(lines) < 8:
                span = (self.threads[j][0] - self.threads[i][0]) * 1e3
                lines.append(f"  gap {(b - a) * 1e3:.1f} ms (loop CPU {cpu * 1e3:.1f} ms; sampled span {span:.1f} ms, "
                             f"{j - i - 1} samples inside): {'; '.join(per)}")  # fmt: skip
                lines += [f"      {k:3d} {n}: {w}" for (n, w), k in inside.most_common(3)]
        note("  totals: " + "; ".join(f"{n} {r:.1f}/{w:.1f}" for n, (r, w) in sorted(total.items())))
        if self.threads:
            first, last = self.threads[0][1], self.threads[-1][1]
            whole = [f"{n} {(r - first.get(n, (0, 0))[0]) / 1e6:.1f}/{(w - first.get(n, (0, 0))[1]) / 1e6:.1f}"
                     for n, (r, w) in sorted(last.items())]  # fmt: skip
            note(f"  whole apply ({(self.threads[-1][0] - self.threads[0][0]) * 1e3:.0f} ms): " + "; ".join(whole))
        for ln in lines:
            note(ln)
        note("  other threads' samples inside the gaps:")
        for (n, w), k in where_all.most_common(12):
            note(f"  {k:5d}  {n}: {w}")


def reasons_now(decider: Decider, cards: Iterable[int]) -> dict[int, Reason]:
    return {card: decider.decide("door0", card, PROBE_NOW).reason for card in cards}


def not_visible(decider: Decider, target: dict[int, Reason]) -> int:
    """Number of changed cards whose decision does not show the change (0 expected)."""
    return sum(r != target[c] for c, r in reasons_now(decider, target).items())


# --- one size --------------------------------------------------------------------------------------------


def clear_stale_work(cache_dir: Path) -> None:
    """Remove the working files of runs that are gone (killed: no cleanup of their own)."""
    for f in cache_dir.glob("work-n*-*.db*"):
        pid = f.name.split(".db")[0].rpartition("-")[2]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            f.unlink(missing_ok=True)


def status_kb(*keys: str) -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in keys:
                out[k] = int(v.split()[0]) * 1024
    return out


def child_boot(path: Path, mode: str) -> dict[str, Any]:
    """Boot in a fresh process (`--child-boot`): its figures as a dict."""
    r = subprocess.run([sys.executable, __file__, "--child-boot", str(path), "--mode", mode], capture_output=True,
                       text=True, check=False, timeout=1800)  # fmt: skip
    if r.returncode != 0:
        raise RuntimeError(f"the {mode} boot in a fresh process exited {r.returncode}: {r.stderr[-3000:]}")
    return dict(json.loads(r.stdout.strip().splitlines()[-1]))


async def child_main(path: Path, mode: str) -> None:
    gc.collect()
    before = status_kb("RssAnon", "RssFile")
    t0 = time.perf_counter()
    store = Store(path, SITE_TZ, verify_at_open=mode == "rows")
    await store.__aenter__()
    Decider(store.index).decide("door0", 1, PROBE_NOW)
    boot_s = time.perf_counter() - t0
    after = status_kb("RssAnon", "RssFile")
    t1 = time.perf_counter()
    await store.image_written()
    out = {"boot_s": boot_s, "booted_from": store.booted_from, "credentials": len(store.index),
           "anon_delta": after["RssAnon"] - before["RssAnon"], "file_delta": after["RssFile"] - before["RssFile"],
           "image_write_s": time.perf_counter() - t1, "image_problem": store.image_problem}  # fmt: skip
    await store.close()
    print(json.dumps(out), flush=True)


async def boot(path: Path) -> tuple[Store, Decider, float, Any]:
    t0 = time.perf_counter()
    store = Store(path, SITE_TZ, verify_at_open=False)
    _OPENED.append(store)
    await store.__aenter__()
    decider = Decider(store.index)
    store.on_swap.append(lambda idx: setattr(decider, "index", idx))
    first = decider.decide("door0", 1, PROBE_NOW)
    elapsed = time.perf_counter() - t0
    gc.freeze()  # as the agent does after its boot (edge/agent/agent.py): boot-time objects out of every scan
    return store, decider, elapsed, first


async def run_size(n: int, args: argparse.Namespace) -> None:
    quick = args.quick
    base = {"n": n, "seed": args.seed, "python": sys.version.split()[0], "switchinterval_s": SWITCH_INTERVAL}
    note(f"N={n}: generating population")
    pop = generate(n, args.seed)
    cached, build_s, method = await cached_store(args.cache_dir, pop)
    if build_s:
        emit("store_build_time", build_s, "s", **base, method=method,
             note="bench setup, not a target: writing the population into a store file")  # fmt: skip
    # this run's own copy: two runs at once (two checkouts' tests, two CI jobs on one machine) share the cache,
    # never a working file (one deleting the other's file under its open Store was a failure, then a hang)
    work = args.cache_dir / f"work-n{n}-{os.getpid()}.db"
    clear_stale_work(args.cache_dir)
    for p in (work, *(Path(f"{work}{x}") for x in ("-wal", "-shm", ".idx", ".idx.1", ".verified"))):
        p.unlink(missing_ok=True)
    shutil.copyfile(cached, work)
    # The verified copy a store writes at its first open (VACUUM INTO, minutes at 10^6 rows): a copy of the
    # same file, so that no boot measured here includes writing it.
    shutil.copyfile(cached, work.with_name(work.name + ".verified"))
    db_bytes = work.stat().st_size
    n_assign = pop.n_assignments
    if args.changesets_only:
        store, decider, boot_s, _ = await boot(work)
        note(f"N={n}: booted ({store.booted_from}) in {boot_s:.1f} s; change sets only")
        await run_changesets(store, decider, pop, base, args)
        return

    # (a) boot to the first decision, each in a fresh process (`--child-boot`) whose anonymous memory is read
    # from /proc/self/status before the Store is opened and after the first decision. First the current design:
    # the index built from the rows (SQLite quick_check, the rights checksum over every row); that boot then
    # writes the index image. Then the image boot (mapped, checked, nothing to replay), cold and warm.
    image = work.with_name(work.name + ".idx")
    drop_file_cache(work)
    rows_boot = child_boot(work, "rows")
    assert rows_boot["booted_from"] == "rows" and rows_boot["credentials"] == n, rows_boot
    image_bytes = image.stat().st_size
    drop_file_cache(work)
    drop_file_cache(image)
    cold = child_boot(work, "image")
    assert cold["booted_from"] == "image" and cold["credentials"] == n, cold
    warm = child_boot(work, "image")
    load = os.getloadavg()[0]
    target_boot = 2.0 if n > 2_000_000 else 1.0
    emit("boot_to_first_decision", cold["boot_s"], "s", **base, page_cache="cold (files evicted with fadvise)",
         path="index image mapped, checked (CRC of every column), change sets since replayed (none)",
         current_design_s=round(rows_boot["boot_s"], 3), current_design="index built from the rows (as before "
         "issue 18: quick_check + checksum over every row + load + build)", db_bytes=db_bytes,
         image_bytes=image_bytes, target_s=target_boot, loadavg_1min=round(load, 2))  # fmt: skip
    emit("boot_to_first_decision_warm", warm["boot_s"], "s", **base, page_cache="warm", path="index image",
         current_design_s=round(rows_boot["boot_s"], 3))  # fmt: skip
    emit("boot_from_rows", rows_boot["boot_s"], "s", **base, page_cache="cold",
         measure="Store(verify_at_open=True) to the first decision: what every boot did before the image",
         image_write_s=round(rows_boot["image_write_s"], 3))  # fmt: skip
    emit("index_anon_bytes_per_credential", cold["anon_delta"] / n, "bytes", **base,
         measure="RssAnon (/proc/self/status) after the first decision minus before Store(), fresh process, "
         "image boot", rss_file_delta_per_credential=round(cold["file_delta"] / n, 1),
         current_design_anon_per_credential=round(rows_boot["anon_delta"] / n, 1),
         image_bytes_per_credential=round(image_bytes / n, 1), target_bytes=48, target_n=5_000_000)  # fmt: skip
    store, decider, _, _ = await boot(work)
    assert len(store.index) == n and store.booted_from == "image", (len(store.index), store.booted_from)
    legacy = LegacyIndex(store.index)
    emit("index_nbytes_per_credential", store.index.nbytes() / n, "bytes", **base,
         measure="RightsIndex.nbytes() (the base columns = the image's body)",
         current_design_nbytes_per_credential=round(legacy.nbytes() / n, 1), users=n,
         assignments=n_assign)  # fmt: skip
    per_col = {k: round(v.nbytes / n, 2) for k, v in store.index._base.arrays.items()}
    note(f"N={n}: bytes per credential by column: {per_col}")

    # (c) decide() latency
    m = 50_000 if quick else 200_000
    rounds = 3 if quick else 5
    probes = make_probes(pop, m, args.seed)
    overhead = timer_overhead_ns()
    reasons = Counter(str(decider.decide(*p).reason) for p in probes[:20_000])
    mix = {k: round(v / 20_000, 4) for k, v in reasons.most_common()}
    stats: list[tuple[float, float, float, float]] = []
    ldecider = Decider(legacy)  # type: ignore[arg-type]  # duck-typed: cred(), user(), tables
    lstats: list[tuple[float, float]] = []
    for _ in range(rounds):  # interleaved: the same machine load for both
        v = time_decisions(decider.decide, probes)
        stats.append((pct(v, 0.5), pct(v, 0.99), pct(v, 0.999), v[-1]))
        v = time_decisions(ldecider.decide, probes)
        lstats.append((pct(v, 0.5), pct(v, 0.99)))
    l50, l99 = (statistics.median(s[k] for s in lstats) / 1e3 for k in (0, 1))
    assert all(decider.decide(*p) == ldecider.decide(*p) for p in probes[:20_000])
    p50 = statistics.median(s[0] for s in stats) / 1e3
    p99 = statistics.median(s[1] for s in stats) / 1e3
    p999 = statistics.median(s[2] for s in stats) / 1e3
    common = {**base, "probes": m, "rounds": rounds, "timer_overhead_ns": overhead,
              "times": "uniform over one week (Mon 2025-03-03, Europe/Berlin, a holiday on Wed)",
              "known_share": 0.8, "gc": "enabled, gc.freeze() after boot (as the agent)"}  # fmt: skip
    emit("decide_p50", p50, "us", **common, max_round=max(s[0] for s in stats) / 1e3, reasons=mix,
         current_design_us=round(l50, 3))  # fmt: skip
    emit("decide_p99", p99, "us", **common, max_round=max(s[1] for s in stats) / 1e3, target_us=5.0,
         target_n=5_000_000, current_design_us=round(l99, 3),
         current_design="bench/legacy_index.py: card bisect through memoryviews, per-user assignment rows",
         loadavg_1min=round(os.getloadavg()[0], 2))  # fmt: skip
    emit("decide_p999", p999, "us", **common, max_round=max(s[2] for s in stats) / 1e3,
         max_single=max(s[3] for s in stats) / 1e3)  # fmt: skip
    # The same calls timed in thread CPU time: what the decision itself costs, without the waits for a CPU
    # that a loaded machine adds (clock_gettime(CLOCK_THREAD_CPUTIME_ID): ~0.1-0.3 us of its own per call).
    cpu = []
    for lay, dec in (("image", decider), ("legacy", ldecider)):
        tt = time.thread_time_ns
        cv = [0] * len(probes)
        for i, (door, card, now) in enumerate(probes):
            t0 = tt()
            dec.decide(door, card, now)
            cv[i] = tt() - t0
        cv.sort()
        cpu.append((lay, pct(cv, 0.5) / 1e3, pct(cv, 0.99) / 1e3))
    emit(
        "decide_p99_cpu",
        cpu[0][2],
        "us",
        **base,
        probes=m,
        p50_us=cpu[0][1],
        current_design_p99_us=cpu[1][2],
        current_design_p50_us=cpu[1][1],
        measure="thread CPU time per call (time.thread_time_ns), one round",
    )
    lv = time_decisions(decider.decide, live_probes(probes))
    emit("decide_p99_live_clock", pct(lv, 0.99) / 1e3, "us", **base, probes=m, p50_us=pct(lv, 0.5) / 1e3,
         times="Tue 10:00 local, +10 ms per tap (local-clock cache hits)")  # fmt: skip

    # (c2) every access rule enabled, beside the same run without them (rounds interleaved)
    rdecider, rstate = rules_decider(store.index, pop, args.seed)
    plain_decide, rules_decide = decider.decide, rdecider.decide

    def without(door: str, card: int, now: datetime) -> Any:
        return plain_decide(door, card, now, state=None)

    def with_rules(door: str, card: int, now: datetime) -> Any:
        return rules_decide(door, card, now, state=rstate)

    rmix = Counter(str(with_rules(*p).reason) for p in probes[:20_000])
    off: list[tuple[float, float]] = []
    on: list[tuple[float, float]] = []
    for _ in range(rounds):
        v = time_decisions(without, probes)
        off.append((pct(v, 0.5), pct(v, 0.99)))
        v = time_decisions(with_rules, probes)
        on.append((pct(v, 0.5), pct(v, 0.99)))
    o50, o99 = (statistics.median(s[k] for s in off) / 1e3 for k in (0, 1))
    r50, r99 = (statistics.median(s[k] for s in on) / 1e3 for k in (0, 1))
    rcommon = {**common, "rules": "areas x3 (hard/soft/timed, exempt groups, occupancy) on 6 doors, two-person, "
               "escort, interlock, duress, 10% use-limited; 20% of users located",
               "reasons": {k: round(v / 20_000, 4) for k, v in rmix.most_common()}}  # fmt: skip
    emit("decide_no_rules_p50", o50, "us", **common)
    emit("decide_no_rules_p99", o99, "us", **common)
    emit("decide_rules_p50", r50, "us", **rcommon, ratio=round(r50 / o50, 3))
    emit("decide_rules_p99", r99, "us", **rcommon, ratio=round(r99 / o99, 3), target_ratio=1.5, target_n=2_000_000)
    note(f"N={n}: decide() p50/p99 without rules {o50:.2f}/{o99:.2f} us, with every rule {r50:.2f}/{r99:.2f} us "
         f"(x{r50 / o50:.2f} / x{r99 / o99:.2f})")  # fmt: skip
    # Only taps that pass every other check reach the rules: the same comparison on those alone.
    gprobes = [p for p in probes if plain_decide(*p).granted]
    goff = [time_decisions(without, gprobes) for _ in range(rounds)]
    gon = [time_decisions(with_rules, gprobes) for _ in range(rounds)]
    g_o99 = statistics.median(pct(v, 0.99) for v in goff) / 1e3
    g_r99 = statistics.median(pct(v, 0.99) for v in gon) / 1e3
    emit("decide_rules_granted_only_p99", g_r99, "us", **rcommon, probes_granted=len(gprobes),
         no_rules_p99_us=g_o99, ratio=round(g_r99 / g_o99, 3), target_ratio=1.5)  # fmt: skip
    note(f"N={n}: on the {len(gprobes)} taps granted without rules: p99 {g_o99:.2f} -> {g_r99:.2f} us "
         f"(x{g_r99 / g_o99:.2f})")  # fmt: skip

    # (d) aiosqlite baseline on the same file (a second connection, like a second reader)
    nb = 500 if quick else 2_000
    bprobes = probes[:nb]
    async with aiosqlite.connect(work) as db:
        sql = SqlDecider(db, pop.groups)
        await sql.setup()
        plan = [tuple(r) for r in await db.execute_fetchall("EXPLAIN QUERY PLAN " + BASELINE_SQL, ("door0", 1))]
        for p in bprobes[:50]:  # warm up
            await sql.decide(*p)
        pc = time.perf_counter_ns
        bl: list[int] = []
        mismatches = 0
        for p in bprobes:
            t0 = pc()
            r, g = await sql.decide(*p)
            bl.append(pc() - t0)
            d = decider.decide(*p)
            mismatches += (r, g) != (d.reason, d.group)
        bl.sort()
    b50, b99 = pct(bl, 0.5) / 1e3, pct(bl, 0.99) / 1e3
    same = sorted(time_decisions(decider.decide, bprobes))
    bparams = {**base, "probes": nb, "answers_differing_from_decide": mismatches,
               "query_plan": [r[-1] for r in plan]}  # fmt: skip
    emit("baseline_aiosqlite_p50", b50, "us", **bparams)
    emit("baseline_aiosqlite_p99", b99, "us", **bparams)
    emit("speedup_p50", b50 / p50, "x", **base, decide_p50_us=p50, baseline_p50_us=b50,
         decide_p50_same_probes_us=pct(same, 0.5) / 1e3, target_x=100.0)  # fmt: skip
    emit("speedup_p99", b99 / p99, "x", **base, decide_p99_us=p99, baseline_p99_us=b99,
         decide_p99_same_probes_us=pct(same, 0.99) / 1e3, target_x=100.0)  # fmt: skip
    await store.close()
    del store, decider, ldecider, legacy
    gc.collect()

    # (b) memory under tracemalloc (a separate boot: tracemalloc slows allocation-heavy code)
    tracemalloc.start()
    m0 = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    store, decider, tm_s, _ = await boot(work)
    cur, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    emit("index_memory_per_credential", (cur - m0) / n, "bytes", **base,
         measure="tracemalloc: memory still allocated after Store open (index + store), per credential",
         peak_per_credential=round((peak - m0) / n, 1), nbytes_per_credential=round(store.index.nbytes() / n, 1),
         users=n, assignments=n_assign, boot_s_under_tracemalloc=round(tm_s, 3), target_bytes=100,
         target_n=2_000_000)  # fmt: skip

    # (e) change sets through Store.apply. The probe lists (~1M GC-tracked objects) go first: a full
    # collection over them would be the bench's stall, not the store's.
    del probes, bprobes, lv, same, bl, stats
    gc.collect()
    await run_changesets(store, decider, pop, base, args)


async def run_changesets(
    store: Store, decider: Decider, pop: Population, base: dict[str, Any], args: argparse.Namespace
) -> None:
    """(e) three 10,000-change sets through `Store.apply`, the last two monitored; closes the store."""
    work = store.path
    version = store.version
    ca, cb, checks = change_sets(pop, args.seed, version)
    orig = reasons_now(decider, (c for c, _ in checks))
    t0 = time.perf_counter()
    await store.apply(ca)
    quiet = time.perf_counter() - t0
    changed = dict(checks)
    bad_a = not_visible(decider, changed)
    cparams = {**base, "changes": len(ca.changes), "mix": "40% new cards, 40% status changes, 20% deletes",
               "synchronous": "FULL"}  # fmt: skip
    emit("changeset_apply_time", quiet, "s", **cparams, not_visible_after=bad_a, monitors="none", target_s=1.0)
    res_b = await apply_monitored(store, decider, cb, orig, diagnose=args.diagnose)
    bad_b = not_visible(decider, orig)
    ca2 = ChangeSet(from_version=version + 2, to_version=version + 3, changes=ca.changes)
    res_c = await apply_monitored(store, decider, ca2, changed, diagnose=args.diagnose)
    bad_c = not_visible(decider, changed)
    runs = [res_b, res_c]
    emit("changeset_apply_time_monitored", max(r["elapsed"] for r in runs), "s", **cparams,
         runs=[round(r["elapsed"], 3) for r in runs], not_visible_after=bad_b + bad_c, target_s=1.0,
         monitors="loop-lag task + deciding task spinning on sleep(0)")  # fmt: skip
    emit("changeset_loop_stall_max", max(r["max_gap"] for r in runs) * 1e3, "ms", **cparams,
         measure="wall time between two turns of a monitor task spinning on sleep(0)",
         runs=[round(r["max_gap"] * 1e3, 3) for r in runs], gaps_over_1ms=[r["gaps_over_1ms"] for r in runs],
         loop_turns=[r["turns"] for r in runs], target_ms=2.0,
         idle_max_ms=[round(r["idle_max_gap"] * 1e3, 3) for r in runs],
         idle_gaps_over_1ms_in_300ms=[r["idle_gaps_over_1ms"] for r in runs],
         loadavg_1min=round(os.getloadavg()[0], 2),
         gc_max_pause_ms=[round(r["gc_max"] * 1e3, 3) for r in runs], gc_gen2_runs=[r["gc_gen2"] for r in runs],
         gc_tracked_objects=len(gc.get_objects()))  # fmt: skip
    emit("changeset_loop_stall_cpu_max", max(r["max_cpu_gap"] for r in runs) * 1e3, "ms", **cparams,
         runs=[round(r["max_cpu_gap"] * 1e3, 3) for r in runs], gaps_over_1ms=[r["cpu_gaps_over_1ms"] for r in runs],
         measure="loop-thread CPU time (thread_time) between two monitor turns: the loop's own work, without "
         "waits for the GIL or for a CPU taken by other processes")  # fmt: skip
    emit("changeset_loop_stall_p99", max(r["p99_gap"] for r in runs) * 1e3, "ms", **cparams,
         p999_ms=[round(r["p999_gap"] * 1e3, 3) for r in runs])  # fmt: skip
    emit("changeset_concurrent_decisions", sum(r["decisions"] for r in runs), "decisions", **cparams,
         decision_p99_us=[round(r["decision_p99_us"], 2) for r in runs],
         saw_new_then_old=sum(r["new_then_old"] for r in runs))  # fmt: skip
    await store.close()
    for p in (work, *(Path(f"{work}{x}") for x in ("-wal", "-shm", ".idx", ".idx.1", ".verified"))):
        p.unlink(missing_ok=True)


async def amain(args: argparse.Namespace) -> None:
    try:
        for n in args.sizes:
            await run_size(n, args)
            _OPENED.clear()
            gc.collect()
    finally:
        for store in _OPENED:
            await store.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="sizes 10k and 100k, fewer probes (< 60 s once cached)")
    ap.add_argument("--sizes", help="comma-separated sizes, e.g. 10k,100k,1M,2M")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--cache-dir", type=Path, default=Path("/tmp/edge-bench/decide"))
    ap.add_argument("--diagnose", action="store_true", help="log event-loop steps over 1 ms during change sets")
    ap.add_argument(
        "--changesets-only",
        action="store_true",
        help="only boot (from the rows, no image) and the change sets (e): the apply-path figures",
    )
    ap.add_argument("--child-boot", type=Path, help=argparse.SUPPRESS)  # internal: one boot in a fresh process
    ap.add_argument("--mode", choices=("image", "rows"), default="image", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_boot is not None:
        sys.setswitchinterval(SWITCH_INTERVAL)
        try:
            asyncio.run(child_main(args.child_boot, args.mode))
        except BaseException:
            traceback.print_exc()  # before a forced exit
            exit_if_threads_linger()
            raise
        exit_if_threads_linger()
        return
    args.sizes = [parse_size(s) for s in args.sizes.split(",")] if args.sizes else (
        QUICK_SIZES if args.quick else DEFAULT_SIZES)  # fmt: skip
    sys.setswitchinterval(SWITCH_INTERVAL)
    msgspec.json.encode(0)  # import side effects out of the timed parts
    try:
        asyncio.run(amain(args))
    except BaseException:
        traceback.print_exc()  # before a forced exit
        exit_if_threads_linger()
        raise
    exit_if_threads_linger()


def exit_if_threads_linger() -> None:
    """An SQLite connection left open (aiosqlite's worker is not a daemon thread) would keep the process
    from exiting, for ever, after its figures or its error were printed: threads still running 20 s after
    the end are named, and the process exits (3)."""
    left = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    deadline = time.monotonic() + 20.0  # a connection just closed ends its thread a moment later (on a busy
    for t in left:  # machine, seconds later): only one still running after that is left open
        t.join(max(0.0, deadline - time.monotonic()))
    left = [t for t in left if t.is_alive()]
    if left:
        note(f"exiting with {len(left)} thread(s) still running (an unclosed connection?): "
             f"{', '.join(t.name for t in left)}")  # fmt: skip
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(3)


if __name__ == "__main__":
    main()
