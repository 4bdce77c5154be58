"""The installer page on the real simulated agent: its HTTP server in the agent's TaskGroup, the real tap path
(Wiegand bit trains on mock pins), real relays (MockPin states), the journal on disk.

Card vector: H10301 facility 118, card 1603 = 0x2EC0C86 (proxmark3 cmdlfhid.c, as in tests/test_formats.py).
"""

from __future__ import annotations

import asyncio
import io
import re
import socket
import ssl
import tempfile
import zipfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from edge.agent import Agent, run_agent
from edge.config import Config, parse_config
from edge.control import StatusRequest, request
from edge.events import INSTALLER_ACTION
from edge.installer.auth import Accounts
from edge.installer.cardview import explain
from edge.installer.tls import ensure_certificate, fingerprint
from edge.readers.formats import FormatTable
from edge.sim.demo import demo_change_set
from edge.sim.hands import simulated_agent, tap

from .mosquitto import free_port

PROXMARK_118_1603 = 0x2EC0C86


def config_text(state: Path, sock: Path, port: int, *, listen: str = "127.0.0.1", extra: str = "") -> str:
    return f"""
hardware = "sim"
[site]
id = "test"
gateway = "inst-test"
timezone = "Europe/Berlin"
[policy]
clock_source = "system"
[storage]
state_dir = "{state}"
synchronous = "NORMAL"
[control]
socket = "{sock}"
[link]
enabled = false
[installer]
enabled = true
listen = "{listen}"
port = {port}
{extra}
"""


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="edge-inst-") as d:
        yield Path(d)


@pytest.fixture
def cfg(tmp_path: Path, sock_dir: Path) -> Config:
    return parse_config(config_text(tmp_path / "state", sock_dir / "control.sock", free_port()))


@asynccontextmanager
async def running(cfg: Config) -> AsyncIterator[Agent]:
    agent = simulated_agent(cfg)
    agent.demo = demo_change_set(agent.profile)
    async with asyncio.TaskGroup() as tg:
        tg.create_task(run_agent(agent), name="agent")
        await asyncio.wait_for(agent.started.wait(), 10)
        try:
            await _serving(cfg)
            yield agent
        finally:
            agent.stop()


async def _serving(cfg: Config) -> None:
    for _ in range(200):
        try:
            _r, w = await asyncio.open_connection(cfg.installer.listen, cfg.installer.port)
            w.close()
            return
        except OSError:
            await asyncio.sleep(0.02)
    raise AssertionError("the installer page does not listen")


def client(cfg: Config, **kw: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{cfg.installer.port}", follow_redirects=False, timeout=10,
                             **kw)  # fmt: skip


def hidden(html: str, name: str = "_csrf") -> str:
    m = re.search(rf'name="{name}" value="([^"]+)"', html)
    assert m, html[:500]
    return m.group(1)


async def setup_account(cfg: Config, agent: Agent, c: httpx.AsyncClient, name: str = "ina") -> None:
    r = await c.get("/setup")
    token = hidden(r.text)
    code = agent.installer.accounts.setup_code
    r = await c.post("/setup", data={"_csrf": token, "code": code, "name": name, "password": "correct horse 1",
                                     "confirm": "correct horse 1"})  # fmt: skip
    assert r.status_code == 303, r.text
    assert r.headers["location"] == "/"


