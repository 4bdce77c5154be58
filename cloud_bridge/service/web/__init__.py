"""The web console (issue 15): pages served by `cloud-bridge serve` beside /api/v1, under its authorisation."""

from litestar import Router

from . import pages
from .visitor_pages import VisitorPages


def console_routers() -> list[Router]:
    """Every page controller of the console, with its static assets."""
    return pages.console_routers(VisitorPages)


__all__ = ["console_routers"]
