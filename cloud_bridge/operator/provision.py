"""Provisioning: per-gateway change sets (planning, synchronous) and their delivery (`SiteLink`, async).

Planning (`plan`) loads the site once, computes what every gateway must hold (`identity.gateway_state`),
diffs it against that gateway's *shadow* (what the cloud last decided to send it), and appends a versioned
change set to the gateway's outbox, or a snapshot when the change set would not fit one MQTT message (a
snapshot is atomic on the gateway too, and supersedes the outbox entries before it). Shadow and outbox are
written in the same transaction, so a crash never loses or duplicates a version.

Delivery (`SiteLink`): one MQTT client for the whole site subscribes to every gateway's status, rights
replies and command results (`acs/v1/<site>/+/...`). For each gateway it sends the outbox in version order,
resending the same message until that gateway's own `result` comes (broker delivery proves nothing); an
acknowledged version is recorded (`gateways.acked`) and its outbox entries deleted. A version gap or a
resync request is answered from the outbox when it still holds the missing versions, else by a snapshot of
the shadow. A gateway that comes back (a new birth) is caught up on its own by `run()`.
"""

# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, Self

import aiomqtt
import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud_bridge import mqtt
from cloud_bridge.cloud import chunk_round, chunk_snapshot, is_final, manifest_of
from cloud_bridge.protocol import (
    Birth,
    ChangeSetMsg,
    ChunkAck,
    CommandAction,
    CommandResult,
    Death,
    ProtocolError,
    Rebirth,
    ResyncRequest,
    RightsResult,
    SignedMsg,
    decode_command_body,
    decode_command_result,
    decode_rights_reply,
    decode_status,
    encode,
)
from cloud_bridge.signing import sign_command, sign_downlink
from cloud_bridge.topics import Leaf, Topics, parse, site_wildcard
from edge.model import ChangeSet, Schedule, Snapshot

from . import identity
from . import rules as access_rules
from .db import Model, OperatorError

log = logging.getLogger("cloud_bridge.operator.provision")

_cs_dec = msgspec.msgpack.Decoder(ChangeSet)
_snap_dec = msgspec.msgpack.Decoder(Snapshot)
_sched_dec = msgspec.msgpack.Decoder(Schedule)
_enc = msgspec.msgpack.Encoder()
_UNREAD = ("unsigned", "bad_signature", "malformed")


# --- planning (synchronous, no network) -----------------------------------------------------------------


def load_site(db: Model) -> identity.SiteModel:
    site = identity.SiteModel()
    for gw, did, name in db.con.execute("SELECT gateway, id, name FROM doors"):
        site.doors.setdefault(gw, {})[did] = name
    for sid, body in db.con.execute("SELECT id, body FROM schedules"):
        site.schedules[sid] = _sched_dec.decode(body)
    for gid, name, sched in db.con.execute("SELECT id, name, schedule FROM groups"):
        site.groups[gid] = (name, sched)
    for gid, gw, door in db.con.execute("SELECT group_id, gateway, door FROM group_doors"):
        site.group_doors.setdefault(gid, []).append((gw, door))
    users: dict[str, identity.UserRow] = {}
    for uid, name, active, off, vf, vu in db.con.execute(
        "SELECT id, name, active, offline_access, valid_from, valid_until FROM users"
    ):
        users[uid] = identity.UserRow(uid, name, bool(active), bool(off), vf, vu)
    for uid, gid, vf, vu in db.con.execute("SELECT user_id, group_id, valid_from, valid_until FROM assignments"):
        users[uid].assignments.append((gid, vf, vu))
    for card, uid, status, fmt, vf, vu in db.con.execute(
        "SELECT card, user_id, status, format, valid_from, valid_until FROM credentials"
    ):
        users[uid].credentials.append((card, status, fmt, vf, vu))
    site.users = list(users.values())
    site.access = access_rules.decode(db.get_meta(access_rules.META_KEY))
    site.rules = identity.ExportRules(
        delete_user_on_no_token=db.get_meta("deleteUserOnNoAccessToken", "1") == "1",
        delete_user_on_no_entitlement=db.get_meta("deleteUserOnNoEntitlement", "1") == "1",
    )
    return site


