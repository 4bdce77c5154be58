"""The gateway killed with SIGKILL mid-upload and mid-snapshot, then restarted: nothing lost, store whole."""

# ruff: noqa: F811  (pytest fixtures imported from tests.broker are used as parameters)

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud_bridge.signing import public_bytes
from edge.model import Credential, Door, Group, Snapshot, User
from edge.store import Store

from .broker import broker, cloud_peer, site_key, unique  # noqa: F401
from .mosquitto import Mosquitto

ROOT = Path(__file__).resolve().parent.parent


async def spawn(
    state: Path, broker: Mosquitto, site: str, gw: str, key: Ed25519PrivateKey, rate: float
) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.link_agent", str(state), str(broker.port), site, gw,
        public_bytes(key).hex(), str(rate), stdout=asyncio.subprocess.PIPE, cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )  # fmt: skip
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 30)
    assert line.startswith(b"ready"), line
    return proc


async def kill(proc: asyncio.subprocess.Process) -> None:
    proc.send_signal(signal.SIGKILL)
    await proc.wait()


async def test_sigkill_mid_upload_loses_nothing(broker: Mosquitto, tmp_path: Path, site_key: Ed25519PrivateKey) -> None:
    site, gw = unique("s"), "gw1"
    rng = random.Random(7)
    state = tmp_path / "gw"
    async with cloud_peer(broker, site_key, site=site, gw=gw) as cloud:
        for _ in range(5):
            proc = await spawn(state, broker, site, gw, site_key, rate=400)
            await asyncio.sleep(rng.uniform(0.3, 1.2))
            await kill(proc)
        last = cloud.births[-1].session if cloud.births else 0
        proc = await spawn(state, broker, site, gw, site_key, rate=0)  # no more taps: drain
        try:
            await cloud.wait_online(after=last)
            # drained: everything acknowledged and nothing new for a while
            seen = -1
            while seen != len(cloud.batches) or not _drained(cloud):
                seen = len(cloud.batches)
                await asyncio.sleep(1.0)
        finally:
            await kill(proc)
    seqs = [e.seq for e in cloud.events.values()]
    assert len(seqs) > 500, "too few events to test anything"
    # every durable event arrived once per id, in order of first arrival; no hole in the sequence
    assert seqs == sorted(seqs)
    assert set(seqs) == set(range(1, max(seqs) + 1))
    by_seq: dict[int, str] = {}
    for e in cloud.events.values():
        assert by_seq.setdefault(e.seq, e.id) == e.id
    from edge.journal import Journal

    # rows still in the journal (an ack not yet processed when the last process was killed) are ones the
    # cloud already has: they will be sent again and de-duplicated, never lost
    async with Journal(state / "journal.db") as j:
        left = await j.read(0, 100_000)
    assert {e.id for e in left} <= set(cloud.events)


def _drained(cloud: object) -> bool:
    from cloud_bridge.cloud import CloudPeer

    assert isinstance(cloud, CloudPeer)
    b = cloud.status
    # the last birth reported an empty journal, or everything sent has been acknowledged by now
    return cloud.have_upto >= max(e.seq for e in cloud.events.values()) and b is not None


def big_snapshot(version: int, n: int) -> Snapshot:
    users = [User(id=f"u{i}", assignments=[]) for i in range(n // 10)]
    return Snapshot(
        version=version, doors=[Door(id="front")], groups=[Group(id="g", doors=["front"])], users=users,
        credentials=[Credential(card=1_000_000 + i, user=f"u{i % len(users)}") for i in range(n)],
    )  # fmt: skip


async def test_sigkill_mid_snapshot_keeps_the_store_whole(
    broker: Mosquitto, tmp_path: Path, site_key: Ed25519PrivateKey
) -> None:
    site, gw = unique("s"), "gw1"
    rng = random.Random(11)
    state = tmp_path / "gw"
    n = 50_000
    snap = big_snapshot(5, n)
    async with cloud_peer(broker, site_key, site=site, gw=gw, max_message_bytes=16384, resend_s=1.0) as cloud:
        proc = await spawn(state, broker, site, gw, site_key, rate=50)
        sender = asyncio.get_running_loop().create_task(cloud.send_snapshot(snap, timeout=120))
        kills = 0
        try:
            while not sender.done() and kills < 6:
                await asyncio.wait({sender}, timeout=rng.uniform(0.05, 0.5))
                if sender.done():
                    break
                await kill(proc)
                kills += 1
                async with Store(state / "rights.db", "UTC") as store:  # consistent after every kill
                    c = await store.counts()
                    assert (store.version, c["credentials"]) in ((0, 0), (5, n)), (store.version, c)
                proc = await spawn(state, broker, site, gw, site_key, rate=50)
            result = await asyncio.wait_for(sender, 120)
        finally:
            await kill(proc)
    assert kills >= 2, "the snapshot finished before the test could interrupt it"
    assert result.ok and result.version == 5
    async with Store(state / "rights.db", "UTC") as store:
        assert store.version == 5 and (await store.counts())["credentials"] == n
        assert store.index.cred(1_000_000 + n - 1) is not None
