"""One RS-485 line with one or more PDs: strict command/reply turns, each PD polled on its own schedule.

Only one command is on the wire at a time (half duplex). Replies are parsed in the serial read callback and
handed to the addressed `PdSession` there and then, so a card read reaches the sink in the loop turn that
received its last byte; feedback queued by the sink goes out in the very next slot.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Self

from .frame import Frame, FrameError, FrameParser
from .panel import PdSession, Timing
from .transport import Direction, SerialLink, TransportError

log = logging.getLogger(__name__)

#: Serial speeds of osdp_COMSET (SIA OSDP 2.2).
BAUDS = (9600, 19200, 38400, 57600, 115200, 230400)


class OsdpBus:
    """`async with OsdpBus(port, sessions) as bus: await bus.run()`."""

    def __init__(
        self,
        port: str,
        sessions: Sequence[PdSession],
        *,
        baudrate: int = 115200,
        direction: Direction = "auto",
        timing: Timing | None = None,
        mark: bool = True,
    ) -> None:
        addresses = [s.address for s in sessions]
        if len(set(addresses)) != len(addresses):
            raise ValueError(f"two readers share an OSDP address on {port}: {sorted(addresses)}")
        self.port = port
        self.sessions = list(sessions)
        self.timing = timing or Timing()
        self._parser = FrameParser()
        self._link = SerialLink(port, self._on_data, baudrate=baudrate, direction=direction)
        #: send the 0xFF mark byte before every command (SIA OSDP 2.2 section 5.9; SIA test 050-07-01)
        self.mark = mark
        self._current: PdSession | None = None
        self._waiter: asyncio.Future[bool] | None = None
        self._wake: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        #: exchanges completed / timed out, for benchmarks and diagnostics
        self.exchanges = 0
        self.timeouts = 0
        #: time.perf_counter() when the last command was handed to the transport
        self.last_write = 0.0

    def __repr__(self) -> str:
        return f"OsdpBus({self.port!r}, readers={[s.name for s in self.sessions]})"

    async def __aenter__(self) -> Self:
        self._loop = asyncio.get_running_loop()
        await self._link.open()
        for s in self.sessions:
            s.on_queue = self.kick
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._link.close()

    def set_address(self, session: PdSession, address: int) -> None:
        """Move one PD of this line to `address` (an address no other PD of the line has)."""
        if session not in self.sessions:
            raise ValueError(f"{session.name} is not on {self.port}")
        taken = [s.name for s in self.sessions if s is not session and s.address == address]
        if taken:
            raise ValueError(f"OSDP address {address} on {self.port} is {taken[0]}'s")
        session.set_address(address, self._link.baudrate)

    @property
    def baudrate(self) -> int:
        return self._link.baudrate

    async def set_baud(self, baud: int, *, within: float = 2.0) -> None:
        """Move the whole line to `baud`: osdp_COMSET (same address, new speed) to every reader, and once
        each has confirmed with osdp_COM, our own port. Every reader must be online: one that is not would be
        left on the old speed. Raises `ValueError` (not an OSDP speed, a reader offline) or `TimeoutError`
        (a reader did not confirm within `within`; the port then stays on the old speed)."""
        if baud not in BAUDS:
            raise ValueError(f"{baud} baud is not an OSDP speed ({', '.join(map(str, BAUDS))})")
        offline = [s.name for s in self.sessions if not s.online]
        if offline:
            raise ValueError(f"cannot change the speed of {self.port}: {', '.join(offline)} offline")
        loop = asyncio.get_running_loop()
        waits: list[asyncio.Future[None]] = []
        for s in self.sessions:
            fut: asyncio.Future[None] = loop.create_future()
            waits.append(fut)
            s.on_com = lambda com, f=fut, b=baud: _resolve(f) if com.baud == b else None
            s.set_address(s.address, baud)
        try:
            async with asyncio.timeout(within):
                await asyncio.gather(*waits)
        finally:
            for s in self.sessions:
                s.on_com = None
        self._link.set_baudrate(baud)
        log.info("osdp %s: line moved to %d baud", self.port, baud)

    def kick(self) -> None:
        """Wake the scheduler early (a PD has commands queued)."""
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    # --- receive path (loop thread, reader callback) ---

    def _on_data(self, data: bytes) -> None:
        for item in self._parser.feed(data):
            current = self._current
            if isinstance(item, Frame):
                if not item.reply:
                    continue  # our own command echoed by a half-duplex adapter
                if current is None or self._waiter is None or self._waiter.done():
                    log.debug("osdp %s: late or unsolicited reply from address %d", self.port, item.address)
                    continue
                if item.address != current.address:
                    current.fault("address", f"reply from address {item.address}, expected {current.address}")
                    continue
                now = self._loop_time()
                current.heard(now)
                if current.accept(item, now):
                    self._waiter.set_result(True)
            elif isinstance(item, FrameError) and current is not None and item.kind != "garbage":
                current.fault(item.kind, f"{len(item.data)} byte(s) dropped")

    def _loop_time(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    # --- schedule ---

    async def _sleep_until(self, when: float) -> None:
        loop = self._loop
        assert loop is not None
        delay = when - loop.time()
        if delay <= 0:
            return
        wake = loop.create_future()
        self._wake = wake
        handle = loop.call_later(delay, _resolve, wake)
        try:
            await wake
        finally:
            handle.cancel()
            self._wake = None

    async def exchange(self, session: PdSession) -> bool:
        """Send the next command of `session` and wait for its reply (True) or the timeout (False)."""
        loop = self._loop
        assert loop is not None
        frame = session.build(loop.time())
        waiter: asyncio.Future[bool] = loop.create_future()
        self._waiter = waiter
        self._current = session
        # the command's own bytes and a short reply's (osdp_PDID, 20 bytes) on the wire, then the PD's time
        timeout = session.reply_timeout + self._link.wire_time(len(frame) + 26)
        handle = loop.call_later(timeout, _expire, waiter)
        self.last_write = time.perf_counter()
        self._link.write(b"\xff" + frame if self.mark else frame)
        try:
            replied = await waiter
        finally:
            handle.cancel()
            self._waiter = None
        if replied:
            self.exchanges += 1
        else:
            self.timeouts += 1
            dropped = self._parser.discard()
            if dropped is not None:
                session.fault("truncated", f"{len(dropped.data)} byte(s) of an incomplete reply dropped")
            session.timeout(loop.time())
        self._current = None
        return replied

    async def run(self) -> None:
        """Poll every PD until cancelled. Raises `TransportError` if the port goes away."""
        loop = self._loop
        if loop is None:
            raise RuntimeError("use `async with OsdpBus(...)` before run()")
        closed = self._link.closed
        sessions = self.sessions
        while True:
            if closed is not None and closed.done():
                raise TransportError(f"OSDP port {self.port} closed: {closed.result()}")
            now = loop.time()
            # earliest deadline first; a PD with commands queued (the LED and buzzer of a decision) goes
            # ahead of every poll due, so feedback is on the wire in the slot after the card's reply
            best = sessions[0]
            best_due = best.due if not best.has_pending else -1.0
            for s in sessions[1:]:
                due = -1.0 if s.has_pending else s.due
                if due < best_due:
                    best, best_due = s, due
            if best_due > now:
                await self._sleep_until(best_due)
                continue
            await self.exchange(best)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _expire(fut: asyncio.Future[bool]) -> None:
    if not fut.done():
        fut.set_result(False)
