"""/api/v1/site-key/rotation: rotating the site's signing key from the service (the console's gateway page).

A rotation has three steps, each a signed `rotate_key` command (docs/protocol.md §6, §9) and each audited:

1. **start** (`POST .../rotation`): a new Ed25519 key is made and stored like the current one (PKCS#8 PEM
   encrypted with the site passphrase, meta `site_key_pending`; only fingerprints are ever logged or shown).
   Every online gateway is sent `RotateKey(new, not_before=now + WINDOW_S)` signed with the current key: it
   stores the new key and keeps verifying commands with the old one, while provisioning signed with either
   is accepted. Its ok is its acknowledgement; a gateway offline is sent it when it is back (its birth).
2. **commit** (`POST .../rotation/commit`): once every gateway acknowledged (or earlier, `force`, by the
   operator's choice), each acknowledged gateway is sent `RotateKey(new)` without `not_before`, signed with
   the old key still in use there: from its ok on it obeys the new key only. The new key becomes `site_key`
   (the old one stays encrypted as `site_key_previous`) and the service signs everything with it. A gateway
   that was left behind is moved over with the previous key when it is next seen (its birth names its key).
3. **abort** (`POST .../rotation/abort`): each acknowledged gateway is sent `RotateKey(old)` (signed with the
   old key) and forgets the pending one; the new key is deleted. A gateway offline then is put back at its
   next birth.

Each step needs update on the site key (`site_key:<site>`) and a session re-authenticated within
`operators.REAUTH_S` (the operator's password again); an API token is refused. The rotation's state (the
fingerprints, who and when, and per gateway: acknowledged, moved, restored, offline or the error) is one JSON
document in meta `key_rotation`; `GET .../rotation` shows it (read on the gateways).
"""

# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from litestar import Controller, Request, get, post
from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler
from litestar.params import JSONBody
from msgspec import Meta
from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncConnection

from cloud_bridge.permissions import Action, ObjectType, Target
from cloud_bridge.protocol import Birth, CommandResult, RotateKey
from cloud_bridge.signing import fingerprint, public_bytes

from . import audit, schema, site
from .auth import Principal
from .core import ServiceState, authorizer, permitted, principal_of, state_of
from .errors import Conflict, ServiceError
from .operators import recently_authenticated
from .provisioning import Provisioner

log = logging.getLogger("cloud_bridge.service.key_rotation")

#: How long a started rotation may stay pending on a gateway before the new key takes over there by itself
#: (`not_before`): far enough that commit or abort always come first.
WINDOW_S = 365 * 86400.0
META = "key_rotation"
#: Who the audit log names for what the service does by itself (a gateway moved over at its birth).
SERVICE_ACTOR = "service (key rotation)"


class GatewayRotation(msgspec.Struct, kw_only=True):
    #: acknowledged (holds the new key, still obeys the old one) | moved (obeys the new key) | restored (back
    #: on the old key after an abort) | offline (not reached yet) | error
    state: str
    at: float
    detail: str = ""


class Rotation(msgspec.Struct, kw_only=True):
    #: pending | committed | aborted
    state: str
    old: str
    new: str
    started_at: float
    started_by: str
    finished_at: float | None = None
    finished_by: str | None = None
    gateways: dict[str, GatewayRotation] = {}

    def waiting_for(self) -> list[str]:
        """The gateways that have not acknowledged the pending key yet."""
        return sorted(g for g, r in self.gateways.items() if r.state != "acknowledged")


class StartIn(msgspec.Struct, forbid_unknown_fields=True):
    #: How long to wait for each online gateway's answer.
    timeout: Annotated[float, Meta(gt=0, le=120)] = 15.0


class CommitIn(msgspec.Struct, forbid_unknown_fields=True):
    #: Commit although some gateways have not acknowledged (they are moved over when they are next seen).
    force: bool = False
    timeout: Annotated[float, Meta(gt=0, le=120)] = 15.0


class AbortIn(msgspec.Struct, forbid_unknown_fields=True):
    timeout: Annotated[float, Meta(gt=0, le=120)] = 15.0


class RotationOut(msgspec.Struct, kw_only=True):
    #: The fingerprint of the key the service signs with now.
    current: str | None
    #: The last rotation (None: never rotated from the service).
    rotation: Rotation | None


_dec = msgspec.json.Decoder(Rotation)


async def set_meta(c: AsyncConnection, key: str, value: str | None) -> None:
    await c.execute(delete(schema.meta).where(schema.meta.c.key == key))
    if value is not None:
        await c.execute(schema.meta.insert().values(key=key, value=value))


async def load(c: AsyncConnection) -> Rotation | None:
    raw = await site.meta(c, META)
    return None if raw is None else _dec.decode(raw)


