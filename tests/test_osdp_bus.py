"""The OSDP control panel against libosdp's PeripheralDevice on a pty pair (real reader firmware logic).

Functional assertions only (no timing assertions: speed lives in bench/osdp.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import osdp  # libosdp (the peer)
import pytest

from edge.readers import formats
from edge.readers.base import CardRead, Feedback, PinEntry, ReaderEvent, ReaderFault, ReaderStatus
from edge.readers.osdp import OsdpReader, Timing, osdp_bus
from edge.readers.osdp.frame import crc16
from tests.osdp_peer import SITE_KEY, Peer, PeerBus

FAST = Timing(poll_interval=0.02, reply_timeout=0.06, retries=2, offline_retry=0.1, offline_retry_max=0.4,
              handshake_retry=0.3)
GRANTED_CARD = formats.encode("h10301", 12, 3456)
OTHER_CARD = formats.encode("h10301", 12, 999)
WRONG_KEY = bytes.fromhex("00112233445566778899AABBCCDDEEFF")


class Gate:
    """Test-local decision stub: grants card 3456, denies everything else, drives the reader's feedback."""

    def __init__(self) -> None:
        self.events: list[ReaderEvent] = []
        self.readers: dict[str, OsdpReader] = {}

    def sink(self, ev: ReaderEvent) -> None:
        self.events.append(ev)
        if isinstance(ev, CardRead):
            ok = ev.card == 3456 and ev.facility == 12
            self.readers[ev.reader].feedback(Feedback.GRANTED if ok else Feedback.DENIED)

    def of(self, kind: type[Any], reader: str | None = None) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind) and (reader is None or e.reader == reader)]

    def faults(self, kind: str) -> list[ReaderFault]:
        return [e for e in self.of(ReaderFault) if e.kind == kind]


async def until(cond: Callable[[], Any], timeout: float = 5.0, what: str = "") -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what or cond}")
        await asyncio.sleep(0.005)


@pytest.fixture
def peers() -> Iterator[PeerBus]:
    with PeerBus() as pb:
        yield pb


@contextlib.asynccontextmanager
async def running(reader: OsdpReader) -> AsyncIterator[OsdpReader]:
    async with reader:
        task = asyncio.create_task(reader.run(), name=f"reader[{reader.name}].osdp")
        try:
            yield reader
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def make(gate: Gate, pb: PeerBus, name: str = "front", **kw: Any) -> OsdpReader:
    kw.setdefault("timing", FAST)
    kw.setdefault("address", 1)
    r = OsdpReader(name, gate.sink, port=pb.path, **kw)
    gate.readers[name] = r
    return r


def online(gate: Gate, name: str = "front", secure: bool | None = None) -> Callable[[], bool]:
    def check() -> bool:
        st = gate.of(ReaderStatus, name)
        return bool(st) and st[-1].online and (secure is None or st[-1].secure == secure)

    return check


def leds(peer: Peer) -> list[dict[str, Any]]:
    return peer.commands_of(osdp.Command.LED)


# --- bring-up and the tap path -----------------------------------------------------------------------


async def test_bring_up_reads_id_and_capabilities(peers: PeerBus) -> None:
    peers.add(1)
    gate = Gate()
    async with running(make(gate, peers, secure=False)) as r:
        await until(online(gate), what="online")
        assert r.session.pdid is not None
        assert r.session.pdid.serial == 0x12345679 and r.session.pdid.vendor == 0x00A1B2
        assert r.session.pdcap is not None and r.session.pdcap.has(4)  # LED control
        await until(lambda: r.session.power_ok is not None, what="LSTATR")
        assert r.session.tamper is False and r.session.power_ok is True
        assert gate.of(ReaderStatus)[0] == ReaderStatus(reader="front", online=True, secure=False)


