"""The in-memory rights index: card -> credential -> user -> assignments, in ~60 bytes per credential.

Pure and synchronous: no I/O, no asyncio. Layout:

* a **base**: column arrays (numpy) sorted by card number and by internal user id (`uid`), read through
  memoryviews (plain Python ints, no numpy scalars on the tap path), with assignments in CSR form and the
  users' external ids packed into one bytes blob;
* an **overlay**: dicts of the credentials and users changed since the base was built. Each overlay entry
  keeps two versions, `(version, row, previous_row)`: a change set is staged entry by entry (in small
  slices, so the event loop is never held for long) and becomes visible to `decide()` all at once when
  `publish()` moves `visible` forward. Until then every lookup still answers from the previous rights.

The small tables (doors, schedules, groups) are immutable `Tables` objects swapped in by `publish()`.
`compact()` folds the overlay into a new base (numpy, vectorised) when it grows large.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final
from zoneinfo import ZoneInfo

import msgspec
import numpy as np
import numpy.typing as npt

from .model import AntiPassback, Area, CredentialStatus, Door, Group, Interlock, Schedule, SiteRules
from .schedule import CompiledSchedule

NO_START: Final = 0
NO_END: Final = 0xFFFF_FFFF  # uint32 seconds: 2106-02-07

# Credential status codes.
STATUS_CODES: Final = {
    CredentialStatus.ACTIVE: 0,
    CredentialStatus.SUSPENDED: 1,
    CredentialStatus.LOST: 2,
    CredentialStatus.REVOKED: 3,
}
STATUS_NAMES: Final = {v: k for k, v in STATUS_CODES.items()}

# User flag bits.
F_ACTIVE: Final = 1
F_OFFLINE: Final = 2
F_EXTENDED: Final = 4
F_EMERGENCY: Final = 8

#: (uid, status word, valid_from, valid_until). The status word packs the status code (bits 0-1), the
#: credential's use limit (bits 2-7; 0 = unlimited) and its facility code plus one (bits 8-31; 0 = any
#: facility): see `status_word`.
CredRow = tuple[int, int, int, int]
STATUS_MASK: Final = 0x03
USES_SHIFT: Final = 2
USES_MASK: Final = 0x3F
FACILITY_SHIFT: Final = 8


def status_word(status: int, facility: int | None, max_uses: int | None = None) -> int:
    uses = 0 if max_uses is None else max_uses << USES_SHIFT
    return status | uses | (0 if facility is None else (facility + 1) << FACILITY_SHIFT)


#: (group index, valid_from, valid_until)
AssignRow = tuple[int, int, int]
#: (external id, flags, valid_from, valid_until, pin hash or None, assignments)
UserRow = tuple[str, int, int, int, str | None, tuple[AssignRow, ...]]


class _Base:
    """The immutable, array-backed part of the index."""

    __slots__ = (
        "a_from", "a_gidx", "a_until", "arrays", "c_card", "c_from", "c_status", "c_uid", "c_until",
        "n_creds", "n_users", "pins", "u_aoff", "u_flags", "u_from", "u_idblob", "u_idoff", "u_uid",
        "u_until",
    )  # fmt: skip

    def __init__(self, arrays: dict[str, npt.NDArray[np.generic]], idblob: bytes, pins: dict[int, str]) -> None:
        self.arrays = arrays  # keeps the buffers alive and lets compact() work on whole columns
        mv = {k: memoryview(v) for k, v in arrays.items()}  # type: ignore[arg-type]
        self.c_card, self.c_uid, self.c_status = mv["c_card"], mv["c_uid"], mv["c_status"]
        self.c_from, self.c_until = mv["c_from"], mv["c_until"]
        self.u_uid, self.u_flags, self.u_from, self.u_until = (
            mv["u_uid"],
            mv["u_flags"],
            mv["u_from"],
            mv["u_until"],
        )
        self.u_aoff, self.u_idoff = mv["u_aoff"], mv["u_idoff"]
        self.a_gidx, self.a_from, self.a_until = mv["a_gidx"], mv["a_from"], mv["a_until"]
        self.u_idblob = idblob
        self.pins = pins
        self.n_creds = len(arrays["c_card"])
        self.n_users = len(arrays["u_uid"])

    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.arrays.values()) + len(self.u_idblob)

    def cred(self, card: int) -> CredRow | None:
        i = bisect_left(self.c_card, card)
        if i == self.n_creds or self.c_card[i] != card:
            return None
        return (self.c_uid[i], self.c_status[i], self.c_from[i], self.c_until[i])

    def user(self, uid: int) -> UserRow | None:
        i = uid - 1  # uids are allocated densely from 1: usually the row is right there
        if not (0 <= i < self.n_users and self.u_uid[i] == uid):
            i = bisect_left(self.u_uid, uid)
            if i == self.n_users or self.u_uid[i] != uid:
                return None
        a0, a1 = self.u_aoff[i], self.u_aoff[i + 1]
        ag, af, au = self.a_gidx, self.a_from, self.a_until
        return (
            self.u_idblob[self.u_idoff[i] : self.u_idoff[i + 1]].decode(),
            self.u_flags[i],
            self.u_from[i],
            self.u_until[i],
            self.pins.get(uid),
            tuple((ag[j], af[j], au[j]) for j in range(a0, a1)),
        )


def _empty_arrays() -> dict[str, npt.NDArray[np.generic]]:
    return build_arrays([], [])[0]


def build_arrays(
    creds: Sequence[tuple[int, CredRow]], users: Sequence[tuple[int, UserRow]]
) -> tuple[dict[str, npt.NDArray[np.generic]], bytes, dict[int, str]]:
    """Base arrays from rows (any order). Used for tests, snapshots and compaction.

    Sorting is done by numpy (which releases the GIL), not by `sorted()` on tuples, which would hold the
    GIL (and so the event loop) for the whole sort when this runs in a worker thread."""
    n = len(creds)
    arrays: dict[str, npt.NDArray[np.generic]] = {
        "c_card": np.fromiter((c for c, _ in creds), np.uint64, n),
        "c_uid": np.fromiter((r[0] for _, r in creds), np.uint32, n),
        "c_status": np.fromiter((r[1] for _, r in creds), np.uint32, n),
        "c_from": np.fromiter((r[2] for _, r in creds), np.uint32, n),
        "c_until": np.fromiter((r[3] for _, r in creds), np.uint32, n),
    }
    order = np.argsort(arrays["c_card"], kind="stable")
    for k in list(arrays):
        arrays[k] = arrays[k][order]
    if any(users[i][0] > users[i + 1][0] for i in range(len(users) - 1)):
        users = sorted(users, key=lambda r: r[0])
    arrays |= {
        "u_uid": np.fromiter((u for u, _ in users), np.uint32, len(users)),
        "u_flags": np.fromiter((r[1] for _, r in users), np.uint8, len(users)),
        "u_from": np.fromiter((r[2] for _, r in users), np.uint32, len(users)),
        "u_until": np.fromiter((r[3] for _, r in users), np.uint32, len(users)),
    }
    aoff = [0]
    ag: list[int] = []
    af: list[int] = []
    au: list[int] = []
    ids = bytearray()
    idoff = [0]
    pins: dict[int, str] = {}
    for uid, r in users:
        for g, f, u in r[5]:
            ag.append(g)
            af.append(f)
            au.append(u)
        aoff.append(len(ag))
        ids += r[0].encode()
        idoff.append(len(ids))
        if r[4] is not None:
            pins[uid] = r[4]
    arrays["u_aoff"] = _array(aoff, np.uint32)
    arrays["u_idoff"] = _array(idoff, np.uint32)
    arrays["a_gidx"] = _array(ag, np.uint16)
    arrays["a_from"] = _array(af, np.uint32)
    arrays["a_until"] = _array(au, np.uint32)
    return arrays, bytes(ids), pins


#: Elements converted per numpy call by `_array` (~0.2 ms).
ARRAY_STEP: Final = 8192


def _array(values: list[int], dtype: type[np.generic]) -> npt.NDArray[np.generic]:
    """`np.array(values, dtype)` a step at a time: converting 10^5 Python ints in one call holds the GIL for
    milliseconds, which a thread working beside the event loop must not do (the same goes for iterating
    a large dict or sorting a large list in one C call: the compaction below uses generators instead)."""
    if len(values) <= ARRAY_STEP:
        return np.array(values, dtype)
    return np.concatenate([np.array(values[i : i + ARRAY_STEP], dtype) for i in range(0, len(values), ARRAY_STEP)])


@dataclass(frozen=True, slots=True)
class AreaRule:
    """An area as `decide()` reads it: its anti-passback mode, the bitmask (over group indices) of the groups
    exempt from it, and its occupancy limit."""

    id: str
    mode: AntiPassback
    timed_s: float
    exempt: int
    max_occupancy: int | None


@dataclass(frozen=True, slots=True)
class DoorRules:
    """The access rules of one door, compiled (only doors with at least one rule have an entry)."""

    from_area: str | None = None
    to_area: str | None = None
    #: The door's areas as rules, by area id (None = outside).
    areas: dict[str | None, AreaRule | None] = field(default_factory=dict)
    linked: bool = False  # the door is between areas
    two_person_s: float | None = None
    #: Escort: the escort group's index (-1: no escort rule), the visitor groups' bitmask, the window.
    escort_gidx: int = -1
    visitor_mask: int = 0
    escort_s: float = 0.0
    #: The interlock the door is in, and the other doors of it.
    interlock: str | None = None
    peers: tuple[str, ...] = ()


def _mask(gidx: dict[str, int], groups: Iterable[str]) -> int:
    m = 0
    for g in groups:
        i = gidx.get(g)
        if i is not None:
            m |= 1 << i
    return m


def compile_rules(
    doors: dict[str, Door], areas: dict[str, Area], interlocks: dict[str, Interlock], gidx: dict[str, int]
) -> dict[str, DoorRules]:
    """The `DoorRules` of every door that has a rule."""
    arules = {
        a.id: AreaRule(a.id, a.anti_passback, a.timed_s, _mask(gidx, a.exempt_groups), a.max_occupancy)
        for a in areas.values()
    }
    lock_of: dict[str, Interlock] = {}
    for lock in interlocks.values():
        for door_id in lock.doors:
            lock_of.setdefault(door_id, lock)
    out: dict[str, DoorRules] = {}
    for d in doors.values():
        il = lock_of.get(d.id)
        linked = d.to_area is not None or d.from_area is not None
        escort = d.escort_group is not None and bool(d.visitor_groups)
        if not (linked or il is not None or d.two_person_s is not None or escort):
            continue
        out[d.id] = DoorRules(
            from_area=d.from_area,
            to_area=d.to_area,
            areas={a: (arules.get(a) if a is not None else None) for a in (d.from_area, d.to_area)},
            linked=linked,
            two_person_s=d.two_person_s,
            escort_gidx=gidx.get(d.escort_group, -1) if escort and d.escort_group is not None else -1,
            visitor_mask=_mask(gidx, d.visitor_groups) if escort else 0,
            escort_s=d.escort_s,
            interlock=il.id if il is not None else None,
            peers=tuple(x for x in il.doors if x != d.id) if il is not None else (),
        )
    return out


@dataclass(frozen=True, slots=True)
class Tables:
    """Doors, schedules and groups: small, immutable, replaced whole on change."""

    site_tz: ZoneInfo
    doors: dict[str, Door] = field(default_factory=dict)
    schedules: dict[str, CompiledSchedule] = field(default_factory=dict)
    schedule_models: dict[str, Schedule] = field(default_factory=dict)
    groups: dict[str, Group] = field(default_factory=dict)
    #: group id -> dense index (stable for the life of the index; never reused)
    gidx: dict[str, int] = field(default_factory=dict)
    #: dense index -> group id ("" for a deleted group)
    gid: tuple[str, ...] = ()
    #: dense index -> compiled schedule of the group, None for "always"; unset for deleted groups
    gsched: tuple[CompiledSchedule | None, ...] = ()
    #: door id -> bitmask over group indices of the groups that open it
    door_groups: dict[str, int] = field(default_factory=dict)
    #: Access rules (docs/model.md, "Access rules"): areas, interlocks, the site's settings, and per door
    #: the rules compiled for `decide()`.
    areas: dict[str, Area] = field(default_factory=dict)
    interlocks: dict[str, Interlock] = field(default_factory=dict)
    site_rules: SiteRules = field(default_factory=SiteRules)
    door_rules: dict[str, DoorRules] = field(default_factory=dict)

    @staticmethod
    def build(
        site_tz: ZoneInfo,
        doors: Iterable[Door],
        schedules: Iterable[Schedule],
        groups: Iterable[Group],
        gidx: dict[str, int] | None = None,
        *,
        compiled: dict[str, CompiledSchedule] | None = None,
        areas: Iterable[Area] = (),
        interlocks: Iterable[Interlock] = (),
        site_rules: SiteRules | None = None,
    ) -> Tables:
        """Compile the tables. `gidx` carries the existing group numbering forward (new groups appended);
        `compiled` holds schedules compiled before, reused when compiled from the very same model object."""
        gidx = dict(gidx or {})
        sched_models = {s.id: s for s in schedules}
        have = compiled or {}
        compiled = {
            sid: c if (c := have.get(sid)) is not None and c.model is s else CompiledSchedule(s, site_tz)
            for sid, s in sched_models.items()
        }
        group_map = {g.id: g for g in groups}
        for g_id in sorted(group_map):
            if g_id not in gidx:
                gidx[g_id] = len(gidx)
        if len(gidx) > 0xFFFF:
            raise ValueError("more than 65,535 groups over the index's life: compact with a snapshot")
        gid = [""] * len(gidx)
        gsched: list[CompiledSchedule | None] = [None] * len(gidx)
        door_groups: dict[str, int] = {}
        for g_id, i in gidx.items():
            g = group_map.get(g_id)
            if g is None:
                continue
            gid[i] = g_id
            gsched[i] = compiled[g.schedule] if g.schedule is not None else None
            for d in g.doors:
                door_groups[d] = door_groups.get(d, 0) | (1 << i)
        door_map = {d.id: d for d in doors}
        area_map = {a.id: a for a in areas}
        lock_map = {il.id: il for il in interlocks}
        return Tables(
            site_tz=site_tz,
            doors=door_map,
            areas=area_map,
            interlocks=lock_map,
            site_rules=site_rules or SiteRules(),
            door_rules=compile_rules(door_map, area_map, lock_map, gidx),
            schedules=compiled,
            schedule_models=sched_models,
            groups=group_map,
            gidx=gidx,
            gid=tuple(gid),
            gsched=tuple(gsched),
            door_groups=door_groups,
        )


_BASE: Final = object()  # overlay marker: "answer from the base"

#: Entries `drain()` frees per step.
DRAIN_STEP: Final = 1_000


def drain(container: dict[Any, Any] | list[Any] | set[Any], step: int = DRAIN_STEP) -> bool:
    """Free up to `step` entries of `container`; True while some are left.

    CPython frees a container and everything only it references in one C call that holds the GIL (and so
    every thread, the event loop included) from start to end: 7 ms for a dict of 10^5 tuples here, 17 ms
    for 2 x 10^5. Emptied a step at a time (a loop turn or a bytecode boundary between steps), the same
    work never holds the GIL for more than ~0.1 ms. Large temporaries of a bulk change are drained so.
    """
    if isinstance(container, dict):
        for _ in range(min(step, len(container))):
            container.popitem()
    elif isinstance(container, list):
        del container[-step:]
    else:
        for _ in range(min(step, len(container))):
            container.pop()
    return bool(container)


class RightsIndex:
    """Card -> rights, for `decide()`. See the module docstring for the layout and the update protocol."""

    __slots__ = ("_base", "_cred_over", "_staged_tables", "_staging", "_user_over", "tables", "visible")

    def __init__(
        self,
        tables: Tables,
        base: tuple[dict[str, npt.NDArray[np.generic]], bytes, dict[int, str]] | None = None,
        *,
        version: int = 0,
    ) -> None:
        self.tables = tables
        arrays, blob, pins = base if base is not None else (_empty_arrays(), b"", {})
        self._base = _Base(arrays, blob, pins)
        self._cred_over: dict[int, tuple[int, object, object]] = {}
        self._user_over: dict[int, tuple[int, object, object]] = {}
        self.visible = version
        self._staging: int | None = None
        self._staged_tables: Tables | None = None

    # --- reads (tap path) ---------------------------------------------------------------------------

    def cred(self, card: int) -> CredRow | None:
        e = self._cred_over.get(card)
        if e is not None:
            row = e[1] if e[0] <= self.visible else e[2]
            if row is not _BASE:
                return row  # type: ignore[return-value]  # a CredRow or None (deleted)
        return self._base.cred(card)

    def user(self, uid: int) -> UserRow | None:
        e = self._user_over.get(uid)
        if e is not None:
            row = e[1] if e[0] <= self.visible else e[2]
            if row is not _BASE:
                return row  # type: ignore[return-value]
        return self._base.user(uid)

    def __len__(self) -> int:
        """Number of credentials (visible)."""
        n = self._base.n_creds
        for card, e in self._cred_over.items():
            row = e[1] if e[0] <= self.visible else e[2]
            if row is _BASE:
                continue
            in_base = self._base.cred(card) is not None
            n += (row is not None) - in_base
        return n

    @property
    def overlay_size(self) -> int:
        return len(self._cred_over) + len(self._user_over)

    def nbytes(self) -> int:
        """Bytes held by the base arrays (the overlay is small and counted by tracemalloc in the bench)."""
        return self._base.nbytes()

    def credentials(self) -> Iterator[tuple[int, CredRow]]:
        """Every visible credential (card, row), in no particular order."""
        b = self._base
        for i in range(b.n_creds):
            card = b.c_card[i]
            if card in self._cred_over:
                continue
            yield card, (b.c_uid[i], b.c_status[i], b.c_from[i], b.c_until[i])
        for card in list(self._cred_over):
            row = self.cred(card)
            if row is not None:
                yield card, row

    def users(self) -> Iterator[tuple[int, UserRow]]:
        b = self._base
        for i in range(b.n_users):
            uid = b.u_uid[i]
            if uid in self._user_over:
                continue
            row = b.user(uid)
            assert row is not None
            yield uid, row
        for uid in list(self._user_over):
            urow = self.user(uid)
            if urow is not None:
                yield uid, urow

    # --- writes (staged, then published at once) -----------------------------------------------------

    def detach_overlay(self) -> tuple[dict[int, tuple[int, object, object]], dict[int, tuple[int, object, object]]]:
        """Take the overlay out (for `drain()`), leaving this index answering from its base only.

        Only for an index that has been replaced (after `compacted()`): its overlay is the largest
        structure of the process, too large to be freed in one go."""
        if self._staging is not None:
            raise RuntimeError("cannot detach the overlay while a change set is staged")
        creds, users = self._cred_over, self._user_over
        self._cred_over, self._user_over = {}, {}
        return creds, users

    def begin(self, version: int) -> None:
        """Start staging the change set that leads to `version`."""
        if version <= self.visible:
            raise ValueError(f"version {version} is not after the visible version {self.visible}")
        if self._staging is not None:
            raise RuntimeError("a change set is already being staged")
        self._staging = version
        self._staged_tables = None

    def _stage(self, over: dict[int, tuple[int, object, object]], key: int, row: object) -> None:
        v = self._staging
        if v is None:
            raise RuntimeError("stage outside begin()/publish()")
        e = over.get(key)
        if e is None:
            prev: object = _BASE
        elif e[0] == v:
            prev = e[2]  # staged twice in this change set: keep the visible row as the fallback
        else:
            prev = e[1] if e[0] <= self.visible else e[2]
        over[key] = (v, row, prev)

    def stage_cred(self, card: int, row: CredRow | None) -> None:
        self._stage(self._cred_over, card, row)

    def stage_user(self, uid: int, row: UserRow | None) -> None:
        self._stage(self._user_over, uid, row)

    def stage_tables(self, tables: Tables) -> None:
        self._staged_tables = tables

    def publish(self) -> None:
        """Make everything staged since `begin()` visible in one step."""
        if self._staging is None:
            raise RuntimeError("publish() without begin()")
        if self._staged_tables is not None:
            self.tables = self._staged_tables
        self.visible = self._staging
        self._staging = None
        self._staged_tables = None

    def abort(self) -> None:
        """Forget everything staged since `begin()`: lookups keep answering the visible version."""
        v = self._staging
        if v is None:
            return
        for over in (self._cred_over, self._user_over):
            for key in [k for k, e in over.items() if e[0] == v]:
                prev = over[key][2]
                if prev is _BASE:
                    del over[key]
                else:
                    over[key] = (self.visible, prev, _BASE)
        self._staging = None
        self._staged_tables = None

    # --- compaction ------------------------------------------------------------------------------------

    def compacted(self) -> RightsIndex:
        """A new index with the overlay folded into the base (vectorised merge). Pure: `self` is untouched.

        Safe to run in a worker thread while `self` serves lookups, as long as nothing is staged meanwhile;
        the caller swaps the result in on the loop thread.
        """
        if self._staging is not None:
            raise RuntimeError("cannot compact while a change set is staged")
        b = self._base
        arr = b.arrays
        # credentials
        cards = np.fromiter((c for c in self._cred_over), np.uint64, len(self._cred_over))
        keep = ~np.isin(arr["c_card"], cards, assume_unique=True) if len(cards) else None
        live = [(c, r) for c in self._cred_over if (r := self.cred(c)) is not None]
        new_c = {
            "c_card": np.fromiter((c for c, _ in live), np.uint64, len(live)),
            "c_uid": np.fromiter((r[0] for _, r in live), np.uint32, len(live)),
            "c_status": np.fromiter((r[1] for _, r in live), np.uint32, len(live)),
            "c_from": np.fromiter((r[2] for _, r in live), np.uint32, len(live)),
            "c_until": np.fromiter((r[3] for _, r in live), np.uint32, len(live)),
        }
        out: dict[str, npt.NDArray[np.generic]] = {}
        order = None
        for k, v in new_c.items():
            old = arr[k] if keep is None else arr[k][keep]
            out[k] = np.concatenate([old, v])
        order = np.argsort(out["c_card"], kind="stable")
        for k in new_c:
            out[k] = out[k][order]
        # users: rebuilt from rows (assignments are variable length); base users not in the overlay are
        # copied column-wise.
        uids = np.fromiter((u for u in self._user_over), np.uint32, len(self._user_over))
        ukeep = np.ones(b.n_users, bool) if not len(uids) else ~np.isin(arr["u_uid"], uids, assume_unique=True)
        live_u = [(int(u), ur) for u in np.sort(uids) if (ur := self.user(int(u))) is not None]
        extra_arrays, extra_blob, extra_pins = build_arrays([], live_u)
        # kept base users, with their assignment slices and id slices
        kept_idx = np.nonzero(ukeep)[0]
        aoff = arr["u_aoff"].astype(np.int64)
        a_counts = (aoff[1:] - aoff[:-1])[kept_idx]
        a_sel = _ranges(aoff[:-1][kept_idx], a_counts)
        idoff = arr["u_idoff"].astype(np.int64)
        id_counts = (idoff[1:] - idoff[:-1])[kept_idx]
        id_sel = _ranges(idoff[:-1][kept_idx], id_counts)
        blob_arr = np.frombuffer(b.u_idblob, np.uint8)
        kept = {
            "u_uid": arr["u_uid"][kept_idx],
            "u_flags": arr["u_flags"][kept_idx],
            "u_from": arr["u_from"][kept_idx],
            "u_until": arr["u_until"][kept_idx],
        }
        # merge kept and new users by uid
        all_uid = np.concatenate([kept["u_uid"], extra_arrays["u_uid"]])
        uorder = np.argsort(all_uid, kind="stable")
        for k in kept:
            out[k] = np.concatenate([kept[k], extra_arrays[k]])[uorder]
        ea = extra_arrays["u_aoff"].astype(np.int64)
        ei = extra_arrays["u_idoff"].astype(np.int64)
        cnt_a = np.concatenate([a_counts, ea[1:] - ea[:-1]])[uorder]
        cnt_i = np.concatenate([id_counts, ei[1:] - ei[:-1]])[uorder]
        start_a = np.concatenate([np.cumsum(a_counts) - a_counts, len(a_sel) + ea[:-1]])[uorder]
        start_i = np.concatenate([np.cumsum(id_counts) - id_counts, len(id_sel) + ei[:-1]])[uorder]
        a_all = {k: np.concatenate([arr[k][a_sel], extra_arrays[k]]) for k in ("a_gidx", "a_from", "a_until")}
        sel = _ranges(start_a, cnt_a)
        for k, v in a_all.items():
            out[k] = v[sel]
        out["u_aoff"] = np.concatenate([[0], np.cumsum(cnt_a)]).astype(np.uint32)
        ids_all = np.concatenate([blob_arr[id_sel], np.frombuffer(extra_blob, np.uint8)])
        blob = ids_all[_ranges(start_i, cnt_i)].tobytes()
        out["u_idoff"] = np.concatenate([[0], np.cumsum(cnt_i)]).astype(np.uint32)
        pins = {u: p for u, p in b.pins.items() if u not in self._user_over}
        pins.update(extra_pins)
        for tmp in (live, live_u):  # freed a step at a time: this runs in a thread beside the event loop
            while drain(tmp):
                pass
        return RightsIndex(self.tables, (out, blob, pins), version=self.visible)


def _ranges(starts: npt.NDArray[np.int64], counts: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """Concatenated aranges [s, s+c) for each (s, c), vectorised."""
    counts = counts.astype(np.int64)
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    ends = np.cumsum(counts)
    offsets = np.repeat(ends - counts, counts)
    return np.repeat(starts.astype(np.int64), counts) + (np.arange(total, dtype=np.int64) - offsets)


# --- the rights checksum ----------------------------------------------------------------------------------
#
# A sum (mod 2^64) of one 64-bit hash per row, per kind (credentials, users, doors/schedules/groups), plus
# the row counts and the version: an order-free digest that a change set updates row by row (subtract the
# old row's hash, add the new one's) and that `Store` keeps in `meta`. At open it is recomputed from the
# rows as decoded (what the index holds and decides on), so a row that changed on disk since it was
# written, in any field a decision reads, is detected. Not a defence against someone who may write the
# file (they can recompute it); a defence against a disk that changes bits.

_M64: Final = (1 << 64) - 1
_K0: Final = 0x9E37_79B9_7F4A_7C15
_K1: Final = 0xBF58_476D_1CE4_E5B9
_K2: Final = 0x94D0_49BB_1331_11EB


def _mix(x: int) -> int:
    """splitmix64's finaliser (Python ints; `_mix_np` is the same on uint64 arrays)."""
    x ^= x >> 30
    x = (x * _K1) & _M64
    x ^= x >> 27
    x = (x * _K2) & _M64
    return x ^ (x >> 31)


