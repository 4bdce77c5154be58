"""The MQTT plumbing every cloud_bridge client shares: the gateway's link (`link.CloudLink`), the operator's
site link (`operator.provision.SiteLink`), the event collector (`operator.collector.Collector`) and the test
and benchmark peer (`cloud.CloudPeer`).

- `client`: an MQTT 5 or 3.1.1 client (aiomqtt) with TLS, credentials, keepalive, session and will as given.
- `publish`: QoS 1, optionally retained, optionally with an MQTT 5 message expiry (left out on 3.1.1).
- `parse_endpoint`: "host:port" -> (host, port).
- `Backoff`: the one reconnect delay formula (jittered exponential).
- `reconnecting`: the reconnect loop: connect, serve until the connection drops, wait, connect again; it
  returns only when cancelled (aiomqtt `docs/reconnection.md`: reconnect outside the client).
- `Session`: a client, its reader task and `wait_for(condition)`: the base of `CloudPeer` and `SiteLink`.

No protocol here: topics and messages are `topics.py` and `protocol.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from types import TracebackType
from typing import Any, Literal, NoReturn

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from cloud_bridge.errors import CloudBridgeError
from edge.tasks import cancel_and_wait

#: How long connecting, subscribing and publishing may take before aiomqtt gives up (seconds).
TIMEOUT_S = 10

#: The MQTT versions a client speaks ("5": Mosquitto, NATS, RabbitMQ >= 3.13; "3.1.1": RabbitMQ 3.10).
Version = Literal["5", "3.1.1"]
#: The version of each client made by `client` (`publish` leaves MQTT 5 properties out on 3.1.1).
_versions: weakref.WeakKeyDictionary[aiomqtt.Client, Version] = weakref.WeakKeyDictionary()


def parse_endpoint(text: str) -> tuple[str, int]:
    """ "host:port" (or "[v6]:port") -> (host, port); ValueError naming the text when it is not one."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"broker endpoint {text!r}: expected host:port")
    return host, int(port)


def tls_params(ca: str | None, cert: str | None, key: str | None) -> aiomqtt.TLSParameters | None:
    """TLS when a CA bundle or a client certificate is given (PEM paths), else None (plain MQTT)."""
    if ca or cert:
        return aiomqtt.TLSParameters(ca_certs=ca, certfile=cert, keyfile=key)
    return None


class _Client(aiomqtt.Client):
    """aiomqtt's client with its housekeeping (paho's `loop_misc`: a PINGREQ due, a PINGRESP overdue, a
    socket gone), which aiomqtt runs once a second, run every `housekeeping_s` instead."""

    housekeeping_s = 1.0

    async def _misc_loop(self) -> None:
        while self._client.loop_misc() == paho.MQTT_ERR_SUCCESS:  # noqa: ASYNC110  (a period, not a condition)
            await asyncio.sleep(self.housekeeping_s)


if not callable(getattr(aiomqtt.Client, "_misc_loop", None)):  # pragma: no cover  (aiomqtt is pinned < 3)
    raise ImportError("aiomqtt.Client has no _misc_loop: cloud_bridge.mqtt._Client needs a look")


