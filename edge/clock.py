"""The agent's one clock: a single notion of "now" (value and trust) for every part of the gateway.

`AgentClock` owns the system's wall and monotonic clocks and, when the agent checks its clock
(`policy.clock_source = "ntp"`), the `ClockTrust` state machine of edge/timetrust.py. Everything that needs
the time asks it: the decision, door schedules and first-card unlocks, the validity of commands (the cloud
link gets the clock as its `clock=`), journal timestamps, rights age and metrics. So a cloud offset adopted
after a power cut (the Pi's clock 10 h behind, trusted through the cloud's time) moves all of them at once,
and nothing reads the raw system clock behind its back.

* `now()` (also `clock()`): UTC seconds, corrected by any adopted cloud offset, never before the last-good
  time while untrusted, and always inside the sane window (2020-01-01 .. 2100-01-01 UTC), so no timestamp
  derived from it can overflow a datetime conversion.
* `trusted`: whether the time may be used for windows and schedules (see `edge.decision.TimePolicy`).
* `offset_s`: the cloud offset in force (for metrics and status).

Only `observe()`, `ntp_synchronised()` and `cloud_time()` read the raw wall clock: they feed it, with the
monotonic clock, to `ClockTrust`.

The I/O the clock needs is here too, so edge/timetrust.py stays pure: `read_ntp_synchronised` (timesyncd's
flag, timedatectl, adjtimex(2)), `read_boot_id`, and `load_clock_state`/`save_clock_state` (the last-good time
and its boot id in the store's meta table).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from .timetrust import SANE_WINDOW, ClockAlarm, ClockState, ClockStatus, ClockTrust, clamp_ts, sane_ts

if TYPE_CHECKING:
    from .store import Store

log = logging.getLogger("edge.clock")


class AgentClock:
    """One clock for the whole agent. `trust` is None when the system clock is trusted as it is
    (`clock_source = "system"`); the agent sets it at start otherwise."""

    def __init__(
        self, *, wall: Callable[[], float] = time.time, mono: Callable[[], float] = time.monotonic
    ) -> None:
        self.wall = wall
        self.mono = mono
        self.trust: ClockTrust | None = None

    def now(self) -> float:
        """Best estimate of UTC now, in seconds since the epoch (inside the sane window)."""
        wall = self.wall()
        if self.trust is not None:
            return self.trust.now(wall, self.mono())
        return clamp_ts(wall)

    def __call__(self) -> float:
        return self.now()

    def datetime(self) -> datetime:
        return datetime.fromtimestamp(self.now(), UTC)

    @property
    def trusted(self) -> bool:
        if self.trust is not None:
            return self.trust.trusted
        return sane_ts(self.wall())  # the system clock, unless it reads something impossible

    @property
    def offset_s(self) -> float:
        """The cloud offset added to the system clock (0 when none is adopted)."""
        return self.trust.offset_s if self.trust is not None else 0.0

    # --- inputs (the raw wall clock goes to ClockTrust here, and only here) -------------------------------

    def observe(self) -> None:
        if self.trust is not None:
            self.trust.observe(self.wall(), self.mono())

    def ntp_synchronised(self, synced: bool) -> None:
        if self.trust is not None:
            self.trust.ntp_synchronised(synced, self.wall(), self.mono())

    def cloud_time(self, server_utc: float, rtt: float) -> float | None:
        """A time sample from the cloud; returns the skew (None when unusable or no trust is kept)."""
        if self.trust is None:
            return None
        return self.trust.cloud_time(server_utc, rtt, self.wall(), self.mono())

    def alarms(self) -> list[ClockAlarm]:
        return self.trust.alarms() if self.trust is not None else []

    def status(self) -> ClockStatus:
        if self.trust is not None:
            return self.trust.status()
        ok = sane_ts(self.wall())
        return ClockStatus(trusted=ok, source="system", offset_s=0.0,
                           reason="system clock" if ok else f"system clock outside {SANE_WINDOW}")  # fmt: skip


# --- I/O: the NTP state, the boot id, the persisted last-good time -----------------------------------------

TIMESYNC_FLAG = Path("/run/systemd/timesync/synchronized")
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
META_LAST_GOOD = "clock.last_good"
META_BOOT_ID = "clock.boot_id"
TIMEDATECTL_TIMEOUT_S = 5.0
_TIME_ERROR = 5  # adjtimex() return value: clock not synchronised


def adjtimex_synchronised() -> bool | None:
    """I/O (a read-only syscall): the kernel's NTP state via adjtimex(2) with modes = 0. None when the call
    is not available (not Linux, or denied by a seccomp filter such as systemd's `ProtectClock=`)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        fn = libc.adjtimex
    except (OSError, AttributeError):
        return None
    buf = ctypes.create_string_buffer(512)  # struct timex is ~208 bytes; modes (offset 0) = 0: read only
    r = int(fn(buf))
    if r < 0:
        return None
    return r != _TIME_ERROR


async def read_ntp_synchronised() -> bool | None:
    """I/O: is the system clock NTP-synchronised? None when it cannot be told.

    In order: systemd-timesyncd's flag file (created on first sync), `timedatectl show -p NTPSynchronized
    --value` (timedated asks the kernel, so it works with chrony too), then adjtimex(2) directly.
    """
    if await asyncio.to_thread(TIMESYNC_FLAG.exists):
        return True
    try:
        proc = await asyncio.create_subprocess_exec(
            "timedatectl", "show", "-p", "NTPSynchronized", "--value",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
    except OSError:
        proc = None
    if proc is not None:
        try:
            async with asyncio.timeout(TIMEDATECTL_TIMEOUT_S):
                out, _ = await proc.communicate()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            out = b""
        answer = out.decode(errors="replace").strip()
        if proc.returncode == 0 and answer in ("yes", "no"):
            return answer == "yes"
    return adjtimex_synchronised()


def read_boot_id(path: Path = BOOT_ID) -> str | None:
    """I/O: the kernel's boot id (changes at every boot; same across agent restarts)."""
    try:
        return path.read_text(encoding="ascii").strip() or None
    except OSError:
        return None


async def load_clock_state(store: Store) -> ClockState:
    """I/O: the persisted last-good time and the boot id it was saved in (None when never saved)."""
    raw_time = await store.get_meta(META_LAST_GOOD)
    raw_boot = await store.get_meta(META_BOOT_ID)
    try:
        last_good = float(raw_time) if raw_time is not None else None
    except (TypeError, ValueError):
        log.warning("ignoring unreadable %s in the store: %r", META_LAST_GOOD, raw_time)
        last_good = None
    if last_good is not None and not sane_ts(last_good):
        log.warning("ignoring %s outside %s in the store: %r", META_LAST_GOOD, SANE_WINDOW, raw_time)
        last_good = None
    return ClockState(last_good=last_good, boot_id=str(raw_boot) if raw_boot is not None else None)


async def save_clock_state(store: Store, trust: ClockTrust, boot_id: str | None) -> bool:
    """I/O: persist the last-good time with the boot id, only while the clock is trusted. True if saved."""
    lg = trust.last_good()
    if not trust.trusted or lg is None:
        return False
    await store.set_meta(META_LAST_GOOD, lg)
    await store.set_meta(META_BOOT_ID, boot_id)
    return True
