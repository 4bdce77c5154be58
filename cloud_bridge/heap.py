"""The process's garbage collector: its pauses counted (`CLOCK`), and tuned for a long-running process
(`tuned_gc`).

`tuned_gc` is what a long-running cloud process does once it has started (the HTTP service; the fleet's ingest,
publisher and simulator processes): the objects loaded at start (modules, the app, the site, thousands of
simulated links) are moved out of the collector's sight (`gc.freeze`) and the young generation is collected less
often, so that a full collection no longer walks the whole heap in the middle of a request or a change set.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger("cloud_bridge.gc")

#: gen-0 threshold while `tuned_gc` holds (CPython's default is 700 allocations; 2,000 in 3.13's incremental GC)
GEN0_THRESHOLD = 20_000


class GcClock:
    """Seconds spent in collections since start (`gc.callbacks`), in all and per generation, with how many
    and the longest; gen-2 ones over 20 ms are logged."""

    def __init__(self) -> None:
        self.total = 0.0
        #: collections and seconds per generation (0, 1, 2)
        self.count = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        #: the longest collection so far (seconds)
        self.longest = 0.0
        self._t = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._t = time.perf_counter()
            return
        dt = time.perf_counter() - self._t
        self.total += dt
        g = info.get("generation", 2)
        self.count[g] += 1
        self.seconds[g] += dt
        self.longest = max(self.longest, dt)
        if g == 2 and dt > 0.02:
            log.info("gen-2 collection took %.1f ms (%d collected)", dt * 1000, info.get("collected", 0))


CLOCK = GcClock()
if CLOCK not in gc.callbacks:
    gc.callbacks.append(CLOCK)


@contextmanager
def tuned_gc(gen0: int = GEN0_THRESHOLD) -> Iterator[None]:
    """While the process runs: freeze what start allocated and collect the young generation less often; on
    the way out the collector is as it was (a service embedded in another process, e.g. the tests, leaves no
    frozen heap and no changed threshold behind).

    `gen0`: the young generation's threshold while it holds (0: no automatic collection).
    CLOUD_BRIDGE_GC=default leaves CPython's collector as it is (for a before/after measurement)."""
    if os.environ.get("CLOUD_BRIDGE_GC") == "default":
        yield
        return
    before = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(gen0, before[1], before[2])
    try:
        yield
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()
