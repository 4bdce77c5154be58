"""The change-set planner: validates a change set against the rights in force and turns it into a `Plan`, the
rows the writer stores and the index stages. Nothing is written here; a refusal (`ChangeRejected`, naming the
change and field) leaves everything as it was.

One handler per change kind, chosen from `HANDLERS` by the change's type; the checks of the end state
(references, per-site limits) run once after the last change (`_Planner.finish`).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

import msgspec

from edge._sqlite import dispose, in_background, pause
from edge.errors import ChangeRejected
from edge.index import (
    F_ACTIVE,
    F_EMERGENCY,
    F_EXTENDED,
    F_OFFLINE,
    NO_END,
    NO_START,
    STATUS_CODES,
    AssignRow,
    CredRow,
    RightsIndex,
    Tables,
    UserRow,
    build_arrays,
    status_word,
)
from edge.model import (
    MAX_AREAS,
    MAX_DOORS,
    MAX_GROUPS,
    MAX_INTERLOCKS,
    MAX_SCHEDULES,
    Area,
    ChangeSet,
    Credential,
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
    User,
    check_limits,
)
from edge.pin import valid_pin_hash
from edge.schedule import CompiledSchedule

from .schema import encode_bodies

#: Changes validated per loop turn.
PLAN_SLICE = 50
#: Intervals (plus holidays) up to which a schedule is compiled on the loop (~0.2 ms); larger ones in a thread.
INLINE_COMPILE = 64

M = TypeVar("M")
_ABSENT: Any = object()
#: Reads stored rows: `await rows(sql, params)` (the store's connection).
Rows = Callable[[str, Sequence[Any]], Awaitable[list[Any]]]


def _secs(dt: Any, default: int, path: str) -> int:
    if dt is None:
        return default
    if dt.tzinfo is None:
        raise ChangeRejected("bad_field", f"{path}: time has no UTC offset", path=path)
    v = int(dt.timestamp())
    if not 0 <= v < NO_END:
        raise ChangeRejected("bad_field", f"{path}: time {dt.isoformat()} is out of range", path=path)
    return v


def _window(obj: Any, path: str) -> tuple[int, int]:
    f = _secs(obj.valid_from, NO_START, f"{path}.valid_from")
    u = _secs(obj.valid_until, NO_END, f"{path}.valid_until")
    if f >= u:
        raise ChangeRejected("bad_field", f"{path}: valid_from must be before valid_until", path=path)
    return f, u


def user_flags(u: User) -> int:
    return (
        (F_ACTIVE if u.active else 0)
        | (F_OFFLINE if u.offline_access else 0)
        | (F_EXTENDED if u.extended_door_time else 0)
        | (F_EMERGENCY if u.emergency else 0)
    )


@dataclass
class Plan:
    """What a validated change set does: SQL parameter lists and index rows."""

    tables: Tables | None = None
    #: The end state of each door, schedule and group the change set touches: an id is either put (its
    #: last value) or deleted, never both, so the order the writer runs them in cannot matter.
    put_doors: dict[str, Door] = field(default_factory=dict)
    del_doors: set[str] = field(default_factory=set)
    put_scheds: dict[str, Schedule] = field(default_factory=dict)
    del_scheds: set[str] = field(default_factory=set)
    put_groups: dict[str, Group] = field(default_factory=dict)
    del_groups: set[str] = field(default_factory=set)
    put_areas: dict[str, Area] = field(default_factory=dict)
    del_areas: set[str] = field(default_factory=set)
    put_interlocks: dict[str, Interlock] = field(default_factory=dict)
    del_interlocks: set[str] = field(default_factory=set)
    #: {"site": the site's rule settings} when the set puts them
    put_site: dict[str, SiteRules] = field(default_factory=dict)
    #: {"site"} when the set puts the default settings (stored as no row, checksummed as none)
    del_site: set[str] = field(default_factory=set)
    #: (kind, id) -> (encoded body, its `table_hash`) of every door, schedule and group put
    bodies: dict[tuple[str, str], tuple[bytes, int]] = field(default_factory=dict)
    users: dict[int, tuple[User, UserRow] | None] = field(default_factory=dict)
    deleted_users: list[int] = field(default_factory=list)
    #: card -> (credential, uid, index row, index of its change), or None for a deleted card
    creds: dict[int, tuple[Credential, int, CredRow, int] | None] = field(default_factory=dict)
    next_uid: int = 0

    def small(self) -> tuple[tuple[str, str, dict[str, Any], set[str]], ...]:
        """(kind, table, puts, deletes) of the doors, schedules, groups and the access rules' tables."""
        return (
            ("door", "doors", self.put_doors, self.del_doors),
            ("schedule", "schedules", self.put_scheds, self.del_scheds),
            ("group", "groups", self.put_groups, self.del_groups),
            ("area", "areas", self.put_areas, self.del_areas),
            ("interlock", "interlocks", self.put_interlocks, self.del_interlocks),
            ("site", "site_rules", self.put_site, self.del_site),
        )

    def table_changes(self) -> Iterator[tuple[tuple[str, str], int | None]]:
        """(kind, id) -> the new `table_hash` of each door, schedule and group, None where deleted."""
        for kind, _table, puts, dels in self.small():
            for k in dels:
                yield (kind, k), None
            for k in puts:
                yield (kind, k), self.bodies[(kind, k)][1]


