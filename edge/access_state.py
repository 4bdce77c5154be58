"""The runtime state of the access rules (issue 19): where each user is, occupancy, pending first-person taps,
escorts, interlocks, uses of use-limited credentials. Pure: no I/O, no clock, no asyncio.

`Decider.decide(..., state=...)` only READS an `AccessState`. The tap handler changes it through the
functions here, each deterministic in its arguments:

* `on_decision(state, decision, now)` right after a decision was acted on (the relay released or not): a
  first person waiting at a two-person door, an escort's tap, an interlocked door unlocked;
* `update(state, decision, door_opened, now)` once it is known whether the granted door opened (at once for
  a door without a contact: `door_opened=True`): the user moves to the area behind the door, the
  occupancy counts follow, a use of a use-limited credential is counted. A grant whose door never opened
  (`door_opened=False`) moves nobody and uses nothing;
* `door_contact(state, door, is_open, now)` on each contact edge, `door_relocked(state, door)` when the lock
  closes again (interlocks);
* `reset(state, user=..., area=...)` the anti-passback reset (signed command, or a schedule);
* `remote_move(state, user, area, ts)` a passage another gateway of the site saw (the cloud relays them).

Each returns a `Delta` naming the persistent entries it changed (user locations, credential uses), for the
store to write after the door opened (`Store.save_access_state`), never before the relay acts. The door
entries (pending taps, escorts, interlock) are transient: after a restart a first person taps again and
the interlock is read again from the contacts.

Keys are external user ids and card numbers (stable across snapshots, unlike the index's internal uids).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, time, timedelta, tzinfo

from .decision import Decision, Reason

#: A user's location: (area id, or None for outside; UTC seconds since the user is there).
Location = tuple[str | None, float]


@dataclass(slots=True)
class AccessState:
    #: user id -> where the user went last (only users who passed a door between areas)
    where: dict[str, Location] = field(default_factory=dict)
    #: area id -> users whose location is that area
    occupancy: dict[str, int] = field(default_factory=dict)
    #: two-person doors: door -> (first user, UTC seconds of the tap)
    pending: dict[str, tuple[str, float]] = field(default_factory=dict)
    #: escort doors: door -> (escort user, UTC seconds of the tap)
    escort: dict[str, tuple[str, float]] = field(default_factory=dict)
    #: interlocked doors: door -> UTC seconds until which its lock is released; doors whose contact is open
    unlocked_until: dict[str, float] = field(default_factory=dict)
    open_doors: set[str] = field(default_factory=set)
    #: card -> uses counted (use-limited credentials only)
    used: dict[int, int] = field(default_factory=dict)

    @staticmethod
    def restore(where: dict[str, Location], used: dict[int, int]) -> AccessState:
        """The persistent part, as the store loaded it; the occupancy counts follow from the locations."""
        occ: dict[str, int] = {}
        for area, _since in where.values():
            if area is not None:
                occ[area] = occ.get(area, 0) + 1
        return AccessState(where=dict(where), occupancy=occ, used=dict(used))

    def busy(self, door: str, ts: float) -> bool:
        """The door is open, or its lock released (interlocks)."""
        return door in self.open_doors or self.unlocked_until.get(door, 0.0) > ts


@dataclass(slots=True)
class Delta:
    """Persistent entries a change touched: the store writes these users' locations (deleted when absent
    from `where`) and these cards' uses."""

    users: set[str] = field(default_factory=set)
    cards: set[int] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.users or self.cards)

    def merge(self, other: Delta) -> None:
        self.users |= other.users
        self.cards |= other.cards


def on_decision(state: AccessState, d: Decision, now: float) -> Delta:
    """The effects of a decision at the moment it is acted on (before anyone passed)."""
    if d.reason is Reason.AWAITING_SECOND_PERSON and d.user is not None:
        state.pending[d.door] = (d.user, now)
    if not d.granted:
        return Delta()
    state.pending.pop(d.door, None)
    if d.escort and d.user is not None:
        state.escort[d.door] = (d.user, now)
    if d.interlock is not None:
        until = d.unlock_until if d.unlock_until is not None else now + d.strike_s
        state.unlocked_until[d.door] = max(until, state.unlocked_until.get(d.door, 0.0))
    return Delta()


