"""/api/v1/users and /api/v1/cards: the people of a site and their cards (seed 001; seed 000's PUT by id).

A user's assignments are windows in groups (`/api/v1/users/{id}/assignments`: a group from/until, the same
group may have several windows); `/api/v1/users/{id}/access` answers "which doors, when": every door of
every assigned group per gateway, with the group's schedule and the window (the assignment's window cut to
the user's own validity), and why none of it works today if so (deactivated, no usable card, ...).

A user's id is its external id (the identity manager's): `PUT /api/v1/users/{id}` creates or replaces it,
cards and groups included, and answers the same for the same body (idempotent). The rules are the site
model's (cloud_bridge/operator/db.py): ids, name length, numeric card numbers unique per site (badge pools
included), at most 256 groups.
"""

from __future__ import annotations

import base64
import time
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, delete, get, patch, post, put
from litestar.params import FromPath, FromQuery, JSONBody
from msgspec import UNSET, Meta, UnsetType
from sqlalchemy import and_, select
from sqlalchemy.ext.asyncio import AsyncConnection

from cloud_bridge.operator.db import MAX_GROUPS_PER_USER, MAX_NAME_CHARS
from cloud_bridge.permissions import Action, ObjectType, Target

from . import audit, schedules, schema
from .core import authorizer, permitted, principal_of, require, state_of, target_for
from .errors import BadRequest, Conflict, NotFound
from .listing import user_ids

Ident = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:@\-]+$")]
Card = Annotated[int, Meta(ge=0, le=2**63 - 1)]
Name = Annotated[str, Meta(max_length=MAX_NAME_CHARS)]
Status = Annotated[str, Meta(pattern=r"^(active|suspended|lost|stolen|revoked|inactive)$")]


class CardIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    card: Card
    status: Status = "active"
    format: Annotated[str, Meta(max_length=32)] = "h10301"
    valid_from: float | None = None
    valid_until: float | None = None


class CardOut(msgspec.Struct, kw_only=True):
    card: int
    user_id: str
    status: str
    format: str
    valid_from: float | None
    valid_until: float | None


class NewCard(CardIn, forbid_unknown_fields=True, kw_only=True):
    user_id: Ident


