"""Pairing an OSDP reader from the installer page (issue 16): the real simulated agent with an OSDP reader on a
pty, libosdp's PeripheralDevice behind it in install mode (it knows only the default key SCBK-D), the agent
configured with `allow_install_mode = false` and the reader's key file. The reader is refused until an installer
arms install mode from the readers page; then it is moved to the site key and is secure on it."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from edge.agent import Agent, run_agent
from edge.config import Config, check_files, parse_config
from edge.events import INSTALLER_ACTION
from edge.readers.osdp import OsdpReader
from edge.readers.osdp.panel import Phase
from edge.sim.hands import simulated_agent
from tests.osdp_peer import SITE_KEY, PeerBus
from tests.test_osdp_bus import Gate, make, running, until

from .mosquitto import free_port
from .test_installer import client, config_text, hidden, setup_account

READER = "door1.osdp0"


def pairing_config(state: Path, sock: Path, keys: Path, port: str) -> Config:
    text = config_text(state, sock, free_port()).replace(
        'synchronous = "NORMAL"', f'synchronous = "NORMAL"\nplaintext_secrets = true\nkey_store = "{keys}"'
    )
    text += f"""
[[readers]]
driver = "osdp"
door = "door1"
port = "{port}"
address = 1
key_file = "door1.scbk"
allow_install_mode = false
[[readers]]
driver = "wiegand"
door = "door2"
"""
    return parse_config(text)


def key_dir(tmp_path: Path) -> Path:
    d = tmp_path / "keys"
    d.mkdir(mode=0o700)
    f = d / "door1.scbk"
    f.write_text(SITE_KEY.hex())
    f.chmod(0o600)
    return d


@asynccontextmanager
async def gateway(cfg: Config) -> AsyncIterator[Agent]:
    check_files(cfg)
    agent = simulated_agent(cfg)
    async with asyncio.TaskGroup() as tg:
        tg.create_task(run_agent(agent), name="agent")
        await asyncio.wait_for(agent.started.wait(), 10)
        try:
            for _ in range(200):
                try:
                    _r, w = await asyncio.open_connection(cfg.installer.listen, cfg.installer.port)
                    w.close()
                    break
                except OSError:
                    await asyncio.sleep(0.02)
            yield agent
        finally:
            agent.stop()


async def add_viewer(c: httpx.AsyncClient, csrf: str) -> None:
    r = await c.post("/accounts", data={"_csrf": csrf, "name": "vic", "role": "viewer", "password": "y" * 12})
    assert r.status_code == 200, r.text


async def test_pair_from_the_page_moves_a_factory_reader_to_the_site_key(tmp_path: Path) -> None:
    with PeerBus() as pb, tempfile.TemporaryDirectory(prefix="edge-pair-") as d:
        peer = pb.add(1, install_mode=True)  # factory-fresh: knows only SCBK-D
        cfg = pairing_config(tmp_path / "state", Path(d) / "control.sock", key_dir(tmp_path), pb.path)
        async with gateway(cfg) as agent, client(cfg) as c:
            reader = agent.readers[READER]
            assert isinstance(reader, OsdpReader)
            # install mode is off in the config: the reader is refused, never secure, never given a key
            await until(lambda: reader.session.phase is Phase.REFUSED, timeout=10, what="reader refused")
            assert not reader.session.secure and peer.keys == []
            await setup_account(cfg, agent, c)
            page = await c.get("/readers")
            assert "Pair (install mode, 5 minutes)" in page.text and "pairing armed" not in page.text
            csrf = hidden(page.text)
            # a viewer sees the reader but may not pair it
            await add_viewer(c, csrf)
            async with client(cfg) as v:
                token = hidden((await v.get("/login")).text)
                r = await v.post("/login", data={"_csrf": token, "name": "vic", "password": "y" * 12})
                assert r.status_code == 303
                vpage = await v.get("/readers")
                assert vpage.status_code == 200 and "Pair (install mode" not in vpage.text
                r = await v.post(f"/readers/{READER}/pair", data={"_csrf": hidden(vpage.text)})
                assert r.status_code == 403 and "installer role" in r.text
            assert reader.install_armed_until() is None
            # without the CSRF token: refused
            assert (await c.post(f"/readers/{READER}/pair", data={"_csrf": "wrong"})).status_code == 403
            # a Wiegand reader cannot be paired; an unknown reader is not found
            r = await c.post("/readers/door2.wiegand1/pair", data={"_csrf": csrf})
            assert r.status_code == 400 and "pairing (install mode) is for OSDP readers only" in r.text
            assert (await c.post("/readers/nowhere/pair", data={"_csrf": csrf})).status_code == 404
            assert peer.keys == []
            # the installer arms it
            r = await c.post(f"/readers/{READER}/pair", data={"_csrf": csrf})
            assert r.status_code == 200, r.text
            assert f"Reader {READER}: pairing armed until " in r.text
            await until(lambda: reader.session.secure and reader.online, timeout=10, what="secure on the site key")
            assert peer.keys == [SITE_KEY] and peer.sc_active()
            assert reader.install_armed_until() is None  # disarmed once the key is installed
            assert not reader.session.config.allow_install_mode
            await asyncio.sleep(0.2)
            page = await c.get("/readers")
            assert "secure channel yes" in page.text and "site key installed" in page.text
            assert "pairing armed" not in page.text
        assert SITE_KEY not in b"".join(data for _, data in pb.received)  # the key crossed only encrypted
    pairs = [(e.user, e.detail.get("reader"), str(e.detail.get("result"))) for e in agent.feed.events
             if e.type == INSTALLER_ACTION and e.detail.get("action") == "pair"]  # fmt: skip
    assert pairs[0][:2] == ("ina", "door2.wiegand1") and pairs[0][2].startswith("refused: ")
    assert ("ina", READER, "ok") in pairs


async def test_an_armed_window_that_ends_unused_leaves_install_mode_off() -> None:
    """The panel method alone against libosdp: armed while the reader does not answer, the window ends; the
    reader coming back later is refused and never given the key."""
    with PeerBus() as pb:
        peer = pb.add(1, install_mode=True)
        gate = Gate()
        async with running(make(gate, pb, scbk=SITE_KEY.hex())) as r:
            await until(lambda: gate.faults("handshake"), what="refused on the site key")
            peer.silent = True
            await until(lambda: not r.online and r.session.phase is not Phase.ONLINE, what="reader silent")
            until_wall = r.arm_install_mode(1)
            assert r.install_armed_until() == pytest.approx(until_wall, abs=0.05)
            assert r.session.config.allow_install_mode
            await asyncio.sleep(1.2)
            assert r.install_armed_until() is None and not r.session.config.allow_install_mode
            peer.silent = False
            await asyncio.sleep(1.0)  # several handshake retries (FAST: 0.3 s)
            assert peer.keys == [] and not r.secure
    with pytest.raises(ValueError, match="needs secure = true and a site key"):
        make(Gate(), pb, secure=False, allow_plaintext=True).arm_install_mode(300)
    with pytest.raises(ValueError, match=r"1 \.\. 3600 s"):
        make(Gate(), pb, scbk=SITE_KEY.hex()).arm_install_mode(0)