def _shadow(db: Model, gw: str) -> dict[tuple[str, str], bytes]:
    return {(k, key): bytes(b) for k, key, b in db.con.execute(
        "SELECT kind, key, body FROM shadow WHERE gateway=?", (gw,))}  # fmt: skip


#: Room in one message for everything but the object itself: the envelope, ids, versions, a signature.
MESSAGE_OVERHEAD_BYTES = 4096


def _hold_back(gw: str, desired: identity.Desired, shadow: dict[tuple[str, str], bytes], max_bytes: int
               ) -> list[str]:  # fmt: skip
    """Take out of `desired` every user whose encoded record would not fit one message (with its envelope):
    sent, it would be refused `too_large` and block every later version of that gateway; chunking a snapshot
    cannot split one record. The gateway keeps what it holds of that user (the shadow's record, or nothing:
    then the user's cards are held back too); every other change, revocations included, still goes out.
    Returns one line per user held back."""
    limit = max_bytes - MESSAGE_OVERHEAD_BYTES
    big = [key for (kind, key), (_obj, body) in desired.items() if kind == "user" and len(body) > limit]
    out: list[str] = []
    for uid in big:
        size = len(desired[("user", uid)][1])
        old = shadow.get(("user", uid))
        if old is not None:
            desired[("user", uid)] = (identity.decode("user", old), old)
        else:
            del desired[("user", uid)]
            for k in [k for k, (obj, _b) in desired.items() if k[0] == "credential" and obj.user == uid]:
                del desired[k]
        kept = "the gateway keeps its previous record" if old is not None else "nothing of it was sent"
        shown = repr(uid) if len(uid) <= 64 else f"{uid[:32]!r}..."
        msg = (f"user {shown} on {gw}: its record is {size:,} bytes encoded, more than one message carries "
               f"({limit:,} of max_message_bytes {max_bytes:,}); shorten its name or groups ({kept})")  # fmt: skip
        log.error("plan: %s", msg)
        out.append(msg)
    return out


@dataclass
class GatewayPlan:
    """What one planning step decided for one gateway (`plan_gateway`, pure): the outbox entry (kind "cs" or
    "snap", its body) taking it from `version` to `version + 1`, and the shadow rows that change with it."""

    gateway: str
    version: int
    kind: str
    body: bytes
    changes: int
    #: (kind, key) rows of the shadow to delete, and (kind, key, body) rows to write (new or changed).
    shadow_deletes: list[tuple[str, str]]
    shadow_puts: list[tuple[str, str, bytes]]
    #: The snapshot `body` encodes (kind "snap"), for a store that keeps it to send without decoding it again.
    snap: Snapshot | None = None


def plan_gateway(site: identity.SiteModel, gw: str, version: int, shadow: dict[tuple[str, str], bytes], *,
                 t: float, people: dict[frozenset[str], identity.Desired], max_bytes: int,
                 refused: list[str] | None) -> GatewayPlan | None:  # fmt: skip
    """The next version of one gateway (pure): what takes it from its `shadow` (at `version`) to the site
    model at `t`; None when nothing changed. Shared by both stores (`plan` here, the service's planner)."""
    desired = identity.gateway_state(site, gw, t, people)
    held = _hold_back(gw, desired, shadow, max_bytes)
    if refused is not None:
        refused += held
    changes = identity.diff(desired, shadow)
    if not changes:
        return None
    # A change set carries at least every changed object's encoding: past the limit on that alone, it is a
    # snapshot without encoding the change set first (the same decision, a second less at 100,000 users).
    least = sum(len(v[1]) for k, v in desired.items() if shadow.get(k) != v[1])
    body = b"" if least > max_bytes else _enc.encode(identity.change_set(version, changes))
    kind, snap = "cs", None
    if least > max_bytes or len(body) > max_bytes - 512:
        snap = identity.snapshot(version + 1, ((k[0], v[0]) for k, v in desired.items()))
        kind, body = "snap", _enc.encode(snap)
    # The shadow follows the change, row by row: a one-user change rewrites one row, not every user.
    return GatewayPlan(
        gateway=gw, version=version, kind=kind, body=body, changes=len(changes),
        shadow_deletes=[k for k in shadow if k not in desired],
        shadow_puts=[(k, key, v[1]) for (k, key), v in desired.items() if shadow.get((k, key)) != v[1]],
        snap=snap,
    )  # fmt: skip


