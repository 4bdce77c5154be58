"""The receptionist's visitors page (seed 004) and the reports page (seed 003), on the API in process.

Like every console page (pages.py): the login session, CSRF on each POST, everything read and changed by
calling /api/v1 (`inner.call`), so the Authorizer, validation, audit and the publish at sign-in/out are the
API's; the page only hides what the operator may not do.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from litestar import Controller, Request, Response, get, post
from litestar.params import FromPath, FromQuery

from . import inner
from .pages import _IDENT, page_context, page_session, render

REPORTS = {"requests": "Access requests", "person": "Access rights for a person",
           "reader": "Access rights for a reader"}  # fmt: skip
#: The access requests report shows this many rows a page (with the whole day's totals; the CSV has them all).
REPORT_PAGE = 100


def _published(answer: dict[str, Any]) -> str:
    pub = answer.get("published")
    if pub is None:
        return "Not sent: provisioning is not running (the gateways get it at the next publish)."
    if not pub:
        return "No gateway has a door of these groups."
    return "; ".join(f"{g}: version {v}" if isinstance(v, int) else f"{g}: {v}" for g, v in sorted(pub.items()))


class VisitorPages(Controller):
    path = "/"
    include_in_schema = False
    guards = [page_session]

    async def _visitors(self, request: Request[Any, Any, Any], location: str, *, status: int = 200, notice: str = "",
                        error: str = "", values: dict[str, Any] | None = None) -> Response[str]:  # fmt: skip
        ctx = await page_context(request, "visitors")
        b = await inner.call(request, "GET", "/api/v1/visitors/badges")
        badges = b.json() if b.ok else []
        locations = sorted({x["location"] for x in badges})
        if not location and locations:
            location = locations[0]
        v = await inner.call(request, "GET", "/api/v1/visitors/visits")
        g = await inner.call(request, "GET", "/api/v1/visitors/cardholder-groups")
        here = [x for x in badges if x["location"] == location]
        return render("visitors.html", status, title="Visitors", location=location, locations=locations,
                      free=[x for x in here if x["visit"] is None], in_use=[x for x in badges if x["visit"]],
                      visits=v.json() if v.ok else [], groups=g.json() if g.ok else [], notice=notice,
                      error=error, v=values or {"groups": []}, refused=None if b.ok else b.detail,
                      **ctx)  # fmt: skip

    @get("/visitors")
    async def visitors(self, request: Request[Any, Any, Any], location: FromQuery[str] = "") -> Response[str]:
        """Sign a visitor in (the location's free badges, cardholder groups), today's visits, badges in use."""
        return await self._visitors(request, location[:64])

    @post("/visitors/sign-in")
    async def sign_in(self, request: Request[Any, Any, Any]) -> Response[str]:
        form = await request.form()
        location = str(form.get("location") or "")[:64]
        values: dict[str, Any] = {"visitor": str(form.get("visitor") or "").strip(), "location": location,
                                  "badge": str(form.get("badge") or ""),
                                  "groups": [str(x) for x in form.getall("groups", [])]}  # fmt: skip
        badge: int | str = int(values["badge"]) if values["badge"].isdigit() else values["badge"]
        body = {"visitor": values["visitor"], "location": values["location"], "badge": badge,
                "groups": values["groups"]}  # fmt: skip
        ctx = await page_context(request, "visitors")
        a = await inner.call(request, "POST", "/api/v1/visitors/visits", json=body, principal=ctx["p"])
        if not a.ok:
            return await self._visitors(request, location, status=a.status, error=a.detail, values=values)
        r = a.json()
        visit = r["visit"]
        notice = (f"{visit['visitor']} is signed in with badge {visit['badge_name'] or visit['badge']} "
                  f"({visit['badge']}). {_published(r)}")  # fmt: skip
        return await self._visitors(request, location, notice=notice)

    @post("/visitors/{vid:int}/sign-out")
    async def sign_out(self, request: Request[Any, Any, Any], vid: FromPath[int]) -> Response[str]:
        ctx = await page_context(request, "visitors")
        form = await request.form()
        location = str(form.get("location") or "")[:64]
        a = await inner.call(request, "POST", f"/api/v1/visitors/visits/{vid}/sign-out", principal=ctx["p"])
        if not a.ok:
            return await self._visitors(request, location, status=a.status, error=a.detail)
        r = a.json()
        notice = f"{r['visit']['visitor']} is signed out: badge {r['visit']['badge']} revoked. {_published(r)}"
        return await self._visitors(request, location, notice=notice)

    # reports ---------------------------------------------------------------------------------------------

    @get("/reports")
    async def reports(self, request: Request[Any, Any, Any], *, kind: FromQuery[str] = "requests",
                      day: FromQuery[str] = "",
                      person: FromQuery[str] = "", reader: FromQuery[str] = "",
                      cursor: FromQuery[str] = "") -> Response[str]:  # fmt: skip
        """Seed 003's reports: the day's access requests (of a person, at a reader), `REPORT_PAGE` rows a page
        with the day's totals and per reader, and its CSV; access rights."""
        ctx = await page_context(request, "reports")
        kind = kind if kind in REPORTS else "requests"
        q = {"day": day[:10], "person": person[:64], "reader": reader[:130]}
        path, query = "/api/v1/reports/access-requests", {k: v for k, v in q.items() if v}
        error, report = "", None
        page = {"limit": REPORT_PAGE, "cursor": cursor[:200] or None}
        if kind == "person":
            path, query = f"/api/v1/reports/access-rights/person/{person}", {}
            if not _IDENT.fullmatch(person):
                path, error = "", "Choose a person (their id)." if not person else f"No person {person[:64]!r}."
        elif kind == "reader":
            gw, _, door = reader.partition("/")
            path, query = f"/api/v1/reports/access-rights/reader/{gw}/{door}", {}
            if not (_IDENT.fullmatch(gw) and _IDENT.fullmatch(door)):
                path, error = "", "Choose a reader as gateway/door, e.g. gw1/front."
        status = 200
        if path:
            a = await inner.call(request, "GET", path, query={**query, **page} if kind == "requests" else query)
            if a.ok:
                report = a.json()
            else:
                status, error = a.status, a.detail
        csv_url = f"{path}?{urlencode({**query, 'format': 'csv'})}" if report is not None else ""
        nxt = report.get("next_cursor") if kind == "requests" and report is not None else None
        next_url = f"/reports?{urlencode({'kind': kind, **query, 'cursor': nxt})}" if nxt else ""
        return render("reports.html", status, title="Reports", kinds=REPORTS, kind=kind, q=q, report=report,
                      error=error, csv_url=csv_url, next_url=next_url, first=not cursor, **ctx)  # fmt: skip
