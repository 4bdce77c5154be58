"""`cloud-bridge demo` (the README's first command) as a person runs it: a subprocess that starts Mosquitto, the
operator service and the simulated gateway on loopback, prints the console URL and the one-time setup link,
publishes what it seeded (the gateway acknowledges), taps the scripted cards, and stops everything on Ctrl-C
(SIGINT) or after the taps: no process left, every port free again."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from cloud_bridge.service import schema
from cloud_bridge.service.database import Database
from cloud_bridge.service.demo import DEMO_TAPS, GATEWAY
from edge.journal import Journal

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(240)


@dataclass
class Run:
    proc: asyncio.subprocess.Process
    dir: Path
    lines: list[str] = field(default_factory=list)

    async def until(self, pattern: str, timeout: float = 120) -> re.Match[str]:
        """Read the demo's output until a line matches `pattern`."""
        for line in self.lines:
            if m := re.search(pattern, line):
                return m
        assert self.proc.stdout is not None
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.proc.stdout.readline()
                if not raw:
                    raise AssertionError(f"the demo ended before {pattern!r}:\n" + "\n".join(self.lines))
                line = raw.decode().rstrip("\n")
                self.lines.append(line)
                if m := re.search(pattern, line):
                    return m

    async def rest(self) -> str:
        assert self.proc.stdout is not None
        out = (await self.proc.stdout.read()).decode()
        self.lines += out.splitlines()
        return "\n".join(self.lines)


@asynccontextmanager
async def demo(tmp_path: Path, *args: str) -> AsyncIterator[Run]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("CLOUD_BRIDGE_PASSPHRASE", None)
    d = tmp_path / "var" / "demo"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cloud_bridge.cli", "demo", "--dir", str(d), *args, cwd=tmp_path, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)  # fmt: skip
    run = Run(proc, d)
    try:
        yield run
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def processes_using(d: Path) -> list[str]:
    """Every process whose command line names a file in the demo folder (the three children do)."""
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(d) in cmd and "cloud_bridge.cli demo" not in cmd:
            out.append(f"{p.name}: {cmd}")
    return out


def service_passphrase(d: Path) -> str:
    """CLOUD_BRIDGE_PASSPHRASE from the running `cloud-bridge serve` child's environment."""
    for line in processes_using(d):
        pid, _, cmd = line.partition(": ")
        if " serve " in cmd:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            return next(e for e in env if e.startswith(b"CLOUD_BRIDGE_PASSPHRASE=")).split(b"=", 1)[1].decode()
    raise AssertionError(f"no cloud-bridge serve among {processes_using(d)}")


def port_free(port: int) -> bool:
    """Nothing listens on the port, and a server can bind it again (SO_REUSEADDR, as Mosquitto and uvicorn
    bind: the closed connections' TIME_WAIT entries do not count)."""
    with socket.socket() as c:
        if c.connect_ex(("127.0.0.1", port)) == 0:
            return False
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


async def journal_decisions(state: Path) -> dict[int, str]:
    """Every decision of the run: those the service stored (and so acknowledged: the gateway deleted them)
    and those still in the gateway's journal (not acknowledged yet); none lost."""
    async with Journal(state / "journal.db") as j:
        events = await j.read(0, 10_000)
    out = {e.card: e.type for e in events if e.card is not None and e.type.startswith("access.")}
    db = Database(f"sqlite+aiosqlite:///{state.parent / 'site.db'}")
    try:
        async with db.read() as c:
            rows = (await c.execute(select(schema.events.c.card, schema.events.c.type))).all()
    finally:
        await db.close()
    out |= {int(card): t for card, t in rows if card is not None and t.startswith("access.")}
    return out


def expected_decisions() -> dict[int, str]:
    return {t.card: "access.granted" if t.granted else "access.denied" for t in DEMO_TAPS}


