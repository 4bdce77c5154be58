"""The web console's pages (docs/operator.md, "The console"): server-rendered (Jinja2), htmx for partial
updates, Server-Sent Events for the live dashboard; every asset in `static/`.

* Who: a page needs the login session (the cookie the API sets); without one it redirects to /login.
  Every POST carries the session's CSRF token in a hidden `_csrf` field (or `X-CSRF-Token`); the forms
  before a session exists (login, setup) carry a double-submit token instead (cookie `cb_form`).
* What: a page reads and changes things only through `inner.call`, the service's own /api/v1 in process,
  so the Authorizer, validation and audit are the API's. A page only *hides* what the Authorizer would
  refuse (`Can`); a forged request is refused by the API all the same (403).
* Headers: a strict Content-Security-Policy (no inline script or style, nothing from another origin),
  no framing, no referrer, no caching of pages.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import jinja2
from litestar import Controller, Request, Response, Router, get, post
from litestar.connection import ASGIConnection
from litestar.datastructures import Cookie, ResponseHeader
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.handlers.base import BaseRouteHandler
from litestar.params import FromPath, FromQuery
from litestar.response import ServerSentEvent, ServerSentEventMessage
from litestar.static_files import create_static_files_router
from litestar.types import ExceptionHandlersMap

from cloud_bridge.permissions import Action, Authorizer, ObjectType, PermissionDenied, Target
from cloud_bridge.service import auth
from cloud_bridge.service.core import (
    CSRF_HEADER,
    SESSION_COOKIE,
    UNSAFE,
    address_of,
    authorizer,
    may_some,
    principal_of,
    session_used,
    state_of,
)
from cloud_bridge.service.errors import NotFound

from . import inner

HERE = Path(__file__).parent
STATIC = HERE / "static"
FORM_COOKIE = "cb_form"
PAGE_SIZE = 25
#: The console's assets are ours alone: no inline script or style, no other origin, no framing.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")  # fmt: skip
SECURITY_HEADERS = [
    ResponseHeader(name="Content-Security-Policy", value=CSP),
    ResponseHeader(name="X-Content-Type-Options", value="nosniff"),
    ResponseHeader(name="Referrer-Policy", value="no-referrer"),
    ResponseHeader(name="X-Frame-Options", value="DENY"),
    ResponseHeader(name="Cache-Control", value="no-store"),
]

env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                         undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)  # fmt: skip


class LoginNeeded(NotAuthorizedException):
    """No (valid) session: the page answers with a redirect to the login page."""


@dataclass
class Can:
    """What the page offers: the Authorizer's answer for this operator (the API checks again)."""

    authz: Authorizer
    principal: auth.Principal

    def some(self, object_type: str, action: str) -> bool:
        return may_some(self.authz, self.principal.operator, ObjectType(object_type), Action(action)).allowed

    def on(self, object_type: str, action: str, oid: str) -> bool:
        target = Target.for_gateway(oid) if object_type == "gateway" else Target(ObjectType(object_type), oid)
        return self.authz.check(self.principal.operator, Action(action), target).allowed


def _when(ts: float | None, tz: str) -> str:
    if ts is None:
        return "never"
    return datetime.fromtimestamp(ts, ZoneInfo(tz)).strftime("%Y-%m-%d %H:%M:%S")


env.globals["when"] = _when


def render(name: str, status: int = 200, *, cookies: list[Cookie] | None = None, **ctx: Any) -> Response[str]:
    return Response(env.get_template(name).render(**ctx), status_code=status, media_type="text/html",
                    cookies=cookies or [])  # fmt: skip


async def page_context(request: Request[Any, Any, Any], nav: str, **ctx: Any) -> dict[str, Any]:
    p, st = principal_of(request), state_of(request)
    return {"p": p, "csrf": p.csrf, "can": Can(await authorizer(st.db), p), "nav": nav,
            "site": st.site.site if st.site else "", "tz": st.site.tz if st.site else "UTC", **ctx}  # fmt: skip


_IDENT = re.compile(r"[A-Za-z0-9_.:@\-]{1,64}")


def _api_id(value: str) -> str:
    """An id from a page's path, before it becomes part of an API path: only what an id may hold (the API's
    `Ident`), so a decoded "/" or ".." can never make it another route."""
    if not _IDENT.fullmatch(value):
        raise NotFound(f"no such id {value[:64]!r}")
    return value


