"""`OsdpReader`: one OSDP reader behind the project's `Reader` seam.

Standalone (its own port, one PD on the line)::

    async with OsdpReader("front", sink, port="/dev/ttyUSB0", address=1, scbk=key_hex) as r:
        await r.run()

Several readers on one line share an `OsdpBus`; the readers are then made without a port::

    readers = [OsdpReader("front", sink, address=1, scbk=k1), OsdpReader("back", sink, address=2, scbk=k2)]
    async with osdp_bus("/dev/ttyUSB0", readers) as bus:
        await bus.run()
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Self

from edge.errors import EdgeError
from edge.readers.base import Feedback, Reader, ReaderSink

from . import commands as c
from .bus import OsdpBus
from .events import ReaderIoEvent
from .keystore import KeyStore, KeyStoreError
from .panel import FileTransferResult, KeyRotation, PdConfig, PdSession, Timing
from .transport import Direction

log = logging.getLogger(__name__)

_NAK_REASONS = {1: "check character", 2: "command length", 3: "unknown command", 4: "sequence number",
                5: "security conditions not met", 6: "encryption required", 9: "unable to process"}


class ReaderRefused(EdgeError):
    """The reader answered a command with osdp_NAK (or went offline before answering)."""


class OsdpReader(Reader):
    kind = "osdp"

    def __init__(
        self,
        name: str,
        sink: ReaderSink,
        *,
        address: int,
        port: str | None = None,
        secure: bool = True,
        allow_install_mode: bool = False,
        allow_plaintext: bool = False,
        scbk: str | None = None,
        scbk_next: str | None = None,
        key_store: KeyStore | None = None,
        io_sink: Callable[[ReaderIoEvent], None] | None = None,
        use_crc: bool = True,
        formats: list[str] | None = None,
        display: bool | None = None,
        baudrate: int = 115200,
        direction: Direction = "auto",
        timing: Timing | None = None,
        mark: bool = True,
    ) -> None:
        super().__init__(name, sink)
        config = PdConfig(
            address=address,
            secure=secure,
            allow_install_mode=allow_install_mode,
            allow_plaintext=allow_plaintext,
            scbk=scbk,
            scbk_next=scbk_next,
            use_crc=use_crc,
            formats=formats,
            display=display,
        )
        self.session = PdSession(name, config, sink, timing)
        self._own_timing = timing is not None
        #: where the reader's key is kept across a rotation (None: rotations are refused)
        self.key_store = key_store
        self.session.on_key = self._on_key
        self.session.io_sink = io_sink
        self._key_tasks: set[asyncio.Task[None]] = set()
        self._rotation: asyncio.Future[KeyRotation] | None = None
        #: called with how every rotation ended, once its key is committed or discarded (journal it)
        self.on_rotation: Callable[[KeyRotation], None] | None = None
        #: a cancelled transfer_file whose fragment in flight is still to be answered: resolved then (its
        #: acknowledgement counted in on_progress), or when the reader goes offline
        self.transfer_stopping: asyncio.Future[FileTransferResult] | None = None
        self.bus: OsdpBus | None = None
        if port is not None:
            self.bus = OsdpBus(port, [self.session], baudrate=baudrate, direction=direction, timing=timing,
                               mark=mark)
        self._owns_bus = port is not None

    def __repr__(self) -> str:
        return f"OsdpReader({self.name!r}, address={self.session.address})"

    async def __aenter__(self) -> Self:
        if self._owns_bus and self.bus is not None:
            await self.bus.__aenter__()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._owns_bus and self.bus is not None:
            await self.bus.__aexit__(et, e, tb)

    async def run(self) -> None:
        if self._owns_bus and self.bus is not None:
            await self.bus.run()
        else:  # driven by a shared OsdpBus: nothing of its own to serve
            await asyncio.Event().wait()

    def arm_install_mode(self, seconds: float) -> float:
        """Install mode for `seconds` (PdSession.arm_install_mode), on the agent's loop. Returns the end as
        wall-clock time (time.time())."""
        now = asyncio.get_running_loop().time()
        end = self.session.arm_install_mode(seconds, now)
        if self.bus is not None:
            self.bus.kick()
        return time.time() + (end - now)

    def install_armed_until(self) -> float | None:
        """The end of the armed install-mode window as wall-clock time, or None."""
        now = asyncio.get_running_loop().time()
        end = self.session.install_armed_until(now)
        return None if end is None else time.time() + (end - now)

    # --- reader I/O: outputs, input and output status ---

    def _outputs(self) -> int | None:
        cap = self.session.pdcap.caps.get(c.Cap.OUTPUT_CONTROL) if self.session.pdcap else None
        return cap[1] if cap else None

    async def set_output(self, output: int, on: bool, *, pulse: float | None = None) -> tuple[int, ...]:
        """osdp_OUT: output `output` permanently on or off, or with `pulse` (seconds, 0.1 .. 6553.5) on for
        that long and then off. Returns the outputs' states when the reader reports them with its answer
        (osdp_OSTATR), else the last states known. Raises `ReaderRefused` on a NAK or if the reader goes
        offline first, `RuntimeError` if it is offline, `ValueError` for an output it does not have."""
        count = self._outputs()
        if count is not None and not 0 <= output < count:
            raise ValueError(f"osdp reader {self.name} has {count} output(s): no output {output}")
        if pulse is None:
            record = c.OutputCommand(output=output, control=2 if on else 1)
        else:
            ticks = round(pulse * 10)
            if not on or not 1 <= ticks <= 0xFFFF:
                raise ValueError(f"osdp reader {self.name}: a pulse is on for 0.1 .. 6553.5 s, got {pulse}")
            record = c.OutputCommand(output=output, control=5, timer=ticks)
        reply = await self._request(c.Cmd.OUT, record.encode(), "OUT")
        return reply.states if isinstance(reply, c.IoStatus) else self.session.outputs

    async def read_inputs(self) -> tuple[int, ...]:
        """osdp_ISTAT: the reader's input states now (an `InputsChanged` also goes to io_sink if they moved)."""
        return await self._status(c.Cmd.ISTAT, "ISTAT")

    async def read_outputs(self) -> tuple[int, ...]:
        """osdp_OSTAT: the reader's output states now."""
        return await self._status(c.Cmd.OSTAT, "OSTAT")

    async def _status(self, code: int, what: str) -> tuple[int, ...]:
        reply = await self._request(code, b"", what)
        if not isinstance(reply, c.IoStatus):
            raise ReaderRefused(f"osdp reader {self.name} answered {what} with {type(reply).__name__}")
        return reply.states

    async def _request(self, code: int, data: bytes, what: str) -> c.Reply:
        fut: asyncio.Future[c.Reply | None] = asyncio.get_running_loop().create_future()

        def done(reply: c.Reply | None) -> None:
            if not fut.done():
                fut.set_result(reply)

        self.session.request(code, data, done)
        reply = await fut
        if reply is None:
            raise ReaderRefused(f"osdp reader {self.name} went offline before answering {what}")
        if isinstance(reply, c.NakReply):
            why = _NAK_REASONS.get(reply.reason, f"reason {reply.reason}")
            raise ReaderRefused(f"osdp reader {self.name} refused {what}: {why}")
        return reply

    # --- file transfer (reader firmware) ---

    async def transfer_file(self, data: bytes, *, file_type: int = 1, offset: int = 0,
                            on_progress: Callable[[int, int], None] | None = None) -> FileTransferResult:
        """Send `data` to the reader with osdp_FILETRANSFER (its firmware, usually), interleaved with polls.
        `on_progress(acknowledged, total)` follows each acknowledged fragment. A reader that goes offline
        pauses it (it goes on when the reader is back); a transfer that did not finish (result `ok` False,
        or this call cancelled) can be started again from `offset` = the last acknowledged offset (the
        reader must still be in that transfer: libosdp's PD counts the bytes of one transfer itself). After the
        last fragment the reader's identity is read again (after its restart, if it restarts to apply the
        file) and must be the same reader; its new firmware version is in the result."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[FileTransferResult] = loop.create_future()
        #: the session's own end (`fut` is cancelled with this call, this one is not)
        ended: asyncio.Future[FileTransferResult] = loop.create_future()

        def done(result: FileTransferResult) -> None:
            for f in (fut, ended):
                if not f.done():
                    f.set_result(result)

        self.session.send_file(data, file_type=file_type, offset=offset, on_progress=on_progress, on_done=done)
        try:
            return await fut
        except asyncio.CancelledError:
            self.session.cancel_file()  # stops after the fragment in flight; on_progress has the offset
            if not ended.done():
                self.transfer_stopping = ended
                ended.add_done_callback(self._stopped)
            raise

    def _stopped(self, fut: asyncio.Future[FileTransferResult]) -> None:
        if self.transfer_stopping is fut:
            self.transfer_stopping = None

    # --- Secure Channel key rotation ---

    async def rotate_key(self) -> KeyRotation:
        """Move the reader to a new random SCBK in session (osdp_KEYSET, then a handshake on the new key).

        The new key is staged in `key_store` before the reader is sent it and committed only once the
        reader is secure on it; if the reader keeps its old key the staged one is discarded. Returns how it
        ended; raises `RuntimeError` if the reader is not online in a secure session or has no key store,
        `KeyStoreError` if the key cannot be stored. Bound the wait with `asyncio.timeout`: a cancelled wait
        leaves the rotation to resolve (commit or discard) whenever the reader is next secure.
        """
        store = self.key_store
        if store is None:
            raise RuntimeError(f"osdp reader {self.name}: no key store configured: key rotation refused")
        if self._rotation is not None or self.session.rotating:
            raise RuntimeError(f"osdp reader {self.name}: a key rotation is already in progress")
        key = os.urandom(16)
        await asyncio.to_thread(store.stage, key)
        fut: asyncio.Future[KeyRotation] = asyncio.get_running_loop().create_future()
        self._rotation = fut
        try:
            self.session.rotate_key(key)
        except BaseException:
            self._rotation = None
            await asyncio.to_thread(store.discard)
            raise
        del key
        try:
            return await asyncio.shield(fut)
        finally:
            if fut.done():
                self._rotation = None

    def _on_key(self, result: KeyRotation) -> None:
        """The session resolved a rotation (loop thread): commit or discard the staged key off the loop."""
        task = asyncio.get_running_loop().create_task(self._settle_key(result), name=f"reader[{self.name}].key")
        self._key_tasks.add(task)
        task.add_done_callback(self._key_tasks.discard)

    async def _settle_key(self, result: KeyRotation) -> None:
        store = self.key_store
        fut, self._rotation = self._rotation, None
        try:
            if store is not None:
                await asyncio.to_thread(store.commit if result.ok else store.discard)
        except KeyStoreError as e:
            # the reader is on the new key but it is only staged: the next start still tries both keys
            log.error("osdp %s: %s", self.name, e)
            result = KeyRotation(reader=result.reader, ok=result.ok, detail=f"{result.detail}; {e}")
        if self.on_rotation is not None:
            self.on_rotation(result)
        if fut is not None and not fut.done():
            fut.set_result(result)

    def feedback(self, what: Feedback, *, text: str | None = None) -> None:
        self.session.feedback(what, text)

    @property
    def online(self) -> bool:
        return self.session.online

    @property
    def secure(self) -> bool:
        return self.session.secure


def osdp_bus(
    port: str,
    readers: Sequence[OsdpReader],
    *,
    baudrate: int = 115200,
    direction: Direction = "auto",
    timing: Timing | None = None,
    mark: bool = True,
) -> OsdpBus:
    """One bus for several port-less `OsdpReader`s at different addresses. `timing` is the line's: it
    applies to every reader made without a timing of its own."""
    for r in readers:
        if r._owns_bus:
            raise ValueError(f"reader {r.name} has its own port; make it without `port` to share a bus")
    bus = OsdpBus(port, [r.session for r in readers], baudrate=baudrate, direction=direction, timing=timing,
                  mark=mark)
    for r in readers:
        r.bus = bus
        if timing is not None and not r._own_timing:
            r.session.set_timing(timing)  # the line's timing, unless the reader was given its own
    return bus
