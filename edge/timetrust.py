"""Clock trust: whether the gateway may believe its own wall clock, and the best estimate of "now".

A Raspberry Pi has no battery-backed clock. After a power cut it boots with the time the kernel was built
with or, with fake-hwclock, the time it last saved; either way the clock is behind until NTP answers, and a
door controller that believed it would grant on validity windows and schedules that have already ended.

`ClockTrust` is the pure core (no I/O, no asyncio; wall and monotonic time are passed in). The policy:

* **At boot** the clock is *untrusted* until NTP reports the clock synchronised or the cloud link gives
  its time. One exception: a *warm restart* (the agent restarted but the machine did not: the kernel's
  boot id is the one saved with the last-good time) with a wall clock not before the last-good time; the
  kernel clock then kept running since it was last trusted.
* A wall clock **before the last-good time** is never trusted by itself (alarm `clock_backwards`).
* **While running**, each tick compares the wall clock's progress with the monotonic clock's. A jump
  larger than `max_jump_s` makes the clock untrusted (`clock_backwards` for a backwards jump) until NTP or
  the cloud confirms it again.
* **Cloud time**: a sample `(server_utc, rtt)` is taken as `server_utc + rtt / 2` at arrival (samples
  with an RTT above `max_rtt_s` are ignored). A difference above `max_skew_s` raises `clock_skew`
  (10 minutes by default). When NTP is not synchronised, the gateway adopts the cloud time as an offset to
  its own clock and trusts that (`adopt_cloud_time`, on by default); NTP, when synchronised, stays the
  authority and the offset is dropped.
* **Bounds.** Small steps add up: while trusted, the wall clock's progress since trust was established (or
  last confirmed by NTP) may differ from the monotonic clock's by at most `max_jump_s` + `max_drift_ppm`
  of the elapsed time, or trust goes. A cloud sample never *moves* a trusted clock: it may correct the
  offset by `max_step_s` + the same drift bound; a larger disagreement is a `clock_skew` alarm (at most
  one of a kind a minute), not an adoption. No time outside the sane window (`SANE_WINDOW`) is believed,
  adopted, loaded as last-good, or returned by `now()`. NTP wins over a stored last-good time more than
  `max_last_good_lead_s` ahead of it (a bad sample that was persisted), so the clock cannot be locked
  out for ever.
* Trust changes raise `clock_untrusted` / `clock_trusted`.
* `last_good()` is persisted periodically while trusted, with the boot id (see `save_clock_state`).
* `now()` is the best estimate: the clock plus any cloud offset; while untrusted, never before the last
  good time (nor before the last trusted time carried forward on the monotonic clock).

What the agent does with an untrusted clock is `SitePolicy.time_policy` (see `edge.decision.TimePolicy`
and docs/operations.md): in no case does it grant on a window that may have ended.

The I/O around it (`read_ntp_synchronised`, `read_boot_id`, `load_clock_state`, `save_clock_state`) lives in
edge/clock.py; this module touches nothing.
"""

from __future__ import annotations

import enum
import math

import msgspec

# Alarm kinds (the agent journals them as "alarm.<kind>").
CLOCK_BACKWARDS = "clock_backwards"
CLOCK_JUMP = "clock_jump"
CLOCK_SKEW = "clock_skew"
CLOCK_UNTRUSTED = "clock_untrusted"
CLOCK_TRUSTED = "clock_trusted"

#: The sane window: no time outside it is believed, adopted or persisted, and `now()` never leaves it
#: (so no timestamp can overflow a datetime conversion): 2020-01-01 .. 2100-01-01 UTC.
SANE_MIN_TS = 1_577_836_800.0
SANE_MAX_TS = 4_102_444_800.0
SANE_WINDOW = "2020-01-01 .. 2100-01-01 UTC"
#: A trusted clock is corrected by the cloud by at most this much (plus the drift bound), never moved.
MAX_STEP_S = 5.0
#: How fast a wall clock may drift from the monotonic clock without losing trust (a Pi's crystal: < 100 ppm).
MAX_DRIFT_PPM = 500.0
#: A persisted last-good time further than this ahead of an NTP-synchronised clock is discarded (NTP wins).
MAX_LAST_GOOD_LEAD_S = 2 * 86400.0
#: At most one alarm about the cloud's time samples per this many seconds.
SKEW_ALARM_EVERY_S = 60.0


def sane_ts(ts: float) -> bool:
    """Is `ts` (UTC seconds) a finite time inside the sane window?"""
    return math.isfinite(ts) and SANE_MIN_TS <= ts <= SANE_MAX_TS


def clamp_ts(ts: float) -> float:
    """`ts` brought into the sane window (NaN: its start)."""
    if not ts >= SANE_MIN_TS:  # also NaN
        return SANE_MIN_TS
    return min(ts, SANE_MAX_TS)


