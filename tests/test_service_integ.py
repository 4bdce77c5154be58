"""The integration API on both databases, over real HTTP: the identity manager's connector (seed 000) and
visitor management (seed 004), their idempotent PUTs, export rules, validation and permissions."""

# ruff: noqa: F811

from __future__ import annotations

import time
from pathlib import Path

import httpx
import msgspec

from cloud_bridge.permissions import Action, ObjectType, Operator, PermissionGroup, deny, grant
from cloud_bridge.service import auth, schema
from cloud_bridge.service.auth import Passwords
from cloud_bridge.service.database import Database

from .postgres import db_url, postgres_server  # noqa: F401
from .service_harness import PASSWORD, admin_client, config, login, running

ID = "/api/v1/integrations/identity"
VIS = "/api/v1/visitors"


async def announce(db_url: str, gw: str, doors: dict[str, str]) -> None:
    """What a gateway's birth leaves in the database (the gateway and the doors it announced)."""
    db = Database(db_url)
    try:
        async with db.write() as c:
            await c.execute(schema.gateways.insert().values(id=gw, online=True))
            await c.execute(schema.doors.insert(), [{"gateway": gw, "id": d, "name": n} for d, n in doors.items()])
    finally:
        await db.close()


async def add_operator(cfg_db: str, cfg: object, oid: str, group: PermissionGroup) -> None:
    """An operator in one permission group, with the test password (through the data layer)."""
    db = Database(cfg_db)
    try:
        async with db.write() as c:
            await c.execute(schema.permission_groups.insert().values(id=group.id, body=msgspec.json.encode(group)))
            op = Operator(id=oid, groups=[group.id])
            await c.execute(schema.operators.insert().values(id=oid, body=msgspec.json.encode(op)))
            await auth.set_password(c, Passwords(cfg.auth), oid, PASSWORD)  # type: ignore[attr-defined]
    finally:
        await db.close()


async def audit_count(client: httpx.AsyncClient, action: str) -> int:
    r = await client.get("/api/v1/audit", params={"action": action, "limit": 1000})
    assert r.status_code == 200, r.text
    return len(r.json()["items"])


