"""/api/v1/auth (login, logout, me, first-time setup) and /api/v1/tokens (API tokens)."""

from __future__ import annotations

import time
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, Response, delete, get, post
from litestar.datastructures import Cookie
from litestar.exceptions import PermissionDeniedException
from litestar.params import FromPath, JSONBody
from msgspec import Meta
from sqlalchemy import select, update

from cloud_bridge.permissions import Action, ObjectType, Target

from . import audit, auth, schema
from .core import SESSION_COOKIE, address_of, authenticated, principal_of, require, state_of
from .errors import NotFound, Unauthorized

Secret = Annotated[str, Meta(min_length=1, max_length=1024)]
Name = Annotated[str, Meta(min_length=1, max_length=128)]


class Login(msgspec.Struct, forbid_unknown_fields=True):
    operator: Name
    password: Secret


class Setup(msgspec.Struct, forbid_unknown_fields=True):
    code: Secret
    password: Secret


class Me(msgspec.Struct):
    operator: str
    name: str
    groups: list[str]
    via: str
    #: Send it as X-CSRF-Token with every POST/PUT/PATCH/DELETE of this session (None for API tokens).
    csrf_token: str | None


class TokenIn(msgspec.Struct, forbid_unknown_fields=True):
    name: Annotated[str, Meta(max_length=256)] = ""
    #: The permission groups the token may use (each one of the owner's); empty: all of the owner's.
    groups: Annotated[list[Name], Meta(max_length=64)] = []
    expires_days: Annotated[float, Meta(gt=0, le=3650)] = 90.0


class TokenOut(msgspec.Struct, omit_defaults=True):
    id: str
    operator: str
    name: str
    groups: list[str]
    created: float
    expires: float
    revoked: float | None = None
    last_used: float | None = None
    #: Only in the answer to its creation: store it now, it is never shown again.
    token: str | None = None


def _me(p: auth.Principal) -> Me:
    return Me(operator=p.operator.id, name=p.operator.name, groups=list(p.operator.groups), via=p.via,
              csrf_token=p.csrf)  # fmt: skip


class AuthController(Controller):
    path = "/api/v1/auth"
    tags = ["auth"]

    @post("/login", status_code=200)
    async def login(self, request: Request[Any, Any, Any], data: JSONBody[Login]) -> Response[Me]:
        """Log in with a password: sets the session cookie (Secure, HttpOnly, SameSite=Strict) and returns
        the session's CSRF token. Any failure is the same 401; repeated failures lock the account."""
        st = state_of(request)
        addr = address_of(request)
        failed = False
        async with st.db.write() as c:  # the failure count is committed even when the login fails
            try:
                op = await auth.login(c, st.passwords, data.operator, data.password)
            except Unauthorized:
                failed = True
                await audit.record(c, data.operator, "auth.login", "operator", data.operator, outcome="failed",
                                   address=addr, via="login")  # fmt: skip
            else:
                value, csrf = await auth.new_session(c, op.id, hours=st.cfg.auth.session_hours, address=addr,
                                                     idle_s=st.cfg.auth.session_idle_minutes * 60)  # fmt: skip
                await audit.record(c, op.id, "auth.login", "operator", op.id, address=addr, via="session")
        if failed:
            raise Unauthorized("login failed")
        p = auth.Principal(op, "session", addr, csrf=csrf)
        cookie = Cookie(key=SESSION_COOKIE, value=value, path="/", secure=True, httponly=True, samesite="strict",
                        max_age=int(st.cfg.auth.session_hours * 3600))  # fmt: skip
        return Response(_me(p), cookies=[cookie])

    @post("/setup", status_code=200)
    async def setup(self, request: Request[Any, Any, Any], data: JSONBody[Setup]) -> Me:
        """Set an operator's password with a one-time setup code (printed by `cloud-bridge serve --init`)."""
        st = state_of(request)
        async with st.db.write() as c:
            oid = await auth.use_setup_code(c, data.code)
            await auth.set_password(c, st.passwords, oid, data.password)
            await audit.record(c, oid, "auth.setup", "operator", oid, address=address_of(request), via="setup")
            op = await auth.load_operator(c, oid)
        assert op is not None
        return _me(auth.Principal(op, "setup", address_of(request)))

    @get("/me", guards=[authenticated])
    async def me(self, request: Request[Any, Any, Any]) -> Me:
        return _me(principal_of(request))

    @post("/logout", guards=[authenticated], status_code=200)
    async def logout(self, request: Request[Any, Any, Any]) -> Response[dict[str, bool]]:
        p = principal_of(request)
        st = state_of(request)
        if p.session_hash is not None:
            async with st.db.write() as c:
                await auth.end_session(c, p.session_hash)
                await audit.record(c, p, "auth.logout", "operator", p.operator.id)
        return Response({"logged_out": True}, cookies=[Cookie(key=SESSION_COOKIE, value="", path="/", secure=True,
                                                              httponly=True, samesite="strict", max_age=0)])


