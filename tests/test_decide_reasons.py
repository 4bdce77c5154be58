"""Every deny (and grant) reason of `Decider.decide()` produced on purpose, plus the stateful rules:
PIN lockout, first-card unlock, lockdown, the offline and time policies, extended door time.

Each case is also run through the plain reference (tests/reference.py), which must agree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from edge.decision import Decider, Decision, OfflinePolicy, Reason, SitePolicy, TimePolicy
from edge.model import (
    Assignment,
    Credential,
    CredentialStatus,
    Door,
    DoorMode,
    Group,
    Interval,
    Schedule,
    User,
)
from edge.pin import hash_pin

from .reference import SiteModel, index_of, reference_decision
from .test_rules import DELIVERY, Rig

BERLIN = ZoneInfo("Europe/Berlin")
MONDAY_10 = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)  # Monday 11:00 in Berlin
MONDAY_EVENING = datetime(2026, 11, 23, 19, 0, tzinfo=UTC)  # Monday 20:00 in Berlin
OFFICE_END = datetime(2026, 11, 23, 17, 0, tzinfo=UTC)  # Monday 18:00 in Berlin
PAST = datetime(2026, 1, 1, tzinfo=UTC)
FUTURE = datetime(2027, 1, 1, tzinfo=UTC)
PIN = "1234"
PIN_HASH = hash_pin(PIN, iterations=1000)


def site() -> SiteModel:
    office = Schedule(id="office", intervals=[Interval(day=d, start="08:00", end="18:00") for d in range(5)])
    m = SiteModel(BERLIN)
    m.schedules = {"office": office}
    doors = [
        Door(id="front"),
        Door(id="lab", strike_s=4.0, extended_strike_s=12.0),
        Door(id="server"),
        Door(id="vault", mode=DoorMode.CARD_AND_PIN),
        Door(id="pinday", mode=DoorMode.CARD_AND_PIN, pin_schedule="office"),
        Door(id="lobby", mode=DoorMode.UNLOCKED, unlock_schedule="office"),
        Door(id="gate", mode=DoorMode.UNLOCKED),
        Door(id="store", mode=DoorMode.LOCKED),
        Door(id="bunker", mode=DoorMode.LOCKDOWN),
        Door(id="cafe", mode=DoorMode.FIRST_CARD, unlock_schedule="office"),
    ]
    m.doors = {d.id: d for d in doors}
    everywhere = ["front", "lab", "vault", "pinday", "lobby", "gate", "store", "bunker", "cafe"]
    groups = [
        Group(id="staff", doors=everywhere, schedule="office"),
        Group(id="allhours", doors=everywhere),
        Group(id="security", doors=["front", "bunker", "lab"]),
        Group(id="it", doors=["server"]),
    ]
    m.groups = {g.id: g for g in groups}
    staff, allhours = Assignment(group="staff"), Assignment(group="allhours")
    users = [
        User(id="alice", pin_hash=PIN_HASH, assignments=[staff]),
        User(id="bob", offline_access=True, extended_door_time=True, assignments=[allhours]),
        User(id="carol", active=False, assignments=[allhours]),
        User(id="dave", valid_from=FUTURE, assignments=[allhours]),
        User(id="erin", valid_until=PAST, assignments=[allhours]),
        User(id="frank", assignments=[Assignment(group="allhours", valid_until=PAST)]),
        User(id="gina", assignments=[allhours]),  # no PIN enrolled
        User(id="sam", emergency=True, assignments=[Assignment(group="security")]),
        User(id="tom", pin_hash=PIN_HASH, assignments=[allhours, Assignment(group="security")]),
    ]
    m.users = {u.id: u for u in users}
    creds = [
        Credential(card=1, user="alice"),
        Credential(card=2, user="bob"),
        Credential(card=3, user="carol"),
        Credential(card=4, user="dave"),
        Credential(card=5, user="erin"),
        Credential(card=6, user="frank"),
        Credential(card=7, user="gina"),
        Credential(card=8, user="sam"),
        Credential(card=9, user="tom"),
        Credential(card=11, user="alice", status=CredentialStatus.SUSPENDED),
        Credential(card=12, user="alice", status=CredentialStatus.LOST),
        Credential(card=13, user="alice", status=CredentialStatus.REVOKED),
        Credential(card=14, user="bob", valid_from=FUTURE),
        Credential(card=15, user="bob", valid_until=PAST),
        Credential(card=16, user="alice", format="h10301", facility=42),
    ]
    m.credentials = {c.card: c for c in creds}
    return m


@dataclass
class Harness:
    """A Decider over the site plus the reference, with mirrored runtime state."""

    model: SiteModel
    decider: Decider
    first_card: dict[str, float]
    pin_fail: dict[int, list[float]]

    def tap(self, door: str, card: int, now: datetime = MONDAY_10, **kw: Any) -> Decision:
        got = self.decider.decide(door, card, now, **kw)
        want = reference_decision(
            self.model, door, card, now, policy=self.decider.policy, mode_override=self.decider.mode_override,
            lockdown=self.decider.lockdown, first_card_until=self.first_card, pin_failures=self.pin_fail, **kw,
        )  # fmt: skip
        assert (got.granted, got.reason, got.group, got.alarm) == (
            want.granted, want.reason, want.group, want.alarm,
        ), f"decide() and the reference disagree: {got} vs {want}"  # fmt: skip
        assert got.granted == (got.reason in (Reason.GRANTED, Reason.FREE_PASSAGE, Reason.FIRST_CARD_UNLOCK))
        return got


def harness(policy: SitePolicy | None = None) -> Harness:
    m = site()
    return Harness(m, Decider(index_of(m), policy), {}, {})


# --- one case per Reason -------------------------------------------------------------------------------

Case = Callable[[], Decision]


def _pin_locked_out() -> Decision:
    h = harness(SitePolicy(pin_max_attempts=1))
    h.tap("vault", 1, pin="0000")
    return h.tap("vault", 1, pin=PIN)


def _uses_exhausted() -> Decision:
    r = Rig()
    r.tap("dock", DELIVERY, 0)
    r.tap("dock", DELIVERY, 1)
    return r.tap("dock", DELIVERY, 2)


def _interlock() -> Decision:
    r = Rig()
    r.tap("ma", 1, 0)
    return r.tap("mb", 2, 1)


def _anti_passback() -> Decision:
    r = Rig()
    r.tap("main", 1, 0)
    return r.tap("main", 1, 1)


def _area_full() -> Decision:
    r = Rig()
    r.tap("labdoor", 1, 0)
    r.tap("labdoor", 2, 0)
    return r.tap("labdoor", 3, 0)


CASES: dict[Reason, Case] = {
    Reason.GRANTED: lambda: harness().tap("front", 1),
    Reason.FREE_PASSAGE: lambda: harness().tap("lobby", 999),
    Reason.FIRST_CARD_UNLOCK: lambda: harness().tap("cafe", 1),
    Reason.UNKNOWN_DOOR: lambda: harness().tap("attic", 1),
    Reason.UNKNOWN_CARD: lambda: harness().tap("front", 999),
    Reason.WRONG_FACILITY: lambda: harness().tap("front", 16, facility=41),
    Reason.CREDENTIAL_SUSPENDED: lambda: harness().tap("front", 11),
    Reason.CREDENTIAL_LOST: lambda: harness().tap("front", 12),
    Reason.CREDENTIAL_REVOKED: lambda: harness().tap("front", 13),
    Reason.CREDENTIAL_NOT_YET_VALID: lambda: harness().tap("front", 14),
    Reason.CREDENTIAL_EXPIRED: lambda: harness().tap("front", 15),
    Reason.USER_INACTIVE: lambda: harness().tap("front", 3),
    Reason.USER_NOT_YET_VALID: lambda: harness().tap("front", 4),
    Reason.USER_EXPIRED: lambda: harness().tap("front", 5),
    Reason.CLOCK_NOT_TRUSTED: lambda: harness().tap("front", 1, clock_trusted=False),
    Reason.RIGHTS_TOO_OLD: lambda: harness(SitePolicy(max_offline_age_s=3600)).tap("front", 1, rights_age_s=3601),
    Reason.OFFLINE_NOT_PERMITTED: lambda: harness().tap("front", 1, link_online=False),
    Reason.NO_GROUP_FOR_DOOR: lambda: harness().tap("server", 1),
    Reason.DOOR_LOCKDOWN: lambda: harness().tap("bunker", 2),
    Reason.ASSIGNMENT_NOT_ACTIVE: lambda: harness().tap("front", 6),
    Reason.OUTSIDE_SCHEDULE: lambda: harness().tap("front", 1, MONDAY_EVENING),
    Reason.DOOR_LOCKED: lambda: harness().tap("store", 2),
    Reason.PIN_LOCKED_OUT: _pin_locked_out,
    Reason.PIN_REQUIRED: lambda: harness().tap("vault", 1),
    Reason.PIN_NOT_ENROLLED: lambda: harness().tap("vault", 7, pin=PIN),
    Reason.PIN_WRONG: lambda: harness().tap("vault", 1, pin="4321"),
    Reason.USES_EXHAUSTED: _uses_exhausted,
    Reason.INTERLOCK: _interlock,
    Reason.ANTI_PASSBACK: _anti_passback,
    Reason.AREA_FULL: _area_full,
    Reason.AWAITING_ESCORT: lambda: Rig().tap("clean", 6, 0),
    Reason.AWAITING_SECOND_PERSON: lambda: Rig().tap("vault", 1, 0),
}


@pytest.mark.parametrize("reason", list(Reason), ids=str)
def test_each_reason_is_produced(reason: Reason) -> None:
    assert reason in CASES, f"no test produces Reason.{reason.name}"
    d = CASES[reason]()
    assert d.reason is reason


def test_every_reason_is_covered() -> None:
    assert set(CASES) == set(Reason), f"uncovered: {sorted(set(Reason) - set(CASES))}"


def test_grant_names_user_group_and_strike() -> None:
    d = harness().tap("lab", 1)
    assert (d.granted, d.user, d.group, d.strike_s, d.uid is not None) == (True, "alice", "staff", 4.0, True)
    denied = harness().tap("front", 1, MONDAY_EVENING)
    assert (denied.strike_s, denied.user, denied.unlock_until) == (0.0, "alice", None)


def test_group_reported_is_the_first_assignment_that_grants() -> None:
    h = harness()
    assert h.tap("front", 9).group == "allhours"  # tom: [allhours, security], both open "front"
    assert h.tap("bunker", 9).reason is Reason.DOOR_LOCKDOWN


# --- PIN lockout ---------------------------------------------------------------------------------------


def test_pin_lockout_after_three_wrong_pins_then_expires() -> None:
    h = harness(SitePolicy(pin_max_attempts=3, pin_lockout_s=300))
    t = MONDAY_10
    first = h.tap("vault", 1, t, pin="1111")
    second = h.tap("vault", 1, t + timedelta(seconds=5), pin="2222")
    assert (first.reason, first.alarm, second.reason, second.alarm) == (
        Reason.PIN_WRONG, None, Reason.PIN_WRONG, None,
    )  # fmt: skip
    third = h.tap("vault", 1, t + timedelta(seconds=10), pin="3333")
    assert (third.reason, third.alarm, third.granted) == (Reason.PIN_WRONG, "pin_lockout", False)
    locked_at = t + timedelta(seconds=10)
    # Locked out even with the right PIN, on every card-and-PIN door, until pin_lockout_s has passed.
    assert h.tap("vault", 1, locked_at + timedelta(seconds=1), pin=PIN).reason is Reason.PIN_LOCKED_OUT
    assert h.tap("pinday", 1, locked_at + timedelta(seconds=299), pin=PIN).reason is Reason.PIN_LOCKED_OUT
    # A door without PIN is not affected.
    assert h.tap("front", 1, locked_at + timedelta(seconds=2)).granted
    # Another card is not affected.
    assert h.tap("vault", 9, locked_at + timedelta(seconds=2), pin=PIN).granted
    ok = h.tap("vault", 1, locked_at + timedelta(seconds=300), pin=PIN)
    assert (ok.granted, ok.reason) == (True, Reason.GRANTED)


def test_right_pin_resets_the_count_of_wrong_ones() -> None:
    h = harness(SitePolicy(pin_max_attempts=3))
    for k in range(2):
        assert h.tap("vault", 1, MONDAY_10 + timedelta(seconds=k), pin="0000").alarm is None
    assert h.tap("vault", 1, MONDAY_10 + timedelta(seconds=3), pin=PIN).granted
    for k in range(2):  # two more wrong ones: not yet the third in a row
        assert h.tap("vault", 1, MONDAY_10 + timedelta(seconds=4 + k), pin="0000").alarm is None
    assert h.tap("vault", 1, MONDAY_10 + timedelta(seconds=9), pin=PIN).granted


def test_pin_asked_only_while_pin_schedule_runs() -> None:
    h = harness()
    assert h.tap("pinday", 1).reason is Reason.PIN_REQUIRED  # Monday 11:00
    assert h.tap("pinday", 2, MONDAY_EVENING).reason is Reason.GRANTED  # card only at 20:00 (bob: all hours)
    assert h.tap("pinday", 2).reason is Reason.PIN_REQUIRED


# --- first-card unlock ------------------------------------------------------------------------------


def test_first_card_unlock_lasts_until_the_schedule_window_ends() -> None:
    h = harness()
    early = datetime(2026, 11, 23, 6, 30, tzinfo=UTC)  # 07:30 Berlin: before the office window
    assert h.tap("cafe", 2, early).reason is Reason.GRANTED  # normal outside the schedule
    assert h.tap("cafe", 999, early).reason is Reason.UNKNOWN_CARD
    # An invalid tap in the window does not unlock.
    assert h.tap("cafe", 3).reason is Reason.USER_INACTIVE
    first = h.tap("cafe", 1)
    assert (first.granted, first.reason, first.unlock_until) == (
        True, Reason.FIRST_CARD_UNLOCK, OFFICE_END.timestamp(),
    )  # fmt: skip
    assert first.strike_s == 5.0
    later = h.tap("cafe", 999, OFFICE_END - timedelta(seconds=1))
    assert (later.granted, later.reason) == (True, Reason.FREE_PASSAGE)
    after = h.tap("cafe", 999, OFFICE_END)
    assert (after.granted, after.reason) == (False, Reason.UNKNOWN_CARD)
    assert h.tap("cafe", 2, OFFICE_END).reason is Reason.GRANTED


def test_first_card_unlock_ends_when_the_mode_is_overridden() -> None:
    h = harness()
    assert h.tap("cafe", 1).reason is Reason.FIRST_CARD_UNLOCK
    h.decider.set_door_mode("cafe", DoorMode.LOCKED)
    h.first_card.pop("cafe", None)
    assert h.tap("cafe", 999).reason is Reason.DOOR_LOCKED
    h.decider.set_door_mode("cafe", None)
    assert h.tap("cafe", 999).reason is Reason.UNKNOWN_CARD  # the unlock did not survive the override


# --- lockdown -------------------------------------------------------------------------------------


def test_lockdown_without_override_group_refuses_everyone() -> None:
    h = harness()
    h.decider.lockdown = True
    for door, card in [("front", 1), ("front", 8), ("lobby", 999), ("gate", 999), ("cafe", 1), ("lab", 2)]:
        d = h.tap(door, card)
        assert (d.granted, d.reason) == (False, Reason.DOOR_LOCKDOWN), (door, card)


def test_lockdown_with_override_group_admits_only_that_group() -> None:
    h = harness(SitePolicy(lockdown_override_group="security"))
    h.decider.lockdown = True
    ok = h.tap("front", 8)
    assert (ok.granted, ok.group) == (True, "security")
    assert h.tap("front", 1).reason is Reason.DOOR_LOCKDOWN  # staff only
    assert h.tap("front", 9).group == "security"  # tom: allhours first, but only security counts now
    assert h.tap("vault", 9).reason is Reason.DOOR_LOCKDOWN  # security does not open the vault
    assert h.tap("gate", 999).reason is Reason.UNKNOWN_CARD  # no free passage in lockdown
    assert h.tap("gate", 8).reason is Reason.NO_GROUP_FOR_DOOR  # security does not open the gate
    assert h.tap("front", 999).reason is Reason.UNKNOWN_CARD
    h.decider.lockdown = False
    assert h.tap("front", 1).granted


def test_lockdown_door_mode_admits_only_the_override_group() -> None:
    h = harness(SitePolicy(lockdown_override_group="security"))
    assert h.tap("bunker", 8).granted
    assert h.tap("bunker", 2).reason is Reason.DOOR_LOCKDOWN
    assert harness().tap("bunker", 8).reason is Reason.DOOR_LOCKDOWN


def test_lockdown_with_an_unknown_override_group_admits_nobody() -> None:
    """Regression: an override group id that is not in the index (typo, deleted group, index reopened)
    must not turn the lockdown into "every group may pass"."""
    override = "no-such-group"
    h = harness(SitePolicy(lockdown_override_group=override))
    h.decider.lockdown = True
    for card in (1, 2, 8, 9):
        d = h.decider.decide("front", card, MONDAY_10)
        assert not d.granted, f"lockdown with unknown override group {override!r} admitted card {card}: {d}"
        assert d.reason is Reason.DOOR_LOCKDOWN


# --- offline policy -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "alice", "bob"),
    [(OfflinePolicy.ALL, True, True), (OfflinePolicy.FLAGGED, False, True), (OfflinePolicy.NOBODY, False, False)],
)
def test_offline_policy_after_the_grace(policy: OfflinePolicy, alice: bool, bob: bool) -> None:
    h = harness(SitePolicy(offline_policy=policy, offline_grace_s=300))
    since = MONDAY_10 - timedelta(seconds=300)
    for card, expect in ((1, alice), (2, bob)):
        d = h.tap("front", card, link_online=False, offline_since=since)
        assert d.granted is expect, (policy, card, d)
        if not expect:
            assert d.reason is Reason.OFFLINE_NOT_PERMITTED
        # within the grace everyone keeps their rights
        inside = h.tap("front", card, link_online=False, offline_since=since + timedelta(seconds=1))
        assert inside.granted
        # unknown start of the outage counts as past the grace
        assert h.tap("front", card, link_online=False).granted is expect


def test_offline_policy_does_not_widen_rights() -> None:
    h = harness(SitePolicy(offline_policy=OfflinePolicy.ALL))
    assert h.tap("front", 1, MONDAY_EVENING, link_online=False).reason is Reason.OUTSIDE_SCHEDULE
    assert h.tap("front", 3, link_online=False).reason is Reason.USER_INACTIVE


# --- time policy and rights age -----------------------------------------------------------------------


def test_time_policy_always_only() -> None:
    h = harness(SitePolicy(time_policy=TimePolicy.ALWAYS_ONLY))
    assert h.tap("front", 2, clock_trusted=False).granted  # bob: unbounded, schedule-less group
    assert h.tap("front", 1, clock_trusted=False).reason is Reason.CLOCK_NOT_TRUSTED  # office hours
    assert h.tap("front", 6, clock_trusted=False).reason is Reason.CLOCK_NOT_TRUSTED  # bounded assignment
    assert h.tap("server", 2, clock_trusted=False).reason is Reason.NO_GROUP_FOR_DOOR


def test_time_policy_ignore_schedules() -> None:
    h = harness(SitePolicy(time_policy=TimePolicy.IGNORE_SCHEDULES))
    assert h.tap("front", 1, MONDAY_EVENING, clock_trusted=False).granted  # group schedule counts as open
    # A window with an end may have ended: it never grants while the clock is not trusted.
    assert h.tap("front", 6, clock_trusted=False).reason is Reason.CLOCK_NOT_TRUSTED  # assignment with an end
    assert h.tap("front", 5, clock_trusted=False).reason is Reason.CLOCK_NOT_TRUSTED  # user with an end
    assert h.tap("front", 15, clock_trusted=False).reason is Reason.CLOCK_NOT_TRUSTED  # credential with an end
    # Window starts are still checked on the best estimate of now.
    assert h.tap("front", 14, clock_trusted=False).reason is Reason.CREDENTIAL_NOT_YET_VALID
    assert h.tap("front", 4, clock_trusted=False).reason is Reason.USER_NOT_YET_VALID
    assert h.tap("front", 11, clock_trusted=False).reason is Reason.CREDENTIAL_SUSPENDED
    assert h.tap("front", 3, clock_trusted=False).reason is Reason.USER_INACTIVE


def test_ignore_schedules_assignment_reasons() -> None:
    m = site()
    m.users["zoe"] = User(
        id="zoe",
        assignments=[
            Assignment(group="allhours", valid_from=FUTURE),  # not started
            Assignment(group="staff", valid_from=PAST, valid_until=FUTURE),  # started, has an end
        ],
    )
    m.users["yan"] = User(id="yan", assignments=[Assignment(group="allhours", valid_from=FUTURE)])
    m.credentials[30] = Credential(card=30, user="zoe")
    m.credentials[31] = Credential(card=31, user="yan")
    h = Harness(m, Decider(index_of(m), SitePolicy(time_policy=TimePolicy.IGNORE_SCHEDULES)), {}, {})
    assert h.tap("front", 30, clock_trusted=False).reason is Reason.CLOCK_NOT_TRUSTED
    assert h.tap("front", 31, clock_trusted=False).reason is Reason.ASSIGNMENT_NOT_ACTIVE
    assert h.tap("front", 30).granted  # trusted clock: the staff assignment is in its window


def test_door_schedules_do_not_run_while_the_clock_is_not_trusted() -> None:
    h = harness(SitePolicy(time_policy=TimePolicy.IGNORE_SCHEDULES))
    # A scheduled UNLOCKED door is a card door; an unscheduled one stays free.
    assert h.tap("lobby", 999, clock_trusted=False).reason is Reason.UNKNOWN_CARD
    assert h.tap("gate", 999, clock_trusted=False).reason is Reason.FREE_PASSAGE
    # A card + PIN door asks for the PIN whatever its PIN schedule says.
    assert h.tap("pinday", 2, MONDAY_EVENING, clock_trusted=False).reason is Reason.PIN_REQUIRED
    # A first-card door does not unlock, and an unlock already running does not hold.
    assert h.tap("cafe", 1, clock_trusted=False).reason is Reason.GRANTED
    assert h.tap("cafe", 1).reason is Reason.FIRST_CARD_UNLOCK
    assert h.tap("cafe", 999, MONDAY_10 + timedelta(minutes=1), clock_trusted=False).reason is Reason.UNKNOWN_CARD
    assert h.tap("cafe", 999, MONDAY_10 + timedelta(minutes=2)).reason is Reason.FREE_PASSAGE


def test_time_policy_emergency_only() -> None:
    h = harness(SitePolicy(time_policy=TimePolicy.EMERGENCY_ONLY))
    assert h.tap("front", 8, MONDAY_EVENING, clock_trusted=False).granted  # sam: emergency card
    assert h.tap("front", 2, clock_trusted=False).reason is Reason.CLOCK_NOT_TRUSTED
    assert h.tap("front", 2).granted  # trusted clock: normal rules


def test_clock_policy_comes_after_credential_and_user_checks() -> None:
    """docs/model.md and edge/decision.py: status, window, user, *then* the clock (step 5).

    Regression: under TimePolicy.EMERGENCY_ONLY a non-emergency card was refused with CLOCK_NOT_TRUSTED
    before its status and its user were looked at.
    """
    d = Decider(index_of(site()), SitePolicy(time_policy=TimePolicy.EMERGENCY_ONLY))
    got = [d.decide("front", card, MONDAY_10, clock_trusted=False).reason for card in (11, 3, 15)]
    assert got == [Reason.CREDENTIAL_SUSPENDED, Reason.USER_INACTIVE, Reason.CREDENTIAL_EXPIRED], (
        f"documented order of checks violated under EMERGENCY_ONLY: got {got}"
    )


def test_rights_too_old_spares_emergency_cards() -> None:
    h = harness(SitePolicy(max_offline_age_s=3600))
    assert h.tap("front", 1, rights_age_s=3600).granted
    assert h.tap("front", 1, rights_age_s=3601).reason is Reason.RIGHTS_TOO_OLD
    assert h.tap("front", 8, rights_age_s=10**6).granted
    assert harness().tap("front", 1, rights_age_s=10**9).granted  # no maximum configured


# --- strike time, windows, modes ------------------------------------------------------------------------


def test_extended_door_time_strike() -> None:
    h = harness()
    assert h.tap("lab", 2).strike_s == 12.0  # bob has extended_door_time
    assert h.tap("lab", 1).strike_s == 4.0
    assert h.tap("front", 2).strike_s == 15.0  # the door defaults
    assert h.tap("front", 1).strike_s == 5.0


def test_windows_are_half_open_on_whole_seconds() -> None:
    start = datetime(2026, 11, 23, 9, 0, 0, 700_000, tzinfo=UTC)  # .7 s is dropped: opens at 09:00:00
    end = datetime(2026, 11, 23, 11, 0, tzinfo=UTC)
    m = site()
    m.credentials[20] = Credential(card=20, user="bob", valid_from=start, valid_until=end)
    h = Harness(m, Decider(index_of(m)), {}, {})
    second = timedelta(seconds=1)
    at = start.replace(microsecond=0)
    assert h.tap("front", 20, at - second).reason is Reason.CREDENTIAL_NOT_YET_VALID
    assert h.tap("front", 20, at - timedelta(microseconds=1)).reason is Reason.CREDENTIAL_NOT_YET_VALID
    assert h.tap("front", 20, at).granted
    assert h.tap("front", 20, end - timedelta(microseconds=1)).granted
    assert h.tap("front", 20, end).reason is Reason.CREDENTIAL_EXPIRED


def test_unlocked_mode_follows_its_schedule() -> None:
    h = harness()
    assert h.tap("lobby", 999).reason is Reason.FREE_PASSAGE
    assert h.tap("lobby", 999, MONDAY_EVENING).reason is Reason.UNKNOWN_CARD
    assert h.tap("lobby", 2, MONDAY_EVENING).reason is Reason.GRANTED
    assert h.tap("gate", 999, MONDAY_EVENING).reason is Reason.FREE_PASSAGE  # no schedule: always


def test_mode_override_and_restore() -> None:
    h = harness()
    h.decider.set_door_mode("front", DoorMode.LOCKED)
    assert h.tap("front", 1).reason is Reason.DOOR_LOCKED
    h.decider.set_door_mode("front", DoorMode.UNLOCKED)
    assert h.tap("front", 999).reason is Reason.FREE_PASSAGE
    h.decider.set_door_mode("front", None)
    assert h.tap("front", 999).reason is Reason.UNKNOWN_CARD


def test_facility_code_is_checked_when_the_credential_has_one() -> None:
    h = harness()
    assert h.tap("front", 16, facility=42).granted
    assert h.tap("front", 16, facility=41).reason is Reason.WRONG_FACILITY
    assert h.tap("front", 16).reason is Reason.WRONG_FACILITY  # a CSN read of the same number
    assert h.tap("front", 1, facility=7).granted  # no facility on the credential: any
