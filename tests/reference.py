"""A deliberately plain reference implementation of the tap decision, for the property tests.

It works straight on the msgspec model objects (Door, Schedule, Group, User, Credential) with datetime
arithmetic and one `zoneinfo` conversion per question: no bitmasks, no index, no caching. It follows the
order of checks documented in `edge/decision.py` and `docs/model.md`. Where those documents are silent
(the details of the time policies) it states the rule it uses in a comment.

Times are whole seconds: the sub-second part of every instant is dropped before it is compared.
A schedule allows an instant when its local wall clock (weekday, HH:MM) is inside an interval of that
weekday, or on a listed holiday (local date) inside one of `holiday_intervals`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

from edge.decision import OfflinePolicy, Reason, SitePolicy, TimePolicy
from edge.index import (
    F_ACTIVE,
    F_EMERGENCY,
    F_EXTENDED,
    F_OFFLINE,
    NO_END,
    NO_START,
    STATUS_CODES,
    CredRow,
    RightsIndex,
    Tables,
    UserRow,
    build_arrays,
    status_word,
)
from edge.model import (
    AntiPassback,
    Area,
    ChangeSet,
    Credential,
    CredentialStatus,
    DeleteArea,
    DeleteCredential,
    DeleteDoor,
    DeleteGroup,
    DeleteInterlock,
    DeleteSchedule,
    DeleteUser,
    Door,
    DoorMode,
    DuressMode,
    Group,
    Interlock,
    PutArea,
    PutCredential,
    PutDoor,
    PutGroup,
    PutInterlock,
    PutSchedule,
    PutSiteRules,
    PutUser,
    Schedule,
    SiteRules,
    User,
)
from edge.pin import verify_pin

#: How far ahead a first-card unlock may run when the schedule never closes (local midnight, 9 days on).
LOOKAHEAD_DAYS = 9


@dataclass
class SiteModel:
    """The whole site as plain model objects."""

    tz: ZoneInfo
    doors: dict[str, Door] = field(default_factory=dict)
    schedules: dict[str, Schedule] = field(default_factory=dict)
    groups: dict[str, Group] = field(default_factory=dict)
    users: dict[str, User] = field(default_factory=dict)
    credentials: dict[int, Credential] = field(default_factory=dict)
    areas: dict[str, Area] = field(default_factory=dict)
    interlocks: dict[str, Interlock] = field(default_factory=dict)
    site_rules: SiteRules = field(default_factory=SiteRules)

    def apply(self, cs: ChangeSet) -> None:
        """Apply a (valid) change set the plain way."""
        for ch in cs.changes:
            if isinstance(ch, PutDoor):
                self.doors[ch.door.id] = ch.door
            elif isinstance(ch, DeleteDoor):
                del self.doors[ch.id]
            elif isinstance(ch, PutSchedule):
                self.schedules[ch.schedule.id] = ch.schedule
            elif isinstance(ch, DeleteSchedule):
                del self.schedules[ch.id]
            elif isinstance(ch, PutGroup):
                self.groups[ch.group.id] = ch.group
            elif isinstance(ch, DeleteGroup):
                del self.groups[ch.id]
            elif isinstance(ch, PutUser):
                self.users[ch.user.id] = ch.user
            elif isinstance(ch, DeleteUser):
                del self.users[ch.id]
                for card in [c for c, cred in self.credentials.items() if cred.user == ch.id]:
                    del self.credentials[card]
            elif isinstance(ch, PutCredential):
                self.credentials[ch.credential.card] = ch.credential
            elif isinstance(ch, DeleteCredential):
                del self.credentials[ch.card]
            elif isinstance(ch, PutArea):
                self.areas[ch.area.id] = ch.area
            elif isinstance(ch, DeleteArea):
                del self.areas[ch.id]
            elif isinstance(ch, PutInterlock):
                self.interlocks[ch.interlock.id] = ch.interlock
            elif isinstance(ch, DeleteInterlock):
                del self.interlocks[ch.id]
            elif isinstance(ch, PutSiteRules):
                self.site_rules = ch.rules
            else:  # pragma: no cover
                raise TypeError(ch)

    def copy(self) -> SiteModel:
        return SiteModel(
            self.tz, dict(self.doors), dict(self.schedules), dict(self.groups), dict(self.users),
            dict(self.credentials), dict(self.areas), dict(self.interlocks), self.site_rules,
        )  # fmt: skip


# --- plain time helpers -----------------------------------------------------------------------------


def whole(dt: datetime) -> datetime:
    """The instant with its sub-second part dropped (UTC)."""
    return dt.astimezone(UTC).replace(microsecond=0)


def in_window(now: datetime, valid_from: datetime | None, valid_until: datetime | None) -> bool:
    """valid_from <= now < valid_until on whole seconds; a missing bound is open."""
    if valid_from is not None and whole(now) < whole(valid_from):
        return False
    return not (valid_until is not None and whole(now) >= whole(valid_until))


def unbounded(valid_from: datetime | None, valid_until: datetime | None) -> bool:
    return valid_from is None and valid_until is None


def hhmm(text: str) -> int:
    hours, minutes = text.split(":")
    return int(hours) * 60 + int(minutes)


def schedule_allows(model: SiteModel, schedule: Schedule, now: datetime) -> bool:
    zone = ZoneInfo(schedule.tz) if schedule.tz else model.tz
    local = now.astimezone(zone)
    minute = local.hour * 60 + local.minute
    if local.date() in schedule.holidays:
        ranges = [(r.start, r.end) for r in schedule.holiday_intervals]
    else:
        ranges = [(iv.start, iv.end) for iv in schedule.intervals if iv.day == local.weekday()]
    return any(hhmm(start) <= minute < hhmm(end) for start, end in ranges)


def schedule_end(model: SiteModel, schedule: Schedule, now: datetime) -> datetime:
    """The first instant after `now` at which the schedule no longer allows, walking minute by minute.

    When the schedule stays open up to local midnight `LOOKAHEAD_DAYS` days after today, that midnight.
    """
    zone = ZoneInfo(schedule.tz) if schedule.tz else model.tz
    today = now.astimezone(zone).date()
    cap = datetime.combine(today + timedelta(days=LOOKAHEAD_DAYS), time(0), zone).astimezone(UTC)
    t = whole(now).replace(second=0) + timedelta(minutes=1)
    while t < cap:
        if not schedule_allows(model, schedule, t):
            return t
        t += timedelta(minutes=1)
    return cap


# --- the decision -------------------------------------------------------------------------------------

_STATUS = {
    CredentialStatus.SUSPENDED: Reason.CREDENTIAL_SUSPENDED,
    CredentialStatus.LOST: Reason.CREDENTIAL_LOST,
    CredentialStatus.REVOKED: Reason.CREDENTIAL_REVOKED,
}


@dataclass
class RefState:
    """The access rules' runtime state, the plain way: a user's last (area, time) and nothing derived
    (occupancy is counted from `where` on every question)."""

    where: dict[str, tuple[str | None, float]] = field(default_factory=dict)
    pending: dict[str, tuple[str, float]] = field(default_factory=dict)  # door -> first person
    escort: dict[str, tuple[str, float]] = field(default_factory=dict)  # door -> escort's tap
    released: dict[str, float] = field(default_factory=dict)  # interlocked door -> lock released until
    open_doors: set[str] = field(default_factory=set)
    used: dict[int, int] = field(default_factory=dict)

    def occupancy(self, area: str) -> int:
        return sum(1 for a, _ in self.where.values() if a == area)


def interlock_of(model: SiteModel, door: str) -> Interlock | None:
    """The interlock a door is in (the first, in the site's order, that names it)."""
    for il in model.interlocks.values():
        if door in il.doors:
            return il
    return None


def groups_now(user: User, now: datetime) -> set[str]:
    return {a.group for a in user.assignments if in_window(now, a.valid_from, a.valid_until)}


def ref_on_decision(model: SiteModel, state: RefState, r: RefResult, door: str, card: int, now: datetime) -> None:
    """What a decision leaves behind when acted on: a first person waiting, an escort's tap, a released lock."""
    t = whole(now).timestamp()
    if r.reason == Reason.AWAITING_SECOND_PERSON and r.user is not None:
        state.pending[door] = (r.user, t)
    if not r.granted:
        return
    state.pending.pop(door, None)
    d = model.doors[door]
    user = model.users[r.user] if r.user is not None else None
    if (
        user is not None and d.escort_group is not None and d.visitor_groups
        and d.escort_group in groups_now(user, now)
    ):  # fmt: skip
        state.escort[door] = (user.id, t)
    if r.user is not None and interlock_of(model, door) is not None:
        until = r.unlock_until if r.unlock_until is not None else t + r.strike_s
        state.released[door] = max(until, state.released.get(door, 0.0))


def ref_update(model: SiteModel, state: RefState, r: RefResult, card: int, opened: bool, now: datetime) -> None:
    """A granted door opened (or not): the user is where the door led; a use is counted."""
    if not r.granted or not opened or r.user is None:
        return
    if r.passage is not None:
        state.where[r.user] = (r.passage[1], whole(now).timestamp())
    if model.credentials[card].max_uses is not None:
        state.used[card] = state.used.get(card, 0) + 1


def ref_remote_move(state: RefState, user: str, area: str | None, t: float) -> None:
    """A passage another gateway saw at `t` (relayed): it wins unless this gateway saw one later."""
    if user not in state.where or state.where[user][1] <= t:
        state.where[user] = (area, t)


def ref_reset(state: RefState, user: str | None, area: str | None) -> None:
    """Forget the matching users (both None: everyone)."""
    for u, (a, _t) in list(state.where.items()):
        if (user is None or u == user) and (area is None or a == area):
            del state.where[u]


def ref_contact(state: RefState, door: str, is_open: bool) -> None:
    if is_open:
        state.open_doors.add(door)
    else:
        state.open_doors.discard(door)
        state.released.pop(door, None)


def duress_match(model: SiteModel, user: User, pin: str) -> bool:
    """The site's duress PIN: the user's PIN with its last digit one more (9 -> 0), or the site's code."""
    rules = model.site_rules
    if rules.duress == DuressMode.PIN_PLUS_ONE and user.pin_hash is not None and pin and pin[-1].isdigit():
        real = pin[:-1] + "9012345678"[int(pin[-1])]
        return verify_pin(real, user.pin_hash)
    if rules.duress == DuressMode.CODE and rules.duress_code_hash is not None:
        return verify_pin(pin, rules.duress_code_hash)
    return False


@dataclass
class RefResult:
    granted: bool
    reason: Reason
    group: str | None = None
    user: str | None = None
    strike_s: float = 0.0
    unlock_until: float | None = None
    alarm: str | None = None
    duress: bool = False
    passage: tuple[str | None, str | None] | None = None

    def triple(self) -> tuple[bool, Reason, str | None]:
        return self.granted, self.reason, self.group


def reference_decide(
    model: SiteModel,
    door: str,
    card: int,
    now: datetime,
    *,
    pin: str | None = None,
    link_online: bool = True,
    offline_since: datetime | None = None,
    clock_trusted: bool = True,
    rights_age_s: float | None = None,
    policy: SitePolicy | None = None,
    mode_override: dict[str, DoorMode] | None = None,
    lockdown: bool = False,
    first_card_until: dict[str, float] | None = None,
    pin_failures: dict[int, list[float]] | None = None,
    facility: int | None = None,
    state: RefState | None = None,
    side: str = "in",
) -> tuple[bool, Reason, str | None]:
    """(granted, reason, group). `first_card_until` and `pin_failures` are updated like the Decider's state."""
    return reference_decision(
        model, door, card, now, pin=pin, link_online=link_online, offline_since=offline_since,
        clock_trusted=clock_trusted, rights_age_s=rights_age_s, policy=policy, mode_override=mode_override,
        lockdown=lockdown, first_card_until=first_card_until, pin_failures=pin_failures, facility=facility,
        state=state, side=side,
    ).triple()  # fmt: skip


def reference_decision(
    model: SiteModel,
    door: str,
    card: int,
    now: datetime,
    *,
    pin: str | None = None,
    link_online: bool = True,
    offline_since: datetime | None = None,
    clock_trusted: bool = True,
    rights_age_s: float | None = None,
    policy: SitePolicy | None = None,
    mode_override: dict[str, DoorMode] | None = None,
    lockdown: bool = False,
    first_card_until: dict[str, float] | None = None,
    pin_failures: dict[int, list[float]] | None = None,
    facility: int | None = None,
    state: RefState | None = None,
    side: str = "in",
) -> RefResult:
    """Like `reference_decide`, with the user, strike time, unlock end and alarm as well."""
    policy = policy or SitePolicy()
    mode_override = mode_override if mode_override is not None else {}
    first_card_until = first_card_until if first_card_until is not None else {}
    pin_failures = pin_failures if pin_failures is not None else {}
    now = whole(now)
    now_s = now.timestamp()

    # 1. the door
    d = model.doors.get(door)
    if d is None:
        return RefResult(False, Reason.UNKNOWN_DOOR)

    # 2. the door mode in force. While the clock is not trusted no door schedule runs: a scheduled
    # UNLOCKED door and a FIRST_CARD door (even one a first card opened) are card doors, and a card + PIN
    # door asks for the PIN whatever its PIN schedule says.
    mode = DoorMode.LOCKDOWN if lockdown else mode_override.get(door, d.mode)
    if mode == DoorMode.LOCKED:
        return RefResult(False, Reason.DOOR_LOCKED)
    if mode == DoorMode.UNLOCKED:
        if d.unlock_schedule is None:
            return RefResult(True, Reason.FREE_PASSAGE)
        if clock_trusted and schedule_allows(model, model.schedules[d.unlock_schedule], now):
            return RefResult(True, Reason.FREE_PASSAGE)
        mode = DoorMode.NORMAL
    if mode == DoorMode.FIRST_CARD:
        if not clock_trusted:
            mode = DoorMode.NORMAL
        else:
            until = first_card_until.get(door)
            if until is not None and now_s < until:
                return RefResult(True, Reason.FREE_PASSAGE)
            if d.unlock_schedule is None or not schedule_allows(model, model.schedules[d.unlock_schedule], now):
                mode = DoorMode.NORMAL
    if (
        mode == DoorMode.CARD_AND_PIN
        and clock_trusted
        and d.pin_schedule is not None
        and not schedule_allows(model, model.schedules[d.pin_schedule], now)
    ):
        mode = DoorMode.NORMAL
    override = policy.lockdown_override_group if mode == DoorMode.LOCKDOWN else None
    if mode == DoorMode.LOCKDOWN and override is None:
        return RefResult(False, Reason.DOOR_LOCKDOWN)

    # 3. the card
    cred = model.credentials.get(card)
    if cred is None:
        return RefResult(False, Reason.UNKNOWN_CARD)
    user = model.users[cred.user]

    def deny(reason: Reason, group: str | None = None) -> RefResult:
        return RefResult(False, reason, group, user.id)

    # Time policy while the clock is not trusted (`now` is then the agent's best estimate, never before the
    # last good time, so window *starts* are still checked on it). IGNORE_SCHEDULES: group schedules count
    # as open, and a window with an end may have ended, so it never grants: CLOCK_NOT_TRUSTED.
    # EMERGENCY_ONLY: emergency cards as with IGNORE_SCHEDULES, every other card is refused at the clock
    # step (5). ALWAYS_ONLY: windows are checked on `now` as usual; at the group step only an assignment
    # that is unbounded, of a schedule-less group, held by an unbounded user through an unbounded
    # credential counts, otherwise CLOCK_NOT_TRUSTED.
    ignore_time = not clock_trusted and (
        policy.time_policy == TimePolicy.IGNORE_SCHEDULES
        or (policy.time_policy == TimePolicy.EMERGENCY_ONLY and user.emergency)
    )
    strict_time = not clock_trusted and policy.time_policy == TimePolicy.ALWAYS_ONLY

    if cred.facility is not None and facility != cred.facility:
        return deny(Reason.WRONG_FACILITY)
    if cred.status != CredentialStatus.ACTIVE:
        return deny(_STATUS[cred.status])
    if cred.valid_from is not None and now < whole(cred.valid_from):
        return deny(Reason.CREDENTIAL_NOT_YET_VALID)
    if cred.valid_until is not None:
        if ignore_time:
            return deny(Reason.CLOCK_NOT_TRUSTED)
        if now >= whole(cred.valid_until):
            return deny(Reason.CREDENTIAL_EXPIRED)

    # 4. the user
    if not user.active:
        return deny(Reason.USER_INACTIVE)
    if user.valid_from is not None and now < whole(user.valid_from):
        return deny(Reason.USER_NOT_YET_VALID)
    if user.valid_until is not None:
        if ignore_time:
            return deny(Reason.CLOCK_NOT_TRUSTED)
        if now >= whole(user.valid_until):
            return deny(Reason.USER_EXPIRED)

    # 5. the clock, the age of the rights
    if not clock_trusted and policy.time_policy == TimePolicy.EMERGENCY_ONLY and not user.emergency:
        return deny(Reason.CLOCK_NOT_TRUSTED)
    if (
        policy.max_offline_age_s is not None
        and rights_age_s is not None
        and rights_age_s > policy.max_offline_age_s
        and not user.emergency
    ):
        return deny(Reason.RIGHTS_TOO_OLD)

    # 6. the cloud link
    if not link_online:
        down_for = None if offline_since is None else (now - whole(offline_since)).total_seconds()
        past_grace = down_for is None or down_for >= policy.offline_grace_s
        refused = policy.offline_policy == OfflinePolicy.NOBODY or (
            policy.offline_policy == OfflinePolicy.FLAGGED and not user.offline_access
        )
        if past_grace and refused:
            return deny(Reason.OFFLINE_NOT_PERMITTED)

    # 7. groups, in the order the assignments were provisioned
    for_door = [a for a in user.assignments if a.group in model.groups and door in model.groups[a.group].doors]
    if not for_door:
        return deny(Reason.NO_GROUP_FOR_DOOR)
    if override is not None:
        for_door = [a for a in for_door if a.group == override]
        if not for_door:
            return deny(Reason.DOOR_LOCKDOWN)
    granted_group: str | None = None
    if strict_time:
        for a in for_door:
            if (
                unbounded(a.valid_from, a.valid_until)
                and unbounded(cred.valid_from, cred.valid_until)
                and unbounded(user.valid_from, user.valid_until)
                and model.groups[a.group].schedule is None
            ):
                granted_group = a.group
                break
        if granted_group is None:
            return deny(Reason.CLOCK_NOT_TRUSTED)
    elif ignore_time:
        started = [a for a in for_door if a.valid_from is None or now >= whole(a.valid_from)]
        open_ended = [a for a in started if a.valid_until is None]
        if open_ended:
            granted_group = open_ended[0].group  # group schedules count as open
        elif started:
            return deny(Reason.CLOCK_NOT_TRUSTED)  # every started assignment has an end that may have passed
        else:
            return deny(Reason.ASSIGNMENT_NOT_ACTIVE)
    else:
        active = [a for a in for_door if in_window(now, a.valid_from, a.valid_until)]
        if not active:
            return deny(Reason.ASSIGNMENT_NOT_ACTIVE)
        for a in active:
            sched_id = model.groups[a.group].schedule
            if sched_id is None or schedule_allows(model, model.schedules[sched_id], now):
                granted_group = a.group
                break
        if granted_group is None:
            return deny(Reason.OUTSIDE_SCHEDULE)

    # 8. PIN. A duress PIN (the site's setting) is a right PIN that raises the silent alarm.
    duress = False
    if mode == DoorMode.CARD_AND_PIN:
        fails = pin_failures.get(card)
        if fails is not None and fails[1] > now_s:
            return deny(Reason.PIN_LOCKED_OUT, granted_group)
        if pin is None:
            return deny(Reason.PIN_REQUIRED, granted_group)
        if user.pin_hash is None:
            return deny(Reason.PIN_NOT_ENROLLED, granted_group)
        if not verify_pin(pin, user.pin_hash):
            duress = duress_match(model, user, pin)
        if not duress and not verify_pin(pin, user.pin_hash):
            fails = pin_failures.setdefault(card, [0.0, 0.0])
            fails[0] += 1
            alarm = None
            if fails[0] >= policy.pin_max_attempts:
                fails[0] = 0.0
                fails[1] = now_s + policy.pin_lockout_s
                alarm = "pin_lockout"
            return RefResult(False, Reason.PIN_WRONG, granted_group, user.id, alarm=alarm)
        pin_failures.pop(card, None)

    # 9. the access rules, on `state` (the reference's own: where users are, who waits, what is open)
    st = state if state is not None else RefState()
    passage: tuple[str | None, str | None] | None = None
    if d.to_area is not None or d.from_area is not None:
        passage = (d.from_area, d.to_area) if side == "in" else (d.to_area, d.from_area)

    def refuse(reason: Reason) -> RefResult:
        return RefResult(False, reason, granted_group, user.id, duress=duress, passage=passage)

    if cred.max_uses is not None and st.used.get(card, 0) >= cred.max_uses:
        return refuse(Reason.USES_EXHAUSTED)
    lock = interlock_of(model, door)
    if lock is not None:
        for other in lock.doors:
            if other != door and (other in st.open_doors or st.released.get(other, 0.0) > now_s):
                return refuse(Reason.INTERLOCK)
    alarm = None
    if passage is not None:
        src, dst = passage
        here = st.where.get(user.id)
        mine = groups_now(user, now)
        # The rule of the area entered and of the area left each apply (hard over soft); an exempt user is
        # not held by that area's rule. Hard/soft: a user seen somewhere other than the side they come from.
        # Timed: a user who entered the area `timed_s` ago or less and was not seen leaving it.
        verdicts = []
        for area_id in (dst, src):
            area = model.areas.get(area_id) if area_id is not None else None
            if area is None or area.anti_passback == AntiPassback.NONE or mine & set(area.exempt_groups):
                continue
            if area.anti_passback == AntiPassback.TIMED:
                if area_id == dst and here is not None and here[0] == dst and now_s - here[1] < area.timed_s:
                    verdicts.append("hard")
            elif here is not None and here[0] != src:
                verdicts.append("hard" if area.anti_passback == AntiPassback.HARD else "soft")
        if "hard" in verdicts:
            return refuse(Reason.ANTI_PASSBACK)
        if "soft" in verdicts:
            alarm = "anti_passback"
        target = model.areas.get(dst) if dst is not None else None
        already_there = here is not None and here[0] == dst
        if (
            target is not None and target.max_occupancy is not None and not already_there
            and st.occupancy(target.id) >= target.max_occupancy
        ):  # fmt: skip
            return refuse(Reason.AREA_FULL)
    is_escort = d.escort_group is not None and d.escort_group in groups_now(user, now)
    if d.escort_group is not None and d.visitor_groups and not is_escort and granted_group in d.visitor_groups:
        e = st.escort.get(door)
        if e is None or e[0] == user.id or now_s - e[1] > d.escort_s:
            return refuse(Reason.AWAITING_ESCORT)
    if d.two_person_s is not None:
        first = st.pending.get(door)
        if first is None or first[0] == user.id or now_s - first[1] > d.two_person_s:
            return refuse(Reason.AWAITING_SECOND_PERSON)

    # 10. granted
    strike = d.extended_strike_s if user.extended_door_time else d.strike_s
    if mode == DoorMode.FIRST_CARD:
        assert d.unlock_schedule is not None
        end = schedule_end(model, model.schedules[d.unlock_schedule], now).timestamp()
        first_card_until[door] = end
        return RefResult(True, Reason.FIRST_CARD_UNLOCK, granted_group, user.id, strike, unlock_until=end,
                         alarm=alarm, duress=duress, passage=passage)  # fmt: skip
    return RefResult(True, Reason.GRANTED, granted_group, user.id, strike, alarm=alarm, duress=duress,
                     passage=passage)  # fmt: skip


# --- test support: the real index built straight from a SiteModel (no store) ---------------------------


def index_of(model: SiteModel, *, version: int = 1) -> RightsIndex:
    """A `RightsIndex` over `model` through `Tables.build` + `build_arrays` (uids in user-id order)."""
    tables = Tables.build(
        model.tz, model.doors.values(), model.schedules.values(), model.groups.values(),
        areas=model.areas.values(), interlocks=model.interlocks.values(), site_rules=model.site_rules,
    )  # fmt: skip
    uid_of = {u: i + 1 for i, u in enumerate(sorted(model.users))}

    def secs(v: datetime | None, default: int) -> int:
        return default if v is None else int(v.timestamp())

    users: list[tuple[int, UserRow]] = []
    for uid_name, uid in uid_of.items():
        u = model.users[uid_name]
        flags = (
            (F_ACTIVE if u.active else 0) | (F_OFFLINE if u.offline_access else 0)
            | (F_EXTENDED if u.extended_door_time else 0) | (F_EMERGENCY if u.emergency else 0)
        )  # fmt: skip
        rows = tuple(
            (tables.gidx[a.group], secs(a.valid_from, NO_START), secs(a.valid_until, NO_END)) for a in u.assignments
        )
        users.append((uid, (u.id, flags, secs(u.valid_from, NO_START), secs(u.valid_until, NO_END), u.pin_hash, rows)))
    creds: list[tuple[int, CredRow]] = [
        (
            c.card,
            (
                uid_of[c.user],
                status_word(STATUS_CODES[c.status], c.facility, c.max_uses),
                secs(c.valid_from, NO_START),
                secs(c.valid_until, NO_END),
            ),
        )
        for c in model.credentials.values()
    ]
    return RightsIndex(tables, build_arrays(creds, users), version=version)


# --- the store's acceptance rules, the plain way -----------------------------------------------------------


def change_set_refusal(model: SiteModel, cs: ChangeSet) -> str | None:
    """Why the store must refuse `cs` on top of `model` (its `ChangeRejected.code`), or None when it applies.

    The rules of docs/model.md: each change in order (a delete names something that exists at that point,
    a credential names a user that exists at that point and a card no other user holds), then the end
    state's references (group -> doors and schedule, door -> schedules, assignment -> group)."""
    m = model.copy()
    for ch in cs.changes:
        if isinstance(ch, DeleteDoor) and ch.id not in m.doors:
            return "unknown_reference"
        if isinstance(ch, DeleteSchedule) and ch.id not in m.schedules:
            return "unknown_reference"
        if isinstance(ch, DeleteGroup) and ch.id not in m.groups:
            return "unknown_reference"
        if isinstance(ch, DeleteUser) and ch.id not in m.users:
            return "unknown_reference"
        if isinstance(ch, DeleteCredential) and ch.card not in m.credentials:
            return "unknown_reference"
        if isinstance(ch, PutCredential):
            if ch.credential.user not in m.users:
                return "unknown_reference"
            held = m.credentials.get(ch.credential.card)
            if held is not None and held.user != ch.credential.user:
                return "duplicate_card"
        m.apply(ChangeSet(from_version=0, to_version=1, changes=[ch]))
    for g in m.groups.values():
        if any(d not in m.doors for d in g.doors) or (g.schedule is not None and g.schedule not in m.schedules):
            return "unknown_reference"
    for d in m.doors.values():
        if any(s is not None and s not in m.schedules for s in (d.unlock_schedule, d.pin_schedule)):
            return "unknown_reference"
    for u in m.users.values():
        if any(a.group not in m.groups for a in u.assignments):
            return "unknown_reference"
    for d in m.doors.values():
        if any(a is not None and a not in m.areas for a in (d.to_area, d.from_area)):
            return "unknown_reference"
        if any(g not in m.groups for g in [*d.visitor_groups, *([d.escort_group] if d.escort_group else [])]):
            return "unknown_reference"
    for area in m.areas.values():
        if any(g not in m.groups for g in area.exempt_groups):
            return "unknown_reference"
    seen: set[str] = set()
    for il in m.interlocks.values():
        if any(x not in m.doors for x in il.doors):
            return "unknown_reference"
        if seen & set(il.doors) or len(set(il.doors)) != len(il.doors):
            return "bad_field"  # a door is in one interlock only
        seen |= set(il.doors)
    return None
