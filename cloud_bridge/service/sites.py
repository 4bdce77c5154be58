"""/api/v1/sites: the site this service runs (one site per database), its settings and its gateways.

    GET /api/v1/sites           -> [the site]
    GET /api/v1/sites/{site}    -> the site (404 for any other name)

Both need `gateway read` (the site's settings are those the identity export reads, like
`/integrations/identity/settings`); the gateway counts are of the gateways the operator may read.
"""

from __future__ import annotations

import contextlib
from typing import Any

import msgspec
from litestar import Controller, Request, get
from litestar.params import FromPath
from sqlalchemy import select

from cloud_bridge.permissions import Action, ObjectType, Target
from cloud_bridge.signing import fingerprint, public_bytes

from . import schema, site
from .core import authorizer, permitted, principal_of, state_of
from .errors import NotFound, ServiceError
from .integrations import ExportSettings, export_rules
from .people import Ident


class SiteOut(msgspec.Struct, kw_only=True):
    id: Ident
    #: The site's time zone (schedules are in local time).
    tz: str
    #: The broker the gateways and the service's site link use.
    mqtt_host: str
    mqtt_port: int
    #: The identity export rules (seed 000), as `/integrations/identity/settings`.
    settings: ExportSettings
    #: Gateways the operator may read, and of those the ones online (from their last birth or will).
    gateways: int
    gateways_online: int
    #: Whether this service runs the site link (it was given the site passphrase and reached the broker).
    provisioning: bool
    #: The site's public command key (hex: `link.command_key` on the gateways) and its fingerprint (None:
    #: the service was given no site passphrase).
    command_key: str | None = None
    key_fingerprint: str | None = None


async def _site(request: Request[Any, Any, Any]) -> SiteOut:
    p, st = principal_of(request), state_of(request)
    if st.site is None:
        raise NotFound("the database holds no site yet (cloud-bridge serve --init)")
    authz = await authorizer(st.db)
    g = schema.gateways
    async with st.db.read() as c:
        rules = await export_rules(c)
        pem = await site.meta(c, "site_key")
        rows = (await c.execute(select(g.c.id, g.c.online))).all()
    seen = [bool(online) for gid, online in rows if authz.check(p.operator, Action.READ,
                                                                Target.for_gateway(gid)).allowed]  # fmt: skip
    prov = st.provisioner
    public: bytes | None = public_bytes(prov.key) if prov else None
    if public is None and (passphrase := st.cfg.passphrase()) and pem:  # no link running: the key is still known
        with contextlib.suppress(ServiceError):
            public = public_bytes(site.decrypt_key(pem, passphrase))
    return SiteOut(id=st.site.site, tz=st.site.tz, mqtt_host=prov.host if prov else st.site.host,
                   mqtt_port=prov.port if prov else st.site.port,
                   settings=ExportSettings(delete_user_on_no_token=rules.delete_user_on_no_token,
                                           delete_user_on_no_entitlement=rules.delete_user_on_no_entitlement),
                   gateways=len(seen), gateways_online=sum(seen), provisioning=prov is not None,
                   command_key=public.hex() if public else None,
                   key_fingerprint=fingerprint(public) if public else None)  # fmt: skip


class SiteController(Controller):
    path = "/api/v1/sites"
    tags = ["sites"]

    @get("/", opt={"perm": (ObjectType.GATEWAY, Action.READ)}, guards=[permitted])
    async def list_sites(self, request: Request[Any, Any, Any]) -> list[SiteOut]:
        """The sites of this service: the one its database holds (none before `serve --init`)."""
        if state_of(request).site is None:
            return []
        return [await _site(request)]

    @get("/{site:str}", opt={"perm": (ObjectType.GATEWAY, Action.READ)}, guards=[permitted])
    async def get_site(self, request: Request[Any, Any, Any], site: FromPath[str]) -> SiteOut:
        """One site: its time zone, broker, export settings, gateway counts and signing key fingerprint."""
        info = state_of(request).site
        if info is None or info.site != site:
            raise NotFound(f"no site {site!r}")
        return await _site(request)
