"""`mqtt.client(housekeeping_s=...)`: how often the client checks its keepalive (aiomqtt: every second). The
fleet simulator runs thousands of links on one loop with a longer period; a gateway keeps 1 s. Against a real
Mosquitto, which closes a connection that sends nothing for 1.5 x its keepalive: a period well inside the
keepalive keeps an idle connection up (its pings go out), a much longer one lets it drop (Mosquitto 2.0
looks at keepalives every few seconds: the idle times here span two of its looks)."""
# ruff: noqa: F811  (pytest fixtures imported from tests.broker are used as parameters)

from __future__ import annotations

import asyncio
import logging
import time

import aiomqtt
import pytest

from cloud_bridge import mqtt

from .broker import broker  # noqa: F401
from .mosquitto import Mosquitto


async def idle_for(broker: Mosquitto, seconds: float, *, keepalive: int, housekeeping_s: float) -> tuple[int, bool]:
    """Connect, send nothing for `seconds`; (housekeeping calls made, whether the connection is still up)."""
    c = mqtt.client(broker.host, broker.port, identifier=f"hk-{housekeeping_s}", keepalive=keepalive,
                    housekeeping_s=housekeeping_s)  # fmt: skip
    calls = 0
    async with c:
        paho_client = c._client
        loop_misc = paho_client.loop_misc

        def counted() -> int:
            nonlocal calls
            calls += 1
            return loop_misc()

        paho_client.loop_misc = counted  # type: ignore[method-assign]
        await asyncio.sleep(seconds)
        try:  # a QoS 1 publish needs the connection: its PUBACK comes back only on a live one
            await c.publish("hk/probe", b"x", qos=1, timeout=2)
            up = True
        except aiomqtt.MqttError:
            up = False
    return calls, up


async def test_a_period_inside_the_keepalive_keeps_an_idle_connection_up(broker: Mosquitto) -> None:
    t = time.monotonic()
    calls, up = await idle_for(broker, 8.0, keepalive=1, housekeeping_s=0.25)
    assert up, "pings every second (checked every 0.25 s) keep the connection up"
    assert calls >= 0.6 * (time.monotonic() - t) / 0.25, calls


async def test_a_period_longer_than_the_keepalive_lets_the_broker_close_it(broker: Mosquitto) -> None:
    calls, up = await idle_for(broker, 8.0, keepalive=1, housekeeping_s=30.0)
    assert not up, "no ping for 8 s with a keepalive of 1 s: Mosquitto closes the connection"
    assert calls <= 1, calls


async def test_the_default_is_aiomqtts_second(broker: Mosquitto) -> None:
    calls, up = await idle_for(broker, 3.0, keepalive=60, housekeeping_s=1.0)
    assert up and 2 <= calls <= 5, calls


async def published_with_warnings(broker: Mosquitto, caplog: pytest.LogCaptureFixture, **kw: int) -> int:
    """40 QoS 1 publishes in flight at once; how many "pending publish calls" warnings aiomqtt logged."""
    caplog.clear()
    c = mqtt.client(broker.host, broker.port, identifier=f"pw-{kw}", **kw)  # type: ignore[arg-type]
    async with c:
        with caplog.at_level(logging.WARNING):
            await asyncio.gather(*(c.publish(f"pw/{i}", b"x", qos=1) for i in range(40)))
    return sum("pending publish calls" in r.getMessage() for r in caplog.records)


async def test_pending_warn_raises_aiomqtts_warning_threshold(
    broker: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    assert await published_with_warnings(broker, caplog) > 0  # aiomqtt's 10: every publish past it warns
    assert await published_with_warnings(broker, caplog, pending_warn=100) == 0
