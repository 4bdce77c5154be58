"""The short fleet scenario of bench/fleet_cluster.py (`--quick`: 200 gateways on a 3-node RabbitMQ cluster and
on a 3-node NATS cluster, one node SIGKILLed while events flow): every gateway connected, acknowledged the
change set and reconnected after the kill; every event journalled is in PostgreSQL exactly once (0 missing,
0 duplicate rows); the killed node came back and the cluster is healthy; nothing of either cluster is left
running."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _ours_running() -> list[str]:
    """Broker processes started from our throw-away folders (edge-rmq-* / edge-nats-* / fleet-cluster-*)."""
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines()
            if ("fleet-cluster-" in line or "edge-rmq-" in line) and ("beam" in line or "nats-server" in line)]


RABBITMQ_4_ROOT = Path("/opt/trixie")  # sh bench/rabbitmq4-root.sh (run by .ci/bootstrap)


def quick_run(*args: str) -> tuple[dict[tuple[str, str | None], dict[str, Any]], subprocess.CompletedProcess[str]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "fleet_cluster.py"), "--quick", *args],
                       capture_output=True, text=True, env=env, timeout=880, check=False)  # fmt: skip
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert not [x for x in lines if x["metric"] == "error"], r.stdout + r.stderr[-3000:]
    return {(x["metric"], x.get("broker")): x for x in lines}, r


def check_broker(by: dict[tuple[str, str | None], dict[str, Any]], b: str) -> None:
    assert by[("gateways_connected", b)]["value"] == 200
    g = by[("group_change_ack_s", b)]
    assert g["acked"] == 200 and g["p100"] is not None
    e = by[("events_ingested", b)]
    assert e["expected"] >= 200 * 50 and e["stored"] == e["expected"]
    assert e["missing"] == 0 and e["duplicate_rows"] == 0 and e["seq_beyond_journal"] == 0 and e["drained"]
    k = by[("reconnect_after_kill_s", b)]
    assert k["gateways"] > 0 and k["not_reconnected"] == 0
    assert by[("node_restarted", b)]["healthy"] is True
    assert by[("side_by_side", None)][b]["ok"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quick_fleet_on_rabbitmq_and_nats_loses_no_event() -> None:
    """Debian 12's RabbitMQ 3.10 and NATS 2.9."""
    by, r = quick_run()
    for b in ("rabbitmq", "nats"):
        check_broker(by, b)
    assert by[("side_by_side", None)]["rabbitmq"]["version"].startswith("3.")
    assert r.returncode == 0, r.stderr[-3000:]
    assert _ours_running() == []


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quick_fleet_on_rabbitmq_4_loses_no_event() -> None:
    """RabbitMQ 4.0 (native MQTT), from the Debian 13 root `.ci/bootstrap` makes (bench/rabbitmq4-root.sh)."""
    assert (RABBITMQ_4_ROOT / "usr/lib/rabbitmq/bin/rabbitmq-server").exists(), \
        f"no RabbitMQ 4 root at {RABBITMQ_4_ROOT}: sh bench/rabbitmq4-root.sh {RABBITMQ_4_ROOT} (sh .ci/bootstrap does)"
    by, r = quick_run("--brokers", "rabbitmq", "--rabbitmq-root", str(RABBITMQ_4_ROOT))
    check_broker(by, "rabbitmq")
    assert by[("side_by_side", None)]["rabbitmq"]["version"].startswith("4.")
    assert r.returncode == 0, r.stderr[-3000:]
    assert _ours_running() == []
