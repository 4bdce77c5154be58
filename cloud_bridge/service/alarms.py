"""Alarms: raised from the gateways' events as they are stored (events.py, same transaction), listed and
acknowledged through /api/v1/alarms.

| kind | raised by | cleared by |
|---|---|---|
| forced | `door.forced_open` state active | the same, state cleared (door closed) |
| held_open | `door.held_open` state active | the same, state cleared |
| tamper | `reader.tamper` tamper true, `reader.status` tamper true | tamper false |
| pin_lockout | `alarm.pin_lockout` | (acknowledge only) |
| reader_offline | `reader.status` online false, `reader.fault` reason offline | `reader.status` online true |
| storage | `alarm.storage` (failing), `alarm.journal_overflow` / `_damaged` / `_near_full` | `alarm.storage` ok |
| duress | `alarm.duress` (a duress PIN: silent at the door, so the operator must see it) | (acknowledge only) |

An alarm stays in the list until an operator acknowledges it (with a comment, recorded in the audit log);
`cleared_at` says when the gateway reported the condition over. An alarm is an `event` object for the
Authorizer (on its gateway and door, tagged with its kind and "alarm"): reading needs event read,
acknowledging event update (seed 003, "Acknowledge Events").
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, get, post
from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler
from litestar.params import FromPath, FromQuery, JSONBody, QueryParameter
from msgspec import Meta
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncConnection

import edge.events as kinds
from cloud_bridge.permissions import Action, ObjectType, Target
from edge.events import Event

from . import audit, schema
from .core import authorizer, permitted, principal_of, state_of
from .errors import BadRequest, Conflict, NotFound

KINDS = ("forced", "held_open", "tamper", "pin_lockout", "reader_offline", "storage", "duress")


def condition(e: Event) -> tuple[str, bool] | None:
    """(alarm kind, raised) for an event that raises or clears an alarm; None for any other event."""
    d = e.detail
    if e.type == kinds.DOOR_FORCED_OPEN:
        return "forced", d.get("state") == "active"
    if e.type == kinds.DOOR_HELD_OPEN:
        return "held_open", d.get("state") == "active"
    if e.type == kinds.READER_TAMPER:
        return "tamper", d.get("tamper") is True
    if e.type == kinds.READER_STATUS:
        if d.get("tamper") is True:
            return "tamper", True
        if d.get("online") is False:
            return "reader_offline", True
        if d.get("online") is True:
            return "reader_offline", False
        return None
    if e.type == kinds.READER_FAULT and e.reason in ("offline", "reader_offline"):
        return "reader_offline", True
    if e.type == kinds.ALARM_PIN_LOCKOUT:
        return "pin_lockout", True
    if e.type == kinds.ALARM_DURESS:
        return "duress", True
    if e.type == kinds.STORAGE_ALARM:
        return "storage", d.get("state") != "ok"
    if e.type in (kinds.JOURNAL_OVERFLOW, kinds.JOURNAL_DAMAGED, kinds.JOURNAL_NEAR_FULL):
        return "storage", True
    return None


async def raise_from(c: AsyncConnection, gw: str, e: Event) -> None:
    """Raise (a new alarm row) or clear (every uncleared alarm of that kind on that door) for event `e`."""
    found = condition(e)
    if found is None:
        return
    kind, raised = found
    a = schema.alarms
    if raised:
        await c.execute(a.insert().values(gateway=gw, door=e.door, kind=kind, event_id=e.id, ts=e.ts, state="open"))
        return
    door = a.c.door.is_(None) if e.door is None else a.c.door == e.door
    await c.execute(update(a).where(a.c.gateway == gw, door, a.c.kind == kind, a.c.cleared_at.is_(None))
                    .values(cleared_at=e.ts))  # fmt: skip


def alarm_target(gateway: str, door: str | None, kind: str, aid: int) -> Target:
    return Target(ObjectType.EVENT, f"alarm:{aid}", frozenset({"alarm", kind}), gateway=gateway, door=door)


class AlarmOut(msgspec.Struct, kw_only=True):
    id: int
    gateway: str
    door: str | None
    kind: str
    event_id: str | None
    ts: float
    state: str
    cleared_at: float | None
    acked_by: str | None
    acked_at: float | None
    comment: str | None


class AlarmPage(msgspec.Struct, kw_only=True):
    items: list[AlarmOut]
    next_cursor: int | None


class Acknowledge(msgspec.Struct, forbid_unknown_fields=True):
    comment: Annotated[str, Meta(max_length=2000)] = ""


def _out(r: Any) -> AlarmOut:
    return AlarmOut(id=int(r.id), gateway=r.gateway, door=r.door, kind=r.kind, event_id=r.event_id, ts=r.ts,
                    state=r.state, cleared_at=r.cleared_at, acked_by=r.acked_by, acked_at=r.acked_at,
                    comment=r.comment)  # fmt: skip


async def load(c: AsyncConnection, aid: int) -> AlarmOut | None:
    r = (await c.execute(select(schema.alarms).where(schema.alarms.c.id == aid))).one_or_none()
    return None if r is None else _out(r)


async def may_acknowledge(conn: ASGIConnection[Any, Any, Any, Any], _h: BaseRouteHandler) -> None:
    """The guard of an acknowledgement: event update on that alarm (its gateway, door and kind)."""
    st, p = state_of(conn), principal_of(conn)
    aid = int(conn.path_params["aid"])
    async with st.db.read() as c:
        found = await load(c, aid)
    if found is None:
        raise NotFound(f"no alarm {aid}")
    (await authorizer(st.db)).require(p.operator, Action.UPDATE, alarm_target(found.gateway, found.door,
                                                                             found.kind, aid))  # fmt: skip


class AlarmController(Controller):
    path = "/api/v1/alarms"
    tags = ["alarms"]

    @get("/", opt={"perm": (ObjectType.EVENT, Action.READ)}, guards=[permitted])
    async def list_alarms(self, request: Request[Any, Any, Any], *,
                          which: Annotated[str | None, QueryParameter(name="state")] = None,
                          gateway: FromQuery[str | None] = None, kind: FromQuery[str | None] = None,
                          cursor: FromQuery[int | None] = None,
                          limit: Annotated[int, Meta(ge=1, le=1000)] = 100) -> AlarmPage:  # fmt: skip
        """Alarms, newest first: `state` open or acknowledged (default both); only those the operator may
        read. `cursor`: the `next_cursor` of the page before."""
        if which is not None and which not in ("open", "acknowledged"):
            raise BadRequest("state is open or acknowledged", "query.state")
        if kind is not None and kind not in KINDS:
            raise BadRequest(f"kind is one of {', '.join(KINDS)}", "query.kind")
        p, st = principal_of(request), state_of(request)
        authz = await authorizer(st.db)
        a = schema.alarms
        q = select(a).order_by(a.c.id.desc()).limit(limit)
        for col, v in ((a.c.state, which), (a.c.gateway, gateway), (a.c.kind, kind)):
            if v is not None:
                q = q.where(col == v)
        if cursor is not None:
            q = q.where(a.c.id < cursor)
        async with st.db.read() as c:
            rows = (await c.execute(q)).all()
        items = [_out(r) for r in rows]
        shown = [x for x in items if authz.check(p.operator, Action.READ,
                                                 alarm_target(x.gateway, x.door, x.kind, x.id)).allowed]  # fmt: skip
        return AlarmPage(items=shown, next_cursor=items[-1].id if len(items) == limit else None)

    @post("/{aid:int}/acknowledge", guards=[may_acknowledge], status_code=200)
    async def acknowledge(self, request: Request[Any, Any, Any], aid: FromPath[int],
                          data: JSONBody[Acknowledge]) -> AlarmOut:
        """Acknowledge an open alarm, with a comment; the operator and the time are recorded (and audited)."""
        p, st = principal_of(request), state_of(request)
        a = schema.alarms
        async with st.db.write() as c:
            before = await load(c, aid)
            if before is None:
                raise NotFound(f"no alarm {aid}")
            if before.state != "open":
                raise Conflict(f"alarm {aid} was acknowledged already by {before.acked_by}")
            await c.execute(update(a).where(a.c.id == aid).values(
                state="acknowledged", acked_by=p.operator.id, acked_at=time.time(), comment=data.comment))  # fmt: skip
            after = await load(c, aid)
            await audit.record(c, p, "alarm.acknowledge", "event", f"alarm:{aid}", before=before, after=after)
        assert after is not None
        return after
