"""Shared fixtures. Broker fixtures live in tests/broker.py (real Mosquitto on a free loopback port)."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import settings

from edge.model import (
    Assignment,
    ChangeSet,
    Credential,
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
from edge.store import Store

# CI runs the same examples every time (a red CI is then a real regression, reproducible); a developer's
# run draws new ones unless CI is set.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

# Keep the event loop responsive while worker threads (aiosqlite) run Python code, as the agent does.
sys.setswitchinterval(0.0005)

MONDAY_10 = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)  # a Monday, 11:00 in Berlin


def basic_site() -> ChangeSet:
    """Two doors, office hours, two groups, three users with one card each."""
    office = Schedule(
        id="office", intervals=[Interval(day=d, start="08:00", end="18:00") for d in range(5)]
    )
    return ChangeSet(
        from_version=0,
        to_version=1,
        changes=[
            PutSchedule(schedule=office),
            PutDoor(door=Door(id="front", name="Front door")),
            PutDoor(door=Door(id="lab", name="Lab")),
            PutGroup(group=Group(id="staff", doors=["front"], schedule="office")),
            PutGroup(group=Group(id="lab", doors=["front", "lab"])),
            PutUser(user=User(id="alice", assignments=[Assignment(group="staff")])),
            PutUser(user=User(id="bob", assignments=[Assignment(group="lab")], offline_access=True)),
            PutUser(user=User(id="carol", active=False, assignments=[Assignment(group="lab")])),
            PutCredential(credential=Credential(card=1001, user="alice")),
            PutCredential(credential=Credential(card=1002, user="bob")),
            PutCredential(credential=Credential(card=1003, user="carol")),
        ],
    )


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "rights.db"


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[Store]:
    async with Store(db_path, "Europe/Berlin") as s:
        await s.apply(basic_site())
        yield s
