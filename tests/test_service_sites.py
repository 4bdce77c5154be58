"""/api/v1/sites on both databases: the site with its time zone, broker, export settings and gateway counts;
the counts are of the gateways the operator may read (applies-to), `gateway read` is needed (403 naming it),
another site name is 404; the routes are in the OpenAPI document (test_service_api checks every route)."""

# ruff: noqa: F811

from __future__ import annotations

from pathlib import Path

import httpx

from cloud_bridge.permissions import Action, ObjectType, PermissionGroup, grant
from cloud_bridge.service import schema
from cloud_bridge.service.database import Database

from .postgres import db_url, postgres_server  # noqa: F401
from .service_harness import PASSWORD, admin_client, config, login, running
from .test_service_api import _add_operator


async def test_sites_shows_the_site_its_settings_and_the_gateways_one_may_read(db_url: str, tmp_path: Path) -> None:
    async with running(config(db_url, tmp_path)) as svc:
        db = Database(db_url)
        try:
            async with db.write() as c:
                rows = [{"id": "gw1", "online": True}, {"id": "gw2", "online": False}, {"id": "gw3", "online": True}]
                await c.execute(schema.gateways.insert(), rows)
        finally:
            await db.close()
        c = await admin_client(svc)
        assert (await c.put("/api/v1/integrations/identity/settings",
                            json={"deleteUserOnNoAccessToken": False})).status_code == 200  # fmt: skip
        sites = (await c.get("/api/v1/sites")).json()
        assert [s["id"] for s in sites] == ["s1"]
        s1 = (await c.get("/api/v1/sites/s1")).json()
        assert s1 == sites[0]
        assert s1["tz"] == "Europe/Berlin" and s1["gateways"] == 3 and s1["gateways_online"] == 2
        assert s1["settings"] == {"deleteUserOnNoAccessToken": False, "deleteUserOnNoEntitlement": True}
        assert s1["provisioning"] is False and s1["mqtt_port"] == 1883  # no site link here; the key is known
        assert len(s1["command_key"]) == 64 and len(s1["key_fingerprint"]) == 16
        assert (await c.get("/api/v1/sites/elsewhere")).status_code == 404

        # an operator limited to gw1 sees one gateway; one without gateway read is refused, naming it
        code = await _add_operator(db_url, "ann", [PermissionGroup(id="gw1-only", permissions=[
            grant(ObjectType.GATEWAY, Action.READ, applies_to=["gw1"])])], ["gw1-only"])  # fmt: skip
        code2 = await _add_operator(db_url, "bob", [PermissionGroup(id="users-only", permissions=[
            grant(ObjectType.USER, Action.READ)])], ["users-only"])  # fmt: skip
        for oid, setup in (("ann", code), ("bob", code2)):
            async with httpx.AsyncClient(base_url=svc.url, timeout=60) as o:
                r = await o.post("/api/v1/auth/setup", json={"code": setup, "password": PASSWORD})
                assert r.status_code == 200
                await login(o, oid, PASSWORD)
                r = await o.get("/api/v1/sites/s1")
                if oid == "ann":
                    assert r.status_code == 200 and r.json()["gateways"] == 1 and r.json()["gateways_online"] == 1
                else:
                    assert r.status_code == 403 and "gateway" in r.text and "read" in r.text, r.text
        assert (await httpx.AsyncClient(base_url=svc.url).get("/api/v1/sites")).status_code == 401
        await c.aclose()
