"""CSV import over the API on both databases (seed 001's bulk load): upload, column mapping, dry-run with
the per-row report (nothing applied), commit in one transaction (a bad row, or a conflict arising after the
dry-run: nothing applied), progress, permissions per row; then a good file published and its people granted
at a real simulated gateway on a real Mosquitto."""

# ruff: noqa: F811, E501

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx

from cloud_bridge.service import site
from cloud_bridge.service.database import Database

from .broker import broker  # noqa: F401
from .mosquitto import Mosquitto
from .postgres import db_url, postgres_server  # noqa: F401
from .service_harness import PASSWORD, admin_client, config, login, running
from .test_operator_e2e import GW, agent_running, sock_dir, tap_card  # noqa: F401
from .test_service_e2e import _public_key

COLUMNS = {"id": "Employee", "name": "Full name", "card": "Card ID", "groups": "Access groups"}
GOOD = "Employee,Full name,Card ID,Access groups,Notes\nalice,Alice A,1001,staff,x\nbob,Bob B,1002,,\ncarol,Carol,1003,staff;night,\n"


async def wait_job(c: httpx.AsyncClient, jid: str, *states: str) -> dict[str, Any]:
    async with asyncio.timeout(120):
        while True:
            j = (await c.get(f"/api/v1/imports/{jid}")).json()
            if j["state"] in states or j["state"] == "failed":
                assert j["state"] in states, j
                return j
            await asyncio.sleep(0.05)


async def upload(c: httpx.AsyncClient, text: str | bytes, **params: str) -> dict[str, Any]:
    r = await c.post("/api/v1/imports", content=text.encode() if isinstance(text, str) else text,
                     params={"filename": "users.csv", **params}, headers={"content-type": "text/csv"})  # fmt: skip
    assert r.status_code == 201, r.text
    j: dict[str, Any] = r.json()
    return j


