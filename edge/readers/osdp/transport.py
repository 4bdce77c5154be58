"""RS-485 serial transport: pyserial opens the port, the event loop reads and writes its descriptor (half duplex).

Direction control, per adapter:

* ``"auto"``   - the adapter switches direction itself (most USB-RS485 dongles, pty simulations);
* ``"kernel"`` - the UART driver does it (``TIOCSRS485``, e.g. i.MX / RPi with an RS-485 capable driver);
* ``"rts"``    - we raise RTS before writing and drop it once the last stop bit has left the wire.

Bytes arrive through `SerialLink.on_data` on the event-loop thread, straight from the loop's reader callback.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from typing import Any, Literal

import serial

from edge.errors import EdgeError

log = logging.getLogger(__name__)

Direction = Literal["auto", "kernel", "rts"]


class TransportError(EdgeError):
    """The serial port could not be opened or went away."""


class SerialLink:
    """One open serial port. `on_data(bytes)` is called for every chunk read.

    pyserial opens and configures the port (termios, RS-485 mode); the loop reads the non-blocking file
    descriptor itself (`add_reader` + `os.read`: one syscall per chunk, no transport in between) and writes
    straight to it, buffering (with `add_writer`) only what the port does not take at once."""

    def __init__(
        self,
        port: str,
        on_data: Callable[[bytes], None],
        *,
        baudrate: int = 115200,
        direction: Direction = "auto",
    ) -> None:
        self.port = port
        self.on_data = on_data
        self.baudrate = baudrate
        self.direction = direction
        self._serial: Any = None
        self._fd = -1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._out = bytearray()
        self._rts_off: asyncio.TimerHandle | None = None
        self.closed: asyncio.Future[Exception | None] | None = None

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        self.closed = loop.create_future()
        try:
            ser = serial.Serial(self.port, baudrate=self.baudrate, bytesize=8, parity="N", stopbits=1, timeout=0)
        except (serial.SerialException, OSError, ValueError) as e:
            raise TransportError(f"cannot open OSDP port {self.port}: {e}") from e
        self._serial = ser
        self._fd = ser.fileno()
        os.set_blocking(self._fd, False)
        self._loop = loop
        if self.direction == "kernel":
            from serial.rs485 import RS485Settings

            ser.rs485_mode = RS485Settings(rts_level_for_tx=True, rts_level_for_rx=False)
        elif self.direction == "rts":
            ser.rts = False
        loop.add_reader(self._fd, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self._fd, 4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._shut(e)
            return
        if not data:  # readable and empty: the device went away (a USB adapter unplugged, a pty closed)
            self._shut(TransportError(f"OSDP port {self.port}: device disconnected"))
            return
        self.on_data(data)

    def write(self, frame: bytes) -> None:
        if self._serial is None:
            raise TransportError(f"OSDP port {self.port} is not open")
        if self.direction == "rts":
            if self._rts_off is not None:
                self._rts_off.cancel()
            self._serial.rts = True
            self._send(frame)
            # 10 bits per byte (8N1); drop RTS after the last stop bit, with one byte of margin
            delay = (len(frame) + 1) * 10 / self.baudrate
            assert self._loop is not None
            self._rts_off = self._loop.call_later(delay, self._drop_rts)
        else:
            self._send(frame)

    def _send(self, frame: bytes) -> None:
        """Straight to the (non-blocking) port when nothing is buffered: one syscall."""
        if self._out:
            self._out += frame
            return
        try:
            n = os.write(self._fd, frame)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError as e:
            self._shut(e)
            return
        if n < len(frame):
            self._out += frame[n:]
            assert self._loop is not None
            self._loop.add_writer(self._fd, self._writable)

    def _writable(self) -> None:
        try:
            n = os.write(self._fd, self._out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._shut(e)
            return
        del self._out[:n]
        if not self._out and self._loop is not None:
            self._loop.remove_writer(self._fd)

    def _drop_rts(self) -> None:
        self._rts_off = None
        if self._serial is not None:
            self._serial.rts = False

    def set_baudrate(self, baud: int) -> None:
        """Switch the open port's speed (after every PD of the line confirmed it)."""
        self.baudrate = baud
        if self._serial is not None:
            self._serial.baudrate = baud

    def wire_time(self, nbytes: int) -> float:
        return nbytes * 10 / self.baudrate

    def _shut(self, exc: Exception | None) -> None:
        """Stop reading and writing, close the port, and say why (`closed`)."""
        if self._rts_off is not None:
            self._rts_off.cancel()
            self._rts_off = None
        ser, self._serial = self._serial, None
        if ser is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._fd)
                self._loop.remove_writer(self._fd)
            self._out.clear()
            try:
                ser.close()
            except OSError as e:
                log.debug("closing %s: %s", self.port, e)
            self._fd = -1
        if exc is not None:
            log.error("OSDP port %s lost: %s", self.port, exc)
        if self.closed is not None and not self.closed.done():
            self.closed.set_result(exc)

    def close(self) -> None:
        self._shut(None)
