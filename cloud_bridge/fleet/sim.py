"""Simulated gateways for the fleet bench: many real `CloudLink`s on one event loop, each over a lightweight
in-memory store and journal (the link's ports), so that one process carries thousands of gateways.

Everything on the wire is the real protocol from the real code: the link's reconnect loop over the broker's
endpoints, births and wills, signature checks, change sets (decoded and validated by `RightsSync`), event
upload with go-back-N and signed acknowledgements. What is simulated is only what sits behind the ports:
`MemoryRights` holds a version and counts changes (the version rules of `edge.store.Store`: a gap is refused,
a duplicate acknowledged without applying it); `MemoryOutbox` keeps events until the cloud acknowledges them
(never earlier); `MemoryNonces` keeps command nonces in memory (an SQLite connection per gateway would be a
thread per gateway).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from cloud_bridge.link import CloudLink, LinkConfig
from cloud_bridge.protocol import AreaMove, Birth, Command, ReaderAction
from cloud_bridge.signing import NonceStore
from edge.errors import VersionGap
from edge.events import Detail, Event
from edge.model import ChangeSet, DoorMode, Snapshot
from edge.tasks import cancel_and_wait


@dataclass(frozen=True)
class Outcome:
    version: int
    applied: bool
    changes: int


class MemoryRights:
    """The `Rights` port in memory: a version, and how many changes were applied."""

    def __init__(self) -> None:
        self.version = 0
        self.needs_snapshot: str | None = None
        self.changes = 0
        #: Wall time when each version was reached.
        self.reached: dict[int, float] = {}

    async def apply(self, cs: ChangeSet) -> Outcome:
        if cs.to_version <= self.version:
            return Outcome(self.version, False, 0)
        if cs.from_version != self.version:
            raise VersionGap(self.version, cs.from_version)
        self.version = cs.to_version
        self.changes += len(cs.changes)
        self.reached[self.version] = time.time()
        return Outcome(self.version, True, len(cs.changes))

    async def replace(self, snap: Snapshot) -> Outcome:
        self.version = snap.version
        self.reached[self.version] = time.time()
        return Outcome(self.version, True, 1)


class MemoryOutbox:
    """The `Outbox` port in memory: events in seq order, removed only by `ack` (the cloud's signed
    acknowledgement, through the link)."""

    def __init__(self, gateway: str) -> None:
        self.gateway = gateway
        self.on_durable: list[Callable[[], None]] = []
        self._events: list[Event] = []
        self._seq = 0
        self.acked = 0
        #: Link events (refusals...) recorded by the link itself.
        self.link_records = 0

    @property
    def depth(self) -> int:
        return len(self._events)

    @property
    def recorded(self) -> int:
        return self._seq

    def record(self, type: str, *, door: str | None = None, user: str | None = None, reason: str | None = None,
               detail: Detail | None = None) -> Event:  # fmt: skip
        self._seq += 1
        now = time.time()
        ev = Event(id=os.urandom(16).hex(), seq=self._seq, type=type, ts=now,
                   local=datetime.fromtimestamp(now, UTC).isoformat(), link_up=True, door=door, user=user,
                   reason=reason, detail=detail or {})  # fmt: skip
        self._events.append(ev)
        if not type.startswith("access."):
            self.link_records += 1
        for cb in self.on_durable:
            cb()
        return ev

    async def read(self, after_seq: int = 0, limit: int = 500) -> list[Event]:
        # events are in seq order: skip the acknowledged head, then take `limit`
        lo, hi = 0, len(self._events)
        while lo < hi:
            mid = (lo + hi) // 2
            if self._events[mid].seq <= after_seq:
                lo = mid + 1
            else:
                hi = mid
        return self._events[lo : lo + limit]

    async def ack(self, upto_seq: int) -> None:
        n = 0
        while n < len(self._events) and self._events[n].seq <= upto_seq:
            n += 1
        del self._events[:n]
        self.acked = max(self.acked, upto_seq)


class MemoryNonces(NonceStore):
    """Command nonces in memory only (the simulator's gateways do not outlive the process)."""

    def __init__(self) -> None:
        super().__init__(Path("/nonexistent/nonces.db"))

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None

    async def close(self) -> None:
        return None

    async def claim(self, cmd: Command) -> tuple[bool, bytes | None]:
        mem = self._memory.get(cmd.nonce)
        if mem is not None:
            return False, mem[1]
        self._memory[cmd.nonce] = (cmd.expires + self.keep_extra_s, None)
        return True, None

    async def set_result(self, nonce: str, result: bytes) -> None:
        exp = self._memory.get(nonce, (0.0, None))[0]
        self._memory[nonce] = (exp, result)

    async def purge(self, now: float) -> int:
        old = [k for k, (exp, _r) in self._memory.items() if exp < now]
        for k in old:
            del self._memory[k]
        return len(old)

    async def count(self) -> int:
        return len(self._memory)


class NoCommands:
    """The `CommandHandler` port: commands are accepted and do nothing (no doors here)."""

    async def unlock(self, door: str, seconds: float) -> None:
        return None

    async def set_door_mode(self, door: str, mode: DoorMode | None) -> None:
        return None

    async def lockdown(self, active: bool) -> None:
        return None

    async def resync(self) -> None:
        return None

    async def reader_command(self, action: ReaderAction) -> Detail:
        raise ValueError("no OSDP reader on this gateway")

    async def reset_anti_passback(self, user: str | None, area: str | None) -> int:
        return 0

    async def area_moves(self, moves: Sequence[AreaMove]) -> int:
        return 0


@dataclass
class SimGateway:
    """One simulated gateway: its link, its store and journal, and when it went offline / online."""

    site: str
    name: str
    link: CloudLink
    rights: MemoryRights
    outbox: MemoryOutbox
    downs: list[float] = field(default_factory=list)
    ups: list[float] = field(default_factory=list)
    #: (time, "host:port") of each connection: which node the gateway was on at a given moment.
    where: list[tuple[float, str]] = field(default_factory=list)

    def on_state(self, up: bool) -> None:
        t = time.time()
        (self.ups if up else self.downs).append(t)
        if up:
            self.where.append((t, self.link.broker))


class Fleet:
    """`async with Fleet(configs, key, state) as fleet: ...`: the gateways' links run as tasks of one loop,
    started `stagger_s` apart (a real fleet does not connect in the same millisecond)."""

    def __init__(self, configs: list[LinkConfig], site_public_key: bytes, state_dir: Path, *,
                 stagger_s: float = 0.002) -> None:  # fmt: skip
        self.configs = configs
        self.key = site_public_key
        self.state_dir = state_dir
        self.stagger_s = stagger_s
        self.gateways: list[SimGateway] = []
        self._stack = AsyncExitStack()
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Self:
        await self._stack.__aenter__()
        for cfg in self.configs:
            rights, outbox = MemoryRights(), MemoryOutbox(cfg.gateway)
            link = CloudLink(cfg, store=rights, journal=outbox, commands=NoCommands(), birth=_birth,
                             site_public_key=self.key, state_dir=self.state_dir / cfg.gateway,
                             nonces=MemoryNonces())  # fmt: skip
            await self._stack.enter_async_context(link)
            g = SimGateway(cfg.site, cfg.gateway, link, rights, outbox)
            link.on_state.append(g.on_state)
            self.gateways.append(g)
        loop = asyncio.get_running_loop()
        for g in self.gateways:
            self._tasks.append(loop.create_task(g.link.run(), name=f"gw[{g.name}]"))
            await asyncio.sleep(self.stagger_s)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        await self._stack.__aexit__(et, e, tb)

    async def stop(self, name: str) -> None:
        """Stop gateway `name`'s link for good (its connection closes; it answers nothing from then on): a
        gateway that went away."""
        i = next(i for i, g in enumerate(self.gateways) if g.name == name)
        await cancel_and_wait(self._tasks[i], ignore=(Exception,))

    def online(self) -> int:
        return sum(1 for g in self.gateways if g.link.online)

    def attempts(self) -> int:
        """Connection attempts of all the links since the start (a measure of retry storms)."""
        return sum(g.link.attempts for g in self.gateways)

    def depth(self) -> int:
        return sum(g.outbox.depth for g in self.gateways)

    async def record_events(self, k: int, *, duration_s: float, steps: int = 10, smooth: bool = False) -> None:
        """Each gateway journals `k` events, spread over `duration_s` in `steps` steps: every gateway at once at
        each step (a burst of the whole fleet's events every `duration_s / steps`). `smooth`: an even flow
        instead, as doors are used: gateway g's j-th event at (j + phase_g) x duration_s / k, its phase drawn
        once (0-1), recorded within 50 ms of its time."""
        if smooth:
            await self._record_smooth(k, duration_s)
            return
        per = [k // steps + (1 if i < k % steps else 0) for i in range(steps)]
        for i, n in enumerate(per):
            for g in self.gateways:
                for _ in range(n):
                    g.outbox.record("access.granted", door="front", user=f"u{i}")
            await asyncio.sleep(duration_s / steps)

    async def _record_smooth(self, k: int, duration_s: float) -> None:
        period = duration_s / k
        rng = random.Random(self.gateways[0].name if self.gateways else 0)
        due = sorted((j + rng.random(), i) for i in range(len(self.gateways)) for j in range(k))
        t0 = time.monotonic()
        at = 0
        while at < len(due):
            now = (time.monotonic() - t0) / period
            while at < len(due) and due[at][0] <= now:
                self.gateways[due[at][1]].outbox.record("access.granted", door="front", user=f"u{at % 10}")
                at += 1
            await asyncio.sleep(0.05)

    def stats(self) -> dict[str, Any]:
        gws = self.gateways
        return {
            "gateways": len(gws),
            "online": self.online(),
            "depth": self.depth(),
            "recorded": sum(g.outbox.recorded for g in gws),
            "recorded_by": {g.name: g.outbox.recorded for g in gws},
            "versions": {g.name: g.rights.version for g in gws},
            "reached": {g.name: g.rights.reached for g in gws},
            "downs": {g.name: g.downs for g in gws},
            "ups": {g.name: g.ups for g in gws},
            "where": {g.name: g.where for g in gws},
            "brokers": {g.name: g.link.broker for g in gws},
            "failovers": sum(g.link.failovers for g in gws),
            "connect_attempts": self.attempts(),
            "link_stats": {k: sum(g.link.stats.get(k, 0) for g in gws) for k in {k for g in gws for k in g.link.stats}},
        }


def _birth() -> Birth:
    return Birth(site="", gateway="", software="fleet-sim", config_hash="sim")
