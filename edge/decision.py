"""The tap decision: from (door, card, time) to granted or denied, with one reason. Pure and synchronous.

`Decider.decide()` reads the in-memory `RightsIndex` only; it never touches a disk or the network. It does
keep small runtime state of its own (door-mode overrides, lockdown, first-card unlocks, PIN failure
counters), which the agent mutates only from the event-loop thread.

Order of checks (the first that fails gives the reason; `docs/model.md` has the same list):

1. door unknown -> UNKNOWN_DOOR
2. door mode: LOCKED -> DOOR_LOCKED; UNLOCKED (in its schedule) or a running first-card unlock ->
   granted FREE_PASSAGE; LOCKDOWN with no override group -> DOOR_LOCKDOWN. While the clock is not trusted,
   door schedules do not run: a scheduled UNLOCKED or FIRST_CARD door is a card door, and a card + PIN
   door asks for the PIN whatever its PIN schedule says
3. card unknown -> UNKNOWN_CARD; a facility code other than the credential's -> WRONG_FACILITY;
   credential status, then its window
4. user inactive, then the user's window
5. clock not trusted -> the time policy (see `TimePolicy`); whatever the policy, a window with an end
   (credential, user, assignment) may have ended and never grants: CLOCK_NOT_TRUSTED
6. link down for longer than the grace -> the offline policy
7. groups: none of the user's groups opens the door -> NO_GROUP_FOR_DOOR; in lockdown none of them is the
   override group -> DOOR_LOCKDOWN; none of those assignments is in its window -> ASSIGNMENT_NOT_ACTIVE;
   none of those groups' schedules allows now -> OUTSIDE_SCHEDULE
8. PIN (card + PIN doors while their PIN schedule runs): locked out -> PIN_LOCKED_OUT; no PIN given ->
   PIN_REQUIRED; none enrolled -> PIN_NOT_ENROLLED; wrong -> PIN_WRONG (the Nth wrong one in a row locks the
   credential out and raises an alarm). With `defer_pin` the hash is not computed here: the decision comes
   back PIN_REQUIRED with `pin_check` set to the stored hash, and the caller verifies it off the loop and
   decides again with `pin_verified=(hash, ok)` (the agent: edge/agent/tap.py)
9. access rules (issue 19; the door's `DoorRules` and the `AccessState` the caller passes, read only):
   a use-limited credential used up -> USES_EXHAUSTED; another door of the door's interlock unlocked or
   open -> INTERLOCK; anti-passback of the area entered or left (hard, timed) -> ANTI_PASSBACK (soft:
   granted with the alarm "anti_passback"); the area entered full -> AREA_FULL; a visitor group's user
   without an escort's tap within the window -> AWAITING_ESCORT; the first of two persons ->
   AWAITING_SECOND_PERSON. A duress PIN (site setting) passes the PIN step and flags the decision `duress`
   whatever follows
10. granted (FIRST_CARD_UNLOCK if it opened a first-card door for the rest of its schedule)
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Literal, Protocol

import msgspec

from .index import (
    F_ACTIVE,
    F_EMERGENCY,
    F_EXTENDED,
    F_OFFLINE,
    FACILITY_SHIFT,
    NO_END,
    STATUS_MASK,
    STATUS_NAMES,
    USES_MASK,
    USES_SHIFT,
    RightsIndex,
)
from .model import AntiPassback, CredentialStatus, DoorMode, DuressMode
from .pin import valid_pin_hash, verify_pin

_NORMAL = DoorMode.NORMAL


class RuleState(Protocol):
    """What `decide()` reads of the access rules' runtime state (`edge.access_state.AccessState`)."""

    @property
    def where(self) -> dict[str, tuple[str | None, float]]: ...
    @property
    def occupancy(self) -> dict[str, int]: ...
    @property
    def pending(self) -> dict[str, tuple[str, float]]: ...
    @property
    def escort(self) -> dict[str, tuple[str, float]]: ...
    @property
    def used(self) -> dict[int, int]: ...
    def busy(self, door: str, ts: float) -> bool: ...


