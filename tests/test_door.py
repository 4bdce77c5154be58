"""Door controller on gpiozero's MockFactory, driven edge by edge; the pure core with explicit times;
hardware profiles.

Pins (as in hw/sim.toml, door1): relay 17, contact 22 (LOW = closed, pulled up), REX 23 (LOW = pressed,
pulled up), LED 12, beeper 13. Times are tens of milliseconds; waits are several times longer than the
timer they wait for, and nothing asserts how long anything took.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from gpiozero.pins.mock import MockFactory

from edge.door import Debouncer, DoorController, DoorLockdownError, DoorLogic
from edge.errors import ConfigError
from edge.events import (
    DOOR_FORCED_OPEN,
    DOOR_HELD_OPEN,
    DOOR_HELD_OPEN_PREALARM,
    DOOR_REX,
    DOOR_STATE,
    Detail,
)
from edge.hw import DoorIO, decode_profile, load_profile, make_factory
from edge.model import Door, DoorMode
from edge.readers.base import Feedback

RELAY, CONTACT, REX, LED, BEEPER = 17, 22, 23, 12, 13
DEBOUNCE = 0.02
SETTLE = 0.12  # comfortably past the debounce window


class Journal:
    def __init__(self) -> None:
        self.events: list[tuple[str, str | None, Detail]] = []

    def __call__(self, type: str, *, door: str | None = None, detail: Detail | None = None, **_: Any) -> None:
        self.events.append((type, door, dict(detail or {})))

    def of(self, type: str) -> list[Detail]:
        return [d for t, _, d in self.events if t == type]

    def lock_changes(self) -> list[tuple[str, str]]:
        return [(str(d["lock"]), str(d["cause"])) for d in self.of(DOOR_STATE) if "lock" in d]

    def contact_changes(self) -> list[str]:
        return [str(d["contact"]) for d in self.of(DOOR_STATE) if "contact" in d]

    def clear(self) -> None:
        self.events.clear()


def make_door(**kw: Any) -> Door:
    base: dict[str, Any] = {"id": "door1", "strike_s": 0.15, "extended_strike_s": 0.6, "held_open_s": 0.3}
    base.update(kw)
    return Door(**base)


def make_io(**kw: Any) -> DoorIO:
    base: dict[str, Any] = {
        "door": "door1",
        "relay_pin": RELAY,
        "contact_pin": CONTACT,
        "rex_pin": REX,
        "led_pin": LED,
        "beeper_pin": BEEPER,
        "debounce_s": DEBOUNCE,
        "prealarm_fraction": 0.5,
        "rex_window_s": 2.0,
    }
    base.update(kw)
    return DoorIO(**base)


def levels(pin: Any) -> list[bool]:
    return [bool(s.state) for s in pin.states]


@pytest.fixture
def factory() -> MockFactory:
    return MockFactory()


@pytest.fixture
def journal() -> Journal:
    return Journal()


async def close_and_settle(ctl: DoorController, factory: MockFactory, journal: Journal) -> DoorController:
    """After start: the door closed (settled) and the journal emptied."""
    factory.pin(CONTACT).drive_low()  # the pull-up reads "open" until the closed contact pulls it low
    await asyncio.sleep(SETTLE)
    assert ctl.is_open is False
    journal.clear()
    return ctl


@pytest.fixture
async def door(factory: MockFactory, journal: Journal) -> AsyncIterator[DoorController]:
    ctl = DoorController(make_door(), make_io(), factory=factory, emit=journal)
    await ctl.__aenter__()
    await close_and_settle(ctl, factory, journal)
    try:
        yield ctl
    finally:
        await ctl.__aexit__(None, None, None)


# --- boot and stop ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lock_type", "active_high", "locked_level"),
    [
        ("fail_secure", True, False),  # strike: locked = de-energised; active-high driver: LOW
        ("fail_secure", False, True),  # de-energised with a low-level-trigger board: HIGH
        ("fail_safe", True, True),  # maglock: locked = energised: HIGH
        ("fail_safe", False, False),
    ],
)
async def test_boot_drives_safe_state_first(
    factory: MockFactory, journal: Journal, lock_type: str, active_high: bool, locked_level: bool
) -> None:
    seen_at_first_event: list[bool] = []

    def emit(type: str, **kw: Any) -> None:
        if not seen_at_first_event:
            seen_at_first_event.append(bool(factory.pin(RELAY).state))
        journal(type, **kw)

    io = make_io(lock_type=lock_type, relay_active_high=active_high)
    async with DoorController(make_door(), io, factory=factory, emit=emit) as ctl:
        relay = factory.pin(RELAY)
        # The relay was the first pin the controller claimed...
        assert next(iter(factory.pins.values())).info.name == f"GPIO{RELAY}"
        assert relay.function == "output"
        # ...and since it became an output it has only ever been at the locked level.
        assert levels(relay)[-1] == locked_level
        assert all(level == locked_level for level in levels(relay)[1:])
        assert seen_at_first_event == [locked_level]
        assert ctl.locked
        assert journal.lock_changes()[0] == ("locked", "start")


def test_door_io_is_strict() -> None:
    # `check_boot_pulls` is a profile-level switch, not a DoorIO field.
    with pytest.raises(TypeError):
        make_io(check_boot_pulls=False)


@pytest.mark.parametrize("raise_inside", [False, True])
@pytest.mark.parametrize(
    ("lock_type", "active_high", "stop_level", "stop_lock"),
    [
        ("fail_secure", True, False, "locked"),
        ("fail_secure", False, True, "locked"),
        ("fail_safe", True, False, "unlocked"),
        ("fail_safe", False, True, "unlocked"),
    ],
)
async def test_stop_state(
    factory: MockFactory,
    journal: Journal,
    lock_type: str,
    active_high: bool,
    stop_level: bool,
    stop_lock: str,
    raise_inside: bool,
) -> None:
    io = make_io(lock_type=lock_type, relay_active_high=active_high)
    ctl = DoorController(make_door(), io, factory=factory, emit=journal)
    relay = factory.pin(RELAY)
    with pytest.raises(RuntimeError) if raise_inside else contextlib.nullcontext():
        async with ctl:
            ctl.grant(5.0)  # stop in the middle of a strike
            # Unlocked: energised for a strike, released for a maglock.
            assert bool(relay.state) == (active_high if lock_type == "fail_secure" else not active_high)
            if raise_inside:
                raise RuntimeError("boom")
    # De-energised, explicitly: the level that releases the coil for this driver.
    assert bool(relay.state) == stop_level
    assert levels(relay)[-1] == stop_level
    assert journal.lock_changes()[-1] == (stop_lock, "stop")
    # Pins were released: the same pins can be claimed again (a restart).
    async with DoorController(make_door(), io, factory=factory, emit=journal) as again:
        assert again.locked


async def test_fail_safe_maglock_energised_while_locked(factory: MockFactory, journal: Journal) -> None:
    io = make_io(lock_type="fail_safe")
    async with DoorController(make_door(), io, factory=factory, emit=journal) as ctl:
        relay = factory.pin(RELAY)
        assert relay.state  # locked = energised
        ctl.grant(0.05)
        assert not relay.state  # unlocked = released
        await asyncio.sleep(0.25)
        assert relay.state
    assert not relay.state  # stopped: released (fail-safe)


def test_wiring_of_another_door_is_refused(factory: MockFactory, journal: Journal) -> None:
    with pytest.raises(ConfigError, match="door2"):
        DoorController(make_door(), make_io(door="door2"), factory=factory, emit=journal)


# --- grant and relock -----------------------------------------------------------------------------------


async def test_grant_energises_at_once_and_relocks_after_strike(
    door: DoorController, factory: MockFactory, journal: Journal
) -> None:
    relay = factory.pin(RELAY)
    relay.clear_states()
    door.grant(0.05)
    # Same call, no await: the relay is already energised.
    assert relay.state
    assert not door.locked
    assert journal.lock_changes() == [("unlocked", "grant")]
    await asyncio.sleep(0.3)
    assert not relay.state
    assert levels(relay) == [False, True, False]
    assert journal.lock_changes() == [("unlocked", "grant"), ("locked", "strike_ended")]
    assert not journal.of(DOOR_FORCED_OPEN)
    # A grant shows nothing on the reader by itself: the agent decides the feedback (edge.agent.feedback_for).
    assert levels(factory.pin(LED)) == [False]
    door.signal(Feedback.GRANTED)
    assert True in levels(factory.pin(LED)) and True in levels(factory.pin(BEEPER))


async def test_extended_strike_time(door: DoorController) -> None:
    assert door.strike_time() == 0.15
    assert door.strike_time(extended=True) == 0.6


async def test_regrant_replaces_the_pending_relock(door: DoorController, factory: MockFactory) -> None:
    relay = factory.pin(RELAY)
    door.grant(0.1)
    await asyncio.sleep(0.05)
    door.grant(2.0)
    await asyncio.sleep(0.3)  # well past the first strike's end
    assert relay.state
    assert not door.locked


async def test_relock_as_soon_as_door_closes_after_opening(
    door: DoorController, factory: MockFactory, journal: Journal
) -> None:
    relay, contact = factory.pin(RELAY), factory.pin(CONTACT)
    door.grant(5.0)
    contact.drive_high()  # opens
    await asyncio.sleep(SETTLE)
    assert relay.state  # still within the strike
    assert door.is_open
    contact.drive_low()  # closes
    await asyncio.sleep(SETTLE)
    assert not relay.state
    assert journal.lock_changes() == [("unlocked", "grant"), ("locked", "closed")]
    assert journal.contact_changes() == ["open", "closed"]
    assert not journal.of(DOOR_FORCED_OPEN)


async def test_grant_when_already_open_relocks_on_close(
    door: DoorController, factory: MockFactory, journal: Journal
) -> None:
    door.grant(0.05)
    factory.pin(CONTACT).drive_high()
    await asyncio.sleep(0.3)  # strike over, door still open
    assert door.locked
    door.grant(5.0)  # someone taps while it stands open
    factory.pin(CONTACT).drive_low()
    await asyncio.sleep(SETTLE)
    assert door.locked
    assert journal.lock_changes()[-1] == ("locked", "closed")


# --- forced open ----------------------------------------------------------------------------------------


async def test_forced_open_alarm_and_clear(door: DoorController, factory: MockFactory, journal: Journal) -> None:
    relay, contact, beeper = factory.pin(RELAY), factory.pin(CONTACT), factory.pin(BEEPER)
    relay.clear_states()
    beeper.clear_states()
    contact.drive_high()
    await asyncio.sleep(SETTLE)
    assert journal.of(DOOR_FORCED_OPEN) == [{"state": "active"}]
    assert DOOR_FORCED_OPEN in door.alarms
    assert True in levels(beeper)  # the alarm pattern is sounding
    contact.drive_low()
    await asyncio.sleep(SETTLE)
    forced = journal.of(DOOR_FORCED_OPEN)
    assert [d["state"] for d in forced] == ["active", "cleared"]
    assert not door.alarms
    # A forced door never touched the relay, and held-open does not pile on top of forced.
    assert levels(relay) == [False]
    assert not journal.of(DOOR_HELD_OPEN)
    await asyncio.sleep(0.7)  # the alarm pattern has stopped with the alarm
    assert not beeper.state


async def test_opening_after_strike_ended_is_forced(
    door: DoorController, factory: MockFactory, journal: Journal
) -> None:
    door.grant(0.03)
    await asyncio.sleep(0.2)
    factory.pin(CONTACT).drive_high()
    await asyncio.sleep(SETTLE)
    assert journal.of(DOOR_FORCED_OPEN) == [{"state": "active"}]


# --- REX ------------------------------------------------------------------------------------------------


async def test_rex_unlock(door: DoorController, factory: MockFactory, journal: Journal) -> None:
    relay, rex, contact = factory.pin(RELAY), factory.pin(REX), factory.pin(CONTACT)
    rex.drive_low()  # pressed
    await asyncio.sleep(SETTLE)
    assert relay.state
    assert journal.of(DOOR_REX) == [{"mode": "unlock"}]
    rex.drive_high()  # released
    contact.drive_high()
    await asyncio.sleep(SETTLE)
    contact.drive_low()
    await asyncio.sleep(SETTLE)
    assert not relay.state
    assert journal.lock_changes() == [("unlocked", "rex"), ("locked", "closed")]
    assert not journal.of(DOOR_FORCED_OPEN)


async def test_rex_shadow_only_covers_the_opening(factory: MockFactory, journal: Journal) -> None:
    io = make_io(rex_mode="shadow", rex_window_s=0.2)
    async with DoorController(make_door(), io, factory=factory, emit=journal) as ctl:
        await close_and_settle(ctl, factory, journal)
        relay, rex, contact = factory.pin(RELAY), factory.pin(REX), factory.pin(CONTACT)
        relay.clear_states()
        rex.drive_low()
        await asyncio.sleep(SETTLE)
        rex.drive_high()
        assert journal.of(DOOR_REX) == [{"mode": "shadow"}]
        contact.drive_high()  # opens within the window: egress, not forced
        await asyncio.sleep(SETTLE)
        contact.drive_low()
        await asyncio.sleep(SETTLE)
        assert not journal.of(DOOR_FORCED_OPEN)
        assert levels(relay) == [False]  # the lock was never released
        await asyncio.sleep(0.3)  # the window is over
        contact.drive_high()
        await asyncio.sleep(SETTLE)
        assert journal.of(DOOR_FORCED_OPEN) == [{"state": "active"}]


async def test_rex_bounce_does_not_unlock(door: DoorController, factory: MockFactory, journal: Journal) -> None:
    rex = factory.pin(REX)
    rex.drive_low()
    rex.drive_high()  # a spike shorter than the debounce window
    await asyncio.sleep(SETTLE)
    assert door.locked
    assert not journal.of(DOOR_REX)


# --- held open ------------------------------------------------------------------------------------------


async def test_held_open_prealarm_alarm_then_cleared(
    door: DoorController, factory: MockFactory, journal: Journal
) -> None:
    contact = factory.pin(CONTACT)
    door.grant(0.05)
    contact.drive_high()
    await asyncio.sleep(0.6)  # held_open_s = 0.3, pre-alarm at 50 %
    types = [t for t, _, d in journal.events if t in (DOOR_HELD_OPEN_PREALARM, DOOR_HELD_OPEN)]
    assert types == [DOOR_HELD_OPEN_PREALARM, DOOR_HELD_OPEN]
    assert door.alarms == {DOOR_HELD_OPEN_PREALARM, DOOR_HELD_OPEN}
    assert not journal.of(DOOR_FORCED_OPEN)
    assert door.locked  # the strike ended while the door stood open
    contact.drive_low()
    await asyncio.sleep(SETTLE)
    assert [d["state"] for d in journal.of(DOOR_HELD_OPEN)] == ["active", "cleared"]
    assert [d["state"] for d in journal.of(DOOR_HELD_OPEN_PREALARM)] == ["active", "cleared"]
    assert not door.alarms


async def test_short_opening_raises_nothing(door: DoorController, factory: MockFactory, journal: Journal) -> None:
    contact = factory.pin(CONTACT)
    door.grant(5.0)
    contact.drive_high()
    await asyncio.sleep(0.05)
    contact.drive_low()
    await asyncio.sleep(0.5)  # past held_open_s: the timer was cancelled by the close
    assert not journal.of(DOOR_HELD_OPEN_PREALARM)
    assert not journal.of(DOOR_HELD_OPEN)


# --- debounce -------------------------------------------------------------------------------------------


async def test_debounce_ignores_a_bounce(door: DoorController, factory: MockFactory, journal: Journal) -> None:
    contact = factory.pin(CONTACT)
    contact.drive_high()
    contact.drive_low()  # a spike on a closed door
    await asyncio.sleep(SETTLE)
    assert journal.events == []
    assert door.is_open is False
    # A bouncing opening counts once.
    door.grant(5.0)
    journal.clear()
    contact.drive_high()
    contact.drive_low()
    contact.drive_high()
    await asyncio.sleep(SETTLE)
    assert journal.contact_changes() == ["open"]
    assert not journal.of(DOOR_FORCED_OPEN)


def test_debouncer_uses_edge_timestamps() -> None:
    d = Debouncer(0.05, False)
    # Edges 10 ms apart: a bounce, dropped even though they arrive together.
    assert d.edge(now=1.0, edge_t=0.000, level=True) == []
    assert d.edge(now=1.0, edge_t=0.010, level=False) == []
    assert d.deadline is None
    assert d.tick(2.0) == []
    # Edges 200 ms apart by their own timestamps but processed in the same loop turn (late loop): the first
    # level did hold, so it is confirmed when the second edge arrives.
    assert d.edge(now=3.0, edge_t=1.0, level=True) == []
    assert d.edge(now=3.0, edge_t=1.2, level=False) == [(3.0, True)]
    assert d.level is True
    assert d.tick(3.1) == [(3.0, False)]
    assert d.level is False
    # A burst: the change is dated from its first edge's arrival.
    assert d.edge(now=5.00, edge_t=2.000, level=True) == []
    assert d.edge(now=5.01, edge_t=2.010, level=False) == []
    assert d.edge(now=5.02, edge_t=2.020, level=True) == []
    assert d.tick(5.05) == []
    assert d.tick(5.08) == [(5.00, True)]


# --- the pure core with explicit times --------------------------------------------------------------------


def core(**kw: Any) -> DoorLogic:
    logic = DoorLogic(make_door(held_open_s=10.0), now=0.0, contact_open=False, debounce_s=0.05, **kw)
    logic.drain()
    return logic


def test_core_opening_started_before_strike_end_is_legit() -> None:
    logic = core()
    logic.grant(100.0, 1.0)
    logic.contact_edge(100.99, 50.0, True)  # first edge just before the strike ends
    logic.tick(101.0)  # the strike ends while the opening is being debounced
    logic.tick(101.02)
    assert logic.is_open is False  # not yet confirmed
    logic.tick(101.1)
    assert logic.is_open is True
    assert DOOR_FORCED_OPEN not in logic.alarms
    assert logic.next_deadline() == pytest.approx(100.99 + 10.0 * 0.8)


def test_core_relay_polarity() -> None:
    strike, maglock = core(), core(fail_safe=True)
    assert (strike.relay_energised, maglock.relay_energised) == (False, True)
    strike.grant(1.0, 5.0)
    maglock.grant(1.0, 5.0)
    assert (strike.relay_energised, maglock.relay_energised) == (True, False)


def test_core_rejects_bad_times() -> None:
    logic = core()
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            logic.grant(1.0, bad)
        with pytest.raises(ValueError):
            logic.unlock_for(1.0, bad)
    assert not logic.unlocked


# --- modes ----------------------------------------------------------------------------------------------


async def test_a_hold_is_free_passage(door: DoorController, factory: MockFactory, journal: Journal) -> None:
    """The agent's unlock schedule (or first-card unlock) is a hold: no relock on close, no held-open alarm."""
    relay, contact = factory.pin(RELAY), factory.pin(CONTACT)
    door.hold_unlocked("unlocked")
    assert relay.state
    contact.drive_high()
    await asyncio.sleep(0.5)  # past held_open_s: no held-open alarm during free passage
    assert not door.alarms
    contact.drive_low()
    await asyncio.sleep(SETTLE)
    assert relay.state  # no relock on close while held unlocked
    door.release_hold("unlocked")  # the schedule ends
    assert not relay.state
    assert ("locked", "release:unlocked") in journal.lock_changes()


