"""Weekly schedules in local wall-clock time, compiled to minute bitmasks. Pure: no I/O, no asyncio.

A schedule allows an instant when the instant's local wall-clock minute (in the schedule's time zone)
falls inside one of the intervals of its weekday, or of `holiday_intervals` on a listed holiday. Wall
clock is what people mean by "08:00-18:00", so across a DST change the window keeps its wall-clock
bounds: on the spring-forward day the skipped hour simply does not occur, and on the fall-back day a
repeated hour inside the window is allowed both times.
"""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from .model import Schedule, clock_minutes

MINUTES_PER_DAY = 1440
_FULL_DAY = (1 << MINUTES_PER_DAY) - 1


def _mask(start: str, end: str, where: str) -> int:
    a, b = clock_minutes(start), clock_minutes(end)
    if not a < b:
        raise ValueError(f"{where}: start {start} must be before end {end} (split intervals at midnight)")
    return ((1 << b) - 1) & ~((1 << a) - 1)


#: `date(1970, 1, 1).toordinal()`; that day was a Thursday (weekday 3).
_EPOCH_ORDINAL = 719163
#: Hours whose offset `LocalClock` keeps (then it starts again): ~11 years of hours.
_HOURS_KEPT = 100_000
#: In `LocalClock._hours`: an hour in which the zone's offset changes (or is not whole minutes).
_CHANGES = -(1 << 30)


class LocalClock:
    """UTC seconds -> (date ordinal, weekday, minute of day) in one time zone, cached per minute.

    A minute not cached is computed from the zone's offset during its UTC hour, itself cached per hour:
    integer arithmetic instead of a `datetime` in the zone (a tap at any instant of the week costs a dict
    lookup, not a time zone conversion). An hour in which the offset changes (a DST change) is computed
    minute by minute through `datetime`, the reference the cached path is tested against."""

    __slots__ = ("_hours", "_key", "_parts", "tz")

    def __init__(self, tz: ZoneInfo) -> None:
        self.tz = tz
        self._key = -1
        self._parts = (0, 0, 0)
        self._hours: dict[int, int] = {}  # UTC hour -> the zone's offset in minutes then, or _CHANGES

    def parts(self, ts: float) -> tuple[int, int, int]:
        key = int(ts // 60)
        if key != self._key:
            hour = key // 60
            off = self._hours.get(hour)
            if off is None:
                off = self._hour_offset(hour)
            if off == _CHANGES:
                self._parts = self.reference_parts(key)
            else:
                days, minute = divmod(key + off, MINUTES_PER_DAY)
                self._parts = (days + _EPOCH_ORDINAL, (days + 3) % 7, minute)
            self._key = key
        return self._parts

    def reference_parts(self, minute_key: int) -> tuple[int, int, int]:
        """The parts of UTC minute `minute_key` (seconds // 60) through `datetime` in the zone. Every zone
        offset in use is a whole number of minutes, so a UTC minute is a local minute."""
        local = datetime.fromtimestamp(minute_key * 60, self.tz)
        return (local.toordinal(), local.weekday(), local.hour * 60 + local.minute)

    def _hour_offset(self, hour: int) -> int:
        first = datetime.fromtimestamp(hour * 3600, self.tz).utcoffset()
        last = datetime.fromtimestamp(hour * 3600 + 3599, self.tz).utcoffset()
        off = _CHANGES
        if first is not None and first == last and first.total_seconds() % 60 == 0:
            off = int(first.total_seconds()) // 60
        if len(self._hours) >= _HOURS_KEPT:
            self._hours.clear()
        self._hours[hour] = off
        return off


class CompiledSchedule:
    """A Schedule as seven minute bitmasks plus a holiday set."""

    __slots__ = ("clock", "holiday_mask", "holidays", "id", "model", "week")

    def __init__(self, schedule: Schedule, site_tz: ZoneInfo) -> None:
        self.id = schedule.id
        self.model = schedule  # what it was compiled from (Tables.build reuses it for the same object)
        tz = ZoneInfo(schedule.tz) if schedule.tz else site_tz
        self.clock = LocalClock(tz)
        week = [0] * 7
        for i, iv in enumerate(schedule.intervals):
            week[iv.day] |= _mask(iv.start, iv.end, f"schedule {schedule.id} interval {i}")
        self.week = tuple(week)
        self.holidays = frozenset(d.toordinal() for d in schedule.holidays)
        hm = 0
        for i, tr in enumerate(schedule.holiday_intervals):
            hm |= _mask(tr.start, tr.end, f"schedule {schedule.id} holiday interval {i}")
        self.holiday_mask = hm

    def allows_ts(self, ts: float) -> bool:
        ordinal, weekday, minute = self.clock.parts(ts)
        mask = self.holiday_mask if ordinal in self.holidays else self.week[weekday]
        return bool((mask >> minute) & 1)

    def allows(self, now: datetime) -> bool:
        return self.allows_ts(now.timestamp())

    def _day_mask(self, ordinal: int) -> int:
        if ordinal in self.holidays:
            return self.holiday_mask
        return self.week[(ordinal - 1) % 7]  # date.fromordinal(1) is a Monday

    def span_end(self, ts: float) -> datetime | None:
        """If the schedule allows `ts`, the instant its continuous window ends (UTC); else None.

        A schedule open around the clock for the next 8 days returns the end of that look-ahead (local
        midnight 9 days on). The end is found on the local wall clock; when a DST change falls between
        now and that end, wall-clock arithmetic is not enough (a skipped or repeated hour can close the
        window early), so the UTC minutes are then walked one by one with `allows_ts`.
        """
        if not self.allows_ts(ts):
            return None
        ordinal, _, minute = self.clock.parts(ts)
        tz = self.clock.tz
        candidate: datetime | None = None
        for day in range(9):
            mask = self._day_mask(ordinal + day)
            free = ~mask & _FULL_DAY
            if day == 0:
                free &= ~((1 << (minute + 1)) - 1)
            if free:
                end_minute = (free & -free).bit_length() - 1
                d = datetime.fromordinal(ordinal + day)
                candidate = datetime(d.year, d.month, d.day, end_minute // 60, end_minute % 60, tzinfo=tz)
                break
        if candidate is None:
            d = datetime.fromordinal(ordinal + 9)
            candidate = datetime(d.year, d.month, d.day, tzinfo=tz)
        end = candidate.astimezone(UTC)
        # Same offset now and at the end instant (read back from UTC, which also catches a wall time
        # inside a skipped hour): no DST change in between, the wall-clock answer stands.
        if datetime.fromtimestamp(ts, tz).utcoffset() == end.astimezone(tz).utcoffset():
            return end
        t = int(ts // 60) * 60 + 60
        limit = end.timestamp()
        while t < limit:
            if not self.allows_ts(t):
                return datetime.fromtimestamp(t, UTC)
            t += 60
        return end


ALWAYS_ID = "always"


def always_schedule() -> Schedule:
    from .model import Interval

    return Schedule(
        id=ALWAYS_ID, name="Always", intervals=[Interval(day=d, start="00:00", end="24:00") for d in range(7)]
    )


def utc_seconds(dt: datetime | None, default: int) -> int:
    """A datetime as whole UTC seconds (naive datetimes are refused), or `default` when None."""
    if dt is None:
        return default
    if dt.tzinfo is None:
        raise ValueError("naive datetime: every time must carry its UTC offset")
    return int(dt.timestamp())


__all__ = ["ALWAYS_ID", "CompiledSchedule", "LocalClock", "always_schedule", "utc_seconds"]