async def test_identity_connector_puts_are_idempotent_and_report_the_export(db_url: str, tmp_path: Path) -> None:
    cfg = config(db_url, tmp_path)
    async with running(cfg) as svc:
        await announce(db_url, "gw1", {"front": "Front door", "lab": "Lab"})
        c = await admin_client(svc)
        assert (await c.put("/api/v1/groups/staff", json={"name": "Staff", "doors": [
            {"gateway": "gw1", "door": "front"}, {"gateway": "gw2", "door": "side"}]})).status_code == 200  # fmt: skip

        # the entitlements to import: groups with the doors they open (announced by a birth or not)
        r = await c.get(f"{ID}/entitlements")
        assert r.status_code == 200, r.text
        assert r.json() == [{"id": "staff", "name": "Staff", "schedule": None, "tags": [], "doors": [
            {"gateway": "gw1", "door": "front", "name": "Front door", "announced": True},
            {"gateway": "gw2", "door": "side", "name": "", "announced": False}]}]  # fmt: skip

        # a user, then its token and a time-bound entitlement assignment, each PUT twice
        body = {"name": "Ada Lovelace", "valid_until": time.time() + 86400}
        r1 = await c.put(f"{ID}/users/E-1001", json=body)
        r2 = await c.put(f"{ID}/users/E-1001", json=body)
        assert r1.status_code == r2.status_code == 200, r1.text
        assert r1.json() == r2.json()
        assert r1.json()["export"] == {
            "exported": False,
            "gateways": [],
            "not_exported": {"*": "no active access token (deleteUserOnNoAccessToken)"},
        }
        assert await audit_count(c, "identity.user.put") == 1

        r = await c.put(f"{ID}/tokens/4242", json={"user_id": "E-1001", "status": "ACTIVE"})
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "active"
        assert r.json()["export"]["not_exported"] == {"*": "no active entitlement assignment here "
                                                           "(deleteUserOnNoEntitlement)"}  # fmt: skip
        start, end = time.time() - 60, time.time() + 3600
        a = {"user_id": "E-1001", "entitlement": "staff", "valid_from": start, "valid_until": end}
        r1 = await c.put(f"{ID}/assignments/A-1", json=a)
        r2 = await c.put(f"{ID}/assignments/A-1", json=a)
        assert r1.status_code == r2.status_code == 200, r1.text
        assert r1.json() == r2.json()
        assert r1.json()["active"] is True
        assert r1.json()["export"] == {"exported": True, "gateways": ["gw1"], "not_exported": {}}
        assert await audit_count(c, "identity.assignment.put") == 1
        u = (await c.get(f"{ID}/users/E-1001")).json()
        assert u["tokens"] == [4242] and u["assignments"] == ["A-1"] and u["export"]["exported"]
        # the PUT of the user keeps its tokens and assignments
        assert (await c.put(f"{ID}/users/E-1001", json={"name": "Ada King"})).json()["tokens"] == [4242]
        people = (await c.get("/api/v1/users/E-1001")).json()
        assert people["groups"] == ["staff"] and people["cards"][0]["card"] == 4242

        # the token suspended: not exported (rule on); the rule off: exported all the same
        r = await c.put(f"{ID}/tokens/4242", json={"user_id": "E-1001", "status": "SUSPENDED"})
        assert r.json()["export"]["exported"] is False
        r = await c.put(f"{ID}/settings", json={"deleteUserOnNoAccessToken": False,
                                                "deleteUserOnNoEntitlement": True})  # fmt: skip
        assert r.status_code == 200, r.text
        assert (await c.get(f"{ID}/settings")).json() == {"deleteUserOnNoAccessToken": False,
                                                          "deleteUserOnNoEntitlement": True}  # fmt: skip
        assert (await c.get(f"{ID}/users/E-1001")).json()["export"]["exported"] is True
        # an assignment that ended: gone from the export (rule on)
        r = await c.put(f"{ID}/assignments/A-1", json={**a, "valid_from": start - 7200, "valid_until": start})
        assert r.json()["active"] is False and r.json()["export"]["exported"] is False
        r = await c.put(f"{ID}/settings", json={"deleteUserOnNoAccessToken": False, "deleteUserOnNoEntitlement": False})
        assert (await c.get(f"{ID}/users/E-1001")).json()["export"]["exported"] is True

        # bad input: named, nothing applied
        r = await c.put(f"{ID}/tokens/4243", json={"user_id": "nobody"})
        assert r.status_code == 404 and "body.user_id" in r.json()["detail"]
        r = await c.put(f"{ID}/tokens/4243", json={"user_id": "E-1001", "status": "mislaid"})
        assert r.status_code == 400 and r.json()["field"] == "body.status"
        r = await c.put(f"{ID}/assignments/A-2", json={**a, "valid_from": end, "valid_until": start})
        assert r.status_code == 400 and r.json()["field"] == "body.valid_until"
        r = await c.put(f"{ID}/assignments/A-2", json={**a, "entitlement": "nope"})
        assert r.status_code == 404 and "body.entitlement" in r.json()["detail"]
        r = await c.put(f"{ID}/users/bad%20id", json={})
        assert r.status_code == 400 and r.json()["field"] == "path.uid"
        r = await c.put(f"{ID}/settings", json={"deleteUserOnNoAccessToken": "no"})
        assert r.status_code == 400 and r.json()["field"] == "body.deleteUserOnNoAccessToken"
        assert (await c.get(f"{ID}/users/E-1001")).json()["tokens"] == [4242]
        assert (await c.get(f"{ID}/users/E-1001")).json()["assignments"] == ["A-1"]

        # deletes
        assert (await c.delete(f"{ID}/assignments/A-1")).status_code == 200
        assert (await c.delete(f"{ID}/tokens/4242")).status_code == 200
        assert (await c.get(f"{ID}/users/E-1001")).json()["tokens"] == []
        assert (await c.delete(f"{ID}/users/E-1001")).status_code == 200
        assert (await c.get(f"{ID}/users/E-1001")).status_code == 404
        await c.aclose()


