"""The operator side as a library: every call is made *as an operator* and checked against the operator
permissions (`cloud_bridge.permissions`) before anything is changed or sent.

    svc = Service.init("site.db", site="s1", admin="root", host="127.0.0.1", port=1883, passphrase=pw)
    async with Service("site.db", operator="root", passphrase=pw) as svc:
        svc.put_group("staff", [("gw1", "door1")])
        svc.add_user("alice", card=1001, groups=["staff"])
        await svc.publish()                            # change sets out, acknowledged versions recorded
        await svc.unlock("gw1", "door1")               # signed with the site key

The site's Ed25519 signing key is kept in the database encrypted with a passphrase (never in plain text);
commands cannot be sent without the passphrase.

Key rotation is in band (`rotate_key`): each gateway is sent a `RotateKey` signed with the key it holds and
the new key becomes current once every online gateway acknowledged it. The database keeps every key a
gateway may still hold and, per gateway, the fingerprint of the key it acknowledged: each gateway's commands
are signed with its own key, and a gateway that was offline is moved over when it is next reached
(`sync_keys`, run by `publish` and before a command).
"""

# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import Callable, Iterable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

import msgspec
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud_bridge.permissions import (
    SYSTEM_ADMINISTRATOR,
    Action,
    Authorizer,
    ObjectType,
    Operator,
    PermissionGroup,
    Target,
)
from cloud_bridge.protocol import (
    Birth,
    CommandResult,
    OsdpFirmware,
    OsdpFirmwareChunk,
    ReaderAction,
    RotateKey,
    Unlock,
)
from cloud_bridge.signing import fingerprint, key_id, public_bytes
from edge.model import Schedule

from . import csvimport, visitors
from .db import Model, NotFound, OperatorError, check_ident, check_name
from .provision import SiteLink, plan

_op_dec = msgspec.json.Decoder(Operator)
_grp_dec = msgspec.json.Decoder(PermissionGroup)


def _encrypt(key: Ed25519PrivateKey, passphrase: str) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(passphrase.encode()),
    ).decode()  # fmt: skip


@dataclass
class KeyRotation:
    """The outcome of `Service.rotate_key`: the new public key (hex) and its fingerprint; `current` when it is
    now the site key (every online gateway acknowledged it); per gateway "ok", "offline" (it is moved over
    when it comes back) or "error: ..." (the rotation stays pending: run it again)."""

    public_key: str
    fingerprint: str
    current: bool
    gateways: dict[str, str] = field(default_factory=dict)


@dataclass
class DoorGroups:
    id: str
    name: str
    #: the groups whose doors include this one
    groups: list[str] = field(default_factory=list)


@dataclass
class GatewayDoors:
    """The outcome of `Service.refresh`: what the gateway announced in its fresh birth, and per door the
    groups that open it; `unknown_doors` are doors groups name that the gateway did not announce."""

    gateway: str
    software: str
    rights_version: int
    doors: list[DoorGroups] = field(default_factory=list)
    unknown_doors: list[str] = field(default_factory=list)


