"""The service's exception root (one per package): every refusal it raises derives from `ServiceError`."""

from __future__ import annotations

from cloud_bridge.errors import CloudBridgeError


class ServiceError(CloudBridgeError):
    """The operator service refused a request or could not start. The message says why."""


class BadRequest(ServiceError):
    """The request is malformed: `field` names where ("body.card", "query.cursor")."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class NotFound(ServiceError):
    pass


class Conflict(ServiceError):
    pass


class Unauthorized(ServiceError):
    """Not logged in, or the credentials are wrong: deliberately without detail."""
