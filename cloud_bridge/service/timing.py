"""Per-request server time as a `Server-Timing` header, and the process's garbage-collector pauses.

Every HTTP response carries `Server-Timing: app;dur=<ms>, gc;dur=<ms>`: `app` from the request reaching the
application to its response starting (the handler, its database calls and the encoding), `gc` the part of it
the Python garbage collector held the process (every generation, counted by `gc.callbacks`). A slow request in
a client's figures is thereby the server's or not, and the server's is the collector's or not.

The collector's clock and `tuned_gc` (what the service does after start) are in `cloud_bridge.heap`.
"""

from __future__ import annotations

import time

from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from cloud_bridge.heap import CLOCK, GEN0_THRESHOLD, tuned_gc

__all__ = ["CLOCK", "GEN0_THRESHOLD", "server_timing", "tuned_gc"]


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