async def test_a_connector_token_is_limited_to_its_permissions(db_url: str, tmp_path: Path) -> None:
    cfg = config(db_url, tmp_path)
    async with running(cfg) as svc:
        admin = await admin_client(svc)
        # a connector that may manage people and cards, and read groups, but not change settings
        await add_operator(db_url, cfg, "idm", PermissionGroup(id="connector", permissions=[
            grant(ObjectType.USER, *Action), grant(ObjectType.CREDENTIAL, *Action),
            grant(ObjectType.GROUP, Action.READ), grant(ObjectType.GATEWAY, Action.READ)]))  # fmt: skip
        s = httpx.AsyncClient(base_url=svc.url, timeout=30)
        await login(s, "idm", PASSWORD)
        r = await s.post("/api/v1/tokens", json={"name": "connector", "expires_days": 1})
        assert r.status_code == 201, r.text
        token, tid = r.json()["token"], r.json()["id"]
        t = httpx.AsyncClient(base_url=svc.url, timeout=30, headers={"authorization": f"Bearer {token}"})
        assert (await t.put(f"{ID}/users/E-1", json={"name": "x"})).status_code == 200
        assert (await t.get(f"{ID}/settings")).status_code == 200
        r = await t.put(f"{ID}/settings", json={"deleteUserOnNoAccessToken": False})
        assert r.status_code == 403 and r.json()["missing"]["action"] == "update"
        assert (await admin.get(f"{ID}/settings")).json()["deleteUserOnNoAccessToken"] is True
        # revoked: refused at once
        assert (await s.delete(f"/api/v1/tokens/{tid}")).status_code == 200
        assert (await t.put(f"{ID}/users/E-1", json={"name": "y"})).status_code == 401
        for x in (admin, s, t):
            await x.aclose()


async def test_visitor_api_badges_visits_and_validation(db_url: str, tmp_path: Path) -> None:
    cfg = config(db_url, tmp_path)
    async with running(cfg) as svc:
        await announce(db_url, "gw1", {"front": "Front door"})
        c = await admin_client(svc)
        assert (await c.put("/api/v1/groups/guests", json={"name": "Guests", "doors": [
            {"gateway": "gw1", "door": "front"}]})).status_code == 200  # fmt: skip
        r = await c.get(f"{VIS}/test-connection")
        assert r.status_code == 200, r.text
        assert r.json()["ok"] and r.json()["site"] == "s1" and r.json()["gateways"][0]["id"] == "gw1"
        assert [g["id"] for g in (await c.get(f"{VIS}/cardholder-groups")).json()] == ["guests"]

        # numeric-only badge ids (seed 004): anything else is a validation error
        r = await c.put(f"{VIS}/badges/12A", json={"location": "hq"})
        assert r.status_code == 400 and r.json()["field"] == "path.badge" and "not numeric" in r.json()["detail"]
        r = await c.put(f"{VIS}/badges/900001", json={"location": "hq", "name": "Visitor 1", "type": "visitor"})
        assert r.status_code == 200, r.text
        assert r.json()["visit"] is None
        # a badge number is unique on the site: not also a person's card
        r = await c.post("/api/v1/users", json={"id": "bob", "cards": [{"card": 900001}]})
        assert r.status_code == 409 and "badge pool hq" in r.json()["detail"]

        r = await c.post(f"{VIS}/visits", json={"visitor": "Grace Hopper", "location": "hq", "badge": 900001,
                                                "groups": ["guests"]})  # fmt: skip
        assert r.status_code == 201, r.text
        v = r.json()["visit"]
        assert v["state"] == "on_site" and v["groups"] == ["guests"] and v["user_id"] == f"visit-{v['id']}"
        assert r.json()["published"] is None  # no provisioning in this test: nothing sent, and said so
        assert v["ends"] > time.time() and v["ends"] - time.time() <= 86400 + 3600
        badge = (await c.get(f"{VIS}/badges", params={"location": "hq"})).json()[0]
        assert badge["visit"] == v["id"] and badge["visitor"] == "Grace Hopper"
        # in use: a second visit with it is refused; unknown group and wrong location named
        again = {"visitor": "X", "location": "hq", "badge": 900001, "groups": ["guests"]}
        assert (await c.post(f"{VIS}/visits", json=again)).status_code == 409
        await c.put(f"{VIS}/badges/900002", json={"location": "lobby"})
        r = await c.post(f"{VIS}/visits", json={**again, "badge": 900002})
        assert r.status_code == 400 and r.json()["field"] == "body.badge"
        r = await c.post(f"{VIS}/visits", json={**again, "badge": 900002, "location": "lobby", "groups": ["nope"]})
        assert r.status_code == 404 and "body.groups[0]" in r.json()["detail"]
        r = await c.post(f"{VIS}/visits", json={**again, "badge": 900002, "location": "lobby", "groups": []})
        assert r.status_code == 400 and r.json()["field"] == "body.groups"
        r = await c.post(f"{VIS}/visits", json={**again, "badge": 900002, "location": "lobby", "until": 1.0})
        assert r.status_code == 400 and r.json()["field"] == "body.until"
        today = (await c.get(f"{VIS}/visits")).json()
        assert [x["visitor"] for x in today] == ["Grace Hopper"]

        r = await c.post(f"{VIS}/visits/{v['id']}/sign-out")
        assert r.status_code == 200, r.text
        assert r.json()["visit"]["state"] == "signed_out"
        assert (await c.get(f"/api/v1/users/{v['user_id']}")).status_code == 404  # the badge is free
        assert (await c.get(f"{VIS}/badges", params={"location": "hq"})).json()[0]["visit"] is None
        assert (await c.post(f"{VIS}/visits/{v['id']}/sign-out")).status_code == 409
        assert await audit_count(c, "visit.sign_in") == 1 and await audit_count(c, "visit.sign_out") == 1
        await c.aclose()


