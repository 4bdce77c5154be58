"""One contract every reader backend passes, as python-can's back2back tests do for its buses.

Each backend is made by name through the backend table (edge.readers.registry.BACKENDS) and driven by its real
wire, with no double of our own code: Wiegand on gpiozero MockFactory pins (edge.sim.pins) pulsed edge by edge
by the simulator's transmitter, OSDP against libosdp's peripheral on a pty (tests/osdp_peer.py), and the
virtual reader through its in-process feed. The same card gives the same event with the same fields; a bad
frame is a `ReaderFault`, never a read; feedback is accepted and played (on the LED/beeper pins by the door's
Indicator, or sent to the reader as osdp_LED); events reach the sink on the loop thread; close releases the
backend's pins, port and tasks, and nothing is delivered afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import osdp  # libosdp (the OSDP peer)
import pytest
from gpiozero import InputDevice, OutputDevice

from edge.door.indicator import Indicator
from edge.errors import ConfigError
from edge.readers.base import Reader
from edge.readers.events import CardRead, Feedback, PinEntry, ReaderFault
from edge.readers.formats import FormatTable, encode
from edge.readers.osdp import Timing
from edge.readers.registry import BACKENDS, backend
from edge.readers.virtual import VirtualReader
from edge.sim.pins import VirtualClockFactory
from edge.sim.transmitter import WiegandTransmitter
from tests.osdp_peer import PeerBus
from tests.test_wiegand import Collector

FC, CARD = 123, 4567
#: H10301 (26 bits) as HID documents it: even parity over bits 1-12, FC 8 bits, card 16 bits, odd parity.
FRAME = encode("h10301", FC, CARD)
BAD_PARITY = FRAME ^ 1  # the trailing odd-parity bit flipped
D0_PIN, D1_PIN, LED_PIN, BEEP_PIN = 17, 27, 22, 23
FAST = Timing(poll_interval=0.02, reply_timeout=0.06, retries=2, offline_retry=0.1, handshake_retry=0.3)


async def until(cond: Callable[[], Any], what: str, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.005)
    assert cond(), what


class Rig:
    """One backend behind the contract: its reader, the wire that drives it, and what it shows."""

    driver: str
    reader: Reader
    sink: Collector

    async def frame(self, bits: int, nbits: int) -> None:
        """Put a card frame on the backend's wire (first bit most significant)."""
        raise NotImplementedError

    async def played(self, what: Feedback) -> None:
        """Wait until `what` was played by the backend (pins, or commands at the reader)."""
        raise NotImplementedError

    async def released(self) -> None:
        """After close: assert that the backend holds nothing any more."""
        raise NotImplementedError


class PinRig(Rig):
    """LED and beeper lines on MockFactory pins, played by the door's Indicator (Wiegand, virtual)."""

    def __init__(self, factory: Any) -> None:
        self.factory = factory
        self._led = OutputDevice(LED_PIN, initial_value=False, pin_factory=factory)
        self._beeper = OutputDevice(BEEP_PIN, initial_value=False, pin_factory=factory)
        self.indicator = Indicator(asyncio.get_running_loop(), led=self._led, beeper=self._beeper)

    async def played(self, what: Feedback) -> None:
        assert what is Feedback.GRANTED  # the one the contract asks for: LED on (2 s), beep (0.1 s)
        led, beep = self.factory.pin(LED_PIN), self.factory.pin(BEEP_PIN)
        await until(lambda: led.state and True in [s.state for s in beep.states], "LED on and a beep")

    def close_lines(self) -> None:
        self.indicator.close()
        self._led.close()
        self._beeper.close()


class WiegandRig(PinRig):
    driver = "wiegand"

    def __init__(self, sink: Collector) -> None:
        factory = VirtualClockFactory()
        super().__init__(factory)
        self.sink = sink
        self.reader = backend("wiegand")(
            "door1.wiegand", sink, d0=D0_PIN, d1=D1_PIN, formats=FormatTable(["h10301"]),
            indicator=self.indicator, pin_factory=factory,
        )  # fmt: skip
        self.tx = WiegandTransmitter(factory, D0_PIN, D1_PIN)

    async def frame(self, bits: int, nbits: int) -> None:
        self.tx.idle(0.1)  # apart from the frame before (a frame right after a fault is refused as its tail)
        self.tx.send_now(bits, nbits)

    async def released(self) -> None:
        for pin in (D0_PIN, D1_PIN):
            assert self.factory.pin(pin).when_changed is None
            InputDevice(pin, pin_factory=self.factory).close()  # free to claim again: released, not leaked
        self.close_lines()


class VirtualRig(PinRig):
    driver = "virtual"

    def __init__(self, sink: Collector) -> None:
        super().__init__(VirtualClockFactory())
        self.sink = sink
        self.reader = backend("virtual")("door1.virtual", sink, formats=FormatTable(["h10301"]),
                                         indicator=self.indicator)  # fmt: skip

    async def frame(self, bits: int, nbits: int) -> None:
        self.reader.frame(bits, nbits)  # type: ignore[attr-defined]

    async def released(self) -> None:
        with pytest.raises(RuntimeError, match="not open"):
            self.reader.frame(FRAME, 26)  # type: ignore[attr-defined]
        self.close_lines()


