"""Home Assistant MQTT discovery ([hass] enabled; docs/operations.md, "Home Assistant").

One retained device-based discovery message, `<prefix>/device/<device id>/config`, with `dev` (the gateway),
`o` (this software) and `cmps`, one component per entity:

* each door a `lock`: LOCKED / UNLOCKED from the door's lock state; JAMMED when an unlock (relay released)
  ended without the door contact ever opening (doors with a contact only: the strike may be stuck, or nobody
  went through), until the next unlock or opening;
* its contact a `binary_sensor` of device class `door` (ON = open);
* its taps an `event` entity (event types `granted`, `denied`; attributes reason and door, and the user only
  with `publish_user = true`);
* gateway health as `sensor`s (link, rights version, journal depth, clock trust) and one `sensor` per reader
  (ok, offline, or its last fault).

Availability: a retained "online"/"offline" on `<base>/<site>/<gateway>/availability`, with "offline" as the
connection's will. Discovery and states are published again when `homeassistant/status` says "online". A door
that is no longer on the gateway (a changed hardware profile) is removed: its components are sent once with only
their platform (Home Assistant's way to remove a component of a device), its retained state topics are cleared
with empty payloads, then the discovery message without them follows.

Commands (`.../door/<door>/set`) are unsigned, so none is obeyed unless the door is listed in `hass.commands`;
then "OPEN" or "UNLOCK" pulse the relay for the door's strike time, through the agent (refused in lockdown and
while the offline policy says no). Nothing else (modes, lockdown) is reachable. Every command is journalled
(`hass.command`; refusals at most one per door and 10 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Mapping
from typing import Any

import aiomqtt

from cloud_bridge import mqtt
from edge import __version__
from edge.agent.ports import GatewayPort
from edge.config import Config
from edge.events import ACCESS_DENIED, ACCESS_GRANTED, DOOR_STATE, HASS_COMMAND, READER_FAULT, READER_STATUS
from edge.secrets import SecretSource

log = logging.getLogger("edge.hass")

ONLINE, OFFLINE = "online", "offline"
LOCKED, UNLOCKED, JAMMED = "LOCKED", "UNLOCKED", "JAMMED"
PULSE_PAYLOADS = ("OPEN", "UNLOCK")
#: How often the door states are compared with what was published (besides every journal event).
REFRESH_S = 0.5
REFUSAL_JOURNAL_S = 10.0


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "_-" else "_" for c in text)


class Topics:
    """Every topic of one gateway's Home Assistant integration, built here only."""

    def __init__(self, cfg: Config) -> None:
        h = cfg.hass
        self.device_id = _slug(f"edge_{cfg.site.id}_{cfg.site.gateway}")
        self.base = f"{h.base_topic}/{cfg.site.id}/{cfg.site.gateway}"
        self.discovery = f"{h.prefix}/device/{self.device_id}/config"
        self.ha_status = f"{h.prefix}/status"
        self.availability = f"{self.base}/availability"
        self.health = f"{self.base}/health"
        self.command_filter = f"{self.base}/door/+/set"

    def lock(self, door: str) -> str:
        return f"{self.base}/door/{door}/lock"

    def contact(self, door: str) -> str:
        return f"{self.base}/door/{door}/contact"

    def taps(self, door: str) -> str:
        return f"{self.base}/door/{door}/tap"

    def command(self, door: str) -> str:
        return f"{self.base}/door/{door}/set"

    def reader(self, reader: str) -> str:
        return f"{self.base}/reader/{reader}/state"

    def door_of_command(self, topic: str) -> str | None:
        head, tail = f"{self.base}/door/", "/set"
        if topic.startswith(head) and topic.endswith(tail):
            door = topic[len(head) : -len(tail)]
            return door if door and "/" not in door else None
        return None


def door_components(t: Topics, door: str, name: str, *, contact: bool) -> dict[str, dict[str, Any]]:
    """The components of one door (pure)."""
    uid = f"{t.device_id}_{_slug(door)}"
    out: dict[str, dict[str, Any]] = {
        f"{_slug(door)}_lock": {
            "p": "lock", "name": f"{name} lock", "unique_id": f"{uid}_lock", "state_topic": t.lock(door),
            "command_topic": t.command(door), "payload_lock": "LOCK", "payload_unlock": "UNLOCK",
            "payload_open": "OPEN", "state_locked": LOCKED, "state_unlocked": UNLOCKED, "state_jammed": JAMMED,
            "optimistic": False, "retain": False,
        },
        f"{_slug(door)}_taps": {
            "p": "event", "name": f"{name} taps", "unique_id": f"{uid}_taps", "state_topic": t.taps(door),
            "event_types": ["granted", "denied"], "icon": "mdi:card-account-details",
        },
    }  # fmt: skip
    if contact:
        out[f"{_slug(door)}_contact"] = {
            "p": "binary_sensor", "name": f"{name} contact", "unique_id": f"{uid}_contact", "device_class": "door",
            "state_topic": t.contact(door), "payload_on": "ON", "payload_off": "OFF",
        }  # fmt: skip
    return out


