"""The console's gateway detail page (/gateways/{id}): what the gateway announced in its birth (its doors and
readers, software, protocol, journal depth, TLS, warnings), online / last seen / rights versions from the
service's gateway status, the doors' live state, and the command key's status (the key the gateway verifies
with against the service's, a pending rotation: read only).

"Test connection" and "Refresh" are the API's signed `rebirth` command (gateway_api.py): the first shows the
gateway's answer and the round trip, the second also the birth it sent again. Like every page (pages.py) it
reads and acts only through `inner.call`; the buttons are shown only when the Authorizer would allow the
rebirth command on that gateway (`Authorizer.check_command`), and the API refuses it all the same.

Key rotation (key_rotation.py): the page shows the site's last rotation and each gateway's part in it
(acknowledged, moved, ...). An operator with update on the site key sees the step the rotation is at (start;
commit, or commit without the gateways that have not acknowledged; abort), each asking for the operator's
password: the page sends it to /api/v1/auth/reauth first, then the step to /api/v1/site-key/rotation.
"""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, Response, get, post
from litestar.params import FromPath

from cloud_bridge.permissions import Action, ObjectType, Target
from cloud_bridge.service.core import principal_of, state_of

from . import inner
from .pages import _api_id, page_context, page_session, render


class GatewayPages(Controller):
    path = "/gateways"
    include_in_schema = False
    guards = [page_session]

    async def _page(self, request: Request[Any, Any, Any], gw: str, *, status: int = 200,
                    result: dict[str, Any] | None = None) -> Response[str]:  # fmt: skip
        ctx = await page_context(request, "dashboard")
        gid = _api_id(gw)
        g = await inner.call(request, "GET", f"/api/v1/gateways/{gid}")
        if not g.ok:
            return render("error.html", g.status, title=f"Gateway {gw}", detail=g.detail, **ctx)
        link = await inner.call(request, "GET", f"/api/v1/gateways/{gid}/link")
        info = link.json() if link.ok else None
        if info is not None:  # a device's empty fields are left out of the birth
            for k in ("doors", "readers"):
                info[k] = [{"kind": "", "door": None, "name": "", **x} for x in info[k]]
        doors: list[dict[str, Any]] = []
        if ctx["can"].some("door", "read"):
            d = await inner.call(request, "GET", "/api/v1/doors")
            doors = [x for x in d.json() if x["gateway"] == gw] if d.ok else []
        p = ctx["p"]
        may_test = ctx["can"].authz.check_command(p.operator, "rebirth", gw).allowed
        st = state_of(request)
        key_target = Target(ObjectType.SITE_KEY, st.site.site if st.site else "*")
        may_rotate = ctx["can"].authz.check(p.operator, Action.UPDATE, key_target).allowed
        r = await inner.call(request, "GET", "/api/v1/site-key/rotation")
        rotation = r.json() if r.ok else None
        return render("gateway.html", status, title=f"Gateway {gw}", g=g.json(), link=info,
                      link_error=None if link.ok else link.detail, doors=doors, may_test=may_test, result=result,
                      rotation=rotation, may_rotate=may_rotate, **ctx)  # fmt: skip

    @get("/{gw:str}")
    async def gateway(self, request: Request[Any, Any, Any], gw: FromPath[str]) -> Response[str]:
        return await self._page(request, gw)

    @post("/{gw:str}/{action:str}")
    async def round_trip(self, request: Request[Any, Any, Any], gw: FromPath[str],
                         action: FromPath[str]) -> Response[str]:
        """Test connection / Refresh: the API's signed rebirth command; the page shows the gateway's answer.
        Key rotation: a step of it, after the operator's password (re-authentication)."""
        if action == "key-rotation":
            return await self._rotation_step(request, gw)
        if action not in ("test", "refresh"):
            return await self._page(request, gw, status=404, result={"what": action[:32], "ok": False,
                                                                      "detail": "no such action"})  # fmt: skip
        a = await inner.call(request, "POST", f"/api/v1/gateways/{_api_id(gw)}/{action}",
                             principal=principal_of(request))  # fmt: skip
        body = a.json() if a.ok else None
        test = (body["test"] if action == "refresh" else body) if body else None
        result = {"what": "Test connection" if action == "test" else "Refresh", "ok": bool(test and test["ok"]),
                  "test": test, "new_birth": bool(body and body.get("new_birth")),
                  "detail": None if a.ok else a.detail}  # fmt: skip
        return await self._page(request, gw, status=a.status, result=result)

    async def _rotation_step(self, request: Request[Any, Any, Any], gw: str) -> Response[str]:
        form = await request.form()
        step = str(form.get("step") or "")
        names = {"start": "Start key rotation", "commit": "Commit key rotation",
                 "force": "Commit key rotation without the gateways that have not acknowledged",
                 "abort": "Abort key rotation"}  # fmt: skip
        if step not in names:
            return await self._page(request, gw, status=400, result={
                "what": "Key rotation", "ok": False, "test": None, "detail": "no such step"})  # fmt: skip
        what = names[step]
        pr = principal_of(request)
        r = await inner.call(request, "POST", "/api/v1/auth/reauth", json={"password": str(form.get("password") or "")},
                             principal=pr)  # fmt: skip
        if not r.ok:
            why = "your password was not right" if r.status == 401 else r.detail
            return await self._page(request, gw, status=r.status, result={
                "what": what, "ok": False, "test": None, "detail": why})  # fmt: skip
        path = {"start": "", "commit": "/commit", "force": "/commit", "abort": "/abort"}[step]
        body = {"force": True} if step == "force" else {}
        a = await inner.call(request, "POST", f"/api/v1/site-key/rotation{path}", json=body, principal=pr)
        detail = None if a.ok else a.detail
        return await self._page(request, gw, status=a.status, result={"what": what, "ok": a.ok, "rotation": a.ok,
                                                                      "test": None, "detail": detail})  # fmt: skip