class OsdpRig(Rig):
    driver = "osdp"

    def __init__(self, sink: Collector, peers: PeerBus) -> None:
        self.sink = sink
        self.peers = peers
        self.peer = peers.add(1)
        self.reader = backend("osdp")("door1.osdp", sink, port=peers.path, address=1, secure=False,
                                      formats=["h10301"], timing=FAST)  # fmt: skip
        self.fds_before = self._fds_on_port()

    def _fds_on_port(self) -> int:
        n = 0
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                n += os.readlink(f"/proc/self/fd/{fd}") == self.peers.path
        return n

    async def online(self) -> None:
        await until(lambda: getattr(self.reader, "online", False), "the OSDP reader online")

    async def frame(self, bits: int, nbits: int) -> None:
        self.peer.card(bits, nbits)

    async def played(self, what: Feedback) -> None:
        assert what is Feedback.GRANTED
        green = osdp.CommandLEDColor.Green

        def led_green() -> bool:
            return any(c.get("on_color") == green for c in self.peer.commands_of(osdp.Command.LED))

        await until(led_green, "green osdp_LED")
        await until(lambda: self.peer.commands_of(osdp.Command.Buzzer), "osdp_BUZ")

    async def released(self) -> None:
        # The serial port is closed again. serial_asyncio closes the file in a later loop turn than
        # `transport.close()`, after the reader's `async with` has returned: wait for that turn.
        await until(lambda: self._fds_on_port() == self.fds_before, "the OSDP port closed")


@pytest.fixture(params=sorted(BACKENDS))
async def rig(request: pytest.FixtureRequest) -> AsyncIterator[Rig]:
    sink = Collector()
    with contextlib.ExitStack() as stack:
        r: Rig
        if request.param == "wiegand":
            r = WiegandRig(sink)
        elif request.param == "virtual":
            r = VirtualRig(sink)
        else:
            r = OsdpRig(sink, stack.enter_context(PeerBus()))
        yield r


@contextlib.asynccontextmanager
async def running(rig: Rig) -> AsyncIterator[Reader]:
    async with rig.reader as reader:
        task = asyncio.create_task(reader.run(), name=f"reader[{reader.name}].{rig.driver}")
        try:
            if isinstance(rig, OsdpRig):
                await rig.online()
            yield reader
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def test_every_backend_is_in_the_table() -> None:
    assert sorted(BACKENDS) == ["osdp", "virtual", "wiegand"]
    for name in BACKENDS:
        cls = backend(name)
        assert isinstance(cls, type) and issubclass(cls, Reader) and cls.kind == name
    with pytest.raises(ConfigError, match=r"unknown reader driver 'rs232' \(known: osdp, virtual, wiegand\)"):
        backend("rs232")


async def test_a_card_read_is_the_same_event_on_every_backend(rig: Rig) -> None:
    loop = asyncio.get_running_loop()
    async with running(rig) as reader:
        start = loop.time()
        await rig.frame(FRAME, 26)
        ev = await rig.sink.wait_for(lambda e: isinstance(e, CardRead))
        assert isinstance(ev, CardRead)
        assert (ev.reader, ev.card, ev.facility, ev.format, ev.bits) == (reader.name, CARD, FC, "h10301", 26)
        assert start - 0.5 <= ev.at <= loop.time()  # on the loop's (monotonic) clock, when the read completed
    assert rig.sink.threads == {threading.get_ident()}  # the sink ran on the event-loop thread
    assert not rig.sink.of(ReaderFault)


async def test_a_bad_frame_is_a_fault_never_a_read(rig: Rig) -> None:
    async with running(rig) as reader:
        await rig.frame(BAD_PARITY, 26)
        ev = await rig.sink.wait_for(lambda e: isinstance(e, ReaderFault))
        assert isinstance(ev, ReaderFault) and ev.reader == reader.name and ev.kind == "parity"
        await rig.frame(FRAME, 26)  # and the reader reads on
        await rig.sink.wait_for(lambda e: isinstance(e, CardRead))
    assert [e.card for e in rig.sink.of(CardRead)] == [CARD]


async def test_feedback_is_accepted_and_played(rig: Rig) -> None:
    async with running(rig) as reader:
        for what in Feedback:
            reader.feedback(what)  # every feedback is accepted, with or without text, and never blocks
        reader.feedback(Feedback.IDLE, text="WELCOME")
        reader.feedback(Feedback.GRANTED)
        await rig.played(Feedback.GRANTED)


async def test_close_releases_everything_and_delivers_nothing_more(rig: Rig) -> None:
    async with running(rig):
        await rig.frame(FRAME, 26)
        await rig.sink.wait_for(lambda e: isinstance(e, CardRead))
    seen = len(rig.sink.events)
    await rig.released()
    if not isinstance(rig, VirtualRig):  # (the virtual reader's feed refuses, checked in `released`)
        await rig.frame(FRAME, 26)
        await asyncio.sleep(0.3)
    assert len(rig.sink.events) == seen


async def test_the_virtual_feed_from_another_thread_reaches_the_sink_on_the_loop_thread() -> None:
    sink = Collector()
    async with VirtualReader("v", sink, formats=FormatTable(["h10301"])) as reader:
        await asyncio.to_thread(reader.card, CARD, facility=FC)
        await asyncio.to_thread(reader.keys, "12*34#")  # "*" clears: the PIN is 34
        await sink.wait_for(lambda e: isinstance(e, PinEntry))
        with pytest.raises(ValueError, match="keys must be digits"):
            reader.keys("1a")
    assert [(e.card, e.facility) for e in sink.of(CardRead)] == [(CARD, FC)]
    assert [e.pin for e in sink.of(PinEntry)] == ["34"]
    assert sink.threads == {threading.get_ident()}
