"""Property test: random change-set sequences through the real store agree with the plain reference.

Each change set is a random interleaving of puts and deletes of doors, schedules, groups, users and
credentials, including the same id put then deleted, and deleted then put, within one set. A set the
reference refuses (tests/reference.py `change_set_refusal`) must be refused with the same code and change
nothing; a set it accepts must give, for every probe, the reference's decision: in memory, after the
index's overlay is folded (compaction) and after the store is reopened from disk.
"""

from __future__ import annotations

import asyncio
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from hypothesis import event, given, settings
from hypothesis import strategies as st

from edge.decision import Decider
from edge.errors import ChangeRejected
from edge.model import (
    Assignment,
    Change,
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
    PutCredential,
    PutDoor,
    PutGroup,
    PutSchedule,
    PutUser,
    User,
)
from edge.store import Store

from .reference import SiteModel, change_set_refusal, reference_decision
from .test_decide_property import (
    CARDS,
    DOOR_IDS,
    EXPLORE,
    GROUP_IDS,
    PINS,
    SCHED_IDS,
    SLOW_OK,
    UNKNOWN_CARD,
    USER_IDS,
    ZONES,
    Runtime,
    assert_same,
    check_probes,
    instants,
    runtimes,
    schedules,
    windows,
)

SEQUENCE_SETTINGS = settings(
    max_examples=800 if EXPLORE else 80, deadline=None, derandomize=not EXPLORE, suppress_health_check=SLOW_OK
)
KINDS = [
    "put_door", "delete_door", "put_schedule", "delete_schedule", "put_group", "delete_group", "put_user",
    "delete_user", "put_credential", "delete_credential", "put_then_delete", "delete_then_put",
]  # fmt: skip


@st.composite
def door_of(draw: st.DrawFn, m: SiteModel, did: str) -> Door:
    opt = st.sampled_from([None, *m.schedules])
    return Door(
        id=did, strike_s=draw(st.sampled_from([3.0, 5.0])), mode=draw(st.sampled_from(list(DoorMode))),
        unlock_schedule=draw(opt), pin_schedule=draw(opt),
    )  # fmt: skip


@st.composite
def group_of(draw: st.DrawFn, m: SiteModel, gid: str) -> Group:
    doors = draw(st.lists(st.sampled_from(list(m.doors)), max_size=3, unique=True)) if m.doors else []
    return Group(id=gid, doors=doors, schedule=draw(st.sampled_from([None, *m.schedules])))


@st.composite
def user_of(draw: st.DrawFn, m: SiteModel, uid: str) -> User:
    vf, vu = draw(windows())
    assignments = []
    if m.groups:
        for g in draw(st.lists(st.sampled_from(list(m.groups)), max_size=2)):
            af, au = draw(windows())
            assignments.append(Assignment(group=g, valid_from=af, valid_until=au))
    return User(
        id=uid, active=draw(st.sampled_from([True, True, False])), offline_access=draw(st.booleans()),
        valid_from=vf, valid_until=vu, pin_hash=draw(st.sampled_from([None, *PINS.values()])),
        assignments=assignments,
    )  # fmt: skip


@st.composite
def put_of(draw: st.DrawFn, m: SiteModel, kind: str, key: str | int, zone: str) -> Change | None:
    """A put of `kind` (door, schedule, group, user, credential) for `key`, valid at this point."""
    if kind == "door":
        return PutDoor(door=draw(door_of(m, str(key))))
    if kind == "schedule":
        return PutSchedule(schedule=draw(schedules(str(key), zone)))
    if kind == "group":
        return PutGroup(group=draw(group_of(m, str(key))))
    if kind == "user":
        return PutUser(user=draw(user_of(m, str(key))))
    assert isinstance(key, int)
    held = m.credentials.get(key)
    if not m.users:
        return None
    user = held.user if held is not None else draw(st.sampled_from(list(m.users)))
    vf, vu = draw(windows())
    status = draw(st.sampled_from([CredentialStatus.ACTIVE] * 5 + list(CredentialStatus)))
    return PutCredential(credential=Credential(card=key, user=user, status=status, valid_from=vf, valid_until=vu))


def delete_of(kind: str, key: str | int) -> Change:
    if kind == "door":
        return DeleteDoor(id=str(key))
    if kind == "schedule":
        return DeleteSchedule(id=str(key))
    if kind == "group":
        return DeleteGroup(id=str(key))
    if kind == "user":
        return DeleteUser(id=str(key))
    assert isinstance(key, int)
    return DeleteCredential(card=key)


