"""Test peer: libosdp's PeripheralDevice (a C implementation of an OSDP reader) behind a pty pair.

`PeerBus` owns the pty master; the control panel under test opens `PeerBus.path` (the slave) as its serial
port. A thread reads the master and feeds every byte to each simulated reader's channel, then drives
`ctx.refresh()` directly (the wrapper's own thread sleeps 20 ms between refreshes, far too slow).

Knobs for fault injection: `Peer.silent` (the reader stops answering: offline), `PeerBus.mangle` (rewrite
the bytes a reader sends: corrupt or truncate), `PeerBus.intercept` (take what the control panel wrote away
from the readers and optionally answer it in their place: a lost command, a BUSY), `PeerBus.baud` (pace
both directions as a real line would).

libosdp installs a top-level module named `osdp`; our own package is always imported as `edge.readers.osdp`.
"""

from __future__ import annotations

import os
import select
import threading
import time
import tty
from collections.abc import Callable
from typing import Any

import osdp  # libosdp

SITE_KEY = bytes.fromhex("A1B2C3D4E5F60718293A4B5C6D7E8F90")

DEFAULT_CAPS = [
    (osdp.Capability.CommunicationSecurity, 1, 1),
    (osdp.Capability.LEDControl, 1, 1),
    (osdp.Capability.AudibleControl, 1, 1),
    (osdp.Capability.TextOutput, 1, 1),
    (osdp.Capability.ContactStatusMonitoring, 1, 4),
    (osdp.Capability.OutputControl, 1, 2),
    (osdp.Capability.CardDataFormat, 1, 1),
    (osdp.Capability.CheckCharacter, 1, 1),
]


def _pause(seconds: float) -> None:
    threading.Event().wait(seconds)  # a helper thread, never the event loop


class _Channel(osdp.Channel):  # type: ignore[misc]
    def __init__(self, bus: PeerBus, peer: Peer) -> None:
        super().__init__()
        self.bus = bus
        self.peer = peer
        self.inbound = bytearray()

    def read(self, max_bytes: int) -> bytes:
        data = bytes(self.inbound[:max_bytes])
        del self.inbound[:max_bytes]
        return data

    def write(self, buf: bytes) -> int:
        self.bus.send(bytes(buf))
        return len(buf)

    def flush(self) -> None:
        self.inbound.clear()


class Peer:
    """One simulated reader (libosdp PD) on the bus."""

    def __init__(
        self,
        bus: PeerBus,
        address: int,
        *,
        scbk: bytes | None = None,
        install_mode: bool = False,
        enforce_secure: bool = False,
        caps: list[tuple[int, int, int]] | None = None,
        file_ops: bool = True,
    ) -> None:
        self.bus = bus
        self.address = address
        self.silent = False
        #: the reader's answer to osdp_KEYSET: take the key (0) or refuse it (-1: libosdp NAKs)
        self.keyset_result = 0
        #: the reader's input and output states (ISTATR / OSTATR), one byte each; OUT changes `outputs`
        self.inputs = bytearray(4)
        self.outputs = bytearray(2)
        self.commands: list[dict[str, Any]] = []
        self.command_times: list[float] = []
        self.keys: list[bytes] = []
        self.channel = _Channel(bus, self)
        flags = []
        if install_mode:
            flags.append(osdp.LibFlag.InstallMode)
        if enforce_secure:
            flags.append(osdp.LibFlag.EnforceSecure)
        info = osdp.PDInfo(
            address, self.channel, scbk=scbk, name=f"pd{address}", flags=flags,
            id=osdp.PdId(2, 7, 0x00A1B2, 0x12345678 + address, 0x010203),
        )
        self.pd = osdp.PeripheralDevice(
            info, osdp.PDCapabilities(caps if caps is not None else DEFAULT_CAPS),
            log_level=getattr(osdp.LogLevel, os.environ.get("PEER_LOG", "Emergency")), command_handler=self._on_command,
        )
        self.ctx = self.pd.ctx
        #: what a file transfer wrote (libosdp's file ops: the PD side of osdp_FILETRANSFER)
        self.file = bytearray()
        self.file_opened: list[tuple[int, int]] = []
        self.file_closed = 0
        if file_ops:  # without, libosdp NAKs osdp_FILETRANSFER
            self.ctx.register_file_ops(0, {"open": self._f_open, "read": self._f_read, "write": self._f_write,
                                           "close": self._f_close})

    def _on_command(self, cmd: dict[str, Any]) -> tuple[int, dict[str, Any] | None]:
        self.command_times.append(time.perf_counter())
        self.commands.append(cmd)
        kind = cmd.get("command")
        if kind == osdp.Command.Status and cmd.get("type") in (osdp.StatusReportType.Input,
                                                                osdp.StatusReportType.Output):
            # libosdp 3.2 answers ISTAT / OSTAT with a status event the app submits from this callback
            states = self.inputs if cmd["type"] == osdp.StatusReportType.Input else self.outputs
            self.ctx.submit_event({"event": osdp.Event.Status, "type": cmd["type"], "nr_entries": len(states),
                                   "report": bytes(states)})
        if kind == osdp.Command.Output and cmd["output_no"] < len(self.outputs):
            self.outputs[cmd["output_no"]] = 1 if cmd["control_code"] in (2, 4, 5) else 0
        if cmd.get("command") == osdp.Command.Keyset:
            if self.keyset_result != 0:
                return self.keyset_result, None
            self.keys.append(bytes(cmd["data"]))
        return 0, None

    def _f_open(self, file_id: int, size: int) -> int:
        self.file_opened.append((file_id, size))
        if len(self.file) != size:
            self.file = bytearray(size)
        return size

    def _f_read(self, size: int, offset: int) -> bytes:
        return bytes(self.file[offset : offset + size])

    def _f_write(self, data: bytes, offset: int) -> int:
        self.file[offset : offset + len(data)] = data
        return len(data)

    def _f_close(self, file_id: int) -> int:
        self.file_closed += 1
        return 0

    def commands_of(self, kind: int) -> list[dict[str, Any]]:
        return [c for c in list(self.commands) if c.get("command") == kind]

    # --- things a person does at the reader ---

    def card(self, value: int, nbits: int) -> None:
        nbytes = (nbits + 7) // 8
        data = (value << (nbytes * 8 - nbits)).to_bytes(nbytes, "big")
        self.submit({"event": osdp.Event.CardRead, "reader_no": 0, "format": osdp.CardFormat.Wiegand,
                     "direction": 0, "length": nbits, "data": data})

    def keypad(self, keys: str) -> None:
        data = bytes(0x0D if k == "#" else 0x7F if k == "*" else ord(k) for k in keys)
        self.submit({"event": osdp.Event.KeyPress, "reader_no": 0, "data": data})

    def local_status(self, *, tamper: bool, power_failure: bool) -> None:
        self.submit({"event": osdp.Event.Status, "type": osdp.StatusReportType.Local, "nr_entries": 2,
                     "report": bytes((int(tamper), int(power_failure)))})

    def input_change(self, states: bytes) -> None:
        """The reader's inputs (door contact, REX, ...) change: it reports them on the next poll."""
        self.inputs[:] = states
        self.submit({"event": osdp.Event.Status, "type": osdp.StatusReportType.Input,
                     "nr_entries": len(states), "report": bytes(states)})

    def submit(self, event: dict[str, Any]) -> None:
        with self.bus.lock:
            self.ctx.submit_event(event)

    def sc_active(self) -> bool:
        with self.bus.lock:
            return bool(self.ctx.is_sc_active())