def health_components(t: Topics, readers: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """The gateway's health sensors and one sensor per reader (pure). `readers` maps reader -> door."""

    def sensor(key: str, name: str, template: str, **extra: Any) -> dict[str, Any]:
        return {"p": "sensor", "name": name, "unique_id": f"{t.device_id}_{key}", "state_topic": t.health,
                "value_template": template, "entity_category": "diagnostic", **extra}  # fmt: skip

    out = {
        "link": sensor("link", "Cloud link", "{{ value_json.link }}", icon="mdi:cloud"),
        "rights_version": sensor("rights_version", "Rights version", "{{ value_json.rights_version }}",
                                 state_class="measurement"),
        "journal_depth": sensor("journal_depth", "Journal depth", "{{ value_json.journal_depth }}",
                                state_class="measurement", unit_of_measurement="events"),
        "clock_trust": sensor("clock_trust", "Clock trust", "{{ value_json.clock }}", icon="mdi:clock-check"),
    }  # fmt: skip
    for reader in readers:
        out[f"reader_{_slug(reader)}"] = {
            "p": "sensor", "name": f"Reader {reader}", "unique_id": f"{t.device_id}_reader_{_slug(reader)}",
            "state_topic": t.reader(reader), "value_template": "{{ value_json.state }}",
            "json_attributes_topic": t.reader(reader), "entity_category": "diagnostic", "icon": "mdi:card-bulleted",
        }  # fmt: skip
    return out


def discovery_payload(cfg: Config, t: Topics, components: dict[str, dict[str, Any]], model: str) -> dict[str, Any]:
    """The device-based discovery message (pure)."""
    return {
        "dev": {"ids": [t.device_id], "name": f"Gateway {cfg.site.id}/{cfg.site.gateway}", "mf": "edge-access",
                "mdl": model, "sw": __version__},
        "o": {"name": "edge-access", "sw": __version__, "url": "https://github.com/edge-access/edge-access"},
        "availability_topic": t.availability, "payload_available": ONLINE, "payload_not_available": OFFLINE,
        "qos": 1,
        "cmps": components,
    }  # fmt: skip


class HassBridge:
    """The agent's `hass` task: `await HassBridge(cfg, gateway).run()` until cancelled."""

    def __init__(self, cfg: Config, gw: GatewayPort) -> None:
        self.cfg = cfg
        self.gw = gw
        self.t = Topics(cfg)
        self._published: dict[str, bytes] = {}
        self._jammed: dict[str, bool] = {}
        self._opened_during_unlock: dict[str, bool] = {}
        self._was_unlocked: dict[str, bool] = {}
        self._reader_state: dict[str, dict[str, Any]] = {}
        self._refused_at: dict[str, float] = {}
        self._removed: list[str] = []

    # --- what to publish (from snapshots) -----------------------------------------------------------------

    def components(self) -> dict[str, dict[str, Any]]:
        comps: dict[str, dict[str, Any]] = {}
        for door_id, ctl in self.gw.doors.items():
            comps |= door_components(self.t, door_id, ctl.door.name or door_id, contact=ctl.io.contact_pin is not None)
        return comps | health_components(self.t, self.gw.reader_door)

    def lock_state(self, door: str) -> str:
        """LOCKED / UNLOCKED / JAMMED of one door, updating the jammed tracking (see the module doc)."""
        ctl = self.gw.doors[door]
        unlocked = not ctl.locked
        is_open = ctl.is_open
        was = self._was_unlocked.get(door, False)
        if unlocked and not was:
            self._opened_during_unlock[door] = bool(is_open)
            self._jammed[door] = False
        elif unlocked and is_open:
            self._opened_during_unlock[door] = True
        elif not unlocked and was and is_open is not None:
            self._jammed[door] = not self._opened_during_unlock.get(door, False) and not is_open
        if is_open:
            self._jammed[door] = False
        self._was_unlocked[door] = unlocked
        if unlocked:
            return UNLOCKED
        return JAMMED if self._jammed.get(door) else LOCKED

    def states(self) -> dict[str, bytes]:
        st = self.gw.status()
        out: dict[str, bytes] = {}
        for door_id, ctl in self.gw.doors.items():
            out[self.t.lock(door_id)] = self.lock_state(door_id).encode()
            if ctl.io.contact_pin is not None and ctl.is_open is not None:
                out[self.t.contact(door_id)] = b"ON" if ctl.is_open else b"OFF"
        health = {"link": "online" if st.link.online else "offline", "rights_version": st.rights_version,
                  "journal_depth": st.journal_depth, "clock": "trusted" if st.clock_trusted else "untrusted",
                  "lockdown": st.lockdown}  # fmt: skip
        out[self.t.health] = json.dumps(health, sort_keys=True).encode()
        for reader, info in st.readers.items():
            state = self._reader_state.get(reader, {"state": "ok", "fault": None})
            if not info.online:
                state = {**state, "state": "offline"}
            elif state.get("state") == "offline":
                state = {**state, "state": "ok"}
            out[self.t.reader(reader)] = json.dumps({**state, "door": info.door, "kind": info.kind},
                                                    sort_keys=True).encode()  # fmt: skip
        return out

    def tap_message(self, type: str, door: str, reason: str | None, user: str | None) -> bytes:
        body: dict[str, Any] = {"event_type": "granted" if type == ACCESS_GRANTED else "denied", "door": door,
                                "reason": reason}  # fmt: skip
        if self.cfg.hass.publish_user:
            body["user"] = user
        return json.dumps(body).encode()

    # --- the connection ---------------------------------------------------------------------------------

    def _client(self) -> aiomqtt.Client:
        h = self.cfg.hass
        will = aiomqtt.Will(self.t.availability, OFFLINE.encode(), qos=1, retain=True)
        ident = f"edge-hass-{self.cfg.site.id}-{self.cfg.site.gateway}"
        if h.broker == "cloud":
            from edge.link import link_config

            lk = link_config(self.cfg)
            return mqtt.client(lk.host, lk.port, identifier=ident, tls=mqtt.tls_params(lk.ca, lk.cert, lk.key),
                               username=lk.username, password=lk.password, keepalive=30, will=will)  # fmt: skip
        secrets = SecretSource.from_env(plaintext=self.cfg.storage.plaintext_secrets)
        password = secrets.read(h.password_file, "hass.password_file") if h.password_file else None
        return mqtt.client(h.host, h.port, identifier=ident, tls=mqtt.tls_params(h.ca, None, None),
                           username=h.username, password=password, keepalive=30, will=will)  # fmt: skip

    async def _connect(self) -> aiomqtt.Client:
        return await mqtt.connect(self._client(), [self.t.discovery, self.t.ha_status, self.t.command_filter])

    async def run(self) -> None:
        backoff = mqtt.Backoff(0.5, 30.0)
        await mqtt.reconnecting(self._connect, self._serve, backoff, log=log, what="home assistant")

    async def _publish(self, c: aiomqtt.Client, topic: str, payload: bytes, *, retain: bool = True) -> None:
        await mqtt.publish(c, topic, payload, retain=retain)
        if retain:
            self._published[topic] = payload

    async def _serve(self, c: aiomqtt.Client) -> None:
        """One connection. A single task does every publish; a second one only hands the received messages into
        the same queue as the journal's events (so that a cancel is never lost in a publish of that reader: in
        Python 3.11 `asyncio.wait_for`, which aiomqtt awaits a PUBACK with, can swallow one)."""
        self._published.clear()
        inbox: asyncio.Queue[Any] = asyncio.Queue(1024)
        with self.gw.feed.subscribe(queue=inbox):
            reader = asyncio.get_running_loop().create_task(self._messages(c, inbox), name="hass.messages")
            try:
                previous = await self._previous_discovery(c, inbox)
                await self._announce(c, previous)
                await self._publish(c, self.t.availability, ONLINE.encode())
                log.info("home assistant: discovery on %s, states under %s", self.t.discovery, self.t.base)
                while True:
                    _check_cancelled()
                    if reader.done():
                        reader.result()
                        return
                    item = None
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(REFRESH_S):
                            item = await inbox.get()
                    if isinstance(item, aiomqtt.Message):
                        await self._handle(c, item)
                    elif item is not None and hasattr(item, "type"):
                        await self._on_event(c, item)
                    await self._refresh(c)
            finally:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                    await reader
                # A clean stop sends no will: say "offline" ourselves (best effort, briefly).
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(1.0):
                        await mqtt.publish(c, self.t.availability, OFFLINE.encode(), retain=True)

    async def _messages(self, c: aiomqtt.Client, inbox: asyncio.Queue[Any]) -> None:
        async for m in c.messages:
            try:
                inbox.put_nowait(m)
            except asyncio.QueueFull:
                log.warning("home assistant: a message on %s dropped (queue full)", m.topic)

    async def _previous_discovery(self, c: aiomqtt.Client, inbox: asyncio.Queue[Any]) -> dict[str, Any]:
        """The retained discovery message this gateway published before (the broker sends it on subscribe);
        journal events meanwhile are dropped (the refresh that follows publishes the states)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                while True:
                    m = await inbox.get()
                    if not isinstance(m, aiomqtt.Message):
                        continue
                    if str(m.topic) == self.t.discovery:
                        body = mqtt.payload(m)
                        try:
                            old = json.loads(body) if body else {}
                        except ValueError:
                            old = {}
                        return old if isinstance(old, dict) else {}
                    await self._handle(c, m)
        return {}

    async def _announce(self, c: aiomqtt.Client, previous: Mapping[str, Any] | None = None) -> None:
        comps = self.components()
        model = self.gw.profile.name
        old = previous.get("cmps", {}) if previous else {}
        gone = {k: v for k, v in old.items() if k not in comps and isinstance(v, dict) and "p" in v} \
            if isinstance(old, dict) else {}  # fmt: skip
        if gone:
            # Home Assistant removes a component sent with only its platform; then its state topics are cleared.
            removal = {**comps, **{k: {"p": v["p"]} for k, v in gone.items()}}
            await self._publish(c, self.t.discovery, json.dumps(discovery_payload(self.cfg, self.t, removal,
                                                                                  model)).encode())  # fmt: skip
            for v in gone.values():
                for key in ("state_topic", "json_attributes_topic"):
                    topic = v.get(key)
                    if isinstance(topic, str) and topic.startswith(self.t.base + "/"):
                        await mqtt.publish(c, topic, b"", retain=True)
            self._removed = sorted(gone)
            log.info("home assistant: removed components %s", ", ".join(self._removed))
        await self._publish(c, self.t.discovery, json.dumps(discovery_payload(self.cfg, self.t, comps,
                                                                              model)).encode())  # fmt: skip

    async def _refresh(self, c: aiomqtt.Client, *, force: bool = False) -> None:
        for topic, payload in self.states().items():
            if force or self._published.get(topic) != payload:
                await self._publish(c, topic, payload)

    async def _on_event(self, c: aiomqtt.Client, ev: Any) -> None:
        if ev.type in (ACCESS_GRANTED, ACCESS_DENIED) and ev.door in self.gw.doors:
            await self._publish(c, self.t.taps(ev.door), self.tap_message(ev.type, ev.door, ev.reason, ev.user),
                                retain=False)  # fmt: skip
        elif ev.type == READER_FAULT and ev.reader:
            self._reader_state[ev.reader] = {"state": f"fault: {ev.reason}", "fault": ev.reason,
                                             "fault_at": round(ev.ts, 3)}  # fmt: skip
        elif ev.type == READER_STATUS and ev.reader:
            self._reader_state.setdefault(ev.reader, {"state": "ok", "fault": None})
        elif ev.type == DOOR_STATE:
            pass  # the refresh that follows publishes the lock and contact

    async def _handle(self, c: aiomqtt.Client, m: aiomqtt.Message) -> None:
        topic = str(m.topic)
        if topic == self.t.ha_status:
            if mqtt.payload(m).strip() == b"online":
                log.info("home assistant is online: discovery and states again")
                await self._announce(c)
                await self._publish(c, self.t.availability, ONLINE.encode())
                await self._refresh(c, force=True)
            return
        door = self.t.door_of_command(topic)
        if door is not None:
            await self._command(c, door, mqtt.payload(m)[:32].decode("utf-8", "replace").strip())

    async def _command(self, c: aiomqtt.Client, door: str, payload: str) -> None:
        if door not in self.gw.doors:
            self._refuse(door, payload, "no such door on this gateway")
            return
        if door not in self.cfg.hass.commands:
            self._refuse(door, payload, "commands from Home Assistant are not enabled for this door (hass.commands)")
        elif payload not in PULSE_PAYLOADS:
            self._refuse(door, payload, f"only a pulse (OPEN or UNLOCK) is accepted, not {payload!r}")
        else:
            try:
                self.gw.local_pulse(door, source="hass", by="home-assistant")  # journalled by the agent
            except (PermissionError, ValueError) as e:  # DoorLockdownError is a ValueError
                log.warning("home assistant: pulse of door %s refused: %s", door, e)
        await self._refresh(c)

    def _refuse(self, door: str, payload: str, why: str) -> None:
        now = time.monotonic()
        last = self._refused_at.get(door)
        if last is not None and now - last < REFUSAL_JOURNAL_S:
            return
        self._refused_at[door] = now
        log.warning("home assistant: command %r for door %s refused: %s", payload, door, why)
        self.gw.record_event(HASS_COMMAND, door=door if door in self.gw.doors else None, user="home-assistant",
                             detail={"action": payload[:32], "source": "hass", "result": why})  # fmt: skip


def _check_cancelled() -> None:
    """Raise if this task was asked to stop (a cancel swallowed by a library's `wait_for` is not lost)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


__all__ = ["HassBridge", "Topics", "discovery_payload", "door_components", "health_components"]
