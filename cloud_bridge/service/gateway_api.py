"""/api/v1/gateways/{gw}/link, /refresh and /test: what the site link knows of one gateway, and the round trips
that check it.

* `GET .../link`: the gateway's last status message as the service's site link holds it (its birth: doors and
  readers, software, protocol, rights version, journal depth, TLS, warnings; or the will that took it
  offline), and the command key: the fingerprint the gateway said in its birth it verifies with, the one
  the service signs with, the one the gateway last acknowledged in a rotation, and whether a rotation is
  pending, and this gateway's part in the last rotation (key_rotation.py). Needs read on the gateway.
* `POST .../test`: a signed `rebirth` command (the site key; the gateway verifies it end to end) and the
  gateway's `CommandResult`: the answer proves the whole path (broker, signature, the gateway's command
  handler) both ways; the round trip in milliseconds. `POST .../refresh`: the same command, then waits for
  the new birth it asks for, and answers with it. Both need what `requirements_for("rebirth")` lists
  (read and publish(rebirth) on the gateway), and are in the audit log, sent or refused.
"""

# ruff: noqa: ASYNC109

from __future__ import annotations

import time
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, get, post
from litestar.params import FromPath
from msgspec import Meta
from sqlalchemy import select

from cloud_bridge.permissions import Action, ObjectType
from cloud_bridge.protocol import Birth, CommandResult, Death, DeviceInfo, RebirthAction
from cloud_bridge.signing import fingerprint, public_bytes

from . import audit, key_rotation, schema, site
from .core import permitted, principal_of, state_of
from .doors import command_permitted
from .errors import NotFound, ServiceError
from .provisioning import Provisioner


class KeyStatus(msgspec.Struct, kw_only=True):
    #: The fingerprint (signing.fingerprint) of the site key the service signs commands with (None: no key).
    service: str | None
    #: The fingerprint the gateway announced in its last birth (None: no birth, or a gateway before keys).
    gateway: str | None
    #: Whether the two agree: a command signed now will verify on the gateway.
    matches: bool
    #: The fingerprint the gateway acknowledged in the last key rotation, and when (None: never rotated).
    acked: str | None
    acked_at: float | None
    #: A rotation started and not finished on every gateway yet (the new key waits in the site database).
    rotation_pending: bool
    #: When the site key was last rotated (None: never).
    rotated_at: float | None
    #: The last rotation started from the service (key_rotation.py): its state (pending | committed |
    #: aborted), the new key's fingerprint, and this gateway's part in it (acknowledged | moved | restored |
    #: offline | error, with the error). None: no rotation from the service yet.
    rotation: str | None = None
    rotation_new: str | None = None
    rotation_gateway: str | None = None
    rotation_detail: str = ""


class LinkOut(msgspec.Struct, kw_only=True):
    gateway: str
    #: "birth" (online), "death" (offline: its will or a clean shutdown) or "none" (not seen since the start).
    status: str
    online: bool
    session: int
    #: When the gateway sent the status message (its clock).
    ts: float | None
    software: str
    protocol: int
    rights_version: int
    journal_depth: int
    tls: bool
    warnings: list[str]
    doors: list[DeviceInfo]
    readers: list[DeviceInfo]
    max_message_bytes: int
    death_reason: str | None
    key: KeyStatus


class TestOut(msgspec.Struct, kw_only=True):
    gateway: str
    request_id: str | None
    #: The gateway's answer to the signed command: ok, or the error it gave (code and message).
    ok: bool
    error: dict[str, Any] | None
    round_trip_ms: float


class RefreshOut(msgspec.Struct, kw_only=True):
    test: TestOut
    #: The gateway's status after its new birth (or as it was, when no new birth came in time).
    link: LinkOut
    new_birth: bool


Timeout = Annotated[float, Meta(gt=0, le=120)]


def _provisioner(request: Request[Any, Any, Any]) -> Provisioner:
    prov = state_of(request).provisioner
    if prov is None or prov.link is None:
        raise ServiceError("the service has no site link (no site passphrase, or no broker): nothing to ask")
    return prov


