"""/api/v1/schedules: weekly intervals in local time, with holidays (the gateway's `edge.model.Schedule`).

A schedule is stored as the gateway model's own `Schedule` (msgpack, the body column of `schedules`), so
what the API accepts is exactly what the planner sends and a gateway enforces. A group names at most one
schedule (`GroupBody.schedule`); a schedule a group uses cannot be deleted (409 naming the groups).

Validation (400 naming the field): days 0 (Monday) .. 6 (Sunday), clock times "HH:MM" (``24:00`` ends a
day), every interval's start before its end (an interval across midnight is two intervals), holidays unique
dates, `tz` a known IANA zone (None: the site's).
"""

from __future__ import annotations

from datetime import date
from typing import Annotated, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec
from litestar import Controller, Request, delete, get, put
from litestar.params import FromPath, JSONBody
from msgspec import Meta
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from cloud_bridge.permissions import Action, ObjectType, Target
from edge.model import (
    MAX_HOLIDAY_INTERVALS,
    MAX_HOLIDAYS,
    MAX_INTERVALS,
    ClockTime,
    Ident,
    Interval,
    Schedule,
    TimeRange,
)
from edge.model import clock_minutes as _minutes

from . import audit, schema
from .core import authorizer, permitted, principal_of, state_of
from .errors import BadRequest, Conflict, NotFound

_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(Schedule)
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


class IntervalIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    #: 0 = Monday .. 6 = Sunday
    day: Annotated[int, Meta(ge=0, le=6)]
    start: ClockTime
    end: ClockTime


class RangeIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    start: ClockTime
    end: ClockTime


class ScheduleBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: Annotated[str, Meta(max_length=200)] = ""
    intervals: Annotated[list[IntervalIn], Meta(max_length=MAX_INTERVALS)] = []
    #: Dates (YYYY-MM-DD) on which the weekly intervals do not apply; `holiday_intervals` do instead.
    holidays: Annotated[list[date], Meta(max_length=MAX_HOLIDAYS)] = []
    holiday_intervals: Annotated[list[RangeIn], Meta(max_length=MAX_HOLIDAY_INTERVALS)] = []
    #: An IANA time zone; None: the site's.
    tz: Annotated[str, Meta(max_length=64)] | None = None


class ScheduleOut(ScheduleBody, kw_only=True):
    id: str
    #: The groups limited by this schedule.
    groups: list[str] = []


def check(sid: str, body: ScheduleBody) -> Schedule:
    """The body as the gateway's Schedule, or BadRequest naming the first bad field."""
    for i, iv in enumerate(body.intervals):
        if not _minutes(iv.start) < _minutes(iv.end):
            raise BadRequest(f"start {iv.start} must be before end {iv.end} (split an interval at midnight)",
                             f"body.intervals[{i}].end")  # fmt: skip
    for i, r in enumerate(body.holiday_intervals):
        if not _minutes(r.start) < _minutes(r.end):
            raise BadRequest(f"start {r.start} must be before end {r.end}", f"body.holiday_intervals[{i}].end")
    seen: set[date] = set()
    for i, d in enumerate(body.holidays):
        if d in seen:
            raise BadRequest(f"holiday {d.isoformat()} is listed twice", f"body.holidays[{i}]")
        seen.add(d)
    if body.tz is not None:
        try:
            ZoneInfo(body.tz)
        except (ZoneInfoNotFoundError, ValueError):
            raise BadRequest(f"unknown time zone {body.tz!r}", "body.tz") from None
    return Schedule(
        id=sid, name=body.name, tz=body.tz, holidays=sorted(body.holidays),
        intervals=[Interval(day=iv.day, start=iv.start, end=iv.end) for iv in body.intervals],
        holiday_intervals=[TimeRange(start=r.start, end=r.end) for r in body.holiday_intervals],
    )  # fmt: skip


def _out(s: Schedule, groups: list[str]) -> ScheduleOut:
    return ScheduleOut(id=s.id, name=s.name, tz=s.tz, holidays=list(s.holidays), groups=groups,
                       intervals=[IntervalIn(day=i.day, start=i.start, end=i.end) for i in s.intervals],
                       holiday_intervals=[RangeIn(start=r.start, end=r.end) for r in s.holiday_intervals])  # fmt: skip


