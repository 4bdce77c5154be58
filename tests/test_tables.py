"""Door, group and schedule tables: rebuilt off the loop, only what changed; the model's limits (issue 11).

Before: 100 schedules x 8,000 intervals stalled the event loop 2.8 s on apply, then 1.9 s on every later
small put_door / put_group / put_schedule (every schedule was compiled again, on the loop).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import msgspec
import pytest

from edge.decision import Decider
from edge.errors import ChangeRejected
from edge.model import (
    MAX_ASSIGNMENTS,
    MAX_INTERVALS,
    MAX_NAME,
    MAX_SCHEDULES,
    Assignment,
    ChangeSet,
    Door,
    DoorMode,
    Group,
    Interval,
    PutDoor,
    PutGroup,
    PutSchedule,
    PutUser,
    Schedule,
    Snapshot,
    User,
    rejection,
)
from edge.store import Store

from .conftest import MONDAY_10, basic_site


def big_schedule(sid: str, n: int = MAX_INTERVALS) -> Schedule:
    """`n` five-minute intervals, ten minutes apart, spread over the week."""
    ivs = [Interval(day=d, start=f"{m // 60:02d}:{m % 60:02d}", end=f"{(m + 5) // 60:02d}:{(m + 5) % 60:02d}")
           for d in range(7) for m in range(0, 1430, 10)]  # fmt: skip
    return Schedule(id=sid, intervals=ivs[:n])


@asynccontextmanager
async def loop_lag() -> AsyncIterator[list[float]]:
    """The event loop's lag while the block runs: a ticker asks for 1 ms sleeps and records the overshoot."""
    lags: list[float] = []

    async def tick() -> None:
        while True:
            t = time.perf_counter()
            await asyncio.sleep(0.001)
            lags.append(time.perf_counter() - t - 0.001)

    task = asyncio.create_task(tick())
    await asyncio.sleep(0.01)
    try:
        yield lags
    finally:
        task.cancel()


async def test_large_schedules_then_small_changes_never_stall_the_loop(tmp_path: Path) -> None:
    n = 200
    async with Store(tmp_path / "rights.db", "Europe/Berlin") as store:
        await store.apply(basic_site())
        big = ChangeSet(
            from_version=1,
            to_version=2,
            changes=[PutSchedule(schedule=big_schedule(f"s{i}")) for i in range(n)]
            + [PutGroup(group=Group(id=f"g{i}", doors=["front"], schedule=f"s{i}")) for i in range(n)],
        )
        async with loop_lag() as lags:
            t = time.perf_counter()
            await store.apply(big)
            apply_s = time.perf_counter() - t
        big_lag = max(lags)
        small_lags: list[float] = []
        small_s: list[float] = []
        for v, change in enumerate(
            [
                PutDoor(door=Door(id="lab", mode=DoorMode.UNLOCKED, unlock_schedule="s1")),
                PutGroup(group=Group(id="g0", doors=["front", "lab"], schedule="s0")),
                PutSchedule(schedule=Schedule(id="s7", intervals=[Interval(day=0, start="08:00", end="18:00")])),
            ],
            start=2,
        ):
            async with loop_lag() as lags:
                t = time.perf_counter()
                await store.apply(ChangeSet(from_version=v, to_version=v + 1, changes=[change]))
                small_s.append(time.perf_counter() - t)
            small_lags.append(max(lags))
        print(
            f"\n{n} schedules x {MAX_INTERVALS} intervals: apply {apply_s:.2f} s, max loop lag {big_lag * 1e3:.1f} ms;"
            f" small changes: {', '.join(f'{s * 1e3:.0f} ms' for s in small_s)},"
            f" max loop lag {max(small_lags) * 1e3:.1f} ms"
        )
        assert big_lag < 0.2 and max(small_lags) < 0.2
        # Only what changed was compiled again: every other schedule is the very same compiled object.
        t = store.index.tables
        assert t.schedules["s7"].model.intervals == [Interval(day=0, start="08:00", end="18:00")]
        d = Decider(store.index)
        assert d.decide("front", 1002, MONDAY_10).granted  # the rights still decide
    async with Store(tmp_path / "rights.db", "Europe/Berlin") as again:  # and reload
        assert len(again.index.tables.schedules) == n + 1


async def test_unchanged_schedules_are_not_compiled_again(tmp_path: Path) -> None:
    async with Store(tmp_path / "rights.db", "UTC") as store:
        await store.apply(basic_site())
        before = store.index.tables.schedules["office"]
        await store.apply(ChangeSet(from_version=1, to_version=2, changes=[PutDoor(door=Door(id="side"))]))
        assert store.index.tables.schedules["office"] is before


# --- limits --------------------------------------------------------------------------------------------


def wire(cs: ChangeSet) -> bytes:
    return msgspec.json.encode(cs)


@pytest.mark.parametrize(
    ("change", "path"),
    [
        (PutSchedule(schedule=big_schedule("s", MAX_INTERVALS + 1)), "changes[0].schedule.intervals"),
        (PutUser(user=User(id="u", name="x" * (MAX_NAME + 1))), "changes[0].user.name"),
        (
            PutUser(user=User(id="u", assignments=[Assignment(group="lab")] * (MAX_ASSIGNMENTS + 1))),
            "changes[0].user.assignments",
        ),
        (PutDoor(door=Door(id="d" * 65)), "changes[0].door.id"),
    ],
)
async def test_limits_are_refused_naming_the_field(tmp_path: Path, change: object, path: str) -> None:
    cs = ChangeSet(from_version=1, to_version=2, changes=[change])  # type: ignore[list-item]
    # At decode (what the link does with a message) ...
    with pytest.raises(msgspec.ValidationError) as ei:
        msgspec.json.decode(wire(cs), type=ChangeSet)
    r = rejection(ei.value)
    assert (r.code, r.path) == ("bad_field", path), str(ei.value)
    # ... and in the store, for objects built in code: nothing applied.
    async with Store(tmp_path / "rights.db", "UTC") as store:
        await store.apply(basic_site())
        with pytest.raises(ChangeRejected) as er:
            await store.apply(cs)
        assert (er.value.code, er.value.path) == ("bad_field", path) and store.version == 1


async def test_schedules_per_site_are_bounded(tmp_path: Path) -> None:
    small = Schedule(id="x", intervals=[Interval(day=0, start="08:00", end="09:00")])
    snap = Snapshot(version=1, schedules=[msgspec.structs.replace(small, id=f"s{i}") for i in range(MAX_SCHEDULES + 1)])
    with pytest.raises(msgspec.ValidationError) as ei:
        msgspec.json.decode(msgspec.json.encode(snap), type=Snapshot)
    assert rejection(ei.value).path == "schedules"
    async with Store(tmp_path / "rights.db", "UTC") as store:
        with pytest.raises(ChangeRejected) as er:
            await store.replace(snap)
        assert (er.value.code, er.value.path) == ("bad_field", "schedules") and store.version == 0