async def test_card_read_decision_drives_led_and_buzzer(peers: PeerBus) -> None:
    peer = peers.add(1)
    gate = Gate()
    async with running(make(gate, peers, secure=False)):
        await until(online(gate))
        peer.card(GRANTED_CARD, 26)
        await until(lambda: peer.commands_of(osdp.Command.Buzzer), what="BUZ at the peer")
        cards = gate.of(CardRead)
        assert [(c.card, c.facility, c.format, c.bits) for c in cards] == [(3456, 12, "h10301", 26)]
        assert leds(peer)[-1]["on_color"] == osdp.CommandLEDColor.Green
        assert leds(peer)[-1]["temporary"] is True
        # the peer has a text display (PDCAP): the result is shown there too
        await until(lambda: peer.commands_of(osdp.Command.Text), what="TEXT")
        assert peer.commands_of(osdp.Command.Text)[-1]["data"] == "ACCESS GRANTED"
        n = len(leds(peer))
        peer.card(OTHER_CARD, 26)
        await until(lambda: len(leds(peer)) > n, what="second LED")
        assert leds(peer)[-1]["on_color"] == osdp.CommandLEDColor.Red


async def test_keypad_and_local_status_are_events(peers: PeerBus) -> None:
    peer = peers.add(1, scbk=SITE_KEY)
    gate = Gate()
    async with running(make(gate, peers, scbk=SITE_KEY.hex())):
        await until(online(gate, secure=True))
        peer.keypad("12*1234#")
        await until(lambda: gate.of(PinEntry), what="PIN")
        assert [p.pin for p in gate.of(PinEntry)] == ["1234"]
        assert "1234" not in repr(gate.of(PinEntry)[0])
        peer.local_status(tamper=True, power_failure=True)
        await until(lambda: any(s.tamper for s in gate.of(ReaderStatus)), what="tamper")
        last = gate.of(ReaderStatus)[-1]
        assert (last.online, last.tamper, last.power_ok, last.secure) == (True, True, False, True)


# --- Secure Channel ----------------------------------------------------------------------------------


async def test_secure_channel_with_site_key(peers: PeerBus) -> None:
    peer = peers.add(1, scbk=SITE_KEY, enforce_secure=True)
    gate = Gate()
    async with running(make(gate, peers, scbk=SITE_KEY.hex())) as r:
        await until(online(gate, secure=True), what="secure online")
        assert peer.sc_active() and r.secure
        peer.card(GRANTED_CARD, 26)
        await until(lambda: peer.commands_of(osdp.Command.Buzzer), what="BUZ over SC")
        assert leds(peer)[-1]["on_color"] == osdp.CommandLEDColor.Green
        assert not gate.faults("handshake") and not gate.faults("mac")
    # nothing of the key went on the wire in clear
    assert SITE_KEY not in b"".join(d for _, d in peers.received)


async def test_install_mode_moves_reader_to_site_key(peers: PeerBus) -> None:
    peer = peers.add(1, install_mode=True)  # factory-fresh: knows only SCBK-D
    gate = Gate()
    async with running(make(gate, peers, scbk=SITE_KEY.hex(), allow_install_mode=True)):
        await until(online(gate, secure=True), what="secure online after KEYSET")
        assert peer.keys == [SITE_KEY]
        assert any(s.secure and s.detail == "site key installed" for s in gate.of(ReaderStatus))
        peer.card(GRANTED_CARD, 26)
        await until(lambda: gate.of(CardRead), what="card after KEYSET")
    # the key crossed the wire only encrypted
    assert SITE_KEY not in b"".join(d for _, d in peers.received)


async def test_install_mode_is_refused_unless_configured(peers: PeerBus) -> None:
    peer = peers.add(1, install_mode=True)
    gate = Gate()
    async with running(make(gate, peers, scbk=SITE_KEY.hex())):
        await until(lambda: gate.faults("handshake"), what="handshake fault")
        await until(lambda: gate.of(ReaderStatus), what="refused status")
        peer.card(GRANTED_CARD, 26)
        await asyncio.sleep(0.4)
    assert peer.keys == []
    assert not any(s.online for s in gate.of(ReaderStatus))
    assert gate.of(CardRead) == []


