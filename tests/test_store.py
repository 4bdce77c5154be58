"""The rights store: atomic change sets, rejects that apply nothing, reload from disk, failures."""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from edge.decision import Decider, Reason
from edge.errors import ChangeRejected, StoreError, VersionGap
from edge.model import (
    Assignment,
    ChangeSet,
    Credential,
    CredentialStatus,
    DeleteCredential,
    DeleteDoor,
    DeleteGroup,
    DeleteSchedule,
    DeleteUser,
    Door,
    DoorMode,
    Group,
    Interval,
    PutCredential,
    PutDoor,
    PutGroup,
    PutSchedule,
    PutUser,
    Schedule,
    User,
)
from edge.store import SCHEMA_VERSION, Store, dispose

from .conftest import MONDAY_10, basic_site


def cs(frm: int, *changes: object) -> ChangeSet:
    return ChangeSet(from_version=frm, to_version=frm + 1, changes=list(changes))  # type: ignore[arg-type]


async def snapshot_state(store: Store) -> tuple[int, dict[str, int], list[tuple[int, str]]]:
    d = Decider(store.index)
    probes = [(c, door) for c in (1001, 1002, 1003, 2001, 2002) for door in ("front", "lab")]
    return (
        store.version,
        await store.counts(),
        [(c, str(d.decide(door, c, MONDAY_10).reason)) for c, door in probes],
    )


async def test_apply_and_decide(store: Store) -> None:
    d = Decider(store.index)
    assert store.version == 1
    assert d.decide("front", 1001, MONDAY_10).granted
    assert d.decide("lab", 1001, MONDAY_10).reason is Reason.NO_GROUP_FOR_DOOR
    assert d.decide("lab", 1002, MONDAY_10).group == "lab"
    assert d.decide("lab", 1003, MONDAY_10).reason is Reason.USER_INACTIVE


async def test_reload_from_disk_gives_same_answers(store: Store, db_path: Path) -> None:
    before = await snapshot_state(store)
    await store.close()
    async with Store(db_path, "Europe/Berlin") as again:
        assert await snapshot_state(again) == before


async def test_duplicate_and_old_change_sets_are_acknowledged_not_reapplied(store: Store) -> None:
    before = await snapshot_state(store)
    r = await store.apply(basic_site())
    assert (r.version, r.applied) == (1, False)
    assert await snapshot_state(store) == before


async def test_version_gap_is_refused(store: Store) -> None:
    before = await snapshot_state(store)
    with pytest.raises(VersionGap) as ei:
        await store.apply(ChangeSet(from_version=5, to_version=6, changes=[]))
    assert ei.value.code == "version_gap" and ei.value.have == 1
    assert await snapshot_state(store) == before


BAD = {
    "duplicate_card": (
        [PutCredential(credential=Credential(card=1002, user="alice"))],
        "changes[1].credential.card: card 1002 already belongs to user 'bob'",
    ),
    "unknown_user": ([PutCredential(credential=Credential(card=5, user="nobody"))], "no user 'nobody'"),
    "unknown_group": ([PutUser(user=User(id="dan", assignments=[Assignment(group="ghosts")]))], "no group 'ghosts'"),
    "unknown_door": ([PutGroup(group=Group(id="g2", doors=["attic"]))], "no door 'attic'"),
    "unknown_schedule": ([PutGroup(group=Group(id="g2", doors=["front"], schedule="night"))], "no schedule 'night'"),
    "delete_missing": ([DeleteCredential(card=424242)], "no card 424242"),
    "delete_referenced_group": ([DeleteGroup(id="staff")], "still assigned to user 'alice'"),
    "delete_referenced_schedule": ([DeleteSchedule(id="office")], "no schedule 'office'"),
    "delete_referenced_door": ([DeleteDoor(id="lab")], "no door 'lab'"),
    "bad_pin_hash": ([PutUser(user=User(id="dan", pin_hash="1234"))], "pin_hash"),
    "bad_window": (
        [
            PutUser(
                user=User(
                    id="dan",
                    valid_from=datetime(2027, 1, 1).astimezone(),
                    valid_until=datetime(2026, 1, 1).astimezone(),
                )
            )
        ],
        "valid_from must be before valid_until",
    ),
    "naive_time": ([PutUser(user=User(id="dan", valid_from=datetime(2027, 1, 1)))], "no UTC offset"),
}


