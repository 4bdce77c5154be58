"""A tiny sd_notify client (no dependency) and the watchdog task that feeds systemd from the event loop.

systemd starts the agent as `Type=notify` with `WatchdogSec=`: it passes `NOTIFY_SOCKET` (an AF_UNIX
datagram socket, a path or an abstract name written with a leading '@') and `WATCHDOG_USEC` (and
`WATCHDOG_PID`) in the environment. The agent sends `READY=1` once the doors, store, journal and readers
are up, `WATCHDOG=1` at half the watchdog interval, `STATUS=...` lines for `systemctl status`, and
`STOPPING=1` on the way out.

The pings come from a coroutine in the agent's own event loop, and only while a health check says the tap
path is alive (`Heartbeat`): a loop that is blocked cannot send them, a loop that is running but whose tap
path stalled chooses not to, and in both cases systemd kills and restarts the agent after `WatchdogSec`.

Without `NOTIFY_SOCKET` (a developer's shell, the tests of other modules) every call is a no-op that
returns False.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

log = logging.getLogger("edge.sdnotify")


def _address(raw: str) -> str | None:
    """The socket address for `NOTIFY_SOCKET`: a file system path, or '@name' for the abstract namespace."""
    if raw.startswith("@"):
        return "\0" + raw[1:]
    if raw.startswith("/"):
        return raw
    return None  # vsock: and other transports are not supported (systemd only uses them for VMs)


class Notifier:
    """Sends sd_notify messages to one socket. Use `Notifier.from_env()`; close it when done."""

    def __init__(self, address: str | None, *, watchdog_usec: int | None = None) -> None:
        self.address = address
        self._watchdog_usec = watchdog_usec
        self._sock: socket.socket | None = None
        if address is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            sock.setblocking(False)
            self._sock = sock

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """From `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` (the watchdog is ours only if the PID,
        when given, is this process)."""
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        address = _address(raw) if raw else None
        if raw and address is None:
            log.warning("NOTIFY_SOCKET %r is not a path or an abstract socket; not notifying systemd", raw)
        usec: int | None = None
        text = env.get("WATCHDOG_USEC", "")
        if text:
            try:
                usec = int(text)
            except ValueError:
                log.warning("WATCHDOG_USEC %r is not a number; watchdog off", text)
            pid = env.get("WATCHDOG_PID", "")
            if usec is not None and pid and pid != str(os.getpid()):
                usec = None  # meant for another process (e.g. our parent)
            if usec is not None and usec <= 0:
                usec = None
        return cls(address, watchdog_usec=usec)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def watchdog_interval(self) -> float | None:
        """The watchdog timeout systemd enforces, in seconds (None: no watchdog)."""
        return None if self._watchdog_usec is None else self._watchdog_usec / 1_000_000

    def notify(self, **fields: str | int) -> bool:
        """Send `KEY=value` lines (e.g. `notify(READY=1, STATUS="up")`). False when not sent.

        Values are single lines: newlines are replaced by spaces so that a status text cannot forge
        another assignment.
        """
        if self._sock is None or self.address is None:
            return False
        lines = []
        for key, value in fields.items():
            text = str(value).replace("\r", " ").replace("\n", " ")
            lines.append(f"{key}={text}")
        try:
            self._sock.sendto("\n".join(lines).encode("utf-8", "replace"), self.address)
        except OSError as e:  # systemd gone, socket buffer full: never let notification break the agent
            log.debug("sd_notify failed: %s", e)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        if status is None:
            return self.notify(READY=1)
        return self.notify(READY=1, STATUS=status)

    def status(self, text: str) -> bool:
        return self.notify(STATUS=text)

    def watchdog(self) -> bool:
        return self.notify(WATCHDOG=1)

    def stopping(self, status: str | None = None) -> bool:
        if status is None:
            return self.notify(STOPPING=1)
        return self.notify(STOPPING=1, STATUS=status)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Heartbeat:
    """The agent's liveness signal: `beat()` from a task on the tap path's loop, `healthy()` for the
    watchdog. Healthy while the last beat is younger than `max_age_s` (monotonic time)."""

    def __init__(self, max_age_s: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_age_s = max_age_s
        self._clock = clock
        self._last = clock()

    def beat(self) -> None:
        self._last = self._clock()

    def age(self) -> float:
        return self._clock() - self._last

    def healthy(self) -> bool:
        return self.age() <= self.max_age_s

    __call__ = healthy


async def watchdog_task(notifier: Notifier, loop_health: Callable[[], bool], *, interval: float | None = None) -> None:
    """Ping the systemd watchdog at half its interval while `loop_health()` is true; never returns.

    `interval` overrides the period between checks (default: half of `WATCHDOG_USEC`). Without a watchdog
    the task waits for ever, so that it can sit in a TaskGroup like any other. An unhealthy agent skips
    its pings (logged once per episode); systemd then restarts it when `WatchdogSec` runs out.
    """
    period = interval
    if period is None:
        timeout = notifier.watchdog_interval()
        if timeout is None or not notifier.enabled:
            await asyncio.Event().wait()
            return
        period = timeout / 2
    unhealthy = False
    while True:
        try:
            ok = loop_health()
        except Exception:
            log.exception("health check failed")
            ok = False
        if ok:
            if unhealthy:
                log.warning("agent healthy again: watchdog pings resumed")
                unhealthy = False
            notifier.watchdog()
        elif not unhealthy:
            log.error("agent unhealthy: withholding watchdog pings (systemd will restart it)")
            unhealthy = True
        await asyncio.sleep(period)