class PeerBus:
    """A pty pair with simulated readers on the master side. Use as a context manager."""

    def __init__(self, *, baud: int | None = None) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.master)
        tty.setraw(self.slave)
        os.set_blocking(self.master, False)
        self.path = os.ttyname(self.slave)
        self.baud = baud
        self.peers: list[Peer] = []
        self.lock = threading.RLock()
        self.mangle: Callable[[bytes], bytes] | None = None
        #: called with each chunk the control panel wrote; None = deliver it to the readers, bytes = do not
        #: (the readers never see it) and write these bytes back instead (b"": nothing, the command is lost)
        self.intercept: Callable[[bytes], bytes | None] | None = None
        self.sent: list[tuple[float, bytes]] = []  # what the readers wrote (after mangling)
        self.received: list[tuple[float, bytes]] = []  # what the control panel wrote
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, address: int, **kw: Any) -> Peer:
        peer = Peer(self, address, **kw)
        with self.lock:
            self.peers.append(peer)
        return peer

    def send(self, data: bytes) -> None:
        if self.mangle is not None:
            data = self.mangle(data)
        if self.baud:
            _pause(len(data) * 10 / self.baud)
        self.sent.append((time.perf_counter(), data))
        if data:
            os.write(self.master, data)

    def inject(self, data: bytes) -> None:
        """Write raw bytes toward the control panel, as if a device on the line sent them."""
        self.sent.append((time.perf_counter(), data))
        os.write(self.master, data)

    def _pump(self) -> None:
        while not self._stop.is_set():
            r, _, _ = select.select([self.master], [], [], 0.002)
            if r:
                try:
                    data = os.read(self.master, 4096)
                except (BlockingIOError, OSError):
                    data = b""
                if data:
                    self.received.append((time.perf_counter(), data))
                    if self.baud:
                        _pause(len(data) * 10 / self.baud)
                    intercept = self.intercept
                    answer = intercept(data) if intercept is not None else None
                    if answer is not None:
                        if answer:
                            self.inject(answer)
                        data = b""
                if data:
                    with self.lock:
                        for p in self.peers:
                            if not p.silent:
                                p.channel.inbound += data
            with self.lock:
                for p in self.peers:
                    p.ctx.refresh()

    def __enter__(self) -> PeerBus:
        self._thread = threading.Thread(target=self._pump, name="osdp-peer", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)
        with self.lock:
            for p in self.peers:
                p.ctx = None
                p.pd.ctx = None
            self.peers.clear()
        os.close(self.master)
        os.close(self.slave)