async def plan_changes(cs: ChangeSet, *, index: RightsIndex, site_tz: ZoneInfo, next_uid: int,
                       rows: Rows | None) -> Plan:  # fmt: skip
    """Validate `cs` against `index` and plan it. `rows` reads the stored rights (the users and cards the
    set refers to are looked up there); None for a snapshot, which starts from nothing."""
    plan = Plan(next_uid=next_uid)
    uid_of: dict[str, int | None] = {}
    cards_of_user: dict[int, set[int]] = {}
    deleted_ids: list[str] = []
    if rows is not None:  # a snapshot starts from nothing: no existing user to look up
        # The uids of the users referenced, looked up 500 changes per query and loop turn: no set of all
        # referenced ids (10^5 of them would be a C call of several ms, that no thread can interrupt).
        for i in range(0, len(cs.changes), 500):
            part = cs.changes[i : i + 500]
            dels = [c.id for c in part if isinstance(c, DeleteUser)]
            deleted_ids += dels
            refs = {c.user.id for c in part if isinstance(c, PutUser)}
            refs.update(c.credential.user for c in part if isinstance(c, PutCredential))
            refs.update(dels)
            await _uids(rows, [r for r in refs if r not in uid_of], uid_of)
        deleted_uids = [d for e in deleted_ids if (d := uid_of.get(e)) is not None]
        cards_of_user = {u: set(c) for u, c in (await _cards_of(rows, deleted_uids)).items()}
    planner = _Planner(index, site_tz, plan, uid_of, cards_of_user, track_cards=bool(deleted_ids))
    for i, ch in enumerate(cs.changes):
        if i % PLAN_SLICE == PLAN_SLICE - 1:
            await pause()  # validation of a large set must not hold the loop
        p = f"changes[{i}]"
        handler = HANDLERS.get(type(ch))
        if handler is None:  # pragma: no cover - the union is closed
            raise ChangeRejected("malformed", f"{p}: unknown change")
        await handler(planner, ch, i, p)
    await planner.finish(rows)
    return plan


#: The lookups below ask for their keys as one JSON array and get their rows back as one JSON text: SQLite's
#: thread then takes the GIL once per query, not once per key bound and once per row fetched (each a wait
#: for the loop to hand the GIL over, from a thread at background priority).
_UIDS = "SELECT json_group_array(json_array(ext_id, uid)) FROM users WHERE ext_id IN (SELECT value FROM json_each(?))"
_CARDS = "SELECT json_group_array(json_array(uid, card)) FROM credentials WHERE uid IN (SELECT value FROM json_each(?))"
_decode_pairs = msgspec.json.Decoder(list[tuple[str, int]]).decode
_decode_ints = msgspec.json.Decoder(list[tuple[int, int]]).decode


async def _uids(rows: Rows, ext_ids: Iterable[str], out: dict[str, int | None]) -> None:
    """Fill `out` with the uids of the existing users among `ext_ids` (500 per query and loop turn)."""
    ids = list(ext_ids)
    for i in range(0, len(ids), 500):
        got = await rows(_UIDS, [msgspec.json.encode(ids[i : i + 500]).decode()])
        for e, u in _decode_pairs(got[0][0]):
            out[e] = u


async def _cards_of(rows: Rows, uids: Iterable[int]) -> dict[int, list[int]]:
    ids = list(uids)
    out: dict[int, list[int]] = {}
    for i in range(0, len(ids), 500):
        got = await rows(_CARDS, [msgspec.json.encode(ids[i : i + 500]).decode()])
        for u, c in _decode_ints(got[0][0]):
            out.setdefault(u, []).append(c)
    return out


