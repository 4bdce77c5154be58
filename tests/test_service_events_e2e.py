"""End to end on both databases, through the HTTP API, with the real simulated gateway on a real Mosquitto:
a tap reaches the live stream (SSE) and the history (filters, cursor pages); unlock, door mode and lockdown
go out as signed commands and the gateway's relay moves; a door forced open raises an alarm that is
acknowledged with a comment; an operator without publish permission is refused the unlock (403 naming it);
every command and acknowledgement is in the audit log."""

# ruff: noqa: F811

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import msgspec

from cloud_bridge.permissions import Action, ObjectType, Operator, PermissionGroup, grant
from cloud_bridge.service import auth, schema, site
from cloud_bridge.service.app import init_site
from cloud_bridge.service.config import ServiceConfig
from cloud_bridge.service.database import Database
from edge.sim.hands import set_contact

from .broker import broker  # noqa: F401
from .mosquitto import Mosquitto
from .postgres import db_url, postgres_server  # noqa: F401
from .service_harness import PASSWORD, Running, admin_client, config, login, running
from .test_operator_e2e import GW, agent_running, sock_dir, tap_card  # noqa: F401
from .test_service_e2e import _public_key

VIEWER = PermissionGroup(id="viewer", name="Doors and events, read only", permissions=[
    grant(ObjectType.DOOR, Action.READ), grant(ObjectType.GATEWAY, Action.READ),
    grant(ObjectType.EVENT, Action.READ)])  # fmt: skip


async def until(fn: Callable[[], Awaitable[Any]], timeout: float = 30.0, what: str = "") -> Any:
    """Poll `fn` until it returns something truthy (a condition on what the API shows)."""
    end = time.monotonic() + timeout
    while True:
        v = await fn()
        if v:
            return v
        if time.monotonic() > end:
            raise AssertionError(f"not in {timeout} s: {what}")
        await asyncio.sleep(0.1)


async def add_operator(url: str, cfg: ServiceConfig, oid: str, group: PermissionGroup) -> None:
    db = Database(url)
    try:
        async with db.write() as c:
            await c.execute(schema.permission_groups.insert().values(id=group.id, body=msgspec.json.encode(group)))
            op = Operator(id=oid, name=oid.title(), groups=[group.id])
            await c.execute(schema.operators.insert().values(id=oid, body=msgspec.json.encode(op)))
            await auth.set_password(c, auth.Passwords(cfg.auth), oid, PASSWORD)
    finally:
        await db.close()


async def started(url: str, cfg: ServiceConfig, broker: Mosquitto) -> str:
    """A new site on `url`; returns the hex public key a gateway verifies commands with."""
    await init_site(cfg, site_id="s1", admin="root", tz="Europe/Berlin", host=broker.host, port=broker.port)
    return await _public_key(url)


async def setup_admin(url: str, svc: Running) -> httpx.AsyncClient:
    db = Database(url)
    try:
        svc.setup_link = f"x#{await site.setup_code_for(db, 'root')}"
    finally:
        await db.close()
    return await admin_client(svc)


async def read_stream(client: httpx.AsyncClient, params: dict[str, str], out: list[dict[str, Any]],
                      ready: asyncio.Event, *, last_id: str | None = None) -> None:  # fmt: skip
    headers = {"last-event-id": last_id} if last_id else {}
    async with client.stream("GET", "/api/v1/events/stream", params=params, headers=headers) as r:
        assert r.status_code == 200, await r.aread()
        assert r.headers["content-type"].startswith("text/event-stream")
        async for line in r.aiter_lines():
            if line.startswith(":"):
                ready.set()
            elif line.startswith("data:"):
                out.append(msgspec.json.decode(line[5:].strip()))


