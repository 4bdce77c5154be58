"""The connection owner: `CloudLink`, the gateway's one MQTT session (5 or 3.1.1) to the site's broker.

Nothing here trusts the broker to keep or deliver anything: aiomqtt acknowledges a QoS 1 message as soon
as it is queued in memory, so every change set, snapshot chunk and command is answered by the gateway's
own reply once its effect is committed to disk, and the cloud resends until it sees that reply. Replies
are idempotent (a duplicate change set, chunk or command gets the same answer again without a second
effect). Events go the other way on the same principle: rows leave the journal only when the cloud's
`EventAck` says it has them; after a reconnect the unacknowledged tail is sent again.

`CloudLink` owns the connection and hands each message to the part that handles it:

- `run()`: the reconnect loop (`mqtt.reconnecting`, jittered backoff) over the broker's endpoints (`host:port`
  first, then `endpoints`: a failed or dropped connection moves to the next one; while away from the first,
  it is probed every `failback_s`, jittered, with an MQTT connect, and the link moves back when it answers);
  per connection a new session id, the birth (retained, and published again on every connect, so presence
  never depends on a retained message being visible on every node of a cluster) and the will (a death), the
  message reader and the event upload; the rights worker lives across connections.
- rights topic -> `rights.RightsSync` (change sets, manifests, chunks; `staging.SnapshotStaging`);
  events/ack -> `upload.EventUpload` (go-back-N); command -> `gate.CommandGate` (signature, nonce, key
  rotation, execution; `gate.SiteKeys` verifies every signed message).

What it needs from the gateway are the ports of `ports.py` (`Rights`, `Outbox`, `CommandHandler`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Self

import aiomqtt
import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from cloud_bridge import mqtt
from cloud_bridge.protocol import Birth, Death, ResyncRequest, encode
from cloud_bridge.settings import LinkConfig
from cloud_bridge.signing import KeyState, NonceStore, fingerprint
from cloud_bridge.topics import Leaf, Topics
from edge.events import Event

from .gate import KEY_FILE, CommandGate, SiteKeys
from .ports import CommandHandler, Outbox, Rights
from .reply import Replies
from .rights import RightsSync
from .staging import SnapshotStaging
from .upload import EventUpload

log = logging.getLogger("cloud_bridge.link")

#: At most one "unexpected topic" warning per this many seconds (the others are counted).
UNEXPECTED_LOG_S = 60.0


class CloudLink:
    """The gateway's MQTT link. `async with CloudLink(...) as link: await link.run()`."""

    def __init__(
        self,
        cfg: LinkConfig,
        *,
        store: Rights,
        journal: Outbox,
        commands: CommandHandler,
        birth: Callable[[], Birth],
        site_public_key: bytes,
        state_dir: Path,
        clock: Callable[[], float] = time.time,
        nonces: NonceStore | None = None,
    ) -> None:
        if cfg.downlink_filter == "one" and cfg.mqtt_version != "5":
            raise ValueError('link.downlink_filter = "one" needs mqtt_version = "5" (No Local is MQTT 5 only)')
        self.cfg = cfg
        self.store = store
        self.journal = journal
        self.commands = commands
        self.birth = birth
        self.state_dir = Path(state_dir)
        self.key_path = self.state_dir / KEY_FILE
        self.clock = clock
        self.topics = Topics(cfg.site, cfg.gateway)
        self._keys = SiteKeys(cfg, site_public_key, self.key_path, self._now)
        self.config_key = self._keys.configured
        #: Called with the new state whenever the link goes online or offline.
        self.on_state: list[Callable[[bool], None]] = []
        self._online = False
        self._offline_since: datetime | None = datetime.fromtimestamp(clock(), UTC)
        self._session = 0
        self._last_birth = -1e18
        self._background: set[asyncio.Task[bool]] = set()
        self._replies = Replies(cfg, self.topics, journal)
        self.stats = self._replies.stats
        self._unexpected_logged = -UNEXPECTED_LOG_S  # monotonic time of the last such warning
        self._unexpected_at_log = 0  # stats["unexpected_topic"] then
        #: The broker's nodes, in order of preference (`host:port`, then `endpoints`); `_at` is the one in use
        #: (or tried next).
        self.endpoints = [(cfg.host, cfg.port), *(mqtt.parse_endpoint(e) for e in cfg.endpoints)]
        self._at = 0
        self._connected_at: int | None = None
        #: The endpoints still to try in the current round of failovers (`failover`: shuffled or as listed).
        self._round: list[int] = []
        #: Connections made to each endpoint (index), and failovers (a connection failed or dropped).
        self.connects = [0] * len(self.endpoints)
        self.failovers = 0
        #: Connection attempts in a row whose setup did not complete (connect, subscriptions, birth): the
        #: reconnect delay and the setup timeout grow per round of endpoints while they fail.
        self.failed_setups = 0
        #: Of those, the ones that ran out of their setup timeout (a broker too slow, not one that refused).
        self.timed_out_setups = 0
        #: Connection attempts since the start (set up or not).
        self.attempts = 0
        #: MQTT connects made to probe the first endpoint while on another (`_failback`).
        self.failback_probes = 0
        self._set_up = False
        self._attempt = (0.0, 0.0)  # (monotonic start, setup timeout) of the current attempt
        # the delay grows per round of endpoints: a failed node is followed by the next one at once (0.5-1 x
        # backoff_min_s), not after a delay doubled by the node that just failed
        self._backoff = mqtt.Backoff(cfg.backoff_min_s, cfg.backoff_max_s, per_round=len(self.endpoints),
                                     spread=cfg.reconnect_spread_s)  # fmt: skip
        # the command nonces on disk; a simulator may pass a lighter store (same interface)
        self._nonces = nonces or NonceStore(self.state_dir / "link-nonces.db", synchronous=cfg.synchronous)
        self._staging = SnapshotStaging(self.state_dir / "link-snapshot", max_bytes=cfg.snapshot_max_bytes)
        self._gate = CommandGate(cfg, keys=self._keys, nonces=self._nonces, replies=self._replies,
                                 outbox=journal, rights=store, commands=commands, rebirth=self._publish_birth,
                                 clock=self._now)  # fmt: skip
        self._rights = RightsSync(cfg, rights=store, staging=self._staging, keys=self._keys, replies=self._replies,
                                  rebirth=self._rebirth, clock=self._now)  # fmt: skip
        self._upload = EventUpload(cfg, outbox=journal, keys=self._keys, replies=self._replies)
        #: Called with (cloud UTC time, round trip s) from each timestamped event acknowledgement.
        self.on_cloud_time: list[Callable[[float, float], None]] = self._upload.on_cloud_time

    def _now(self) -> float:
        """`clock()`, read at each use (the parts of the link keep this, so a new `clock` reaches them all)."""
        return self.clock()

    # --- lifecycle --------------------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        await self._keys.load()
        await self._nonces.__aenter__()
        await self._staging.__aenter__()
        await self._nonces.purge(self.clock())
        self.journal.on_durable.append(self._upload.wake)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        with contextlib.suppress(ValueError):
            self.journal.on_durable.remove(self._upload.wake)
        await self._gate.close()
        await self._staging.close()
        await self._nonces.close()

    @property
    def online(self) -> bool:
        return self._online

    @property
    def tls(self) -> bool:
        return bool(self.cfg.ca or self.cfg.cert)

    def warnings(self) -> list[str]:
        """What the link itself must tell the operator (in the birth, and logged at start)."""
        out = []
        if not self.tls:
            where = ", ".join(f"{h}:{p}" for h, p in self.endpoints)
            out.append(f"plain MQTT without TLS to {where}: the broker, and anyone on the "
                       "network path, can read events; only signatures protect the doors")  # fmt: skip
        if self._nonces.degraded:
            out.append(f"command nonces: {self._nonces.degraded}")
        if self.store.needs_snapshot is not None:
            out.append(f"rights {self.store.needs_snapshot}: running on the last verified copy (or none) until a "
                       "snapshot arrives")  # fmt: skip
        return out

    @property
    def key_state(self) -> KeyState:
        """The command key(s) this gateway holds (public keys only)."""
        return self._keys.state

    @property
    def public_key(self) -> Ed25519PublicKey:
        """The key commands must be signed with now."""
        return self._keys.public_key

    @property
    def offline_since(self) -> datetime | None:
        return self._offline_since

    def _set_online(self, up: bool) -> None:
        if up == self._online:
            return
        self._online = up
        self._offline_since = None if up else datetime.fromtimestamp(self.clock(), UTC)
        log.info("cloud link %s", "online" if up else "offline")
        for cb in self.on_state:
            cb(up)

    # --- the reconnect loop -----------------------------------------------------------------------------

    @property
    def broker(self) -> str:
        """The endpoint ("host:port") of the connection in use, "" when offline."""
        if self._connected_at is None:
            return ""
        host, port = self.endpoints[self._connected_at]
        return f"{host}:{port}"

    async def _connect(self) -> aiomqtt.Client:
        cfg = self.cfg
        self._session = int(self.clock() * 1000)
        death = Death(site=cfg.site, gateway=cfg.gateway, session=self._session, ts=self.clock())
        host, port = self.endpoints[self._at]
        self.attempts += 1
        persistent = cfg.session == "persistent"
        # A clean session names each connection apart (the session number): RabbitMQ 3.10 never lets a client
        # id whose last connection was on a node that died connect again elsewhere (measured: the CONNECT
        # times out until that node is back; docs/scaling.md); a persistent session must keep its one name.
        ident = f"acs-{cfg.site}-{cfg.gateway}" + ("" if persistent else f"-{self._session:x}")
        c = self._client(
            host, port, ident, timeout=self.setup_timeout_s,
            # persistent: keep the broker session across restarts (the default wipes it)
            clean_start=not persistent, session_expiry_s=cfg.session_expiry_s if persistent else None,
            will=aiomqtt.Will(self.topics.status, encode(death, cfg.encoding), qos=1, retain=True),
        )  # fmt: skip
        self._attempt = (time.monotonic(), self.setup_timeout_s)
        try:
            client = await mqtt.connect(c)
        except aiomqtt.MqttError:
            self._next_endpoint()
            raise
        self._connected_at = self._at
        self.connects[self._at] += 1
        return client

    def _client(self, host: str, port: int, identifier: str, *, timeout: float, clean_start: bool | None = None,
                session_expiry_s: int | None = None, will: aiomqtt.Will | None = None) -> aiomqtt.Client:  # fmt: skip
        """A client with this link's broker credentials, TLS, keepalive and MQTT version (not connected yet)."""
        cfg = self.cfg
        return mqtt.client(
            host, port, identifier=identifier,
            tls=mqtt.tls_params(cfg.ca, cfg.cert, cfg.key), username=cfg.username, password=cfg.password,
            keepalive=cfg.keepalive_s, version=cfg.mqtt_version, timeout=timeout, clean_start=clean_start,
            session_expiry_s=session_expiry_s, will=will, housekeeping_s=cfg.housekeeping_s,
        )  # fmt: skip

    @property
    def setup_timeout_s(self) -> float:
        """The next connection's setup timeout: `connect_timeout_s`, doubled by every setup in a row that ran
        out of it (a refused or reset connection does not count: that node is down, not slow), at most
        `connect_timeout_max_s`."""
        n = min(self.timed_out_setups, 30)
        return min(self.cfg.connect_timeout_max_s, self.cfg.connect_timeout_s * (1 << n))

    def _next_endpoint(self) -> None:
        """Move on to the next endpoint of this round of failovers: each other endpoint once, in a random order
        (`failover = "spread"`) or as listed, then a new round."""
        n = len(self.endpoints)
        if n > 1:
            if not self._round:
                self._round = [(self._at + k) % n for k in range(1, n)]
                if self.cfg.failover == "spread":
                    random.shuffle(self._round)
            self._at = self._round.pop(0)
            self.failovers += 1

    def _down(self) -> None:
        self._replies.client = None
        if not self._set_up:
            self.failed_setups += 1
            started, timeout = self._attempt
            if time.monotonic() - started >= 0.9 * timeout:
                self.timed_out_setups += 1
        self._set_up = False
        if self._connected_at is not None:
            # the connection dropped: the node may be gone, so the next attempt goes to the next one (unless
            # this is a move back to the first, set by `_failback`)
            if self._at == self._connected_at:
                self._next_endpoint()
            self._connected_at = None
        self._set_online(False)

    async def _failback(self) -> None:
        """While connected to another endpoint than the first: probe the first every `failback_s` (x 0.5-1.5,
        so that a fleet does not move back at once) and, when it answers, end this connection (the reconnect
        loop then connects to the first). The probe is a whole MQTT connect (CONNACK within
        `connect_timeout_s`, no will, no subscription, a client id of its own), not a TCP connect: an overloaded
        broker still accepts TCP connections it cannot serve, and moving back on those would drop a working
        connection for one that times out, again at every probe."""
        while True:
            await asyncio.sleep(self.cfg.failback_s * random.uniform(0.5, 1.5))
            host, port = self.endpoints[0]
            if await self._answers(host, port):
                self._at, self._round = 0, []
                raise aiomqtt.MqttError(f"moving back to the first broker endpoint {host}:{port}")

    async def _answers(self, host: str, port: int) -> bool:
        """Whether the broker at host:port accepts an MQTT connection within `connect_timeout_s` (closed again
        at once)."""
        cfg = self.cfg
        self.failback_probes += 1
        c = self._client(host, port, f"acs-{cfg.site}-{cfg.gateway}-probe-{random.getrandbits(32):08x}",
                         timeout=cfg.connect_timeout_s)  # fmt: skip
        try:
            async with asyncio.timeout(cfg.connect_timeout_s + 1):
                await mqtt.connect(c)
        except (aiomqtt.MqttError, OSError, TimeoutError):
            return False
        await mqtt.close(c)
        return True

    async def run(self) -> None:
        """Connect, serve, reconnect with jittered backoff; returns only when cancelled."""
        for w in self.warnings():
            log.warning("cloud link: %s", w)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._rights.run(), name="link.rights")
            # the backoff is reset only once a connection is set up (`_serve`): CONNACKs followed by failed
            # subscriptions are retried ever more slowly, not at backoff_min_s each time
            await mqtt.reconnecting(self._connect, self._serve, self._backoff, log=log, what="cloud link",
                                    down=self._down, reset_on_connect=False)  # fmt: skip

    def send_urgent(self, ev: Event) -> None:
        """Send an urgent event (`alarm.duress`) ahead of the backlog (`EventUpload.urgent`, the priority lane)."""
        self._upload.urgent(ev)

    def request_snapshot(self) -> None:
        """Ask the cloud for a snapshot now if connected (and at every connect while the store needs one)."""
        reason = self.store.needs_snapshot
        if reason is not None and self._replies.client is not None:
            msg = ResyncRequest(have=self.store.version, reason=reason)  # type: ignore[arg-type]
            task = asyncio.get_running_loop().create_task(self._replies.publish(Leaf.RIGHTS_REPLY, msg),
                                                          name="link.resync")  # fmt: skip
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _serve(self, client: aiomqtt.Client) -> None:
        if self.cfg.downlink_filter == "one":  # one subscription for the whole downlink (docs/scaling.md)
            await mqtt.subscribe_no_local(client, self.topics.tree, qos=self.cfg.downlink_qos)
        else:
            for topic in self.topics.downlink():
                await client.subscribe(topic, qos=self.cfg.downlink_qos)
        self._replies.client = client
        await self._publish_birth()
        self._set_up = True
        self._round = []  # the next drop starts a new round of failovers
        self.failed_setups = self.timed_out_setups = 0
        self._backoff.reset()
        self._set_online(True)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._upload.run(client), name="link.upload")
                tg.create_task(self._read(client), name="link.read")
                if self._connected_at:  # not on the first endpoint
                    tg.create_task(self._failback(), name="link.failback")
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                d = Death(site=self.cfg.site, gateway=self.cfg.gateway, session=self._session, ts=self.clock(),
                          reason="shutdown")  # fmt: skip
                async with asyncio.timeout(2.0):
                    await mqtt.publish(client, self.topics.status, encode(d, self.cfg.encoding), retain=True)
            raise

    async def _publish_birth(self) -> None:
        b = msgspec.structs.replace(
            self.birth(),
            site=self.cfg.site,
            gateway=self.cfg.gateway,
            session=self._session,
            ts=self.clock(),
            rights_version=self.store.version,
            journal_depth=self.journal.depth,
            encoding=self.cfg.encoding,
            max_message_bytes=self.cfg.max_message_bytes,
            key=fingerprint(self._keys.in_use()),
            tls=self.tls,
            warnings=[*self.birth().warnings, *self.warnings()],
            mqtt=self.cfg.mqtt_version,
            broker=self.broker,
        )
        await self._replies.publish(Leaf.STATUS, b, retain=True)
        if self.store.needs_snapshot is not None:
            # damaged rights were replaced by the last verified copy (or nothing): the cloud must resend all.
            # Asked with every birth (at connect and on a rebirth request), so a cloud that was not yet
            # subscribed when the gateway connected learns it by asking for a birth.
            await self._replies.publish(Leaf.RIGHTS_REPLY, ResyncRequest(
                have=self.store.version, reason=self.store.needs_snapshot))  # type: ignore[arg-type]  # fmt: skip

    async def _rebirth(self) -> None:
        """A birth on request, at most once a second (a replayed signed rebirth cannot flood the broker)."""
        now = time.monotonic()
        if now - self._last_birth < 1.0:
            return
        self._last_birth = now
        await self._publish_birth()

    # --- incoming ---------------------------------------------------------------------------------------

    def _unexpected(self, topic: str) -> None:
        """A message on a topic the link does not read (with `downlink_filter = "one"`, anything another client
        publishes under the gateway's tree, e.g. on its events topic): counted, and logged at most once a
        minute with the count since, so that a flood of them is not a flood of log lines."""
        self.stats["unexpected_topic"] += 1
        now = time.monotonic()
        if now - self._unexpected_logged >= UNEXPECTED_LOG_S:
            n = self.stats["unexpected_topic"] - self._unexpected_at_log
            self._unexpected_logged, self._unexpected_at_log = now, self.stats["unexpected_topic"]
            log.warning("message on unexpected topic %s ignored (%d since the last such warning)", topic, n)

    async def _read(self, client: aiomqtt.Client) -> None:
        async for m in client.messages:
            leaf = self.topics.parse(m.topic.value)
            payload = mqtt.payload(m)
            try:
                if leaf is Leaf.RIGHTS:
                    self._rights.offer(payload)
                elif leaf is Leaf.EVENTS_ACK:
                    await self._upload.on_event_ack(payload)
                elif leaf is Leaf.COMMAND:
                    await self._gate.on_command(payload)
                else:
                    self._unexpected(m.topic.value)
            except (aiomqtt.MqttError, asyncio.CancelledError):
                raise
            except Exception:
                # One message never takes the link down: say so loudly and read the next one.
                self.stats["handler_errors"] += 1
                log.exception("message on %s failed", m.topic.value)
