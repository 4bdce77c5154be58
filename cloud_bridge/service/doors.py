"""/api/v1/doors: the doors the gateways announced, with their live state (from events) and who opens them
when; and the door commands: unlock, door mode, lockdown and its release.

A command is a `cloud_bridge.protocol.Command` signed with the site key (the Provisioner's; the gateway
verifies it end to end), sent over MQTT by the service's site link, and answered with the gateway's own
`CommandResult`, which the API returns. Each command needs what `permissions.requirements_for` lists (seed
003: unlock needs read and publish(unlock) on the door and its gateway; door mode also update on the door;
lockdown publish(lockdown) on the gateway); the guard checks them before anything is signed, and a refusal
is 403 naming the first permission missing. Sent or refused, the command is in the audit log. A door
carries the tags of the groups that open it.
"""

# ruff: noqa: ASYNC109

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, get, post
from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler
from litestar.params import FromPath, JSONBody
from msgspec import Meta
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from cloud_bridge.permissions import Action, ObjectType, Target
from cloud_bridge.protocol import CommandAction, Lockdown, SetDoorMode, Unlock
from edge.model import DoorMode

from . import audit, schema
from .core import authorizer, permitted, principal_of, state_of
from .errors import NotFound, ServiceError


class GroupAccess(msgspec.Struct, kw_only=True):
    group: str
    name: str
    #: The schedule the group opens the door by (None: at any time).
    schedule: str | None


class DoorOut(msgspec.Struct, kw_only=True):
    gateway: str
    id: str
    name: str
    online: bool
    #: From the door's newest events: locked | unlocked, open | closed (None: not reported yet).
    lock: str | None
    contact: str | None
    #: The mode: the override of the last door-mode command, "lockdown" while the gateway is in lockdown,
    #: else "provisioned".
    mode: str
    forced: bool
    held_open: bool
    updated: float | None
    #: Who opens the door when: the groups that include it and their schedules.
    access: list[GroupAccess]
    tags: list[str]


class UnlockIn(msgspec.Struct, forbid_unknown_fields=True):
    seconds: Annotated[float, Meta(gt=0, le=3600)] = 5.0


class ModeIn(msgspec.Struct, forbid_unknown_fields=True):
    #: A door mode (normal, unlocked, locked, card_and_pin, ...), or None: back to the provisioned mode.
    mode: DoorMode | None = None


class LockdownIn(msgspec.Struct, forbid_unknown_fields=True):
    #: True: lock every door of the gateway down; False: release the lockdown.
    active: bool


class CommandOut(msgspec.Struct, kw_only=True):
    gateway: str
    door: str | None
    command: dict[str, Any]
    request_id: str | None
    #: The gateway's answer: ok, or the error it gave (code and message).
    ok: bool
    error: dict[str, Any] | None


async def door_tags(c: AsyncConnection, gw: str, door: str) -> list[str]:
    """A door carries the tags of the groups that open it."""
    g, gd = schema.groups, schema.group_doors
    rows = (await c.execute(select(g.c.tags).join(gd, gd.c.group_id == g.c.id)
                            .where(gd.c.gateway == gw, gd.c.door == door))).scalars()  # fmt: skip
    return sorted({t for tags in rows for t in str(tags).split(",") if t})


async def load_doors(c: AsyncConnection, only: tuple[str, str] | None = None) -> list[DoorOut]:
    d, ds, gs, gw_t = schema.doors, schema.door_state, schema.gateway_status, schema.gateways
    g, gd = schema.groups, schema.group_doors
    q = select(d.c.gateway, d.c.id, d.c.name).order_by(d.c.gateway, d.c.id)
    if only is not None:
        q = q.where(d.c.gateway == only[0], d.c.id == only[1])
    doors = (await c.execute(q)).all()
    state = {(r.gateway, r.door): r for r in (await c.execute(select(ds))).all()}
    status = {r.gateway: r for r in (await c.execute(select(gs))).all()}
    online = {r.id: bool(r.online) for r in (await c.execute(select(gw_t.c.id, gw_t.c.online))).all()}
    access: dict[tuple[str, str], list[GroupAccess]] = {}
    tags: dict[tuple[str, str], set[str]] = {}
    for r in (await c.execute(select(gd.c.gateway, gd.c.door, g.c.id, g.c.name, g.c.schedule, g.c.tags)
                              .join(g, g.c.id == gd.c.group_id).order_by(g.c.id))).all():  # fmt: skip
        access.setdefault((r.gateway, r.door), []).append(GroupAccess(group=r.id, name=r.name, schedule=r.schedule))
        tags.setdefault((r.gateway, r.door), set()).update(t for t in str(r.tags).split(",") if t)
    out = []
    for gw, did, name in doors:
        s, st = state.get((gw, did)), status.get(gw)
        lockdown = bool(st.lockdown) if st is not None else False
        is_online = bool(st.online) if st is not None else online.get(gw, False)
        mode = "lockdown" if lockdown else (s.mode if s is not None and s.mode else "provisioned")
        out.append(DoorOut(gateway=gw, id=did, name=name, online=is_online, lock=s.lock if s else None,
                           contact=s.contact if s else None, mode=mode, forced=bool(s.forced) if s else False,
                           held_open=bool(s.held) if s else False, updated=s.ts if s else None,
                           access=access.get((gw, did), []), tags=sorted(tags.get((gw, did), set()))))  # fmt: skip
    return out


def door_target(x: DoorOut) -> Target:
    return Target.for_door(x.gateway, x.id, x.tags)


