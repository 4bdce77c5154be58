"""Seeds 000, 004 and 003 end to end on both databases: through the HTTP API of a running service, published
(signed with the site key) to a real simulated gateway on a real Mosquitto, and the card granted or denied at
the simulated door afterwards. The seed-003 report reads the events the gateway sent for those taps
(stored by the service's collector)."""

# ruff: noqa: F811

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx

from cloud_bridge.service import site
from cloud_bridge.service.app import init_site
from cloud_bridge.service.database import Database
from edge.agent.agent import Agent

from .broker import broker  # noqa: F401
from .mosquitto import Mosquitto
from .postgres import db_url, postgres_server  # noqa: F401
from .service_harness import admin_client, config, running
from .test_operator_e2e import GW, SITE, agent_running, sock_dir, tap_card  # noqa: F401
from .test_service_e2e import _public_key

ID = "/api/v1/integrations/identity"
VIS = "/api/v1/visitors"


@asynccontextmanager
async def site_with_gateway(broker: Mosquitto, db_url: str, tmp_path: Path, sock_dir: Path
                            ) -> AsyncIterator[tuple[httpx.AsyncClient, Agent]]:  # fmt: skip
    cfg = config(db_url, tmp_path)
    await init_site(cfg, site_id=SITE, admin="root", tz="Europe/Berlin", host=broker.host, port=broker.port)
    pub = await _public_key(db_url)
    async with (agent_running(broker, tmp_path / "gw", sock_dir / "c.sock", pub) as agent,
                running(cfg, provisioning=True, init=False) as svc):  # fmt: skip
        db = Database(db_url)
        try:
            svc.setup_link = f"x#{await site.setup_code_for(db, 'root')}"
        finally:
            await db.close()
        client = await admin_client(svc)
        async with asyncio.timeout(30):  # the gateway's birth reaches the API
            while not any(g["id"] == GW and g["online"] for g in (await client.get("/api/v1/gateways")).json()):
                await asyncio.sleep(0.1)
        try:
            yield client, agent
        finally:
            await client.aclose()


async def published(client: httpx.AsyncClient) -> int:
    r = await client.post("/api/v1/publish", params={"timeout": 30})
    assert r.status_code == 200, r.text
    v = r.json()["gateways"][GW]
    assert isinstance(v, int), r.json()
    return v


async def test_seed000_identity_connector_to_the_door(broker: Mosquitto, db_url: str, tmp_path: Path,
                                                      sock_dir: Path) -> None:  # fmt: skip
    async with site_with_gateway(broker, db_url, tmp_path, sock_dir) as (c, agent):
        # the access control system defines the entitlement; the connector imports it with its door
        assert (await c.put("/api/v1/groups/staff", json={"name": "Staff", "doors": [
            {"gateway": GW, "door": "door1"}]})).status_code == 200  # fmt: skip
        ents = (await c.get(f"{ID}/entitlements")).json()
        assert ents[0]["id"] == "staff" and ents[0]["doors"][0]["announced"] is True

        now = time.time()
        for uid, card in (("E-1", 5001), ("E-2", 5002), ("E-3", 5003)):
            assert (await c.put(f"{ID}/users/{uid}", json={"name": uid})).status_code == 200
            assert (await c.put(f"{ID}/tokens/{card}", json={"user_id": uid, "status": "ACTIVE"})).status_code == 200
        r = await c.put(
            f"{ID}/assignments/A-1",
            json={"user_id": "E-1", "entitlement": "staff", "valid_from": now - 60, "valid_until": now + 3600},
        )
        assert r.json()["export"]["gateways"] == [GW]
        # a time-bound assignment that starts later: sent ahead, the gateway holds it back until its start
        r = await c.put(
            f"{ID}/assignments/A-2",
            json={"user_id": "E-2", "entitlement": "staff", "valid_from": now + 3600, "valid_until": now + 7200},
        )
        assert r.json()["active"] is False
        await published(c)
        d = await tap_card(agent, 5001)
        assert d.granted and d.user == "E-1"
        assert (await tap_card(agent, 5002)).reason.value == "assignment_not_active"
        # E-3 has a token but no entitlement: not on the gateway (deleteUserOnNoEntitlement, the default)
        assert (await tap_card(agent, 5003)).reason.value == "unknown_card"
        # the rule off (a site setting): E-3 goes to the gateway, with no group for the door
        r = await c.put(f"{ID}/settings", json={"deleteUserOnNoAccessToken": True,
                                                "deleteUserOnNoEntitlement": False})  # fmt: skip
        assert r.status_code == 200, r.text
        await published(c)
        assert (await tap_card(agent, 5003)).reason.value == "no_group_for_door"
        # a token no longer ACTIVE is removed from the gateway entirely
        assert (await c.put(f"{ID}/tokens/5001", json={"user_id": "E-1", "status": "SUSPENDED"})).status_code == 200
        await published(c)
        assert (await tap_card(agent, 5001)).reason.value == "unknown_card"
        # ACTIVE again, the assignment ends in 2 s: granted now, refused after its end with no message sent
        await c.put(f"{ID}/tokens/5001", json={"user_id": "E-1", "status": "ACTIVE"})
        end = time.time() + 2.0
        await c.put(f"{ID}/assignments/A-1", json={"user_id": "E-1", "entitlement": "staff", "valid_until": end})
        await published(c)
        assert (await tap_card(agent, 5001)).granted
        await asyncio.sleep(max(0.0, end - time.time()) + 0.3)
        assert not (await tap_card(agent, 5001)).granted