class TrustSource(enum.StrEnum):
    NONE = "none"
    NTP = "ntp"
    CLOUD = "cloud"
    WARM_RESTART = "warm_restart"


class ClockAlarm(msgspec.Struct, frozen=True, kw_only=True):
    kind: str
    message: str
    #: Clock minus the reference, in seconds, for clock_skew / clock_backwards / clock_jump.
    skew_s: float | None = None


class ClockStatus(msgspec.Struct, frozen=True, kw_only=True):
    """The clock's state for `edge status` and metrics."""

    trusted: bool
    #: "ntp", "cloud", "warm_restart", "none", or "system" (the system clock trusted as it is).
    source: str
    reason: str
    offset_s: float
    last_good: float | None = None
    ntp_synchronised: bool | None = None


class ClockTrust:
    """The clock-trust state machine. All times are float seconds: `wall` UTC since the epoch, `mono` from
    a monotonic clock. Call `observe()` every tick, `ntp_synchronised()` when NTP state is read,
    `cloud_time()` when the link reports the server's time."""

    def __init__(
        self,
        *,
        wall: float,
        mono: float,
        last_good: float | None = None,
        warm_restart: bool = False,
        max_skew_s: float = 600.0,
        max_jump_s: float = 30.0,
        max_rtt_s: float = 10.0,
        adopt_cloud_time: bool = True,
        max_step_s: float = MAX_STEP_S,
        max_drift_ppm: float = MAX_DRIFT_PPM,
        max_last_good_lead_s: float = MAX_LAST_GOOD_LEAD_S,
    ) -> None:
        limits = (max_skew_s, max_jump_s, max_rtt_s, max_step_s, max_drift_ppm, max_last_good_lead_s)
        if not all(math.isfinite(x) and x > 0 for x in limits):
            raise ValueError(
                "max_skew_s, max_jump_s, max_rtt_s, max_step_s, max_drift_ppm and max_last_good_lead_s must be "
                "positive"
            )
        self.max_skew_s = max_skew_s
        self.max_jump_s = max_jump_s
        self.max_rtt_s = max_rtt_s
        self.adopt_cloud_time = adopt_cloud_time
        self.max_step_s = max_step_s
        self.max_drift_ppm = max_drift_ppm
        self.max_last_good_lead_s = max_last_good_lead_s
        self._last_good = last_good if last_good is not None and sane_ts(last_good) else None
        self._offset = 0.0
        #: (estimate, mono, offset) when trust was last established or confirmed by NTP: the wall clock's
        #: progress since then is bounded by the monotonic clock's (`observe`), and so is the cloud's
        #: correction of the offset (`cloud_time`).
        self._ref = (wall, mono, 0.0)
        self._skew_alarm_at: dict[str, float] = {}
        self._ntp = False
        self._trusted = False
        self._source = TrustSource.NONE
        self._reason = ""
        self._alarms: list[ClockAlarm] = []
        self._prev = (wall, mono)
        #: (estimated UTC, mono) when the clock was last trusted: carries the time forward while untrusted.
        self._anchor: tuple[float, float] | None = None
        lg = self._last_good
        if not sane_ts(wall):
            self._reason = f"clock reads {wall:.0f}, outside {SANE_WINDOW}: waiting for NTP or the cloud"
        elif lg is None:
            self._reason = "no last-good time: waiting for NTP or the cloud"
        elif wall < lg:
            self._reason = f"clock is {lg - wall:.0f} s before the last-good time"
            self._alarm(CLOCK_BACKWARDS, self._reason, wall - lg)
        elif warm_restart:
            self._set_trusted(TrustSource.WARM_RESTART, "warm restart: clock kept running", wall, mono)
        else:
            self._reason = "cold boot: waiting for NTP or the cloud"
        if not self._trusted:
            self._alarm(CLOCK_UNTRUSTED, self._reason)

    # --- outputs ----------------------------------------------------------------------------------------

    @property
    def trusted(self) -> bool:
        return self._trusted

    @property
    def reason(self) -> str:
        return self._reason

    @property
    def source(self) -> TrustSource:
        return self._source

    @property
    def offset_s(self) -> float:
        """The cloud offset added to the wall clock (0 when none is adopted)."""
        return self._offset

    def now(self, wall: float, mono: float) -> float:
        """Best estimate of UTC now, always inside the sane window (`clamp_ts`)."""
        est = wall + self._offset
        if self._trusted:
            return clamp_ts(est)
        floor = self._last_good if self._last_good is not None else -math.inf
        if self._anchor is not None:
            floor = max(floor, self._anchor[0] + (mono - self._anchor[1]))
        return clamp_ts(max(est, floor))

    def last_good(self) -> float | None:
        """The latest time known good (to persist while trusted)."""
        return self._last_good

    def alarms(self) -> list[ClockAlarm]:
        """The alarms raised since the last call (drained)."""
        out, self._alarms = self._alarms, []
        return out

    def rights_age_s(self, synced_at: float | None, wall: float, mono: float) -> float | None:
        """Seconds since the rights were last synchronised (None: never), on the best estimate of now.

        With an untrusted clock this is a lower bound (the gateway cannot know how long it was off)."""
        if synced_at is None:
            return None
        return max(0.0, self.now(wall, mono) - synced_at)

    def status(self) -> ClockStatus:
        return ClockStatus(
            trusted=self._trusted, source=self._source.value, reason=self._reason, offset_s=self._offset,
            last_good=self._last_good, ntp_synchronised=self._ntp,
        )  # fmt: skip

    # --- inputs -----------------------------------------------------------------------------------------

    def observe(self, wall: float, mono: float) -> None:
        """A tick: detect jumps of the wall clock against the monotonic clock, advance the last-good time."""
        pw, pm = self._prev
        self._prev = (wall, mono)
        drift = (wall - pw) - (mono - pm)
        if self._trusted and not sane_ts(wall + self._offset):
            self._set_untrusted(f"clock reads {wall + self._offset:.0f}, outside {SANE_WINDOW}")
            return
        if abs(drift) > self.max_jump_s:
            if drift < 0:
                self._alarm(CLOCK_BACKWARDS, f"clock went back {-drift:.0f} s", drift)
            else:
                self._alarm(CLOCK_JUMP, f"clock jumped forward {drift:.0f} s", drift)
            if self._source is TrustSource.CLOUD:
                # The clock under our offset moved: the offset is now wrong by the jump.
                self._offset -= drift
            if self._trusted:
                what = "back" if drift < 0 else "forward"
                self._set_untrusted(f"clock jumped {what} {abs(drift):.0f} s: waiting for NTP or the cloud")
            return
        if self._trusted:
            est = wall + self._offset
            # Many small steps add up: the wall clock's progress since trust was established (or last
            # confirmed by NTP) may differ from the monotonic clock's by max_jump_s plus the drift bound.
            ref_est, ref_mono, _ = self._ref
            cum = (est - ref_est) - (mono - ref_mono)
            if abs(cum) > self._drift_bound(mono):
                what = "back" if cum < 0 else "forward"
                self._alarm(CLOCK_BACKWARDS if cum < 0 else CLOCK_JUMP,
                            f"clock went {what} {abs(cum):.0f} s in small steps since it was trusted", cum)  # fmt: skip
                self._set_untrusted(f"clock went {what} {abs(cum):.0f} s in small steps: waiting for NTP or the cloud")
                return
            self._last_good = est if self._last_good is None else max(self._last_good, est)
            self._anchor = (est, mono)

    def ntp_synchronised(self, synced: bool, wall: float, mono: float) -> None:
        """The NTP state as read from the system (`read_ntp_synchronised`)."""
        was = self._ntp
        self._ntp = synced
        if synced:
            if not sane_ts(wall):
                self._set_untrusted(f"NTP synchronised but the clock reads {wall:.0f}, outside {SANE_WINDOW}")
                return
            lg = self._last_good
            if lg is not None and lg - wall > self.max_last_good_lead_s:
                # A last-good time this far ahead of a synchronised clock is a bad sample that was persisted,
                # not a clock set back: NTP wins (else the gateway would stay untrusted for ever).
                self._alarm(CLOCK_BACKWARDS, f"the last-good time was {lg - wall:.0f} s ahead of NTP: discarded",
                            wall - lg)  # fmt: skip
                self._last_good = None
                self._anchor = None
            if self._last_good is not None and wall < self._last_good - self.max_jump_s:
                # NTP says synchronised but the clock is before a time we saw as good: believe neither.
                if not was:
                    self._alarm(CLOCK_BACKWARDS, "NTP synchronised but the clock is before the last-good time",
                                wall - self._last_good)  # fmt: skip
                self._set_untrusted("NTP synchronised but the clock is before the last-good time")
                return
            self._offset = 0.0
            if not self._trusted or self._source is not TrustSource.NTP:
                self._set_trusted(TrustSource.NTP, "NTP synchronised", wall, mono)
            self._prev = (wall, mono)
            self._ref = (wall, mono, 0.0)  # NTP may slew and step the clock: it is the authority
        elif was and self._source is TrustSource.NTP:
            # Lost sync: the kernel clock keeps running on its last discipline. Stay trusted (jumps are
            # still caught by observe()), but say so.
            self._reason = "NTP sync lost; clock free-running since"

    def cloud_time(self, server_utc: float, rtt: float, wall: float, mono: float) -> float | None:
        """A time sample from the cloud link, received at (`wall`, `mono`). Returns the skew (our clock
        minus the cloud's) or None when the sample was not usable."""
        if not (math.isfinite(server_utc) and math.isfinite(rtt)) or rtt < 0 or rtt > self.max_rtt_s:
            return None
        cloud_now = server_utc + rtt / 2
        if not sane_ts(cloud_now):
            self._skew_alarm(mono, CLOCK_SKEW, f"cloud time {cloud_now:.0f} is outside {SANE_WINDOW}: ignored")
            return None
        skew = wall + self._offset - cloud_now
        raw_skew = wall - cloud_now
        if abs(skew) > self.max_skew_s:
            self._skew_alarm(mono, CLOCK_SKEW, f"clock differs from the cloud's by {skew:+.0f} s", skew)
        if self._ntp and self._source is TrustSource.NTP:
            return skew  # NTP is the authority; the skew alarm (if any) tells the operator they disagree
        if self._last_good is not None and cloud_now < self._last_good - self.max_jump_s - rtt:
            self._skew_alarm(mono, CLOCK_BACKWARDS, "cloud time is before the last-good time",
                             cloud_now - self._last_good)  # fmt: skip
            return skew
        if self._trusted:
            # A trusted clock is corrected, never moved: the offset may differ from the one trust was
            # established with by max_step_s plus the drift bound. A larger disagreement is an alarm.
            if not self.adopt_cloud_time:
                return skew
            budget = self.max_step_s + self.max_drift_ppm * 1e-6 * max(0.0, mono - self._ref[1])
            if abs(-raw_skew - self._ref[2]) > budget:
                self._skew_alarm(mono, CLOCK_SKEW, f"cloud time differs by {skew:+.1f} s from a trusted clock: "
                                 f"not adopted (a trusted clock moves at most {budget:.1f} s)", skew)  # fmt: skip
                return skew
            self._offset = -raw_skew
            return skew
        if self.adopt_cloud_time:
            self._offset = -raw_skew
            self._set_trusted(TrustSource.CLOUD, f"cloud time (offset {self._offset:+.1f} s)", wall, mono)
        elif abs(raw_skew) <= self.max_skew_s:
            self._set_trusted(TrustSource.CLOUD, f"confirmed by the cloud (skew {raw_skew:+.1f} s)", wall, mono)
        return skew

    # --- internals --------------------------------------------------------------------------------------

    def _alarm(self, kind: str, message: str, skew: float | None = None) -> None:
        self._alarms.append(ClockAlarm(kind=kind, message=message, skew_s=skew))

    def _skew_alarm(self, mono: float, kind: str, message: str, skew: float | None = None) -> None:
        """An alarm about a cloud sample: at most one of a kind per SKEW_ALARM_EVERY_S (one per ack would
        flood the journal)."""
        if mono - self._skew_alarm_at.get(kind, -math.inf) < SKEW_ALARM_EVERY_S:
            return
        self._skew_alarm_at[kind] = mono
        self._alarm(kind, message, skew)

    def _drift_bound(self, mono: float) -> float:
        return self.max_jump_s + self.max_drift_ppm * 1e-6 * max(0.0, mono - self._ref[1])

    def _set_trusted(self, source: TrustSource, reason: str, wall: float, mono: float) -> None:
        was = self._trusted
        self._trusted = True
        self._source = source
        self._reason = reason
        est = wall + self._offset
        self._last_good = est if self._last_good is None else max(self._last_good, est)
        self._anchor = (est, mono)
        self._prev = (wall, mono)
        self._ref = (est, mono, self._offset)
        if not was:
            self._alarm(CLOCK_TRUSTED, reason)

    def _set_untrusted(self, reason: str) -> None:
        was = self._trusted
        self._trusted = False
        self._source = TrustSource.NONE
        self._reason = reason
        if was:
            self._alarm(CLOCK_UNTRUSTED, reason)


class ClockState(msgspec.Struct, frozen=True):
    last_good: float | None
    boot_id: str | None


def clock_trust_at_boot(
    state: ClockState,
    boot_id: str | None,
    *,
    wall: float,
    mono: float,
    max_skew_s: float = 600.0,
    adopt_cloud_time: bool = True,
) -> ClockTrust:
    """The `ClockTrust` for this start: a warm restart when the saved boot id is this boot's."""
    warm = boot_id is not None and state.boot_id == boot_id
    return ClockTrust(
        wall=wall, mono=mono, last_good=state.last_good, warm_restart=warm, max_skew_s=max_skew_s,
        adopt_cloud_time=adopt_cloud_time,
    )  # fmt: skip
