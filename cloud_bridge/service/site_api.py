"""/api/v1/groups, /api/v1/gateways, /api/v1/publish and /api/v1/audit."""

# ruff: noqa: ASYNC109

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import msgspec
from litestar import Controller, Request, Response, delete, get, post, put
from litestar.params import FromPath, FromQuery, JSONBody
from msgspec import Meta
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from cloud_bridge.operator.db import MAX_DOORS_PER_GROUP, MAX_NAME_CHARS, MAX_TAGS
from cloud_bridge.permissions import Action, ObjectType, Target

from . import audit, schema
from .core import authorizer, permitted, principal_of, state_of, target_for
from .errors import BadRequest, NotFound, ServiceError
from .people import Ident


class DoorRef(msgspec.Struct, forbid_unknown_fields=True):
    gateway: Ident
    door: Ident


class GroupBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: Annotated[str, Meta(max_length=MAX_NAME_CHARS)] = ""
    schedule: Ident | None = None
    tags: Annotated[list[Ident], Meta(max_length=MAX_TAGS)] = []
    doors: Annotated[list[DoorRef], Meta(max_length=MAX_DOORS_PER_GROUP)] = []


class GroupOut(GroupBody, kw_only=True):
    id: str


class GatewayOut(msgspec.Struct, kw_only=True):
    id: str
    online: bool
    software: str
    last_seen: float | None
    #: The rights version the gateway reported in its birth, the newest planned, and the newest it acknowledged.
    reported_version: int
    version: int
    acked: int
    error: str | None
    doors: list[DoorRef]
    #: From the collector (events.py): the journal depth in its last birth, its warnings, events stored and
    #: acknowledged (contiguous up to `events_upto`), repeats received and not stored twice, lockdown.
    journal_depth: int = 0
    warnings: list[str] = []
    events_upto: int = 0
    events_stored: int = 0
    duplicates: int = 0
    lockdown: bool = False


class AuditEntry(msgspec.Struct, kw_only=True):
    id: int
    ts: float
    actor: str
    via: str
    address: str
    action: str
    object_type: str
    object_id: str
    before: Any
    after: Any
    outcome: str


class AuditPage(msgspec.Struct, kw_only=True):
    items: list[AuditEntry]
    next_cursor: int | None


async def _group(c: AsyncConnection, gid: str) -> GroupOut | None:
    g = (await c.execute(select(schema.groups).where(schema.groups.c.id == gid))).one_or_none()
    if g is None:
        return None
    gd = schema.group_doors
    doors = [DoorRef(gw, d) for gw, d in (await c.execute(select(gd.c.gateway, gd.c.door).where(gd.c.group_id == gid)
                                                          .order_by(gd.c.gateway, gd.c.door))).all()]  # fmt: skip
    return GroupOut(id=g.id, name=g.name, schedule=g.schedule, tags=[t for t in g.tags.split(",") if t], doors=doors)


