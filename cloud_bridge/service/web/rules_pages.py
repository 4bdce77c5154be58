"""The console's "Areas & rules" page (/rules, issue 19): the areas with their anti-passback mode and occupancy
limit, each door's rules and each gateway's interlocks; a form to add or edit an area and one to reset
anti-passback (a user, an area, or everyone) at the gateways now.

Like every console page (pages.py): the login session, CSRF on each POST, everything read and changed by calling
/api/v1 in process (`inner.call`: /api/v1/areas, /api/v1/areas/reset, the doors' rules and interlocks), so the
Authorizer, validation and audit are the API's; the page only hides the forms from an operator who may not
update a gateway.
"""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, Response, get, post
from litestar.params import FromPath

from cloud_bridge.service.core import principal_of

from . import inner
from .pages import _IDENT, _api_id, page_context, page_session, render

MODES = {"none": "none", "soft": "soft (grant, raise an alarm)", "hard": "hard (deny)",
         "timed": "timed (no re-entry for a while)"}  # fmt: skip

_AREA_FIELDS = {"body.name": "name", "body.anti_passback": "anti_passback", "body.timed_s": "timed_s",
                "body.exempt_groups": "exempt_groups", "body.max_occupancy": "max_occupancy",
                "body.reset_daily": "reset_daily", "path.aid": "id"}  # fmt: skip


_LABELS = {"name": "Name", "anti_passback": "Anti-passback", "timed_s": "Timed window",
           "exempt_groups": "Exempt groups", "max_occupancy": "Occupancy max", "reset_daily": "Nightly reset",
           "id": "Area id"}  # fmt: skip


def _number(text: str) -> int | float | str:
    """A number typed into the form, or the text as typed (the API names the field then)."""
    try:
        f = float(text)
    except ValueError:
        return text
    return int(f) if f.is_integer() else f


def _area_field(answer: inner.Answer) -> str:
    f = answer.field or ""
    return next((name for prefix, name in _AREA_FIELDS.items() if f.startswith(prefix)), "")


class RulesPages(Controller):
    path = "/rules"
    include_in_schema = False
    guards = [page_session]

    async def _page(self, request: Request[Any, Any, Any], *, status: int = 200, notice: str = "",
                    error: str = "", values: dict[str, Any] | None = None, errors: dict[str, str] | None = None,
                    editing: bool = False, reset: dict[str, str] | None = None) -> Response[str]:  # fmt: skip
        ctx = await page_context(request, "rules")
        a = await inner.call(request, "GET", "/api/v1/areas")
        g = await inner.call(request, "GET", "/api/v1/gateways")
        gateways = g.json() if g.ok else []
        doors: list[dict[str, Any]] = []
        interlocks: list[dict[str, Any]] = []
        for gw in gateways:
            il = await inner.call(request, "GET", f"/api/v1/gateways/{_api_id(gw['id'])}/interlocks")
            interlocks += [{"gateway": gw["id"], **x} for x in (il.json() if il.ok else [])]
            for d in gw.get("doors", []):
                door = str(d["door"])
                if not _IDENT.fullmatch(door):
                    continue
                r = await inner.call(request, "GET", f"/api/v1/gateways/{_api_id(gw['id'])}/doors/{door}/rules")
                if r.ok and r.json():
                    doors.append({"gateway": gw["id"], "door": door, **r.json()})
        gr = await inner.call(request, "GET", "/api/v1/groups")
        return render("rules.html", status, title="Areas & rules", areas=a.json() if a.ok else [], doors=doors,
                      interlocks=interlocks, groups=[x["id"] for x in gr.json()] if gr.ok else [], modes=MODES,
                      notice=notice, error=error, refused=None if a.ok else a.detail, editing=editing,
                      v=values or {"anti_passback": "none", "timed_s": 900, "exempt_groups": []},
                      errors=errors or {}, reset=reset or {}, **ctx)  # fmt: skip

    @get("/")
    async def rules(self, request: Request[Any, Any, Any]) -> Response[str]:
        """The areas, the doors' rules, the interlocks; the area and reset forms."""
        return await self._page(request)

    @get("/areas/{aid:str}")
    async def edit_area(self, request: Request[Any, Any, Any], aid: FromPath[str]) -> Response[str]:
        """The page with the area form filled in from the area."""
        a = await inner.call(request, "GET", f"/api/v1/areas/{_api_id(aid)}")
        if not a.ok:
            ctx = await page_context(request, "rules")
            return render("error.html", a.status, title="Area", detail=a.detail, **ctx)
        return await self._page(request, values=a.json(), editing=True)

    @post("/areas")
    async def save_area(self, request: Request[Any, Any, Any]) -> Response[str]:
        """Create or replace an area (PUT /api/v1/areas/{id})."""
        form = await request.form()
        aid = str(form.get("id") or "").strip()
        v: dict[str, Any] = {
            "id": aid, "name": str(form.get("name") or "").strip(),
            "anti_passback": str(form.get("anti_passback") or "none"),
            "timed_s": str(form.get("timed_s") or "").strip(),
            "exempt_groups": [str(x) for x in form.getall("exempt_groups", [])],
            "max_occupancy": str(form.get("max_occupancy") or "").strip(),
            "reset_daily": str(form.get("reset_daily") or "").strip(),
        }  # fmt: skip
        editing = form.get("editing") == "1"
        body: dict[str, Any] = {"name": v["name"], "anti_passback": v["anti_passback"],
                                "exempt_groups": v["exempt_groups"],
                                "max_occupancy": _number(v["max_occupancy"]) if v["max_occupancy"] else None,
                                "reset_daily": v["reset_daily"] or None}  # fmt: skip
        if v["timed_s"]:
            body["timed_s"] = _number(v["timed_s"])
        if not _IDENT.fullmatch(aid):  # the API's Ident, checked here only to build its path
            return await self._page(request, status=400, values=v, editing=editing,
                                    errors={"id": "Area id: 1-64 letters, digits or _.:@-"})  # fmt: skip
        a = await inner.call(request, "PUT", f"/api/v1/areas/{aid}", json=body, principal=principal_of(request))
        if not a.ok:
            f = _area_field(a)
            return await self._page(request, status=a.status, values=v, editing=editing,
                                    errors={f: f"{_LABELS[f]}: {a.detail}" if f else a.detail})  # fmt: skip
        return await self._page(request, notice=f"Area {aid} saved. The gateways get it with the next publish.")

    @post("/reset")
    async def reset(self, request: Request[Any, Any, Any]) -> Response[str]:
        """The anti-passback reset (POST /api/v1/areas/reset): a user, an area, or (neither) everyone."""
        form = await request.form()
        r = {"user": str(form.get("user") or "").strip(), "area": str(form.get("area") or "").strip()}
        body = {k: x or None for k, x in r.items()}
        a = await inner.call(request, "POST", "/api/v1/areas/reset", json=body, principal=principal_of(request))
        if not a.ok:
            return await self._page(request, status=a.status, error=f"Not reset: {a.detail}", reset=r)
        gws = a.json()["gateways"]
        who = f"user {r['user']}" if r["user"] else "everyone"
        where = f" in area {r['area']}" if r["area"] else ""
        answers = "; ".join(f"{g}: {x}" for g, x in sorted(gws.items())) or "no gateway to send it to"
        return await self._page(request, notice=f"Anti-passback reset for {who}{where}. {answers}")