def _token_out(r: Any, token: str | None = None) -> TokenOut:
    return TokenOut(id=r.id, operator=r.operator_id, name=r.name, groups=msgspec.json.decode(r.groups, type=list[str]),
                    created=r.created, expires=r.expires, revoked=r.revoked, last_used=r.last_used,
                    token=token)  # fmt: skip


class TokenController(Controller):
    """API tokens for integrations: created from a login session (a token cannot make tokens), shown once."""

    path = "/api/v1/tokens"
    tags = ["tokens"]

    @get("/")
    async def list_tokens(self, request: Request[Any, Any, Any]) -> list[TokenOut]:
        """The caller's own tokens (never their secrets)."""
        p, st = principal_of(request), state_of(request)
        t = schema.api_tokens
        async with st.db.read() as c:
            rows = (await c.execute(select(t).where(t.c.operator_id == p.operator.id).order_by(t.c.created))).all()
        return [_token_out(r) for r in rows]

    @post("/", status_code=201)
    async def create_token(self, request: Request[Any, Any, Any], data: JSONBody[TokenIn]) -> TokenOut:
        p, st = principal_of(request), state_of(request)
        if p.via != "session":
            raise PermissionDeniedException("API tokens are created from a login session, not with a token")
        days = min(data.expires_days, float(st.cfg.auth.token_max_days))
        groups = data.groups or list(p.operator.groups)
        async with st.db.write() as c:
            tid, token = await auth.new_token(c, p.operator, name=data.name, groups=groups,
                                              expires=time.time() + days * 86400)  # fmt: skip
            row = (await c.execute(select(schema.api_tokens).where(schema.api_tokens.c.id == tid))).one()
            out = _token_out(row)
            await audit.record(c, p, "token.create", "token", tid, after=out)
        return _token_out(row, token)

    @delete("/{tid:str}", status_code=200)
    async def revoke_token(self, request: Request[Any, Any, Any], tid: FromPath[str]) -> TokenOut:
        """Revoke a token at once: the caller's own, or another operator's with update on that operator."""
        p, st = principal_of(request), state_of(request)
        t = schema.api_tokens
        async with st.db.read() as c:
            row = (await c.execute(select(t).where(t.c.id == tid))).one_or_none()
        if row is None:
            raise NotFound(f"no token {tid!r}")
        if row.operator_id != p.operator.id:
            await require(st.db, p, Action.UPDATE, Target(ObjectType.OPERATOR, str(row.operator_id)))
        async with st.db.write() as c:
            await c.execute(update(t).where(t.c.id == tid, t.c.revoked.is_(None)).values(revoked=time.time()))
            new = (await c.execute(select(t).where(t.c.id == tid))).one()
            await audit.record(c, p, "token.revoke", "token", tid, before=_token_out(row), after=_token_out(new))
        return _token_out(new)