async def test_held_open_counts_from_end_of_free_passage(
    door: DoorController, factory: MockFactory, journal: Journal
) -> None:
    door.hold_unlocked("unlocked")
    factory.pin(CONTACT).drive_high()
    await asyncio.sleep(SETTLE)
    door.release_hold("unlocked")
    assert door.locked
    await asyncio.sleep(0.6)
    assert not journal.of(DOOR_FORCED_OPEN)
    assert [d["state"] for d in journal.of(DOOR_HELD_OPEN)] == ["active"]


async def test_lockdown_relocks_and_suspends_holds(door: DoorController, factory: MockFactory) -> None:
    relay = factory.pin(RELAY)
    door.hold_unlocked("remote")
    door.grant(5.0)
    assert relay.state
    door.set_mode(DoorMode.LOCKDOWN)
    assert not relay.state
    door.grant(5.0)  # who may pass in lockdown is decided upstream; the door obeys a grant
    assert relay.state
    door.set_mode(DoorMode.NORMAL)
    assert relay.state  # the remote hold applies again
    door.release_hold()
    # The strike from the grant is still running.
    assert relay.state


async def test_lockdown_refuses_a_remote_unlock_and_holds(door: DoorController, factory: MockFactory) -> None:
    """Lockdown wins, enforced here: a remote unlock or a hold in lockdown is refused with an error that
    names the door (the command's result carries it); the relay never moves. A grant still works."""
    relay = factory.pin(RELAY)
    door.set_mode(DoorMode.LOCKDOWN)
    relay.clear_states()
    with pytest.raises(DoorLockdownError, match=r"door 'door1' is in lockdown: remote unlock refused"):
        door.unlock_for(5.0)
    with pytest.raises(DoorLockdownError, match="in lockdown"):
        door.hold_unlocked("unlocked")
    assert isinstance(DoorLockdownError("x"), ValueError)  # the link answers it as an "invalid" command
    assert levels(relay) == [False] and door.locked and door.status()["holds"] == []
    door.grant(0.05)  # who may pass in lockdown is decided upstream
    assert relay.state
    await asyncio.sleep(0.2)
    door.set_mode(DoorMode.NORMAL)  # lifted: a remote unlock works again
    door.unlock_for(0.05)
    assert relay.state
    await asyncio.sleep(0.2)
    assert levels(relay) == [False, True, False, True, False]


