"""The access rules on the simulated gateway: the real Agent on the `sim` profile, taps as Wiegand bit trains
on mock pins through its control socket, door openings as contact edges, across a restart (the access state
is saved after the door opened and read back at start). What is checked is what the hardware and the journal
show: the relay MockPin's recorded states and the events on disk."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from edge.agent import Agent
from edge.config import Config, parse_config
from edge.control import DoorRequest, RexRequest, StatusRequest, TapRequest
from edge.decision import Reason
from edge.model import (
    KEYPAD_CODE_FORMAT,
    AntiPassback,
    Area,
    ChangeSet,
    Credential,
    Door,
    DoorMode,
    DuressMode,
    Interlock,
    PutArea,
    PutCredential,
    PutDoor,
    PutInterlock,
    PutSiteRules,
    PutUser,
    SiteRules,
    User,
    code_card,
)
from edge.model import Assignment as Assign
from edge.pin import hash_pin
from edge.readers.base import PinEntry

from .test_agent_sim import ask, config_text, journal_on_disk, relay_changes, running


@pytest.fixture
def rcfg(tmp_path: Path) -> Iterator[Config]:
    with tempfile.TemporaryDirectory(prefix="edge-rules-") as d:  # Unix socket paths are short
        yield parse_config(config_text(tmp_path / "state", Path(d) / "control.sock"))


async def provision(agent: Agent, *changes: Any) -> None:
    assert agent.store is not None
    v = agent.store.version
    await agent.store.apply(ChangeSet(from_version=v, to_version=v + 1, changes=list(changes)))


async def reasons_of(cfg: Config, req: Any) -> list[str]:
    return [d["reason"] for d in (await ask(cfg, req))["decisions"]]


async def wait_relocked(agent: Agent, door: str, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if not agent.doors[door].relay_energised:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{door} did not relock")


async def test_anti_passback_follows_the_door_contact_and_survives_a_restart(rcfg: Config) -> None:
    async with running(rcfg) as agent:
        await provision(
            agent,
            PutArea(area=Area(id="building", anti_passback=AntiPassback.HARD)),
            PutDoor(door=Door(id="door1", strike_s=0.5, to_area="building")),
        )
        before = relay_changes(agent, "door1")
        assert await reasons_of(rcfg, TapRequest(door="door1", card=1001)) == ["granted"]
        await wait_relocked(agent, "door1")  # the door never opened: alice is still outside
        assert await reasons_of(rcfg, TapRequest(door="door1", card=1001)) == ["granted"]
        await ask(rcfg, DoorRequest(door="door1", action="open"))  # she walks through
        await ask(rcfg, DoorRequest(door="door1", action="close"))
        await wait_relocked(agent, "door1")
        assert relay_changes(agent, "door1")[len(before) :] == [True, False, True, False]
        assert (await ask(rcfg, StatusRequest()))["occupancy"] == {"building": 1}
        mark = relay_changes(agent, "door1")
        assert await reasons_of(rcfg, TapRequest(door="door1", card=1001)) == ["anti_passback"]
        assert relay_changes(agent, "door1") == mark  # denied: the relay never moved
    async with running(rcfg) as agent:  # a new agent on the same state directory
        assert agent.tap is not None and agent.tap.access.occupancy == {"building": 1}
        mark = relay_changes(agent, "door1")
        assert await reasons_of(rcfg, TapRequest(door="door1", card=1001)) == ["anti_passback"]
        assert relay_changes(agent, "door1") == mark
        assert await reasons_of(rcfg, TapRequest(door="door1", card=1002)) == ["granted"]  # bob was never in
    reasons = [e.reason for e in journal_on_disk(rcfg) if e.card == 1001 and e.type.startswith("access.")]
    assert reasons == ["granted", "granted", "anti_passback", "anti_passback"]


async def test_two_person_rule_opens_on_the_second_card(rcfg: Config) -> None:
    async with running(rcfg) as agent:
        await provision(agent, PutDoor(door=Door(id="door1", strike_s=1.0, two_person_s=10.0)))
        before = relay_changes(agent, "door1")
        assert await reasons_of(rcfg, TapRequest(door="door1", card=1001)) == ["awaiting_second_person"]
        assert await reasons_of(rcfg, TapRequest(door="door1", card=1001)) == ["awaiting_second_person"]
        assert relay_changes(agent, "door1") == before
        assert await reasons_of(rcfg, TapRequest(door="door1", card=1002)) == ["granted"]
        assert relay_changes(agent, "door1")[len(before) :] == [True]


async def test_a_one_time_code_is_used_up_by_its_opening_and_stays_used_after_a_restart(rcfg: Config) -> None:
    async with running(rcfg) as agent:
        await provision(agent, PutDoor(door=Door(id="door1", strike_s=0.5)),
                        PutCredential(credential=Credential(card=4711, user="bob", max_uses=1)))  # fmt: skip
        assert await reasons_of(rcfg, TapRequest(door="door1", card=4711)) == ["granted"]
        await wait_relocked(agent, "door1")  # not opened: not used
        assert await reasons_of(rcfg, TapRequest(door="door1", card=4711)) == ["granted"]
        await ask(rcfg, DoorRequest(door="door1", action="open"))
        await ask(rcfg, DoorRequest(door="door1", action="close"))
        assert await reasons_of(rcfg, TapRequest(door="door1", card=4711)) == ["uses_exhausted"]
    async with running(rcfg) as agent:
        mark = relay_changes(agent, "door1")
        assert await reasons_of(rcfg, TapRequest(door="door1", card=4711)) == ["uses_exhausted"]
        assert relay_changes(agent, "door1") == mark


async def test_duress_pin_opens_and_journals_a_silent_alarm(rcfg: Config) -> None:
    async with running(rcfg) as agent:
        await provision(
            agent,
            PutSiteRules(rules=SiteRules(duress=DuressMode.PIN_PLUS_ONE)),
            PutDoor(door=Door(id="door1", strike_s=1.0, mode=DoorMode.CARD_AND_PIN)),
            PutUser(user=User(id="alice", pin_hash=hash_pin("2580", iterations=1000),
                              assignments=[Assign(group="staff")])),
        )  # fmt: skip
        before = relay_changes(agent, "door1")
        out = await ask(rcfg, TapRequest(door="door1", card=1001, pin="2581"))
        assert [(d["granted"], d["reason"]) for d in out["decisions"]] == [(False, "pin_required"), (True, "granted")]
        assert relay_changes(agent, "door1")[len(before) :] == [True]
    events = [(e.type, e.reason) for e in journal_on_disk(rcfg) if e.card == 1001]
    assert events[-2:] == [("access.granted", "granted"), ("alarm.duress", "granted")]
    assert b"2581" not in (rcfg.state_dir / "journal.db").read_bytes()


async def test_interlock_keeps_the_second_door_locked_until_the_first_closes(rcfg: Config) -> None:
    async with running(rcfg) as agent:
        await provision(
            agent, PutDoor(door=Door(id="door1", strike_s=5.0)), PutDoor(door=Door(id="door2", strike_s=5.0)),
            PutInterlock(interlock=Interlock(id="trap", doors=["door1", "door2"])),
        )  # fmt: skip
        door2 = relay_changes(agent, "door2")
        assert await reasons_of(rcfg, TapRequest(door="door1", card=1002)) == ["granted"]
        assert await reasons_of(rcfg, TapRequest(door="door2", card=1002)) == ["interlock"]  # door1 released
        await ask(rcfg, DoorRequest(door="door1", action="open"))
        assert await reasons_of(rcfg, TapRequest(door="door2", card=1002)) == ["interlock"]  # door1 open
        assert relay_changes(agent, "door2") == door2  # (fail-safe: energised = locked) never moved
        await ask(rcfg, DoorRequest(door="door1", action="close"))
        assert await reasons_of(rcfg, TapRequest(door="door2", card=1002)) == ["granted"]
        assert relay_changes(agent, "door2")[len(door2) :] == [False]  # released
        assert await reasons_of(rcfg, TapRequest(door="door1", card=1002)) == ["interlock"]


async def test_a_keypad_only_delivery_code_opens_once(rcfg: Config) -> None:
    async with running(rcfg) as agent:
        await provision(agent, PutDoor(door=Door(id="door1", strike_s=0.5)), PutCredential(credential=Credential(
            card=code_card("0424"), user="bob", format=KEYPAD_CODE_FORMAT, max_uses=1)))  # fmt: skip
        assert agent.tap is not None
        reader = next(r for r, d in agent.reader_door.items() if d == "door1")
        before = relay_changes(agent, "door1")
        agent.tap.on_reader_event(PinEntry(reader=reader, pin="0424"))  # the keypad's Enter, no card
        assert agent.tap.decisions[-1].reason is Reason.GRANTED
        assert relay_changes(agent, "door1")[len(before) :] == [True]
        await ask(rcfg, DoorRequest(door="door1", action="open"))
        await ask(rcfg, DoorRequest(door="door1", action="close"))
        agent.tap.on_reader_event(PinEntry(reader=reader, pin="0424"))
        assert agent.tap.decisions[-1].reason is Reason.USES_EXHAUSTED
        n = len(agent.tap.decisions)
        agent.tap.on_reader_event(PinEntry(reader=reader, pin="424"))  # another code: nobody's
        assert len(agent.tap.decisions) == n


async def test_a_grant_taken_back_frees_the_interlock_at_once(rcfg: Config) -> None:
    async with running(rcfg) as agent:
        await provision(
            agent, PutDoor(door=Door(id="door1", strike_s=30.0)), PutDoor(door=Door(id="door2", strike_s=5.0)),
            PutInterlock(interlock=Interlock(id="trap", doors=["door1", "door2"])),
        )  # fmt: skip
        assert await reasons_of(rcfg, TapRequest(door="door1", card=1002)) == ["granted"]
        assert await reasons_of(rcfg, TapRequest(door="door2", card=1002)) == ["interlock"]
        agent.doors["door1"].relock()  # the strike ends long before its 30 s
        assert await reasons_of(rcfg, TapRequest(door="door2", card=1002)) == ["granted"]


async def test_the_nightly_reset_forgets_who_is_inside(tmp_path: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="edge-rules-") as d:  # the system clock, trusted: resets run
        text = config_text(tmp_path / "state", Path(d) / "control.sock") + '[policy]\nclock_source = "system"\n'
        await nightly_reset(parse_config(text))


async def nightly_reset(rcfg: Config) -> None:
    async with running(rcfg) as agent:
        await provision(
            agent,
            PutArea(area=Area(id="building", anti_passback=AntiPassback.HARD, reset_daily="03:00")),
            PutDoor(door=Door(id="door1", strike_s=0.5, to_area="building")),
        )
        assert agent.tap is not None
        assert await reasons_of(rcfg, TapRequest(door="door1", card=1001)) == ["granted"]
        await ask(rcfg, DoorRequest(door="door1", action="open"))
        await ask(rcfg, DoorRequest(door="door1", action="close"))
        assert await reasons_of(rcfg, TapRequest(door="door1", card=1001)) == ["anti_passback"]
        night = datetime(2026, 11, 24, 1, 59, 59, tzinfo=UTC)  # 02:59:59 in Berlin
        agent.tap.scheduled_resets(night)
        assert agent.tap.scheduled_resets(night + timedelta(seconds=1)) == ["building"]
        assert agent.tap.access.occupancy == {}
        assert await reasons_of(rcfg, TapRequest(door="door1", card=1001)) == ["granted"]
    async with running(rcfg) as agent:  # the reset was saved
        assert agent.tap is not None and agent.tap.access.where == {}
    assert any(e.detail.get("event") == "anti_passback_reset" for e in journal_on_disk(rcfg) if e.detail)


def two_reader_config(tmp_path: Path, sock: Path) -> Config:
    """door1's reader reads its "in" side, door2's its "out" side (a door with an out reader)."""
    text = config_text(tmp_path / "state", sock)
    text += '[[readers]]\ndriver = "wiegand"\ndoor = "door1"\n'
    text += '[[readers]]\ndriver = "wiegand"\ndoor = "door2"\nside = "out"\n'
    return parse_config(text)


async def test_an_out_reader_leads_back_out_of_the_area(tmp_path: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="edge-rules-") as d:
        cfg = two_reader_config(tmp_path, Path(d) / "control.sock")
        async with running(cfg) as agent:
            assert agent.reader_side == {"door1.wiegand0": "in", "door2.wiegand1": "out"}
            await provision(
                agent,
                PutArea(area=Area(id="building", anti_passback=AntiPassback.HARD)),
                PutDoor(door=Door(id="door1", strike_s=0.5, to_area="building")),
                PutDoor(door=Door(id="door2", strike_s=0.5, to_area="building")),  # read from inside only
            )
            assert await reasons_of(cfg, TapRequest(door="door1", card=1002)) == ["granted"]
            await ask(cfg, DoorRequest(door="door1", action="open"))
            await ask(cfg, DoorRequest(door="door1", action="close"))
            assert (await ask(cfg, StatusRequest()))["occupancy"] == {"building": 1}
            before = relay_changes(agent, "door2")
            assert await reasons_of(cfg, TapRequest(door="door2", card=1002)) == ["granted"]  # out
            assert relay_changes(agent, "door2")[len(before) :] == [False]  # (fail-safe: released)
            await ask(cfg, DoorRequest(door="door2", action="open"))
            await ask(cfg, DoorRequest(door="door2", action="close"))
            assert (await ask(cfg, StatusRequest()))["occupancy"] == {}
            assert await reasons_of(cfg, TapRequest(door="door2", card=1002)) == ["anti_passback"]  # out twice
        async with running(cfg) as agent:
            assert await reasons_of(cfg, TapRequest(door="door2", card=1002)) == ["anti_passback"]
            assert await reasons_of(cfg, TapRequest(door="door1", card=1002)) == ["granted"]
        passages = [(e.door, e.detail) for e in journal_on_disk(cfg) if e.type == "area.passage"]
        assert [(door, det["from"], det["to"], det["occupancy"]) for door, det in passages] == [
            ("door1", None, "building", 1), ("door2", "building", None, 0)]  # fmt: skip


async def test_rex_honours_an_interlock_unless_it_lets_rex_override(rcfg: Config) -> None:
    async with running(rcfg) as agent:
        await provision(
            agent, PutDoor(door=Door(id="door1", strike_s=5.0)), PutDoor(door=Door(id="door2", strike_s=5.0)),
            PutInterlock(interlock=Interlock(id="trap", doors=["door1", "door2"], rex_overrides=False)),
        )  # fmt: skip
        door2 = relay_changes(agent, "door2")
        assert await reasons_of(rcfg, TapRequest(door="door1", card=1002)) == ["granted"]
        await ask(rcfg, RexRequest(door="door2"))  # door1 is released: the exit button waits too
        assert relay_changes(agent, "door2") == door2
        await ask(rcfg, DoorRequest(door="door1", action="open"))
        await ask(rcfg, DoorRequest(door="door1", action="close"))
        await wait_relocked_fail_safe(agent, "door1")
        await ask(rcfg, RexRequest(door="door2"))
        assert relay_changes(agent, "door2")[len(door2) :] == [False]  # released (fail-safe lock)
        assert await reasons_of(rcfg, TapRequest(door="door1", card=1002)) == ["interlock"]  # door2 REX-released
        await provision(agent, PutInterlock(interlock=Interlock(id="trap", doors=["door1", "door2"])))
        await ask(rcfg, DoorRequest(door="door2", action="open"))
        await ask(rcfg, DoorRequest(door="door2", action="close"))
        assert await reasons_of(rcfg, TapRequest(door="door2", card=1002)) == ["granted"]
        door1 = relay_changes(agent, "door1")
        await ask(rcfg, RexRequest(door="door1"))  # rex_overrides (the default): egress safety wins
        assert relay_changes(agent, "door1")[len(door1) :] == [True]
    rex = [(e.door, e.detail.get("refused")) for e in journal_on_disk(rcfg) if e.type == "door.rex"]
    assert rex == [("door2", "interlock"), ("door2", None), ("door1", None)]


async def wait_relocked_fail_safe(agent: Agent, door: str, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if agent.doors[door].locked:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{door} did not relock")
