"""Cloud link benchmarks over a loopback Mosquitto (JSON lines on stdout).

    .venv/bin/python bench/sync.py [--quick]

Gateway (Store + Journal + CloudLink) and cloud peer run in this one process, on one event loop, as the
worst case for the tap path; snapshot chunks are encoded before the clock starts (that is the cloud's work).

Metrics:
  * first_sync: a snapshot of N credentials, first chunk sent -> the gateway's applied result received
    (100k, and 1M without --quick).
  * delta_apply: credential changes per second, change sets of 2,000 sent back to back (each after the
    previous one's result), sustained over 100k changes (20k with --quick).
  * event_upload: events per second after an outage: N events journalled while no cloud listens, then the
    cloud comes and the journal is drained (until depth 0).
  * tap_p99_during_snapshot: a simulated tap every 5 ms (timer -> decision on the live index) while a 100k
    snapshot is staged and applied: lateness of the decision after the tap's due time, p50/p99/max.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud_bridge.cloud import CloudPeer, chunk_snapshot
from cloud_bridge.link import CloudLink, LinkConfig
from cloud_bridge.signing import public_bytes
from edge.decision import Decider
from edge.journal import Journal
from edge.model import ChangeSet, Credential, Door, Group, PutCredential, Snapshot, User
from edge.store import Store
from tests.broker import RecordingCommands, birth_info
from tests.mosquitto import Mosquitto

KEY = Ed25519PrivateKey.generate()


def emit(metric: str, value: float, unit: str, **params: Any) -> None:
    print(json.dumps({"metric": metric, "value": round(value, 4), "unit": unit, "params": params}), flush=True)


def snapshot(version: int, n: int) -> Snapshot:
    users = [User(id=f"u{i}") for i in range(max(1, n // 4))]
    nu = len(users)
    return Snapshot(
        version=version,
        doors=[Door(id="front")],
        groups=[Group(id="g", doors=["front"])],
        users=users,
        credentials=[Credential(card=10_000_000 + i, user=f"u{i % nu}") for i in range(n)],
    )


class Rig:
    def __init__(self, broker: Mosquitto, state: Path, site: str) -> None:
        self.broker, self.state, self.site = broker, state, site
        self.cfg = LinkConfig(site=site, gateway="gw1", host=broker.host, port=broker.port, backoff_min_s=0.05,
                              backoff_max_s=0.2, synchronous="NORMAL", batch_events=2000, window=8)  # fmt: skip

    async def __aenter__(self) -> Rig:
        holder: list[CloudLink] = []
        self.store = await Store(self.state / "rights.db", "UTC", synchronous="NORMAL").__aenter__()
        self.journal = await Journal(
            self.state / "journal.db", link_up=lambda: bool(holder) and holder[0].online, synchronous="NORMAL",
            max_events=2_000_000, memory_limit=2_000_000, batch=5000,
        ).__aenter__()  # fmt: skip
        self.link = await CloudLink(
            self.cfg, store=self.store, journal=self.journal, commands=RecordingCommands({"front"}),
            birth=birth_info, site_public_key=public_bytes(KEY), state_dir=self.state,
        ).__aenter__()  # fmt: skip
        holder.append(self.link)
        self.task = asyncio.get_running_loop().create_task(self.link.run(), name="link")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.task.cancel()
        try:
            await self.task
        except asyncio.CancelledError:
            pass
        await self.link.__aexit__(None, None, None)
        await self.journal.close()
        await self.store.close()

    def cloud(self, **kw: Any) -> CloudPeer:
        return CloudPeer(host=self.broker.host, port=self.broker.port, site=self.site, gateway="gw1",
                         signing_key=KEY, resend_s=120, **kw)  # fmt: skip


async def first_sync(broker: Mosquitto, tmp: Path, n: int) -> None:
    async with Rig(broker, tmp / f"fs{n}", f"fs{n}") as rig, rig.cloud() as cloud:
        await cloud.wait_online()
        chunks = chunk_snapshot(snapshot(1, n), "t1", cloud.max_message_bytes)
        t0 = time.perf_counter()
        r = await cloud.send_chunks("t1", chunks, version=1, timeout=600)
        dt = time.perf_counter() - t0
        assert r.ok and r.version == 1, r
        assert len(rig.store.index) == n
        emit("first_sync", dt, "s", credentials=n, chunks=len(chunks), chunk_bytes=cloud.max_message_bytes)


async def delta_apply(broker: Mosquitto, tmp: Path, total: int, per_set: int = 2000) -> None:
    async with Rig(broker, tmp / "delta", "delta") as rig, rig.cloud() as cloud:
        await cloud.wait_online()
        r = await cloud.send_snapshot(snapshot(1, 1000))
        assert r.ok
        v = 1
        sets = []
        for k in range(total // per_set):
            base = 20_000_000 + k * per_set
            sets.append(ChangeSet(from_version=v, to_version=v + 1, changes=[
                PutCredential(credential=Credential(card=base + i, user=f"u{i % 250}")) for i in range(per_set)
            ]))  # fmt: skip
            v += 1
        t0 = time.perf_counter()
        for cs in sets:
            r = await cloud.send_change_set(cs)
            assert r.ok and r.applied, r
        dt = time.perf_counter() - t0
        emit("delta_apply", total / dt, "changes/s", changes=total, per_set=per_set, seconds=round(dt, 3))


async def event_upload(broker: Mosquitto, tmp: Path, n: int) -> None:
    async with Rig(broker, tmp / "events", "events") as rig:
        for i in range(n):
            rig.journal.record("access.granted", door="front", card=i, user="u1", reason="granted")
            if i % 5000 == 0:
                await asyncio.sleep(0)
        await rig.journal.flush()
        assert rig.journal.depth >= n
        async with rig.cloud() as cloud:
            t0 = time.perf_counter()
            await cloud.wait_for(lambda: rig.journal.depth == 0, 600, poll_s=0.005)
            dt = time.perf_counter() - t0
            assert len(cloud.events) >= n
        emit("event_upload", n / dt, "events/s", events=n, seconds=round(dt, 3), batch=rig.cfg.batch_events)


async def tap_during_snapshot(broker: Mosquitto, tmp: Path, n: int) -> None:
    async with Rig(broker, tmp / "tap", "tap") as rig, rig.cloud() as cloud:
        await cloud.wait_online()
        assert (await cloud.send_snapshot(snapshot(1, 1000))).ok
        decider = Decider(rig.store.index)
        rig.store.on_swap.append(lambda idx: setattr(decider, "index", idx))
        chunks = chunk_snapshot(snapshot(2, n), "t2", cloud.max_message_bytes)
        loop = asyncio.get_running_loop()
        lateness: list[float] = []
        stop = asyncio.Event()

        async def taps() -> None:
            i = 0
            while not stop.is_set():
                due = loop.time() + 0.005
                await asyncio.sleep(max(0.0, due - loop.time()))
                decider.decide("front", 10_000_000 + (i % 1000), datetime.now(UTC))
                lateness.append((loop.time() - due) * 1000)
                i += 1

        t = loop.create_task(taps())
        r = await cloud.send_chunks("t2", chunks, version=2, timeout=600)
        stop.set()
        await t
        assert r.ok and r.version == 2
        q = statistics.quantiles(lateness, n=100)
        emit("tap_p99_during_snapshot", q[98], "ms", p50=round(q[49], 3), max=round(max(lateness), 3),
             taps=len(lateness), credentials=n)  # fmt: skip


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    sys.setswitchinterval(0.0005)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        broker = Mosquitto(tmp / "broker", extra="message_size_limit 0")
        broker.start()
        try:
            await first_sync(broker, tmp, 100_000)
            if not args.quick:
                await first_sync(broker, tmp, 1_000_000)
            await delta_apply(broker, tmp, 20_000 if args.quick else 100_000)
            await event_upload(broker, tmp, 20_000 if args.quick else 100_000)
            await tap_during_snapshot(broker, tmp, 100_000)
        finally:
            broker.stop()


if __name__ == "__main__":
    asyncio.run(main())
