"""Snapshot staging: the chunks of a snapshot transfer kept on disk until every one is in (`SnapshotStaging`).
Only chunks named by a verified manifest are staged, each checked against the manifest's SHA-256 before it is
written (the checks are the rights sync's, `link.rights`); this module only keeps files."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Self

import msgspec

from cloud_bridge.errors import CloudBridgeError
from cloud_bridge.protocol import SnapshotManifest

log = logging.getLogger("cloud_bridge.link")


class StagingFull(CloudBridgeError):
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
        """Forget the staged transfer and free its disk (unlinking works on a full disk). The manifest goes
        first: a power cut part-way leaves chunks without a manifest, which the next start discards."""
        (self.path / "manifest").unlink(missing_ok=True)
        for f in self.path.glob("chunk-*"):
            f.unlink(missing_ok=True)
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
