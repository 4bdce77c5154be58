# ruff: noqa: F811  (pytest fixtures imported from other test modules are used as parameters)
"""One clock for the whole agent: the real Agent on the `sim` profile with the Pi's wall clock played by a
fake (it is the one thing a test cannot set on the machine), everything else real.

The story of issue 12: after a power cut the Pi's clock came back 10 h behind (fake-hwclock, no NTP) and was
trusted through the cloud's time (offset +36,000 s). Every part of the agent must then use the corrected
time: decisions, door schedules and first-card unlocks, the cloud link's command checks, journal stamps.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud_bridge.protocol import Lockdown, Unlock
from cloud_bridge.signing import public_bytes
from edge.agent import Agent, run_agent
from edge.clock import META_BOOT_ID, META_LAST_GOOD, read_boot_id
from edge.config import Config, parse_config
from edge.control import TapRequest
from edge.model import (
    Assignment,
    ChangeSet,
    Credential,
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
from edge.sim.hands import simulated_agent
from edge.store import Store
from edge.timetrust import SANE_MAX_TS, SANE_MIN_TS, TrustSource

from .broker import broker, cloud_peer, site_key, unique  # noqa: F401
from .mosquitto import Mosquitto
from .test_agent_sim import ask, journal_on_disk, sock_dir  # noqa: F401

DAY = 86400.0
#: The true time of the story: Monday 23:02 UTC. The Pi's clock reads 13:02.
TRUE_START = datetime(2026, 11, 23, 23, 2, tzinfo=UTC).timestamp()
MIDNIGHT = datetime(2026, 11, 24, 0, 0, tzinfo=UTC).timestamp()
BEHIND = 36_000.0
EXPIRED_CARD = 1002  # its credential ended a minute before TRUE_START


class PiClock:
    """The Pi's wall clock: `behind` seconds behind the true time, and (once `run_back_at` is set) running
    backwards at 24 s/s (stepped back 25 s every second). Both advance with the monotonic clock."""

    def __init__(self, *, behind: float, start: float = TRUE_START) -> None:
        self.m0 = time.monotonic()
        self.start = start
        self.behind = behind
        self.run_back_at: float | None = None

    def true(self) -> float:
        return self.start + (time.monotonic() - self.m0)

    def wall(self) -> float:
        back = 0.0 if self.run_back_at is None else 25.0 * (time.monotonic() - self.run_back_at)
        return self.true() - self.behind - back


async def no_ntp() -> bool | None:
    return False


async def ntp_right() -> bool | None:
    return True


def story_site() -> ChangeSet:
    noon = Schedule(id="noon", intervals=[Interval(day=0, start="12:00", end="15:00")])
    late = Schedule(id="late", intervals=[Interval(day=0, start="22:00", end="24:00")])
    return ChangeSet(from_version=0, to_version=1, changes=[
        PutSchedule(schedule=noon), PutSchedule(schedule=late),
        PutDoor(door=Door(id="door1", strike_s=3.0, mode=DoorMode.FIRST_CARD, unlock_schedule="late")),
        PutDoor(door=Door(id="door2", strike_s=3.0, mode=DoorMode.UNLOCKED, unlock_schedule="noon")),
        PutGroup(group=Group(id="staff", doors=["door1", "door2"])),
        PutUser(user=User(id="alice", assignments=[Assignment(group="staff")])),
        PutUser(user=User(id="olga", assignments=[Assignment(group="staff")])),
        PutCredential(credential=Credential(card=1001, user="alice")),
        PutCredential(credential=Credential(
            card=EXPIRED_CARD, user="olga", valid_until=datetime.fromtimestamp(TRUE_START - 60, UTC))),
    ])  # fmt: skip


def config(tmp_path: Path, sock_dir: Path, *, link: str = "enabled = false", site: str = "test") -> Config:
    return parse_config(f"""
