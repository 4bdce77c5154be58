"""The operator service's list endpoints and concurrent clients, on SQLite and PostgreSQL side by side
(JSON lines on stdout; progress on stderr).

    .venv/bin/python bench/operator.py [--quick]

For each database (an SQLite file; a throw-away PostgreSQL cluster, tests/postgres.py) the service's schema
is migrated, a site created, U users (100,000; 5,000 with --quick) and E events (1,000,000; 20,000 with
--quick) written through the data layer (events as the collector stores them, `events._event_row`), then
`cloud-bridge serve` runs in its own process (uvicorn, one worker) and an API token makes the requests:

  * users_search_p99 / users_page_p99: GET /api/v1/users?search=<name part> (limit 50) and a cursor page;
  * events_filter_p99: GET /api/v1/events filtered by user and a 7-day window, and by door and result;
  * report_day_p99 / report_all_readers_day_p99: GET /api/v1/reports/access-requests for one day at one
    reader / at all readers, a page of 100 rows (`limit`) with the whole day's totals;
  * report_day_whole_p99: one reader's whole day in one answer (about 1,700 rows at full size; not part of
    the concurrent mix);
  * concurrent_p99 / concurrent_errors / concurrent_rps: C clients (100) for S seconds (60; 10 with --quick),
    each making those requests in turn with its own connection (each client's first request, which makes its
    connection, is not counted); an error is any answer other than 200 or a
    failed request (the target is 0).

Each latency figure is over R sequential requests (200; 20 with --quick), from a client in this process
(the server in another): the time includes HTTP on loopback; the server's own time (its `Server-Timing`
header, app and GC) is in params (`server_p50`, `server_p99`, `slowest_server`, `slowest_gc`). The machine
is shared: read the figures with `uptime`'s load next to them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx

from cloud_bridge.service import schema
from cloud_bridge.service.app import init_site
from cloud_bridge.service.database import Database
from cloud_bridge.service.events import _event_row
from edge.events import Event
from tests.mosquitto import free_port
from tests.postgres import Postgres
from tests.service_harness import PASSWORD, config, login

ROOT = Path(__file__).resolve().parent.parent
FIRST = ["Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "Ken", "Margaret", "Niklaus"]
LAST = ["Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "Allen", "Thompson", "Hamilton", "Wirth"]
DOORS = [f"d{i:02d}" for i in range(20)]
DAY = 86400.0


def emit(metric: str, value: float, unit: str, **params: Any) -> None:
    print(json.dumps({"metric": metric, "value": round(value, 3), "unit": unit, "params": params}), flush=True)


T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:5.1f} s] {msg}", file=sys.stderr, flush=True)


def p99(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[98] if len(xs) > 1 else xs[0]


async def fill(url: str, users: int, events: int, now: float) -> None:
    """U users (one card each) and E access events over the last 30 days, in chunks."""
    db = Database(url)
    rnd = random.Random(7)
    try:
        chunk = 5000
        for start in range(0, users, chunk):
            rows = [
                {
                    "id": f"u{i:07d}",
                    "name": f"{rnd.choice(FIRST)} {rnd.choice(LAST)} {i}",
                    "active": True,
                    "offline_access": False,
                    "kind": "user",
                }
                for i in range(start, min(users, start + chunk))
            ]
            cards = [{"card": 100000 + i, "user_id": f"u{i:07d}", "status": "active", "format": "h10301"}
                     for i in range(start, min(users, start + chunk))]  # fmt: skip
            async with db.write() as c:
                await c.execute(schema.users.insert(), rows)
                await c.execute(schema.credentials.insert(), cards)
        chunk = 10000
        for start in range(0, events, chunk):
            batch = []
            for seq in range(start + 1, min(events, start + chunk) + 1):
                ts = now - 30 * DAY + (seq / events) * 30 * DAY
                uid = rnd.randrange(users)
                granted = rnd.random() < 0.9
                e = Event(
                    id=f"{seq:032x}",
                    seq=seq,
                    type="access.granted" if granted else "access.denied",
                    ts=ts,
                    local="",
                    link_up=True,
                    door=rnd.choice(DOORS),
                    reader="r",
                    card=100000 + uid,
                    user=f"u{uid:07d}",
                    reason="granted" if granted else "no_group_for_door",
                )
                batch.append(_event_row("gw1", e))
            async with db.write() as c:
                await c.execute(schema.events.insert(), batch)
            if start and start % 200_000 == 0:
                log(f"  {start:,} events")
    finally:
        await db.close()


#: (app, gc) ms of each timed request's `Server-Timing` header, in order (cleared per figure by `measure`)
SERVER: list[tuple[float, float]] = []
TIMING = re.compile(r"(\w+);dur=([0-9.]+)")


def server_time(r: httpx.Response) -> tuple[float, float]:
    """The service's own time and the GC's part of it (ms) from the response's Server-Timing header."""
    d = {k: float(v) for k, v in TIMING.findall(r.headers.get("server-timing", ""))}
    return d.get("app", float("nan")), d.get("gc", float("nan"))