async def _save(c: AsyncConnection, r: Rotation) -> None:
    await set_meta(c, META, msgspec.json.encode(r).decode())


def _lock(st: ServiceState) -> asyncio.Lock:
    lock: asyncio.Lock = st.extra.setdefault("key_rotation_lock", asyncio.Lock())
    return lock


def _passphrase(st: ServiceState) -> str:
    pw = st.cfg.passphrase()
    if not pw:
        raise ServiceError("rotating the site key needs the site passphrase (CLOUD_BRIDGE_PASSPHRASE)")
    return pw


def _provisioner(st: ServiceState) -> Provisioner:
    prov = st.provisioner
    if prov is None or prov.link is None:
        raise ServiceError("the service has no site link (no site passphrase, or no broker): nothing to rotate")
    return prov


async def _send(st: ServiceState, gw: str, key: Ed25519PrivateKey, to: bytes, *, not_before: float | None,
                operator: str, timeout: float, also: Ed25519PrivateKey | None = None) -> str:  # fmt: skip
    """Send `gw` a RotateKey to `to` signed with `key` (and, refused as bad_signature/replayed, once more
    signed with `also`: a gateway that already holds `to` answers ok); "" when it said ok, else the error."""
    link = _provisioner(st).link
    assert link is not None
    action = RotateKey(new_public_key=to.hex(), not_before=not_before)
    try:
        r: CommandResult = await link.command(gw, key, action, operator=operator, timeout=timeout)
        if not r.ok and also is not None and r.error is not None and r.error.code in ("bad_signature", "replayed"):
            r = await link.command(gw, also, action, operator=operator, timeout=timeout)
    except TimeoutError:
        return "no answer in time"
    if r.ok:
        return ""
    return f"{r.error.code}: {r.error.message}" if r.error is not None else "refused"


async def _gateways(st: ServiceState) -> list[str]:
    """Every gateway of the site: the service's database and the status messages the link holds (a gateway
    just born may not be in the database yet)."""
    async with st.db.read() as c:
        rows = await c.execute(select(schema.gateways.c.id))
        out = {str(g) for g in rows.scalars()}
    prov = _provisioner(st)
    if prov.link is not None:
        out.update(prov.link.status)
    return sorted(out)


async def _each(st: ServiceState, gws: list[str],
                step: Callable[[str], Awaitable[tuple[str, str]]]) -> dict[str, GatewayRotation]:
    """Run `step(gw)` (-> (state, detail)) for every gateway at once; an offline one is "offline"."""
    link = _provisioner(st).link
    assert link is not None

    async def one(gw: str) -> GatewayRotation:
        if not link.online(gw):
            return GatewayRotation(state="offline", at=time.time())
        state, detail = await step(gw)
        return GatewayRotation(state=state, at=time.time(), detail=detail)

    results = await asyncio.gather(*(one(g) for g in gws))
    return dict(zip(gws, results, strict=True))


async def _keys(st: ServiceState) -> tuple[Ed25519PrivateKey, Ed25519PrivateKey | None, Ed25519PrivateKey | None]:
    """(current, pending, previous) site keys, decrypted."""
    pw = _passphrase(st)
    async with st.db.read() as c:
        cur = await site.meta(c, "site_key")
        pend = await site.meta(c, "site_key_pending")
        prev = await site.meta(c, "site_key_previous")
    if cur is None:
        raise ServiceError("the site has no signing key")
    return (site.decrypt_key(cur, pw), site.decrypt_key(pend, pw) if pend else None,
            site.decrypt_key(prev, pw) if prev else None)  # fmt: skip


def _fp(k: Ed25519PrivateKey) -> str:
    return fingerprint(public_bytes(k))


async def start(st: ServiceState, p: Principal, timeout: float) -> Rotation:
    async with _lock(st):
        _provisioner(st)
        pw = _passphrase(st)
        current, pending, _ = await _keys(st)
        if pending is not None:
            raise Conflict("a key rotation is pending already: commit or abort it first")
        new = Ed25519PrivateKey.generate()
        now = time.time()
        gws = await _gateways(st)
        rot = Rotation(state="pending", old=_fp(current), new=_fp(new), started_at=now, started_by=p.operator.id,
                       gateways={g: GatewayRotation(state="offline", at=now) for g in gws})  # fmt: skip
        async with st.db.write() as c:  # the new key is stored (encrypted) before any gateway hears of it
            await set_meta(c, "site_key_pending", site.encrypt_key(new, pw))
            await _save(c, rot)
        log.warning("site key rotation started by %s: %s -> %s", p.operator.id, rot.old, rot.new)
        nb = now + WINDOW_S

        async def step(gw: str) -> tuple[str, str]:
            err = await _send(st, gw, current, public_bytes(new), not_before=nb, operator=p.operator.id,
                              timeout=timeout)  # fmt: skip
            return ("error", err) if err else ("acknowledged", "")

        rot.gateways.update(await _each(st, gws, step))
        async with st.db.write() as c:
            await _save(c, rot)
            await audit.record(c, p, "site_key.rotation_start", "site_key", st.site.site if st.site else "",
                               after=rot)  # fmt: skip
        return rot


