"""Per-request server time as a `Server-Timing` header, and the process's garbage-collector pauses.

Every HTTP response carries `Server-Timing: app;dur=<ms>, gc;dur=<ms>`: `app` from the request reaching the
application to its response starting (the handler, its database calls and the encoding), `gc` the part of it
the Python garbage collector held the process (every generation, counted by `gc.callbacks`). A slow request in
a client's figures is thereby the server's or not, and the server's is the collector's or not.

`tuned_gc` is what the service does after start: the objects loaded at start (modules, the app, the site) are
moved out of the collector's sight (`gc.freeze`) and the young generation is collected less often, so a full
collection no longer walks the whole heap in the middle of a request.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("cloud_bridge.service.gc")

#: gen-0 threshold while `tuned_gc` holds (CPython's default is 700 allocations; 2,000 in 3.13's incremental GC)
GEN0_THRESHOLD = 20_000


class GcClock:
    """Total seconds spent in collections since start (`gc.callbacks`); gen-2 ones over 20 ms are logged."""

    def __init__(self) -> None:
        self.total = 0.0
        self.full = 0
        self._t = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._t = time.perf_counter()
            return
        dt = time.perf_counter() - self._t
        self.total += dt
        if info.get("generation") == 2:
            self.full += 1
            if dt > 0.02:
                log.info("gen-2 collection took %.1f ms (%d collected)", dt * 1000, info.get("collected", 0))


CLOCK = GcClock()
if CLOCK not in gc.callbacks:
    gc.callbacks.append(CLOCK)


@contextmanager
def tuned_gc() -> Iterator[None]:
    """While the service runs: freeze what start allocated and collect the young generation less often; on
    the way out the collector is as it was (a service embedded in another process, e.g. the tests, leaves no
    frozen heap and no changed threshold behind).

    CLOUD_BRIDGE_GC=default leaves CPython's collector as it is (for a before/after measurement)."""
    if os.environ.get("CLOUD_BRIDGE_GC") == "default":
        yield
        return
    before = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(GEN0_THRESHOLD, before[1], before[2])
    try:
        yield
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()


def server_timing(app: ASGIApp) -> ASGIApp:
    """ASGI middleware: the `Server-Timing` header on every HTTP response (see the module's text)."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:  # a websocket has no response headers
            await app(scope, receive, send)
            return
        t0, gc0 = time.perf_counter(), CLOCK.total

        async def timed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                dur = (time.perf_counter() - t0) * 1000
                value = f"app;dur={dur:.2f}, gc;dur={(CLOCK.total - gc0) * 1000:.2f}".encode()
                message["headers"] = [*message.get("headers", ()), (b"server-timing", value)]
            await send(message)

        await app(scope, receive, timed_send)

    return middleware
