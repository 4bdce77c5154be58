"""Identity export (pure): which users, cards, groups, schedules and doors each gateway must hold, and the
change set that takes a gateway from what it was last sent to that.

The rules (seed 000, see docs/operator.md):

* A credential (access token) is exported only while its status is ACTIVE and its window has not ended; a
  token that is not active is removed from the gateway.
* A user is exported to a gateway while it has at least one exportable token **and** at least one
  assignment, not yet ended, to a group with a door on that gateway. `delete_user_on_no_token=False` drops
  the first condition, `delete_user_on_no_entitlement=False` the second.
* Time spans are sent ahead as windows (`Assignment.valid_from/valid_until`, `Credential.valid_from/until`)
  which the gateway enforces itself: an assignment starting or ending in the future does so on time at
  the gateway even when it is offline then. "Present only while active" therefore maps to "present with
  the window from the moment it is known until it has ended"; the record of an ended one is removed by
  the next publish (the gateway already refuses it).
* All of a user's tokens carry all of the user's assignments (the gateway model does exactly that).

`export_of` is the rule for one user; the planner (operator/provision.py) applies it per gateway, the
service's integration API (service/integrations.py) reports it with every PUT, from the service's tables.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec

from edge.model import (
    Area,
    Assignment,
    Change,
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
    Snapshot,
    User,
)

from . import rules as access_rules

KINDS = ("area", "door", "schedule", "group", "user", "credential", "interlock", "site_rules")
_enc = msgspec.msgpack.Encoder()
_DEC: dict[str, msgspec.msgpack.Decoder[Any]] = {
    "door": msgspec.msgpack.Decoder(Door),
    "schedule": msgspec.msgpack.Decoder(Schedule),
    "group": msgspec.msgpack.Decoder(Group),
    "user": msgspec.msgpack.Decoder(User),
    "credential": msgspec.msgpack.Decoder(Credential),
    "area": msgspec.msgpack.Decoder(Area),
    "interlock": msgspec.msgpack.Decoder(Interlock),
    "site_rules": msgspec.msgpack.Decoder(SiteRules),
}


@dataclass(frozen=True)
class ExportRules:
    delete_user_on_no_token: bool = True
    delete_user_on_no_entitlement: bool = True


def when(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC)


#: (card, status, format, valid_from, valid_until) and (group, valid_from, valid_until)
Token = tuple[int, str, str, float | None, float | None]
Entitlement = tuple[str, float | None, float | None]


@dataclass
class UserRow:
    id: str
    name: str
    active: bool
    offline_access: bool
    valid_from: float | None
    valid_until: float | None
    #: (group, valid_from, valid_until)
    assignments: list[Entitlement] = field(default_factory=list)
    #: (card, status, format, valid_from, valid_until)
    credentials: list[Token] = field(default_factory=list)


@dataclass
class SiteModel:
    """Everything the export needs, loaded once per publish run."""

    doors: dict[str, dict[str, str]] = field(default_factory=dict)  # gateway -> door id -> name
    schedules: dict[str, Schedule] = field(default_factory=dict)
    groups: dict[str, tuple[str, str | None]] = field(default_factory=dict)  # id -> (name, schedule)
    group_doors: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # id -> [(gateway, door)]
    users: list[UserRow] = field(default_factory=list)
    rules: ExportRules = ExportRules()
    #: Areas, door rules, interlocks, site settings (cloud_bridge/operator/rules.py).
    access: access_rules.AccessRules = field(default_factory=access_rules.AccessRules)


Desired = dict[tuple[str, str], tuple[Any, bytes]]


def _put(out: Desired, kind: str, key: str, obj: Any) -> None:
    out[(kind, key)] = (obj, _enc.encode(obj))


def gateway_state(
    site: SiteModel, gateway: str, now: float, people: dict[frozenset[str], Desired] | None = None
) -> Desired:
    """What `gateway` must hold at `now`: {(kind, key): (struct, encoded)}.

    The users and credentials a gateway holds depend only on which groups open one of its doors: `people`
    (one dict for a whole planning run at one `now`) keeps them per set of groups, so that a fleet of
    gateways sharing groups costs one pass over the users, not one per gateway."""
    out: Desired = {}
    doors = site.doors.get(gateway, {})
    escorts = access_rules.escort_groups(site.access, gateway, set(doors))
    groups_here: set[str] = set()
    for gid in sorted(site.groups):
        gdoors = sorted(d for gw, d in site.group_doors.get(gid, []) if gw == gateway and d in doors)
        if not gdoors and gid not in escorts:
            continue
        name, sched = site.groups[gid]
        if sched is not None and sched not in site.schedules:
            sched = None  # cannot happen with the FK checks in the service; never send a dangling reference
        groups_here.add(gid)
        _put(out, "group", gid, Group(id=gid, name=name, doors=gdoors, schedule=sched))
        if sched is not None and ("schedule", sched) not in out:
            _put(out, "schedule", sched, site.schedules[sched])
    for did in sorted(doors):
        _put(out, "door", did, access_rules.door_of(site.access, gateway, did, doors[did], groups_here))
    for kind, k, obj in access_rules.objects_for(site.access, gateway, set(doors), groups_here):
        _put(out, kind, k, obj)
    key = frozenset(groups_here)
    cached = people.get(key) if people is not None else None
    if cached is None:
        cached = _people(site, groups_here, now)
        if people is not None:
            people[key] = cached
    out.update(cached)
    return out


@dataclass(frozen=True)
class Export:
    """Whether one user goes to a gateway (`reason` None) and with which tokens and assignments."""

    tokens: list[Token]
    assignments: list[Entitlement]
    reason: str | None = None

    @property
    def exported(self) -> bool:
        return self.reason is None


def export_of(u: UserRow, groups_here: set[str] | frozenset[str], rules: ExportRules, now: float) -> Export:
    """Seed 000's rules for one user on a gateway whose doors `groups_here` open: the exportable tokens
    (ACTIVE, not ended), the unended assignments to those groups, and why the user is not exported (None:
    it is). Used by the planner (`gateway_state`) and by the service's integration API, which reports it."""
    tokens = [c for c in u.credentials if c[1] == CredentialStatus.ACTIVE.value and (c[4] is None or c[4] > now)]
    assigns = [a for a in u.assignments if a[0] in groups_here and (a[2] is None or a[2] > now)]
    reason = None
    if u.valid_until is not None and u.valid_until <= now:
        reason = "the user's validity has ended"
    elif rules.delete_user_on_no_token and not tokens:
        reason = "no active access token (deleteUserOnNoAccessToken)"
    elif rules.delete_user_on_no_entitlement and not assigns:
        reason = "no active entitlement assignment here (deleteUserOnNoEntitlement)"
    return Export(tokens, assigns, reason)


