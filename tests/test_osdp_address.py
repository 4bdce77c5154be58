"""OSDP addressing on a plaintext line (issue 11): an osdp_COM the control panel did not ask for with its own
COMSET, or a reply from an address other than the one polled, never moves a session to another address, so
a card shown at one reader is never attributed to another. Against libosdp's PeripheralDevice on a pty, with
the forged frames written onto the line as a device in the middle would."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import osdp  # libosdp (the peer)
import pytest

from edge.readers.base import CardRead, ReaderFault
from edge.readers.osdp import OsdpBus, OsdpReader, osdp_bus
from edge.readers.osdp.frame import crc16
from tests.osdp_peer import PeerBus
from tests.test_osdp_bus import FAST, GRANTED_CARD, OTHER_CARD, Gate, online, until

ACK, COM = 0x40, 0x54


def forged_com(ack: bytes, *, from_address: int, new_address: int) -> bytes:
    """The plaintext osdp_ACK `ack` (SOM, ADDR, LEN, CTRL, 0x40, CRC) turned into an osdp_COM "I am now at
    `new_address`, 9600 baud" sent as from `from_address`, with the ACK's sequence number and a good CRC."""
    body = bytes((0x53, 0x80 | from_address)) + (13).to_bytes(2, "little") + ack[4:5]
    body += bytes((COM, new_address)) + (9600).to_bytes(4, "little")
    return body + crc16(body).to_bytes(2, "little")


def is_poll_ack(data: bytes, address: int) -> bool:
    return len(data) == 8 and data[0] == 0x53 and data[1] == 0x80 | address and data[5] == ACK


@contextlib.asynccontextmanager
async def two_doors(pb: PeerBus, gate: Gate) -> AsyncIterator[tuple[OsdpBus, OsdpReader, OsdpReader]]:
    """door1's reader at address 1, door2's at address 2, one plaintext line."""
    r1 = OsdpReader("door1", gate.sink, address=1, secure=False)
    r2 = OsdpReader("door2", gate.sink, address=2, secure=False)
    gate.readers.update(door1=r1, door2=r2)
    async with osdp_bus(pb.path, [r1, r2], timing=FAST) as bus:
        task = asyncio.create_task(bus.run(), name="osdp-line")
        try:
            await until(lambda: online(gate, "door1")() and online(gate, "door2")(), what="both online")
            yield bus, r1, r2
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def mitm_once(pb: PeerBus, rewrite: Callable[[bytes], bytes | None]) -> dict[str, int]:
    """Replace the first frame for which `rewrite` returns bytes (the device in the middle answers)."""
    done = {"n": 0}

    def mangle(data: bytes) -> bytes:
        if not done["n"]:
            forged = rewrite(data)
            if forged is not None:
                done["n"] += 1
                return forged
        return data

    pb.mangle = mangle
    return done


async def door2_cards_stay_door2(pb: PeerBus, gate: Gate, n: int = 4) -> None:
    p2 = next(p for p in pb.peers if p.address == 2)
    p1 = next(p for p in pb.peers if p.address == 1)
    for i in range(n):
        p2.card(OTHER_CARD, 26)
        await until(lambda i=i: len(gate.of(CardRead, "door2")) > i, what=f"door2 card {i}")
    p1.card(GRANTED_CARD, 26)
    await until(lambda: gate.of(CardRead, "door1"), what="door1 card")
    assert [c.card for c in gate.of(CardRead, "door2")] == [999] * n
    assert [c.card for c in gate.of(CardRead, "door1")] == [3456]


@pytest.mark.parametrize("sender", ["polled", "other"])
async def test_unsolicited_osdp_com_never_readdresses_a_session(sender: str) -> None:
    """The device in the middle answers one of door1's polls with an osdp_COM "now at address 2" (the
    address of door2's reader), sent as from door1's address (`polled`) or from address 2 (`other`). The
    old session took it: door1's session then polled address 2, and cards shown at door2 read as door1's."""
    with PeerBus() as pb:
        pb.add(1)
        pb.add(2)
        gate = Gate()
        async with two_doors(pb, gate) as (_bus, r1, r2):
            frm = 1 if sender == "polled" else 2
            done = mitm_once(pb, lambda d: forged_com(d, from_address=frm, new_address=2)
                             if is_poll_ack(d, 1) else None)
            await until(lambda: done["n"] == 1, what="forged COM on the line")
            pb.mangle = None
            await asyncio.sleep(0.1)  # a few polls of both readers after it
            await door2_cards_stay_door2(pb, gate)
            assert (r1.session.address, r2.session.address) == (1, 2)
            assert any(f.reader == "door1" for f in gate.faults("address"))
        assert online(gate, "door1")() and online(gate, "door2")()
        detail = next(f.detail for f in gate.faults("address") if f.reader == "door1")
        assert ("ignored" in detail) if sender == "polled" else ("reply from address 2" in detail)


async def test_com_answering_our_comset_for_another_address_is_refused() -> None:
    """We ask door1's reader to move to 5; the device in the middle answers that COMSET with an osdp_COM for
    address 2 (door2's). The session does not follow it to 2."""
    with PeerBus() as pb:
        pb.add(1)
        pb.add(2)
        gate = Gate()
        async with two_doors(pb, gate) as (bus, r1, _r2):
            def rewrite(d: bytes) -> bytes | None:
                if len(d) == 13 and d[1] == 0x81 and d[5] == COM:  # the PD's own answer to our COMSET
                    return forged_com(d[:5] + bytes((ACK,)) + d[-2:], from_address=1, new_address=2)
                return None

            done = mitm_once(pb, rewrite)
            bus.set_address(r1.session, 5)
            await until(lambda: done["n"] == 1, what="forged answer to COMSET")
            await until(lambda: any("asked for address 5" in f.detail for f in gate.faults("address")),
                        what="refused COM")
            assert r1.session.address != 2


async def test_our_own_comset_moves_the_session_with_the_reader() -> None:
    """The one way a session changes address: the COMSET the CP sent, answered by osdp_COM from the polled
    address for the address asked. libosdp's PD moves; so does the session, and its cards still read."""
    with PeerBus() as pb:
        pb.add(1)
        p2 = pb.add(2)
        gate = Gate()
        async with two_doors(pb, gate) as (bus, r1, r2):
            with pytest.raises(ValueError, match="door2"):
                bus.set_address(r1.session, 2)  # taken on this line
            bus.set_address(r1.session, 3)
            await until(lambda: r1.session.address == 3, what="session at address 3")
            p1 = next(p for p in pb.peers if p.address == 1)
            assert p1.commands_of(osdp.Command.Comset)
            assert not gate.faults("address")
            p1.card(GRANTED_CARD, 26)
            await until(lambda: gate.of(CardRead, "door1"), what="door1 card after the move")
            p2.card(OTHER_CARD, 26)
            await until(lambda: gate.of(CardRead, "door2"), what="door2 card")
            assert r2.session.address == 2
        assert [c.card for c in gate.of(CardRead, "door1")] == [3456]
        assert [c.card for c in gate.of(CardRead, "door2")] == [999]
        assert not [e for e in gate.of(ReaderFault) if e.reader == "door1" and e.kind == "address"]