class _Planner:
    """One change set's validation in progress: the end state of the doors, schedules and groups, and the
    users and cards seen so far. Few dicts, filled once per change: each large dict costs a resize of
    several ms on the loop."""

    def __init__(self, idx: RightsIndex, site_tz: ZoneInfo, plan: Plan, uid_of: dict[str, int | None],
                 cards_of_user: dict[int, set[int]], *, track_cards: bool) -> None:  # fmt: skip
        self.idx = idx
        self.site_tz = site_tz
        self.plan = plan
        tables = idx.tables
        self.doors = dict(tables.doors)
        self.scheds = dict(tables.schedule_models)
        self.groups = dict(tables.groups)
        self.areas = dict(tables.areas)
        self.interlocks = dict(tables.interlocks)
        self.site = tables.site_rules
        self.compiled = dict(tables.schedules)  # reused by Tables.build for every schedule the set leaves alone
        self.small_changed = False
        self.uid_of = uid_of
        self.cards_of_user = cards_of_user
        self.track_cards = track_cards  # cards added per user matter only when users are deleted
        self.ext_of: dict[int, str] = {}
        self.user_models: dict[int, tuple[User, int]] = {}  # uid -> (user, index of its change)
        self.creds = plan.creds

    def owner(self, card: int) -> int | None:
        e = self.creds.get(card, _ABSENT)
        if e is not _ABSENT:
            return None if e is None else e[1]
        row = self.idx.cred(card)
        return row[0] if row is not None else None

    # --- doors, schedules, groups: the end state, checked as a whole in `finish` -------------------------

    def _put(self, end: dict[str, M], puts: dict[str, M], dels: set[str], key: str, value: M) -> None:
        end[key] = value
        dels.discard(key)
        puts[key] = value
        self.small_changed = True

    def _delete(self, end: dict[str, M], puts: dict[str, M], dels: set[str], key: str, *, what: str, p: str) -> None:
        if end.pop(key, None) is None:
            raise ChangeRejected("unknown_reference", f"{p}.id: no {what} {key!r}", path=f"{p}.id")
        puts.pop(key, None)
        dels.add(key)
        self.small_changed = True

    async def put_door(self, ch: PutDoor, i: int, p: str) -> None:
        check_limits(ch.door, f"{p}.door")
        self._put(self.doors, self.plan.put_doors, self.plan.del_doors, ch.door.id, ch.door)

    async def delete_door(self, ch: DeleteDoor, i: int, p: str) -> None:
        self._delete(self.doors, self.plan.put_doors, self.plan.del_doors, ch.id, what="door", p=p)

    async def put_schedule(self, ch: PutSchedule, i: int, p: str) -> None:
        check_limits(ch.schedule, f"{p}.schedule")
        sc = ch.schedule
        try:
            if len(sc.intervals) + len(sc.holiday_intervals) + len(sc.holidays) <= INLINE_COMPILE:
                self.compiled[sc.id] = CompiledSchedule(sc, self.site_tz)
            else:  # a large schedule is compiled beside the loop, never on it
                self.compiled[sc.id] = await asyncio.to_thread(in_background(CompiledSchedule, sc, self.site_tz))
        except (ValueError, KeyError) as e:
            raise ChangeRejected("bad_field", f"{p}.schedule: {e}", path=f"{p}.schedule") from None
        self._put(self.scheds, self.plan.put_scheds, self.plan.del_scheds, sc.id, sc)

    async def delete_schedule(self, ch: DeleteSchedule, i: int, p: str) -> None:
        self._delete(self.scheds, self.plan.put_scheds, self.plan.del_scheds, ch.id, what="schedule", p=p)

    async def put_group(self, ch: PutGroup, i: int, p: str) -> None:
        check_limits(ch.group, f"{p}.group")
        self._put(self.groups, self.plan.put_groups, self.plan.del_groups, ch.group.id, ch.group)

    async def delete_group(self, ch: DeleteGroup, i: int, p: str) -> None:
        self._delete(self.groups, self.plan.put_groups, self.plan.del_groups, ch.id, what="group", p=p)

    async def put_area(self, ch: PutArea, i: int, p: str) -> None:
        check_limits(ch.area, f"{p}.area")
        self._put(self.areas, self.plan.put_areas, self.plan.del_areas, ch.area.id, ch.area)

    async def delete_area(self, ch: DeleteArea, i: int, p: str) -> None:
        self._delete(self.areas, self.plan.put_areas, self.plan.del_areas, ch.id, what="area", p=p)

    async def put_interlock(self, ch: PutInterlock, i: int, p: str) -> None:
        check_limits(ch.interlock, f"{p}.interlock")
        self._put(self.interlocks, self.plan.put_interlocks, self.plan.del_interlocks, ch.interlock.id, ch.interlock)

    async def delete_interlock(self, ch: DeleteInterlock, i: int, p: str) -> None:
        self._delete(self.interlocks, self.plan.put_interlocks, self.plan.del_interlocks, ch.id, what="interlock", p=p)

    async def put_site_rules(self, ch: PutSiteRules, i: int, p: str) -> None:
        r = ch.rules
        if r.duress_code_hash is not None and not valid_pin_hash(r.duress_code_hash):
            raise ChangeRejected("bad_field", f"{p}.rules.duress_code_hash: not a pbkdf2_sha256 PIN hash",
                                 path=f"{p}.rules.duress_code_hash")  # fmt: skip
        if r.duress.value == "code" and r.duress_code_hash is None:
            raise ChangeRejected("bad_field", f"{p}.rules.duress_code_hash: duress 'code' needs the code's hash",
                                 path=f"{p}.rules.duress_code_hash")  # fmt: skip
        self.site = r
        if r == SiteRules():  # the defaults: no row (as before any was put), so the checksum is that of none
            self.plan.put_site.pop("site", None)
            self.plan.del_site.add("site")
        else:
            self.plan.del_site.discard("site")
            self.plan.put_site["site"] = r
        self.small_changed = True

    # --- users and credentials ---------------------------------------------------------------------------

    async def put_user(self, ch: PutUser, i: int, p: str) -> None:
        u = ch.user
        check_limits(u, f"{p}.user")
        uid = self.uid_of.get(u.id)
        if uid is None:
            uid = self.plan.next_uid
            self.plan.next_uid += 1
            self.uid_of[u.id] = uid
        if u.pin_hash is not None and not valid_pin_hash(u.pin_hash):
            raise ChangeRejected(
                "bad_field",
                f"{p}.user.pin_hash: not a pbkdf2_sha256 PIN hash",
                path=f"{p}.user.pin_hash",
            )
        _window(u, f"{p}.user")
        for j, a in enumerate(u.assignments):
            _window(a, f"{p}.user.assignments[{j}]")
        self.ext_of[uid] = u.id
        models = self.user_models
        models[uid] = (u, models[uid][1] if uid in models else i)

    async def delete_user(self, ch: DeleteUser, i: int, p: str) -> None:
        uid = self.uid_of.get(ch.id)
        if uid is None:
            raise ChangeRejected("unknown_reference", f"{p}.id: no user {ch.id!r}", path=f"{p}.id")
        for card in self.cards_of_user.pop(uid, set()):
            if self.owner(card) == uid:
                self.creds[card] = None
        self.uid_of[ch.id] = None
        self.user_models.pop(uid, None)
        self.plan.users[uid] = None
        self.plan.deleted_users.append(uid)

    async def put_credential(self, ch: PutCredential, i: int, p: str) -> None:
        c = ch.credential
        check_limits(c, f"{p}.credential")
        uid = self.uid_of.get(c.user)
        if uid is None:
            raise ChangeRejected(
                "unknown_reference",
                f"{p}.credential.user: no user {c.user!r}",
                path=f"{p}.credential.user",
            )
        have = self.owner(c.card)
        if have is not None and have != uid:
            who = self.ext_of.get(have) or (r[0] if (r := self.idx.user(have)) else str(have))
            raise ChangeRejected(
                "duplicate_card",
                f"{p}.credential.card: card {c.card} already belongs to user {who!r}",
                path=f"{p}.credential.card",
            )
        f, un = _window(c, f"{p}.credential")
        if self.track_cards:
            self.cards_of_user.setdefault(uid, set()).add(c.card)
        self.creds[c.card] = (c, uid, (uid, status_word(STATUS_CODES[c.status], c.facility, c.max_uses), f, un), i)

    async def delete_credential(self, ch: DeleteCredential, i: int, p: str) -> None:
        if self.owner(ch.card) is None:
            raise ChangeRejected("unknown_reference", f"{p}.card: no card {ch.card}", path=f"{p}.card")
        self.creds[ch.card] = None

    # --- the end state -------------------------------------------------------------------------------------

    async def finish(self, rows: Rows | None) -> None:
        """The checks of the end state, and the rows of the users (their assignments need the new groups)."""
        plan = self.plan
        tables = self.idx.tables
        if self.small_changed:
            # The end state's references and limits, and the new tables: in a worker thread (with the
            # limits, up to ~10^6 group-door pairs; schedules compiled above are reused, not compiled again).
            plan.tables = await asyncio.to_thread(
                in_background(
                    functools.partial(
                        _small_tables, gidx=tables.gidx, compiled=self.compiled, areas=self.areas,
                        interlocks=self.interlocks, site=self.site,
                    ),
                    self.site_tz,
                    self.doors,
                    self.scheds,
                    self.groups,
                )
            )  # fmt: skip
            plan.bodies = await asyncio.to_thread(
                in_background(
                    functools.partial(
                        encode_bodies, areas=plan.put_areas, interlocks=plan.put_interlocks, site=plan.put_site
                    ),
                    plan.put_doors, plan.put_scheds, plan.put_groups,
                )
            )  # fmt: skip
        new_tables = plan.tables or tables
        for n, (uid, (u, ui)) in enumerate(self.user_models.items()):
            if n % PLAN_SLICE == PLAN_SLICE - 1:
                await pause()
            arows: list[AssignRow] = []
            for j, a in enumerate(u.assignments):
                g = new_tables.gidx.get(a.group)
                if g is None or a.group not in new_tables.groups:
                    path = f"changes[{ui}].user.assignments[{j}].group"
                    raise ChangeRejected("unknown_reference", f"{path}: no group {a.group!r}", path=path)
                f, un = _window(a, path="assignment")
                arows.append((g, f, un))
            wf, wu = _window(u, "user")
            plan.users[uid] = (u, (u.id, user_flags(u), wf, wu, u.pin_hash, tuple(arows)))
        if plan.del_groups and rows is not None:
            touched = list(plan.users)
            gids = sorted(plan.del_groups)
            not_touched = f"AND a.uid NOT IN ({','.join('?' * len(touched))})" if touched else ""
            q = (
                f"SELECT u.ext_id, a.group_id FROM assignments a JOIN users u ON u.uid = a.uid "
                f"WHERE a.group_id IN ({','.join('?' * len(gids))}) {not_touched} LIMIT 1"
            )
            hit = await rows(q, [*gids, *touched])
            if hit:
                raise ChangeRejected(
                    "unknown_reference",
                    f"group {hit[0][1]!r} is still assigned to user {hit[0][0]!r}",
                    path=f"users[{hit[0][0]}].assignments",
                )
        # A credential may only point at a user that exists at the end.
        for n, entry in enumerate(plan.creds.values()):
            if n % (PLAN_SLICE * 10) == 0:
                await pause()
            if entry is not None and plan.users.get(entry[1], True) is None:
                path = f"changes[{entry[3]}].credential.user"
                raise ChangeRejected("unknown_reference", f"{path}: the user is deleted in this change set", path=path)
        await dispose(self.uid_of, self.user_models, self.ext_of, self.cards_of_user)


