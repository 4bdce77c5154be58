"""The web console (issue 15): pages served by `cloud-bridge serve` beside /api/v1, under its authorisation."""

from .pages import console_routers

__all__ = ["console_routers"]