async def test_first_use_needs_the_setup_code_and_every_page_needs_a_login(cfg: Config) -> None:
    async with running(cfg) as agent, client(cfg) as c:
        # no default password: the setup code is in `edge status` (and the system log)
        st = (await request(cfg.control.socket, StatusRequest())).result
        assert st is not None
        code = st["installer"]["setup_code"]
        assert code and st["installer"]["url"] == f"http://127.0.0.1:{cfg.installer.port}/"
        for path in ("/", "/doors", "/readers", "/events", "/config", "/accounts", "/diagnostics.zip"):
            r = await c.get(path)
            assert r.status_code == 303 and r.headers["location"] == "/login", path
        assert (await c.get("/login")).headers["location"] == "/setup"
        r = await c.get("/setup")
        assert "script-src 'self'" in r.headers["content-security-policy"]
        assert r.headers["x-frame-options"] == "DENY"
        token = hidden(r.text)
        form = {"_csrf": token, "code": "000000-000000-000000", "name": "ina", "password": "correct horse 1",
                "confirm": "correct horse 1"}  # fmt: skip
        assert (await c.post("/setup", data={**form, "_csrf": "forged-token-xxxxxxxxxxxx"})).status_code == 403
        r = await c.post("/setup", data=form)
        assert r.status_code == 401 and "not valid" in r.text
        r = await c.post("/setup", data={**form, "code": code, "password": "short", "confirm": "short"})
        assert r.status_code == 400 and "at least 10" in r.text
        r = await c.post("/setup", data={**form, "code": code, "name": "Bad Name!"})
        assert r.status_code == 400 and "lower-case" in r.text
        r = await c.post("/setup", data={**form, "code": code})
        assert r.status_code == 303
        assert (await c.get("/")).status_code == 200
        # the code is used up: gone from `edge status`, refused a second time
        st = (await request(cfg.control.socket, StatusRequest())).result
        assert st is not None and st["installer"]["setup_code"] is None
        async with client(cfg) as other:
            r = await other.get("/setup")
            assert r.status_code == 303 and r.headers["location"] == "/login"
            other.cookies.set("ei_form", "x" * 24)
            r = await other.post("/setup", data={**form, "code": code, "_csrf": "x" * 24})
            assert r.status_code == 401
            # a wrong password is refused; the right one logs in
            token = hidden((await other.get("/login")).text)
            r = await other.post("/login", data={"_csrf": token, "name": "ina", "password": "wrong password"})
            assert r.status_code == 401
            r = await other.post("/login", data={"_csrf": token, "name": "ina", "password": "correct horse 1"})
            assert r.status_code == 303
            page = await other.get("/")
            assert page.status_code == 200
            clock = "trusted" if agent.clock_trusted else "NOT TRUSTED"
            for text in ("edge 0.", "Cloud link", "OFFLINE", "broker link disabled", "version 1", clock,
                         "events not yet sent", "free of", "available of"):  # fmt: skip
                assert text in page.text, text
    actions = [(e.user, e.detail.get("action"), e.detail.get("result")) for e in agent.feed.events
               if e.type == INSTALLER_ACTION]  # fmt: skip
    assert ("ina", "setup", "ok") in actions and ("ina", "login", "refused") in actions
    assert ("ina", "login", "ok") in actions


async def test_pulse_needs_the_installer_role_and_csrf_and_is_refused_in_lockdown(cfg: Config) -> None:
    async with running(cfg) as agent, client(cfg) as c:
        await setup_account(cfg, agent, c)
        doors = await c.get("/doors")
        csrf = hidden(doors.text)
        assert "Pulse Door1" in doors.text
        assert not agent.doors["door1"].relay_energised
        r = await c.post("/doors/door1/pulse", data={"_csrf": "wrong"})
        assert r.status_code == 403
        assert not agent.doors["door1"].relay_energised
        r = await c.post("/doors/door1/pulse", data={"_csrf": csrf})
        assert r.status_code == 200 and "relay pulsed for 3 s" in r.text
        assert agent.doors["door1"].relay_energised  # fail-secure strike: energised = unlocked
        assert (await c.post("/doors/nowhere/pulse", data={"_csrf": csrf})).status_code == 404
        agent.doors["door1"].relock()
        await agent.lockdown(True)
        r = await c.post("/doors/door1/pulse", data={"_csrf": csrf})
        assert r.status_code == 409 and "lockdown" in r.text
        assert not agent.doors["door1"].relay_energised
        await agent.lockdown(False)
        # a viewer sees the doors but may not pulse nor add accounts
        r = await c.post("/accounts", data={"_csrf": csrf, "name": "vic", "role": "viewer", "password": "x"})
        assert r.status_code == 400 and "at least 10" in r.text
        r = await c.post("/accounts", data={"_csrf": csrf, "name": "vic", "role": "admin", "password": "y" * 12})
        assert r.status_code == 400 and "role must be" in r.text
        r = await c.post("/accounts", data={"_csrf": csrf, "name": "vic", "role": "viewer", "password": "y" * 12})
        assert r.status_code == 200 and "Account vic (viewer) added" in r.text
        async with client(cfg) as v:
            token = hidden((await v.get("/login")).text)
            assert (await v.post("/login", data={"_csrf": token, "name": "vic", "password": "y" * 12})).status_code \
                == 303  # fmt: skip
            page = await v.get("/doors")
            assert page.status_code == 200 and "Pulse Door1" not in page.text
            r = await v.post("/doors/door1/pulse", data={"_csrf": hidden(page.text)})
            assert r.status_code == 403 and "installer role" in r.text
            assert not agent.doors["door1"].relay_energised
    pulses = [(e.door, e.user, e.detail.get("result")) for e in agent.feed.events
              if e.type == INSTALLER_ACTION and e.detail.get("action") == "pulse"]  # fmt: skip
    assert pulses[0] == ("door1", "ina", "ok")
    assert pulses[1][0] == "door1" and "lockdown" in str(pulses[1][2])
    assert len(pulses) == 2


