"""The operator service's CSV import over HTTP, on embedded SQLite and on PostgreSQL side by side (JSON lines).

    .venv/bin/python bench/operator_import.py [--quick] [--rows N]

One run per database: a real service (uvicorn, in this process), a real Mosquitto, one simulated gateway
provisioned by the service. An N-row file (id, name, card, one group opening the gateway's door) is
uploaded, then:

  * import_dry_run: POST dry-run -> the job reports "validated" (every row checked: ids, cards unique in the
    file and on the site, groups, the operator's permission per row). Target: <= 10 s at 100,000 rows.
  * import_commit_publish_ack: POST commit with publish -> the job is "done": all rows inserted in one
    transaction, the site planned, the change set signed and sent, and the gateway's acknowledgement back.
    Target: <= 20 s at 100,000 rows. A card of the file is then tapped at the gateway (must be granted).

--quick: 10,000 rows (under 60 s on the project's 2-core machine); the full run 100,000.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx

from cloud_bridge.service import site
from cloud_bridge.service.app import init_site
from cloud_bridge.service.database import Database
from tests.mosquitto import Mosquitto
from tests.postgres import Postgres
from tests.service_harness import admin_client, config, running
from tests.test_operator_e2e import GW, agent_running, tap_card
from tests.test_service_e2e import _public_key


def emit(metric: str, value: float, unit: str, **params: Any) -> None:
    print(json.dumps({"metric": metric, "value": round(value, 4), "unit": unit, "params": params}), flush=True)


def csv_file(n: int) -> bytes:
    lines = ["Employee,Full name,Card ID,Access groups"]
    lines += [f"u{i:07d},Person {i},{10_000_000 + i},staff" for i in range(n)]
    return ("\n".join(lines) + "\n").encode()


async def wait(c: httpx.AsyncClient, jid: str, state: str, seen: dict[str, float] | None = None) -> dict[str, Any]:
    while True:
        j: dict[str, Any] = (await c.get(f"/api/v1/imports/{jid}")).json()
        if seen is not None:
            seen.setdefault(j["progress"]["phase"], time.perf_counter())
        if j["state"] == state:
            return j
        if j["state"] in ("failed", "invalid"):
            raise RuntimeError(f"import {jid}: {j['state']}: {j.get('error') or j.get('report')}")
        await asyncio.sleep(0.05)


async def one(db_name: str, url: str, broker: Mosquitto, tmp: Path, n: int) -> None:
    cfg = config(url, tmp, extra="")
    await init_site(cfg, site_id="s1", admin="root", tz="Europe/Berlin", host=broker.host, port=broker.port)
    pub = await _public_key(url)
    sock = Path(tempfile.mkdtemp(prefix="bimp", dir="/tmp")) / "c.sock"
    async with agent_running(broker, tmp / "gw", sock, pub) as agent, \
            running(cfg, provisioning=True, init=False) as svc:  # fmt: skip
        db = Database(url)
        try:
            svc.setup_link = f"x#{await site.setup_code_for(db, 'root')}"
        finally:
            await db.close()
        c = await admin_client(svc)
        async with asyncio.timeout(30):
            while not any(g["id"] == GW and g["online"] for g in (await c.get("/api/v1/gateways")).json()):  # noqa: ASYNC110
                await asyncio.sleep(0.1)
        await c.put("/api/v1/groups/staff", json={"doors": [{"gateway": GW, "door": "door1"}]})
        r = await c.post("/api/v1/imports", content=csv_file(n), params={"filename": "bench.csv"})
        r.raise_for_status()
        jid = r.json()["id"]
        cols = {"id": "Employee", "name": "Full name", "card": "Card ID", "groups": "Access groups"}
        t0 = time.perf_counter()
        (await c.post(f"/api/v1/imports/{jid}/dry-run", json={"columns": cols})).raise_for_status()
        await wait(c, jid, "validated")
        emit("import_dry_run", time.perf_counter() - t0, "s", db=db_name, rows=n, target_s=10)
        t0 = time.perf_counter()
        (await c.post(f"/api/v1/imports/{jid}/commit", json={"publish": True, "timeout": 120})).raise_for_status()
        seen: dict[str, float] = {}
        j = await wait(c, jid, "done", seen)
        t1 = time.perf_counter()
        emit("import_commit_publish_ack", t1 - t0, "s", db=db_name, rows=n, target_s=20)
        if "writing" in seen and "publishing" in seen:  # the inserts, in the one transaction
            emit("import_write", seen["publishing"] - seen["writing"], "s", db=db_name, rows=n)
        if "publishing" in seen:  # the share of it that is the publish (plan, send, the gateway's ack)
            emit("import_publish_ack", t1 - seen["publishing"], "s", db=db_name, rows=n)
        version = j["result"]["published"][GW]
        if not isinstance(version, int):
            raise RuntimeError(f"publish failed: {j['result']}")
        d = await tap_card(agent, 10_000_000 + n - 1)
        if not d.granted:
            raise RuntimeError(f"the last imported card was not granted: {d}")
        await c.aclose()


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="10,000 rows instead of 100,000")
    ap.add_argument("--rows", type=int, help="the file's rows (overrides --quick)")
    ap.add_argument("--db", choices=["sqlite", "postgresql", "both"], default="both")
    args = ap.parse_args()
    n = args.rows or (10_000 if args.quick else 100_000)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        broker = Mosquitto(tmp / "broker", extra="message_size_limit 0")
        broker.start()
        pg = Postgres() if args.db != "sqlite" else None
        try:
            if args.db != "postgresql":
                (tmp / "sqlite").mkdir()
                await one("sqlite", f"sqlite+aiosqlite:///{tmp / 'sqlite' / 'svc.db'}", broker, tmp / "sqlite", n)
            if pg is not None:
                pg.start()
                (tmp / "pg").mkdir()
                await one("postgresql", pg.create_database("bench"), broker, tmp / "pg", n)
        finally:
            if pg is not None:
                pg.stop()
            broker.stop()


if __name__ == "__main__":
    asyncio.run(main())