def server_figures(xs: list[float], server: list[tuple[float, float]]) -> dict[str, float]:
    """Params beside a client-side figure: the server's p50/p99, and the slowest request's server and GC time."""
    app = [s[0] for s in server]
    worst = max(range(len(xs)), key=xs.__getitem__)
    return {"server_p50": round(statistics.median(app), 2), "server_p99": round(p99(app), 2),
            "slowest_client": round(xs[worst], 2), "slowest_server": server[worst][0],
            "slowest_gc": server[worst][1], "gc_total": round(sum(s[1] for s in server), 2)}  # fmt: skip


async def timed(client: httpx.AsyncClient, path: str, params: dict[str, Any]) -> float:
    t = time.perf_counter()
    r = await client.get(path, params=params)
    dt = (time.perf_counter() - t) * 1000
    if r.status_code != 200:
        raise RuntimeError(f"{path} {params}: {r.status_code} {r.text[:300]}")
    SERVER.append(server_time(r))
    return dt


def requests(users: int, now: float) -> list[Callable[[httpx.AsyncClient, random.Random], Awaitable[float]]]:
    def search(c: httpx.AsyncClient, rnd: random.Random) -> Awaitable[float]:
        return timed(c, "/api/v1/users", {"search": rnd.choice(LAST), "limit": 50})

    def page(c: httpx.AsyncClient, rnd: random.Random) -> Awaitable[float]:
        return timed(c, "/api/v1/users", {"search": f"u{rnd.randrange(users // 10):06d}", "limit": 50})

    def by_user(c: httpx.AsyncClient, rnd: random.Random) -> Awaitable[float]:
        return timed(c, "/api/v1/events", {"user": f"u{rnd.randrange(users):07d}", "since": now - 7 * DAY,
                                           "until": now, "limit": 50})  # fmt: skip

    def by_door(c: httpx.AsyncClient, rnd: random.Random) -> Awaitable[float]:
        return timed(c, "/api/v1/events", {"door": f"gw1/{rnd.choice(DOORS)}", "result": "denied", "limit": 50})

    def report(c: httpx.AsyncClient, rnd: random.Random) -> Awaitable[float]:
        day = time.strftime("%Y-%m-%d", time.gmtime(now - rnd.randrange(1, 29) * DAY))
        return timed(c, "/api/v1/reports/access-requests", {"day": day, "reader": f"gw1/{rnd.choice(DOORS)}",
                                                            "limit": 100})  # fmt: skip

    def report_all(c: httpx.AsyncClient, rnd: random.Random) -> Awaitable[float]:
        day = time.strftime("%Y-%m-%d", time.gmtime(now - rnd.randrange(1, 29) * DAY))
        return timed(c, "/api/v1/reports/access-requests", {"day": day, "limit": 100})

    return [search, page, by_user, by_door, report, report_all]


def whole_report(now: float) -> Callable[[httpx.AsyncClient, random.Random], Awaitable[float]]:
    """One reader's whole day unpaged (about 1,700 rows at full size): the old report_day_p99, for comparison."""

    def report(c: httpx.AsyncClient, rnd: random.Random) -> Awaitable[float]:
        day = time.strftime("%Y-%m-%d", time.gmtime(now - rnd.randrange(1, 29) * DAY))
        return timed(c, "/api/v1/reports/access-requests", {"day": day, "reader": f"gw1/{rnd.choice(DOORS)}"})

    return report


