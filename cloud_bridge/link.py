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
import hashlib
import logging
import os
import random
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Annotated, Any, Protocol, Self, TypeVar

import aiomqtt
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
    MAX_VERSION,
    Birth,
    ChangeSetMsg,
    ChunkAck,
    Command,
    CommandResult,
    Death,
    Encoding,
    ErrorInfo,
    EventAck,
    EventBatch,
    Lockdown,
    ProtocolError,
    Provision,
    Rebirth,
    RebirthAction,
    Resync,
    ResyncRequest,
    RightsResult,
    RotateKey,
    SetDoorMode,
    Signed,
    SnapshotChunk,
    SnapshotManifest,
    Unlock,
    decode_command,
    decode_command_body,
    decode_command_result,
    decode_downlink,
    decode_event_ack,
    encode,
    peek_ref,
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
    open_signed,
    save_key_state,
)
from .topics import Leaf, Topics

log = logging.getLogger("cloud_bridge.link")
_T = TypeVar("_T")

#: Journal event type of every command carried out (user = the operator).
COMMAND_EXECUTED = "command.executed"
#: Journal event type of an accepted key rotation (detail: old and new key fingerprints).
KEY_ROTATED = "security.key_rotated"
#: Journal event type of a refused downlink message (rights, events/ack); commands use
#: `security.command_rejected`. Rate-limited: see `RefusalLog`.
SECURITY_MESSAGE_REJECTED = "security.message_rejected"
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
    #: SQLite `synchronous` for the link's own state (command nonces).
    synchronous: str = "FULL"
    #: Largest snapshot transfer staged on disk (also bounded by the free space less 8 MiB).
    snapshot_max_bytes: Annotated[int, Meta(ge=4096)] = 512 * 1024 * 1024
    #: Rights messages waiting to be processed; more are dropped (the cloud resends until answered).
    rights_queue: Annotated[int, Meta(ge=1, le=100_000)] = 256
    #: How often a refused downlink message of one kind is journalled (the rest are counted).
    refusal_journal_s: Annotated[float, Meta(ge=0)] = 60.0


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
        b = EventBatch(first_seq=part[0].seq, last_seq=part[-1].seq, events=part, prev_seq=prev,
                       ref=os.urandom(8).hex())  # fmt: skip
        data = encode(b, encoding)
        if len(data) <= max_bytes or len(part) == 1:
            out.append((b, data))
        else:
            mid = len(part) // 2
            todo[:0] = [part[:mid], part[mid:]]
    return out


class StagingFull(EdgeError):
    """A snapshot transfer does not fit the staging budget (`code` is `too_large`)."""

    code = "too_large"