class GroupController(Controller):
    path = "/api/v1/groups"
    tags = ["groups"]

    @get("/", opt={"perm": (ObjectType.GROUP, Action.READ)}, guards=[permitted])
    async def list_groups(self, request: Request[Any, Any, Any]) -> list[GroupOut]:
        """The groups (entitlements) and the doors they open, filtered to what the operator may read."""
        p, st = principal_of(request), state_of(request)
        authz = await authorizer(st.db)
        async with st.db.read() as c:
            ids = list((await c.execute(select(schema.groups.c.id).order_by(schema.groups.c.id))).scalars())
            out = [g for i in ids if (g := await _group(c, i)) is not None]
        return [g for g in out if authz.check(p.operator, Action.READ,
                                              Target(ObjectType.GROUP, g.id, frozenset(g.tags))).allowed]  # fmt: skip

    @get("/{gid:str}", opt={"perm": (ObjectType.GROUP, Action.READ), "id": "gid"}, guards=[permitted])
    async def get_group(self, request: Request[Any, Any, Any], gid: FromPath[str]) -> GroupOut:
        async with state_of(request).db.read() as c:
            g = await _group(c, gid)
        if g is None:
            raise NotFound(f"unknown group {gid!r}")
        return g

    @put("/{gid:str}", opt={"perm": (ObjectType.GROUP, Action.UPDATE), "id": "gid"}, guards=[permitted])
    async def put_group(self, request: Request[Any, Any, Any], gid: FromPath[str],
                        data: JSONBody[GroupBody]) -> GroupOut:
        """Create or replace a group: its doors (per gateway), schedule and tags. Creating needs create;
        the operator must be allowed the change on the group with its old tags and with its new ones."""
        p, st = principal_of(request), state_of(request)
        msgspec.convert(gid, Ident)
        authz = await authorizer(st.db)
        async with st.db.write() as c:
            before = await _group(c, gid)
            action = Action.UPDATE if before is not None else Action.CREATE
            # as it is and as it will be: nobody moves a group into (or out of) tags they may not update
            if before is not None:
                authz.require(p.operator, action, Target(ObjectType.GROUP, gid, frozenset(before.tags)))
            authz.require(p.operator, action, Target(ObjectType.GROUP, gid, frozenset(data.tags)))
            known = select(schema.schedules.c.id).where(schema.schedules.c.id == data.schedule)
            if data.schedule is not None and (await c.execute(known)).scalar() is None:
                raise NotFound(f"unknown schedule {data.schedule!r} (body.schedule)")
            pairs = {(d.gateway, d.door) for d in data.doors}
            if len(pairs) != len(data.doors):
                raise BadRequest("a door is listed twice", "body.doors")
            g = schema.groups
            if before is None:
                await c.execute(g.insert().values(id=gid, name=data.name, schedule=data.schedule,
                                                  tags=",".join(data.tags)))  # fmt: skip
            else:
                await c.execute(g.update().where(g.c.id == gid).values(name=data.name, schedule=data.schedule,
                                                                       tags=",".join(data.tags)))  # fmt: skip
            await c.execute(schema.group_doors.delete().where(schema.group_doors.c.group_id == gid))
            if data.doors:
                await c.execute(schema.group_doors.insert(), [{"group_id": gid, "gateway": d.gateway, "door": d.door}
                                                              for d in data.doors])  # fmt: skip
            out = await _group(c, gid)
            await audit.record(c, p, f"group.{'update' if before else 'create'}", "group", gid, before=before,
                               after=out)  # fmt: skip
        assert out is not None
        return out

    @delete("/{gid:str}", opt={"perm": (ObjectType.GROUP, Action.DELETE), "id": "gid"}, guards=[permitted],
            status_code=200)  # fmt: skip
    async def delete_group(self, request: Request[Any, Any, Any], gid: FromPath[str]) -> GroupOut:
        p, st = principal_of(request), state_of(request)
        async with st.db.write() as c:
            before = await _group(c, gid)
            if before is None:
                raise NotFound(f"unknown group {gid!r}")
            await c.execute(schema.groups.delete().where(schema.groups.c.id == gid))
            await audit.record(c, p, "group.delete", "group", gid, before=before)
        return before


async def _gateways(c: AsyncConnection, ids: list[str] | None = None) -> list[GatewayOut]:
    g, d = schema.gateways, schema.doors
    q = select(g).order_by(g.c.id)
    if ids is not None:
        q = q.where(g.c.id.in_(ids))
    rows = (await c.execute(q)).all()
    doors: dict[str, list[DoorRef]] = {}
    for gw, did in (await c.execute(select(d.c.gateway, d.c.id).order_by(d.c.gateway, d.c.id))).all():
        doors.setdefault(gw, []).append(DoorRef(gw, did))
    status = {r.gateway: r for r in (await c.execute(select(schema.gateway_status))).all()}
    out = []
    for r in rows:
        st = status.get(r.id)
        extra: dict[str, Any] = {} if st is None else {
            "journal_depth": int(st.journal_depth), "warnings": msgspec.json.decode(st.warnings or "[]"),
            "events_upto": int(st.events_upto), "events_stored": int(st.events_stored),
            "duplicates": int(st.duplicates), "lockdown": bool(st.lockdown)}  # fmt: skip
        seen = max((t for t in (r.last_seen, st.last_seen if st else None) if t is not None), default=None)
        out.append(GatewayOut(id=r.id, online=bool(r.online), software=r.software, last_seen=seen,
                              reported_version=int(r.reported_version), version=int(r.version), acked=int(r.acked),
                              error=r.error, doors=doors.get(r.id, []), **extra))  # fmt: skip
    return out


