"""The line itself (issue 17): the 0xFF mark byte before every command (SIA OSDP 2.2 section 5.9, SIA test
050-07-01), on by default and configurable, and osdp_COMSET moving a whole line to another speed. Against
libosdp's PeripheralDevice on a pty."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import osdp  # libosdp (the peer)
import pytest

from edge.readers.base import CardRead, ReaderStatus
from edge.readers.osdp import OsdpBus, OsdpReader, osdp_bus
from tests.osdp_peer import SITE_KEY, PeerBus
from tests.test_osdp_bus import FAST, GRANTED_CARD, OTHER_CARD, Gate, make, online, peers, running, until

__all__ = ["peers"]


@pytest.mark.parametrize("mark", [True, False])
async def test_mark_byte_before_every_command(peers: PeerBus, mark: bool) -> None:
    peer = peers.add(1, scbk=SITE_KEY, enforce_secure=True)
    gate = Gate()
    kw = {} if mark else {"mark": False}
    async with running(make(gate, peers, scbk=SITE_KEY.hex(), **kw)):
        await until(online(gate, secure=True), what="secure online")
        peer.card(GRANTED_CARD, 26)
        await until(lambda: peer.commands_of(osdp.Command.Buzzer), what="BUZ")
    chunks = [d for _, d in peers.received]
    assert chunks
    if mark:  # the default: libosdp's PD takes the marked frames, secure session and all
        assert all(d[:2] == b"\xff\x53" for d in chunks)
    else:
        assert all(d[:1] == b"\x53" for d in chunks)
    assert [c.card for c in gate.of(CardRead)] == [3456]


@contextlib.asynccontextmanager
async def two_readers(pb: PeerBus, gate: Gate) -> AsyncIterator[OsdpBus]:
    r1 = OsdpReader("door1", gate.sink, address=1, scbk=SITE_KEY.hex())
    r2 = OsdpReader("door2", gate.sink, address=2, secure=False)
    gate.readers.update(door1=r1, door2=r2)
    async with osdp_bus(pb.path, [r1, r2], timing=FAST) as bus:
        task = asyncio.create_task(bus.run(), name="osdp-line")
        try:
            await until(lambda: online(gate, "door1", True)() and online(gate, "door2")(), what="both online")
            yield bus
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_comset_moves_the_line_to_another_speed(peers: PeerBus) -> None:
    """The old bus could only change an address: COMSET always carried the line's current speed."""
    p1 = peers.add(1, scbk=SITE_KEY)
    p2 = peers.add(2)
    gate = Gate()
    async with two_readers(peers, gate) as bus:
        with pytest.raises(ValueError, match="not an OSDP speed"):
            await bus.set_baud(12345)
        await bus.set_baud(38400)
        assert bus.baudrate == 38400
        assert bus._link._serial.baudrate == 38400
        for p in (p1, p2):
            cmd = p.commands_of(osdp.Command.Comset)[-1]
            assert (cmd["address"], cmd["baud_rate"]) == (p.address, 38400)
        p1.card(GRANTED_CARD, 26)
        p2.card(OTHER_CARD, 26)
        await until(lambda: len(gate.of(CardRead)) == 2, what="cards after the change")
    assert not gate.faults("comset") and not gate.faults("address")
    assert all(s.online for s in gate.of(ReaderStatus))


async def test_comset_refused_while_a_reader_is_offline(peers: PeerBus) -> None:
    """A reader that is offline would stay on the old speed, cut off: the change is refused."""
    peers.add(1, scbk=SITE_KEY)
    p2 = peers.add(2)
    gate = Gate()
    async with two_readers(peers, gate) as bus:
        p2.silent = True
        await until(lambda: not gate.of(ReaderStatus, "door2")[-1].online, what="door2 offline")
        with pytest.raises(ValueError, match="door2 offline"):
            await bus.set_baud(57600)
        assert bus.baudrate == 115200
