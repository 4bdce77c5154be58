"""The soak scripts (issue 11), short runs: bench/soak_fuzz.py --quick (53,000 fuzzed downlink payloads, 3,000
of them through a real Mosquitto to a live gateway link) and bench/soak_kill.py --quick (50 SIGKILLs during
change sets, snapshots and journaling). Their failure counters are correctness counts, asserted to be 0;
their speed figures are printed, never judged here."""

from __future__ import annotations

import importlib.util
import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from edge.journal import Journal
from edge.store import Store

ROOT = Path(__file__).resolve().parent.parent


def run(script: str) -> dict[str, dict[str, Any]]:
    r = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--quick"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, check=False)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    out = {}
    for ln in r.stdout.splitlines():
        obj = json.loads(ln)
        assert set(obj) == {"metric", "value", "unit", "params"}, obj
        out[obj["metric"]] = obj
    return out


def test_fuzzed_downlink_payloads_crash_nothing_kill_no_link_and_grant_nothing() -> None:
    m = run("soak_fuzz.py")
    assert m["fuzz_decoder_inputs"]["value"] == 50_000
    assert m["fuzz_decoder_crashes"]["value"] == 0, m["fuzz_decoder_crashes"]["params"]
    assert m["fuzz_store_crashes"]["value"] == 0, m["fuzz_store_crashes"]["params"]
    assert m["fuzz_store_crashes"]["params"]["outcomes"].get("applied", 0) > 0  # mutants did reach the store
    assert m["fuzz_live_payloads"]["value"] == 3000
    assert m["fuzz_live_link_deaths"]["value"] == 0
    assert m["fuzz_live_handler_errors"]["value"] == 0
    assert m["fuzz_live_wrong_grants"]["value"] == 0, m["fuzz_live_wrong_grants"]["params"]
    assert m["fuzz_live_events_lost"]["value"] == 0, m["fuzz_live_events_lost"]["params"]
    # the stream really was decoded and refused by the gateway, and the real cloud kept provisioning it
    assert m["fuzz_live_payloads"]["params"]["link_stats"]["refused"] >= 3000
    assert m["fuzz_live_wrong_grants"]["params"]["rights_version"] > 2
    assert m["fuzz_live_wrong_grants"]["params"]["taps"]["fuzz"] > 0


def test_sigkills_never_half_apply_never_go_back_never_lose_an_event() -> None:
    m = run("soak_kill.py")
    assert m["kills"]["value"] == 50 and m["kills"]["params"]["child_failed"] == 0
    assert m["half_applied"]["value"] == 0
    assert m["version_back"]["value"] == 0
    assert m["lost_events"]["value"] == 0
    assert m["lost_events"]["params"]["acked_present"] == 0 and m["lost_events"]["params"]["seq_reused"] == 0
    # the kills landed during the work, not only between
    assert m["half_applied"]["params"]["change_sets"] > 0 and m["half_applied"]["params"]["snapshots"] > 0
    assert m["lost_events"]["params"]["acks"] > 0


def _soak_kill() -> ModuleType:
    spec = importlib.util.spec_from_file_location("soak_kill", ROOT / "bench" / "soak_kill.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


async def test_the_kill_checker_sees_a_torn_change_set_and_a_lost_event(tmp_path: Path) -> None:
    """The counters are not vacuous: a store missing one row of its version and a journal missing one durable
    event are both counted."""
    sk = _soak_kill()
    async with Store(tmp_path / "rights.db", "UTC") as store, Journal(tmp_path / "journal.db") as journal:
        for v in range(3):
            await store.apply(sk.change_set(v))
        for i in range(10):
            journal.record("soak.event", card=i)
        await journal.flush()
    tr = sk.Tracker()
    for ln in ("open 0 1", "committed 3", "durable 10", "acking 4", "acked 4"):
        tr.line(ln)
    with sqlite3.connect(tmp_path / "journal.db") as db:
        db.execute("DELETE FROM events WHERE seq IN (2, 7)")  # 2 was acked (allowed), 7 was not
    await sk.check(tmp_path, tr)
    assert tr.counts["half_applied"] == 0 and tr.counts["lost_events"] == 1
    assert tr.counts["acked_present"] == 3  # 1, 3, 4: "acked 4" was fed, no ack ran
    with sqlite3.connect(tmp_path / "rights.db") as db:
        db.execute("DELETE FROM credentials WHERE card = ?", (sk.marker(3)[5],))
    await sk.check(tmp_path, tr)
    assert tr.counts["half_applied"] == 1
