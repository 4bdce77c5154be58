"""Per-line scheduling (issue 17): a dead reader never stalls the live ones on its line, and offline
detection has hysteresis. libosdp's PeripheralDevice on a pty; rates are counted at the peer and printed
(the target itself, 8 secure readers at 115,200 baud, lives in bench/osdp.py)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator

import pytest

from edge.readers.base import CardRead, Feedback, ReaderStatus
from edge.readers.osdp import OsdpBus, OsdpReader, PdConfig, PdSession, Timing, osdp_bus
from edge.readers.osdp.commands import Cmd, Rep
from edge.readers.osdp.frame import Frame, FrameParser, encode
from tests.osdp_peer import SITE_KEY, PeerBus
from tests.test_osdp_bus import GRANTED_CARD, Gate, online, until

LINE = Timing(poll_interval=0.02, reply_timeout=0.06, offline_after=0.3, offline_retry=0.1,
              offline_retry_max=1.0, handshake_retry=0.3)


@contextlib.asynccontextmanager
async def line(pb: PeerBus, gate: Gate, addresses: list[int], timing: Timing) -> AsyncIterator[OsdpBus]:
    readers = [OsdpReader(f"r{a}", gate.sink, address=a, scbk=SITE_KEY.hex()) for a in addresses]
    gate.readers.update({r.name: r for r in readers})
    async with osdp_bus(pb.path, readers, timing=timing) as bus:
        task = asyncio.create_task(bus.run(), name="osdp-line")
        try:
            yield bus
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def commands_per_address(pb: PeerBus, t0: float, t1: float) -> dict[int, list[float]]:
    p = FrameParser()
    out: dict[int, list[float]] = {}
    for t, data in list(pb.received):
        for f in p.feed(data):
            if isinstance(f, Frame) and t0 <= t <= t1:
                out.setdefault(f.address, []).append(t)
    return out


async def live_rates(with_dead: bool, seconds: float = 2.0) -> tuple[dict[int, float], dict[int, list[float]]]:
    live = [1, 2, 3]
    with PeerBus() as pb:
        for a in live:
            pb.add(a, scbk=SITE_KEY)
        if with_dead:
            pb.add(4, scbk=SITE_KEY).silent = True  # on the line, never answers
        gate = Gate()
        async with line(pb, gate, live + ([4] if with_dead else []), LINE):
            await until(lambda: all(online(gate, f"r{a}", True)() for a in live), what="live readers online")
            # let the dead reader's probing back off to its steady state (0.1, 0.2, 0.4, 0.8, 1.0 s)
            await asyncio.sleep(2.0 if with_dead else 0.2)
            p0 = time.perf_counter()
            await asyncio.sleep(seconds)
            p1 = time.perf_counter()
        seen = commands_per_address(pb, p0, p1)
    return {a: len(seen.get(a, [])) / (p1 - p0) for a in live}, seen


async def test_a_dead_reader_costs_live_readers_at_most_a_probe_slot() -> None:
    """The old bus retransmitted to a dead reader back to back (three reply timeouts in a row) and probed
    it every second: the live readers on its line stood still each time."""
    base, _ = await live_rates(with_dead=False)
    dead, seen = await live_rates(with_dead=True)
    ratio = min(dead.values()) / max(base.values())
    print(f"\nlive readers' polls/s without a dead reader {sorted(round(v, 1) for v in base.values())}, "
          f"with one {sorted(round(v, 1) for v in dead.values())}: ratio {ratio:.2f}")
    probes = seen.get(4, [])
    assert 1 <= len(probes) <= 3  # steady state: one osdp_ID per offline_retry_max (1 s), never a burst
    assert all(b - a > 0.5 for a, b in itertools.pairwise(probes))
    assert ratio > 0.5  # loose: a shared machine's load moves both figures; bench/osdp.py holds the 10 % target


async def test_a_short_outage_is_not_reported_offline() -> None:
    """Hysteresis: a reader silent for less than `offline_after` stays online (its commands are sent again
    in its slots); silent for longer, it is reported offline once, and back online after a full bring-up.
    The old bus declared it offline after three reply timeouts (0.18 s here)."""
    timing = Timing(poll_interval=0.02, reply_timeout=0.06, offline_after=1.0, offline_retry=0.1,
                    offline_retry_max=0.2)
    with PeerBus() as pb:
        peer = pb.add(1, scbk=SITE_KEY)
        gate = Gate()
        async with line(pb, gate, [1], timing):
            await until(online(gate, "r1", True), what="online")
            peer.silent = True
            await asyncio.sleep(0.4)
            peer.silent = False
            await asyncio.sleep(0.2)
            assert all(s.online for s in gate.of(ReaderStatus))
            peer.card(GRANTED_CARD, 26)
            await until(lambda: gate.of(CardRead), what="card after the short outage")
            peer.silent = True
            await until(lambda: not gate.of(ReaderStatus)[-1].online, what="offline after a long outage")
            assert [s.online for s in gate.of(ReaderStatus)].count(False) == 1
            peer.silent = False
            await until(online(gate, "r1", True), timeout=5, what="back online")


# --- the poll schedule itself (the pure session, no line): a fixed grid, not "interval after the reply" ---


def _reply(s: PdSession, code: int, data: bytes = b"") -> Frame:
    (f,) = [x for x in FrameParser().feed(encode(s.address, s.sqn, code, data, reply=True)) if isinstance(x, Frame)]
    return f


def _online(phase: float = 0.0, at: float = 100.0) -> PdSession:
    events: list[object] = []
    s = PdSession("r", PdConfig(address=1, secure=False), events.append, Timing(poll_interval=0.05))
    s.slot_phase = phase
    for code, data in ((Rep.PDID, bytes(12)), (Rep.PDCAP, b""), (Rep.LSTATR, b"\0\0")):
        s.build(at)
        assert s.accept(_reply(s, code, data), at)
    assert s.online and not s.has_pending
    return s


def test_polls_are_due_on_a_fixed_grid_whatever_the_replies_latency() -> None:
    """Each poll is due one interval after the last one's slot: a PD is polled 1 / poll_interval times a
    second however long its replies take (the old schedule counted the interval from the reply: 50 ms plus
    the exchange, below 20/s on a busy line)."""
    s = _online()
    slot = s.due
    for latency in (0.001, 0.03, 0.049, 0.002, 0.02):
        frame = s.build(slot + latency / 3)  # sent a little late (the line was busy): the grid does not move
        assert frame[5] == Cmd.POLL
        assert s.accept(_reply(s, Rep.ACK), slot + latency)
        assert s.due == pytest.approx(slot + 0.05)
        slot = s.due


def test_feedback_goes_out_at_once_and_does_not_move_the_grid() -> None:
    s = _online()
    slot = s.due
    s.build(slot)
    s.feedback(Feedback.GRANTED)  # queued by the sink while the poll's reply is digested
    assert s.accept(_reply(s, Rep.ACK), slot + 0.004)
    assert s.has_pending and s.due == pytest.approx(slot + 0.004)  # the very next slot of the line
    while s.has_pending:
        assert s.build(s.due)[5] in (Cmd.LED, Cmd.BUZ, Cmd.TEXT)
        assert s.accept(_reply(s, Rep.ACK), s.due + 0.003)
    assert s.due == pytest.approx(slot + 0.05)


def test_a_pd_held_up_for_more_than_an_interval_rejoins_its_phase_of_the_grid() -> None:
    """No burst of back-to-back polls to catch up, and PDs of one line stay spread over the interval."""
    a, b = _online(0.0), _online(0.5)
    assert (b.due - a.due) % 0.05 == pytest.approx(0.025)
    late = a.due + 0.4
    a.build(late)
    assert a.accept(_reply(a, Rep.ACK), late + 0.002)
    assert late < a.due <= late + 0.075
    assert (a.due - 100.0) % 0.05 == pytest.approx(0.0, abs=1e-9) or (a.due - 100.0) % 0.05 == pytest.approx(0.05)
