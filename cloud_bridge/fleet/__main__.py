"""The fleet's worker processes (run by bench/fleet_cluster.py and tests/test_fleet_cluster.py, not by hand).
Each talks JSON lines: commands on stdin, answers on stdout; diagnostics on stderr.

    python -m cloud_bridge.fleet gateways --spec FILE --index I
        The gateways of worker I in the fleet spec (a JSON file: endpoints, site key, link settings,
        gateways per worker). Prints {"ready": N} once every link is online; answers
        {"cmd": "events", "k": K, "duration": S[, "smooth": true]} -> {"recorded": ...}, then {"drained": ...}
        at depth 0;
        {"cmd": "stats"} -> the fleet's stats; {"cmd": "stop"} or EOF -> {"stopped": ...}.

    python -m cloud_bridge.fleet ingest --spec FILE --shard I
    python -m cloud_bridge.fleet publisher --spec FILE --shard I
        One ingest (or publisher) process for shard I of the spec's sites, on the spec's database. Prints
        {"ready": 1}; {"cmd": "stats"} -> its stats; publisher: {"cmd": "push"} -> {"pushed": gateways};
        {"cmd": "stop"} or EOF -> {"stopped": ...}.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import json
import logging
import resource
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud_bridge.heap import CLOCK, tuned_gc
from cloud_bridge.link import LinkConfig
from cloud_bridge.service.database import Database
from cloud_bridge.settings import LinkSettings

from .ingest import Ingest, sites_of
from .publisher import Publisher
from .sim import Fleet


class Spec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """What every worker of one fleet run shares (written by the bench as JSON)."""

    endpoints: list[tuple[str, int]]
    #: The cloud side's endpoint order (the gateways' own order is rotated per gateway).
    cloud_endpoints: list[tuple[str, int]] = []
    db: str
    site_key: str  # hex of the Ed25519 private key (the bench's throw-away site key)
    #: gateway -> site, for the whole fleet; `workers` lists the gateways of each gateway worker
    roster: dict[str, str]
    workers: list[list[str]]
    shards: int
    link: dict[str, Any] = {}
    #: QoS of the cloud side's subscriptions (ingest, publisher).
    cloud_qos: int = 1
    #: The publishers' own (births, rights replies), when not `cloud_qos`: a lost result only means a resend.
    publisher_qos: int | None = None
    #: QoS of the cloud side's publishes (change sets, event acks): 0 where the application resends.
    cloud_publish_qos: int = 1
    #: Seconds between the publisher's resends of an unacknowledged change set.
    resend_s: float = 5.0
    #: At most this many gateways with an unacknowledged change set per publisher process (0: no limit);
    #: docs/scaling.md, "The publisher's window".
    window: Annotated[int, msgspec.Meta(ge=0)] = 0
    state_dir: str = ""
    #: Seconds between two gateways' first connects in one worker (the fleet's connection ramp).
    stagger_s: float = 0.002


def say(**msg: Any) -> None:
    sys.stdout.write(json.dumps(msg) + "\n")
    sys.stdout.flush()


def raise_nofile() -> int:
    """Raise the open-files limit to its hard limit (a connection is a file descriptor)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


