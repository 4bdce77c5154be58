"""The operator side end to end: a real Mosquitto, the real edge agent on the simulated gateway (taps are
Wiegand bit trains on mock pins), and the operator `Service` on its own SQLite database.

One test per seed flow: CSV import (001), identity export with time-bounded assignments (000), visitor
badges (004), operator permissions and signed commands (002/003).
"""

# ruff: noqa: F811

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiomqtt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud_bridge.operator.csvimport import ImportFailed
from cloud_bridge.operator.db import Conflict, OperatorError
from cloud_bridge.operator.service import Service
from cloud_bridge.permissions import Action, ObjectType, PermissionDenied, PermissionGroup, grant, unlock_group
from cloud_bridge.protocol import Unlock, encode
from cloud_bridge.signing import sign_command
from cloud_bridge.topics import Topics
from edge.agent import Agent, run_agent
from edge.config import parse_config
from edge.decision import Decision
from edge.sim.hands import simulated_agent, tap

from .broker import broker  # noqa: F401
from .mosquitto import Mosquitto

SITE, GW, PW = "s1", "gw1", "correct horse"


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="edge-op-") as d:
        yield Path(d)


@asynccontextmanager
async def agent_running(broker: Mosquitto, state: Path, sock: Path, pub_hex: str, gw: str = GW) -> AsyncIterator[Agent]:
    """A simulated gateway `gw` of SITE linked to `broker`, obeying commands signed by `pub_hex`."""
    cfg = parse_config(f"""
hardware = "sim"
[site]
id = "{SITE}"
gateway = "{gw}"
timezone = "Europe/Berlin"
[policy]
clock_source = "system"
[storage]
state_dir = "{state}"
synchronous = "NORMAL"
[control]
socket = "{sock}"
[link]
host = "{broker.host}"
port = {broker.port}
backoff_min_s = 0.1
backoff_max_s = 0.5
keepalive_s = 5
command_key = "{pub_hex}"
""")
    agent = simulated_agent(cfg)
    async with asyncio.TaskGroup() as tg:
        tg.create_task(run_agent(agent), name=f"agent[{gw}]")
        await asyncio.wait_for(agent.started.wait(), 10)
        try:
            yield agent
        finally:
            agent.stop()


@asynccontextmanager
async def site(broker: Mosquitto, tmp_path: Path, sock_dir: Path) -> AsyncIterator[tuple[Service, Agent]]:
    svc = Service.init(tmp_path / "cloud.db", site=SITE, admin="root", host=broker.host, port=broker.port,
                       tz="Europe/Berlin", passphrase=PW)  # fmt: skip
    svc.resend_s = 1.0
    async with svc, agent_running(broker, tmp_path / "gw", sock_dir / "c.sock", svc.public_key_hex()) as agent:
        link = await svc.link()
        await link.wait_online(GW, 20)
        svc.put_group("staff", [(GW, "door1")], tags=["hq"])
        yield svc, agent
    svc.close()


async def tap_card(agent: Agent, card: int, door: str = "door1") -> Decision:
    """Tap and return the decision. A frame garbled by a busy loop (the 1.5 ms Wiegand bit timing on a
    shared 2-core machine) gives a reader fault and no decision: the card is tapped again, as a person would."""
    for _ in range(5):
        n = agent.decided
        await tap(agent, f"{door}.wiegand", card)
        for _ in range(50):
            if agent.decided > n:
                return agent.decisions[-1]
            await asyncio.sleep(0.02)
    raise AssertionError(f"no decision for card {card} after 5 taps")


async def published(svc: Service) -> int:
    r = await svc.publish(timeout=30)
    v = r[GW]
    assert isinstance(v, int), r
    return v


