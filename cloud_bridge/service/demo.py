"""`cloud-bridge demo`: the whole product on one machine, on loopback only (docs/operator.md, "The demo").

One supervisor (this module) starts, each as a subprocess in its own process group and in this order:

1. Mosquitto on a free 127.0.0.1 port (`broker.Broker`: generated config, plain MQTT, no persistence);
2. the operator service, `cloud-bridge serve` on a generated `service.toml`, after `serve --init` created a
   fresh demo site (a new Ed25519 site key, the administrator `admin` with a one-time setup link);
3. the simulated gateway, `edge run` on a generated `gateway.toml` (hardware "sim", linked to that broker,
   `link.command_key` = the demo site's public key, no demo provisioning of its own).

Then it seeds the site as `edge/sim/demo.py` seeds a gateway (the same people, cards and outcomes), through
the service's API with a short-lived API token (and through the data layer for what the API has no route for
yet: a schedule, an assignment's end), waits for the gateway's birth, puts groups on the doors it announced,
publishes (signed with the site key; the gateway acknowledges), and taps the scripted cards through
`edge sim tap`. Ctrl-C or SIGTERM stops the children in the reverse order (SIGTERM, then kill after 10 s).

Everything lives in one folder (var/demo/), wiped at each start. The site key's passphrase is made for the run
and given only to the service's processes in their environment: it is never written to disk.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import msgspec
from sqlalchemy import update

from cloud_bridge.signing import public_bytes
from edge.model import Interval, Schedule

from . import audit, auth, schema, site
from .broker import Broker, die_with_parent, free_port, stop_process, wait_listening
from .database import Database
from .errors import ServiceError

SITE, GATEWAY, ADMIN, TZ = "demo", "sim-1", "admin", "Europe/Berlin"
#: The file that marks a folder as the demo's own (only such a folder, or an empty one, is wiped).
MARKER = ".cloud-bridge-demo"
ACTOR = "local administrator"


@dataclass(frozen=True)
class DemoTap:
    card: int
    user: str | None
    granted: bool
    why: str


#: The taps of edge/sim/demo.py (DEMO_CARDS), at the gateway's first door, and what each must give.
DEMO_TAPS = (
    DemoTap(1001, "alice", True, "Alice: staff, around the clock"),
    DemoTap(1002, "bob", True, "Bob: offline access, every door"),
    DemoTap(1003, "carol", False, "Carol: access control deactivated"),
    DemoTap(1004, "dave", False, "Dave: card reported lost"),
    DemoTap(1005, "erin", False, "Erin: entitlement ended yesterday"),
    DemoTap(4242, None, False, "an unknown card"),
)


def say(text: str = "") -> None:
    print(text, flush=True)


def _shown(p: Path) -> str:
    """`p` relative to the working directory when it is below it (what a person types), else absolute."""
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return str(p)


def _tool(name: str) -> str:
    """How to call one of our commands from this shell: the script beside this Python (.venv/bin/NAME)."""
    exe = Path(sys.executable).parent / name
    return _shown(exe.absolute()) if exe.exists() else name


def _prepare(root: Path) -> None:
    """Wipe the demo folder: only one this command made (it holds MARKER) or an empty one."""
    if root.exists():
        if not (root / MARKER).exists() and any(root.iterdir()):
            raise ServiceError(f"{root}: not empty and not a demo folder (no {MARKER}); not wiping it")
        shutil.rmtree(root)
    root.mkdir(parents=True)
    root.chmod(0o700)
    (root / MARKER).write_text("made by `cloud-bridge demo`; wiped at its next start\n")


@dataclass
class Child:
    name: str
    proc: asyncio.subprocess.Process
    log: Path


@dataclass
class Supervisor:
    """The demo's processes, stopped in the reverse order of their start."""

    children: list[Child] = field(default_factory=list)

    async def start(self, name: str, argv: Sequence[str], *, log: Path, env: dict[str, str]) -> Child:
        with log.open("ab") as logf:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=logf, stderr=asyncio.subprocess.STDOUT, env=env,
                process_group=0, preexec_fn=die_with_parent)  # fmt: skip
        child = Child(name, proc, log)
        self.children.append(child)
        return child

    async def stop_all(self) -> None:
        while self.children:
            c = self.children.pop()
            code = await stop_process(c.proc)
            how = f"ended by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
            say(f"demo: stopped {c.name} ({how})")