POOLS: dict[str, list[str] | list[int]] = {
    "door": DOOR_IDS, "schedule": SCHED_IDS, "group": GROUP_IDS, "user": USER_IDS[:8], "credential": CARDS[:12],
}  # fmt: skip


def existing(m: SiteModel, kind: str) -> list[str] | list[int]:
    have = {"door": m.doors, "schedule": m.schedules, "group": m.groups, "user": m.users}.get(kind)
    return sorted(have) if have is not None else sorted(m.credentials)


@st.composite
def change_sets(draw: st.DrawFn, model: SiteModel, frm: int, zone: str) -> ChangeSet:
    """Changes drawn against a working copy, each valid where it stands (the end state may not be)."""
    m = model.copy()
    changes: list[Change] = []
    for _ in range(draw(st.integers(1, 10))):
        op = draw(st.sampled_from(KINDS))
        kind = draw(st.sampled_from(list(POOLS))) if op in ("put_then_delete", "delete_then_put") else op.split("_")[1]
        step: list[Change] = []
        if op.startswith("put_"):
            put = draw(put_of(m, kind, draw(st.sampled_from(POOLS[kind])), zone))
            step = [put] if put is not None else []
            if op == "put_then_delete" and put is not None:
                step.append(delete_of(kind, getattr(getattr(put, kind), "card" if kind == "credential" else "id")))
        else:
            have = existing(m, kind)
            if not have:
                continue
            key = draw(st.sampled_from(have))
            step = [delete_of(kind, key)]
            if op == "delete_then_put":
                after = m.copy()
                after.apply(ChangeSet(from_version=0, to_version=1, changes=step))
                put = draw(put_of(after, kind, key, zone))
                step += [put] if put is not None else []
        for ch in step:
            m.apply(ChangeSet(from_version=0, to_version=1, changes=[ch]))
        changes += step
    return ChangeSet(from_version=frm, to_version=frm + 1, changes=changes)


def check_every_door(model: SiteModel, decider: Decider, now: datetime, cards: list[int], where: str) -> None:
    """Every door id of the pool (deleted ones too) against `cards`, at one instant."""
    for door in DOOR_IDS:
        for card in cards:
            got = decider.decide(door, card, now)
            assert_same(got, reference_decision(model, door, card, now), f"{where}{door} card {card} at {now}")


def cards_of(model: SiteModel, cs: ChangeSet) -> list[int]:
    """The cards `cs` touched (deleted ones too), two others and one never seen."""
    touched = {c.card for c in cs.changes if isinstance(c, DeleteCredential)}
    touched |= {c.credential.card for c in cs.changes if isinstance(c, PutCredential)}
    return sorted(touched | set(sorted(model.credentials)[:2]) | {UNKNOWN_CARD})


@dataclass
class Probes:
    model: SiteModel
    now: datetime
    cards: list[int]
    runtime: Runtime | None
    where: str

    def check(self, decider: Decider, state: str) -> None:
        model = self.model.copy()  # the model object moves on with later change sets
        check_every_door(model, decider, self.now, self.cards, f"{self.where}{state}: ")
        if self.runtime is not None:
            check_probes(model, decider, self.runtime, f"{self.where}{state}: ")


@SEQUENCE_SETTINGS
@given(st.data())
def test_random_change_sequences_agree_in_memory_after_compaction_and_reopen(data: st.DataObject) -> None:
    zone = data.draw(st.sampled_from(ZONES), label="zone")

    async def scenario(path: Path) -> None:
        model = SiteModel(ZoneInfo(zone))
        version = 0
        for n in range(data.draw(st.integers(2, 6), label="change sets")):
            cs = data.draw(change_sets(model, version, zone), label=f"change set {n}")
            refusal = change_set_refusal(model, cs)
            async with Store(path, zone) as store:
                assert store.version == version
                try:
                    await store.apply(cs)
                except ChangeRejected as e:
                    assert refusal == e.code, f"refused {e.code} ({e}), the reference says {refusal}"
                    event("refused")
                else:
                    assert refusal is None, f"applied, the reference refuses it: {refusal}"
                    model.apply(cs)
                    version += 1
                    event("applied")
                now = data.draw(instants, label=f"now {n}")
                rt = (
                    data.draw(runtimes(model, n=12), label=f"probes {n}") if model.credentials and model.doors else None
                )
                probes = Probes(model, now, cards_of(model, cs), rt, f"change set {n}, ")
                probes.check(Decider(store.index), "in memory")
                await store.compact()
                assert store.index.overlay_size == 0
                probes.check(Decider(store.index), "after compaction")
            async with Store(path, zone) as again:
                assert again.version == version
                probes.check(Decider(again.index), "after reopening")

    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(scenario(Path(tmp) / "rights.db"))
