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
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime

from .timetrust import SANE_WINDOW, ClockAlarm, ClockTrust, clamp_ts, sane_ts


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

    def status(self) -> dict[str, str | float | bool | None]:
        if self.trust is not None:
            return self.trust.status()
        wall = self.wall()
        ok = sane_ts(wall)
        return {"trusted": ok, "source": "system", "offset_s": 0.0,
                "reason": "system clock" if ok else f"system clock outside {SANE_WINDOW}"}  # fmt: skip
