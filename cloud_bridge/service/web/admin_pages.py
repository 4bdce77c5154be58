"""The console's administration pages: schedules (weekly editor, holidays), a person's cards, assignments
with windows and effective access (and delete), the bulk import wizard, operators, permission groups (the
grant/deny line editor), API tokens and the audit log.

Like every page (pages.py), these read and change things only through the service's own /api/v1
(`inner.call`), so the Authorizer, validation and audit are the API's; a page only hides what the operator
may not do. Operator and permission-group changes ask for the operator's password on the form: the page
sends it to /api/v1/auth/reauth first (the API's re-authentication window), then the change.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

from litestar import Controller, Request, Response, get, post
from litestar.datastructures import UploadFile
from litestar.params import FromPath, FromQuery

from cloud_bridge.permissions import Action, ObjectType
from cloud_bridge.service.core import principal_of, state_of
from cloud_bridge.service.imports import MAX_UPLOAD_BYTES
from cloud_bridge.service.schedules import DAYS

from . import inner
from .pages import _IDENT, _api_id, _htmx_fragment, _see_other, page_context, page_session, render

FIELDS = (("id", "User id"), ("card", "Card ID"), ("name", "Name"), ("groups", "Groups (;-separated)"),
          ("active", "Active (yes/no)"), ("offline_access", "Offline access (yes/no)"))  # fmt: skip
OBJECT_TYPES = [t.value for t in ObjectType]
ACTIONS = [a.value for a in Action]
BLANK_LINES = 3
_FIELD_INDEX = re.compile(r"\[(\d+)\]")


def _index(field: str | None, prefix: str) -> int | None:
    """The list index in an API field path ("body.intervals[3].end" -> 3 for prefix "body.intervals")."""
    if not field or not field.startswith(prefix):
        return None
    m = _FIELD_INDEX.search(field[len(prefix) :])
    return int(m.group(1)) if m else None


def _local(ts: float | None, tz: str) -> str:
    """A UTC instant as the value of a datetime-local input in the site's zone."""
    return "" if ts is None else datetime.fromtimestamp(ts, ZoneInfo(tz)).strftime("%Y-%m-%dT%H:%M")


def _utc(text: str, tz: str) -> float | None:
    """A datetime-local input's value (site time) as UTC seconds; None when empty; ValueError when bad."""
    text = text.strip()
    if not text:
        return None
    return datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(tz)).astimezone(UTC).timestamp()


async def _reauth(request: Request[Any, Any, Any], password: str) -> inner.Answer:
    return await inner.call(request, "POST", "/api/v1/auth/reauth", json={"password": password},
                            principal=principal_of(request))  # fmt: skip