#: The reader side of a tap at a door between areas: "in" passes from `from_area` into `to_area`.
Side = Literal["in", "out"]


class Reason(enum.StrEnum):
    GRANTED = "granted"
    FREE_PASSAGE = "free_passage"
    FIRST_CARD_UNLOCK = "first_card_unlock"
    UNKNOWN_DOOR = "unknown_door"
    UNKNOWN_CARD = "unknown_card"
    WRONG_FACILITY = "wrong_facility"
    CREDENTIAL_SUSPENDED = "credential_suspended"
    CREDENTIAL_LOST = "credential_lost"
    CREDENTIAL_REVOKED = "credential_revoked"
    CREDENTIAL_NOT_YET_VALID = "credential_not_yet_valid"
    CREDENTIAL_EXPIRED = "credential_expired"
    USER_INACTIVE = "user_inactive"
    USER_NOT_YET_VALID = "user_not_yet_valid"
    USER_EXPIRED = "user_expired"
    CLOCK_NOT_TRUSTED = "clock_not_trusted"
    RIGHTS_TOO_OLD = "rights_too_old"
    OFFLINE_NOT_PERMITTED = "offline_not_permitted"
    NO_GROUP_FOR_DOOR = "no_group_for_door"
    DOOR_LOCKDOWN = "door_lockdown"
    ASSIGNMENT_NOT_ACTIVE = "assignment_not_active"
    OUTSIDE_SCHEDULE = "outside_schedule"
    DOOR_LOCKED = "door_locked"
    PIN_LOCKED_OUT = "pin_locked_out"
    PIN_REQUIRED = "pin_required"
    PIN_NOT_ENROLLED = "pin_not_enrolled"
    PIN_WRONG = "pin_wrong"
    USES_EXHAUSTED = "uses_exhausted"
    INTERLOCK = "interlock"
    ANTI_PASSBACK = "anti_passback"
    AREA_FULL = "area_full"
    AWAITING_ESCORT = "awaiting_escort"
    AWAITING_SECOND_PERSON = "awaiting_second_person"


_STATUS_REASON = {
    CredentialStatus.SUSPENDED: Reason.CREDENTIAL_SUSPENDED,
    CredentialStatus.LOST: Reason.CREDENTIAL_LOST,
    CredentialStatus.REVOKED: Reason.CREDENTIAL_REVOKED,
}
_STATUS_CODE_REASON = {code: _STATUS_REASON.get(name) for code, name in STATUS_NAMES.items()}


class OfflinePolicy(enum.StrEnum):
    ALL = "all"  # every user keeps their rights offline
    FLAGGED = "flagged"  # only users with the offline-access flag
    NOBODY = "nobody"


class TimePolicy(enum.StrEnum):
    """What to do with time-bound rules while the clock is not trusted (see docs/operations.md).

    Under every policy a validity window with an end (credential, user, assignment) may already have ended
    and never grants, and door schedules (unlock, first card, PIN) do not run. The agent passes the
    best estimate of now (`ClockTrust.now()`, never before the last-good time) to check window starts.
    """

    #: Only rights that are round the clock and unbounded in time: no window at all, no group schedule.
    ALWAYS_ONLY = "always_only"
    #: Group schedules count as open; window starts are checked, windows with an end never grant.
    IGNORE_SCHEDULES = "ignore_schedules"
    #: Only emergency cards, with their group schedules open (as IGNORE_SCHEDULES).
    EMERGENCY_ONLY = "emergency_only"


class SitePolicy(msgspec.Struct, frozen=True, kw_only=True):
    offline_grace_s: float = 300.0
    offline_policy: OfflinePolicy = OfflinePolicy.FLAGGED
    pin_max_attempts: int = 3
    pin_lockout_s: float = 300.0
    lockdown_override_group: str | None = None
    time_policy: TimePolicy = TimePolicy.ALWAYS_ONLY
    #: Cached rights stop after this long without a sync (None = never).
    max_offline_age_s: float | None = None


