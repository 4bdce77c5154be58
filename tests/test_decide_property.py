"""Property tests: `Decider.decide()` agrees with the plain reference in tests/reference.py.

Random small sites (doors, schedules with holidays in zones with odd DST rules, groups, users, cards),
random runtime state (mode overrides, lockdown, link, clock, PINs), and probe times biased to the edges
that matter: the exact second a window opens or closes (and one second either side), DST transitions of
the zones in play (found by scanning), schedule interval bounds on the local wall clock.

The index is built two ways: directly (`Tables.build` + `build_arrays`) and through the real `Store`
(SQLite on disk, change sets, compaction, reopening).
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from functools import cache
from pathlib import Path
from zoneinfo import ZoneInfo

import msgspec
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from edge.access_state import AccessState, door_contact, on_decision, remote_move, reset, update
from edge.decision import Decider, Decision, OfflinePolicy, SitePolicy, TimePolicy
from edge.model import (
    AntiPassback,
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
    DoorMode,
    DuressMode,
    Group,
    Interlock,
    Interval,
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
    TimeRange,
    User,
)
from edge.pin import hash_pin
from edge.store import Store

from .reference import (
    RefResult,
    RefState,
    SiteModel,
    index_of,
    ref_contact,
    ref_on_decision,
    ref_remote_move,
    ref_reset,
    ref_update,
    reference_decision,
    whole,
)

ZONES = ["Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "Asia/Kathmandu", "UTC"]
PERIOD_START = datetime(2026, 2, 20, tzinfo=UTC)
PERIOD_END = datetime(2026, 12, 10, tzinfo=UTC)
PINS = {"1234": hash_pin("1234", iterations=1000), "98765": hash_pin("98765", iterations=1000)}
WRONG_PIN = "0000"
DOOR_IDS = ["d0", "d1", "d2", "d3"]
SCHED_IDS = ["s0", "s1", "s2", "s3"]
GROUP_IDS = ["g0", "g1", "g2", "g3", "g4"]
USER_IDS = [f"u{i}" for i in range(20)]
CARDS = list(range(100, 140))
UNKNOWN_CARD = 999_999

# Deterministic by default (the same examples on every CI run). EDGE_HYPOTHESIS=explore draws fresh
# random examples, ten times as many, for hunting.
EXPLORE = os.environ.get("EDGE_HYPOTHESIS") == "explore"
SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
PROBE_SETTINGS = settings(
    max_examples=4000 if EXPLORE else 400, deadline=None, derandomize=not EXPLORE, suppress_health_check=SLOW_OK
)


@cache
def transitions(zone: str) -> tuple[datetime, ...]:
    """Every UTC offset change of `zone` inside the test period, to the second (found by scanning)."""
    tz = ZoneInfo(zone)
    out: list[datetime] = []
    step = timedelta(hours=1)
    t = PERIOD_START
    while t < PERIOD_END:
        nxt = t + step
        if t.astimezone(tz).utcoffset() != nxt.astimezone(tz).utcoffset():
            lo, hi = t, nxt  # offset(lo) != offset(hi): bisect to the first second of the new offset
            while hi - lo > timedelta(seconds=1):
                mid = lo + (hi - lo) / 2
                mid = mid.replace(microsecond=0)
                if mid.astimezone(tz).utcoffset() == lo.astimezone(tz).utcoffset():
                    lo = mid
                else:
                    hi = mid
            out.append(hi)
        t = nxt
    return tuple(out)


def test_transition_scan_finds_the_known_dst_changes() -> None:
    assert datetime(2026, 3, 29, 1, 0, tzinfo=UTC) in transitions("Europe/Berlin")
    assert datetime(2026, 10, 25, 1, 0, tzinfo=UTC) in transitions("Europe/Berlin")
    assert len(transitions("Australia/Lord_Howe")) == 2
    assert transitions("Asia/Kathmandu") == () and transitions("UTC") == ()


def clock(minute: int) -> str:
    return f"{minute // 60:02d}:{minute % 60:02d}"


# --- strategies ----------------------------------------------------------------------------------------

instants = st.integers(int(PERIOD_START.timestamp()), int(PERIOD_END.timestamp())).map(
    lambda s: datetime.fromtimestamp(s, UTC)
)


@st.composite
def spans(draw: st.DrawFn) -> tuple[str, str]:
    step = draw(st.sampled_from([15, 30, 60]))
    n = 1440 // step
    if draw(st.booleans()):  # wide: most of the day
        a = draw(st.integers(0, n // 2)) * step
        b = draw(st.integers(max(a // step + 1, n // 2), n)) * step
    else:
        a = draw(st.integers(0, n - 1)) * step
        b = draw(st.integers(a // step + 1, n)) * step
    return clock(a), clock(b)


def dst_dates(zone: str) -> list[date]:
    tz = ZoneInfo(zone)
    return [t.astimezone(tz).date() + timedelta(days=k) for t in transitions(zone) for k in (-1, 0)]


@st.composite
def schedules(draw: st.DrawFn, sid: str, site_zone: str) -> Schedule:
    zone = draw(st.sampled_from([None, None, None, *ZONES]))
    eff = zone or site_zone
    intervals = [
        Interval(day=day, start=a, end=b)
        for day, (a, b) in draw(st.lists(st.tuples(st.integers(0, 6), spans()), max_size=10))
    ]
    if draw(st.booleans()):  # the DST days themselves, so that transitions fall inside or at the edge
        for d in dst_dates(eff):
            if draw(st.booleans()):
                a, b = draw(spans())
                intervals.append(Interval(day=d.weekday(), start=a, end=b))
    holiday_pool = dst_dates(eff) or [date(2026, 3, 29)]
    holidays = draw(
        st.lists(st.one_of(st.sampled_from(holiday_pool), instants.map(lambda t: t.date())), max_size=3, unique=True)
    )
    holiday_intervals = [TimeRange(start=a, end=b) for a, b in draw(st.lists(spans(), max_size=2))]
    return Schedule(id=sid, intervals=intervals, holidays=holidays, holiday_intervals=holiday_intervals, tz=zone)


@st.composite
def windows(draw: st.DrawFn) -> tuple[datetime | None, datetime | None]:
    kind = draw(st.sampled_from(["none", "none", "none", "from", "until", "both"]))
    a = draw(instants)
    b = draw(instants)
    if kind == "none":
        return None, None
    if kind == "from":
        return a, None
    if kind == "until":
        return None, a
    if a == b:
        b = a + timedelta(seconds=1)
    lo, hi = min(a, b), max(a, b)
    if draw(st.booleans()):  # a sub-second part on the wire is dropped (the store keeps whole seconds)
        lo = lo.replace(microsecond=draw(st.integers(0, 999_999)))
    return lo, hi


@st.composite
def sites(draw: st.DrawFn, zone: str | None = None) -> SiteModel:
    """A random consistent site (ids drawn from small pools, so that sites of a sequence overlap)."""
    zone = zone or draw(st.sampled_from(ZONES))
    model = SiteModel(ZoneInfo(zone))
    sched_ids = draw(st.lists(st.sampled_from(SCHED_IDS), max_size=4, unique=True))
    for sid in sched_ids:
        model.schedules[sid] = draw(schedules(sid, zone))
    opt_sched = st.sampled_from([None, *sched_ids]) if sched_ids else st.none()
    door_ids = draw(st.lists(st.sampled_from(DOOR_IDS), min_size=1, max_size=4, unique=True))
    for did in door_ids:
        model.doors[did] = Door(
            id=did,
            strike_s=draw(st.sampled_from([3.0, 5.0])),
            extended_strike_s=draw(st.sampled_from([10.0, 20.0])),
            mode=draw(st.sampled_from([DoorMode.NORMAL, DoorMode.CARD_AND_PIN, *DoorMode])),
            unlock_schedule=draw(opt_sched),
            pin_schedule=draw(opt_sched),
        )
    group_ids = draw(st.lists(st.sampled_from(GROUP_IDS), min_size=1, max_size=5, unique=True))
    for gid in group_ids:
        model.groups[gid] = Group(
            id=gid,
            doors=draw(st.lists(st.sampled_from(door_ids), min_size=draw(st.sampled_from([0, 1, 1])), unique=True)),
            schedule=draw(opt_sched),
        )
    user_ids = draw(st.lists(st.sampled_from(USER_IDS), min_size=1, max_size=20, unique=True))
    for uid in user_ids:
        vf, vu = draw(windows())
        assignments = []
        for g in draw(st.lists(st.sampled_from(group_ids), min_size=draw(st.sampled_from([0, 1, 1])), max_size=3)):
            af, au = draw(windows())
            assignments.append(Assignment(group=g, valid_from=af, valid_until=au))
        model.users[uid] = User(
            id=uid,
            active=draw(st.sampled_from([True, True, True, False])),
            offline_access=draw(st.booleans()),
            extended_door_time=draw(st.booleans()),
            emergency=draw(st.sampled_from([False, False, True])),
            valid_from=vf,
            valid_until=vu,
            pin_hash=draw(st.sampled_from([None, *PINS.values()])),
            assignments=assignments,
        )
    n_cards = min(len(CARDS), 2 * len(user_ids))
    cards = draw(st.lists(st.sampled_from(CARDS), min_size=1, max_size=n_cards, unique=True))
    for card in cards:
        vf, vu = draw(windows())
        model.credentials[card] = Credential(
            card=card,
            user=draw(st.sampled_from(user_ids)),
            status=draw(st.sampled_from([CredentialStatus.ACTIVE] * 9 + list(CredentialStatus))),
            valid_from=vf,
            valid_until=vu,
        )
    return model


@st.composite
def policies(draw: st.DrawFn) -> SitePolicy:
    return SitePolicy(
        offline_grace_s=draw(st.sampled_from([0.0, 60.0, 300.0])),
        offline_policy=draw(st.sampled_from(list(OfflinePolicy))),
        pin_max_attempts=draw(st.integers(1, 3)),
        pin_lockout_s=draw(st.sampled_from([30.0, 300.0])),
        lockdown_override_group=draw(st.sampled_from([None, None, *GROUP_IDS, "no-such-group"])),
        time_policy=draw(st.sampled_from(list(TimePolicy))),
        max_offline_age_s=draw(st.sampled_from([None, None, 3600.0])),
    )


def edge_instants(model: SiteModel) -> list[datetime]:
    """Window bounds (exact, and one second either side), DST changes, schedule interval bounds."""
    out: list[datetime] = []
    bounds: list[datetime | None] = []
    for u in model.users.values():
        bounds += [u.valid_from, u.valid_until]
        for a in u.assignments:
            bounds += [a.valid_from, a.valid_until]
    for c in model.credentials.values():
        bounds += [c.valid_from, c.valid_until]
    for b in bounds:
        if b is not None:
            w = b.replace(microsecond=0)
            out += [w - timedelta(seconds=1), w, w + timedelta(seconds=1)]
    zones = {str(model.tz)} | {s.tz for s in model.schedules.values() if s.tz}
    for z in zones:
        for t in transitions(z):
            for dm in (-61, -60, -31, -30, -1, 0, 29, 30, 59, 60, 90):
                out += [t + timedelta(minutes=dm), t + timedelta(minutes=dm, seconds=-1)]
    for s in model.schedules.values():
        tz = ZoneInfo(s.tz) if s.tz else model.tz
        days = [*dst_dates(s.tz or str(model.tz)), *s.holidays, date(2026, 6, 15)]
        for d in days:
            for iv in [*s.intervals, *s.holiday_intervals]:
                for hm in (iv.start, iv.end):
                    m = int(hm[:2]) * 60 + int(hm[3:])
                    local = datetime.combine(d, time(0), tz) + timedelta(minutes=m)  # wall clock, then UTC
                    for fold in (0, 1):
                        base = local.replace(fold=fold).astimezone(UTC)
                        out += [base - timedelta(seconds=1), base]
    return [t for t in out if PERIOD_START <= t < PERIOD_END]


@dataclass
class Probe:
    door: str
    card: int
    now: datetime
    pin: str | None
    link_online: bool
    offline_for: int | None
    clock_trusted: bool
    rights_age_s: float | None


@dataclass
class Runtime:
    policy: SitePolicy
    overrides: dict[str, DoorMode]
    lockdown: bool
    probes: list[Probe] = field(default_factory=list)


@st.composite
def runtimes(draw: st.DrawFn, model: SiteModel, n: int = 60) -> Runtime:
    doors = [*model.doors, "nowhere"]
    overrides = draw(st.dictionaries(st.sampled_from(list(model.doors)), st.sampled_from(list(DoorMode)), max_size=2))
    edges = edge_instants(model)
    time_st = st.one_of(instants, st.sampled_from(edges)) if edges else instants
    cards = [*model.credentials, UNKNOWN_CARD]
    probes = []
    for _ in range(draw(st.integers(1, n))):
        probes.append(
            Probe(
                door=draw(
                    st.sampled_from(doors) if draw(st.integers(0, 9)) == 0 else st.sampled_from(list(model.doors))
                ),
                card=draw(
                    st.sampled_from(cards) if draw(st.integers(0, 9)) == 0 else st.sampled_from(list(model.credentials))
                ),
                now=draw(time_st),
                pin=draw(st.sampled_from([None, *PINS, *PINS, WRONG_PIN, WRONG_PIN])),
                link_online=draw(st.sampled_from([True, True, False])),
                offline_for=draw(st.sampled_from([None, 0, 59, 60, 61, 299, 300, 3600])),
                clock_trusted=draw(st.sampled_from([True, True, True, False])),
                rights_age_s=draw(st.sampled_from([None, 10.0, 3600.0, 3601.0])),
            )
        )
    # Mostly in time order, so that first-card unlocks and PIN lockouts have later taps to act on.
    if draw(st.booleans()):
        probes.sort(key=lambda p: p.now)
    return Runtime(draw(policies()), overrides, draw(st.sampled_from([False, False, False, True])), probes)


# --- comparison ----------------------------------------------------------------------------------------


def check_probes(model: SiteModel, decider: Decider, rt: Runtime, where: str = "") -> None:
    """Run every probe through the Decider and the reference, with both keeping their own runtime state."""
    decider.policy = rt.policy
    decider.lockdown = rt.lockdown
    for door, mode in rt.overrides.items():
        decider.set_door_mode(door, mode)
    first_card: dict[str, float] = {}
    pin_fail: dict[int, list[float]] = {}
    for i, p in enumerate(rt.probes):
        since = None if p.offline_for is None else p.now - timedelta(seconds=p.offline_for)
        kw = {
            "pin": p.pin,
            "link_online": p.link_online,
            "offline_since": since,
            "clock_trusted": p.clock_trusted,
            "rights_age_s": p.rights_age_s,
        }
        got = decider.decide(p.door, p.card, p.now, **kw)  # type: ignore[arg-type]
        want = reference_decision(
            model, p.door, p.card, p.now, policy=rt.policy, mode_override=rt.overrides, lockdown=rt.lockdown,
            first_card_until=first_card, pin_failures=pin_fail, **kw,  # type: ignore[arg-type]
        )  # fmt: skip
        assert_same(got, want, f"{where}probe {i}: {p}")
        event(f"reason: {got.reason}")


def assert_same(got: Decision, want: RefResult, what: str) -> None:
    msg = f"{what}\n  decide(): {got}\n  reference: {want}"
    assert (got.granted, got.reason, got.group) == want.triple(), msg
    if got.user is not None or want.user is not None:
        assert got.user == want.user, msg
    assert got.strike_s == want.strike_s, msg
    assert got.alarm == want.alarm, msg
    assert got.unlock_until == want.unlock_until, msg


# --- properties: the index built directly ------------------------------------------------------------


@PROBE_SETTINGS
@given(st.data())
def test_decide_agrees_with_reference(data: st.DataObject) -> None:
    model = data.draw(sites(), label="site")
    rt = data.draw(runtimes(model), label="runtime")
    check_probes(model, Decider(index_of(model)), rt)


# --- properties: through the real store ---------------------------------------------------------------


def diff(old: SiteModel, new: SiteModel, frm: int) -> ChangeSet:
    """A change set taking a store holding `old` to `new`, ordered so that every step is valid."""
    ch: list[Change] = []
    ch += [PutSchedule(schedule=s) for k, s in new.schedules.items() if old.schedules.get(k) != s]
    ch += [PutDoor(door=d) for k, d in new.doors.items() if old.doors.get(k) != d]
    ch += [PutGroup(group=g) for k, g in new.groups.items() if old.groups.get(k) != g]
    ch += [PutUser(user=u) for k, u in new.users.items() if old.users.get(k) != u]
    gone_users = [k for k in old.users if k not in new.users]
    # A card that disappears, or moves to another user, is deleted first (unless its user is deleted).
    ch += [
        DeleteCredential(card=c)
        for c, cred in old.credentials.items()
        if cred.user not in gone_users and (c not in new.credentials or new.credentials[c].user != cred.user)
    ]
    ch += [DeleteUser(id=k) for k in gone_users]
    ch += [PutCredential(credential=c) for k, c in new.credentials.items() if old.credentials.get(k) != c]
    ch += [PutArea(area=a) for k, a in new.areas.items() if old.areas.get(k) != a]
    ch += [PutInterlock(interlock=il) for k, il in new.interlocks.items() if old.interlocks.get(k) != il]
    if new.site_rules != old.site_rules:
        ch.append(PutSiteRules(rules=new.site_rules))
    ch += [DeleteInterlock(id=k) for k in old.interlocks if k not in new.interlocks]
    ch += [DeleteArea(id=k) for k in old.areas if k not in new.areas]
    ch += [DeleteGroup(id=k) for k in old.groups if k not in new.groups]
    ch += [DeleteDoor(id=k) for k in old.doors if k not in new.doors]
    ch += [DeleteSchedule(id=k) for k in old.schedules if k not in new.schedules]
    return ChangeSet(from_version=frm, to_version=frm + 1, changes=ch)


STORE_SETTINGS = settings(
    max_examples=300 if EXPLORE else 30, deadline=None, derandomize=not EXPLORE, suppress_health_check=SLOW_OK
)


@STORE_SETTINGS
@given(st.data())
def test_store_change_sets_compaction_and_reopen_agree_with_reference(data: st.DataObject) -> None:
    zone = data.draw(st.sampled_from(ZONES), label="zone")
    models = [SiteModel(ZoneInfo(zone))]
    for i in range(data.draw(st.integers(1, 4), label="change sets")):
        models.append(data.draw(sites(zone), label=f"site {i}"))
    final = models[-1]
    rts = [None, *(data.draw(runtimes(m, n=30), label=f"runtime {i}") for i, m in enumerate(models[1:], 1))]

    last = rts[-1]
    assert last is not None

    async def scenario(path: Path) -> None:
        async with Store(path, zone) as store:
            for v in range(1, len(models)):
                await store.apply(diff(models[v - 1], models[v], v - 1))
                rt = rts[v]
                assert rt is not None
                check_probes(models[v], Decider(store.index), rt, f"after change set {v}: ")
            assert store.version == len(models) - 1
            await store.compact()
            assert store.index.overlay_size == 0
            check_probes(final, Decider(store.index), last, "after compaction: ")
        async with Store(path, zone) as again:
            assert again.version == len(models) - 1
            check_probes(final, Decider(again.index), last, "after reopening: ")

    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(scenario(Path(tmp) / "rights.db"))


# --- properties: the access rules (issue 19) -------------------------------------------------------------

AREA_IDS = ["a0", "a1", "a2"]


@st.composite
def rule_sites(draw: st.DrawFn, zone: str | None = None) -> SiteModel:
    """A random site with access rules: areas behind doors, two-person and escort doors, interlocks,
    use-limited credentials and a duress setting."""
    model = draw(sites(zone))
    group_ids = list(model.groups)
    # Mostly people who may pass (the rules come after every other check): open groups, plain users and cards.
    if draw(st.booleans()):
        for gid, g in list(model.groups.items()):
            model.groups[gid] = msgspec.structs.replace(g, doors=list(model.doors), schedule=None)
        for uid, u in list(model.users.items()):
            if draw(st.integers(0, 4)):
                gs = draw(st.lists(st.sampled_from(group_ids), min_size=1, max_size=2, unique=True))
                model.users[uid] = msgspec.structs.replace(
                    u, active=True, valid_from=None, valid_until=None,
                    assignments=[Assignment(group=g) for g in gs],
                )  # fmt: skip
        for card, c in list(model.credentials.items()):
            if draw(st.integers(0, 4)):
                model.credentials[card] = msgspec.structs.replace(
                    c, status=CredentialStatus.ACTIVE, valid_from=None, valid_until=None
                )
    for aid in draw(st.lists(st.sampled_from(AREA_IDS), min_size=1, max_size=3, unique=True)):
        model.areas[aid] = Area(
            id=aid,
            anti_passback=draw(st.sampled_from(list(AntiPassback))),
            timed_s=draw(st.sampled_from([30.0, 120.0])),
            exempt_groups=draw(st.lists(st.sampled_from(group_ids), max_size=1, unique=True)),
            max_occupancy=draw(st.sampled_from([None, 1, 2, 3])),
        )
    areas = [None, *model.areas]
    for did, d in list(model.doors.items()):
        model.doors[did] = msgspec.structs.replace(
            d,
            mode=draw(st.sampled_from([DoorMode.NORMAL, DoorMode.NORMAL, DoorMode.CARD_AND_PIN, d.mode])),
            to_area=draw(st.sampled_from(areas)),
            from_area=draw(st.sampled_from(areas)),
            two_person_s=draw(st.sampled_from([None, None, 10.0, 60.0])),
            escort_group=draw(st.sampled_from([None, None, *group_ids])),
            visitor_groups=draw(st.lists(st.sampled_from(group_ids), max_size=2, unique=True)),
            escort_s=draw(st.sampled_from([10.0, 30.0])),
        )
    doors = draw(st.permutations(list(model.doors)))
    k = 0
    for n in range(draw(st.integers(0, 2))):
        size = draw(st.integers(2, 3))
        if k + size <= len(doors):
            model.interlocks[f"i{n}"] = Interlock(id=f"i{n}", doors=list(doors[k : k + size]))
            k += size
    for card, c in list(model.credentials.items()):
        model.credentials[card] = msgspec.structs.replace(c, max_uses=draw(st.sampled_from([None, None, None, 1, 2])))
    mode = draw(st.sampled_from(list(DuressMode)))
    model.site_rules = SiteRules(duress=mode, duress_code_hash=PINS["98765"] if mode is DuressMode.CODE else None)
    return model


@dataclass
class RuleProbe:
    door: str
    card: int
    at: int  # seconds after the start
    pin: str | None
    side: str
    opened: bool | None  # None: the door's fate is never reported
    contact: tuple[str, bool] | None  # a contact edge just before the tap
    #: before the tap: a passage relayed from another gateway (user, area, seconds from now), a reset (user, area)
    remote: tuple[str, str | None, int] | None = None
    reset: tuple[str | None, str | None] | None = None


@st.composite
def rule_probes(draw: st.DrawFn, model: SiteModel, n: int = 60) -> tuple[datetime, list[RuleProbe]]:
    start = draw(instants)
    t = 0
    out = []
    cards = list(model.credentials)
    users = sorted(model.users)
    areas: list[str | None] = [None, *sorted(model.areas)]
    moved = st.tuples(st.sampled_from(users), st.sampled_from(areas), st.sampled_from([-3600, -1, 0, 1]))
    remotes = st.one_of(st.none(), st.none(), moved)  # relayed passages (cross-gateway anti-passback)
    resets = st.one_of(*[st.none()] * 6, st.tuples(st.sampled_from([None, *users]), st.sampled_from(areas)))
    for _ in range(draw(st.integers(1, n))):
        t += draw(st.sampled_from([0, 1, 2, 5, 9, 10, 11, 29, 31, 60, 121, 3600]))
        out.append(
            RuleProbe(
                door=draw(st.sampled_from(list(model.doors))),
                card=draw(st.sampled_from(cards)),
                at=t,
                pin=draw(st.sampled_from([None, "1234", "1235", "98765", "98766", WRONG_PIN])),
                side=draw(st.sampled_from(["in", "in", "out"])),
                opened=draw(st.sampled_from([True, True, False, None])),
                contact=draw(st.one_of(st.none(), st.tuples(st.sampled_from(list(model.doors)), st.booleans()))),
                remote=draw(remotes),
                reset=draw(resets),
            )
        )
    return start, out


def check_rule_probes(model: SiteModel, decider: Decider, start: datetime, probes: list[RuleProbe]) -> None:
    state = AccessState()
    ref = RefState()
    first_card: dict[str, float] = {}
    pin_fail: dict[int, list[float]] = {}
    for i, p in enumerate(probes):
        now = start + timedelta(seconds=p.at)
        ts = now.timestamp()
        if p.contact is not None:
            door_contact(state, p.contact[0], p.contact[1], ts)
            ref_contact(ref, p.contact[0], p.contact[1])
        if p.remote is not None:
            remote_move(state, p.remote[0], p.remote[1], ts + p.remote[2])
            ref_remote_move(ref, p.remote[0], p.remote[1], whole(now).timestamp() + p.remote[2])
        if p.reset is not None:
            reset(state, user=p.reset[0], area=p.reset[1])
            ref_reset(ref, p.reset[0], p.reset[1])
        got = decider.decide(p.door, p.card, now, pin=p.pin, state=state, side=p.side)  # type: ignore[arg-type]
        want = reference_decision(
            model, p.door, p.card, now, pin=p.pin, state=ref, side=p.side, first_card_until=first_card,
            pin_failures=pin_fail,
        )  # fmt: skip
        what = f"probe {i}: {p}"
        assert_same(got, want, what)
        assert (got.duress, got.passage) == (want.duress, want.passage), f"{what}\n  {got}\n  {want}"
        on_decision(state, got, ts)
        ref_on_decision(model, ref, want, p.door, p.card, now)
        if p.opened is not None:
            update(state, got, p.opened, ts)
            ref_update(model, ref, want, p.card, p.opened, now)
        for area in model.areas:
            assert state.occupancy.get(area, 0) == ref.occupancy(area), what
        event(f"reason: {got.reason}")
        if got.duress:
            event("duress")
        if got.alarm == "anti_passback":
            event("soft anti-passback alarm")


RULE_SETTINGS = settings(
    max_examples=2000 if EXPLORE else 200, deadline=None, derandomize=not EXPLORE, suppress_health_check=SLOW_OK
)


@RULE_SETTINGS
@given(st.data())
def test_decide_with_access_rules_agrees_with_reference(data: st.DataObject) -> None:
    model = data.draw(rule_sites(), label="site")
    start, probes = data.draw(rule_probes(model), label="probes")
    check_rule_probes(model, Decider(index_of(model)), start, probes)


@STORE_SETTINGS
@given(st.data())
def test_store_with_access_rules_agrees_with_reference(data: st.DataObject) -> None:
    """Sites with rules through change sets into the real store (and a reopen): the same decisions."""
    zone = data.draw(st.sampled_from(ZONES), label="zone")
    models = [SiteModel(ZoneInfo(zone))]
    for i in range(data.draw(st.integers(1, 3), label="change sets")):
        models.append(data.draw(rule_sites(zone), label=f"site {i}"))
    start, probes = data.draw(rule_probes(models[-1], n=30), label="probes")

    async def scenario(path: Path) -> None:
        async with Store(path, zone) as store:
            for v in range(1, len(models)):
                await store.apply(diff(models[v - 1], models[v], v - 1))
            check_rule_probes(models[-1], Decider(store.index), start, probes)
        async with Store(path, zone) as again:
            assert again.damage is None
            check_rule_probes(models[-1], Decider(again.index), start, probes)

    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(scenario(Path(tmp) / "rights.db"))
