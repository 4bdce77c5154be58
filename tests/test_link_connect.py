"""The link's connection setup against a broker that is slow or half-broken (issue 20: a 10,000-gateway fleet
that gave up on its CONNACKs and retried faster than the cluster answered never connected).

A TCP proxy in front of a real Mosquitto plays the sick broker: it holds back the broker's first bytes (the
CONNACK) for a while, or closes a connection as soon as the client sends its first SUBSCRIBE."""

# ruff: noqa: F811  (pytest fixtures imported from tests.broker are used as parameters)

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud_bridge.protocol import Unlock

from .broker import broker, cloud_peer, gateway, site_key, unique  # noqa: F401
from .conftest import basic_site
from .mosquitto import Mosquitto

SUBSCRIBE = 8


@dataclass
class Conn:
    opened: float
    closed: float | None = None
    connacked: bool = False


@dataclass
class SickBroker:
    """`host:port` of a proxy to `upstream`. `connack_delay_s`: the broker's first bytes wait this long;
    `kill_on_subscribe`: the connection is closed when the client's SUBSCRIBE arrives (after its CONNACK)."""

    upstream: Mosquitto
    connack_delay_s: float = 0.0
    kill_on_subscribe: bool = False
    conns: list[Conn] = field(default_factory=list)
    #: SUBSCRIBE packets the clients sent through the proxy.
    subscribes: int = 0
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 0

    async def _pipe_up(self, r: asyncio.StreamReader, w: asyncio.StreamWriter, c: Conn) -> None:
        """Client to broker, packet by packet (MQTT fixed header: type, remaining length as a varint)."""
        while True:
            head = await r.readexactly(1)
            n, mult, raw = 0, 1, b""
            while True:
                b = await r.readexactly(1)
                raw += b
                n += (b[0] & 0x7F) * mult
                mult *= 128
                if not b[0] & 0x80:
                    break
            body = await r.readexactly(n)
            if head[0] >> 4 == SUBSCRIBE:
                self.subscribes += 1
                if self.kill_on_subscribe:
                    return
            w.write(head + raw + body)
            await w.drain()

    async def _pipe_down(self, r: asyncio.StreamReader, w: asyncio.StreamWriter, c: Conn) -> None:
        first = True
        while data := await r.read(65536):
            if first:
                await asyncio.sleep(self.connack_delay_s)
                first = False
                c.connacked = True
            w.write(data)
            await w.drain()

    def drop_all(self) -> None:
        """Close every connection through the proxy (both sides)."""
        for w in self._writers:
            w.close()

    async def _handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        c = Conn(time.monotonic())
        self.conns.append(c)
        self._writers.append(cw)
        try:
            br, bw = await asyncio.open_connection(self.upstream.host, self.upstream.port)
        except OSError:
            cw.close()
            return
        tasks = [asyncio.ensure_future(self._pipe_up(cr, bw, c)), asyncio.ensure_future(self._pipe_down(br, cw, c))]
        with contextlib.suppress(Exception):
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        c.closed = time.monotonic()
        for w in (cw, bw):
            w.close()
            with contextlib.suppress(OSError):
                await w.wait_closed()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[SickBroker]:
        server = await asyncio.start_server(self._handle, self.host, 0)
        self.port = server.sockets[0].getsockname()[1]
        async with server:
            yield self
            server.close()


async def test_a_broker_slower_than_the_setup_timeout_still_gets_the_gateway_connected(
    broker: Mosquitto, tmp_path: Path, site_key: Ed25519PrivateKey
) -> None:
    """The CONNACK takes 1.2 s, the first setup timeout is 0.3 s: the link gives up twice (0.3 s, 0.6 s), then
    waits long enough (1.2 s and more) and is online, its failed-setup count back at 0."""
    site, gw = unique("s"), "gw1"
    async with SickBroker(broker, connack_delay_s=1.2).running() as sick:
        kw = {"host": sick.host, "port": sick.port, "connect_timeout_s": 0.3, "connect_timeout_max_s": 5.0}
        async with (
            cloud_peer(broker, site_key, site=site, gw=gw) as cloud,
            gateway(broker, tmp_path / "gw", site_key, site=site, gw=gw, **kw) as g,
        ):
            birth = await cloud.wait_online(timeout=30)
            await cloud.wait_for(lambda: g.link.online or None)
            assert birth.gateway == gw
            assert g.link.failed_setups == 0 and g.link.setup_timeout_s == 0.3
            gave_up = [c for c in sick.conns if c.closed is not None and not c.connacked]
            waited = [round(c.closed - c.opened, 1) for c in gave_up if c.closed is not None]
            assert len(gave_up) >= 2, sick.conns
            assert waited[0] < 0.6 and waited[1] >= 0.5, waited  # each attempt waited longer than the last
            assert sick.conns[-1].closed is None and sick.conns[-1].connacked


