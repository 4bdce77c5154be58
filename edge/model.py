"""The site model: doors, schedules, groups, users, credentials, assignments, change sets.

These are the msgspec Structs that travel from the cloud to the gateway and are kept in the store. Times
are timezone-aware datetimes on the wire (RFC 3339) and whole UTC seconds inside the index. A missing
`valid_from` means "since always", a missing `valid_until` means "for ever"; every window is half-open,
`valid_from <= t < valid_until`.

Limits (documented in docs/model.md, enforced by the decoders through `Meta` and, for the counts over a
whole site, by `Store` when it plans a change set; a breach is refused as a whole, `bad_field`, naming
the field): they bound what one message can make the gateway hold or compute.
"""

from __future__ import annotations

import enum
import re
from datetime import date, datetime
from typing import Annotated, Final

import msgspec
from msgspec import Meta

from .errors import ChangeRejected

#: Weekly intervals of one schedule (a week has 7 x 1,440 minutes; 1,000 covers any real timetable).
MAX_INTERVALS: Final = 1000
#: Holidays of one schedule, and intervals on a holiday.
MAX_HOLIDAYS: Final = 400
MAX_HOLIDAY_INTERVALS: Final = 100
#: Per site (the end state of every change set and every snapshot).
MAX_SCHEDULES: Final = 500
MAX_DOORS: Final = 1000
MAX_GROUPS: Final = 4096
#: Doors of one group; assignments (groups) of one user.
MAX_GROUP_DOORS: Final = MAX_DOORS
MAX_ASSIGNMENTS: Final = 64
#: Free-text fields: names (characters), a PIN hash, a card format name, a time zone name.
MAX_NAME: Final = 200
MAX_PIN_HASH: Final = 256
MAX_FORMAT: Final = 32
MAX_TZ: Final = 64
#: Access rules (issue 19): areas and interlocks per site, doors of one interlock, exempt groups of an area,
#: the uses of a use-limited credential (they live in 6 bits of the index's status word), occupancy.
MAX_AREAS: Final = 500
MAX_INTERLOCKS: Final = 500
MAX_INTERLOCK_DOORS: Final = 16
MAX_EXEMPT_GROUPS: Final = 64
MAX_USES: Final = 63
MAX_OCCUPANCY: Final = 1_000_000
#: Two-person and escort windows, and the timed anti-passback forgiveness, in seconds.
MAX_RULE_WINDOW_S: Final = 86_400.0

Name = Annotated[str, Meta(max_length=MAX_NAME)]

