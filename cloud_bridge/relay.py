"""Cross-gateway anti-passback (issue 19): the cloud relays each gateway's passages to the site's other gateways.

A gateway journals every passage between areas as an `area.passage` event (user, `to` area, `at`); it reaches
the cloud with the event upload. `AreaRelay` watches the event batches of every gateway of a site (one
`CloudPeer` each, or the event collector's: `cloud-bridge collect --relay-areas`) and sends each passage to
every other gateway of the site as a signed `AreaMoves` command
(signed like every downlink, replay-checked by its nonce, answered by a `CommandResult`). The gateway applies
a move unless it saw that user pass later (the latest passage wins), so resends and reordering are harmless.

Eventually consistent: per target gateway the relay keeps the latest passage of each user not yet confirmed,
and sends them (at most 1,000 per command) whenever that gateway is online, again until it answers ok. What
is pending lives in the relay's memory: a relay restarted loses it (the gateways then know only their own
passages until the user passes again). docs/model.md, "Across gateways", says what a user can and cannot do
during a partition.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from functools import partial

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge.events import AREA_PASSAGE

from .cloud import CloudPeer
from .errors import CloudBridgeError
from .operator.provision import SiteLink
from .protocol import AreaMove, AreaMoves, Birth, CommandResult, EventBatch

log = logging.getLogger("cloud_bridge.relay")

#: Moves per `AreaMoves` command (the protocol's limit).
MAX_MOVES = 1000


def move_of(gateway: str, ev_user: str | None, detail: Mapping[str, object]) -> AreaMove | None:
    """The move an `area.passage` event describes, or None when it does not describe a valid one (a bad
    event is skipped: one gateway's malformed event must not block the moves of the others)."""
    try:
        return msgspec.convert(
            {"user": ev_user, "area": detail.get("to"), "ts": detail.get("at"), "gateway": gateway}, AreaMove
        )
    except msgspec.ValidationError as e:
        log.warning("area.passage from %s skipped: %s", gateway, e)
        return None


#: Sends one `AreaMoves` command to a gateway (signed with the site key) and returns its result.
Send = Callable[[str, AreaMoves], Awaitable[CommandResult]]


class AreaRelay:
    """Relays passages between the gateways of one site. `observe(gateway, batch)` takes each event batch a
    gateway sent; `send` carries a signed `AreaMoves` to a gateway and returns its result, `online` says
    whether a gateway is connected. `over_peers` builds one over `CloudPeer`s (one per gateway);
    `cloud-bridge collect --relay-areas` runs one beside the event collector. `async with` it (or run
    `run()` as a task)."""

    def __init__(self, gateways: Iterable[str], *, send: Send, online: Callable[[str], bool],
                 retry_s: float = 2.0) -> None:  # fmt: skip
        self.send = send
        self.online = online
        self.retry_s = retry_s
        #: target gateway -> user -> the latest passage it has not confirmed yet
        self.pending: dict[str, dict[str, AreaMove]] = {gw: {} for gw in gateways}
        self.relayed = 0  # moves confirmed by their target
        self._wake = {gw: asyncio.Event() for gw in self.pending}
        self._task: asyncio.Task[None] | None = None
        self._tg: asyncio.TaskGroup | None = None

    @classmethod
    def over_peers(cls, peers: Mapping[str, CloudPeer], *, operator: str = "area-relay", ttl_s: float = 300.0,
                   retry_s: float = 2.0) -> AreaRelay:  # fmt: skip
        """A relay over one `CloudPeer` per gateway (their event batches in, their commands out)."""

        async def send(gw: str, moves: AreaMoves) -> CommandResult:
            return await peers[gw].command(moves, operator=operator, ttl_s=ttl_s, timeout=ttl_s)

        relay = cls(peers, send=send, online=lambda gw: isinstance(peers[gw].status, Birth), retry_s=retry_s)
        for gw, peer in peers.items():
            peer.on_events.append(partial(relay.observe, gw))
        return relay

    @classmethod
    def over_site_link(cls, link: SiteLink, key: Ed25519PrivateKey, gateways: Iterable[str], *,
                       operator: str = "area-relay", ttl_s: float = 300.0,
                       retry_s: float = 2.0) -> AreaRelay:  # fmt: skip
        """A relay whose commands go through the operator's `SiteLink` (signed with the site key `key`); feed
        it the event collector's batches (`Collector.on_batch`)."""

        async def send(gw: str, moves: AreaMoves) -> CommandResult:
            return await link.command(gw, key, moves, operator=operator, ttl_s=ttl_s, timeout=ttl_s)

        return cls(gateways, send=send, online=link.online, retry_s=retry_s)

    def observe(self, gw: str, b: EventBatch) -> None:
        """An event batch from gateway `gw`: its passages are queued for the site's other gateways."""
        if gw not in self.pending:
            self.add_gateway(gw)
        for ev in b.events:
            if ev.type != AREA_PASSAGE:
                continue
            move = move_of(gw, ev.user, ev.detail)
            if move is None:
                continue
            for other, pending in self.pending.items():
                if other == gw:
                    continue
                have = pending.get(move.user)
                if have is None or have.ts < move.ts:
                    pending[move.user] = move
                    self._wake[other].set()

    def add_gateway(self, gw: str) -> None:
        """A gateway the relay did not know (a new one of the site): it gets the passages seen from now on."""
        if gw not in self.pending:
            self.pending[gw] = {}
            self._wake[gw] = asyncio.Event()
            if self._tg is not None:
                self._tg.create_task(self._serve(gw), name=f"relay[{gw}]")

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            for gw in self.pending:
                tg.create_task(self._serve(gw), name=f"relay[{gw}]")
            await asyncio.Event().wait()  # until cancelled: `add_gateway` adds tasks to this group

    async def __aenter__(self) -> AreaRelay:
        self._task = asyncio.get_running_loop().create_task(self.run(), name="area-relay")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _serve(self, gw: str) -> None:
        pending, wake = self.pending[gw], self._wake[gw]
        while True:
            if not pending:
                wake.clear()
                await wake.wait()
                continue
            if not self.online(gw):  # offline: the moves stay pending until it is back
                await asyncio.sleep(self.retry_s)
                continue
            moves = list(pending.values())[:MAX_MOVES]
            try:
                r = await self.send(gw, AreaMoves(moves=moves))
            except (CloudBridgeError, TimeoutError, OSError) as e:
                log.info("relay to %s: %s; retrying", gw, e or type(e).__name__)
                await asyncio.sleep(self.retry_s)
                continue
            if not r.ok:
                log.error("relay to %s refused: %s", gw, r.error)
                await asyncio.sleep(self.retry_s)
                continue
            for m in moves:
                if pending.get(m.user) is m:  # not superseded meanwhile
                    del pending[m.user]
            self.relayed += len(moves)