NAMES = ["users_search_p99", "users_page_p99", "events_filter_user_p99", "events_filter_door_p99", "report_day_p99",
         "report_all_readers_day_p99"]  # fmt: skip


@dataclass
class Served:
    name: str
    base: str
    token: str
    proc: asyncio.subprocess.Process
    now: float
    url: str = ""


_MIGRATING = asyncio.Lock()


async def _answers(base: str, proc: asyncio.subprocess.Process) -> bool:
    """Whether the server answers (False: it stopped, e.g. its port was taken meanwhile)."""
    async with httpx.AsyncClient(base_url=base, timeout=60) as s:
        for _ in range(3000):
            with contextlib.suppress(httpx.TransportError):
                if (await s.get("/login")).status_code == 200:
                    return True
            if proc.returncode is not None:
                return False
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{base}: no answer in 5 minutes")


async def prepare(name: str, url: str | Callable[[], str], tmp: Path, a: argparse.Namespace) -> Served:
    """The database filled and `cloud-bridge serve` answering on it, with an API token."""
    if callable(url):
        url = await asyncio.to_thread(url)  # e.g. start a PostgreSQL cluster and make a database
    now = time.time()
    cfg = config(url, tmp)
    async with _MIGRATING:  # Alembic's context is process-global: one migration at a time
        link = await init_site(cfg, site_id="bench", admin="root", tz="UTC", host="127.0.0.1", port=free_port())
    t = time.perf_counter()
    await fill(url, a.users, a.events, now)
    log(f"{name}: {a.users:,} users and {a.events:,} events written in {time.perf_counter() - t:.1f} s")
    # no passphrase: provisioning and the collector are off, the API alone is measured
    env = {k: v for k, v in os.environ.items() if k != "CLOUD_BRIDGE_PASSPHRASE"}
    env["PYTHONPATH"] = str(ROOT)
    for attempt in range(5):  # a free port may be taken before the server binds it (the other side's clients)
        port = free_port()
        toml = tmp / "service.toml"
        toml.write_text(f"""
[service]
port = {port}
[database]
url = "{url}"
[auth]
argon2_time_cost = 1
argon2_memory_kib = 8192
argon2_parallelism = 1
[mqtt]
workspace = "{tmp / "link.db"}"
""")
        with (tmp / "serve.log").open("wb") as errlog:
            proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "cloud_bridge.cli", "serve", str(toml),
                                                        env=env, stdout=subprocess.DEVNULL, stderr=errlog)  # fmt: skip
        if await _answers(f"http://127.0.0.1:{port}", proc):
            break
        if attempt == 4:
            raise RuntimeError(f"{name}: cloud-bridge serve stopped: {(tmp / 'serve.log').read_text()[-2000:]}")
    base = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=base, timeout=60) as s:
        r = await s.post("/api/v1/auth/setup", json={"code": link.partition("#")[2], "password": PASSWORD})
        assert r.status_code == 200, r.text
        await login(s, "root", PASSWORD)
        token = (await s.post("/api/v1/tokens", json={"name": "bench", "expires_days": 1})).json()["token"]
    log(f"{name}: the service answers")
    return Served(name, base, token, proc, now, url)


async def stop(proc: asyncio.subprocess.Process) -> None:
    proc.terminate()
    try:
        await asyncio.wait_for(proc.wait(), 5)
    except TimeoutError:
        proc.kill()
        await proc.wait()


