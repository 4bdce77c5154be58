"""OSDP reader I/O reaches the journal (issue 17): the real agent on the simulated profile with an OSDP reader
on a pty, libosdp's PeripheralDevice behind it; an input change, the tamper switch and the power supply
become `reader.io`, `reader.tamper` and `reader.power` events in the journal on disk."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import msgspec
import pytest

from edge.agent import run_agent
from edge.config import parse_config
from edge.errors import ConfigError
from edge.events import Event
from edge.readers.osdp import OsdpReader
from edge.sim.hands import simulated_agent
from tests.osdp_peer import PeerBus
from tests.test_osdp_bus import until


def config_text(state: Path, sock: Path, port: str) -> str:
    return f"""
hardware = "sim"
[site]
id = "test"
gateway = "sim-osdp"
timezone = "Europe/Berlin"
[storage]
state_dir = "{state}"
synchronous = "NORMAL"
[control]
socket = "{sock}"
[link]
enabled = false
[[readers]]
driver = "osdp"
door = "door1"
port = "{port}"
address = 1
secure = false
allow_plaintext = true
offline_after_s = 2.5
"""


def journal(state: Path) -> list[Event]:
    con = sqlite3.connect(state / "journal.db")
    try:
        rows = con.execute("SELECT body FROM events ORDER BY seq").fetchall()
    finally:
        con.close()
    dec = msgspec.msgpack.Decoder(Event)
    return [dec.decode(r[0]) for r in rows]


async def test_reader_io_tamper_and_power_are_journal_events(tmp_path: Path) -> None:
    with PeerBus() as pb:
        peer = pb.add(1)
        cfg = parse_config(config_text(tmp_path / "state", tmp_path / "edge.sock", pb.path))
        agent = simulated_agent(cfg)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(run_agent(agent), name="agent")
            await asyncio.wait_for(agent.started.wait(), 10)
            try:
                reader = agent.readers["door1.osdp0"]
                assert isinstance(reader, OsdpReader)
                assert reader.bus is not None and reader.bus.mark  # the mark byte: on unless configured off
                assert reader.session.timing.offline_after == 2.5
                await until(lambda: reader.online, timeout=10, what="OSDP reader online")
                peer.input_change(bytes((1, 0, 0, 1)))
                peer.local_status(tamper=True, power_failure=True)
                await until(lambda: reader.session.power_ok is False and reader.session.inputs == (1, 0, 0, 1),
                            what="inputs, tamper and power seen")
                await asyncio.sleep(0.1)
            finally:
                agent.stop()
    events = journal(tmp_path / "state")
    io = [e for e in events if e.type == "reader.io"]
    assert [(e.reader, e.door, e.reason, e.detail) for e in io] == [
        ("door1.osdp0", "door1", "input", {"states": "1001", "changed": "0,1,2,3"})]
    assert [e.detail for e in events if e.type == "reader.tamper"][-1] == {"tamper": True}
    assert [e.detail for e in events if e.type == "reader.power"][-1] == {"power_ok": False}


def test_line_settings_must_agree_on_one_port(tmp_path: Path) -> None:
    text = config_text(tmp_path / "state", tmp_path / "edge.sock", "/dev/ttyUSB0") + """
[[readers]]
driver = "osdp"
door = "door2"
port = "/dev/ttyUSB0"
address = 2
secure = false
mark = false
offline_after_s = 2.5
"""
    with pytest.raises(ConfigError, match=r"readers\[1\]\.mark: differs from readers\[0\] on the same port"):
        parse_config(text)
