"""/api/v1/reports: seed 003's reports, as JSON or CSV (`?format=csv`).

* `access-requests?day=YYYY-MM-DD[&person=ID][&reader=GATEWAY/DOOR]`: a person's (or everybody's) granted
  and denied requests on a site-local day, at all or one reader, with totals per person and per reader.
  Read from the collected `events` (types access.granted / access.denied / access.revoked), by the columns
  the collector fills (events.py) and their indexes.
* `access-rights/person/{id}`: which doors a person opens, through which group, when (schedule, window),
  and whether the gateway holds the person now (seed 000's export rules, `identity.export_of`).
* `access-rights/reader/{gateway}/{door}`: who opens that door, through which group, when.

Permissions as seed 003 lists them: person (user) read, reader (door) read, event read; rows are filtered
to the people and doors the operator may read. A CSV cell that a spreadsheet would run as a formula (one
starting with = + - @, a tab or a carriage return) is prefixed with an apostrophe (OWASP, "CSV injection").
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo

import msgspec
from litestar import Controller, Request, Response, get
from litestar.params import FromPath, FromQuery
from msgspec import Meta
from sqlalchemy import func, literal, or_, select, tuple_
from sqlalchemy.ext.asyncio import AsyncConnection

from cloud_bridge.permissions import Action, Authorizer, ObjectType, Operator, PermissionDenied, Target
from edge.events import ACCESS_DENIED, ACCESS_GRANTED, ACCESS_REVOKED

from . import schema
from .core import any_target, authorizer, may_some, permitted, principal_of, state_of
from .errors import BadRequest, NotFound
from .events import SCAN_LIMIT, decode_cursor, encode_cursor, event_target
from .integrations import export_status
from .visitors import local_day

ACCESS_TYPES = (ACCESS_GRANTED, ACCESS_DENIED, ACCESS_REVOKED)
#: At most this many requests in one report (a day of a busy site is far below).
MAX_ROWS = 200_000
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
Format = Literal["json", "csv"]


class AccessRequest(msgspec.Struct, kw_only=True):
    ts: float
    local: str
    gateway: str
    door: str
    reader: str
    card: int | None
    person: str
    person_name: str
    result: str  # granted | denied | revoked
    reason: str


class Totals(msgspec.Struct, kw_only=True):
    granted: int = 0
    denied: int = 0


class AccessRequestReport(msgspec.Struct, kw_only=True):
    day: str
    tz: str
    person: str | None
    reader: str | None
    rows: list[AccessRequest]
    totals: Totals
    by_person: dict[str, Totals]
    by_reader: dict[str, Totals]
    #: True when the report stopped at MAX_ROWS requests.
    truncated: bool
    #: With `limit`: the cursor of the next page of rows (None: this was the last).
    next_cursor: str | None = None


class Right(msgspec.Struct, kw_only=True):
    person: str
    person_name: str
    group: str
    gateway: str
    door: str
    door_name: str
    schedule: str | None
    valid_from: float | None
    valid_until: float | None
    cards: list[int]
    #: Whether the next publish sends this person to that gateway (export rules, token, windows).
    exported: bool


class RightsReport(msgspec.Struct, kw_only=True):
    subject: str
    rows: list[Right]


# --- CSV -------------------------------------------------------------------------------------------------


def neutralise(value: Any) -> str:
    """One CSV cell as text; one that a spreadsheet would run as a formula gets a leading apostrophe."""
    text = "" if value is None else str(value)
    return "'" + text if text.startswith(FORMULA_START) else text


def to_csv(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\r\n")
    w.writerow(header)
    for r in rows:
        w.writerow([neutralise(v) for v in r])
    return buf.getvalue()


def csv_response(name: str, text: str) -> Response[bytes]:
    return Response(text.encode(), media_type="text/csv; charset=utf-8",
                    headers={"content-disposition": f'attachment; filename="{name}.csv"'})  # fmt: skip


def _stamp(ts: float | None, tz: str) -> str:
    return "" if ts is None else datetime.fromtimestamp(ts, ZoneInfo(tz)).isoformat(timespec="seconds")


# --- the data layer ---------------------------------------------------------------------------------------


def _reader(value: str | None) -> tuple[str, str] | None:
    if value is None:
        return None
    gw, sep, door = value.partition("/")
    if not sep or not gw or not door:
        raise BadRequest("a reader is GATEWAY/DOOR", "query.reader")
    return gw, door


class UserReads:
    """Whether `op` may read user `uid`, answered once for every user no grant or deny line names.

    A user target has no tags and selects only the `applies_to` entry "user:ID", so the Authorizer's verdict
    is the same for all users that no READ line on users (or all types) of the operator's groups names:
    it is asked once for them, and once for each named user. `uniform` is that verdict when no line names
    a user (None: it depends on the user)."""

    def __init__(self, authz: Authorizer, op: Operator) -> None:
        self.authz, self.op = authz, op
        groups = authz.groups
        named: set[str] = set()
        known = True
        for gid in op.groups:
            g = groups.get(gid)
            if g is None:
                known = False
                continue
            for line in g.permissions:
                if line.object_type in (ObjectType.USER, ObjectType.ALL) and Action.READ in line.actions:
                    named.update(line.applies_to)
        self._named = named
        self._cache: dict[str, bool] = {}
        self._unnamed = authz.check(op, Action.READ, Target(ObjectType.USER, "\x00")).allowed
        self.uniform: bool | None = self._unnamed if known and not named else None

    def __call__(self, uid: str) -> bool:
        if self.uniform is not None:
            return self.uniform
        ok = self._cache.get(uid)
        if ok is None:
            ok = self._cache[uid] = self.authz.check(self.op, Action.READ, Target(ObjectType.USER, uid)).allowed
        return ok


def _place_check(authz: Authorizer, op: Operator) -> Callable[[str, str, str], bool]:
    """Whether `op` may read an access event of `kind` at gateway/door, and that door (cached per place)."""
    cache: dict[tuple[str, str, str], bool] = {}

    def may(gw: str, door: str, kind: str) -> bool:
        key = (gw, door, kind)
        ok = cache.get(key)
        if ok is None:
            ok = authz.check(op, Action.READ, event_target(gw, door or None, kind, "report")).allowed
            ok = ok and (not door or authz.check(op, Action.READ, Target.for_door(gw, door)).allowed)
            cache[key] = ok
        return ok

    return may


def _report_filter(start: float, end: float, where: tuple[str, str] | None, person: str | None) -> list[Any]:
    e = schema.events
    cond: list[Any] = [e.c.type.in_(ACCESS_TYPES), e.c.ts >= start, e.c.ts < end]
    if where is not None:
        cond += [e.c.gateway == where[0], e.c.door == where[1]]
    if person is not None:
        cond.append(e.c.user_id == person)
    return cond


async def _totals(c: AsyncConnection, span: tuple[float, float], where: tuple[str, str] | None, *,
                  person: str | None, may_place: Callable[[str, str, str], bool],
                  may_user: UserReads) -> tuple[Totals, dict[str, Totals]]:  # fmt: skip
    """The day's totals and its totals per reader. When every user is readable alike and no person is asked
    for: a sum over `event_counts` (migration 0009: at most 96 rows a door and type); else counted over the
    day's events (GROUP BY gateway, door, type), or row by row when some users are named by a line."""
    start, end = span
    e, ec = schema.events, schema.event_counts
    cond = _report_filter(start, end, where, person)
    b = schema.COUNT_BUCKET
    if may_user.uniform and person is None and start % b == 0 and end % b == 0:
        q = (select(ec.c.gateway, ec.c.door, ec.c.type, literal(""), func.sum(ec.c.n))
             .where(ec.c.type.in_(ACCESS_TYPES), ec.c.bucket >= start, ec.c.bucket < end)
             .group_by(ec.c.gateway, ec.c.door, ec.c.type))  # fmt: skip
        if where is not None:
            q = q.where(ec.c.gateway == where[0], ec.c.door == where[1])
    elif may_user.uniform is None:  # some users named by a line: each row's user asked (slower, correct)
        q = select(e.c.gateway, e.c.door, e.c.type, e.c.user_id, literal(1)).where(*cond)
    else:
        if not may_user.uniform:  # no user readable: only the requests of unknown cards count
            cond.append(or_(e.c.user_id.is_(None), e.c.user_id == ""))
        q = (select(e.c.gateway, e.c.door, e.c.type, literal(""), func.count()).where(*cond)
             .group_by(e.c.gateway, e.c.door, e.c.type))  # fmt: skip
    totals = Totals()
    by_reader: dict[str, Totals] = {}
    for gw, door, kind, uid, n in (await c.execute(q)).tuples():
        if not n or not may_place(gw, door or "", kind) or (uid and not may_user(uid)):
            continue
        for t in (totals, by_reader.setdefault(f"{gw}/{door or ''}", Totals())):
            if kind == ACCESS_GRANTED:
                t.granted += int(n)
            else:
                t.denied += int(n)
    return totals, by_reader