async def test_wrong_key_is_refused_and_never_used_in_clear(peers: PeerBus) -> None:
    peer = peers.add(1, scbk=WRONG_KEY)
    gate = Gate()
    async with running(make(gate, peers, scbk=SITE_KEY.hex())):
        await until(lambda: gate.faults("handshake"), what="handshake fault")
        peer.card(GRANTED_CARD, 26)
        await asyncio.sleep(0.5)  # covers a handshake retry
    status = gate.of(ReaderStatus)
    assert status and not any(s.online for s in status)
    assert status[-1].secure is False and "refused" in status[-1].detail
    assert gate.of(CardRead) == [] and leds(peer) == []
    assert len(gate.faults("handshake")) >= 2  # retried, reported each time


async def test_wrong_key_with_plaintext_allowed_goes_online_insecure(peers: PeerBus) -> None:
    peer = peers.add(1, scbk=WRONG_KEY)
    gate = Gate()
    async with running(make(gate, peers, scbk=SITE_KEY.hex(), allow_plaintext=True)):
        await until(online(gate, secure=False), what="plaintext online")
        assert gate.faults("handshake")
        assert "plaintext" in gate.of(ReaderStatus)[0].detail
        peer.card(GRANTED_CARD, 26)
        await until(lambda: leds(peer), what="LED")


async def test_secure_reply_with_a_bad_mac_drops_and_rebuilds_the_session(peers: PeerBus) -> None:
    peer = peers.add(1, scbk=SITE_KEY)
    gate = Gate()
    hits = {"n": 0}

    def spoil_mac(data: bytes) -> bytes:
        # one SCS_16 reply gets a wrong MAC (CRC recomputed so only the MAC check can catch it)
        if hits["n"] == 0 and len(data) > 12 and data[6] == 0x16:
            hits["n"] += 1
            b = bytearray(data)
            b[-3] ^= 0x01
            crc = crc16(bytes(b[:-2]))
            b[-2:] = crc.to_bytes(2, "little")
            return bytes(b)
        return data

    async with running(make(gate, peers, scbk=SITE_KEY.hex())):
        await until(online(gate, secure=True))
        peers.mangle = spoil_mac
        await until(lambda: gate.faults("mac"), what="MAC fault")
        peers.mangle = None
        await until(lambda: gate.of(ReaderStatus)[-1].online and gate.of(ReaderStatus)[-1].secure,
                    what="session rebuilt")
        peer.card(GRANTED_CARD, 26)
        await until(lambda: gate.of(CardRead), what="card after re-handshake")


# --- the bus -----------------------------------------------------------------------------------------


async def test_reader_going_offline_and_coming_back(peers: PeerBus) -> None:
    peer = peers.add(1, scbk=SITE_KEY)
    gate = Gate()
    async with running(make(gate, peers, scbk=SITE_KEY.hex())):
        await until(online(gate, secure=True))
        peer.silent = True
        await until(lambda: not gate.of(ReaderStatus)[-1].online, what="offline")
        assert gate.of(ReaderStatus)[-1].detail == "no reply"
        peer.silent = False
        await until(online(gate, secure=True), timeout=10, what="back online")
        peer.card(GRANTED_CARD, 26)
        await until(lambda: gate.of(CardRead), what="card after coming back")


async def test_two_readers_on_one_bus(peers: PeerBus) -> None:
    p1 = peers.add(1, scbk=SITE_KEY)
    p2 = peers.add(2)
    gate = Gate()
    r1 = OsdpReader("front", gate.sink, address=1, scbk=SITE_KEY.hex())
    r2 = OsdpReader("back", gate.sink, address=2, secure=False)
    gate.readers.update(front=r1, back=r2)
    async with osdp_bus(peers.path, [r1, r2], timing=FAST) as bus:
        task = asyncio.create_task(bus.run())
        try:
            await until(lambda: online(gate, "front", True)() and online(gate, "back", False)(), what="both")
            p2.card(OTHER_CARD, 26)
            p1.card(GRANTED_CARD, 26)
            await until(lambda: len(gate.of(CardRead)) == 2, what="two cards")
            await until(lambda: leds(p1) and leds(p2), what="LED on both")
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    by_reader = {c.reader: c.card for c in gate.of(CardRead)}
    assert by_reader == {"front": 3456, "back": 999}
    assert leds(p1)[-1]["on_color"] == osdp.CommandLEDColor.Green
    assert leds(p2)[-1]["on_color"] == osdp.CommandLEDColor.Red