class GatewayController(Controller):
    path = "/api/v1/gateways"
    tags = ["gateways"]

    @get("/", opt={"perm": (ObjectType.GATEWAY, Action.READ)}, guards=[permitted])
    async def list_gateways(self, request: Request[Any, Any, Any]) -> list[GatewayOut]:
        """Gateways (online/offline from their births and wills), software, rights versions, doors."""
        p, st = principal_of(request), state_of(request)
        authz = await authorizer(st.db)
        async with st.db.read() as c:
            out = await _gateways(c)
        return [g for g in out if authz.check(p.operator, Action.READ, Target.for_gateway(g.id)).allowed]

    @get("/{gw:str}", opt={"perm": (ObjectType.GATEWAY, Action.READ), "id": "gw"}, guards=[permitted])
    async def get_gateway(self, request: Request[Any, Any, Any], gw: FromPath[str]) -> GatewayOut:
        async with state_of(request).db.read() as c:
            found = await _gateways(c, [gw])
        if not found:
            raise NotFound(f"no gateway {gw!r}")
        return found[0]


class PublishResult(msgspec.Struct, kw_only=True):
    #: Per gateway: the version it acknowledged, or "error: ...".
    gateways: dict[str, int | str]
    not_sent: list[str]


class PublishController(Controller):
    path = "/api/v1/publish"
    tags = ["provisioning"]

    @post("/", opt={"perm": (ObjectType.GATEWAY, Action.UPDATE)}, guards=[permitted], status_code=200)
    async def publish(self, request: Request[Any, Any, Any],
                      timeout: Annotated[float, Meta(gt=0, le=300)] = 60.0) -> PublishResult:  # fmt: skip
        """Plan the pending changes of every gateway the operator may update and send them (signed with the
        site key) to those online; waits for each gateway's acknowledgement."""
        p, st = principal_of(request), state_of(request)
        if st.provisioner is None:
            raise ServiceError("provisioning is not running (no site passphrase given to the service)")
        authz = await authorizer(st.db)
        async with st.db.read() as c:
            gws = list((await c.execute(select(schema.gateways.c.id).order_by(schema.gateways.c.id))).scalars())
        allowed = [g for g in gws if authz.check(p.operator, Action.UPDATE, await target_for(
            st.db, ObjectType.GATEWAY, g)).allowed]  # fmt: skip
        result = await st.provisioner.publish(allowed, timeout=timeout)
        out = PublishResult(gateways=result, not_sent=list(st.provisioner.last_not_sent))
        async with st.db.write() as c:
            await audit.record(c, p, "gateway.publish", "gateway", ",".join(allowed) or "-", after=out,
                               outcome="ok" if all(isinstance(v, int) for v in result.values()) else "failed")
        return out


AUDIT_CSV_MAX = 100_000
_FORMULA = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> str:
    """A cell a spreadsheet shows as text: one that would start a formula gets a leading apostrophe."""
    text = "" if value is None else value if isinstance(value, str) else msgspec.json.encode(value).decode()
    return "'" + text if text.startswith(_FORMULA) else text


def _audit_query(a: Any, *, actor: str | None, action: str | None, object_type: str | None, object_id: str | None,
                 outcome: str | None, since: float | None, until: float | None) -> Any:  # fmt: skip
    q = select(a)
    if actor:
        q = q.where(a.c.actor == actor)
    if action:  # "user.*": every user action
        if action.endswith("*"):
            q = q.where(a.c.action.like(action[:-1].replace("%", "") + "%"))
        else:
            q = q.where(a.c.action == action)
    if object_type:
        q = q.where(a.c.object_type == object_type)
    if object_id:
        q = q.where(a.c.object_id == object_id)
    if outcome:
        q = q.where(a.c.outcome == outcome)
    if since is not None:
        q = q.where(a.c.ts >= since)
    if until is not None:
        q = q.where(a.c.ts < until)
    return q


