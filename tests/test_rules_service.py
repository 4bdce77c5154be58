"""The access rules on the operator side (issue 19): areas, door rules, interlocks, site rules and the reset in the
service's API on SQLite and PostgreSQL, provisioned to a simulated gateway over a real Mosquitto and enforced
there with real pin edges; the planner's per-gateway cut of the rules (pure)."""

# ruff: noqa: F811  (pytest fixtures imported from other test modules are used as parameters)

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx

from cloud_bridge.operator import identity
from cloud_bridge.operator.rules import AccessRules, DoorRules, GatewayRules
from cloud_bridge.service import site
from cloud_bridge.service.app import init_site
from cloud_bridge.service.database import Database
from edge.control import DoorRequest
from edge.model import AntiPassback, Area, Interlock, PutArea, PutDoor, PutGroup, PutInterlock, SiteRules
from edge.pin import verify_pin
from edge.store import Store

from .broker import broker  # noqa: F401
from .mosquitto import Mosquitto
from .postgres import db_url, postgres_server  # noqa: F401
from .service_harness import admin_client, config, running
from .test_agent_sim import ask
from .test_operator_e2e import GW, agent_running, sock_dir, tap_card  # noqa: F401
from .test_service_e2e import _public_key


async def ok(r: httpx.Response, status: int = 200) -> Any:
    assert r.status_code == status, r.text
    return r.json()


async def test_rules_in_the_api_reach_the_gateway_and_the_reset_is_a_signed_command(
    broker: Mosquitto, db_url: str, tmp_path: Path, sock_dir: Path
) -> None:
    cfg = config(db_url, tmp_path)
    await init_site(cfg, site_id="s1", admin="root", tz="Europe/Berlin", host=broker.host, port=broker.port)
    pub = await _public_key(db_url)
    async with (
        agent_running(broker, tmp_path / "gw", sock_dir / "c.sock", pub) as agent,
        running(cfg, provisioning=True, init=False) as svc,
    ):
        db = Database(db_url)
        try:
            svc.setup_link = f"x#{await site.setup_code_for(db, 'root')}"
        finally:
            await db.close()
        client = await admin_client(svc)
        async with asyncio.timeout(30):  # the gateway's birth (and its doors) reach the API
            while not any(g["id"] == GW and g["online"] for g in (await client.get("/api/v1/gateways")).json()):
                await asyncio.sleep(0.1)
        await ok(await client.put("/api/v1/groups/staff", json={"doors": [{"gateway": GW, "door": "door1"}]}))
        await ok(await client.post("/api/v1/users", json={"id": "alice", "cards": [{"card": 1001}],
                                                              "groups": ["staff"]}), 201)  # fmt: skip
        # bad input: named, nothing stored
        r = await client.put(f"/api/v1/gateways/{GW}/doors/door1/rules", json={"to_area": "building"})
        assert r.status_code == 404 and "body.to_area" in r.text, r.text
        r = await client.put("/api/v1/areas/building", json={"anti_passback": "sometimes"})
        assert r.status_code == 400 and "anti_passback" in r.text, r.text
        r = await client.put("/api/v1/areas/building", json={"anti_passback": "hard", "exempt_groups": ["x"]})
        assert r.status_code == 404 and "body.exempt_groups[0]" in r.text, r.text
        assert await ok(await client.get("/api/v1/areas")) == []
        area = await ok(await client.put("/api/v1/areas/building", json={"anti_passback": "hard",
                                                                               "max_occupancy": 10}))  # fmt: skip
        assert area["id"] == "building" and area["anti_passback"] == "hard"
        await ok(await client.put(f"/api/v1/gateways/{GW}/doors/door1/rules", json={"to_area": "building"}))
        r = await client.delete("/api/v1/areas/building")
        assert r.status_code == 409 and "door1" in r.text, r.text
        r = await client.put(f"/api/v1/gateways/{GW}/interlocks/trap", json={"doors": ["door1"]})
        assert r.status_code == 400, r.text
        await ok(await client.put("/api/v1/site-rules", json={"duress": "code", "duress_code": "9111"}))
        rules = await ok(await client.get("/api/v1/site-rules"))
        assert rules == {"duress": "code", "duress_code_set": True}  # the code itself is never shown
        r = await client.post("/api/v1/publish", params={"timeout": 30})
        assert isinstance((await ok(r))["gateways"][GW], int), r.text
        assert agent.decider is not None
        tables = agent.decider.index.tables
        assert tables.areas["building"].anti_passback is AntiPassback.HARD
        assert tables.doors["door1"].to_area == "building"
        assert tables.site_rules is not None and tables.site_rules.duress.value == "code"
        assert tables.site_rules.duress_code_hash is not None
        assert verify_pin("9111", tables.site_rules.duress_code_hash)  # the gateway's own check
        assert "9111" not in (tmp_path / "gw" / "rights.db").read_bytes().decode("latin-1")
        # enforced at the gateway, with real pin edges
        assert (await tap_card(agent, 1001)).granted
        await ask(agent.cfg, DoorRequest(door="door1", action="open"))
        await ask(agent.cfg, DoorRequest(door="door1", action="close"))
        assert (await tap_card(agent, 1001)).reason.value == "anti_passback"
        # the reset: a signed command, answered per gateway
        r = await client.post("/api/v1/areas/reset", json={"user": "alice"})
        assert (await ok(r))["gateways"] == {GW: "ok"}, r.text
        assert (await tap_card(agent, 1001)).granted
        audit = (await ok(await client.get("/api/v1/audit", params={"action": "area.reset"})))["items"]
        assert audit and audit[0]["after"]["user"] == "alice" and audit[0]["outcome"] == "ok"
        # rules removed: back to no rules at the gateway with the next publish
        await ok(await client.put(f"/api/v1/gateways/{GW}/doors/door1/rules", json={}))
        await ok(await client.delete("/api/v1/areas/building"))
        assert isinstance((await ok(await client.post("/api/v1/publish")))["gateways"][GW], int)
        tables = agent.decider.index.tables
        assert tables.areas == {} and tables.doors["door1"].to_area is None
        await client.aclose()