async def measure(sv: Served, a: argparse.Namespace) -> None:
    name, base, now = sv.name, sv.base, sv.now
    headers = {"authorization": f"Bearer {sv.token}"}
    params = {"db": name, "users": a.users, "events": a.events, "quick": a.quick}
    reqs = requests(a.users, now)
    rnd = random.Random(1)
    async with httpx.AsyncClient(base_url=base, timeout=60, headers=headers) as c:
        for metric, req in [*zip(NAMES, reqs, strict=True), ("report_day_whole_p99", whole_report(now))]:
            await req(c, rnd)  # warm
            SERVER.clear()
            xs = [await req(c, rnd) for _ in range(a.requests)]
            emit(metric, p99(xs), "ms", **params, requests=a.requests, p50=round(statistics.median(xs), 2),
                 **server_figures(xs, SERVER))  # fmt: skip
    log(f"{name}: sequential requests done; {a.clients} clients for {a.seconds:g} s")
    lat: list[float] = []
    errors = 0
    ready = asyncio.Barrier(a.clients + 1)
    end = 0.0

    async def client(i: int) -> None:
        nonlocal errors
        r2 = random.Random(i)
        async with httpx.AsyncClient(base_url=base, timeout=60, headers=headers,
                                     limits=httpx.Limits(max_connections=1)) as c:  # fmt: skip
            await c.get("/api/v1/auth/me")  # its connection made, not timed
            await ready.wait()
            k = i
            while time.perf_counter() < end:
                try:
                    lat.append(await reqs[k % len(reqs)](c, r2))
                except (RuntimeError, httpx.HTTPError) as e:
                    errors += 1
                    if errors <= 3:
                        log(f"{name}: error {e}")
                k += 1

    tasks = [asyncio.create_task(client(i)) for i in range(a.clients)]
    await ready.wait()
    t = time.perf_counter()
    end = t + a.seconds
    await asyncio.gather(*tasks)
    took = time.perf_counter() - t
    cparams = {**params, "clients": a.clients, "seconds": a.seconds, "requests": len(lat)}
    emit("concurrent_p99", p99(lat) if lat else 0.0, "ms", **cparams, p50=round(statistics.median(lat), 2))
    emit("concurrent_errors", errors, "count", **cparams)
    emit("concurrent_rps", len(lat) / took, "1/s", **cparams)


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller data and a 10 s concurrent run (< 60 s)")
    ap.add_argument("--clients", type=int, default=100, help="concurrent clients (default: %(default)s)")
    ap.add_argument("--seconds", type=float, help="of the concurrent run (default: 60, 10 with --quick)")
    ap.add_argument("--users", type=int, help="default: 100,000 (5,000 with --quick)")
    ap.add_argument("--events", type=int, help="default: 1,000,000 (20,000 with --quick)")
    ap.add_argument("--db", choices=("sqlite", "postgresql", "both"), default="both")
    a = ap.parse_args()
    users, events = (5_000, 20_000) if a.quick else (100_000, 1_000_000)
    a.users, a.events = a.users or users, a.events or events
    a.seconds, a.requests = (a.seconds or (10.0 if a.quick else 60.0)), (20 if a.quick else 200)
    await side_by_side(a, "bench-op-", measure)
    return 0


async def side_by_side(
    a: argparse.Namespace, prefix: str, measure: Callable[[Served, argparse.Namespace], Awaitable[None]]
) -> None:
    """Each database of `a.db` prepared side by side (SQLite in a temporary folder, PostgreSQL as a throw-away
    cluster) and served (`prepare`), then `measure`d one after the other; every server and cluster stopped
    afterwards, whatever happened. bench/console.py uses it too."""
    pgs: list[Postgres] = []

    def pg_database() -> str:
        pg = Postgres()  # its port chosen now, right before it binds it (not raced by the other's free ports)
        pgs.append(pg)
        pg.start()
        return pg.create_database("bench")

    served: list[Served] = []
    try:
        with tempfile.TemporaryDirectory(prefix=prefix) as d:
            names = ("sqlite", "postgresql") if a.db == "both" else (a.db,)
            prep = []
            for name in names:
                tmp = Path(d) / name
                tmp.mkdir()
                # the cluster started before anything else picks ports (its port is free now, not later)
                url = f"sqlite+aiosqlite:///{tmp / 'site.db'}" if name == "sqlite" else pg_database()
                prep.append(prepare(name, url, tmp, a))
            for r in await asyncio.gather(*prep, return_exceptions=True):
                if isinstance(r, BaseException):
                    raise r
                served.append(r)
            for sv in served:
                await measure(sv, a)
    finally:
        for sv in served:
            await stop(sv.proc)
        for pg in pgs:
            pg.stop()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
