"""The operator console's pages (issue 15's target: every page's server time p99 <= 100 ms at 100,000 users
and 1,000,000 events), on SQLite and PostgreSQL side by side (JSON lines on stdout; progress on stderr).

    .venv/bin/python bench/console.py [--quick]

Each database is prepared as bench/operator.py does (schema migrated, a site, U users with a card each and E
access events over 30 days, written in bulk; `cloud-bridge serve` in its own process, one uvicorn worker),
plus what the other pages show: 20 doors on one gateway, 2,000 alarms (a tenth open), 20,000 audit entries and
500 visits. Then, logged in as the site's admin (a session cookie, as the browser), each page is fetched R times
in turn (100; 5 with --quick) over one keep-alive connection:

  dashboard, people (first page, a name search, an id search, the next page), a person, doors, events (all,
  by person and window, by door and result, an older page), alarms, reports (the day's requests at a reader,
  and at all readers: the page's default), visitors, import, audit.

The time is the client's, on loopback: the server's time plus a local HTTP exchange; the server's own time
(its `Server-Timing` header: app and GC) is in params (`server_p50`, `server_p99`, the slowest request's
`slowest_server` and `slowest_gc`), so a slow request can be told the server's, the collector's or the machine's.
Figures: `console_page_p99.<db>.<page>` (ms, p50 in params) and `console_page_p99_max.<db>` (the slowest page).
A tap until it shows in the open dashboard's live list is bench/events_stream.py's `tap_to_sse_p99` (the
page's /stream/events and the API's stream are one `events.live`). The machine is shared: read the figures
with `uptime`'s load next to them.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx

from bench.operator import DAY, DOORS, LAST, Served, emit, log, p99, server_figures, server_time, side_by_side
from cloud_bridge.service import schema
from cloud_bridge.service.database import Database
from tests.service_harness import PASSWORD, login


async def extras(url: str, now: float) -> None:
    """What the doors, alarms, audit and visitors pages list, beyond users and events."""
    db = Database(url)
    rnd = random.Random(3)
    try:
        async with db.write() as c:
            await c.execute(schema.gateways.insert().values(id="gw1", online=True, last_seen=now))
            await c.execute(schema.doors.insert(), [{"gateway": "gw1", "id": d, "name": f"Door {d}"} for d in DOORS])
            await c.execute(schema.alarms.insert(), [
                {"gateway": "gw1", "door": rnd.choice(DOORS), "kind": rnd.choice(["forced", "held_open"]),
                 "ts": now - i * 600, "state": "open" if i % 10 == 0 else "acknowledged"}
                for i in range(2000)])  # fmt: skip
            await c.execute(schema.audit_log.insert(), [
                {"ts": now - i * 60, "actor": "root", "via": "session", "address": "127.0.0.1",
                 "action": "user.update", "object_type": "user", "object_id": f"u{i:07d}", "before": "{}",
                 "after": "{}", "outcome": "ok"} for i in range(20_000)])  # fmt: skip
            await c.execute(schema.visits.insert(), [
                {"visitor": f"Visitor {i}", "badge": 900000 + i, "location": "hq", "user_id": f"u{i:07d}",
                 "started": now - i * 3600, "ends": now - i * 3600 + 8 * 3600,
                 "signed_out": None if i < 20 else now - i * 3600 + 7 * 3600} for i in range(500)])  # fmt: skip
    finally:
        await db.close()


def pages(users: int, now: float) -> dict[str, Callable[[random.Random, dict[str, str]], tuple[str, dict[str, Any]]]]:
    day = time.strftime("%Y-%m-%d", time.gmtime(now - 2 * DAY))
    return {
        "dashboard": lambda r, k: ("/", {}),
        "people": lambda r, k: ("/people", {}),
        "people_search_name": lambda r, k: ("/people", {"q": r.choice(LAST)}),
        "people_search_id": lambda r, k: ("/people", {"q": f"u{r.randrange(users // 10):06d}"}),
        "people_next_page": lambda r, k: ("/people", {"cursor": k.get("people", "")}),
        "person": lambda r, k: (f"/people/u{r.randrange(users):07d}", {}),
        "doors": lambda r, k: ("/doors", {}),
        "events": lambda r, k: ("/events", {}),
        "events_by_person": lambda r, k: ("/events", {"user": f"u{r.randrange(users):07d}"}),
        "events_by_door_result": lambda r, k: ("/events", {"door": f"gw1/{r.choice(DOORS)}", "result": "denied"}),
        "events_older_page": lambda r, k: ("/events", {"cursor": k.get("events", "")}),
        "alarms": lambda r, k: ("/alarms", {}),
        "reports_reader_day": lambda r, k: ("/reports", {"day": day, "reader": f"gw1/{r.choice(DOORS)}"}),
        "reports_day": lambda r, k: ("/reports", {"day": day}),
        "visitors": lambda r, k: ("/visitors", {}),
        "import": lambda r, k: ("/import", {}),
        "audit": lambda r, k: ("/audit", {}),
    }


CURSOR = re.compile(r'cursor=([^"&]+)')


async def measure(sv: Served, a: argparse.Namespace) -> None:
    await extras(sv.url, sv.now)
    params = {"db": sv.name, "users": a.users, "events": a.events, "quick": a.quick, "requests": a.requests}
    rnd = random.Random(1)
    worst = 0.0
    async with httpx.AsyncClient(base_url=sv.base, timeout=120) as c:
        await login(c, "root", PASSWORD)
        cursors: dict[str, str] = {}
        for name in ("people", "events"):  # a second page to ask for
            m = CURSOR.search((await c.get(f"/{name}")).text)
            cursors[name] = httpx.QueryParams(f"c={m.group(1)}")["c"] if m else ""
        for page, make in pages(a.users, sv.now).items():
            xs, server = [], []
            for i in range(a.requests + 1):
                path, query = make(rnd, cursors)
                t = time.perf_counter()
                r = await c.get(path, params=query)
                dt = (time.perf_counter() - t) * 1000
                if r.status_code != 200:
                    raise RuntimeError(f"{sv.name} {path} {query}: {r.status_code} {r.text[:300]}")
                if i:  # the first is a warm-up
                    xs.append(dt)
                    server.append(server_time(r))
            worst = max(worst, p99(xs))
            emit(f"console_page_p99.{sv.name}.{page}", p99(xs), "ms", **params, p50=round(statistics.median(xs), 2),
                 **server_figures(xs, server))  # fmt: skip
    emit(f"console_page_p99_max.{sv.name}", worst, "ms", **params)


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2,000 users, 10,000 events, 5 requests a page (< 60 s)")
    ap.add_argument("--users", type=int, help="default: 100,000 (2,000 with --quick)")
    ap.add_argument("--events", type=int, help="default: 1,000,000 (10,000 with --quick)")
    ap.add_argument("--requests", type=int, help="per page (default: 100; 5 with --quick)")
    ap.add_argument("--db", choices=("sqlite", "postgresql", "both"), default="both")
    a = ap.parse_args()
    users, events = (2_000, 10_000) if a.quick else (100_000, 1_000_000)
    a.users, a.events = a.users or users, a.events or events
    a.requests = a.requests or (5 if a.quick else 100)

    async def pages(sv: Served, a: argparse.Namespace) -> None:
        await measure(sv, a)
        log(f"{sv.name}: pages done")

    await side_by_side(a, "bench-console-", pages)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
