"""Recovery on a noisy line (issue 17), against libosdp's PeripheralDevice on a pty: osdp_BUSY (sequence
number 0, in clear, also inside a secure session), a lost command and a lost reply. The BUSY, the lost
command and the lost reply are made on the pty (`PeerBus.intercept` / `PeerBus.mangle`), never in our code."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import osdp  # libosdp (the peer)

from edge.readers.base import CardRead, ReaderStatus
from edge.readers.osdp.frame import Frame, FrameParser, crc16
from tests.osdp_peer import SITE_KEY, PeerBus
from tests.test_osdp_bus import GRANTED_CARD, Gate, leds, make, online, peers, running, until

__all__ = ["peers"]  # the fixture, imported for pytest

LED, CHLNG, POLL = 0x69, 0x76, 0x60


def busy_reply(address: int) -> bytes:
    """osdp_BUSY as the spec has a PD send it: sequence number 0, CRC, no security block, no data."""
    body = bytes((0x53, 0x80 | address, 0x08, 0x00, 0x04, 0x79))
    return body + crc16(body).to_bytes(2, "little")


def frames(data: bytes) -> list[Frame]:
    return [f for f in FrameParser().feed(data) if isinstance(f, Frame)]


def cp_frames(pb: PeerBus, since: int = 0) -> list[Frame]:
    """Every frame the control panel wrote (chunks index `since` onwards)."""
    p = FrameParser()
    return [f for _, d in pb.received[since:] for f in p.feed(d) if isinstance(f, Frame)]


def intercept_first(pb: PeerBus, match: Callable[[Frame], bool], answer: bytes, times: int = 1) -> list[bytes]:
    """Take the first `times` CP frames `match` accepts away from the readers and answer `answer` instead."""
    taken: list[bytes] = []

    def hook(data: bytes) -> bytes | None:
        if len(taken) < times and any(match(f) for f in frames(data)):
            taken.append(data)
            return answer
        return None

    pb.intercept = hook
    return taken


def no_offline(gate: Gate) -> bool:
    return all(s.online for s in gate.of(ReaderStatus))


async def test_busy_with_sequence_zero_is_retried_not_a_sequence_error(peers: PeerBus) -> None:
    """Three BUSYs in a row answering a POLL: the old CP took each (sequence 0) as a sequence error, waited
    for the reply timeout and after three took the reader offline."""
    peer = peers.add(1)
    gate = Gate()
    async with running(make(gate, peers, secure=False)):
        await until(online(gate), what="online")
        start = len(peers.received)
        taken = intercept_first(peers, lambda f: f.code == POLL, busy_reply(1), times=3)
        await until(lambda: len(taken) == 3, what="three BUSYs")
        peers.intercept = None
        peer.card(GRANTED_CARD, 26)
        await until(lambda: gate.of(CardRead), what="card after the BUSYs")
        sent = cp_frames(peers, start)
    assert not gate.faults("sequence")
    assert no_offline(gate)
    # the command answered BUSY went out again unchanged, same sequence number
    busy_polls = [f for f in sent if f.code == POLL][:4]
    assert len({f.raw for f in busy_polls}) == 1
    assert busy_polls[0].sqn != 0


async def test_plaintext_busy_inside_a_secure_session_keeps_the_session(peers: PeerBus) -> None:
    """The PD answers our (encrypted, MACed) LED command with a plaintext BUSY: the same frame goes again,
    the MAC chain where it was, and the reader takes it inside the same session: no new handshake."""
    peer = peers.add(1, scbk=SITE_KEY, enforce_secure=True)
    gate = Gate()
    async with running(make(gate, peers, scbk=SITE_KEY.hex())):
        await until(online(gate, secure=True), what="secure online")
        start = len(peers.received)
        taken = intercept_first(peers, lambda f: f.code == LED and f.scb_type == 0x17, busy_reply(1))
        peer.card(GRANTED_CARD, 26)
        await until(lambda: peer.commands_of(osdp.Command.Buzzer), what="BUZ after the BUSY")
        sent = cp_frames(peers, start)
        assert peer.sc_active()
    assert len(taken) == 1
    led_frames = [f for f in sent if f.code == LED]
    assert led_frames[0].raw == led_frames[1].raw  # byte for byte: same sequence number, same MAC
    assert not [f for f in sent if f.code == CHLNG]
    assert leds(peer)[-1]["on_color"] == osdp.CommandLEDColor.Green
    assert not gate.faults("mac") and not gate.faults("nak") and not gate.faults("sequence")
    assert no_offline(gate)


async def test_lost_command_in_a_secure_session_is_sent_again_unchanged(peers: PeerBus) -> None:
    peer = peers.add(1, scbk=SITE_KEY, enforce_secure=True)
    gate = Gate()
    async with running(make(gate, peers, scbk=SITE_KEY.hex())):
        await until(online(gate, secure=True), what="secure online")
        start = len(peers.received)
        taken = intercept_first(peers, lambda f: f.code == LED, b"")  # the reader never sees it
        peer.card(GRANTED_CARD, 26)
        await until(lambda: peer.commands_of(osdp.Command.Buzzer), what="BUZ after the lost LED")
        sent = cp_frames(peers, start)
    assert len(taken) == 1
    led_frames = [f for f in sent if f.code == LED]
    assert led_frames[0].raw == led_frames[1].raw
    assert not [f for f in sent if f.code == CHLNG]
    assert leds(peer) and no_offline(gate)


async def test_lost_reply_in_a_secure_session_keeps_the_queued_feedback(peers: PeerBus) -> None:
    """The reader took our LED command and its reply was lost. We send the same frame again; libosdp runs
    it again with its MAC chain one step on, refuses it and drops its session (the spec has a PD repeat its
    last reply instead). The CP re-handshakes at once, the reader is never reported offline, and the
    buzzer and text queued behind the LED are sent on the new session: the old CP dropped them."""
    peer = peers.add(1, scbk=SITE_KEY, enforce_secure=True)
    gate = Gate()
    state: dict[str, Any] = {"armed": False, "dropped": 0}

    def arm(data: bytes) -> bytes | None:
        if any(f.code == LED for f in frames(data)) and not state["dropped"]:
            state["armed"] = True
        return None

    def drop_reply(data: bytes) -> bytes:
        if state["armed"]:
            state["armed"] = False
            state["dropped"] += 1
            return b""
        return data

    async with running(make(gate, peers, scbk=SITE_KEY.hex())):
        await until(online(gate, secure=True), what="secure online")
        start = len(peers.received)
        peers.intercept, peers.mangle = arm, drop_reply
        peer.card(GRANTED_CARD, 26)
        await until(lambda: peer.commands_of(osdp.Command.Buzzer), what="BUZ after the lost reply")
        await until(lambda: peer.commands_of(osdp.Command.Text), what="TEXT after the lost reply")
        await until(peer.sc_active, what="reader secure again")
        sent = cp_frames(peers, start)
    assert state["dropped"] == 1
    assert len([f for f in sent if f.code == CHLNG]) == 1  # one new handshake, at once
    assert peer.commands_of(osdp.Command.Text)[-1]["data"] == "ACCESS GRANTED"
    assert no_offline(gate)
    last = gate.of(ReaderStatus)[-1]
    assert last.online and last.secure
