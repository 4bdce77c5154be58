"""The ASGI application (`create_app`) and `serve` (uvicorn). See docs/operator.md, "The operator service".

At start the database is migrated to the newest schema, the site is read, and, when the site passphrase
is given (CLOUD_BRIDGE_PASSPHRASE or `passphrase_file`), provisioning starts: one `SiteLink` on the site's
broker, every downlink signed with the site key. Without the passphrase the API runs and publish answers 503.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import aiomqtt
import uvicorn
from litestar import Litestar, Router
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin, SwaggerRenderPlugin, YamlRenderPlugin

from . import key_rotation, site
from .alarms import AlarmController
from .api_auth import AuthController, TokenController
from .areas import CONTROLLERS as RULE_CONTROLLERS
from .auth import Passwords
from .config import ServiceConfig
from .core import ServiceState, audit_refusal, authenticated, handle_exception
from .database import Database
from .doors import DoorController, LockdownController
from .errors import ServiceError
from .events import EventController, collecting
from .gateway_api import GatewayLinkController
from .imports import ImportController
from .imports import recover as recover_imports
from .integrations import IdentityController
from .operators import OperatorController, PermissionGroupController, ReauthController
from .people import CardController, UserController
from .provisioning import Provisioner
from .reports import ReportController
from .schedules import ScheduleController
from .site_api import AuditController, GatewayController, GroupController, PublishController
from .sites import SiteController
from .timing import server_timing, tuned_gc
from .visitors import VisitorController
from .web import console_routers

log = logging.getLogger("cloud_bridge.service")
API_VERSION = "1"


def create_app(cfg: ServiceConfig, *, provisioning: bool = True) -> Litestar:
    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        db = Database(cfg.database.url)
        async with AsyncExitStack() as stack:
            stack.push_async_callback(db.close)
            await db.migrate()
            if n := await recover_imports(db):
                log.warning("%d import job(s) were cut off by the last stop: marked failed (interrupted)", n)
            info = await site.load(db)
            st = ServiceState(cfg=cfg, db=db, passwords=Passwords(cfg.auth), site=info)
            passphrase = cfg.passphrase()
            if provisioning and info is not None and passphrase:
                async with db.read() as c:
                    pem = await site.meta(c, "site_key")
                if pem is None:
                    raise ServiceError("the site has no signing key")
                key = site.decrypt_key(pem, passphrase)
                host, port = cfg.mqtt.host or info.host, cfg.mqtt.port or info.port
                # events: stored, acknowledged after the commit, streamed (events.py); it reconnects on its own
                await stack.enter_async_context(collecting(st, site=info.site, host=host, port=port, key=key))
                prov = Provisioner(db, site=info.site, host=host, port=port, key=key, resend_s=cfg.mqtt.resend_s)
                try:
                    st.provisioner = await stack.enter_async_context(prov)
                    key_rotation.attach(st)  # a gateway back from an outage catches up with a key rotation
                except aiomqtt.MqttError as e:  # the API still serves; publish answers 503 until a restart
                    log.error("provisioning is off: the broker %s:%d is not reachable (%s)", prov.host, prov.port, e)
            elif info is None:
                log.warning("the database holds no site yet: run `cloud-bridge serve --init`")
            else:
                log.warning("no site passphrase: provisioning is off (CLOUD_BRIDGE_PASSPHRASE or passphrase_file)")
            app.state.service = st
            stack.enter_context(tuned_gc())  # what start loaded is frozen: no full collection walks it mid-request
            yield

    api = Router(path="/", guards=[authenticated], route_handlers=[
        # one controller per line (helpers add theirs side by side)
        TokenController,
        UserController,
        CardController,
        GroupController,
        GatewayController,
        PublishController,
        AuditController,
        EventController,
        DoorController,
        LockdownController,
        AlarmController,
        ScheduleController,
        OperatorController,
        PermissionGroupController,
        ReauthController,
        ImportController,
        IdentityController,
        VisitorController,
        ReportController,
        *RULE_CONTROLLERS,
        GatewayLinkController,
        key_rotation.KeyRotationController,
        SiteController,
    ])  # fmt: skip
    return Litestar(
        route_handlers=[AuthController, api, *console_routers()],  # the console: pages beside the API
        lifespan=[lifespan],
        middleware=[server_timing],  # Server-Timing: app and gc time per response (timing.py)
        exception_handlers={Exception: handle_exception},
        after_exception=[audit_refusal],
        request_max_body_size=cfg.service.max_body_bytes,
        openapi_config=OpenAPIConfig(
            title="Edge access controller: operator service", version=f"{API_VERSION}.0.0",
            description="Every route under /api/v1 needs a login session (cookie + X-CSRF-Token on writes) or "
            "an API token (Authorization: Bearer cbt_...). A refusal is 403 naming the missing permission.",
            path="/schema", render_plugins=[JsonRenderPlugin(), YamlRenderPlugin(), SwaggerRenderPlugin()],
        ),
        logging_config=None,
        debug=False,
    )


async def init_site(cfg: ServiceConfig, *, site_id: str, admin: str, tz: str, host: str, port: int,
                    import_from: Path | None = None) -> str:  # fmt: skip
    """`cloud-bridge serve --init`: migrate, create (or import) the site; returns the setup link/code text."""
    db = Database(cfg.database.url)
    try:
        await db.migrate()
        if import_from is not None:
            from .importer import import_site_db

            await import_site_db(import_from, db)
            code = await site.setup_code_for(db, admin, hours=cfg.auth.setup_code_hours)
        else:
            passphrase = cfg.passphrase()
            if not passphrase:
                raise ServiceError("set CLOUD_BRIDGE_PASSPHRASE (or passphrase_file): it encrypts the site key")
            code = await site.create(db, site=site_id, admin=admin, passphrase=passphrase, host=host, port=port,
                                     tz=tz, setup_hours=cfg.auth.setup_code_hours)  # fmt: skip
    finally:
        await db.close()
    base = cfg.service.public_url.rstrip("/") or f"http://{cfg.service.listen}:{cfg.service.port}"
    return f"{base}/setup#{code}"


def serve(cfg: ServiceConfig) -> None:
    """Run the service until stopped (SIGINT/SIGTERM)."""
    config = uvicorn.Config(create_app(cfg), host=cfg.service.listen, port=cfg.service.port, log_level="info",
                            access_log=False, lifespan="on", server_header=False,
                            timeout_graceful_shutdown=5)  # an open dashboard stream never holds a stop  # fmt: skip
    asyncio.run(uvicorn.Server(config).serve())