async def access_requests(c: AsyncConnection, authz: Authorizer, op: Operator, *, day: str | None, tz: str,
                          person: str | None, reader: str | None, limit: int | None = None,
                          cursor: str | None = None) -> AccessRequestReport:  # fmt: skip
    """The access decisions of a local day from the `events` columns the collector fills (events.py), in
    time order, each one the operator may read as an event, a person and a reader (seed 003).

    With `limit`: at most that many rows after `cursor` (keyset on (ts, id)) and `next_cursor`; the totals
    and `by_reader` are still the whole day's, counted by the database; `by_person` only with `person`
    (a busy site's day has tens of thousands of people: the full report or its CSV has them)."""
    start, end, day_text = local_day(day, tz)
    where = _reader(reader)
    e = schema.events
    cond = _report_filter(start, end, where, person)
    may_user = UserReads(authz, op)
    may_place = _place_check(authz, op)
    zone = ZoneInfo(tz)
    after = decode_cursor(cursor) if cursor else None
    cap = MAX_ROWS if limit is None else limit
    q = select(e.c.id, e.c.gateway, e.c.type, e.c.ts, e.c.door, e.c.reader, e.c.card, e.c.user_id, e.c.reason)
    rows: list[AccessRequest] = []
    truncated = False
    last = after
    more = True
    scanned = 0
    while more and len(rows) < cap and (limit is None or scanned < SCAN_LIMIT):
        chunk = MAX_ROWS + 1 if limit is None else min(SCAN_LIMIT, max(2 * limit, 100))
        page = q.where(*cond)
        if last is not None:
            page = page.where(tuple_(e.c.ts, e.c.id) > tuple_(literal(last[0]), literal(last[1])))
        found = (await c.execute(page.order_by(e.c.ts, e.c.id).limit(chunk))).all()
        more = len(found) == chunk
        for ev in found:
            if len(rows) >= cap:
                truncated = limit is None
                more = True
                break
            scanned += 1
            last = (float(ev.ts), str(ev.id))
            gw, door, uid = ev.gateway, ev.door or "", ev.user_id or ""
            if not may_place(gw, door, ev.type) or (uid and not may_user(uid)):
                continue
            rows.append(AccessRequest(
                ts=ev.ts, local=datetime.fromtimestamp(ev.ts, zone).isoformat(timespec="seconds"), gateway=gw,
                door=door, reader=ev.reader or "", card=None if ev.card is None else int(ev.card), person=uid,
                person_name="", result=ev.type.partition(".")[2], reason=ev.reason or ""))  # fmt: skip
        if limit is None:
            more = more and truncated
            break
    names: dict[str, str] = {}
    uids = sorted({r.person for r in rows if r.person})
    u = schema.users
    for i in range(0, len(uids), 900):
        names.update((await c.execute(select(u.c.id, u.c.name).where(u.c.id.in_(uids[i : i + 900])))).tuples().all())
    for r in rows:
        r.person_name = names.get(r.person, "")
    by_person: dict[str, Totals] = {}
    if limit is None:
        totals = Totals()
        by_reader: dict[str, Totals] = {}
        for r in rows:
            for t in (totals, by_person.setdefault(r.person, Totals()),
                      by_reader.setdefault(f"{r.gateway}/{r.door}", Totals())):  # fmt: skip
                if r.result == "granted":
                    t.granted += 1
                else:
                    t.denied += 1
        return AccessRequestReport(day=day_text, tz=tz, person=person, reader=reader, rows=rows, totals=totals,
                                   by_person=by_person, by_reader=by_reader, truncated=truncated)  # fmt: skip
    totals, by_reader = await _totals(c, (start, end), where, person=person, may_place=may_place,
                                      may_user=may_user)  # fmt: skip
    if person is not None and may_user(person):
        by_person[person] = msgspec.structs.replace(totals)
    nxt = encode_cursor(*last) if more and last is not None else None
    return AccessRequestReport(day=day_text, tz=tz, person=person, reader=reader, rows=rows, totals=totals,
                               by_person=by_person, by_reader=by_reader, truncated=False, next_cursor=nxt)  # fmt: skip