def _entry(r: Any) -> AuditEntry:
    return AuditEntry(id=r.id, ts=r.ts, actor=r.actor, via=r.via, address=r.address, action=r.action,
                      object_type=r.object_type, object_id=r.object_id,
                      before=None if r.before is None else msgspec.json.decode(r.before),
                      after=None if r.after is None else msgspec.json.decode(r.after), outcome=r.outcome)  # fmt: skip


Filter = Annotated[str, Meta(max_length=128)]
Outcome = Literal["ok", "denied", "failed"]


class AuditController(Controller):
    path = "/api/v1/audit"
    tags = ["audit"]

    @get("/", opt={"perm": (ObjectType.OPERATOR, Action.READ)}, guards=[permitted])
    async def list_audit(self, request: Request[Any, Any, Any], *, cursor: FromQuery[int | None] = None,
                         limit: Annotated[int, Meta(ge=1, le=1000)] = 100, actor: FromQuery[Filter | None] = None,
                         action: FromQuery[Filter | None] = None, object_type: FromQuery[Filter | None] = None,
                         object_id: FromQuery[Filter | None] = None, outcome: FromQuery[Outcome | None] = None,
                         since: FromQuery[float | None] = None,
                         until: FromQuery[float | None] = None) -> AuditPage:  # fmt: skip
        """The audit log, newest first; `cursor`: the `next_cursor` of the page before. Filters: `actor`,
        `action` (exact, or a prefix ending in `*`: `user.*`), `object_type`, `object_id`, `outcome`
        (ok / denied / failed), `since` / `until` (UTC seconds)."""
        a = schema.audit_log
        q = _audit_query(a, actor=actor, action=action, object_type=object_type, object_id=object_id,
                         outcome=outcome, since=since, until=until).order_by(a.c.id.desc()).limit(limit)  # fmt: skip
        if cursor is not None:
            q = q.where(a.c.id < cursor)
        async with state_of(request).db.read() as c:
            rows = (await c.execute(q)).all()
        items = [_entry(r) for r in rows]
        return AuditPage(items=items, next_cursor=items[-1].id if len(items) == limit else None)

    @get("/export.csv", opt={"perm": (ObjectType.OPERATOR, Action.READ)}, guards=[permitted],
         media_type="text/csv")  # fmt: skip
    async def export_audit(self, request: Request[Any, Any, Any], *, actor: FromQuery[Filter | None] = None,
                           action: FromQuery[Filter | None] = None, object_type: FromQuery[Filter | None] = None,
                           object_id: FromQuery[Filter | None] = None, outcome: FromQuery[Outcome | None] = None,
                           since: FromQuery[float | None] = None,
                           until: FromQuery[float | None] = None) -> Response[bytes]:  # fmt: skip
        """The audit log as CSV (the same filters; oldest first; at most 100,000 entries). Cells that a
        spreadsheet would run as a formula start with an apostrophe."""
        p, st = principal_of(request), state_of(request)
        a = schema.audit_log
        q = _audit_query(a, actor=actor, action=action, object_type=object_type, object_id=object_id,
                         outcome=outcome, since=since, until=until).order_by(a.c.id).limit(AUDIT_CSV_MAX)  # fmt: skip
        async with st.db.read() as c:
            rows = (await c.execute(q)).all()
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["id", "time_utc", "actor", "via", "address", "action", "object_type", "object_id", "outcome",
                    "before", "after"])  # fmt: skip
        for r in rows:
            when = datetime.fromtimestamp(r.ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            w.writerow([r.id, when, *(csv_cell(x) for x in (r.actor, r.via, r.address, r.action, r.object_type,
                        r.object_id, r.outcome, r.before, r.after))])  # fmt: skip
        async with st.db.write() as c:
            await audit.record(c, p, "audit.export", "operator", "audit", after={"rows": len(rows)})
        return Response(buf.getvalue().encode(), media_type="text/csv", headers={
            "content-disposition": 'attachment; filename="audit.csv"'})  # fmt: skip