async def test_csv_import_then_tap_granted_duplicate_card_imports_nothing(
    broker: Mosquitto, tmp_path: Path, sock_dir: Path
) -> None:
    async with site(broker, tmp_path, sock_dir) as (svc, agent):
        rep = svc.import_csv("id,name,card,groups,offline_access\nalice,Alice,1001,staff,yes\nbob,Bob,1002,staff,no\n")
        assert rep.ok and rep.imported == 2
        v1 = await published(svc)
        assert agent.store is not None and agent.store.version == v1 >= 1
        d = await tap_card(agent, 1001)
        assert d.granted and d.user == "alice"
        assert not (await tap_card(agent, 1001, "door2")).granted  # staff opens door1 only

        # a duplicate card (in the file, and one already assigned) -> nothing imported, each row named
        bad = "id,card,groups\ncarol,2001,staff\ndave,2001,staff\nerin,1002,staff\nfrank,12x,staff\ngina,2005,nope\n"
        with pytest.raises(ImportFailed) as ei:
            svc.import_csv(bad)
        text = str(ei.value)
        assert "line 3: card: card 2001 is duplicated in the file (line 2)" in text
        assert "line 4: card: card 1002 is already assigned to user 'bob'" in text
        assert "line 5: card: card ID '12x' is not numeric" in text
        assert "line 6: groups: unknown group 'nope'" in text
        assert not svc.db.user_exists("carol")  # not even the good row
        assert await published(svc) == v1  # nothing to send
        assert not (await tap_card(agent, 2001)).granted

        # deactivate -> denied; delete -> the card is free and can be given to someone else
        svc.set_active("alice", False)
        await published(svc)
        assert (await tap_card(agent, 1001)).reason.value == "user_inactive"
        svc.delete_user("bob")
        svc.add_user("hank", card=1002, groups=["staff"])
        await published(svc)
        d = await tap_card(agent, 1002)
        assert d.granted and d.user == "hank"


async def test_identity_export_rules_and_an_assignment_ending_without_a_message(
    broker: Mosquitto, tmp_path: Path, sock_dir: Path
) -> None:
    async with site(broker, tmp_path, sock_dir) as (svc, agent):
        now = time.time()
        svc.add_user("ivy", card=3001)
        svc.assign("ivy", "staff", valid_until=now + 4.0)  # ends at a set time
        svc.add_user("jon", card=3002)
        svc.assign("jon", "staff", valid_from=now + 3600)  # starts in an hour: sent ahead as a window
        svc.add_user("kim", card=3003)  # a token but no entitlement: not exported
        await published(svc)
        assert agent.store is not None
        assert agent.store.index.cred(3003) is None
        d0 = await tap_card(agent, 3001)
        assert d0.granted, d0
        assert (await tap_card(agent, 3002)).reason.value == "assignment_not_active"
        link = await svc.link()
        sent = link.rights_published
        await asyncio.sleep(max(0.0, now + 4.5 - time.time()))
        d = await tap_card(agent, 3001)
        assert not d.granted and d.reason.value == "assignment_not_active"
        assert link.rights_published == sent  # nothing was sent at that moment

        # a token that is not active is removed; all of a user's tokens carry the user's entitlements
        svc.add_credential("jon", 3004)
        svc.assign("jon", "staff")
        await published(svc)
        assert (await tap_card(agent, 3002)).granted and (await tap_card(agent, 3004)).granted
        svc.set_credential_status(3004, "lost")
        await published(svc)
        assert agent.store.index.cred(3004) is None
        # the switch: keep users without entitlements
        svc.set_export_rules(delete_user_on_no_token=True, delete_user_on_no_entitlement=False)
        await published(svc)
        assert agent.store.index.cred(3003) is not None
        assert (await tap_card(agent, 3003)).reason.value == "no_group_for_door"