async def test_upload_map_dry_run_commit_all_or_nothing(db_url: str, tmp_path: Path) -> None:
    async with running(config(db_url, tmp_path)) as svc:
        c = await admin_client(svc)
        for g in ("staff", "night", "visitors"):
            assert (await c.put(f"/api/v1/groups/{g}", json={})).status_code == 200
        assert (await c.post("/api/v1/users", json={"id": "dave", "cards": [{"card": 2002}]})).status_code == 201

        bad = GOOD + "erin,Erin,2002,staff,\nfrank,Frank,12x,ghost,\n"
        j = await upload(c, "\ufeff" + bad)
        assert j["columns"] == ["Employee", "Full name", "Card ID", "Access groups", "Notes"]
        assert j["suggested"]["card"] == "Card ID" and j["suggested"]["name"] == "Full name"
        jid = j["id"]
        # a mapping that does not fit the file is 400 naming it
        for cols, word in (({"id": "Employee"}, "card"), ({**COLUMNS, "card": "Nope"}, "Nope"),
                           ({**COLUMNS, "colour": "Notes"}, "colour"), ({**COLUMNS, "name": "Employee"}, "two")):  # fmt: skip
            r = await c.post(f"/api/v1/imports/{jid}/dry-run", json={"columns": cols})
            assert r.status_code == 400 and word in r.json()["detail"] and r.json()["field"] == "body.columns"
        r = await c.post(f"/api/v1/imports/{jid}/dry-run", json={"columns": COLUMNS, "defaults": {"groups": ["ghost"]}})
        assert r.status_code == 404 and "body.defaults.groups[0]" in r.json()["detail"]
        r = await c.post(
            f"/api/v1/imports/{jid}/dry-run", json={"columns": COLUMNS, "defaults": {"groups": ["visitors"]}}
        )
        assert r.status_code == 202, r.text
        j = await wait_job(c, jid, "invalid")
        rep = j["report"]
        assert not rep["ok"] and rep["rows"] == 0 and rep["problem_count"] == 3
        got = {(p["row"], p["field"], p["column"]) for p in rep["problems"]}
        assert got == {(5, "card", "Card ID"), (6, "card", "Card ID"), (6, "groups", "Access groups")}, rep
        msg = next(p["message"] for p in rep["problems"] if p["row"] == 5)
        assert "card 2002 is already assigned to user 'dave'" in msg
        assert j["progress"]["phase"] == "validated"
        r = await c.post(f"/api/v1/imports/{jid}/commit", json={"publish": False})
        assert r.status_code == 409 and "dry-run" in r.json()["detail"]
        users = [u["id"] for u in (await c.get("/api/v1/users")).json()["items"]]
        assert users == ["dave"]  # nothing applied

        # the good file: clean dry-run; then a card of it is taken before the commit: nothing applied
        jid = (await upload(c, GOOD))["id"]
        assert (await c.post(f"/api/v1/imports/{jid}/dry-run", json={"columns": COLUMNS, "defaults": {
            "groups": ["visitors"], "offline_access": True}})).status_code == 202  # fmt: skip
        j = await wait_job(c, jid, "validated")
        assert j["report"] == {"ok": True, "rows": 3, "problem_count": 0, "problems": []}
        assert (await c.post("/api/v1/cards", json={"card": 1003, "user_id": "dave"})).status_code == 201
        assert (await c.post(f"/api/v1/imports/{jid}/commit", json={"publish": False})).status_code == 202
        j = await wait_job(c, jid, "invalid")
        assert [(p["row"], p["field"]) for p in j["report"]["problems"]] == [(4, "card")]
        assert [u["id"] for u in (await c.get("/api/v1/users")).json()["items"]] == ["dave"]
        assert (await c.delete("/api/v1/cards/1003")).status_code == 200

        # dry-run again, commit: every row with its card, groups and the bulk settings, in one go
        assert (await c.post(f"/api/v1/imports/{jid}/dry-run", json={"columns": COLUMNS, "defaults": {
            "groups": ["visitors"], "offline_access": True}})).status_code == 202  # fmt: skip
        await wait_job(c, jid, "validated")
        assert (await c.post(f"/api/v1/imports/{jid}/commit", json={"publish": False})).status_code == 202
        j = await wait_job(c, jid, "done")
        assert j["result"] == {"imported": 3} and j["progress"] == {"phase": "done", "done": 3, "total": 3}
        carol = (await c.get("/api/v1/users/carol")).json()
        assert carol["name"] == "Carol" and carol["cards"][0]["card"] == 1003 and carol["offline_access"]
        assert carol["groups"] == ["night", "staff", "visitors"] and carol["active"]
        assert (await c.post(f"/api/v1/imports/{jid}/commit", json={})).status_code == 409  # once
        entry = (await c.get("/api/v1/audit", params={"action": "user.import"})).json()["items"][0]
        assert entry["after"]["rows"] == 3 and entry["object_id"] == "users.csv"

        # a file that is not UTF-8: the report names the line; a bad encoding name is 400
        jid = (await upload(c, "Employee,Card ID\nren\xe9,7\n".encode("latin-1")))["id"]
        r = await c.post(f"/api/v1/imports/{jid}/dry-run", json={"columns": {"id": "Employee", "card": "Card ID"}})
        assert r.status_code == 202
        p = (await wait_job(c, jid, "invalid"))["report"]["problems"]
        assert [(x["row"], x["field"]) for x in p] == [(2, "(file)")] and "byte 0xE9" in p[0]["message"]
        r = await c.post("/api/v1/imports", content=b"a,b\n", params={"encoding": "klingon"})
        assert r.status_code == 400 and r.json()["field"] == "query.encoding"
        assert (await c.post("/api/v1/imports", content=b"")).status_code == 400

        # per-row permissions; another operator's job is not theirs to see
        db = Database(db_url)
        try:
            from cloud_bridge.permissions import Action, ObjectType, PermissionGroup, deny, grant

            from .test_service_api import _add_operator

            g = PermissionGroup(id="loader", permissions=[
                grant(ObjectType.USER, Action.CREATE, Action.READ), grant(ObjectType.CREDENTIAL, Action.CREATE),
                deny(ObjectType.USER, Action.CREATE, applies_to=["user:zed"])])  # fmt: skip
            code = await _add_operator(db_url, "loader", [g], ["loader"])
        finally:
            await db.close()
        async with httpx.AsyncClient(base_url=svc.url, timeout=60) as lo:
            assert (await lo.post("/api/v1/auth/setup", json={"code": code, "password": PASSWORD})).status_code == 200
            await login(lo, "loader", PASSWORD)
            assert (await lo.get(f"/api/v1/imports/{jid}")).status_code == 404
            j2 = await upload(lo, "id,card\nyan,3001\nzed,3002\n")
            assert (
                await lo.post(f"/api/v1/imports/{j2['id']}/dry-run", json={"columns": {"id": "id", "card": "card"}})
            ).status_code == 202
            j2 = await wait_job(lo, j2["id"], "invalid")
            assert [(p["row"], p["field"]) for p in j2["report"]["problems"]] == [(3, "id")]
            assert "may not create user 'zed'" in j2["report"]["problems"][0]["message"]
        await c.aclose()