def _people(site: SiteModel, groups_here: set[str], now: float) -> Desired:
    """The users and credentials of a gateway whose doors are opened by `groups_here`."""
    out: Desired = {}
    for u in site.users:
        ex = export_of(u, groups_here, site.rules, now)
        if not ex.exported:
            continue
        user = User(
            id=u.id, name=u.name, active=u.active, offline_access=u.offline_access,
            valid_from=when(u.valid_from), valid_until=when(u.valid_until),
            assignments=[
                Assignment(group=g, valid_from=when(f), valid_until=when(t))
                for g, f, t in sorted(ex.assignments, key=_akey)
            ],
        )  # fmt: skip
        _put(out, "user", u.id, user)
        for card, _status, fmt, f, t in ex.tokens:
            _put(out, "credential", str(card), Credential(card=card, user=u.id, format=fmt, valid_from=when(f),
                                                          valid_until=when(t)))  # fmt: skip
    return out


def _akey(a: tuple[str, float | None, float | None]) -> tuple[str, float, float]:
    return (a[0], a[1] if a[1] is not None else -1.0, a[2] if a[2] is not None else -1.0)


def diff(desired: Desired, shadow: dict[tuple[str, str], bytes]) -> list[Change]:
    """The changes that take a gateway holding `shadow` to `desired`, in an order the gateway accepts:
    card deletions (and moves) first, then puts by dependency, then deletions in reverse dependency."""
    puts: dict[str, list[Change]] = {k: [] for k in KINDS}
    dels: dict[str, list[Change]] = {k: [] for k in KINDS}
    first: list[Change] = []
    for key, (obj, body) in desired.items():
        old = shadow.get(key)
        if old == body:
            continue
        kind = key[0]
        if kind == "credential" and old is not None and _DEC["credential"].decode(old).user != obj.user:
            first.append(DeleteCredential(card=obj.card))
        puts[kind].append(_put_change(kind, obj))
    deleted_users = {k for (kd, k) in shadow if kd == "user" and ("user", k) not in desired}
    for (kind, k), old_body in shadow.items():
        if (kind, k) in desired:
            continue
        if kind == "credential":
            owner = _DEC["credential"].decode(old_body).user
            if owner not in deleted_users:  # deleting the user deletes its cards
                first.append(DeleteCredential(card=int(k)))
        else:
            dels[kind].append(_del_change(kind, k))
    out = first
    for kind in KINDS:
        out += puts[kind]
    for kind in reversed(KINDS):
        out += dels[kind]
    return out


def _put_change(kind: str, obj: Any) -> Change:
    if kind == "door":
        return PutDoor(door=obj)
    if kind == "schedule":
        return PutSchedule(schedule=obj)
    if kind == "group":
        return PutGroup(group=obj)
    if kind == "user":
        return PutUser(user=obj)
    if kind == "area":
        return PutArea(area=obj)
    if kind == "interlock":
        return PutInterlock(interlock=obj)
    if kind == "site_rules":
        return PutSiteRules(rules=obj)
    return PutCredential(credential=obj)


def _del_change(kind: str, key: str) -> Change:
    if kind == "door":
        return DeleteDoor(id=key)
    if kind == "schedule":
        return DeleteSchedule(id=key)
    if kind == "group":
        return DeleteGroup(id=key)
    if kind == "user":
        return DeleteUser(id=key)
    if kind == "area":
        return DeleteArea(id=key)
    if kind == "interlock":
        return DeleteInterlock(id=key)
    if kind == "site_rules":
        return PutSiteRules(rules=SiteRules())  # back to the defaults (no duress PIN)
    return DeleteCredential(card=int(key))


def change_set(frm: int, changes: list[Change]) -> ChangeSet:
    return ChangeSet(from_version=frm, to_version=frm + 1, changes=changes)


def snapshot(version: int, objs: Iterable[tuple[str, Any]]) -> Snapshot:
    """A snapshot of (kind, struct) pairs (e.g. a decoded shadow)."""
    lists: dict[str, list[Any]] = {k: [] for k in KINDS}
    for kind, obj in objs:
        lists[kind].append(obj)
    return Snapshot(
        version=version, doors=lists["door"], schedules=lists["schedule"], groups=lists["group"],
        users=lists["user"], credentials=lists["credential"], areas=lists["area"], interlocks=lists["interlock"],
        site_rules=lists["site_rules"],
    )  # fmt: skip


def decode(kind: str, body: bytes) -> Any:
    return _DEC[kind].decode(body)
