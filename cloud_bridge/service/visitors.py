"""/api/v1/visitors: visitor management (seed 004) on the service's tables.

A badge pool per location holds numeric badge ids (`PUT /badges/{card}`). Signing a visitor in
(`POST /visits`) makes a visitor user `visit-<n>` holding the badge as its card and the chosen cardholder
groups, from now until the end of the site's local day (or an earlier `until`, `visitors.visit_end`); the
end travels as the windows of the card and the assignments, so the gateway refuses the badge after it even
while offline. Signing out (`POST /visits/{id}/sign-out`) deletes the visitor user (the badge is free
again). Both publish at once to the gateways the visit's groups open (with whatever else is pending for
them), and the answer carries each gateway's acknowledgement.

For the visitor-management system: `GET /cardholder-groups` (the groups and their doors), `GET /badges`,
`POST /refresh` ("Refresh Provider": every online gateway is asked for a new birth, its doors re-read, and
the groups listed again), `GET /test-connection` (the credentials work; the site and its gateways).
"""

# ruff: noqa: ASYNC109

from __future__ import annotations

import time
from datetime import date, datetime, timedelta
from typing import Annotated, Any
from zoneinfo import ZoneInfo

import msgspec
from litestar import Controller, Request, delete, get, post, put
from litestar.params import FromPath, FromQuery, JSONBody
from msgspec import Meta
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from cloud_bridge.operator.db import MAX_GROUPS_PER_USER, MAX_NAME_CHARS, OperatorError, parse_card
from cloud_bridge.operator.visitors import visit_end
from cloud_bridge.permissions import Action, ObjectType, Target

from . import audit, schema
from .core import ServiceState, authorizer, permitted, principal_of, require, state_of, target_for
from .errors import BadRequest, Conflict, NotFound
from .integrations import EntitlementOut, readable_entitlements
from .people import Card, Ident

Name = Annotated[str, Meta(max_length=MAX_NAME_CHARS)]
PUBLISH_TIMEOUT_S = 30.0


class BadgeIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    location: Ident
    name: Name = ""
    type: Name = ""


class BadgeOut(msgspec.Struct, kw_only=True):
    card: int
    location: str
    name: str
    type: str
    #: The visit holding the badge now (None: free).
    visit: int | None
    visitor: str | None
    ends: float | None


class VisitIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    visitor: Annotated[str, Meta(min_length=1, max_length=MAX_NAME_CHARS)]
    location: Ident
    badge: Card
    groups: Annotated[list[Ident], Meta(min_length=1, max_length=MAX_GROUPS_PER_USER)]
    #: Ends earlier than the end of the local day (UTC seconds).
    until: float | None = None


class VisitOut(msgspec.Struct, kw_only=True):
    id: int
    visitor: str
    badge: int
    badge_name: str
    location: str
    user_id: str
    groups: list[str]
    started: float
    ends: float
    signed_out: float | None
    #: on_site | signed_out | ended
    state: str


class VisitResult(msgspec.Struct, kw_only=True):
    visit: VisitOut
    #: Per gateway: the version it acknowledged, or "error: ..." (None: provisioning is not running).
    published: dict[str, int | str] | None
    not_sent: list[str]


class GatewayCheck(msgspec.Struct, kw_only=True):
    id: str
    online: bool
    last_seen: float | None


class Connection(msgspec.Struct, kw_only=True):
    ok: bool
    site: str
    operator: str
    via: str
    provisioning: bool
    gateways: list[GatewayCheck]


class Refreshed(msgspec.Struct, kw_only=True):
    #: Per gateway: "ok" (a new birth came), or why not.
    gateways: dict[str, str]
    groups: list[EntitlementOut]


# --- the data layer -----------------------------------------------------------------------------------


def _state(r: Any, now: float) -> str:
    if r.signed_out is not None:
        return "signed_out"
    return "ended" if r.ends <= now else "on_site"