async def test_present_a_card_shows_bits_formats_parity_and_the_decision(cfg: Config) -> None:
    async with running(cfg) as agent, client(cfg) as c:
        await setup_account(cfg, agent, c)
        reader = next(iter(agent.readers))
        await tap(agent, reader, 1603, fmt="h10301", facility=118)
        for _ in range(100):
            if agent.feed.reads:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)
        r = await c.get("/fragment/reads")
        assert r.status_code == 200
        assert format(PROXMARK_118_1603, "026b") in r.text  # the bits as sent
        assert 'card <strong class="card">1603</strong>' in r.text and "facility 118" in r.text
        assert "h10301" in r.text and "denied: unknown_card" in r.text
        assert "bit 0 even: ok" in r.text and "bit 25 odd: ok" in r.text
        r = await c.get("/events")
        assert "access.denied" in r.text and "unknown_card" in r.text
        assert "door1.wiegand" in (await c.get("/readers")).text


def test_explain_reports_each_parity_check() -> None:
    table = FormatTable(["h10301"])
    good = explain(PROXMARK_118_1603, 26, table)
    [m] = [m for m in good.matches if m.format == "h10301"]
    assert m.ok and (m.facility, m.card) == (118, 1603) and all(p.ok for p in m.parity)
    bad = explain(PROXMARK_118_1603 ^ 1, 26, table)  # the last (odd parity) bit flipped
    [m] = [m for m in bad.matches if m.format == "h10301"]
    assert not m.ok and [p.ok for p in m.parity] == [True, False]


async def test_config_page_and_the_diagnostics_bundle(cfg: Config) -> None:
    async with running(cfg) as agent, client(cfg) as c:
        await setup_account(cfg, agent, c)
        page = await c.get("/config")
        assert "OK: config parsed" in page.text and "relay" in page.text and ">17<" in page.text  # door1 relay GPIO 17
        r = await c.get("/diagnostics.zip")
        assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
        z = zipfile.ZipFile(io.BytesIO(r.content))
        assert set(z.namelist()) == {"config.json", "status.json", "journal.jsonl", "versions.json", "hardware.json"}
        assert '"gateway": "inst-test"' in z.read("config.json").decode()
        assert "access" in z.read("journal.jsonl").decode() or "installer.action" in z.read("journal.jsonl").decode()


def _lan_address() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.250", 9))  # no packet is sent: the kernel picks the source address of the route
        addr: str = s.getsockname()[0]
    assert not addr.startswith("127."), "this machine has no LAN address"
    return addr


async def test_a_lan_address_is_served_over_https_with_the_fingerprint_of_edge_status(
    tmp_path: Path, sock_dir: Path
) -> None:
    addr = _lan_address()
    cfg = parse_config(config_text(tmp_path / "state", sock_dir / "control.sock", free_port(), listen=addr))
    async with running(cfg) as agent:
        st = (await request(cfg.control.socket, StatusRequest())).result
        assert st is not None
        fp = st["installer"]["fingerprint"]
        assert st["installer"]["url"].startswith("https://")
        pem = (cfg.state_dir / "installer" / "cert.pem").read_bytes()
        assert fp == fingerprint(pem) and re.fullmatch(r"([0-9A-F]{2}:){31}[0-9A-F]{2}", fp)
        ctx = ssl.create_default_context()
        ctx.load_verify_locations(cadata=pem.decode())
        async with httpx.AsyncClient(base_url=f"https://{addr}:{cfg.installer.port}", verify=ctx) as c:
            r = await c.get("/setup")
            assert r.status_code == 200 and "setup code" in r.text
            assert "secure" in r.headers["set-cookie"].lower()
        with pytest.raises(httpx.HTTPError):
            async with httpx.AsyncClient(base_url=f"http://{addr}:{cfg.installer.port}") as plain:
                await plain.get("/setup")
        assert agent.installer.fingerprint == fp
    # the same certificate at the next start
    assert ensure_certificate(cfg.state_dir / "installer", address=addr, name="x")[2] == fp


async def test_accounts_survive_a_restart_and_lock_after_failures(tmp_path: Path) -> None:
    now = [1000.0]
    a = Accounts(tmp_path, session_hours=1, setup_code_hours=1, clock=lambda: now[0])
    a.load()
    code = a.new_setup_code()
    assert code is not None
    await a.use_setup_code(code, "ina", "correct horse 1")
    assert (tmp_path / "accounts.json").stat().st_mode & 0o077 == 0
    assert "correct horse" not in (tmp_path / "accounts.json").read_text()
    b = Accounts(tmp_path, session_hours=1, setup_code_hours=1, clock=lambda: now[0])
    b.load()
    assert b.names == [("ina", "installer")] and b.new_setup_code() is None
    for _ in range(5):
        with pytest.raises(Exception, match="login failed"):
            await b.login("ina", "wrong password")
    with pytest.raises(Exception, match="login failed"):  # locked: even the right password
        await b.login("ina", "correct horse 1")
    now[0] += 31
    value, s = await b.login("ina", "correct horse 1")
    assert b.session(value) == s
    now[0] += 3601
    assert b.session(value) is None
