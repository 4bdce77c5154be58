"""/api/v1/integrations/identity: an identity manager's connector (seed 000), on the service's tables.

The identity manager owns users, access tokens (cards) and entitlement assignments; the access control
system owns the entitlements (groups and the doors they open), which the connector imports. Every write is
an idempotent PUT by the identity manager's own id (the same body twice: the same answer, one audit entry):

    PUT    /integrations/identity/users/{id}          name, active, validity (tokens and assignments kept)
    PUT    /integrations/identity/tokens/{card}       the token's user, status (ACTIVE, ...), window
    PUT    /integrations/identity/assignments/{id}    user, entitlement (group id), window
    DELETE the same three; GET users/{id}
    GET    /integrations/identity/entitlements        groups with their doors, to import
    GET|PUT /integrations/identity/settings           deleteUserOnNoAccessToken, deleteUserOnNoEntitlement

The export rules are site settings (`meta`, read by the planner). Every answer about a user carries its
`export`: whether a publish sends it to each gateway, and why not, by `identity.export_of`, the same rule the
planner applies. Nothing is sent until a publish (POST /api/v1/publish).
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, delete, get, put
from litestar.params import FromPath, JSONBody
from msgspec import Meta
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from cloud_bridge.operator.db import MAX_GROUPS_PER_USER, MAX_NAME_CHARS
from cloud_bridge.operator.identity import ExportRules, UserRow, export_of
from cloud_bridge.permissions import Action, ObjectType, Target

from . import audit, schema
from .core import authorizer, permitted, principal_of, require, state_of, target_for
from .errors import BadRequest, Conflict, NotFound
from .people import Card, CardOut, Ident

RULE_KEYS = ("deleteUserOnNoAccessToken", "deleteUserOnNoEntitlement")
#: The identity manager writes token states in capitals (ACTIVE); stored in lower case as the site model's.
TokenStatus = Annotated[str, Meta(pattern=r"^(?i:active|suspended|lost|stolen|revoked|inactive)$")]


class ExportSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    #: A user without an active token is removed from the gateways (default true).
    delete_user_on_no_token: bool = msgspec.field(default=True, name="deleteUserOnNoAccessToken")
    #: A user without an active entitlement assignment is removed from the gateways (default true).
    delete_user_on_no_entitlement: bool = msgspec.field(default=True, name="deleteUserOnNoEntitlement")


class DoorOut(msgspec.Struct, kw_only=True):
    gateway: str
    door: str
    #: The door's name from its gateway's birth ("" when the gateway has not announced it).
    name: str
    announced: bool


class EntitlementOut(msgspec.Struct, kw_only=True):
    id: str
    name: str
    schedule: str | None
    tags: list[str]
    doors: list[DoorOut]


class ExportOut(msgspec.Struct, kw_only=True):
    #: Whether the next publish sends the user to at least one gateway.
    exported: bool
    #: The gateways it goes to.
    gateways: list[str]
    #: Per gateway with doors of the user's entitlements that it does not go to: why not.
    not_exported: dict[str, str]


class IdentityUser(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: Annotated[str, Meta(max_length=MAX_NAME_CHARS)] = ""
    active: bool = True
    offline_access: bool = False
    valid_from: float | None = None
    valid_until: float | None = None


class IdentityUserOut(IdentityUser, kw_only=True):
    id: str
    tokens: list[int]
    #: The external ids of its entitlement assignments (assignments made elsewhere are not listed).
    assignments: list[str]
    export: ExportOut


class TokenIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    user_id: Ident
    status: TokenStatus = "active"
    format: Annotated[str, Meta(max_length=32)] = "h10301"
    valid_from: float | None = None
    valid_until: float | None = None


class TokenOut(CardOut, kw_only=True):
    """A card as the people API shows it, plus what the identity export would do with its user."""

    export: ExportOut


class AssignmentIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    user_id: Ident
    #: An entitlement (group) id from GET .../entitlements.
    entitlement: Ident
    valid_from: float | None = None
    valid_until: float | None = None


class AssignmentOut(msgspec.Struct, kw_only=True):
    id: str
    user_id: str
    entitlement: str
    valid_from: float | None
    valid_until: float | None
    #: Whether its window holds now.
    active: bool
    export: ExportOut


# --- the data layer -----------------------------------------------------------------------------------


async def export_rules(c: AsyncConnection) -> ExportRules:
    m = schema.meta
    rows = dict((await c.execute(select(m.c.key, m.c.value).where(m.c.key.in_(RULE_KEYS)))).tuples().all())
    return ExportRules(delete_user_on_no_token=rows.get(RULE_KEYS[0], "1") == "1",
                       delete_user_on_no_entitlement=rows.get(RULE_KEYS[1], "1") == "1")  # fmt: skip


async def set_export_rules(c: AsyncConnection, rules: ExportRules) -> None:
    m = schema.meta
    await c.execute(m.delete().where(m.c.key.in_(RULE_KEYS)))
    await c.execute(
        m.insert(),
        [
            {"key": RULE_KEYS[0], "value": "1" if rules.delete_user_on_no_token else "0"},
            {"key": RULE_KEYS[1], "value": "1" if rules.delete_user_on_no_entitlement else "0"},
        ],
    )


async def user_row(c: AsyncConnection, uid: str) -> UserRow | None:
    """One user as the planner sees it (operator/provision.py `load_site`), from the service's tables."""
    u, a, cr = schema.users, schema.assignments, schema.credentials
    r = (await c.execute(select(u).where(u.c.id == uid))).one_or_none()
    if r is None:
        return None
    row = UserRow(r.id, r.name, bool(r.active), bool(r.offline_access), r.valid_from, r.valid_until)
    q = select(a.c.group_id, a.c.valid_from, a.c.valid_until).where(a.c.user_id == uid).order_by(a.c.id)
    row.assignments = [(g, f, t) for g, f, t in (await c.execute(q)).tuples()]
    q2 = select(cr.c.card, cr.c.status, cr.c.format, cr.c.valid_from, cr.c.valid_until).where(cr.c.user_id == uid)
    row.credentials = [(int(k), s, fm, f, t) for k, s, fm, f, t in (await c.execute(q2.order_by(cr.c.card))).tuples()]
    return row