async def test_a_revoked_grant_relocks_and_spares_holds(door: DoorController, factory: MockFactory) -> None:
    relay = factory.pin(RELAY)
    door.grant(5.0)
    assert relay.state
    door.revoke_grant()
    assert not relay.state  # the strike ended at once
    door.hold_unlocked("remote")
    door.grant(5.0)
    door.revoke_grant()  # holds stay (a first-card unlock is the agent's to undo)
    assert relay.state


async def test_the_door_applies_lockdown_only(door: DoorController, factory: MockFactory, journal: Journal) -> None:
    """Door modes are the agent's (holds, relocks); the door keeps lockdown only. A mode given with the
    door's settings changes nothing, and any mode but LOCKDOWN/NORMAL is refused by name."""
    assert door.mode is DoorMode.NORMAL and not door.lockdown
    for mode in (DoorMode.UNLOCKED, DoorMode.FIRST_CARD, DoorMode.LOCKED):
        with pytest.raises(ValueError, match=f"mode '{mode.value}' is applied by the agent"):
            door.set_mode(mode)
    door.set_lockdown(True)
    assert door.mode is DoorMode.LOCKDOWN and door.status()["mode"] == "lockdown"
    door.set_lockdown(False)
    assert [d for d in journal.of(DOOR_STATE) if "mode" in d] == [{"mode": "lockdown"}, {"mode": "normal"}]
    assert not factory.pin(RELAY).state


