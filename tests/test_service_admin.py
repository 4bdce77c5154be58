"""Site administration over real HTTP on both databases: schedules with holidays (validated, used by groups),
assignments with windows and a user's effective access, deleting a user (card freed); operators and
permission groups through the API (re-authentication, deny wins, tags, applies-to, no self-escalation);
the audit log's filters and CSV export."""

# ruff: noqa: F811

from __future__ import annotations

import csv
import io
import time
from pathlib import Path

import httpx

from .postgres import db_url, postgres_server  # noqa: F401
from .service_harness import PASSWORD, admin_client, config, login, running

WEEKDAYS = [{"day": d, "start": "08:00", "end": "18:00"} for d in range(5)]


async def test_schedules_groups_assignments_and_effective_access(db_url: str, tmp_path: Path) -> None:
    async with running(config(db_url, tmp_path)) as svc:
        c = await admin_client(svc)
        # validation: each error names its field, nothing is stored
        bad = [
            ({"intervals": [{"day": 7, "start": "08:00", "end": "18:00"}]}, "body.intervals[0].day"),
            ({"intervals": [{"day": 1, "start": "18:00", "end": "08:00"}]}, "body.intervals[0].end"),
            ({"intervals": [{"day": 1, "start": "8:00", "end": "18:00"}]}, "body.intervals[0].start"),
            ({"holidays": ["2026-12-25", "2026-12-25"]}, "body.holidays[1]"),
            ({"holidays": ["2026-13-01"]}, "body.holidays[0]"),
            ({"tz": "Mars/Olympus"}, "body.tz"),
            ({"colour": "red"}, "body"),
        ]
        for body, field in bad:
            r = await c.put("/api/v1/schedules/office", json=body)
            assert r.status_code == 400 and r.json()["field"].startswith(field), (body, r.json())
        assert (await c.get("/api/v1/schedules/office")).status_code == 404
        r = await c.put("/api/v1/schedules/office", json={
            "name": "Office hours", "intervals": WEEKDAYS, "holidays": ["2026-12-25", "2026-12-24"],
            "holiday_intervals": [{"start": "10:00", "end": "12:00"}]})  # fmt: skip
        assert r.status_code == 200, r.text
        assert r.json()["holidays"] == ["2026-12-24", "2026-12-25"] and r.json()["groups"] == []
        # a group that names an unknown schedule is refused; one that names "office" is listed as its user
        r = await c.put("/api/v1/groups/staff", json={"schedule": "nope", "doors": []})
        assert r.status_code == 404 and "body.schedule" in r.json()["detail"]
        doors = [
            {"gateway": "gw1", "door": "front"},
            {"gateway": "gw1", "door": "lab"},
            {"gateway": "gw2", "door": "gate"},
        ]
        assert (await c.put("/api/v1/groups/staff", json={"schedule": "office", "doors": doors})).status_code == 200
        assert (
            await c.put("/api/v1/groups/night", json={"doors": [{"gateway": "gw2", "door": "gate"}]})
        ).status_code == 200
        assert (await c.get("/api/v1/schedules/office")).json()["groups"] == ["staff"]
        r = await c.delete("/api/v1/schedules/office")
        assert r.status_code == 409 and "staff" in r.json()["detail"]

        assert (
            await c.post("/api/v1/users", json={"id": "alice", "cards": [{"card": 1001}], "groups": ["staff"]})
        ).status_code == 201
        now = time.time()
        # a window: from tomorrow for a week; the same window twice is a conflict; until before from is refused
        win = {"group": "night", "valid_from": now + 86400, "valid_until": now + 8 * 86400}
        r = await c.post("/api/v1/users/alice/assignments", json=win)
        assert r.status_code == 201, r.text
        aid = r.json()["id"]
        assert (await c.post("/api/v1/users/alice/assignments", json=win)).status_code == 409
        r = await c.post("/api/v1/users/alice/assignments", json={**win, "valid_until": now})
        assert r.status_code == 400 and r.json()["field"] == "body.valid_until"
        r = await c.post("/api/v1/users/alice/assignments", json={"group": "ghost"})
        assert r.status_code in (403, 404)
        assert (await c.post("/api/v1/users/nobody/assignments", json={"group": "night"})).status_code == 404
        listed = (await c.get("/api/v1/users/alice/assignments")).json()
        assert [(a["group"], a["valid_from"]) for a in listed] == [("night", win["valid_from"]), ("staff", None)]

        acc = (await c.get("/api/v1/users/alice/access")).json()
        assert acc["usable_cards"] == [1001] and acc["blocked"] == []
        lines = {(d["gateway"], d["door"], d["group"]): d for d in acc["doors"]}
        assert set(lines) == {("gw1", "front", "staff"), ("gw1", "lab", "staff"), ("gw2", "gate", "staff"),
                              ("gw2", "gate", "night")}  # fmt: skip
        assert lines[("gw1", "front", "staff")]["schedule"] == "office"
        assert lines[("gw1", "front", "staff")]["when"].startswith("Mon 08:00-18:00")
        assert "2 holiday(s): 10:00-12:00" in lines[("gw1", "front", "staff")]["when"]
        night = lines[("gw2", "gate", "night")]
        assert night["when"] == "always" and not night["in_window"] and night["valid_until"] == win["valid_until"]
        assert lines[("gw1", "front", "staff")]["in_window"]
        # judged in two days, the night window holds
        acc2 = (await c.get("/api/v1/users/alice/access", params={"at": now + 2 * 86400})).json()
        assert next(d for d in acc2["doors"] if d["group"] == "night")["in_window"]
        # a user's own validity cuts the window; a lost card and deactivation are said
        assert (
            await c.patch("/api/v1/users/alice", json={"valid_until": now + 3 * 86400, "active": False})
        ).status_code == 200
        assert (await c.patch("/api/v1/cards/1001", json={"status": "lost"})).status_code == 200
        acc = (await c.get("/api/v1/users/alice/access")).json()
        assert next(d for d in acc["doors"] if d["group"] == "night")["valid_until"] == now + 3 * 86400
        assert any("deactivated" in b for b in acc["blocked"]) and any("no usable card" in b for b in acc["blocked"])

        assert (await c.delete(f"/api/v1/users/alice/assignments/{aid}")).status_code == 200
        assert (await c.delete(f"/api/v1/users/alice/assignments/{aid}")).status_code == 404
        assert [a["group"] for a in (await c.get("/api/v1/users/alice/assignments")).json()] == ["staff"]
        # delete the user: the card is free for someone else, the assignments are gone
        assert (await c.delete("/api/v1/users/alice")).status_code == 200
        assert (await c.get("/api/v1/users/alice/access")).status_code == 404
        assert (await c.post("/api/v1/users", json={"id": "bob", "cards": [{"card": 1001}]})).status_code == 201

        # the group's schedule can be dropped, then the schedule deleted
        assert (await c.put("/api/v1/groups/staff", json={"doors": doors})).status_code == 200
        assert (await c.delete("/api/v1/schedules/office")).status_code == 200
        actions = {e["action"] for e in (await c.get("/api/v1/audit", params={"action": "schedule.*"})).json()["items"]}
        assert actions == {"schedule.create", "schedule.delete"}
        actions = [e["action"] for e in (await c.get("/api/v1/audit", params={"object_id": "alice"})).json()["items"]]
        assert {"assignment.create", "assignment.delete", "user.delete"} <= set(actions)
        await c.aclose()