async def test_a_broker_that_fails_every_subscription_is_retried_ever_more_slowly(
    broker: Mosquitto, tmp_path: Path, site_key: Ed25519PrivateKey
) -> None:
    """Each connection is accepted (CONNACK) and then dropped at its SUBSCRIBE. The backoff is not reset by the
    CONNACKs: over 4 s the link tries a handful of times (each waits 0.2 s for its SUBACK, then 0.05-0.1 s,
    at most 0.2, 0.4, 0.8 s ...), not every 0.25-0.3 s (about 15). When the broker heals, the link is online
    and its count starts again."""
    site, gw = unique("s"), "gw1"
    async with SickBroker(broker, kill_on_subscribe=True).running() as sick:
        kw = {"host": sick.host, "port": sick.port, "backoff_min_s": 0.1, "backoff_max_s": 0.8,
              "connect_timeout_s": 0.2, "connect_timeout_max_s": 0.2}  # fmt: skip
        async with (
            cloud_peer(broker, site_key, site=site, gw=gw) as cloud,
            gateway(broker, tmp_path / "gw", site_key, site=site, gw=gw, **kw) as g,
        ):
            await asyncio.sleep(4.0)
            tries = len(sick.conns)
            assert not g.link.online and not cloud.births
            assert 3 <= tries <= 10, tries
            assert all(c.connacked for c in sick.conns[:-1])  # the broker accepted every one
            assert g.link.failed_setups >= tries - 1 and g.link.timed_out_setups >= tries - 1
            sick.kill_on_subscribe = False
            await cloud.wait_online(timeout=15)
            await cloud.wait_for(lambda: g.link.online or None)
            assert g.link.failed_setups == 0


