"""Metrics an operator can scrape: Prometheus text exposition (format 0.0.4) on 127.0.0.1, no dependency.

`Metrics` is a registry of counters and gauges with labels (pure, synchronous; the agent touches it from
the loop thread only). `MetricsServer` is a minimal asyncio HTTP/1.0 server that answers `GET /metrics`
(and `HEAD`) with `Metrics.render()` and nothing else: 404 for other paths, 405 for other methods, 400 for
anything malformed or oversized, and it closes slow clients. It binds the loopback interface only: the
metrics name doors and readers, so they are for a local scraper (node exporter textfile, a Prometheus
agent on the gateway) or an SSH tunnel, never the site network.

`EdgeMetrics` declares the agent's standard metric set and fills the gauges from `Agent.status()`.
Card numbers, user names and secrets are never metric labels.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import Any, Self

log = logging.getLogger("edge.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")

LabelValues = tuple[str, ...]


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if v == int(v) and abs(v) < 2**53:
        return str(int(v))
    return repr(float(v))


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labels: Iterable[str] = ()) -> None:
        if not _NAME.match(name):
            raise ValueError(f"invalid metric name {name!r}")
        self.name = name
        self.help = help
        self.labels = tuple(labels)
        for label in self.labels:
            if not _LABEL.match(label) or label.startswith("__"):
                raise ValueError(f"{name}: invalid label name {label!r}")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"{name}: duplicate label names")
        self._values: dict[LabelValues, float] = {}

    def _key(self, labels: Mapping[str, object]) -> LabelValues:
        if set(labels) != set(self.labels):
            raise ValueError(f"{self.name}: labels {sorted(labels)} do not match {sorted(self.labels)}")
        return tuple(str(labels[k]) for k in self.labels)

    def value(self, **labels: object) -> float:
        """The current value for one label set (0 when never set)."""
        return self._values.get(self._key(labels), 0.0)

    def clear(self) -> None:
        """Forget every label set (e.g. before refilling gauges of doors that may have gone)."""
        self._values.clear()

    def render(self, out: list[str]) -> None:
        out.append(f"# HELP {self.name} {_escape_help(self.help)}")
        out.append(f"# TYPE {self.name} {self.kind}")
        for key in sorted(self._values):
            v = format_value(self._values[key])
            if key:
                pairs = ",".join(f'{n}="{_escape_label(x)}"' for n, x in zip(self.labels, key, strict=True))
                out.append(f"{self.name}{{{pairs}}} {v}")
            else:
                out.append(f"{self.name} {v}")


class Counter(_Metric):
    """A count that only goes up (restarts from 0 when the agent restarts; Prometheus handles that)."""

    kind = "counter"

    def inc(self, amount: float = 1.0, **labels: object) -> None:
        if amount < 0 or math.isnan(amount):
            raise ValueError(f"{self.name}: a counter cannot decrease")
        key = self._key(labels)
        self._values[key] = self._values.get(key, 0.0) + amount


class Gauge(_Metric):
    kind = "gauge"

    def set(self, value: float, **labels: object) -> None:
        self._values[self._key(labels)] = float(value)

    def inc(self, amount: float = 1.0, **labels: object) -> None:
        key = self._key(labels)
        self._values[key] = self._values.get(key, 0.0) + amount

    def dec(self, amount: float = 1.0, **labels: object) -> None:
        self.inc(-amount, **labels)


class Metrics:
    """A registry. `on_collect` callbacks run at the start of every `render()` to refresh gauges."""

    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}
        self.on_collect: list[Callable[[], None]] = []

    def _add(self, metric: _Metric) -> None:
        if metric.name in self._metrics:
            raise ValueError(f"metric {metric.name!r} is already registered")
        self._metrics[metric.name] = metric

    def counter(self, name: str, help: str, labels: Iterable[str] = ()) -> Counter:
        c = Counter(name, help, labels)
        self._add(c)
        return c

    def gauge(self, name: str, help: str, labels: Iterable[str] = ()) -> Gauge:
        g = Gauge(name, help, labels)
        self._add(g)
        return g

    def render(self) -> str:
        for cb in self.on_collect:
            try:
                cb()
            except Exception:  # a broken collector must not take the other metrics down
                log.exception("metrics collector failed")
        out: list[str] = []
        for m in self._metrics.values():
            m.render(out)
        return "\n".join(out) + "\n"


class EdgeMetrics:
    """The agent's standard metrics (the list is in docs/operations.md)."""

    def __init__(self, registry: Metrics | None = None) -> None:
        m = self.registry = registry or Metrics()
        self.up = m.gauge("edge_up", "1 while the agent runs")
        self.info = m.gauge("edge_info", "Agent version and identity (value 1)", ["version", "site", "gateway"])
        self.decisions = m.counter(
            "edge_decisions_total", "Access decisions by door, result and reason", ["door", "result", "reason"]
        )
        self.door_locked = m.gauge("edge_door_locked", "1 while the door's lock is locked", ["door"])
        self.door_open = m.gauge("edge_door_open", "1 while the door contact reads open", ["door"])
        self.door_alarm = m.gauge("edge_door_alarm", "1 while the door has this alarm", ["door", "alarm"])
        self.reader_up = m.gauge("edge_reader_up", "1 while the reader is online", ["reader", "door", "kind"])
        self.reader_faults = m.counter("edge_reader_faults_total", "Reader faults by kind", ["reader", "kind"])
        self.link_up = m.gauge("edge_link_up", "1 while the cloud link is connected")
        self.rights_version = m.gauge("edge_rights_version", "Version of the rights held")
        self.rights_age = m.gauge("edge_rights_age_seconds", "Seconds since the rights were last synchronised")
        self.credentials = m.gauge("edge_credentials", "Credentials in the rights index")
        self.journal_depth = m.gauge("edge_journal_depth", "Events not yet acknowledged by the cloud")
        self.storage_ok = m.gauge("edge_storage_ok", "1 while the journal can write to disk")
        self.clock_trusted = m.gauge("edge_clock_trusted", "1 while the clock is trusted")
        self.clock_offset = m.gauge("edge_clock_offset_seconds", "Cloud time offset applied to the clock")
        self.clock_alarms = m.counter("edge_clock_alarms_total", "Clock alarms by kind", ["kind"])
        self.lockdown = m.gauge("edge_lockdown", "1 while the site lockdown is active")
        self.loop_lag = m.gauge("edge_loop_lag_seconds", "Age of the tap path's last heartbeat")
        self.watchdog_pings = m.counter("edge_watchdog_pings_total", "systemd watchdog pings sent")

    def update_from_status(self, status: Mapping[str, Any]) -> None:
        """Fill the gauges from `Agent.status()` (missing keys leave their gauges alone)."""
        self.up.set(1)
        if "version" in status:
            self.info.clear()
            self.info.set(1, version=status["version"], site=status.get("site", ""),
                          gateway=status.get("gateway", ""))  # fmt: skip
        for key, gauge in (
            ("rights_version", self.rights_version),
            ("credentials", self.credentials),
            ("journal_depth", self.journal_depth),
            ("rights_age_s", self.rights_age),
        ):
            v = status.get(key)
            if isinstance(v, int | float) and not isinstance(v, bool):
                gauge.set(v)
        for key, gauge in (("storage_ok", self.storage_ok), ("lockdown", self.lockdown)):
            if isinstance(status.get(key), bool):
                gauge.set(1 if status[key] else 0)
        link = status.get("link")
        if isinstance(link, Mapping) and "online" in link:
            self.link_up.set(1 if link["online"] else 0)
        clock = status.get("clock_trusted")
        if isinstance(clock, bool):
            self.clock_trusted.set(1 if clock else 0)
        doors = status.get("doors")
        if isinstance(doors, Mapping):
            for g in (self.door_locked, self.door_open, self.door_alarm):
                g.clear()
            for door, st in doors.items():
                if not isinstance(st, Mapping):
                    continue
                if "locked" in st:
                    self.door_locked.set(1 if st["locked"] else 0, door=door)
                if st.get("contact") in ("open", "closed"):
                    self.door_open.set(1 if st["contact"] == "open" else 0, door=door)
                for alarm in st.get("alarms", ()):
                    self.door_alarm.set(1, door=door, alarm=alarm)
        readers = status.get("readers")
        if isinstance(readers, Mapping):
            for name, st in readers.items():
                if isinstance(st, Mapping) and "online" in st:
                    self.reader_up.set(
                        1 if st["online"] else 0, reader=name, door=st.get("door", ""), kind=st.get("kind", "")
                    )


