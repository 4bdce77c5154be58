"""/api/v1/operators, /api/v1/permission-groups and /api/v1/auth/reauth: who runs the site, with what rights.

Permission groups (seeds 002/003) are lists of grant/deny lines (`cloud_bridge.permissions.Permission`:
object type, actions create/read/update/delete/publish, tags, applies-to, event kinds); an operator is in
some of them. Both are objects of type `operator` for the Authorizer: an operator as ``operator:<id>``, a
permission group as ``operator:group:<id>`` (so ``applies_to: ["operator:group:night"]`` limits a line to
one group). The built-in System Administrator group is read-only.

Operator changes need the password again: `POST /api/v1/auth/reauth` with the session's operator password
opens a window of `REAUTH_S` seconds on that session (a failure counts towards the lockout, like a failed
login); every create/update/delete here is refused with 403 outside it, and always for an API token (an
integration does not manage operators). Nobody widens their own rights: only a System Administrator puts an
operator into System Administrator or changes a permission group they are in, nobody changes their own
groups, deletes or deactivates themselves, and the last active System Administrator stays one. A new
operator has no password: the answer carries a one-time setup code.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, delete, get, post, put
from litestar.connection import ASGIConnection
from litestar.exceptions import PermissionDeniedException
from litestar.handlers.base import BaseRouteHandler
from litestar.params import FromPath, JSONBody
from msgspec import Meta
from sqlalchemy import select, update

from cloud_bridge.permissions import (
    SYSTEM_ADMINISTRATOR,
    Action,
    Authorizer,
    ObjectType,
    Operator,
    Permission,
    PermissionsInvalid,
    Target,
)
from cloud_bridge.permissions import PermissionGroup as Group
from edge.model import Ident

from . import audit, auth, schema
from .core import authorizer, permitted, principal_of, state_of
from .errors import BadRequest, Conflict, NotFound, Unauthorized

REAUTH_S = 300.0
_op_dec = msgspec.json.Decoder(Operator)
_grp_dec = msgspec.json.Decoder(Group)
OperatorId = Annotated[str, Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:@\-]+$")]


class Reauth(msgspec.Struct, forbid_unknown_fields=True):
    password: Annotated[str, Meta(min_length=1, max_length=1024)]


class ReauthOut(msgspec.Struct):
    #: Until then (UTC seconds) this session may change operators and permission groups.
    until: float


class OperatorBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: Annotated[str, Meta(max_length=256)] = ""
    groups: Annotated[list[Ident], Meta(max_length=64)] = []
    active: bool = True


class OperatorOut(msgspec.Struct, kw_only=True):
    id: str
    name: str
    groups: list[str]
    active: bool
    password_set: bool = False
    locked_until: float | None = None
    #: Only in the answer that created the operator (or asked for a new one): its one-time setup code.
    setup_code: str | None = None


class GroupBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: Annotated[str, Meta(max_length=256)] = ""
    description: Annotated[str, Meta(max_length=2000)] = ""
    permissions: Annotated[list[Permission], Meta(max_length=500)] = []


class GroupOut(GroupBody, kw_only=True):
    id: str
    #: The operators in this group.
    operators: list[str] = []
    builtin: bool = False


# --- re-authentication ------------------------------------------------------------------------------------


async def recently_authenticated(conn: ASGIConnection[Any, Any, Any, Any], _h: BaseRouteHandler) -> None:
    """Guard of every operator change: a login session whose password was given again within REAUTH_S."""
    p = principal_of(conn)
    if p.via == "local":  # the local administrator (cli_client.py): on the service's own host and database
        return
    if p.session_hash is None:
        raise PermissionDeniedException("operator changes need a login session (not an API token)")
    s = schema.sessions
    async with state_of(conn).db.read() as c:
        until = (await c.execute(select(s.c.reauth_until).where(s.c.id_hash == p.session_hash))).scalar()
    if until is None or float(until) <= time.time():
        raise PermissionDeniedException("re-authentication needed: POST /api/v1/auth/reauth with your password")


class ReauthController(Controller):
    path = "/api/v1/auth/reauth"
    tags = ["auth"]

    @post("/", status_code=200)
    async def reauth(self, request: Request[Any, Any, Any], data: JSONBody[Reauth]) -> ReauthOut:
        """Give the password again: operator changes are allowed on this session for the next 5 minutes.
        A wrong password is 401 and counts towards the account's lockout."""
        p, st = principal_of(request), state_of(request)
        if p.session_hash is None:
            raise PermissionDeniedException("re-authentication is for login sessions")
        until = time.time() + REAUTH_S
        failed = False
        async with st.db.write() as c:  # the failure count is committed even when the password is wrong
            try:
                await auth.login(c, st.passwords, p.operator.id, data.password)
            except Unauthorized:
                failed = True
                await audit.record(c, p, "auth.reauth", "operator", p.operator.id, outcome="failed")
            else:
                s = schema.sessions
                await c.execute(update(s).where(s.c.id_hash == p.session_hash).values(reauth_until=until))
                await audit.record(c, p, "auth.reauth", "operator", p.operator.id)
        if failed:
            raise Unauthorized("re-authentication failed")
        return ReauthOut(until=until)