async def test_each_gateway_gets_its_own_cut_of_the_rules(tmp_path: Path) -> None:
    s = identity.SiteModel(
        doors={"gw1": {"d1": "Front", "d2": "Lab"}, "gw2": {"e1": "Back"}},
        groups={"staff": ("Staff", None), "guards": ("Guards", None), "visitors": ("Visitors", None)},
        group_doors={"staff": [("gw1", "d1"), ("gw2", "e1")], "visitors": [("gw1", "d2")]},
        access=AccessRules(
            areas=[Area(id="in", anti_passback=AntiPassback.HARD, exempt_groups=["staff", "guards"]),
                   Area(id="unused")],
            gateways={
                "gw1": GatewayRules(
                    doors={"d1": DoorRules(to_area="in"),
                           "d2": DoorRules(escort_group="guards", visitor_groups=["visitors", "staff-less"])},
                    interlocks=[Interlock(id="trap", doors=["d1", "d2"], rex_overrides=False),
                                Interlock(id="half", doors=["d2", "x9"])]),
                "gw2": GatewayRules(doors={"e1": DoorRules(from_area="in")}),
            },
            site=SiteRules(),
        ),
    )  # fmt: skip
    gw1 = identity.gateway_state(s, "gw1", 1.8e9)
    gw2 = identity.gateway_state(s, "gw2", 1.8e9)
    assert ("group", "guards") in gw1  # no door of gw1, but the escort group is sent: visitors wait for one
    assert gw1[("area", "in")][0].exempt_groups == ["staff", "guards"]
    assert gw1[("door", "d2")][0].escort_group == "guards"
    assert gw1[("door", "d2")][0].visitor_groups == ["visitors"]
    assert gw1[("interlock", "trap")][0].doors == ["d1", "d2"] and ("interlock", "half") not in gw1
    assert ("area", "unused") not in gw1 and ("site_rules", "site") in gw1
    assert gw2[("area", "in")][0].exempt_groups == ["staff"] and gw2[("door", "e1")][0].from_area == "in"
    assert ("group", "guards") not in gw2
    changes = identity.diff(gw1, {})
    kinds = [type(c) for c in changes]
    assert PutArea in kinds and PutInterlock in kinds and PutDoor in kinds and PutGroup in kinds
    snap = identity.snapshot(1, [(k, obj) for (k, _key), (obj, _b) in gw1.items()])
    assert [a.id for a in snap.areas] == ["in"] and [i.id for i in snap.interlocks] == ["trap"]
    for gw, desired in (("gw1", gw1), ("gw2", gw2)):  # each gateway's store takes it (its reference checks pass)
        async with Store(tmp_path / f"{gw}.db", "Europe/Berlin") as store:
            await store.apply(identity.change_set(0, identity.diff(desired, {})))
            assert set(store.index.tables.areas) == {"in"}