def _mix_np(x: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(_K1)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(_K2)
    return x ^ (x >> np.uint64(31))


def cred_hash(card: int, row: CredRow) -> int:
    h = _mix((card + _K0) & _M64)
    h = _mix(h ^ ((row[0] << 32) | row[1]))
    return _mix(h ^ ((row[2] << 32) | row[3]))


def cred_hash_sum(
    card: npt.NDArray[np.generic],
    uid: npt.NDArray[np.generic],
    status: npt.NDArray[np.generic],
    vfrom: npt.NDArray[np.generic],
    vuntil: npt.NDArray[np.generic],
) -> int:
    """The sum of `cred_hash` over column arrays (vectorised; numpy releases the GIL)."""
    u64 = np.uint64
    with np.errstate(over="ignore"):
        h = _mix_np(card.astype(u64) + u64(_K0))
        h = _mix_np(h ^ ((uid.astype(u64) << u64(32)) | status.astype(u64)))
        h = _mix_np(h ^ ((vfrom.astype(u64) << u64(32)) | vuntil.astype(u64)))
    return int(np.sum(h, dtype=u64)) if len(h) else 0


_henc = msgspec.msgpack.Encoder()


def _bytes_hash(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def _str_hash(text: str | None) -> int:
    return 0 if text is None else _bytes_hash(b"\x01" + text.encode())


def _group_name(gid: Sequence[str], g: int) -> str:
    return gid[g] if g < len(gid) and gid[g] else f"#{g}"


def user_hash(uid: int, row: UserRow, gid: Sequence[str]) -> int:
    """A user row's hash; assignments by group *id* (`gid` maps the index's group numbers to ids), each
    bound to its position. `_user_hash_sum` is the same over the base arrays, vectorised."""
    h = _mix((uid + _K0) & _M64)
    h = _mix(h ^ ((row[1] << 32) | row[2]))
    h = _mix(h ^ row[3])
    h = _mix(h ^ _str_hash(row[0]))
    h = _mix(h ^ _str_hash(row[4]))
    for j, (g, f, u) in enumerate(row[5]):
        a = _mix(_str_hash(_group_name(gid, g)) ^ ((f << 32) | u))
        h = (h + _mix((a + j) & _M64)) & _M64
    return _mix(h)


def _user_hash_sum(base: _Base, keep: npt.NDArray[np.bool_] | None, gid: Sequence[str]) -> tuple[int, int]:
    """(sum of `user_hash`, count) over the base users selected by `keep` (all when None)."""
    arr = base.arrays
    u64 = np.uint64
    n = base.n_users
    blob = base.u_idblob
    idoff = arr["u_idoff"].tolist()
    ext = np.fromiter((_bytes_hash(b"\x01" + blob[idoff[i] : idoff[i + 1]]) for i in range(n)), u64, n)
    pins = np.zeros(n, u64)
    if base.pins:
        pos = np.searchsorted(arr["u_uid"], np.fromiter(base.pins, np.uint32, len(base.pins)))
        pins[pos] = np.fromiter((_str_hash(p) for p in base.pins.values()), u64, len(base.pins))
    aoff = arr["u_aoff"].astype(np.int64)
    counts = aoff[1:] - aoff[:-1]
    names = np.fromiter((_str_hash(_group_name(gid, g)) for g in range(max(len(gid), 1))), u64, max(len(gid), 1))
    with np.errstate(over="ignore"):
        h = _mix_np(arr["u_uid"].astype(u64) + u64(_K0))
        h = _mix_np(h ^ ((arr["u_flags"].astype(u64) << u64(32)) | arr["u_from"].astype(u64)))
        h = _mix_np(h ^ arr["u_until"].astype(u64))
        h = _mix_np(h ^ ext)
        h = _mix_np(h ^ pins)
        g = arr["a_gidx"].astype(np.int64)
        gname = np.where(g < len(names), names[np.minimum(g, len(names) - 1)], 0).astype(u64)
        if len(g) and (g >= len(gid)).any():  # a group number with no id: hash its "#n" name, as user_hash
            for k in np.nonzero(g >= len(gid))[0]:
                gname[k] = u64(_str_hash(f"#{int(g[k])}"))
        a = _mix_np(gname ^ ((arr["a_from"].astype(u64) << u64(32)) | arr["a_until"].astype(u64)))
        j = (np.arange(len(g), dtype=np.int64) - np.repeat(aoff[:-1], counts)).astype(u64)
        a = _mix_np(a + j)
        cs = np.concatenate([np.zeros(1, u64), np.cumsum(a, dtype=u64)])
        h = _mix_np(h + (cs[aoff[1:]] - cs[aoff[:-1]]))
    if keep is not None:
        h = h[keep]
    return (int(np.sum(h, dtype=u64)) if len(h) else 0), len(h)


#: Door fields added by the access rules (issue 19): left out of a door's hash while at their defaults, so
#: that the checksum of a file written before them is unchanged.
_DOOR_RULE_DEFAULTS: Final[dict[str, Any]] = {
    "to_area": None, "from_area": None, "two_person_s": None, "escort_group": None, "visitor_groups": [],
    "escort_s": 30.0,
}  # fmt: skip


def table_hash(kind: str, model: Door | Schedule | Group | Area | Interlock | SiteRules) -> int:
    if isinstance(model, Door) and all(getattr(model, k) == v for k, v in _DOOR_RULE_DEFAULTS.items()):
        body = msgspec.to_builtins(model)
        for k in _DOOR_RULE_DEFAULTS:
            body.pop(k, None)
        return _bytes_hash(kind.encode() + b"\0" + _henc.encode(body))
    return _bytes_hash(kind.encode() + b"\0" + _henc.encode(model))


@dataclass(frozen=True, slots=True)
class Digest:
    """The rights checksum: see above. `text()` is what `meta.rights_digest` holds."""

    version: int
    n_creds: int = 0
    n_users: int = 0
    creds: int = 0
    users: int = 0
    tables: int = 0

    def text(self) -> str:
        return (
            f"1:{self.version}:{self.n_creds}:{self.n_users}:"
            f"{self.creds & _M64:016x}:{self.users & _M64:016x}:{self.tables & _M64:016x}"
        )


def table_hashes(tables: Tables) -> dict[tuple[str, str], int]:
    out = {("door", k): table_hash("door", d) for k, d in tables.doors.items()}
    out |= {("schedule", k): table_hash("schedule", s) for k, s in tables.schedule_models.items()}
    out |= {("group", k): table_hash("group", g) for k, g in tables.groups.items()}
    out |= {("area", k): table_hash("area", a) for k, a in tables.areas.items()}
    out |= {("interlock", k): table_hash("interlock", il) for k, il in tables.interlocks.items()}
    if tables.site_rules != SiteRules():
        out[("site", "site")] = table_hash("site", tables.site_rules)
    return out


def index_digest(index: RightsIndex) -> Digest:
    """The checksum of everything `index` answers with (visible version). Pure; fine in a worker thread."""
    b = index._base
    arr = b.arrays
    over = index._cred_over
    if over:
        keep = ~np.isin(arr["c_card"], np.fromiter(over, np.uint64, len(over)), assume_unique=True)
        cols = [arr[k][keep] for k in ("c_card", "c_uid", "c_status", "c_from", "c_until")]
    else:
        cols = [arr[k] for k in ("c_card", "c_uid", "c_status", "c_from", "c_until")]
    creds = cred_hash_sum(*cols)
    n_creds = len(cols[0])
    for card in over:
        row = index.cred(card)
        if row is not None:
            creds += cred_hash(card, row)
            n_creds += 1
    gid = index.tables.gid
    uover = index._user_over
    ukeep = None
    if uover:
        ukeep = ~np.isin(arr["u_uid"], np.fromiter(uover, np.uint32, len(uover)), assume_unique=True)
    users, n_users = _user_hash_sum(b, ukeep, gid)
    for uid in uover:
        urow = index.user(uid)
        if urow is not None:
            users += user_hash(uid, urow, gid)
            n_users += 1
    tables = sum(table_hashes(index.tables).values())
    return Digest(index.visible, n_creds, n_users, creds & _M64, users & _M64, tables & _M64)