async def visits(c: AsyncConnection, *, ids: list[int] | None = None, since: float | None = None,
                 until: float | None = None, location: str | None = None) -> list[VisitOut]:  # fmt: skip
    v, b, a = schema.visits, schema.badges, schema.assignments
    q = select(v, b.c.name.label("badge_name")).join(b, b.c.card == v.c.badge, isouter=True).order_by(v.c.id)
    if ids is not None:
        q = q.where(v.c.id.in_(ids))
    if since is not None:
        q = q.where(v.c.ends > since)
    if until is not None:
        q = q.where(v.c.started < until)
    if location is not None:
        q = q.where(v.c.location == location)
    rows = (await c.execute(q)).all()
    groups: dict[str, list[str]] = {}
    uids = [r.user_id for r in rows]
    if uids:
        q2 = select(a.c.user_id, a.c.group_id).where(a.c.user_id.in_(uids)).order_by(a.c.group_id)
        for uid, gid in (await c.execute(q2)).tuples():
            groups.setdefault(uid, []).append(gid)
    now = time.time()
    return [VisitOut(id=int(r.id), visitor=r.visitor, badge=int(r.badge), badge_name=r.badge_name or "",
                     location=r.location, user_id=r.user_id, groups=groups.get(r.user_id, []), started=r.started,
                     ends=r.ends, signed_out=r.signed_out, state=_state(r, now)) for r in rows]  # fmt: skip


async def badges(c: AsyncConnection, location: str | None = None, *, card: int | None = None) -> list[BadgeOut]:
    """The badges (of one location, or one badge) with the visit holding each now."""
    b, v = schema.badges, schema.visits
    now = time.time()
    q = select(b).order_by(b.c.location, b.c.card)
    if location is not None:
        q = q.where(b.c.location == location)
    if card is not None:
        q = q.where(b.c.card == card)
    rows = (await c.execute(q)).all()
    held = {int(r.badge): r for r in (await c.execute(select(v.c.id, v.c.badge, v.c.visitor, v.c.ends).where(
        v.c.signed_out.is_(None), v.c.ends > now))).all()}  # fmt: skip
    out = []
    for r in rows:
        h = held.get(int(r.card))
        out.append(BadgeOut(card=int(r.card), location=r.location, name=r.name, type=r.type,
                            visit=None if h is None else int(h.id), visitor=None if h is None else h.visitor,
                            ends=None if h is None else h.ends))  # fmt: skip
    return out


async def visit(c: AsyncConnection, vid: int) -> VisitOut | None:
    found = await visits(c, ids=[vid])
    return found[0] if found else None


async def issue(c: AsyncConnection, data: VisitIn, *, tz: str, now: float) -> int:
    """Sign a visitor in (one transaction: the caller's): returns the visit id."""
    v, b, u, cr, a = schema.visits, schema.badges, schema.users, schema.credentials, schema.assignments
    try:
        ends = visit_end(now, tz, data.until)
    except OperatorError as e:
        raise BadRequest(str(e), "body.until") from None
    loc = (await c.execute(select(b.c.location).where(b.c.card == data.badge))).scalar()
    if loc is None:
        raise NotFound(f"badge {data.badge} is in no badge pool (body.badge)")
    if loc != data.location:
        raise BadRequest(f"badge {data.badge} belongs to location {loc!r}, not {data.location!r}", "body.badge")
    if len(set(data.groups)) != len(data.groups):
        raise BadRequest("a group is listed twice", "body.groups")
    have = set((await c.execute(select(schema.groups.c.id).where(schema.groups.c.id.in_(data.groups)))).scalars())
    for i, g in enumerate(data.groups):
        if g not in have:
            raise NotFound(f"unknown cardholder group {g!r} (body.groups[{i}])")
    busy = (await c.execute(select(v.c.id).where(v.c.badge == data.badge, v.c.signed_out.is_(None), v.c.ends > now))
            ).scalar()  # fmt: skip
    if busy is not None:
        raise Conflict(f"badge {data.badge} is in use by visit {busy} (sign it out first)")
    # an earlier visit with this badge that ran past its end: its user and card go now
    for vid_old, uid_old in (await c.execute(select(v.c.id, v.c.user_id).where(
            v.c.badge == data.badge, v.c.signed_out.is_(None)))).tuples():  # fmt: skip
        await c.execute(u.delete().where(u.c.id == uid_old))
        await c.execute(v.update().where(v.c.id == vid_old).values(signed_out=now))
    vid = int((await c.execute(v.insert().values(visitor=data.visitor, badge=data.badge, location=data.location,
                                                 user_id="", started=now, ends=ends).returning(v.c.id))
               ).scalar_one())  # fmt: skip
    uid = f"visit-{vid}"
    if (await c.execute(select(u.c.id).where(u.c.id == uid))).scalar() is not None:
        raise Conflict(f"a user {uid!r} exists already (not made by a visit)")
    await c.execute(v.update().where(v.c.id == vid).values(user_id=uid))
    await c.execute(u.insert().values(id=uid, name=data.visitor, kind="visitor", valid_from=now, valid_until=ends))
    await c.execute(cr.insert().values(card=data.badge, user_id=uid, valid_from=now, valid_until=ends))
    await c.execute(a.insert(), [{"user_id": uid, "group_id": g, "valid_from": now, "valid_until": ends}
                                 for g in data.groups])  # fmt: skip
    return vid