async def test_unlock_for_relocks(door: DoorController, factory: MockFactory, journal: Journal) -> None:
    relay, contact = factory.pin(RELAY), factory.pin(CONTACT)
    door.unlock_for(1.0)
    assert relay.state
    contact.drive_high()
    await asyncio.sleep(SETTLE)
    contact.drive_low()
    await asyncio.sleep(SETTLE)
    assert relay.state  # a remote unlock does not relock on close
    await asyncio.sleep(1.0)
    assert not relay.state
    assert journal.lock_changes() == [("unlocked", "hold:remote"), ("locked", "unlock_ended")]


async def test_door_mode_from_model_is_not_applied_by_the_door(factory: MockFactory, journal: Journal) -> None:
    async with DoorController(
        make_door(mode=DoorMode.UNLOCKED), make_io(), factory=factory, emit=journal
    ) as ctl:
        assert ctl.locked and ctl.mode is DoorMode.NORMAL  # the agent holds it unlocked, if it must


async def test_not_started_is_an_error(factory: MockFactory, journal: Journal) -> None:
    ctl = DoorController(make_door(), make_io(), factory=factory, emit=journal)
    with pytest.raises(RuntimeError, match="not started"):
        ctl.grant()


async def test_journal_failure_does_not_stop_the_door(factory: MockFactory) -> None:
    def broken(type: str, **kw: Any) -> None:
        raise OSError("disk full")

    async with DoorController(make_door(), make_io(), factory=factory, emit=broken) as ctl:
        ctl.grant(0.03)
        assert factory.pin(RELAY).state
        await asyncio.sleep(0.2)
        assert not factory.pin(RELAY).state


