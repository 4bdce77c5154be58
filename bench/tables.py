"""Door/group/schedule table rebuilds: time and event-loop lag (JSON lines on stdout).

    .venv/bin/python bench/tables.py [--quick]

A store (real SQLite) receives N schedules at the interval limit (`edge.model.MAX_INTERVALS`) with one
group each, then small changes (put_door, put_group, a small put_schedule). A ticker task asks for 1 ms
sleeps meanwhile; its overshoot is the loop lag a tap would see.

Metrics:
  * tables_apply_time / tables_apply_loop_lag_max: the large change set (N = MAX_SCHEDULES, 50 with --quick).
  * tables_small_change_time / tables_small_change_loop_lag_max: the slowest of the small changes after it.
  * tables_reopen_time: opening the store again (verification and compilation included).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edge.model import (
    MAX_INTERVALS,
    MAX_SCHEDULES,
    ChangeSet,
    Door,
    DoorMode,
    Group,
    Interval,
    PutDoor,
    PutGroup,
    PutSchedule,
    Schedule,
)
from edge.store import Store


def emit(metric: str, value: float, unit: str, **params: Any) -> None:
    print(json.dumps({"metric": metric, "value": round(value, 4), "unit": unit, "params": params}), flush=True)


def big_schedule(sid: str) -> Schedule:
    ivs = [Interval(day=d, start=f"{m // 60:02d}:{m % 60:02d}", end=f"{(m + 5) // 60:02d}:{(m + 5) % 60:02d}")
           for d in range(7) for m in range(0, 1430, 10)]  # fmt: skip
    return Schedule(id=sid, intervals=ivs[:MAX_INTERVALS])


async def timed(work: Callable[[], Awaitable[object]]) -> tuple[float, float]:
    """(seconds `work` took, max loop lag meanwhile)."""
    lag = 0.0

    async def tick() -> None:
        nonlocal lag
        while True:
            t = time.perf_counter()
            await asyncio.sleep(0.001)
            lag = max(lag, time.perf_counter() - t - 0.001)

    task = asyncio.create_task(tick())
    await asyncio.sleep(0.005)
    t0 = time.perf_counter()
    await work()
    took = time.perf_counter() - t0
    task.cancel()
    return took, lag


async def main(quick: bool) -> None:
    sys.setswitchinterval(0.0005)  # as the agent runs (edge/cli.py)
    n = 50 if quick else MAX_SCHEDULES
    params = {"schedules": n, "intervals": MAX_INTERVALS}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rights.db"
        async with Store(path, "Europe/Berlin") as store:
            await store.apply(ChangeSet(from_version=0, to_version=1, changes=[PutDoor(door=Door(id="front"))]))
            big = ChangeSet(
                from_version=1,
                to_version=2,
                changes=[PutSchedule(schedule=big_schedule(f"s{i}")) for i in range(n)]
                + [PutGroup(group=Group(id=f"g{i}", doors=["front"], schedule=f"s{i}")) for i in range(n)],
            )
            took, lag = await timed(lambda: store.apply(big))
            emit("tables_apply_time", took, "s", **params)
            emit("tables_apply_loop_lag_max", lag * 1e3, "ms", **params)
            small = [
                PutDoor(door=Door(id="front", mode=DoorMode.UNLOCKED, unlock_schedule="s1")),
                PutGroup(group=Group(id="g0", doors=["front"], schedule="s2")),
                PutSchedule(schedule=Schedule(id="s3", intervals=[Interval(day=0, start="08:00", end="18:00")])),
            ]
            worst_t = worst_lag = 0.0
            for v, ch in enumerate(small, start=2):
                cs = ChangeSet(from_version=v, to_version=v + 1, changes=[ch])

                async def one(cs: ChangeSet = cs) -> object:
                    return await store.apply(cs)

                took, lag = await timed(one)
                worst_t, worst_lag = max(worst_t, took), max(worst_lag, lag)
            emit("tables_small_change_time", worst_t, "s", **params)
            emit("tables_small_change_loop_lag_max", worst_lag * 1e3, "ms", **params)
        t0 = time.perf_counter()
        async with Store(path, "Europe/Berlin"):
            pass
        emit("tables_reopen_time", time.perf_counter() - t0, "s", **params)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    asyncio.run(main(ap.parse_args().quick))