async def commit(st: ServiceState, p: Principal, force: bool, timeout: float) -> Rotation:
    async with _lock(st):
        prov = _provisioner(st)
        pw = _passphrase(st)
        current, pending, _ = await _keys(st)
        async with st.db.read() as c:
            rot = await load(c)
        if pending is None or rot is None or rot.state != "pending":
            raise Conflict("no key rotation is pending")
        gws = await _gateways(st)
        for g in gws:
            rot.gateways.setdefault(g, GatewayRotation(state="offline", at=time.time()))
        waiting = rot.waiting_for()
        if waiting and not force:
            raise Conflict(f"gateways have not acknowledged the new key yet: {', '.join(waiting)} (commit with "
                           "force to move on without them: they are moved over when they are next seen)")  # fmt: skip
        acked = [g for g in gws if rot.gateways[g].state == "acknowledged"]

        async def step(gw: str) -> tuple[str, str]:
            err = await _send(st, gw, current, public_bytes(pending), not_before=None, operator=p.operator.id,
                              timeout=timeout, also=pending)  # fmt: skip
            return ("error", err) if err else ("moved", "")

        async with prov.lock:  # no publish signs with the old key while the signer changes
            rot.gateways.update(await _each(st, acked, step))
            rot.state, rot.finished_at, rot.finished_by = "committed", time.time(), p.operator.id
            async with st.db.write() as c:
                await set_meta(c, "site_key_previous", site.encrypt_key(current, pw))
                await set_meta(c, "site_key", site.encrypt_key(pending, pw))
                await set_meta(c, "site_key_pending", None)
                await set_meta(c, "site_key_rotated", str(time.time()))
                await _save(c, rot)
                await audit.record(c, p, "site_key.rotation_commit", "site_key", st.site.site if st.site else "",
                                   after=rot)  # fmt: skip
            _use(st, pending)
        log.warning("site key rotation committed by %s: the service signs with %s", p.operator.id, rot.new)
        return rot


def _use(st: ServiceState, key: Ed25519PrivateKey) -> None:
    """From now on every downlink and command of this service is signed with `key`."""
    prov = st.provisioner
    if prov is not None:
        prov.key = key
        if prov.link is not None:
            prov.link.signing_key = key
    col = st.extra.get("collector")
    if col is not None:
        col.signing_key = key


async def abort(st: ServiceState, p: Principal, timeout: float) -> Rotation:
    async with _lock(st):
        _provisioner(st)
        current, pending, _ = await _keys(st)
        async with st.db.read() as c:
            rot = await load(c)
        if pending is None or rot is None or rot.state != "pending":
            raise Conflict("no key rotation is pending")
        acked = [g for g, r in rot.gateways.items() if r.state == "acknowledged"]

        async def step(gw: str) -> tuple[str, str]:
            err = await _send(st, gw, current, public_bytes(current), not_before=None, operator=p.operator.id,
                              timeout=timeout)  # fmt: skip
            return ("error", err) if err else ("restored", "")

        done = await _each(st, acked, step)
        for g, r in done.items():  # one offline keeps "acknowledged": it is put back at its next birth
            if r.state != "offline":
                rot.gateways[g] = r
        rot.state, rot.finished_at, rot.finished_by = "aborted", time.time(), p.operator.id
        async with st.db.write() as c:
            await set_meta(c, "site_key_pending", None)
            await _save(c, rot)
            await audit.record(c, p, "site_key.rotation_abort", "site_key", st.site.site if st.site else "",
                               after=rot)  # fmt: skip
        log.warning("site key rotation %s -> %s aborted by %s", rot.old, rot.new, p.operator.id)
        return rot