hardware = "sim"
[site]
id = "{site}"
gateway = "sim-clock"
timezone = "UTC"
[storage]
state_dir = "{tmp_path / "state"}"
synchronous = "NORMAL"
[control]
socket = "{sock_dir / "control.sock"}"
[link]
{link}
""")


@pytest.fixture
def cfg(tmp_path: Path, sock_dir: Path) -> Config:
    return config(tmp_path, sock_dir)


@asynccontextmanager
async def running(agent: Agent) -> AsyncIterator[Agent]:
    async with asyncio.TaskGroup() as tg:
        tg.create_task(run_agent(agent), name="agent")
        await asyncio.wait_for(agent.started.wait(), 10)
        try:
            yield agent
        finally:
            agent.stop()


async def seed(cfg: Config, **meta: float | str | None) -> None:
    async with Store(cfg.state_dir / "rights.db", cfg.tz) as store:
        for k, v in meta.items():
            await store.set_meta(k, v)


async def until(pred: object, timeout: float = 6.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return True
        await asyncio.sleep(0.05)
    return False


async def test_the_cloud_offset_moves_every_part_of_the_agent(cfg: Config) -> None:
    pi = PiClock(behind=BEHIND)
    agent = simulated_agent(cfg, clock=pi.wall, ntp=no_ntp, demo=story_site())
    async with running(agent):
        assert not agent.clock_trusted
        agent.cloud_time(pi.true(), 0.02)  # what the link does with an event acknowledgement
        assert agent.clock_trusted and agent.trust is not None and agent.trust.source is TrustSource.CLOUD
        assert abs(agent.clock() - pi.true()) < 1 and agent.clock.offset_s == pytest.approx(BEHIND, abs=1)
        await asyncio.sleep(1.3)  # a door-modes tick: the schedules are applied on the corrected time
        door2 = agent.doors["door2"].status()
        assert door2["locked"] and door2["holds"] == []  # 12:00-15:00 is over at 23:02 (13:02 on the Pi)
        # The first card on a schedule ending at 24:00 holds the door until 24:00 corrected: 58 min, not 11 h.
        out = await ask(cfg, TapRequest(door="door1", card=1001))
        assert [d["reason"] for d in out["decisions"]] == ["first_card_unlock"]
        assert agent.decisions[-1].unlock_until == MIDNIGHT
        remaining = agent.doors["door1"].status()["unlock_remaining_s"]
        print(f"first-card unlock: {remaining} s left, {MIDNIGHT - pi.true():.1f} s to midnight")
        assert abs(remaining - (MIDNIGHT - pi.true())) < 5
        # Event acknowledgements that would move the clock (forged or broken): none moves a trusted clock.
        for bad in (pi.true() + 11.5 * DAY, pi.true() - 11.5 * DAY, 5e9, 1e12):
            agent.cloud_time(bad, 0.02)
            assert agent.clock_trusted and abs(agent.clock() - pi.true()) < 1, bad
        out = await ask(cfg, TapRequest(door="door2", card=EXPIRED_CARD))
        assert [d["reason"] for d in out["decisions"]] == ["credential_expired"]
        out = await ask(cfg, TapRequest(door="door2", card=1001))
        assert [d["reason"] for d in out["decisions"]] == ["granted"]
        tapped_at = pi.true()
    events = journal_on_disk(cfg)
    assert not [e for e in events if e.detail.get("event") == "tap_failed"]
    grants = [e for e in events if e.type == "access.granted"]
    assert len(grants) == 2 and all(TRUE_START - 1 < e.ts <= tapped_at + 1 for e in grants)
    assert grants[0].local.startswith("2026-11-23T23:0")  # stamped with the corrected time
    assert "alarm.clock_skew" in {e.type for e in events}


async def test_an_absurd_cloud_time_on_an_untrusted_clock_is_ignored(cfg: Config) -> None:
    """ts = 1e12 (year 33658) once made every tap raise ValueError in the reader sink: no decision at all."""
    pi = PiClock(behind=BEHIND)
    agent = simulated_agent(cfg, clock=pi.wall, ntp=no_ntp, demo=story_site())
    async with running(agent):
        for bad in (1e12, 5e9, float("inf")):
            agent.cloud_time(bad, 0.02)
            assert not agent.clock_trusted
            assert SANE_MIN_TS <= agent.clock() <= SANE_MAX_TS
        out = await ask(cfg, TapRequest(door="door1", card=1001))
        assert [d["reason"] for d in out["decisions"]] == ["granted"]  # no schedules while untrusted
    events = journal_on_disk(cfg)
    assert all(SANE_MIN_TS <= e.ts <= SANE_MAX_TS for e in events)
    assert [e.reason for e in events if e.type.startswith("access.")] == ["granted"]


@pytest.mark.parametrize("source", ["cloud", "warm_restart"])
async def test_slow_backward_steps_lose_trust_and_no_expired_card_opens(
    cfg: Config, source: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The wall clock stepped back 25 s every second (each step under the 30 s jump limit): the monotonic
    clock bounds how far it may move in all, so trust goes within a few seconds and the card that expired
    a minute before the true time stays expired."""
    pi = PiClock(behind=BEHIND if source == "cloud" else 0.0)
    if source == "warm_restart":  # the agent restarted, the machine did not
        await seed(cfg, **{META_LAST_GOOD: TRUE_START - 5, META_BOOT_ID: read_boot_id()})
    agent = simulated_agent(cfg, clock=pi.wall, ntp=no_ntp, demo=story_site())
    async with running(agent):
        if source == "cloud":
            agent.cloud_time(pi.true(), 0.02)
        assert agent.clock_trusted and agent.trust is not None and agent.trust.source.value == source
        out = await ask(cfg, TapRequest(door="door2", card=EXPIRED_CARD))
        assert [d["reason"] for d in out["decisions"]] == ["credential_expired"]
        pi.run_back_at = time.monotonic()
        lost = await until(lambda: not agent.clock_trusted)
        went_back = pi.true() - agent.clock.offset_s - pi.wall()
        with capsys.disabled():
            print(f"\n{source}: trust lost={lost} after the wall clock went back {went_back:.0f} s")
        assert lost
        await asyncio.sleep(1.5)  # the wall clock is now well before the card's end
        assert pi.wall() + agent.clock.offset_s < TRUE_START - 60
        out = await ask(cfg, TapRequest(door="door2", card=EXPIRED_CARD))
        assert out["decisions"][0]["granted"] is False
        assert agent.clock() > TRUE_START - 30  # the estimate never went back by more than the bound
    assert "alarm.clock_backwards" in {e.type for e in journal_on_disk(cfg)}


