"""Home Assistant MQTT discovery against a real Mosquitto, with the real simulated agent (tap path, relays on mock
pins, door contacts) and an observer client standing in for Home Assistant.

The discovery keys are checked against the keys Home Assistant's MQTT integration accepts for each platform
(home-assistant/core homeassistant/components/mqtt/: lock.py PLATFORM_SCHEMA_MODERN, binary_sensor.py,
event.py _PLATFORM_SCHEMA_BASE, sensor.py, config.py MQTT_RO_SCHEMA / MQTT_RW_SCHEMA, schemas.py
MQTT_ENTITY_COMMON_SCHEMA and MQTT_AVAILABILITY_SCHEMA; device-based discovery: discovery.py, `dev`, `o`, `cmps`
and `p`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from edge.agent import Agent, run_agent
from edge.config import Config, parse_config
from edge.events import HASS_COMMAND
from edge.sim.demo import demo_change_set
from edge.sim.hands import set_contact, simulated_agent, tap

from .broker import broker  # noqa: F401
from .mosquitto import Mosquitto

# --- the keys Home Assistant documents (and its schemas accept) ---------------------------------------------

#: Every MQTT entity (schemas.py MQTT_ENTITY_COMMON_SCHEMA + MQTT_AVAILABILITY_SCHEMA; config.py SCHEMA_BASE).
COMMON = {"p", "platform", "name", "unique_id", "object_id", "default_entity_id", "icon", "entity_category",
          "entity_picture", "enabled_by_default", "json_attributes_topic", "json_attributes_template", "device",
          "availability", "availability_topic", "availability_template", "availability_mode", "payload_available",
          "payload_not_available", "qos", "encoding", "origin"}  # fmt: skip
#: Read-only entities (config.py MQTT_RO_SCHEMA): state_topic is required.
RO = {"state_topic", "value_template"}
PLATFORMS: dict[str, tuple[set[str], set[str]]] = {  # platform -> (accepted keys, required keys)
    "lock": (
        COMMON
        | RO
        | {
            "command_topic",
            "retain",
            "code_format",
            "command_template",
            "optimistic",
            "payload_lock",
            "payload_unlock",
            "payload_open",
            "payload_reset",
            "state_jammed",
            "state_locked",
            "state_locking",
            "state_unlocked",
            "state_unlocking",
            "state_open",
            "state_opening",
        },
        {"command_topic"},
    ),
    "binary_sensor": (
        COMMON | RO | {"device_class", "expire_after", "force_update", "off_delay", "payload_off", "payload_on"},
        {"state_topic"},
    ),
    "event": (COMMON | RO | {"device_class", "event_types"}, {"state_topic", "event_types"}),
    "sensor": (
        COMMON
        | RO
        | {
            "device_class",
            "expire_after",
            "force_update",
            "last_reset_value_template",
            "options",
            "suggested_display_precision",
            "state_class",
            "unit_of_measurement",
        },
        {"state_topic"},
    ),
}
#: Device-based discovery: the top level holds dev, o, cmps and options shared by every component.
TOP = {"dev", "device", "o", "origin", "cmps", "components", "availability_topic", "payload_available",
       "payload_not_available", "availability", "availability_mode", "qos", "encoding", "state_topic",
       "command_topic"}  # fmt: skip
DEVICE = {"ids", "identifiers", "name", "mf", "manufacturer", "mdl", "model", "sw", "sw_version", "hw", "sn",
          "configuration_url", "cns", "connections", "suggested_area", "via_device"}  # fmt: skip
ORIGIN = {"name", "sw", "sw_version", "url", "support_url"}
EVENT_TYPES = {"granted", "denied"}


def config_text(state: Path, sock: Path, mq: Mosquitto, *, extra: str = "") -> str:
    return f"""