#: Identifiers of doors, groups, schedules and users: short, printable, no whitespace.
Ident = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:@\-]+$")]
#: A card number as printed on the card or read off the reader: 0 <= n < 2**63 (covers 56-bit CSNs).
CardNumber = Annotated[int, Meta(ge=0, le=2**63 - 1)]
#: Wall-clock time of day "HH:MM"; "24:00" is allowed as the end of an interval.
ClockTime = Annotated[str, Meta(pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$|^24:00$")]

_CLOCK = re.compile(r"^(\d\d):(\d\d)$")


def clock_minutes(text: str) -> int:
    """Minutes since local midnight of an "HH:MM" clock time (``24:00`` -> 1440)."""
    m = _CLOCK.match(text)
    if m is None:
        raise ValueError(f"not a HH:MM clock time: {text!r}")
    return int(m.group(1)) * 60 + int(m.group(2))


class DoorMode(enum.StrEnum):
    NORMAL = "normal"  # card
    CARD_AND_PIN = "card_and_pin"
    UNLOCKED = "unlocked"  # free passage (while `unlock_schedule` is active, if one is set)
    LOCKED = "locked"  # nobody
    LOCKDOWN = "lockdown"  # nobody but the site's override group
    FIRST_CARD = "first_card"  # during `unlock_schedule` the first valid tap unlocks until it ends


class AntiPassback(enum.StrEnum):
    """An area's anti-passback mode (docs/model.md, "Access rules")."""

    NONE = "none"
    SOFT = "soft"  # grant, and raise the alarm `anti_passback`
    HARD = "hard"  # deny `anti_passback`
    TIMED = "timed"  # re-entry to the area refused for `timed_s` after entering it


class DuressMode(enum.StrEnum):
    """How a site recognises a duress PIN at a card + PIN door."""

    OFF = "off"
    PIN_PLUS_ONE = "pin_plus_one"  # the user's PIN with its last digit + 1 (9 -> 0)
    CODE = "code"  # a separate site-wide duress code (`SiteRules.duress_code_hash`) in place of the PIN


class CredentialStatus(enum.StrEnum):
    ACTIVE = "active"
    SUSPENDED = "suspended"
    LOST = "lost"
    REVOKED = "revoked"


class Base(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=False, gc=False):
    """Wire model base: unknown fields are ignored so that newer clouds can talk to older gateways."""


class Interval(Base, frozen=True):
    """One weekly interval: on `day` (0 = Monday .. 6 = Sunday) from `start` to `end` local time."""

    day: Annotated[int, Meta(ge=0, le=6)]
    start: ClockTime
    end: ClockTime


class TimeRange(Base, frozen=True):
    start: ClockTime
    end: ClockTime


class Schedule(Base, frozen=True):
    """Weekly intervals in the site's time zone (or `tz` when given), with holidays.

    On a date listed in `holidays` the weekly intervals do not apply; `holiday_intervals` do instead
    (none by default: closed on holidays).
    """

    id: Ident
    name: Name = ""
    intervals: Annotated[list[Interval], Meta(max_length=MAX_INTERVALS)] = []
    holidays: Annotated[list[date], Meta(max_length=MAX_HOLIDAYS)] = []
    holiday_intervals: Annotated[list[TimeRange], Meta(max_length=MAX_HOLIDAY_INTERVALS)] = []
    tz: Annotated[str, Meta(max_length=MAX_TZ)] | None = None


class Door(Base, frozen=True):
    id: Ident
    name: Name = ""
    strike_s: Annotated[float, Meta(gt=0, le=600)] = 5.0
    extended_strike_s: Annotated[float, Meta(gt=0, le=3600)] = 15.0
    held_open_s: Annotated[float, Meta(gt=0, le=3600)] = 30.0
    mode: DoorMode = DoorMode.NORMAL
    #: For UNLOCKED and FIRST_CARD: the schedule during which the mode applies (normal outside it).
    #: UNLOCKED without a schedule is unlocked around the clock.
    unlock_schedule: Ident | None = None
    #: For CARD_AND_PIN: the schedule during which a PIN is asked (card only outside it). None = always.
    pin_schedule: Ident | None = None
    #: Areas: passing the door on its "in" reader leads from `from_area` into `to_area`, on its "out" reader
    #: back (None = outside). Both None: the door is not between areas (no anti-passback, no occupancy).
    to_area: Ident | None = None
    from_area: Ident | None = None
    #: Two-person rule: two different users' valid taps within this many seconds; the second opens.
    two_person_s: Annotated[float, Meta(gt=0, le=MAX_RULE_WINDOW_S)] | None = None
    #: Escort: a user granted through one of `visitor_groups` passes only within `escort_s` after a tap of a
    #: member of `escort_group` at this door.
    escort_group: Ident | None = None
    visitor_groups: Annotated[list[Ident], Meta(max_length=MAX_EXEMPT_GROUPS)] = []
    escort_s: Annotated[float, Meta(gt=0, le=MAX_RULE_WINDOW_S)] = 30.0


class Group(Base, frozen=True):
    """An access level: a set of doors, open to its members while the schedule allows (None = always)."""

    id: Ident
    name: Name = ""
    doors: Annotated[list[Ident], Meta(max_length=MAX_GROUP_DOORS)] = []
    schedule: Ident | None = None


class Area(Base, frozen=True):
    """A part of the site behind doors (`Door.to_area` / `from_area`), with its anti-passback rule and
    occupancy limit. Members of `exempt_groups` are never held by the anti-passback rule."""

    id: Ident
    name: Name = ""
    anti_passback: AntiPassback = AntiPassback.NONE
    #: TIMED: how long after entering the area a second entry is refused.
    timed_s: Annotated[float, Meta(gt=0, le=MAX_RULE_WINDOW_S)] = 900.0
    exempt_groups: Annotated[list[Ident], Meta(max_length=MAX_EXEMPT_GROUPS)] = []
    #: At most this many users inside (None = no limit): more are refused `area_full`.
    max_occupancy: Annotated[int, Meta(ge=1, le=MAX_OCCUPANCY)] | None = None
    #: Every day at this local time (the site's zone) the locations in the area are forgotten (the nightly
    #: anti-passback reset); None = never.
    reset_daily: ClockTime | None = None


class Interlock(Base, frozen=True):
    """A mantrap: of these doors only one may be unlocked or open at a time (a door is in one interlock)."""

    id: Ident
    name: Name = ""
    doors: Annotated[list[Ident], Meta(min_length=2, max_length=MAX_INTERLOCK_DOORS)] = []
    #: REX (request to exit) ignores the interlock when True (egress safety); the door module reads it.
    rex_overrides: bool = True


class SiteRules(Base, frozen=True):
    """Site-wide access-rule settings (one per site, `put_site_rules`)."""

    duress: DuressMode = DuressMode.OFF
    #: DuressMode.CODE: the duress code's hash (`edge.pin.hash_pin`, never the code itself).
    duress_code_hash: Annotated[str, Meta(max_length=MAX_PIN_HASH)] | None = None


class Assignment(Base, frozen=True):
    """User -> group entitlement with its own validity window (enforced at tap time)."""

    group: Ident
    valid_from: datetime | None = None
    valid_until: datetime | None = None


class User(Base, frozen=True):
    id: Ident
    name: Name = ""
    active: bool = True  # "access control activated"
    offline_access: bool = False
    extended_door_time: bool = False
    valid_from: datetime | None = None
    valid_until: datetime | None = None
    #: A salted hash made by `edge.pin.hash_pin` (never the PIN itself).
    pin_hash: Annotated[str, Meta(max_length=MAX_PIN_HASH)] | None = None
    #: An emergency card: still admitted when the clock is not trusted and the policy says
    #: "emergency cards only" (see docs/model.md).
    emergency: bool = False
    assignments: Annotated[list[Assignment], Meta(max_length=MAX_ASSIGNMENTS)] = []


class Credential(Base, frozen=True):
    """A card. All of a user's credentials carry all of the user's groups."""

    card: CardNumber
    user: Ident
    format: Annotated[str, Meta(max_length=MAX_FORMAT)] = "h10301"
    #: The facility (site / company) code the card carries, for formats that have one. When set, a read
    #: with another facility code (or none) is refused: same card number, different card.
    facility: Annotated[int, Meta(ge=0, lt=2**24 - 1)] | None = None
    status: CredentialStatus = CredentialStatus.ACTIVE
    valid_from: datetime | None = None
    valid_until: datetime | None = None
    #: Use-limited: the credential opens at most this many times (1 = one-time), counted at the gateway.
    max_uses: Annotated[int, Meta(ge=1, le=MAX_USES)] | None = None


#: The format of a keypad-only code (a delivery code typed on the keypad with no card).
KEYPAD_CODE_FORMAT: Final = "keypad_code"


def code_card(code: str) -> int:
    """The card number a keypad-only code is stored under: its digits behind a leading 1 (so "0042" and
    "42" are different codes). Codes of 1 to 18 digits."""
    if not (1 <= len(code) <= 18 and code.isdigit()):
        raise ValueError("a keypad code is 1 to 18 digits")
    return int("1" + code)


# --- change sets --------------------------------------------------------------------------------------


class PutDoor(Base, tag="put_door", frozen=True):
    door: Door


class DeleteDoor(Base, tag="delete_door", frozen=True):
    id: Ident


class PutSchedule(Base, tag="put_schedule", frozen=True):
    schedule: Schedule


class DeleteSchedule(Base, tag="delete_schedule", frozen=True):
    id: Ident


class PutGroup(Base, tag="put_group", frozen=True):
    group: Group


class DeleteGroup(Base, tag="delete_group", frozen=True):
    id: Ident


class PutUser(Base, tag="put_user", frozen=True):
    """Create or replace a user, including its whole list of assignments."""

    user: User


class DeleteUser(Base, tag="delete_user", frozen=True):
    """Delete a user and all of its credentials (the card numbers become free)."""

    id: Ident


class PutCredential(Base, tag="put_credential", frozen=True):
    credential: Credential


class DeleteCredential(Base, tag="delete_credential", frozen=True):
    card: CardNumber


class PutArea(Base, tag="put_area", frozen=True):
    area: Area


class DeleteArea(Base, tag="delete_area", frozen=True):
    id: Ident


class PutInterlock(Base, tag="put_interlock", frozen=True):
    interlock: Interlock


class DeleteInterlock(Base, tag="delete_interlock", frozen=True):
    id: Ident


class PutSiteRules(Base, tag="put_site_rules", frozen=True):
    rules: SiteRules


Change = (
    PutDoor
    | DeleteDoor
    | PutSchedule
    | DeleteSchedule
    | PutGroup
    | DeleteGroup
    | PutUser
    | DeleteUser
    | PutCredential
    | DeleteCredential
    | PutArea
    | DeleteArea
    | PutInterlock
    | DeleteInterlock
    | PutSiteRules
)


class ChangeSet(Base, frozen=True):
    """Changes that take the rights from `from_version` to `to_version`, all or nothing."""

    from_version: Annotated[int, Meta(ge=0)]
    to_version: Annotated[int, Meta(ge=1)]
    changes: list[Change] = []


class Snapshot(Base, frozen=True):
    """The whole rights state at `version` (replaces everything)."""

    version: Annotated[int, Meta(ge=0)]
    doors: Annotated[list[Door], Meta(max_length=MAX_DOORS)] = []
    schedules: Annotated[list[Schedule], Meta(max_length=MAX_SCHEDULES)] = []
    groups: Annotated[list[Group], Meta(max_length=MAX_GROUPS)] = []
    users: list[User] = []
    credentials: list[Credential] = []
    areas: Annotated[list[Area], Meta(max_length=MAX_AREAS)] = []
    interlocks: Annotated[list[Interlock], Meta(max_length=MAX_INTERLOCKS)] = []
    #: The site's rule settings: none (defaults) or one (a list, like every other part of a snapshot).
    site_rules: Annotated[list[SiteRules], Meta(max_length=1)] = []


# --- limits outside the decoder ------------------------------------------------------------------------

_AT = re.compile(r" - at `\$\.?(.*)`$")


def rejection(e: msgspec.ValidationError) -> ChangeRejected:
    """A decoder's refusal as `ChangeRejected("bad_field")` with the field's path (``changes[3].user.name``)."""
    text = str(e)
    m = _AT.search(text)
    return ChangeRejected("bad_field", text, path=m.group(1) if m else None)


def _too_long(path: str, what: str, n: int, limit: int) -> ChangeRejected:
    return ChangeRejected("bad_field", f"{path}: {n} {what}, more than the limit of {limit}", path=path)


def check_limits(obj: Door | Schedule | Group | User | Credential | Area | Interlock | SiteRules, path: str) -> None:
    """The per-object limits the decoder enforces, for objects built in code (cheap: lengths only)."""
    if isinstance(obj, Schedule):
        for field, limit in (
            ("intervals", MAX_INTERVALS), ("holidays", MAX_HOLIDAYS), ("holiday_intervals", MAX_HOLIDAY_INTERVALS),
        ):  # fmt: skip
            n = len(getattr(obj, field))
            if n > limit:
                raise _too_long(f"{path}.{field}", field.replace("_", " "), n, limit)
        if obj.tz is not None and len(obj.tz) > MAX_TZ:
            raise _too_long(f"{path}.tz", "characters", len(obj.tz), MAX_TZ)
    if isinstance(obj, Group) and len(obj.doors) > MAX_GROUP_DOORS:
        raise _too_long(f"{path}.doors", "doors", len(obj.doors), MAX_GROUP_DOORS)
    if isinstance(obj, User):
        if len(obj.assignments) > MAX_ASSIGNMENTS:
            raise _too_long(f"{path}.assignments", "assignments", len(obj.assignments), MAX_ASSIGNMENTS)
        if obj.pin_hash is not None and len(obj.pin_hash) > MAX_PIN_HASH:
            raise _too_long(f"{path}.pin_hash", "characters", len(obj.pin_hash), MAX_PIN_HASH)
    if isinstance(obj, Credential) and len(obj.format) > MAX_FORMAT:
        raise _too_long(f"{path}.format", "characters", len(obj.format), MAX_FORMAT)
    if isinstance(obj, Credential) and obj.max_uses is not None and not 1 <= obj.max_uses <= MAX_USES:
        raise ChangeRejected("bad_field", f"{path}.max_uses: must be 1 to {MAX_USES}", path=f"{path}.max_uses")
    if isinstance(obj, Area) and len(obj.exempt_groups) > MAX_EXEMPT_GROUPS:
        raise _too_long(f"{path}.exempt_groups", "groups", len(obj.exempt_groups), MAX_EXEMPT_GROUPS)
    if isinstance(obj, Door) and len(obj.visitor_groups) > MAX_EXEMPT_GROUPS:
        raise _too_long(f"{path}.visitor_groups", "groups", len(obj.visitor_groups), MAX_EXEMPT_GROUPS)
    if isinstance(obj, Interlock) and not 2 <= len(obj.doors) <= MAX_INTERLOCK_DOORS:
        raise ChangeRejected("bad_field", f"{path}.doors: an interlock has 2 to {MAX_INTERLOCK_DOORS} doors",
                             path=f"{path}.doors")  # fmt: skip
    ident = getattr(obj, "id", "")
    if len(ident) > 64:
        raise _too_long(f"{path}.id", "characters", len(ident), 64)
    name = getattr(obj, "name", "")
    if len(name) > MAX_NAME:
        raise _too_long(f"{path}.name", "characters", len(name), MAX_NAME)