async def catch_up(st: ServiceState, b: Birth) -> None:
    """A gateway is back (its birth): bring it to where the rotation is (pending key, new key, or back)."""
    gw = b.gateway
    async with _lock(st):
        async with st.db.read() as c:
            rot = await load(c)
        if rot is None:
            return
        entry = rot.gateways.get(gw)
        held = entry.state if entry is not None else None
        # what this gateway needs, decided before any key is decrypted (a birth without work costs no KDF)
        if rot.state == "pending" and held != "acknowledged":
            state = "acknowledged"
        elif rot.state == "committed" and b.key == rot.old:
            state = "moved"
        elif rot.state == "committed" and b.key == rot.new and held != "moved":
            state = "moved"  # it moved (its answer to the commit was lost): only recorded
        elif rot.state == "aborted" and held == "acknowledged":
            state = "restored"
        else:
            return
        err = ""
        if not (rot.state == "committed" and b.key == rot.new):
            current, pending, previous = await _keys(st)
            if state == "acknowledged" and pending is not None:
                err = await _send(st, gw, current, public_bytes(pending), not_before=time.time() + WINDOW_S,
                                  operator=SERVICE_ACTOR, timeout=15.0)  # fmt: skip
            elif state == "moved" and previous is not None:
                err = await _send(st, gw, previous, public_bytes(current), not_before=None, operator=SERVICE_ACTOR,
                                  timeout=15.0, also=current)  # fmt: skip
            elif state == "restored":
                err = await _send(st, gw, current, public_bytes(current), not_before=None, operator=SERVICE_ACTOR,
                                  timeout=15.0)  # fmt: skip
            else:
                return  # the key it needs is not kept (more than one rotation back): link.command_key by hand
        rot.gateways[gw] = GatewayRotation(state="error" if err else state, at=time.time(), detail=err)
        async with st.db.write() as c:
            await _save(c, rot)
            await audit.record(c, SERVICE_ACTOR, f"site_key.rotation_{state}", "gateway", gw,
                               after=rot.gateways[gw], outcome="failed" if err else "ok", via="service")  # fmt: skip
        log.info("key rotation %s -> %s: gateway %s %s%s", rot.old, rot.new, gw, state,
                 f" failed: {err}" if err else "")  # fmt: skip


def attach(st: ServiceState) -> None:
    """Follow the births of the service's site link (call once provisioning runs)."""
    prov = st.provisioner
    if prov is None or prov.link is None:
        return
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = st.extra.setdefault("key_rotation_tasks", set())

    async def guarded(b: Birth) -> None:
        try:
            await catch_up(st, b)
        except Exception:  # the next birth tries again
            log.exception("key rotation: catching up gateway %s failed", b.gateway)

    def on_birth(b: Birth) -> None:
        t = loop.create_task(guarded(b), name=f"key_rotation.catch_up[{b.gateway}]")
        tasks.add(t)
        t.add_done_callback(tasks.discard)

    prov.link.on_birth.append(on_birth)
    for b in list(prov.link.status.values()):  # the births that came in before (retained): caught up too
        if isinstance(b, Birth):
            on_birth(b)


async def may_rotate(conn: ASGIConnection[Any, Any, Any, Any], _h: BaseRouteHandler) -> None:
    """The guard of every step: update on the site key, then a recent re-authentication."""
    st, p = state_of(conn), principal_of(conn)
    (await authorizer(st.db)).require(p.operator, Action.UPDATE, Target(ObjectType.SITE_KEY,
                                                                        st.site.site if st.site else "*"))  # fmt: skip
    await recently_authenticated(conn, _h)


async def status(st: ServiceState) -> RotationOut:
    async with st.db.read() as c:
        rot = await load(c)
    prov = st.provisioner
    return RotationOut(current=_fp(prov.key) if prov is not None else None, rotation=rot)


class KeyRotationController(Controller):
    path = "/api/v1/site-key/rotation"
    tags = ["gateways"]

    @get("/", opt={"perm": (ObjectType.GATEWAY, Action.READ)}, guards=[permitted])
    async def get_rotation(self, request: Request[Any, Any, Any]) -> RotationOut:
        """The last key rotation: its fingerprints, state, and each gateway's (acknowledged, moved, ...)."""
        return await status(state_of(request))

    @post("/", guards=[may_rotate], status_code=200)
    async def start_rotation(self, request: Request[Any, Any, Any],
                             data: JSONBody[StartIn | None] = None) -> RotationOut:
        """Start a rotation: a new key, announced to every online gateway (signed with the current key)."""
        st = state_of(request)
        await start(st, principal_of(request), (data or StartIn()).timeout)
        return await status(st)

    @post("/commit", guards=[may_rotate], status_code=200)
    async def commit_rotation(self, request: Request[Any, Any, Any],
                              data: JSONBody[CommitIn | None] = None) -> RotationOut:
        """Move every acknowledged gateway to the new key and sign with it from now on (409 while some have
        not acknowledged, unless `force`)."""
        st = state_of(request)
        d = data or CommitIn()
        await commit(st, principal_of(request), d.force, d.timeout)
        return await status(st)

    @post("/abort", guards=[may_rotate], status_code=200)
    async def abort_rotation(self, request: Request[Any, Any, Any],
                             data: JSONBody[AbortIn | None] = None) -> RotationOut:
        """Give the pending key up: every acknowledged gateway goes back to the current key only."""
        st = state_of(request)
        await abort(st, principal_of(request), (data or AbortIn()).timeout)
        return await status(st)