def plan(
    db: Model, *, now: float | None = None, max_bytes: int = 256 * 1024, gateways: list[str] | None = None,
    refused: list[str] | None = None,
) -> dict[str, int]:  # fmt: skip
    """Append to each gateway's outbox what takes it from its shadow to the site model at `now`.
    Returns {gateway: number of changes planned} for the gateways that got a new version. A user whose
    record would not fit one message is held back (`_hold_back`), logged, and named in `refused`.
    (The operator CLI's SQLite `Model`; the service plans on its own data layer, `service/planner.py`,
    with the same `plan_gateway`.)"""
    t = time.time() if now is None else now
    site = load_site(db)
    out: dict[str, int] = {}
    people: dict[frozenset[str], identity.Desired] = {}  # users and cards per set of groups, shared by gateways
    for gw in gateways if gateways is not None else db.gateways():
        with db.tx() as c:
            row = c.execute("SELECT version FROM gateways WHERE id=?", (gw,)).fetchone()
            p = plan_gateway(site, gw, int(row[0]), _shadow(db, gw), t=t, people=people, max_bytes=max_bytes,
                             refused=refused)
            if p is None:
                continue
            if p.kind == "snap":  # supersedes every entry before it
                c.execute("DELETE FROM outbox WHERE gateway=?", (gw,))
            c.execute("INSERT INTO outbox VALUES (?,?,?,?,?)", (gw, p.version + 1, p.version, p.kind, p.body))
            c.execute("UPDATE gateways SET version=? WHERE id=?", (p.version + 1, gw))
            c.executemany("DELETE FROM shadow WHERE gateway=? AND kind=? AND key=?",
                          [(gw, k, key) for k, key in p.shadow_deletes])  # fmt: skip
            c.executemany("INSERT OR REPLACE INTO shadow VALUES (?,?,?,?)",
                          [(gw, k, key, b) for k, key, b in p.shadow_puts])  # fmt: skip
            out[gw] = p.changes
    return out


def shadow_snapshot(db: Model, gw: str) -> Snapshot:
    row = db.con.execute("SELECT version FROM gateways WHERE id=?", (gw,)).fetchone()
    objs = ((k, identity.decode(k, b)) for (k, _key), b in _shadow(db, gw).items())
    return identity.snapshot(int(row[0]) if row else 0, objs)


def pending(db: Model, gw: str, have: int) -> list[tuple[str, int, bytes]] | None:
    """The outbox entries that take a gateway holding `have` to the latest version, as (kind, to_version,
    body); None when the outbox cannot (a snapshot of the shadow is needed)."""
    rows = db.con.execute("SELECT kind, from_version, to_version, body FROM outbox WHERE gateway=? AND to_version>? "
                          "ORDER BY to_version", (gw, have)).fetchall()  # fmt: skip
    if not rows:
        return []
    kind, frm, _to, _b = rows[0]
    if kind == "cs" and frm != have:
        return None
    return [(str(k), int(to), bytes(b)) for k, _f, to, b in rows]


# --- the link's store ------------------------------------------------------------------------------------


class LinkStore(Protocol):
    """What `SiteLink` reads and writes: gateways (versions, acks, births), the outbox and the shadow, and the
    planner. Two implementations: `ModelStore` (the CLI's SQLite `Model`) and the service's data layer
    (`cloud_bridge/service/planner.py`, SQLite or PostgreSQL)."""

    async def gateways(self) -> list[str]: ...
    async def versions(self, gw: str) -> tuple[int, int] | None:
        """(acked, version) of a gateway; None: unknown."""
        ...
    async def record_birth(self, gw: str, *, session: int, version: int, doors: list[tuple[str, str]],
                           software: str, ts: float) -> None: ...  # fmt: skip
    async def record_death(self, gw: str, session: int) -> None: ...
    async def reconcile(self, gw: str, have: int) -> None:
        """What a gateway reports holding is the truth: adopt it as acked (or, when it is ahead of this
        store, e.g. after a restore, move the numbering past it and forget its shadow and outbox so that
        the next plan sends it everything as a snapshot)."""
        ...
    async def set_acked(self, gw: str, version: int) -> None: ...
    async def set_error(self, gw: str, message: str | None) -> None: ...
    async def pending(self, gw: str, have: int) -> list[tuple[str, int, bytes | Snapshot]] | None:
        """The outbox entries from `have` on (`pending` below); a snapshot entry's body may be the `Snapshot`
        itself, as planned, instead of its encoding."""
        ...
    async def shadow_snapshot(self, gw: str) -> Snapshot: ...
    async def plan(self, *, now: float | None = None, max_bytes: int = 256 * 1024, gateways: list[str] | None = None,
                   refused: list[str] | None = None) -> dict[str, int]: ...  # fmt: skip


