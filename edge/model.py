"""The site model: doors, schedules, groups, users, credentials, assignments, change sets.

These are the msgspec Structs that travel from the cloud to the gateway and are kept in the store. Times
are timezone-aware datetimes on the wire (RFC 3339) and whole UTC seconds inside the index. A missing
`valid_from` means "since always", a missing `valid_until` means "for ever"; every window is half-open,
`valid_from <= t < valid_until`.
"""

from __future__ import annotations

import enum
import re
from datetime import date, datetime
from typing import Annotated

import msgspec
from msgspec import Meta

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
    name: str = ""
    intervals: list[Interval] = []
    holidays: list[date] = []
    holiday_intervals: list[TimeRange] = []
    tz: str | None = None


class Door(Base, frozen=True):
    id: Ident
    name: str = ""
    strike_s: Annotated[float, Meta(gt=0, le=600)] = 5.0
    extended_strike_s: Annotated[float, Meta(gt=0, le=3600)] = 15.0
    held_open_s: Annotated[float, Meta(gt=0, le=3600)] = 30.0
    mode: DoorMode = DoorMode.NORMAL
    #: For UNLOCKED and FIRST_CARD: the schedule during which the mode applies (normal outside it).
    #: UNLOCKED without a schedule is unlocked around the clock.
    unlock_schedule: Ident | None = None
    #: For CARD_AND_PIN: the schedule during which a PIN is asked (card only outside it). None = always.
    pin_schedule: Ident | None = None


class Group(Base, frozen=True):
    """An access level: a set of doors, open to its members while the schedule allows (None = always)."""

    id: Ident
    name: str = ""
    doors: list[Ident] = []
    schedule: Ident | None = None


class Assignment(Base, frozen=True):
    """User -> group entitlement with its own validity window (enforced at tap time)."""

    group: Ident
    valid_from: datetime | None = None
    valid_until: datetime | None = None


class User(Base, frozen=True):
    id: Ident
    name: str = ""
    active: bool = True  # "access control activated"
    offline_access: bool = False
    extended_door_time: bool = False
    valid_from: datetime | None = None
    valid_until: datetime | None = None
    #: A salted hash made by `edge.pin.hash_pin` (never the PIN itself).
    pin_hash: str | None = None
    #: An emergency card: still admitted when the clock is not trusted and the policy says
    #: "emergency cards only" (see docs/model.md).
    emergency: bool = False
    assignments: list[Assignment] = []


class Credential(Base, frozen=True):
    """A card. All of a user's credentials carry all of the user's groups."""

    card: CardNumber
    user: Ident
    format: str = "h10301"
    #: The facility (site / company) code the card carries, for formats that have one. When set, a read
    #: with another facility code (or none) is refused: same card number, different card.
    facility: Annotated[int, Meta(ge=0, lt=2**24 - 1)] | None = None
    status: CredentialStatus = CredentialStatus.ACTIVE
    valid_from: datetime | None = None
    valid_until: datetime | None = None


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
)


class ChangeSet(Base, frozen=True):
    """Changes that take the rights from `from_version` to `to_version`, all or nothing."""

    from_version: Annotated[int, Meta(ge=0)]
    to_version: Annotated[int, Meta(ge=1)]
    changes: list[Change] = []


class Snapshot(Base, frozen=True):
    """The whole rights state at `version` (replaces everything)."""

    version: Annotated[int, Meta(ge=0)]
    doors: list[Door] = []
    schedules: list[Schedule] = []
    groups: list[Group] = []
    users: list[User] = []
    credentials: list[Credential] = []