class CardPatch(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    status: Status | UnsetType = UNSET
    valid_from: float | UnsetType | None = UNSET
    valid_until: float | UnsetType | None = UNSET


class UserBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A user as PUT replaces it (seed 001's add-user page: card ID, groups, activate, offline access)."""

    name: Name = ""
    active: bool = True
    offline_access: bool = False
    valid_from: float | None = None
    valid_until: float | None = None
    cards: Annotated[list[CardIn], Meta(max_length=16)] = []
    groups: Annotated[list[Ident], Meta(max_length=MAX_GROUPS_PER_USER)] = []


class NewUser(UserBody, forbid_unknown_fields=True, kw_only=True):
    id: Ident


class UserPatch(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: Name | UnsetType = UNSET
    active: bool | UnsetType = UNSET
    offline_access: bool | UnsetType = UNSET
    valid_from: float | UnsetType | None = UNSET
    valid_until: float | UnsetType | None = UNSET


class UserOut(msgspec.Struct, kw_only=True):
    id: str
    name: str
    active: bool
    offline_access: bool
    valid_from: float | None
    valid_until: float | None
    kind: str
    cards: list[CardOut]
    groups: list[str]


class AssignmentIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    group: Ident
    #: UTC seconds; None: since always / for ever.
    valid_from: float | None = None
    valid_until: float | None = None


class AssignmentOut(AssignmentIn, kw_only=True):
    id: int
    user_id: str


class AccessLine(msgspec.Struct, kw_only=True):
    """One door the user may open: through `group`, during `schedule` (None: always), inside the window."""

    gateway: str
    door: str
    door_name: str
    group: str
    schedule: str | None
    #: The schedule for people ("Mon 08:00-18:00, ...; on 2 holiday(s): closed"), "always" without one.
    when: str
    valid_from: float | None
    valid_until: float | None
    #: Whether the window holds now (the schedule is the gateway's to apply at the door).
    in_window: bool


class EffectiveAccess(msgspec.Struct, kw_only=True):
    user_id: str
    active: bool
    offline_access: bool
    #: The cards that open doors (status active, inside their own validity now).
    usable_cards: list[int]
    doors: list[AccessLine]
    #: Why this user opens nothing now, if so (empty: the doors above open within their windows).
    blocked: list[str]


class UserPage(msgspec.Struct, kw_only=True):
    items: list[UserOut]
    #: Pass as `cursor` for the next page; None on the last page.
    next_cursor: str | None


# --- the service layer --------------------------------------------------------------------------------


def _card_out(r: Any) -> CardOut:
    return CardOut(card=int(r.card), user_id=r.user_id, status=r.status, format=r.format, valid_from=r.valid_from,
                   valid_until=r.valid_until)  # fmt: skip


async def load_users(c: AsyncConnection, ids: list[str]) -> list[UserOut]:
    if not ids:
        return []
    u, cr, a = schema.users, schema.credentials, schema.assignments
    rows = (await c.execute(select(u).where(u.c.id.in_(ids)).order_by(u.c.id))).all()
    cards: dict[str, list[CardOut]] = {}
    for r in (await c.execute(select(cr).where(cr.c.user_id.in_(ids)).order_by(cr.c.card))).all():
        cards.setdefault(r.user_id, []).append(_card_out(r))
    groups: dict[str, list[str]] = {}
    for uid, gid in (await c.execute(select(a.c.user_id, a.c.group_id).where(a.c.user_id.in_(ids))
                                     .order_by(a.c.group_id))).all():  # fmt: skip
        if gid not in groups.setdefault(uid, []):
            groups[uid].append(gid)
    return [UserOut(id=r.id, name=r.name, active=bool(r.active), offline_access=bool(r.offline_access),
                    valid_from=r.valid_from, valid_until=r.valid_until, kind=r.kind, cards=cards.get(r.id, []),
                    groups=groups.get(r.id, [])) for r in rows]  # fmt: skip


async def user(c: AsyncConnection, uid: str) -> UserOut | None:
    found = await load_users(c, [uid])
    return found[0] if found else None


async def card_owner(c: AsyncConnection, card: int) -> str | None:
    owner = (await c.execute(select(schema.credentials.c.user_id).where(schema.credentials.c.card == card))).scalar()
    if owner is not None:
        return f"user {owner!r}"
    loc = (await c.execute(select(schema.badges.c.location).where(schema.badges.c.card == card))).scalar()
    return None if loc is None else f"badge pool {loc}"


async def _check_groups(c: AsyncConnection, groups: list[str]) -> None:
    have = set((await c.execute(select(schema.groups.c.id).where(schema.groups.c.id.in_(groups)))).scalars())
    for i, g in enumerate(groups):
        if g not in have:
            raise NotFound(f"unknown group {g!r} (body.groups[{i}])")


async def _write_user(c: AsyncConnection, uid: str, body: UserBody, *, replace: bool) -> None:
    u, cr, a = schema.users, schema.credentials, schema.assignments
    if len(set(body.groups)) != len(body.groups):
        raise BadRequest("a group is listed twice", "body.groups")
    seen: set[int] = set()
    for i, k in enumerate(body.cards):
        if k.card in seen:
            raise BadRequest(f"card {k.card} is listed twice", f"body.cards[{i}].card")
        seen.add(k.card)
    await _check_groups(c, body.groups)
    values = {"name": body.name, "active": body.active, "offline_access": body.offline_access,
              "valid_from": body.valid_from, "valid_until": body.valid_until}  # fmt: skip
    if replace:
        await c.execute(u.update().where(u.c.id == uid).values(**values))
        await c.execute(cr.delete().where(cr.c.user_id == uid))
    else:
        await c.execute(u.insert().values(id=uid, kind="user", **values))
    for i, k in enumerate(body.cards):
        if (owner := await card_owner(c, k.card)) is not None:
            raise Conflict(f"card {k.card} is already assigned to {owner} (body.cards[{i}].card)")
        await c.execute(cr.insert().values(card=k.card, user_id=uid, status=k.status, format=k.format,
                                           valid_from=k.valid_from, valid_until=k.valid_until))  # fmt: skip
    # groups: keep the windows of assignments that stay, add the new ones (for ever), drop the rest
    have = set((await c.execute(select(a.c.group_id).where(a.c.user_id == uid))).scalars())
    gone = have - set(body.groups)
    if gone:
        await c.execute(a.delete().where(a.c.user_id == uid, a.c.group_id.in_(gone)))
    new = [g for g in body.groups if g not in have]
    if new:
        await c.execute(a.insert(), [{"user_id": uid, "group_id": g} for g in new])


def _assignment_out(r: Any) -> AssignmentOut:
    return AssignmentOut(id=int(r.id), user_id=r.user_id, group=r.group_id, valid_from=r.valid_from,
                         valid_until=r.valid_until)  # fmt: skip


async def assignments_of(c: AsyncConnection, uid: str) -> list[AssignmentOut]:
    a = schema.assignments
    rows = (await c.execute(select(a).where(a.c.user_id == uid).order_by(a.c.group_id, a.c.id))).all()
    return [_assignment_out(r) for r in rows]


def _window(*spans: tuple[float | None, float | None]) -> tuple[float | None, float | None]:
    starts = [f for f, _ in spans if f is not None]
    ends = [u for _, u in spans if u is not None]
    return (max(starts) if starts else None), (min(ends) if ends else None)


def _inside(ts: float, frm: float | None, until: float | None) -> bool:
    return (frm is None or frm <= ts) and (until is None or ts < until)


async def effective_access(c: AsyncConnection, uid: str, now: float) -> EffectiveAccess | None:
    """Which doors, when, for one user (see the module docstring)."""
    u = await user(c, uid)
    if u is None:
        return None
    gd, d, g = schema.group_doors, schema.doors, schema.groups
    assigned = await assignments_of(c, uid)
    gids = sorted({x.group for x in assigned})
    sched_of: dict[str, str | None] = {}
    if gids:
        sched_of = {r.id: r.schedule for r in (await c.execute(select(g.c.id, g.c.schedule).where(g.c.id.in_(gids))))}
    scheds = await schedules.load(c, [s for s in sched_of.values() if s]) if sched_of else {}
    doors: dict[str, list[tuple[str, str]]] = {}
    if gids:
        q = select(gd.c.group_id, gd.c.gateway, gd.c.door).where(gd.c.group_id.in_(gids))
        for gid, gw, door in (await c.execute(q.order_by(gd.c.gateway, gd.c.door))).all():
            doors.setdefault(gid, []).append((gw, door))
    names = {(gw, i): n for gw, i, n in (await c.execute(select(d.c.gateway, d.c.id, d.c.name))).all()}
    lines: list[AccessLine] = []
    for x in assigned:
        frm, until = _window((u.valid_from, u.valid_until), (x.valid_from, x.valid_until))
        sid = sched_of.get(x.group)
        for gw, door in doors.get(x.group, []):
            lines.append(AccessLine(gateway=gw, door=door, door_name=names.get((gw, door), ""), group=x.group,
                                    schedule=sid, when=schedules.describe(scheds.get(sid) if sid else None),
                                    valid_from=frm, valid_until=until,
                                    in_window=_inside(now, frm, until)))  # fmt: skip
    lines.sort(key=lambda ln: (ln.gateway, ln.door, ln.group))
    usable = [k.card for k in u.cards if k.status == "active" and _inside(now, k.valid_from, k.valid_until)]
    blocked = []
    if not u.active:
        blocked.append("access control is deactivated for this user")
    if not _inside(now, u.valid_from, u.valid_until):
        blocked.append("outside the user's validity")
    if not usable:
        blocked.append("no usable card (none, or none active and valid now)")
    if not lines:
        blocked.append("no group assigned opens a door")
    return EffectiveAccess(user_id=uid, active=u.active, offline_access=u.offline_access, usable_cards=usable,
                           doors=lines, blocked=blocked)  # fmt: skip


def _cursor(value: str) -> str:
    return base64.urlsafe_b64encode(value.encode()).decode().rstrip("=")


def _uncursor(value: str) -> str:
    try:
        out = base64.b64decode(value + "=" * (-len(value) % 4), altchars=b"-_", validate=True).decode()
    except (ValueError, UnicodeDecodeError):
        out = ""
    if not out:
        raise BadRequest("not a cursor this service gave out", "query.cursor")
    return out


# --- the routes ----------------------------------------------------------------------------------------

READ, CREATE, UPDATE, DELETE = Action.READ, Action.CREATE, Action.UPDATE, Action.DELETE


class UserController(Controller):
    path = "/api/v1/users"
    tags = ["users"]

    @get("/", opt={"perm": (ObjectType.USER, READ)}, guards=[permitted])
    async def list_users(
        self, request: Request[Any, Any, Any], search: Annotated[str, Meta(max_length=256)] = "",
        cursor: FromQuery[str | None] = None, limit: Annotated[int, Meta(ge=1, le=500)] = 50,
    ) -> UserPage:  # fmt: skip
        """Users by id; `search` matches the start of the id or a part of the name (case-insensitive). Only
        the users the operator may read are listed."""
        p, st = principal_of(request), state_of(request)
        authz = await authorizer(st.db)
        items: list[UserOut] = []
        after = _uncursor(cursor) if cursor else None
        async with st.db.read() as c:
            while len(items) < limit:
                ids = await user_ids(c, search=search, after=after, limit=limit * 2)  # listing.py: on indexes
                if not ids:
                    after = None
                    break
                ok = [i for i in ids if authz.check(p.operator, READ, Target(ObjectType.USER, i)).allowed]
                for uid in ok[: limit - len(items)]:
                    after = uid
                items += await load_users(c, ok[: limit - len(items)])
                if len(ids) < limit * 2 and len(items) < limit:
                    after = None
                    break
                if len(items) < limit:
                    after = ids[-1]
        return UserPage(items=items, next_cursor=_cursor(after) if after is not None and items else None)

    @get("/{uid:str}", opt={"perm": (ObjectType.USER, READ), "id": "uid"}, guards=[permitted])
    async def get_user(self, request: Request[Any, Any, Any], uid: FromPath[str]) -> UserOut:
        async with state_of(request).db.read() as c:
            found = await user(c, uid)
        if found is None:
            raise NotFound(f"no user {uid!r}")
        return found

    @post("/", opt={"perm": (ObjectType.USER, CREATE)}, guards=[permitted], status_code=201)
    async def create_user(self, request: Request[Any, Any, Any], data: JSONBody[NewUser]) -> UserOut:
        p, st = principal_of(request), state_of(request)
        await require(st.db, p, CREATE, Target(ObjectType.USER, data.id))
        for k in data.cards:
            await require(st.db, p, CREATE, Target(ObjectType.CREDENTIAL, str(k.card)))
        async with st.db.write() as c:
            if await user(c, data.id) is not None:
                raise Conflict(f"user {data.id!r} already exists (PUT /api/v1/users/{data.id} replaces it)")
            await _write_user(c, data.id, data, replace=False)
            out = await user(c, data.id)
            await audit.record(c, p, "user.create", "user", data.id, after=out)
        assert out is not None
        return out

    @put("/{uid:str}", opt={"perm": (ObjectType.USER, UPDATE), "id": "uid"}, guards=[permitted])
    async def put_user(self, request: Request[Any, Any, Any], uid: FromPath[str], data: JSONBody[UserBody]) -> UserOut:
        """Create or replace a user by its (external) id, with exactly these cards and groups."""
        p, st = principal_of(request), state_of(request)
        if not msgspec.convert(uid, Ident):
            raise BadRequest("bad user id", "path.uid")
        async with st.db.read() as c:
            before = await user(c, uid)
        if before is None:
            await require(st.db, p, CREATE, Target(ObjectType.USER, uid))
        have = {k.card for k in before.cards} if before else set()
        for k in data.cards:
            if k.card not in have:
                await require(st.db, p, CREATE, Target(ObjectType.CREDENTIAL, str(k.card)))
        for card in have - {k.card for k in data.cards}:
            await require(st.db, p, DELETE, Target(ObjectType.CREDENTIAL, str(card)))
        async with st.db.write() as c:
            await _write_user(c, uid, data, replace=before is not None)
            out = await user(c, uid)
            if out != before:
                await audit.record(c, p, "user.put", "user", uid, before=before, after=out)
        assert out is not None
        return out

    @patch("/{uid:str}", opt={"perm": (ObjectType.USER, UPDATE), "id": "uid"}, guards=[permitted])
    async def patch_user(self, request: Request[Any, Any, Any], uid: FromPath[str],
                         data: JSONBody[UserPatch]) -> UserOut:
        """Change some fields (activate/deactivate, offline access, name, validity)."""
        p, st = principal_of(request), state_of(request)
        values = {f: getattr(data, f) for f in data.__struct_fields__ if getattr(data, f) is not UNSET}
        async with st.db.write() as c:
            before = await user(c, uid)
            if before is None:
                raise NotFound(f"no user {uid!r}")
            if values:
                await c.execute(schema.users.update().where(schema.users.c.id == uid).values(**values))
            out = await user(c, uid)
            await audit.record(c, p, "user.update", "user", uid, before=before, after=out)
        assert out is not None
        return out

    @delete("/{uid:str}", opt={"perm": (ObjectType.USER, DELETE), "id": "uid"}, guards=[permitted],
            status_code=200)  # fmt: skip
    async def delete_user(self, request: Request[Any, Any, Any], uid: FromPath[str]) -> UserOut:
        """Delete a user with its cards (the card numbers become free) and assignments."""
        p, st = principal_of(request), state_of(request)
        async with st.db.write() as c:
            before = await user(c, uid)
            if before is None:
                raise NotFound(f"no user {uid!r}")
            await c.execute(schema.users.delete().where(schema.users.c.id == uid))
            await audit.record(c, p, "user.delete", "user", uid, before=before)
        return before

    # --- assignments with windows, effective access ---------------------------------------------------

    @get("/{uid:str}/assignments", opt={"perm": (ObjectType.USER, READ), "id": "uid"}, guards=[permitted])
    async def list_assignments(self, request: Request[Any, Any, Any], uid: FromPath[str]) -> list[AssignmentOut]:
        async with state_of(request).db.read() as c:
            if await user(c, uid) is None:
                raise NotFound(f"no user {uid!r}")
            return await assignments_of(c, uid)

    @post("/{uid:str}/assignments", opt={"perm": (ObjectType.USER, UPDATE), "id": "uid"}, guards=[permitted],
          status_code=201)  # fmt: skip
    async def add_assignment(self, request: Request[Any, Any, Any], uid: FromPath[str],
                             data: JSONBody[AssignmentIn]) -> AssignmentOut:
        """Assign the user to a group for a window (from/until, UTC seconds; None: open-ended). The same group
        may hold several windows; the same window twice is a conflict."""
        p, st = principal_of(request), state_of(request)
        if data.valid_from is not None and data.valid_until is not None and not data.valid_from < data.valid_until:
            raise BadRequest("valid_from must be before valid_until", "body.valid_until")
        await require(st.db, p, READ, await target_for(st.db, ObjectType.GROUP, data.group))
        a = schema.assignments
        async with st.db.write() as c:
            if await user(c, uid) is None:
                raise NotFound(f"no user {uid!r}")
            await _check_groups(c, [data.group])
            have = await assignments_of(c, uid)
            if len(have) >= MAX_GROUPS_PER_USER:
                raise Conflict(f"user {uid!r} already has {len(have)} assignments (at most {MAX_GROUPS_PER_USER})")
            for x in have:
                if (x.group, x.valid_from, x.valid_until) == (data.group, data.valid_from, data.valid_until):
                    raise Conflict(f"user {uid!r} already has this window in group {data.group!r} (id {x.id})")
            res = await c.execute(a.insert().values(user_id=uid, group_id=data.group, valid_from=data.valid_from,
                                                    valid_until=data.valid_until).returning(a.c.id))  # fmt: skip
            aid = int(res.scalar_one())
            out = _assignment_out((await c.execute(select(a).where(a.c.id == aid))).one())
            await audit.record(c, p, "assignment.create", "user", uid, after=out)
        return out

    @delete("/{uid:str}/assignments/{aid:int}", opt={"perm": (ObjectType.USER, UPDATE), "id": "uid"},
            guards=[permitted], status_code=200)  # fmt: skip
    async def delete_assignment(self, request: Request[Any, Any, Any], uid: FromPath[str],
                                aid: FromPath[int]) -> AssignmentOut:
        p, st = principal_of(request), state_of(request)
        a = schema.assignments
        async with st.db.write() as c:
            row = (await c.execute(select(a).where(a.c.id == aid, a.c.user_id == uid))).one_or_none()
            if row is None:
                raise NotFound(f"user {uid!r} has no assignment {aid}")
            await c.execute(a.delete().where(a.c.id == aid))
            out = _assignment_out(row)
            await audit.record(c, p, "assignment.delete", "user", uid, before=out)
        return out

    @get("/{uid:str}/access", opt={"perm": (ObjectType.USER, READ), "id": "uid"}, guards=[permitted])
    async def access(self, request: Request[Any, Any, Any], uid: FromPath[str],
                     at: FromQuery[float | None] = None) -> EffectiveAccess:
        """Which doors, when: every door the user's groups open per gateway, with schedule and window
        (`at`: the instant the windows are judged at, UTC seconds; default now)."""
        async with state_of(request).db.read() as c:
            out = await effective_access(c, uid, time.time() if at is None else at)
        if out is None:
            raise NotFound(f"no user {uid!r}")
        return out


class CardController(Controller):
    path = "/api/v1/cards"
    tags = ["cards"]

    @get("/", opt={"perm": (ObjectType.CREDENTIAL, READ)}, guards=[permitted])
    async def list_cards(self, request: Request[Any, Any, Any], user_id: FromQuery[str | None] = None,
                         cursor: FromQuery[int | None] = None, limit: Annotated[int, Meta(ge=1, le=500)] = 100
                         ) -> list[CardOut]:  # fmt: skip
        """Cards by number (filtered to what the operator may read); `cursor`: the last card number seen."""
        p, st = principal_of(request), state_of(request)
        authz = await authorizer(st.db)
        cr = schema.credentials
        q = select(cr).order_by(cr.c.card).limit(limit)
        conds = []
        if user_id is not None:
            conds.append(cr.c.user_id == user_id)
        if cursor is not None:
            conds.append(cr.c.card > cursor)
        if conds:
            q = q.where(and_(*conds))
        async with st.db.read() as c:
            rows = (await c.execute(q)).all()
        return [_card_out(r) for r in rows
                if authz.check(p.operator, READ, Target(ObjectType.CREDENTIAL, str(r.card))).allowed]  # fmt: skip

    @post("/", opt={"perm": (ObjectType.CREDENTIAL, CREATE)}, guards=[permitted], status_code=201)
    async def create_card(self, request: Request[Any, Any, Any], data: JSONBody[NewCard]) -> CardOut:
        p, st = principal_of(request), state_of(request)
        await require(st.db, p, CREATE, Target(ObjectType.CREDENTIAL, str(data.card)))
        await require(st.db, p, UPDATE, Target(ObjectType.USER, data.user_id))
        cr = schema.credentials
        async with st.db.write() as c:
            if await user(c, data.user_id) is None:
                raise NotFound(f"no user {data.user_id!r} (body.user_id)")
            if (owner := await card_owner(c, data.card)) is not None:
                raise Conflict(f"card {data.card} is already assigned to {owner}")
            await c.execute(cr.insert().values(card=data.card, user_id=data.user_id, status=data.status,
                                               format=data.format, valid_from=data.valid_from,
                                               valid_until=data.valid_until))  # fmt: skip
            out = _card_out((await c.execute(select(cr).where(cr.c.card == data.card))).one())
            await audit.record(c, p, "card.create", "credential", str(data.card), after=out)
        return out

    @patch("/{card:int}", opt={"perm": (ObjectType.CREDENTIAL, UPDATE), "id": "card"}, guards=[permitted])
    async def patch_card(self, request: Request[Any, Any, Any], card: FromPath[int],
                         data: JSONBody[CardPatch]) -> CardOut:
        """Change a card's status (e.g. "lost": it is removed from every gateway at the next publish)."""
        p, st = principal_of(request), state_of(request)
        cr = schema.credentials
        values = {f: getattr(data, f) for f in data.__struct_fields__ if getattr(data, f) is not UNSET}
        async with st.db.write() as c:
            row = (await c.execute(select(cr).where(cr.c.card == card))).one_or_none()
            if row is None:
                raise NotFound(f"no card {card}")
            if values:
                await c.execute(cr.update().where(cr.c.card == card).values(**values))
            out = _card_out((await c.execute(select(cr).where(cr.c.card == card))).one())
            await audit.record(c, p, "card.update", "credential", str(card), before=_card_out(row), after=out)
        return out

    @delete("/{card:int}", opt={"perm": (ObjectType.CREDENTIAL, DELETE), "id": "card"}, guards=[permitted],
            status_code=200)  # fmt: skip
    async def delete_card(self, request: Request[Any, Any, Any], card: FromPath[int]) -> CardOut:
        p, st = principal_of(request), state_of(request)
        cr = schema.credentials
        async with st.db.write() as c:
            row = (await c.execute(select(cr).where(cr.c.card == card))).one_or_none()
            if row is None:
                raise NotFound(f"no card {card}")
            await c.execute(cr.delete().where(cr.c.card == card))
            await audit.record(c, p, "card.delete", "credential", str(card), before=_card_out(row))
        return _card_out(row)