# --- hardware profiles ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sim", "pi40-2door"])
def test_profiles_load(name: str) -> None:
    p = load_profile(name)
    assert p.name == name
    assert [d.door for d in p.doors] == ["door1", "door2"]
    pins = [pin for d in p.doors for pin in d.pins().values()]
    assert len(pins) == len(set(pins)) == 14
    assert not {0, 1, 2, 3, 7, 8, 9, 10, 11, 14, 15} & set(pins)  # HAT EEPROM, I2C, SPI0, UART0 left free
    assert all(d.relay_pin >= 9 and d.relay_active_high for d in p.doors)


def test_sim_and_pi_profiles_share_the_layout() -> None:
    sim, pi = load_profile("sim"), load_profile("pi40-2door")
    assert [d.pins() for d in sim.doors] == [d.pins() for d in pi.doors]


async def test_sim_profile_runs_both_doors(journal: Journal) -> None:
    profile = load_profile(Path(__file__).parent.parent / "hw" / "sim.toml")
    factory = make_factory(profile)
    assert isinstance(factory, MockFactory)
    doors = {io.door: DoorController(Door(id=io.door), io, factory=factory, emit=journal) for io in profile.doors}
    async with doors["door1"] as d1, doors["door2"] as d2:
        assert factory.pin(d1.io.relay_pin).state is False  # strike: de-energised
        assert factory.pin(d2.io.relay_pin).state is True  # maglock: energised
        d1.grant()
        assert factory.pin(d1.io.relay_pin).state is True
    assert factory.pin(17).state is False
    assert factory.pin(27).state is False


