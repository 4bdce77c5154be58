"""The installer's "present a card" view for refused reads and key presses, on the real simulated agent: Wiegand
frames driven edge by edge on gpiozero MockFactory pins (edge.sim.pins.VirtualClockFactory via the simulator's
transmitter), the real assembler, PIN pad, tap path, feed and page.

Card vector: H10301 facility 118, card 1603 = 0x2EC0C86 (proxmark3 cmdlfhid.c, as in tests/test_formats.py); its
last bit (the odd parity over the second half) flipped is a parity error.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge.agent import Agent
from edge.config import Config, parse_config
from edge.feed import ReaderSeen
from edge.readers.events import KeyPressed, PinEntry, ReaderFault
from edge.readers.formats import FormatTable
from edge.readers.keypad import KEY_CLEAR, KEY_ENTER, PinPad, encode_key8
from edge.readers.wiegand.frame import KeypadOptions, WiegandAssembler
from edge.sim.hands import _transmitter

from .mosquitto import free_port
from .test_installer import PROXMARK_118_1603, client, config_text, running, setup_account
from .test_wiegand import frame_edges, run_assembler

BAD_PARITY = PROXMARK_118_1603 ^ 1


@pytest.fixture
def cfg(tmp_path: Path) -> Iterator[Config]:
    with tempfile.TemporaryDirectory(prefix="edge-rdr-") as d:
        yield parse_config(config_text(tmp_path / "state", Path(d) / "control.sock", free_port()))


async def _send(agent: Agent, reader: str, bits: int, nbits: int) -> None:
    tx = _transmitter(agent, agent.reader_door[reader])
    await asyncio.sleep(0.2)  # a frame right after a faulty one or a key is refused as noise
    await tx.send(bits, nbits)


async def _seen(agent: Agent, kind: type, n: int = 1) -> list[ReaderSeen]:
    for _ in range(200):
        got = [s for s in agent.feed.reads if isinstance(s.event, kind)]
        if len(got) >= n:
            return got
        await asyncio.sleep(0.02)
    raise AssertionError(f"no {kind.__name__} in the feed: {list(agent.feed.reads)}")


async def test_a_refused_frame_shows_its_bits_and_the_failed_parity_check(cfg: Config) -> None:
    async with running(cfg) as agent, client(cfg) as c:
        await setup_account(cfg, agent, c)
        reader = next(iter(agent.readers))
        await _send(agent, reader, BAD_PARITY, 26)
        [seen] = await _seen(agent, ReaderFault)
        assert isinstance(seen.event, ReaderFault)
        assert seen.event.kind == "parity" and seen.event.bits == format(BAD_PARITY, "026b")
        r = await c.get("/fragment/reads")
        assert r.status_code == 200
        assert "refused: parity" in r.text
        assert f"26 bits <code>{format(BAD_PARITY, '026b')}</code>" in r.text
        assert "bit 0 even: ok, bit 25 odd: FAIL" in r.text  # the h10301 row: which check failed
        # nothing was decided on it: the journal has the fault, no access decision
        r = await c.get("/events")
        assert "reader.fault" in r.text and "access.granted" not in r.text and "access.denied" not in r.text


async def test_key_presses_are_shown_masked_and_the_pin_entry_still_reaches_the_tap_path(cfg: Config) -> None:
    async with running(cfg) as agent, client(cfg) as c:
        await setup_account(cfg, agent, c)
        reader = next(iter(agent.readers))
        order = agent.readers[reader].assembler.keypad.order  # type: ignore[attr-defined]
        for key in (7, 3, KEY_CLEAR, 9, 5, KEY_ENTER):
            await _send(agent, reader, encode_key8(key, order), 8)
        keys = await _seen(agent, KeyPressed, 6)
        [entry] = await _seen(agent, PinEntry)
        assert [s.event.key for s in keys] == ["digit", "digit", "*", "digit", "digit", "#"]  # type: ignore[union-attr]
        assert entry.pin_digits == 2 and entry.event.pin == ""  # type: ignore[union-attr]
        # the feed gets a reader event only after the tap path acted on it (Agent._reader_sink): the PIN entry
        # still went there, as before
        r = await c.get("/fragment/reads")
        assert r.text.count("key pressed (a digit; never shown)") == 4
        assert "key pressed: *" in r.text and "key pressed: #" in r.text
        assert "PIN entered (2 digits" in r.text
        for digit in "7395":  # no digit of the keys anywhere on the page
            assert f"key pressed: {digit}" not in r.text and f"'{digit}'" not in r.text


def test_the_pin_pad_listener_changes_nothing_it_returns() -> None:
    seen: list[KeyPressed] = []
    watched, plain = PinPad("r"), PinPad("r")
    watched.on_key = seen.append
    keys = [1, 2, KEY_CLEAR, 4, 2, KEY_ENTER]
    assert [watched.key(k, float(i)) for i, k in enumerate(keys)] == [plain.key(k, float(i)) for i, k in
                                                                        enumerate(keys)]  # fmt: skip
    assert [e.key for e in seen] == ["digit", "digit", "*", "digit", "digit", "#"]
    assert not any(e.key.isdigit() for e in seen)


def test_faults_carry_the_frame_but_never_a_key_burst() -> None:
    asm = WiegandAssembler("r", FormatTable(["h10301"]), keypad=KeypadOptions(order="key_high"))
    [f] = run_assembler(asm, frame_edges(PROXMARK_118_1603 << 4 | 0b1010, 30))  # an unknown length
    assert isinstance(f, ReaderFault) and f.kind == "length" and f.bits == format(PROXMARK_118_1603, "026b") + "1010"
    [f] = run_assembler(asm, frame_edges(0x11, 8, t0=200.0))  # a bad key complement: its nibble may be a digit
    assert isinstance(f, ReaderFault) and f.kind == "parity" and f.bits == ""
    [f] = run_assembler(asm, frame_edges(1, 128 + 5, t0=300.0))  # too long: bounded
    assert isinstance(f, ReaderFault) and f.kind == "length" and len(f.bits) == 128
    off = WiegandAssembler("r", FormatTable(["h10301"]), keypad=KeypadOptions(enabled=False))
    [f] = run_assembler(off, frame_edges(5, 4))  # keypad off: a 4-bit burst is "partial", still no bits
    assert isinstance(f, ReaderFault) and f.kind == "partial" and f.bits == ""