async def test_a_bad_last_good_time_does_not_lock_the_clock_out(cfg: Config) -> None:
    """A bad sample persisted as the last-good time 11.5 days ahead; after a restart with NTP right, NTP wins."""
    await seed(cfg, **{META_LAST_GOOD: TRUE_START + 11.5 * DAY, META_BOOT_ID: "another-boot"})
    pi = PiClock(behind=0.0)
    agent = simulated_agent(cfg, clock=pi.wall, ntp=ntp_right, demo=story_site())
    async with running(agent):
        assert await until(lambda: agent.clock_trusted)
        assert agent.trust is not None and agent.trust.source is TrustSource.NTP
        assert abs(agent.clock() - pi.true()) < 1
    assert "alarm.clock_backwards" in {e.type for e in journal_on_disk(cfg)}


async def test_signed_commands_are_checked_on_the_corrected_clock(
    tmp_path: Path, sock_dir: Path, broker: Mosquitto, site_key: Ed25519PrivateKey
) -> None:
    """The real link, on a real broker, with the Pi 10 h behind: once the cloud's time (carried by its event
    acknowledgements) is adopted, a lockdown the cloud signs now is accepted, not `not_yet_valid`; a remote
    unlock in the lockdown is refused by the door; events are stamped with the corrected time."""
    site = unique("s")
    link = (f'host = "{broker.host}"\nport = {broker.port}\nbackoff_min_s = 0.1\nbackoff_max_s = 0.5\n'
            f'command_key = "{public_bytes(site_key).hex()}"')  # fmt: skip
    cfg = config(tmp_path, sock_dir, link=link, site=site)
    pi = PiClock(behind=BEHIND, start=time.time())  # the cloud's clock is the real one
    start = pi.true()
    agent = simulated_agent(cfg, clock=pi.wall, ntp=no_ntp, demo=story_site())
    async with running(agent), cloud_peer(broker, site_key, site=site, gw=cfg.site.gateway) as cloud:
        await cloud.wait_online()
        assert await until(lambda: agent.clock_trusted, timeout=15)
        r = await cloud.command(Lockdown(active=True), operator="bob")
        assert r.ok, r.error
        assert agent.decider is not None and agent.decider.lockdown
        await asyncio.sleep(1.3)
        r = await cloud.command(Unlock(door="door1", seconds=5), operator="alice")
        assert not r.ok and r.error is not None and r.error.code == "invalid" and "in lockdown" in r.error.message
        assert agent.doors["door1"].locked
        r = await cloud.command(Lockdown(active=False), operator="bob")
        assert r.ok, r.error
        done = pi.true()

        def executed() -> list[float]:
            return [e.ts for e in cloud.events.values() if e.type == "command.executed"]

        await cloud.wait_for(lambda: len(executed()) >= 2)
        # the events the cloud received are stamped with the corrected time, not 10 h in the past
        assert all(start - 1 < ts <= done + 1 for ts in executed()), (start, executed())