# --- the HTTP server -----------------------------------------------------------------------------------

MAX_LINE = 8192
MAX_HEADERS = 64
READ_TIMEOUT_S = 5.0
MAX_CLIENTS = 8
LINGER_S = 1.0
LINGER_BYTES = 1 << 20


class MetricsServer:
    """`async with MetricsServer(port, render) as srv:` serves `render()` at http://127.0.0.1:port/metrics.

    `port=0` picks a free port (see `srv.port`); the agent leaves the server out when its configured port
    is 0. `render` runs on the loop thread for each scrape.
    """

    HOST = "127.0.0.1"

    def __init__(self, port: int, render: Callable[[], str]) -> None:
        self._port = port
        self._render = render
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.Task[None]] = set()
        self.port = port

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(
            self._on_client, self.HOST, self._port, limit=MAX_LINE, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("metrics on http://%s:%d/metrics", self.HOST, self.port)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for t in list(self._clients):
            t.cancel()
        for t in list(self._clients):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if server is not None:
            await server.wait_closed()

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._clients.add(task)
        try:
            if len(self._clients) > MAX_CLIENTS:
                return
            async with asyncio.timeout(READ_TIMEOUT_S):
                status, body, extra = await self._respond(reader)
            head_only = extra.pop("_head", None) is not None
            data = body.encode("utf-8")
            lines = [f"HTTP/1.0 {status}", f"Content-Length: {len(data)}", "Connection: close"]
            lines += [f"{k}: {v}" for k, v in extra.items()]
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + (b"" if head_only else data))
            async with asyncio.timeout(READ_TIMEOUT_S):
                await writer.drain()
            if not status.startswith("200"):
                await self._linger(reader, writer)
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            if task is not None:
                self._clients.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    @staticmethod
    async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """After an error reply, half-close and discard what the client still sends (briefly, boundedly):
        closing with unread input would reset the connection and the client could lose the reply."""
        if writer.can_write_eof():
            writer.write_eof()
        left = LINGER_BYTES
        with contextlib.suppress(TimeoutError, ConnectionError, asyncio.LimitOverrunError):
            async with asyncio.timeout(LINGER_S):
                while left > 0:
                    chunk = await reader.read(min(left, 65536))
                    if not chunk:
                        break
                    left -= len(chunk)

    async def _respond(self, reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str]]:
        try:
            request = await reader.readuntil(b"\n")
            for _ in range(MAX_HEADERS + 1):
                line = await reader.readuntil(b"\n")
                if line in (b"\r\n", b"\n"):
                    break
            else:
                return "400 Bad Request", "too many headers\n", {"Content-Type": "text/plain"}
        except asyncio.LimitOverrunError:
            return "400 Bad Request", "line too long\n", {"Content-Type": "text/plain"}
        parts = request.decode("latin-1").strip().split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return "400 Bad Request", "bad request line\n", {"Content-Type": "text/plain"}
        method, target, _version = parts
        path = target.split("?", 1)[0]
        if path != "/metrics":
            return "404 Not Found", "not found: try /metrics\n", {"Content-Type": "text/plain"}
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", "GET only\n", {"Content-Type": "text/plain", "Allow": "GET, HEAD"}
        try:
            body = self._render()
        except Exception:
            log.exception("rendering metrics failed")
            return "500 Internal Server Error", "metrics unavailable\n", {"Content-Type": "text/plain"}
        extra = {"Content-Type": CONTENT_TYPE}
        if method == "HEAD":
            extra["_head"] = "1"
        return "200 OK", body, extra
