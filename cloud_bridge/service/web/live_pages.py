"""The console's doors, events and alarms pages, and the dashboard's doors and open-alarms panels.

Like every page (pages.py), these read and act only through `inner.call` (the service's own /api/v1), so a
command is the API's signed command with its audit entry, and a refusal is the API's 403. What an operator
may not do is not offered: the unlock, door-mode and lockdown buttons are shown only when the Authorizer
would allow that command on that door (`Authorizer.check_command`), the acknowledge form only with event
update on that alarm. A command is confirmed on a page of its own that names the door (or gateway), and
its answer is the gateway's result of the signed command.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from litestar import Controller, Request, Response, Router, get, post
from litestar.params import FromPath, FromQuery
from litestar.response import ServerSentEvent

from cloud_bridge.permissions import Action, Authorizer, Operator
from cloud_bridge.service.alarms import alarm_target
from cloud_bridge.service.core import authorizer, principal_of, state_of
from cloud_bridge.service.events import EventOut, Filters, event_hub, live
from edge.model import DoorMode

from . import inner
from .pages import (
    SECURITY_HEADERS,
    _api_id,
    _htmx_fragment,
    _see_other,
    env,
    page_context,
    page_handlers,
    page_session,
    render,
)

COMMANDS = {"unlock": "Unlock", "door_mode": "Change the mode of", "lockdown": "Lock down", "release": "Release"}
MODES = [m.value for m in DoorMode]


def _door_actions(authz: Authorizer, op: Operator, door: dict[str, Any]) -> dict[str, bool]:
    gw, did, tags = door["gateway"], door["id"], door["tags"]
    return {k: authz.check_command(op, k, gw, did, door_tags=tags).allowed for k in ("unlock", "door_mode")}


async def _doors(request: Request[Any, Any, Any]) -> tuple[list[dict[str, Any]], str | None]:
    a = await inner.call(request, "GET", "/api/v1/doors")
    if not a.ok:
        return [], a.detail
    st, p = state_of(request), principal_of(request)
    authz = await authorizer(st.db)
    doors: list[dict[str, Any]] = a.json()
    for d in doors:
        d["can"] = _door_actions(authz, p.operator, d)
    return doors, None


def _lockdown_gateways(authz: Authorizer, op: Operator, doors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    gws: dict[str, bool] = {}
    for d in doors:
        gws[d["gateway"]] = gws.get(d["gateway"], False) or d["mode"] == "lockdown"
    return [{"id": g, "lockdown": down} for g, down in sorted(gws.items())
            if authz.check_command(op, "lockdown", g).allowed]  # fmt: skip


def _ts(value: str, tz: str) -> float | None:
    """A local date-time from a form ("2026-12-01T08:00" or "2026-12-01") as UTC seconds; None if empty."""
    value = value.strip()
    if not value:
        return None
    try:
        return datetime.fromisoformat(value).replace(tzinfo=ZoneInfo(tz)).timestamp()
    except ValueError:
        return None


class LivePages(Controller):
    path = "/"
    include_in_schema = False
    guards = [page_session]

    # doors -------------------------------------------------------------------------------------------------

    @get("/doors")
    async def doors(self, request: Request[Any, Any, Any]) -> Response[str]:
        ctx = await page_context(request, "doors")
        doors, refused = await _doors(request)
        authz = ctx["can"].authz
        gws = _lockdown_gateways(authz, ctx["p"].operator, doors)
        if _htmx_fragment(request):
            return render("_doors_table.html", doors=doors, **ctx)
        return render("doors.html", title="Doors", doors=doors, gateways=gws, refused=refused, result=None, **ctx)

    @get("/doors/{gw:str}/{door:str}/{action:str}")
    async def confirm(self, request: Request[Any, Any, Any], gw: FromPath[str], door: FromPath[str],
                      action: FromPath[str]) -> Response[str]:
        """The confirmation of a command: it names the door (or the gateway, for a lockdown)."""
        ctx = await page_context(request, "doors")
        if action not in COMMANDS:
            return render("error.html", 404, title="Doors", detail=f"no command {action[:32]!r}", **ctx)
        what = f"gateway {gw}" if action in ("lockdown", "release") else f"door {door} on gateway {gw}"
        return render("door_confirm.html", title=f"{COMMANDS[action]} {what}", gw=gw, door=door, action=action,
                      what=what, modes=MODES, **ctx)  # fmt: skip

    @post("/doors/{gw:str}/{door:str}/{action:str}")
    async def command(self, request: Request[Any, Any, Any], gw: FromPath[str], door: FromPath[str],
                      action: FromPath[str]) -> Response[str]:
        """Send the confirmed command through the API (signed there) and show the gateway's answer."""
        form = await request.form()
        p = principal_of(request)
        gwid, did = _api_id(gw), _api_id(door)
        if action == "unlock":
            seconds = str(form.get("seconds") or "5")
            body: dict[str, Any] = {"seconds": float(seconds) if seconds.replace(".", "", 1).isdigit() else seconds}
            a = await inner.call(request, "POST", f"/api/v1/doors/{gwid}/{did}/unlock", json=body, principal=p)
        elif action == "door_mode":
            mode = str(form.get("mode") or "")
            a = await inner.call(request, "POST", f"/api/v1/doors/{gwid}/{did}/mode", json={"mode": mode or None},
                                 principal=p)  # fmt: skip
        elif action in ("lockdown", "release"):
            a = await inner.call(request, "POST", f"/api/v1/lockdown/{gwid}", json={"active": action == "lockdown"},
                                 principal=p)  # fmt: skip
        else:
            ctx = await page_context(request, "doors")
            return render("error.html", 404, title="Doors", detail=f"no command {action[:32]!r}", **ctx)
        what = f"gateway {gw}" if action in ("lockdown", "release") else f"door {door} on gateway {gw}"
        result = {"what": f"{COMMANDS[action]} {what}", "status": a.status, "answer": a.json() if a.ok else None,
                  "detail": None if a.ok else a.detail}  # fmt: skip
        ctx = await page_context(request, "doors")
        doors, refused = await _doors(request)
        gws = _lockdown_gateways(ctx["can"].authz, p.operator, doors)
        return render("doors.html", a.status, title="Doors", doors=doors, gateways=gws, refused=refused,
                      result=result, **ctx)  # fmt: skip

    # events ------------------------------------------------------------------------------------------------

    def _event_query(self, request: Request[Any, Any, Any], tz: str) -> dict[str, Any]:
        q = request.query_params
        f = {k: str(q.get(k) or "").strip()[:128] for k in ("door", "user", "kind", "result", "since", "until")}
        return {**f, "api": {"door": f["door"] or None, "user": f["user"] or None, "kind": f["kind"] or None,
                             "result": f["result"] or None, "since": _ts(f["since"], tz),
                             "until": _ts(f["until"], tz)}}  # fmt: skip

    @get("/events")
    async def events(self, request: Request[Any, Any, Any], cursor: FromQuery[str | None] = None) -> Response[str]:
        ctx = await page_context(request, "events")
        f = self._event_query(request, ctx["tz"])
        a = await inner.call(request, "GET", "/api/v1/events", query={**f["api"], "cursor": cursor, "limit": 50})
        pg = a.json() if a.ok else {"items": [], "next_cursor": None}
        keep = {k: f[k] for k in ("door", "user", "kind", "result", "since", "until") if f[k]}
        return render("events.html", a.status, title="Events", events=pg["items"], next_cursor=pg["next_cursor"],
                      f=f, keep=keep, refused=None if a.ok else a.detail, **ctx)  # fmt: skip

    @get("/events.csv")
    async def events_csv(self, request: Request[Any, Any, Any]) -> Response[str | bytes]:
        """The filtered history as CSV (the API's export: formula-like cells neutralised)."""
        st = state_of(request)
        f = self._event_query(request, st.site.tz if st.site else "UTC")
        a = await inner.call(request, "GET", "/api/v1/events/export.csv", query=f["api"])
        if not a.ok:
            ctx = await page_context(request, "events")
            return render("error.html", a.status, title="Events", detail=a.detail, **ctx)  # type: ignore[return-value]
        return Response(a.body, media_type="text/csv; charset=utf-8",
                        headers={"content-disposition": 'attachment; filename="events.csv"'})  # fmt: skip

    # alarms ------------------------------------------------------------------------------------------------

    @get("/alarms")
    async def alarms(self, request: Request[Any, Any, Any], notice: FromQuery[str] = "") -> Response[str]:
        ctx = await page_context(request, "alarms")
        items, refused = await self._alarms(request, ctx, None)
        return render("alarms.html", title="Alarms", alarms=items, refused=refused, notice=notice[:64], **ctx)

    async def _alarms(self, request: Request[Any, Any, Any], ctx: dict[str, Any],
                      state: str | None) -> tuple[list[dict[str, Any]], str | None]:  # fmt: skip
        a = await inner.call(request, "GET", "/api/v1/alarms", query={"state": state, "limit": 200})
        if not a.ok:
            return [], a.detail
        items: list[dict[str, Any]] = a.json()["items"]
        authz, op = ctx["can"].authz, ctx["p"].operator
        for x in items:
            x["can_ack"] = authz.check(op, Action.UPDATE, alarm_target(x["gateway"], x["door"], x["kind"],
                                                                        x["id"])).allowed  # fmt: skip
        return items, None

    @post("/alarms/{aid:int}/acknowledge")
    async def acknowledge(self, request: Request[Any, Any, Any], aid: FromPath[int]) -> Response[str]:
        form = await request.form()
        comment = str(form.get("comment") or "")
        a = await inner.call(request, "POST", f"/api/v1/alarms/{aid}/acknowledge", json={"comment": comment},
                             principal=principal_of(request))  # fmt: skip
        if a.ok:
            return _see_other("/alarms?notice=acknowledged")
        ctx = await page_context(request, "alarms")
        return render("error.html", a.status, title="Alarms", detail=a.detail, **ctx)

    # the dashboard's panels (loaded and refreshed by htmx) ----------------------------------------------------

    @get("/panels/doors")
    async def doors_panel(self, request: Request[Any, Any, Any]) -> Response[str]:
        ctx = await page_context(request, "dashboard")
        doors, refused = await _doors(request)
        return render("_doors_panel.html", doors=doors, refused=refused, **ctx)

    @get("/stream/events")
    async def events_stream(self, request: Request[Any, Any, Any]) -> ServerSentEvent:
        """The dashboard's live events: each new event the operator may read, as one list item (SSE)."""
        st, p = state_of(request), principal_of(request)
        tz = st.site.tz if st.site else "UTC"
        item = env.get_template("_event_item.html")

        def html(e: EventOut) -> str:
            return " ".join(item.render(e=e, tz=tz).split("\n"))

        return ServerSentEvent(live(st.db, event_hub(request), p, Filters(), html))

    @get("/panels/alarms")
    async def alarms_panel(self, request: Request[Any, Any, Any]) -> Response[str]:
        ctx = await page_context(request, "dashboard")
        items, refused = await self._alarms(request, ctx, "open")
        return render("_alarms_panel.html", alarms=items, refused=refused, **ctx)


def live_router() -> Router:
    return Router(path="/", route_handlers=[LivePages], response_headers=SECURITY_HEADERS,
                  exception_handlers=page_handlers(), include_in_schema=False)  # fmt: skip
