"""Operator-side figures over a real loopback Mosquitto (JSON lines on stdout; progress on stderr).

    .venv/bin/python bench/fleet.py [--quick]

Everything is real: the operator `Service` (its `SiteLink`) and the `Collector`s on one SQLite file, and
gateways that are `CloudLink`s with their own `Store` and `Journal` on disk, run by worker processes
(`bench/fleetsim.py`, N gateways per process on one event loop), so that 200 gateways share the 2 cores the
way 200 machines would not: the figures are an upper bound.

Metrics:
  * import_*: a CSV of N rows (100k; 10k with --quick) for one gateway: validated and written
    (`import_validate_write_s`), planned (`import_plan_s`: change set / snapshot computed), then pushed to
    a real gateway until it acknowledged the applied snapshot (`import_publish_ack_s`);
    `import_total_s` is the sum ("validated and published", target <= 10 s).
  * provision_initial_ack_s: every gateway of the fleet (200; 50 with --quick) gets its first snapshot
    (U users in one group); time from the first push to the last acknowledgement.
  * group_change_ack_s: one group that every gateway holds is changed (a door added, removed, added again:
    3 rounds, one line each); time from the change (`put_group`, then plan and push) to the last gateway's
    acknowledgement (target <= 5 s); params: p50 of the per-gateway acknowledgement times, how many
    acknowledged, the planning time. The versions the gateways' stores hold are then read back from the
    workers and checked.
  * events_collected_s / events_acked_s: each gateway journals K events (500; 200 with --quick) while 2
    `Collector` processes share the subscription; time until the cloud database holds all of them
    (every gateway's contiguous high-water mark at K) and until every gateway's journal is empty
    (acknowledged). Then checked in the database: no event lost, none duplicated (unique ids, and per
    gateway seq 1..K each exactly once). `redelivered` counts events the collectors received more than
    once (a gateway's go-back-N resend), absorbed by the de-duplication on the event id.

Options: `--gateways N`, `--processes P` (gateway worker processes), `--skip-import`. Users in the fleet's
group: 500 (100 with --quick). Exit status 1 when a check fails (a gateway did not acknowledge, a store is
not at the acknowledged version, an event is lost or duplicated); the figures are printed anyway.
"""

# ruff: noqa: ASYNC109

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

from cloud_bridge.operator.provision import SiteLink, plan
from cloud_bridge.operator.service import Service
from tests.mosquitto import Mosquitto

HERE = Path(__file__).resolve().parent
#: Checks that failed (the figures are still printed; the exit status is 1).
FAILED: list[str] = []
PW = "bench passphrase"


def emit(metric: str, value: float, unit: str, **params: Any) -> None:
    print(json.dumps({"metric": metric, "value": round(value, 4), "unit": unit, "params": params}), flush=True)


def note(msg: str) -> None:
    print(f"[fleet] {msg}", file=sys.stderr, flush=True)