def _htmx_fragment(request: Request[Any, Any, Any]) -> bool:
    return "hx-request" in request.headers and "hx-history-restore-request" not in request.headers


def _safe_next(value: str | None) -> str:
    if value and value.startswith("/") and not value.startswith("//") and "\\" not in value:
        return value
    return "/"


def _see_other(location: str, *, set_cookie: list[str] | None = None) -> Response[str]:
    """303 to `location`, with the API's own Set-Cookie (the session cookie it made or cleared) passed on."""
    return Response("", status_code=303, headers={"location": location}, cookies=_cookies_of(set_cookie or []))


def _cookies_of(raw: list[str]) -> list[Cookie]:
    out = []
    for line in raw:
        parts = [x.strip() for x in line.split(";")]
        key, _, value = parts[0].partition("=")
        attrs = {k.lower(): v for k, _, v in (x.partition("=") for x in parts[1:])}
        max_age = int(attrs["max-age"]) if attrs.get("max-age", "").lstrip("-").isdigit() else None
        out.append(Cookie(key=key, value=value, path=attrs.get("path", "/"), max_age=max_age,
                          secure="secure" in attrs, httponly="httponly" in attrs,
                          samesite="strict"))  # fmt: skip
    return out


# --- guards -----------------------------------------------------------------------------------------------


async def page_session(conn: ASGIConnection[Any, Any, Any, Any], _h: BaseRouteHandler) -> None:
    """A page's guard: the login session (as the API's `authenticated`, cookie only) and, on a POST, its
    CSRF token from the form's `_csrf` field or the X-CSRF-Token header."""
    st = state_of(conn)
    p: auth.Principal | None = None
    if (cookie := conn.cookies.get(SESSION_COOKIE)) is not None:
        p = await auth.principal_for(st.db, cookie=cookie, address=address_of(conn))
    if p is None:
        raise LoginNeeded("not logged in")
    path, method = conn.scope.get("path", ""), conn.scope.get("method")
    if method in UNSAFE:
        sent = conn.headers.get(CSRF_HEADER)
        if sent is None and isinstance(conn, Request):
            form = await conn.form()
            value = form.get("_csrf")
            sent = value if isinstance(value, str) else None
        if not auth.csrf_ok(p, sent):
            raise PermissionDeniedException("CSRF token missing or wrong")
    polled = path.startswith(("/stream/", "/panels/")) or (method == "GET" and "hx-request" in conn.headers)
    if not polled:  # a page loaded or a form sent; a live view's refresh does not keep a session alive
        await session_used(conn, p)
    conn.scope.setdefault("state", {})["principal"] = p


def _form_token(request: Request[Any, Any, Any]) -> tuple[str, list[Cookie]]:
    """The double-submit token of a form shown before a session exists (login, setup)."""
    have = request.cookies.get(FORM_COOKIE)
    if have and 20 <= len(have) <= 64:
        return have, []
    token = secrets.token_urlsafe(24)
    return token, [Cookie(key=FORM_COOKIE, value=token, path="/", secure=True, httponly=True, samesite="strict")]


def _form_token_ok(request: Request[Any, Any, Any], sent: Any) -> bool:
    have = request.cookies.get(FORM_COOKIE)
    return have is not None and isinstance(sent, str) and secrets.compare_digest(have.encode(), sent.encode())


# --- error pages ------------------------------------------------------------------------------------------


def _to_login(request: Request[Any, Any, Any], _exc: Exception) -> Response[str]:
    target = "/login" if request.url.path in ("/", "/login") else f"/login?next={request.url.path}"
    if "hx-request" in request.headers:  # an htmx request: the whole page goes to the login
        return Response("", status_code=401, headers={"HX-Redirect": target})
    return _see_other(target)


def _not_found(request: Request[Any, Any, Any], exc: Exception) -> Response[str]:
    return render("error.html", 404, title="Not found", detail=str(exc), p=None, nav="", site="", csrf=None)


def _refused(request: Request[Any, Any, Any], exc: Exception) -> Response[str]:
    detail = str(exc) if isinstance(exc, PermissionDenied) else str(getattr(exc, "detail", exc))
    return render("error.html", 403, title="Not allowed", detail=detail, p=None, nav="", site="", csrf=None)


# --- public pages: login and first-time setup --------------------------------------------------------------


