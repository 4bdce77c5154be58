"""A minimal cloud-side peer of one gateway: provisioning, commands, event collection.

It speaks the protocol of docs/protocol.md and nothing more, as a library for tests, benchmarks and the
operator service built on top of it. It follows the protocol's rules for the cloud side: every request is
resent (same id, same bytes) until the gateway's own reply comes, since broker delivery proves nothing;
events are de-duplicated on their id and acknowledged only up to a contiguous sequence number.

    async with CloudPeer(host="127.0.0.1", port=1883, site="s1", gateway="gw1", signing_key=key) as cloud:
        await cloud.wait_online()
        result = await cloud.send_snapshot(snapshot)
        await cloud.command(Unlock(door="front"), operator="alice")
"""

# ruff: noqa: ASYNC109  (wait helpers take a timeout, as aiomqtt's own API does)

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Callable
from typing import Any, Self

import aiomqtt
import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge.events import Event
from edge.model import ChangeSet, Snapshot

from . import mqtt
from .errors import CloudBridgeError
from .protocol import (
    SNAPSHOT_PARTS,
    Birth,
    ChangeSetMsg,
    ChunkAck,
    CommandAction,
    CommandResult,
    Death,
    Encoding,
    EventAck,
    EventBatch,
    ProtocolError,
    Rebirth,
    ResyncRequest,
    RightsResult,
    SignedCommand,
    SignedMsg,
    SnapshotChunk,
    SnapshotManifest,
    decode_command_result,
    decode_events,
    decode_rights_reply,
    decode_status,
    encode,
)
from .signing import sign_command, sign_downlink
from .topics import Leaf, Topics

log = logging.getLogger("cloud_bridge.cloud")



class CloudError(CloudBridgeError):
    """A request got no reply in time, or the cloud peer is not connected."""


