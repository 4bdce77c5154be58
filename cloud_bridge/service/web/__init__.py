"""The web console (issue 15): pages served by `cloud-bridge serve` beside /api/v1, under its authorisation."""

from litestar import Router

from .admin_pages import AdminPages
from .gateway_pages import GatewayPages
from .live_pages import live_router
from .pages import console_routers as _pages
from .rules_pages import RulesPages
from .session_pages import SessionPages
from .visitor_pages import VisitorPages


def console_routers() -> list[Router]:
    """The console's routes, to register beside the API (app.py): pages.py's (with the administration,
    visitor, gateway and rules pages, which build on its helpers) and live_pages.py's."""
    return [*_pages([AdminPages, VisitorPages, GatewayPages, RulesPages, SessionPages]), live_router()]


__all__ = ["console_routers"]
