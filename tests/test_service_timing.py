"""The Server-Timing header (service/timing.py): on every response, the handler's time and the GC's part."""

from __future__ import annotations

import asyncio
import gc
import re

import pytest
from litestar import Litestar, get
from litestar.testing import TestClient

from cloud_bridge.service.timing import GEN0_THRESHOLD, server_timing, tuned_gc

TIMING = re.compile(r"^app;dur=([0-9.]+), gc;dur=([0-9.]+)$")


@get("/slow")
async def slow() -> str:
    await asyncio.sleep(0.05)
    return "ok"


@get("/collect", sync_to_thread=False)
def collect() -> str:
    junk = [[i] for i in range(200_000)]
    gc.collect()
    return str(len(junk))


def test_header_holds_handler_and_gc_time() -> None:
    app = Litestar([slow, collect], middleware=[server_timing])
    with TestClient(app) as c:
        r = c.get("/slow")
        m = TIMING.match(r.headers["server-timing"])
        assert m, r.headers.get("server-timing")
        assert 50 <= float(m.group(1)) < 1000 and float(m.group(2)) < 50
        r = c.get("/collect")
        m = TIMING.match(r.headers["server-timing"])
        assert m and float(m.group(2)) > 0 and float(m.group(2)) <= float(m.group(1))


def test_the_tuned_collector_is_given_back_as_it_was(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CLOUD_BRIDGE_GC", raising=False)
    before, frozen = gc.get_threshold(), gc.get_freeze_count()
    with tuned_gc():
        assert gc.get_threshold()[0] == GEN0_THRESHOLD
        assert gc.get_freeze_count() > frozen  # what was loaded before is out of the collector's sight
    assert gc.get_threshold() == before and gc.get_freeze_count() == frozen
    with tuned_gc(123_456):  # the fleet simulator's (cloud_bridge/fleet/__main__.py: SIM_GEN0_THRESHOLD)
        assert gc.get_threshold() == (123_456, before[1], before[2])
    assert gc.get_threshold() == before
    monkeypatch.setenv("CLOUD_BRIDGE_GC", "default")
    with tuned_gc():
        assert gc.get_threshold() == before and gc.get_freeze_count() == frozen
