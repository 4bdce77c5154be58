# ruff: noqa: F811  (pytest fixtures imported from tests.broker are used as parameters)
"""The access rules through the cloud link (issue 19): the real Agent on the `sim` profile (taps as Wiegand bit
trains on mock pins, door openings as contact edges) connected to a real Mosquitto, and the cloud's side
(`CloudPeer`, `AreaRelay`): the signed anti-passback reset, cross-gateway anti-passback with two gateways
(online, one offline and restarted), the duress alarm ahead of the event backlog, the occupancy in the birth."""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud_bridge.cloud import CloudPeer
from cloud_bridge.operator.collector import Collector
from cloud_bridge.operator.service import Service
from cloud_bridge.protocol import AreaMove, AreaMoves, ResetAntiPassback
from cloud_bridge.relay import AreaRelay
from cloud_bridge.signing import public_bytes
from edge.config import Config, parse_config
from edge.control import DoorRequest, TapRequest
from edge.model import (
    AntiPassback,
    Area,
    Credential,
    Door,
    DoorMode,
    DuressMode,
    PutArea,
    PutCredential,
    PutDoor,
    PutSiteRules,
    PutUser,
    SiteRules,
    User,
)
from edge.model import Assignment as Assign
from edge.pin import hash_pin

from .broker import broker, cloud_peer, site_key, unique  # noqa: F401
from .mosquitto import Mosquitto
from .test_agent_sim import ask, relay_changes, running
from .test_rules_agent import provision


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="edge-rl-") as d:  # Unix socket paths are short
        yield Path(d)


def link_cfg(tmp_path: Path, sock_dir: Path, broker: Mosquitto, key: Ed25519PrivateKey, *, site: str, gw: str,
             link: str = "", extra: str = "") -> Config:  # fmt: skip
    return parse_config(f"""
hardware = "sim"
{extra}
[site]
id = "{site}"
gateway = "{gw}"
timezone = "Europe/Berlin"
[storage]
state_dir = "{tmp_path / gw}"
synchronous = "NORMAL"
journal_flush_s = 0.05
[control]
socket = "{sock_dir / gw}.sock"
[link]
host = "{broker.host}"
port = {broker.port}
backoff_min_s = 0.1
backoff_max_s = 0.5
command_key = "{public_bytes(key).hex()}"
{link}
""")


async def tap(cfg: Config, door: str, card: int, pin: str | None = None) -> list[str]:
    return [d["reason"] for d in (await ask(cfg, TapRequest(door=door, card=card, pin=pin)))["decisions"]]


async def walk_through(cfg: Config, door: str) -> None:
    await ask(cfg, DoorRequest(door=door, action="open"))
    await ask(cfg, DoorRequest(door=door, action="close"))


