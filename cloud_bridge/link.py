"""The gateway's side of the cloud link: `CloudLink`, one MQTT 5 session to the site's broker.

Nothing here trusts the broker to keep or deliver anything: aiomqtt acknowledges a QoS 1 message as soon
as it is queued in memory, so every change set, snapshot chunk and command is answered by the gateway's
own reply once its effect is committed to disk, and the cloud resends until it sees that reply. Replies
are idempotent (a duplicate change set, chunk or command gets the same answer again without a second
effect). Events go the other way on the same principle: rows leave the journal only when the cloud's
`EventAck` says it has them; after a reconnect the unacknowledged tail is sent again.

Tasks: `run()` is the reconnect loop (jittered exponential backoff). Per connection it runs the message
reader and the event uploader; one rights worker lives across connections, so a snapshot being applied
is never torn by a reconnect (its reply is dropped if the link is down when it finishes; the cloud's
resend then gets the "already applied" answer).

Command key: commands are verified with the site's Ed25519 public key given at construction (the agent's
`link.command_key`) until a signed `RotateKey` replaces it. The rotated key is stored in the state
directory (`link-command-key.json`) before the ok is sent and wins over the configured key on every later
start; the fingerprint of the key in use is logged at start and both fingerprints are journalled as
`security.key_rotated`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import sqlite3
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Annotated, Any, Protocol, Self

import aiomqtt
import aiosqlite
import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from msgspec import Meta
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge.errors import ChangeRejected, EdgeError, StoreError, VersionGap
from edge.events import SECURITY_COMMAND_REJECTED, Event
from edge.journal import Journal
from edge.model import DoorMode, Snapshot
from edge.store import Store

from .protocol import (
    Birth,
    ChangeSetMsg,
    ChunkAck,
    Command,
    CommandResult,
    Death,
    Encoding,
    ErrorInfo,
    EventBatch,
    Lockdown,
    ProtocolError,
    RebirthAction,
    Resync,
    ResyncRequest,
    RightsResult,
    RotateKey,
    SetDoorMode,
    SnapshotChunk,
    Unlock,
    decode_command,
    decode_command_body,
    decode_command_result,
    decode_downlink,
    decode_event_ack,
    encode,
    peek_ref,
    snapshot_of,
)
from .signing import (
    MAX_TTL_S,
    CommandRejected,
    KeyState,
    NonceStore,
    check,
    fingerprint,
    load_key_state,
    load_public_key,
    save_key_state,
)
from .topics import Leaf, Topics

log = logging.getLogger("cloud_bridge.link")

#: Journal event type of every command carried out (user = the operator).
COMMAND_EXECUTED = "command.executed"
#: Journal event type of an accepted key rotation (detail: old and new key fingerprints).
KEY_ROTATED = "security.key_rotated"
#: The command key state in the link's state directory.
KEY_FILE = "link-command-key.json"


class LinkConfig(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Settings of the cloud link (embedded in the agent config)."""

    site: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_\-]{1,64}$")]
    gateway: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_\-]{1,64}$")]
    host: str = "localhost"
    port: Annotated[int, Meta(ge=1, le=65535)] = 1883
    #: TLS: CA bundle that signed the broker's certificate; client certificate and key (PEM paths).
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    username: str | None = None
    password: str | None = None
    keepalive_s: Annotated[int, Meta(ge=5, le=3600)] = 30
    #: MQTT 5 session expiry: how long the broker keeps our subscriptions and queued QoS 1 messages.
    session_expiry_s: Annotated[int, Meta(ge=0)] = 7 * 24 * 3600
    backoff_min_s: Annotated[float, Meta(gt=0)] = 0.5
    backoff_max_s: Annotated[float, Meta(gt=0)] = 60.0
    #: Events per EventBatch (fewer when a batch would exceed `max_message_bytes`).
    batch_events: Annotated[int, Meta(ge=1, le=100_000)] = 1000
    #: EventBatches sent ahead of the cloud's acknowledgement.
    window: Annotated[int, Meta(ge=1, le=1000)] = 8
    #: Without an EventAck for this long, the unacknowledged tail is sent again.
    ack_timeout_s: Annotated[float, Meta(gt=0)] = 30.0
    #: Largest message read or written (Mosquitto's `message_size_limit`, AWS IoT's 128 KiB...).
    max_message_bytes: Annotated[int, Meta(ge=4096)] = 256 * 1024
    encoding: Encoding = "msgpack"
    #: Grace for the clocks of the cloud and the gateway when checking command times.
    command_skew_s: Annotated[float, Meta(ge=0, le=3600)] = 30.0
    command_max_ttl_s: Annotated[float, Meta(gt=0)] = MAX_TTL_S
    #: SQLite `synchronous` for the link's own state (nonces, snapshot staging).
    synchronous: str = "FULL"


