"""The signed cloud commands for OSDP readers, on the gateway (`Agent.reader_command` hands them here).

* `osdp_rotate_key`: `OsdpReader.rotate_key` (the key made here, staged in the reader's key store before the
  reader is sent it, committed once the reader is secure on it). The result waits for that, at most
  `rotate_timeout`; a rotation still open then resolves later and is journalled whenever it does
  (`security.reader_key_rotated`, like every rotation). No key ever leaves the gateway or reaches a log.
* `osdp_output`: osdp_OUT, the result carries the outputs' states the reader reports.
* `osdp_firmware_chunk` / `osdp_firmware`: the file travels as signed chunk commands on the command topic
  (every piece signed end to end like any command, at most 64 KiB each) and is staged under
  `<state_dir>/firmware/<sha256>.part`; the last piece is checked against the SHA-256 and the file becomes
  `<sha256>.bin`. `osdp_firmware` (the same hash and size, signed) starts the transfer in the background:
  its result says it started; progress (every 10 %) and the end are `reader.firmware` events. A transfer
  that stopped resumes from the reader's last acknowledged offset when the command is sent again; after
  the last fragment the reader's identity (vendor, model, serial) is read again and must be the same.
  Each transfer's acknowledged offset is kept in `<state_dir>/firmware/transfers.json` (`TransferLog`,
  written atomically as it moves): a transfer the agent stopped (the fragment in flight answered first)
  goes on by itself at the next start, from that offset, once its reader is back online.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Self

from cloud_bridge.protocol import OsdpFirmware, OsdpFirmwareChunk, OsdpOutput, OsdpRotateKey, ReaderAction
from edge.errors import CommandFailed
from edge.events import READER_FIRMWARE, READER_KEY_ROTATED, Detail, EventSink

from .keystore import KeyStoreError
from .panel import FileTransferResult, KeyRotation, Phase
from .reader import OsdpReader, ReaderRefused

log = logging.getLogger(__name__)

#: Staged firmware files kept, complete and partial each (the oldest go first): at most 4 x 16 MiB on disk.
KEEP_FILES = 2


class FirmwareStore:
    """Files for readers, staged piece by piece under their SHA-256 (blocking: call off the loop)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def _paths(self, sha: str) -> tuple[Path, Path]:
        return self.dir / f"{sha}.part", self.dir / f"{sha}.bin"

    def have(self, sha: str) -> tuple[int, bool]:
        part, done = self._paths(sha)
        if done.exists():
            return done.stat().st_size, True
        try:
            return part.stat().st_size, False
        except FileNotFoundError:
            return 0, False

    def put(self, c: OsdpFirmwareChunk) -> tuple[int, bool]:
        """Add one piece; (bytes held, complete). A piece past what is held is refused (`gap`)."""
        if c.offset + len(c.data) > c.size:
            raise CommandFailed("invalid", f"chunk at {c.offset} of {len(c.data)} bytes runs past the file's "
                                           f"{c.size} bytes")  # fmt: skip
        have, complete = self.have(c.sha256)
        if complete:
            if have != c.size:
                raise CommandFailed("invalid", f"file {c.sha256[:12]} is staged with {have} bytes, not {c.size}")
            return have, True
        if c.offset > have:
            raise CommandFailed("gap", f"chunk at {c.offset}, the gateway holds {have} bytes of {c.sha256[:12]}",
                                detail={"have": have})  # fmt: skip
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        part, done = self._paths(c.sha256)
        if not part.exists():
            self._prune("*.part", keep=part)  # a new upload: abandoned ones go
        fd = os.open(part, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.pwrite(fd, c.data, c.offset)
            os.fsync(fd)
            have = max(have, c.offset + len(c.data))
        finally:
            os.close(fd)
        if have < c.size:
            return have, False
        h = hashlib.sha256()
        with part.open("rb") as f:
            for block in iter(lambda: f.read(1 << 16), b""):
                h.update(block)
        if h.hexdigest() != c.sha256:
            part.unlink()
            raise CommandFailed("hash_mismatch", f"the {c.size} bytes staged do not hash to {c.sha256[:12]}...: "
                                                 "discarded, send the file again", detail={"have": 0})  # fmt: skip
        os.replace(part, done)
        self._prune("*.bin", keep=done)
        return have, True

    def _prune(self, pattern: str, keep: Path) -> None:
        """Keep the newest KEEP_FILES - 1 files of `pattern` besides `keep`."""
        files = sorted((p for p in self.dir.glob(pattern) if p != keep), key=lambda p: p.stat().st_mtime)
        for p in files[: max(0, len(files) - (KEEP_FILES - 1))]:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    def read(self, sha: str, size: int) -> bytes:
        _, done = self._paths(sha)
        try:
            data = done.read_bytes()
        except FileNotFoundError:
            have, _ = self.have(sha)
            raise CommandFailed(
                "not_staged",
                f"file {sha[:12]} is not staged on the gateway (it holds {have} of "
                f"{size} bytes): send its chunks first",
                detail={"have": have},
            ) from None
        if len(data) != size or hashlib.sha256(data).hexdigest() != sha:
            raise CommandFailed("hash_mismatch", f"staged file {sha[:12]} does not match its size and hash")
        return data


class _Job:
    __slots__ = ("active", "file_type", "offset", "sha", "start", "task", "total")

    def __init__(self, sha: str, total: int, offset: int, file_type: int = 1, *, active: bool = True) -> None:
        self.sha = sha
        self.total = total
        self.offset = offset
        self.file_type = file_type
        #: where this attempt started (a resumed one that gets no further is started afresh next time)
        self.start = offset
        #: running, or stopped by the agent stopping (then the next start resumes it by itself)
        self.active = active
        self.task: asyncio.Task[None] | None = None

    def record(self) -> dict[str, str | int | bool]:
        return {"sha256": self.sha, "total": self.total, "offset": self.offset, "start": self.start,
                "file_type": self.file_type, "active": self.active}  # fmt: skip


class TransferLog:
    """The transfers' progress on disk, `transfers.json` beside the staged files: by reader, the file, its size,
    the offset the reader acknowledged, and whether it was running. Replaced atomically (a temporary file,
    fsync, rename, fsync of the directory): a crash leaves the old state or the new, never a torn one.
    Blocking: call off the loop."""

    VERSION = 1

    def __init__(self, directory: Path) -> None:
        self.path = directory / "transfers.json"

    def load(self) -> dict[str, _Job]:
        """The jobs kept; an unreadable or damaged file is logged, set aside (`.bad`) and read as empty (the
        next transfer of each reader then starts from 0: a reader that still holds a resumed transfer says
        so, see `ReaderCommands._ended`)."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        try:
            doc = json.loads(raw)
            if doc.get("version") != self.VERSION:
                raise ValueError(f"version {doc.get('version')!r}")
            jobs: dict[str, _Job] = {}
            for name, j in doc["transfers"].items():
                sha, total, offset = str(j["sha256"]), int(j["total"]), int(j["offset"])
                if len(sha) != 64 or not 0 <= offset <= total:
                    raise ValueError(f"transfer of {name}: offset {offset} of {total}")
                job = _Job(sha, total, offset, int(j.get("file_type", 1)), active=bool(j.get("active")))
                job.start = int(j.get("start", offset))
                jobs[str(name)] = job
            return jobs
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            log.error("firmware transfers: %s is damaged (%s): set aside, transfers start afresh", self.path, e)
            with contextlib.suppress(OSError):
                os.replace(self.path, self.path.with_suffix(".bad"))
            return {}

    def save(self, records: Mapping[str, dict[str, str | int | bool]]) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        data = json.dumps({"version": self.VERSION, "transfers": dict(records)}, sort_keys=True).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        dfd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


class ReaderCommands:
    """Carries out the OSDP reader commands for the OSDP readers of one gateway (an async context manager:
    transfers still running are stopped on exit, each resumable, and resumed by the next one; call `pause()`
    while the readers' buses still run, so the fragment in flight is answered first)."""

    def __init__(self, readers: Mapping[str, OsdpReader], *, firmware_dir: Path, journal: EventSink,
                 doors: Mapping[str, str] | None = None, rotate_timeout: float = 15.0,
                 output_timeout: float = 3.0, resume_within: float = 300.0) -> None:  # fmt: skip
        self.readers = dict(readers)
        self.files = FirmwareStore(firmware_dir)
        self.log = TransferLog(firmware_dir)
        self.journal = journal
        self.doors = dict(doors or {})
        self.rotate_timeout = rotate_timeout
        self.output_timeout = output_timeout
        #: how long a transfer the last run left running waits for its reader to come online at start
        self.resume_within = resume_within
        #: transfers by reader: running, or stopped (then `offset` is where the next one resumes)
        self.jobs: dict[str, _Job] = {}
        self._dirty = False
        self._writer: asyncio.Task[None] | None = None
        self._resumes: set[asyncio.Task[None]] = set()
        for name, r in self.readers.items():
            r.on_rotation = lambda result, name=name: self._rotated(name, result)

    async def __aenter__(self) -> Self:
        jobs = await asyncio.to_thread(self.log.load)
        self.jobs = {n: j for n, j in jobs.items() if n in self.readers}
        for name, job in self.jobs.items():
            if job.active:
                log.info("osdp %s: firmware %s was being sent at the last stop (%d/%d): resumed once the reader "
                         "is online", name, job.sha[:12], job.offset, job.total)  # fmt: skip
                t = asyncio.get_running_loop().create_task(self._resume(name, job), name=f"reader[{name}].resume")
                self._resumes.add(t)
                t.add_done_callback(self._resumes.discard)
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:  # fmt: skip
        await self.pause()
        if self._writer is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer

    async def pause(self, within: float = 2.0) -> None:
        """Stop every transfer, each after its fragment in flight is answered (so the offset kept is the one the
        reader counted), and keep them on disk as running: the next start resumes them."""
        for t in list(self._resumes):
            t.cancel()
        running = [(n, j) for n, j in self.jobs.items() if j.task is not None and not j.task.done()]
        for _, j in running:
            assert j.task is not None
            j.task.cancel()
        for _, j in running:
            assert j.task is not None
            with contextlib.suppress(asyncio.CancelledError):
                await j.task
        stopping = [f for n, _ in running if (f := self.readers[n].transfer_stopping) is not None]
        if stopping:
            await asyncio.wait(stopping, timeout=within)
        for n, j in running:
            j.active = True
            log.info("osdp %s: firmware %s paused at %d/%d (resumed at the next start)", n, j.sha[:12], j.offset,
                     j.total)  # fmt: skip
        if running:
            self._persist()

    # --- the transfers on disk ---

    def _persist(self) -> None:
        """Write the jobs soon (one writer at a time; it writes again while they keep moving)."""
        self._dirty = True
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write(), name="osdp.firmware.log")

    async def _write(self) -> None:
        while self._dirty:
            self._dirty = False
            records = {n: j.record() for n, j in self.jobs.items() if j.offset > 0 or j.active}
            try:
                await asyncio.shield(asyncio.to_thread(self.log.save, records))
            except OSError as e:
                log.error("firmware transfers: cannot write %s: %s", self.log.path, e)
                return

    async def _resume(self, name: str, job: _Job) -> None:
        r = self.readers[name]
        try:
            async with asyncio.timeout(self.resume_within):
                while not (r.online and r.session.phase is Phase.ONLINE):  # noqa: ASYNC110 (no event for it)
                    await asyncio.sleep(0.05)
        except TimeoutError:
            log.warning("osdp %s: not online within %g s: firmware %s not resumed (send osdp_firmware again)",
                        name, self.resume_within, job.sha[:12])  # fmt: skip
            job.active = False
            self._persist()
            return
        try:
            await self._start(name, r, sha=job.sha, size=job.total, file_type=job.file_type, resumed=job)
        except CommandFailed as e:
            log.warning("osdp %s: firmware %s not resumed: %s", name, job.sha[:12], e)
            job.active = False
            self._persist()

    def _reader(self, name: str) -> OsdpReader:
        r = self.readers.get(name)
        if r is None:
            raise ValueError(f"no OSDP reader {name!r} on this gateway")
        return r

    async def run(self, a: ReaderAction) -> Detail:
        if isinstance(a, OsdpRotateKey):
            return await self.rotate_key(a)
        if isinstance(a, OsdpOutput):
            return await self.output(a)
        if isinstance(a, OsdpFirmwareChunk):
            have, complete = await asyncio.to_thread(self.files.put, a)
            if complete and a.offset + len(a.data) == a.size:
                self.journal(READER_FIRMWARE, reason="staged", detail={"sha256": a.sha256, "size": a.size})
            return {"have": have, "complete": complete}
        return await self.firmware(a)

    # --- key rotation ---

    async def rotate_key(self, a: OsdpRotateKey) -> Detail:
        r = self._reader(a.reader)
        try:
            async with asyncio.timeout(self.rotate_timeout):
                result = await r.rotate_key()
        except TimeoutError:
            raise CommandFailed("pending", f"osdp reader {a.reader}: the rotation is not resolved after "
                                           f"{self.rotate_timeout:g} s; it commits or discards the new key when "
                                           "the reader is next secure (journalled)",
                                detail={"reader": a.reader, "committed": False}) from None  # fmt: skip
        except RuntimeError as e:
            raise CommandFailed("unavailable", str(e), detail={"reader": a.reader, "committed": False}) from None
        except KeyStoreError as e:
            raise CommandFailed("storage", str(e), detail={"reader": a.reader, "committed": False}) from None
        if not result.ok:
            raise CommandFailed("not_committed", f"osdp reader {a.reader}: {result.detail}",
                                detail={"reader": a.reader, "committed": False})  # fmt: skip
        return {"reader": a.reader, "committed": True}

    def _rotated(self, name: str, result: KeyRotation) -> None:
        self.journal(READER_KEY_ROTATED, door=self.doors.get(name), reader=name,
                     reason="committed" if result.ok else "discarded",
                     detail={"committed": result.ok, "detail": result.detail})  # fmt: skip

    # --- outputs ---

    async def output(self, a: OsdpOutput) -> Detail:
        r = self._reader(a.reader)
        try:
            async with asyncio.timeout(self.output_timeout):
                states = await r.set_output(a.output, a.on, pulse=a.seconds)
        except TimeoutError:
            raise CommandFailed("timeout", f"osdp reader {a.reader} did not answer osdp_OUT in "
                                           f"{self.output_timeout:g} s") from None  # fmt: skip
        except ReaderRefused as e:
            raise CommandFailed("refused", str(e)) from None
        except RuntimeError as e:
            raise CommandFailed("unavailable", str(e)) from None
        return {"reader": a.reader, "output": a.output, "states": "".join(str(s) for s in states)}

    # --- firmware ---

    async def firmware(self, a: OsdpFirmware) -> Detail:
        r = self._reader(a.reader)
        job = self.jobs.get(a.reader)
        if job is not None and job.task is not None and not job.task.done():
            if job.sha != a.sha256:
                raise CommandFailed("busy", f"osdp reader {a.reader} is receiving another file ({job.sha[:12]})")
            return {"reader": a.reader, "state": "in_progress", "offset": job.offset, "total": job.total}
        return await self._start(a.reader, r, sha=a.sha256, size=a.size, file_type=a.file_type)

    async def _start(self, name: str, r: OsdpReader, *, sha: str, size: int, file_type: int,
                     resumed: _Job | None = None) -> Detail:  # fmt: skip
        data = await asyncio.to_thread(self.files.read, sha, size)
        if not r.online:
            raise CommandFailed("unavailable", f"osdp reader {name} is offline")
        job = self.jobs.get(name) if resumed is None else resumed
        offset = job.offset if job is not None and job.sha == sha and job.offset < size else 0
        job = _Job(sha, size, offset, file_type)
        self.jobs[name] = job
        job.task = asyncio.get_running_loop().create_task(
            self._transfer(name, r, job, data, file_type), name=f"reader[{name}].firmware"
        )
        self._persist()
        self.journal(READER_FIRMWARE, door=self.doors.get(name), reader=name, reason="started",
                     detail={"sha256": sha, "offset": offset, "total": size,
                             "resumed": resumed is not None})  # fmt: skip
        return {"reader": name, "state": "started", "offset": offset, "total": size}

    async def _transfer(self, name: str, r: OsdpReader, job: _Job, data: bytes, file_type: int) -> None:
        step = max(1, job.total // 10)
        mark = [job.offset // step]
        door = self.doors.get(name)

        def progress(done: int, total: int) -> None:
            job.offset = done
            self._persist()
            if done // step > mark[0] and done < total:
                mark[0] = done // step
                self.journal(READER_FIRMWARE, door=door, reader=name, reason="progress",
                             detail={"sha256": job.sha, "offset": done, "total": total})  # fmt: skip

        result: FileTransferResult | None = None
        try:
            result = await r.transfer_file(data, file_type=file_type, offset=job.offset, on_progress=progress)
        except RuntimeError as e:  # offline (or another transfer) before it started
            self._ended(name, door, job, ok=False, why=str(e), firmware=None)
            return
        except asyncio.CancelledError:
            self._ended(name, door, job, ok=False, why="stopped (the agent stops)", firmware=None, stopped=True)
            raise
        job.offset = result.offset
        fw = ".".join(map(str, result.firmware)) if result.firmware is not None else None
        self._ended(name, door, job, ok=result.ok, why=result.detail, firmware=fw)

    def _ended(self, name: str, door: str | None, job: _Job, *, ok: bool, why: str, firmware: str | None,
               stopped: bool = False) -> None:  # fmt: skip
        at = job.total if ok else job.offset
        job.active = False
        if ok:
            job.offset = 0  # done: a new command starts afresh
        elif stopped:
            pass  # the agent stops: `pause` keeps it as running once the fragment in flight is answered
        elif job.start > 0 and job.offset <= job.start:
            # a resume the reader did not take (it no longer holds that transfer): the next one starts at 0
            why = f"{why}; the next osdp_firmware starts the file again"
            job.offset = 0
        log.log(logging.INFO if ok else logging.WARNING, "osdp %s: firmware %s %s at %d/%d: %s", name,
                job.sha[:12], "done" if ok else "stopped", at, job.total, why)  # fmt: skip
        self._persist()
        self.journal(READER_FIRMWARE, door=door, reader=name, reason="done" if ok else "failed",
                     detail={"sha256": job.sha, "offset": at, "total": job.total, "resume_from": job.offset,
                             "firmware": firmware, "detail": why})  # fmt: skip


__all__ = ["FirmwareStore", "ReaderCommands", "TransferLog"]