class AdminPages(Controller):
    path = "/"
    include_in_schema = False
    guards = [page_session]

    # schedules ------------------------------------------------------------------------------------------

    @get("/schedules")
    async def schedules(self, request: Request[Any, Any, Any], notice: FromQuery[str] = "") -> Response[str]:
        ctx = await page_context(request, "schedules")
        a = await inner.call(request, "GET", "/api/v1/schedules")
        return render("schedules.html", title="Schedules", schedules=a.json() if a.ok else [], days=DAYS,
                      notice=notice[:100], refused=None if a.ok else a.detail, **ctx)  # fmt: skip

    @get("/schedules/new")
    async def new_schedule(self, request: Request[Any, Any, Any]) -> Response[str]:
        ctx = await page_context(request, "schedules")
        return self._schedule_form(ctx, new=True, v={"id": "", "name": "", "week": [""] * 7, "holidays": "",
                                                     "holiday_intervals": "", "tz": ""})  # fmt: skip

    @get("/schedules/{sid:str}")
    async def schedule(self, request: Request[Any, Any, Any], sid: FromPath[str]) -> Response[str]:
        ctx = await page_context(request, "schedules")
        a = await inner.call(request, "GET", f"/api/v1/schedules/{_api_id(sid)}")
        if not a.ok:
            return render("error.html", a.status, title="Schedule", detail=a.detail, **ctx)
        s = a.json()
        week = [", ".join(f"{i['start']}-{i['end']}" for i in s["intervals"] if i["day"] == d) for d in range(7)]
        v = {"id": s["id"], "name": s["name"], "week": week, "holidays": "\n".join(s["holidays"]),
             "holiday_intervals": ", ".join(f"{r['start']}-{r['end']}" for r in s["holiday_intervals"]),
             "tz": s["tz"] or "", "groups": s["groups"]}  # fmt: skip
        return self._schedule_form(ctx, new=False, v=v)

    @post("/schedules")
    async def save_schedule(self, request: Request[Any, Any, Any]) -> Response[str]:
        """The weekly editor: one line a day ("08:00-12:00, 13:00-18:00"), holidays one date a line."""
        ctx = await page_context(request, "schedules")
        form = await request.form()
        sid = str(form.get("id") or "").strip()
        new = form.get("new") == "1"
        v: dict[str, Any] = {"id": sid, "name": str(form.get("name") or ""), "tz": str(form.get("tz") or "").strip(),
                             "week": [str(form.get(f"day{d}") or "") for d in range(7)],
                             "holidays": str(form.get("holidays") or ""),
                             "holiday_intervals": str(form.get("holiday_intervals") or "")}  # fmt: skip
        intervals, day_of = [], []
        for d, text in enumerate(v["week"]):
            for part in (x.strip() for x in text.split(",")):
                if part:
                    start, _, end = part.partition("-")
                    intervals.append({"day": d, "start": start.strip(), "end": end.strip()})
                    day_of.append(d)
        ranges = []
        for part in (x.strip() for x in v["holiday_intervals"].split(",")):
            if part:
                start, _, end = part.partition("-")
                ranges.append({"start": start.strip(), "end": end.strip()})
        body = {"name": v["name"], "intervals": intervals, "holiday_intervals": ranges, "tz": v["tz"] or None,
                "holidays": [ln.strip() for ln in v["holidays"].splitlines() if ln.strip()]}  # fmt: skip
        if not _IDENT.fullmatch(sid):
            return self._schedule_form(ctx, new=new, v=v, status=400,
                                       errors={"id": "a schedule id is 1-64 letters, digits or _.:@-"})  # fmt: skip
        a = await inner.call(request, "PUT", f"/api/v1/schedules/{sid}", json=body, principal=principal_of(request))
        if a.ok:
            return _see_other(f"/schedules?notice={'added' if new else 'saved'}")
        f = a.field or ""
        key = "name"
        if (i := _index(f, "body.intervals")) is not None and i < len(day_of):
            key = f"day{day_of[i]}"
        elif f.startswith("body.holiday_intervals"):
            key = "holiday_intervals"
        elif f.startswith("body.holidays"):
            key = "holidays"
        elif f.startswith("body.tz"):
            key = "tz"
        elif f.startswith("path"):
            key = "id"
        return self._schedule_form(ctx, new=new, v=v, status=a.status, errors={key: a.detail})

    @post("/schedules/{sid:str}/delete")
    async def delete_schedule(self, request: Request[Any, Any, Any], sid: FromPath[str]) -> Response[str]:
        a = await inner.call(request, "DELETE", f"/api/v1/schedules/{_api_id(sid)}", principal=principal_of(request))
        if a.ok:
            return _see_other("/schedules?notice=deleted")
        ctx = await page_context(request, "schedules")
        return render("error.html", a.status, title="Schedule", detail=a.detail, **ctx)

    def _schedule_form(self, ctx: dict[str, Any], *, new: bool, v: dict[str, Any], status: int = 200,
                       errors: dict[str, str] | None = None) -> Response[str]:  # fmt: skip
        return render("schedule_form.html", status, title="Add a schedule" if new else f"Schedule {v['id']}",
                      new=new, v=v, days=DAYS, errors=errors or {}, **ctx)  # fmt: skip

    # a person's cards, assignments and effective access ------------------------------------------------

    @get("/people/{uid:str}/access")
    async def person_access(self, request: Request[Any, Any, Any], uid: FromPath[str],
                            notice: FromQuery[str] = "") -> Response[str]:
        ctx = await page_context(request, "people")
        return await self._access(request, ctx, _api_id(uid), notice=notice[:100])

    async def _access(self, request: Request[Any, Any, Any], ctx: dict[str, Any], uid: str, *, notice: str = "",
                      error: str | None = None, status: int = 200) -> Response[str]:  # fmt: skip
        u = await inner.call(request, "GET", f"/api/v1/users/{uid}")
        if not u.ok:
            return render("error.html", u.status, title="Person", detail=u.detail, **ctx)
        asg = await inner.call(request, "GET", f"/api/v1/users/{uid}/assignments")
        acc = await inner.call(request, "GET", f"/api/v1/users/{uid}/access")
        grp = await inner.call(request, "GET", "/api/v1/groups")
        return render("person_access.html", status, title=f"Access of {uid}", u=u.json(),
                      assignments=asg.json() if asg.ok else [], access=acc.json() if acc.ok else None,
                      groups=grp.json() if grp.ok else [], notice=notice, error=error, local=_local,
                      **ctx)  # fmt: skip

    @post("/people/{uid:str}/assignments")
    async def add_assignment(self, request: Request[Any, Any, Any], uid: FromPath[str]) -> Response[str]:
        ctx = await page_context(request, "people")
        uid = _api_id(uid)
        form = await request.form()
        tz = ctx["tz"]
        try:
            frm, until = _utc(str(form.get("valid_from") or ""), tz), _utc(str(form.get("valid_until") or ""), tz)
        except ValueError:
            return await self._access(request, ctx, uid, error="From and until are dates and times "
                                      "(YYYY-MM-DDTHH:MM).", status=400)  # fmt: skip
        body = {"group": str(form.get("group") or ""), "valid_from": frm, "valid_until": until}
        a = await inner.call(request, "POST", f"/api/v1/users/{uid}/assignments", json=body,
                             principal=principal_of(request))  # fmt: skip
        if a.ok:
            return _see_other(f"/people/{uid}/access?notice=assigned")
        return await self._access(request, ctx, uid, error=a.detail, status=a.status)

    @post("/people/{uid:str}/assignments/{aid:int}/delete")
    async def delete_assignment(self, request: Request[Any, Any, Any], uid: FromPath[str],
                                aid: FromPath[int]) -> Response[str]:
        ctx = await page_context(request, "people")
        uid = _api_id(uid)
        a = await inner.call(request, "DELETE", f"/api/v1/users/{uid}/assignments/{aid}",
                             principal=principal_of(request))  # fmt: skip
        if a.ok:
            return _see_other(f"/people/{uid}/access?notice=unassigned")
        return await self._access(request, ctx, uid, error=a.detail, status=a.status)

    @get("/people/{uid:str}/delete")
    async def confirm_delete(self, request: Request[Any, Any, Any], uid: FromPath[str]) -> Response[str]:
        ctx = await page_context(request, "people")
        u = await inner.call(request, "GET", f"/api/v1/users/{_api_id(uid)}")
        if not u.ok:
            return render("error.html", u.status, title="Person", detail=u.detail, **ctx)
        return render("person_delete.html", title=f"Delete {uid}?", u=u.json(), **ctx)

    @post("/people/{uid:str}/delete")
    async def delete_person(self, request: Request[Any, Any, Any], uid: FromPath[str]) -> Response[str]:
        a = await inner.call(request, "DELETE", f"/api/v1/users/{_api_id(uid)}", principal=principal_of(request))
        if a.ok:
            return _see_other("/people?notice=deleted")
        ctx = await page_context(request, "people")
        return render("error.html", a.status, title="Person", detail=a.detail, **ctx)

    # bulk import ------------------------------------------------------------------------------------------

    @get("/import")
    async def import_page(self, request: Request[Any, Any, Any]) -> Response[str]:
        ctx = await page_context(request, "import")
        return render("import_upload.html", title="Bulk import", error=None, **ctx)

    @post("/import", request_max_body_size=MAX_UPLOAD_BYTES)
    async def upload(self, request: Request[Any, Any, Any]) -> Response[str]:
        ctx = await page_context(request, "import")
        form = await request.form()
        f = form.get("file")
        if not isinstance(f, UploadFile):
            return render("import_upload.html", 400, title="Bulk import", error="Choose a CSV file.", **ctx)
        data = await f.read()
        a = await inner.call(request, "POST", "/api/v1/imports", content=data, content_type="text/csv",
                             query={"filename": (f.filename or "upload.csv")[:256],
                                    "encoding": str(form.get("encoding") or "utf-8")[:32]},
                             principal=principal_of(request))  # fmt: skip
        if not a.ok:
            return render("import_upload.html", a.status, title="Bulk import", error=a.detail, **ctx)
        return _see_other(f"/import/{a.json()['id']}")

    @get("/import/{jid:str}")
    async def import_job(self, request: Request[Any, Any, Any], jid: FromPath[str]) -> Response[str]:
        ctx = await page_context(request, "import")
        a = await inner.call(request, "GET", f"/api/v1/imports/{_api_id(jid)}")
        if not a.ok:
            return render("error.html", a.status, title="Bulk import", detail=a.detail, **ctx)
        job = a.json()
        if _htmx_fragment(request):
            return render("_import_status.html", job=job, **ctx)
        g = await inner.call(request, "GET", "/api/v1/groups")
        return render("import_job.html", title=f"Bulk import: {job['filename']}", job=job, fields=FIELDS,
                      groups=g.json() if g.ok else [], error=None, **ctx)  # fmt: skip

    @post("/import/{jid:str}/dry-run")
    async def import_dry_run(self, request: Request[Any, Any, Any], jid: FromPath[str]) -> Response[str]:
        form = await request.form()
        columns = {f: str(form.get(f"map_{f}")) for f, _ in FIELDS if form.get(f"map_{f}")}
        defaults = {"groups": [str(g) for g in form.getall("groups", [])], "active": form.get("active") == "on",
                    "offline_access": form.get("offline_access") == "on"}  # fmt: skip
        jid = _api_id(jid)
        a = await inner.call(request, "POST", f"/api/v1/imports/{jid}/dry-run", principal=principal_of(request),
                             json={"columns": columns, "defaults": defaults})  # fmt: skip
        if a.ok:
            return _see_other(f"/import/{jid}")
        return await self._job_error(request, jid, a)

    @post("/import/{jid:str}/commit")
    async def import_commit(self, request: Request[Any, Any, Any], jid: FromPath[str]) -> Response[str]:
        form = await request.form()
        jid = _api_id(jid)
        a = await inner.call(request, "POST", f"/api/v1/imports/{jid}/commit",
                             json={"publish": form.get("publish") == "on", "timeout": 60},
                             principal=principal_of(request))  # fmt: skip
        if a.ok:
            return _see_other(f"/import/{jid}")
        return await self._job_error(request, jid, a)

    async def _job_error(self, request: Request[Any, Any, Any], jid: str, a: inner.Answer) -> Response[str]:
        ctx = await page_context(request, "import")
        j = await inner.call(request, "GET", f"/api/v1/imports/{jid}")
        if not j.ok:
            return render("error.html", j.status, title="Bulk import", detail=j.detail, **ctx)
        g = await inner.call(request, "GET", "/api/v1/groups")
        return render("import_job.html", a.status, title="Bulk import", job=j.json(), fields=FIELDS,
                      groups=g.json() if g.ok else [], error=a.detail, **ctx)  # fmt: skip

    # operators and permission groups ---------------------------------------------------------------------

    @get("/operators")
    async def operators(self, request: Request[Any, Any, Any], notice: FromQuery[str] = "") -> Response[str]:
        ctx = await page_context(request, "operators")
        a = await inner.call(request, "GET", "/api/v1/operators")
        return render("operators.html", title="Operators", operators=a.json() if a.ok else [],
                      refused=None if a.ok else a.detail, notice=notice[:100], **ctx)  # fmt: skip

    @get("/operators/new")
    async def new_operator(self, request: Request[Any, Any, Any]) -> Response[str]:
        ctx = await page_context(request, "operators")
        return await self._operator_form(request, ctx, new=True, v={"id": "", "name": "", "groups": [],
                                                                    "active": True})  # fmt: skip

    @get("/operators/{oid:str}")
    async def operator(self, request: Request[Any, Any, Any], oid: FromPath[str]) -> Response[str]:
        ctx = await page_context(request, "operators")
        a = await inner.call(request, "GET", f"/api/v1/operators/{_api_id(oid)}")
        if not a.ok:
            return render("error.html", a.status, title="Operator", detail=a.detail, **ctx)
        return await self._operator_form(request, ctx, new=False, v=a.json())

    @post("/operators")
    async def save_operator(self, request: Request[Any, Any, Any]) -> Response[str]:
        """Create or change an operator; the form carries the operator's own password (re-authentication)."""
        ctx = await page_context(request, "operators")
        form = await request.form()
        new = form.get("new") == "1"
        v = {"id": str(form.get("id") or "").strip(), "name": str(form.get("name") or ""),
             "groups": [str(g) for g in form.getall("groups", [])], "active": form.get("active") == "on"}  # fmt: skip
        if not _IDENT.fullmatch(str(v["id"])):
            return await self._operator_form(request, ctx, new=new, v=v, status=400,
                                             error="An operator id is 1-64 letters, digits or _.:@-")  # fmt: skip
        r = await _reauth(request, str(form.get("password") or ""))
        if not r.ok:
            return await self._operator_form(request, ctx, new=new, v=v, status=r.status,
                                             error="Your password was not right.")  # fmt: skip
        body = {k: v[k] for k in ("name", "groups", "active")}
        a = await inner.call(request, "PUT", f"/api/v1/operators/{v['id']}", json=body,
                             principal=principal_of(request))  # fmt: skip
        if not a.ok:
            return await self._operator_form(request, ctx, new=new, v=v, status=a.status, error=a.detail)
        out = a.json()
        if out.get("setup_code"):
            return render("operator_created.html", title=f"Operator {out['id']}", o=out,
                          link=f"{_base(request)}/setup#{out['setup_code']}", **ctx)  # fmt: skip
        return _see_other("/operators?notice=saved")

    async def _operator_form(self, request: Request[Any, Any, Any], ctx: dict[str, Any], *, new: bool,
                             v: dict[str, Any], status: int = 200,
                             error: str | None = None) -> Response[str]:  # fmt: skip
        g = await inner.call(request, "GET", "/api/v1/permission-groups")
        return render("operator_form.html", status, title="Add an operator" if new else f"Operator {v['id']}",
                      new=new, v=v, groups=g.json() if g.ok else [], error=error, **ctx)  # fmt: skip

    @get("/permission-groups")
    async def permission_groups(self, request: Request[Any, Any, Any], notice: FromQuery[str] = "") -> Response[str]:
        ctx = await page_context(request, "permission-groups")
        a = await inner.call(request, "GET", "/api/v1/permission-groups")
        return render("permission_groups.html", title="Permission groups", groups=a.json() if a.ok else [],
                      refused=None if a.ok else a.detail, notice=notice[:100], **ctx)  # fmt: skip

    @get("/permission-groups/new")
    async def new_permission_group(self, request: Request[Any, Any, Any]) -> Response[str]:
        ctx = await page_context(request, "permission-groups")
        return self._pg_form(ctx, new=True, v={"id": "", "name": "", "description": "", "permissions": []})

    @get("/permission-groups/{gid:str}")
    async def permission_group(self, request: Request[Any, Any, Any], gid: FromPath[str]) -> Response[str]:
        ctx = await page_context(request, "permission-groups")
        a = await inner.call(request, "GET", f"/api/v1/permission-groups/{_api_id(gid)}")
        if not a.ok:
            return render("error.html", a.status, title="Permission group", detail=a.detail, **ctx)
        return self._pg_form(ctx, new=False, v=a.json())

    @post("/permission-groups")
    async def save_permission_group(self, request: Request[Any, Any, Any]) -> Response[str]:
        """The grant/deny line editor: each line an object type, actions, grant or deny, tags, applies-to
        and event kinds (comma-separated); a line with no actions, or marked remove, is dropped."""
        ctx = await page_context(request, "permission-groups")
        form = await request.form()
        new = form.get("new") == "1"
        lines: list[dict[str, Any]] = []
        n = int(str(form.get("lines") or "0")) if str(form.get("lines") or "0").isdigit() else 0
        for i in range(min(n, 500)):
            acts = [str(x) for x in form.getall(f"act{i}", [])]
            if form.get(f"remove{i}") == "on" or not acts:
                continue
            line: dict[str, Any] = {"object_type": str(form.get(f"type{i}") or ""), "actions": acts,
                                    "effect": str(form.get(f"effect{i}") or "grant")}  # fmt: skip
            for key in ("tags", "applies_to", "event_types"):
                vals = [x.strip() for x in str(form.get(f"{key}{i}") or "").split(",") if x.strip()]
                if vals:
                    line[key] = vals
            lines.append(line)
        v = {"id": str(form.get("id") or "").strip(), "name": str(form.get("name") or ""),
             "description": str(form.get("description") or ""), "permissions": lines}  # fmt: skip
        if not _IDENT.fullmatch(str(v["id"])):
            return self._pg_form(ctx, new=new, v=v, status=400, error="A group id is 1-64 letters, digits or _.:@-")
        r = await _reauth(request, str(form.get("password") or ""))
        if not r.ok:
            return self._pg_form(ctx, new=new, v=v, status=r.status, error="Your password was not right.")
        body = {k: v[k] for k in ("name", "description", "permissions")}
        a = await inner.call(request, "PUT", f"/api/v1/permission-groups/{v['id']}", json=body,
                             principal=principal_of(request))  # fmt: skip
        if a.ok:
            return _see_other(f"/permission-groups?notice={'added' if new else 'saved'}")
        bad = _index(a.field, "body.permissions")
        where = f"Line {bad + 1}: " if bad is not None else ""
        return self._pg_form(ctx, new=new, v=v, status=a.status, error=where + a.detail)

    def _pg_form(self, ctx: dict[str, Any], *, new: bool, v: dict[str, Any], status: int = 200,
                 error: str | None = None) -> Response[str]:  # fmt: skip
        lines = list(v["permissions"]) + [{"object_type": "", "actions": [], "effect": "grant"}] * BLANK_LINES
        return render("permission_group_form.html", status, title="Add a permission group" if new else
                      f"Permission group {v['id']}", new=new, v=v, lines=lines, types=OBJECT_TYPES,
                      actions=ACTIONS, error=error, **ctx)  # fmt: skip

    # API tokens --------------------------------------------------------------------------------------------

    @get("/tokens")
    async def tokens(self, request: Request[Any, Any, Any]) -> Response[str]:
        ctx = await page_context(request, "tokens")
        return await self._tokens(request, ctx)

    async def _tokens(self, request: Request[Any, Any, Any], ctx: dict[str, Any], *, created: Any = None,
                      error: str | None = None, status: int = 200) -> Response[str]:  # fmt: skip
        a = await inner.call(request, "GET", "/api/v1/tokens")
        return render("tokens.html", status, title="API tokens", tokens=a.json() if a.ok else [], created=created,
                      error=error, **ctx)  # fmt: skip

    @post("/tokens")
    async def create_token(self, request: Request[Any, Any, Any]) -> Response[str]:
        """A new token, shown once on the page that answers this form."""
        ctx = await page_context(request, "tokens")
        form = await request.form()
        try:
            days = float(str(form.get("expires_days") or "90"))
        except ValueError:
            days = -1.0
        body = {"name": str(form.get("name") or ""), "groups": [str(g) for g in form.getall("groups", [])],
                "expires_days": days}  # fmt: skip
        a = await inner.call(request, "POST", "/api/v1/tokens", json=body, principal=principal_of(request))
        if not a.ok:
            return await self._tokens(request, ctx, error=a.detail, status=a.status)
        return await self._tokens(request, ctx, created=a.json(), status=201)

    @post("/tokens/{tid:str}/revoke")
    async def revoke_token(self, request: Request[Any, Any, Any], tid: FromPath[str]) -> Response[str]:
        ctx = await page_context(request, "tokens")
        a = await inner.call(request, "DELETE", f"/api/v1/tokens/{_api_id(tid)}", principal=principal_of(request))
        return await self._tokens(request, ctx, error=None if a.ok else a.detail, status=200 if a.ok else a.status)

    # the audit log ---------------------------------------------------------------------------------------

    @get("/audit")
    async def audit(self, request: Request[Any, Any, Any], *, actor: FromQuery[str] = "", action: FromQuery[str] = "",
                    object_type: FromQuery[str] = "", object_id: FromQuery[str] = "", outcome: FromQuery[str] = "",
                    cursor: FromQuery[int | None] = None) -> Response[str]:  # fmt: skip
        ctx = await page_context(request, "audit")
        filters = {k: v[:128] for k, v in (("actor", actor), ("action", action), ("object_type", object_type),
                                           ("object_id", object_id), ("outcome", outcome)) if v}  # fmt: skip
        a = await inner.call(request, "GET", "/api/v1/audit", query={**filters, "cursor": cursor, "limit": 50})
        page = a.json() if a.ok else {"items": [], "next_cursor": None}
        return render("audit.html", title="Audit log", items=page["items"], next_cursor=page["next_cursor"],
                      f=filters, qs=urlencode(filters), refused=None if a.ok else a.detail, **ctx)  # fmt: skip


def _base(request: Request[Any, Any, Any]) -> str:
    st = state_of(request)
    return st.cfg.service.public_url.rstrip("/") or f"{request.url.scheme}://{request.url.netloc}"