class PublicPages(Controller):
    path = "/"
    include_in_schema = False

    @get("/login")
    async def login_page(self, request: Request[Any, Any, Any], next: FromQuery[str | None] = None) -> Response[str]:
        token, cookies = _form_token(request)
        return render("login.html", form_token=token, next=_safe_next(next), error=None, operator="",
                      cookies=cookies, p=None, nav="login", site=_site(request), csrf=None)  # fmt: skip

    @post("/login")
    async def login(self, request: Request[Any, Any, Any]) -> Response[str]:
        form = await request.form()
        operator, password = str(form.get("operator") or ""), str(form.get("password") or "")
        nxt = _safe_next(str(form.get("next") or "/"))
        ctx: dict[str, Any] = {"next": nxt, "operator": operator, "p": None, "nav": "login", "site": _site(request),
                               "csrf": None}  # fmt: skip
        token, cookies = _form_token(request)
        if not _form_token_ok(request, form.get("_csrf")):
            return render("login.html", 403, form_token=token, cookies=cookies, error="The form had expired: "
                          "please log in again.", **ctx)  # fmt: skip
        a = await inner.call(request, "POST", "/api/v1/auth/login", json={"operator": operator, "password": password})
        if a.ok:
            return _see_other(nxt, set_cookie=a.header("set-cookie"))
        error = ("Login failed: wrong operator or password, or the account is locked for a while after too many "
                 "failures." if a.status == 401 else f"Login failed: {a.detail}")  # fmt: skip
        return render("login.html", a.status, form_token=token, cookies=cookies, error=error, **ctx)

    @get("/setup")
    async def setup_page(self, request: Request[Any, Any, Any]) -> Response[str]:
        token, cookies = _form_token(request)
        return render("setup.html", form_token=token, cookies=cookies, error=None, field=None, p=None, nav="setup",
                      site=_site(request), csrf=None)  # fmt: skip

    @post("/setup")
    async def setup(self, request: Request[Any, Any, Any]) -> Response[str]:
        form = await request.form()
        code, password = str(form.get("code") or "").strip(), str(form.get("password") or "")
        token, cookies = _form_token(request)
        ctx: dict[str, Any] = {"form_token": token, "cookies": cookies, "p": None, "nav": "setup",
                               "site": _site(request), "csrf": None}  # fmt: skip
        if not _form_token_ok(request, form.get("_csrf")):
            return render("setup.html", 403, error="The form had expired: please try again.", field=None, **ctx)
        if password != str(form.get("confirm") or ""):
            return render("setup.html", 400, error="The two passwords differ.", field="confirm", **ctx)
        a = await inner.call(request, "POST", "/api/v1/auth/setup", json={"code": code, "password": password})
        if not a.ok:
            error = "This setup code is not valid (used, expired or mistyped)." if a.status == 401 else a.detail
            field = "password" if a.field == "body.password" else "code"
            return render("setup.html", a.status, error=error, field=field, **ctx)
        operator = a.json()["operator"]
        login = await inner.call(request, "POST", "/api/v1/auth/login",
                                 json={"operator": operator, "password": password})  # fmt: skip
        if not login.ok:
            return _see_other("/login")
        return _see_other("/", set_cookie=login.header("set-cookie"))


def _site(request: Request[Any, Any, Any]) -> str:
    st = state_of(request)
    return st.site.site if st.site else ""


# --- pages behind the login --------------------------------------------------------------------------------


