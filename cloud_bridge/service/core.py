"""What every route shares: the service state, authentication and authorisation guards, JSON errors.

Every route under /api/v1 has the `authenticated` guard (a session cookie, or ``Authorization: Bearer
cbt_...``; a session's state-changing request must carry its CSRF token in `X-CSRF-Token`) and declares
the permission it needs in its `opt`:

    @get("/{uid:str}", opt={"perm": (ObjectType.USER, Action.READ), "id": "uid"}, guards=[permitted])

`permitted` asks the `Authorizer` (cloud_bridge/permissions.py: deny wins, tags, applies-to) about that
object (the path parameter named by "id"; for a collection: whether any grant covers the type, rows are
then filtered). A refusal is 403 naming the missing permission, and is written to the audit log.
"""

from __future__ import annotations

import logging
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.connection import ASGIConnection
from litestar.exceptions import HTTPException, NotAuthorizedException, PermissionDeniedException, ValidationException
from litestar.handlers.base import BaseRouteHandler
from litestar.types import Scope
from sqlalchemy import select

from cloud_bridge.operator.db import OperatorError
from cloud_bridge.permissions import (
    Action,
    Authorizer,
    Effect,
    ObjectType,
    Operator,
    PermissionDenied,
    PermissionGroup,
    Target,
    Verdict,
)

from . import audit, auth, schema
from .config import ServiceConfig
from .database import Database
from .errors import BadRequest, Conflict, NotFound, ServiceError, Unauthorized
from .provisioning import Provisioner
from .site import SiteInfo

log = logging.getLogger("cloud_bridge.service")
_grp_dec = msgspec.json.Decoder(PermissionGroup)
SESSION_COOKIE = "cb_session"
CSRF_HEADER = "x-csrf-token"
UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})
#: The Host of the console's in-process API calls (web/inner.py).
INNER_HOST = "console.internal"


@dataclass
class ServiceState:
    cfg: ServiceConfig
    db: Database
    passwords: auth.Passwords
    site: SiteInfo | None
    provisioner: Provisioner | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def state_of(conn: ASGIConnection[Any, Any, Any, Any]) -> ServiceState:
    st: ServiceState = conn.app.state.service
    return st


def principal_of(conn: ASGIConnection[Any, Any, Any, Any]) -> auth.Principal:
    p: auth.Principal | None = conn.scope.get("state", {}).get("principal")
    if p is None:
        raise NotAuthorizedException("not logged in")
    return p


_authorizers: weakref.WeakKeyDictionary[Database, tuple[int, float, Authorizer]] = weakref.WeakKeyDictionary()


async def authorizer(db: Database, *, fresh: bool = False) -> Authorizer:
    """The permission groups as an Authorizer, remembered for `auth.CACHE_S` (1 s) unless this process ends a
    write transaction meanwhile (a changed group applies to its next request; one changed by another process
    within that second). `fresh`: read them now."""
    now = time.monotonic()
    hit = _authorizers.get(db)
    if not fresh and hit is not None and hit[0] == db.generation and hit[1] > now:
        return hit[2]
    generation = db.generation  # before the read: a write ending meanwhile makes this one stale
    async with db.read() as c:
        rows = (await c.execute(select(schema.permission_groups.c.body))).scalars().all()
    authz = Authorizer(_grp_dec.decode(b) for b in rows)
    _authorizers[db] = (generation, now + auth.CACHE_S, authz)
    return authz


def address_of(conn: ASGIConnection[Any, Any, Any, Any]) -> str:
    return conn.client.host if conn.client else ""


async def authenticated(conn: ASGIConnection[Any, Any, Any, Any], _h: BaseRouteHandler) -> None:
    pre = conn.scope.get("state", {}).get("principal")
    if isinstance(pre, auth.Principal) and pre.via == "local":
        return  # the CLI's local mode (cli_client.py) set it in process: no HTTP request can
    st = state_of(conn)
    addr = address_of(conn)
    p: auth.Principal | None = None
    header = conn.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        p = await auth.principal_for(st.db, token=header[7:].strip(), address=addr)
    elif (cookie := conn.cookies.get(SESSION_COOKIE)) is not None:
        p = await auth.principal_for(st.db, cookie=cookie, address=addr)
    if p is None:
        raise NotAuthorizedException("not logged in")
    if p.via.startswith("token:"):
        await auth.touch_token(st.db, p.via[6:])
    if conn.scope.get("method") in UNSAFE and not auth.csrf_ok(p, conn.headers.get(CSRF_HEADER)):
        raise PermissionDeniedException("CSRF token missing or wrong")
    if p.session_hash is not None and conn.headers.get("host") != INNER_HOST:  # the console's calls: counted
        await session_used(conn, p)  # by the page's own request
    conn.scope.setdefault("state", {})["principal"] = p


async def session_used(conn: ASGIConnection[Any, Any, Any, Any], p: auth.Principal) -> None:
    """A request of the session's user: its idle timeout starts again (auth.touch_session)."""
    if p.session_hash is not None:
        a = state_of(conn).cfg.auth
        await auth.touch_session(state_of(conn).db, p.session_hash, hours=a.session_hours,
                                 idle_s=a.session_idle_minutes * 60, known_expires=p.expires)  # fmt: skip