async def _group_doors(c: AsyncConnection) -> tuple[dict[str, list[tuple[str, str]]], dict[str, str | None],
                                                    dict[tuple[str, str], str]]:  # fmt: skip
    gd, g, d = schema.group_doors, schema.groups, schema.doors
    doors: dict[str, list[tuple[str, str]]] = {}
    for gid, gw, did in (await c.execute(select(gd.c.group_id, gd.c.gateway, gd.c.door)
                                         .order_by(gd.c.gateway, gd.c.door))).tuples():  # fmt: skip
        doors.setdefault(gid, []).append((gw, did))
    scheds = dict((await c.execute(select(g.c.id, g.c.schedule))).tuples().all())
    names = {(gw, did): n for gw, did, n in (await c.execute(select(d.c.gateway, d.c.id, d.c.name))).tuples()}
    return doors, scheds, names


async def rights_of_person(c: AsyncConnection, authz: Authorizer, op: Operator, uid: str) -> RightsReport:
    u, a, cr = schema.users, schema.assignments, schema.credentials
    user = (await c.execute(select(u.c.id, u.c.name).where(u.c.id == uid))).one_or_none()
    if user is None:
        raise NotFound(f"no user {uid!r}")
    doors, scheds, names = await _group_doors(c)
    cards = [int(k) for k in (await c.execute(select(cr.c.card).where(cr.c.user_id == uid, cr.c.status == "active")
                                              .order_by(cr.c.card))).scalars()]  # fmt: skip
    export = await export_status(c, uid)
    now = time.time()
    rows: list[Right] = []
    q = select(a.c.group_id, a.c.valid_from, a.c.valid_until).where(a.c.user_id == uid).order_by(a.c.group_id)
    for gid, vf, vu in (await c.execute(q)).tuples():
        if vu is not None and vu <= now:
            continue
        for gw, did in doors.get(gid, []):
            if not authz.check(op, Action.READ, Target.for_door(gw, did)).allowed:
                continue
            rows.append(Right(person=uid, person_name=user.name, group=gid, gateway=gw, door=did,
                              door_name=names.get((gw, did), ""), schedule=scheds.get(gid), valid_from=vf,
                              valid_until=vu, cards=cards, exported=gw in export.gateways))  # fmt: skip
    return RightsReport(subject=uid, rows=rows)