# --- operators --------------------------------------------------------------------------------------------


async def _operators(c: Any, ids: list[str] | None = None) -> dict[str, OperatorOut]:
    o, pw = schema.operators, schema.operator_passwords
    q = select(o.c.id, o.c.body).order_by(o.c.id)
    if ids is not None:
        q = q.where(o.c.id.in_(ids))
    rows = (await c.execute(q)).all()
    pws = {r.operator_id: r for r in (await c.execute(select(pw))).all()}
    out = {}
    for oid, body in rows:
        op = _op_dec.decode(body)
        row = pws.get(oid)
        locked = row.locked_until if row is not None and row.locked_until and row.locked_until > time.time() else None
        out[oid] = OperatorOut(id=oid, name=op.name, groups=list(op.groups), active=op.active,
                               password_set=row is not None, locked_until=locked)  # fmt: skip
    return out


def _op_target(oid: str) -> Target:
    return Target(ObjectType.OPERATOR, oid)


def _group_target(gid: str) -> Target:
    return Target(ObjectType.OPERATOR, f"group:{gid}")


def _admins(ops: dict[str, OperatorOut]) -> set[str]:
    return {o.id for o in ops.values() if o.active and SYSTEM_ADMINISTRATOR.id in o.groups}


class OperatorController(Controller):
    path = "/api/v1/operators"
    tags = ["operators"]

    @get("/", opt={"perm": (ObjectType.OPERATOR, Action.READ)}, guards=[permitted])
    async def list_operators(self, request: Request[Any, Any, Any]) -> list[OperatorOut]:
        """The operators the caller may read, with their permission groups and whether a password is set."""
        p, st = principal_of(request), state_of(request)
        authz = await authorizer(st.db)
        async with st.db.read() as c:
            ops = await _operators(c)
        return [o for o in ops.values() if authz.check(p.operator, Action.READ, _op_target(o.id)).allowed]

    @get("/{oid:str}", opt={"perm": (ObjectType.OPERATOR, Action.READ), "id": "oid"}, guards=[permitted])
    async def get_operator(self, request: Request[Any, Any, Any], oid: FromPath[str]) -> OperatorOut:
        async with state_of(request).db.read() as c:
            found = (await _operators(c, [oid])).get(oid)
        if found is None:
            raise NotFound(f"no operator {oid!r}")
        return found

    @put("/{oid:str}", opt={"perm": (ObjectType.OPERATOR, Action.UPDATE), "id": "oid"},
         guards=[permitted, recently_authenticated])  # fmt: skip
    async def put_operator(self, request: Request[Any, Any, Any], oid: FromPath[str],
                           data: JSONBody[OperatorBody]) -> OperatorOut:
        """Create or replace an operator: name, permission groups, active. A new one gets a one-time setup
        code in the answer (shown once)."""
        p, st = principal_of(request), state_of(request)
        try:
            msgspec.convert(oid, OperatorId)
        except msgspec.ValidationError:
            raise BadRequest("an operator id is 1-128 letters, digits or _ . : @ -", "path.oid") from None
        if len(set(data.groups)) != len(data.groups):
            raise BadRequest("a permission group is listed twice", "body.groups")
        authz = await authorizer(st.db)
        o = schema.operators
        async with st.db.write() as c:
            ops = await _operators(c)
            before = ops.get(oid)
            if before is None:
                authz.require(p.operator, Action.CREATE, _op_target(oid))
            known = set(authz.groups)
            for i, g in enumerate(data.groups):
                if g not in known:
                    raise NotFound(f"unknown permission group {g!r} (body.groups[{i}])")
            adding = set(data.groups) - set(before.groups if before else ())
            if SYSTEM_ADMINISTRATOR.id in adding and SYSTEM_ADMINISTRATOR.id not in p.operator.groups:
                raise PermissionDeniedException("only a System Administrator puts an operator into System "
                                                "Administrator")  # fmt: skip
            if oid == p.operator.id and (not data.active or set(p.operator.groups) != set(data.groups)):
                raise Conflict("you cannot deactivate yourself or change your own permission groups")
            new = Operator(id=oid, name=data.name, groups=data.groups, active=data.active)
            after_ops = {**ops, oid: OperatorOut(id=oid, name=data.name, groups=data.groups, active=data.active)}
            if _admins(ops) and not _admins(after_ops):
                raise Conflict("the site keeps at least one active System Administrator")
            body = msgspec.json.encode(new)
            code = None
            if before is None:
                await c.execute(o.insert().values(id=oid, body=body))
                code = await auth.new_setup_code(c, oid, hours=st.cfg.auth.setup_code_hours)
            else:
                await c.execute(o.update().where(o.c.id == oid).values(body=body))
                if not data.active:  # a deactivated operator's sessions end now
                    await c.execute(schema.sessions.delete().where(schema.sessions.c.operator_id == oid))
            out = (await _operators(c, [oid]))[oid]
            await audit.record(c, p, f"operator.{'update' if before else 'create'}", "operator", oid, before=before,
                               after=out)  # fmt: skip
        return msgspec.structs.replace(out, setup_code=code)

    @post("/{oid:str}/setup-code", opt={"perm": (ObjectType.OPERATOR, Action.UPDATE), "id": "oid"},
          guards=[permitted, recently_authenticated], status_code=200)  # fmt: skip
    async def setup_code(self, request: Request[Any, Any, Any], oid: FromPath[str]) -> OperatorOut:
        """A new one-time setup code (a forgotten password): the operator sets a new password with it."""
        p, st = principal_of(request), state_of(request)
        async with st.db.write() as c:
            found = (await _operators(c, [oid])).get(oid)
            if found is None:
                raise NotFound(f"no operator {oid!r}")
            code = await auth.new_setup_code(c, oid, hours=st.cfg.auth.setup_code_hours)
            await audit.record(c, p, "operator.setup_code", "operator", oid)
        return msgspec.structs.replace(found, setup_code=code)

    @delete("/{oid:str}", opt={"perm": (ObjectType.OPERATOR, Action.DELETE), "id": "oid"},
            guards=[permitted, recently_authenticated], status_code=200)  # fmt: skip
    async def delete_operator(self, request: Request[Any, Any, Any], oid: FromPath[str]) -> OperatorOut:
        """Delete an operator: its password, sessions and API tokens go with it."""
        p, st = principal_of(request), state_of(request)
        if oid == p.operator.id:
            raise Conflict("you cannot delete yourself")
        async with st.db.write() as c:
            ops = await _operators(c)
            before = ops.get(oid)
            if before is None:
                raise NotFound(f"no operator {oid!r}")
            if _admins(ops) and not _admins({k: v for k, v in ops.items() if k != oid}):
                raise Conflict("the site keeps at least one active System Administrator")
            for t in (schema.sessions, schema.api_tokens, schema.operator_passwords, schema.setup_codes):
                await c.execute(t.delete().where(t.c.operator_id == oid))
            await c.execute(schema.operators.delete().where(schema.operators.c.id == oid))
            await audit.record(c, p, "operator.delete", "operator", oid, before=before)
        return before