class CommandHandler(Protocol):
    """What the agent does for cloud commands. Raise ValueError (unknown door...) for an error result."""

    async def unlock(self, door: str, seconds: float) -> None: ...

    async def set_door_mode(self, door: str, mode: DoorMode | None) -> None: ...

    async def lockdown(self, active: bool) -> None: ...

    async def resync(self) -> None: ...


def backoff_delays(lo: float, hi: float, rng: random.Random | None = None) -> Callable[[], float]:
    """Full-jitter exponential backoff: each call returns the next delay; `reset` by making a new one."""
    r = rng or random.Random()
    state = {"n": 0}

    def nxt() -> float:
        cap = min(hi, lo * (2 ** state["n"]))
        state["n"] = min(state["n"] + 1, 30)
        return r.uniform(lo / 2, cap)

    return nxt


def split_events(
    events: list[Event], prev_seq: int, max_bytes: int, encoding: Encoding
) -> list[tuple[EventBatch, bytes]]:
    """Encode events read after `prev_seq` into batches that each fit in `max_bytes` (halving a batch that
    does not fit)."""
    out: list[tuple[EventBatch, bytes]] = []
    todo = [events]
    while todo:
        part = todo.pop(0)
        prev = out[-1][0].last_seq if out else prev_seq
        b = EventBatch(first_seq=part[0].seq, last_seq=part[-1].seq, events=part, prev_seq=prev)
        data = encode(b, encoding)
        if len(data) <= max_bytes or len(part) == 1:
            out.append((b, data))
        else:
            mid = len(part) // 2
            todo[:0] = [part[:mid], part[mid:]]
    return out