async def sign_out(c: AsyncConnection, vid: int, *, now: float) -> None:
    v = schema.visits
    row = (await c.execute(select(v.c.user_id, v.c.signed_out).where(v.c.id == vid))).one_or_none()
    if row is None:
        raise NotFound(f"no visit {vid}")
    if row.signed_out is not None:
        raise Conflict(f"visit {vid} is already signed out")
    await c.execute(schema.users.delete().where(schema.users.c.id == row.user_id, schema.users.c.kind == "visitor"))
    await c.execute(v.update().where(v.c.id == vid).values(signed_out=now))


async def _gateways_of(c: AsyncConnection, groups: list[str]) -> list[str]:
    gd = schema.group_doors
    q = select(gd.c.gateway).where(gd.c.group_id.in_(groups)).distinct().order_by(gd.c.gateway)
    known = set((await c.execute(select(schema.gateways.c.id))).scalars())
    return [g for g in (await c.execute(q)).scalars() if g in known]


async def _publish(st: ServiceState, gateways: list[str]) -> tuple[dict[str, int | str] | None, list[str]]:
    if st.provisioner is None:
        return None, []
    if not gateways:
        return {}, []
    result = await st.provisioner.publish(gateways, timeout=PUBLISH_TIMEOUT_S)
    return result, list(st.provisioner.last_not_sent)


def local_day(day: str | None, tz: str) -> tuple[float, float, str]:
    """A site-local day ("YYYY-MM-DD", None: today) as [start, end) UTC seconds and its text."""
    z = ZoneInfo(tz)
    try:
        d = date.fromisoformat(day) if day else datetime.now(z).date()
    except ValueError:
        raise BadRequest(f"not a day: {day!r} (use YYYY-MM-DD)", "query.day") from None
    start = datetime.combine(d, datetime.min.time(), z)
    end = datetime.combine(d + timedelta(days=1), datetime.min.time(), z)
    return start.timestamp(), end.timestamp(), d.isoformat()


# --- the routes ----------------------------------------------------------------------------------------

VISITOR, POOL = ObjectType.VISITOR, ObjectType.BADGE_POOL


