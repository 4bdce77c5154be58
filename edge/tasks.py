"""Stopping tasks for sure."""

from __future__ import annotations

import asyncio
from typing import Any


async def cancel_and_wait(
    task: asyncio.Task[Any], *, ignore: tuple[type[BaseException], ...] = (), retry_s: float = 1.0
) -> None:
    """Cancel `task` and wait until it has ended; exceptions of the types in `ignore` are dropped.

    `task.cancel(); await task` can wait for ever: in Python 3.11, `asyncio.wait_for` swallows a
    cancellation that arrives just as its inner future completes (CPython gh-86296), and aiomqtt and our
    own code use it, so a task can go on after being cancelled. Cancel again until it is really done.
    """
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=retry_s)
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None and not isinstance(exc, ignore):
        raise exc
