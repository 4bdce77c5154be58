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


#: The columns of an index base (name -> 1-D array): what `build_arrays` and `pack` return, what the index
#: image holds (`edge/index_image.py`) and what `_Base` reads.
Columns = dict[str, npt.NDArray[Any]]

_M64: Final = (1 << 64) - 1
#: Fibonacci hashing: a card's bucket is the top bits of `card * HASH_K mod 2^64` (a bijection on 64 bits,
#: so distinct cards never share a hash, and consecutive card numbers spread over the buckets).
HASH_K: Final = 0x9E37_79B9_7F4A_7C15
#: A user flag bit the base keeps for itself (never stored in SQLite, never returned): the user has a PIN hash
#: in the `p_*` columns.
F_HAS_PIN: Final = 0x80
#: Assignment lists a base decodes once, when it is made: the lists shared by the most users (at least two
#: each). The others are decoded on each lookup (one to three rows): a cache filled by lookups would miss on
#: most of them anyway (most lists are one user's: their windows differ) and clearing it stalled lookups.
LIST_CACHE: Final = 4096
#: The window (no start, no end) every row without a validity window points at.
_OPEN_WINDOW: Final = NO_END  # (NO_START << 32) | NO_END


class _Base:
    """The immutable, array-backed part of the index (the physical layout of `pack`).

    Credentials are sorted by their hash `card * HASH_K mod 2^64`; `c_dir` holds, for each bucket (the hash's
    top bits), the first row of that bucket: a lookup is one multiplication and a scan of ~1-2 rows, not a
    bisection. Validity windows of credentials, users and assignments are one shared table (`w_from`,
    `w_until`; most rows point at the open window); users with the same assignments share one list
    (`u_list` -> `l_off`, `a_gidx`, `a_win`); `u_uid` is empty when the uids are 1..n (then uid = row + 1);
    external ids and PIN hashes are byte columns read only for the answer."""

    __slots__ = (
        "_lists", "_open", "a_gidx", "a_win", "arrays", "c_card", "c_dir", "c_status", "c_uid", "c_win", "dense", "id0",
        "l_off", "n_creds", "n_pins", "n_users", "p_hash", "p_off", "p_uid", "shift", "u_flags", "u_id", "u_idoff",
        "u_list", "u_uid", "u_win", "w_from", "w_until",
    )  # fmt: skip

    def __init__(self, arrays: Columns) -> None:
        self.arrays = arrays  # keeps the buffers (or the image's mapping) alive; compact() works on whole columns
        mv = {k: memoryview(v) for k, v in arrays.items()}  # type: ignore[arg-type]
        self.c_card, self.c_uid, self.c_status, self.c_win = mv["c_card"], mv["c_uid"], mv["c_status"], mv["c_win"]
        self.c_dir = mv["c_dir"]
        self.shift = 64 - (len(arrays["c_dir"]) - 1).bit_length() + 1
        self.w_from, self.w_until = mv["w_from"], mv["w_until"]
        self.u_uid, self.u_flags, self.u_win, self.u_list = mv["u_uid"], mv["u_flags"], mv["u_win"], mv["u_list"]
        self.u_idoff = mv["u_idoff"]
        self.u_id, self.id0 = _sliceable(arrays["u_id"])
        self.l_off, self.a_gidx, self.a_win = mv["l_off"], mv["a_gidx"], mv["a_win"]
        self.p_uid, self.p_off, self.p_hash = mv["p_uid"], mv["p_off"], mv["p_hash"]
        self.n_creds = len(arrays["c_card"])
        self.n_users = len(arrays["u_flags"])
        self.n_pins = len(arrays["p_uid"])
        self.dense = len(arrays["u_uid"]) == 0
        #: (g, NO_START, NO_END) for every group number g: the rows of assignments without a window, made once
        #: (a decoded list is then one new tuple, not one per row).
        n_g = int(arrays["a_gidx"].max()) + 1 if len(arrays["a_gidx"]) else 0
        self._open: list[AssignRow] = [(g, NO_START, NO_END) for g in range(n_g)]
        self._lists: dict[int, tuple[AssignRow, ...]] = {}
        n_l = len(arrays["l_off"]) - 1
        if self.n_users and n_l:
            use = np.bincount(arrays["u_list"], minlength=n_l)
            top = np.argsort(use, kind="stable")[::-1][:LIST_CACHE]
            self._lists = {lst: self._list(lst) for lst in top[use[top] > 1].tolist()}

    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.arrays.values())

    def cred(self, card: int) -> CredRow | None:
        b = ((card * HASH_K) & _M64) >> self.shift
        d = self.c_dir
        i, j = d[b], d[b + 1]
        cc = self.c_card
        while i < j:
            if cc[i] == card:
                w = self.c_win[i]
                if w == 0:  # the open window: most credentials
                    return (self.c_uid[i], self.c_status[i], NO_START, NO_END)
                return (self.c_uid[i], self.c_status[i], self.w_from[w], self.w_until[w])
            i += 1
        return None

    def uid_at(self, i: int) -> int:
        return i + 1 if self.dense else self.u_uid[i]

    def user(self, uid: int) -> UserRow | None:
        i = uid - 1  # uids are allocated densely from 1: usually the row is right there
        n = self.n_users
        if self.dense:
            if not 0 <= i < n:
                return None
        elif not (0 <= i < n and self.u_uid[i] == uid):
            i = bisect_left(self.u_uid, uid)
            if i == n or self.u_uid[i] != uid:
                return None
        flags = self.u_flags[i]
        pin = None
        if flags & F_HAS_PIN:
            flags &= ~F_HAS_PIN
            pin = self._pin(uid)
        lst = self.u_list[i]
        assigns = self._lists.get(lst)
        if assigns is None:
            assigns = self._list(lst)
        w = self.u_win[i]
        o = self.u_idoff
        k = self.id0
        ext = self.u_id[k + o[i] : k + o[i + 1]].decode()
        if w == 0:
            return (ext, flags, NO_START, NO_END, pin, assigns)
        return (ext, flags, self.w_from[w], self.w_until[w], pin, assigns)

    def _pin(self, uid: int) -> str | None:
        k = bisect_left(self.p_uid, uid)
        if k == self.n_pins or self.p_uid[k] != uid:
            return None
        return str(self.p_hash[self.p_off[k] : self.p_off[k + 1]], "utf-8")

    def _list(self, lst: int) -> tuple[AssignRow, ...]:
        ag, aw = self.a_gidx, self.a_win
        j, end = self.l_off[lst], self.l_off[lst + 1]
        if end - j == 1:  # the most common case: one assignment
            w = aw[j]
            return (self._open[ag[j]] if w == 0 else (ag[j], self.w_from[w], self.w_until[w]),)
        op, wf, wu = self._open, self.w_from, self.w_until
        return tuple([
            op[ag[k]] if (w := aw[k]) == 0 else (ag[k], wf[w], wu[w])  # 0: the open window
            for k in range(j, end)
        ])  # fmt: skip