class VisitorController(Controller):
    path = "/api/v1/visitors"
    tags = ["visitors"]

    @get("/test-connection", opt={"perm": (VISITOR, Action.READ)}, guards=[permitted])
    async def test_connection(self, request: Request[Any, Any, Any]) -> Connection:
        """Seed 004's "Test Connection": the credentials work; the site, whether provisioning runs, the gateways."""
        p, st = principal_of(request), state_of(request)
        g = schema.gateways
        async with st.db.read() as c:
            rows = (await c.execute(select(g.c.id, g.c.online, g.c.last_seen).order_by(g.c.id))).all()
        return Connection(ok=True, site=st.site.site if st.site else "", operator=p.operator.id, via=p.via,
                          provisioning=st.provisioner is not None,
                          gateways=[GatewayCheck(id=r.id, online=bool(r.online), last_seen=r.last_seen)
                                    for r in rows])  # fmt: skip

    @get("/cardholder-groups", opt={"perm": (ObjectType.GROUP, Action.READ)}, guards=[permitted])
    async def cardholder_groups(self, request: Request[Any, Any, Any]) -> list[EntitlementOut]:
        """The cardholder groups a badge may be given (those the operator may read), with their doors."""
        return await readable_entitlements(request)

    @post("/refresh", opt={"perm": (ObjectType.GATEWAY, Action.READ)}, guards=[permitted], status_code=200)
    async def refresh(self, request: Request[Any, Any, Any],
                      timeout: Annotated[float, Meta(gt=0, le=60)] = 10.0) -> Refreshed:  # fmt: skip
        """Seed 004's "Refresh Provider": each online gateway the operator may read announces itself again (its doors
        are re-read), then the cardholder groups are listed. A gateway that does not answer is named."""
        p, st = principal_of(request), state_of(request)
        authz = await authorizer(st.db)
        g = schema.gateways
        async with st.db.read() as c:
            rows = (await c.execute(select(g.c.id, g.c.online).order_by(g.c.id))).all()
        out: dict[str, str] = {}
        for r in rows:
            if not authz.check(p.operator, Action.READ, Target.for_gateway(r.id)).allowed:
                continue
            if st.provisioner is None or st.provisioner.link is None:
                out[r.id] = "error: provisioning is not running"
            elif not st.provisioner.link.online(r.id):
                out[r.id] = "offline"
            else:
                try:
                    await st.provisioner.link.rebirth(r.id, timeout=timeout)
                    out[r.id] = "ok"
                except TimeoutError:
                    out[r.id] = "error: no answer in time"
        return Refreshed(gateways=out, groups=await readable_entitlements(request))

    # badges --------------------------------------------------------------------------------------------

    @get("/badges", opt={"perm": (POOL, Action.READ)}, guards=[permitted])
    async def list_badges(self, request: Request[Any, Any, Any],
                          location: FromQuery[str | None] = None) -> list[BadgeOut]:
        """The badges of every pool (or one location's) the operator may read, with the visit holding each."""
        p, st = principal_of(request), state_of(request)
        authz = await authorizer(st.db)
        async with st.db.read() as c:
            rows = await badges(c, location)
        return [r for r in rows if authz.check(p.operator, Action.READ, Target(POOL, r.location)).allowed]

    @put("/badges/{badge:str}", opt={"perm": (POOL, Action.UPDATE)}, guards=[permitted])
    async def put_badge(self, request: Request[Any, Any, Any], badge: FromPath[str],
                        data: JSONBody[BadgeIn]) -> BadgeOut:
        """Add a badge to a location's pool, or rename it. The badge id is a number (the path: digits only)."""
        p, st = principal_of(request), state_of(request)
        try:
            card = parse_card(badge)  # seed 004: numeric only, anything else a validation error
        except OperatorError as e:
            raise BadRequest(str(e).replace("card ID", "badge ID"), "path.badge") from None
        b = schema.badges
        async with st.db.write() as c:
            before = (await c.execute(select(b).where(b.c.card == card))).one_or_none()
            if before is None:
                await require(st.db, p, Action.CREATE, Target(POOL, data.location))
                owner = (await c.execute(select(schema.credentials.c.user_id).where(
                    schema.credentials.c.card == card))).scalar()  # fmt: skip
                if owner is not None:
                    raise Conflict(f"card {card} is already assigned to user {owner!r}")
                await c.execute(b.insert().values(card=card, location=data.location, name=data.name, type=data.type))
            else:
                await require(st.db, p, Action.UPDATE, Target(POOL, before.location))
                if before.location != data.location:
                    await require(st.db, p, Action.CREATE, Target(POOL, data.location))
                await c.execute(b.update().where(b.c.card == card).values(location=data.location, name=data.name,
                                                                          type=data.type))  # fmt: skip
            after = {"card": card, "location": data.location, "name": data.name, "type": data.type}
            prior = None if before is None else {k: before._mapping[k] for k in after}
            if prior != after:
                await audit.record(c, p, "badge.put", "badge_pool", data.location, before=prior, after=after)
            out = await badges(c, card=card)
        return out[0]

    @delete("/badges/{card:int}", opt={"perm": (POOL, Action.DELETE)}, guards=[permitted], status_code=200)
    async def delete_badge(self, request: Request[Any, Any, Any], card: FromPath[int]) -> dict[str, Any]:
        p, st = principal_of(request), state_of(request)
        b, v = schema.badges, schema.visits
        async with st.db.write() as c:
            before = (await c.execute(select(b).where(b.c.card == card))).one_or_none()
            if before is None:
                raise NotFound(f"no badge {card}")
            await require(st.db, p, Action.DELETE, Target(POOL, before.location))
            busy = (await c.execute(select(v.c.id).where(v.c.badge == card, v.c.signed_out.is_(None),
                                                         v.c.ends > time.time()))).scalar()  # fmt: skip
            if busy is not None:
                raise Conflict(f"badge {card} is in use by visit {busy}")
            await c.execute(b.delete().where(b.c.card == card))
            prior = {k: before._mapping[k] for k in ("card", "location", "name", "type")}
            await audit.record(c, p, "badge.delete", "badge_pool", before.location, before=prior)
        return prior

    # visits --------------------------------------------------------------------------------------------

    @get("/visits", opt={"perm": (VISITOR, Action.READ)}, guards=[permitted])
    async def list_visits(self, request: Request[Any, Any, Any], day: FromQuery[str | None] = None,
                          location: FromQuery[str | None] = None) -> list[VisitOut]:  # fmt: skip
        """The visits of a site-local day (default today): each with its badge, groups, end and state."""
        st = state_of(request)
        start, end, _ = local_day(day, st.site.tz if st.site else "UTC")
        async with st.db.read() as c:
            return await visits(c, since=start, until=end, location=location)

    @get("/visits/{vid:int}", opt={"perm": (VISITOR, Action.READ), "id": "vid"}, guards=[permitted])
    async def get_visit(self, request: Request[Any, Any, Any], vid: FromPath[int]) -> VisitOut:
        async with state_of(request).db.read() as c:
            out = await visit(c, vid)
        if out is None:
            raise NotFound(f"no visit {vid}")
        return out

    @post("/visits", opt={"perm": (VISITOR, Action.CREATE)}, guards=[permitted], status_code=201)
    async def sign_in(self, request: Request[Any, Any, Any], data: JSONBody[VisitIn]) -> VisitResult:
        """Sign a visitor in with a badge of the location's pool and cardholder groups, until the end of the
        local day (or `until`); published at once to the gateways the groups open."""
        p, st = principal_of(request), state_of(request)
        await require(st.db, p, Action.READ, Target(POOL, data.location))
        for g in data.groups:
            await require(st.db, p, Action.READ, await target_for(st.db, ObjectType.GROUP, g))
        async with st.db.write() as c:
            vid = await issue(c, data, tz=st.site.tz if st.site else "UTC", now=time.time())
            out = await visit(c, vid)
            await audit.record(c, p, "visit.sign_in", "visitor", str(vid), after=out)
            gws = await _gateways_of(c, data.groups)
        assert out is not None
        published, not_sent = await _publish(st, gws)
        return VisitResult(visit=out, published=published, not_sent=not_sent)

    @post("/visits/{vid:int}/sign-out", opt={"perm": (VISITOR, Action.UPDATE), "id": "vid"}, guards=[permitted],
          status_code=200)  # fmt: skip
    async def sign_out(self, request: Request[Any, Any, Any], vid: FromPath[int]) -> VisitResult:
        """Sign a visitor out: the badge is revoked (its visitor user deleted) and published at once."""
        p, st = principal_of(request), state_of(request)
        async with st.db.write() as c:
            before = await visit(c, vid)
            if before is None:
                raise NotFound(f"no visit {vid}")
            gws = await _gateways_of(c, before.groups)
            await sign_out(c, vid, now=time.time())
            out = await visit(c, vid)
            await audit.record(c, p, "visit.sign_out", "visitor", str(vid), before=before, after=out)
        assert out is not None
        published, not_sent = await _publish(st, gws)
        return VisitResult(visit=out, published=published, not_sent=not_sent)