async def _reauth(c: httpx.AsyncClient, password: str = PASSWORD) -> httpx.Response:
    return await c.post("/api/v1/auth/reauth", json={"password": password})


async def test_operators_permission_groups_rules_and_audit_export(db_url: str, tmp_path: Path) -> None:
    async with running(config(db_url, tmp_path)) as svc:
        admin = await admin_client(svc)
        for gid, tags in (("staff", ["hq"]), ("vault", ["secret"])):
            assert (await admin.put(f"/api/v1/groups/{gid}", json={"tags": tags})).status_code == 200
        for uid in ("alice", "bob"):
            assert (await admin.post("/api/v1/users", json={"id": uid})).status_code == 201

        editor = {"name": "People editors", "permissions": [
            {"object_type": "user", "actions": ["create", "read", "update", "delete"]},
            {"object_type": "user", "actions": ["delete"], "effect": "deny"},             # deny wins over the grant
            {"object_type": "user", "actions": ["read", "update"], "effect": "deny", "applies_to": ["user:bob"]},
            {"object_type": "group", "actions": ["read", "update"], "tags": ["hq"]},      # only hq-tagged groups
        ]}  # fmt: skip
        # operator changes need the password again
        r = await admin.put("/api/v1/permission-groups/editors", json=editor)
        assert r.status_code == 403 and "re-authentication" in r.json()["detail"]
        assert (await _reauth(admin, "not the password")).status_code == 401
        assert (await _reauth(admin)).status_code == 200
        # a malformed line is 400 naming it, nothing stored
        r = await admin.put("/api/v1/permission-groups/editors", json={"permissions": [
            {"object_type": "user", "actions": ["read"], "event_types": ["unlock"]}]})  # fmt: skip
        assert r.status_code == 400 and "permissions[0]" in r.json()["field"], r.json()
        r = await admin.put(
            "/api/v1/permission-groups/editors", json={"permissions": [{"object_type": "user", "actions": ["fly"]}]}
        )
        assert r.status_code == 400 and r.json()["field"] == "body.permissions[0].actions[0]"
        assert (await admin.get("/api/v1/permission-groups/editors")).status_code == 404
        r = await admin.put("/api/v1/permission-groups/editors", json=editor)
        assert r.status_code == 200, r.text
        assert (await admin.put("/api/v1/permission-groups/system-administrator", json=editor)).status_code == 409

        r = await admin.put("/api/v1/operators/ed", json={"name": "Ed", "groups": ["editors"]})
        assert r.status_code == 200, r.text
        code = r.json()["setup_code"]
        assert code and r.json()["password_set"] is False
        assert (await admin.get("/api/v1/operators/ed")).json()["setup_code"] is None  # shown once
        assert (await admin.put("/api/v1/operators/x", json={"groups": ["ghost"]})).status_code == 404
        listed = {g["id"]: g for g in (await admin.get("/api/v1/permission-groups")).json()}
        assert listed["editors"]["operators"] == ["ed"] and listed["system-administrator"]["builtin"]
        r = await admin.delete("/api/v1/permission-groups/editors")
        assert r.status_code == 409 and "ed" in r.json()["detail"]
        # the last System Administrator stays one, and nobody deletes or demotes themselves
        assert (await admin.put("/api/v1/operators/root", json={"groups": ["editors"]})).status_code == 409
        assert (await admin.delete("/api/v1/operators/root")).status_code == 409

        async with httpx.AsyncClient(base_url=svc.url, timeout=60) as ed:
            assert (await ed.post("/api/v1/auth/setup", json={"code": code, "password": PASSWORD})).status_code == 200
            await login(ed, "ed", PASSWORD)
            assert (await ed.post("/api/v1/users", json={"id": "carol"})).status_code == 201
            assert (await ed.patch("/api/v1/users/alice", json={"name": "Alice"})).status_code == 200
            r = await ed.delete("/api/v1/users/alice")  # granted and denied: deny wins
            assert r.status_code == 403 and r.json()["missing"]["action"] == "delete"
            assert "denied by group 'editors'" in r.json()["detail"]
            r = await ed.patch("/api/v1/users/bob", json={"name": "B"})  # applies-to
            assert r.status_code == 403 and r.json()["missing"]["object_id"] == "bob"
            assert [u["id"] for u in (await ed.get("/api/v1/users")).json()["items"]] == ["alice", "carol"]
            assert [g["id"] for g in (await ed.get("/api/v1/groups")).json()] == ["staff"]  # tags
            assert (await ed.put("/api/v1/groups/staff", json={"tags": ["hq"], "name": "Staff"})).status_code == 200
            assert (await ed.put("/api/v1/groups/vault", json={"tags": ["secret"]})).status_code == 403
            assert (
                await ed.put("/api/v1/groups/staff", json={"tags": ["secret"]})
            ).status_code == 403  # no re-tagging out of reach
            # no operator rights: cannot list operators, cannot make itself an administrator
            assert (await ed.get("/api/v1/operators")).status_code == 403
            assert (await _reauth(ed)).status_code == 200
            r = await ed.put("/api/v1/operators/ed", json={"groups": ["editors", "system-administrator"]})
            assert r.status_code == 403
            assert (await ed.get("/api/v1/auth/me")).json()["groups"] == ["editors"]

            # the deny line is taken away: the change holds at the next request, no new login
            assert (await admin.put("/api/v1/permission-groups/editors", json={
                **editor, "permissions": [editor["permissions"][0]]})).status_code == 200  # fmt: skip
            assert (await ed.delete("/api/v1/users/alice")).status_code == 200
            # a token cannot change operators even after a re-authentication of its owner's session
            tok = (await admin.post("/api/v1/tokens", json={"name": "t"})).json()["token"]
            async with httpx.AsyncClient(base_url=svc.url, headers={"authorization": f"Bearer {tok}"}) as t:
                r = await t.put("/api/v1/operators/x", json={})
                assert r.status_code == 403 and "login session" in r.json()["detail"]
                assert (await t.post("/api/v1/auth/reauth", json={"password": PASSWORD})).status_code == 403
            # deactivating an operator ends its sessions at once
            assert (
                await admin.put("/api/v1/operators/ed", json={"groups": ["editors"], "active": False})
            ).status_code == 200
            assert (await ed.get("/api/v1/auth/me")).status_code == 401
        # an operator manager widens nobody's rights through itself: not its own group, not its own groups
        mgr_group = {"permissions": [{"object_type": "operator", "actions": ["create", "read", "update"]}]}
        assert (await admin.put("/api/v1/permission-groups/managers", json=mgr_group)).status_code == 200
        code = (await admin.put("/api/v1/operators/mgr", json={"groups": ["managers"]})).json()["setup_code"]
        async with httpx.AsyncClient(base_url=svc.url, timeout=60) as mgr:
            assert (await mgr.post("/api/v1/auth/setup", json={"code": code, "password": PASSWORD})).status_code == 200
            await login(mgr, "mgr", PASSWORD)
            assert (await _reauth(mgr)).status_code == 200
            r = await mgr.put(
                "/api/v1/permission-groups/managers",
                json={"permissions": [{"object_type": "all", "actions": ["delete"]}]},
            )
            assert r.status_code == 403 and "only a System Administrator" in r.json()["detail"]
            r = await mgr.put("/api/v1/operators/mgr", json={"groups": ["managers", "editors"]})
            assert r.status_code == 409 and "your own permission groups" in r.json()["detail"]
            assert (await mgr.put("/api/v1/operators/newbie", json={"groups": ["editors"]})).status_code == 200
            assert (await mgr.put("/api/v1/operators/x2", json={"groups": ["system-administrator"]})).status_code == 403
        assert (await admin.delete("/api/v1/operators/ed")).status_code == 200
        assert (await admin.delete("/api/v1/operators/newbie")).status_code == 200
        assert (await admin.delete("/api/v1/permission-groups/editors")).status_code == 200

        # the audit log: filters and the CSV export (formula cells neutralised)
        assert (
            await admin.post("/api/v1/users", json={"id": "x1", "name": '=HYPERLINK("http://evil")'})
        ).status_code == 201
        items = (await admin.get("/api/v1/audit", params={"actor": "ed", "outcome": "denied"})).json()["items"]
        assert {e["object_id"] for e in items} >= {"alice", "bob", "ed"} and all(e["actor"] == "ed" for e in items)
        ops = (
            await admin.get("/api/v1/audit", params={"action": "operator.*", "outcome": "ok", "object_id": "ed"})
        ).json()["items"]
        assert [e["action"] for e in ops][:3] == ["operator.delete", "operator.update", "operator.create"]
        failed = (await admin.get("/api/v1/audit", params={"action": "auth.reauth", "outcome": "failed"})).json()[
            "items"
        ]
        assert len(failed) == 1 and failed[0]["actor"] == "root"
        t0 = items[-1]["ts"]
        assert all(e["ts"] >= t0 for e in (await admin.get("/api/v1/audit", params={"since": t0})).json()["items"])
        assert (await admin.get("/api/v1/audit", params={"outcome": "maybe"})).status_code == 400
        r = await admin.get("/api/v1/audit/export.csv", params={"object_id": "x1"})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
        rows = list(csv.reader(io.StringIO(r.text)))
        assert rows[0][:3] == ["id", "time_utc", "actor"] and len(rows) == 2
        assert rows[1][5] == "user.create" and '"=HYPERLINK' in rows[1][10] and not rows[1][10].startswith("=")
        r = await admin.get("/api/v1/audit/export.csv", params={"action": "user.*"})
        assert all(not cell.startswith(("=", "+", "-", "@")) for row in csv.reader(io.StringIO(r.text)) for cell in row)
        await admin.aclose()
