"""The gateway agent: composes doors, store, journal, readers, cloud link and control socket.

Start order matters: every lock is driven to its safe state first (door controllers), then the store
loads the rights index, then the journal opens, and only then do readers start delivering taps. One
`asyncio.TaskGroup` owns the long-running tasks, each named (`reader[front]`, `link`, ...); a reader
or the link that fails is journalled and restarted with backoff while the doors keep working.

The parts: `TapHandler` (edge/agent/tap.py) is the sink of every reader; `DoorModes` (edge/agent/modes.py)
is the one owner of door modes; `Connectivity` (edge/agent/connectivity.py) the link's online state and
offline age; `AgentStatus` (edge/agent/status.py) what `status()` returns. The agent itself implements the
cloud link's command handler (`unlock`, `set_door_mode`, `lockdown`, `resync`) by handing each to its owner.

Time: `self.clock` (`edge.clock.AgentClock`) is the one notion of "now" (value and trust) for the
decision, door schedules and holds, the cloud link's command checks, the journal and metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import random
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from datetime import datetime
from typing import TYPE_CHECKING, Any

import msgspec

from edge import __version__
from edge.clock import AgentClock, load_clock_state, read_boot_id, read_ntp_synchronised, save_clock_state
from edge.config import Config, OsdpReaderConfig, ReaderConfig, WiegandReaderConfig
from edge.control import ControlServer, Handler, StatusRequest
from edge.decision import Decider, Decision, OfflinePolicy, Side
from edge.door import DoorController
from edge.events import HASS_COMMAND, INDEX_IMAGE_DAMAGED, INSTALLER_ACTION, SYSTEM
from edge.feed import Feed
from edge.hw import HardwareProfile, load_profile, make_factory
from edge.journal import Journal
from edge.link import EdgeLink, LinkPorts, birth_info
from edge.metrics import EdgeMetrics, serve_metrics
from edge.model import ChangeSet, Door, DoorMode
from edge.readers.base import Reader, ReaderEvent
from edge.sdnotify import Heartbeat, Notifier, watchdog_task
from edge.store import RIGHTS_DAMAGED, Store
from edge.timetrust import ClockTrust, clock_trust_at_boot, sane_ts

from .connectivity import Connectivity
from .modes import DoorModes
from .status import AgentStatus, LinkStatus, ReaderInfo
from .tap import TapHandler

if TYPE_CHECKING:
    from cloud_bridge.protocol import AreaMove, Birth, ReaderAction
    from edge.events import Detail
    from edge.readers.osdp.remote import ReaderCommands

log = logging.getLogger("edge.agent")


class Agent:
    def __init__(
        self,
        cfg: Config,
        *,
        profile: HardwareProfile | None = None,
        factory: Any = None,
        clock: Callable[[], float] = time.time,
        ntp: Callable[[], Awaitable[bool | None]] = read_ntp_synchronised,
        demo: ChangeSet | None = None,
    ) -> None:
        """`clock` is the system's wall clock (raw); `ntp` reads whether NTP has synchronised it."""
        self.cfg = cfg
        self.profile = profile or load_profile(cfg.hardware)
        self.factory = factory if factory is not None else make_factory(self.profile)
        self.simulated = self.profile.factory == "mock"
        #: The one clock of the agent: corrected UTC seconds (`self.clock()`) and whether to trust them.
        self.clock = AgentClock(wall=clock, mono=time.monotonic)
        self.read_ntp = ntp
        self.demo = demo
        self.doors: dict[str, DoorController] = {}
        self.readers: dict[str, Reader] = {}
        self.reader_door: dict[str, str] = {}
        #: reader -> the side of its door it reads ("in" unless configured `side = "out"`)
        self.reader_side: dict[str, Side] = {}
        self.store: Store | None = None
        self.journal: Journal | None = None
        #: What the doors recorded before the journal opened (each lock's state at start): journalled
        #: as soon as it opens, so the cloud sees every door's state from the first batch.
        self._before_journal: list[tuple[str, dict[str, Any]]] = []
        self.decider: Decider | None = None
        self.modes: DoorModes | None = None
        self.tap: TapHandler | None = None
        #: The cloud link's wiring while the agent runs (the integrity check asks it for a snapshot).
        self.link: EdgeLink | None = None
        #: the signed commands for OSDP readers (key rotation, outputs, firmware), once the readers are up
        self.reader_commands: ReaderCommands | None = None
        self.connectivity = Connectivity(self.clock)
        self.boot_id = read_boot_id()
        self.heartbeat = Heartbeat(max_age_s=4.0)
        self.notifier = Notifier.from_env()
        self.metrics = EdgeMetrics()
        #: The control socket's requests. The simulator adds its own (edge/sim/hands.py, chosen by edge/cli.py).
        self.control_handlers: dict[type, Handler] = {StatusRequest: self._status}
        #: Run once the doors have started, before the store opens (the simulator closes its door contacts).
        self.after_doors: list[Callable[[Agent], Awaitable[None]]] = []
        self._bg: set[asyncio.Task[None]] = set()
        self.started = asyncio.Event()
        #: How often the rights on disk are checked against memory (Store.check_integrity).
        self.integrity_check_s = 3600.0
        self._stop = asyncio.Event()
        #: The last journal and reader events, for the installer page and Home Assistant (edge/feed.py).
        self.feed = Feed(self.clock)
        self.started_mono = time.monotonic()
        #: The installer page while it runs ([installer]; edge/installer/).
        self.installer: Any = None

    # --- the tap path (edge/agent/tap.py) ---------------------------------------------------------------

    def on_reader_event(self, ev: ReaderEvent) -> None:
        """The sink of every reader (`TapHandler.on_reader_event`)."""
        assert self.tap is not None
        self.tap.on_reader_event(ev)

    @property
    def decisions(self) -> list[Decision]:
        """The last few decisions."""
        return self.tap.decisions if self.tap is not None else []

    @property
    def decided(self) -> int:
        """Decisions made in this run."""
        return self.tap.decided if self.tap is not None else 0

    @property
    def trust(self) -> ClockTrust | None:
        return self.clock.trust

    @property
    def clock_trusted(self) -> bool:
        return self.clock.trusted

    # --- commands (cloud link) --------------------------------------------------------------------------

    async def unlock(self, door: str, seconds: float) -> None:
        """A remote unlock. Refused by the door itself while it is in lockdown (`DoorLockdownError`)."""
        ctl = self.doors.get(door)
        if ctl is None:
            raise ValueError(f"no door {door!r} on this gateway")
        ctl.unlock_for(seconds)

    async def set_door_mode(self, door: str, mode: DoorMode | None) -> None:
        assert self.modes is not None
        await self.modes.set_mode(door, mode)

    async def lockdown(self, active: bool) -> None:
        assert self.modes is not None
        await self.modes.set_lockdown(active)

    def local_pulse(self, door: str, *, source: str, by: str | None = None) -> float:
        """A relay pulse asked on the gateway (source "installer" or "hass"), through the door-mode owner:
        refused in lockdown (`DoorLockdownError`); from Home Assistant also while the link is offline past its
        grace and the offline policy is not "all" (`PermissionError`). Journalled either way."""
        assert self.modes is not None
        type = HASS_COMMAND if source == "hass" else INSTALLER_ACTION
        try:
            if source == "hass" and self.cfg.policy.offline_policy is not OfflinePolicy.ALL:
                age = self.rights_age_s()
                if age is not None and age > self.cfg.policy.offline_grace_s:
                    policy = self.cfg.policy.offline_policy.value
                    raise PermissionError(f"the gateway is offline and the offline policy is {policy!r}: "
                                          "no pulse from Home Assistant")  # fmt: skip
            seconds = self.modes.pulse(door)
        except Exception as e:
            self._journal(type, door=door if door in self.doors else None, user=by,
                          detail={"action": "pulse", "source": source, "result": str(e)[:200]})  # fmt: skip
            raise
        self._journal(type, door=door, user=by, detail={"action": "pulse", "source": source, "result": "ok",
                                                        "seconds": seconds})  # fmt: skip
        return seconds

    async def resync(self) -> None:
        """The cloud asked for a resync: the link requests the rights again; nothing to do locally."""
        log.info("resync requested by the cloud")

    async def reader_command(self, action: ReaderAction) -> Detail:
        """A signed command for an OSDP reader (edge/readers/osdp/remote.py)."""
        if self.reader_commands is None:
            raise ValueError("no OSDP reader on this gateway")
        return await self.reader_commands.run(action)

    async def reset_anti_passback(self, user: str | None, area: str | None) -> int:
        """The signed anti-passback reset (access rules, `TapHandler.reset_command`)."""
        assert self.tap is not None
        return self.tap.reset_command(user, area)

    async def area_moves(self, moves: Sequence[AreaMove]) -> int:
        """Passages the site's other gateways saw, relayed by the cloud (`TapHandler.remote_moves`)."""
        assert self.tap is not None
        return self.tap.remote_moves((m.user, m.area, m.ts) for m in moves)

    def _reader_sink(self, ev: ReaderEvent) -> None:
        """The readers' sink: the tap path first, then the feed (a deque append) for the installer page."""
        assert self.tap is not None
        self.tap.on_reader_event(ev)
        self.feed.reader_event(ev, self.reader_door.get(ev.reader))

    # --- the link's state -------------------------------------------------------------------------------

    @property
    def link_online(self) -> bool:
        return self.connectivity.online

    @property
    def offline_since(self) -> datetime | None:
        """When the link went offline, on the agent's clock now (None while online)."""
        return self.connectivity.offline_since

    def rights_age_s(self) -> float | None:
        """How long the rights have gone without a cloud connection (None while online)."""
        return self.connectivity.rights_age_s()

    def link_state_changed(self, online: bool) -> None:
        if not self.connectivity.set_online(online):
            return
        if online:
            log.info("cloud link online")
        else:
            log.warning(
                "cloud link OFFLINE: deciding from the local store (offline policy %s after %.0f s)",
                self.cfg.policy.offline_policy.value, self.cfg.policy.offline_grace_s,
            )  # fmt: skip
        self._persist_last_online()

    def cloud_time(self, server_ts: float, rtt: float) -> None:
        """A time sample from the cloud (an event acknowledgement): skew alarm, time source when untrusted."""
        self.clock.cloud_time(server_ts, rtt)
        self._drain_clock_alarms()

    def _persist_last_online(self) -> None:
        """Remember when the link was last up, so the offline age survives a restart (best effort)."""
        if self.store is None:
            return
        ts = self.clock() if self.link_online else (self.offline_since.timestamp() if self.offline_since else None)
        if ts is None:
            return
        task = asyncio.get_running_loop().create_task(self._write_meta("last_online", ts), name="persist-last-online")
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    async def _write_meta(self, key: str, value: float) -> None:
        assert self.store is not None
        try:
            await self.store.set_meta(key, value)
        except Exception as e:  # a full disk must not take the agent down: report it
            log.error("cannot persist %s: %s", key, e)

    def _birth(self) -> Birth:
        return birth_info(
            self.cfg, doors={d: c.door.name or d for d, c in self.doors.items()},
            readers={r: (rd.kind, self.reader_door[r]) for r, rd in self.readers.items()},
            occupancy=dict(self.tap.access.occupancy) if self.tap is not None else {},
        )  # fmt: skip

    # --- status -----------------------------------------------------------------------------------------

    def status(self) -> AgentStatus:
        store, journal = self.store, self.journal
        since = self.offline_since
        return AgentStatus(
            version=__version__, site=self.cfg.site.id, gateway=self.cfg.site.gateway, simulated=self.simulated,
            rights_version=store.version if store else None, credentials=len(store.index) if store else None,
            journal_depth=journal.depth if journal else None, storage_ok=journal.storage_ok if journal else None,
            link=LinkStatus(online=self.link_online, offline_since=since.isoformat() if since else None),
            clock_trusted=self.clock_trusted, clock=self.clock.status(), rights_age_s=self.rights_age_s(),
            doors={k: v.status() for k, v in self.doors.items()},
            occupancy=dict(self.tap.access.occupancy) if self.tap is not None else {},
            readers={k: ReaderInfo(door=self.reader_door[k], kind=r.kind, online=bool(getattr(r, "online", True)))
                     for k, r in self.readers.items()},
            lockdown=self.modes.lockdown if self.modes else False,
            installer=self.installer.info() if self.installer is not None else None,
        )  # fmt: skip

    async def _status(self, req: StatusRequest) -> AgentStatus:
        return self.status()

    # --- lifecycle --------------------------------------------------------------------------------------

    def _make_readers(self) -> tuple[list[Reader], list[Any]]:
        """The configured readers (one Wiegand reader per wired door if none are configured), and the
        OSDP buses that poll them: readers on the same serial port share one bus."""
        from edge.readers.osdp import Timing, osdp_bus
        from edge.readers.registry import build_reader

        assert self.tap is not None

        configs: list[tuple[str, ReaderConfig]] = []
        for i, rc in enumerate(self.cfg.readers):
            configs.append(
                (rc.name or f"{rc.door}.{'wiegand' if isinstance(rc, WiegandReaderConfig) else 'osdp'}{i}", rc)
            )
        if not self.cfg.readers:
            for io in self.profile.doors:
                if io.reader_d0_pin is not None and io.reader_d1_pin is not None:
                    configs.append((f"{io.door}.wiegand", WiegandReaderConfig(door=io.door)))
        readers: list[Reader] = []
        by_port: dict[str, list[Any]] = {}
        port_cfg: dict[str, OsdpReaderConfig] = {}
        for i, (name, rc) in enumerate(configs):
            door_ctl = self.doors.get(rc.door)
            r = build_reader(
                rc, name, self._reader_sink, profile=self.profile, factory=self.factory, cfg=self.cfg, index=i,
                indicator=door_ctl.indicator if door_ctl is not None else None,
            )  # fmt: skip
            readers.append(r)
            self.feed.watch_keys(r, rc.door)  # key presses, masked, for the installer page (edge/feed.py)
            self.reader_door[name] = rc.door
            self.reader_side[name] = rc.side
            if isinstance(rc, OsdpReaderConfig):
                by_port.setdefault(rc.port, []).append(r)
                port_cfg.setdefault(rc.port, rc)
        buses = [
            osdp_bus(port, rs, baudrate=port_cfg[port].baud, direction=port_cfg[port].direction,
                     mark=port_cfg[port].mark, timing=Timing(offline_after=port_cfg[port].offline_after_s))
            for port, rs in by_port.items()
        ]
        return readers, buses

    async def run(self) -> None:
        cfg = self.cfg
        # Exit order matters too: the journal (outermost) closes after the doors have recorded the state
        # they left each lock in; the doors close after everything that could act on them.
        async with AsyncExitStack() as journal_stack, AsyncExitStack() as door_stack, AsyncExitStack() as stack:
            # 1. Locks to their safe state before anything else.
            for io in self.profile.doors:
                ctl = DoorController(Door(id=io.door), io, factory=self.factory, emit=self._journal,
                                     clock=time.monotonic)  # fmt: skip
                self.doors[io.door] = await door_stack.enter_async_context(ctl)
            for hook in self.after_doors:
                await hook(self)
            # 2. Rights and journal.
            state = cfg.state_dir
            self.store = await stack.enter_async_context(
                Store(state / "rights.db", cfg.tz, synchronous=cfg.storage.synchronous, verify_at_open=False)
            )
            self.journal = await journal_stack.enter_async_context(
                Journal(
                    state / "journal.db", site_tz=cfg.tz, link_up=lambda: self.connectivity.online, clock=self.clock,
                    max_events=cfg.storage.journal_max_events, memory_limit=cfg.storage.journal_memory_events,
                    interval_s=cfg.storage.journal_flush_s, synchronous=cfg.storage.synchronous,
                )
            )  # fmt: skip
            self.journal.on_record.append(self.feed.event)
            early, self._before_journal = self._before_journal, []
            for type, fields in early:
                self.journal.record(type, **fields)
            if cfg.policy.clock_source == "ntp":
                clock_state = await load_clock_state(self.store)
                self.clock.trust = clock_trust_at_boot(
                    clock_state, self.boot_id, wall=self.clock.wall(), mono=self.clock.mono(),
                    max_skew_s=cfg.policy.max_clock_skew_s, adopt_cloud_time=cfg.policy.adopt_cloud_time,
                )  # fmt: skip
                self._drain_clock_alarms()
            if self.demo is not None and self.store.version == 0:
                await self.store.apply(self.demo)
                log.info("demo provisioning applied: rights version %d", self.store.version)
            self.decider = decider = Decider(self.store.index, cfg.site_policy())
            self.store.on_swap.append(lambda idx: setattr(decider, "index", idx))
            self.modes = DoorModes(decider, self.doors, self.store, clock=self.clock,
                                   clock_trusted=lambda: self.clock.trusted, emit=self._journal)  # fmt: skip
            await self.modes.restore()
            self._refresh_door_models()
            self.modes.sync()
            last = await self.store.get_meta("last_online")
            self.connectivity = Connectivity(self.clock)  # offline from this start on, or since last online
            try:
                if last is not None and sane_ts(float(last)):  # offline since before this start
                    self.connectivity.offline_before_start(float(last))
            except (TypeError, ValueError):
                log.warning("ignoring an unreadable last_online time in the store: %r", last)
            self.tap = TapHandler(
                decider=decider, doors=self.doors, readers=self.readers, reader_door=self.reader_door,
                modes=self.modes, journal=self.journal, clock=self.clock, connectivity=self.connectivity,
                metrics=self.metrics, emit=self._journal, access=await self.store.load_access_state(),
                save_access=self.store.save_access_state, reader_side=self.reader_side,
            )  # fmt: skip
            stack.push_async_callback(self.tap.close)
            for door_id, ctl in self.doors.items():  # REX honours the interlocks (unless they let it override)
                ctl.rex_allowed = functools.partial(self.tap.rex_allowed, door_id)
            self.journal.record(
                SYSTEM, detail={"event": "started", "version": __version__, "rights_version": self.store.version}
            )
            if self.store.damage is not None:  # the rights file was damaged: say so where the cloud sees it
                self.journal.record(RIGHTS_DAMAGED, detail=self.store.damage)
            if self.store.image_problem is not None:
                self.journal.record(INDEX_IMAGE_DAMAGED, detail=self.store.image_problem)
            # 3. Readers (and the OSDP buses that poll them).
            readers, buses = self._make_readers()
            for r in readers:
                self.readers[r.name] = await stack.enter_async_context(r)
            for bus in buses:
                await stack.enter_async_context(bus)
            if buses:
                from edge.readers.osdp import OsdpReader
                from edge.readers.osdp.remote import ReaderCommands

                self.reader_commands = await stack.enter_async_context(ReaderCommands(
                    {n: r for n, r in self.readers.items() if isinstance(r, OsdpReader)},
                    firmware_dir=state / "firmware", journal=self._journal, doors=self.reader_door,
                ))  # fmt: skip
            await stack.enter_async_context(ControlServer(cfg.control.socket, dict(self.control_handlers)))
            if cfg.metrics.port or cfg.metrics.socket:  # a failure to serve is logged, never fatal
                self.metrics.registry.on_collect.append(
                    lambda: self.metrics.update_from_status(msgspec.to_builtins(self.status()))
                )
                await stack.enter_async_context(serve_metrics(cfg, self.metrics.registry.render))
            if cfg.installer.enabled:  # imported only when configured: a gateway without it needs no web stack
                from edge.installer import Installer

                self.installer = await stack.enter_async_context(Installer(cfg, self))
            stack.callback(self.notifier.stopping, "stopping: locks to their safe state")
            log.info(
                "gateway %s/%s up: %d doors, %d readers, %d credentials, rights version %d%s",
                cfg.site.id, cfg.site.gateway, len(self.doors), len(self.readers), len(self.store.index),
                self.store.version, " (simulated hardware)" if self.simulated else "",
            )  # fmt: skip
            log.warning(
                "running OFFLINE until the cloud link connects: taps are decided from the local store "
                "(offline policy %s after %.0f s)", cfg.policy.offline_policy.value, cfg.policy.offline_grace_s,
            )  # fmt: skip
            gc.freeze()  # boot-time objects are long-lived: keep them out of every later collection
            self.started.set()
            self.notifier.ready(f"{len(self.doors)} doors, {len(self.readers)} readers, rights v{self.store.version}")
            async with asyncio.TaskGroup() as tg:
                for name, r in self.readers.items():
                    tg.create_task(self._supervise(f"reader[{name}]", r.run), name=f"reader[{name}]")
                for bus in buses:
                    tg.create_task(self._supervise(f"osdp[{bus.port}]", bus.run), name=f"osdp[{bus.port}]")
                if cfg.link.enabled:
                    self.link = EdgeLink(cfg, LinkPorts(
                        store=self.store, journal=self.journal, clock=self.clock, commands=self,
                        birth=self._birth, on_state=self.link_state_changed, on_cloud_time=self.cloud_time,
                    ))  # fmt: skip
                    self.tap.on_urgent.append(self.link.send_urgent)
                    tg.create_task(self._supervise("link", self.link.run), name="link")
                else:
                    log.warning("cloud link disabled in the config: running offline")
                if self.installer is not None:
                    tg.create_task(self._supervise("installer", self.installer.run), name="installer")
                if cfg.hass.enabled:
                    from edge.hass import HassBridge

                    tg.create_task(self._supervise("hass", HassBridge(cfg, self).run), name="hass")
                tg.create_task(self._supervise("door-modes", self._door_modes), name="door-modes")
                tg.create_task(self._supervise("integrity", self._check_integrity), name="integrity")
                tg.create_task(self._watchdog(), name="watchdog")
                tg.create_task(self._supervise("loop-lag", self.metrics.track_loop_lag), name="loop-lag")
                stop = tg.create_task(self._stop.wait(), name="stop")
                await stop
                if self.reader_commands is not None:  # firmware transfers paused while the buses still answer
                    await self.reader_commands.pause()
                raise _Stop

    def stop(self) -> None:
        self._stop.set()

    def record_event(self, type: str, **fields: Any) -> None:
        """Journal an event of a part outside the tap path (the installer page, Home Assistant)."""
        self._journal(type, **fields)

    def _journal(self, type: str, **fields: Any) -> None:
        detail = fields.get("detail") or {}
        level = logging.WARNING if type in ("door.forced_open", "door.held_open") else logging.INFO
        log.log(
            level,
            "door %s: %s %s",
            fields.get("door", "-"),
            type.removeprefix("door."),
            " ".join(f"{k}={v}" for k, v in detail.items()),
        )
        if self.journal is not None:
            self.journal.record(type, **fields)
        elif len(self._before_journal) < 1000:  # bounded: a few events per door at start
            self._before_journal.append((type, fields))
        if self.tap is not None:
            self.tap.door_event(type, fields)

    def _refresh_door_models(self) -> None:
        assert self.decider is not None
        tables = self.decider.index.tables
        for door_id, ctl in self.doors.items():
            model = tables.doors.get(door_id)
            if model is not None:
                ctl.door = model

    async def _door_modes(self) -> None:
        """Apply scheduled modes to the locks (unlocked by schedule, first-card windows) every second."""
        tick = 0
        while True:
            self.heartbeat.beat()
            if self.trust is not None:
                self.clock.observe()
                if tick % 30 == 0:
                    await self._check_clock()
                self._drain_clock_alarms()
            self._refresh_door_models()
            if self.modes is not None:
                self.modes.sync()
            if self.tap is not None:
                self.tap.scheduled_resets(self.clock.datetime())
            tick += 1
            if self.link_online and tick % 60 == 0:
                self._persist_last_online()
            await asyncio.sleep(1.0)

    async def _check_integrity(self) -> None:
        """Check the rights on disk against the rights in memory every `integrity_check_s` (a cheap
        `quick_check` and the rights checksum): silently changed rows are an alarm, the verified copy is
        refreshed when sound, and the link asks the cloud for a snapshot when not."""
        assert self.store is not None and self.journal is not None
        # Booted from the index image, the file itself was not checked at open: the first check comes soon.
        first = min(self.integrity_check_s, 60.0) if self.store.booted_from == "image" else self.integrity_check_s
        while True:
            await asyncio.sleep(first)
            first = self.integrity_check_s
            problem = await self.store.check_integrity()
            if problem is not None:
                self.journal.record(RIGHTS_DAMAGED, detail={"error": problem, "when": "periodic"})
                if self.link is not None:
                    self.link.request_snapshot()

    async def _check_clock(self) -> None:
        """Ask NTP whether the clock is synchronised, and persist the last-good time while trusted."""
        assert self.trust is not None and self.store is not None
        synced = await self.read_ntp()
        if synced is not None:
            self.clock.ntp_synchronised(synced)
        try:
            await save_clock_state(self.store, self.trust, self.boot_id)
        except Exception as e:  # a full disk: report, keep deciding
            log.error("cannot persist the last-good time: %s", e)

    def _drain_clock_alarms(self) -> None:
        for a in self.clock.alarms():
            (log.info if a.kind == "clock_trusted" else log.warning)("clock: %s (%s)", a.kind, a.message)
            self.metrics.clock_alarms.inc(kind=a.kind)
            if self.journal is not None:
                self.journal.record(f"alarm.{a.kind}", detail={"message": a.message, "skew_s": a.skew_s})

    async def _watchdog(self) -> None:
        def healthy() -> bool:
            ok = self.heartbeat.healthy()
            if ok:
                self.metrics.watchdog_pings.inc()
            return ok

        await watchdog_task(self.notifier, healthy)

    async def _supervise(self, name: str, fn: Callable[[], Awaitable[None]]) -> None:
        """Run a subsystem; when it fails, journal it and restart it with jittered backoff."""
        delay = 0.5
        while True:
            started = time.monotonic()
            try:
                await fn()
                return
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.exception("%s failed; restarting", name)
                self._journal(SYSTEM, detail={"event": "subsystem_failed", "subsystem": name, "error": str(e)[:200]})
            if time.monotonic() - started > 60:
                delay = 0.5
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, 30.0)


class _Stop(Exception):
    pass


async def run_agent(agent: Agent) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, agent.stop)
    try:
        await agent.run()
    except* _Stop:
        log.info("agent stopped")