async def gateway_groups(c: AsyncConnection, groups: list[str] | None = None) -> dict[str, set[str]]:
    """Per gateway: the groups with a door it announced (what `identity.gateway_state` counts)."""
    gd, d = schema.group_doors, schema.doors
    q = select(gd.c.gateway, gd.c.group_id).join(d, (d.c.gateway == gd.c.gateway) & (d.c.id == gd.c.door))
    if groups is not None:
        q = q.where(gd.c.group_id.in_(groups))
    out: dict[str, set[str]] = {}
    for gw, gid in (await c.execute(q.distinct())).tuples():
        out.setdefault(gw, set()).add(gid)
    return out


async def export_status(c: AsyncConnection, uid: str, now: float | None = None) -> ExportOut:
    """Where the next publish sends user `uid`, by the planner's own rule (`identity.export_of`)."""
    t = time.time() if now is None else now
    u = await user_row(c, uid)
    if u is None:
        return ExportOut(exported=False, gateways=[], not_exported={})
    rules = await export_rules(c)
    gws = await gateway_groups(c, [a[0] for a in u.assignments] if rules.delete_user_on_no_entitlement else None)
    yes: list[str] = []
    no: dict[str, str] = {}
    for gw in sorted(gws):
        ex = export_of(u, gws[gw], rules, t)
        if ex.exported:
            yes.append(gw)
        else:
            no[gw] = str(ex.reason)
    if not gws:
        ex = export_of(u, set(), rules, t)
        no["*"] = ex.reason or "no gateway has announced a door of the user's entitlements"
    return ExportOut(exported=bool(yes), gateways=yes, not_exported=no)


async def entitlements(c: AsyncConnection) -> list[EntitlementOut]:
    g, gd, d = schema.groups, schema.group_doors, schema.doors
    names = {(gw, did): n for gw, did, n in (await c.execute(select(d.c.gateway, d.c.id, d.c.name))).tuples()}
    doors: dict[str, list[DoorOut]] = {}
    q = select(gd.c.group_id, gd.c.gateway, gd.c.door).order_by(gd.c.group_id, gd.c.gateway, gd.c.door)
    for gid, gw, did in (await c.execute(q)).tuples():
        doors.setdefault(gid, []).append(DoorOut(gateway=gw, door=did, name=names.get((gw, did), ""),
                                                 announced=(gw, did) in names))  # fmt: skip
    rows = (await c.execute(select(g).order_by(g.c.id))).all()
    return [EntitlementOut(id=r.id, name=r.name, schedule=r.schedule, tags=[t for t in r.tags.split(",") if t],
                           doors=doors.get(r.id, [])) for r in rows]  # fmt: skip


