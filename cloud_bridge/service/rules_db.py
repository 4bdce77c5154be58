"""The access rules in the service's database, read for a publish (`access_rules`) and by the API
(cloud_bridge/service/areas.py). Areas, door rules and interlocks are MessagePack bodies of the model's structs;
the site's settings a JSON row of `meta`."""

from __future__ import annotations

from typing import Any

import msgspec
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from cloud_bridge.operator.rules import AccessRules, DoorRules, GatewayRules
from edge.model import Area, Interlock, SiteRules

from . import schema

#: The site's rule settings in `meta` (JSON of `SiteRules`).
SITE_RULES_KEY = "site_rules"

AREA = msgspec.msgpack.Decoder(Area)
DOOR_RULES = msgspec.msgpack.Decoder(DoorRules)
INTERLOCK = msgspec.msgpack.Decoder(Interlock)


async def read_areas(c: AsyncConnection) -> list[Area]:
    rows = (await c.execute(select(schema.areas.c.body).order_by(schema.areas.c.id))).scalars()
    return [AREA.decode(b) for b in rows]


async def read_site_rules(c: AsyncConnection) -> SiteRules | None:
    v = (await c.execute(select(schema.meta.c.value).where(schema.meta.c.key == SITE_RULES_KEY))).scalar()
    return None if v is None else msgspec.json.decode(v, type=SiteRules)


async def access_rules(c: AsyncConnection) -> AccessRules:
    """Everything a publish hands the planner (cloud_bridge/operator/rules.py)."""
    gws: dict[str, dict[str, Any]] = {}
    dr = schema.door_rules
    for gw, door, body in (await c.execute(select(dr.c.gateway, dr.c.door, dr.c.body))).all():
        gws.setdefault(gw, {"doors": {}, "interlocks": []})["doors"][door] = DOOR_RULES.decode(body)
    il = schema.interlocks
    for gw, body in (await c.execute(select(il.c.gateway, il.c.body).order_by(il.c.gateway, il.c.id))).all():
        gws.setdefault(gw, {"doors": {}, "interlocks": []})["interlocks"].append(INTERLOCK.decode(body))
    return AccessRules(areas=await read_areas(c), site=await read_site_rules(c),
                       gateways={g: GatewayRules(**v) for g, v in gws.items()})  # fmt: skip