def _sliceable(a: npt.NDArray[Any]) -> tuple[Any, int]:
    """(buffer, offset): an object whose slices are `bytes` (the image's mapping, or the bytes a column was
    made from) and where the u8 column `a` starts in it: an external id is then one slice and one decode,
    without a memoryview object in between. A column of its own is copied into bytes."""
    owner: Any = a.base
    if isinstance(owner, bytes) or type(owner).__name__ == "mmap":
        start = a.__array_interface__["data"][0] - np.frombuffer(owner, np.uint8).__array_interface__["data"][0]
        if start >= 0 and start + len(a) <= len(owner):
            return owner, start
    return a.tobytes(), 0


def _logical(creds: Sequence[tuple[int, CredRow]], users: Sequence[tuple[int, UserRow]]) -> Columns:
    """The logical columns (one row per credential, user and assignment, as `unpack` gives) of rows in any
    order; users are sorted by uid.

    Sorting is done by numpy (which releases the GIL), not by `sorted()` on tuples, which would hold the
    GIL (and so the event loop) for the whole sort when this runs in a worker thread."""
    n = len(creds)
    lg: Columns = {
        "c_card": np.fromiter((c for c, _ in creds), np.uint64, n),
        "c_uid": np.fromiter((r[0] for _, r in creds), np.uint32, n),
        "c_status": np.fromiter((r[1] for _, r in creds), np.uint32, n),
        "c_from": np.fromiter((r[2] for _, r in creds), np.uint32, n),
        "c_until": np.fromiter((r[3] for _, r in creds), np.uint32, n),
    }
    if any(users[i][0] > users[i + 1][0] for i in range(len(users) - 1)):
        users = sorted(users, key=lambda r: r[0])
    lg |= {
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
    p_uid: list[int] = []
    p_off = [0]
    p_hash = bytearray()
    for uid, r in users:
        for g, f, u in r[5]:
            ag.append(g)
            af.append(f)
            au.append(u)
        aoff.append(len(ag))
        ids += r[0].encode()
        idoff.append(len(ids))
        if r[4] is not None:
            p_uid.append(uid)
            p_hash += r[4].encode()
            p_off.append(len(p_hash))
    lg["u_aoff"] = _array(aoff, np.uint32)
    lg["u_idoff"] = _array(idoff, np.uint32)
    lg["u_id"] = np.frombuffer(bytes(ids), np.uint8)
    lg["a_gidx"] = _array(ag, np.uint16)
    lg["a_from"] = _array(af, np.uint32)
    lg["a_until"] = _array(au, np.uint32)
    lg["p_uid"] = _array(p_uid, np.uint32)
    lg["p_off"] = _array(p_off, np.uint32)
    lg["p_hash"] = np.frombuffer(bytes(p_hash), np.uint8)
    return lg


def build_arrays(creds: Sequence[tuple[int, CredRow]], users: Sequence[tuple[int, UserRow]]) -> Columns:
    """The base columns of rows (any order). Used for tests, snapshots and compaction."""
    return pack(_logical(creds, users))


def _empty_arrays() -> Columns:
    return build_arrays([], [])


def _share_lists(
    cnt: npt.NDArray[np.int64], aoff: npt.NDArray[np.int64], gidx: npt.NDArray[np.uint16], win: npt.NDArray[np.uint32]
) -> tuple[npt.NDArray[Any], npt.NDArray[Any], npt.NDArray[np.uint16], npt.NDArray[np.uint32]]:
    """(u_list, l_off, a_gidx, a_win): one list per distinct (group, window) sequence. Lists are grouped by a
    64-bit hash (a sort of integers, not of rows), then every user's list is compared with its group's
    first; on a collision (never seen, but possible) nothing is shared."""
    u64, i64 = np.uint64, np.int64
    n_u, n_a = len(cnt), len(gidx)
    if n_u == 0:
        return np.zeros(0, i64), np.zeros(1, i64), gidx, win
    pos = (np.arange(n_a, dtype=i64) - np.repeat(aoff[:-1], cnt)).astype(u64)
    key = (gidx.astype(u64) << u64(32)) | win.astype(u64)
    with np.errstate(over="ignore"):
        v = _mix_np(key ^ (pos * u64(_K1) + u64(_K0)))
        cs = np.concatenate([np.zeros(1, u64), np.cumsum(v, dtype=u64)])
        lh = _mix_np((cs[aoff[1:]] - cs[aoff[:-1]]) ^ (cnt.astype(u64) * u64(_K2)))
    _, first, inv = np.unique(lh, return_index=True, return_inverse=True)
    inv = np.asarray(inv).reshape(-1)
    rep = first[inv]
    same = np.array_equal(cnt[rep], cnt) and np.array_equal(key[_ranges(aoff[:-1][rep], cnt)], key)
    if not same:
        return np.arange(n_u), aoff, gidx, win
    lcnt = cnt[first]
    sel = _ranges(aoff[:-1][first], lcnt)
    return inv, np.concatenate([[0], np.cumsum(lcnt)]), gidx[sel], win[sel]


def pack(lg: Columns) -> Columns:
    """The physical columns (`_Base`) of logical ones (vectorised; numpy releases the GIL)."""
    u64, u32, i64 = np.uint64, np.uint32, np.int64
    # credentials, in hash order, and the bucket directory
    card = lg["c_card"].astype(u64)
    n = len(card)
    with np.errstate(over="ignore"):
        h = card * u64(HASH_K)
    order = np.argsort(h, kind="stable")
    bits = max(1, (n // 2).bit_length())
    bucket = h[order] >> u64(64 - bits)
    c_dir = np.searchsorted(bucket, np.arange((1 << bits) + 1, dtype=u64)).astype(u32)
    # one table of validity windows; the open window is number 0
    n_u = len(lg["u_flags"])
    keys = np.concatenate([
        (lg[f"{p}_from"].astype(u64) << u64(32)) | lg[f"{p}_until"].astype(u64) for p in ("c", "u", "a")
    ])  # fmt: skip
    special = keys != u64(_OPEN_WINDOW)
    wk, winv = np.unique(keys[special], return_inverse=True)
    win = np.zeros(len(keys), u32)
    win[special] = winv.astype(u32) + 1
    wk = np.concatenate([np.array([_OPEN_WINDOW], u64), wk])
    c_win, u_win, a_win = win[:n], win[n : n + n_u], win[n + n_u :]
    # assignment lists, shared between users with the same (group, window) sequence
    aoff = lg["u_aoff"].astype(i64)
    cnt = aoff[1:] - aoff[:-1]
    a_gidx = lg["a_gidx"].astype(np.uint16)
    u_list, l_off, a_gidx, a_win = _share_lists(cnt, aoff, a_gidx, a_win)
    uid = lg["u_uid"].astype(u32)
    dense = n_u == 0 or (int(uid[0]) == 1 and int(uid[-1]) == n_u)
    flags = lg["u_flags"].astype(np.uint8) & np.uint8(0x7F)
    p_uid = lg["p_uid"].astype(u32)
    if len(p_uid):
        flags[np.searchsorted(uid, p_uid)] |= np.uint8(F_HAS_PIN)
    return {
        "c_card": card[order], "c_uid": lg["c_uid"].astype(u32)[order],
        "c_status": lg["c_status"].astype(u32)[order], "c_win": c_win[order], "c_dir": c_dir,
        "w_from": (wk >> u64(32)).astype(u32), "w_until": (wk & u64(0xFFFF_FFFF)).astype(u32),
        "u_uid": np.zeros(0, u32) if dense else uid, "u_flags": flags, "u_win": u_win,
        "u_list": u_list.astype(u32),
        "u_idoff": lg["u_idoff"].astype(u32), "u_id": lg["u_id"].astype(np.uint8),
        "l_off": l_off.astype(u32), "a_gidx": a_gidx, "a_win": a_win.astype(u32),
        "p_uid": p_uid, "p_off": lg["p_off"].astype(u32), "p_hash": lg["p_hash"].astype(np.uint8),
    }  # fmt: skip


def unpack(ph: Columns) -> Columns:
    """The logical columns of physical ones (the inverse of `pack`, up to the order of credentials)."""
    i64 = np.int64
    wf, wu = ph["w_from"], ph["w_until"]
    n_u = len(ph["u_flags"])
    ul = ph["u_list"].astype(i64)
    l_off = ph["l_off"].astype(i64)
    cnt = l_off[ul + 1] - l_off[ul] if n_u else np.zeros(0, i64)
    sel = _ranges(l_off[:-1][ul] if n_u else np.zeros(0, i64), cnt)
    aw = ph["a_win"][sel]
    return {
        "c_card": ph["c_card"], "c_uid": ph["c_uid"], "c_status": ph["c_status"],
        "c_from": wf[ph["c_win"]], "c_until": wu[ph["c_win"]],
        "u_uid": np.arange(1, n_u + 1, dtype=np.uint32) if len(ph["u_uid"]) == 0 else ph["u_uid"],
        "u_flags": ph["u_flags"] & np.uint8(0x7F), "u_from": wf[ph["u_win"]], "u_until": wu[ph["u_win"]],
        "u_aoff": np.concatenate([[0], np.cumsum(cnt)]).astype(np.uint32),
        "u_idoff": ph["u_idoff"], "u_id": ph["u_id"],
        "a_gidx": ph["a_gidx"][sel], "a_from": wf[aw], "a_until": wu[aw],
        "p_uid": ph["p_uid"], "p_off": ph["p_off"], "p_hash": ph["p_hash"],
    }  # fmt: skip


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


#: Overlay shards (a power of two): a dict that grows reallocates its whole table in one C call, holding the
#: GIL (1-4 ms past 10^5 entries); 64 dicts, each of 1/64 of the overlay, grow in steps 64 times smaller.
SHARDS: Final = 64
_SHARD: Final = SHARDS - 1


class _Overlay:
    """The overlay's entries by key (card or uid), as a dict would hold them, in `SHARDS` dicts by key."""

    __slots__ = ("shards",)

    def __init__(self) -> None:
        self.shards: list[dict[int, tuple[int, object, object]]] = [{} for _ in range(SHARDS)]

    def get(self, key: int) -> tuple[int, object, object] | None:
        return self.shards[key & _SHARD].get(key)

    def __setitem__(self, key: int, entry: tuple[int, object, object]) -> None:
        self.shards[key & _SHARD][key] = entry

    def __getitem__(self, key: int) -> tuple[int, object, object]:
        return self.shards[key & _SHARD][key]

    def __delitem__(self, key: int) -> None:
        del self.shards[key & _SHARD][key]

    def __contains__(self, key: int) -> bool:
        return key in self.shards[key & _SHARD]

    def __len__(self) -> int:
        return sum(map(len, self.shards))

    def __iter__(self) -> Iterator[int]:
        for sh in self.shards:
            yield from sh

    def items(self) -> Iterator[tuple[int, tuple[int, object, object]]]:
        for sh in self.shards:
            yield from sh.items()


def drain(container: dict[Any, Any] | list[Any] | set[Any] | _Overlay, step: int = DRAIN_STEP) -> bool:
    """Free up to `step` entries of `container`; True while some are left.

    CPython frees a container and everything only it references in one C call that holds the GIL (and so
    every thread, the event loop included) from start to end: 7 ms for a dict of 10^5 tuples here, 17 ms
    for 2 x 10^5. Emptied a step at a time (a loop turn or a bytecode boundary between steps), the same
    work never holds the GIL for more than ~0.1 ms. Large temporaries of a bulk change are drained so.
    """
    if isinstance(container, _Overlay):
        left = step
        for sh in container.shards:
            while sh and left:
                sh.popitem()
                left -= 1
        return bool(len(container))
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
        base: Columns | None = None,
        *,
        version: int = 0,
    ) -> None:
        self.tables = tables
        self._base = _Base(base if base is not None else _empty_arrays())
        self._cred_over = _Overlay()
        self._user_over = _Overlay()
        self.visible = version
        self._staging: int | None = None
        self._staged_tables: Tables | None = None

    # --- reads (tap path) ---------------------------------------------------------------------------

    def cred(self, card: int) -> CredRow | None:
        e = self._cred_over.shards[card & _SHARD].get(card)
        if e is not None:
            row = e[1] if e[0] <= self.visible else e[2]
            if row is not _BASE:
                return row  # type: ignore[return-value]  # a CredRow or None (deleted)
        return self._base.cred(card)

    def user(self, uid: int) -> UserRow | None:
        e = self._user_over.shards[uid & _SHARD].get(uid)
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
            w = b.c_win[i]
            yield card, (b.c_uid[i], b.c_status[i], b.w_from[w], b.w_until[w])
        for card in list(self._cred_over):
            row = self.cred(card)
            if row is not None:
                yield card, row

    def users(self) -> Iterator[tuple[int, UserRow]]:
        b = self._base
        for i in range(b.n_users):
            uid = b.uid_at(i)
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

    def rebase(self, columns: Columns) -> None:
        """Read the base from `columns` from now on: the same rows in other buffers (the index image's
        mapping of what this base holds). One assignment: a lookup sees the old buffers or the new."""
        self._base = _Base(columns)

    def detach_overlay(self) -> tuple[_Overlay, _Overlay]:
        """Take the overlay out (for `drain()`), leaving this index answering from its base only.

        Only for an index that has been replaced (after `compacted()`): its overlay is the largest
        structure of the process, too large to be freed in one go."""
        if self._staging is not None:
            raise RuntimeError("cannot detach the overlay while a change set is staged")
        creds, users = self._cred_over, self._user_over
        self._cred_over, self._user_over = _Overlay(), _Overlay()
        return creds, users

    def begin(self, version: int) -> None:
        """Start staging the change set that leads to `version`."""
        if version <= self.visible:
            raise ValueError(f"version {version} is not after the visible version {self.visible}")
        if self._staging is not None:
            raise RuntimeError("a change set is already being staged")
        self._staging = version
        self._staged_tables = None

    def _stage(self, over: _Overlay, key: int, row: object) -> None:
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
        return RightsIndex(self.tables, pack(self._merged()), version=self.visible)

    def _merged(self) -> Columns:
        """The logical columns of everything visible: the base's rows not in the overlay, and the overlay's."""
        arr = unpack(self._base.arrays)
        out: Columns = {}
        # credentials
        cards = np.fromiter((c for c in self._cred_over), np.uint64, len(self._cred_over))
        keep = ~np.isin(arr["c_card"], cards, assume_unique=True) if len(cards) else None
        live = [(c, r) for c in self._cred_over if (r := self.cred(c)) is not None]
        new_c = _logical(live, [])
        for k in ("c_card", "c_uid", "c_status", "c_from", "c_until"):
            old = arr[k] if keep is None else arr[k][keep]
            out[k] = np.concatenate([old, new_c[k]])
        # users: base users not in the overlay are copied column-wise, with their assignment and id slices
        uids = np.fromiter((u for u in self._user_over), np.uint32, len(self._user_over))
        n_u = len(arr["u_uid"])
        ukeep = np.ones(n_u, bool) if not len(uids) else ~np.isin(arr["u_uid"], uids, assume_unique=True)
        live_u = [(int(u), ur) for u in np.sort(uids) if (ur := self.user(int(u))) is not None]
        extra = _logical([], live_u)
        kept_idx = np.nonzero(ukeep)[0]
        aoff = arr["u_aoff"].astype(np.int64)
        a_counts = (aoff[1:] - aoff[:-1])[kept_idx]
        a_sel = _ranges(aoff[:-1][kept_idx], a_counts)
        idoff = arr["u_idoff"].astype(np.int64)
        id_counts = (idoff[1:] - idoff[:-1])[kept_idx]
        id_sel = _ranges(idoff[:-1][kept_idx], id_counts)
        cols = ("u_uid", "u_flags", "u_from", "u_until")
        all_uid = np.concatenate([arr["u_uid"][kept_idx], extra["u_uid"]])
        uorder = np.argsort(all_uid, kind="stable")
        for k in cols:
            out[k] = np.concatenate([arr[k][kept_idx], extra[k]])[uorder]
        ea = extra["u_aoff"].astype(np.int64)
        ei = extra["u_idoff"].astype(np.int64)
        cnt_a = np.concatenate([a_counts, ea[1:] - ea[:-1]])[uorder]
        cnt_i = np.concatenate([id_counts, ei[1:] - ei[:-1]])[uorder]
        start_a = np.concatenate([np.cumsum(a_counts) - a_counts, len(a_sel) + ea[:-1]])[uorder]
        start_i = np.concatenate([np.cumsum(id_counts) - id_counts, len(id_sel) + ei[:-1]])[uorder]
        sel = _ranges(start_a, cnt_a)
        for k in ("a_gidx", "a_from", "a_until"):
            out[k] = np.concatenate([arr[k][a_sel], extra[k]])[sel]
        out["u_aoff"] = np.concatenate([[0], np.cumsum(cnt_a)]).astype(np.uint32)
        ids_all = np.concatenate([arr["u_id"][id_sel], extra["u_id"]])
        out["u_id"] = ids_all[_ranges(start_i, cnt_i)]
        out["u_idoff"] = np.concatenate([[0], np.cumsum(cnt_i)]).astype(np.uint32)
        # PIN hashes: the kept users' and the overlay's, by uid
        p_uid, p_off = arr["p_uid"], arr["p_off"].astype(np.int64)
        pkeep = np.nonzero(~np.isin(p_uid, uids) if len(uids) else np.ones(len(p_uid), bool))[0]
        p_cnt_k = (p_off[1:] - p_off[:-1])[pkeep]
        p_sel = _ranges(p_off[:-1][pkeep], p_cnt_k)
        eo = extra["p_off"].astype(np.int64)
        all_p = np.concatenate([p_uid[pkeep], extra["p_uid"]])
        porder = np.argsort(all_p, kind="stable")
        p_cnt = np.concatenate([p_cnt_k, eo[1:] - eo[:-1]])[porder]
        p_start = np.concatenate([np.cumsum(p_cnt_k) - p_cnt_k, len(p_sel) + eo[:-1]])[porder]
        out["p_uid"] = all_p[porder].astype(np.uint32)
        out["p_hash"] = np.concatenate([arr["p_hash"][p_sel], extra["p_hash"]])[_ranges(p_start, p_cnt)]
        out["p_off"] = np.concatenate([[0], np.cumsum(p_cnt)]).astype(np.uint32)
        for tmp in (live, live_u):  # freed a step at a time: this runs in a thread beside the event loop
            while drain(tmp):
                pass
        return out


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
    bound to its position. `user_hash_sum` is the same over the base arrays, vectorised."""
    h = _mix((uid + _K0) & _M64)
    h = _mix(h ^ ((row[1] << 32) | row[2]))
    h = _mix(h ^ row[3])
    h = _mix(h ^ _str_hash(row[0]))
    h = _mix(h ^ _str_hash(row[4]))
    for j, (g, f, u) in enumerate(row[5]):
        a = _mix(_str_hash(_group_name(gid, g)) ^ ((f << 32) | u))
        h = (h + _mix((a + j) & _M64)) & _M64
    return _mix(h)


def user_hash_sum(lg: Columns, keep: npt.NDArray[np.bool_] | None, gid: Sequence[str]) -> tuple[int, int]:
    """(sum of `user_hash`, count) over the users of logical columns `lg` selected by `keep` (all when None)."""
    u64 = np.uint64
    n = len(lg["u_uid"])
    blob = lg["u_id"].tobytes()
    idoff = lg["u_idoff"].tolist()
    ext = np.fromiter((_bytes_hash(b"\x01" + blob[idoff[i] : idoff[i + 1]]) for i in range(n)), u64, n)
    pins = np.zeros(n, u64)
    if len(lg["p_uid"]):
        pos = np.searchsorted(lg["u_uid"], lg["p_uid"])
        pblob, poff = lg["p_hash"].tobytes(), lg["p_off"].tolist()
        k = len(lg["p_uid"])
        pins[pos] = np.fromiter((_bytes_hash(b"\x01" + pblob[poff[i] : poff[i + 1]]) for i in range(k)), u64, k)
    aoff = lg["u_aoff"].astype(np.int64)
    counts = aoff[1:] - aoff[:-1]
    names = np.fromiter((_str_hash(_group_name(gid, g)) for g in range(max(len(gid), 1))), u64, max(len(gid), 1))
    with np.errstate(over="ignore"):
        h = _mix_np(lg["u_uid"].astype(u64) + u64(_K0))
        h = _mix_np(h ^ ((lg["u_flags"].astype(u64) << u64(32)) | lg["u_from"].astype(u64)))
        h = _mix_np(h ^ lg["u_until"].astype(u64))
        h = _mix_np(h ^ ext)
        h = _mix_np(h ^ pins)
        g = lg["a_gidx"].astype(np.int64)
        gname = np.where(g < len(names), names[np.minimum(g, len(names) - 1)], 0).astype(u64)
        if len(g) and (g >= len(gid)).any():  # a group number with no id: hash its "#n" name, as user_hash
            for kk in np.nonzero(g >= len(gid))[0]:
                gname[kk] = u64(_str_hash(f"#{int(g[kk])}"))
        a = _mix_np(gname ^ ((lg["a_from"].astype(u64) << u64(32)) | lg["a_until"].astype(u64)))
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

    @staticmethod
    def parse(text: str) -> Digest:
        """The digest `text()` wrote (ValueError when `text` is not one)."""
        fmt, version, nc, nu, c, u, t = text.split(":")
        if fmt != "1":
            raise ValueError(f"unknown rights checksum format {fmt!r}")
        return Digest(int(version), int(nc), int(nu), int(c, 16), int(u, 16), int(t, 16))

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
    lg = unpack(index._base.arrays)
    over = index._cred_over
    cols = [lg[k] for k in ("c_card", "c_uid", "c_status", "c_from", "c_until")]
    if over:
        keep = ~np.isin(lg["c_card"], np.fromiter(over, np.uint64, len(over)), assume_unique=True)
        cols = [c[keep] for c in cols]
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
        ukeep = ~np.isin(lg["u_uid"], np.fromiter(uover, np.uint32, len(uover)), assume_unique=True)
    users, n_users = user_hash_sum(lg, ukeep, gid)
    for uid in uover:
        urow = index.user(uid)
        if urow is not None:
            users += user_hash(uid, urow, gid)
            n_users += 1
    tables = sum(table_hashes(index.tables).values())
    return Digest(index.visible, n_creds, n_users, creds & _M64, users & _M64, tables & _M64)
