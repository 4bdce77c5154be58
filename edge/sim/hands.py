"""The simulated gateway's hands: card taps as Wiegand bit trains, door contacts and exit buttons.

Everything here drives gpiozero mock pins edge by edge, so the real decoders, the real door logic and
the real tap path run: a tap is encoded in a card format, sent as 50 us pulses 1.5 ms apart (with a
little jitter) on the door's D0/D1 lines, and the reader decodes it as it would from a real reader.

`install(agent)` (called by edge/cli.py for a simulated profile; `simulated_agent` in tests) gives an agent
these hands on its control socket (`edge sim tap|door|rex`) and closes its door contacts at start.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from edge.agent import Agent
from edge.config import Config
from edge.control import DoorRequest, RexRequest, TapRequest
from edge.decision import Reason
from edge.readers.formats import FormatError, FormatTable, encode
from edge.readers.keypad import KEY_ENTER, encode_key8
from edge.readers.wiegand.reader import WiegandReader
from edge.sim.pins import VirtualClockFactory
from edge.sim.transmitter import WiegandTransmitter

_transmitters: dict[tuple[int, int, int], WiegandTransmitter] = {}


def _transmitter(agent: Agent, door: str) -> WiegandTransmitter:
    io = agent.profile.door(door)
    if io.reader_d0_pin is None or io.reader_d1_pin is None or not isinstance(agent.factory, VirtualClockFactory):
        raise ValueError(f"door {door!r} has no simulated Wiegand reader")
    key = (id(agent.factory), io.reader_d0_pin, io.reader_d1_pin)
    tx = _transmitters.get(key)
    if tx is None:
        tx = _transmitters[key] = WiegandTransmitter(
            agent.factory, io.reader_d0_pin, io.reader_d1_pin, pulse_s=50e-6, interval_s=1.5e-3,
            jitter_s=0.2e-3, rng=random.Random(),
        )  # fmt: skip
    return tx


def card_frame(
    formats: FormatTable, card: int, *, fmt: str | None = None, facility: int | None = None
) -> tuple[int, int]:
    """(bits, nbits) for a card in the named format, or in the first accepted format it fits."""
    candidates = [f for f in formats.values() if fmt is None or f.name == fmt]
    if not candidates:
        raise ValueError(f"the reader does not accept format {fmt!r} (accepts {', '.join(formats.names)})")
    for f in sorted(candidates, key=lambda f: f.length):
        fac = facility if facility is not None else (0 if f.has_facility else None)
        try:
            return encode(f, fac, card), f.length
        except FormatError:
            continue
    raise ValueError(f"card {card} does not fit any accepted format")


async def tap(
    agent: Agent, reader_name: str, card: int, *, fmt: str | None = None, facility: int | None = None,
    pin: str | None = None,
) -> None:  # fmt: skip
    reader = agent.readers[reader_name]
    if not isinstance(reader, WiegandReader):
        raise ValueError(f"reader {reader_name!r} is not a simulated Wiegand reader")
    door = agent.reader_door[reader_name]
    tx = _transmitter(agent, door)
    bits, nbits = card_frame(reader.assembler.formats, card, fmt=fmt, facility=facility)
    await asyncio.sleep(0.06)  # a reader refuses a frame that starts right after a faulty one or a key
    await tx.send(bits, nbits)
    if pin is not None:
        await asyncio.sleep(0.4)
        order = reader.assembler.keypad.order if reader.assembler.keypad else "key_low"
        for key in [*(int(c) for c in pin), KEY_ENTER]:
            await asyncio.sleep(0.15)
            await tx.send(encode_key8(key, order), 8)


def set_contact(agent: Agent, door: str, *, opened: bool) -> None:
    io = agent.profile.door(door)
    if io.contact_pin is None:
        raise ValueError(f"door {door!r} has no door contact")
    pin = agent.factory.pin(io.contact_pin)
    high = opened if io.contact_closed_is_low else not opened
    if high:
        pin.drive_high()
    else:
        pin.drive_low()


async def press_rex(agent: Agent, door: str, *, hold_s: float = 0.2) -> None:
    io = agent.profile.door(door)
    if io.rex_pin is None:
        raise ValueError(f"door {door!r} has no exit button")
    pin = agent.factory.pin(io.rex_pin)
    (pin.drive_low if io.rex_pressed_is_low else pin.drive_high)()
    await asyncio.sleep(hold_s)
    (pin.drive_high if io.rex_pressed_is_low else pin.drive_low)()


# --- the control socket's simulator requests ----------------------------------------------------------


async def sim_tap(agent: Agent, req: TapRequest) -> dict[str, Any]:
    """`edge sim tap`: the card (and PIN) at the door's reader; the decisions it caused."""
    if req.door not in agent.doors:
        raise ValueError(f"no door {req.door!r} on this gateway")
    reader = next((r for r, d in agent.reader_door.items() if d == req.door), None)
    if reader is None:
        raise ValueError(f"door {req.door!r} has no reader")
    # Counted, not measured on `agent.decisions` (which keeps only the last few).
    before = agent.decided
    await tap(agent, reader, req.card, fmt=req.format, facility=req.facility, pin=req.pin)
    for _ in range(300):
        if agent.decided > before and (req.pin is None or agent.decisions[-1].reason is not Reason.PIN_REQUIRED):
            break
        await asyncio.sleep(0.01)
    n = min(agent.decided - before, len(agent.decisions))
    new = agent.decisions[len(agent.decisions) - n :]
    return {"decisions": [{"granted": d.granted, "reason": d.reason.value, "user": d.user} for d in new]}


async def sim_door(agent: Agent, req: DoorRequest) -> dict[str, Any]:
    """`edge sim door open|close`: the door's position switch."""
    set_contact(agent, req.door, opened=req.action == "open")
    await asyncio.sleep(0.1)
    return {"door": agent.doors[req.door].status()}


async def sim_rex(agent: Agent, req: RexRequest) -> dict[str, Any]:
    """`edge sim rex`: a press of the door's exit button."""
    await press_rex(agent, req.door)
    return {"door": agent.doors[req.door].status()}


async def close_contacts(agent: Agent) -> None:
    """Simulated doors start closed (the contact must hold past its debounce)."""
    for io in agent.profile.doors:
        if io.contact_pin is not None:
            set_contact(agent, io.door, opened=False)
    await asyncio.sleep(max((io.debounce_s for io in agent.profile.doors), default=0.0) + 0.02)


def install(agent: Agent) -> Agent:
    """Give a simulated agent its hands: the tap/door/rex requests on its control socket, and closed door
    contacts once its doors have started. Refused for real hardware: nothing here may open a real door."""
    if not agent.simulated:
        raise ValueError(f"hardware profile {agent.profile.name!r} is not simulated: no simulator hands")
    handlers: dict[type, Callable[[Any], Awaitable[object]]] = {
        TapRequest: partial(sim_tap, agent), DoorRequest: partial(sim_door, agent), RexRequest: partial(sim_rex, agent),
    }  # fmt: skip
    agent.control_handlers |= handlers
    agent.after_doors.append(close_contacts)
    return agent


def simulated_agent(cfg: Config, **kwargs: Any) -> Agent:
    """`Agent(cfg, **kwargs)` with the simulator's hands installed (what `edge run` builds for a simulated
    profile)."""
    return install(Agent(cfg, **kwargs))