class ModelStore:
    """`LinkStore` on the CLI's synchronous SQLite `Model` (short transactions on the event loop's thread)."""

    def __init__(self, db: Model) -> None:
        self.db = db

    async def gateways(self) -> list[str]:
        return self.db.gateways()

    async def versions(self, gw: str) -> tuple[int, int] | None:
        g = self.db.gateway(gw)
        return None if g is None else (int(g["acked"]), int(g["version"]))

    async def record_birth(self, gw: str, *, session: int, version: int, doors: list[tuple[str, str]],
                           software: str, ts: float) -> None:  # fmt: skip
        self.db.record_birth(gw, session=session, version=version, doors=doors, software=software, ts=ts)

    async def record_death(self, gw: str, session: int) -> None:
        self.db.record_death(gw, session)

    async def reconcile(self, gw: str, have: int) -> None:
        g = self.db.gateway(gw)
        assert g is not None
        version = int(g["version"])
        with self.db.tx() as c:
            if have > version:
                c.execute("UPDATE gateways SET version=?, acked=? WHERE id=?", (have + 1, have, gw))
                c.execute("DELETE FROM outbox WHERE gateway=?", (gw,))
                c.execute("DELETE FROM shadow WHERE gateway=?", (gw,))  # next plan() sends everything
            else:
                c.execute("UPDATE gateways SET acked=? WHERE id=?", (have, gw))

    async def set_acked(self, gw: str, version: int) -> None:
        self.db.set_acked(gw, version)

    async def set_error(self, gw: str, message: str | None) -> None:
        self.db.set_error(gw, message)

    async def pending(self, gw: str, have: int) -> list[tuple[str, int, bytes | Snapshot]] | None:
        return list(r) if (r := pending(self.db, gw, have)) is not None else None

    async def shadow_snapshot(self, gw: str) -> Snapshot:
        return shadow_snapshot(self.db, gw)

    async def plan(self, *, now: float | None = None, max_bytes: int = 256 * 1024, gateways: list[str] | None = None,
                   refused: list[str] | None = None) -> dict[str, int]:  # fmt: skip
        return plan(self.db, now=now, max_bytes=max_bytes, gateways=gateways, refused=refused)


# --- delivery (async) ------------------------------------------------------------------------------------


#: Gateway names starting with this are site links' probes (see `SiteLink.__aenter__`), never gateways.
PROBE_PREFIX = "_probe-"


class ProvisionError(OperatorError):
    """A gateway refused a change set (its model and ours disagree), or did not answer in time."""