def client(
    host: str, port: int, *, identifier: str, tls: aiomqtt.TLSParameters | None = None, username: str | None = None,
    password: str | None = None, keepalive: int | None = None, clean_start: bool | None = None,
    session_expiry_s: int | None = None, will: aiomqtt.Will | None = None, version: Version = "5",
    timeout: float = TIMEOUT_S, housekeeping_s: float = 1.0, pending_warn: int = 10,
) -> aiomqtt.Client:  # fmt: skip
    """An MQTT client (not connected yet: `async with` it, or `connect`) of `version`. Options left None keep
    aiomqtt's defaults. `clean_start` is MQTT 5's clean start or 3.1.1's clean session; `session_expiry_s`
    is the MQTT 5 session expiry sent with the CONNECT (3.1.1 has none: a persistent session lasts as long as
    the broker keeps it). `timeout`: how long a CONNACK, SUBACK or PUBACK may take (aiomqtt's default for
    every call on the client). `housekeeping_s`: how often the client checks its keepalive (aiomqtt: every
    second); a ping then goes out up to that late, and a broker that stopped answering is noticed up to that
    late. Longer only where thousands of clients share one loop (the fleet simulator: each check is a timer
    and a wake-up per client). `pending_warn`: aiomqtt logs a warning on every publish made while more than
    this many are unanswered (its default 10); a cloud process that publishes to thousands of gateways has
    hundreds in flight by design, and the warnings were most of its log (54,000 lines in one fleet run)."""
    kw: dict[str, object] = {}
    if keepalive is not None:
        kw["keepalive"] = keepalive
    if version == "5":
        if clean_start is not None:
            kw["clean_start"] = clean_start
        if session_expiry_s is not None:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = session_expiry_s
            kw["properties"] = props
    elif clean_start is not None:
        kw["clean_session"] = clean_start
    proto = aiomqtt.ProtocolVersion.V5 if version == "5" else aiomqtt.ProtocolVersion.V311
    c = _Client(
        host, port, identifier=identifier, protocol=proto, will=will, tls_params=tls,
        username=username, password=password, timeout=timeout, **kw,  # type: ignore[arg-type]
    )  # fmt: skip
    c.housekeeping_s = housekeeping_s
    if not hasattr(c, "pending_calls_threshold"):  # aiomqtt 2.x's name; fail loudly, not silently warn again
        raise RuntimeError("aiomqtt.Client has no pending_calls_threshold: mqtt.client(pending_warn=) needs updating")
    c.pending_calls_threshold = pending_warn
    _versions[c] = version
    return c


def version_of(c: aiomqtt.Client) -> Version:
    """The MQTT version `c` speaks (a client not made by `client` is taken as MQTT 5, aiomqtt's choice here)."""
    return _versions.get(c, "5")


async def connect(c: aiomqtt.Client, subscriptions: Iterable[str] = (), *, qos: int = 1) -> aiomqtt.Client:
    """Connect `c` and subscribe to `subscriptions` (QoS 1, or `qos`); when a subscription fails, disconnect and
    raise. A connect that fails (a CONNACK timeout, a refusal, a cancel) closes its socket at once: aiomqtt
    leaves it open, so an overloaded broker would go on serving connections the client has given up on."""
    try:
        await c.__aenter__()
    except BaseException:
        _abandon(c)
        raise
    try:
        for topic in subscriptions:
            await c.subscribe(topic, qos=qos)
    except BaseException:
        await close(c)
        raise
    return c


async def subscribe_no_local(c: aiomqtt.Client, topic: str, *, qos: int) -> None:
    """Subscribe with MQTT 5's No Local (nothing this connection publishes comes back) and retain handling 2
    (no retained messages at subscribe: a gateway's own retained status). MQTT 5 only."""
    if version_of(c) != "5":
        raise ValueError("No Local needs MQTT 5")
    await c.subscribe(topic, options=SubscribeOptions(qos=qos, noLocal=True, retainHandling=2))


def _abandon(c: aiomqtt.Client) -> None:
    """Close the socket of a client whose connect failed (paho's own close: it unregisters the socket from
    aiomqtt's loop first). Private to paho 2.x; checked by tests/test_link_connect.py."""
    with contextlib.suppress(Exception):
        c._client._sock_close()


async def close(c: aiomqtt.Client) -> None:
    """Disconnect (a connection already lost is not an error)."""
    with contextlib.suppress(aiomqtt.MqttError):
        await c.__aexit__(None, None, None)


async def publish(c: aiomqtt.Client, topic: str, payload: bytes, *, retain: bool = False,
                  expiry_s: int | None = None, qos: int = 1) -> None:  # fmt: skip
    """Publish at QoS 1 (or `qos`: 0 where the application resends until its own acknowledgement); with
    `expiry_s`, the broker drops the message when it is not delivered in time (MQTT 5 message expiry: a
    command is never delivered after its lifetime). On MQTT 3.1.1 the expiry is left out: nothing depends on
    it (a command carries its own signed `expires`, checked by the gateway)."""
    props = None
    if expiry_s is not None and version_of(c) == "5":
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.MessageExpiryInterval = expiry_s
    await c.publish(topic, payload, qos=qos, retain=retain, properties=props)


def payload(m: aiomqtt.Message) -> bytes:
    """A received message's payload as bytes."""
    return m.payload if isinstance(m.payload, bytes) else str(m.payload).encode()


