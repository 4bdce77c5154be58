"""Crash safety: a process applying change sets is SIGKILLed at random moments, many times.

After every restart the store must hold whole change sets only (each version's card range complete,
the previous user's cards all revoked), and the rights version never goes back.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
from pathlib import Path

from edge.decision import Decider
from edge.index import STATUS_CODES
from edge.model import CredentialStatus
from edge.store import Store

from .crash_apply import K

ROUNDS = 12


async def check(path: Path) -> int:
    async with Store(path, "UTC") as store:
        v = store.version
        idx = store.index
        revoked = STATUS_CODES[CredentialStatus.REVOKED]
        for w in range(1, v + 1):
            rows = [idx.cred(w * 10_000 + i) for i in range(K)]
            assert all(r is not None for r in rows), f"version {w}: partial card range"
            statuses = {r[1] for r in rows if r is not None}
            expected = {revoked} if w < v else {0}
            assert statuses == expected, f"version {w} of {v}: statuses {statuses}"
        assert idx.cred((v + 1) * 10_000) is None, "cards of an uncommitted change set are visible"
        assert len(idx) == v * K
        d = Decider(idx)
        if v:
            assert d.decide("d", v * 10_000, __import__("datetime").datetime.now().astimezone()).granted
        return v


async def test_sigkill_during_apply_never_tears_a_change_set(tmp_path: Path) -> None:
    path = tmp_path / "rights.db"
    rng = random.Random(1234)
    last_committed = 0
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    kills_mid_run = 0
    for _ in range(ROUNDS):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.crash_apply", str(path),
            stdout=asyncio.subprocess.PIPE, cwd=Path(__file__).resolve().parent.parent, env=env,
        )  # fmt: skip
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert line.startswith(b"open "), line
        assert int(line.split()[1]) >= last_committed
        await asyncio.sleep(rng.uniform(0.02, 0.6))
        proc.send_signal(signal.SIGKILL)
        out = await proc.stdout.read()
        await proc.wait()
        committed = [int(x.split()[1]) for x in out.splitlines() if x.startswith(b"committed ")]
        if committed:
            last_committed = max(last_committed, committed[-1])
            kills_mid_run += 1
        v = await check(path)
        # Printed means committed: the version on disk is at least that, and never goes back.
        assert v >= last_committed
        last_committed = v
    assert last_committed >= 3, "the subprocess never got far enough to test anything"
    assert kills_mid_run >= ROUNDS // 2
