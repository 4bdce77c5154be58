"""Every benchmark still runs (`--quick`) and prints what bench/README.md promises: one JSON object per line
with `metric`, a finite numeric `value`, `unit` and `params`. No figure is judged here: speed targets are
read from the benchmarks' output, never asserted by tests."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHES = sorted(p.stem for p in (ROOT / "bench").glob("*.py")
                 if p.stem not in ("population", "fleetsim", "legacy_index", "soak_fuzz", "soak_kill",
                                   "fleet_cluster"))  # fmt: skip
# population.py is the decide bench's data generator, legacy_index.py the index layout before issue 18 that
# it measures beside the current one, fleetsim.py the fleet bench's worker process; the soak scripts run (and
# their failure counters are asserted) in tests/test_soak.py; fleet_cluster.py --quick (3-node RabbitMQ and
# NATS clusters) runs, with its figures asserted, in tests/test_fleet_cluster.py.
EXPECTED = {
    "decide": {"decide_p99", "decide_rules_p99", "changeset_apply_time", "changeset_loop_stall_max"},
    "tap": {"tap_to_relay_p99.idle.adaptive", "tap_to_relay_p99.loaded.adaptive", "tap_to_relay_p99.loaded.fixed"},
    "sync": {"first_sync", "tap_p99_during_snapshot"},
    "wiegand_decode": {"valid_frames_decoded", "corrupted_frames_cardreads"},
    "osdp": {"exchanges_per_second"},
    "fleet": {"import_total_s", "group_change_ack_s", "events_collected_rate"},
    "tables": {"tables_apply_loop_lag_max", "tables_small_change_loop_lag_max"},
    "events_stream": {"tap_to_sse_p99.sqlite", "tap_to_sse_p99.postgresql", "events_list_p99.sqlite.filtered",
                      "events_list_p99.sqlite.all", "events_list_p99.postgresql.filtered",
                      "events_list_p99.postgresql.all"},
    "operator_import": {"import_dry_run", "import_commit_publish_ack"},
    "operator": {"users_search_p99", "events_filter_user_p99", "concurrent_p99", "concurrent_errors"},
    "installer": {"tap_to_relay_p99.installer_none.adaptive", "tap_to_relay_p99.installer_polled.adaptive",
                  "installer_tap_p99_delta"},
    "console": {"console_page_p99_max.sqlite", "console_page_p99_max.postgresql"},
}


def test_every_bench_is_covered() -> None:
    assert set(BENCHES) == set(EXPECTED), "a new bench/*.py: add it to EXPECTED"


def run_bench(name: str, timeout: float = 280.0) -> subprocess.CompletedProcess[str]:
    """`bench/NAME.py --quick`; a run still going after `timeout` s is sent SIGABRT, which faulthandler
    (PYTHONFAULTHANDLER) answers with every thread's stack on stderr: the failure says where it hung."""
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}
    with subprocess.Popen([sys.executable, str(ROOT / "bench" / f"{name}.py"), "--quick"], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as p:  # fmt: skip
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGABRT)
            out, err = p.communicate(timeout=30)
            pytest.fail(f"bench/{name}.py --quick still running after {timeout:.0f} s; its stacks:\n{err[-6000:]}")
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


@pytest.mark.timeout(360)
@pytest.mark.parametrize("name", BENCHES)
def test_bench_quick_run_prints_json_figures(name: str) -> None:
    r = run_bench(name)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    assert lines, "no figures printed"
    metrics = set()
    for ln in lines:
        obj = json.loads(ln)
        assert set(obj) == {"metric", "value", "unit", "params"}, obj
        assert isinstance(obj["metric"], str) and isinstance(obj["unit"], str) and isinstance(obj["params"], dict)
        assert isinstance(obj["value"], int | float) and math.isfinite(obj["value"]), obj
        metrics.add(obj["metric"])
    assert EXPECTED[name] <= metrics, EXPECTED[name] - metrics