async def _link(request: Request[Any, Any, Any], gw: str) -> LinkOut:
    st = state_of(request)
    prov = st.provisioner
    status = prov.link.status.get(gw) if prov is not None and prov.link is not None else None
    async with st.db.read() as c:
        known = (await c.execute(select(schema.gateways.c.id).where(schema.gateways.c.id == gw))).scalar()
        gk = (await c.execute(select(schema.gateway_keys).where(schema.gateway_keys.c.gateway == gw))).one_or_none()
        pending = await site.meta(c, "site_key_pending")
        rotated = await site.meta(c, "site_key_rotated")
        rot = await key_rotation.load(c)
    if known is None and status is None:
        raise NotFound(f"no gateway {gw!r}")
    service_fp = fingerprint(public_bytes(prov.key)) if prov is not None else None
    birth = status if isinstance(status, Birth) else None
    gateway_fp = (birth.key or None) if birth is not None else None
    key = KeyStatus(service=service_fp, gateway=gateway_fp, matches=service_fp is not None and service_fp == gateway_fp,
                    acked=gk.fingerprint if gk is not None else None, acked_at=gk.acked if gk is not None else None,
                    rotation_pending=pending is not None,
                    rotated_at=float(rotated) if rotated else None)  # fmt: skip
    if rot is not None:
        mine = rot.gateways.get(gw)
        key.rotation, key.rotation_new = rot.state, rot.new
        key.rotation_gateway, key.rotation_detail = (mine.state, mine.detail) if mine is not None else (None, "")
    if birth is not None:
        return LinkOut(gateway=gw, status="birth", online=True, session=birth.session, ts=birth.ts or None,
                       software=birth.software, protocol=birth.protocol, rights_version=birth.rights_version,
                       journal_depth=birth.journal_depth, tls=birth.tls, warnings=list(birth.warnings),
                       doors=list(birth.doors), readers=list(birth.readers),
                       max_message_bytes=birth.max_message_bytes, death_reason=None, key=key)  # fmt: skip
    return LinkOut(gateway=gw, status="none" if status is None else "death", online=False,
                   session=status.session if status is not None else 0,
                   ts=(status.ts or None) if status is not None else None, software="", protocol=0,
                   rights_version=0, journal_depth=0, tls=False, warnings=[], doors=[], readers=[],
                   max_message_bytes=0, death_reason=status.reason if isinstance(status, Death) else None,
                   key=key)  # fmt: skip


async def _test(request: Request[Any, Any, Any], gw: str, timeout: float, what: str) -> TestOut:
    """Sign a rebirth command for `gw`, send it, wait for the gateway's result; audit either way."""
    p, st = principal_of(request), state_of(request)
    prov = _provisioner(request)
    assert prov.link is not None
    t0 = time.perf_counter()
    try:
        r: CommandResult = await prov.link.command(gw, prov.key, RebirthAction(), operator=p.operator.id,
                                                   timeout=timeout)  # fmt: skip
    except TimeoutError:
        async with st.db.write() as c:
            await audit.record(c, p, f"gateway.{what}", "gateway", gw, after={"error": "no answer in time"},
                               outcome="failed")  # fmt: skip
        raise ServiceError(f"gateway {gw} did not answer the signed rebirth command within {timeout:g} s") from None
    out = TestOut(gateway=gw, request_id=r.request_id, ok=r.ok,
                  error=None if r.error is None else msgspec.to_builtins(r.error),
                  round_trip_ms=round((time.perf_counter() - t0) * 1000, 1))  # fmt: skip
    async with st.db.write() as c:
        await audit.record(c, p, f"gateway.{what}", "gateway", gw, after=out, outcome="ok" if r.ok else "failed")
    return out


class GatewayLinkController(Controller):
    path = "/api/v1/gateways"
    tags = ["gateways"]

    @get("/{gw:str}/link", opt={"perm": (ObjectType.GATEWAY, Action.READ), "id": "gw"}, guards=[permitted])
    async def link(self, request: Request[Any, Any, Any], gw: FromPath[str]) -> LinkOut:
        """The gateway's last birth (doors, readers, software, journal depth, warnings) or will, as the site
        link holds it, and the command key's status (the gateway's, the service's, a pending rotation)."""
        return await _link(request, gw)

    @post("/{gw:str}/test", opt={"command": "rebirth"}, guards=[command_permitted], status_code=200)
    async def test(self, request: Request[Any, Any, Any], gw: FromPath[str], timeout: Timeout = 15.0) -> TestOut:
        """Test the connection: a signed rebirth command and the gateway's answer (round trip in ms)."""
        return await _test(request, gw, timeout, "test")

    @post("/{gw:str}/refresh", opt={"command": "rebirth"}, guards=[command_permitted], status_code=200)
    async def refresh(self, request: Request[Any, Any, Any], gw: FromPath[str], timeout: Timeout = 15.0) -> RefreshOut:
        """Ask the gateway for a new birth (signed rebirth command) and answer with what it announced."""
        prov = _provisioner(request)
        assert prov.link is not None
        before = prov.link.status.get(gw)
        before_ts = before.ts if isinstance(before, Birth) else None
        result = await _test(request, gw, timeout, "refresh")
        link = prov.link

        def reborn() -> bool:
            b = link.status.get(gw)
            return isinstance(b, Birth) and b.ts != before_ts

        new = False
        if result.ok:  # the gateway publishes the birth before it answers: it is usually in already
            try:
                new = await link.wait_for(reborn, 5.0)
            except TimeoutError:
                new = False
        return RefreshOut(test=result, link=await _link(request, gw), new_birth=new)
