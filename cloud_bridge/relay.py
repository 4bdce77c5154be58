"""Cross-gateway anti-passback (issue 19): the cloud relays each gateway's passages to the site's other gateways.

A gateway journals every passage between areas as an `area.passage` event (user, `to` area, `at`); it reaches
the cloud with the event upload. `AreaRelay` watches the event batches of every gateway of a site (one
`CloudPeer` each) and sends each passage to every other gateway of the site as a signed `AreaMoves` command
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
from collections.abc import Mapping
from functools import partial

import msgspec

from edge.events import AREA_PASSAGE

from .cloud import CloudError, CloudPeer
from .protocol import AreaMove, AreaMoves, Birth, EventBatch

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


class AreaRelay:
    """Relays passages between the gateways of one site; `peers` maps each gateway to its `CloudPeer`.
    `async with` it (or run `run()` as a task) while the peers are connected."""

    def __init__(self, peers: Mapping[str, CloudPeer], *, operator: str = "area-relay", ttl_s: float = 300.0,
                 retry_s: float = 2.0) -> None:  # fmt: skip
        self.peers = dict(peers)
        self.operator = operator
        self.ttl_s = ttl_s
        self.retry_s = retry_s
        #: target gateway -> user -> the latest passage it has not confirmed yet
        self.pending: dict[str, dict[str, AreaMove]] = {gw: {} for gw in self.peers}
        self.relayed = 0  # moves confirmed by their target
        self._wake = {gw: asyncio.Event() for gw in self.peers}
        self._task: asyncio.Task[None] | None = None
        for gw, peer in self.peers.items():
            peer.on_events.append(partial(self._batch, gw))

    def _batch(self, gw: str, b: EventBatch) -> None:
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

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            for gw in self.peers:
                tg.create_task(self._serve(gw), name=f"relay[{gw}]")

    async def __aenter__(self) -> AreaRelay:
        self._task = asyncio.get_running_loop().create_task(self.run(), name="area-relay")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _serve(self, gw: str) -> None:
        peer, pending, wake = self.peers[gw], self.pending[gw], self._wake[gw]
        while True:
            if not pending:
                wake.clear()
                await wake.wait()
                continue
            if not isinstance(peer.status, Birth):  # offline: wait for its birth (the moves stay pending)
                with contextlib.suppress(TimeoutError):
                    await peer.wait_online(timeout=self.retry_s)
                continue
            moves = list(pending.values())[:MAX_MOVES]
            try:
                r = await peer.command(AreaMoves(moves=moves), operator=self.operator, ttl_s=self.ttl_s,
                                       timeout=self.ttl_s)  # fmt: skip
            except (CloudError, TimeoutError) as e:
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