def may_some(authz: Authorizer, op: Operator, object_type: ObjectType, action: Action) -> Verdict:
    """Whether any grant line of the operator speaks about `action` on `object_type` (for a collection:
    listing, creating). A deny without limits on the type refuses outright."""
    what = f"{action} on {object_type}"
    if not op.active:
        return Verdict(False, f"operator {op.id!r} is inactive")
    groups = authz.groups
    grants = []
    for gid in op.groups:
        g = groups.get(gid)
        if g is None:
            return Verdict(False, f"operator {op.id!r} is in unknown permission group {gid!r}")
        for p in g.permissions:
            if p.object_type not in (object_type, ObjectType.ALL) or action not in p.actions:
                continue
            if p.effect is Effect.DENY and not (p.tags or p.applies_to or p.event_types):
                return Verdict(False, f"{what} is denied by group {g.id!r}: {p.describe()}")
            if p.effect is Effect.GRANT:
                grants.append(p.describe())
    if grants:
        return Verdict(True, f"{what} is granted by {grants[0]}", grants)
    return Verdict(False, f"no permission grants {what}")


async def permitted(conn: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    """The route's permission (`opt["perm"]`, on the object `opt["id"]` names), checked by the Authorizer."""
    object_type, action = handler.opt["perm"]
    p = principal_of(conn)
    st = state_of(conn)
    authz = await authorizer(st.db)
    id_param = handler.opt.get("id")
    if id_param is None:
        v = may_some(authz, p.operator, object_type, action)
        if not v.allowed:
            raise PermissionDenied(p.operator.id, action, any_target(object_type), v)
        return
    oid = str(conn.path_params[id_param])
    target = await target_for(st.db, object_type, oid)
    authz.require(p.operator, action, target)


def any_target(object_type: ObjectType) -> Target:
    """The stand-in for "any object of the type" in a refusal names it (a gateway or door target needs its refs)."""
    if object_type is ObjectType.GATEWAY:
        return Target.for_gateway("*")
    if object_type is ObjectType.DOOR:
        return Target.for_door("*", "*")
    return Target(object_type, "*")


async def target_for(db: Database, object_type: ObjectType, oid: str) -> Target:
    """The object as the Authorizer sees it: gateways and doors with their refs, groups with their tags."""
    if object_type is ObjectType.GATEWAY:
        return Target.for_gateway(oid)
    if object_type is ObjectType.GROUP:
        async with db.read() as c:
            tags = (await c.execute(select(schema.groups.c.tags).where(schema.groups.c.id == oid))).scalar()
        return Target(ObjectType.GROUP, oid, frozenset(t for t in str(tags or "").split(",") if t))
    return Target(object_type, oid)


async def require(db: Database, p: auth.Principal, action: Action, target: Target) -> None:
    """For the service layer: one more permission a request needs (e.g. creating a card with a user)."""
    (await authorizer(db)).require(p.operator, action, target)


# --- errors --------------------------------------------------------------------------------------------


def _error(status: int, code: str, detail: str, **extra: Any) -> Response[dict[str, Any]]:
    return Response({"error": code, "detail": detail, **extra}, status_code=status)


def _field_of(e: ValidationException) -> tuple[str, str]:
    """Litestar's validation detail as (message, field path like "body.cards[0].card")."""
    extra = e.extra if isinstance(e.extra, list) else []
    if extra and isinstance(extra[0], dict):
        first = extra[0]
        msg = str(first.get("message", e.detail))
        src = first.get("source", "body")
        source, key = str(getattr(src, "value", src)), first.get("key")  # a ParamType enum for query/path
        if " - at `$" in msg:  # msgspec's path: `$.cards[0].card`
            msg, _, path = msg.partition(" - at `$")
            return msg, f"{source}{path.rstrip('`')}"
        return msg, f"{source}.{key}" if key else source
    return str(e.detail), "body"


def handle_exception(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    if isinstance(exc, PermissionDenied):
        return _error(403, "forbidden", str(exc), missing={
            "action": exc.kind or str(exc.action), "object_type": str(exc.target.object_type),
            "object_id": exc.target.object_id})  # fmt: skip
    if isinstance(exc, Unauthorized | NotAuthorizedException):
        return _error(401, "unauthorized", "authentication required or failed")
    if isinstance(exc, PermissionDeniedException):
        return _error(403, "forbidden", str(exc.detail))
    if isinstance(exc, ValidationException):
        msg, path = _field_of(exc)
        return _error(400, "bad_request", msg, field=path)
    if isinstance(exc, BadRequest):
        return _error(400, "bad_request", str(exc), field=exc.field)
    if isinstance(exc, NotFound):
        return _error(404, "not_found", str(exc))
    if isinstance(exc, Conflict):
        return _error(409, "conflict", str(exc))
    if isinstance(exc, OperatorError):  # the model's own rules (operator/db.py): ids, names, limits
        return _error(400, "bad_request", str(exc))
    if isinstance(exc, ServiceError):
        return _error(503, "unavailable", str(exc))
    if isinstance(exc, HTTPException):
        return _error(exc.status_code, "error", str(exc.detail))
    log.exception("request %s %s failed", request.method, request.url.path, exc_info=exc)
    return _error(500, "internal", "internal error (logged)")


async def audit_refusal(exc: Exception, scope: Scope) -> None:
    """after_exception hook: a refused request (403 by the Authorizer) goes to the audit log."""
    if not isinstance(exc, PermissionDenied):
        return
    p: auth.Principal | None = scope.get("state", {}).get("principal")
    st: ServiceState = scope["app"].state.service
    if p is None:
        return
    try:
        async with st.db.write() as c:
            action = f"{exc.target.object_type}.{exc.kind or exc.action}"
            await audit.record(c, p, action, str(exc.target.object_type), exc.target.object_id, outcome="denied",
                               after={"reason": exc.verdict.reason})  # fmt: skip
    except Exception:  # the refusal stands; a failed audit write is logged
        log.exception("audit of a refusal failed")
