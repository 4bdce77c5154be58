"""RS-485 serial transport on pyserial-asyncio (half duplex).

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

import serial_asyncio

from edge.errors import EdgeError

log = logging.getLogger(__name__)

Direction = Literal["auto", "kernel", "rts"]


class TransportError(EdgeError):
    """The serial port could not be opened or went away."""


class _Protocol(asyncio.Protocol):
    def __init__(self, link: SerialLink) -> None:
        self.link = link

    def data_received(self, data: bytes) -> None:
        self.link.on_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.link.lost(exc)


class SerialLink:
    """One open serial port. `on_data(bytes)` is called for every chunk read."""

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
        self._transport: asyncio.Transport | None = None
        self._serial: Any = None
        self._fd = -1
        self._rts_off: asyncio.TimerHandle | None = None
        self.closed: asyncio.Future[Exception | None] | None = None

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        self.closed = loop.create_future()
        try:
            transport, _ = await serial_asyncio.create_serial_connection(
                loop, lambda: _Protocol(self), self.port, baudrate=self.baudrate, bytesize=8, parity="N",
                stopbits=1, timeout=0,
            )
        except Exception as e:  # serial.SerialException, OSError
            raise TransportError(f"cannot open OSDP port {self.port}: {e}") from e
        self._transport = transport
        self._serial = transport.serial
        self._fd = self._serial.fileno()
        if self.direction == "kernel":
            from serial.rs485 import RS485Settings

            self._serial.rs485_mode = RS485Settings(rts_level_for_tx=True, rts_level_for_rx=False)
        elif self.direction == "rts":
            self._serial.rts = False

    def write(self, frame: bytes) -> None:
        transport = self._transport
        if transport is None:
            raise TransportError(f"OSDP port {self.port} is not open")
        if self.direction == "rts":
            if self._rts_off is not None:
                self._rts_off.cancel()
            self._serial.rts = True
            self._send(transport, frame)
            # 10 bits per byte (8N1); drop RTS after the last stop bit, with one byte of margin
            delay = (len(frame) + 1) * 10 / self.baudrate
            self._rts_off = asyncio.get_running_loop().call_later(delay, self._drop_rts)
        else:
            self._send(transport, frame)

    def _send(self, transport: asyncio.Transport, frame: bytes) -> None:
        """Straight to the (non-blocking) port when nothing is buffered: one syscall, no writer callback a
        loop turn later (the transport would add and remove an epoll writer for every command)."""
        if transport.get_write_buffer_size() == 0:
            try:
                n = os.write(self._fd, frame)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError:
                n = 0  # the transport reports the error (and connection_lost) on its own write
            frame = frame[n:]
        if frame:
            transport.write(frame)

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

    def lost(self, exc: Exception | None) -> None:
        if self.closed is not None and not self.closed.done():
            self.closed.set_result(exc)

    def close(self) -> None:
        if self._rts_off is not None:
            self._rts_off.cancel()
        if self._transport is not None:
            self._transport.close()
            self._transport = None
