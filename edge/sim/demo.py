"""Demo provisioning and a scripted tap sequence for the simulated gateway (`edge run` with no config).

The taps go through the real path: the simulator sends Wiegand bit trains on the mock D0/D1 pins, the
reader decodes them, the decision drives the relay, and the journal records the result.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta

from edge.agent import Agent
from edge.hw import HardwareProfile
from edge.model import (
    Assignment,
    ChangeSet,
    Credential,
    CredentialStatus,
    Door,
    Group,
    Interval,
    PutCredential,
    PutDoor,
    PutGroup,
    PutSchedule,
    PutUser,
    Schedule,
    User,
)

from .hands import tap

log = logging.getLogger("edge.demo")

#: (card, who, what the demo expects at the first door)
DEMO_CARDS = [
    (1001, "alice", "granted: staff, around the clock"),
    (1002, "bob", "granted: offline-access flag, both doors"),
    (1003, "carol", "denied: access control deactivated"),
    (1004, "dave", "denied: card reported lost"),
    (1005, "erin", "denied: entitlement ended yesterday"),
    (4242, None, "denied: unknown card"),
]


def demo_change_set(profile: HardwareProfile) -> ChangeSet:
    door_ids = [d.door for d in profile.doors] or ["front"]
    yesterday = datetime.now(UTC) - timedelta(days=1)
    office = Schedule(
        id="office", name="Office hours", intervals=[Interval(day=d, start="07:00", end="19:00") for d in range(5)]
    )
    changes: list[object] = [PutSchedule(schedule=office)]
    changes += [PutDoor(door=Door(id=d, name=d.replace("_", " ").title(), strike_s=3.0)) for d in door_ids]
    changes += [
        PutGroup(group=Group(id="staff", name="Staff", doors=door_ids[:1])),
        PutGroup(group=Group(id="everywhere", name="All doors", doors=door_ids)),
        PutGroup(group=Group(id="office-hours", name="Office hours", doors=door_ids, schedule="office")),
    ]
    changes += [
        PutUser(user=User(id="alice", name="Alice", assignments=[Assignment(group="staff")])),
        PutUser(user=User(id="bob", name="Bob", offline_access=True, assignments=[Assignment(group="everywhere")])),
        PutUser(user=User(id="carol", name="Carol", active=False, assignments=[Assignment(group="staff")])),
        PutUser(user=User(id="dave", name="Dave", assignments=[Assignment(group="office-hours")])),
        PutUser(user=User(id="erin", name="Erin", assignments=[Assignment(group="staff", valid_until=yesterday)])),
    ]
    for card, who, _ in DEMO_CARDS:
        if who is not None:
            status = CredentialStatus.LOST if who == "dave" else CredentialStatus.ACTIVE
            changes.append(PutCredential(credential=Credential(card=card, user=who, status=status)))
    return ChangeSet(from_version=0, to_version=1, changes=changes)  # type: ignore[arg-type]


async def demo_taps(agent: Agent) -> None:
    """Tap each demo card once at the first door, through the simulated Wiegand reader."""
    await agent.started.wait()
    await asyncio.sleep(0.5)
    if not agent.reader_door:
        return
    reader, door = next(iter(agent.reader_door.items()))
    log.info("demo: tapping %d cards at door %s (try: edge sim tap --door %s --card 1001)", len(DEMO_CARDS), door, door)
    for card, _who, expect in DEMO_CARDS:
        log.info("demo: card %d, expected %s", card, expect)
        await tap(agent, reader, card)
        await asyncio.sleep(0.8)
    log.info("demo: done; the gateway keeps running (Ctrl-C to stop)")