hardware = "sim"
[site]
id = "test"
gateway = "ha-gw"
timezone = "Europe/Berlin"
[policy]
clock_source = "system"
offline_policy = "all"
[storage]
state_dir = "{state}"
synchronous = "NORMAL"
[control]
socket = "{sock}"
[link]
enabled = false
[hass]
enabled = true
broker = "local"
host = "{mq.host}"
port = {mq.port}
commands = ["door1"]
{extra}
"""


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="edge-ha-") as d:
        yield Path(d)


class Observer:
    """Home Assistant's side: every message on the discovery prefix and the gateway's topics, in order."""

    def __init__(self, mq: Mosquitto) -> None:
        self.broker = mq
        self.messages: list[tuple[str, bytes, bool]] = []
        self.client: aiomqtt.Client | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Observer:
        self.client = aiomqtt.Client(self.broker.host, self.broker.port, identifier="ha-observer",
                                     protocol=aiomqtt.ProtocolVersion.V5)  # fmt: skip
        await self.client.__aenter__()
        await self.client.subscribe("homeassistant/#", qos=1)
        await self.client.subscribe("edge-access/#", qos=1)
        self._task = asyncio.get_running_loop().create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self.client is not None
        async for m in self.client.messages:
            payload = m.payload if isinstance(m.payload, bytes) else str(m.payload).encode()
            self.messages.append((str(m.topic), payload, bool(m.retain)))

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None and self.client is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
            await self._task
        with contextlib.suppress(aiomqtt.MqttError):
            await self.client.__aexit__(None, None, None)

    def last(self, topic: str) -> bytes | None:
        for t, p, _r in reversed(self.messages):
            if t == topic:
                return p
        return None

    def all(self, topic: str) -> list[bytes]:
        return [p for t, p, _r in self.messages if t == topic]

    async def wait(self, topic: str, pred: Any = None, timeout: float = 10.0) -> bytes:
        async with asyncio.timeout(timeout):
            while True:
                p = self.last(topic)
                if p is not None and (pred is None or pred(p)):
                    return p
                await asyncio.sleep(0.02)

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        assert self.client is not None
        await self.client.publish(topic, payload, qos=1, retain=retain)


@asynccontextmanager
async def running(cfg: Config) -> AsyncIterator[Agent]:
    agent = simulated_agent(cfg)
    agent.demo = demo_change_set(agent.profile)
    async with asyncio.TaskGroup() as tg:
        tg.create_task(run_agent(agent), name="agent")
        await asyncio.wait_for(agent.started.wait(), 10)
        try:
            yield agent
        finally:
            agent.stop()


BASE = "edge-access/test/ha-gw"
DISCOVERY = "homeassistant/device/edge_test_ha-gw/config"


def check_discovery(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    assert set(body) <= TOP, set(body) - TOP
    assert set(body["dev"]) <= DEVICE and body["dev"]["ids"] and body["dev"]["name"]
    assert set(body["o"]) <= ORIGIN and body["o"]["name"]
    comps: dict[str, dict[str, Any]] = body["cmps"]
    uids = []
    for key, comp in comps.items():
        accepted, required = PLATFORMS[comp["p"]]
        assert set(comp) <= accepted, (key, set(comp) - accepted)
        assert required <= set(comp), (key, required - set(comp))
        uids.append(comp["unique_id"])
    assert len(uids) == len(set(uids))
    return comps


async def test_discovery_payload_has_the_documented_keys_of_each_platform(tmp_path: Path, sock_dir: Path,
                                                                          broker: Mosquitto) -> None:  # noqa: F811  # fmt: skip
    cfg = parse_config(config_text(tmp_path / "s", sock_dir / "c.sock", broker))
    async with Observer(broker) as ha, running(cfg):
        body = json.loads(await ha.wait(DISCOVERY))
        assert await ha.wait(f"{BASE}/availability") == b"online"
    comps = check_discovery(body)
    assert body["availability_topic"] == f"{BASE}/availability"
    platforms = sorted((k, c["p"]) for k, c in comps.items())
    assert ("door1_lock", "lock") in platforms and ("door2_lock", "lock") in platforms
    assert ("door1_contact", "binary_sensor") in platforms and comps["door1_contact"]["device_class"] == "door"
    assert set(comps["door1_taps"]["event_types"]) == EVENT_TYPES
    for health in ("link", "rights_version", "journal_depth", "clock_trust"):
        assert comps[health]["p"] == "sensor"
    assert any(k.startswith("reader_") for k in comps)
    # the will: "offline" when the agent goes away (a clean stop leaves the will to the broker)
    async with Observer(broker) as later:
        assert await later.wait(f"{BASE}/availability") == b"offline"


async def test_states_follow_a_tap_a_door_opening_and_a_lockdown(tmp_path: Path, sock_dir: Path,
                                                                  broker: Mosquitto) -> None:  # noqa: F811  # fmt: skip
    cfg = parse_config(config_text(tmp_path / "s", sock_dir / "c.sock", broker))
    async with Observer(broker) as ha, running(cfg) as agent:
        await ha.wait(f"{BASE}/door/door1/lock", lambda p: p == b"LOCKED")
        assert await ha.wait(f"{BASE}/door/door1/contact") == b"OFF"
        reader = next(r for r, d in agent.reader_door.items() if d == "door1")
        await tap(agent, reader, 4242)  # unknown card
        denied = json.loads(await ha.wait(f"{BASE}/door/door1/tap"))
        assert denied == {"event_type": "denied", "door": "door1", "reason": "unknown_card"}  # no user by default
        await tap(agent, reader, 1001)  # alice
        await ha.wait(f"{BASE}/door/door1/tap", lambda p: b"granted" in p)
        assert json.loads(ha.last(f"{BASE}/door/door1/tap") or b"") == {"event_type": "granted", "door": "door1",
                                                                        "reason": "granted"}  # fmt: skip
        await ha.wait(f"{BASE}/door/door1/lock", lambda p: p == b"UNLOCKED")
        set_contact(agent, "door1", opened=True)
        await ha.wait(f"{BASE}/door/door1/contact", lambda p: p == b"ON")
        set_contact(agent, "door1", opened=False)
        await ha.wait(f"{BASE}/door/door1/contact", lambda p: p == b"OFF")
        await ha.wait(f"{BASE}/door/door1/lock", lambda p: p == b"LOCKED", timeout=10)  # opened: not jammed
        health = json.loads(await ha.wait(f"{BASE}/health"))
        assert health["rights_version"] == 1 and health["link"] == "offline" and health["lockdown"] is False
        # a grant nobody walks through: the unlock ends without the contact opening -> JAMMED
        await tap(agent, reader, 1001)
        await ha.wait(f"{BASE}/door/door1/lock", lambda p: p == b"UNLOCKED")
        await ha.wait(f"{BASE}/door/door1/lock", lambda p: p == b"JAMMED", timeout=10)
        await agent.lockdown(True)
        await ha.wait(f"{BASE}/health", lambda p: json.loads(p)["lockdown"] is True)
        await tap(agent, reader, 1001)
        await ha.wait(f"{BASE}/door/door1/tap", lambda p: b"lockdown" in p)
        assert json.loads(ha.last(f"{BASE}/door/door1/tap") or b"")["event_type"] == "denied"
        assert not agent.doors["door1"].relay_energised


async def test_user_only_when_configured(tmp_path: Path, sock_dir: Path, broker: Mosquitto) -> None:  # noqa: F811
    cfg = parse_config(config_text(tmp_path / "s", sock_dir / "c.sock", broker, extra="publish_user = true"))
    async with Observer(broker) as ha, running(cfg) as agent:
        await ha.wait(DISCOVERY)
        reader = next(r for r, d in agent.reader_door.items() if d == "door1")
        await tap(agent, reader, 1001)
        assert json.loads(await ha.wait(f"{BASE}/door/door1/tap"))["user"] == "alice"


async def test_commands_pulse_only_enabled_doors_and_never_in_lockdown(tmp_path: Path, sock_dir: Path,
                                                                       broker: Mosquitto) -> None:  # noqa: F811  # fmt: skip
    cfg = parse_config(config_text(tmp_path / "s", sock_dir / "c.sock", broker))
    async with Observer(broker) as ha, running(cfg) as agent:
        await ha.wait(f"{BASE}/door/door1/lock", lambda p: p == b"LOCKED")
        door2 = agent.doors["door2"].relay_energised  # fail-safe: energised = locked
        await ha.publish(f"{BASE}/door/door2/set", b"OPEN")  # not in hass.commands
        await ha.publish(f"{BASE}/door/door1/set", b"LOCK")  # not a pulse
        await ha.publish(f"{BASE}/door/door1/set", b"OPEN")
        await ha.wait(f"{BASE}/door/door1/lock", lambda p: p == b"UNLOCKED")
        assert agent.doors["door1"].relay_energised
        assert agent.doors["door2"].relay_energised == door2 and agent.doors["door2"].locked
        agent.doors["door1"].relock()
        await ha.wait(f"{BASE}/door/door1/lock", lambda p: p != b"UNLOCKED")
        await agent.lockdown(True)
        await ha.publish(f"{BASE}/door/door1/set", b"UNLOCK")
        await asyncio.sleep(0.5)
        assert not agent.doors["door1"].relay_energised
        await agent.lockdown(False)
        # Home Assistant restarts: discovery and the states come again
        before = len(ha.all(DISCOVERY))
        await ha.publish("homeassistant/status", b"online")
        async with asyncio.timeout(10):
            while len(ha.all(DISCOVERY)) == before:
                await asyncio.sleep(0.02)
    results = [(e.door, e.detail.get("action"), str(e.detail.get("result"))) for e in agent.feed.events
               if e.type == HASS_COMMAND]  # fmt: skip
    assert results[0][0] == "door2" and "not enabled" in results[0][2]
    assert results[1][:2] == ("door1", "LOCK") and "only a pulse" in results[1][2]
    assert results[2] == ("door1", "pulse", "ok")
    assert results[3][:2] == ("door1", "pulse") and "lockdown" in results[3][2]
    assert len(results) == 4


async def test_a_door_that_disappears_is_removed(tmp_path: Path, sock_dir: Path, broker: Mosquitto) -> None:  # noqa: F811
    cfg = parse_config(config_text(tmp_path / "s", sock_dir / "c.sock", broker))
    old = {"dev": {"ids": ["edge_test_ha-gw"], "name": "old"}, "o": {"name": "edge-access"},
           "cmps": {"door9_lock": {"p": "lock", "unique_id": "edge_test_ha-gw_door9_lock", "command_topic": "x",
                                   "state_topic": f"{BASE}/door/door9/lock"}}}  # fmt: skip
    async with Observer(broker) as ha:
        await ha.publish(DISCOVERY, json.dumps(old).encode(), retain=True)
        await ha.publish(f"{BASE}/door/door9/lock", b"LOCKED", retain=True)
        await ha.wait(f"{BASE}/door/door9/lock")
        async with running(cfg):
            await ha.wait(DISCOVERY, lambda p: b"door1_lock" in p and b"door9" not in p)
            await ha.wait(f"{BASE}/door/door9/lock", lambda p: p == b"")
        bodies = [json.loads(p) for p in ha.all(DISCOVERY)]
        removal = next(b for b in bodies if "door9_lock" in b["cmps"] and b["dev"]["name"] != "old")
        assert removal["cmps"]["door9_lock"] == {"p": "lock"}
        check_discovery(bodies[-1])


async def test_on_the_cloud_broker_it_uses_the_link_settings(tmp_path: Path, sock_dir: Path, broker: Mosquitto) -> None:  # noqa: F811
    text = config_text(tmp_path / "s", sock_dir / "c.sock", broker).replace('broker = "local"', 'broker = "cloud"')
    text = text.replace(f'host = "{broker.host}"\nport = {broker.port}\n', "")
    text = text.replace(
        "[link]\nenabled = false", f'[link]\nenabled = false\nhost = "{broker.host}"\nport = {broker.port}'
    )
    cfg = parse_config(text)
    assert cfg.hass.broker == "cloud" and cfg.hass.port == 1883 != broker.port
    async with Observer(broker) as ha, running(cfg):
        check_discovery(json.loads(await ha.wait(DISCOVERY)))
        assert await ha.wait(f"{BASE}/availability") == b"online"


def test_check_config_names_an_unreadable_broker_password(tmp_path: Path, sock_dir: Path, broker: Mosquitto,  # noqa: F811
                                                          capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    from edge.cli import main

    text = (
        config_text(tmp_path / "s", sock_dir / "c.sock", broker)
        .replace('commands = ["door1"]', 'commands = ["door1"]\npassword_file = "hass.pass"')
        .replace('synchronous = "NORMAL"', 'synchronous = "NORMAL"\nplaintext_secrets = true')
    )
    path = tmp_path / "edge.toml"
    path.write_text(text)
    assert main(["--config", str(path), "check-config"]) == 2
    assert "hass.password_file: cannot read" in capsys.readouterr().err
