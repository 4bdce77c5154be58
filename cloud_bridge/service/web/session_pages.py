"""The warning before a console session ends (the idle timeout `auth.session_idle_minutes`, or the absolute
`auth.session_hours`): `static/session.js` asks `GET /panels/session` how long the session has left (a
polled route: asking does not keep the session alive, pages.page_session) and, `warn_s` before the end,
shows a dialog "your session ends in N s" with "Stay signed in". That button is `POST /session/extend`: a
request of the session's user with its CSRF token (X-CSRF-Token), so it counts as use and moves the idle
timeout on (never past the absolute limit: `extendable` says whether it still can). When the time is up
the script goes to the login page, which brings the operator back to the page they were on.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
from litestar import Controller, Request, get, post
from sqlalchemy import select

from cloud_bridge.service import schema
from cloud_bridge.service.core import principal_of, state_of

from .pages import page_session

#: The warning comes this long before the end, at most (a third of the idle timeout when that is short).
WARN_S = 60.0


class SessionLeft(msgspec.Struct, kw_only=True):
    #: Seconds until the session ends if it is not used (0: ended).
    remaining: float
    #: Show the warning this many seconds before the end.
    warn_s: float
    #: Whether using the session still moves its end on (False: it ends at its absolute limit).
    extendable: bool


async def _left(request: Request[Any, Any, Any]) -> SessionLeft:
    p, st = principal_of(request), state_of(request)
    a, s = st.cfg.auth, schema.sessions
    async with st.db.read() as c:
        row = (await c.execute(select(s.c.created, s.c.expires).where(s.c.id_hash == p.session_hash))).one_or_none()
    now = time.time()
    idle_s = a.session_idle_minutes * 60
    if row is None:
        return SessionLeft(remaining=0.0, warn_s=0.0, extendable=False)
    limit = float(row.created) + a.session_hours * 3600
    return SessionLeft(remaining=round(max(0.0, float(row.expires) - now), 1), warn_s=min(WARN_S, idle_s / 3),
                       extendable=float(row.expires) < limit - 1.0)  # fmt: skip


class SessionPages(Controller):
    path = "/"
    include_in_schema = False
    guards = [page_session]

    @get("/panels/session")
    async def left(self, request: Request[Any, Any, Any]) -> SessionLeft:
        """How long this session has left (asking is not use: it does not move the end on)."""
        return await _left(request)

    @post("/session/extend", status_code=200)
    async def extend(self, request: Request[Any, Any, Any]) -> SessionLeft:
        """Stay signed in: this request is the session's use (page_session touched it, CSRF checked)."""
        return await _left(request)