async def door_readable(conn: ASGIConnection[Any, Any, Any, Any], _h: BaseRouteHandler) -> None:
    """The guard of a door's detail: read on that door (with its tags)."""
    st, p = state_of(conn), principal_of(conn)
    gw, door = str(conn.path_params["gw"]), str(conn.path_params["door"])
    async with st.db.read() as c:
        tags = await door_tags(c, gw, door)
    (await authorizer(st.db)).require(p.operator, Action.READ, Target.for_door(gw, door, tags))


async def command_permitted(conn: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    """The guard of a door command: every permission `requirements_for(kind, gateway, door)` lists."""
    st, p = state_of(conn), principal_of(conn)
    kind: str = handler.opt["command"]
    gw = str(conn.path_params["gw"])
    door = conn.path_params.get("door")
    tags: list[str] = []
    if door is not None:
        async with st.db.read() as c:
            tags = await door_tags(c, gw, str(door))
    (await authorizer(st.db)).require_command(p.operator, kind, gw, None if door is None else str(door),
                                              door_tags=tags)  # fmt: skip


async def send(request: Request[Any, Any, Any], gw: str, door: str | None, action: CommandAction,
               timeout: float) -> CommandOut:  # fmt: skip
    """Sign `action` for `gw` with the site key, send it, wait for the gateway's result; audit either way."""
    p, st = principal_of(request), state_of(request)
    prov = st.provisioner
    shown = msgspec.to_builtins(action)
    if prov is None or prov.link is None:
        raise ServiceError("commands are off: the service has no site link (no site passphrase, or no broker)")
    what = f"door.{shown['action']}"
    oid = f"{gw}/{door}" if door else gw
    try:
        r = await prov.link.command(gw, prov.key, action, operator=p.operator.id, timeout=timeout)
    except TimeoutError:
        async with st.db.write() as c:
            await audit.record(c, p, what, "door" if door else "gateway", oid, after={"command": shown,
                               "error": "no answer in time"}, outcome="failed")  # fmt: skip
        raise ServiceError(f"gateway {gw} did not answer the {shown['action']} command within {timeout:g} s") from None
    out = CommandOut(gateway=gw, door=door, command=shown, request_id=r.request_id, ok=r.ok,
                     error=None if r.error is None else msgspec.to_builtins(r.error))  # fmt: skip
    async with st.db.write() as c:
        await audit.record(c, p, what, "door" if door else "gateway", oid, after=out,
                           outcome="ok" if r.ok else "failed")  # fmt: skip
    return out


async def _known_door(request: Request[Any, Any, Any], gw: str, door: str) -> None:
    async with state_of(request).db.read() as c:
        found = await load_doors(c, (gw, door))
    if not found:
        raise NotFound(f"no door {door!r} on gateway {gw!r} (a gateway announces its doors in its birth)")


Timeout = Annotated[float, Meta(gt=0, le=120)]


class DoorController(Controller):
    path = "/api/v1/doors"
    tags = ["doors"]

    @get("/", opt={"perm": (ObjectType.DOOR, Action.READ)}, guards=[permitted])
    async def list_doors(self, request: Request[Any, Any, Any]) -> list[DoorOut]:
        """Every door the operator may read: live lock and contact state, mode, alarms, who opens it when."""
        p, st = principal_of(request), state_of(request)
        authz = await authorizer(st.db)
        async with st.db.read() as c:
            doors = await load_doors(c)
        return [x for x in doors if authz.check(p.operator, Action.READ, door_target(x)).allowed]

    @get("/{gw:str}/{door:str}", guards=[door_readable])
    async def get_door(self, request: Request[Any, Any, Any], gw: FromPath[str], door: FromPath[str]) -> DoorOut:
        async with state_of(request).db.read() as c:
            found = await load_doors(c, (gw, door))
        if not found:
            raise NotFound(f"no door {door!r} on gateway {gw!r}")
        return found[0]

    @post("/{gw:str}/{door:str}/unlock", opt={"command": "unlock"}, guards=[command_permitted], status_code=200)
    async def unlock(self, request: Request[Any, Any, Any], gw: FromPath[str], door: FromPath[str],
                     data: JSONBody[UnlockIn],
                     timeout: Timeout = 30.0) -> CommandOut:  # fmt: skip
        """Momentary unlock (signed command); the answer is the gateway's result."""
        await _known_door(request, gw, door)
        return await send(request, gw, door, Unlock(door=door, seconds=data.seconds), timeout)

    @post("/{gw:str}/{door:str}/mode", opt={"command": "door_mode"}, guards=[command_permitted], status_code=200)
    async def set_mode(self, request: Request[Any, Any, Any], gw: FromPath[str], door: FromPath[str],
                       data: JSONBody[ModeIn],
                       timeout: Timeout = 30.0) -> CommandOut:  # fmt: skip
        """Override the door's mode (None: back to its provisioned mode); signed command."""
        await _known_door(request, gw, door)
        return await send(request, gw, door, SetDoorMode(door=door, mode=data.mode), timeout)


class LockdownController(Controller):
    path = "/api/v1/lockdown"
    tags = ["doors"]

    @post("/{gw:str}", opt={"command": "lockdown"}, guards=[command_permitted], status_code=200)
    async def lockdown(self, request: Request[Any, Any, Any], gw: FromPath[str], data: JSONBody[LockdownIn],
                       timeout: Timeout = 30.0) -> CommandOut:  # fmt: skip
        """Lock every door of gateway `gw` down (`active` true: relocked, remote unlocks refused) or release
        the lockdown; signed command."""
        return await send(request, gw, None, Lockdown(active=data.active), timeout)