# --- permission groups --------------------------------------------------------------------------------------


def _group_out(g: Group, members: dict[str, list[str]]) -> GroupOut:
    return GroupOut(id=g.id, name=g.name, description=g.description, permissions=list(g.permissions),
                    operators=members.get(g.id, []), builtin=g.id == SYSTEM_ADMINISTRATOR.id)  # fmt: skip


async def _groups(c: Any) -> dict[str, GroupOut]:
    rows = (await c.execute(select(schema.permission_groups.c.body))).scalars().all()
    stored = [_grp_dec.decode(b) for b in rows]
    members: dict[str, list[str]] = {}
    for o in (await _operators(c)).values():
        for g in o.groups:
            members.setdefault(g, []).append(o.id)
    out = {SYSTEM_ADMINISTRATOR.id: _group_out(SYSTEM_ADMINISTRATOR, members)}
    out |= {g.id: _group_out(g, members) for g in stored if g.id != SYSTEM_ADMINISTRATOR.id}
    return dict(sorted(out.items()))


class PermissionGroupController(Controller):
    path = "/api/v1/permission-groups"
    tags = ["operators"]

    @get("/", opt={"perm": (ObjectType.OPERATOR, Action.READ)}, guards=[permitted])
    async def list_groups(self, request: Request[Any, Any, Any]) -> list[GroupOut]:
        p, st = principal_of(request), state_of(request)
        authz = await authorizer(st.db)
        async with st.db.read() as c:
            out = await _groups(c)
        return [g for g in out.values() if authz.check(p.operator, Action.READ, _group_target(g.id)).allowed]

    @get("/{gid:str}", opt={"perm": (ObjectType.OPERATOR, Action.READ)}, guards=[permitted])
    async def get_group(self, request: Request[Any, Any, Any], gid: FromPath[str]) -> GroupOut:
        p, st = principal_of(request), state_of(request)
        (await authorizer(st.db)).require(p.operator, Action.READ, _group_target(gid))
        async with st.db.read() as c:
            found = (await _groups(c)).get(gid)
        if found is None:
            raise NotFound(f"no permission group {gid!r}")
        return found

    @put("/{gid:str}", opt={"perm": (ObjectType.OPERATOR, Action.UPDATE)},
         guards=[permitted, recently_authenticated])  # fmt: skip
    async def put_group(self, request: Request[Any, Any, Any], gid: FromPath[str],
                        data: JSONBody[GroupBody]) -> GroupOut:
        """Create or replace a permission group: its grant and deny lines. Takes effect at the next request
        of each of its operators."""
        p, st = principal_of(request), state_of(request)
        try:
            msgspec.convert(gid, Ident)
        except msgspec.ValidationError:
            raise BadRequest("a permission group id is 1-64 letters, digits or _ . : @ -", "path.gid") from None
        if gid == SYSTEM_ADMINISTRATOR.id:
            raise Conflict("the built-in System Administrator group cannot be changed")
        authz = await authorizer(st.db)
        t = schema.permission_groups
        async with st.db.write() as c:
            have = await _groups(c)
            before = have.get(gid)
            authz.require(p.operator, Action.UPDATE if before else Action.CREATE, _group_target(gid))
            if gid in p.operator.groups and SYSTEM_ADMINISTRATOR.id not in p.operator.groups:
                raise PermissionDeniedException(f"you are in permission group {gid!r}: only a System "
                                                "Administrator changes it")  # fmt: skip
            g = Group(id=gid, name=data.name, description=data.description, permissions=data.permissions)
            try:
                Authorizer([g])
            except PermissionsInvalid as e:
                raise BadRequest(str(e), "body.permissions") from None
            body = msgspec.json.encode(g)
            if before is None:
                await c.execute(t.insert().values(id=gid, body=body))
            else:
                await c.execute(t.update().where(t.c.id == gid).values(body=body))
            out = (await _groups(c))[gid]
            await audit.record(c, p, f"permission_group.{'update' if before else 'create'}", "operator",
                               f"group:{gid}", before=before, after=out)  # fmt: skip
        return out

    @delete("/{gid:str}", opt={"perm": (ObjectType.OPERATOR, Action.DELETE)},
            guards=[permitted, recently_authenticated], status_code=200)  # fmt: skip
    async def delete_group(self, request: Request[Any, Any, Any], gid: FromPath[str]) -> GroupOut:
        p, st = principal_of(request), state_of(request)
        (await authorizer(st.db)).require(p.operator, Action.DELETE, _group_target(gid))
        if gid == SYSTEM_ADMINISTRATOR.id:
            raise Conflict("the built-in System Administrator group cannot be deleted")
        async with st.db.write() as c:
            before = (await _groups(c)).get(gid)
            if before is None:
                raise NotFound(f"no permission group {gid!r}")
            if before.operators:
                raise Conflict(f"permission group {gid!r} has operators ({', '.join(before.operators)}): "
                               "take them out first")  # fmt: skip
            await c.execute(schema.permission_groups.delete().where(schema.permission_groups.c.id == gid))
            await audit.record(c, p, "permission_group.delete", "operator", f"group:{gid}", before=before)
        return before
