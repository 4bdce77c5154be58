"""The console's gateway detail page (/gateways/{id}): what the gateway announced in its birth (its doors and
readers, software, protocol, journal depth, TLS, warnings), online / last seen / rights versions from the
service's gateway status, the doors' live state, and the command key's status (the key the gateway verifies
with against the service's, a pending rotation: read only).

"Test connection" and "Refresh" are the API's signed `rebirth` command (gateway_api.py): the first shows the
gateway's answer and the round trip, the second also the birth it sent again. Like every page (pages.py) it
reads and acts only through `inner.call`; the buttons are shown only when the Authorizer would allow the
rebirth command on that gateway (`Authorizer.check_command`), and the API refuses it all the same.
"""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, Response, get, post

from cloud_bridge.service.core import principal_of

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
        return render("gateway.html", status, title=f"Gateway {gw}", g=g.json(), link=info,
                      link_error=None if link.ok else link.detail, doors=doors, may_test=may_test, result=result,
                      **ctx)  # fmt: skip

    @get("/{gw:str}")
    async def gateway(self, request: Request[Any, Any, Any], gw: str) -> Response[str]:
        return await self._page(request, gw)

    @post("/{gw:str}/{action:str}")
    async def round_trip(self, request: Request[Any, Any, Any], gw: str, action: str) -> Response[str]:
        """Test connection / Refresh: the API's signed rebirth command; the page shows the gateway's answer."""
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