def _gateway_rows(gateways: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(gateways, key=lambda g: (not g["online"], g["id"]))


class ConsolePages(Controller):
    path = "/"
    include_in_schema = False
    guards = [page_session]

    @post("/logout")
    async def logout(self, request: Request[Any, Any, Any]) -> Response[str]:
        a = await inner.call(request, "POST", "/api/v1/auth/logout", principal=principal_of(request))
        return _see_other("/login", set_cookie=a.header("set-cookie"))

    # dashboard ---------------------------------------------------------------------------------------------

    @get("/")
    async def dashboard(self, request: Request[Any, Any, Any]) -> Response[str]:
        ctx = await page_context(request, "dashboard")
        a = await inner.call(request, "GET", "/api/v1/gateways")
        gateways = _gateway_rows(a.json()) if a.ok else []
        return render("dashboard.html", title="Dashboard", gateways=gateways, published=None, publish_error=None,
                      refused=None if a.ok else a.detail, **ctx)  # fmt: skip

    @post("/publish")
    async def publish(self, request: Request[Any, Any, Any]) -> Response[str]:
        """Send the pending changes to the gateways (POST /api/v1/publish) and show each gateway's answer."""
        a = await inner.call(request, "POST", "/api/v1/publish", query={"timeout": 30},
                             principal=principal_of(request))  # fmt: skip
        ctx = await page_context(request, "dashboard")
        g = await inner.call(request, "GET", "/api/v1/gateways")
        result = a.json() if a.ok else None
        return render("dashboard.html", a.status, title="Dashboard", gateways=_gateway_rows(g.json()) if g.ok else [],
                      refused=None if g.ok else g.detail, published=result,
                      publish_error=None if a.ok else a.detail, **ctx)  # fmt: skip

    @get("/stream/dashboard")
    async def dashboard_stream(self, request: Request[Any, Any, Any]) -> ServerSentEvent:
        """The gateways table, sent again whenever it changes (checked every second; the browser
        reconnects on its own after the stream's 10 minutes)."""
        st = state_of(request)
        tz = st.site.tz if st.site else "UTC"
        template = env.get_template("_gateways.html")

        async def changes() -> AsyncGenerator[ServerSentEventMessage, None]:
            last = None
            end = time.monotonic() + 600
            while time.monotonic() < end:
                a = await inner.call(request, "GET", "/api/v1/gateways")
                if not a.ok:
                    yield ServerSentEventMessage(event="gateways", data=f"<p role='alert'>{a.status}: session ended "
                                                 "or not allowed; reload the page.</p>")  # fmt: skip
                    return
                html = " ".join(template.render(gateways=_gateway_rows(a.json()), tz=tz).split("\n"))
                if html != last:
                    last = html
                    yield ServerSentEventMessage(event="gateways", data=html)
                await asyncio.sleep(1.0)

        return ServerSentEvent(changes())

    # people ------------------------------------------------------------------------------------------------

    @get("/people")
    async def people(self, request: Request[Any, Any, Any], q: FromQuery[str] = "",
                     cursor: FromQuery[str | None] = None,
                     notice: FromQuery[str] = "") -> Response[str]:  # fmt: skip
        ctx = await page_context(request, "people")
        a = await inner.call(request, "GET", "/api/v1/users", query={"search": q[:256], "cursor": cursor,
                                                                     "limit": PAGE_SIZE})  # fmt: skip
        page = a.json() if a.ok else {"items": [], "next_cursor": None}
        ctx.update(title="People", q=q, users=page["items"], next_cursor=page["next_cursor"], first=cursor is None,
                   refused=None if a.ok else a.detail, notice=notice[:200])  # fmt: skip
        if _htmx_fragment(request):
            return render("_people_table.html", **ctx)
        return render("people.html", **ctx)

    @get("/people/new")
    async def new_person(self, request: Request[Any, Any, Any]) -> Response[str]:
        ctx = await page_context(request, "people")
        return await self._person_form(request, ctx, new=True, values={"active": True, "offline_access": False,
                                                                       "groups": []})  # fmt: skip

    @post("/people/new")
    async def add_person(self, request: Request[Any, Any, Any]) -> Response[str]:
        ctx = await page_context(request, "people")
        values = await _person_values(request)
        body = {"id": values["id"], **_user_body(values, [])}
        a = await inner.call(request, "POST", "/api/v1/users", json=body, principal=principal_of(request))
        if a.ok:
            return _see_other(f"/people?q={values['id']}&notice=added")
        return await self._person_form(request, ctx, new=True, values=values, answer=a)

    @get("/people/{uid:str}")
    async def person(self, request: Request[Any, Any, Any], uid: FromPath[str]) -> Response[str]:
        ctx = await page_context(request, "people")
        a = await inner.call(request, "GET", f"/api/v1/users/{_api_id(uid)}")
        if not a.ok:
            return render("error.html", a.status, title="Person", detail=a.detail, **ctx)
        u = a.json()
        values = {**u, "card": str(u["cards"][0]["card"]) if u["cards"] else ""}
        return await self._person_form(request, ctx, new=False, values=values)

    @post("/people/{uid:str}")
    async def edit_person(self, request: Request[Any, Any, Any], uid: FromPath[str]) -> Response[str]:
        ctx = await page_context(request, "people")
        values = await _person_values(request)
        values["id"] = uid
        have = await inner.call(request, "GET", f"/api/v1/users/{_api_id(uid)}")
        if not have.ok:
            return render("error.html", have.status, title="Person", detail=have.detail, **ctx)
        before = have.json()
        body = _user_body(values, before["cards"][1:], before)
        p = principal_of(request)
        a = await inner.call(request, "PUT", f"/api/v1/users/{_api_id(uid)}", json=body, principal=p)
        if a.ok:
            return _see_other(f"/people?q={uid}&notice=saved")
        return await self._person_form(request, ctx, new=False, values=values, answer=a)

    @post("/people/{uid:str}/active")
    async def set_active(self, request: Request[Any, Any, Any], uid: FromPath[str]) -> Response[str]:
        """Activate or deactivate access control for a user (seed 001's "Activate")."""
        form = await request.form()
        active = form.get("active") == "1"
        a = await inner.call(request, "PATCH", f"/api/v1/users/{_api_id(uid)}", json={"active": active},
                             principal=principal_of(request))  # fmt: skip
        if not a.ok:
            ctx = await page_context(request, "people")
            return render("error.html", a.status, title="Person", detail=a.detail, **ctx)
        if _htmx_fragment(request):
            ctx = await page_context(request, "people")
            return render("_person_row.html", u=a.json(), **ctx)
        return _see_other(f"/people?q={uid}&notice={'activated' if active else 'deactivated'}")

    async def _person_form(self, request: Request[Any, Any, Any], ctx: dict[str, Any], *, new: bool,
                           values: dict[str, Any], answer: inner.Answer | None = None) -> Response[str]:  # fmt: skip
        g = await inner.call(request, "GET", "/api/v1/groups")
        groups = g.json() if g.ok else []
        errors: dict[str, str] = {}
        status = 200
        if answer is not None:
            status = answer.status
            errors[_form_field(answer.field)] = answer.detail
        return render("person_form.html", status, title="Add a person" if new else f"Edit {values.get('id')}",
                      new=new, v=values, groups=groups, errors=errors, **ctx)  # fmt: skip

    # groups ------------------------------------------------------------------------------------------------

    @get("/groups")
    async def groups(self, request: Request[Any, Any, Any], notice: FromQuery[str] = "") -> Response[str]:
        ctx = await page_context(request, "groups")
        a = await inner.call(request, "GET", "/api/v1/groups")
        return render("groups.html", title="Groups", groups=a.json() if a.ok else [], notice=notice[:200],
                      refused=None if a.ok else a.detail, **ctx)  # fmt: skip

    @get("/groups/new")
    async def new_group(self, request: Request[Any, Any, Any]) -> Response[str]:
        ctx = await page_context(request, "groups")
        return await self._group_form(request, ctx, new=True, values={"doors": [], "tags": []})

    @get("/groups/{gid:str}")
    async def group(self, request: Request[Any, Any, Any], gid: FromPath[str]) -> Response[str]:
        ctx = await page_context(request, "groups")
        a = await inner.call(request, "GET", f"/api/v1/groups/{_api_id(gid)}")
        if not a.ok:
            return render("error.html", a.status, title="Group", detail=a.detail, **ctx)
        return await self._group_form(request, ctx, new=False, values=a.json())

    @post("/groups")
    async def save_group(self, request: Request[Any, Any, Any]) -> Response[str]:
        """Create or replace a group (PUT /api/v1/groups/{id}): name, tags, the doors it opens per gateway."""
        ctx = await page_context(request, "groups")
        form = await request.form()
        gid = str(form.get("id") or "").strip()
        doors = [d for d in (str(x) for x in form.getall("door", [])) if "/" in d]
        doors += [ln.strip() for ln in str(form.get("more_doors") or "").splitlines() if ln.strip()]
        values: dict[str, Any] = {"id": gid, "name": str(form.get("name") or ""), "doors": [],
                  "tags": [t.strip() for t in str(form.get("tags") or "").split(",") if t.strip()]}  # fmt: skip
        for d in doors:
            gw, _, door = d.partition("/")
            values["doors"].append({"gateway": gw.strip(), "door": door.strip()})
        values["schedule"] = str(form.get("schedule") or "") or None
        body = {k: values[k] for k in ("name", "tags", "doors", "schedule")}
        new = form.get("new") == "1"
        if not _IDENT.fullmatch(gid):  # the API's Ident, checked here only to build its path
            detail = b"a group id is 1-64 letters, digits or _.:@-"
            a = inner.Answer(400, [], b'{"detail": "' + detail + b'", "field": "path.gid"}')
        else:
            p = principal_of(request)
            a = await inner.call(request, "PUT", f"/api/v1/groups/{_api_id(gid)}", json=body, principal=p)
        if a.ok:
            return _see_other(f"/groups?notice={'added' if new else 'saved'}")
        return await self._group_form(request, ctx, new=new, values=values, answer=a)

    async def _group_form(self, request: Request[Any, Any, Any], ctx: dict[str, Any], *, new: bool,
                          values: dict[str, Any], answer: inner.Answer | None = None) -> Response[str]:  # fmt: skip
        gws = await inner.call(request, "GET", "/api/v1/gateways")
        known = [f"{d['gateway']}/{d['door']}" for g in (gws.json() if gws.ok else []) for d in g["doors"]]
        sch = await inner.call(request, "GET", "/api/v1/schedules")
        ctx = {**ctx, "schedules": [x["id"] for x in sch.json()] if sch.ok else []}
        chosen = [f"{d['gateway']}/{d['door']}" for d in values["doors"]]
        errors: dict[str, str] = {}
        if answer is not None:
            f = answer.field or ""
            key = ("id" if f.startswith("path") else "doors" if ".doors" in f else "tags" if ".tags" in f
                   else "name" if ".name" in f else "schedule" if "schedule" in f + answer.detail
                   else "")  # fmt: skip
            errors[key] = answer.detail
        return render("group_form.html", answer.status if answer else 200, title="Add a group" if new else
                      f"Edit group {values.get('id')}", new=new, v=values, known=sorted(set(known) | set(chosen)),
                      chosen=set(chosen), other=[], errors=errors, **ctx)  # fmt: skip


async def _person_values(request: Request[Any, Any, Any]) -> dict[str, Any]:
    form = await request.form()
    return {"id": str(form.get("id") or "").strip(), "name": str(form.get("name") or "").strip(),
            "card": str(form.get("card") or "").strip(), "groups": [str(g) for g in form.getall("groups", [])],
            "active": form.get("active") == "on", "offline_access": form.get("offline_access") == "on"}  # fmt: skip


def _user_body(v: dict[str, Any], other_cards: list[dict[str, Any]],
               before: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """The API body of the add/edit form. A card ID that is not a number goes as typed: the API names it."""
    cards: list[dict[str, Any]] = []
    if v["card"]:
        card: int | str = int(v["card"]) if v["card"].isdigit() else v["card"]
        kept = [k for k in (before or {}).get("cards", []) if str(k["card"]) == v["card"]]
        cards.append({k: kept[0][k] for k in ("card", "status", "format", "valid_from", "valid_until")} if kept
                     else {"card": card})  # fmt: skip
    cards += [{k: c[k] for k in ("card", "status", "format", "valid_from", "valid_until")} for c in other_cards
              if str(c["card"]) != v["card"]]  # fmt: skip
    body: dict[str, Any] = {"name": v["name"], "active": v["active"], "offline_access": v["offline_access"],
                            "cards": cards, "groups": v["groups"]}  # fmt: skip
    if before is not None:
        body.update(valid_from=before["valid_from"], valid_until=before["valid_until"])
    return body


def _form_field(api_field: str | None) -> str:
    """The form field for a field the API named (body.cards[0].card -> card); "" for the whole form."""
    f = api_field or ""
    for prefix, name in (("body.id", "id"), ("path.uid", "id"), ("body.name", "name"), ("body.cards", "card"),
                         ("body.groups", "groups"), ("body.offline_access", "offline_access")):  # fmt: skip
        if f.startswith(prefix):
            return name
    return ""


def page_handlers() -> ExceptionHandlersMap:
    """How a page answers a refusal: the login page, a "not allowed" page, a "not found" page."""
    return {NotAuthorizedException: _to_login, PermissionDeniedException: _refused, PermissionDenied: _refused,
            NotFound: _not_found}  # fmt: skip


def console_routers(more: Sequence[type[Controller]] = ()) -> list[Router]:
    """The console's routes, with the page controllers of the modules that build on this one (`more`)."""
    handlers = page_handlers()
    pages = Router(path="/", route_handlers=[PublicPages, ConsolePages, *more],
                   response_headers=SECURITY_HEADERS, include_in_schema=False,
                   exception_handlers=handlers)  # fmt: skip
    static = create_static_files_router(path="/static", directories=[STATIC], include_in_schema=False)
    return [pages, static]