async def readable_entitlements(request: Request[Any, Any, Any]) -> list[EntitlementOut]:
    """The entitlements (groups) the operator may read, with their doors."""
    p, st = principal_of(request), state_of(request)
    authz = await authorizer(st.db)
    async with st.db.read() as c:
        out = await entitlements(c)
    return [e for e in out if authz.check(p.operator, Action.READ, Target(ObjectType.GROUP, e.id,
                                                                          frozenset(e.tags))).allowed]  # fmt: skip


async def _user_out(c: AsyncConnection, uid: str) -> IdentityUserOut | None:
    u = schema.users
    r = (await c.execute(select(u).where(u.c.id == uid))).one_or_none()
    if r is None:
        return None
    cards = list((await c.execute(select(schema.credentials.c.card).where(schema.credentials.c.user_id == uid)
                                  .order_by(schema.credentials.c.card))).scalars())  # fmt: skip
    ar, a = schema.assignment_refs, schema.assignments
    refs = list((await c.execute(select(ar.c.external_id).join(a, a.c.id == ar.c.assignment_id)
                                 .where(a.c.user_id == uid).order_by(ar.c.external_id))).scalars())  # fmt: skip
    return IdentityUserOut(id=r.id, name=r.name, active=bool(r.active), offline_access=bool(r.offline_access),
                           valid_from=r.valid_from, valid_until=r.valid_until, tokens=[int(k) for k in cards],
                           assignments=refs, export=await export_status(c, uid))  # fmt: skip


async def _token_out(c: AsyncConnection, card: int) -> TokenOut | None:
    cr = schema.credentials
    r = (await c.execute(select(cr).where(cr.c.card == card))).one_or_none()
    if r is None:
        return None
    return TokenOut(card=int(r.card), user_id=r.user_id, status=r.status, format=r.format, valid_from=r.valid_from,
                    valid_until=r.valid_until, export=await export_status(c, r.user_id))  # fmt: skip


async def _assignment_out(c: AsyncConnection, ext: str) -> AssignmentOut | None:
    ar, a = schema.assignment_refs, schema.assignments
    r = (await c.execute(select(a).join(ar, ar.c.assignment_id == a.c.id).where(ar.c.external_id == ext))
         ).one_or_none()  # fmt: skip
    if r is None:
        return None
    now = time.time()
    active = (r.valid_from is None or r.valid_from <= now) and (r.valid_until is None or r.valid_until > now)
    return AssignmentOut(id=ext, user_id=r.user_id, entitlement=r.group_id, valid_from=r.valid_from,
                         valid_until=r.valid_until, active=active,
                         export=await export_status(c, r.user_id, now))  # fmt: skip


def _same(a: Any, b: Any) -> bool:
    """Two answers equal but for the export (which moves with time): an idempotent PUT records nothing."""
    strip = (lambda o: msgspec.structs.replace(o, export=None)) if a is not None and b is not None else None
    return strip is not None and strip(a) == strip(b)


def _window(vf: float | None, vu: float | None) -> None:
    if vf is not None and vu is not None and vu <= vf:
        raise BadRequest("the window must end after it starts", "body.valid_until")


def _check_id(value: str, field: str) -> str:
    try:
        return msgspec.convert(value, Ident)
    except msgspec.ValidationError:
        raise BadRequest("use 1-64 letters, digits or _ . : @ -", field) from None


# --- the routes ----------------------------------------------------------------------------------------

USER, CRED, GROUP = ObjectType.USER, ObjectType.CREDENTIAL, ObjectType.GROUP


