"""A fleet on a 3-node broker cluster, one node SIGKILLed mid-run (JSON lines on stdout; progress on stderr).

    .venv/bin/python bench/fleet_cluster.py [--quick] [--gateways N] [--brokers rabbitmq,nats]

For each broker (RabbitMQ 3.10 with the MQTT plugin and quorum queues; NATS 2.9 with JetStream), on loopback:
a 3-node cluster (tests/rabbitmq.py, tests/nats.py: own data folders, own epmd, stopped by pid afterwards), a
throw-away PostgreSQL (tests/postgres.py) migrated to the service's schema, `--shards` ingest and publisher
processes (cloud_bridge/fleet: one shard of sites each, no shared subscription), and the fleet: `--processes`
worker processes of simulated gateways (real `CloudLink`s over in-memory ports, cloud_bridge/fleet/sim.py),
gateway j connecting first to node j mod 3, the other nodes as its failover endpoints.

Scenario and metrics (one line each, `broker` names the cluster):
  * gateways_connected: every link online (births seen by the publishers), and how long the fleet took;
  * group_change_ack_s: a change set (a group gains a door) written to the `outbox` of every gateway, pushed
    by the publishers; p50 / p100 of the time until each gateway's `result` (target p100 <= 10 s);
  * events_ingested: each gateway journals `--events` events over `--duration` s (`--event-flow`: evenly, each
    gateway at its own phase, or in 10 fleet-wide bursts); node 1 is SIGKILLed half way;
    then the database is checked: expected (every event every gateway journalled), stored, missing (must be
    0), duplicate rows (must be 0), redelivered (events the ingest received more than once, absorbed);
  * reconnect_after_kill_s: for the gateways that lost their node, from the kill to their next connection
    (p50 / p100, target <= 10 s), and how many never came back;
  * node_restarted: the killed node started again on its data folder, time until the cluster is healthy;
  * side_by_side: the figures of every broker on one line.
Exit status 1 when an event is missing, a gateway did not acknowledge or reconnect, or a cluster is not healthy.
`--quick`: 200 gateways, 50 events each (CI: tests/test_fleet_cluster.py). `--window N`: the publishers' in-flight
window (default 250; 0: no limit), their window counters on the `group_change_ack_s` line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiomqtt
import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from sqlalchemy import func, insert, select

from cloud_bridge.fleet.__main__ import Spec, raise_nofile
from cloud_bridge.protocol import ChangeSetMsg, encode
from cloud_bridge.service import schema
from cloud_bridge.service.database import Database
from edge.model import ChangeSet, Group, PutGroup
from tests.nats import NatsCluster
from tests.postgres import Postgres
from tests.rabbitmq import RabbitCluster

ROOT = Path(__file__).resolve().parent.parent
#: The gateways' link counters summed on the events line: go-backs (`resends`) and the repeated acknowledgements
#: that did not cause one (`repeated_acks`), the ack timeouts among the go-backs, beside what was sent.
LINK_STATS = ("events_sent", "batches_sent", "resends", "ack_timeouts", "repeated_acks")


def out(**kw: Any) -> None:
    print(json.dumps(kw), flush=True)


def progress(msg: str) -> None:
    print(f"fleet_cluster: {msg}", file=sys.stderr, flush=True)


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))] if q < 1 else xs[-1], 3)


class Worker:
    """One worker process (`python -m cloud_bridge.fleet ...`): JSON lines both ways."""

    def __init__(self, name: str, args: list[str], log: Path) -> None:
        self.name = name
        self._log = log.open("ab")
        self.proc: asyncio.subprocess.Process | None = None
        self.args = args
        self.last: dict[str, Any] = {}  # the last line received

    async def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cloud_bridge.fleet", *self.args, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=self._log, env=env, limit=1 << 28,
        )  # fmt: skip

    async def send(self, **cmd: Any) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        await self.proc.stdin.drain()

    async def expect(self, key: str, timeout: float) -> dict[str, Any]:  # noqa: ASYNC109
        assert self.proc is not None and self.proc.stdout is not None
        try:
            async with asyncio.timeout(timeout):
                while True:
                    line = await self.proc.stdout.readline()
                    if not line:
                        raise RuntimeError(f"worker {self.name} exited ({self.proc.returncode}) waiting for {key!r}")
                    msg: dict[str, Any] = json.loads(line)
                    self.last = msg
                    if key in msg:
                        return msg
        except TimeoutError:
            raise TimeoutError(f"worker {self.name}: no {key!r} within {timeout:.0f} s (last: {self.last})") from None

    async def ask(self, key: str, timeout: float = 60.0, **cmd: Any) -> dict[str, Any]:  # noqa: ASYNC109
        await self.send(**cmd)
        return await self.expect(key, timeout)

    async def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.returncode is None:
            try:
                await self.send(cmd="stop")
                assert self.proc.stdin is not None
                self.proc.stdin.close()
                async with asyncio.timeout(20):
                    await self.proc.wait()
            except (TimeoutError, OSError, RuntimeError, AssertionError):
                self.proc.kill()
                await self.proc.wait()
        self._log.close()


def cpu_by_part(parts: dict[str, list[int]]) -> dict[str, tuple[frozenset[int], float, int]]:
    """User + system CPU seconds of each part (its processes and all their live descendants: a broker node's
    Erlang VM, PostgreSQL's postmaster and backends, a worker process), and the resident memory of its own
    processes (MiB; not their descendants), from one scan of /proc."""
    parent: dict[int, int] = {}
    cpu: dict[int, float] = {}
    rss: dict[int, int] = {}
    tick, page = os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE")
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                f = (d / "stat").read_text().rsplit(")", 1)[1].split()
                parent[int(d.name)], cpu[int(d.name)] = int(f[1]), (int(f[11]) + int(f[12])) / tick
                rss[int(d.name)] = int(f[21]) * page
    children: dict[int, list[int]] = {}
    for pid, pp in parent.items():
        children.setdefault(pp, []).append(pid)
    res = {}
    for name, roots in parts.items():
        total, todo, seen = 0.0, list(roots), set()
        while todo:
            pid = todo.pop()
            if pid not in seen:
                seen.add(pid)
                total += cpu.get(pid, 0.0)
                todo.extend(children.get(pid, []))
        live = frozenset(r for r in roots if r in parent)
        res[name] = (live, total, sum(rss.get(r, 0) for r in live) >> 20)
    return res


class CpuMeter:
    """CPU seconds per part of the run (broker nodes, PostgreSQL, ingest, publishers, gateway workers, this
    bench) over a phase: `mark()` at its start, `since()` at its end, with the wall time and the machine's
    load, so a figure says what it cost and who paid."""

    def __init__(self, parts: Callable[[], dict[str, list[int]]]) -> None:
        self._parts = parts  # () -> {part: [pids]}: read at each sample (a restarted node has a new pid)
        self._t = time.monotonic()
        self._at = cpu_by_part(self._parts())

    def mark(self) -> None:
        self._t, self._at = time.monotonic(), cpu_by_part(self._parts())

    def since(self) -> dict[str, Any]:
        now, wall = cpu_by_part(self._parts()), time.monotonic() - self._t
        # a part started during the phase counts whole; one whose processes changed otherwise (a node killed,
        # or restarted) has no figure for the phase: None
        used: dict[str, float | None] = {}
        for k, (pids, v, _) in now.items():
            before, c0, _ = self._at.get(k, (frozenset(), 0.0, 0))
            used[k] = round(v - c0, 1) if before == pids else round(v, 1) if not before else None
        return {
            "wall_s": round(wall, 1),
            "cpu_s": used,
            "cpu_total_s": round(sum(v for v in used.values() if v is not None), 1),
            "rss_mb": {k: mb for k, (_, _, mb) in now.items()},
            "load": round(os.getloadavg()[0], 1),
        }


def change_set(gw: str) -> bytes:
    """The group change every gateway gets: from version 0 to 1, group `staff` gains the door `lab`."""
    cs = ChangeSet(from_version=0, to_version=1, changes=[PutGroup(group=Group(id="staff", name="Staff",
                                                                                doors=["front", "lab"]))])  # fmt: skip
    return encode(ChangeSetMsg(id=f"cs-{gw}-1", change_set=cs))


async def scenario(broker: str, a: argparse.Namespace, pg: Postgres, work: Path) -> dict[str, Any]:
    res: dict[str, Any] = {"broker": broker}
    cluster: RabbitCluster | NatsCluster = (
        RabbitCluster(3, work / f"{broker}-cluster", metadata_store=a.metadata_store)
        if broker == "rabbitmq"
        else NatsCluster(3, work / f"{broker}-cluster")
    )
    workers: list[Worker] = []
    ok = True
    t = time.monotonic()
    try:
        await asyncio.to_thread(cluster.start)
        res["cluster_start_s"] = round(time.monotonic() - t, 1)
        res["version"] = cluster.version
        if isinstance(cluster, RabbitCluster):
            res["metadata_store"] = cluster.metadata_store
        progress(f"{broker} {res['version']}: 3-node cluster healthy in {res['cluster_start_s']} s")
        # auto: one MQTT 5 subscription where the broker speaks MQTT 5 (RabbitMQ 3.13 and later), else per leaf
        filt = a.downlink_filter
        if filt == "auto":
            major, minor = (int(x) for x in [*res["version"].split("."), "0"][:2])
            filt = "one" if broker == "rabbitmq" and (major, minor) >= (3, 13) else "per-leaf"
        url = pg.create_database(f"fleet_{broker}_{os.getpid()}")
        db = Database(url)
        await db.migrate()
        n = a.gateways
        per_site = a.per_site
        names = [f"g{i:05d}" for i in range(n)]
        roster = {g: f"s{i // per_site:04d}" for i, g in enumerate(names)}
        async with db.write() as c:
            await c.execute(insert(schema.gateways), [{"id": g} for g in names])
        procs = max(1, min(a.processes, n))
        key = Ed25519PrivateKey.generate()
        spec = Spec(
            endpoints=cluster.endpoints, cloud_endpoints=cluster.endpoints, db=url,
            site_key=key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()).hex(), roster=roster,
            workers=[names[i::procs] for i in range(procs)], shards=a.shards, state_dir=str(work / f"{broker}-gw"),
            link={"mqtt_version": "5" if filt == "one" else "3.1.1", "session": "clean",
                  "downlink_filter": filt, "reply_qos": a.reply_qos,
                  "downlink_qos": a.rabbit_downlink_qos if broker == "rabbitmq" else 0,
                  "backoff_min_s": 0.5, "backoff_max_s": a.backoff_max, "reconnect_spread_s": a.reconnect_spread,
                  "ack_timeout_s": a.ack_timeout, "window": 8,
                  "keepalive_s": 30, "failback_s": 3600},
            cloud_qos=1 if broker == "rabbitmq" else 0, publisher_qos=a.publisher_qos,
            cloud_publish_qos=a.cloud_publish_qos, resend_s=a.resend,
            stagger_s=procs / a.ramp, window=a.window,
        )  # fmt: skip
        spec_path = work / f"{broker}-spec.json"
        spec_path.write_bytes(msgspec.json.encode(spec))
        logs = work / f"{broker}-workers.log"
        ingest = [Worker(f"ingest{i}", ["ingest", "--spec", str(spec_path), "--shard", str(i)], logs)
                  for i in range(a.shards)]  # fmt: skip
        pubs = [Worker(f"publisher{i}", ["publisher", "--spec", str(spec_path), "--shard", str(i)], logs)
                for i in range(a.shards)]  # fmt: skip
        gws = [Worker(f"gateways{i}", ["gateways", "--spec", str(spec_path), "--index", str(i)], logs)
               for i in range(procs)]  # fmt: skip
        workers = [*ingest, *pubs, *gws]

        def parts() -> dict[str, list[int]]:
            pm = pg.data / "postmaster.pid"
            return {
                **{f"node{i}": [nd.proc.pid] for i, nd in enumerate(cluster.nodes) if nd.proc is not None},
                "postgres": [int(pm.read_text().split()[0])] if pm.exists() else [],
                **{k: [w.proc.pid for w in ws if w.proc is not None]
                   for k, ws in (("ingest", ingest), ("publishers", pubs), ("gateways", gws))},
            }  # fmt: skip

        meter = CpuMeter(parts)

        async def gc_s() -> dict[str, dict[str, Any]]:
            """The garbage collector so far in each kind of worker, summed over its processes: seconds, and
            collections and seconds per generation."""
            got: dict[str, dict[str, Any]] = {}
            for k, ws in (("ingest", ingest), ("publishers", pubs), ("gateways", gws)):
                tot: dict[str, Any] = {"s": 0.0, "count": [0, 0, 0], "seconds": [0.0, 0.0, 0.0], "longest": 0.0}
                for w in ws:
                    g = (await w.ask("gc", cmd="gc"))["gc"]
                    tot["s"] += g["s"]
                    tot["longest"] = max(tot["longest"], g["longest"])
                    tot["count"] = [x + y for x, y in zip(tot["count"], g["count"], strict=True)]
                    tot["seconds"] = [x + y for x, y in zip(tot["seconds"], g["seconds"], strict=True)]
                got[k] = tot
            return got

        def gc_since(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]) -> dict[str, Any]:
            """Per kind of worker: seconds in the collector, and (collections, seconds) of each generation."""
            return {
                k: {"s": round(now["s"] - before[k]["s"], 2), "longest_so_far": now["longest"],
                    **{f"gen{i}": (now["count"][i] - before[k]["count"][i],
                                   round(now["seconds"][i] - before[k]["seconds"][i], 2)) for i in range(3)}}
                for k, now in after.items()
            }  # fmt: skip

        for w in [*ingest, *pubs]:
            await w.start()
        for w in [*ingest, *pubs]:
            await w.expect("ready", 60)
        t = time.monotonic()
        meter.mark()
        for w in gws:
            await w.start()
        try:
            readies = [await w.expect("ready", a.connect_timeout) for w in gws]
        except TimeoutError:
            for w in gws:  # read what each has said since (its last progress line)
                with contextlib.suppress(TimeoutError, RuntimeError):
                    await w.expect("ready", 2)
            online = sum(int(w.last.get("online", w.last.get("ready", 0))) for w in gws)
            out(metric="gateways_connected", broker=broker, value=online, of=n, connect_s=None, processes=procs,
                timeout_s=a.connect_timeout, attempts=sum(int(w.last.get("attempts", 0)) for w in gws),
                ramp_per_s=a.ramp, backoff_max_s=a.backoff_max, downlink_filter=filt)  # fmt: skip
            raise
        res["connect_s"] = round(time.monotonic() - t, 1)
        res["connected"] = sum(r["ready"] for r in readies)
        out(metric="gateways_connected", broker=broker, value=res["connected"], of=n, connect_s=res["connect_s"],
            processes=procs, attempts=sum(int(r.get("attempts", 0)) for r in readies), ramp_per_s=a.ramp,
            backoff_max_s=a.backoff_max, reconnect_spread_s=a.reconnect_spread, downlink_filter=filt,
            metadata_store=res.get("metadata_store"), cost=meter.since())  # fmt: skip
        if a.idle > 0:
            meter.mark()
            await asyncio.sleep(a.idle)
            out(metric="fleet_idle", broker=broker, gateways=res["connected"], **meter.since())
        progress(f"{broker}: {res['connected']} gateways online in {res['connect_s']} s")

        # --- a group change to every gateway -------------------------------------------------------------
        gc0 = await gc_s()
        meter.mark()
        t0 = time.time()
        async with db.write() as c:
            outbox_rows = [{"gateway": g, "to_version": 1, "from_version": 0, "kind": "change_set",
                            "body": change_set(g)} for g in names]  # fmt: skip
            await c.execute(insert(schema.outbox), outbox_rows)
        for w in pubs:
            await w.ask("pushed", cmd="push")
        deadline = time.monotonic() + a.ack_timeout_total
        acked: dict[str, float] = {}
        pub_stats: list[dict[str, Any]] = []
        while time.monotonic() < deadline:  # counts only while it goes out (the times of all: once, after)
            briefs = [(await w.ask("stats", cmd="stats", brief=True))["stats"] for w in pubs]
            if sum(int(b["acked_versions"].get("1", 0)) for b in briefs) >= n:
                break
            await asyncio.sleep(0.5)
        for w in pubs:
            st = (await w.ask("stats", cmd="stats"))["stats"]
            pub_stats.append(st)
            for gw, vs in st["acked_at"].items():
                if "1" in vs:
                    acked[gw] = vs["1"] - t0
        times = list(acked.values())
        res["group_change_p50_s"], res["group_change_p100_s"] = pct(times, 0.5), pct(times, 1.0)
        res["group_change_acked"] = len(acked)
        # the publishers' sends: first sends and resends, and their window (per process: the most in flight,
        # waits for a slot, slots given up by gateways that did not answer)
        res["publishers"] = {k: [st.get(k) for st in pub_stats] for k in ("sent", "resent", "peak_in_flight",
                                                                          "deferred", "released")}  # fmt: skip
        out(metric="group_change_ack_s", broker=broker, p50=res["group_change_p50_s"],
            p100=res["group_change_p100_s"], acked=len(acked), of=n, window=a.window,
            publisher_qos=spec.cloud_qos if spec.publisher_qos is None else spec.publisher_qos,
            publishers=res["publishers"], cost=meter.since(), gc_s=gc_since(gc0, await gc_s()))  # fmt: skip
        ok &= len(acked) == n
        if a.until == "group-change":
            await db.close()
            res["ok"] = ok
            return res

        # --- events from every gateway, one node killed half way ---------------------------------------------
        gc0 = await gc_s()
        meter.mark()
        for w in gws:
            await w.send(cmd="events", k=a.events, duration=a.duration, steps=10, smooth=a.event_flow == "even")
        await asyncio.sleep(a.duration / 2 + (a.duration / 20 if a.kill_at == "between" else 0.0))
        # NATS: the JetStream meta leader (the hardest case: every MQTT CONNECT waits for a new one);
        # RabbitMQ: node 1 (its nodes are peers; the cloud side prefers node 0)
        leader = cluster.meta_leader() if isinstance(cluster, NatsCluster) else None
        victim = 1 if leader is None else leader
        res["killed_node"] = victim
        kill_t = time.time()
        kill_meter = CpuMeter(parts)
        await asyncio.to_thread(cluster.kill, victim)
        progress(f"{broker}: node {victim} SIGKILLed")

        async def after_kill() -> dict[str, Any]:  # who paid for the first 20 s after the kill
            await asyncio.sleep(20)
            return kill_meter.since()

        after_kill_cost = asyncio.get_running_loop().create_task(after_kill())
        t = time.monotonic()
        for w in gws:
            await w.expect("recorded", a.duration + a.drain_timeout)
        drained_ok = True
        for w in gws:
            try:
                await w.expect("drained", a.drain_timeout)
            except TimeoutError:
                drained_ok = False
        res["drain_s"] = round(time.monotonic() - t, 1)
        stats = [(await w.ask("stats", cmd="stats"))["stats"] for w in gws]
        recorded_by: dict[str, int] = {}
        downs: dict[str, list[float]] = {}
        ups: dict[str, list[float]] = {}
        versions: dict[str, int] = {}
        where: dict[str, list[tuple[float, str]]] = {}
        link_stats: Counter[str] = Counter()
        for st in stats:
            link_stats.update({k: st["link_stats"].get(k, 0) for k in LINK_STATS})
            recorded_by.update(st["recorded_by"])
            downs.update(st["downs"])
            ups.update(st["ups"])
            where.update(st["where"])
            versions.update(st["versions"])
        ing = [(await w.ask("stats", cmd="stats"))["stats"] for w in ingest]
        async with db.read() as c:
            e = schema.events.c
            rows = (await c.execute(select(e.gateway, func.count(), func.count(e.seq.distinct()), func.max(e.seq))
                                    .group_by(e.gateway))).all()  # fmt: skip
        stored = sum(int(r[1]) for r in rows)
        distinct = {str(r[0]): int(r[2]) for r in rows}
        maxseq = {str(r[0]): int(r[3]) for r in rows}
        expected = sum(recorded_by.values())
        missing = sum(max(0, recorded_by[g] - distinct.get(g, 0)) for g in names)
        beyond = sum(1 for g in names if maxseq.get(g, 0) > recorded_by[g])
        dup_rows = stored - sum(distinct.values())
        res.update(events_expected=expected, events_stored=stored, events_missing=missing, duplicate_rows=dup_rows,
                   redelivered=sum(i["duplicates"] for i in ing), drained=drained_ok)  # fmt: skip
        out(metric="events_ingested", broker=broker, expected=expected, stored=stored, missing=missing,
            duplicate_rows=dup_rows, redelivered=res["redelivered"], drain_s=res["drain_s"], drained=drained_ok,
            ingest_processes=a.shards, gaps=sum(i["gaps"] for i in ing), seq_beyond_journal=beyond,
            journalled_over_s=a.duration, offered_per_s=round(expected / a.duration), event_flow=a.event_flow,
            ack_timeout_s=a.ack_timeout,
            link_stats=dict(link_stats),
            cost=meter.since(),
            gc_s=gc_since(gc0, await gc_s()))  # fmt: skip
        ok &= missing == 0 and dup_rows == 0 and drained_ok and beyond == 0

        # --- reconnection of the gateways that lost their node -------------------------------------------------
        rec: list[float] = []
        lost = 0
        for g in names:
            if any(d >= kill_t - 0.5 for d in downs.get(g, [])):
                back = [u for u in ups.get(g, []) if u >= kill_t - 0.5]
                if back:
                    rec.append(max(0.0, min(back) - kill_t))
                else:
                    lost += 1
        res.update(reconnect_p50_s=pct(rec, 0.5), reconnect_p100_s=pct(rec, 1.0), reconnected=len(rec),
                   not_reconnected=lost)  # fmt: skip

        def node_at(g: str, t: float) -> str:
            """The node ("host:port") gateway g was connected to at time t, "" when offline."""
            last = max((w for w in where.get(g, []) if w[0] <= t), default=None)
            if last is None or any(last[0] < d <= t for d in downs.get(g, [])):
                return ""
            return str(last[1])

        at_kill = Counter(node_at(g, kill_t) for g in names)
        host, port = cluster.endpoints[victim]
        out(metric="reconnect_after_kill_s", broker=broker, p50=res["reconnect_p50_s"], p100=res["reconnect_p100_s"],
            gateways=len(rec) + lost, not_reconnected=lost, killed_node=victim, kill_at=a.kill_at,
            on_killed_node_at_kill=at_kill.get(f"{host}:{port}", 0), offline_at_kill=at_kill.get("", 0),
            per_node_at_kill=dict(sorted(at_kill.items())), cost_first_20s=await after_kill_cost)  # fmt: skip
        ok &= lost == 0 and len(rec) > 0
        res["versions_ok"] = all(versions.get(g) == 1 for g in names)
        ok &= res["versions_ok"]

        # --- the killed node back ---------------------------------------------------------------------------
        t = time.monotonic()
        await asyncio.to_thread(cluster.start_node, victim, timeout=240.0)  # a loaded machine: minutes
        res["restart_healthy_s"] = round(time.monotonic() - t, 1)
        res["healthy"] = await asyncio.to_thread(cluster.healthy)
        out(metric="node_restarted", broker=broker, healthy_s=res["restart_healthy_s"], healthy=res["healthy"],
            why_unhealthy=None if res["healthy"] else getattr(cluster, "why_unhealthy", None))  # fmt: skip
        ok &= res["healthy"]
        await db.close()
    except Exception as e:
        ok = False
        res["error"] = f"{type(e).__name__}: {e}"
        out(metric="error", broker=broker, error=res["error"][:4000])
        progress("".join(traceback.format_exception(e))[-4000:])
    finally:
        for w in workers:
            await w.stop()
        await asyncio.to_thread(cluster.stop)
    res["ok"] = ok
    return res


async def amain(a: argparse.Namespace) -> int:
    nofile = raise_nofile()
    progress(f"open files limit {nofile}")
    work = Path(tempfile.mkdtemp(prefix="fleet-cluster-"))
    pg = Postgres()
    results = []
    try:
        await asyncio.to_thread(pg.start)
        for b in a.brokers.split(","):
            results.append(await scenario(b, a, pg, work))
    finally:
        await asyncio.to_thread(pg.stop)
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    keys = ["version", "metadata_store", "connected", "connect_s",
            "group_change_p50_s", "group_change_p100_s", "events_expected", "events_missing",
            "duplicate_rows", "redelivered", "reconnect_p50_s", "reconnect_p100_s", "not_reconnected",
            "restart_healthy_s", "healthy", "ok"]  # fmt: skip
    out(metric="side_by_side", gateways=a.gateways, events_per_gateway=a.events,
        **{r["broker"]: {k: r.get(k) for k in keys} for r in results})  # fmt: skip
    return 0 if all(r["ok"] for r in results) else 1


# --- per-connection cost (--connect-cost) -------------------------------------------------------------------


def _cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds of the processes (the broker nodes' Erlang VMs) and their descendants."""
    return cpu_by_part({"nodes": pids})["nodes"][1]


async def _wave(cluster: RabbitCluster | NatsCluster, broker: str, n: int, subs: int, qos: int,
                persistent: bool, conc: int, *, birth: bool = False, tree: bool = False) -> None:  # fmt: skip
    """Connect n gateway-like MQTT 3.1.1 clients (conc at a time, spread over the nodes), each subscribing to
    `subs` of the downlink's filters at `qos` (`birth`: with a retained will and a retained QoS 1 message on its
    status topic after the subscriptions, as the link does; `tree`: instead of the filters, one MQTT 5 subscription
    to all the gateway's topics with No Local, `link.downlink_filter = "one"`); print the rate and the broker CPU
    per connection."""
    from cloud_bridge import mqtt
    from cloud_bridge.topics import Topics

    pids = [nd.proc.pid for nd in cluster.nodes if nd.proc is not None]
    sem = asyncio.Semaphore(conc)
    clients: list[Any] = []
    lat: list[float] = []
    tag = os.urandom(2).hex()

    async def one(i: int) -> None:
        async with sem:
            h, p = cluster.endpoints[i % len(cluster.endpoints)]
            t = Topics(f"s{i // 50:04d}", f"c{tag}{i:05d}")
            ident = f"acs-{t.site}-{t.gateway}" + ("" if persistent else f"-{os.urandom(3).hex()}")
            will = aiomqtt.Will(t.status, b"x" * 120, qos=1, retain=True) if birth else None
            c = mqtt.client(h, p, identifier=ident, clean_start=not persistent, keepalive=60,
                            version="5" if tree else "3.1.1", will=will)  # fmt: skip
            t0 = time.monotonic()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(60):
                    await mqtt.connect(c, [] if tree else t.downlink()[:subs], qos=qos)
                    if tree:
                        await mqtt.subscribe_no_local(c, t.tree, qos=qos)
                    if birth:
                        await c.publish(t.status, b"y" * 200, qos=1, retain=True)
                lat.append(time.monotonic() - t0)
                clients.append(c)

    c0, t0 = _cpu_s(pids), time.monotonic()
    await asyncio.gather(*(one(i) for i in range(n)))
    wall = time.monotonic() - t0
    c1 = _cpu_s(pids)
    await asyncio.sleep(1)
    i0 = _cpu_s(pids)
    await asyncio.sleep(10)
    idle = (_cpu_s(pids) - i0) / 10
    await asyncio.gather(*(mqtt.close(c) for c in clients))
    ok = len(clients)
    out(metric="connect_cost", broker=broker, clients=n, connected=ok, subscriptions=subs, qos=qos,
        persistent=persistent, retained_birth=birth, one_filter_no_local=tree, concurrency=conc,
        rate_per_s=round(ok / wall, 1),
        broker_cpu_ms_per_connection=round(1000 * (c1 - c0) / max(1, ok), 2),
        connect_p50_ms=pct([1000 * x for x in lat], 0.5), connect_p99_ms=pct([1000 * x for x in lat], 0.99),
        idle_broker_cpu_pct=round(100 * idle, 1), load=round(os.getloadavg()[0], 1))  # fmt: skip


async def connect_cost(a: argparse.Namespace) -> int:
    """`--connect-cost`: on a fresh 3-node cluster of each broker, waves of connections without subscriptions,
    with 1 and with the downlink's 3 filters at QoS 0, 3 at QoS 1 (clean sessions), and persistent sessions at
    QoS 1 (a third as many), then the link's own connect (3 filters at QoS 0, a retained will and birth), and on
    RabbitMQ the same with `downlink_filter = "one"` (one MQTT 5 subscription with No Local)."""
    raise_nofile()
    work = Path(tempfile.mkdtemp(prefix="fleet-cluster-"))
    n = a.gateways
    try:
        for broker in a.brokers.split(","):
            cluster: RabbitCluster | NatsCluster = (
                RabbitCluster(3, work / broker, metadata_store=a.metadata_store)
                if broker == "rabbitmq"
                else NatsCluster(3, work / broker)
            )
            await asyncio.to_thread(cluster.start)
            try:
                for subs, qos, persistent, k in ((0, 0, False, n), (1, 0, False, n), (3, 0, False, n), (3, 1, False, n),
                                                 (3, 1, True, max(1, n // 3))):  # fmt: skip
                    await _wave(cluster, broker, k, subs, qos, persistent, 50)
                # what the link does on every connect: the 3 filters at QoS 0, a retained will, a retained birth
                await _wave(cluster, broker, n, 3, 0, False, 50, birth=True)
                if broker == "rabbitmq":  # and with link.downlink_filter = "one" (MQTT 5: not NATS 2.9)
                    await _wave(cluster, broker, n, 1, 0, False, 50, birth=True, tree=True)
            finally:
                await asyncio.to_thread(cluster.stop)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--gateways", type=int)
    ap.add_argument("--events", type=int, help="events per gateway")
    ap.add_argument("--processes", type=int, help="gateway worker processes")
    ap.add_argument("--shards", type=int, default=2, help="ingest (and publisher) processes")
    ap.add_argument("--per-site", type=int, default=50, help="gateways per site")
    ap.add_argument("--duration", type=float, help="seconds over which the events are journalled")
    ap.add_argument("--brokers", default="rabbitmq,nats")
    ap.add_argument("--ack-timeout", type=float, help="the gateways' event ack timeout (quick: 5 s, else 30 s)")
    ap.add_argument("--ramp", type=float, default=500.0, help="first connects a second, the whole fleet")
    ap.add_argument("--cloud-publish-qos", type=int, default=0, choices=[0, 1],
                    help="QoS of the cloud's change sets and event acks (the application resends)")  # fmt: skip
    ap.add_argument("--publisher-qos", type=int, choices=[0, 1],
                    help="QoS of the publishers' subscriptions (births, rights replies); default: the cloud side's "
                         "(1 on RabbitMQ, 0 on NATS)")  # fmt: skip
    ap.add_argument("--reply-qos", type=int, default=0, choices=[0, 1], help="QoS of the gateways' rights replies")
    ap.add_argument("--rabbit-downlink-qos", type=int, default=0, choices=[0, 1],
                    help="QoS of the gateways' downlink subscriptions on RabbitMQ (NATS: 0)")  # fmt: skip
    ap.add_argument("--downlink-filter", choices=("per-leaf", "one", "auto"), default="per-leaf",
                    help="the gateways' link.downlink_filter; one: a single MQTT 5 subscription with No Local, the "
                    "whole fleet then speaks MQTT 5 (RabbitMQ 4.0 and Mosquitto, not NATS 2.9); auto: one where "
                    "the broker speaks MQTT 5, else per-leaf")  # fmt: skip
    ap.add_argument(
        "--backoff-max",
        type=float,
        default=4.0,
        help="the gateways' link.backoff_max_s (the product's default is 60 s; docs/scaling.md)",
    )
    ap.add_argument(
        "--reconnect-spread",
        type=float,
        default=0.0,
        help="the gateways' link.reconnect_spread_s: their first retry after a drop spread over it",
    )
    ap.add_argument("--event-flow", choices=("bursts", "even"), default="bursts",
                    help="bursts: every gateway journals a tenth of its events at once, 10 times (a batch of "
                         "several events per gateway each time); even: each gateway's events evenly over "
                         "--duration at its own phase, as doors are used (a batch per event: 10x the batches)")
    ap.add_argument("--kill-at", choices=("burst", "between"), default="burst",
                    help="SIGKILL the node as the 6th burst of events is journalled (half way through "
                         "--duration: the reconnection competes with the whole fleet's batches), or half way "
                         "between the 6th and the 7th")  # fmt: skip
    ap.add_argument("--resend", type=float, default=3.0, help="seconds between resends of a change set")
    ap.add_argument("--window", type=int, default=250,
                    help="gateways with a change set in flight per publisher process (0: no limit; docs/scaling.md, "
                         "\"The publisher's window\"; --quick's 200 gateways never wait)")  # fmt: skip
    ap.add_argument("--connect-cost", action="store_true",
                    help="only measure the per-connection cost (rate, broker CPU) on each cluster")  # fmt: skip
    ap.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    ap.add_argument(
        "--idle",
        type=float,
        default=0.0,
        help="seconds the connected fleet idles before the group change (the fleet_idle line: its CPU)",
    )
    ap.add_argument(
        "--until",
        choices=("group-change", "end"),
        default="end",
        help="stop after the group change (no events, no kill): the connect and change figures alone",
    )
    ap.add_argument("--rabbitmq-root", type=Path, help="run the RabbitMQ installed in this Debian root (chroot), "
                    "e.g. RabbitMQ 4.0 (`sh bench/rabbitmq4-root.sh /opt/trixie`); default: the system's")  # fmt: skip
    ap.add_argument("--metadata-store", choices=("mnesia", "khepri"), default="mnesia",
                    help="RabbitMQ's metadata store: khepri (feature flag khepri_db) needs RabbitMQ 4.0 or later "
                         "(--rabbitmq-root); docs/scaling.md")  # fmt: skip
    a = ap.parse_args()
    if a.downlink_filter == "one" and "nats" in a.brokers.split(","):
        ap.error("--downlink-filter one needs MQTT 5, which NATS 2.9 does not speak: --brokers rabbitmq")
    if a.rabbitmq_root is not None:
        os.environ["EDGE_RABBITMQ_ROOT"] = str(a.rabbitmq_root)  # tests/rabbitmq.RabbitCluster reads it
    a.gateways = a.gateways or (200 if a.quick else 10_000)
    a.events = a.events or (50 if a.quick else 100)
    a.processes = a.processes or (2 if a.quick else 4)
    a.duration = a.duration or (4.0 if a.quick else 20.0)
    a.ack_timeout = a.ack_timeout or (5.0 if a.quick else 30.0)  # full: the product's default (LinkConfig)
    if a.connect_cost:
        a.gateways = a.gateways if a.gateways != 10_000 else 1000
        sys.exit(asyncio.run(connect_cost(a)))
    a.connect_timeout = 60.0 if a.quick else 600.0
    a.ack_timeout_total = 30.0 if a.quick else 120.0
    a.drain_timeout = 60.0 if a.quick else 600.0
    sys.exit(asyncio.run(amain(a)))


if __name__ == "__main__":
    main()
