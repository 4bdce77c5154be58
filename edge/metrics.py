"""Metrics an operator can scrape: Prometheus text exposition (format 0.0.4), no dependency.

`Metrics` is a registry of counters and gauges with labels (pure, synchronous; the agent touches it from
the loop thread only). `MetricsServer` is a minimal asyncio HTTP/1.0 server that answers `GET /metrics`
(and `HEAD`) with `Metrics.render()` and nothing else: 401 without the bearer token (when one is set), 404
for other paths, 405 for other methods, 400 for anything malformed or oversized. The metrics name doors and
readers, so they are not for every local user: the server listens on a Unix socket (mode 0660, a group the
operator chooses) and/or on 127.0.0.1 with a bearer token read from a systemd credential; TCP without a
token is refused at config check unless `metrics.allow_unauthenticated = true` (warned at every start).
Never the site network. Slow or silent clients cannot starve a real scrape (see `MetricsServer`).

`EdgeMetrics` declares the agent's standard metric set, fills the gauges from `Agent.status()` and measures
the event loop's lag (`track_loop_lag`, a task the agent runs). Card numbers, user names and secrets are
never metric labels.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import hashlib
import hmac
import logging
import math
import os
import re
import stat
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from .errors import ConfigError
from .secrets import SecretSource

if TYPE_CHECKING:
    from .config import Config

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


#: `track_loop_lag` wakes this often, and `edge_loop_lag_seconds` is the worst lateness of this window.
LAG_INTERVAL_S = 0.25
LAG_WINDOW_S = 30.0


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
        self.loop_lag = m.gauge(
            "edge_loop_lag_seconds", f"How late the event loop ran a timer: the worst of the last {LAG_WINDOW_S:.0f} s"
        )
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
        offset = status.get("clock", {}).get("offset_s") if isinstance(status.get("clock"), Mapping) else None
        if isinstance(offset, int | float) and not isinstance(offset, bool):
            self.clock_offset.set(offset)
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

    async def track_loop_lag(self, interval_s: float = LAG_INTERVAL_S) -> None:
        """Run for ever (a task of the agent's TaskGroup): sleep `interval_s` and record how much later than
        asked the loop woke it; `edge_loop_lag_seconds` is the worst of the last LAG_WINDOW_S. A loop that
        runs the tap path late shows here before the watchdog (4 s) would fire."""
        loop = asyncio.get_running_loop()
        window: deque[float] = deque(maxlen=max(1, round(LAG_WINDOW_S / interval_s)))
        while True:
            due = loop.time() + interval_s
            await asyncio.sleep(interval_s)
            window.append(max(0.0, loop.time() - due))
            self.loop_lag.set(max(window))


# --- the HTTP server -----------------------------------------------------------------------------------

MAX_LINE = 8192
MAX_HEAD = 16384
MAX_HEADERS = 64
#: The whole request head must arrive within this (a client trickling a byte a second is cut off).
READ_TIMEOUT_S = 5.0
#: The reply must be taken within this (a client that reads nothing is cut off).
WRITE_TIMEOUT_S = 5.0
CLOSE_TIMEOUT_S = 1.0
WRITE_CHUNK = 65536
MAX_CLIENTS = 16
CACHE_S = 1.0
LINGER_S = 1.0
LINGER_BYTES = 1 << 20
SOCKET_MODE = 0o660
TOKEN_MIN_CHARS = 16
_TOKEN68 = re.compile(r"^[A-Za-z0-9\-._~+/]+=*$")  # RFC 6750 b64token
_TEXT = {"Content-Type": "text/plain"}


@dataclass(frozen=True, slots=True)
class MetricsAccess:
    """Where and for whom the metrics are served: `[metrics]` resolved (token read, group looked up)."""

    port: int | None
    socket: Path | None
    gid: int | None = None
    token: str | None = field(default=None, repr=False)
    cache_s: float = CACHE_S
    max_clients: int = MAX_CLIENTS


def metrics_access(cfg: Config, secrets: SecretSource | None = None) -> MetricsAccess:
    """Resolve `[metrics]`: the token from its systemd credential, the socket's group by name. Raises
    `ConfigError` naming the key (`edge check-config` and `edge run` call this before anything starts)."""
    m = cfg.metrics
    token: str | None = None
    if m.token is not None:
        src = secrets or SecretSource.from_env(plaintext=cfg.storage.plaintext_secrets)
        token = src.read(m.token, "metrics.token")
        if len(token) < TOKEN_MIN_CHARS or not _TOKEN68.match(token):
            raise ConfigError(
                f"metrics.token: the credential {m.token!r} must hold one token of {TOKEN_MIN_CHARS} or more "
                "characters from A-Z a-z 0-9 - . _ ~ + / (e.g. `openssl rand -hex 32`)"
            )
    gid: int | None = None
    if m.socket_group is not None:
        try:
            gid = grp.getgrnam(m.socket_group).gr_gid
        except KeyError:
            raise ConfigError(f"metrics.socket_group: no group {m.socket_group!r} on this host") from None
    sock: Path | None = None
    if m.socket:
        sock = Path(m.socket)
        if not sock.is_absolute():
            sock = Path(cfg.control.socket).parent / sock
    return MetricsAccess(port=m.port or None, socket=sock, gid=gid, token=token, cache_s=m.cache_s,
                         max_clients=m.max_clients)  # fmt: skip


@contextlib.asynccontextmanager
async def serve_metrics(cfg: Config, render: Callable[[], str]) -> AsyncIterator[MetricsServer | None]:
    """The agent's metrics endpoint as `[metrics]` says, for as long as the block runs. A failure to serve
    is logged and yields None: metrics are an aid, never a reason to keep the doors down."""
    try:
        server = MetricsServer.from_access(metrics_access(cfg), render)
        await server.__aenter__()
    except (OSError, ConfigError) as e:
        log.error("metrics unavailable: %s", e)
        yield None
        return
    try:
        yield server
    finally:
        await server.__aexit__(None, None, None)


def _clear_socket_path(path: Path) -> None:
    """Make way for the socket: remove one left by an agent that was killed (never anything else)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise OSError(f"metrics.socket: {path} exists and is not a socket")
        path.unlink()


def _share_socket(path: Path, gid: int | None) -> None:
    """Mode 0660 and the configured group, or no socket at all."""
    try:
        if gid is not None:
            os.chown(path, -1, gid)
        os.chmod(path, SOCKET_MODE)
    except OSError as e:
        path.unlink(missing_ok=True)
        raise OSError(
            f"metrics.socket_group: cannot give {path} to group {gid}: {e.strerror} (the agent must be a "
            "member: SupplementaryGroups= in a drop-in)"
        ) from None


class _BadRequest(Exception):
    pass


@dataclass(slots=True, eq=False)
class _Conn:
    writer: asyncio.StreamWriter
    #: True until the request head is in: such connections are dropped first when the server is full.
    idle: bool = True


class MetricsServer:
    """`async with MetricsServer(port, render) as srv:` serves `render()` at http://127.0.0.1:port/metrics
    (`port=0` picks a free port, see `srv.port`; None: no TCP) and/or on the Unix socket `socket` (mode
    0660, group `socket_gid`). With a `token` every request must carry `Authorization: Bearer <token>`.

    Robust against slow and idle clients: the request head (at most MAX_HEAD bytes) must arrive within
    READ_TIMEOUT_S and the reply be taken within WRITE_TIMEOUT_S; at most `max_clients` connections are held,
    a new one past that drops the oldest still waiting for its request (else the oldest). `render` runs on
    the loop thread at most once per `cache_s`: scrapes within that get the same body.
    """

    HOST = "127.0.0.1"

    def __init__(
        self,
        port: int | None,
        render: Callable[[], str],
        *,
        socket: Path | str | None = None,
        socket_gid: int | None = None,
        token: str | None = None,
        cache_s: float = CACHE_S,
        max_clients: int = MAX_CLIENTS,
    ) -> None:
        if port is None and socket is None:
            raise ValueError("a metrics server needs a port or a socket")
        if max_clients < 1:
            raise ValueError("max_clients must be at least 1")
        self._port = port
        self._render = render
        self.socket = Path(socket) if socket is not None else None
        self._gid = socket_gid
        self._token = None if token is None else hashlib.sha256(token.encode("utf-8")).digest()
        self._cache_s = cache_s
        self._cache: tuple[float, bytes] | None = None
        self.max_clients = max_clients
        self._servers: list[asyncio.Server] = []
        self._socket_bound = False
        #: live connections, oldest first; `_tasks` also holds those dropped and still winding down
        self._conns: dict[asyncio.Task[Any], _Conn] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.port = port or 0
        #: connections accepted, and those dropped to make room for new ones (since start)
        self.accepted = 0
        self.dropped = 0

    @property
    def connections(self) -> int:
        """Connections held now."""
        return len(self._conns)

    @classmethod
    def from_access(cls, access: MetricsAccess, render: Callable[[], str]) -> MetricsServer:
        return cls(access.port, render, socket=access.socket, socket_gid=access.gid, token=access.token,
                   cache_s=access.cache_s, max_clients=access.max_clients)  # fmt: skip

    async def __aenter__(self) -> Self:
        try:
            if self._port is not None:
                tcp = await asyncio.start_server(
                    self._on_client, self.HOST, self._port, limit=MAX_LINE, reuse_address=True
                )
                self._servers.append(tcp)
                self.port = tcp.sockets[0].getsockname()[1]
                if self._token is None:
                    log.warning(
                        "metrics on http://%s:%d/metrics WITHOUT A TOKEN: every local user can read them "
                        "(metrics.allow_unauthenticated = true)", self.HOST, self.port,
                    )  # fmt: skip
                else:
                    log.info("metrics on http://%s:%d/metrics (bearer token required)", self.HOST, self.port)
            if self.socket is not None:
                self._servers.append(await self._bind_socket(self.socket))
                self._socket_bound = True
                log.info("metrics on the Unix socket %s (mode %o)", self.socket, SOCKET_MODE)
        except BaseException:
            await self._close_servers()
            raise
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._close_servers()

    async def _bind_socket(self, path: Path) -> asyncio.Server:
        _clear_socket_path(path)
        old = os.umask(0o177)  # bound 0600, widened below: never more open than meant, not even briefly
        try:
            server = await asyncio.start_unix_server(self._on_client, path=str(path), limit=MAX_LINE)
        finally:
            os.umask(old)
        try:
            _share_socket(path, self._gid)
        except OSError:
            server.close()
            raise
        return server

    async def _close_servers(self) -> None:
        servers, self._servers = self._servers, []
        for s in servers:
            s.close()
        for conn in list(self._conns.values()):
            conn.writer.transport.abort()  # each task then ends on its lost connection
        if self._tasks:
            _, late = await asyncio.wait(list(self._tasks), timeout=CLOSE_TIMEOUT_S)
            for task in late:
                task.cancel()
            for task in late:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        for s in servers:
            await s.wait_closed()
        if self._socket_bound and self.socket is not None:
            self._socket_bound = False
            with contextlib.suppress(FileNotFoundError):
                self.socket.unlink()

    def _make_room(self) -> None:
        """Drop the oldest connection that has not sent its request yet (else the oldest of all)."""
        while len(self._conns) >= self.max_clients:
            victim = next((t for t, c in self._conns.items() if c.idle), next(iter(self._conns)))
            conn = self._conns.pop(victim)
            conn.writer.transport.abort()  # its task ends on the lost connection
            self.dropped += 1

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.accepted += 1
        self._make_room()
        conn = self._conns[task] = _Conn(writer)
        self._tasks.add(task)
        clean = False
        try:
            try:
                async with asyncio.timeout(READ_TIMEOUT_S):
                    lines = await self._read_head(reader)
            except _BadRequest as e:
                status, extra, body = "400 Bad Request", dict(_TEXT), f"{e}\n".encode()
            else:
                status, extra, body = self._respond(lines)
            conn.idle = False
            head_only = extra.pop("_head", None) is not None
            head = [f"HTTP/1.0 {status}", f"Content-Length: {len(body)}", "Connection: close"]
            head += [f"{k}: {v}" for k, v in extra.items()]
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
            async with asyncio.timeout(WRITE_TIMEOUT_S):
                # In chunks: a client that reads slowly holds at most one chunk of our memory (plus the kernel's).
                view = memoryview(b"" if head_only else body)
                for i in range(0, len(view), WRITE_CHUNK):
                    writer.write(view[i : i + WRITE_CHUNK])
                    await writer.drain()
                await writer.drain()
            if not status.startswith("200"):
                await self._linger(reader, writer)
            clean = True
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._conns.pop(task, None)
            self._tasks.discard(task)
            await self._close(writer, clean=clean)

    @staticmethod
    async def _close(writer: asyncio.StreamWriter, *, clean: bool) -> None:
        if not clean or writer.transport.is_closing():
            writer.transport.abort()
            return
        writer.close()
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await writer.wait_closed()
        except (TimeoutError, ConnectionError):
            writer.transport.abort()

    @staticmethod
    async def _read_head(reader: asyncio.StreamReader) -> list[str]:
        """The request line and header lines (at most MAX_HEAD bytes in all)."""
        lines: list[str] = []
        total = 0
        while True:
            try:
                line = await reader.readuntil(b"\n")
            except asyncio.LimitOverrunError:
                raise _BadRequest("line too long") from None
            total += len(line)
            if total > MAX_HEAD:
                raise _BadRequest("request head too large")
            if line in (b"\r\n", b"\n"):
                if lines:
                    return lines
                continue  # an empty line before the request line is allowed (RFC 9112 2.2)
            if len(lines) > MAX_HEADERS:
                raise _BadRequest("too many headers")
            lines.append(line.decode("latin-1").rstrip("\r\n"))

    def _authorised(self, value: str | None) -> bool:
        if self._token is None:
            return True
        if value is None:
            return False
        scheme, _, cred = value.strip().partition(" ")
        given = hashlib.sha256(cred.strip().encode("latin-1")).digest()
        # Hashing first makes the compare constant-time whatever the length of what was sent.
        return hmac.compare_digest(given, self._token) and scheme.lower() == "bearer"

    def _respond(self, lines: list[str]) -> tuple[str, dict[str, str], bytes]:
        parts = lines[0].strip().split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return "400 Bad Request", dict(_TEXT), b"bad request line\n"
        headers: dict[str, str] = {}
        for h in lines[1:]:
            name, colon, value = h.partition(":")
            if not colon or not name or name != name.strip():
                return "400 Bad Request", dict(_TEXT), b"bad header line\n"
            headers.setdefault(name.lower(), value.strip())
        auth = headers.get("authorization")
        if not self._authorised(auth):
            challenge = 'Bearer realm="edge metrics"' + ("" if auth is None else ', error="invalid_token"')
            return "401 Unauthorized", {**_TEXT, "WWW-Authenticate": challenge}, b"unauthorized\n"
        method, target, _version = parts
        if target.split("?", 1)[0] != "/metrics":
            return "404 Not Found", dict(_TEXT), b"not found: try /metrics\n"
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", {**_TEXT, "Allow": "GET, HEAD"}, b"GET only\n"
        try:
            body = self._body()
        except Exception:
            log.exception("rendering metrics failed")
            return "500 Internal Server Error", dict(_TEXT), b"metrics unavailable\n"
        extra = {"Content-Type": CONTENT_TYPE}
        if method == "HEAD":
            extra["_head"] = "1"
        return "200 OK", extra, body

    def _body(self) -> bytes:
        """`render()`, at most once per `cache_s` (a failed render is not cached)."""
        now = time.monotonic()
        if self._cache is not None and now - self._cache[0] < self._cache_s:
            return self._cache[1]
        body = self._render().encode("utf-8")
        self._cache = (now, body)
        return body

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