async def until(pred: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


BUILDING = (
    PutArea(area=Area(id="building", anti_passback=AntiPassback.HARD)),
    PutDoor(door=Door(id="door1", strike_s=0.5, to_area="building")),  # its reader: outside -> building
    PutDoor(door=Door(id="door2", strike_s=0.5, from_area="building")),  # its reader: building -> outside
)


async def test_the_signed_reset_forgets_a_user_and_an_area_across_a_restart(
    tmp_path: Path, sock_dir: Path, broker: Mosquitto, site_key: Ed25519PrivateKey
) -> None:
    site = unique("s")
    cfg = link_cfg(tmp_path, sock_dir, broker, site_key, site=site, gw="gw-a")
    async with cloud_peer(broker, site_key, site=site, gw="gw-a") as cloud, running(cfg) as agent:
        await cloud.wait_online()
        await provision(agent, *BUILDING)
        for card in (1001, 1002):  # alice and bob walk in
            assert await tap(cfg, "door1", card) == ["granted"]
            await walk_through(cfg, "door1")
        assert await tap(cfg, "door1", 1001) == ["anti_passback"]
        n = len(cloud.births)
        await cloud.request_rebirth()
        await until(lambda: len(cloud.births) > n)
        assert cloud.births[-1].occupancy == {"building": 2}
        r = await cloud.command(ResetAntiPassback(user="alice"), operator="guard")
        assert r.ok, r.error
        mark = relay_changes(agent, "door1")
        assert await tap(cfg, "door1", 1001) == ["granted"]  # forgotten: she passes once
        assert relay_changes(agent, "door1")[len(mark) :] == [True]
        assert await tap(cfg, "door1", 1002) == ["anti_passback"]  # bob is still inside
        r = await cloud.command(ResetAntiPassback(user="nobody-here"), operator="guard")
        assert r.ok, r.error  # nothing to forget is no error

        def executed() -> list[dict[str, Any]]:
            return [dict(e.detail) for e in cloud.events.values() if e.type == "command.executed"]

        await until(lambda: len(executed()) >= 2)
        assert [(d["action"], d["user"], d["forgotten"]) for d in executed()] == [
            ("reset_anti_passback", "alice", 1), ("reset_anti_passback", "nobody-here", 0)]  # fmt: skip
        r = await cloud.command(ResetAntiPassback(area="building"), operator="guard")
        assert r.ok, r.error
        assert agent.tap is not None and agent.tap.access.occupancy == {}
    async with running(cfg) as agent:  # the reset was saved
        assert agent.tap is not None and agent.tap.access.where == {}
        assert await tap(cfg, "door1", 1002) == ["granted"]


async def test_anti_passback_holds_across_two_gateways_through_the_cloud(
    tmp_path: Path, sock_dir: Path, broker: Mosquitto, site_key: Ed25519PrivateKey
) -> None:
    """Bob enters through gateway A; gateway B learns it through the cloud and refuses him entry there.
    Then B is down (a partition) while he leaves through A; the relay keeps the move, B gets it when it is
    back (restarted on the same state), and lets him in again."""
    site = unique("s")
    cfg_a = link_cfg(tmp_path, sock_dir, broker, site_key, site=site, gw="gw-a")
    cfg_b = link_cfg(tmp_path, sock_dir, broker, site_key, site=site, gw="gw-b")
    async with (
        cloud_peer(broker, site_key, site=site, gw="gw-a") as cloud_a,
        cloud_peer(broker, site_key, site=site, gw="gw-b") as cloud_b,
        AreaRelay.over_peers({"gw-a": cloud_a, "gw-b": cloud_b}, retry_s=0.3) as relay,
        running(cfg_a) as a,
    ):
        async with running(cfg_b) as b:
            await cloud_a.wait_online()
            await cloud_b.wait_online()
            await provision(a, *BUILDING)
            await provision(b, *BUILDING)
            assert await tap(cfg_a, "door1", 1002) == ["granted"]
            await walk_through(cfg_a, "door1")
            assert b.tap is not None
            await until(lambda: b.tap is not None and b.tap.access.where.get("bob", (None,))[0] == "building")
            assert b.tap.access.occupancy == {"building": 1}
            mark = relay_changes(b, "door1")
            assert await tap(cfg_b, "door1", 1002) == ["anti_passback"]  # he is inside already (seen by A)
            assert relay_changes(b, "door1") == mark
            assert await tap(cfg_b, "door2", 1002) == ["granted"]  # leaving through B is right
            await walk_through(cfg_b, "door2")
            await until(lambda: a.tap is not None and a.tap.access.where.get("bob", ("x",))[0] is None)
            assert await tap(cfg_a, "door1", 1002) == ["granted"]  # and A knows he is out
            await walk_through(cfg_a, "door1")
            await until(lambda: b.tap is not None and b.tap.access.where.get("bob", (None,))[0] == "building")
        # B is down: bob leaves through A; the move waits in the relay
        await cloud_b.wait_offline()
        assert await tap(cfg_a, "door2", 1002) == ["granted"]
        await walk_through(cfg_a, "door2")
        await until(lambda: "bob" in relay.pending["gw-b"])
        async with running(cfg_b) as b:  # back, on the same state: he is still inside there until the relay says
            await until(lambda: b.tap is not None and b.tap.access.where.get("bob", ("x",))[0] is None)
            await until(lambda: relay.pending["gw-b"] == {})
            assert await tap(cfg_b, "door1", 1002) == ["granted"]


async def test_a_relayed_move_older_than_the_gateways_own_does_not_win(
    tmp_path: Path, sock_dir: Path, broker: Mosquitto, site_key: Ed25519PrivateKey
) -> None:
    site = unique("s")
    cfg = link_cfg(tmp_path, sock_dir, broker, site_key, site=site, gw="gw-a")
    async with cloud_peer(broker, site_key, site=site, gw="gw-a") as cloud, running(cfg) as agent:
        await cloud.wait_online()
        await provision(agent, *BUILDING)
        assert await tap(cfg, "door1", 1002) == ["granted"]
        await walk_through(cfg, "door1")
        assert agent.tap is not None
        seen = agent.tap.access.where["bob"][1]
        old = AreaMove(user="bob", area=None, ts=seen - 60, gateway="gw-b")
        r = await cloud.command(AreaMoves(moves=[old]), operator="area-relay")
        assert r.ok, r.error
        assert agent.tap.access.where["bob"] == ("building", seen)
        bad = cloud.sign(AreaMoves(moves=[AreaMove(user="bob", ts=seen + 1, gateway="gw-b")]), operator="x")
        forged = type(bad)(body=bad.body, sig=bytes(64), key_id=bad.key_id)  # signature of nobody
        await cloud.send_command(forged)
        r = await cloud.command(AreaMoves(moves=[AreaMove(user="bob", ts=seen + 2, gateway="gw-b")]), operator="r")
        assert r.ok, r.error
        assert agent.tap.access.where.get("bob") == (None, seen + 2)
        assert any(x.error is not None and x.error.code == "bad_signature" for x in cloud.command_results)


async def test_the_duress_alarm_overtakes_the_event_backlog(
    tmp_path: Path, sock_dir: Path, broker: Mosquitto, site_key: Ed25519PrivateKey
) -> None:
    """The cloud acknowledges nothing, the gateway sends one batch of two events ahead: everything after waits.
    A duress PIN then reaches the cloud at once, ahead of older events it has not received."""
    site = unique("s")
    cfg = link_cfg(tmp_path, sock_dir, broker, site_key, site=site, gw="gw-a",
                   link="window = 1\nbatch_events = 2\nack_timeout_s = 600")  # fmt: skip
    async with (
        CloudPeer(host=broker.host, port=broker.port, site=site, gateway="gw-a", signing_key=site_key,
                  auto_ack=False) as cloud,
        running(cfg) as agent,
    ):  # fmt: skip
        await cloud.wait_online()
        await provision(
            agent,
            PutSiteRules(rules=SiteRules(duress=DuressMode.PIN_PLUS_ONE)),
            PutDoor(door=Door(id="door1", strike_s=0.3, mode=DoorMode.CARD_AND_PIN)),
            PutUser(user=User(id="alice", pin_hash=hash_pin("2580", iterations=1000),
                              assignments=[Assign(group="staff")])),
        )  # fmt: skip
        for _ in range(6):  # a backlog of older events
            assert await tap(cfg, "door2", 1002) == ["granted"]
        assert agent.journal is not None
        await until(lambda: len(cloud.events) >= 2)
        backlog = agent.journal.depth
        assert await tap(cfg, "door1", 1001, pin="2581") == ["pin_required", "granted"]
        await until(lambda: any(e.type == "alarm.duress" for e in cloud.events.values()), timeout=5)
        duress = next(e for e in cloud.events.values() if e.type == "alarm.duress")
        older = {e.seq for e in cloud.events.values() if e.seq < duress.seq}
        assert len(older) < duress.seq - 1, (older, duress.seq)  # older events still unsent: it overtook them
        assert backlog > len(older)
        assert duress.user == "alice" and duress.door == "door1"
        assert any(b.priority and b.events[0].id == duress.id for b in cloud.batches)
        await cloud.ack_events(cloud.have_upto)  # the backlog flows again; the alarm comes again in order
        for _ in range(40):
            await asyncio.sleep(0.1)
            await cloud.ack_events(cloud.have_upto)
            if cloud.have_upto >= duress.seq:
                break
        assert cloud.have_upto >= duress.seq
        assert cloud.duplicates >= 1  # the in-order copy of the alarm, de-duplicated on its id


async def test_the_event_collector_relays_passages_between_gateways(
    tmp_path: Path, sock_dir: Path, broker: Mosquitto
) -> None:
    """The production path (`cloud-bridge collect --relay-areas`): the operator's event collector stores each
    batch and hands it to the relay, whose commands go out through the operator's site link."""
    svc = Service.init(tmp_path / "cloud.db", site="s1", admin="root", host=broker.host, port=broker.port,
                       tz="Europe/Berlin", passphrase="correct horse")  # fmt: skip
    svc.resend_s = 1.0
    key = svc.signing_key()
    cfg_a = link_cfg(tmp_path, sock_dir, broker, key, site="s1", gw="gw-a")
    cfg_b = link_cfg(tmp_path, sock_dir, broker, key, site="s1", gw="gw-b")
    try:
        async with svc:
            link = await svc.link()
            collector = Collector(svc.db, host=broker.host, port=broker.port, site="s1", signing_key=key)
            relay = AreaRelay.over_site_link(link, key, [], retry_s=0.3)
            collector.on_batch.append(relay.observe)
            async with asyncio.TaskGroup() as tg, relay, running(cfg_a) as a, running(cfg_b) as b:
                task = tg.create_task(collector.run(), name="collector")
                await link.wait_online("gw-a", 20)
                await link.wait_online("gw-b", 20)
                await provision(a, *BUILDING)
                await provision(b, *BUILDING)
                assert await tap(cfg_a, "door1", 1002) == ["granted"]
                await walk_through(cfg_a, "door1")
                await until(lambda: b.tap is not None and b.tap.access.where.get("bob", (None,))[0] == "building")
                assert await tap(cfg_b, "door1", 1002) == ["anti_passback"]
                assert svc.db.con.execute("SELECT count(*) FROM events WHERE type='area.passage'").fetchone()[0] >= 1
                task.cancel()
    finally:
        svc.close()


async def test_the_rules_hold_online_offline_and_across_a_restart_offline(
    tmp_path: Path, sock_dir: Path, broker: Mosquitto, site_key: Ed25519PrivateKey
) -> None:
    """Occupancy, two-person and a one-time code with the cloud connected, then with the broker gone (the link
    offline: the gateway's own state decides), then after a restart still offline; the cloud gets what was
    decided offline once the link is back."""
    site = unique("s")
    cfg = link_cfg(tmp_path, sock_dir, broker, site_key, site=site, gw="gw-a")
    rules = (
        PutArea(area=Area(id="lab", max_occupancy=1)),
        PutDoor(door=Door(id="door1", strike_s=0.5, to_area="lab")),
        PutDoor(door=Door(id="door2", strike_s=0.5, two_person_s=30.0)),
        PutUser(user=User(id="frank", assignments=[Assign(group="everywhere")])),
        PutCredential(credential=Credential(card=1010, user="frank")),
        PutCredential(credential=Credential(card=4711, user="bob", max_uses=1)),
    )
    async with cloud_peer(broker, site_key, site=site, gw="gw-a") as cloud, running(cfg) as agent:
        await cloud.wait_online()
        await provision(agent, *rules)
        assert await tap(cfg, "door1", 1001) == ["granted"]  # alice into the lab
        await walk_through(cfg, "door1")
        assert await tap(cfg, "door1", 1002) == ["area_full"]
        assert await tap(cfg, "door2", 1010) == ["awaiting_second_person"]
        assert await tap(cfg, "door2", 1002) == ["granted"]
        assert await tap(cfg, "door1", 4711) == ["area_full"]  # a refusal uses nothing
        await until(lambda: any(e.type == "area.passage" for e in cloud.events.values()))
        broker.stop()  # the link goes down
        await until(lambda: not agent.link_online)
        assert await tap(cfg, "door1", 1002) == ["area_full"]
        assert await tap(cfg, "door2", 1002) == ["awaiting_second_person"]
        assert await tap(cfg, "door2", 1002) == ["awaiting_second_person"]  # the same person twice: still one
        assert await tap(cfg, "door2", 1010) == ["granted"]
        await walk_through(cfg, "door2")
        assert await tap(cfg, "door2", 1010) == ["awaiting_second_person"]
        assert await tap(cfg, "door2", 4711) == ["granted"]  # bob's one-time code as the second: its one use
        await walk_through(cfg, "door2")
        assert await tap(cfg, "door2", 1010) == ["awaiting_second_person"]
        assert await tap(cfg, "door2", 4711) == ["uses_exhausted"]
    async with running(cfg) as agent:  # restarted, still offline
        assert not agent.link_online
        assert agent.tap is not None and agent.tap.access.occupancy == {"lab": 1}
        assert await tap(cfg, "door1", 1002) == ["area_full"]
        assert await tap(cfg, "door2", 4711) == ["uses_exhausted"]
        broker.start()
        async with cloud_peer(broker, site_key, site=site, gw="gw-a") as cloud:
            await until(lambda: agent.link_online, timeout=30)
            # what was decided offline reaches the cloud, marked so
            await until(lambda: any(e.reason == "uses_exhausted" and not e.link_up for e in cloud.events.values()),
                        timeout=30)  # fmt: skip
            assert await tap(cfg, "door1", 1002) == ["area_full"]