@pytest.mark.parametrize("name", sorted(BAD))
async def test_rejected_change_set_applies_nothing(store: Store, name: str) -> None:
    changes, message = BAD[name]
    before = await snapshot_state(store)
    # A good change ahead of the bad one must not survive either.
    good = PutCredential(credential=Credential(card=2001, user="alice"))
    with pytest.raises(ChangeRejected) as ei:
        await store.apply(cs(1, good, *changes))
    assert message in str(ei.value)
    assert await snapshot_state(store) == before


async def test_delete_user_frees_the_card(store: Store) -> None:
    await store.apply(cs(1, DeleteUser(id="alice"), PutCredential(credential=Credential(card=1001, user="bob"))))
    d = Decider(store.index)
    assert d.decide("lab", 1001, MONDAY_10).user == "bob"
    assert (await store.counts())["users"] == 2


async def test_card_moves_after_delete_in_a_later_change_set(store: Store) -> None:
    await store.apply(cs(1, DeleteCredential(card=1002)))
    await store.apply(cs(2, PutCredential(credential=Credential(card=1002, user="alice"))))
    assert Decider(store.index).decide("front", 1002, MONDAY_10).user == "alice"


async def test_status_change_and_door_mode(store: Store) -> None:
    await store.apply(
        cs(
            1,
            PutCredential(credential=Credential(card=1002, user="bob", status=CredentialStatus.LOST)),
            PutDoor(door=Door(id="lab", strike_s=2.0)),
        )
    )
    d = Decider(store.index)
    assert d.decide("lab", 1002, MONDAY_10).reason is Reason.CREDENTIAL_LOST


async def test_decisions_see_old_or_new_rights_never_a_mix(store: Store) -> None:
    """A concurrent decider polls while a 6,000-change set is staged slice by slice."""
    n = 3000
    changes: list[object] = [PutUser(user=User(id=f"u{i}", assignments=[Assignment(group="lab")])) for i in range(n)]
    changes += [PutCredential(credential=Credential(card=10_000 + i, user=f"u{i}")) for i in range(n)]
    # The first and the last change decide the probes: first the existing card 1002 is lost, last a new card.
    changes.insert(0, PutCredential(credential=Credential(card=1002, user="bob", status=CredentialStatus.LOST)))
    d = Decider(store.index)
    seen: set[tuple[bool, bool]] = set()
    done = asyncio.Event()

    async def poll() -> None:
        while not done.is_set():
            seen.add((d.decide("lab", 1002, MONDAY_10).granted, d.decide("lab", 10_000 + n - 1, MONDAY_10).granted))
            await asyncio.sleep(0)

    task = asyncio.create_task(poll())
    await store.apply(cs(1, *changes))
    done.set()
    await task
    seen.add((d.decide("lab", 1002, MONDAY_10).granted, d.decide("lab", 10_000 + n - 1, MONDAY_10).granted))
    assert seen <= {(True, False), (False, True)}, seen
    assert (False, True) in seen


async def test_full_disk_applies_nothing_and_recovers(store: Store) -> None:
    before = await snapshot_state(store)
    async with store.db.execute("PRAGMA page_count") as c:
        row = await c.fetchone()
    assert row is not None
    await store.db.execute(f"PRAGMA max_page_count={int(row[0]) + 2}")
    big = [PutUser(user=User(id=f"x{i}", name="x" * 200)) for i in range(500)]
    with pytest.raises(StoreError, match="full"):
        await store.apply(cs(1, *big))
    assert await snapshot_state(store) == before
    await store.db.execute("PRAGMA max_page_count=1073741823")
    r = await store.apply(cs(1, *big))
    assert r.version == 2 and (await store.counts())["users"] == 503


async def test_newer_schema_is_never_read_but_does_not_stop_the_start(db_path: Path) -> None:
    async with Store(db_path) as s:
        assert s.version == 0
    db_path.with_name("rights.db.verified").unlink()
    con = sqlite3.connect(db_path)
    con.execute("PRAGMA user_version=99")
    con.close()
    async with Store(db_path) as s:
        assert s.damage is not None and "newer than this software" in s.damage["error"]
        assert s.damage["fallback"] == "empty" and s.needs_snapshot == "damaged"
    kept = list(db_path.parent.glob("rights.db.damaged-*"))
    assert len(kept) == 1 and sqlite3.connect(kept[0]).execute("PRAGMA user_version").fetchone()[0] == 99