GOOD = 'name = "t"\nfactory = "mock"\n[[doors]]\ndoor = "a"\nrelay_pin = 17\n'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (GOOD + "relay = 3\n", "doors[0]: Object contains unknown field `relay`"),
        (GOOD.replace("relay_pin = 17", 'relay_pin = "17"'), "doors[0].relay_pin: Expected `int`"),
        (GOOD.replace("relay_pin = 17", "relay_pin = 40"), "doors[0].relay_pin: Expected `int` <= 27"),
        (GOOD + 'lock_type = "magnetic"\n', "doors[0].lock_type: Invalid enum value 'magnetic'"),
        (GOOD + 'rex_mode = "open"\n', "doors[0].rex_mode"),
        (GOOD + "debounce_s = 2\n", "doors[0].debounce_s"),
        (GOOD.replace('"mock"', '"gpio"'), "factory: Invalid enum value 'gpio'"),
        (GOOD.replace('name = "t"\n', ""), "missing required field `name`"),
        (GOOD + "contact_pin = 17\n", "doors[0].contact_pin: GPIO17 is already doors[0].relay_pin"),
        (GOOD + '[[doors]]\ndoor = "a"\nrelay_pin = 27\n', "doors[1].door: door 'a' is already doors[0]"),
        (GOOD.replace("relay_pin = 17", "relay_pin = 4"), "doors[0].relay_pin: GPIO4 is pulled HIGH"),
        (GOOD + "relay_active_high = false\n", "doors[0].relay_pin: GPIO17 is pulled LOW"),
        ("name = [", "not valid TOML"),
    ],
)
def test_bad_profile_names_the_key(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        decode_profile(text, source="bad.toml")
    assert str(info.value).startswith("bad.toml: ")
    assert message in str(info.value)


def test_boot_pull_check_can_be_waived_for_other_boards() -> None:
    p = decode_profile("check_boot_pulls = false\n" + GOOD.replace("relay_pin = 17", "relay_pin = 4"))
    assert p.doors[0].relay_pin == 4


def test_missing_profile(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope"):
        load_profile("nope")
    with pytest.raises(ConfigError, match="cannot read"):
        load_profile(tmp_path / "absent.toml")


async def test_failed_start_releases_the_relay(factory: MockFactory, journal: Journal) -> None:
    # The contact wired to the relay's pin (a profile would refuse it; DoorIO alone does not).
    io = make_io(contact_pin=RELAY)
    with pytest.raises(Exception, match="already in use"):
        async with DoorController(make_door(), io, factory=factory, emit=journal):
            pass
    assert factory.pin(RELAY).state is False
    assert journal.events == []  # nothing started, nothing to journal
    # The relay pin was released, not left to the garbage collector.
    async with DoorController(make_door(), make_io(), factory=factory, emit=journal) as ctl:
        assert ctl.locked


async def test_relock_ends_strike_and_every_hold(
    door: DoorController, factory: MockFactory, journal: Journal
) -> None:
    relay = factory.pin(RELAY)
    door.unlock_for(30.0)
    door.hold_unlocked("unlocked")
    door.grant(30.0)
    assert relay.state
    door.relock()
    assert not relay.state
    assert journal.lock_changes()[-1] == ("locked", "relock")
    assert door.status()["holds"] == []


async def test_release_all_holds_spares_a_timed_unlock(door: DoorController, factory: MockFactory) -> None:
    door.unlock_for(30.0)
    door.hold_unlocked("unlocked")
    door.release_hold()  # e.g. a mode sync that found no free passage
    assert factory.pin(RELAY).state  # the remote unlock runs to its end
    door.release_hold("remote")
    assert not factory.pin(RELAY).state


async def test_status(door: DoorController, factory: MockFactory) -> None:
    factory.pin(CONTACT).drive_high()
    await asyncio.sleep(SETTLE)
    st = door.status()
    assert st == {
        "door": "door1",
        "started": True,
        "locked": True,
        "relay_energised": False,
        "contact": "open",
        "mode": "normal",
        "holds": [],
        "alarms": [DOOR_FORCED_OPEN],
        "unlock_remaining_s": None,
    }
    door.unlock_for(60.0)
    assert 59.0 < door.status()["unlock_remaining_s"] <= 60.0


async def test_door_settings_refresh(door: DoorController, factory: MockFactory) -> None:
    door.door = make_door(strike_s=0.04, mode=DoorMode.UNLOCKED)
    assert door.strike_time() == 0.04
    assert door.locked  # a new mode is applied by the agent (holds), never by a settings refresh
    door.grant()
    await asyncio.sleep(0.25)
    assert not factory.pin(RELAY).state  # relocked after the new, shorter strike
    with pytest.raises(ConfigError):
        door.door = make_door(id="door2")