async def test_demo_runs_the_whole_product_and_ctrl_c_stops_it(tmp_path: Path) -> None:
    async with demo(tmp_path) as run:
        broker_port = int((await run.until(r"mosquitto on 127\.0\.0\.1:(\d+)"))[1])
        url = (await run.until(r"Console: +(http://127\.0\.0\.1:\d+)/login"))[1]
        setup = (await run.until(r"(http://127\.0\.0\.1:\d+/setup#\S+)"))[1]
        version = int((await run.until(rf"gateway {GATEWAY} acknowledged rights version (\d+)"))[1])
        await run.until(r"tap a card|Tap a card")
        await run.until(r"sim tap --door door1 --card 1001")
        await run.until(r"Plain MQTT on 127\.0\.0\.1 only")
        await run.until("scripted taps done, each as expected")
        await run.until("running; Ctrl-C stops everything")
        http_port = int(url.rsplit(":", 1)[1])

        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            assert (await client.get("/login")).status_code == 200
            # the printed link is the designed first login: set the password with its code, then log in
            r = await client.post("/api/v1/auth/setup", json={"code": setup.partition("#")[2],
                                                              "password": "the demo's first password"})  # fmt: skip
            assert r.status_code == 200, r.text
            r = await client.post("/api/v1/auth/login", json={"operator": "admin",
                                                              "password": "the demo's first password"})  # fmt: skip
            assert r.status_code == 200, r.text
            client.headers["cookie"] = "cb_session=" + r.headers["set-cookie"].split(";")[0].split("=", 1)[1]
            gw = (await client.get(f"/api/v1/gateways/{GATEWAY}")).json()
            assert gw["online"] and gw["acked"] == version == gw["version"], gw

        # the gateway itself holds the published version
        status = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "edge.cli", "--config", str(run.dir / "gateway.toml"), "status", "--json",
            stdout=asyncio.subprocess.PIPE, env=dict(os.environ, PYTHONPATH=str(ROOT)))  # fmt: skip
        out, _ = await status.communicate()
        assert status.returncode == 0
        assert json.loads(out)["rights_version"] == version

        # no secret in plain text on disk: the site key's passphrase is only in the service's environment
        passphrase = service_passphrase(run.dir)
        assert len(passphrase) >= 32
        for f in run.dir.rglob("*"):
            if f.is_file():
                assert passphrase.encode() not in f.read_bytes(), f

        run.proc.send_signal(signal.SIGINT)  # Ctrl-C
        async with asyncio.timeout(60):
            code = await run.proc.wait()
        text = await run.rest()
        assert code == 0, text
        stops = [line for line in run.lines if line.startswith("demo: stopped ")]
        assert [s.split(" (")[0] for s in stops] == ["demo: stopped gateway", "demo: stopped operator service",
                                                     "demo: stopped mosquitto"], text  # fmt: skip
        assert "demo: everything stopped" in text
    assert processes_using(run.dir) == []
    assert port_free(broker_port) and port_free(http_port)
    assert await journal_decisions(run.dir / "gateway") == expected_decisions()


async def test_demo_exit_after_taps_stops_everything_and_starts_fresh(tmp_path: Path) -> None:
    for _ in range(2):  # the second run wipes the first run's site: a fresh site key and setup link each time
        async with demo(tmp_path, "--exit-after-taps") as run:
            async with asyncio.timeout(180):
                code = await run.proc.wait()
            text = await run.rest()
        assert code == 0, text
        assert "scripted taps done, each as expected" in text
        assert processes_using(run.dir) == []
        assert await journal_decisions(run.dir / "gateway") == expected_decisions()
        for port in re.findall(r"127\.0\.0\.1:(\d+)", text):
            assert port_free(int(port))


async def test_demo_refuses_to_wipe_a_folder_it_did_not_make(tmp_path: Path) -> None:
    d = tmp_path / "var" / "demo"
    d.mkdir(parents=True)
    (d / "precious.txt").write_text("keep me")
    async with demo(tmp_path, "--exit-after-taps") as run:
        code = await run.proc.wait()
        text = await run.rest()
    assert code == 1
    assert "not a demo folder" in text
    assert (d / "precious.txt").read_text() == "keep me"