async def _commands(handle: Callable[[dict[str, Any]], Awaitable[bool]]) -> None:
    """Read JSON commands from stdin until EOF or a handler returns False."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = await reader.readline()
        if not line:
            return
        if not await handle(json.loads(line)):
            return


def gc_figures() -> dict[str, Any]:
    """The collector's time in this process so far (`cloud_bridge.heap.CLOCK`): seconds, and collections and
    seconds per generation, the longest collection; its allocation counters (`gc.get_count`, summed); the objects
    frozen out of its sight."""
    return {"s": round(CLOCK.total, 3), "count": CLOCK.count, "seconds": [round(x, 3) for x in CLOCK.seconds],
            "longest": round(CLOCK.longest, 3), "counters": sum(gc.get_count()),
            "frozen": gc.get_freeze_count()}  # fmt: skip


def _key(spec: Spec) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(bytes.fromhex(spec.site_key))


#: The simulated links' keepalive check (`LinkConfig.housekeeping_s`; a gateway's is 1 s): once a second per
#: link is a third of the worker processes' CPU when 10,000 idle links share 4 loops (docs/scaling.md); every
#: 5 s a ping goes out at most 5 s late, well inside the broker's 1.5 x keepalive.
HOUSEKEEPING_S = 5.0

#: The simulator's young-generation threshold once its fleet is connected: 0, no automatic collection. 2,500
#: gateways in one heap keep hundreds of thousands of young objects alive (events awaiting their ack, the links'
#: tasks and futures), so a young collection scans ~500,000 objects of which 80-95 % survive: 20-30 % of the
#: workers' CPU during a change set at a threshold of 20,000, pauses of 1-3 s at 200,000 (docs/scaling.md). On a
#: real gateway that CPU is the gateway's own; here it is taken from the broker nodes on the same 2 cores. What it
#: costs instead is memory: cycles that die are not freed (the `rss_mb` of the bench's lines).
SIM_GEN0_THRESHOLD = 0


def gateway_configs(spec: Spec, index: int) -> list[LinkConfig]:
    """Worker `index`'s gateways; gateway j starts on endpoint j mod n (the cluster's load spread), with the
    other nodes as its failover endpoints."""
    settings = msgspec.convert(spec.link, LinkSettings)
    n = len(spec.endpoints)
    out = []
    for name in spec.workers[index]:
        j = int("".join(ch for ch in name if ch.isdigit()) or "0")
        order = [spec.endpoints[(j + k) % n] for k in range(n)]
        out.append(LinkConfig.of(msgspec.structs.replace(settings, host=order[0][0], port=order[0][1],
                                                         endpoints=[f"{h}:{p}" for h, p in order[1:]]),
                                 site=spec.roster[name], gateway=name, synchronous="OFF",
                                 housekeeping_s=HOUSEKEEPING_S))  # fmt: skip
    return out


async def run_gateways(spec: Spec, index: int) -> None:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    pub = _key(spec).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    state = Path(spec.state_dir or tempfile.mkdtemp(prefix="fleet-")) / f"w{index}"
    cfgs = gateway_configs(spec, index)
    async with Fleet(cfgs, pub, state, stagger_s=spec.stagger_s) as fleet, contextlib.AsyncExitStack() as stack:
        t0 = last = time.monotonic()
        while fleet.online() < len(cfgs):
            await asyncio.sleep(0.1)
            if time.monotonic() - last >= 5:
                last = time.monotonic()
                say(online=fleet.online(), of=len(cfgs), at_s=round(last - t0, 1), attempts=fleet.attempts())
        say(ready=len(cfgs), connect_s=round(time.monotonic() - t0, 3), attempts=fleet.attempts())
        tasks: set[asyncio.Task[None]] = set()
        # thousands of connected links out of the collector's sight, and no automatic collection from here on
        stack.enter_context(tuned_gc(SIM_GEN0_THRESHOLD))

        async def drained(recorded: int) -> None:
            while fleet.depth() > 0 or sum(g.outbox.recorded for g in fleet.gateways) < recorded:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
            say(drained=time.time(), depth=0)

        async def handle(cmd: dict[str, Any]) -> bool:
            if cmd["cmd"] == "events":
                before = sum(g.outbox.recorded for g in fleet.gateways)
                k, duration = int(cmd["k"]), float(cmd.get("duration", 0))
                await fleet.record_events(k, duration_s=duration, steps=int(cmd.get("steps", 10)),
                                          smooth=bool(cmd.get("smooth", False)))  # fmt: skip
                say(recorded=sum(g.outbox.recorded for g in fleet.gateways) - before)
                t = asyncio.get_running_loop().create_task(drained(before + k * len(cfgs)))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
            elif cmd["cmd"] == "stats":
                say(stats=fleet.stats())
            elif cmd["cmd"] == "gc":
                say(gc=gc_figures())
            elif cmd["cmd"] == "stop":
                return False
            return True

        await _commands(handle)
        say(stopped=len(cfgs), online=fleet.online())


async def run_cloud(spec: Spec, role: str, shard: int) -> None:
    db = Database(spec.db, pool_size=4)
    sites = sites_of(sorted(set(spec.roster.values())), shard, spec.shards)
    version = spec.link.get("mqtt_version", "5")
    endpoints = spec.cloud_endpoints or spec.endpoints
    worker: Ingest | Publisher
    if role == "ingest":
        worker = Ingest(db, endpoints=endpoints, sites=sites, signing_key=_key(spec), version=version,
                        identifier=f"acs-ingest-{shard}", qos=spec.cloud_qos,
                        ack_qos=spec.cloud_publish_qos)  # fmt: skip
    else:
        roster = {g: s for g, s in spec.roster.items() if s in set(sites)}
        worker = Publisher(db, endpoints=endpoints, roster=roster, signing_key=_key(spec), version=version,
                           identifier=f"acs-publisher-{shard}",
                           qos=spec.cloud_qos if spec.publisher_qos is None else spec.publisher_qos,
                           publish_qos=spec.cloud_publish_qos, resend_s=spec.resend_s,
                           window=spec.window)  # fmt: skip
    task = asyncio.get_running_loop().create_task(worker.run(), name=role)
    stack = contextlib.ExitStack()
    try:
        while not worker.stats.connects:
            if task.done():
                task.result()
            await asyncio.sleep(0.05)
        say(ready=1, sites=len(sites))
        stack.enter_context(tuned_gc())

        async def handle(cmd: dict[str, Any]) -> bool:
            if cmd["cmd"] == "stats":
                out: dict[str, Any] = dataclasses.asdict(worker.stats)
                if isinstance(worker, Publisher):
                    if cmd.get("brief"):  # polled while a change goes out: counts, not 5,000 gateways' times
                        out["acked_versions"] = Counter(v for vs in worker.acked_at.values() for v in vs)
                    else:
                        out["acked_at"] = worker.acked_at
                        out["births"] = worker.births
                say(stats=out)
            elif cmd["cmd"] == "gc":
                say(gc=gc_figures())
            elif cmd["cmd"] == "push" and isinstance(worker, Publisher):
                say(pushed=await worker.push(), at=time.time())
            elif cmd["cmd"] == "stop":
                return False
            return True

        await _commands(handle)
    finally:
        stack.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        if isinstance(worker, Publisher):
            await worker.flush()
        await db.close()
        say(stopped=1)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m cloud_bridge.fleet")
    ap.add_argument("role", choices=["gateways", "ingest", "publisher"])
    ap.add_argument("--spec", required=True)
    ap.add_argument("--index", type=int, default=0)
    ap.add_argument("--shard", type=int, default=0)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format=f"{a.role}: %(name)s %(message)s")
    # the link logs every lost connection: with thousands of gateways, once per kind is enough on stderr
    logging.getLogger("cloud_bridge.link").setLevel(logging.ERROR)
    raise_nofile()
    spec = msgspec.json.decode(Path(a.spec).read_bytes(), type=Spec)
    if a.role == "gateways":
        asyncio.run(run_gateways(spec, a.index))
    else:
        asyncio.run(run_cloud(spec, a.role, a.shard))


if __name__ == "__main__":
    main()