class SnapshotStaging:
    """Snapshot chunks kept aside on disk until a transfer is complete; the last results, for duplicates."""

    def __init__(self, path: Path, synchronous: str = "FULL") -> None:
        self.path = path
        self.synchronous = synchronous
        self._db: aiosqlite.Connection | None = None

    async def __aenter__(self) -> Self:
        self._db = await aiosqlite.connect(self.path, isolation_level=None)
        try:
            await self._db.execute("PRAGMA journal_mode=WAL")
            await self._db.execute(f"PRAGMA synchronous={self.synchronous}")
            for stmt in (
                "CREATE TABLE IF NOT EXISTS transfer (id TEXT PRIMARY KEY, version INTEGER, count INTEGER)",
                "CREATE TABLE IF NOT EXISTS chunk (idx INTEGER PRIMARY KEY, body BLOB NOT NULL)",
                "CREATE TABLE IF NOT EXISTS done (id TEXT PRIMARY KEY, at REAL, result BLOB NOT NULL)",
            ):
                await self._db.execute(stmt)
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await db.close()

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise EdgeError("snapshot staging is not open")
        return self._db

    async def done(self, transfer: str) -> bytes | None:
        async with self.db.execute("SELECT result FROM done WHERE id=?", (transfer,)) as cur:
            row = await cur.fetchone()
        return None if row is None else bytes(row[0])

    async def current(self) -> tuple[str, int, int] | None:
        async with self.db.execute("SELECT id, version, count FROM transfer") as cur:
            row = await cur.fetchone()
        return None if row is None else (str(row[0]), int(row[1]), int(row[2]))

    async def put(self, c: SnapshotChunk, body: bytes) -> int:
        """Stage one chunk (a new transfer id discards any other); returns how many chunks are staged."""
        db = self.db
        cur = await self.current()
        await db.execute("BEGIN IMMEDIATE")
        try:
            if cur is None or cur != (c.id, c.version, c.count):
                if cur is not None:
                    log.warning("snapshot transfer %s abandoned for %s", cur[0], c.id)
                await db.execute("DELETE FROM transfer")
                await db.execute("DELETE FROM chunk")
                await db.execute("INSERT INTO transfer VALUES (?, ?, ?)", (c.id, c.version, c.count))
            await db.execute("INSERT OR REPLACE INTO chunk VALUES (?, ?)", (c.index, body))
            await db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(Exception):
                await db.execute("ROLLBACK")
            raise
        async with db.execute("SELECT count(*) FROM chunk") as q:
            row = await q.fetchone()
        return int(row[0]) if row else 0

    async def bodies(self) -> list[bytes]:
        async with self.db.execute("SELECT body FROM chunk ORDER BY idx") as cur:
            return [bytes(r[0]) for r in await cur.fetchall()]

    async def finish(self, transfer: str, result: bytes, now: float) -> None:
        db = self.db
        await db.execute("BEGIN IMMEDIATE")
        try:
            await db.execute("DELETE FROM transfer")
            await db.execute("DELETE FROM chunk")
            await db.execute("INSERT OR REPLACE INTO done VALUES (?, ?, ?)", (transfer, now, result))
            await db.execute("DELETE FROM done WHERE id NOT IN (SELECT id FROM done ORDER BY at DESC LIMIT 100)")
            await db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(Exception):
                await db.execute("ROLLBACK")
            raise


def _error(e: BaseException) -> ErrorInfo:
    if isinstance(e, ChangeRejected):
        return ErrorInfo(code=e.code, message=str(e), path=e.path)
    if isinstance(e, ProtocolError):
        return ErrorInfo(code="malformed", message=str(e))
    if isinstance(e, StoreError):
        return ErrorInfo(code="storage", message=str(e))
    return ErrorInfo(code="internal", message=f"{type(e).__name__}: {e}")


def _join_chunks(bodies: list[bytes]) -> Snapshot:
    chunks = [decode_downlink(b) for b in bodies]
    return snapshot_of([x for x in chunks if isinstance(x, SnapshotChunk)])