class Backoff:
    """Jittered exponential backoff: the n-th delay (from 0) is uniform in [lo/2, min(hi, lo * 2**n)] (full
    jitter above a floor of lo/2, so that a fleet reconnecting after a broker restart spreads out and never
    spins). With `per_round` k (a client with k broker endpoints, trying the next after each failure), n counts
    whole rounds: the delay grows only after every endpoint has failed once more, so that one dead or stalled
    node does not push back the attempt on the next. `spread`: the first delay (n = 0) is uniform in
    [lo/2, max(lo, spread)] instead: the clients of a node that died do not all retry within `lo`.
    `reset()` after a success starts again from `lo` (and the spread)."""

    def __init__(self, lo: float, hi: float, rng: random.Random | None = None, *, per_round: int = 1,
                 spread: float = 0.0) -> None:  # fmt: skip
        self.lo, self.hi = lo, hi
        self.per_round = max(1, per_round)
        self.spread = spread
        self._rng = rng or random.Random()
        self._n = 0  # failures since the last reset

    def __call__(self) -> float:
        """The next delay."""
        if self._n == 0 and self.spread > self.lo:
            self._n = 1
            return self._rng.uniform(self.lo / 2, self.spread)
        cap = min(self.hi, self.lo * (2 ** min(self._n // self.per_round, 30)))
        self._n = min(self._n + 1, 30 * self.per_round)
        return self._rng.uniform(self.lo / 2, cap)

    def reset(self) -> None:
        self._n = 0


async def reconnecting(
    connect: Callable[[], Awaitable[aiomqtt.Client]], serve: Callable[[aiomqtt.Client], Awaitable[None]],
    backoff: Backoff, *, log: logging.Logger, what: str, first: aiomqtt.Client | None = None,
    down: Callable[[], None] | None = None, reset_on_connect: bool = True,
) -> NoReturn:  # fmt: skip
    """Serve MQTT connections for ever: `connect()` (a connected client; or `first`, already connected), then
    `serve(client)` until the connection drops (an `aiomqtt.MqttError`, also inside an exception group, is
    logged as "`what`: error"; anything else propagates), then `down()`, disconnect, and wait `backoff()`
    before the next attempt. The backoff is reset by every successful connect, or (`reset_on_connect`
    False) by `serve` itself once its connection is set up: a broker that accepts connections and then
    fails their subscriptions is not retried at the shortest delay each time. Returns only when cancelled
    (the client is disconnected then too)."""
    pending = first
    while True:
        c, pending = pending, None
        try:
            if c is None:
                c = await connect()
                if reset_on_connect:
                    backoff.reset()
            await serve(c)
        except* aiomqtt.MqttError as eg:
            log.warning("%s: %s", what, eg.exceptions[0])
        finally:
            if down is not None:
                down()
            if c is not None:
                await close(c)
        await asyncio.sleep(backoff())


class Session:
    """One connected client, the task that reads it, and `wait_for`: the base of the cloud side's clients
    (`cloud.CloudPeer`, `operator.provision.SiteLink`). A subclass connects (`_client`), starts its reader with
    `_start_reader` and calls `_changed_now()` after each message it handles; leaving (`__aexit__`) stops the
    reader and disconnects."""

    #: How often `wait_for` re-checks a condition that no message changes.
    poll_s = 0.05

    def __init__(self) -> None:
        self._client: aiomqtt.Client | None = None
        self._reader: asyncio.Task[None] | None = None
        self._changed = asyncio.Condition()

    def _not_connected(self) -> Exception:
        return CloudBridgeError("not connected to the broker")

    @property
    def client(self) -> aiomqtt.Client:
        if self._client is None:
            raise self._not_connected()
        return self._client

    def _start_reader(self, reader: Coroutine[Any, Any, None], name: str) -> None:
        self._reader = asyncio.get_running_loop().create_task(reader, name=name)

    async def _changed_now(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def wait_for(self, pred: Callable[[], Any], timeout: float = 30.0, *, poll_s: float | None = None) -> Any:  # noqa: ASYNC109
        """Wait until `pred()` returns something truthy (re-checked after every message, and every `poll_s`
        for conditions that do not depend on messages); return it. Raises TimeoutError."""
        async with asyncio.timeout(timeout), self._changed:
            while not (v := pred()):
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.poll_s if poll_s is None else poll_s):
                        await self._changed.wait()
            return v

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._close()

    async def _close(self) -> None:
        """Stop the reader and disconnect."""
        if self._reader is not None:
            await cancel_and_wait(self._reader, ignore=(aiomqtt.MqttError,))
            self._reader = None
        if self._client is not None:
            c, self._client = self._client, None
            await close(c)