class Decision(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    granted: bool
    reason: Reason
    door: str
    card: int
    uid: int | None = None
    user: str | None = None
    group: str | None = None
    #: How long to release the lock for (0 when denied or free passage).
    strike_s: float = 0.0
    #: First-card unlock: the door stays unlocked until this UTC timestamp.
    unlock_until: float | None = None
    #: An alarm this decision raises ("pin_lockout", "anti_passback" for a soft anti-passback grant).
    alarm: str | None = None
    #: Pending, not final (`decide(defer_pin=True)`): the stored PIN hash to verify the PIN against.
    pin_check: str | None = None
    #: With `pin_check`, when the site has a duress PIN: (PIN, hash) to verify as well; the caller decides
    #: again with `duress_verified=(PIN, hash, matched)`.
    duress_check: tuple[str, str] | None = None
    #: The PIN given was the duress PIN: the silent alarm `alarm.duress` (granted or not).
    duress: bool = False
    #: Access rules, for `access_state.on_decision` / `update`: (area left, area entered) at a door between
    #: areas (None = outside); the user is an escort at this door; the credential is use-limited (a use
    #: counts once the door opened); the interlock the door is in.
    passage: tuple[str | None, str | None] | None = None
    escort: bool = False
    count_use: bool = False
    interlock: str | None = None


def _refuse(
    who: tuple[str, int, int, str, str], reason: Reason, duress: bool,
    passage: tuple[str | None, str | None] | None, interlock: str | None,
) -> Decision:  # fmt: skip
    """A refusal by an access rule; `who` is (door, card, uid, user, group). A function, not a closure: a
    closure makes every variable it reads a cell, allocated on each call of `decide()`."""
    door, card, uid, user, group = who
    return Decision(
        granted=False, reason=reason, door=door, card=card, uid=uid, user=user, group=group, duress=duress,
        passage=passage, interlock=interlock,
    )  # fmt: skip


def _deny(door: str, card: int, uid: int, user: str, reason: Reason, *, group: str | None = None) -> Decision:
    """A refusal of a known card (a function, not a closure made on every decision)."""
    return Decision(granted=False, reason=reason, door=door, card=card, uid=uid, user=user, group=group)


class Decider:
    """Decisions over one `RightsIndex` (which may be swapped whole by a snapshot) and site policy."""

    def __init__(self, index: RightsIndex, policy: SitePolicy | None = None) -> None:
        self.index = index
        self.policy = policy or SitePolicy()
        self.mode_override: dict[str, DoorMode] = {}
        self.lockdown = False
        self.first_card_until: dict[str, float] = {}
        #: card -> [consecutive wrong PINs, locked out until (UTC seconds)]
        self._pin_fail: dict[int, list[float]] = {}

    # --- runtime state --------------------------------------------------------------------------------

    def set_door_mode(self, door: str, mode: DoorMode | None) -> None:
        """Override a door's provisioned mode (None restores it)."""
        if mode is None:
            self.mode_override.pop(door, None)
        else:
            self.mode_override[door] = mode
        self.first_card_until.pop(door, None)

    def effective_mode(self, door: str, ts: float, *, clock_trusted: bool = True) -> tuple[DoorMode, bool]:
        """(mode in force, free passage now) for a known door.

        With an untrusted clock no door schedule runs: a scheduled UNLOCKED door and a FIRST_CARD door
        (even one a first card opened) are NORMAL card doors, and CARD_AND_PIN asks for the PIN."""
        tables = self.index.tables
        d = tables.doors[door]
        if self.lockdown:
            return DoorMode.LOCKDOWN, False
        mode = self.mode_override.get(door, d.mode)
        if mode is DoorMode.UNLOCKED:
            if d.unlock_schedule is None:
                return mode, True
            if not clock_trusted:
                return DoorMode.NORMAL, False
            sched = tables.schedules.get(d.unlock_schedule)
            return (mode, True) if sched is not None and sched.allows_ts(ts) else (DoorMode.NORMAL, False)
        if mode is DoorMode.FIRST_CARD:
            if not clock_trusted:
                return DoorMode.NORMAL, False
            if self.first_card_until.get(door, 0.0) > ts:
                return mode, True
            sched = tables.schedules.get(d.unlock_schedule) if d.unlock_schedule else None
            return (mode, False) if sched is not None and sched.allows_ts(ts) else (DoorMode.NORMAL, False)
        if mode is DoorMode.CARD_AND_PIN and d.pin_schedule is not None and clock_trusted:
            sched = tables.schedules.get(d.pin_schedule)
            if sched is None or not sched.allows_ts(ts):
                return DoorMode.NORMAL, False
        return mode, False

    # --- the decision ---------------------------------------------------------------------------------

    def decide(
        self,
        door: str,
        card: int,
        now: datetime,
        *,
        pin: str | None = None,
        link_online: bool = True,
        offline_since: datetime | None = None,
        clock_trusted: bool = True,
        rights_age_s: float | None = None,
        facility: int | None = None,
        defer_pin: bool = False,
        pin_verified: tuple[str, bool] | None = None,
        duress_verified: tuple[str, str, bool] | None = None,
        state: RuleState | None = None,
        side: Side = "in",
    ) -> Decision:
        """The decision for a tap at `now`. `defer_pin`: never hash a PIN here (see the module docstring);
        `pin_verified`: (stored hash, whether the PIN matched it) from a check made off the loop, and
        `duress_verified` the same for `Decision.duress_check`. `state`: the access rules' runtime state
        (read only; None reads as empty); `side`: the reader's side of a door between areas."""
        ts = now.timestamp()
        index = self.index
        tables = index.tables
        d = tables.doors.get(door)
        if d is None:
            return Decision(granted=False, reason=Reason.UNKNOWN_DOOR, door=door, card=card)
        if d.mode is _NORMAL and not self.lockdown and door not in self.mode_override:
            mode, free = _NORMAL, False  # the common case, without the call
        else:
            mode, free = self.effective_mode(door, ts, clock_trusted=clock_trusted)
        if mode is DoorMode.LOCKED:
            return Decision(granted=False, reason=Reason.DOOR_LOCKED, door=door, card=card)
        if free:
            return Decision(granted=True, reason=Reason.FREE_PASSAGE, door=door, card=card)
        policy = self.policy
        override = policy.lockdown_override_group if mode is DoorMode.LOCKDOWN else None
        if mode is DoorMode.LOCKDOWN and override is None:
            return Decision(granted=False, reason=Reason.DOOR_LOCKDOWN, door=door, card=card)

        cred = index.cred(card)
        if cred is None:
            return Decision(granted=False, reason=Reason.UNKNOWN_CARD, door=door, card=card)
        uid, status, c_from, c_until = cred
        fac = status >> FACILITY_SHIFT
        limited = (status >> USES_SHIFT) & USES_MASK
        status &= STATUS_MASK
        urow = index.user(uid)
        if urow is None:  # cannot happen in a consistent store; deny rather than guess
            return Decision(granted=False, reason=Reason.UNKNOWN_CARD, door=door, card=card)
        user, flags, u_from, u_until, pin_hash, assignments = urow

        # While the clock is not trusted: `ignore_time` (IGNORE_SCHEDULES, and emergency cards under
        # EMERGENCY_ONLY) opens group schedules, checks window starts on `now` and refuses any window with
        # an end; `strict_time` (ALWAYS_ONLY) admits only rights without any window or schedule.
        tp = policy.time_policy
        ignore_time = not clock_trusted and (
            tp is TimePolicy.IGNORE_SCHEDULES or (tp is TimePolicy.EMERGENCY_ONLY and bool(flags & F_EMERGENCY))
        )
        if fac and facility != fac - 1:
            # the same number on another site's or company's card
            return _deny(door, card, uid, user, Reason.WRONG_FACILITY)
        if status:
            return _deny(door, card, uid, user, _STATUS_CODE_REASON[status] or Reason.CREDENTIAL_REVOKED)
        if ts < c_from:
            return _deny(door, card, uid, user, Reason.CREDENTIAL_NOT_YET_VALID)
        if ignore_time:
            if c_until != NO_END:
                return _deny(door, card, uid, user, Reason.CLOCK_NOT_TRUSTED)  # may have ended
        elif ts >= c_until:
            return _deny(door, card, uid, user, Reason.CREDENTIAL_EXPIRED)
        if not flags & F_ACTIVE:
            return _deny(door, card, uid, user, Reason.USER_INACTIVE)
        if ts < u_from:
            return _deny(door, card, uid, user, Reason.USER_NOT_YET_VALID)
        if ignore_time:
            if u_until != NO_END:
                return _deny(door, card, uid, user, Reason.CLOCK_NOT_TRUSTED)
        elif ts >= u_until:
            return _deny(door, card, uid, user, Reason.USER_EXPIRED)
        if not clock_trusted and tp is TimePolicy.EMERGENCY_ONLY and not flags & F_EMERGENCY:
            return _deny(door, card, uid, user, Reason.CLOCK_NOT_TRUSTED)
        if (
            policy.max_offline_age_s is not None
            and rights_age_s is not None
            and rights_age_s > policy.max_offline_age_s
            and not flags & F_EMERGENCY
        ):
            return _deny(door, card, uid, user, Reason.RIGHTS_TOO_OLD)
        if not link_online and (offline_since is None or ts - offline_since.timestamp() >= policy.offline_grace_s):
            op = policy.offline_policy
            if op is OfflinePolicy.NOBODY or (op is OfflinePolicy.FLAGGED and not flags & F_OFFLINE):
                return _deny(door, card, uid, user, Reason.OFFLINE_NOT_PERMITTED)

        # Groups. `strict_time` is the ALWAYS_ONLY time policy: only unbounded, schedule-less rights count.
        strict_time = not clock_trusted and not ignore_time
        door_mask = tables.door_groups.get(door, 0)
        override_idx = tables.gidx.get(override, -1) if override is not None else -1
        any_door = any_override = any_active = may_have_ended = False
        granted_group = -1
        if clock_trusted and override is None:  # the common case, with fewer steps per assignment
            gsched = tables.gsched
            for g, a_from, a_until in assignments:
                if (door_mask >> g) & 1:
                    any_door = any_override = True
                    if a_from <= ts < a_until:
                        any_active = True
                        sched = gsched[g]
                        if sched is None or sched.allows_ts(ts):
                            granted_group = g
                            break
        else:
            for g, a_from, a_until in assignments:
                if not (door_mask >> g) & 1:
                    continue
                any_door = True
                if override is not None and g != override_idx:
                    continue
                any_override = True
                if strict_time:
                    if a_from != 0 or a_until != NO_END or c_from != 0 or c_until != NO_END:
                        continue
                    if u_from != 0 or u_until != NO_END:
                        continue
                elif ignore_time:
                    if ts < a_from:
                        continue
                    if a_until != NO_END:
                        may_have_ended = True
                        continue
                elif not (a_from <= ts < a_until):
                    continue
                any_active = True
                sched = tables.gsched[g]
                if sched is not None and not ignore_time and (strict_time or not sched.allows_ts(ts)):
                    continue
                granted_group = g
                break
        if granted_group < 0:
            if not any_door:
                return _deny(door, card, uid, user, Reason.NO_GROUP_FOR_DOOR)
            if not any_override:
                return _deny(door, card, uid, user, Reason.DOOR_LOCKDOWN)
            if strict_time or (may_have_ended and not any_active):
                return _deny(door, card, uid, user, Reason.CLOCK_NOT_TRUSTED)
            if not any_active:
                return _deny(door, card, uid, user, Reason.ASSIGNMENT_NOT_ACTIVE)
            return _deny(door, card, uid, user, Reason.OUTSIDE_SCHEDULE)
        group = tables.gid[granted_group]

        alarm = None
        duress = False
        if mode is DoorMode.CARD_AND_PIN:
            fails = self._pin_fail.get(card)
            if fails is not None and fails[1] > ts:
                return _deny(door, card, uid, user, Reason.PIN_LOCKED_OUT, group=group)
            if pin is None:
                return _deny(door, card, uid, user, Reason.PIN_REQUIRED, group=group)
            if pin_hash is None:
                return _deny(door, card, uid, user, Reason.PIN_NOT_ENROLLED, group=group)
            dcheck = self._duress_candidate(pin, pin_hash)
            if pin_verified is not None and pin_verified[0] == pin_hash:
                ok = pin_verified[1]
            elif not valid_pin_hash(pin_hash):
                ok = False  # malformed, or beyond the iteration bound (edge.pin.MAX_ITERATIONS): never hashed
            elif defer_pin:
                return Decision(
                    granted=False, reason=Reason.PIN_REQUIRED, door=door, card=card, uid=uid, user=user,
                    group=group, pin_check=pin_hash, duress_check=dcheck,
                )  # fmt: skip
            else:
                ok = verify_pin(pin, pin_hash)
            if not ok and dcheck is not None:
                if duress_verified is not None and duress_verified[:2] == dcheck:
                    duress = duress_verified[2]
                elif defer_pin:
                    return Decision(
                        granted=False, reason=Reason.PIN_REQUIRED, door=door, card=card, uid=uid, user=user,
                        group=group, pin_check=pin_hash, duress_check=dcheck,
                    )  # fmt: skip
                else:
                    duress = valid_pin_hash(dcheck[1]) and verify_pin(*dcheck)
                ok = duress
            if not ok:
                if fails is None:
                    fails = self._pin_fail[card] = [0.0, 0.0]
                fails[0] += 1
                if fails[0] >= policy.pin_max_attempts:
                    fails[0] = 0.0
                    fails[1] = ts + policy.pin_lockout_s
                    alarm = "pin_lockout"
                return Decision(
                    granted=False, reason=Reason.PIN_WRONG, door=door, card=card, uid=uid, user=user,
                    group=group, alarm=alarm,
                )  # fmt: skip
            self._pin_fail.pop(card, None)

        # Access rules (issue 19), on the state the caller passes (read only here).
        rules = tables.door_rules.get(door)
        if rules is None and not limited and mode is not DoorMode.FIRST_CARD:  # the common case: no rule
            return Decision(
                granted=True, reason=Reason.GRANTED, door=door, card=card, uid=uid, user=user, group=group,
                strike_s=d.extended_strike_s if flags & F_EXTENDED else d.strike_s, alarm=alarm, duress=duress,
            )  # fmt: skip
        passage: tuple[str | None, str | None] | None = None
        escort = False
        interlock: str | None = None
        who = (door, card, uid, user, group)
        src: str | None = None
        dst: str | None = None
        if rules is not None and rules.linked:
            src, dst = (rules.from_area, rules.to_area) if side != "out" else (rules.to_area, rules.from_area)
            passage = (src, dst)
        if limited and state is not None and state.used.get(card, 0) >= limited:
            return _refuse(who, Reason.USES_EXHAUSTED, duress, passage, interlock)
        if rules is not None:
            if rules.interlock is not None:
                interlock = rules.interlock
                if state is not None:
                    for peer in rules.peers:
                        if state.busy(peer, ts):
                            return _refuse(who, Reason.INTERLOCK, duress, passage, interlock)
            gmask = -1  # the user's groups in their window (computed when a rule needs them)
            if rules.linked:
                loc = state.where.get(user) if state is not None else None
                worst = 0
                for a_id in (dst, src):
                    ar = rules.areas.get(a_id)
                    if ar is None or ar.mode is AntiPassback.NONE:
                        continue
                    if ar.exempt:
                        if gmask < 0:
                            gmask = _groups_now(assignments, ts)
                        if gmask & ar.exempt:
                            continue
                    if ar.mode is AntiPassback.TIMED:
                        if a_id == dst and loc is not None and loc[0] == dst and ts - loc[1] < ar.timed_s:
                            worst = 2
                    elif loc is not None and loc[0] != src:
                        worst = max(worst, 2 if ar.mode is AntiPassback.HARD else 1)
                if worst == 2:
                    return _refuse(who, Reason.ANTI_PASSBACK, duress, passage, interlock)
                if worst == 1:
                    alarm = "anti_passback"
                ard = rules.areas.get(dst)
                if (
                    ard is not None
                    and ard.max_occupancy is not None
                    and (loc is None or loc[0] != dst)
                    and state is not None
                    and state.occupancy.get(ard.id, 0) >= ard.max_occupancy
                ):
                    return _refuse(who, Reason.AREA_FULL, duress, passage, interlock)
            if rules.escort_gidx >= 0:
                if gmask < 0:
                    gmask = _groups_now(assignments, ts)
                if (gmask >> rules.escort_gidx) & 1:
                    escort = True
                elif (rules.visitor_mask >> granted_group) & 1:
                    e = state.escort.get(door) if state is not None else None
                    if e is None or e[0] == user or ts - e[1] > rules.escort_s:
                        return _refuse(who, Reason.AWAITING_ESCORT, duress, passage, interlock)
            if rules.two_person_s is not None:
                p = state.pending.get(door) if state is not None else None
                if p is None or p[0] == user or ts - p[1] > rules.two_person_s:
                    return _refuse(who, Reason.AWAITING_SECOND_PERSON, duress, passage, interlock)

        strike = d.extended_strike_s if flags & F_EXTENDED else d.strike_s
        if mode is DoorMode.FIRST_CARD:
            sched = tables.schedules[d.unlock_schedule] if d.unlock_schedule else None
            end = sched.span_end(ts) if sched is not None else None
            if end is not None:
                until = end.timestamp()
                self.first_card_until[door] = until
                return Decision(
                    granted=True, reason=Reason.FIRST_CARD_UNLOCK, door=door, card=card, uid=uid, user=user,
                    group=group, strike_s=strike, unlock_until=until, alarm=alarm, duress=duress, passage=passage,
                    escort=escort, count_use=bool(limited), interlock=interlock,
                )  # fmt: skip
        return Decision(
            granted=True, reason=Reason.GRANTED, door=door, card=card, uid=uid, user=user, group=group,
            strike_s=strike, alarm=alarm, duress=duress, passage=passage, escort=escort, count_use=bool(limited),
            interlock=interlock,
        )  # fmt: skip

    def _duress_candidate(self, pin: str, pin_hash: str) -> tuple[str, str] | None:
        """(PIN, hash) whose match means duress, under the site's setting; None when there is none."""
        rules = self.index.tables.site_rules
        if rules.duress is DuressMode.PIN_PLUS_ONE:
            if not pin or not pin[-1].isdigit():
                return None
            return pin[:-1] + str((int(pin[-1]) - 1) % 10), pin_hash
        if rules.duress is DuressMode.CODE and rules.duress_code_hash is not None:
            return pin, rules.duress_code_hash
        return None


def _groups_now(assignments: tuple[tuple[int, int, int], ...], ts: float) -> int:
    """Bitmask of the groups the user is assigned to at `ts` (assignment windows only, schedules aside)."""
    m = 0
    for g, a_from, a_until in assignments:
        if a_from <= ts < a_until:
            m |= 1 << g
    return m