def update(state: AccessState, d: Decision, door_opened: bool, now: float) -> Delta:
    """The effects of a granted decision once its door opened (`door_opened`), or proved not to."""
    delta = Delta()
    if not d.granted or not door_opened:
        return delta
    if d.passage is not None and d.user is not None:
        _move(state, d.user, d.passage[1], now)
        delta.users.add(d.user)
    if d.count_use:
        state.used[d.card] = state.used.get(d.card, 0) + 1
        delta.cards.add(d.card)
    return delta


def _move(state: AccessState, user: str, area: str | None, now: float) -> None:
    old = state.where.get(user)
    if old is not None and old[0] is not None:
        n = state.occupancy.get(old[0], 0) - 1
        if n > 0:
            state.occupancy[old[0]] = n
        else:
            state.occupancy.pop(old[0], None)
    state.where[user] = (area, now)
    if area is not None:
        state.occupancy[area] = state.occupancy.get(area, 0) + 1


def remote_move(state: AccessState, user: str, area: str | None, ts: float) -> Delta:
    """A passage another gateway of the site saw (relayed by the cloud): the user is in `area` since `ts`,
    unless this gateway saw them pass at `ts` or later (the latest passage wins, whoever saw it). Applying the
    same move twice changes nothing."""
    old = state.where.get(user)
    if old is not None and (old[1] > ts or old == (area, ts)):
        return Delta()
    _move(state, user, area, ts)
    return Delta(users={user})


def door_contact(state: AccessState, door: str, is_open: bool, now: float) -> None:
    """A contact edge. A door that closes has ended its interlock cycle (its release counts no longer)."""
    if is_open:
        state.open_doors.add(door)
    else:
        state.open_doors.discard(door)
        state.unlocked_until.pop(door, None)


def door_relocked(state: AccessState, door: str) -> None:
    """The door's lock closed again (strike over, or a grant taken back): its interlock release ends."""
    state.unlocked_until.pop(door, None)


def reset(state: AccessState, *, user: str | None = None, area: str | None = None) -> Delta:
    """Anti-passback reset: forget the location of `user`, of everyone in `area`, or (neither) of everyone.
    A forgotten user may pass any door once, as if never seen; the occupancy counts drop accordingly."""
    delta = Delta()
    for u, (a, _since) in list(state.where.items()):
        if (user is not None and u != user) or (area is not None and a != area):
            continue
        del state.where[u]
        if a is not None:
            n = state.occupancy.get(a, 0) - 1
            if n > 0:
                state.occupancy[a] = n
            else:
                state.occupancy.pop(a, None)
        delta.users.add(u)
    return delta


def due_resets(resets: Iterable[tuple[str, str]], tz: tzinfo, since: datetime, now: datetime) -> list[str]:
    """The areas whose daily reset time ("HH:MM" local in `tz`; `resets` holds (area, time)) fell in
    (`since`, `now`]. A reset time the clocks skip (spring forward) happens at the same wall time's instant
    as `zoneinfo` resolves it; one repeated (fall back) happens once, at its first occurrence."""
    if now <= since:
        return []
    out = []
    first, last = since.astimezone(tz).date(), now.astimezone(tz).date()
    for area, hhmm in resets:
        h, m = int(hhmm[:2]), int(hhmm[3:])
        day = first
        while day <= last:
            at = datetime.combine(day, time(h % 24, m), tz) + timedelta(days=h // 24)
            if since < at <= now:
                out.append(area)
                break
            day += timedelta(days=1)
    return out


def reset_uses(state: AccessState, card: int) -> Delta:
    """Give a use-limited credential all its uses back (a new delivery, the same code)."""
    state.used.pop(card, None)
    return Delta(cards={card})