class IdentityController(Controller):
    path = "/api/v1/integrations/identity"
    tags = ["integrations"]

    @get("/entitlements", opt={"perm": (GROUP, Action.READ)}, guards=[permitted])
    async def list_entitlements(self, request: Request[Any, Any, Any]) -> list[EntitlementOut]:
        """The entitlements to import: every group the operator may read, with the doors it opens."""
        return await readable_entitlements(request)

    @get("/settings", opt={"perm": (ObjectType.GATEWAY, Action.READ)}, guards=[permitted])
    async def get_settings(self, request: Request[Any, Any, Any]) -> ExportSettings:
        async with state_of(request).db.read() as c:
            r = await export_rules(c)
        return ExportSettings(delete_user_on_no_token=r.delete_user_on_no_token,
                              delete_user_on_no_entitlement=r.delete_user_on_no_entitlement)  # fmt: skip

    @put("/settings", opt={"perm": (ObjectType.GATEWAY, Action.UPDATE)}, guards=[permitted])
    async def put_settings(self, request: Request[Any, Any, Any], data: JSONBody[ExportSettings]) -> ExportSettings:
        """The export rules (they change what every gateway holds: update on gateways)."""
        p, st = principal_of(request), state_of(request)
        async with st.db.write() as c:
            before = await export_rules(c)
            new = ExportRules(delete_user_on_no_token=data.delete_user_on_no_token,
                              delete_user_on_no_entitlement=data.delete_user_on_no_entitlement)  # fmt: skip
            if new != before:
                await set_export_rules(c, new)
                await audit.record(c, p, "settings.export_rules", "site", st.site.site if st.site else "-",
                                   before=before.__dict__, after=new.__dict__)  # fmt: skip
        return data

    # users --------------------------------------------------------------------------------------------

    @get("/users/{uid:str}", opt={"perm": (USER, Action.READ), "id": "uid"}, guards=[permitted])
    async def get_user(self, request: Request[Any, Any, Any], uid: FromPath[str]) -> IdentityUserOut:
        async with state_of(request).db.read() as c:
            out = await _user_out(c, uid)
        if out is None:
            raise NotFound(f"no user {uid!r}")
        return out

    @put("/users/{uid:str}", opt={"perm": (USER, Action.UPDATE), "id": "uid"}, guards=[permitted])
    async def put_user(self, request: Request[Any, Any, Any], uid: FromPath[str],
                       data: JSONBody[IdentityUser]) -> IdentityUserOut:
        """Create or update a user by its external id; its tokens and assignments are kept."""
        p, st = principal_of(request), state_of(request)
        _check_id(uid, "path.uid")
        _window(data.valid_from, data.valid_until)
        u = schema.users
        values = {f: getattr(data, f) for f in data.__struct_fields__}
        async with st.db.write() as c:
            before = await _user_out(c, uid)
            if before is None:
                await require(st.db, p, Action.CREATE, Target(USER, uid))
                await c.execute(u.insert().values(id=uid, kind="user", **values))
            else:
                kind = (await c.execute(select(u.c.kind).where(u.c.id == uid))).scalar()
                if kind != "user":
                    raise Conflict(f"{uid!r} is a {kind}, not a user the identity manager owns")
                await c.execute(u.update().where(u.c.id == uid).values(**values))
            out = await _user_out(c, uid)
            if not _same(before, out):
                await audit.record(c, p, "identity.user.put", "user", uid, before=before, after=out)
        assert out is not None
        return out

    @delete("/users/{uid:str}", opt={"perm": (USER, Action.DELETE), "id": "uid"}, guards=[permitted],
            status_code=200)  # fmt: skip
    async def delete_user(self, request: Request[Any, Any, Any], uid: FromPath[str]) -> IdentityUserOut:
        """Delete a user with its tokens and assignments (removed from the gateways at the next publish)."""
        p, st = principal_of(request), state_of(request)
        async with st.db.write() as c:
            before = await _user_out(c, uid)
            if before is None:
                raise NotFound(f"no user {uid!r}")
            await c.execute(schema.users.delete().where(schema.users.c.id == uid))
            await audit.record(c, p, "identity.user.delete", "user", uid, before=before)
        return before

    # tokens -------------------------------------------------------------------------------------------

    @put("/tokens/{card:int}", opt={"perm": (CRED, Action.UPDATE), "id": "card"}, guards=[permitted])
    async def put_token(self, request: Request[Any, Any, Any], card: FromPath[int],
                        data: JSONBody[TokenIn]) -> TokenOut:
        """Create or replace an access token (a card number) of a user; moving it to another user is allowed.
        Exported only while ACTIVE and its window has not ended."""
        p, st = principal_of(request), state_of(request)
        card = msgspec.convert(card, Card)
        _window(data.valid_from, data.valid_until)
        cr = schema.credentials
        values = {"user_id": data.user_id, "status": data.status.lower(), "format": data.format,
                  "valid_from": data.valid_from, "valid_until": data.valid_until}  # fmt: skip
        await require(st.db, p, Action.UPDATE, Target(USER, data.user_id))
        async with st.db.write() as c:
            before = await _token_out(c, card)
            if (await c.execute(select(schema.users.c.kind).where(schema.users.c.id == data.user_id))).scalar() is None:
                raise NotFound(f"no user {data.user_id!r} (body.user_id)")
            if before is None:
                loc = (await c.execute(select(schema.badges.c.location).where(schema.badges.c.card == card))).scalar()
                if loc is not None:
                    raise Conflict(f"card {card} is a visitor badge of badge pool {loc}")
                await require(st.db, p, Action.CREATE, Target(CRED, str(card)))
                await c.execute(cr.insert().values(card=card, **values))
            else:
                if before.user_id != data.user_id:
                    await require(st.db, p, Action.UPDATE, Target(USER, before.user_id))
                await c.execute(cr.update().where(cr.c.card == card).values(**values))
            out = await _token_out(c, card)
            if not _same(before, out):
                await audit.record(c, p, "identity.token.put", "credential", str(card), before=before, after=out)
        assert out is not None
        return out

    @delete("/tokens/{card:int}", opt={"perm": (CRED, Action.DELETE), "id": "card"}, guards=[permitted],
            status_code=200)  # fmt: skip
    async def delete_token(self, request: Request[Any, Any, Any], card: FromPath[int]) -> TokenOut:
        p, st = principal_of(request), state_of(request)
        async with st.db.write() as c:
            before = await _token_out(c, card)
            if before is None:
                raise NotFound(f"no token {card}")
            await c.execute(schema.credentials.delete().where(schema.credentials.c.card == card))
            await audit.record(c, p, "identity.token.delete", "credential", str(card), before=before)
        return before

    # entitlement assignments ----------------------------------------------------------------------------

    @put("/assignments/{aid:str}", opt={"perm": (USER, Action.UPDATE)}, guards=[permitted])
    async def put_assignment(self, request: Request[Any, Any, Any], aid: FromPath[str],
                             data: JSONBody[AssignmentIn]) -> AssignmentOut:
        """Create or replace an entitlement assignment by its external id: the user holds the entitlement
        (group) during the window (None: since always / for ever). The gateway enforces the window itself."""
        p, st = principal_of(request), state_of(request)
        _check_id(aid, "path.aid")
        _window(data.valid_from, data.valid_until)
        await require(st.db, p, Action.UPDATE, Target(USER, data.user_id))
        await require(st.db, p, Action.READ, await target_for(st.db, GROUP, data.entitlement))
        ar, a = schema.assignment_refs, schema.assignments
        values = {"user_id": data.user_id, "group_id": data.entitlement, "valid_from": data.valid_from,
                  "valid_until": data.valid_until}  # fmt: skip
        async with st.db.write() as c:
            if (await c.execute(select(schema.users.c.id).where(schema.users.c.id == data.user_id))).scalar() is None:
                raise NotFound(f"no user {data.user_id!r} (body.user_id)")
            if (await c.execute(select(schema.groups.c.id).where(schema.groups.c.id == data.entitlement))
                ).scalar() is None:  # fmt: skip
                raise NotFound(f"unknown entitlement {data.entitlement!r} (body.entitlement)")
            before = await _assignment_out(c, aid)
            if before is None:
                n = len(set((await c.execute(select(a.c.group_id).where(a.c.user_id == data.user_id,
                                                                        a.c.group_id != data.entitlement))
                             ).scalars()))  # fmt: skip
                if n >= MAX_GROUPS_PER_USER:
                    raise BadRequest(f"user {data.user_id!r} holds {n} entitlements, at most {MAX_GROUPS_PER_USER}",
                                     "body.entitlement")  # fmt: skip
                new_id = (await c.execute(a.insert().values(**values).returning(a.c.id))).scalar_one()
                await c.execute(ar.insert().values(external_id=aid, assignment_id=new_id))
            else:
                row_id = (await c.execute(select(ar.c.assignment_id).where(ar.c.external_id == aid))).scalar_one()
                await c.execute(a.update().where(a.c.id == row_id).values(**values))
            out = await _assignment_out(c, aid)
            if not _same(before, out):
                await audit.record(c, p, "identity.assignment.put", "user", data.user_id, before=before, after=out)
        assert out is not None
        return out

    @delete("/assignments/{aid:str}", opt={"perm": (USER, Action.UPDATE)}, guards=[permitted], status_code=200)
    async def delete_assignment(self, request: Request[Any, Any, Any], aid: FromPath[str]) -> AssignmentOut:
        p, st = principal_of(request), state_of(request)
        ar = schema.assignment_refs
        async with st.db.write() as c:
            before = await _assignment_out(c, aid)
            if before is None:
                raise NotFound(f"no assignment {aid!r}")
            await require(st.db, p, Action.UPDATE, Target(USER, before.user_id))
            row_id = (await c.execute(select(ar.c.assignment_id).where(ar.c.external_id == aid))).scalar_one()
            await c.execute(schema.assignments.delete().where(schema.assignments.c.id == row_id))
            await audit.record(c, p, "identity.assignment.delete", "user", before.user_id, before=before)
        return before