class Service:
    def __init__(self, db: Path | str, *, operator: str, passphrase: str | None = None, resend_s: float = 5.0) -> None:
        self.db = Model(db)
        self.db.con.execute("CREATE TABLE IF NOT EXISTS permission_groups (id TEXT PRIMARY KEY, body BLOB NOT NULL)")
        site = self.db.get_meta("site")
        if site is None:
            raise OperatorError(f"{db}: not initialised (cloud-bridge init)")
        self.site = site
        self.tz = self.db.get_meta("tz", "UTC") or "UTC"
        self.host = self.db.get_meta("host", "127.0.0.1") or "127.0.0.1"
        self.port = int(self.db.get_meta("port", "1883") or 1883)
        self.passphrase = passphrase
        self.resend_s = resend_s
        self.operator = self._operator(operator)
        self._stack = AsyncExitStack()
        self._link: SiteLink | None = None
        #: What the last `plan`/`publish` could not send, one line each ("user 'x' on gw1: ..."): a row that
        #: would not fit one message is held back, every other change still goes out.
        self.not_sent: list[str] = []

    # --- setup ----------------------------------------------------------------------------------------

    @classmethod
    def init(cls, db: Path | str, *, site: str, admin: str, host: str = "127.0.0.1", port: int = 1883,
             tz: str = "UTC", passphrase: str) -> Service:  # fmt: skip
        """Create a site database with its signing key and a first operator in System Administrator."""
        from zoneinfo import ZoneInfo

        from cloud_bridge.topics import check_name

        check_name("site", site)
        ZoneInfo(tz)
        m = Model(db)
        m.con.execute("CREATE TABLE IF NOT EXISTS permission_groups (id TEXT PRIMARY KEY, body BLOB NOT NULL)")
        if m.get_meta("site") is not None:
            raise OperatorError(f"{db} is already initialised for site {m.get_meta('site')!r}")
        with m.tx():
            for k, v in (("site", site), ("tz", tz), ("host", host), ("port", str(port)),
                         ("site_key", _encrypt(Ed25519PrivateKey.generate(), passphrase))):  # fmt: skip
                m.set_meta(k, v)
            op = Operator(id=admin, groups=[SYSTEM_ADMINISTRATOR.id])
            m.con.execute("INSERT INTO operators (id, body) VALUES (?, ?)", (admin, msgspec.json.encode(op)))
        m.close()
        return cls(db, operator=admin, passphrase=passphrase)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._stack.aclose()
        self._link = None

    def close(self) -> None:
        self.db.close()

    async def link(self) -> SiteLink:
        if self._link is None:
            self._link = await self._stack.enter_async_context(
                SiteLink(self.db, host=self.host, port=self.port, site=self.site, resend_s=self.resend_s,
                         signing_key=self.signing_key())
            )
        return self._link

    # --- permissions ----------------------------------------------------------------------------------

    def _operator(self, oid: str) -> Operator:
        row = self.db.con.execute("SELECT body FROM operators WHERE id=?", (oid,)).fetchone()
        if row is None:
            raise NotFound(f"no operator {oid!r}")
        return _op_dec.decode(row[0])

    def authorizer(self) -> Authorizer:
        return Authorizer(_grp_dec.decode(r[0]) for r in self.db.con.execute("SELECT body FROM permission_groups"))

    def require(self, action: Action, target: Target) -> None:
        self.authorizer().require(self.operator, action, target)

    def _gw_target(self, gw: str) -> Target:
        return Target.for_gateway(gw)

    def _door_tags(self, gw: str, door: str) -> set[str]:
        """A door carries the tags of the groups that open it."""
        rows = self.db.con.execute("SELECT g.tags FROM groups g JOIN group_doors d ON d.group_id=g.id "
                                   "WHERE d.gateway=? AND d.door=?", (gw, door))  # fmt: skip
        return {t for (tags,) in rows for t in str(tags).split(",") if t}

    # --- operators ------------------------------------------------------------------------------------

    def put_permission_group(self, group: PermissionGroup) -> None:
        self.require(Action.UPDATE, Target(ObjectType.OPERATOR, f"group:{group.id}"))
        Authorizer([group])  # validates (reserved id...)
        with self.db.tx() as c:
            c.execute("INSERT OR REPLACE INTO permission_groups (id, body) VALUES (?, ?)",
                      (group.id, msgspec.json.encode(group)))  # fmt: skip

    def add_operator(self, oid: str, groups: Iterable[str] = (), *, name: str = "") -> None:
        self.require(Action.CREATE, Target(ObjectType.OPERATOR, oid))
        known = self.authorizer().groups
        for g in groups:
            if g not in known:
                raise NotFound(f"unknown permission group {g!r}")
        op = Operator(id=oid, name=name, groups=list(groups))
        with self.db.tx() as c:
            if c.execute("SELECT 1 FROM operators WHERE id=?", (oid,)).fetchone():
                raise OperatorError(f"operator {oid!r} already exists")
            c.execute("INSERT INTO operators (id, body) VALUES (?, ?)", (oid, msgspec.json.encode(op)))

    def grant(self, oid: str, group: str) -> None:
        self.require(Action.UPDATE, Target(ObjectType.OPERATOR, oid))
        if group not in self.authorizer().groups:
            raise NotFound(f"unknown permission group {group!r}")
        op = self._operator(oid)
        new = msgspec.structs.replace(op, groups=[*dict.fromkeys([*op.groups, group])])
        with self.db.tx() as c:
            c.execute("UPDATE operators SET body=? WHERE id=?", (msgspec.json.encode(new), oid))

    # --- the site model -------------------------------------------------------------------------------

    def set_export_rules(self, *, delete_user_on_no_token: bool, delete_user_on_no_entitlement: bool) -> None:
        self.require(Action.UPDATE, Target(ObjectType.OPERATOR, "site-settings"))
        with self.db.tx():
            self.db.set_meta("deleteUserOnNoAccessToken", "1" if delete_user_on_no_token else "0")
            self.db.set_meta("deleteUserOnNoEntitlement", "1" if delete_user_on_no_entitlement else "0")

    def put_schedule(self, schedule: Schedule) -> None:
        self.require(Action.UPDATE, Target(ObjectType.SCHEDULE, schedule.id))
        self.db.put_schedule(msgspec.msgpack.encode(schedule), schedule.id)

    def put_group(self, gid: str, doors: list[tuple[str, str]], *, name: str = "", schedule: str | None = None,
                  tags: list[str] | None = None) -> None:  # fmt: skip
        exists = self.db.group_exists(gid)
        tags_now = set(self.db.group_tags(gid)) | set(tags or [])
        self.require(Action.UPDATE if exists else Action.CREATE, Target(ObjectType.GROUP, gid, frozenset(tags_now)))
        self.db.put_group(gid, doors, name=name, schedule=schedule, tags=tags)

    def delete_group(self, gid: str) -> None:
        self.require(Action.DELETE, Target(ObjectType.GROUP, gid, frozenset(self.db.group_tags(gid))))
        self.db.delete_group(gid)

    def add_user(self, uid: str, *, name: str = "", card: int | None = None, groups: list[str] | None = None,
                 active: bool = True, offline_access: bool = False) -> None:  # fmt: skip
        check_ident("user", uid)
        self.require(Action.CREATE, Target(ObjectType.USER, uid))
        if card is not None:
            self.require(Action.CREATE, Target(ObjectType.CREDENTIAL, str(card)))
        self.db.add_user(uid, name=name, card=card, groups=groups, active=active, offline_access=offline_access)

    def set_active(self, uid: str, active: bool) -> None:
        """Activate or deactivate a user's access (seed 001 "Access control: Activate")."""
        self.require(Action.UPDATE, Target(ObjectType.USER, uid))
        self.db.update_user(uid, active=active)

    def set_offline_access(self, uid: str, offline_access: bool) -> None:
        self.require(Action.UPDATE, Target(ObjectType.USER, uid))
        self.db.update_user(uid, offline_access=offline_access)

    def delete_user(self, uid: str) -> None:
        """Delete a user; its cards are freed for reassignment."""
        self.require(Action.DELETE, Target(ObjectType.USER, uid))
        self.db.delete_user(uid)

    def add_credential(self, uid: str, card: int, *, status: str = "active",
                       valid_from: float | None = None, valid_until: float | None = None) -> None:  # fmt: skip
        self.require(Action.CREATE, Target(ObjectType.CREDENTIAL, str(card)))
        self.db.add_credential(uid, card, status=status, valid_from=valid_from, valid_until=valid_until)

    def set_credential_status(self, card: int, status: str) -> None:
        self.require(Action.UPDATE, Target(ObjectType.CREDENTIAL, str(card)))
        self.db.set_credential_status(card, status)

    def assign(self, uid: str, gid: str, *, valid_from: float | None = None, valid_until: float | None = None) -> int:
        self.require(Action.UPDATE, Target(ObjectType.USER, uid))
        self.require(Action.READ, Target(ObjectType.GROUP, gid, frozenset(self.db.group_tags(gid))))
        return self.db.assign(uid, gid, valid_from=valid_from, valid_until=valid_until)

    def import_csv(self, text: bytes | str | Iterable[str], *, encoding: str = "utf-8",
                   progress: Callable[[int, int], None] | None = None) -> csvimport.Report:  # fmt: skip
        """Bulk load (all or nothing). Bytes are decoded as `encoding` (UTF-8: with or without a BOM).
        Raises `csvimport.ImportFailed` with the report naming every bad line."""
        self.require(Action.CREATE, Target(ObjectType.USER, "import"))
        self.require(Action.CREATE, Target(ObjectType.CREDENTIAL, "import"))
        return csvimport.load(self.db, text, encoding=encoding, progress=progress)

    # --- visitors -------------------------------------------------------------------------------------

    def add_badge(self, location: str, card: str | int, *, name: str = "", badge_type: str = "") -> int:
        self.require(Action.CREATE, Target(ObjectType.BADGE_POOL, location))
        check_name("badge", name)
        check_name("badge type", badge_type)
        return visitors.add_badge(self.db, location, card, name=name, badge_type=badge_type)

    def issue_visitor(self, visitor: str, *, location: str, badge: int, groups: list[str],
                      until: float | None = None, now: float | None = None) -> tuple[int, str, float]:  # fmt: skip
        self.require(Action.CREATE, Target(ObjectType.VISITOR, visitor))
        check_name("visitor", visitor)
        self.require(Action.READ, Target(ObjectType.BADGE_POOL, location))
        for g in groups:
            self.require(Action.READ, Target(ObjectType.GROUP, g, frozenset(self.db.group_tags(g))))
        return visitors.issue(self.db, visitor=visitor, location=location, badge=badge, groups=groups, tz=self.tz,
                              now=now, until=until)  # fmt: skip

    def sign_out(self, visit: int) -> str:
        self.require(Action.UPDATE, Target(ObjectType.VISITOR, str(visit)))
        return visitors.sign_out(self.db, visit)

    # --- provisioning and commands (network) ----------------------------------------------------------

    def plan(self, *, now: float | None = None) -> dict[str, int]:
        """Compute the pending change sets of every gateway this operator may provision (UPDATE gateway)."""
        gws = [g for g in self.db.gateways()
               if self.authorizer().check(self.operator, Action.UPDATE, self._gw_target(g)).allowed]  # fmt: skip
        refused = sorted(set(self.db.gateways()) - set(gws))
        if refused and not gws:
            self.require(Action.UPDATE, self._gw_target(refused[0]))
        self.not_sent = []
        return plan(self.db, now=now, gateways=gws, refused=self.not_sent)

    async def publish(self, *, timeout: float = 60.0, wait_online_s: float = 0.0) -> dict[str, int | str]:
        """Plan, then push every online gateway and wait for its acknowledgement."""
        link = await self.link()
        if wait_online_s > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.sleep(0)
                await link.wait_for(lambda: all(link.online(g) for g in self.db.gateways()), wait_online_s)
        self.plan()
        allowed = [g for g in self.db.gateways()
                   if self.authorizer().check(self.operator, Action.UPDATE, self._gw_target(g)).allowed]  # fmt: skip
        if self.passphrase:  # gateways back from an outage during a key rotation are moved over first
            await self.sync_keys(allowed, timeout=min(timeout, 30.0))
        return await link.push_all(allowed, timeout=timeout)

    def signing_key(self) -> Ed25519PrivateKey:
        pem = self.db.get_meta("site_key")
        assert pem is not None
        return self._decrypt(pem)

    def public_key_hex(self) -> str:
        return public_bytes(self.signing_key()).hex()

    def _decrypt(self, pem: str) -> Ed25519PrivateKey:
        if not self.passphrase:
            raise OperatorError("the site key passphrase is needed to sign commands (CLOUD_BRIDGE_PASSPHRASE)")
        try:
            key = serialization.load_pem_private_key(pem.encode(), self.passphrase.encode())
        except (ValueError, TypeError):
            raise OperatorError("wrong passphrase for the site key") from None
        assert isinstance(key, Ed25519PrivateKey)
        return key

    def _target_key(self) -> Ed25519PrivateKey:
        """The key gateways are being moved to: a rotation still pending, else the current key."""
        pending = self.db.get_meta("site_key_pending")
        return self._decrypt(pending) if pending else self.signing_key()

    def key_for(self, gateway: str) -> Ed25519PrivateKey:
        """The private key matching the command key `gateway` acknowledged holding."""
        current = self.signing_key()
        fp = self.db.gateway_key(gateway)
        if fp is None or fp == fingerprint(public_bytes(current)):
            return current
        pem = self.db.archived_key(fp)
        if pem is None:
            raise OperatorError(f"gateway {gateway} holds command key {fp}, which this database does not have")
        return self._decrypt(pem)

    async def _move_key(self, gateway: str, new: Ed25519PrivateKey, timeout: float) -> str:
        """Send one gateway a RotateKey to `new`, signed with the key it holds; record its ok."""
        link = await self.link()
        new_pub = public_bytes(new)
        action = RotateKey(new_public_key=new_pub.hex())
        try:
            r = await link.command(gateway, self.key_for(gateway), action, operator=self.operator.id,
                                   timeout=timeout)  # fmt: skip
            if not r.ok and r.error is not None and r.error.code in ("bad_signature", "replayed"):
                # it may hold the new key already (the answer to an earlier rotation was lost): rotating to the
                # key in use is an ok that changes nothing, so ask with the new key
                r = await link.command(gateway, new, action, operator=self.operator.id, timeout=timeout)
        except TimeoutError:
            return "error: no answer in time"
        if not r.ok:
            return f"error: {r.error.code}: {r.error.message}" if r.error else "error: refused"
        with self.db.tx():
            self.db.set_gateway_key(gateway, fingerprint(new_pub), time.time())
        return "ok"

    async def rotate_key(self, *, timeout: float = 30.0, wait_online_s: float = 0.0) -> KeyRotation:
        """Rotate the site's command key in band (needs update on the site key).

        A new key is made (or the pending one of an unfinished rotation reused) and kept encrypted; every
        online gateway is sent a `RotateKey` signed with the key it holds and its ok awaited. Only when every
        online gateway acknowledged is the new key made current (the old one stays, encrypted, for the
        gateways that were offline: `sync_keys` moves them over when they are back)."""
        self.require(Action.UPDATE, Target(ObjectType.SITE_KEY, self.site))
        old = self.signing_key()
        old_fp = fingerprint(public_bytes(old))
        assert self.passphrase is not None
        pending = self.db.get_meta("site_key_pending")
        new = self._decrypt(pending) if pending else Ed25519PrivateKey.generate()
        new_pub = public_bytes(new)
        now = time.time()
        with self.db.tx():
            if not pending:
                self.db.set_meta("site_key_pending", _encrypt(new, self.passphrase))
            for k in (old, new):
                pub = public_bytes(k)
                self.db.archive_key(fingerprint(pub), pub.hex(), _encrypt(k, self.passphrase), now)
            for gw in self.db.gateways():
                if self.db.gateway_key(gw) is None:
                    self.db.set_gateway_key(gw, old_fp, None)
        link = await self.link()
        if wait_online_s > 0:
            with contextlib.suppress(TimeoutError):
                await link.wait_for(lambda: all(link.online(g) for g in self.db.gateways()), wait_online_s)

        async def one(gw: str) -> str:
            if self.db.gateway_key(gw) == fingerprint(new_pub):
                return "ok"
            if not link.online(gw):
                return "offline"
            return await self._move_key(gw, new, timeout)

        async with asyncio.TaskGroup() as tg:
            tasks = {gw: tg.create_task(one(gw), name=f"rotate[{gw}]") for gw in self.db.gateways()}
        results = {gw: t.result() for gw, t in tasks.items()}
        done = not any(v.startswith("error") for v in results.values())
        if done:
            with self.db.tx():
                self.db.set_meta("site_key_previous", _encrypt(old, self.passphrase))
                self.db.set_meta("site_key", _encrypt(new, self.passphrase))
                self.db.con.execute("DELETE FROM meta WHERE key='site_key_pending'")
                self.db.set_meta("site_key_rotated", str(time.time()))
        return KeyRotation(public_key=new_pub.hex(), fingerprint=fingerprint(new_pub), current=done, gateways=results)

    async def sync_keys(self, gateways: Iterable[str] | None = None, *, timeout: float = 30.0) -> dict[str, str]:
        """Move every online gateway (of `gateways`) that holds an older command key to the site key (or to the
        key of a pending rotation). Returns {gateway: "ok" | "error: ..."} for the gateways it tried."""
        if (
            self.db.get_meta("site_key_pending") is None
            and not self.db.con.execute("SELECT 1 FROM gateway_keys LIMIT 1").fetchone()
        ):
            return {}  # no rotation ever: every gateway holds the key it was configured with
        target = self._target_key()
        target_fp = fingerprint(public_bytes(target))
        current_fp = fingerprint(public_bytes(self.signing_key()))
        link = await self.link()
        todo = [g for g in (gateways if gateways is not None else self.db.gateways())
                if (self.db.gateway_key(g) or current_fp) != target_fp and link.online(g)]  # fmt: skip
        out: dict[str, str] = {}
        for gw in todo:
            out[gw] = await self._move_key(gw, target, timeout)
        return out

    def key_id(self) -> str:
        return key_id(public_bytes(self.signing_key()))

    async def unlock(self, gateway: str, door: str, *, seconds: float = 5.0, timeout: float = 30.0) -> CommandResult:
        """Remote unlock: needs read + publish(unlock) on the door and on the gateway (seed 003); refused
        before anything is sent otherwise."""
        self.authorizer().require_command(self.operator, "unlock", gateway, door,
                                          door_tags=self._door_tags(gateway, door))  # fmt: skip
        link = await self.link()
        await self.sync_keys([gateway], timeout=timeout)  # a gateway back from an outage gets the new key first
        key = self.key_for(gateway)
        return await link.command(gateway, key, Unlock(door=door, seconds=seconds), operator=self.operator.id,
                                  timeout=timeout)  # fmt: skip

    async def reader_command(self, gateway: str, action: ReaderAction, *, timeout: float = 30.0) -> CommandResult:
        """An OSDP reader command (key rotation, output): read + publish(kind) on the gateway."""
        kind = str(type(action).__struct_config__.tag)
        self.authorizer().require_command(self.operator, kind, gateway)
        link = await self.link()
        await self.sync_keys([gateway], timeout=timeout)
        return await link.command(gateway, self.key_for(gateway), action, operator=self.operator.id, timeout=timeout)

    async def send_firmware(self, gateway: str, reader: str, data: bytes, *, file_type: int = 1,
                            chunk: int = 32 * 1024, timeout: float = 30.0,
                            progress: Callable[[int, int], None] | None = None) -> CommandResult:  # fmt: skip
        """Stage `data` on the gateway as signed `osdp_firmware_chunk` commands (resuming where the gateway
        says it stopped), then start the transfer to `reader` (`osdp_firmware`, its SHA-256 signed)."""
        self.authorizer().require_command(self.operator, "osdp_firmware", gateway)
        link = await self.link()
        await self.sync_keys([gateway], timeout=timeout)
        sha, size, offset = hashlib.sha256(data).hexdigest(), len(data), 0
        while True:
            piece = data[offset : offset + chunk]
            piece_cmd = OsdpFirmwareChunk(sha256=sha, size=size, offset=offset, data=piece)
            r = await link.command(gateway, self.key_for(gateway), piece_cmd, operator=self.operator.id,
                                   timeout=timeout)  # fmt: skip
            have = r.detail.get("have")
            if not isinstance(have, int) or (not r.ok and (r.error is None or r.error.code != "gap")):
                return r
            if progress is not None:
                progress(have, size)
            if r.detail.get("complete") is True:
                break
            offset = have
        return await link.command(gateway, self.key_for(gateway), OsdpFirmware(
            reader=reader, sha256=sha, size=size, file_type=file_type), operator=self.operator.id,
            timeout=timeout)  # fmt: skip

    async def refresh(self, gateway: str, *, timeout: float = 10.0) -> GatewayDoors:
        """Re-read a gateway's doors (a fresh birth) and list them with the groups that use them."""
        self.authorizer().require_command(self.operator, "rebirth", gateway)
        link = await self.link()
        b = await link.rebirth(gateway, timeout=timeout)
        rows = self.db.con.execute("SELECT door, group_id FROM group_doors WHERE gateway=? ORDER BY group_id",
                                   (gateway,))  # fmt: skip
        by_door: dict[str, list[str]] = {}
        for door, gid in rows:
            by_door.setdefault(str(door), []).append(str(gid))
        doors = self.db.doors_of(gateway)
        return GatewayDoors(
            gateway=gateway, software=b.software, rights_version=b.rights_version,
            doors=[DoorGroups(id=d, name=n, groups=by_door.get(d, [])) for d, n in doors.items()],
            unknown_doors=sorted(set(by_door) - set(doors)),
        )  # fmt: skip

    async def test(self, gateway: str, *, timeout: float = 10.0) -> Birth:
        """Check that a gateway answers: asks for a birth and waits for it (TimeoutError otherwise)."""
        self.require(Action.READ, self._gw_target(gateway))
        link = await self.link()
        return await link.rebirth(gateway, timeout=timeout)

    def require_collect(self) -> None:
        self.require(Action.READ, Target(ObjectType.EVENT, "all"))