async def rights_at_door(c: AsyncConnection, authz: Authorizer, op: Operator, gw: str, door: str) -> RightsReport:
    gd, a, u, cr = schema.group_doors, schema.assignments, schema.users, schema.credentials
    _doors, scheds, names = await _group_doors(c)
    gids = list((await c.execute(select(gd.c.group_id).where(gd.c.gateway == gw, gd.c.door == door))).scalars())
    now = time.time()
    q = (select(a.c.user_id, u.c.name, a.c.group_id, a.c.valid_from, a.c.valid_until).join(u, u.c.id == a.c.user_id)
         .where(a.c.group_id.in_(gids)).order_by(a.c.user_id, a.c.group_id))  # fmt: skip
    found = [r for r in (await c.execute(q)).tuples() if (r[4] is None or r[4] > now)
             and authz.check(op, Action.READ, Target(ObjectType.USER, r[0])).allowed]  # fmt: skip
    uids = sorted({r[0] for r in found})
    cards: dict[str, list[int]] = {}
    exported: dict[str, bool] = {}
    for uid in uids:
        cards[uid] = [int(k) for k in (await c.execute(select(cr.c.card).where(
            cr.c.user_id == uid, cr.c.status == "active").order_by(cr.c.card))).scalars()]  # fmt: skip
        exported[uid] = gw in (await export_status(c, uid, now)).gateways
    rows = [Right(person=uid, person_name=name, group=gid, gateway=gw, door=door, door_name=names.get((gw, door), ""),
                  schedule=scheds.get(gid), valid_from=vf, valid_until=vu, cards=cards[uid], exported=exported[uid])
            for uid, name, gid, vf, vu in found]  # fmt: skip
    return RightsReport(subject=f"{gw}/{door}", rows=rows)


# --- the routes -----------------------------------------------------------------------------------------

REQUEST_HEADER = ("time", "gateway", "door", "reader", "card", "person", "name", "result", "reason")
RIGHTS_HEADER = ("person", "name", "group", "gateway", "door", "door_name", "schedule", "valid_from", "valid_until",
                 "cards", "on_gateway")  # fmt: skip