#: One handler per change kind, by the change's type (`model.Change` is a closed union: every member has one).
HANDLERS: dict[type, Callable[[_Planner, Any, int, str], Awaitable[None]]] = {
    PutDoor: _Planner.put_door,
    DeleteDoor: _Planner.delete_door,
    PutSchedule: _Planner.put_schedule,
    DeleteSchedule: _Planner.delete_schedule,
    PutGroup: _Planner.put_group,
    DeleteGroup: _Planner.delete_group,
    PutUser: _Planner.put_user,
    DeleteUser: _Planner.delete_user,
    PutCredential: _Planner.put_credential,
    DeleteCredential: _Planner.delete_credential,
    PutArea: _Planner.put_area,
    DeleteArea: _Planner.delete_area,
    PutInterlock: _Planner.put_interlock,
    DeleteInterlock: _Planner.delete_interlock,
    PutSiteRules: _Planner.put_site_rules,
}


def _small_tables(
    site_tz: ZoneInfo,
    doors: dict[str, Door],
    scheds: dict[str, Schedule],
    groups: dict[str, Group],
    *,
    gidx: dict[str, int],
    compiled: dict[str, CompiledSchedule],
    areas: dict[str, Area] | None = None,
    interlocks: dict[str, Interlock] | None = None,
    site: SiteRules | None = None,
) -> Tables:
    """Check the end state of doors, schedules and groups (references, per-site limits) and build its tables.
    Pure and blocking: run in a worker thread."""
    areas = areas or {}
    interlocks = interlocks or {}
    for what, n, limit in (("doors", len(doors), MAX_DOORS), ("schedules", len(scheds), MAX_SCHEDULES),
                           ("groups", len(groups), MAX_GROUPS), ("areas", len(areas), MAX_AREAS),
                           ("interlocks", len(interlocks), MAX_INTERLOCKS)):  # fmt: skip
        if n > limit:
            raise ChangeRejected("bad_field", f"{what}: the site would have {n}, more than the limit of {limit}",
                                 path=what)  # fmt: skip
    # Paths name the object of the resulting site (`groups[staff].doors[1]`): these are end-state checks,
    # so the change that broke the reference may be any of several.
    for grp in groups.values():
        for i, door_id in enumerate(grp.doors):
            if door_id not in doors:
                raise ChangeRejected("unknown_reference", f"group {grp.id!r}: no door {door_id!r}",
                                     path=f"groups[{grp.id}].doors[{i}]")  # fmt: skip
        if grp.schedule is not None and grp.schedule not in scheds:
            raise ChangeRejected("unknown_reference", f"group {grp.id!r}: no schedule {grp.schedule!r}",
                                 path=f"groups[{grp.id}].schedule")  # fmt: skip
    for door in doors.values():
        for attr, s in (("unlock_schedule", door.unlock_schedule), ("pin_schedule", door.pin_schedule)):
            if s is not None and s not in scheds:
                raise ChangeRejected("unknown_reference", f"door {door.id!r}: no schedule {s!r}",
                                     path=f"doors[{door.id}].{attr}")  # fmt: skip
    _check_rules(doors, groups, areas, interlocks)
    try:
        return Tables.build(
            site_tz, doors.values(), scheds.values(), groups.values(), gidx=gidx, compiled=compiled,
            areas=areas.values(), interlocks=interlocks.values(), site_rules=site,
        )  # fmt: skip
    except ValueError as e:
        raise ChangeRejected("bad_field", str(e)) from None