class Worker:
    """A `bench/fleetsim.py` process: JSON commands on its stdin, JSON answers on its stdout."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, *args: str) -> Worker:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(HERE / "fleetsim.py"), *args,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=16 * 1024 * 1024,
        )  # fmt: skip
        return cls(proc)

    async def send(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        await self.proc.stdin.drain()

    async def recv(self, timeout: float = 300.0) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            raise RuntimeError(f"worker exited (rc {await self.proc.wait()})")
        msg: dict[str, Any] = json.loads(line)
        return msg

    async def stop(self) -> dict[str, Any]:
        with_stats: dict[str, Any] = {}
        if self.proc.returncode is None:
            try:
                await self.send(cmd="stop")
                while "stopped" not in with_stats and "batches" not in with_stats:
                    with_stats = await self.recv(60)
            except (RuntimeError, TimeoutError, ConnectionError) as e:
                note(f"worker stop: {e!r}")
            try:
                await asyncio.wait_for(self.proc.wait(), 30)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        return with_stats


async def start_gateways(broker: Mosquitto, svc: Service, state: Path, names: list[str], workers: int
                         ) -> list[Worker]:  # fmt: skip
    parts = [names[i::workers] for i in range(workers)]
    ws = [await Worker.start("gateways", "--host", broker.host, "--port", str(broker.port), "--site", svc.site,
                             "--key", svc.public_key_hex(), "--state", str(state), "--names", ",".join(p))
          for p in parts if p]  # fmt: skip
    for w in ws:
        msg = await w.recv(180)
        assert "ready" in msg, msg
    return ws


async def timed_push(link: SiteLink, gws: list[str], t0: float, timeout: float) -> dict[str, float | str]:
    """Push every gateway concurrently (as `SiteLink.push_all`); seconds from t0 to each acknowledgement."""

    async def one(gw: str) -> float | str:
        try:
            await link.push(gw, timeout=timeout)
        except Exception as e:
            return f"error: {e!r}"
        return time.perf_counter() - t0

    async with asyncio.TaskGroup() as tg:
        tasks = {gw: tg.create_task(one(gw)) for gw in gws}
    return {gw: t.result() for gw, t in tasks.items()}


def ack_stats(times: dict[str, float | str]) -> tuple[float, dict[str, Any]]:
    ok = sorted(v for v in times.values() if isinstance(v, float))
    if len(ok) < len(times):
        FAILED.append(f"{len(times) - len(ok)} gateways did not acknowledge")
    errors = sorted({v for v in times.values() if isinstance(v, str)})
    return (max(ok) if ok else float("nan")), {
        "p50_s": round(statistics.median(ok), 4) if ok else None, "acked": len(ok), "of": len(times),
        **({"errors": errors[:3]} if errors else {}),
    }  # fmt: skip


# --- the CSV import, validated and published to one gateway ------------------------------------------------


async def csv_import(broker: Mosquitto, tmp: Path, n: int) -> None:
    svc = Service.init(tmp / "csv.db", site="csv", admin="root", host=broker.host, port=broker.port, passphrase=PW)
    async with svc:
        ws = await start_gateways(broker, svc, tmp / "csv-gw", ["gw1"], 1)
        try:
            link = await svc.link()
            await link.wait_for(lambda: link.online("gw1"), 30)
            svc.put_group("staff", [("gw1", "front")])
            text = "id,card,groups\n" + "".join(f"u{i},{1_000_000 + i},staff\n" for i in range(n))
            t0 = time.perf_counter()
            rep = svc.import_csv(text)
            t1 = time.perf_counter()
            planned = svc.plan()
            t2 = time.perf_counter()
            acked = await link.push("gw1", timeout=120)
            t3 = time.perf_counter()
            assert rep.imported == n and planned["gw1"] >= 2 * n, (rep.imported, planned)
            await ws[0].send(cmd="versions")
            held = (await ws[0].recv())["versions"]["gw1"]
            assert held == acked, (held, acked)
            params = {"rows": n, "gateways": 1, "rights_messages": link.rights_published, "version": acked}
            for metric, value in (("import_validate_write_s", t1 - t0), ("import_plan_s", t2 - t1),
                                  ("import_publish_ack_s", t3 - t2), ("import_total_s", t3 - t0)):  # fmt: skip
                emit(metric, value, "s", **params)
        finally:
            for w in ws:
                await w.stop()
    svc.close()


# --- the fleet ---------------------------------------------------------------------------------------------


async def fleet(broker: Mosquitto, tmp: Path, n_gw: int, n_workers: int, users: int, k: int, rounds: int = 3
                ) -> None:  # fmt: skip
    db_path = tmp / "fleet.db"
    svc = Service.init(db_path, site="fleet", admin="root", host=broker.host, port=broker.port, passphrase=PW)
    names = [f"gw{i:03d}" for i in range(n_gw)]
    from cryptography.hazmat.primitives import serialization as ser

    raw = svc.signing_key().private_bytes(ser.Encoding.Raw, ser.PrivateFormat.Raw, ser.NoEncryption()).hex()
    cols = [await Worker.start("collector", "--db", str(db_path), "--host", broker.host, "--port",
                               str(broker.port), "--site", svc.site, "--signing-key", raw)
            for _ in range(2)]  # fmt: skip
    ws: list[Worker] = []
    async with svc:
        try:
            for c in cols:
                assert "ready" in await c.recv(30)
            t = time.perf_counter()
            ws = await start_gateways(broker, svc, tmp / "fleet-gw", names, n_workers)
            link = await svc.link()
            await link.wait_for(lambda: all(link.online(g) for g in names), 60)
            note(f"{n_gw} gateways online in {n_workers} processes after {time.perf_counter() - t:.1f} s")
            params: dict[str, Any] = {"gateways": n_gw, "processes": n_workers, "users": users}

            # first provisioning: one snapshot per gateway
            svc.put_group("staff", [(g, "front") for g in names])
            svc.import_csv("id,card,groups\n" + "".join(f"u{i},{5_000_000 + i},staff\n" for i in range(users)))
            planned = plan(svc.db, max_bytes=4096)  # a snapshot each, whatever the size (a first sync)
            assert len(planned) == n_gw
            t0 = time.perf_counter()
            times = await timed_push(link, names, t0, 120)
            worst, st = ack_stats(times)
            emit("provision_initial_ack_s", worst, "s", **params, **st)

            # the change: one group every gateway holds gets a second door (then loses it, then gets it again)
            for rnd in range(rounds):
                doors = ("front", "lab") if rnd % 2 == 0 else ("front",)
                sent = link.rights_published
                t0 = time.perf_counter()
                svc.put_group("staff", [(g, d) for g in names for d in doors])
                planned = svc.plan()
                t_plan = time.perf_counter() - t0
                times = await timed_push(link, names, t0, 60)
                worst, st = ack_stats(times)
                expect = {g: int(svc.db.gateway(g)["version"]) for g in names}  # type: ignore[index]
                held: dict[str, int] = {}
                for w in ws:
                    await w.send(cmd="versions")
                    held.update((await w.recv())["versions"])
                wrong = sorted(g for g in names if held.get(g) != expect[g])
                emit("group_change_ack_s", worst, "s", **params, **st, round=rnd + 1, plan_s=round(t_plan, 4),
                     changed=len(planned), rights_messages=link.rights_published - sent,
                     stores_at_version=n_gw - len(wrong))  # fmt: skip
                if wrong:
                    FAILED.append(f"{len(wrong)} gateway stores not at the acknowledged version")
                    note(f"gateways not holding the acknowledged version: {wrong[:5]}")

            # events: K per gateway, two collectors sharing the subscription
            total = n_gw * k
            t_wall0, t0 = time.time(), time.perf_counter()
            for w in ws:
                await w.send(cmd="events", k=k)
            for w in ws:
                assert "recorded" in await w.recv()
            t_rec = time.perf_counter() - t0
            con = svc.db.con
            async with asyncio.timeout(600):
                # the collectors are other processes: their progress is only seen in the shared database
                while con.execute("SELECT coalesce(sum(events_upto), 0) FROM gateways").fetchone()[0] < total:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
            t_collected = time.perf_counter() - t0
            drained = [await w.recv(600) for w in ws]
            t_acked = max(d["drained"] for d in drained) - t_wall0
            next_seq: dict[str, int] = {}
            for d in drained:
                next_seq.update(d["next_seq"])
            stored, ids = con.execute("SELECT count(*), count(DISTINCT id) FROM events").fetchone()
            per_gw = {
                g: (int(n), int(nd), int(lo), int(hi))
                for g, n, nd, lo, hi in con.execute(
                    "SELECT gateway, count(*), count(DISTINCT seq), min(seq), max(seq) FROM events GROUP BY gateway"
                )
            }
            bad = sorted(g for g in names if per_gw.get(g) != (next_seq[g] - 1,) * 2 + (1, next_seq[g] - 1)
                         or next_seq[g] - 1 != k)  # fmt: skip
            col_stats = [await c.stop() for c in cols]
            received = sum(int(c.get("events", 0)) for c in col_stats)
            eparams = {**params, "events": total, "per_gateway": k, "collectors": 2, "stored": stored,
                       "unique_ids": ids, "gateways_complete": n_gw - len(bad),
                       "lost": total - stored, "received_by_collectors": received,
                       "redelivered": received - stored,
                       "batches_per_collector": [c.get("batches") for c in col_stats],
                       "record_s": round(t_rec, 4)}  # fmt: skip
            emit("events_collected_s", t_collected, "s", **eparams)
            emit("events_acked_s", t_acked, "s", **eparams)
            emit("events_collected_rate", total / t_collected, "events/s", **eparams)
            if bad or stored != total or ids != stored:
                FAILED.append(f"events: {total - stored} lost, {len(bad)} gateways incomplete or duplicated")
                note(f"gateways with missing/duplicated events: {[(g, per_gw.get(g)) for g in bad[:5]]}")
        finally:
            for w in ws:
                stats = await w.stop()
                note(f"worker: {stats.get('stats')}")
            for c in cols:
                await c.stop()
    svc.close()


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--gateways", type=int)
    ap.add_argument("--processes", type=int)
    ap.add_argument("--skip-import", action="store_true")
    a = ap.parse_args()
    # aiomqtt warns at every publish beyond 10 awaiting their PUBACK: the site link publishes to every
    # gateway at once, which is intended here
    logging.getLogger("mqtt").setLevel(logging.ERROR)
    rows = 10_000 if a.quick else 100_000
    n_gw = a.gateways or (50 if a.quick else 200)
    procs = a.processes or (2 if a.quick else 4)
    users, k = (100, 200) if a.quick else (500, 500)
    with tempfile.TemporaryDirectory(prefix="fleet-bench-") as d:
        tmp = Path(d)
        broker = Mosquitto(tmp / "broker", extra="max_connections -1\nmax_inflight_messages 100\n")
        broker.start()
        try:
            if not a.skip_import:
                await csv_import(broker, tmp, rows)
            await fleet(broker, tmp, n_gw, procs, users, k)
        finally:
            broker.stop()
    if FAILED:
        note("FAILED: " + "; ".join(FAILED))
        raise SystemExit(1)


if __name__ == "__main__":
    asyncio.run(main())
