"""The web console (issue 15): pages served by `cloud-bridge serve` beside /api/v1, under its authorisation."""

from litestar import Router

from . import pages
from .admin_pages import AdminPages


def console_routers() -> list[Router]:
    """Every page of the console (pages.py, admin_pages.py) and its static assets."""
    return pages.console_routers([AdminPages])


__all__ = ["console_routers"]
