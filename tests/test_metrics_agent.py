"""The metrics of a running agent: the real Agent on the `sim` hardware profile, scraped over its real metrics
socket. `edge_reader_faults_total`, `edge_clock_offset_seconds` and `edge_loop_lag_seconds` were declared and
never set (always absent or 0); each must move when the thing it measures happens.
"""

from __future__ import annotations

import asyncio
import stat
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from edge.agent import Agent, run_agent
from edge.clock import read_boot_id, save_clock_state
from edge.config import Config, parse_config
from edge.sim.hands import simulated_agent
from edge.sim.transmitter import WiegandTransmitter
from edge.store import Store
from edge.timetrust import ClockTrust
from tests.test_metrics import get, http, lbl, parse

BEHIND_S = 36_000.0  # the Pi's clock came back 10 h behind after a power cut (issue 12)


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # Unix socket paths are limited to ~107 bytes: pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="edge-mx-") as d:
        yield Path(d)


@pytest.fixture
def cfg(tmp_path: Path, sock_dir: Path) -> Config:
    return parse_config(f"""
hardware = "sim"
[site]
id = "test"
gateway = "sim-metrics"
timezone = "Europe/Berlin"
[storage]
state_dir = "{tmp_path / "state"}"
synchronous = "NORMAL"
[control]
socket = "{sock_dir / "control.sock"}"
[link]
enabled = false
[metrics]
cache_s = 0
""")


async def seed_last_good(cfg: Config) -> None:
    """A last-good time of now in the store (saved while the clock was trusted, before the power cut)."""
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    async with Store(cfg.state_dir / "rights.db", cfg.tz, synchronous="NORMAL") as store:
        trust = ClockTrust(wall=time.time(), mono=time.monotonic())
        trust.cloud_time(time.time(), 0.0, time.time(), time.monotonic())
        assert await save_clock_state(store, trust, read_boot_id())


@asynccontextmanager
async def running(cfg: Config) -> AsyncIterator[Agent]:
    agent = simulated_agent(cfg, clock=lambda: time.time() - BEHIND_S)
    async with asyncio.TaskGroup() as tg:
        tg.create_task(run_agent(agent), name="agent")
        await asyncio.wait_for(agent.started.wait(), 10)
        try:
            yield agent
        finally:
            agent.stop()


async def scrape(cfg: Config) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    status, _, body = await http(Path(cfg.control.socket).parent / "metrics.sock", get("/metrics"))
    assert status == 200
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = parse(body.decode())["samples"]
    return samples


async def test_reader_faults_clock_offset_and_loop_lag_move(cfg: Config) -> None:
    await seed_last_good(cfg)
    async with running(cfg) as agent:
        sock = Path(cfg.control.socket).parent / "metrics.sock"
        assert stat.S_IMODE(sock.stat().st_mode) == 0o660
        before = await scrape(cfg)
        reader = next(name for name, door in agent.reader_door.items() if door == "door1")
        fault_key = ("edge_reader_faults_total", lbl(reader=reader, kind="parity"))
        assert fault_key not in before
        assert before[("edge_clock_offset_seconds", frozenset())] == 0

        # A reader fault on the wire: 26 zero bits. H10301's trailing bit is odd parity over bits 13-24,
        # so it must be 1 here (HID H10301 layout; proxmark3 wiegand_formats.c Pack_H10301).
        io = agent.profile.door("door1")
        assert io.reader_d0_pin is not None and io.reader_d1_pin is not None
        tx = WiegandTransmitter(agent.factory, io.reader_d0_pin, io.reader_d1_pin, pulse_s=50e-6, interval_s=1.5e-3)
        await tx.send(0, 26)
        async with asyncio.timeout(10):
            while fault_key not in (after := await scrape(cfg)):
                await asyncio.sleep(0.05)
        assert after[fault_key] == 1

        # The cloud's time, as an event acknowledgement brings it (the link calls Agent.cloud_time):
        # the clock is 10 h behind, the offset adopted is +10 h.
        agent.cloud_time(time.time(), 0.0)
        assert agent.trust is not None
        offset = (await scrape(cfg))[("edge_clock_offset_seconds", frozenset())]
        assert offset == pytest.approx(BEHIND_S, abs=5)
        assert offset == pytest.approx(agent.trust.offset_s)

        # The loop blocked for 0.6 s: the lag ticker (waking every 0.25 s) is at least 0.35 s late, whatever
        # the machine's speed.
        block_until = time.monotonic() + 0.6
        while time.monotonic() < block_until:
            pass
        await asyncio.sleep(0.3)
        assert (await scrape(cfg))[("edge_loop_lag_seconds", frozenset())] >= 0.35


async def test_a_metrics_socket_that_cannot_be_bound_keeps_the_doors_working(cfg: Config) -> None:
    """Metrics are an aid: a path that is not a socket is logged and the agent runs without them."""
    sock = Path(cfg.control.socket).parent / "metrics.sock"
    sock.write_text("someone else's file")
    async with running(cfg) as agent:
        assert agent.status().doors
    assert sock.read_text() == "someone else's file"