def chunk_snapshot(snap: Snapshot, transfer: str, max_bytes: int, encoding: Encoding = "msgpack") -> list[bytes]:
    """Split a snapshot into encoded `SnapshotChunk`s of at most `max_bytes` each."""
    budget = max_bytes - 256  # room for the header fields, whose size depends on index and count
    pieces: list[dict[str, list[Any]]] = []
    for kind in SNAPSHOT_PARTS:
        items: list[Any] = getattr(snap, kind)
        if not items:
            continue
        sample = items[:200]
        avg = max(1.0, len(encode(sample, encoding)) / len(sample))
        n = max(1, int(budget * 0.9 / avg))
        todo = [items[i : i + n] for i in range(0, len(items), n)]
        while todo:
            part = todo.pop(0)
            probe = msgspec.structs.replace(
                SnapshotChunk(id=transfer, version=snap.version, index=0, count=1), **{kind: part}
            )
            if len(encode(probe, encoding)) > budget and len(part) > 1:
                todo[:0] = [part[: len(part) // 2], part[len(part) // 2 :]]
            else:
                pieces.append({kind: part})
    if not pieces:
        pieces.append({})
    out = []
    for i, p in enumerate(pieces):
        c = msgspec.structs.replace(SnapshotChunk(id=transfer, version=snap.version, index=i, count=len(pieces)), **p)
        out.append(encode(c, encoding))
    return out


def manifest_of(transfer: str, version: int, chunks: list[bytes]) -> SnapshotManifest:
    """The manifest that covers exactly these encoded chunks (to be signed and sent before them)."""
    hashes = [hashlib.sha256(c).digest() for c in chunks]
    return SnapshotManifest(id=transfer, version=version, count=len(chunks), hashes=hashes, size=sum(map(len, chunks)))


#: Refusals of a snapshot chunk that a resend of the manifest and the chunk repairs (the gateway lost or
#: never got the manifest, or the chunk was damaged on the way): the cloud keeps going instead of giving up.
TRANSIENT_CHUNK_ERRORS = frozenset({"unsigned", "bad_chunk"})


#: Snapshot chunks in flight at once (sent and not acknowledged). Well below the gateway's rights queue
#: (`[link] rights_queue`, 256 by default): a sender that resent every unacknowledged chunk each round
#: flooded a slow gateway's queue with copies, so chunks were dropped faster than they were applied and a
#: large snapshot to a loaded gateway never finished. A round ends as soon as its window is acknowledged.
CHUNK_WINDOW = 64


def chunk_round(count: int, acked: set[int], window: int = CHUNK_WINDOW) -> list[int]:
    """The chunks to send in this round: the first `window` not yet acknowledged, or (all are, and no result
    yet: the gateway restarted?) the last one, to prod it."""
    return [i for i in range(count) if i not in acked][:window] or [count - 1]


def is_final(r: RightsResult) -> bool:
    """Whether a result ends a request (a transient refusal of one chunk does not)."""
    return r.ok or r.error is None or r.error.code not in TRANSIENT_CHUNK_ERRORS


class CloudPeer(mqtt.Session):
    """The cloud's end of one gateway's link (async context manager)."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        site: str,
        gateway: str,
        signing_key: Ed25519PrivateKey | None = None,
        ca: str | None = None,
        cert: str | None = None,
        key: str | None = None,
        identifier: str | None = None,
        encoding: Encoding = "msgpack",
        max_message_bytes: int = 256 * 1024,
        auto_ack: bool = True,
        resend_s: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__()
        self.host, self.port = host, port
        #: The cloud's clock, sent in event acknowledgements (tests move it to make a skewed cloud).
        self.clock = clock
        self.topics = Topics(site, gateway)
        self.signing_key = signing_key
        self.tls = mqtt.tls_params(ca, cert, key)
        self.identifier = identifier or f"cloud-{site}-{gateway}-{os.urandom(4).hex()}"
        self.encoding: Encoding = encoding
        self.max_message_bytes = max_message_bytes
        self.auto_ack = auto_ack
        self.resend_s = resend_s
        #: The last retained/live status message (Birth or Death).
        self.status: Birth | Death | None = None
        self.births: list[Birth] = []
        #: Events by id, in arrival order (duplicates counted, not stored twice).
        self.events: dict[str, Event] = {}
        self.duplicates = 0
        self.batches: list[EventBatch] = []
        #: Everything up to this seq has been received (what `auto_ack` acknowledges).
        self.have_upto = 0
        self.rights_replies: list[RightsResult | ChunkAck | ResyncRequest] = []
        self.resyncs: list[ResyncRequest] = []
        self.command_results: list[CommandResult] = []
        self.on_events: list[Callable[[EventBatch], None]] = []
        self._last_ref = ""  # ref of the last batch received (echoed in the next ack)

    # --- lifecycle --------------------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        c = mqtt.client(self.host, self.port, identifier=self.identifier, tls=self.tls)
        self._client = await mqtt.connect(c, self.topics.uplink())
        self._start_reader(self._read(self._client), "cloud.read")
        if self.auto_ack:
            # "I hold everything up to have_upto": a gateway with batches in flight sends the rest again now
            await self.ack_events(self.have_upto)
        return self

    def _not_connected(self) -> Exception:
        return CloudError("cloud peer is not connected")

    # --- receiving --------------------------------------------------------------------------------------

    async def _read(self, client: aiomqtt.Client) -> None:
        async for m in client.messages:
            leaf = self.topics.parse(m.topic.value)
            data = mqtt.payload(m)
            if not data:
                continue  # a cleared retained message
            try:
                await self._dispatch(leaf, data)
            except ProtocolError as e:
                log.warning("bad message on %s: %s", m.topic.value, e)
            await self._changed_now()

    async def _dispatch(self, leaf: Leaf | None, data: bytes) -> None:
        if leaf is Leaf.STATUS:
            st = decode_status(data)
            self.status = st
            if isinstance(st, Birth):
                self.births.append(st)
        elif leaf is Leaf.EVENTS:
            b = decode_events(data)
            self.batches.append(b)
            for ev in b.events:
                if ev.id in self.events:
                    self.duplicates += 1
                else:
                    self.events[ev.id] = ev
            if b.priority:  # an urgent copy ahead of the backlog: kept, never acknowledged, no sequence claim
                for cb in self.on_events:
                    cb(b)
                return
            if b.prev_seq <= self.have_upto:
                self.have_upto = max(self.have_upto, b.last_seq)
            self._last_ref = b.ref
            # (a batch after a gap is kept but not acknowledged: the repeated ack makes the gateway go back)
            for cb in self.on_events:
                cb(b)
            if self.auto_ack:
                await self.ack_events(self.have_upto)
        elif leaf is Leaf.RIGHTS_REPLY:
            r = decode_rights_reply(data)
            self.rights_replies.append(r)
            if isinstance(r, ResyncRequest):
                self.resyncs.append(r)
        elif leaf is Leaf.COMMAND_RESULT:
            self.command_results.append(decode_command_result(data))

    async def wait_online(self, timeout: float = 30.0, *, after: int = 0) -> Birth:
        """Wait for a Birth (with session > `after`) as the current status."""

        def ok() -> Birth | None:
            s = self.status
            return s if isinstance(s, Birth) and s.session > after else None

        result: Birth = await self.wait_for(ok, timeout)
        return result

    async def wait_offline(self, timeout: float = 30.0) -> Death:
        result: Death = await self.wait_for(lambda: self.status if isinstance(self.status, Death) else None, timeout)
        return result

    async def wait_events(self, n: int, timeout: float = 30.0) -> None:
        await self.wait_for(lambda: len(self.events) >= n, timeout)

    def seal(self, msg: SignedMsg) -> bytes:
        """Sign one downlink message for this gateway with the site key and encode the envelope."""
        if self.signing_key is None:
            raise CloudError("no signing key: this cloud peer cannot provision or acknowledge")
        signed = sign_downlink(self.signing_key, msg, site=self.topics.site, gateway=self.topics.gateway,
                               now=self.clock(), encoding=self.encoding)  # fmt: skip
        return encode(signed, self.encoding)

    async def ack_events(self, upto_seq: int, *, ref: str | None = None) -> None:
        """Acknowledge up to `upto_seq`, naming the last batch received (or the batch `ref`)."""
        ack = EventAck(upto_seq=upto_seq, ts=self.clock(), ref=self._last_ref if ref is None else ref)
        await mqtt.publish(self.client, self.topics.events_ack, self.seal(ack))

    # --- provisioning -----------------------------------------------------------------------------------

    async def publish_raw(self, leaf: Leaf, data: bytes, *, expiry_s: int | None = None) -> None:
        await mqtt.publish(self.client, self.topics[leaf], data, expiry_s=expiry_s)

    def _result_for(self, rid: str, start: int) -> RightsResult | None:
        for r in self.rights_replies[start:]:
            if isinstance(r, RightsResult) and r.id == rid and is_final(r):
                return r
        return None

    async def send_change_set(self, cs: ChangeSet, *, id: str | None = None, timeout: float = 60.0) -> RightsResult:
        """Send a change set, resending it until the gateway answers; return its answer."""
        rid = id or os.urandom(8).hex()
        data = self.seal(ChangeSetMsg(id=rid, change_set=cs))
        start = len(self.rights_replies)
        async with asyncio.timeout(timeout):
            while True:
                await self.publish_raw(Leaf.RIGHTS, data)
                with contextlib.suppress(TimeoutError):
                    r: RightsResult = await self.wait_for(lambda: self._result_for(rid, start), self.resend_s)
                    return r

    async def send_snapshot(self, snap: Snapshot, *, id: str | None = None, timeout: float = 300.0) -> RightsResult:
        """Send a snapshot: its signed manifest, then its chunks; resend the manifest and the chunks not yet
        acknowledged until the final result comes."""
        tid = id or os.urandom(8).hex()
        chunks = chunk_snapshot(snap, tid, self.max_message_bytes, self.encoding)
        return await self.send_chunks(tid, chunks, version=snap.version, timeout=timeout)

    async def send_chunks(
        self, transfer: str, chunks: list[bytes], *, version: int, timeout: float = 300.0
    ) -> RightsResult:
        """Send pre-encoded chunks of transfer `transfer` (from `chunk_snapshot`), after their signed
        manifest, until its result comes."""
        manifest = self.seal(manifest_of(transfer, version, chunks))
        start = len(self.rights_replies)

        def acked() -> set[int]:
            return {r.index for r in self.rights_replies[start:] if isinstance(r, ChunkAck) and r.id == transfer}

        async with asyncio.timeout(timeout):
            while True:
                sent = chunk_round(len(chunks), acked())
                await self.publish_raw(Leaf.RIGHTS, manifest)
                for i in sent:
                    await self.publish_raw(Leaf.RIGHTS, chunks[i])
                more = len(sent) < len(chunks) - len(acked())  # chunks beyond this round's window

                def done(sent: list[int] = sent, more: bool = more) -> object:  # this round's window
                    return self._result_for(transfer, start) or (more and set(sent) <= acked())

                with contextlib.suppress(TimeoutError):
                    if isinstance(r := await self.wait_for(done, self.resend_s), RightsResult):
                        return r

    async def request_rebirth(self) -> None:
        await self.publish_raw(Leaf.RIGHTS, self.seal(Rebirth()))

    # --- commands ---------------------------------------------------------------------------------------

    def sign(self, action: CommandAction, *, operator: str, ttl_s: float = 60.0, **kw: Any) -> SignedCommand:
        if self.signing_key is None:
            raise CloudError("no signing key: this cloud peer cannot send commands")
        _, signed = sign_command(
            self.signing_key, site=self.topics.site, gateway=self.topics.gateway, action=action,
            operator=operator, ttl_s=ttl_s, encoding=self.encoding, **kw,
        )  # fmt: skip
        return signed

    async def send_command(self, signed: SignedCommand | bytes, *, expiry_s: int = 60) -> None:
        """Publish one command message (never retained; MQTT message expiry set), without waiting."""
        data = signed if isinstance(signed, bytes) else encode(signed, self.encoding)
        await self.publish_raw(Leaf.COMMAND, data, expiry_s=expiry_s)

    async def wait_command_result(
        self, request_id: str | None, *, start: int = 0, timeout: float = 30.0
    ) -> CommandResult:
        def find() -> CommandResult | None:
            return next((r for r in self.command_results[start:] if r.request_id == request_id), None)

        result: CommandResult = await self.wait_for(find, timeout)
        return result

    async def command(
        self, action: CommandAction, *, operator: str, ttl_s: float = 60.0, timeout: float = 30.0
    ) -> CommandResult:
        """Sign and send a command; resend the same signed bytes until its result comes.

        A resend the gateway had already received is answered `replayed` with the first copy's result in
        `original`; that original is returned then."""
        from .protocol import decode_command_body

        signed = self.sign(action, operator=operator, ttl_s=ttl_s)
        rid = decode_command_body(signed.body).request_id
        start = len(self.command_results)
        async with asyncio.timeout(timeout):
            while True:
                await self.send_command(signed, expiry_s=max(1, int(ttl_s)))
                with contextlib.suppress(TimeoutError):
                    r = await self.wait_command_result(rid, start=start, timeout=self.resend_s)
                    if r.error is not None and r.error.code == "replayed" and r.original is not None:
                        return r.original
                    return r
