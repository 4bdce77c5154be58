"""The CLI through the service layer: `cloud-bridge --service URL ...` or `cloud-bridge --config FILE ...`.

Either way a command is the request a client would send to /api/v1, answered by the service's own handlers
(the Authorizer, validation, one transaction per request, the audit entry):

* **remote**, `--service https://host:8443`: over HTTP, with the API token in `CLOUD_BRIDGE_TOKEN` (never on
  the command line, where `ps` would show it). The token's permission groups decide, as for any
  integration; operator changes are refused (they need a login session).
* **local**, `--config service.toml`: the service application in this process, on its database, as the
  *local administrator* (System Administrator, `via: local` in the audit log). Whoever can read the
  service's configuration and database owns the site anyway; this is the way in when no one can log in.
  Publishing needs the site passphrase (CLOUD_BRIDGE_PASSPHRASE or the config's `passphrase_file`).

    async with service_client(url="https://...", token=...) as api:     # or config=Path("service.toml")
        r = await api.post("/api/v1/users", json={...})
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx

from cloud_bridge.permissions import SYSTEM_ADMINISTRATOR, Operator

from .auth import Principal
from .errors import ServiceError

#: Who a local command acts as (the audit log's actor).
LOCAL_ADMIN = Principal(Operator(id="local administrator", name="local administrator",
                                 groups=[SYSTEM_ADMINISTRATOR.id]), "local")  # fmt: skip


@asynccontextmanager
async def service_client(*, url: str | None = None, token: str | None = None, config: Path | None = None,
                         timeout: float = 300.0) -> AsyncIterator[httpx.AsyncClient]:  # noqa: ASYNC109  # fmt: skip
    """An HTTP client on the service: remote (`url` + `token`) or local (`config`)."""
    if url is not None:
        if not token:
            raise ServiceError("--service needs an API token in CLOUD_BRIDGE_TOKEN")
        async with httpx.AsyncClient(base_url=url.rstrip("/"), timeout=timeout,
                                     headers={"authorization": f"Bearer {token}"}) as c:  # fmt: skip
            yield c
        return
    if config is None:
        raise ServiceError("give --service URL (with CLOUD_BRIDGE_TOKEN) or --config FILE")
    from .app import create_app
    from .config import load_config

    app = create_app(load_config(config))

    async def as_local_admin(scope: MutableMapping[str, Any], receive: Callable[[], Awaitable[Any]],
                             send: Callable[[Any], Awaitable[None]]) -> None:  # fmt: skip
        # set here, in this process, before the application sees the request: no HTTP request can
        # carry it (the guard `authenticated` accepts a principal only from the scope's own state)
        if scope["type"] == "http":
            scope["state"] = {**scope.get("state", {}), "principal": LOCAL_ADMIN}
        await app(scope, receive, send)  # type: ignore[arg-type]

    async with app.lifespan():
        transport = httpx.ASGITransport(app=as_local_admin, client=("local", 0))
        async with httpx.AsyncClient(transport=transport, base_url="http://local", timeout=timeout) as c:
            yield c


def detail(r: httpx.Response) -> str:
    """The API's refusal as one line: "403 forbidden: operator 'x' may not ..." (with the field if named)."""
    try:
        body: Any = r.json()
    except ValueError:
        return f"HTTP {r.status_code}"
    if not isinstance(body, dict):
        return f"HTTP {r.status_code}"
    where = f" ({body['field']})" if body.get("field") else ""
    return f"{r.status_code} {body.get('error', 'error')}: {body.get('detail', '')}{where}"
