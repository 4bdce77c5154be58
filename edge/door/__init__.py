"""One door: the pure state machine (`logic`), the LED/beeper pattern player (`indicator`) and the gpiozero
I/O shell (`controller`). See each module's docstring."""

from edge.door.controller import DoorController
from edge.door.indicator import Indicator, Pattern
from edge.door.logic import Annunciation, Debouncer, DoorLockdownError, DoorLogic

__all__ = ["Annunciation", "Debouncer", "DoorController", "DoorLockdownError", "DoorLogic", "Indicator", "Pattern"]