async def test_compaction_keeps_every_answer(store: Store) -> None:
    await store.apply(cs(1, *[PutCredential(credential=Credential(card=5000 + i, user="bob")) for i in range(50)]))
    await store.apply(cs(2, DeleteCredential(card=5003), DeleteUser(id="alice")))
    probes = [1001, 1002, 1003, 5000, 5003, 5049, 7]
    d = Decider(store.index)
    before = [d.decide("lab", c, MONDAY_10 + timedelta(hours=1)) for c in probes]
    old = store.index
    await store.compact()
    assert store.index.overlay_size == 0
    assert old.overlay_size == 0  # the replaced index's overlay was taken out and freed step by step
    d.index = store.index
    after = [d.decide("lab", c, MONDAY_10 + timedelta(hours=1)) for c in probes]
    assert before == after
    assert len(store.index) == 51


async def test_facility_code_survives_reload(store: Store, db_path: Path) -> None:
    await store.apply(cs(1, PutCredential(credential=Credential(card=3001, user="bob", facility=77))))
    await store.close()
    async with Store(db_path, "Europe/Berlin") as again:
        d = Decider(again.index)
        assert d.decide("lab", 3001, MONDAY_10, facility=77).granted
        assert d.decide("lab", 3001, MONDAY_10, facility=78).reason is Reason.WRONG_FACILITY


async def test_schema_1_store_is_migrated_in_place(db_path: Path) -> None:
    from edge.store import _MIGRATIONS

    con = sqlite3.connect(db_path)
    for stmt in _MIGRATIONS[1]:
        con.execute(stmt)
    con.execute("INSERT INTO users VALUES (1, 'alice', '', 1, 0, 4294967295, NULL)")
    con.execute("INSERT INTO credentials VALUES (555, 1, 'h10301', 0, 0, 4294967295)")
    con.execute("PRAGMA user_version=1")
    con.commit()
    con.close()
    async with Store(db_path) as s:
        assert s.index.cred(555) == (1, 0, 0, 4294967295)
    con = sqlite3.connect(db_path)
    assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    con.close()


async def test_large_change_set_finds_existing_users_in_every_slice(store: Store, db_path: Path) -> None:
    """Users are looked up 500 changes at a time: references far into a set, and deletes, still resolve."""
    n = 1200
    await store.apply(
        cs(
            1,
            *[PutUser(user=User(id=f"u{i}", assignments=[Assignment(group="lab")])) for i in range(n)],
            *[PutCredential(credential=Credential(card=20_000 + i, user=f"u{i}")) for i in range(n)],
        )
    )
    users_before = (await store.counts())["users"]
    later: list[object] = [
        PutCredential(credential=Credential(card=30_000 + i, user=f"u{i}")) for i in reversed(range(n))
    ]
    later += [DeleteCredential(card=20_007), DeleteUser(id="u3")]
    await store.apply(cs(2, *later))
    assert (await store.counts())["users"] == users_before - 1  # nobody was created twice
    d = Decider(store.index)
    assert d.decide("lab", 30_000 + n - 1, MONDAY_10).granted and d.decide("lab", 30_000, MONDAY_10).granted
    for gone in (20_003, 30_003, 20_007):
        assert d.decide("lab", gone, MONDAY_10).reason is Reason.UNKNOWN_CARD
    for i in (0, 499, 500, 1199):  # the new cards point at the users that exist (same internal uid)
        old_row, new_row = store.index.cred(20_000 + i), store.index.cred(30_000 + i)
        assert old_row is not None and new_row is not None and old_row[0] == new_row[0]
    before = {c: d.decide("lab", c, MONDAY_10) for c in (20_000, 20_003, 30_003, 30_500, 30_000 + n - 1)}
    await store.close()
    async with Store(db_path, "Europe/Berlin") as again:
        d2 = Decider(again.index)
        assert {c: d2.decide("lab", c, MONDAY_10) for c in before} == before


async def test_dispose_frees_between_loop_turns() -> None:
    big = {i: (i, str(i)) for i in range(10_000)}
    lst = [(i, str(i)) for i in range(5_000)]
    st = set(range(3_000))
    turns = 0

    async def ticker() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    start = turns
    await dispose(big, lst, st)
    task.cancel()
    assert not big and not lst and not st
    assert turns - start >= 9 + 4 + 2  # steps of 1,000 entries (10, 5 and 3): other tasks ran between any two


# --- a door, group or schedule put and deleted in one change set (issue 12) ---------------------------