def _check_rules(
    doors: dict[str, Door], groups: dict[str, Group], areas: dict[str, Area], interlocks: dict[str, Interlock]
) -> None:
    """The access rules' references in the end state: a door's areas, escort and visitor groups, an area's
    exempt groups, an interlock's doors; and a door in one interlock only."""
    for door in doors.values():
        for attr in ("to_area", "from_area"):
            a = getattr(door, attr)
            if a is not None and a not in areas:
                raise ChangeRejected("unknown_reference", f"door {door.id!r}: no area {a!r}",
                                     path=f"doors[{door.id}].{attr}")  # fmt: skip
        if door.escort_group is not None and door.escort_group not in groups:
            raise ChangeRejected("unknown_reference", f"door {door.id!r}: no group {door.escort_group!r}",
                                 path=f"doors[{door.id}].escort_group")  # fmt: skip
        for i, g in enumerate(door.visitor_groups):
            if g not in groups:
                raise ChangeRejected("unknown_reference", f"door {door.id!r}: no group {g!r}",
                                     path=f"doors[{door.id}].visitor_groups[{i}]")  # fmt: skip
    for area in areas.values():
        for i, g in enumerate(area.exempt_groups):
            if g not in groups:
                raise ChangeRejected("unknown_reference", f"area {area.id!r}: no group {g!r}",
                                     path=f"areas[{area.id}].exempt_groups[{i}]")  # fmt: skip
    lock_of: dict[str, str] = {}
    for il in interlocks.values():
        for i, d in enumerate(il.doors):
            if d not in doors:
                raise ChangeRejected("unknown_reference", f"interlock {il.id!r}: no door {d!r}",
                                     path=f"interlocks[{il.id}].doors[{i}]")  # fmt: skip
            if d in lock_of:
                raise ChangeRejected("bad_field", f"interlock {il.id!r}: door {d!r} is in interlock {lock_of[d]!r}",
                                     path=f"interlocks[{il.id}].doors[{i}]")  # fmt: skip
            lock_of[d] = il.id


def index_from_plan(tables: Tables, plan: Plan, version: int) -> RightsIndex:
    creds = [(card, v[2]) for card, v in plan.creds.items() if v is not None]
    users = [(uid, v[1]) for uid, v in plan.users.items() if v is not None]
    return RightsIndex(tables, build_arrays(creds, users), version=version)