async def test_imported_people_are_granted_at_the_gateway(broker: Mosquitto, db_url: str, tmp_path: Path,
                                                          sock_dir: Path) -> None:  # fmt: skip
    cfg = config(db_url, tmp_path)
    from cloud_bridge.service.app import init_site

    await init_site(cfg, site_id="s1", admin="root", tz="Europe/Berlin", host=broker.host, port=broker.port)
    pub = await _public_key(db_url)
    async with agent_running(broker, tmp_path / "gw", sock_dir / "c.sock", pub) as agent, \
            running(cfg, provisioning=True, init=False) as svc:  # fmt: skip
        db = Database(db_url)
        try:
            svc.setup_link = f"x#{await site.setup_code_for(db, 'root')}"
        finally:
            await db.close()
        c = await admin_client(svc)
        async with asyncio.timeout(30):
            while not any(g["id"] == GW and g["online"] for g in (await c.get("/api/v1/gateways")).json()):
                await asyncio.sleep(0.1)
        assert (
            await c.put("/api/v1/groups/staff", json={"doors": [{"gateway": GW, "door": "door1"}]})
        ).status_code == 200
        assert (await c.put("/api/v1/groups/night", json={})).status_code == 200
        jid = (await upload(c, GOOD))["id"]
        assert (await c.post(f"/api/v1/imports/{jid}/dry-run", json={"columns": COLUMNS})).status_code == 202
        await wait_job(c, jid, "validated")
        assert (await c.post(f"/api/v1/imports/{jid}/commit", json={"publish": True, "timeout": 30})).status_code == 202
        j = await wait_job(c, jid, "done")
        version = j["result"]["published"][GW]
        assert isinstance(version, int) and version >= 1, j
        assert (await c.get(f"/api/v1/gateways/{GW}")).json()["acked"] == version
        d = await tap_card(agent, 1001)
        assert d.granted and d.user == "alice"
        assert (await tap_card(agent, 1002)).granted is False  # bob: no group opens door1
        await c.aclose()


async def test_jobs_survive_a_restart_and_one_cut_off_is_marked_interrupted(db_url: str, tmp_path: Path) -> None:
    """Jobs are in the database: a validated job is still there after a restart (file, mapping, report) and
    commits then; a job the stop cut off (its row says committing or publishing, as the commit's POST and the
    publish write it before they start) is failed after the restart, saying what that means; nothing of the
    cut-off commit was applied (its transaction never committed)."""
    from sqlalchemy import update

    from cloud_bridge.service import schema

    cfg = config(db_url, tmp_path)
    async with running(cfg) as svc:
        c = await admin_client(svc)
        for g in ("staff", "night"):
            assert (await c.put(f"/api/v1/groups/{g}", json={})).status_code == 200
        kept = (await upload(c, GOOD))["id"]
        assert (await c.post(f"/api/v1/imports/{kept}/dry-run", json={"columns": COLUMNS})).status_code == 202
        before = await wait_job(c, kept, "validated")
        cut = (await upload(c, "Employee,Card ID\nxavier,5001\n"))["id"]
        cols = {"id": "Employee", "card": "Card ID"}
        assert (await c.post(f"/api/v1/imports/{cut}/dry-run", json={"columns": cols})).status_code == 202
        await wait_job(c, cut, "validated")
        pub = (await upload(c, "Employee,Card ID\nyvonne,5002\n"))["id"]
        await c.aclose()
    db = Database(db_url)  # the service stopped while one commit and one publish ran (a kill, a power cut)
    try:
        j = schema.import_jobs
        async with db.write() as w:
            await w.execute(update(j).where(j.c.id == cut).values(state="committing", phase="writing"))
            await w.execute(update(j).where(j.c.id == pub).values(state="publishing", phase="publishing"))
    finally:
        await db.close()
    async with running(cfg, init=False) as svc, httpx.AsyncClient(base_url=svc.url, timeout=60) as c:
        await login(c, "root", PASSWORD)
        after = (await c.get(f"/api/v1/imports/{kept}")).json()
        assert after["state"] == "validated" and after["report"] == before["report"]
        assert after["mapping"] == COLUMNS and after["columns"] == before["columns"]
        failed = (await c.get(f"/api/v1/imports/{cut}")).json()
        assert failed["state"] == "failed" and failed["progress"]["phase"] == "interrupted"
        assert "interrupted" in failed["error"] and "nothing was imported" in failed["error"]
        assert (await c.get("/api/v1/users/xavier")).status_code == 404
        assert (await c.post(f"/api/v1/imports/{cut}/commit", json={"publish": False})).status_code == 409
        p = (await c.get(f"/api/v1/imports/{pub}")).json()
        assert p["state"] == "failed" and "publish again" in p["error"]
        # the kept job commits after the restart, from its stored file and mapping
        assert (await c.post(f"/api/v1/imports/{kept}/commit", json={"publish": False})).status_code == 202
        done = await wait_job(c, kept, "done")
        assert done["result"] == {"imported": 3}
        assert (await c.get("/api/v1/users/carol")).json()["cards"][0]["card"] == 1003
        # a deleted job is gone from the database too
        assert (await c.delete(f"/api/v1/imports/{cut}")).status_code == 200
        assert (await c.get(f"/api/v1/imports/{cut}")).status_code == 404