class CloudLink:
    """The gateway's MQTT link. `async with CloudLink(...) as link: await link.run()`."""

    def __init__(
        self,
        cfg: LinkConfig,
        *,
        store: Store,
        journal: Journal,
        commands: CommandHandler,
        birth: Callable[[], Birth],
        site_public_key: bytes,
        state_dir: Path,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.journal = journal
        self.commands = commands
        self.birth = birth
        load_public_key(site_public_key)  # 32 bytes, or ValueError now
        self.config_key = bytes(site_public_key)
        self.state_dir = Path(state_dir)
        self.key_path = self.state_dir / KEY_FILE
        self._keys = KeyState(key=self.config_key.hex())
        self._verifiers: dict[bytes, Ed25519PublicKey] = {}
        self.clock = clock
        self.topics = Topics(cfg.site, cfg.gateway)
        #: Called with the new state whenever the link goes online or offline.
        self.on_state: list[Callable[[bool], None]] = []
        #: Called with (cloud UTC time, round trip s) from each timestamped event acknowledgement.
        self.on_cloud_time: list[Callable[[float, float], None]] = []
        self._sent_at: dict[int, float] = {}  # last_seq of a batch -> monotonic time it was sent
        self._online = False
        self._offline_since: datetime | None = datetime.fromtimestamp(clock(), UTC)
        self._client: aiomqtt.Client | None = None
        self._session = 0
        self._nonces = NonceStore(self.state_dir / "link-nonces.db", synchronous=cfg.synchronous)
        self._staging = SnapshotStaging(self.state_dir / "link-snapshot.db", cfg.synchronous)
        self._rights_q: asyncio.Queue[bytes] = asyncio.Queue()
        self._wake = asyncio.Event()
        self._acked = 0  # highest seq the cloud acknowledged (this process)
        self._sent = 0  # highest seq sent in the current round
        self._sent_max = 0  # highest seq ever sent by this process
        self._last_ack_at = 0.0
        self._last_rewind = 0.0
        self._rewind = False
        self.stats: dict[str, int] = {"events_sent": 0, "batches_sent": 0, "resends": 0, "commands": 0}

    # --- lifecycle --------------------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        await self._load_keys()
        await self._nonces.__aenter__()
        try:
            await self._staging.__aenter__()
        except BaseException:
            await self._nonces.close()
            raise
        await self._nonces.purge(self.clock())
        self.journal.on_durable.append(self._wake.set)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        with contextlib.suppress(ValueError):
            self.journal.on_durable.remove(self._wake.set)
        await self._staging.close()
        await self._nonces.close()

    @property
    def online(self) -> bool:
        return self._online

    # --- the command key --------------------------------------------------------------------------------

    async def _load_keys(self) -> None:
        stored = await asyncio.to_thread(load_key_state, self.key_path)
        if stored is None:
            log.info("command key %s (link.command_key)", fingerprint(self.config_key))
            return
        self._keys = stored
        now = self.clock()
        in_use = stored.in_use(now)
        log.info("command key %s (rotated by %s, stored in %s)%s", fingerprint(in_use), stored.request_id or "?",
                 self.key_path, "" if in_use == self.config_key else
                 f"; the configured link.command_key {fingerprint(self.config_key)} is superseded")  # fmt: skip
        if stored.pending(now):
            log.info("command key %s takes over at %s", fingerprint(bytes.fromhex(stored.key)), stored.not_before)

    @property
    def key_state(self) -> KeyState:
        """The command key(s) this gateway holds (public keys only)."""
        return self._keys

    @property
    def public_key(self) -> Ed25519PublicKey:
        """The key commands must be signed with now."""
        return self._verifier(self._keys.in_use(self.clock()))

    def _verifier(self, raw: bytes) -> Ed25519PublicKey:
        v = self._verifiers.get(raw)
        if v is None:
            v = self._verifiers[raw] = load_public_key(raw)
        return v

    async def _rotate(self, cmd: Command, a: RotateKey) -> CommandResult:
        """Store the new key durably, then use it: the ok is only sent once it is on disk."""
        now = self.clock()
        old = self._keys.in_use(now)
        new = bytes.fromhex(a.new_public_key)
        detail: dict[str, str | int | float | bool | None] = {
            "request_id": cmd.request_id, "action": "rotate_key", "old": fingerprint(old), "new": fingerprint(new),
        }  # fmt: skip
        nxt = self._keys.rotated(new, not_before=a.not_before, now=now, request_id=cmd.request_id,
                                 operator=cmd.operator)  # fmt: skip
        if nxt is self._keys:
            detail["unchanged"] = True
            log.info("command key %s: rotation %s changes nothing", fingerprint(old), cmd.request_id)
            self.journal.record(COMMAND_EXECUTED, user=cmd.operator, detail=detail)
            return CommandResult(request_id=cmd.request_id, ok=True)
        await asyncio.to_thread(save_key_state, self.key_path, nxt)
        self._keys = nxt
        if nxt.pending(now):
            detail["not_before"] = nxt.not_before
        log.warning("command key rotated by %s (%s): %s -> %s%s", cmd.operator, cmd.request_id, fingerprint(old),
                    fingerprint(new), f" from {nxt.not_before}" if nxt.pending(now) else "")  # fmt: skip
        self.journal.record(KEY_ROTATED, user=cmd.operator, detail=detail)
        return CommandResult(request_id=cmd.request_id, ok=True)

    @property
    def offline_since(self) -> datetime | None:
        return self._offline_since

    def _set_online(self, up: bool) -> None:
        if up == self._online:
            return
        self._online = up
        self._offline_since = None if up else datetime.fromtimestamp(self.clock(), UTC)
        log.info("cloud link %s", "online" if up else "offline")
        for cb in self.on_state:
            cb(up)

    # --- the reconnect loop -----------------------------------------------------------------------------

    def _make_client(self) -> aiomqtt.Client:
        cfg = self.cfg
        self._session = int(self.clock() * 1000)
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = cfg.session_expiry_s
        death = Death(site=cfg.site, gateway=cfg.gateway, session=self._session, ts=self.clock())
        tls = None
        if cfg.ca or cfg.cert:
            tls = aiomqtt.TLSParameters(ca_certs=cfg.ca, certfile=cfg.cert, keyfile=cfg.key)
        return aiomqtt.Client(
            cfg.host,
            cfg.port,
            identifier=f"acs-{cfg.site}-{cfg.gateway}",
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=False,  # keep the broker session across restarts (the default wipes it)
            properties=props,
            keepalive=cfg.keepalive_s,
            will=aiomqtt.Will(self.topics.status, encode(death, cfg.encoding), qos=1, retain=True),
            tls_params=tls,
            username=cfg.username,
            password=cfg.password,
            timeout=10,
        )

    async def run(self) -> None:
        """Connect, serve, reconnect with jittered backoff; returns only when cancelled."""
        delay = backoff_delays(self.cfg.backoff_min_s, self.cfg.backoff_max_s)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._rights_worker(), name="link.rights")
            while True:
                try:
                    async with self._make_client() as client:
                        delay = backoff_delays(self.cfg.backoff_min_s, self.cfg.backoff_max_s)
                        await self._serve(client)
                except* aiomqtt.MqttError as eg:
                    log.warning("cloud link: %s", eg.exceptions[0])
                finally:
                    self._client = None
                    self._set_online(False)
                await asyncio.sleep(delay())

    async def _serve(self, client: aiomqtt.Client) -> None:
        for topic in self.topics.downlink():
            await client.subscribe(topic, qos=1)
        self._client = client
        await self._publish_birth()
        self._set_online(True)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._upload(client), name="link.upload")
                tg.create_task(self._read(client), name="link.read")
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                d = Death(site=self.cfg.site, gateway=self.cfg.gateway, session=self._session, ts=self.clock(),
                          reason="shutdown")  # fmt: skip
                await asyncio.wait_for(
                    client.publish(self.topics.status, encode(d, self.cfg.encoding), qos=1, retain=True), 2.0
                )
            raise

    async def _publish(self, leaf: Leaf, msg: Any, *, retain: bool = False) -> bool:
        """Publish a reply if the link is up; False when it is not (the cloud will ask again)."""
        client = self._client
        if client is None:
            return False
        try:
            await client.publish(self.topics[leaf], encode(msg, self.cfg.encoding), qos=1, retain=retain)
        except aiomqtt.MqttError as e:
            log.info("reply on %s not sent: %s", leaf.value, e)
            return False
        return True

    async def _publish_birth(self) -> None:
        b = msgspec.structs.replace(
            self.birth(),
            site=self.cfg.site,
            gateway=self.cfg.gateway,
            session=self._session,
            ts=self.clock(),
            rights_version=self.store.version,
            journal_depth=self.journal.depth,
            encoding=self.cfg.encoding,
        )
        await self._publish(Leaf.STATUS, b, retain=True)

    # --- incoming ---------------------------------------------------------------------------------------

    async def _read(self, client: aiomqtt.Client) -> None:
        async for m in client.messages:
            leaf = self.topics.parse(m.topic.value)
            payload = m.payload if isinstance(m.payload, bytes) else str(m.payload).encode()
            if leaf is Leaf.RIGHTS:
                self._rights_q.put_nowait(payload)
            elif leaf is Leaf.EVENTS_ACK:
                await self._on_event_ack(payload)
            elif leaf is Leaf.COMMAND:
                await self._on_command(payload)
            else:
                log.warning("message on unexpected topic %s ignored", m.topic.value)

    def _too_large(self, payload: bytes) -> ErrorInfo | None:
        if len(payload) > self.cfg.max_message_bytes:
            return ErrorInfo(
                code="too_large",
                message=f"message of {len(payload)} bytes exceeds max_message_bytes {self.cfg.max_message_bytes}",
            )
        return None

    async def _rights_worker(self) -> None:
        await self._resume_snapshot()
        while True:
            payload = await self._rights_q.get()
            try:
                await self._on_rights(payload)
            except (StoreError, sqlite3.Error, OSError) as e:
                log.error("rights message failed: %s", e)
                await self._publish(
                    Leaf.RIGHTS_REPLY,
                    RightsResult(id=peek_ref(payload), ok=False, version=self.store.version, error=_error(e)),
                )

    async def _on_rights(self, payload: bytes) -> None:
        err = self._too_large(payload)
        if err is not None:
            await self._reply_rights(peek_ref(payload), err)
            return
        try:
            msg = decode_downlink(payload)
        except ProtocolError as e:
            await self._reply_rights(peek_ref(payload), _error(e))
            return
        if isinstance(msg, ChangeSetMsg):
            await self._on_change_set(msg)
        elif isinstance(msg, SnapshotChunk):
            await self._on_chunk(msg, payload)
        else:
            await self._publish_birth()

    async def _reply_rights(self, ref: str | None, err: ErrorInfo) -> None:
        log.warning("rights message %s refused: %s %s", ref, err.code, err.message)
        await self._publish(Leaf.RIGHTS_REPLY, RightsResult(id=ref, ok=False, version=self.store.version, error=err))

    async def _on_change_set(self, msg: ChangeSetMsg) -> None:
        try:
            r = await self.store.apply(msg.change_set)
        except VersionGap as e:
            await self._reply_rights(msg.id, _error(e))
            await self._publish(Leaf.RIGHTS_REPLY, ResyncRequest(have=e.have, reason="version_gap", ref=msg.id))
            return
        except ChangeRejected as e:
            await self._reply_rights(msg.id, _error(e))
            return
        await self._publish(
            Leaf.RIGHTS_REPLY,
            RightsResult(id=msg.id, ok=True, version=r.version, applied=r.applied, changes=r.changes),
        )

    async def _resume_snapshot(self) -> None:
        """A transfer fully staged before a restart (killed while applying it) is applied now."""
        cur = await self._staging.current()
        if cur is None:
            return
        bodies = await self._staging.bodies()
        if len(bodies) == cur[2]:
            last = decode_downlink(bodies[-1])
            if isinstance(last, SnapshotChunk):
                log.info("resuming staged snapshot %s", cur[0])
                await self._on_chunk(last, bodies[-1])

    async def _on_chunk(self, c: SnapshotChunk, payload: bytes) -> None:
        done = await self._staging.done(c.id)
        if done is not None:
            await self._publish_raw(Leaf.RIGHTS_REPLY, done)
            return
        have = self.store.version
        if c.version <= have and not c.force and await self._staging.current() is None:
            await self._publish(Leaf.RIGHTS_REPLY, RightsResult(id=c.id, ok=True, version=have, applied=False))
            return
        if c.index >= c.count:
            await self._reply_rights(
                c.id, ErrorInfo(code="bad_field", message=f"index {c.index} >= count {c.count}", path="index")
            )
            return
        received = await self._staging.put(c, payload)
        await self._publish(Leaf.RIGHTS_REPLY, ChunkAck(id=c.id, index=c.index, received=received, count=c.count))
        if received < c.count:
            return
        bodies = await self._staging.bodies()
        # decoding a large snapshot takes long: off the loop thread, so taps are not held up
        snap = await asyncio.to_thread(_join_chunks, bodies)
        result: RightsResult
        try:
            if snap.version <= self.store.version and not c.force:
                result = RightsResult(id=c.id, ok=True, version=self.store.version, applied=False)
            else:
                r = await self.store.replace(snap)
                result = RightsResult(id=c.id, ok=True, version=r.version, applied=r.applied, changes=r.changes)
                log.info("snapshot %s applied: rights version %d (%d changes)", c.id, r.version, r.changes)
        except ChangeRejected as e:
            log.warning("snapshot %s refused: %s", c.id, e)
            result = RightsResult(id=c.id, ok=False, version=self.store.version, error=_error(e))
        data = encode(result, self.cfg.encoding)
        await self._staging.finish(c.id, data, self.clock())
        await self._publish_raw(Leaf.RIGHTS_REPLY, data)

    async def _publish_raw(self, leaf: Leaf, data: bytes) -> None:
        client = self._client
        if client is None:
            return
        with contextlib.suppress(aiomqtt.MqttError):
            await client.publish(self.topics[leaf], data, qos=1)

    # --- commands ---------------------------------------------------------------------------------------

    async def _on_command(self, payload: bytes) -> None:
        self.stats["commands"] += 1
        original: CommandResult | None = None
        try:
            too_large = self._too_large(payload)
            if too_large is not None:
                raise CommandRejected("too_large", too_large.message, request_id=peek_ref(payload))
            try:
                signed = decode_command(payload)
            except ProtocolError as e:
                try:
                    plain = decode_command_body(payload)
                except ProtocolError:
                    raise CommandRejected("malformed", str(e), request_id=peek_ref(payload)) from None
                raise CommandRejected(
                    "unsigned", "command is not signed", request_id=plain.request_id, operator=plain.operator
                ) from None
            cmd = check(
                signed, self.public_key, site=self.cfg.site, gateway=self.cfg.gateway, now=self.clock(),
                skew_s=self.cfg.command_skew_s, max_ttl_s=self.cfg.command_max_ttl_s,
            )  # fmt: skip
            fresh, prior = await self._nonces.claim(cmd)
            if not fresh:
                if prior is not None:
                    with contextlib.suppress(ProtocolError):
                        original = decode_command_result(prior)
                raise CommandRejected(
                    "replayed", "this command (nonce) was received before", request_id=cmd.request_id,
                    operator=cmd.operator,
                )  # fmt: skip
        except CommandRejected as e:
            log.warning("command %s refused: %s (%s)", e.request_id, e.code, e)
            self.journal.record(
                SECURITY_COMMAND_REJECTED, user=e.operator, reason=e.code,
                detail={"request_id": e.request_id, "message": str(e)[:200]},
            )  # fmt: skip
            await self._publish(
                Leaf.COMMAND_RESULT,
                CommandResult(
                    request_id=e.request_id, ok=False, error=ErrorInfo(code=e.code, message=str(e)), original=original
                ),
            )
            return
        result = await self._execute(cmd)
        await self._nonces.set_result(cmd.nonce, encode(result, "msgpack"))
        await self._publish(Leaf.COMMAND_RESULT, result)

    async def _execute(self, cmd: Command) -> CommandResult:
        a = cmd.command
        action = type(a).__struct_config__.tag
        detail: dict[str, str | int | float | bool | None] = {"request_id": cmd.request_id, "action": str(action)}
        door: str | None = None
        try:
            if isinstance(a, RotateKey):
                return await self._rotate(cmd, a)
            if isinstance(a, Unlock):
                door = a.door
                detail["seconds"] = a.seconds
                await self.commands.unlock(a.door, a.seconds)
            elif isinstance(a, SetDoorMode):
                door = a.door
                detail["mode"] = None if a.mode is None else a.mode.value
                await self.commands.set_door_mode(a.door, a.mode)
            elif isinstance(a, Lockdown):
                detail["active"] = a.active
                await self.commands.lockdown(a.active)
            elif isinstance(a, Resync):
                await self.commands.resync()
                await self._publish(
                    Leaf.RIGHTS_REPLY, ResyncRequest(have=self.store.version, reason="command", ref=cmd.request_id)
                )
            elif isinstance(a, RebirthAction):
                await self._publish_birth()
        except ValueError as e:
            log.warning("command %s (%s) failed: %s", cmd.request_id, action, e)
            return CommandResult(request_id=cmd.request_id, ok=False, error=ErrorInfo(code="invalid", message=str(e)))
        except Exception as e:
            log.exception("command %s (%s) failed", cmd.request_id, action)
            return CommandResult(request_id=cmd.request_id, ok=False, error=_error(e))
        self.journal.record(COMMAND_EXECUTED, door=door, user=cmd.operator, detail=detail)
        return CommandResult(request_id=cmd.request_id, ok=True)

    # --- events -----------------------------------------------------------------------------------------

    async def _on_event_ack(self, payload: bytes) -> None:
        try:
            ack = decode_event_ack(payload)
        except ProtocolError as e:
            log.warning("bad event ack ignored: %s", e)
            return
        sent_at = self._sent_at.pop(ack.upto_seq, None)
        if ack.ts is not None and sent_at is not None:
            rtt = time.monotonic() - sent_at
            for cb in self.on_cloud_time:
                cb(ack.ts, rtt)
        for seq in [s for s in self._sent_at if s <= ack.upto_seq]:
            del self._sent_at[seq]
        upto = min(ack.upto_seq, self._sent_max)
        if upto <= self._acked:
            # A duplicate acknowledgement while batches are in flight: the cloud lacks what follows it (it
            # reconnected, or a batch was lost). Go back to it now rather than after ack_timeout_s, at most
            # once a second so that the batches of the previous round still arriving do not cause a storm.
            now = time.monotonic()
            if self._sent > self._acked and now - self._last_rewind > 1.0:
                self._last_rewind = now
                self._rewind = True
                self._wake.set()
            return
        await self.journal.ack(upto)
        self._acked = upto
        self._last_ack_at = time.monotonic()
        self._wake.set()

    async def _upload(self, client: aiomqtt.Client) -> None:
        """Send the journal in order, `window` batches ahead of the acknowledgements; after a reconnect
        or an ack timeout, start again from the last acknowledged sequence number (go-back-N)."""
        cfg = self.cfg
        self._sent = self._acked
        inflight: list[int] = []  # last_seq of batches sent and not yet acknowledged
        self._last_ack_at = time.monotonic()
        while True:
            self._wake.clear()
            if self._rewind:
                self._rewind = False
                self.stats["resends"] += 1
                self._sent = self._acked
                inflight.clear()
            inflight = [s for s in inflight if s > self._acked]
            if len(inflight) >= cfg.window:
                if time.monotonic() - self._last_ack_at > cfg.ack_timeout_s:
                    log.info("no event ack for %.0f s: resending from seq %d", cfg.ack_timeout_s, self._acked)
                    self.stats["resends"] += 1
                    self._sent = self._acked
                    inflight.clear()
                    self._last_ack_at = time.monotonic()
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), cfg.ack_timeout_s / 4)
                continue
            events = await self.journal.read(self._sent, cfg.batch_events)
            if not events:
                if inflight and time.monotonic() - self._last_ack_at > cfg.ack_timeout_s:
                    self.stats["resends"] += 1
                    self._sent = self._acked
                    inflight.clear()
                    self._last_ack_at = time.monotonic()
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), cfg.ack_timeout_s / 4)
                continue
            if not inflight:
                self._last_ack_at = time.monotonic()
            for batch, data in split_events(events, self._sent, cfg.max_message_bytes, cfg.encoding):
                await client.publish(self.topics.events, data, qos=1)
                inflight.append(batch.last_seq)
                self._sent_at[batch.last_seq] = time.monotonic()
                self._sent = batch.last_seq
                self._sent_max = max(self._sent_max, batch.last_seq)
                self.stats["events_sent"] += len(batch.events)
                self.stats["batches_sent"] += 1