async def test_seed004_visitor_badge_then_seed003_report(broker: Mosquitto, db_url: str, tmp_path: Path,
                                                          sock_dir: Path) -> None:  # fmt: skip
    async with site_with_gateway(broker, db_url, tmp_path, sock_dir) as (c, agent):
        # the gateway's events are stored by the service's own collector (service/events.py)
        assert (await c.put("/api/v1/groups/guests", json={"name": "Guests", "doors": [
            {"gateway": GW, "door": "door1"}]})).status_code == 200  # fmt: skip
        t = (await c.get(f"{VIS}/test-connection")).json()
        assert (
            t["ok"]
            and t["provisioning"]
            and t["gateways"] == [{"id": GW, "online": True, "last_seen": t["gateways"][0]["last_seen"]}]
        )
        r = await c.post(f"{VIS}/refresh", params={"timeout": 20})
        assert r.status_code == 200, r.text
        assert r.json()["gateways"] == {GW: "ok"} and r.json()["groups"][0]["id"] == "guests"
        assert (await c.put(f"{VIS}/badges/7001", json={"location": "hq", "name": "V1"})).status_code == 200

        r = await c.post(f"{VIS}/visits", json={"visitor": "Grace Hopper", "location": "hq", "badge": 7001,
                                                "groups": ["guests"]})  # fmt: skip
        assert r.status_code == 201, r.text
        assert isinstance(r.json()["published"][GW], int), r.json()  # published with the sign-in
        vid, uid = r.json()["visit"]["id"], r.json()["visit"]["user_id"]
        d = await tap_card(agent, 7001)
        assert d.granted and d.user == uid

        r = await c.post(f"{VIS}/visits/{vid}/sign-out")
        assert r.status_code == 200, r.text
        assert isinstance(r.json()["published"][GW], int), r.json()
        assert (await tap_card(agent, 7001)).reason.value == "unknown_card"

        # seed 003: the day's access request report shows the grant and the refusal at door1
        async with asyncio.timeout(30):
            while True:
                rep = (await c.get("/api/v1/reports/access-requests", params={"reader": f"{GW}/door1"})).json()
                if rep["totals"]["granted"] >= 1 and rep["totals"]["denied"] >= 1:
                    break
                await asyncio.sleep(0.2)
        assert [(x["card"], x["result"]) for x in rep["rows"]][-2:] == [(7001, "granted"), (7001, "denied")]
        assert rep["rows"][-2]["person"] == uid and rep["rows"][-1]["reason"] == "unknown_card"
        r = await c.get("/api/v1/reports/access-requests", params={"person": uid, "format": "csv"})
        assert r.headers["content-type"].startswith("text/csv")
        lines = r.text.strip().split("\r\n")
        assert lines[0].startswith("time,gateway,door") and len(lines) == 2 and "granted" in lines[1]
