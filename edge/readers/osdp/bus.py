"""One RS-485 line with one or more PDs: strict command/reply turns, each PD polled on its own schedule.

Only one command is on the wire at a time (half duplex). Replies are parsed in the serial read callback and
handed to the addressed `PdSession` there and then, so a card read reaches the sink in the loop turn that
received its last byte; feedback queued by the sink goes out in the very next slot.

The scheduler is loop callbacks, no task per exchange: the reply's read callback (or the reply timeout)
ends one exchange and starts the next, or arms one timer for the first PD due. An exchange costs two loop
turns (the timer, the reply), with no futures or task wake-ups in between.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
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
        for i, s in enumerate(self.sessions):  # the PDs' poll slots spread evenly over the interval
            s.slot_phase = i / len(self.sessions)
        self.timing = timing or Timing()
        self._parser = FrameParser()
        self._link = SerialLink(port, self._on_data, baudrate=baudrate, direction=direction)
        #: send the 0xFF mark byte before every command (SIA OSDP 2.2 section 5.9; SIA test 050-07-01)
        self.mark = mark
        #: the PD whose reply is awaited (an exchange on the wire), None between exchanges
        self._current: PdSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._running = False
        self._kicked = False
        self._timer: asyncio.TimerHandle | None = None
        self._reply_timer: asyncio.TimerHandle | None = None
        #: what `run()` waits on: set with an exception when the port closes or a step fails
        self._done: asyncio.Future[None] | None = None
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
        """Wake the scheduler early (a PD has commands queued): in the next loop turn, unless an exchange
        is on the wire (its end looks at the queues anyway)."""
        loop = self._loop
        if self._running and self._current is None and not self._kicked and loop is not None:
            self._kicked = True
            loop.call_soon(self._on_kick)

    # --- receive path (loop thread, reader callback) ---

    def _on_data(self, data: bytes) -> None:
        try:
            replied: PdSession | None = None
            for item in self._parser.feed(data):
                current = self._current
                if isinstance(item, Frame):
                    if not item.reply:
                        continue  # our own command echoed by a half-duplex adapter
                    if current is None or replied is not None:
                        log.debug("osdp %s: late or unsolicited reply from address %d", self.port, item.address)
                        continue
                    if item.address != current.address:
                        current.fault("address", f"reply from address {item.address}, expected {current.address}")
                        continue
                    assert self._loop is not None
                    now = self._loop.time()
                    current.heard(now)
                    if current.accept(item, now):
                        replied = current
                elif isinstance(item, FrameError) and current is not None and item.kind != "garbage":
                    current.fault(item.kind, f"{len(item.data)} byte(s) dropped")
            if replied is not None and self._current is replied:
                self._end(replied, replied=True)
        except Exception as e:
            self._fail(e)

    # --- the scheduler: loop callbacks only (a timer, or the reply's last bytes, start the next exchange) ---

    def _on_kick(self) -> None:
        self._kicked = False
        if self._running and self._current is None:
            self._guard(self._schedule)

    def _guard(self, step: Callable[[], None]) -> None:
        """Run one scheduler step; an error in it ends `run()` with that error (the supervisor restarts it)."""
        try:
            step()
        except Exception as e:
            self._fail(e)

    def _fail(self, e: BaseException) -> None:
        self._stop_timers()
        self._current = None
        if self._done is not None and not self._done.done():
            self._done.set_exception(e)

    def _stop_timers(self) -> None:
        for h in (self._timer, self._reply_timer):
            if h is not None:
                h.cancel()
        self._timer = self._reply_timer = None

    def _schedule(self) -> None:
        """Send the next command if a PD is due, else sleep until the first one is."""
        if not self._running:
            return
        loop = self._loop
        assert loop is not None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        now = loop.time()
        # earliest deadline first; a PD with commands queued (the LED and buzzer of a decision) goes
        # ahead of every poll due, so feedback is on the wire in the slot after the card's reply
        sessions = self.sessions
        best = sessions[0]
        best_due = best.due if not best.has_pending else -1.0
        for s in sessions[1:]:
            due = -1.0 if s.has_pending else s.due
            if due < best_due:
                best, best_due = s, due
        if best_due > now:
            self._timer = loop.call_at(best_due, self._on_timer)
            return
        frame = best.build(now)
        self._current = best
        # the command's own bytes and a short reply's (osdp_PDID, 20 bytes) on the wire, then the PD's time
        timeout = best.reply_timeout + self._link.wire_time(len(frame) + 26)
        self._reply_timer = loop.call_at(now + timeout, self._on_reply_timeout)
        self.last_write = time.perf_counter()
        self._link.write(b"\xff" + frame if self.mark else frame)

    def _on_timer(self) -> None:
        self._timer = None
        if self._current is None:
            self._guard(self._schedule)

    def _on_reply_timeout(self) -> None:
        self._reply_timer = None
        session = self._current
        if session is not None:
            self._guard(lambda: self._end(session, replied=False))

    def _end(self, session: PdSession, *, replied: bool) -> None:
        """One exchange is over (its reply digested, or the reply timeout): on to the next."""
        if self._reply_timer is not None:
            self._reply_timer.cancel()
            self._reply_timer = None
        if replied:
            self.exchanges += 1
        else:
            self.timeouts += 1
            dropped = self._parser.discard()
            if dropped is not None:
                session.fault("truncated", f"{len(dropped.data)} byte(s) of an incomplete reply dropped")
            assert self._loop is not None
            session.timeout(self._loop.time())
        self._current = None
        self._schedule()

    async def run(self) -> None:
        """Poll every PD until cancelled. Raises `TransportError` if the port goes away (and whatever a
        scheduler step raised: a bug, for the supervisor to log and restart)."""
        loop = self._loop
        if loop is None:
            raise RuntimeError("use `async with OsdpBus(...)` before run()")
        if self._running:
            raise RuntimeError(f"OSDP bus {self.port} is already running")
        closed = self._link.closed
        if closed is not None and closed.done():
            raise TransportError(f"OSDP port {self.port} closed: {closed.result()}")
        done: asyncio.Future[None] = loop.create_future()
        self._done = done
        if closed is not None:
            closed.add_done_callback(self._on_closed)
        self._running = True
        try:
            self._guard(self._schedule)
            await done
        finally:
            self._running = False
            self._stop_timers()
            self._current = None
            self._done = None
            if closed is not None:
                closed.remove_done_callback(self._on_closed)

    def _on_closed(self, closed: asyncio.Future[Exception | None]) -> None:
        self._fail(TransportError(f"OSDP port {self.port} closed: {closed.result()}"))


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