async def test_a_refused_connection_does_not_lengthen_the_setup_timeout(
    broker: Mosquitto, tmp_path: Path, site_key: Ed25519PrivateKey
) -> None:
    """A node that is down refuses at once: the delays grow (backoff) but the setup timeout stays at
    `connect_timeout_s`, which is meant for a node that is slow, not gone."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    site, gw = unique("s"), "gw1"
    kw = {"host": "127.0.0.1", "port": dead, "connect_timeout_s": 2.0, "backoff_min_s": 0.05, "backoff_max_s": 0.2}
    async with gateway(broker, tmp_path / "gw", site_key, site=site, gw=gw, **kw) as g:
        async with asyncio.timeout(10):
            while g.link.failed_setups < 5:
                await asyncio.sleep(0.05)
        assert g.link.timed_out_setups == 0 and g.link.setup_timeout_s == 2.0


async def test_failback_waits_for_a_first_endpoint_that_answers_mqtt_not_only_tcp(
    broker: Mosquitto, tmp_path: Path, site_key: Ed25519PrivateKey
) -> None:
    """The first endpoint accepts TCP connections at once but its CONNACKs take 3 s (an overloaded node), the
    setup timeout is 0.5 s: the gateway moves to the second endpoint and stays there, its working connection
    never dropped for a node that would time out (a TCP probe moved it back after every `failback_s`). When the
    first node answers again, the gateway moves back to it."""
    site, gw = unique("s"), "gw1"
    b = Mosquitto(tmp_path / "b")
    b.start()
    try:
        async with SickBroker(broker, connack_delay_s=3.0).running() as sick:
            kw = {"host": sick.host, "port": sick.port, "endpoints": [f"{b.host}:{b.port}"], "failback_s": 1.0,
                  "connect_timeout_s": 0.5, "connect_timeout_max_s": 0.5, "backoff_min_s": 0.05,
                  "backoff_max_s": 0.2}  # fmt: skip
            async with (
                cloud_peer(b, site_key, site=site, gw=gw) as on_b,
                gateway(broker, tmp_path / "gw", site_key, site=site, gw=gw, **kw) as g,
            ):
                await on_b.wait_online(timeout=15)
                await on_b.wait_for(lambda: g.link.online or None)
                probes0 = g.link.failback_probes
                await asyncio.sleep(6.0)  # ~4-5 probes of the slow first endpoint (each 1 s x 0.5-1.5 + 0.5 s)
                assert g.link.failback_probes >= probes0 + 3, g.link.failback_probes
                assert g.link.online and g.link.broker == f"{b.host}:{b.port}"
                assert g.link.connects[1] == 1, g.link.connects  # never dropped, never reconnected to b
                assert len(on_b.births) == 1
                sick.connack_delay_s = 0.0
                async with cloud_peer(broker, site_key, site=site, gw=gw) as on_a:
                    back = await on_a.wait_online(timeout=15)
                    assert back.broker == f"{sick.host}:{sick.port}"
                assert g.link.connects[0] >= 1
    finally:
        b.stop()


async def test_one_downlink_subscription_carries_rights_acks_and_commands_and_never_the_uplink(
    broker: Mosquitto, tmp_path: Path, site_key: Ed25519PrivateKey, caplog: pytest.LogCaptureFixture
) -> None:
    """`downlink_filter = "one"` (MQTT 5): a single SUBSCRIBE (`<base>/#`, counted by the proxy), and through it a
    change set, the acknowledgements of 200 events and a command all arrive. No Local keeps the gateway's own
    events and birth from coming back, retain handling 2 its own retained status: no message on an uplink
    topic reaches it (each would be logged as unexpected), through a reconnect as well."""
    site, gw = unique("s"), "gw1"
    caplog.set_level(logging.WARNING, logger="cloud_bridge")
    async with SickBroker(broker).running() as proxy:
        kw = {"host": proxy.host, "port": proxy.port, "downlink_filter": "one", "batch_events": 20}
        async with (
            cloud_peer(broker, site_key, site=site, gw=gw) as cloud,
            gateway(broker, tmp_path / "gw", site_key, site=site, gw=gw, **kw) as g,
        ):
            await cloud.wait_online()
            await cloud.wait_for(lambda: g.link.online or None)
            assert proxy.subscribes == 1
            r = await cloud.send_change_set(basic_site())
            assert r.ok and g.store.version == 1
            for i in range(200):
                g.journal.record("access.granted", door="front", card=i, user="alice")
            await cloud.wait_events(200)
            await cloud.wait_for(lambda: g.journal.depth == 0)  # every batch acknowledged
            c = await cloud.command(Unlock(door="front", seconds=3), operator="alice")
            assert c.ok and g.commands.calls[-1] == ("unlock", "front", 3)
            births = len(cloud.births)
            proxy.drop_all()  # a reconnect: the retained birth of the first connection is not sent back
            await cloud.wait_for(lambda: len(cloud.births) > births or None, timeout=15)
            await cloud.wait_for(lambda: g.link.online or None)
            assert proxy.subscribes == 2
            g.journal.record("access.granted", door="front", card=1000, user="alice")
            await cloud.wait_events(201)
            await cloud.wait_for(lambda: g.journal.depth == 0)
    unexpected = [r.getMessage() for r in caplog.records if "unexpected topic" in r.getMessage()]
    assert unexpected == [] and g.link.stats["handler_errors"] == 0


async def test_a_flood_on_the_gateways_uplink_topics_is_counted_and_logged_once_a_minute(
    broker: Mosquitto, tmp_path: Path, site_key: Ed25519PrivateKey, caplog: pytest.LogCaptureFixture
) -> None:
    """With `downlink_filter = "one"` the gateway's one subscription also matches its uplink topics: what another
    client publishes there (1,000 messages on its events topic, 200 on its rights/reply) reaches it. Each is
    counted and ignored, one warning says so (with the count) instead of 1,200, and the link goes on: a change
    set after the flood is applied and answered."""
    from cloud_bridge import mqtt
    from cloud_bridge.topics import Topics

    site, gw = unique("s"), "gw1"
    caplog.set_level(logging.WARNING, logger="cloud_bridge")
    async with (
        cloud_peer(broker, site_key, site=site, gw=gw) as cloud,
        gateway(broker, tmp_path / "gw", site_key, site=site, gw=gw, downlink_filter="one") as g,
    ):
        await cloud.wait_online()
        await cloud.wait_for(lambda: g.link.online or None)
        t = Topics(site, gw)
        async with mqtt.client(broker.host, broker.port, identifier=unique("flood")) as c:
            for i in range(1000):
                await c.publish(t.events, b"\x93junk" + bytes([i % 256]), qos=0)
            for _ in range(200):
                await c.publish(t.rights_reply, b"not a reply", qos=1)
        await cloud.wait_for(lambda: g.link.stats["unexpected_topic"] >= 1200 or None, timeout=30)
        r = await cloud.send_change_set(basic_site())
        assert r.ok and g.store.version == 1 and g.link.online
    warnings = [r.getMessage() for r in caplog.records if "unexpected topic" in r.getMessage()]
    assert len(warnings) == 1 and "(1 since the last such warning)" in warnings[0], warnings
    assert g.link.stats["unexpected_topic"] == 1200 and g.link.stats["handler_errors"] == 0


def test_one_downlink_subscription_needs_mqtt_5(broker: Mosquitto, tmp_path: Path) -> None:
    from cloud_bridge.fleet.sim import MemoryNonces, MemoryOutbox, MemoryRights, NoCommands, _birth
    from cloud_bridge.link import CloudLink

    from .broker import link_config

    cfg = link_config(broker, "s", "g", downlink_filter="one", mqtt_version="3.1.1")
    with pytest.raises(ValueError, match="needs mqtt_version"):
        CloudLink(cfg, store=MemoryRights(), journal=MemoryOutbox("g"), commands=NoCommands(), birth=_birth,
                  site_public_key=b"\0" * 32, state_dir=tmp_path, nonces=MemoryNonces())  # fmt: skip
