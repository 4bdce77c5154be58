"""The access rules of issue 19 at the pure level: each rule's grant/deny sequences through `Decider.decide`
with an `AccessState` updated by `edge.access_state`, every step checked against the plain reference
(tests/reference.py) with its own state.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from edge.access_state import AccessState, door_contact, on_decision, reset, reset_uses, update
from edge.decision import Decider, Decision, Reason
from edge.model import (
    AntiPassback,
    Area,
    Assignment,
    Credential,
    Door,
    DoorMode,
    DuressMode,
    Group,
    Interlock,
    SiteRules,
    User,
    code_card,
)
from edge.pin import hash_pin

from .reference import RefState, SiteModel, index_of, ref_contact, ref_on_decision, ref_update, reference_decision

T0 = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
PIN_HASH = hash_pin("1234", iterations=1000)
CODE_HASH = hash_pin("9999", iterations=1000)
DELIVERY = code_card("0042")


def rules_site(duress: SiteRules | None = None) -> SiteModel:
    m = SiteModel(ZoneInfo("Europe/Berlin"))
    m.areas = {a.id: a for a in [
        Area(id="building", anti_passback=AntiPassback.HARD, exempt_groups=["security"]),
        Area(id="yard", anti_passback=AntiPassback.SOFT),
        Area(id="lab", anti_passback=AntiPassback.TIMED, timed_s=600, max_occupancy=2),
    ]}  # fmt: skip
    doors = [
        Door(id="main", to_area="building"),
        Door(id="gate", to_area="yard"),
        Door(id="labdoor", to_area="lab"),
        Door(id="vault", two_person_s=10),
        Door(id="clean", escort_group="escorts", visitor_groups=["visitors"], escort_s=30),
        Door(id="ma", strike_s=5),
        Door(id="mb", strike_s=5),
        Door(id="safe", mode=DoorMode.CARD_AND_PIN),
        Door(id="dock"),
    ]
    m.doors = {d.id: d for d in doors}
    every = list(m.doors)
    m.groups = {g.id: g for g in [
        Group(id="staff", doors=every), Group(id="security", doors=every), Group(id="escorts", doors=every),
        Group(id="visitors", doors=["clean"]), Group(id="couriers", doors=["dock"]),
    ]}  # fmt: skip
    m.interlocks = {"trap": Interlock(id="trap", doors=["ma", "mb"])}
    m.site_rules = duress or SiteRules(duress=DuressMode.PIN_PLUS_ONE)
    staff = Assignment(group="staff")
    m.users = {u.id: u for u in [
        User(id="alice", pin_hash=PIN_HASH, assignments=[staff]),
        User(id="bob", assignments=[staff]),
        User(id="carol", assignments=[staff]),
        User(id="sec", assignments=[staff, Assignment(group="security")]),
        User(id="eve", assignments=[Assignment(group="escorts")]),
        User(id="vic", assignments=[Assignment(group="visitors")]),
        User(id="courier", assignments=[Assignment(group="couriers")]),
    ]}  # fmt: skip
    cards = {"alice": 1, "bob": 2, "carol": 3, "sec": 4, "eve": 5, "vic": 6}
    m.credentials = {c: Credential(card=c, user=u) for u, c in cards.items()}
    m.credentials[DELIVERY] = Credential(card=DELIVERY, user="courier", format="keypad_code", max_uses=2)
    return m


class Rig:
    """A Decider with an AccessState beside the reference with its RefState, stepped together."""

    def __init__(self, model: SiteModel | None = None) -> None:
        self.model = model or rules_site()
        self.decider = Decider(index_of(self.model))
        self.state = AccessState()
        self.ref = RefState()
        self.first: dict[str, float] = {}
        self.fails: dict[int, list[float]] = {}

    def tap(self, door: str, card: int, at: float = 0, *, side: str = "in", opened: bool | None = True,
            **kw: Any) -> Decision:  # fmt: skip
        now = T0 + timedelta(seconds=at)
        got = self.decider.decide(door, card, now, state=self.state, side=side, **kw)  # type: ignore[arg-type]
        want = reference_decision(
            self.model, door, card, now, state=self.ref, side=side, first_card_until=self.first,
            pin_failures=self.fails, **{k: v for k, v in kw.items() if k == "pin"},
        )  # fmt: skip
        if got.pin_check is None:
            assert (got.granted, got.reason, got.group, got.alarm, got.duress, got.passage) == (
                want.granted, want.reason, want.group, want.alarm, want.duress, want.passage,
            ), f"decide() {got}\nreference {want}"  # fmt: skip
        ts = now.timestamp()
        on_decision(self.state, got, ts)
        ref_on_decision(self.model, self.ref, want, door, card, now)
        if opened is not None:
            update(self.state, got, opened, ts)
            ref_update(self.model, self.ref, want, card, opened, now)
        for area in self.model.areas:
            assert self.state.occupancy.get(area, 0) == self.ref.occupancy(area), area
        return got

    def contact(self, door: str, is_open: bool, at: float = 0) -> None:
        door_contact(self.state, door, is_open, (T0 + timedelta(seconds=at)).timestamp())
        ref_contact(self.ref, door, is_open)


def reasons(*ds: Decision) -> list[Reason]:
    return [d.reason for d in ds]


# --- anti-passback ------------------------------------------------------------------------------------


def test_hard_anti_passback_denies_a_second_entry_until_the_user_leaves() -> None:
    r = Rig()
    seq = [r.tap("main", 1, 0), r.tap("main", 1, 5), r.tap("main", 1, 10, side="out"), r.tap("main", 1, 15)]
    assert reasons(*seq) == [Reason.GRANTED, Reason.ANTI_PASSBACK, Reason.GRANTED, Reason.GRANTED]
    assert seq[0].passage == (None, "building") and seq[2].passage == ("building", None)
    # leaving twice is passing back too
    assert r.tap("main", 1, 20, side="out").reason is Reason.GRANTED
    assert r.tap("main", 1, 25, side="out").reason is Reason.ANTI_PASSBACK


def test_a_grant_whose_door_never_opened_does_not_move_the_user() -> None:
    r = Rig()
    assert r.tap("main", 1, 0, opened=False).granted
    assert r.tap("main", 1, 5).granted  # still outside: may enter
    assert r.tap("main", 1, 9).reason is Reason.ANTI_PASSBACK


def test_exempt_group_is_not_held_by_anti_passback() -> None:
    r = Rig()
    assert reasons(r.tap("main", 4, 0), r.tap("main", 4, 1)) == [Reason.GRANTED, Reason.GRANTED]


def test_soft_anti_passback_grants_with_an_alarm() -> None:
    r = Rig()
    first, second = r.tap("gate", 1, 0), r.tap("gate", 1, 5)
    assert (first.granted, first.alarm) == (True, None)
    assert (second.granted, second.reason, second.alarm) == (True, Reason.GRANTED, "anti_passback")


def test_timed_anti_passback_refuses_reentry_for_its_time_only() -> None:
    r = Rig()
    got = [r.tap("labdoor", 1, 0), r.tap("labdoor", 1, 599), r.tap("labdoor", 1, 600)]
    assert reasons(*got) == [Reason.GRANTED, Reason.ANTI_PASSBACK, Reason.GRANTED]
    # leaving (out reader) and coming back at once is fine
    r2 = Rig()
    assert reasons(r2.tap("labdoor", 2, 0), r2.tap("labdoor", 2, 5, side="out"), r2.tap("labdoor", 2, 10)) == [
        Reason.GRANTED, Reason.GRANTED, Reason.GRANTED,
    ]  # fmt: skip


def test_reset_forgets_where_users_are() -> None:
    r = Rig()
    r.tap("main", 1, 0)
    r.tap("main", 2, 0)
    assert r.decider.decide("main", 1, T0, state=r.state).reason is Reason.ANTI_PASSBACK
    delta = reset(r.state, user="alice")
    assert delta.users == {"alice"}
    assert r.decider.decide("main", 1, T0, state=r.state).granted
    assert r.decider.decide("main", 2, T0, state=r.state).reason is Reason.ANTI_PASSBACK
    reset(r.state, area="building")
    assert r.decider.decide("main", 2, T0, state=r.state).granted and r.state.occupancy == {}


# --- occupancy ----------------------------------------------------------------------------------------


def test_area_full_until_someone_leaves() -> None:
    r = Rig()
    assert reasons(r.tap("labdoor", 1, 0), r.tap("labdoor", 2, 1), r.tap("labdoor", 3, 2)) == [
        Reason.GRANTED, Reason.GRANTED, Reason.AREA_FULL,
    ]  # fmt: skip
    assert r.state.occupancy == {"lab": 2}
    r.tap("labdoor", 1, 3, side="out")
    assert r.tap("labdoor", 3, 4).granted and r.state.occupancy == {"lab": 2}


def test_occupancy_is_restored_from_the_locations() -> None:
    r = Rig()
    r.tap("labdoor", 1, 0)
    r.tap("main", 2, 0)
    again = AccessState.restore(r.state.where, r.state.used)
    assert again.occupancy == {"lab": 1, "building": 1} == r.state.occupancy


# --- two-person rule, escort --------------------------------------------------------------------------


def test_two_person_rule_needs_a_second_user_within_the_window() -> None:
    r = Rig()
    got = [r.tap("vault", 1, 0), r.tap("vault", 1, 2), r.tap("vault", 2, 11)]
    assert reasons(*got) == [Reason.AWAITING_SECOND_PERSON, Reason.AWAITING_SECOND_PERSON, Reason.GRANTED]
    # the window starts at the first person's last tap; the grant clears it
    assert r.tap("vault", 3, 12).reason is Reason.AWAITING_SECOND_PERSON
    assert r.tap("vault", 1, 23).reason is Reason.AWAITING_SECOND_PERSON  # 11 s after carol: too late
    assert r.tap("vault", 2, 30).granted


def test_escort_must_tap_before_the_visitor() -> None:
    r = Rig()
    got = [r.tap("clean", 6, 0), r.tap("clean", 5, 1), r.tap("clean", 6, 31), r.tap("clean", 6, 32)]
    assert reasons(*got) == [Reason.AWAITING_ESCORT, Reason.GRANTED, Reason.GRANTED, Reason.AWAITING_ESCORT]
    assert got[1].escort and not got[2].escort
    assert r.tap("clean", 1, 40).granted  # staff are no visitors


# --- interlock ----------------------------------------------------------------------------------------


def test_interlock_one_door_at_a_time() -> None:
    r = Rig()
    assert r.tap("ma", 1, 0).interlock == "trap"
    assert r.tap("mb", 2, 1).reason is Reason.INTERLOCK  # ma's strike runs
    r.contact("ma", True, 2)
    assert r.tap("mb", 2, 6).reason is Reason.INTERLOCK  # ma stands open
    r.contact("ma", False, 7)
    assert r.tap("mb", 2, 8).granted
    assert r.tap("ma", 1, 9).reason is Reason.INTERLOCK


def test_interlock_frees_when_the_strike_ends_unopened() -> None:
    r = Rig()
    r.tap("ma", 1, 0, opened=False)
    assert r.tap("mb", 2, 4).reason is Reason.INTERLOCK
    assert r.tap("mb", 2, 5).granted


# --- use-limited credentials --------------------------------------------------------------------------


def test_use_limited_code_counts_opened_grants_only() -> None:
    r = Rig()
    got = [r.tap("dock", DELIVERY, 0), r.tap("dock", DELIVERY, 1, opened=False), r.tap("dock", DELIVERY, 2)]
    assert all(d.granted and d.count_use for d in got)
    assert r.tap("dock", DELIVERY, 3).reason is Reason.USES_EXHAUSTED
    assert r.state.used == {DELIVERY: 2}
    reset_uses(r.state, DELIVERY)
    r.ref.used.clear()
    assert r.tap("dock", DELIVERY, 4).granted


def test_code_card_keeps_leading_zeros() -> None:
    assert code_card("0042") != code_card("42") and code_card("7") == 17


# --- duress -------------------------------------------------------------------------------------------


def test_duress_pin_plus_one_grants_with_the_flag() -> None:
    r = Rig()
    ok, duress, wrong = (
        r.tap("safe", 1, 0, pin="1234"),
        r.tap("safe", 1, 1, pin="1235"),
        r.tap("safe", 1, 2, pin="1236"),
    )
    assert (ok.granted, ok.duress) == (True, False)
    assert (duress.granted, duress.reason, duress.duress) == (True, Reason.GRANTED, True)
    assert (wrong.granted, wrong.reason, wrong.duress) == (False, Reason.PIN_WRONG, False)


def test_duress_last_digit_nine_wraps_to_zero() -> None:
    m = rules_site()
    m.users["alice"] = User(
        id="alice", pin_hash=hash_pin("5559", iterations=1000), assignments=[Assignment(group="staff")]
    )
    r = Rig(m)
    assert r.tap("safe", 1, 0, pin="5550").duress


def test_duress_code_of_the_site() -> None:
    r = Rig(rules_site(SiteRules(duress=DuressMode.CODE, duress_code_hash=CODE_HASH)))
    d = r.tap("safe", 1, 0, pin="9999")
    assert (d.granted, d.duress) == (True, True)
    assert not r.tap("safe", 1, 1, pin="1235").granted


def test_duress_with_the_pin_checked_off_the_loop() -> None:
    r = Rig()
    first = r.decider.decide("safe", 1, T0, pin="1235", defer_pin=True, state=r.state)
    assert first.pin_check == PIN_HASH and first.duress_check == ("1234", PIN_HASH)
    # the caller verifies both hashes (the tap handler: on its PIN thread) and decides again
    again = r.decider.decide("safe", 1, T0, pin="1235", defer_pin=True, state=r.state,
                             pin_verified=(PIN_HASH, False), duress_verified=("1234", PIN_HASH, True))  # fmt: skip
    assert (again.granted, again.duress, again.pin_check) == (True, True, None)
    plain = r.decider.decide("safe", 1, T0, pin="1234", defer_pin=True, pin_verified=(PIN_HASH, True))
    assert (plain.granted, plain.duress) == (True, False)


def test_duress_is_flagged_even_when_a_rule_then_denies() -> None:
    m = rules_site()
    m.doors["safe"] = Door(id="safe", mode=DoorMode.CARD_AND_PIN, two_person_s=10)
    r = Rig(m)
    d = r.tap("safe", 1, 0, pin="1235")
    assert (d.reason, d.duress) == (Reason.AWAITING_SECOND_PERSON, True)


def test_without_state_the_rules_read_an_empty_state() -> None:
    r = Rig()
    assert r.decider.decide("main", 1, T0).granted
    assert r.decider.decide("vault", 1, T0).reason is Reason.AWAITING_SECOND_PERSON


def test_due_resets_at_local_time_across_dst() -> None:
    from edge.access_state import due_resets

    berlin = ZoneInfo("Europe/Berlin")
    resets = [("building", "03:00"), ("lab", "02:30"), ("yard", "24:00")]
    # 2026-03-29: Berlin springs forward at 02:00 -> 03:00 (02:30 never happens on the wall clock)
    before = datetime(2026, 3, 28, 23, 0, tzinfo=UTC)  # 00:00 local
    after = datetime(2026, 3, 29, 2, 0, tzinfo=UTC)  # 04:00 local (CEST)
    assert sorted(due_resets(resets, berlin, before, after)) == ["building", "lab"]
    assert due_resets(resets, berlin, after, after) == []
    # a day's span covers each area once; 24:00 is the next midnight
    day = (datetime(2026, 6, 1, 12, tzinfo=UTC), datetime(2026, 6, 2, 12, tzinfo=UTC))
    assert sorted(due_resets(resets, berlin, *day)) == ["building", "lab", "yard"]
    # just before and just at the instant
    at = datetime(2026, 6, 2, 1, 0, tzinfo=UTC)  # 03:00 CEST
    assert due_resets([("building", "03:00")], berlin, at - timedelta(seconds=1), at) == ["building"]
    assert due_resets([("building", "03:00")], berlin, at, at + timedelta(hours=23)) == []