async def _capture(argv: Sequence[str], env: dict[str, str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


def service_toml(root: Path, http_port: int, broker_port: int) -> str:
    return f"""\
# Made by `cloud-bridge demo` for this run (the folder is wiped at the next start). No passphrase here: the
# demo gives it to the service in CLOUD_BRIDGE_PASSPHRASE.
[service]
listen = "127.0.0.1"
port = {http_port}
public_url = "http://127.0.0.1:{http_port}"
[database]
url = "sqlite+aiosqlite:///{root / 'site.db'}"
[mqtt]
host = "127.0.0.1"
port = {broker_port}
workspace = "{root / 'link.db'}"
resend_s = 2.0
"""


def gateway_toml(root: Path, broker_port: int, command_key: str) -> str:
    return f"""\
# Made by `cloud-bridge demo` for this run: the simulated two-door gateway, provisioned by the demo's
# operator service (no demo provisioning of its own), on the demo's broker.
hardware = "sim"
[site]
id = "{SITE}"
gateway = "{GATEWAY}"
timezone = "{TZ}"
[policy]
clock_source = "system"
[storage]
state_dir = "{root / 'gateway'}"
[control]
socket = "{root / 'gateway' / 'control.sock'}"
[link]
host = "127.0.0.1"
port = {broker_port}
backoff_min_s = 0.2
backoff_max_s = 2.0
command_key = "{command_key}"
"""


@dataclass
class Demo:
    root: Path
    exit_after_taps: bool = False
    taps: bool = True
    sup: Supervisor = field(default_factory=Supervisor)
    passphrase: str = field(default_factory=lambda: secrets.token_urlsafe(32), repr=False)
    url: str = ""
    setup_link: str = ""
    #: Set when every scripted tap gave what it should.
    taps_ok: bool = False

    @property
    def db_url(self) -> str:
        return f"sqlite+aiosqlite:///{self.root / 'site.db'}"

    def env(self, *, secret: bool) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("CLOUD_BRIDGE_PASSPHRASE", "EDGE_CONFIG")}
        env["PYTHONUNBUFFERED"] = "1"
        if secret:
            env["CLOUD_BRIDGE_PASSPHRASE"] = self.passphrase
        return env

    async def run(self) -> int:
        """Start everything, seed, tap; then wait for Ctrl-C/SIGTERM (or exit after the taps)."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        work = asyncio.create_task(self._work(), name="demo")
        stopped = asyncio.create_task(stop.wait(), name="demo.signal")
        code = 0
        try:
            await asyncio.wait({work, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if work.done():
                code = work.result()
            else:
                say("\ndemo: stopping (Ctrl-C / SIGTERM)")
                work.cancel()
                try:
                    await work
                except asyncio.CancelledError:
                    pass
        except (ServiceError, httpx.HTTPError, OSError, TimeoutError) as e:
            say(f"demo: failed: {e or type(e).__name__}")
            code = 1
        finally:
            stopped.cancel()
            await self.sup.stop_all()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
        say("demo: everything stopped")
        return code

    async def _work(self) -> int:
        _prepare(self.root)
        logs = self.root / "logs"
        logs.mkdir()
        broker = Broker(self.root / "broker")
        await broker.__aenter__()  # stopped with the others (the supervisor owns its process)
        assert broker.proc is not None
        self.sup.children.append(Child("mosquitto", broker.proc, broker.log))
        say(f"demo: mosquitto on 127.0.0.1:{broker.port} (plain MQTT, loopback only)")

        http_port = free_port()
        svc_toml = self.root / "service.toml"
        svc_toml.write_text(service_toml(self.root, http_port, broker.port))
        cb = [sys.executable, "-m", "cloud_bridge.cli"]
        rc, out, err = await _capture([*cb, "--json", "serve", str(svc_toml), "--init", "--site", SITE,
                                       "--admin", ADMIN, "--tz", TZ, "--mqtt-host", "127.0.0.1",
                                       "--mqtt-port", str(broker.port)], self.env(secret=True))  # fmt: skip
        if rc != 0:
            raise ServiceError(f"cloud-bridge serve --init failed: {err.strip() or out.strip()}")
        self.setup_link = str(json.loads(out)["setup_link"])
        token_id, token, command_key = await self._prepare_site()

        gw_toml = self.root / "gateway.toml"
        gw_toml.write_text(gateway_toml(self.root, broker.port, command_key))
        svc = await self.sup.start("operator service", [*cb, "serve", str(svc_toml)], log=logs / "service.log",
                                   env=self.env(secret=True))  # fmt: skip
        await wait_listening("127.0.0.1", http_port, svc.proc, what="cloud-bridge serve", log=svc.log, timeout=60)
        self.url = f"http://127.0.0.1:{http_port}"
        say(f"demo: operator service on {self.url} (site {SITE!r}, a fresh site key)")
        gw = await self.sup.start("gateway", [sys.executable, "-m", "edge.cli", "--config", str(gw_toml), "run"],
                                  log=logs / "gateway.log", env=self.env(secret=False))  # fmt: skip
        say(f"demo: simulated gateway {GATEWAY} started (doors from hw/sim.toml)")

        async with httpx.AsyncClient(base_url=self.url, timeout=90,
                                     headers={"authorization": f"Bearer {token}"}) as api:  # fmt: skip
            doors = await self._wait_birth(api, gw)
            version = await self._seed(api, doors)
        await self._revoke(token_id)
        say(f"demo: published: gateway {GATEWAY} acknowledged rights version {version}")
        self._banner(gw_toml, doors[0])

        if self.taps:
            self.taps_ok = await self._tap(gw_toml, doors[0])
            say("demo: scripted taps " + ("done, each as expected" if self.taps_ok else "done: SOME NOT AS EXPECTED"))
        if self.exit_after_taps:
            return 0 if self.taps_ok or not self.taps else 1
        say("demo: running; Ctrl-C stops everything")
        waits = {asyncio.create_task(c.proc.wait(), name=f"wait.{c.name}"): c for c in self.sup.children}
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in waits:
                t.cancel()
        c = waits[next(iter(done))]
        raise ServiceError(f"{c.name} exited on its own ({c.proc.returncode}); see {_shown(c.log)}")

    async def _prepare_site(self) -> tuple[str, str, str]:
        """Through the data layer, before the service runs: the site's public key, an API token for the
        seeding (10 minutes, revoked when done), and the office-hours schedule (no API route for it yet)."""
        db = Database(self.db_url)
        try:
            async with db.write() as c:
                pem = await site.meta(c, "site_key")
                if pem is None:
                    raise ServiceError("the demo site has no signing key")
                command_key = public_bytes(site.decrypt_key(pem, self.passphrase)).hex()
                op = await auth.load_operator(c, ADMIN)
                assert op is not None
                tid, token = await auth.new_token(c, op, name="cloud-bridge demo: seeding", groups=list(op.groups),
                                                  expires=time.time() + 600)  # fmt: skip
                await audit.record(c, ACTOR, "token.create", "token", tid, after={"name": "cloud-bridge demo"},
                                   via="local")  # fmt: skip
                office = Schedule(id="office", name="Office hours",
                                  intervals=[Interval(day=d, start="07:00", end="19:00") for d in range(5)])
                await c.execute(schema.schedules.insert().values(id=office.id, body=msgspec.msgpack.encode(office)))
                await audit.record(c, ACTOR, "schedule.create", "schedule", office.id, after=office, via="local")
        finally:
            await db.close()
        return tid, token, command_key

    async def _wait_birth(self, api: httpx.AsyncClient, gw: Child) -> list[str]:
        """Until the service has the gateway online with its doors (its birth); the doors, sorted."""
        async with asyncio.timeout(60):
            while True:
                if gw.proc.returncode is not None:
                    raise ServiceError(f"the gateway exited ({gw.proc.returncode}); see {_shown(gw.log)}")
                r = await api.get(f"/api/v1/gateways/{GATEWAY}")
                if r.status_code == 200 and r.json()["online"] and r.json()["doors"]:
                    doors = sorted(d["door"] for d in r.json()["doors"])
                    say(f"demo: gateway {GATEWAY} online, doors {', '.join(doors)}")
                    return doors
                await asyncio.sleep(0.3)

    async def _seed(self, api: httpx.AsyncClient, doors: list[str]) -> int:
        """edge/sim/demo.py's site, through the API; publish; the version the gateway acknowledged."""

        def ok(r: httpx.Response) -> Any:
            if r.status_code >= 300:
                raise ServiceError(f"{r.request.method} {r.request.url.path}: {r.status_code} {r.text}")
            return r.json()

        def refs(ds: list[str]) -> list[dict[str, str]]:
            return [{"gateway": GATEWAY, "door": d} for d in ds]

        for gid, name, ds, sched in (("staff", "Staff", doors[:1], None), ("everywhere", "All doors", doors, None),
                                     ("office-hours", "Office hours", doors, "office")):  # fmt: skip
            ok(await api.put(f"/api/v1/groups/{gid}", json={"name": name, "doors": refs(ds), "schedule": sched}))
        people: list[tuple[str, dict[str, Any]]] = [
            ("alice", {"name": "Alice", "groups": ["staff"], "cards": [{"card": 1001}]}),
            ("bob", {"name": "Bob", "offline_access": True, "groups": ["everywhere"], "cards": [{"card": 1002}]}),
            ("carol", {"name": "Carol", "active": False, "groups": ["staff"], "cards": [{"card": 1003}]}),
            ("dave", {"name": "Dave", "groups": ["office-hours"], "cards": [{"card": 1004, "status": "lost"}]}),
            ("erin", {"name": "Erin", "groups": ["staff"], "cards": [{"card": 1005}]}),
        ]
        for uid, body in people:
            ok(await api.put(f"/api/v1/users/{uid}", json=body))
        await self._end_assignment("erin", "staff", datetime.now(UTC) - timedelta(days=1))
        res = ok(await api.post("/api/v1/publish", params={"timeout": 60}))
        v = res["gateways"].get(GATEWAY)
        if not isinstance(v, int) or res["not_sent"]:
            raise ServiceError(f"publish: the gateway did not acknowledge: {res}")
        return v

    async def _end_assignment(self, uid: str, gid: str, until: datetime) -> None:
        """An assignment's end (no API route for assignment windows yet): through the data layer."""
        db = Database(self.db_url)
        try:
            async with db.write() as c:
                a = schema.assignments
                await c.execute(update(a).where(a.c.user_id == uid, a.c.group_id == gid)
                                .values(valid_until=until.timestamp()))  # fmt: skip
                await audit.record(c, ACTOR, "assignment.update", "user", uid,
                                   after={"group": gid, "valid_until": until.timestamp()}, via="local")  # fmt: skip
        finally:
            await db.close()

    async def _revoke(self, tid: str) -> None:
        db = Database(self.db_url)
        try:
            async with db.write() as c:
                t = schema.api_tokens
                await c.execute(update(t).where(t.c.id == tid).values(revoked=time.time()))
                await audit.record(c, ACTOR, "token.revoke", "token", tid, via="local")
        finally:
            await db.close()

    def _banner(self, gw_toml: Path, door: str) -> None:
        edge = f"{_tool('edge')} --config {_shown(gw_toml)}"
        say("")
        say("=" * 78)
        say(f"  Console:     {self.url}/login")
        say(f"  First login: open this one-time setup link and choose the password of operator {ADMIN!r}")
        say("               (no default password; the link works once, for 24 h):")
        say(f"               {self.setup_link}")
        say("  Tap a card from another terminal:")
        say(f"               {edge} sim tap --door {door} --card 1001")
        say(f"               {edge} status")
        say("  Plain MQTT on 127.0.0.1 only (no TLS, anonymous): a demo, not a deployment.")
        say(f"  Logs and state: {_shown(self.root)}/ (wiped at the next start). Ctrl-C stops everything.")
        say("=" * 78)
        say("")

    async def _tap(self, gw_toml: Path, door: str) -> bool:
        """The scripted taps through `edge sim tap` (Wiegand bit trains on the simulated reader)."""
        say(f"demo: tapping {len(DEMO_TAPS)} cards at {door}")
        all_ok = True
        for t in DEMO_TAPS:
            rc, out, err = await _capture([sys.executable, "-m", "edge.cli", "--config", str(gw_toml), "sim", "tap",
                                           "--door", door, "--card", str(t.card)], self.env(secret=False))  # fmt: skip
            decisions = json.loads(out)["decisions"] if rc == 0 else []
            if not decisions:
                say(f"  card {t.card}: no decision ({err.strip() or out.strip()})")
                all_ok = False
                continue
            d = decisions[-1]
            good = bool(d["granted"]) == t.granted
            all_ok &= good
            say(f"  card {t.card}: {'granted' if d['granted'] else 'denied'} ({d['reason']}); expected "
                f"{'granted' if t.granted else 'denied'}: {t.why}{'' if good else '  <-- NOT AS EXPECTED'}")
            await asyncio.sleep(0.3)
        return all_ok


def main(root: Path, *, exit_after_taps: bool = False, taps: bool = True) -> int:
    return asyncio.run(Demo(root.absolute(), exit_after_taps=exit_after_taps, taps=taps).run())