def _rights_csv(rep: RightsReport, tz: str, name: str) -> Response[bytes]:
    return csv_response(name, to_csv(RIGHTS_HEADER, (
        (r.person, r.person_name, r.group, r.gateway, r.door, r.door_name, r.schedule or "",
         _stamp(r.valid_from, tz), _stamp(r.valid_until, tz), " ".join(map(str, r.cards)),
         "yes" if r.exported else "no") for r in rep.rows)))  # fmt: skip


async def _need(request: Request[Any, Any, Any], *pairs: tuple[ObjectType, Action]) -> Authorizer:
    """The report's other permissions (seed 003: person, reader, event read), as for a collection."""
    p, st = principal_of(request), state_of(request)
    authz = await authorizer(st.db)
    for ot, act in pairs:
        v = may_some(authz, p.operator, ot, act)
        if not v.allowed:
            raise PermissionDenied(p.operator.id, act, any_target(ot), v)
    return authz


class ReportController(Controller):
    path = "/api/v1/reports"
    tags = ["reports"]

    @get("/access-requests", opt={"perm": (ObjectType.EVENT, Action.READ)}, guards=[permitted])
    async def access_request_report(
        self, request: Request[Any, Any, Any], *, day: FromQuery[str | None] = None,
        person: FromQuery[Annotated[str, Meta(max_length=64)] | None] = None,
        reader: FromQuery[Annotated[str, Meta(max_length=130)] | None] = None, format: FromQuery[Format] = "json",
        limit: FromQuery[Annotated[int, Meta(ge=1, le=1000)] | None] = None,
        cursor: FromQuery[Annotated[str, Meta(max_length=200)] | None] = None,
    ) -> AccessRequestReport | Response[bytes]:  # fmt: skip
        """Seed 003's "Access Request Report": granted and denied requests of a site-local day (default today),
        of one person or all, at one reader (GATEWAY/DOOR) or all. With `limit` the rows come a page at a time
        (`next_cursor`), the totals and by_reader still the whole day's, by_person only for `person`."""
        authz = await _need(request, (ObjectType.USER, Action.READ), (ObjectType.DOOR, Action.READ))
        st = state_of(request)
        tz = st.site.tz if st.site else "UTC"
        async with st.db.read() as c:
            rep = await access_requests(c, authz, principal_of(request).operator, day=day, tz=tz, person=person,
                                        reader=reader, limit=None if format == "csv" else limit,
                                        cursor=None if format == "csv" else cursor)  # fmt: skip
        if format == "csv":
            return csv_response(f"access-requests-{rep.day}", to_csv(REQUEST_HEADER, (
                (r.local, r.gateway, r.door, r.reader, "" if r.card is None else r.card, r.person, r.person_name,
                 r.result, r.reason) for r in rep.rows)))  # fmt: skip
        return rep

    @get("/access-rights/person/{uid:str}", opt={"perm": (ObjectType.USER, Action.READ), "id": "uid"},
         guards=[permitted])  # fmt: skip
    async def person_rights(self, request: Request[Any, Any, Any], uid: FromPath[str],
                            format: FromQuery[Format] = "json") -> RightsReport | Response[bytes]:  # fmt: skip
        """Seed 003's "Access Rights for Person": the doors a person opens, through which group, when."""
        authz = await _need(request, (ObjectType.DOOR, Action.READ), (ObjectType.GROUP, Action.READ))
        st = state_of(request)
        async with st.db.read() as c:
            rep = await rights_of_person(c, authz, principal_of(request).operator, uid)
        if format == "csv":
            return _rights_csv(rep, st.site.tz if st.site else "UTC", f"access-rights-{uid}")
        return rep

    @get("/access-rights/reader/{gw:str}/{door:str}", opt={"perm": (ObjectType.DOOR, Action.READ)},
         guards=[permitted])  # fmt: skip
    async def reader_rights(self, request: Request[Any, Any, Any], gw: FromPath[str], door: FromPath[str],
                            format: FromQuery[Format] = "json") -> RightsReport | Response[bytes]:  # fmt: skip
        """Seed 003's "Access Rights for Reader": who opens a door (its reader), through which group, when."""
        authz = await _need(request, (ObjectType.USER, Action.READ), (ObjectType.GROUP, Action.READ))
        p, st = principal_of(request), state_of(request)
        authz.require(p.operator, Action.READ, Target.for_door(gw, door))
        async with st.db.read() as c:
            rep = await rights_at_door(c, authz, p.operator, gw, door)
        if format == "csv":
            return _rights_csv(rep, st.site.tz if st.site else "UTC", f"access-rights-{gw}-{door}")
        return rep
