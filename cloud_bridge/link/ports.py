"""What the link needs from the gateway, as small typed ports (`typing.Protocol`): the agent passes its rights
store, its journal and itself; the link never imports them (tests/test_layers.py holds that).

- `Rights`: the rights the gateway holds (`edge.store.Store` implements it).
- `Outbox`: the event journal, read in order and released by the cloud's acknowledgements, and where the link
  journals what it did or refused (`edge.journal.Journal`).
- `CommandHandler`: what the agent does for a verified command (`edge.agent.Agent`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from cloud_bridge.protocol import ReaderAction
from edge.events import Detail, Event
from edge.model import ChangeSet, DoorMode, Snapshot

if TYPE_CHECKING:
    from cloud_bridge.protocol import AreaMove


class Applied(Protocol):
    """The outcome of a change set or a snapshot."""

    @property
    def version(self) -> int: ...

    #: False: a duplicate or older change set, acknowledged without applying it again.
    @property
    def applied(self) -> bool: ...

    @property
    def changes(self) -> int: ...


class Rights(Protocol):
    """The gateway's rights. `apply` raises `edge.errors.VersionGap` (the set does not start at `version`),
    `ChangeRejected` (nothing applied) or `StoreError`; `replace` raises `ChangeRejected` or `StoreError`."""

    @property
    def version(self) -> int: ...

    #: Why the rights need a full snapshot from the cloud ("damaged"...), None when they do not.
    @property
    def needs_snapshot(self) -> str | None: ...

    async def apply(self, cs: ChangeSet) -> Applied: ...

    async def replace(self, snap: Snapshot) -> Applied: ...


class Outbox(Protocol):
    """The event journal: events in `seq` order, kept until the cloud acknowledges them."""

    #: Called whenever recorded events become durable (readable by `read`).
    on_durable: list[Callable[[], None]]

    #: Events not yet acknowledged.
    @property
    def depth(self) -> int: ...

    def record(self, type: str, *, door: str | None = None, user: str | None = None, reason: str | None = None,
               detail: Detail | None = None) -> Any: ...  # fmt: skip

    async def read(self, after_seq: int = 0, limit: int = 500) -> list[Event]: ...

    async def ack(self, upto_seq: int) -> Any: ...


class CommandHandler(Protocol):
    """What the agent does for cloud commands. Raise ValueError (unknown door...) for an error result."""

    async def unlock(self, door: str, seconds: float) -> None: ...

    async def set_door_mode(self, door: str, mode: DoorMode | None) -> None: ...

    async def lockdown(self, active: bool) -> None: ...

    async def resync(self) -> None: ...

    async def reader_command(self, action: ReaderAction) -> Detail:
        """An OSDP reader command; returns the result's detail. Raise `edge.errors.CommandFailed` (a code and
        a message) when it was tried and did not succeed."""
        ...

    async def reset_anti_passback(self, user: str | None, area: str | None) -> int:
        """Forget locations (access rules); returns how many users were forgotten."""
        ...

    async def area_moves(self, moves: Sequence[AreaMove]) -> int:
        """Apply passages relayed from the site's other gateways; returns how many changed a location."""
        ...