async def test_a_receptionist_is_held_to_its_locations_and_groups(db_url: str, tmp_path: Path) -> None:
    cfg = config(db_url, tmp_path)
    async with running(cfg) as svc:
        await announce(db_url, "gw1", {"front": "Front door", "vault": "Vault"})
        c = await admin_client(svc)
        await c.put("/api/v1/groups/guests", json={"doors": [{"gateway": "gw1", "door": "front"}]})
        await c.put("/api/v1/groups/vault", json={"tags": ["secure"], "doors": [{"gateway": "gw1", "door": "vault"}]})
        for card, loc in ((900001, "lobby"), (900002, "hq")):
            assert (await c.put(f"{VIS}/badges/{card}", json={"location": loc})).status_code == 200
        # visitors, the lobby's pool only, every group but those tagged secure (a deny line wins)
        await add_operator(db_url, cfg, "desk", PermissionGroup(id="lobby-desk", permissions=[
            grant(ObjectType.VISITOR, Action.CREATE, Action.READ, Action.UPDATE),
            grant(ObjectType.BADGE_POOL, Action.READ, applies_to=["badge_pool:lobby"]),
            grant(ObjectType.GROUP, Action.READ), deny(ObjectType.GROUP, Action.READ, tags=["secure"])]))  # fmt: skip
        d = httpx.AsyncClient(base_url=svc.url, timeout=30)
        await login(d, "desk", PASSWORD)
        assert [g["id"] for g in (await d.get(f"{VIS}/cardholder-groups")).json()] == ["guests"]
        assert [b["card"] for b in (await d.get(f"{VIS}/badges")).json()] == [900001]
        visit = {"visitor": "V", "location": "hq", "badge": 900002, "groups": ["guests"]}
        r = await d.post(f"{VIS}/visits", json=visit)
        assert r.status_code == 403 and r.json()["missing"] == {"action": "read", "object_type": "badge_pool",
                                                                "object_id": "hq"}  # fmt: skip
        r = await d.post(f"{VIS}/visits", json={**visit, "location": "lobby", "badge": 900001, "groups": ["vault"]})
        assert r.status_code == 403 and r.json()["missing"]["object_id"] == "vault"
        r = await d.put(f"{VIS}/badges/900003", json={"location": "lobby"})
        assert r.status_code == 403 and r.json()["missing"]["object_type"] == "badge_pool"
        assert (await d.get(f"{VIS}/visits")).json() == []  # nothing was applied
        r = await d.post(f"{VIS}/visits", json={**visit, "location": "lobby", "badge": 900001})
        assert r.status_code == 201, r.text
        # refusals are in the audit log
        denied = [e for e in (await c.get("/api/v1/audit", params={"actor": "desk"})).json()["items"]
                  if e["outcome"] == "denied"]  # fmt: skip
        assert len(denied) == 3
        await d.aclose()
        await c.aclose()