async def test_two_readers_at_one_address_is_a_config_error() -> None:
    gate = Gate()
    r1 = OsdpReader("a", gate.sink, address=1, secure=False)
    r2 = OsdpReader("b", gate.sink, address=1, secure=False)
    with pytest.raises(ValueError, match="share an OSDP address"):
        osdp_bus("/dev/null", [r1, r2])


async def test_corrupted_and_truncated_replies_never_give_a_card(peers: PeerBus) -> None:
    peer = peers.add(1)
    gate = Gate()
    mode = {"how": ""}

    def spoil_raw(data: bytes) -> bytes:
        if len(data) > 6 and data[5] == 0x50 and mode["how"]:  # a RAW card reply (plaintext)
            how, mode["how"] = mode["how"], ""
            if how == "flip":
                b = bytearray(data)
                b[9] ^= 0x10  # a card data bit
                return bytes(b)
            return data[: len(data) // 2]
        return data

    async with running(make(gate, peers, secure=False)):
        await until(online(gate))
        peers.mangle = spoil_raw
        mode["how"] = "flip"
        peer.card(GRANTED_CARD, 26)
        await until(lambda: gate.faults("crc"), what="CRC fault")
        mode["how"] = "truncate"
        peer.card(GRANTED_CARD, 26)
        await until(lambda: gate.faults("truncated"), what="truncation fault")
        assert gate.of(CardRead) == []
        assert gate.of(ReaderStatus)[-1].online  # a retry answered: still online
        peer.card(GRANTED_CARD, 26)
        await until(lambda: gate.of(CardRead), what="clean card")
    assert [c.card for c in gate.of(CardRead)] == [3456]


async def test_reply_from_the_wrong_address_is_ignored(peers: PeerBus) -> None:
    peer = peers.add(1)
    gate = Gate()
    armed = {"on": False}

    def readdress(data: bytes) -> bytes:
        if armed["on"] and len(data) > 6 and data[5] == 0x50:
            armed["on"] = False
            b = bytearray(data)
            b[1] = 0x85  # "from PD 5"
            b[-2:] = crc16(bytes(b[:-2])).to_bytes(2, "little")
            return bytes(b)
        return data

    async with running(make(gate, peers, secure=False)):
        await until(online(gate))
        peers.mangle = readdress
        armed["on"] = True
        peer.card(GRANTED_CARD, 26)
        await until(lambda: gate.faults("address"), what="address fault")
        await asyncio.sleep(0.2)
        assert gate.of(CardRead) == []
        assert gate.of(ReaderStatus)[-1].online


async def test_garbage_injected_on_the_line_is_survived(peers: PeerBus) -> None:
    peer = peers.add(1)
    gate = Gate()
    async with running(make(gate, peers, secure=False)):
        await until(online(gate))
        peers.inject(b"\x53\x81\x20\x00\x04\x40\x00\xff\xfe" + bytes(range(40)))
        await asyncio.sleep(0.1)
        peer.card(GRANTED_CARD, 26)
        await until(lambda: gate.of(CardRead), what="card after noise")


async def test_half_duplex_at_9600_baud() -> None:
    with PeerBus(baud=9600) as pb:
        peer = pb.add(1, scbk=SITE_KEY)
        gate = Gate()
        slow = Timing(poll_interval=0.05, reply_timeout=0.2, offline_retry=0.2)
        async with running(make(gate, pb, scbk=SITE_KEY.hex(), baudrate=9600, timing=slow)):
            await until(online(gate, secure=True), timeout=10, what="secure online at 9600")
            peer.card(GRANTED_CARD, 26)
            await until(lambda: peer.commands_of(osdp.Command.Buzzer), timeout=5, what="BUZ at 9600")
        assert not gate.faults("truncated")


async def test_missing_site_key_is_a_config_error() -> None:
    from edge.errors import ConfigError

    with pytest.raises(ConfigError):
        OsdpReader("x", lambda e: None, address=1, secure=True)
    with pytest.raises(ConfigError):
        OsdpReader("x", lambda e: None, address=1, scbk="abcd")