async def test_events_doors_and_alarms_through_the_api(
    broker: Mosquitto, db_url: str, tmp_path: Path, sock_dir: Path
) -> None:
    cfg = config(db_url, tmp_path)
    pub = await started(db_url, cfg, broker)
    await add_operator(db_url, cfg, "guard", VIEWER)
    async with (  # the service first: a batch sent before its collector subscribed waits for the ack timeout
        running(cfg, provisioning=True, init=False) as svc,
        agent_running(broker, tmp_path / "gw", sock_dir / "c.sock", pub) as agent,
    ):
        client = await setup_admin(db_url, svc)

        async def door1() -> dict[str, Any] | None:
            r = await client.get(f"/api/v1/doors/{GW}/door1")
            return r.json() if r.status_code == 200 else None

        d = await until(door1, what="door1 announced")
        assert d["name"] and d["mode"] == "provisioned"
        assert d["online"]

        # a tap reaches the live stream, and the history with its filters
        seen: list[dict[str, Any]] = []
        ready = asyncio.Event()
        reader = asyncio.get_running_loop().create_task(read_stream(client, {"kind": "access.*"}, seen, ready))
        try:
            await asyncio.wait_for(ready.wait(), 10)
            decision = await tap_card(agent, 4242)
            assert not decision.granted
            await until(
                _true(lambda: any(e["card"] == 4242 for e in seen) or reader.done()), 15, "the tap on the stream"
            )
            assert not reader.done(), reader
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        tapped = next(e for e in seen if e["card"] == 4242)
        assert tapped["type"] == "access.denied" and tapped["result"] == "denied" and tapped["door"] == "door1"
        assert all(e["type"].startswith("access.") for e in seen)  # the stream's kind filter
        r = await client.get("/api/v1/events", params={"door": f"{GW}/door1", "result": "denied", "kind": "access.*"})
        assert r.status_code == 200, r.text
        assert tapped["id"] in [e["id"] for e in r.json()["items"]]
        assert (await client.get("/api/v1/events", params={"result": "granted"})).json()["items"] == []
        # a stream that reconnects with Last-Event-ID is first sent what was stored after that event
        assert not (await tap_card(agent, 4243)).granted
        await until(lambda: _has(client, 4243), 15, "the second tap stored")
        again: list[dict[str, Any]] = []
        ready2 = asyncio.Event()
        reader = asyncio.get_running_loop().create_task(read_stream(client, {"kind": "access.*"}, again, ready2,
                                                                    last_id=tapped["id"]))  # fmt: skip
        try:
            await until(_true(lambda: any(e["card"] == 4243 for e in again) or reader.done()), 15, "replayed")
            assert not reader.done(), reader
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        assert tapped["id"] not in [e["id"] for e in again]
        bad = await client.get("/api/v1/events", params={"cursor": "not-a-cursor"})
        assert bad.status_code == 400 and bad.json()["field"] == "query.cursor"
        # cursor pages: every event once, newest first, the same as one big page
        whole = (await client.get("/api/v1/events", params={"limit": 1000})).json()["items"]
        paged: list[dict[str, Any]] = []
        cursor: str | None = None
        while True:
            pg = await client.get("/api/v1/events", params={"limit": 1, **({"cursor": cursor} if cursor else {})})
            paged += pg.json()["items"]
            cursor = pg.json()["next_cursor"]
            if cursor is None:
                break
        ids = [e["id"] for e in paged]  # events stored meanwhile are newer: they can only come first
        assert {e["id"] for e in whole} <= set(ids) and len(set(ids)) == len(ids) >= 2
        assert [e["ts"] for e in paged] == sorted((e["ts"] for e in paged), reverse=True)
        gw = (await client.get(f"/api/v1/gateways/{GW}")).json()
        assert gw["online"] and gw["events_stored"] >= len(whole) and gw["events_upto"] >= 1
        assert gw["software"] and gw["last_seen"] is not None
        # acknowledged only what was stored: the gateway's journal empties
        await until(_true(lambda: agent.journal is not None and agent.journal.depth == 0), 20, "journal acked")

        # unlock: a signed command, the gateway's answer returned; the relay moves
        r = await client.post(f"/api/v1/doors/{GW}/door1/unlock", json={"seconds": 2})
        assert r.status_code == 200, r.text
        assert r.json()["ok"] and r.json()["request_id"]
        assert agent.doors["door1"].relay_energised
        await until(lambda: _get(client, f"/api/v1/doors/{GW}/door1", lock="unlocked"), what="unlocked shown")
        await until(lambda: _get(client, f"/api/v1/doors/{GW}/door1", lock="locked"), what="relocked shown")
        # door mode
        r = await client.post(f"/api/v1/doors/{GW}/door1/mode", json={"mode": "locked"})
        assert r.status_code == 200 and r.json()["ok"], r.text
        await until(lambda: _get(client, f"/api/v1/doors/{GW}/door1", mode="locked"), what="mode shown")
        bad = await client.post(f"/api/v1/doors/{GW}/door1/mode", json={"mode": "open-sesame"})
        assert bad.status_code == 400 and bad.json()["field"] == "body.mode"
        assert (await client.post(f"/api/v1/doors/{GW}/door1/mode", json={"mode": None})).json()["ok"]
        await until(lambda: _get(client, f"/api/v1/doors/{GW}/door1", mode="provisioned"), what="mode back")
        # lockdown: the gateway then refuses a remote unlock (its answer is returned), until released
        r = await client.post(f"/api/v1/lockdown/{GW}", json={"active": True})
        assert r.status_code == 200 and r.json()["ok"], r.text
        await until(lambda: _get(client, f"/api/v1/doors/{GW}/door1", mode="lockdown"), what="lockdown shown")
        r = await client.post(f"/api/v1/doors/{GW}/door1/unlock", json={"seconds": 2})
        assert r.status_code == 200 and not r.json()["ok"] and r.json()["error"]["code"], r.text
        assert not agent.doors["door1"].relay_energised
        assert (await client.post(f"/api/v1/lockdown/{GW}", json={"active": False})).json()["ok"]
        await until(lambda: _get(client, f"/api/v1/doors/{GW}/door1", mode="provisioned"), what="released")
        assert (await client.post(f"/api/v1/doors/{GW}/nope/unlock", json={})).status_code == 404

        # a door opened without a grant: forced, an alarm; acknowledged with a comment
        set_contact(agent, "door1", opened=True)

        async def forced() -> list[dict[str, Any]]:
            items = (await client.get("/api/v1/alarms", params={"state": "open"})).json()["items"]
            return [a for a in items if a["kind"] == "forced" and a["door"] == "door1"]

        alarm = (await until(forced, what="forced alarm"))[0]
        assert (await door1() or {})["forced"]
        set_contact(agent, "door1", opened=False)
        r = await client.post(f"/api/v1/alarms/{alarm['id']}/acknowledge", json={"comment": "checked: wind"})
        assert r.status_code == 200, r.text
        assert (r.json()["state"], r.json()["acked_by"], r.json()["comment"]) == (
            "acknowledged",
            "root",
            "checked: wind",
        )
        assert (await client.post(f"/api/v1/alarms/{alarm['id']}/acknowledge", json={})).status_code == 409
        assert alarm["id"] not in [a["id"] for a in (await client.get("/api/v1/alarms", params={"state": "open"})
                                                      ).json()["items"]]  # fmt: skip

        # an operator without publish: reads doors and events, is refused the unlock (403 naming it)
        guard = httpx.AsyncClient(base_url=svc.url, timeout=60)
        await login(guard, "guard", PASSWORD)
        assert (await guard.get("/api/v1/doors")).status_code == 200
        assert (await guard.get("/api/v1/events")).status_code == 200
        r = await guard.post(f"/api/v1/doors/{GW}/door1/unlock", json={"seconds": 2})
        assert r.status_code == 403, r.text
        assert "publish (unlock) on door gw1/door1" in r.json()["detail"]
        assert r.json()["missing"]["action"] == "unlock"
        assert (await guard.post(f"/api/v1/alarms/{alarm['id']}/acknowledge", json={})).status_code == 403
        assert not agent.doors["door1"].relay_energised
        await guard.aclose()

        audit = (await client.get("/api/v1/audit", params={"limit": 1000})).json()["items"]
        actions = [(a["actor"], a["action"], a["outcome"]) for a in audit]
        for want in [("root", "door.unlock", "ok"), ("root", "door.door_mode", "ok"), ("root", "door.lockdown", "ok"),
                     ("root", "door.unlock", "failed"), ("root", "alarm.acknowledge", "ok"),
                     ("guard", "door.unlock", "denied")]:  # fmt: skip
            assert want in actions, (want, actions)
        await client.aclose()


def _true(pred: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    async def f() -> bool:
        return pred()

    return f


async def _get(client: httpx.AsyncClient, path: str, **want: Any) -> bool:
    r = await client.get(path)
    return r.status_code == 200 and all(r.json().get(k) == v for k, v in want.items())


async def _has(client: httpx.AsyncClient, card: int) -> bool:
    items = (await client.get("/api/v1/events", params={"kind": "access.*"})).json()["items"]
    return any(e["card"] == card for e in items)
