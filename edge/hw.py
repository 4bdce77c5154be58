"""Hardware profiles: which GPIO pin does what, for each door, as data (`hw/*.toml`).

A profile is validated once, at start, into a strict `HardwareProfile` (unknown keys are errors, every
limit is in the type) and then checked as a whole: no pin used twice, door ids unique, and no relay wired
so that the board's power-on pull would energise it before the agent runs (see `BOOT_PULL_UP` and
docs/hardware.md). Every error is a `ConfigError` whose message names the key, e.g.
``hw/site.toml: doors[1].relay_pin: GPIO17 is already doors[0].relay_pin``.

`make_factory(profile)` returns the gpiozero pin factory the profile names, looked up by name in
`PIN_FACTORIES`; `sim` profiles use a gpiozero `MockFactory` (edge.sim.pins), whose pins tests and the
simulator drive edge by edge.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from edge.errors import ConfigError
from edge.model import Ident

#: A BCM GPIO number on the 40-pin header (GPIO0 .. GPIO27).
Gpio = Annotated[int, Meta(ge=0, le=27)]
Seconds = Annotated[float, Meta(ge=0, le=3600)]

FactoryName = Literal["mock", "lgpio", "rpigpio", "native"]
LockType = Literal["fail_secure", "fail_safe"]
RexMode = Literal["unlock", "shadow"]

#: BCM GPIOs whose reset state is input with the pull-up enabled: GPIO0-8 (BCM2835/6/7 and BCM2711 data
#: sheets, "pull" column of the GPIO alternate-function table; GPIO2/3 also carry 1.8 kOhm pull-ups on the
#: board for I2C). GPIO9-27 reset to input with the pull-down enabled. Until the agent configures a pin,
#: and again after the process has released it, an input with a pull is what the relay driver sees.
BOOT_PULL_UP: frozenset[int] = frozenset(range(9))

#: Where profiles live when `load_profile` is given a bare name.
PROFILE_DIR = Path(__file__).resolve().parent.parent / "hw"


class Config(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """Config base: strict, unknown keys are errors (a typo must not silently fall back to a default)."""


class DoorIO(Config, kw_only=True, frozen=True):
    """The wiring of one door. `door` is the id of the `edge.model.Door` it serves."""

    door: Ident
    # Lock relay. `relay_active_high` is about the driver: True when a HIGH GPIO energises the relay
    # (a transistor/MOSFET driver), False for "low-level trigger" relay boards.
    relay_pin: Gpio
    relay_active_high: bool = True
    #: fail_secure: an electric strike that is locked when de-energised (energised = unlocked).
    #: fail_safe: a maglock that is released when de-energised (energised = locked).
    #: Either way the relay is de-energised when the agent stops or dies.
    lock_type: LockType = "fail_secure"
    # Door-position switch (reed contact); None = no contact fitted (no forced/held alarms, no relock on close).
    contact_pin: Gpio | None = None
    #: True for the usual contact to GND with a pull-up: the line is LOW while the door is closed.
    contact_closed_is_low: bool = True
    #: Internal pull: True = up, False = down, None = none (external resistor / driven line).
    contact_pull_up: bool | None = True
    # Request-to-exit button.
    rex_pin: Gpio | None = None
    rex_pressed_is_low: bool = True
    rex_pull_up: bool | None = True
    #: "unlock": a press releases the lock like a grant; "shadow": a press only stops the opening that
    #: follows from counting as forced (for doors with free mechanical egress).
    rex_mode: RexMode = "unlock"
    #: How long a REX press unlocks (unlock) or covers an opening (shadow); None = the door's strike time.
    rex_window_s: Annotated[float, Meta(gt=0, le=600)] | None = None
    # Wiegand reader lines (after the 5 V -> 3.3 V level shifter) and its LED and beeper control lines.
    reader_d0_pin: Gpio | None = None
    reader_d1_pin: Gpio | None = None
    led_pin: Gpio | None = None
    led_active_high: bool = True
    beeper_pin: Gpio | None = None
    beeper_active_high: bool = True
    #: A contact or REX level counts once it has held this long (edge timestamps); bounces are dropped.
    debounce_s: Annotated[float, Meta(ge=0, le=1)] = 0.05
    #: Held-open pre-alarm at this fraction of the door's `held_open_s`.
    prealarm_fraction: Annotated[float, Meta(gt=0, lt=1)] = 0.8

    def pins(self) -> dict[str, int]:
        """Every pin this door uses, keyed by field name."""
        out: dict[str, int] = {}
        for key in (
            "relay_pin",
            "contact_pin",
            "rex_pin",
            "reader_d0_pin",
            "reader_d1_pin",
            "led_pin",
            "beeper_pin",
        ):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out


class HardwareProfile(Config, kw_only=True, frozen=True):
    version: Literal[1] = 1
    name: Ident
    description: str = ""
    factory: FactoryName
    #: Check relays against the power-on pulls of the Raspberry Pi (`BOOT_PULL_UP`). Keep it on for any
    #: profile that mirrors a Pi, including the simulator.
    check_boot_pulls: bool = True
    doors: list[DoorIO] = []

    def door(self, door_id: str) -> DoorIO:
        for d in self.doors:
            if d.door == door_id:
                return d
        raise KeyError(door_id)


def _check(profile: HardwareProfile) -> None:
    seen_doors: dict[str, int] = {}
    seen_pins: dict[int, str] = {}
    for i, d in enumerate(profile.doors):
        where = f"doors[{i}]"
        if d.door in seen_doors:
            raise ConfigError(f"{where}.door: door {d.door!r} is already doors[{seen_doors[d.door]}]")
        seen_doors[d.door] = i
        if (d.reader_d0_pin is None) != (d.reader_d1_pin is None):
            raise ConfigError(f"{where}.reader_d0_pin: reader_d0_pin and reader_d1_pin go together (Wiegand D0/D1)")
        for key, pin in d.pins().items():
            if pin in seen_pins:
                raise ConfigError(f"{where}.{key}: GPIO{pin} is already {seen_pins[pin]}")
            seen_pins[pin] = f"{where}.{key}"
        if profile.check_boot_pulls:
            pulled_high = d.relay_pin in BOOT_PULL_UP
            if pulled_high == d.relay_active_high:
                level = "HIGH" if pulled_high else "LOW"
                raise ConfigError(
                    f"{where}.relay_pin: GPIO{d.relay_pin} is pulled {level} at power-on, which energises "
                    f"a relay with relay_active_high = {str(d.relay_active_high).lower()} before the agent "
                    "runs (the door would pulse open on every reboot); use a GPIO "
                    + ("9-27" if d.relay_active_high else "0-8")
                    + " or the other driver polarity"
                )


def decode_profile(data: bytes | str, *, source: str = "<profile>") -> HardwareProfile:
    """Validate TOML text into a profile; `ConfigError` names `source` and the key."""
    try:
        profile = msgspec.toml.decode(data, type=HardwareProfile)
    except msgspec.ValidationError as e:
        # msgspec says "... - at `$.doors[0].relay_pin`"; put the key first.
        msg = str(e)
        text, sep, path = msg.rpartition(" - at `")
        if sep:
            key = path.rstrip("`").removeprefix("$").lstrip(".") or "<root>"
            raise ConfigError(f"{source}: {key}: {text}") from None
        raise ConfigError(f"{source}: {msg}") from None
    except msgspec.DecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from None
    try:
        _check(profile)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return profile


def load_profile(path_or_name: str | Path) -> HardwareProfile:
    """Load `hw/NAME.toml` (a bare name such as ``"sim"``) or a profile file by path."""
    text = str(path_or_name)
    if isinstance(path_or_name, Path) or "/" in text or text.endswith(".toml"):
        path = Path(path_or_name)
    else:
        path = PROFILE_DIR / f"{text}.toml"
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"hardware profile {text!r}: cannot read {path}: {e.strerror}") from None
    return decode_profile(data, source=str(path))


#: Pin factories by name, as gpiozero names its own (``GPIOZERO_PIN_FACTORY``): "module:attr", resolved
#: when a profile asks for one, so this module imports no GPIO library and no simulator code. "mock" is a
#: MockFactory whose clock the simulator's Wiegand transmitter stamps edges with.
PIN_FACTORIES: dict[FactoryName, str] = {
    "mock": "edge.sim.pins:VirtualClockFactory",
    "lgpio": "gpiozero.pins.lgpio:LGPIOFactory",
    "rpigpio": "gpiozero.pins.rpigpio:RPiGPIOFactory",
    "native": "gpiozero.pins.native:NativeFactory",
}


def make_factory(profile: HardwareProfile) -> Any:
    """A fresh gpiozero pin factory of the kind `profile.factory` names (`PIN_FACTORIES`)."""
    name = profile.factory
    module, _, attr = PIN_FACTORIES[name].partition(":")
    try:
        return getattr(importlib.import_module(module), attr)()
    except (ImportError, OSError, RuntimeError) as e:
        raise ConfigError(f"factory: cannot start the {name!r} pin factory: {e}") from e
