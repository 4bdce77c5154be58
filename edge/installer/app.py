"""The installer page's ASGI application (Litestar, Jinja2, htmx): docs/operations.md, "The installer page".

* Who: every page but /login and /setup needs a login session (cookie `ei_session`); every POST carries the
  session's CSRF token (`_csrf` field or `X-CSRF-Token`); the forms before a session carry a double-submit
  token (cookie `ei_form`). Roles: "viewer" sees everything; "installer" may also pulse a relay, arm an OSDP
  reader's pairing (install mode) and add accounts. Guards on the routes decide, never an `if` in a handler.
* What: read-mostly. Nothing here adds a card or a user or changes a mode; the one thing that acts is a relay
  pulse, through the agent's door-mode owner (refused in lockdown). Every action is journalled
  (`installer.action`).
* Headers: the console's strict Content-Security-Policy (no inline script or style), no framing, no caching.
* Live views poll small fragments with htmx (`hx-trigger="every 1s"`); each is built from a snapshot.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import secrets
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any, TypeVar

import jinja2
from litestar import Litestar, Request, Response, get, post
from litestar.connection import ASGIConnection
from litestar.datastructures import Cookie, ResponseHeader, State
from litestar.exceptions import HTTPException, NotAuthorizedException, NotFoundException, PermissionDeniedException
from litestar.handlers.base import BaseRouteHandler
from litestar.params import Parameter
from litestar.static_files import create_static_files_router

from edge.agent.ports import GatewayPort
from edge.door import DoorLockdownError
from edge.events import INSTALLER_ACTION

from . import views
from .auth import Accounts, AuthError, Session, csrf_ok

T = TypeVar("T")
HERE = Path(__file__).parent
log = logging.getLogger("edge.installer")
SESSION_COOKIE = "ei_session"
FORM_COOKIE = "ei_form"
CSRF_HEADER = "x-csrf-token"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")  # fmt: skip
SECURITY_HEADERS = [
    ResponseHeader(name="Content-Security-Policy", value=CSP),
    ResponseHeader(name="X-Content-Type-Options", value="nosniff"),
    ResponseHeader(name="Referrer-Policy", value="no-referrer"),
    ResponseHeader(name="X-Frame-Options", value="DENY"),
    ResponseHeader(name="Cache-Control", value="no-store"),
]
#: Events shown on the events page (the feed keeps this many), and in its live fragment.
EVENTS_PAGE = 1000
EVENTS_LIVE = 50
#: A live fragment is rendered at most this often, whoever polls it.
FRAGMENT_TTL_S = 0.5

env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                         undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)  # fmt: skip
env.globals["mib"] = views.mib


class LoginNeeded(NotAuthorizedException):
    pass


def _gw(conn: ASGIConnection[Any, Any, Any, Any]) -> GatewayPort:
    gw: GatewayPort = conn.app.state["gateway"]
    return gw


class AgentLoop:
    """The agent's loop, seen from the page's thread: `call` runs a (quick, copying) function there and returns
    its result, `run` a coroutine, `post` a function without waiting. Nothing of the agent is touched from the
    page's thread but the immutable config and hardware profile."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if asyncio.get_running_loop() is self.loop:  # the same loop (tests that serve in-loop): just call
            return fn(*args, **kwargs)
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                fut.set_result(fn(*args, **kwargs))
            except BaseException as e:  # handed to the caller on the page's thread
                fut.set_exception(e)

        self.loop.call_soon_threadsafe(run)
        return await asyncio.wrap_future(fut)

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        if asyncio.get_running_loop() is self.loop:
            return await coro
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    def post(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self.loop.call_soon_threadsafe(functools.partial(fn, *args, **kwargs))


class Fragments:
    """The live fragments, rendered at most once per `ttl_s` and shared by every poller (they hold nothing of a
    session): ten browsers on the readers page cost one snapshot and one rendering a second, not ten."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._cache: dict[str, tuple[float, str]] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def get(self, key: str, build: Callable[[], Coroutine[Any, Any, str]]) -> str:
        hit = self._cache.get(key)
        if hit is not None and time.monotonic() - hit[0] < self.ttl_s:
            return hit[1]
        async with self._locks.setdefault(key, asyncio.Lock()):
            hit = self._cache.get(key)
            if hit is not None and time.monotonic() - hit[0] < self.ttl_s:
                return hit[1]
            text = await build()
            self._cache[key] = (time.monotonic(), text)
            return text

    def forget(self, key: str) -> None:
        self._cache.pop(key, None)


def _fragments(conn: ASGIConnection[Any, Any, Any, Any]) -> Fragments:
    f: Fragments = conn.app.state["fragments"]
    return f


async def _fragment(request: Request[Any, Any, Any], template: str,
                    ctx: Callable[[], Coroutine[Any, Any, dict[str, Any]]]) -> Response[str]:  # fmt: skip
    async def build() -> str:
        return env.get_template(template).render(**(_base_context(request) | await ctx()))

    return Response(await _fragments(request).get(template, build), media_type="text/html")


def _agent(conn: ASGIConnection[Any, Any, Any, Any]) -> AgentLoop:
    a: AgentLoop = conn.app.state["agent_loop"]
    return a


def _accounts(conn: ASGIConnection[Any, Any, Any, Any]) -> Accounts:
    a: Accounts = conn.app.state["accounts"]
    return a


def _session(request: Request[Any, Any, Any]) -> Session:
    s: Session = request.scope["state"]["session"]
    return s


def render(request: Request[Any, Any, Any], template: str, status: int = 200, *, cookies: list[Cookie] | None = None,
           **ctx: Any) -> Response[str]:  # fmt: skip
    return Response(env.get_template(template).render(**(_base_context(request) | ctx)), status_code=status,
                    media_type="text/html", cookies=cookies or [])  # fmt: skip


def _base_context(request: Request[Any, Any, Any]) -> dict[str, Any]:
    gw = _gw(request)
    session = request.scope.get("state", {}).get("session")
    return {"s": session, "csrf": session.csrf if session else None, "gateway": gw.cfg.site.gateway,
            "site": gw.cfg.site.id, "tz": gw.cfg.tz, "when": views.when, "nav": ""}  # fmt: skip


def _audit(request: Request[Any, Any, Any], action: str, result: str, *, user: str | None = None,
           **detail: str | int | float | bool | None) -> None:  # fmt: skip
    client = request.client.host if request.client else "-"
    _agent(request).post(_gw(request).record_event, INSTALLER_ACTION, user=user,
                         detail={"action": action, "result": result, "address": client, **detail})  # fmt: skip


def _see_other(location: str, cookies: list[Cookie] | None = None) -> Response[str]:
    return Response("", status_code=303, headers={"location": location}, cookies=cookies or [])


def _secure(request: Request[Any, Any, Any]) -> bool:
    return request.scope.get("scheme") == "https"


# --- guards -----------------------------------------------------------------------------------------------


async def logged_in(conn: ASGIConnection[Any, Any, Any, Any], _h: BaseRouteHandler) -> None:
    s = _accounts(conn).session(conn.cookies.get(SESSION_COOKIE))
    if s is None:
        raise LoginNeeded("not logged in")
    if conn.scope.get("method") not in ("GET", "HEAD"):
        sent = conn.headers.get(CSRF_HEADER)
        if sent is None and isinstance(conn, Request):
            value = (await conn.form()).get("_csrf")
            sent = value if isinstance(value, str) else None
        if not csrf_ok(s, sent):
            raise PermissionDeniedException("CSRF token missing or wrong: reload the page")
    conn.scope.setdefault("state", {})["session"] = s


async def installer_role(conn: ASGIConnection[Any, Any, Any, Any], _h: BaseRouteHandler) -> None:
    s = conn.scope.get("state", {}).get("session")
    if s is None or s.role != "installer":
        raise PermissionDeniedException("this needs the installer role (a viewer may only look)")


def _form_token(request: Request[Any, Any, Any]) -> tuple[str, list[Cookie]]:
    have = request.cookies.get(FORM_COOKIE)
    if have and 20 <= len(have) <= 64:
        return have, []
    token = secrets.token_urlsafe(24)
    return token, [Cookie(key=FORM_COOKIE, value=token, path="/", secure=_secure(request), httponly=True,
                          samesite="strict")]  # fmt: skip


def _form_token_ok(request: Request[Any, Any, Any], sent: Any) -> bool:
    have = request.cookies.get(FORM_COOKIE)
    return have is not None and isinstance(sent, str) and secrets.compare_digest(have.encode(), sent.encode())


def _text(form: Any, key: str, limit: int = 1024) -> str:
    value = form.get(key)
    return value[:limit] if isinstance(value, str) else ""


# --- public pages -------------------------------------------------------------------------------------------


@get("/login")
async def login_page(request: Request[Any, Any, Any]) -> Response[str]:
    if _accounts(request).empty:
        return _see_other("/setup")
    token, cookies = _form_token(request)
    return render(request, "login.html", form_token=token, error=None, name="", cookies=cookies, nav="login")


@post("/login")
async def login(request: Request[Any, Any, Any]) -> Response[str]:
    form = await request.form()
    name, password = _text(form, "name", 64).strip(), _text(form, "password")
    token, cookies = _form_token(request)
    if not _form_token_ok(request, form.get("_csrf")):
        return render(request, "login.html", 403, form_token=token, error="The form had expired: please try again.",
                      name=name, cookies=cookies, nav="login")  # fmt: skip
    try:
        value, s = await _accounts(request).login(name, password)
    except AuthError as e:
        _audit(request, "login", "refused", user=name[:64] or None)
        return render(request, "login.html", 401, form_token=token, error=str(e), name=name, cookies=cookies,
                      nav="login")  # fmt: skip
    _audit(request, "login", "ok", user=s.name)
    return _see_other("/", [Cookie(key=SESSION_COOKIE, value=value, path="/", httponly=True, samesite="strict",
                                   secure=_secure(request), max_age=int(_accounts(request).session_s))])  # fmt: skip


@get("/setup")
async def setup_page(request: Request[Any, Any, Any]) -> Response[str]:
    if not _accounts(request).empty:
        return _see_other("/login")
    token, cookies = _form_token(request)
    return render(request, "setup.html", form_token=token, error=None, field=None, name="", cookies=cookies,
                  nav="setup")  # fmt: skip


@post("/setup")
async def setup(request: Request[Any, Any, Any]) -> Response[str]:
    form = await request.form()
    code, name, password = _text(form, "code", 64), _text(form, "name", 64).strip(), _text(form, "password")
    token, cookies = _form_token(request)
    ctx: dict[str, Any] = {"form_token": token, "cookies": cookies, "name": name, "nav": "setup"}
    if not _form_token_ok(request, form.get("_csrf")):
        return render(request, "setup.html", 403, error="The form had expired: please try again.", field=None, **ctx)
    if password != _text(form, "confirm"):
        return render(request, "setup.html", 400, error="The two passwords differ.", field="confirm", **ctx)
    try:
        acct = await _accounts(request).use_setup_code(code, name, password)
    except AuthError as e:
        _audit(request, "setup", f"refused: {e}"[:200], user=name or None)
        return render(request, "setup.html", 401 if e.field == "code" else 400, error=str(e), field=e.field, **ctx)
    _audit(request, "setup", "ok", user=acct.name)
    value, _s = await _accounts(request).login(name, password)
    return _see_other("/", [Cookie(key=SESSION_COOKIE, value=value, path="/", httponly=True, samesite="strict",
                                   secure=_secure(request), max_age=int(_accounts(request).session_s))])  # fmt: skip


# --- pages behind the login ---------------------------------------------------------------------------------


@post("/logout", guards=[logged_in])
async def logout(request: Request[Any, Any, Any]) -> Response[str]:
    s = _session(request)
    _accounts(request).logout(s)
    _audit(request, "logout", "ok", user=s.name)
    return _see_other("/login", [Cookie(key=SESSION_COOKIE, value="", path="/", max_age=0, httponly=True,
                                        samesite="strict")])  # fmt: skip


@get("/", guards=[logged_in])
async def status_page(request: Request[Any, Any, Any]) -> Response[str]:
    return render(request, "status.html", nav="status", title="Status", **await _status(request))


@get("/fragment/status", guards=[logged_in])
async def status_fragment(request: Request[Any, Any, Any]) -> Response[str]:
    return await _fragment(request, "_status.html", lambda: _status(request))


async def _status(request: Request[Any, Any, Any]) -> dict[str, Any]:
    gw, agent = _gw(request), _agent(request)
    snap = await agent.call(views.status_snapshot, gw)
    return snap | {"oldest": await agent.run(views.oldest_unsent(gw)), "host": views.host_info(gw.cfg.state_dir)}


@get("/doors", guards=[logged_in])
async def doors_page(request: Request[Any, Any, Any]) -> Response[str]:
    doors = await _agent(request).call(views.door_rows, _gw(request))
    return render(request, "doors.html", nav="doors", title="Doors", doors=doors, result=None, refused=None)


@get("/fragment/doors", guards=[logged_in])
async def doors_fragment(request: Request[Any, Any, Any]) -> Response[str]:
    async def ctx() -> dict[str, Any]:
        return {"doors": await _agent(request).call(views.door_rows, _gw(request))}

    return await _fragment(request, "_doors.html", ctx)


@post("/doors/{door:str}/pulse", guards=[logged_in, installer_role])
async def pulse(request: Request[Any, Any, Any], door: Annotated[str, Parameter(max_length=64)]) -> Response[str]:
    gw, s, agent = _gw(request), _session(request), _agent(request)
    if door not in {d.door for d in gw.profile.doors}:
        raise NotFoundException(f"no door {door[:64]!r} on this gateway")
    try:
        seconds = await agent.call(gw.local_pulse, door, source="installer", by=s.name)  # journalled by the agent
        _fragments(request).forget("_doors.html")
    except (DoorLockdownError, PermissionError, ValueError) as e:
        doors = await agent.call(views.door_rows, gw)
        return render(request, "doors.html", 409, nav="doors", title="Doors", doors=doors, result=None,
                      refused=f"Door {door}: {e}")  # fmt: skip
    return render(request, "doors.html", nav="doors", title="Doors", doors=await agent.call(views.door_rows, gw),
                  result=f"Door {door}: relay pulsed for {seconds:g} s.", refused=None)  # fmt: skip


@get("/readers", guards=[logged_in])
async def readers_page(request: Request[Any, Any, Any]) -> Response[str]:
    gw, agent = _gw(request), _agent(request)
    readers = await agent.call(views.reader_rows, gw)
    reads = views.read_rows(await agent.call(views.reads_snapshot, gw))
    return render(request, "readers.html", nav="readers", title="Readers", readers=readers, reads=reads,
                  result=None, refused=None)  # fmt: skip


@post("/readers/{reader:str}/pair", guards=[logged_in, installer_role])
async def pair(request: Request[Any, Any, Any], reader: Annotated[str, Parameter(max_length=64)]) -> Response[str]:
    """Install mode on one OSDP reader for `views.PAIRING_S`: a factory-fresh reader (default key) gets the site
    key at its next handshake; journalled."""
    gw, s, agent = _gw(request), _session(request), _agent(request)
    status, result, refused = 200, None, None
    try:
        until = await agent.call(views.arm_pairing, gw, reader)
    except KeyError:
        _audit(request, "pair", "refused: no such reader", user=s.name, reader=reader[:64])
        raise NotFoundException(f"no reader {reader[:64]!r} on this gateway") from None
    except ValueError as e:
        status, refused = 400, str(e)
        _audit(request, "pair", f"refused: {e}"[:200], user=s.name, reader=reader)
    else:
        result = f"Reader {reader}: pairing armed until {views.when(until, gw.cfg.tz)[-8:]}."
        _audit(request, "pair", "ok", user=s.name, reader=reader, until=until)
    readers = await agent.call(views.reader_rows, gw)
    reads = views.read_rows(await agent.call(views.reads_snapshot, gw))
    return render(request, "readers.html", status, nav="readers", title="Readers", readers=readers, reads=reads,
                  result=result, refused=refused)  # fmt: skip


@get("/fragment/reads", guards=[logged_in])
async def reads_fragment(request: Request[Any, Any, Any]) -> Response[str]:
    async def ctx() -> dict[str, Any]:
        return {"reads": views.read_rows(await _agent(request).call(views.reads_snapshot, _gw(request)))}

    return await _fragment(request, "_reads.html", ctx)


@get("/events", guards=[logged_in])
async def events_page(request: Request[Any, Any, Any]) -> Response[str]:
    events = await _agent(request).call(views.events_snapshot, _gw(request), EVENTS_PAGE)
    return render(request, "events.html", nav="events", title="Events", events=events)


@get("/fragment/events", guards=[logged_in])
async def events_fragment(request: Request[Any, Any, Any]) -> Response[str]:
    async def ctx() -> dict[str, Any]:
        return {"events": await _agent(request).call(views.events_snapshot, _gw(request), EVENTS_LIVE)}

    return await _fragment(request, "_events.html", ctx)


@get("/config", guards=[logged_in])
async def config_page(request: Request[Any, Any, Any]) -> Response[str]:
    return render(request, "config.html", nav="config", title="Configuration", **views.config_view(_gw(request)))


@get("/diagnostics.zip", guards=[logged_in])
async def diagnostics(request: Request[Any, Any, Any]) -> Response[bytes]:
    gw, s = _gw(request), _session(request)
    body = views.diagnostics_zip(await _agent(request).call(views.diagnostics_snapshot, gw))
    _audit(request, "diagnostics", "ok", user=s.name, bytes=len(body))
    name = f"edge-diagnostics-{gw.cfg.site.id}-{gw.cfg.site.gateway}.zip"
    return Response(body, media_type="application/zip",
                    headers={"content-disposition": f'attachment; filename="{name}"'})  # fmt: skip


@get("/accounts", guards=[logged_in])
async def accounts_page(request: Request[Any, Any, Any]) -> Response[str]:
    return render(request, "accounts.html", nav="accounts", title="Accounts", accounts=_accounts(request).names,
                  error=None, field=None, added=None, name="")  # fmt: skip


@post("/accounts", guards=[logged_in, installer_role])
async def add_account(request: Request[Any, Any, Any]) -> Response[str]:
    form = await request.form()
    s, accounts = _session(request), _accounts(request)
    name, role, password = _text(form, "name", 64).strip(), _text(form, "role", 16), _text(form, "password")
    try:
        acct = await accounts.add(name, role, password)
    except AuthError as e:
        _audit(request, "account_add", f"refused: {e}"[:200], user=s.name, account=name[:64])
        return render(request, "accounts.html", 400, nav="accounts", title="Accounts", accounts=accounts.names,
                      error=str(e), field=e.field, added=None, name=name)  # fmt: skip
    _audit(request, "account_add", "ok", user=s.name, account=acct.name, role=acct.role)
    return render(request, "accounts.html", nav="accounts", title="Accounts", accounts=accounts.names, error=None,
                  field=None, added=f"Account {acct.name} ({acct.role}) added.", name="")  # fmt: skip


# --- errors ---------------------------------------------------------------------------------------------------


def _to_login(request: Request[Any, Any, Any], _exc: Exception) -> Response[str]:
    if "hx-request" in request.headers:
        return Response("", status_code=401, headers={"HX-Redirect": "/login"})
    return _see_other("/login")


def _error(request: Request[Any, Any, Any], exc: Exception) -> Response[str]:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    title = {403: "Not allowed", 404: "Not found", 400: "Bad request"}.get(status, "Error")
    detail = exc.detail if isinstance(exc, HTTPException) else "internal error"
    return render(request, "error.html", status, title=title, detail=detail)


def _internal(request: Request[Any, Any, Any], exc: Exception) -> Response[str]:
    if isinstance(exc, HTTPException):
        return _error(request, exc)
    log.exception("installer page %s failed", request.url.path, exc_info=exc)
    return render(request, "error.html", 500, title="Error", detail="internal error (logged in the system journal)")


def create_app(gw: GatewayPort, accounts: Accounts, agent_loop: asyncio.AbstractEventLoop) -> Litestar:
    return Litestar(
        route_handlers=[
            login_page, login, setup_page, setup, logout, status_page, status_fragment, doors_page, doors_fragment,
            pulse, readers_page, pair, reads_fragment, events_page, events_fragment, config_page, diagnostics,
            accounts_page, add_account, create_static_files_router(path="/static", directories=[HERE / "static"]),
        ],
        response_headers=SECURITY_HEADERS,
        exception_handlers={LoginNeeded: _to_login, HTTPException: _error, Exception: _internal},
        state=State({"gateway": gw, "accounts": accounts, "agent_loop": AgentLoop(agent_loop),
                     "fragments": Fragments(FRAGMENT_TTL_S)}),
        openapi_config=None,
        debug=False,
        request_max_body_size=64 * 1024,
    )  # fmt: skip


__all__ = ["create_app"]