async def test_door_put_and_deleted_in_one_set_stays_deleted_after_restart(store: Store, db_path: Path) -> None:
    await store.apply(cs(1, PutDoor(door=Door(id="d1", mode=DoorMode.UNLOCKED)), DeleteDoor(id="d1")))
    assert Decider(store.index).decide("d1", 1001, MONDAY_10).reason is Reason.UNKNOWN_DOOR
    assert Decider(store.index).decide("d1", 999_999, MONDAY_10).reason is Reason.UNKNOWN_DOOR
    await store.close()
    async with Store(db_path, "Europe/Berlin") as again:
        d = Decider(again.index)
        assert d.decide("d1", 999_999, MONDAY_10).reason is Reason.UNKNOWN_DOOR  # was free_passage
        assert d.decide("d1", 1001, MONDAY_10).reason is Reason.UNKNOWN_DOOR
        assert (await again.counts())["doors"] == 2


async def test_group_and_schedule_put_and_deleted_then_later_sets_still_apply(store: Store, db_path: Path) -> None:
    night = Schedule(id="night", intervals=[Interval(day=0, start="20:00", end="24:00")])
    await store.apply(
        cs(
            1,
            PutDoor(door=Door(id="tmp")),
            PutSchedule(schedule=night),
            PutGroup(group=Group(id="ghost", doors=["tmp"], schedule="night")),
            DeleteGroup(id="ghost"),
            DeleteDoor(id="tmp"),
            DeleteSchedule(id="night"),
        )
    )
    await store.close()
    async with Store(db_path, "Europe/Berlin") as again:
        assert (await again.counts())["groups"] == 2 and (await again.counts())["schedules"] == 1
        # Touching doors, groups and schedules: refused unknown_reference before the fix.
        r = await again.apply(
            cs(2, PutDoor(door=Door(id="side")), PutGroup(group=Group(id="g2", doors=["side"], schedule="office")))
        )
        assert r.applied
        r = await again.apply(cs(3, PutSchedule(schedule=night), DeleteGroup(id="g2")))
        assert r.applied and again.version == 4


def test_every_change_kind_has_exactly_one_planner_handler() -> None:
    """The planner picks a handler by the change's type: every member of the closed `Change` union has one
    (a kind added to the model without one would be refused as malformed), and nothing else does."""
    import typing

    from edge.model import Change
    from edge.store import HANDLERS

    assert set(HANDLERS) == set(typing.get_args(Change))


async def test_bulk_writes_span_chunks_and_keep_every_text(store: Store, db_path: Path) -> None:
    """Change sets reach SQLite as JSON chunks of `BULK_ROWS` rows (`edge._sqlite.bulk_insert`): every row of a
    set spanning several chunks lands, deletes included; a text SQLite's JSON would cut (U+0000) is kept (its
    chunk goes row by row)."""
    from edge._sqlite import BULK_ROWS

    n = BULK_ROWS * 3 + 7
    odd = "x\x00y"
    await store.apply(
        cs(
            1,
            PutUser(user=User(id="nul", name=f"A{odd}B", assignments=[Assignment(group="lab")])),
            *[
                PutUser(user=User(id=f"b{i}", name=f"Bulk {i}", assignments=[Assignment(group="lab")]))
                for i in range(n)
            ],
            *[PutCredential(credential=Credential(card=40_000 + i, user=f"b{i}")) for i in range(n)],
            PutCredential(credential=Credential(card=39_999, user="nul", format=odd)),
        )
    )
    await store.apply(cs(2, *[DeleteCredential(card=40_000 + i) for i in range(0, n, 2)], DeleteUser(id="b1")))
    await store.close()
    async with Store(db_path, "Europe/Berlin") as again:  # verify_at_open: the checksum over every row holds
        assert again.damage is None
        rows = dict(await again._rows("SELECT ext_id, name FROM users WHERE ext_id IN ('nul', 'b0', 'b1')"))
        assert rows == {"nul": f"A{odd}B", "b0": "Bulk 0"}
        fmt = await again._rows("SELECT format FROM credentials WHERE card = 39999")
        assert fmt == [(odd,)]
        cards = {c for (c,) in await again._rows("SELECT card FROM credentials WHERE card >= 40000")}
        assert cards == {40_000 + i for i in range(n) if i % 2 and i != 1}
        d = Decider(again.index)
        assert d.decide("lab", 40_000 + n - 2, MONDAY_10).granted
        assert d.decide("lab", 40_000 + n - 1, MONDAY_10).reason is Reason.UNKNOWN_CARD
