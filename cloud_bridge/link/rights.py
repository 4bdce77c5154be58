"""The rights sync: change sets, snapshot manifests and chunks from the rights topic, applied through the
`Rights` port and answered on rights/reply.

Messages are queued by the connection's reader and handled by one worker (`RightsSync.run`) that lives across
connections, so a snapshot being applied is never torn by a reconnect (its reply is dropped if the link is down
when it finishes; the cloud's resend then gets the "already applied" answer). Every message but a chunk must be
signed (`SiteKeys.open`); a chunk is accepted only when the staged, verified manifest names its SHA-256.
A transfer staged before a restart is resumed only when its manifest still verifies.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sqlite3
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from cloud_bridge.protocol import (
    MAX_VERSION,
    SNAPSHOT_PARTS,
    ChangeSetMsg,
    ChunkAck,
    ErrorInfo,
    ProtocolError,
    Rebirth,
    ResyncRequest,
    RightsResult,
    Signed,
    SnapshotChunk,
    SnapshotManifest,
    decode_downlink,
    decode_staged_chunk,
    encode,
)
from cloud_bridge.settings import LinkConfig
from cloud_bridge.signing import CommandRejected
from cloud_bridge.topics import Leaf
from edge.errors import ChangeRejected, StoreError, VersionGap
from edge.model import Snapshot

from .gate import SiteKeys
from .ports import Rights
from .reply import Replies, error_info
from .staging import SnapshotStaging, StagingFull

log = logging.getLogger("cloud_bridge.link")


def join_chunks(bodies: Iterable[bytes]) -> Snapshot:
    """Decode the staged chunks one at a time into one snapshot (each chunk's bytes are dropped as soon as
    it is decoded, so the peak is the decoded rights plus one chunk)."""
    lists: dict[str, list[Any]] = {k: [] for k in SNAPSHOT_PARTS}
    version = 0
    for body in bodies:
        c = decode_staged_chunk(body)
        version = c.version
        for k, items in lists.items():
            items.extend(getattr(c, k))
        del c, body
    return Snapshot(version=version, **lists)


class RightsSync:
    """Takes the rights topic's messages (`offer`) and applies them in order (`run`)."""

    def __init__(self, cfg: LinkConfig, *, rights: Rights, staging: SnapshotStaging, keys: SiteKeys, replies: Replies,
                 rebirth: Callable[[], Awaitable[None]], clock: Callable[[], float]) -> None:  # fmt: skip
        self.cfg = cfg
        self.rights = rights
        self.staging = staging
        self.keys = keys
        self.replies = replies
        self.rebirth = rebirth
        self.clock = clock
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(cfg.rights_queue)

    def offer(self, payload: bytes) -> None:
        """Queue one message from the rights topic (dropped and counted when the queue is full)."""
        try:
            self.queue.put_nowait(payload)
        except asyncio.QueueFull:
            self.replies.stats["dropped"] += 1
            self.replies.refused(Leaf.RIGHTS, "queue_full", None, "rights queue full: message dropped")

    async def run(self) -> None:
        try:
            await self._resume_snapshot()
        except Exception:
            log.exception("staged snapshot could not be resumed; it is discarded")
            await asyncio.to_thread(self.staging.discard)
        while True:
            payload = await self.queue.get()
            try:
                await self._on_rights(payload)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                # storage errors and bugs alike: answered, journalled, and the worker goes on
                if not isinstance(e, StoreError | sqlite3.Error | OSError):
                    self.replies.stats["handler_errors"] += 1
                    log.exception("rights message failed")
                else:
                    log.error("rights message failed: %s", e)
                await self.replies.publish(
                    Leaf.RIGHTS_REPLY,
                    RightsResult(id=await self.replies.peek(payload), ok=False, version=self.rights.version,
                                 error=error_info(e)),
                )

    async def _on_rights(self, payload: bytes) -> None:
        err = self.replies.too_large(payload)
        if err is not None:
            await self._reply_rights(await self.replies.peek(payload), err)
            return
        try:
            # a large message is checked and decoded off the loop thread, so taps are not held up
            small = len(payload) < 16384
            msg = decode_downlink(payload) if small else await asyncio.to_thread(decode_downlink, payload)
        except ProtocolError as e:
            await self._reply_rights(await self.replies.peek(payload), error_info(e))
            return
        if isinstance(msg, SnapshotChunk):
            await self._on_chunk(msg, payload)
            return
        if not isinstance(msg, Signed):
            tag = type(msg).__struct_config__.tag
            await self._refuse_rights(
                CommandRejected("unsigned", f"{tag} must be signed (inside 'signed')",
                                request_id=await self.replies.peek(payload))
            )
            return
        try:
            p = self.keys.open(msg)
        except CommandRejected as e:
            e.request_id = e.request_id or await self.replies.peek(payload)
            await self._refuse_rights(e)
            return
        inner = p.msg
        if isinstance(inner, ChangeSetMsg):
            await self._on_change_set(inner)
        elif isinstance(inner, SnapshotManifest):
            await self._on_manifest(inner, payload)
        elif isinstance(inner, Rebirth):
            await self.rebirth()
        else:
            await self._reply_rights(None, ErrorInfo(code="malformed", message="an events_ack is not a rights message"))

    async def _refuse_rights(self, e: CommandRejected) -> None:
        self.replies.refused(Leaf.RIGHTS, e.code, e.request_id, str(e))
        err = ErrorInfo(code=e.code, message=str(e))
        await self.replies.publish(Leaf.RIGHTS_REPLY, RightsResult(id=e.request_id, ok=False,
                                                                   version=self.rights.version, error=err))  # fmt: skip

    async def _reply_rights(self, ref: str | None, err: ErrorInfo) -> None:
        self.replies.refused(Leaf.RIGHTS, err.code, ref, err.message)
        await self.replies.publish(Leaf.RIGHTS_REPLY, RightsResult(id=ref, ok=False, version=self.rights.version,
                                                                   error=err))  # fmt: skip

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
            r = await self.rights.apply(cs)
        except VersionGap as e:
            await self._reply_rights(msg.id, error_info(e))
            await self.replies.publish(Leaf.RIGHTS_REPLY, ResyncRequest(have=e.have, reason="version_gap", ref=msg.id))
            return
        except ChangeRejected as e:
            await self._reply_rights(msg.id, error_info(e))
            return
        await self.replies.publish(
            Leaf.RIGHTS_REPLY,
            RightsResult(id=msg.id, ok=True, version=r.version, applied=r.applied, changes=r.changes),
        )

    # --- snapshots --------------------------------------------------------------------------------------

    async def _resume_snapshot(self) -> None:
        """A transfer staged before a restart is kept only when its signed manifest still verifies; a
        complete one is applied now (the agent was killed while applying it)."""
        env = await asyncio.to_thread(self.staging.envelope)
        if env is None:
            await asyncio.to_thread(self.staging.discard)  # chunks without a manifest: never trusted
            return
        try:
            msg = decode_downlink(env)
            if not isinstance(msg, Signed):
                raise CommandRejected("unsigned", "staged manifest is not signed")
            p = self.keys.open(msg)
            if not isinstance(p.msg, SnapshotManifest):
                raise CommandRejected("malformed", "staged manifest is not a snapshot manifest")
        except (CommandRejected, ProtocolError) as e:
            log.warning("staged snapshot discarded: its manifest does not verify (%s)", e)
            await asyncio.to_thread(self.staging.discard)
            return
        m = p.msg
        self.staging.manifest = m
        if m.version <= self.rights.version:
            await asyncio.to_thread(self.staging.discard)
            return
        log.info("staged snapshot %s kept (%d of %d chunks)", m.id, len(self.staging.staged()), m.count)
        await self._maybe_apply(m)

    async def _answered(self, transfer: str) -> bool:
        """A transfer that already finished gets its stored result again (a duplicate, the same answer)."""
        done = self.staging.done(transfer)
        if done is None:
            return False
        await self.replies.publish_raw(Leaf.RIGHTS_REPLY, done)
        return True

    async def _on_manifest(self, m: SnapshotManifest, envelope: bytes) -> None:
        if await self._answered(m.id):
            return
        have = self.rights.version
        if m.version <= have:
            # A snapshot at the version held (or older) is never applied: a repair is a snapshot at a
            # newer version. Answered so that the cloud stops resending.
            await self.replies.publish(Leaf.RIGHTS_REPLY, RightsResult(id=m.id, ok=True, version=have, applied=False))
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
            await asyncio.to_thread(self.staging.begin, m, envelope)
        except StagingFull as e:
            await self._reply_rights(m.id, ErrorInfo(code="too_large", message=str(e), path="size"))
            return
        except OSError as e:
            await asyncio.to_thread(self.staging.discard)
            await self._reply_rights(m.id, ErrorInfo(code="storage", message=f"cannot stage the snapshot: {e}"))
            return
        await self._maybe_apply(m)

    async def _on_chunk(self, c: SnapshotChunk, payload: bytes) -> None:
        if await self._answered(c.id):
            return
        m = self.staging.manifest
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
            received = await asyncio.to_thread(self.staging.put, c.index, payload)
        except OSError as e:
            await self._reply_rights(c.id, ErrorInfo(code="storage", message=f"cannot stage chunk {c.index}: {e}"))
            return
        await self.replies.publish(Leaf.RIGHTS_REPLY, ChunkAck(id=c.id, index=c.index, received=received,
                                                               count=c.count))  # fmt: skip
        await self._maybe_apply(m)

    async def _maybe_apply(self, m: SnapshotManifest) -> None:
        """Apply the staged transfer once every chunk of the manifest is on disk."""
        if len(self.staging.staged()) < m.count:
            return
        result: RightsResult
        try:
            # decoding a large snapshot takes long: off the loop thread, one chunk at a time
            snap = await asyncio.to_thread(join_chunks, self.staging.bodies())
            if snap.version != m.version:
                raise ProtocolError(f"chunks carry version {snap.version}, the manifest {m.version}")
            if snap.version <= self.rights.version:
                result = RightsResult(id=m.id, ok=True, version=self.rights.version, applied=False)
            else:
                r = await self.rights.replace(snap)
                del snap
                result = RightsResult(id=m.id, ok=True, version=r.version, applied=r.applied, changes=r.changes)
                log.info("snapshot %s applied: rights version %d (%d changes)", m.id, r.version, r.changes)
        except (ChangeRejected, ProtocolError) as e:
            log.warning("snapshot %s refused: %s", m.id, e)
            result = RightsResult(id=m.id, ok=False, version=self.rights.version, error=error_info(e))
        data = encode(result, self.cfg.encoding)
        await asyncio.to_thread(self.staging.finish, m.id, data, self.clock())
        await self.replies.publish_raw(Leaf.RIGHTS_REPLY, data)
