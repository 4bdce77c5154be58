"""The event journal: batched durable appends, read/ack, bounds and alarms, disk failures."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from edge.errors import StoreError
from edge.events import ACCESS_GRANTED, JOURNAL_NEAR_FULL
from edge.journal import JOURNAL_DAMAGED, JOURNAL_OVERFLOW, STORAGE_ALARM, Journal


async def test_record_is_buffered_then_durable_in_order(tmp_path: Path) -> None:
    async with Journal(tmp_path / "j.db", site_tz="Europe/Berlin", link_up=lambda: True) as j:
        evs = [j.record(ACCESS_GRANTED, door="front", card=i, user="alice") for i in range(10)]
        assert await j.read(0) == []  # nothing on disk yet: record() never writes
        await j.flush()
        got = await j.read(0)
        assert [e.seq for e in got] == [e.seq for e in evs] == list(range(1, 11))
        assert len({e.id for e in got}) == 10
        assert got[0].local.endswith("+01:00") and got[0].link_up


async def test_ack_removes_only_acknowledged_and_seq_survives_restart(tmp_path: Path) -> None:
    p = tmp_path / "j.db"
    async with Journal(p) as j:
        for i in range(5):
            j.record(ACCESS_GRANTED, card=i)
        await j.flush()
        assert await j.ack(3) == 3
        assert [e.seq for e in await j.read(0)] == [4, 5]
        assert await j.ack(5) == 2
    async with Journal(p) as j:
        assert j.depth == 0
        assert j.record(ACCESS_GRANTED).seq == 6  # never reused, even with an empty table


async def test_unflushed_events_are_written_on_close(tmp_path: Path) -> None:
    p = tmp_path / "j.db"
    async with Journal(p, interval_s=60) as j:
        j.record(ACCESS_GRANTED, card=1)
    async with Journal(p) as j:
        assert [e.card for e in await j.read(0)] == [1]


async def test_flusher_writes_batches_without_being_asked(tmp_path: Path) -> None:
    async with Journal(tmp_path / "j.db", interval_s=0.01) as j:
        j.record(ACCESS_GRANTED)
        await asyncio.wait_for(j.wait_durable(), 5)
        assert len(await j.read(0)) == 1


async def test_near_full_alarm_and_overflow_is_never_silent(tmp_path: Path) -> None:
    async with Journal(tmp_path / "j.db", max_events=100, near_full=0.8) as j:
        for i in range(85):
            j.record(ACCESS_GRANTED, card=i)
        await j.flush()
        await j.flush()  # the alarm recorded during the first flush
        types = [e.type for e in await j.read(0, 1000)]
        assert types.count(JOURNAL_NEAR_FULL) == 1
        for i in range(40):
            j.record(ACCESS_GRANTED, card=1000 + i)
        await j.flush()
        await j.flush()
        evs = await j.read(0, 1000)
        assert len(evs) <= 101
        over = [e for e in evs if e.type == JOURNAL_OVERFLOW]
        assert over and over[0].detail["lost"] == over[0].detail["last_seq"] - over[0].detail["first_seq"] + 1  # type: ignore[operator]
        # What survived is the newest, in order.
        seqs = [e.seq for e in evs]
        assert seqs == sorted(seqs)


async def test_disk_refusing_writes_keeps_events_in_memory_and_recovers(tmp_path: Path) -> None:
    async with Journal(tmp_path / "j.db", interval_s=0.01) as j:
        assert j._db is not None
        async with j._db.execute("PRAGMA page_count") as c:
            row = await c.fetchone()
        assert row is not None
        await j._db.execute(f"PRAGMA max_page_count={int(row[0])}")
        for i in range(300):
            j.record(ACCESS_GRANTED, card=i, detail={"pad": "x" * 100})
        with pytest.raises(StoreError):
            await j.flush()
        assert not j.storage_ok and j.depth >= 300
        await j._db.execute("PRAGMA max_page_count=1073741823")
        await j.flush()
        await j.flush()
        evs = await j.read(0, 10_000)
        cards = [e.card for e in evs if e.type == ACCESS_GRANTED]
        assert cards == list(range(300))
        alarms = [e.detail["state"] for e in evs if e.type == STORAGE_ALARM]
        assert alarms == ["failing", "recovered"]
        assert j.storage_ok


# --- a damaged journal never stops the start (issue 12) ---------------------------------------------------


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    page = int.from_bytes(data[16:18], "big") or 65536
    if how == "header":
        data[0:16] = b"not a database!\0"
    elif how == "truncated":
        del data[len(data) // 2 :]
    elif how == "zeroed_page":
        pages = len(data) // page
        k = pages // 2  # a page in the middle of the events table
        data[k * page : (k + 1) * page] = bytes(page)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["header", "truncated", "zeroed_page"])
async def test_damaged_journal_is_moved_aside_and_a_new_one_started_with_an_alarm(tmp_path: Path, how: str) -> None:
    p = tmp_path / "journal.db"
    async with Journal(p) as j:
        for i in range(2000):
            j.record(ACCESS_GRANTED, card=i, detail={"pad": "x" * 50})
        await j.flush()
        last = j.next_seq - 1
    original = p.read_bytes()
    _damage(p, how)
    damaged = p.read_bytes()
    async with Journal(p) as j:  # before: sqlite3.DatabaseError, the agent did not start
        await j.flush()
        evs = await j.read(0)
        assert evs[0].type == JOURNAL_DAMAGED and len(evs) == 1
        detail = evs[0].detail
        kept = tmp_path / str(detail["moved_to"])
        assert kept.name.startswith("journal.db.damaged-") and kept.read_bytes() == damaged != original
        assert "DatabaseError" in str(detail["error"])
        assert evs[0].seq > last  # never a sequence number the cloud has seen
        j.record(ACCESS_GRANTED, card=1)
        await j.flush()
        assert [e.type for e in await j.read(0)] == [JOURNAL_DAMAGED, ACCESS_GRANTED]
    async with Journal(p) as j:  # the new journal is sound: no second alarm
        assert [e.type for e in await j.read(0)] == [JOURNAL_DAMAGED, ACCESS_GRANTED]


async def test_a_write_cancelled_at_any_point_is_on_disk_once_or_still_pending(tmp_path: Path) -> None:
    """Shutdown cancels the flusher wherever it is. Cancelled while SQLite's thread finishes the COMMIT, the
    batch used to stay pending although it was on disk: close() wrote it again, hit the seq's UNIQUE
    constraint, and the events recorded after it were lost with it. Each cancel point is tried: the loop is
    blocked for a moment before the cancel, so a statement in flight completes in its thread first."""
    import time

    for k in range(16):
        p = tmp_path / f"j{k}.db"
        async with Journal(p, interval_s=60) as j:
            for i in range(20):
                j.record(ACCESS_GRANTED, door="front", user=f"u{i}")
            w = asyncio.get_running_loop().create_task(j.flush())
            for _ in range(k):  # k steps: each lets SQLite's thread finish its statement, then the loop turn
                time.sleep(0.003)  # noqa: TID251 (the loop is stopped on purpose)
                await asyncio.sleep(0)
            time.sleep(0.02)  # noqa: TID251 (the loop stands still; SQLite's thread runs its statement)
            w.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await w
            j.record(ACCESS_GRANTED, door="front", user="after")
        async with Journal(p) as j:
            events = await j.read(limit=100)
        users = [e.user for e in events]
        assert users == [f"u{i}" for i in range(20)] + ["after"], (k, users)


async def test_the_flusher_stops_when_cancelled_just_as_it_is_woken(tmp_path: Path) -> None:
    # CPython gh-86296: on 3.11, `asyncio.wait_for` returns the inner result and drops a cancel that
    # arrives in the same loop step as the inner future completing; the flusher then ran on after close.
    async with Journal(tmp_path / "j.db", interval_s=60) as j:
        await asyncio.sleep(0.05)  # the flusher is waiting on its wake-up
        task = j._task
        assert task is not None
        j._wake.set()
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=2.0)
        assert done == {task} and task.cancelled()