class SnapshotStaging:
    """Snapshot chunks kept aside on disk until a transfer is complete; the last results, for duplicates.

    One directory: `manifest` (the signed envelope of the transfer's `SnapshotManifest`, exactly as
    received), one file per staged chunk (`chunk-<index>`, each checked against the manifest's hash before
    it is written), and `done` (the results of the last 100 transfers). Files, not a database, so that a
    newer transfer frees the disk of an older one by unlinking, even on a full disk. Every file is written
    to a temporary name, fsynced and renamed. Budget: a manifest is refused when its declared size exceeds
    `max_bytes` or the free space of the filesystem less a reserve (5 % of the filesystem, at most 8 MiB,
    left for the rights database and the journal)."""

    def __init__(self, path: Path, *, max_bytes: int) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.manifest: SnapshotManifest | None = None
        self._done: dict[str, tuple[float, bytes]] = {}

    async def __aenter__(self) -> Self:
        await asyncio.to_thread(self._open)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        self.manifest = None

    def _open(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        for stray in self.path.glob(".*.tmp"):
            stray.unlink(missing_ok=True)
        try:
            rows = _done_dec.decode((self.path / "done").read_bytes())
            self._done = {r[0]: (float(r[1]), bytes(r[2])) for r in rows}
        except FileNotFoundError:
            pass
        except (msgspec.DecodeError, msgspec.ValidationError, OSError, IndexError, TypeError) as e:
            log.warning("snapshot staging: results of earlier transfers unreadable (%s); forgotten", e)

    def envelope(self) -> bytes | None:
        """The staged transfer's signed manifest envelope (for the link to verify again at start)."""
        try:
            return (self.path / "manifest").read_bytes()
        except FileNotFoundError:
            return None

    def done(self, transfer: str) -> bytes | None:
        hit = self._done.get(transfer)
        return None if hit is None else hit[1]

    def _chunk(self, index: int) -> Path:
        return self.path / f"chunk-{index:05d}"

    def staged(self) -> list[int]:
        out = []
        for f in self.path.glob("chunk-*"):
            with contextlib.suppress(ValueError):
                out.append(int(f.name[6:]))
        return sorted(out)

    def discard(self) -> None:
        """Forget the staged transfer and free its disk (unlinking works on a full disk)."""
        for f in self.path.glob("chunk-*"):
            f.unlink(missing_ok=True)
        (self.path / "manifest").unlink(missing_ok=True)
        self.manifest = None

    def budget(self) -> int:
        try:
            st = os.statvfs(self.path)
        except OSError:
            return 0
        reserve = min(8 * 1024 * 1024, st.f_blocks * st.f_frsize // 20)
        return max(0, min(self.max_bytes, st.f_bavail * st.f_frsize - reserve))

    def begin(self, m: SnapshotManifest, envelope: bytes) -> None:
        """Stage a verified manifest (any other transfer is discarded first). Raises `StagingFull`."""
        if self.manifest is not None and self.manifest.id == m.id:
            return
        self.discard()
        room = self.budget()
        if m.size + len(envelope) > room:
            raise StagingFull(f"snapshot of {m.size} bytes does not fit the staging budget of {room} bytes "
                              "(storage.snapshot_max_bytes, free disk)")  # fmt: skip
        _write_atomic(self.path / "manifest", envelope)
        self.manifest = m

    def put(self, index: int, body: bytes) -> int:
        """Stage one chunk already checked against the manifest; returns how many chunks are staged."""
        _write_atomic(self._chunk(index), body)
        return len(self.staged())

    def bodies(self) -> Iterator[bytes]:
        """The staged chunks in order, read one at a time (bounded memory)."""
        for i in self.staged():
            yield self._chunk(i).read_bytes()

    def finish(self, transfer: str, result: bytes, now: float) -> None:
        self.discard()
        self._done[transfer] = (now, result)
        keep = sorted(self._done.items(), key=lambda kv: kv[1][0])[-100:]
        self._done = dict(keep)
        try:
            _write_atomic(self.path / "done", _done_enc.encode([[k, at, r] for k, (at, r) in keep]))
        except OSError as e:
            log.warning("snapshot staging: result of %s not saved: %s", transfer, e)


_done_enc = msgspec.msgpack.Encoder()
_done_dec = msgspec.msgpack.Decoder(list[tuple[str, float, bytes]])


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class RefusalLog:
    """Journals refused downlink messages and commands without letting a flood push real events out of
    the journal: the first refusal of each (topic, code) is journalled, later ones within `window_s` are
    only counted, and the next one after the window carries `detail.suppressed` (how many were not
    journalled). At most `max_keys` distinct keys are tracked (the rest share one)."""

    def __init__(self, window_s: float = 60.0, max_keys: int = 64) -> None:
        self.window_s = window_s
        self.max_keys = max_keys
        self._last: dict[tuple[str, str], tuple[float, int]] = {}
        self.total = 0

    def admit(self, leaf: str, code: str, now: float) -> int | None:
        """None: do not journal this one. Otherwise the number suppressed since the last journalled one."""
        self.total += 1
        key = (leaf, code)
        if key not in self._last and len(self._last) >= self.max_keys:
            key = ("*", "*")
        at, suppressed = self._last.get(key, (-1e18, 0))
        if now - at < self.window_s:
            self._last[key] = (at, suppressed + 1)
            return None
        self._last[key] = (now, 0)
        return suppressed


def _error(e: BaseException) -> ErrorInfo:
    if isinstance(e, ChangeRejected):
        return ErrorInfo(code=e.code, message=str(e), path=e.path)
    if isinstance(e, ProtocolError):
        return ErrorInfo(code="malformed", message=str(e))
    if isinstance(e, StoreError):
        return ErrorInfo(code="storage", message=str(e))
    return ErrorInfo(code="internal", message=f"{type(e).__name__}: {e}")


def _join_chunks(bodies: Iterable[bytes]) -> Snapshot:
    """Decode the staged chunks one at a time into one snapshot (each chunk's bytes are dropped as soon as
    it is decoded, so the peak is the decoded rights plus one chunk)."""
    lists: dict[str, list[Any]] = {k: [] for k in ("doors", "schedules", "groups", "users", "credentials")}
    version = 0
    for body in bodies:
        c = decode_downlink(body)
        if not isinstance(c, SnapshotChunk):
            raise ProtocolError("a staged chunk is not a snapshot chunk")
        version = c.version
        for k, items in lists.items():
            items.extend(getattr(c, k))
        del c, body
    return Snapshot(version=version, **lists)


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
        self._sent_refs: dict[str, tuple[int, float]] = {}  # batch ref -> (last_seq, monotonic time sent)
        self._online = False
        self._offline_since: datetime | None = datetime.fromtimestamp(clock(), UTC)
        self._client: aiomqtt.Client | None = None
        self._session = 0
        self._nonces = NonceStore(self.state_dir / "link-nonces.db", synchronous=cfg.synchronous)
        self._staging = SnapshotStaging(self.state_dir / "link-snapshot", max_bytes=cfg.snapshot_max_bytes)
        self._rights_q: asyncio.Queue[bytes] = asyncio.Queue(cfg.rights_queue)
        self._refusals = RefusalLog(cfg.refusal_journal_s)
        self._last_birth = -1e18
        self._wake = asyncio.Event()
        self._acked = 0  # highest seq the cloud acknowledged (this process)
        self._sent = 0  # highest seq sent in the current round
        self._sent_max = 0  # highest seq ever sent by this process
        self._last_ack_at = 0.0
        self._last_rewind = 0.0
        self._rewind = False
        self.stats: dict[str, int] = {"events_sent": 0, "batches_sent": 0, "resends": 0, "commands": 0,
                                      "refused": 0, "dropped": 0, "handler_errors": 0}  # fmt: skip

    # --- lifecycle --------------------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        await self._load_keys()
        await self._nonces.__aenter__()
        await self._staging.__aenter__()
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
            try:
                if leaf is Leaf.RIGHTS:
                    try:
                        self._rights_q.put_nowait(payload)
                    except asyncio.QueueFull:
                        self.stats["dropped"] += 1
                        self._refused(Leaf.RIGHTS, "queue_full", None, "rights queue full: message dropped")
                elif leaf is Leaf.EVENTS_ACK:
                    await self._on_event_ack(payload)
                elif leaf is Leaf.COMMAND:
                    await self._on_command(payload)
                else:
                    log.warning("message on unexpected topic %s ignored", m.topic.value)
            except (aiomqtt.MqttError, asyncio.CancelledError):
                raise
            except Exception:
                # One message never takes the link down: say so loudly and read the next one.
                self.stats["handler_errors"] += 1
                log.exception("message on %s failed", m.topic.value)

    def _too_large(self, payload: bytes) -> ErrorInfo | None:
        if len(payload) > self.cfg.max_message_bytes:
            return ErrorInfo(
                code="too_large",
                message=f"message of {len(payload)} bytes exceeds max_message_bytes {self.cfg.max_message_bytes}",
            )
        return None

    async def _peek(self, payload: bytes) -> str | None:
        """The request id of a refused message (read without trusting it, only to echo it): a large message is
        read off the loop thread (its depth check walks every item: 256 KiB of empty arrays is ~0.2 s of CPU,
        16 MB held the loop past the keepalive), one of more than 1 MiB (and 4 x `max_message_bytes`) not at all."""
        if len(payload) < 16384:
            return peek_ref(payload)
        if len(payload) > max(1 << 20, 4 * self.cfg.max_message_bytes):
            return None
        return await asyncio.to_thread(peek_ref, payload)

    @staticmethod
    async def _decode(decoder: Callable[[bytes], _T], payload: bytes) -> _T:
        """Decode with `decoder`; a large message off the loop thread (see `_peek`), so that taps are not held up."""
        return decoder(payload) if len(payload) < 16384 else await asyncio.to_thread(decoder, payload)

    def _refused(self, leaf: Leaf, code: str, ref: str | None, message: str, *, operator: str | None = None,
                 event: str | None = None) -> None:  # fmt: skip
        """Log and journal one refused message, rate-limited per (topic, code) so that a flood of forged
        messages cannot push real events out of the journal."""
        self.stats["refused"] += 1
        suppressed = self._refusals.admit(leaf.value, code, time.monotonic())
        if suppressed is None:
            return
        log.warning("%s message %s refused: %s (%s)%s", leaf.value, ref, code, message,
                    f"; {suppressed} more refusals not logged" if suppressed else "")  # fmt: skip
        detail: dict[str, str | int | float | bool | None] = {
            "topic": leaf.value, "request_id": ref, "message": message[:200],
        }  # fmt: skip
        if suppressed:
            detail["suppressed"] = suppressed
        self.journal.record(event or SECURITY_MESSAGE_REJECTED, user=operator, reason=code, detail=detail)

    async def _rights_worker(self) -> None:
        try:
            await self._resume_snapshot()
        except Exception:
            log.exception("staged snapshot could not be resumed; it is discarded")
            await asyncio.to_thread(self._staging.discard)
        while True:
            payload = await self._rights_q.get()
            try:
                await self._on_rights(payload)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                # storage errors and bugs alike: answered, journalled, and the worker goes on
                if not isinstance(e, StoreError | sqlite3.Error | OSError):
                    self.stats["handler_errors"] += 1
                    log.exception("rights message failed")
                else:
                    log.error("rights message failed: %s", e)
                await self._publish(
                    Leaf.RIGHTS_REPLY,
                    RightsResult(id=await self._peek(payload), ok=False, version=self.store.version, error=_error(e)),
                )

    async def _on_rights(self, payload: bytes) -> None:
        err = self._too_large(payload)
        if err is not None:
            await self._reply_rights(await self._peek(payload), err)
            return
        try:
            # a large message is checked and decoded off the loop thread, so taps are not held up
            msg = await self._decode(decode_downlink, payload)
        except ProtocolError as e:
            await self._reply_rights(await self._peek(payload), _error(e))
            return
        if isinstance(msg, SnapshotChunk):
            await self._on_chunk(msg, payload)
            return
        if not isinstance(msg, Signed):
            tag = type(msg).__struct_config__.tag
            ref = await self._peek(payload)
            await self._refuse_rights(CommandRejected("unsigned", f"{tag} must be signed (inside 'signed')",
                                                      request_id=ref))  # fmt: skip
            return
        try:
            p = self._open(msg)
        except CommandRejected as e:
            e.request_id = e.request_id or await self._peek(payload)
            await self._refuse_rights(e)
            return
        inner = p.msg
        if isinstance(inner, ChangeSetMsg):
            await self._on_change_set(inner)
        elif isinstance(inner, SnapshotManifest):
            await self._on_manifest(inner, payload)
        elif isinstance(inner, Rebirth):
            await self._rebirth()
        else:
            await self._reply_rights(None, ErrorInfo(code="malformed", message="an events_ack is not a rights message"))

    def _open(self, msg: Signed) -> Provision:
        """Verify a signed envelope with the command key in use (and, while a rotation is pending, also the
        new one: the cloud signs provisioning with the key it just rotated to)."""
        now = self.clock()
        keys = [self._keys.in_use(now)]
        if self._keys.pending(now):
            keys.append(bytes.fromhex(self._keys.key))
        err: CommandRejected | None = None
        for k in keys:
            try:
                return open_signed(msg, self._verifier(k), site=self.cfg.site, gateway=self.cfg.gateway)
            except CommandRejected as e:
                if e.code != "bad_signature":
                    raise
                err = e
        assert err is not None
        raise err

    async def _refuse_rights(self, e: CommandRejected) -> None:
        self._refused(Leaf.RIGHTS, e.code, e.request_id, str(e))
        await self._publish(Leaf.RIGHTS_REPLY, RightsResult(id=e.request_id, ok=False, version=self.store.version,
                                                            error=ErrorInfo(code=e.code, message=str(e))))  # fmt: skip

    async def _rebirth(self) -> None:
        """A birth on request, at most once a second (a replayed signed rebirth cannot flood the broker)."""
        now = time.monotonic()
        if now - self._last_birth < 1.0:
            return
        self._last_birth = now
        await self._publish_birth()

    async def _reply_rights(self, ref: str | None, err: ErrorInfo) -> None:
        self._refused(Leaf.RIGHTS, err.code, ref, err.message)
        await self._publish(Leaf.RIGHTS_REPLY, RightsResult(id=ref, ok=False, version=self.store.version, error=err))

    async def _on_change_set(self, msg: ChangeSetMsg) -> None:
        cs = msg.change_set
        for name in ("from_version", "to_version"):
            if not 0 <= getattr(cs, name) <= MAX_VERSION:
                await self._reply_rights(msg.id, ErrorInfo(code="bad_field", message=f"{name} must be 0 .. 2^53-1",
                                                           path=f"change_set.{name}"))  # fmt: skip
                return
        if cs.to_version <= cs.from_version:
            await self._reply_rights(msg.id, ErrorInfo(code="bad_field", message="to_version must be above "
                                                       "from_version", path="change_set.to_version"))  # fmt: skip
            return
        try:
            r = await self.store.apply(cs)
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

    # --- snapshots --------------------------------------------------------------------------------------

    async def _resume_snapshot(self) -> None:
        """A transfer staged before a restart is kept only when its signed manifest still verifies; a
        complete one is applied now (the agent was killed while applying it)."""
        env = await asyncio.to_thread(self._staging.envelope)
        if env is None:
            await asyncio.to_thread(self._staging.discard)  # chunks without a manifest: never trusted
            return
        try:
            msg = decode_downlink(env)
            if not isinstance(msg, Signed):
                raise CommandRejected("unsigned", "staged manifest is not signed")
            p = self._open(msg)
            if not isinstance(p.msg, SnapshotManifest):
                raise CommandRejected("malformed", "staged manifest is not a snapshot manifest")
        except (CommandRejected, ProtocolError) as e:
            log.warning("staged snapshot discarded: its manifest does not verify (%s)", e)
            await asyncio.to_thread(self._staging.discard)
            return
        m = p.msg
        self._staging.manifest = m
        if m.version <= self.store.version:
            await asyncio.to_thread(self._staging.discard)
            return
        log.info("staged snapshot %s kept (%d of %d chunks)", m.id, len(self._staging.staged()), m.count)
        await self._maybe_apply(m)

    async def _on_manifest(self, m: SnapshotManifest, envelope: bytes) -> None:
        done = self._staging.done(m.id)
        if done is not None:
            await self._publish_raw(Leaf.RIGHTS_REPLY, done)
            return
        have = self.store.version
        if m.version <= have:
            # A snapshot at the version held (or older) is never applied: a repair is a snapshot at a
            # newer version. Answered so that the cloud stops resending.
            await self._publish(Leaf.RIGHTS_REPLY, RightsResult(id=m.id, ok=True, version=have, applied=False))
            return
        if len(m.hashes) != m.count:
            await self._reply_rights(m.id, ErrorInfo(code="bad_field", message=f"{len(m.hashes)} hashes for "
                                                     f"{m.count} chunks", path="hashes"))  # fmt: skip
            return
        if m.size > m.count * self.cfg.max_message_bytes:
            await self._reply_rights(m.id, ErrorInfo(code="bad_field", message="size exceeds count x "
                                                     "max_message_bytes", path="size"))  # fmt: skip
            return
        try:
            await asyncio.to_thread(self._staging.begin, m, envelope)
        except StagingFull as e:
            await self._reply_rights(m.id, ErrorInfo(code="too_large", message=str(e), path="size"))
            return
        except OSError as e:
            await asyncio.to_thread(self._staging.discard)
            await self._reply_rights(m.id, ErrorInfo(code="storage", message=f"cannot stage the snapshot: {e}"))
            return
        await self._maybe_apply(m)

    async def _on_chunk(self, c: SnapshotChunk, payload: bytes) -> None:
        done = self._staging.done(c.id)
        if done is not None:
            await self._publish_raw(Leaf.RIGHTS_REPLY, done)
            return
        m = self._staging.manifest
        if m is None or m.id != c.id:
            await self._refuse_rights(CommandRejected(
                "unsigned", "no signed snapshot_manifest is staged for this transfer: send it first",
                request_id=c.id))  # fmt: skip
            return
        if (c.version, c.count) != (m.version, m.count) or c.index >= m.count:
            await self._refuse_rights(CommandRejected(
                "bad_chunk", f"chunk {c.index} (version {c.version}, count {c.count}) does not belong to the "
                f"manifest (version {m.version}, count {m.count})", request_id=c.id))  # fmt: skip
            return
        if hashlib.sha256(payload).digest() != m.hashes[c.index]:
            await self._refuse_rights(CommandRejected(
                "bad_chunk", f"chunk {c.index} does not match the SHA-256 in the signed manifest",
                request_id=c.id))  # fmt: skip
            return
        try:
            received = await asyncio.to_thread(self._staging.put, c.index, payload)
        except OSError as e:
            await self._reply_rights(c.id, ErrorInfo(code="storage", message=f"cannot stage chunk {c.index}: {e}"))
            return
        await self._publish(Leaf.RIGHTS_REPLY, ChunkAck(id=c.id, index=c.index, received=received, count=c.count))
        await self._maybe_apply(m)

    async def _maybe_apply(self, m: SnapshotManifest) -> None:
        """Apply the staged transfer once every chunk of the manifest is on disk."""
        if len(self._staging.staged()) < m.count:
            return
        result: RightsResult
        try:
            # decoding a large snapshot takes long: off the loop thread, one chunk at a time
            snap = await asyncio.to_thread(_join_chunks, self._staging.bodies())
            if snap.version != m.version:
                raise ProtocolError(f"chunks carry version {snap.version}, the manifest {m.version}")
            if snap.version <= self.store.version:
                result = RightsResult(id=m.id, ok=True, version=self.store.version, applied=False)
            else:
                r = await self.store.replace(snap)
                del snap
                result = RightsResult(id=m.id, ok=True, version=r.version, applied=r.applied, changes=r.changes)
                log.info("snapshot %s applied: rights version %d (%d changes)", m.id, r.version, r.changes)
        except (ChangeRejected, ProtocolError) as e:
            log.warning("snapshot %s refused: %s", m.id, e)
            result = RightsResult(id=m.id, ok=False, version=self.store.version, error=_error(e))
        data = encode(result, self.cfg.encoding)
        await asyncio.to_thread(self._staging.finish, m.id, data, self.clock())
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
                raise CommandRejected("too_large", too_large.message, request_id=await self._peek(payload))
            try:
                signed = await self._decode(decode_command, payload)
            except ProtocolError as e:
                try:
                    plain = await self._decode(decode_command_body, payload)
                except ProtocolError:
                    raise CommandRejected("malformed", str(e), request_id=await self._peek(payload)) from None
                raise CommandRejected(
                    "unsigned", "command is not signed", request_id=plain.request_id, operator=plain.operator
                ) from None
            try:
                cmd = check(
                    signed, self.public_key, site=self.cfg.site, gateway=self.cfg.gateway, now=self.clock(),
                    skew_s=self.cfg.command_skew_s, max_ttl_s=self.cfg.command_max_ttl_s,
                )  # fmt: skip
            except CommandRejected as e:
                # name the request (read from the unverified body, only to echo it) so the cloud can match
                e.request_id = e.request_id or await self._peek(signed.body)
                raise
            fresh, prior = await self._nonces.claim(cmd)
            if self._nonces.degraded:
                log.error("command %s: %s (replays refused from memory until restart)", cmd.request_id,
                          self._nonces.degraded)  # fmt: skip
            if not fresh:
                if prior is not None:
                    with contextlib.suppress(ProtocolError):
                        original = decode_command_result(prior)
                raise CommandRejected(
                    "replayed", "this command (nonce) was received before", request_id=cmd.request_id,
                    operator=cmd.operator,
                )  # fmt: skip
        except CommandRejected as e:
            self._refused(Leaf.COMMAND, e.code, e.request_id, str(e), operator=e.operator,
                          event=SECURITY_COMMAND_REJECTED)  # fmt: skip
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
        """Only a signed acknowledgement releases events, and only those actually sent; its clock is used
        only when it answers a batch sent by this process (`ref`), with the round trip measured."""
        too_large = self._too_large(payload)  # unread: even the depth check of 16 MB held the loop for seconds
        if too_large is not None:
            self._refused(Leaf.EVENTS_ACK, "too_large", None, too_large.message)
            return
        try:
            msg = await self._decode(decode_event_ack, payload)
            if not isinstance(msg, Signed):
                raise CommandRejected("unsigned", "events_ack must be signed (inside 'signed')")
            p = self._open(msg)
            if not isinstance(p.msg, EventAck):
                raise CommandRejected("malformed", f"{type(p.msg).__struct_config__.tag} on events/ack")
        except ProtocolError as e:
            self._refused(Leaf.EVENTS_ACK, "malformed", None, str(e))
            return
        except CommandRejected as e:
            self._refused(Leaf.EVENTS_ACK, e.code, None, str(e))
            return
        ack = p.msg
        sent = self._sent_refs.pop(ack.ref, None) if ack.ref else None
        if ack.ts is not None and sent is not None and sent[0] <= ack.upto_seq:
            rtt = time.monotonic() - sent[1]
            for cb in self.on_cloud_time:
                cb(ack.ts, rtt)
        for ref in [r for r, (last, _t) in self._sent_refs.items() if last <= ack.upto_seq]:
            del self._sent_refs[ref]
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
                self._sent_refs[batch.ref] = (batch.last_seq, time.monotonic())
                while len(self._sent_refs) > 4 * cfg.window + 16:  # answers that never came
                    del self._sent_refs[next(iter(self._sent_refs))]
                self._sent = batch.last_seq
                self._sent_max = max(self._sent_max, batch.last_seq)
                self.stats["events_sent"] += len(batch.events)
                self.stats["batches_sent"] += 1
