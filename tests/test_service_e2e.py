"""End to end on both databases: a user and card created through the HTTP API, published (planned by the
existing planner, signed with the site key), and granted at a real simulated gateway on a real Mosquitto."""

# ruff: noqa: F811

from __future__ import annotations

import asyncio
from pathlib import Path

from cloud_bridge.service import site
from cloud_bridge.service.database import Database
from cloud_bridge.signing import public_bytes

from .broker import broker  # noqa: F401
from .mosquitto import Mosquitto
from .postgres import db_url, postgres_server  # noqa: F401
from .service_harness import PASSPHRASE, admin_client, config, running
from .test_operator_e2e import GW, agent_running, sock_dir, tap_card  # noqa: F401


async def _public_key(db_url: str) -> str:
    db = Database(db_url)
    try:
        async with db.read() as c:
            pem = await site.meta(c, "site_key")
        assert pem is not None
        return public_bytes(site.decrypt_key(pem, PASSPHRASE)).hex()
    finally:
        await db.close()


async def test_user_and_card_via_the_api_are_granted_at_the_gateway(
    broker: Mosquitto, db_url: str, tmp_path: Path, sock_dir: Path
) -> None:
    cfg = config(db_url, tmp_path)
    from cloud_bridge.service.app import init_site

    await init_site(cfg, site_id="s1", admin="root", tz="Europe/Berlin", host=broker.host, port=broker.port)
    pub = await _public_key(db_url)
    async with agent_running(broker, tmp_path / "gw", sock_dir / "c.sock", pub) as agent:
        link = ""
        async with running(cfg, provisioning=True, init=False) as svc:
            db = Database(db_url)
            try:
                link = await site.setup_code_for(db, "root")
            finally:
                await db.close()
            svc.setup_link = f"x#{link}"
            client = await admin_client(svc)
            async with asyncio.timeout(30):  # the gateway's birth reaches the API
                while not any(g["id"] == GW and g["online"] for g in (await client.get("/api/v1/gateways")).json()):
                    await asyncio.sleep(0.1)
            r = await client.put("/api/v1/groups/staff", json={"doors": [{"gateway": GW, "door": "door1"}]})
            assert r.status_code == 200, r.text
            r = await client.post("/api/v1/users", json={"id": "alice", "cards": [{"card": 1001}], "groups": ["staff"]})
            assert r.status_code == 201, r.text
            r = await client.post("/api/v1/publish", params={"timeout": 30})
            assert r.status_code == 200, r.text
            version = r.json()["gateways"][GW]
            assert isinstance(version, int) and version >= 1, r.json()
            d = await tap_card(agent, 1001)
            assert d.granted and d.user == "alice"
            gw = (await client.get(f"/api/v1/gateways/{GW}")).json()
            assert gw["acked"] == version and gw["online"]
            # deactivate through the API: denied after the next publish
            assert (await client.patch("/api/v1/users/alice", json={"active": False})).status_code == 200
            assert isinstance((await client.post("/api/v1/publish")).json()["gateways"][GW], int)
            assert (await tap_card(agent, 1001)).reason.value == "user_inactive"
            await client.aclose()
