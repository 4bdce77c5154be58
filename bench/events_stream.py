"""Events through the operator service, SQLite and PostgreSQL side by side (issue 14's targets):

  * tap_to_sse_p99.<db>: a tap at the simulated gateway (Wiegand bits on mock pins, the real agent) until the
    event arrives on an open /api/v1/events/stream (SSE) of the running service (uvicorn, real HTTP), through
    a real Mosquitto and the service's collector; measured from the gateway's decision (the relay moves in
    the same loop step) to the SSE line read by the client. N taps (40; 10 with --quick), one at a time.
  * events_list_p99.<db>: GET /api/v1/events with a door + result filter and with none, over a table of E
    stored events (100,000; 10,000 with --quick), first page and one cursor page deeper.

Everything runs in one process and one event loop (agent, broker client, service, HTTP client), on the
project's 2-core machine: the figures include that contention.

    .venv/bin/python bench/events_stream.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import msgspec

from cloud_bridge.protocol import EventBatch
from cloud_bridge.service.database import Database
from cloud_bridge.service.events import EventService
from edge.events import Event
from tests.mosquitto import Mosquitto
from tests.postgres import Postgres
from tests.service_harness import config, running
from tests.test_operator_e2e import agent_running, tap_card
from tests.test_service_events_e2e import setup_admin, started


def emit(metric: str, value: float, unit: str, **params: Any) -> None:
    print(json.dumps({"metric": metric, "value": round(value, 3), "unit": unit, "params": params}), flush=True)


def p99(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[98] if len(xs) > 1 else xs[0]


async def fill(url: str, n: int) -> None:
    """n events of a second gateway straight into the store (the collector's own write path)."""
    db = Database(url)
    svc = EventService(db)
    t0 = 1_795_425_700.0
    prev = 0
    for start in range(1, n + 1, 1000):
        evs = [Event(id=f"{i:032x}", seq=i, type="access.granted" if i % 3 else "access.denied", ts=t0 + i,
                     local="", link_up=True, door=f"d{i % 10}", card=i, user=f"u{i % 1000}")
               for i in range(start, min(n, start + 999) + 1)]  # fmt: skip
        await svc.store_batch("gwbench", EventBatch(first_seq=evs[0].seq, last_seq=evs[-1].seq, events=evs,
                                                    prev_seq=prev))  # fmt: skip
        prev = evs[-1].seq
    await db.close()


async def one(kind: str, url: str, taps: int, events: int, work: Path, broker: Mosquitto) -> None:
    cfg = config(url, work)
    pub = await started(url, cfg, broker)
    await fill(url, events)
    async with (
        running(cfg, provisioning=True, init=False) as svc,
        agent_running(broker, work / "gw", work / "c.sock", pub) as agent,
    ):
        client = await setup_admin(url, svc)
        arrived: dict[int, float] = {}
        ready = asyncio.Event()

        async def read() -> None:
            async with client.stream("GET", "/api/v1/events/stream", params={"kind": "access.*"}) as r:
                async for line in r.aiter_lines():
                    if line.startswith(":"):
                        ready.set()
                    elif line.startswith("data:"):
                        e = msgspec.json.decode(line[5:].strip())
                        if e.get("card") is not None:
                            arrived.setdefault(int(e["card"]), time.perf_counter())

        reader = asyncio.get_running_loop().create_task(read())
        await asyncio.wait_for(ready.wait(), 30)
        lat: list[float] = []
        for i in range(taps):
            card = 500_000 + i
            n = agent.decided
            task = asyncio.get_running_loop().create_task(tap_card(agent, card))
            while agent.decided == n:  # noqa: ASYNC110 - the decision has no hook: polled at 1 ms
                await asyncio.sleep(0.001)
            decided = time.perf_counter()
            await task
            end = time.monotonic() + 10
            while card not in arrived and time.monotonic() < end:  # noqa: ASYNC110 - 1 ms resolution
                await asyncio.sleep(0.001)
            if card in arrived:
                lat.append((arrived[card] - decided) * 1000)
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        emit(f"tap_to_sse_p99.{kind}", p99(lat), "ms", taps=taps, arrived=len(lat),
             p50_ms=round(statistics.median(lat), 1) if lat else None)  # fmt: skip
        for name, params in (("filtered", {"door": "gwbench/d3", "result": "denied"}), ("all", {})):
            times: list[float] = []
            for _ in range(20):
                t = time.perf_counter()
                r = await client.get("/api/v1/events", params={**params, "limit": 100})
                times.append((time.perf_counter() - t) * 1000)
                cur = r.json()["next_cursor"]
                t = time.perf_counter()
                await client.get("/api/v1/events", params={**params, "limit": 100, "cursor": cur})
                times.append((time.perf_counter() - t) * 1000)
            emit(f"events_list_p99.{kind}.{name}", p99(times), "ms", events=events, requests=len(times))
        await client.aclose()


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    taps, events = (10, 10_000) if a.quick else (40, 100_000)
    pg = Postgres()
    pg.start()
    try:
        for kind in ("sqlite", "postgresql"):
            with tempfile.TemporaryDirectory(prefix="bench-ev-") as d:
                work = Path(d)
                broker = Mosquitto(work / "broker")
                broker.start()
                try:
                    url = (f"sqlite+aiosqlite:///{work / 'svc.db'}" if kind == "sqlite"
                           else pg.create_database(f"bench_{int(time.time())}"))  # fmt: skip
                    await one(kind, url, taps, events, work, broker)
                finally:
                    broker.stop()
    finally:
        pg.stop()


if __name__ == "__main__":
    asyncio.run(main())
