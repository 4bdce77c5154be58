"""The access rules in the real store (SQLite on disk): the model objects through change sets and snapshots,
their refusals, the schema migration, and the access state across a restart."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from edge.access_state import AccessState, on_decision, update
from edge.decision import Decider, Reason
from edge.errors import ChangeRejected
from edge.model import (
    AntiPassback,
    Area,
    Assignment,
    ChangeSet,
    Credential,
    DeleteGroup,
    Door,
    DoorMode,
    DuressMode,
    Group,
    Interlock,
    PutArea,
    PutCredential,
    PutDoor,
    PutGroup,
    PutInterlock,
    PutSiteRules,
    PutUser,
    SiteRules,
    Snapshot,
    User,
)
from edge.pin import hash_pin
from edge.store import SCHEMA_VERSION, Store

NOW = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
PIN_HASH = hash_pin("1234", iterations=1000)


def cs(frm: int, *changes: Any) -> ChangeSet:
    return ChangeSet(from_version=frm, to_version=frm + 1, changes=list(changes))


def rule_changes() -> list[Any]:
    return [
        PutArea(area=Area(id="building", anti_passback=AntiPassback.HARD, max_occupancy=5, exempt_groups=["sec"])),
        PutDoor(door=Door(id="main", to_area="building")),
        PutDoor(door=Door(id="ma")),
        PutDoor(door=Door(id="mb")),
        PutDoor(door=Door(id="safe", mode=DoorMode.CARD_AND_PIN, two_person_s=10.0)),
        PutGroup(group=Group(id="staff", doors=["main", "ma", "mb", "safe"])),
        PutGroup(group=Group(id="sec", doors=["main"])),
        PutInterlock(interlock=Interlock(id="trap", doors=["ma", "mb"])),
        PutSiteRules(rules=SiteRules(duress=DuressMode.PIN_PLUS_ONE)),
        PutUser(user=User(id="alice", pin_hash=PIN_HASH, assignments=[Assignment(group="staff")])),
        PutUser(user=User(id="bob", assignments=[Assignment(group="staff")])),
        PutCredential(credential=Credential(card=1, user="alice")),
        PutCredential(credential=Credential(card=2, user="bob", max_uses=3, facility=7)),
    ]


async def test_rules_are_stored_and_reloaded(tmp_path: Path) -> None:
    path = tmp_path / "rights.db"
    async with Store(path) as store:
        await store.apply(cs(0, *rule_changes()))
        tables = store.index.tables
        assert store.index.cred(2) is not None
    async with Store(path) as again:
        assert again.damage is None and await again.check_integrity() is None
        t = again.index.tables
        assert (t.areas, t.interlocks, t.site_rules, t.doors) == (tables.areas, tables.interlocks, tables.site_rules,
                                                                  tables.doors)  # fmt: skip
        assert t.door_rules == tables.door_rules and set(t.door_rules) == {"main", "ma", "mb", "safe"}
        d = Decider(again.index)
        state = AccessState(used={2: 3})
        assert d.decide("ma", 2, NOW, facility=7, state=state).reason is Reason.USES_EXHAUSTED
        assert d.decide("ma", 2, NOW, facility=7).count_use
        assert d.decide("safe", 1, NOW, pin="1235").duress
        assert d.decide("safe", 1, NOW, pin="1234").reason is Reason.AWAITING_SECOND_PERSON


def rules_snapshot(ch: list[Any], version: int = 5) -> Snapshot:
    """The site that `rule_changes()` builds, as one snapshot."""
    return Snapshot(
        version=version,
        doors=[c.door for c in ch if isinstance(c, PutDoor)],
        groups=[c.group for c in ch if isinstance(c, PutGroup)],
        users=[c.user for c in ch if isinstance(c, PutUser)],
        credentials=[c.credential for c in ch if isinstance(c, PutCredential)],
        areas=[c.area for c in ch if isinstance(c, PutArea)],
        interlocks=[c.interlock for c in ch if isinstance(c, PutInterlock)],
        site_rules=[c.rules for c in ch if isinstance(c, PutSiteRules)],
    )


async def test_snapshot_carries_the_rules(tmp_path: Path) -> None:
    ch = rule_changes()
    snap = rules_snapshot(ch)
    path = tmp_path / "rights.db"
    async with Store(path) as store:
        await store.apply(cs(0, *ch))
        before = store.index.tables
        await store.replace(snap)
        assert store.index.tables.door_rules == before.door_rules
        assert store.index.tables.site_rules.duress is DuressMode.PIN_PLUS_ONE
    async with Store(path) as again:
        assert again.damage is None and again.index.tables.door_rules == before.door_rules


@pytest.mark.parametrize(
    ("change", "code", "path"),
    [
        (PutDoor(door=Door(id="x", to_area="nowhere")), "unknown_reference", "doors[x].to_area"),
        (PutDoor(door=Door(id="x", escort_group="nobody", visitor_groups=["staff"])), "unknown_reference",
         "doors[x].escort_group"),
        (PutDoor(door=Door(id="x", escort_group="staff", visitor_groups=["ghosts"])), "unknown_reference",
         "doors[x].visitor_groups[0]"),
        (PutArea(area=Area(id="y", exempt_groups=["ghosts"])), "unknown_reference", "areas[y].exempt_groups[0]"),
        (PutInterlock(interlock=Interlock(id="t2", doors=["ma", "safe"])), "bad_field", "interlocks[t2].doors[0]"),
        (PutInterlock(interlock=Interlock(id="t3", doors=["ma", "nowhere"])), "bad_field", "interlocks[t3].doors[0]"),
        (PutInterlock(interlock=Interlock(id="t4", doors=["main", "nowhere"])), "unknown_reference",
         "interlocks[t4].doors[1]"),
        (PutInterlock(interlock=Interlock(id="t5", doors=["main"])), "bad_field", "changes[0].interlock.doors"),
        (PutSiteRules(rules=SiteRules(duress=DuressMode.CODE)), "bad_field", "changes[0].rules.duress_code_hash"),
        (DeleteGroup(id="sec"), "unknown_reference", "areas[building].exempt_groups[0]"),
        (PutCredential(credential=Credential(card=9, user="bob", max_uses=64)), "bad_field",
         "changes[0].credential.max_uses"),
    ],
)  # fmt: skip
async def test_rule_refusals_name_the_field_and_change_nothing(
    tmp_path: Path, change: Any, code: str, path: str
) -> None:
    async with Store(tmp_path / "rights.db") as store:
        await store.apply(cs(0, *rule_changes()))
        before = store.index.tables
        with pytest.raises(ChangeRejected) as e:
            await store.apply(cs(1, change))
        assert (e.value.code, e.value.path) == (code, path), str(e.value)
        assert store.version == 1 and store.index.tables is before
        assert await store.check_integrity() is None


async def test_access_state_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "rights.db"
    async with Store(path) as store:
        await store.apply(cs(0, *rule_changes()))
        state = await store.load_access_state()
        assert state == AccessState()
        d = Decider(store.index)
        for card, kw in ((1, {}), (2, {"facility": 7})):
            dec = d.decide("main", card, NOW, state=state, **kw)
            assert dec.granted
            on_decision(state, dec, NOW.timestamp())
            await store.save_access_state(state, update(state, dec, True, NOW.timestamp()))
        assert state.occupancy == {"building": 2} and state.used == {2: 1}
    async with Store(path) as again:
        restored = await again.load_access_state()
        assert (restored.where, restored.occupancy, restored.used) == (state.where, state.occupancy, state.used)
        assert Decider(again.index).decide("main", 1, NOW, state=restored).reason is Reason.ANTI_PASSBACK
        # the access state is not rights: the checksum and the integrity check do not see it
        assert again.damage is None and await again.check_integrity() is None


async def test_a_schema_3_file_migrates_with_its_checksum_intact(tmp_path: Path) -> None:
    path = tmp_path / "rights.db"
    async with Store(path) as store:
        await store.apply(cs(
            0, PutDoor(door=Door(id="front", strike_s=4.0)), PutGroup(group=Group(id="g", doors=["front"])),
            PutUser(user=User(id="u", assignments=[Assignment(group="g")])),
            PutCredential(credential=Credential(card=5, user="u", facility=3)),
        ))  # fmt: skip
    con = sqlite3.connect(path)  # back to what schema 3 wrote: no rule tables, no use limits
    for t in ("areas", "interlocks", "site_rules", "access_where", "access_uses"):
        con.execute(f"DROP TABLE {t}")
    con.execute("ALTER TABLE credentials DROP COLUMN max_uses")
    con.execute("PRAGMA user_version=3")
    con.commit()
    con.close()
    async with Store(path) as again:
        assert again.damage is None and await again.check_integrity() is None
        assert Decider(again.index).decide("front", 5, NOW, facility=3).granted
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 5
    con.close()


async def test_site_rules_back_to_the_defaults_keep_the_checksum(tmp_path: Path) -> None:
    """Regression (found by the property test): default settings are stored as no row, as before any."""
    path = tmp_path / "rights.db"
    async with Store(path) as store:
        await store.apply(cs(0, PutSiteRules(rules=SiteRules(duress=DuressMode.PIN_PLUS_ONE))))
        await store.apply(cs(1, PutSiteRules(rules=SiteRules())))
    async with Store(path) as again:
        assert again.damage is None and again.index.tables.site_rules == SiteRules()


async def test_a_chunked_snapshot_over_the_link_carries_the_rules(tmp_path: Path) -> None:
    """Areas, interlocks and the site rules travel in snapshot chunks like every other part (a real broker,
    chunks small enough that the rules land in chunks of their own)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from .broker import cloud_peer, gateway, unique
    from .mosquitto import Mosquitto

    ch = rule_changes()
    snap = rules_snapshot(ch)
    key = Ed25519PrivateKey.generate()
    m = Mosquitto(tmp_path / "broker")
    m.start()
    try:
        site = unique("s")
        async with (
            gateway(m, tmp_path / "gw", key, site=site, gw="gw1", max_message_bytes=4096) as g,
            cloud_peer(m, key, site=site, gw="gw1", max_message_bytes=4096) as cloud,
        ):
            await cloud.wait_online()
            r = await cloud.send_snapshot(snap)
            assert r.ok and r.applied, r
            t = g.store.index.tables
            assert t.site_rules.duress is DuressMode.PIN_PLUS_ONE
            assert t.door_rules and any("ma" in str(v) for v in t.door_rules.values())
    finally:
        m.stop()
