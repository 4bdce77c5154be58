"""/api/v1/areas, /api/v1/gateways/{gw}/doors/{door}/rules, /api/v1/gateways/{gw}/interlocks, /api/v1/site-rules
and /api/v1/areas/reset: the access rules (issue 19, docs/model.md "Access rules") on the operator side.

Areas are site-wide; a door's rules (the areas it leads between, two-person, escort) and the interlocks belong
to a gateway. They reach the gateways with the next publish (`AccessRules`, planned per gateway by
`cloud_bridge/operator/rules.py`). The duress code is hashed here (`edge.pin.hash_pin`, off the event loop) and
never shown again. The anti-passback reset is a signed command to each gateway (`reset_anti_passback`), at
once, for the gateways the operator may update; it answers per gateway.

Permissions: reading needs gateway read, changing gateway update (for a door's rules and interlocks: on that
gateway). Every change is in the audit log.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, delete, get, post, put
from litestar.params import FromPath, JSONBody
from msgspec import Meta
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from cloud_bridge.operator.rules import DoorRules
from cloud_bridge.permissions import Action, ObjectType, Target
from cloud_bridge.protocol import ResetAntiPassback
from edge.model import (
    MAX_EXEMPT_GROUPS,
    MAX_INTERLOCK_DOORS,
    MAX_OCCUPANCY,
    MAX_RULE_WINDOW_S,
    AntiPassback,
    Area,
    ClockTime,
    DuressMode,
    Interlock,
    SiteRules,
)

from . import audit, schema
from .core import authorizer, permitted, principal_of, state_of
from .errors import BadRequest, Conflict, NotFound, ServiceError
from .people import Ident
from .rules_db import AREA, DOOR_RULES, INTERLOCK, SITE_RULES_KEY, read_areas, read_site_rules

#: PBKDF2 iterations of the duress code's hash (the gateway checks a PIN hash at most 200,000).
DURESS_ITERATIONS = 100_000

_enc = msgspec.msgpack.Encoder()


def duress_hash(code: str, iterations: int = DURESS_ITERATIONS) -> str:
    """The gateway's PIN hash format (docs/model.md, User.pin_hash): `pbkdf2_sha256$iterations$salt$digest`,
    salt and digest unpadded URL-safe base64 (cloud_bridge may not import the gateway's `edge.pin`)."""

    def b64(b: bytes) -> str:
        return base64.urlsafe_b64encode(b).decode().rstrip("=")

    salt = os.urandom(16)
    digest = hashlib.pbkdf2_hmac("sha256", code.encode(), salt, iterations)
    return f"pbkdf2_sha256${iterations}${b64(salt)}${b64(digest)}"


GATEWAY_READ = {"perm": (ObjectType.GATEWAY, Action.READ)}
GATEWAY_UPDATE = {"perm": (ObjectType.GATEWAY, Action.UPDATE)}


class AreaBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: Annotated[str, Meta(max_length=200)] = ""
    anti_passback: AntiPassback = AntiPassback.NONE
    timed_s: Annotated[float, Meta(gt=0, le=MAX_RULE_WINDOW_S)] = 900.0
    exempt_groups: Annotated[list[Ident], Meta(max_length=MAX_EXEMPT_GROUPS)] = []
    max_occupancy: Annotated[int, Meta(ge=1, le=MAX_OCCUPANCY)] | None = None
    reset_daily: ClockTime | None = None


class InterlockBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: Annotated[str, Meta(max_length=200)] = ""
    doors: Annotated[list[Ident], Meta(min_length=2, max_length=MAX_INTERLOCK_DOORS)]
    rex_overrides: bool = True


class SiteRulesBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    duress: DuressMode = DuressMode.OFF
    #: With `duress = "code"`: the site's duress code (4-12 digits); stored only as its hash. Omitted: the code
    #: set before is kept.
    duress_code: Annotated[str, Meta(pattern=r"^[0-9]{4,12}$")] | None = None


class SiteRulesOut(msgspec.Struct, kw_only=True):
    duress: DuressMode
    duress_code_set: bool


class ResetBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Forget where `user` was seen, or everyone seen in `area`, or (neither) everyone, on `gateways` (None:
    every gateway the operator may update)."""

    user: Ident | None = None
    area: Ident | None = None
    gateways: Annotated[list[Ident], Meta(max_length=1000)] | None = None
    timeout: Annotated[float, Meta(gt=0, le=120)] = 30.0


class ResetResult(msgspec.Struct, kw_only=True):
    #: Per gateway: "ok", or why not ("offline", "error: ...").
    gateways: dict[str, str]


async def _groups_exist(c: AsyncConnection, groups: list[str], field: str) -> None:
    if not groups:
        return
    have = set((await c.execute(select(schema.groups.c.id).where(schema.groups.c.id.in_(groups)))).scalars())
    for i, g in enumerate(groups):
        if g not in have:
            raise NotFound(f"unknown group {g!r} ({field}[{i}])")


async def _area_exists(c: AsyncConnection, aid: str | None, field: str) -> None:
    if aid is not None and (await c.execute(select(schema.areas.c.id).where(schema.areas.c.id == aid))).scalar() \
            is None:  # fmt: skip
        raise NotFound(f"unknown area {aid!r} ({field})")


async def _area_row(c: AsyncConnection, aid: str) -> Area | None:
    b = (await c.execute(select(schema.areas.c.body).where(schema.areas.c.id == aid))).scalar()
    return None if b is None else AREA.decode(b)


class AreaController(Controller):
    path = "/api/v1/areas"
    tags = ["access rules"]

    @get("/", opt=GATEWAY_READ, guards=[permitted])
    async def list_areas(self, request: Request[Any, Any, Any]) -> list[Area]:
        async with state_of(request).db.read() as c:
            return await read_areas(c)

    @get("/{aid:str}", opt=GATEWAY_READ, guards=[permitted])
    async def get_area(self, request: Request[Any, Any, Any], aid: FromPath[str]) -> Area:
        async with state_of(request).db.read() as c:
            a = await _area_row(c, aid)
        if a is None:
            raise NotFound(f"unknown area {aid!r}")
        return a

    @put("/{aid:str}", opt=GATEWAY_UPDATE, guards=[permitted])
    async def put_area(self, request: Request[Any, Any, Any], aid: FromPath[str], data: JSONBody[AreaBody]) -> Area:
        """Create or replace an area: its anti-passback rule (none, soft, hard, timed), exempt groups,
        occupancy limit and nightly reset time."""
        p, st = principal_of(request), state_of(request)
        area = msgspec.convert({"id": aid, **msgspec.to_builtins(data)}, Area)
        async with st.db.write() as c:
            await _groups_exist(c, area.exempt_groups, "body.exempt_groups")
            before = await _area_row(c, aid)
            t = schema.areas
            if before is None:
                await c.execute(t.insert().values(id=aid, body=_enc.encode(area)))
            else:
                await c.execute(t.update().where(t.c.id == aid).values(body=_enc.encode(area)))
            await audit.record(c, p, f"area.{'update' if before else 'create'}", "area", aid, before=before,
                               after=area)  # fmt: skip
        return area

    @delete("/{aid:str}", opt=GATEWAY_UPDATE, guards=[permitted], status_code=200)
    async def delete_area(self, request: Request[Any, Any, Any], aid: FromPath[str]) -> Area:
        """Remove an area; refused (409) while a door's rules name it."""
        p, st = principal_of(request), state_of(request)
        async with st.db.write() as c:
            before = await _area_row(c, aid)
            if before is None:
                raise NotFound(f"unknown area {aid!r}")
            dr = schema.door_rules
            for gw, door, body in (await c.execute(select(dr.c.gateway, dr.c.door, dr.c.body))).all():
                r = DOOR_RULES.decode(body)
                if aid in (r.to_area, r.from_area):
                    raise Conflict(f"area {aid!r} is named by the rules of door {door!r} of gateway {gw!r}")
            await c.execute(schema.areas.delete().where(schema.areas.c.id == aid))
            await audit.record(c, p, "area.delete", "area", aid, before=before)
        return before

    @post("/reset", opt=GATEWAY_UPDATE, guards=[permitted], status_code=200)
    async def reset(self, request: Request[Any, Any, Any], data: JSONBody[ResetBody]) -> ResetResult:
        """The anti-passback reset, as a signed command to each gateway now (not with a publish): the user or
        everyone in the area (or everyone) may pass any door once. Offline gateways are named, not queued."""
        p, st = principal_of(request), state_of(request)
        prov = st.provisioner
        if prov is None or prov.link is None:
            raise ServiceError("provisioning is not running (no site passphrase given to the service)")
        authz = await authorizer(st.db)
        async with st.db.read() as c:
            known = list((await c.execute(select(schema.gateways.c.id).order_by(schema.gateways.c.id))).scalars())
        wanted = known if data.gateways is None else data.gateways
        for i, g in enumerate(wanted):
            if g not in known:
                raise NotFound(f"unknown gateway {g!r} (body.gateways[{i}])")
            if data.gateways is not None:
                authz.require(p.operator, Action.UPDATE, Target.for_gateway(g))
        gws = [g for g in wanted if authz.check(p.operator, Action.UPDATE, Target.for_gateway(g)).allowed]
        action = ResetAntiPassback(user=data.user, area=data.area)
        link = prov.link

        async def one(gw: str) -> str:
            if not link.online(gw):
                return "offline"
            try:
                r = await link.command(gw, prov.key, action, operator=p.operator.id, timeout=data.timeout)
            except TimeoutError:
                return "error: no answer"
            return "ok" if r.ok else f"error: {r.error.code if r.error else '?'}: {r.error.message if r.error else ''}"

        results = dict(zip(gws, await asyncio.gather(*(one(g) for g in gws)), strict=True))
        out = ResetResult(gateways=results)
        async with st.db.write() as c:
            await audit.record(c, p, "area.reset", "area", data.area or "*", after={"user": data.user, **results},
                               outcome="ok" if all(v == "ok" for v in results.values()) else "failed")  # fmt: skip
        return out


class DoorRulesController(Controller):
    path = "/api/v1/gateways/{gw:str}"
    tags = ["access rules"]

    @get("/doors/{door:str}/rules", opt={**GATEWAY_READ, "id": "gw"}, guards=[permitted])
    async def get_door_rules(self, request: Request[Any, Any, Any], gw: FromPath[str],
                             door: FromPath[str]) -> DoorRules:
        async with state_of(request).db.read() as c:
            return await _door_rules(c, gw, door) or DoorRules()

    @put("/doors/{door:str}/rules", opt={**GATEWAY_UPDATE, "id": "gw"}, guards=[permitted])
    async def put_door_rules(self, request: Request[Any, Any, Any], gw: FromPath[str], door: FromPath[str],
                             data: JSONBody[DoorRules]) -> DoorRules:
        """The door's access rules: the areas its "in" reader leads from and to (the "out" reader back),
        two-person window, escort group and the visitor groups it holds. All defaults: no rules."""
        p, st = principal_of(request), state_of(request)
        msgspec.convert(door, Ident)
        if (data.escort_group is None) != (not data.visitor_groups):
            raise BadRequest("escort_group and visitor_groups go together", "body.visitor_groups")
        async with st.db.write() as c:
            await _area_exists(c, data.to_area, "body.to_area")
            await _area_exists(c, data.from_area, "body.from_area")
            await _groups_exist(c, [g for g in [data.escort_group] if g is not None], "body.escort_group")
            await _groups_exist(c, data.visitor_groups, "body.visitor_groups")
            before = await _door_rules(c, gw, door)
            t = schema.door_rules
            await c.execute(t.delete().where(t.c.gateway == gw, t.c.door == door))
            if data != DoorRules():
                await c.execute(t.insert().values(gateway=gw, door=door, body=_enc.encode(data)))
            await audit.record(c, p, "door.rules", "door", f"{gw}/{door}", before=before, after=data)
        return data

    @get("/interlocks", opt={**GATEWAY_READ, "id": "gw"}, guards=[permitted])
    async def list_interlocks(self, request: Request[Any, Any, Any], gw: FromPath[str]) -> list[Interlock]:
        async with state_of(request).db.read() as c:
            return await _interlocks(c, gw)

    @put("/interlocks/{iid:str}", opt={**GATEWAY_UPDATE, "id": "gw"}, guards=[permitted])
    async def put_interlock(self, request: Request[Any, Any, Any], gw: FromPath[str], iid: FromPath[str],
                            data: JSONBody[InterlockBody]) -> Interlock:  # fmt: skip
        """Create or replace an interlock (mantrap) of doors of this gateway; a door is in one interlock."""
        p, st = principal_of(request), state_of(request)
        il = msgspec.convert({"id": iid, **msgspec.to_builtins(data)}, Interlock)
        if len(set(il.doors)) != len(il.doors):
            raise BadRequest("a door is listed twice", "body.doors")
        async with st.db.write() as c:
            others = [x for x in await _interlocks(c, gw) if x.id != iid]
            for i, d in enumerate(il.doors):
                owner = next((x.id for x in others if d in x.doors), None)
                if owner is not None:
                    raise Conflict(f"door {d!r} is in interlock {owner!r} already (body.doors[{i}])")
            before = next((x for x in await _interlocks(c, gw) if x.id == iid), None)
            t = schema.interlocks
            await c.execute(t.delete().where(t.c.gateway == gw, t.c.id == iid))
            await c.execute(t.insert().values(gateway=gw, id=iid, body=_enc.encode(il)))
            await audit.record(c, p, f"interlock.{'update' if before else 'create'}", "interlock", f"{gw}/{iid}",
                               before=before, after=il)  # fmt: skip
        return il

    @delete("/interlocks/{iid:str}", opt={**GATEWAY_UPDATE, "id": "gw"}, guards=[permitted], status_code=200)
    async def delete_interlock(self, request: Request[Any, Any, Any], gw: FromPath[str],
                               iid: FromPath[str]) -> Interlock:
        p, st = principal_of(request), state_of(request)
        async with st.db.write() as c:
            before = next((x for x in await _interlocks(c, gw) if x.id == iid), None)
            if before is None:
                raise NotFound(f"no interlock {iid!r} on gateway {gw!r}")
            t = schema.interlocks
            await c.execute(t.delete().where(t.c.gateway == gw, t.c.id == iid))
            await audit.record(c, p, "interlock.delete", "interlock", f"{gw}/{iid}", before=before)
        return before


async def _door_rules(c: AsyncConnection, gw: str, door: str) -> DoorRules | None:
    t = schema.door_rules
    b = (await c.execute(select(t.c.body).where(t.c.gateway == gw, t.c.door == door))).scalar()
    return None if b is None else DOOR_RULES.decode(b)


async def _interlocks(c: AsyncConnection, gw: str) -> list[Interlock]:
    t = schema.interlocks
    return [INTERLOCK.decode(b) for b in (await c.execute(select(t.c.body).where(t.c.gateway == gw)
                                                      .order_by(t.c.id))).scalars()]  # fmt: skip


class SiteRulesController(Controller):
    path = "/api/v1/site-rules"
    tags = ["access rules"]

    @get("/", opt=GATEWAY_READ, guards=[permitted])
    async def get_site_rules(self, request: Request[Any, Any, Any]) -> SiteRulesOut:
        async with state_of(request).db.read() as c:
            r = await read_site_rules(c) or SiteRules()
        return SiteRulesOut(duress=r.duress, duress_code_set=r.duress_code_hash is not None)

    @put("/", opt=GATEWAY_UPDATE, guards=[permitted])
    async def put_site_rules(self, request: Request[Any, Any, Any], data: JSONBody[SiteRulesBody]) -> SiteRulesOut:
        """The duress PIN: off, the user's PIN with its last digit + 1, or a site duress code (hashed here)."""
        p, st = principal_of(request), state_of(request)
        code_hash = None
        if data.duress_code is not None:
            code_hash = await asyncio.to_thread(duress_hash, data.duress_code)
        async with st.db.write() as c:
            before = await read_site_rules(c)
            if code_hash is None and before is not None:
                code_hash = before.duress_code_hash
            if data.duress is DuressMode.CODE and code_hash is None:
                raise BadRequest("duress 'code' needs a duress_code", "body.duress_code")
            rules = SiteRules(duress=data.duress, duress_code_hash=code_hash)
            await _set_meta(c, SITE_RULES_KEY, msgspec.json.encode(rules).decode())
            shown = SiteRulesOut(duress=rules.duress, duress_code_set=code_hash is not None)
            was = (
                None
                if before is None
                else SiteRulesOut(duress=before.duress, duress_code_set=before.duress_code_hash is not None)
            )
            await audit.record(c, p, "site.rules", "site", "rules", before=was, after=shown)  # fmt: skip
        return shown


async def _set_meta(c: AsyncConnection, key: str, value: str) -> None:
    m = schema.meta
    await c.execute(m.delete().where(m.c.key == key))
    await c.execute(m.insert().values(key=key, value=value))


CONTROLLERS = (AreaController, DoorRulesController, SiteRulesController)
