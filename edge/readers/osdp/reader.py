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
from collections.abc import Sequence
from types import TracebackType
from typing import Self

from edge.readers.base import Feedback, Reader, ReaderSink

from .bus import OsdpBus
from .panel import PdConfig, PdSession, Timing
from .transport import Direction


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
        use_crc: bool = True,
        formats: list[str] | None = None,
        display: bool | None = None,
        baudrate: int = 115200,
        direction: Direction = "auto",
        timing: Timing | None = None,
    ) -> None:
        super().__init__(name, sink)
        config = PdConfig(
            address=address,
            secure=secure,
            allow_install_mode=allow_install_mode,
            allow_plaintext=allow_plaintext,
            scbk=scbk,
            use_crc=use_crc,
            formats=formats,
            display=display,
        )
        self.session = PdSession(name, config, sink, timing)
        self._own_timing = timing is not None
        self.bus: OsdpBus | None = None
        if port is not None:
            self.bus = OsdpBus(port, [self.session], baudrate=baudrate, direction=direction, timing=timing)
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
) -> OsdpBus:
    """One bus for several port-less `OsdpReader`s at different addresses. `timing` is the line's: it
    applies to every reader made without a timing of its own."""
    for r in readers:
        if r._owns_bus:
            raise ValueError(f"reader {r.name} has its own port; make it without `port` to share a bus")
    bus = OsdpBus(port, [r.session for r in readers], baudrate=baudrate, direction=direction, timing=timing)
    for r in readers:
        r.bus = bus
        if timing is not None and not r._own_timing:
            r.session.set_timing(timing)  # the line's timing, unless the reader was given its own
    return bus