class SiteLink(mqtt.Session):
    """The operator side's MQTT client for a whole site (async context manager)."""

    poll_s = 0.25

    def __init__(
        self, db: Model | LinkStore, *, host: str, port: int, site: str, identifier: str | None = None,
        max_message_bytes: int = 256 * 1024, resend_s: float = 5.0, tls: aiomqtt.TLSParameters | None = None,
        username: str | None = None, password: str | None = None, signing_key: Ed25519PrivateKey | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        #: Gateways, outbox, shadow and the planner (a `Model` is wrapped as a `ModelStore`).
        self.store: LinkStore = ModelStore(db) if isinstance(db, Model) else db
        #: The site key: signs every change set, snapshot manifest, rebirth and command this link sends.
        self.signing_key = signing_key
        self.host, self.port, self.site = host, port, site
        self.identifier = identifier or f"cloud-{site}-{os.urandom(4).hex()}"
        self.max_message_bytes = max_message_bytes
        self.resend_s = resend_s
        #: How long entering waits at most for the broker's retained gateway status.
        self.retained_wait_s = 5.0
        self.tls, self.username, self.password = tls, username, password
        self.status: dict[str, Birth | Death] = {}
        self.replies: dict[str, list[RightsResult | ChunkAck | ResyncRequest]] = {}
        self.results: list[tuple[str, CommandResult]] = []
        #: Every message this link published on a rights topic (tests count them).
        self.rights_published = 0
        self.on_birth: list[Callable[[Birth], None]] = []
        self._probe: str | None = None  # this link's probe gateway name while it waits for the retained births
        self._probe_back = False

    async def _connect(self) -> aiomqtt.Client:
        c = mqtt.client(self.host, self.port, identifier=self.identifier, tls=self.tls, username=self.username,
                        password=self.password)  # fmt: skip
        return await mqtt.connect(c, [site_wildcard(self.site, leaf)
                                      for leaf in (Leaf.STATUS, Leaf.RIGHTS_REPLY, Leaf.COMMAND_RESULT)])  # fmt: skip

    async def __aenter__(self) -> Self:
        """Connect, subscribe, and wait until the broker has delivered every retained gateway status.

        The broker sends the retained births and deaths right after the subscription. Which gateway is online
        must not be decided before they are in: on a fresh site database no gateway is known yet, and a
        publish would find "no gateway online" although every birth is on the broker. The broker delivers
        one client's QoS 1 messages in order, so a probe this link publishes now, on a status topic of its
        own (`PROBE_PREFIX` + random: no gateway name), comes back after every retained status. A gateway
        seen by its birth is registered in the store (`LinkStore.record_birth`)."""
        self._client = await self._connect()
        self._start_reader(self._run_reader(self._client), "sitelink.read")
        try:
            self._probe, self._probe_back = f"{PROBE_PREFIX}{os.urandom(4).hex()}", False
            await mqtt.publish(self._client, Topics(self.site, self._probe).status, b"probe")
            with contextlib.suppress(TimeoutError):  # a broker that drops it (ACL): go on after the wait
                await self.wait_for(lambda: self._probe_back, self.retained_wait_s)
            if not self._probe_back:
                log.warning("site link: the retained gateway status did not arrive within %.1f s",
                            self.retained_wait_s)  # fmt: skip
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def _run_reader(self, first: aiomqtt.Client) -> None:
        """Read messages; when the broker connection drops, reconnect (backoff 0.2 .. 5 s) and resubscribe
        (the retained births then tell which gateways are online)."""

        async def reconnect() -> aiomqtt.Client:
            self._client = await self._connect()
            return self._client

        def down() -> None:
            self._client = None

        await mqtt.reconnecting(reconnect, self._read, mqtt.Backoff(0.2, 5.0), log=log, what="site link lost",
                                first=first, down=down)  # fmt: skip

    def _not_connected(self) -> Exception:
        return ProvisionError("the site link is not connected")

    # receiving

    async def _read(self, client: aiomqtt.Client) -> None:
        async for m in client.messages:
            p = parse(m.topic.value)
            data = mqtt.payload(m)
            if p is None or p[0] != self.site or not data:
                continue
            try:
                await self._dispatch(p[1], p[2], data)
            except (ProtocolError, OperatorError) as e:
                log.warning("bad message on %s: %s", m.topic.value, e)
            await self._changed_now()

    async def _dispatch(self, gw: str, leaf: Leaf, data: bytes) -> None:
        if gw.startswith(PROBE_PREFIX):  # a site link's probe (ours or another's), never a gateway
            if gw == self._probe:
                self._probe_back = True
            return
        if leaf is Leaf.STATUS:
            st = decode_status(data)
            prev = self.status.get(gw)
            if isinstance(st, Death) and isinstance(prev, Birth) and st.session < prev.session:
                return  # stale will
            self.status[gw] = st
            if isinstance(st, Birth):
                doors = [(d.id, d.name) for d in st.doors]
                await self.store.record_birth(gw, session=st.session, version=st.rights_version, doors=doors,
                                              software=st.software, ts=time.time())  # fmt: skip
                await self.store.reconcile(gw, st.rights_version)
                for cb in self.on_birth:
                    cb(st)
            else:
                await self.store.record_death(gw, st.session)
        elif leaf is Leaf.RIGHTS_REPLY:
            self.replies.setdefault(gw, []).append(decode_rights_reply(data))
        elif leaf is Leaf.COMMAND_RESULT:
            self.results.append((gw, decode_command_result(data)))

    def online(self, gw: str) -> bool:
        return isinstance(self.status.get(gw), Birth)

    async def wait_online(self, gw: str, timeout: float = 30.0, *, after: int = 0) -> Birth:
        def ok() -> Birth | None:
            s = self.status.get(gw)
            return s if isinstance(s, Birth) and s.session > after else None

        b: Birth = await self.wait_for(ok, timeout)
        return b

    # provisioning

    async def _publish(self, gw: str, leaf: Leaf, data: bytes, *, expiry_s: int | None = None) -> None:
        await mqtt.publish(self.client, Topics(self.site, gw)[leaf], data, expiry_s=expiry_s)
        if leaf is Leaf.RIGHTS:
            self.rights_published += 1

    def seal(self, gw: str, msg: SignedMsg) -> bytes:
        """One downlink message for gateway `gw`, signed with the site key."""
        if self.signing_key is None:
            raise ProvisionError("no site signing key: this site link cannot provision")
        return encode(sign_downlink(self.signing_key, msg, site=self.site, gateway=gw))

    def _result(self, gw: str, rid: str, start: int) -> RightsResult | ResyncRequest | None:
        for r in self.replies.get(gw, [])[start:]:
            if isinstance(r, RightsResult) and r.id == rid and is_final(r):
                return r
        return None

    async def _send(self, gw: str, rid: str, messages: list[bytes], timeout: float, *, manifest: bytes | None = None
                    ) -> RightsResult:  # fmt: skip
        """Send one request (a change set, or the signed manifest and the chunks of a snapshot) until its
        result comes."""
        start = len(self.replies.setdefault(gw, []))

        def acked() -> set[int]:
            return {r.index for r in self.replies[gw][start:] if isinstance(r, ChunkAck) and r.id == rid}

        async with asyncio.timeout(timeout):
            while True:
                have = acked() if len(messages) > 1 else set()
                todo = chunk_round(len(messages), have)  # a window at a time (cloud.CHUNK_WINDOW)
                if manifest is not None:
                    await self._publish(gw, Leaf.RIGHTS, manifest)
                for i in todo:
                    await self._publish(gw, Leaf.RIGHTS, messages[i])
                more = len(todo) < len(messages) - len(have)

                def done(todo: list[int] = todo, more: bool = more) -> object:  # this round's window
                    return self._result(gw, rid, start) or (more and set(todo) <= acked())

                with contextlib.suppress(TimeoutError):
                    if isinstance(r := await self.wait_for(done, self.resend_s), RightsResult):
                        return r

    async def push(self, gw: str, *, timeout: float = 60.0) -> int:
        """Bring one gateway up to its latest planned version; return the version it acknowledged.
        Raises ProvisionError when the gateway refuses a change set, TimeoutError when it does not answer."""
        async with asyncio.timeout(timeout):
            while True:
                av = await self.store.versions(gw)
                if av is None:
                    raise ProvisionError(f"unknown gateway {gw!r}")
                acked, version = av
                if acked >= version:
                    return acked
                todo = await self.store.pending(gw, acked)
                manifest: bytes | None = None
                snap: Snapshot | None = None
                if todo is None or not todo:
                    snap = await self.store.shadow_snapshot(gw)
                    rid = f"snap-{gw}-{snap.version}-{os.urandom(3).hex()}"
                else:
                    kind, to, body = todo[0]
                    if kind == "cs":
                        rid = f"cs-{to}-{os.urandom(3).hex()}"
                        assert isinstance(body, bytes)
                        msgs = [self.seal(gw, ChangeSetMsg(id=rid, change_set=_cs_dec.decode(body)))]
                    else:  # the store may hand over the snapshot it planned (not decoded from the outbox again)
                        snap = body if isinstance(body, Snapshot) else _snap_dec.decode(body)
                        rid = f"snap-{gw}-{to}-{os.urandom(3).hex()}"
                if snap is not None:
                    msgs = chunk_snapshot(snap, rid, self.max_message_bytes)
                    manifest = self.seal(gw, manifest_of(rid, snap.version, msgs))
                r = await self._send(gw, rid, msgs, timeout, manifest=manifest)
                if r.ok:
                    await self.store.set_acked(gw, r.version)
                    continue
                code = r.error.code if r.error else "unknown"
                if code == "version_gap":
                    await self.store.set_acked(gw, r.version)  # what it holds; pending() decides cs chain or snapshot
                    continue
                msg = f"gateway {gw} refused version: {code}: {r.error.message if r.error else ''}"
                await self.store.set_error(gw, msg)
                raise ProvisionError(msg)

    async def push_all(self, gateways: list[str] | None = None, *, timeout: float = 60.0, online_only: bool = True
                       ) -> dict[str, int | str]:  # fmt: skip
        """Push every (online) gateway concurrently. Returns {gateway: acked version, or the error}."""
        gws = gateways if gateways is not None else await self.store.gateways()
        if online_only:
            gws = [g for g in gws if self.online(g)]

        async def one(gw: str) -> int | str:
            try:
                return await self.push(gw, timeout=timeout)
            except (ProvisionError, TimeoutError) as e:
                return f"error: {e or 'no answer in time'}"

        async with asyncio.TaskGroup() as tg:
            tasks = {gw: tg.create_task(one(gw)) for gw in gws}
        return {gw: t.result() for gw, t in tasks.items()}

    async def run(self, *, interval_s: float = 60.0) -> None:
        """Keep every gateway caught up: on every birth (a gateway came back) and every `interval_s`
        (time-bounded rights that ended are then removed), plan and push."""
        wake = asyncio.Event()
        self.on_birth.append(lambda _b: wake.set())
        while True:
            await self.store.plan(max_bytes=self.max_message_bytes)
            await self.push_all(timeout=max(30.0, interval_s))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval_s):
                    await wake.wait()
            wake.clear()

    # commands

    async def command(
        self, gw: str, key: Ed25519PrivateKey, action: CommandAction, *, operator: str, ttl_s: float = 60.0,
        timeout: float = 30.0,
    ) -> CommandResult:  # fmt: skip
        """Sign a command with the site key and resend the same bytes until its result comes."""
        _, signed = sign_command(key, site=self.site, gateway=gw, action=action, operator=operator, ttl_s=ttl_s)
        rid = decode_command_body(signed.body).request_id
        data = encode(signed)
        start = len(self.results)

        def find() -> CommandResult | None:
            # A gateway that cannot verify a command does not read its body, so its refusal names no request:
            # the first such refusal after ours was sent is taken as the answer (the key does not match).
            for g, r in self.results[start:]:
                if g == gw and (r.request_id == rid or (r.request_id is None and r.error is not None
                                                        and r.error.code in _UNREAD)):  # fmt: skip
                    return r
            return None

        async with asyncio.timeout(timeout):
            while True:
                await self._publish(gw, Leaf.COMMAND, data, expiry_s=max(1, int(ttl_s)))
                with contextlib.suppress(TimeoutError):
                    r: CommandResult = await self.wait_for(find, self.resend_s)
                    if r.error is not None and r.error.code == "replayed" and r.original is not None:
                        return r.original
                    return r

    async def rebirth(self, gw: str, *, timeout: float = 10.0) -> Birth:
        """Ask a gateway to announce itself again (refresh / test connection); wait for the new birth."""
        got: list[Birth] = []
        cb: Callable[[Birth], None] = lambda b: got.append(b) if b.gateway == gw else None  # noqa: E731
        self.on_birth.append(cb)
        try:
            async with asyncio.timeout(timeout):
                while True:
                    await self._publish(gw, Leaf.RIGHTS, self.seal(gw, Rebirth()))
                    with contextlib.suppress(TimeoutError):
                        b: Birth = await self.wait_for(lambda: got[-1] if got else None, 2.0)
                        return b
        finally:
            self.on_birth.remove(cb)