async def load(c: AsyncConnection, ids: list[str] | None = None) -> dict[str, ScheduleOut]:
    s, g = schema.schedules, schema.groups
    q = select(s.c.id, s.c.body).order_by(s.c.id)
    if ids is not None:
        q = q.where(s.c.id.in_(ids))
    rows = (await c.execute(q)).all()
    used: dict[str, list[str]] = {}
    gq = select(g.c.schedule, g.c.id).where(g.c.schedule.is_not(None)).order_by(g.c.id)
    for sid, gid in (await c.execute(gq)).all():
        used.setdefault(sid, []).append(gid)
    return {sid: _out(_dec.decode(body), used.get(sid, [])) for sid, body in rows}


def describe(s: ScheduleOut | None) -> str:
    """A schedule in a line, for people ("Monday 08:00-18:00, ...; closed on 2 holidays")."""
    if s is None:
        return "always"
    parts = [f"{DAYS[i.day][:3]} {i.start}-{i.end}" for i in sorted(s.intervals, key=lambda i: (i.day, i.start))]
    text = ", ".join(parts) or "never (no weekly interval)"
    if s.holidays:
        hol = ", ".join(f"{r.start}-{r.end}" for r in s.holiday_intervals) or "closed"
        text += f"; on {len(s.holidays)} holiday(s): {hol}"
    return text


class ScheduleController(Controller):
    path = "/api/v1/schedules"
    tags = ["schedules"]

    @get("/", opt={"perm": (ObjectType.SCHEDULE, Action.READ)}, guards=[permitted])
    async def list_schedules(self, request: Request[Any, Any, Any]) -> list[ScheduleOut]:
        """Every schedule the operator may read, with the groups that use it."""
        p, st = principal_of(request), state_of(request)
        authz = await authorizer(st.db)
        async with st.db.read() as c:
            out = await load(c)
        return [s for s in out.values()
                if authz.check(p.operator, Action.READ, Target(ObjectType.SCHEDULE, s.id)).allowed]  # fmt: skip

    @get("/{sid:str}", opt={"perm": (ObjectType.SCHEDULE, Action.READ), "id": "sid"}, guards=[permitted])
    async def get_schedule(self, request: Request[Any, Any, Any], sid: FromPath[str]) -> ScheduleOut:
        async with state_of(request).db.read() as c:
            found = (await load(c, [sid])).get(sid)
        if found is None:
            raise NotFound(f"no schedule {sid!r}")
        return found

    @put("/{sid:str}", opt={"perm": (ObjectType.SCHEDULE, Action.UPDATE), "id": "sid"}, guards=[permitted])
    async def put_schedule(self, request: Request[Any, Any, Any], sid: FromPath[str],
                           data: JSONBody[ScheduleBody]) -> ScheduleOut:
        """Create or replace a schedule (creating needs create on it). Published with the next publish."""
        p, st = principal_of(request), state_of(request)
        try:
            msgspec.convert(sid, Ident)
        except msgspec.ValidationError:
            raise BadRequest("a schedule id is 1-64 letters, digits or _ . : @ -", "path.sid") from None
        model = check(sid, data)
        s = schema.schedules
        async with st.db.write() as c:
            before = (await load(c, [sid])).get(sid)
            if before is None:
                (await authorizer(st.db)).require(p.operator, Action.CREATE, Target(ObjectType.SCHEDULE, sid))
                await c.execute(s.insert().values(id=sid, body=_enc.encode(model)))
            else:
                await c.execute(s.update().where(s.c.id == sid).values(body=_enc.encode(model)))
            out = (await load(c, [sid]))[sid]
            await audit.record(c, p, f"schedule.{'update' if before else 'create'}", "schedule", sid, before=before,
                               after=out)  # fmt: skip
        return out

    @delete("/{sid:str}", opt={"perm": (ObjectType.SCHEDULE, Action.DELETE), "id": "sid"}, guards=[permitted],
            status_code=200)  # fmt: skip
    async def delete_schedule(self, request: Request[Any, Any, Any], sid: FromPath[str]) -> ScheduleOut:
        p, st = principal_of(request), state_of(request)
        async with st.db.write() as c:
            before = (await load(c, [sid])).get(sid)
            if before is None:
                raise NotFound(f"no schedule {sid!r}")
            if before.groups:
                raise Conflict(f"schedule {sid!r} is used by group(s) {', '.join(before.groups)}: change them first")
            await c.execute(schema.schedules.delete().where(schema.schedules.c.id == sid))
            await audit.record(c, p, "schedule.delete", "schedule", sid, before=before)
        return before