async def test_visitor_badge_expires_at_the_gateway_while_disconnected(
    broker: Mosquitto, tmp_path: Path, sock_dir: Path
) -> None:
    async with site(broker, tmp_path, sock_dir) as (svc, agent):
        with pytest.raises(OperatorError, match="not numeric"):
            svc.add_badge("lobby", "V-12")
        svc.add_badge("lobby", "5001", name="Visitor 1", badge_type="temporary")
        with pytest.raises(Conflict):
            svc.add_user("mallory", card=5001)  # a pool badge is not a user's card
        vid, uid, ends = svc.issue_visitor("Vera", location="lobby", badge=5001, groups=["staff"],
                                           until=time.time() + 5.0)  # fmt: skip
        with pytest.raises(Conflict):
            svc.issue_visitor("Other", location="lobby", badge=5001, groups=["staff"])  # in use
        await published(svc)
        d = await tap_card(agent, 5001)
        assert d.granted and d.user == uid
        link = await svc.link()
        session = (await link.wait_online(GW)).session
        broker.stop()  # the gateway is cut off from the cloud
        async with asyncio.timeout(10):
            while agent.link_online:
                await asyncio.sleep(0.05)
        await asyncio.sleep(max(0.0, ends + 0.5 - time.time()))
        d = await tap_card(agent, 5001)
        assert not d.granted and d.reason.value in ("credential_expired", "user_expired", "assignment_not_active")
        broker.start()
        # sign-in again: a new visit, a new visitor user, the same badge
        await link.wait_online(GW, 30, after=session)  # both ends reconnect on their own
        vid2, uid2, _ = svc.issue_visitor("Vera", location="lobby", badge=5001, groups=["staff"])
        assert vid2 != vid and uid2 != uid
        await published(svc)
        assert (await tap_card(agent, 5001)).user == uid2
        svc.sign_out(vid2)
        await published(svc)
        assert (await tap_card(agent, 5001)).reason.value == "unknown_card"


async def test_unlock_needs_publish_permission_and_forged_commands_are_refused(
    broker: Mosquitto, tmp_path: Path, sock_dir: Path
) -> None:
    async with site(broker, tmp_path, sock_dir) as (admin, agent):
        admin.put_permission_group(unlock_group("front-desk", "Front desk", applies_to=[GW]))
        admin.put_permission_group(PermissionGroup(id="viewer", permissions=[
            grant(ObjectType.DOOR, Action.READ), grant(ObjectType.GATEWAY, Action.READ)]))  # fmt: skip
        admin.add_operator("guard", ["viewer"])  # may read doors and gateways, not publish
        admin.add_operator("desk", ["front-desk"])
        db = tmp_path / "cloud.db"
        async with Service(db, operator="guard", passphrase=PW) as guard:
            with pytest.raises(PermissionDenied, match=r"no permission grants publish \(unlock\) on door gw1/door1"):
                await guard.unlock(GW, "door1")
            assert guard._link is None  # refused before anything was sent (no connection was even made)
            with pytest.raises(PermissionDenied):
                guard.add_user("x", card=9)
        async with Service(db, operator="desk", passphrase=PW) as desk:
            desk.resend_s = 1.0
            r = await desk.unlock(GW, "door1", seconds=1.0)
            assert r.ok, r
            assert agent.doors["door1"].relay_energised
        # a command signed with another key, sent straight to the broker: refused by the gateway
        _, forged = sign_command(Ed25519PrivateKey.generate(), site=SITE, gateway=GW, action=Unlock(door="door1"),
                                 operator="mallory")  # fmt: skip
        link = await admin.link()
        n = len(link.results)
        async with aiomqtt.Client(broker.host, broker.port, protocol=aiomqtt.ProtocolVersion.V5) as c:
            await c.publish(Topics(SITE, GW).command, encode(forged), qos=1)
        r = await link.wait_for(lambda: next((x for _, x in link.results[n:]), None), 10)
        assert not r.ok and r.error is not None and r.error.code == "bad_signature"
        # key rotation in band (issue 6): the gateway takes the new key; the old key is refused from then on
        old_key = admin.signing_key()
        rot = await admin.rotate_key(timeout=20)
        assert rot.current and rot.gateways == {GW: "ok"}
        assert (await admin.unlock(GW, "door1", seconds=1.0, timeout=10)).ok
        r2 = await link.command(GW, old_key, Unlock(door="door1"), operator="root", timeout=10)
        assert not r2.ok and r2.error is not None and r2.error.code == "bad_signature"
