"""Reader I/O (issue 17): inputs, outputs, tamper and power as typed events, and OUT / ISTAT / OSTAT through
the control panel's API, against libosdp's PeripheralDevice on a pty (in a secure session)."""

from __future__ import annotations

from typing import Any

import osdp  # libosdp (the peer)
import pytest

from edge.readers.osdp import (
    InputsChanged,
    OsdpReader,
    OutputsChanged,
    PowerChanged,
    ReaderIoEvent,
    ReaderRefused,
    TamperChanged,
)
from tests.osdp_peer import SITE_KEY, PeerBus
from tests.test_osdp_bus import FAST, Gate, online, peers, running, until

__all__ = ["peers"]


def io_reader(gate: Gate, pb: PeerBus, io: list[ReaderIoEvent]) -> OsdpReader:
    r = OsdpReader("front", gate.sink, port=pb.path, address=1, scbk=SITE_KEY.hex(), timing=FAST,
                   io_sink=io.append)
    gate.readers["front"] = r
    return r


def of(io: list[ReaderIoEvent], kind: type[Any]) -> list[Any]:
    return [e for e in io if isinstance(e, kind)]


async def test_inputs_tamper_and_power_are_typed_events(peers: PeerBus) -> None:
    """The old CP kept ISTATR in `session.inputs` only: no event left the reader."""
    peer = peers.add(1, scbk=SITE_KEY, enforce_secure=True)
    gate = Gate()
    io: list[ReaderIoEvent] = []
    async with running(io_reader(gate, peers, io)):
        await until(online(gate, secure=True), what="secure online")
        peer.input_change(bytes((1, 0, 0, 1)))
        await until(lambda: of(io, InputsChanged), what="inputs")
        peer.input_change(bytes((1, 0, 0, 0)))
        await until(lambda: len(of(io, InputsChanged)) == 2, what="second input change")
        peer.local_status(tamper=True, power_failure=True)
        await until(lambda: of(io, PowerChanged) and of(io, TamperChanged)[-1].tamper, what="tamper, power")
    first, second = of(io, InputsChanged)
    assert (first.states, first.changed) == ((1, 0, 0, 1), (0, 1, 2, 3))  # first report: every input is news
    assert (second.states, second.changed) == ((1, 0, 0, 0), (3,))
    assert of(io, TamperChanged)[-1].tamper is True
    assert of(io, PowerChanged)[-1].power_ok is False
    assert all(e.reader == "front" for e in io)


async def test_out_through_the_cp_api(peers: PeerBus) -> None:
    """The old CP had OutputCommand and no way to send it."""
    peer = peers.add(1, scbk=SITE_KEY, enforce_secure=True)
    gate = Gate()
    io: list[ReaderIoEvent] = []
    async with running(io_reader(gate, peers, io)) as r:
        await until(online(gate, secure=True), what="secure online")
        await r.set_output(1, True)
        assert peer.outputs[1] == 1
        await r.set_output(0, True, pulse=1.5)
        await r.set_output(1, False)
        assert peer.outputs[1] == 0
        with pytest.raises(ValueError, match="2 output"):
            await r.set_output(5, True)
        with pytest.raises(ValueError, match="pulse"):
            await r.set_output(0, True, pulse=0.01)
        # the reader reports its outputs (an OSTATR on a poll): a typed event
        peer.submit({"event": osdp.Event.Status, "type": osdp.StatusReportType.Output, "nr_entries": 2,
                     "report": bytes((1, 0))})
        await until(lambda: of(io, OutputsChanged), what="outputs")
    outs = [(c["output_no"], c["control_code"], c["timer_count"]) for c in peer.commands_of(osdp.Command.Output)]
    assert outs == [(1, 2, 0), (0, 5, 15), (1, 1, 0)]
    assert of(io, OutputsChanged)[-1].states == (1, 0)


async def test_istat_and_ostat_through_the_cp_api(peers: PeerBus) -> None:
    """libosdp 3.2's PD answers osdp_ISTAT / osdp_OSTAT with a NAK ("unable to process") and sends the
    states its app reports on the next poll instead: the refusal is an error naming the reader and the
    reason, the states arrive as events."""
    peer = peers.add(1, scbk=SITE_KEY, enforce_secure=True)
    peer.inputs[:] = bytes((0, 1, 0, 0))
    gate = Gate()
    io: list[ReaderIoEvent] = []
    async with running(io_reader(gate, peers, io)) as r:
        await until(online(gate, secure=True), what="secure online")
        with pytest.raises(ReaderRefused, match="front refused ISTAT: unable to process"):
            await r.read_inputs()
        await until(lambda: of(io, InputsChanged), what="inputs on the next poll")
        with pytest.raises(ReaderRefused, match="front refused OSTAT"):
            await r.read_outputs()
        assert r.session.inputs == (0, 1, 0, 0)
        assert peer.commands_of(osdp.Command.Status)
