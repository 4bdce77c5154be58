"""Prometheus text exposition and the metrics server, scraped over real TCP and Unix sockets: access control
(socket mode and group, bearer token), slow clients, the `[metrics]` config."""

from __future__ import annotations

import asyncio
import contextlib
import grp
import math
import os
import re
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import edge.metrics as metrics_mod
from edge.config import Config, MetricsSection, parse_config
from edge.errors import ConfigError
from edge.metrics import CONTENT_TYPE, EdgeMetrics, Metrics, MetricsServer, format_value, metrics_access
from edge.secrets import SecretSource

# One sample line of format 0.0.4: name, optional {labels}, value (no timestamps from us).
SAMPLE = re.compile(
    r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*",?)*)\})?'
    r" (?P<value>[-+]?(?:[0-9.eE+-]+|Inf|NaN))$"
)
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\.)*)"')


def unescape(v: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n"}.get(m.group(1), m.group(1)), v)


def parse(text: str) -> dict[str, Any]:
    """A strict parser of the subset we emit: every line must be HELP, TYPE or a sample of a declared type."""
    assert text.endswith("\n")
    types: dict[str, str] = {}
    helps: dict[str, str] = {}
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, doc = line[7:].partition(" ")
            helps[name] = doc
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            assert kind in ("counter", "gauge"), line
            assert name not in types, f"duplicate TYPE for {name}"
            types[name] = kind
        else:
            m = SAMPLE.match(line)
            assert m, f"not a valid sample line: {line!r}"
            name = m.group("name")
            assert name in types, f"sample before its TYPE: {line!r}"
            labels = frozenset((k, unescape(v)) for k, v in LABEL.findall(m.group("labels") or ""))
            key = (name, labels)
            assert key not in samples, f"duplicate sample {line!r}"
            samples[key] = float(m.group("value"))
    return {"types": types, "help": helps, "samples": samples}


def lbl(**kw: str) -> frozenset[tuple[str, str]]:
    return frozenset(kw.items())


# --- the registry -----------------------------------------------------------------------------------------


def test_render_counters_and_gauges_with_labels() -> None:
    m = Metrics()
    c = m.counter("edge_decisions_total", "Access decisions", ["door", "result"])
    g = m.gauge("edge_link_up", "1 while connected")
    c.inc(door="front", result="granted")
    c.inc(2, door="front", result="denied")
    c.inc(door="front", result="granted")
    g.set(1)
    out = parse(m.render())
    assert out["types"] == {"edge_decisions_total": "counter", "edge_link_up": "gauge"}
    assert out["samples"] == {
        ("edge_decisions_total", lbl(door="front", result="granted")): 2.0,
        ("edge_decisions_total", lbl(door="front", result="denied")): 2.0,
        ("edge_link_up", frozenset()): 1.0,
    }
    assert c.value(door="front", result="granted") == 2.0
    assert c.value(door="back", result="granted") == 0.0


def test_label_values_and_help_are_escaped() -> None:
    m = Metrics()
    g = m.gauge("x", "help with \\ and\nnewline", ["door"])
    g.set(1, door='a "quoted" \\ door\nname')
    text = m.render()
    assert "# HELP x help with \\\\ and\\nnewline\n" in text
    assert 'x{door="a \\"quoted\\" \\\\ door\\nname"} 1\n' in text
    assert parse(text)["samples"] == {("x", lbl(door='a "quoted" \\ door\nname')): 1.0}


def test_value_formatting() -> None:
    assert format_value(3.0) == "3"
    assert format_value(0.25) == "0.25"
    assert format_value(-2.0) == "-2"
    assert format_value(math.inf) == "+Inf"
    assert format_value(-math.inf) == "-Inf"
    assert format_value(math.nan) == "NaN"
    assert format_value(1e20) == "1e+20"
    m = Metrics()
    m.gauge("g", "h").set(math.nan)
    assert math.isnan(parse(m.render())["samples"][("g", frozenset())])


def test_registry_rejects_mistakes() -> None:
    m = Metrics()
    with pytest.raises(ValueError, match="invalid metric name"):
        m.gauge("edge-up", "dash")
    with pytest.raises(ValueError, match="invalid label name"):
        m.gauge("a", "h", ["__reserved"])
    with pytest.raises(ValueError, match="invalid label name"):
        m.gauge("b", "h", ["door-id"])
    with pytest.raises(ValueError, match="duplicate"):
        m.gauge("c", "h", ["x", "x"])
    c = m.counter("d_total", "h", ["door"])
    with pytest.raises(ValueError, match="already registered"):
        m.gauge("d_total", "h")
    with pytest.raises(ValueError, match="do not match"):
        c.inc(reader="r1")
    with pytest.raises(ValueError, match="do not match"):
        c.inc()
    with pytest.raises(ValueError, match="cannot decrease"):
        c.inc(-1, door="front")
    assert parse(m.render())["samples"] == {}  # nothing half-recorded


def test_collectors_refresh_before_render_and_a_broken_one_is_contained() -> None:
    m = Metrics()
    g = m.gauge("depth", "h")
    depth = [5]
    m.on_collect.append(lambda: g.set(depth[0]))

    def broken() -> None:
        raise RuntimeError("boom")

    m.on_collect.append(broken)
    assert parse(m.render())["samples"][("depth", frozenset())] == 5
    depth[0] = 9
    assert parse(m.render())["samples"][("depth", frozenset())] == 9


def agent_status() -> dict[str, Any]:
    """The shape of `Agent.status()`, with reader online state (which the agent should add)."""
    return {
        "version": "0.1.0",
        "site": "hq",
        "gateway": "gw1",
        "simulated": True,
        "rights_version": 42,
        "credentials": 1234,
        "journal_depth": 17,
        "storage_ok": True,
        "link": {"online": False, "offline_since": "2026-11-23T10:00:00+00:00"},
        "clock_trusted": False,
        "clock": {"trusted": False, "source": "none", "offset_s": 36000.25},
        "rights_age_s": 3600.5,
        "doors": {
            "front": {"door": "front", "started": True, "locked": True, "contact": "open", "alarms": ["forced_open"]},
            "lab": {"door": "lab", "started": True, "locked": False, "contact": "closed", "alarms": []},
        },
        "readers": {"front.wiegand": {"door": "front", "kind": "wiegand", "online": True}},
        "lockdown": False,
    }


def test_edge_metrics_from_agent_status() -> None:
    em = EdgeMetrics()
    em.decisions.inc(door="front", result="denied", reason="unknown_card")
    em.update_from_status(agent_status())
    s = parse(em.registry.render())["samples"]
    assert s[("edge_up", frozenset())] == 1
    assert s[("edge_info", lbl(version="0.1.0", site="hq", gateway="gw1"))] == 1
    assert s[("edge_rights_version", frozenset())] == 42
    assert s[("edge_credentials", frozenset())] == 1234
    assert s[("edge_journal_depth", frozenset())] == 17
    assert s[("edge_storage_ok", frozenset())] == 1
    assert s[("edge_link_up", frozenset())] == 0
    assert s[("edge_clock_trusted", frozenset())] == 0
    assert s[("edge_clock_offset_seconds", frozenset())] == 36000.25
    assert s[("edge_rights_age_seconds", frozenset())] == 3600.5
    assert s[("edge_lockdown", frozenset())] == 0
    assert s[("edge_door_locked", lbl(door="front"))] == 1
    assert s[("edge_door_locked", lbl(door="lab"))] == 0
    assert s[("edge_door_open", lbl(door="front"))] == 1
    assert s[("edge_door_alarm", lbl(door="front", alarm="forced_open"))] == 1
    assert s[("edge_reader_up", lbl(reader="front.wiegand", door="front", kind="wiegand"))] == 1
    assert s[("edge_decisions_total", lbl(door="front", result="denied", reason="unknown_card"))] == 1
    # An alarm that cleared disappears on the next refresh.
    st = agent_status()
    st["doors"]["front"]["alarms"] = []
    em.update_from_status(st)
    s = parse(em.registry.render())["samples"]
    assert ("edge_door_alarm", lbl(door="front", alarm="forced_open")) not in s


# --- the server, over real TCP ----------------------------------------------------------------------------


async def http(port: int | Path, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """One request over TCP to 127.0.0.1:port, or over the Unix socket at `port` when it is a path."""
    if isinstance(port, Path):
        reader, writer = await asyncio.open_unix_connection(str(port))
    else:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        await writer.wait_closed()
    assert data, "the server closed the connection without a reply"
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
    return status, headers, body


def get(path: str, method: str = "GET", *, auth: str | None = None) -> bytes:
    extra = f"Authorization: {auth}\r\n" if auth is not None else ""
    return f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: test\r\n{extra}\r\n".encode()


@pytest.fixture
def registry() -> EdgeMetrics:
    em = EdgeMetrics()
    em.update_from_status(agent_status())
    return em


async def test_scrape_over_tcp(registry: EdgeMetrics) -> None:
    async with MetricsServer(0, registry.registry.render, cache_s=0) as srv:
        assert srv.port > 0
        status, headers, body = await http(srv.port, get("/metrics"))
        assert status == 200
        assert headers["content-type"] == CONTENT_TYPE
        assert int(headers["content-length"]) == len(body)
        parsed = parse(body.decode())
        assert parsed["samples"][("edge_journal_depth", frozenset())] == 17
        # A change shows up in the next scrape.
        registry.decisions.inc(door="lab", result="granted", reason="granted")
        status, _, body = await http(srv.port, get("/metrics?x=1"))
        assert status == 200
        assert (
            parse(body.decode())["samples"][
                ("edge_decisions_total", lbl(door="lab", result="granted", reason="granted"))
            ]
            == 1
        )


async def test_head_returns_headers_only(registry: EdgeMetrics) -> None:
    async with MetricsServer(0, registry.registry.render) as srv:
        status, headers, body = await http(srv.port, get("/metrics", "HEAD"))
    assert status == 200 and body == b"" and int(headers["content-length"]) > 100


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (get("/"), 404),
        (get("/metrics/../etc/passwd"), 404),
        (get("/metricsX"), 404),
        (get("/metrics", "POST"), 405),
        (get("/metrics", "DELETE"), 405),
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /metrics\r\n\r\n", 400),  # HTTP/0.9 style, no version
        (b"GET /metrics HTTP/1.1 extra\r\n\r\n", 400),
        (b"\x00\xff\xfe binary \r\n\r\n", 400),
        (b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n", 400),  # request line over the limit
        (b"GET /metrics HTTP/1.1\r\n" + b"X-H: v\r\n" * 100 + b"\r\n", 400),  # too many headers
    ],
)
async def test_bad_requests_get_clear_errors(registry: EdgeMetrics, raw: bytes, code: int) -> None:
    async with MetricsServer(0, registry.registry.render) as srv:
        status, headers, body = await http(srv.port, raw)
        assert status == code
        assert b"edge_" not in body  # no metrics leak on an error
        if code == 405:
            assert headers["allow"] == "GET, HEAD"
        # The server is still fine afterwards.
        assert (await http(srv.port, get("/metrics")))[0] == 200


async def test_render_failure_is_500_and_the_server_survives() -> None:
    calls = [0]

    def render() -> str:
        calls[0] += 1
        if calls[0] == 1:
            raise RuntimeError("boom")
        return "# HELP a h\n# TYPE a gauge\na 1\n"

    async with MetricsServer(0, render) as srv:
        assert (await http(srv.port, get("/metrics")))[0] == 500
        status, _, body = await http(srv.port, get("/metrics"))
    assert status == 200 and body == b"# HELP a h\n# TYPE a gauge\na 1\n"


async def test_slow_or_silent_clients_are_dropped(registry: EdgeMetrics, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics_mod, "READ_TIMEOUT_S", 0.2)
    async with MetricsServer(0, registry.registry.render) as srv:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        writer.write(b"GET /metrics HTTP/1.1\r\n")  # and never finishes the headers
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)  # the server closes the connection
        assert data == b""
        writer.close()
        await writer.wait_closed()
        assert (await http(srv.port, get("/metrics")))[0] == 200


async def test_exit_with_an_idle_client_connected(registry: EdgeMetrics) -> None:
    async with MetricsServer(0, registry.registry.render) as srv:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        await asyncio.sleep(0.05)  # connected, sends nothing
        port = srv.port
    assert await asyncio.wait_for(reader.read(), 10) == b""  # closed by the server on exit
    writer.close()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)


async def test_concurrent_scrapes(registry: EdgeMetrics) -> None:
    async with MetricsServer(0, registry.registry.render) as srv:
        results = await asyncio.gather(*(http(srv.port, get("/metrics")) for _ in range(6)))
    assert [r[0] for r in results] == [200] * 6


async def test_bound_to_loopback_only(registry: EdgeMetrics) -> None:
    async with MetricsServer(0, registry.registry.render) as srv:
        addrs = {s.getsockname()[0] for server in srv._servers for s in server.sockets}
    assert addrs == {"127.0.0.1"}


# --- the render cache -------------------------------------------------------------------------------------


async def test_the_body_is_rendered_once_per_cache_interval() -> None:
    calls = [0]

    def render() -> str:
        calls[0] += 1
        return f"# HELP n h\n# TYPE n gauge\nn {calls[0]}\n"

    async with MetricsServer(0, render, cache_s=3600) as srv:
        replies = await asyncio.gather(*(http(srv.port, get("/metrics")) for _ in range(10)))
    assert calls[0] == 1
    assert {r[2] for r in replies} == {b"# HELP n h\n# TYPE n gauge\nn 1\n"}
    calls[0] = 0
    async with MetricsServer(0, render, cache_s=0) as srv:
        for _ in range(3):
            await http(srv.port, get("/metrics"))
    assert calls[0] == 3


# --- access control: the bearer token ---------------------------------------------------------------------

TOKEN = "3f1c9a6b2d8e47f0a5b1c6d2e9f08a7b"


@pytest.mark.parametrize(
    "auth",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        f"Bearer {TOKEN[:-1]}c",  # same length, last character wrong
        f"Bearer {TOKEN[:-1]}",  # a prefix
        f"Bearer {TOKEN}0",  # longer
        f"Bearer {TOKEN.upper()}",
        f"Basic {TOKEN}",  # wrong scheme
        TOKEN,  # no scheme
    ],
)
async def test_a_scrape_without_the_right_token_is_401(registry: EdgeMetrics, auth: str | None) -> None:
    async with MetricsServer(0, registry.registry.render, token=TOKEN) as srv:
        for raw in (get("/metrics", auth=auth), get("/", auth=auth), get("/metrics", "HEAD", auth=auth)):
            status, headers, body = await http(srv.port, raw)
            assert status == 401
            challenge = headers["www-authenticate"]
            assert challenge.startswith('Bearer realm="edge metrics"')
            assert ("invalid_token" in challenge) == (auth is not None)
            assert b"edge_" not in body  # nothing leaks
        assert (await http(srv.port, get("/metrics", auth=f"Bearer {TOKEN}")))[0] == 200  # still serving


@pytest.mark.parametrize("auth", [f"Bearer {TOKEN}", f"bearer {TOKEN}", f"Bearer   {TOKEN}  "])
async def test_a_scrape_with_the_token_is_served(registry: EdgeMetrics, auth: str) -> None:
    async with MetricsServer(0, registry.registry.render, token=TOKEN) as srv:
        status, _, body = await http(srv.port, get("/metrics", auth=auth))
    assert status == 200
    assert parse(body.decode())["samples"][("edge_journal_depth", frozenset())] == 17


# --- access control: the Unix socket ----------------------------------------------------------------------


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # Unix socket paths are limited to ~107 bytes: pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="edge-metrics-") as d:
        yield Path(d)


def other_group() -> int:
    """A group this process may give a file to, other than its own."""
    mine = os.getegid()
    candidates = [g for g in os.getgroups() if g != mine]
    if not candidates and os.geteuid() == 0:
        candidates = [g.gr_gid for g in grp.getgrall() if g.gr_gid != mine]
    assert candidates, "the test needs a second group to give the socket to"
    return candidates[0]


async def test_the_socket_is_0660_in_its_group_and_serves(registry: EdgeMetrics, sock_dir: Path) -> None:
    path = sock_dir / "metrics.sock"
    gid = other_group()
    async with MetricsServer(None, registry.registry.render, socket=path, socket_gid=gid) as srv:
        st = path.stat()
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o660  # owner and group only: not every local user
        assert st.st_gid == gid
        status, headers, body = await http(path, get("/metrics"))
        assert status == 200 and headers["content-type"] == CONTENT_TYPE
        assert parse(body.decode())["samples"][("edge_journal_depth", frozenset())] == 17
        assert srv.port == 0  # and no TCP listener
    assert not path.exists()  # removed on exit


async def test_the_socket_without_a_group_is_the_agents_and_needs_the_token_when_set(
    registry: EdgeMetrics, sock_dir: Path
) -> None:
    path = sock_dir / "m.sock"
    async with MetricsServer(None, registry.registry.render, socket=path, token=TOKEN):
        st = path.stat()
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == os.getegid()
        assert (await http(path, get("/metrics")))[0] == 401
        assert (await http(path, get("/metrics", auth=f"Bearer {TOKEN}x")))[0] == 401
        assert (await http(path, get("/metrics", auth=f"Bearer {TOKEN}")))[0] == 200


async def test_a_stale_socket_is_replaced_but_nothing_else(registry: EdgeMetrics, sock_dir: Path) -> None:
    path = sock_dir / "metrics.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))  # left behind by an agent that was killed
    stale.close()
    async with MetricsServer(None, registry.registry.render, socket=path):
        assert (await http(path, get("/metrics")))[0] == 200
    path.write_text("not mine")
    with pytest.raises(OSError, match="not a socket"):
        async with MetricsServer(None, registry.registry.render, socket=path):
            pass
    assert path.read_text() == "not mine"


async def test_both_listeners_at_once(registry: EdgeMetrics, sock_dir: Path) -> None:
    path = sock_dir / "metrics.sock"
    async with MetricsServer(0, registry.registry.render, socket=path, token=TOKEN) as srv:
        assert srv.port > 0
        for target in (srv.port, path):
            assert (await http(target, get("/metrics")))[0] == 401
            assert (await http(target, get("/metrics", auth=f"Bearer {TOKEN}")))[0] == 200


# --- slow clients -----------------------------------------------------------------------------------------


def big_render() -> str:
    """8 MB: more than the kernel buffers for one connection (about 3 MB on loopback), so the write to a
    client that reads nothing blocks."""
    return "# HELP big h\n# TYPE big gauge\n" + "".join(f'big{{i="{i:07d}"}} 1\n' for i in range(400_000))


async def connect_small_window(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TCP connection with a tiny receive buffer: a reply it does not read stays in the server's buffers."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.setblocking(False)
    await asyncio.get_running_loop().sock_connect(s, ("127.0.0.1", port))
    return await asyncio.open_connection(sock=s)


async def until(cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.01)
    assert cond(), what


class SlowClient:
    """One misbehaving client: "silent" connects and sends nothing; "trickle" sends its request a byte a
    second; "no_read" sends a whole request and never reads the reply."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.writer: asyncio.StreamWriter | None = None
        self.task: asyncio.Task[None] | None = None

    async def open(self, port: int) -> None:
        if self.kind == "no_read":
            _, self.writer = await connect_small_window(port)
            self.writer.write(get("/metrics"))
        else:
            _, self.writer = await asyncio.open_connection("127.0.0.1", port)
        if self.kind == "trickle":
            self.task = asyncio.get_running_loop().create_task(self._trickle())

    async def _trickle(self) -> None:
        assert self.writer is not None
        with contextlib.suppress(ConnectionError):
            for b in get("/metrics"):
                self.writer.write(bytes([b]))
                await self.writer.drain()
                await asyncio.sleep(1.0)

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        if self.writer is not None:
            self.writer.transport.abort()


@pytest.mark.parametrize("n", [8, 64])
@pytest.mark.parametrize("kind", ["silent", "trickle", "no_read"])
async def test_a_scrape_is_served_while_slow_clients_hold_connections(
    monkeypatch: pytest.MonkeyPatch, kind: str, n: int
) -> None:
    """With the default limits. (Before: the ninth connection was closed unanswered, so 8 slow clients
    made every real scrape fail.)"""
    # Timeouts far longer than the test: the slow clients really hold their connections while it scrapes.
    monkeypatch.setattr(metrics_mod, "READ_TIMEOUT_S", 60.0)
    monkeypatch.setattr(metrics_mod, "WRITE_TIMEOUT_S", 60.0)
    text = big_render()
    slow = [SlowClient(kind) for _ in range(n)]
    async with MetricsServer(0, lambda: text) as srv:
        try:
            for c in slow:
                await c.open(srv.port)
            held = min(n, srv.max_clients)
            await until(lambda: srv.accepted == n and srv.connections == held, "all accepted and held")
            status, headers, body = await asyncio.wait_for(http(srv.port, get("/metrics")), 30)
            assert status == 200
            assert int(headers["content-length"]) == len(body) and body == text.encode()
            # Room was made for the scrape by dropping the oldest slow client, when the server was full.
            assert srv.dropped == n - held + (1 if n >= srv.max_clients else 0)
        finally:
            for c in slow:
                await c.close()


async def test_a_trickled_request_is_cut_at_the_head_deadline(
    registry: EdgeMetrics, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The deadline is for the whole head, not per read: a byte every 50 ms never completes in time."""
    monkeypatch.setattr(metrics_mod, "READ_TIMEOUT_S", 0.5)
    async with MetricsServer(0, registry.registry.render) as srv:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        got = bytearray()

        async def trickle() -> None:
            with contextlib.suppress(ConnectionError):
                for b in get("/metrics"):  # 50 bytes: 2.5 s at this pace
                    writer.write(bytes([b]))
                    await writer.drain()
                    await asyncio.sleep(0.05)

        t = asyncio.get_running_loop().create_task(trickle())
        with contextlib.suppress(ConnectionError):
            got += await asyncio.wait_for(reader.read(), 10)
        assert not t.done()  # cut off while it was still sending
        t.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await t
        writer.transport.abort()
        assert bytes(got) == b""  # closed without a reply
        assert (await http(srv.port, get("/metrics")))[0] == 200


async def test_a_client_that_reads_nothing_is_cut_at_the_write_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics_mod, "WRITE_TIMEOUT_S", 0.3)
    text = big_render()
    async with MetricsServer(0, lambda: text) as srv:
        reader, writer = await connect_small_window(srv.port)
        writer.write(get("/metrics"))
        await writer.drain()
        await until(lambda: srv.connections == 1, "accepted")
        await until(lambda: srv.connections == 0, "dropped at the write deadline")
        got = b""
        with contextlib.suppress(ConnectionError):
            got = await asyncio.wait_for(reader.read(), 10)
        writer.transport.abort()
        assert len(got) < len(text)  # it was given up on, not waited for
        assert (await http(srv.port, get("/metrics")))[0] == 200


async def test_the_request_head_is_bounded_in_total(registry: EdgeMetrics) -> None:
    # 40 headers of 500 bytes: each line and the header count are within their limits, the total is not.
    raw = b"GET /metrics HTTP/1.1\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 500) for i in range(40)) + b"\r\n"
    async with MetricsServer(0, registry.registry.render) as srv:
        status, _, body = await http(srv.port, raw)
        assert status == 400 and body == b"request head too large\n"
        assert (await http(srv.port, get("/metrics")))[0] == 200


# --- the [metrics] config ---------------------------------------------------------------------------------


def config(metrics: str = "", *, extra: str = "") -> str:
    return f"""
hardware = "sim"
[site]
id = "hq"
gateway = "gw1"
[control]
socket = "/run/edge/control.sock"
{extra}
[metrics]
{metrics}
"""


def test_defaults_serve_the_socket_next_to_the_control_socket_and_no_tcp() -> None:
    cfg = parse_config(config())
    assert cfg.metrics == MetricsSection()
    access = metrics_access(cfg)
    assert access.socket == Path("/run/edge/metrics.sock") and access.port is None and access.token is None
    assert metrics_access(parse_config(config('socket = "/run/other/m.sock"'))).socket == Path("/run/other/m.sock")
    assert metrics_access(parse_config(config('socket = ""'))).socket is None  # off


def test_tcp_without_a_token_is_refused_at_config_check() -> None:
    with pytest.raises(ConfigError, match=r"metrics: port = 9105 \(TCP\) needs metrics\.token"):
        parse_config(config("port = 9105"))
    cfg = parse_config(config("port = 9105\nallow_unauthenticated = true"))  # explicitly opted in
    assert metrics_access(cfg).port == 9105
    assert parse_config(config('port = 9105\ntoken = "metrics.token"')).metrics.token == "metrics.token"


def test_the_old_control_metrics_port_key_is_gone() -> None:
    with pytest.raises(ConfigError, match=r"control\.metrics_port: unknown key"):
        parse_config(config(extra="metrics_port = 9105"))


@pytest.mark.parametrize(
    ("metrics", "match"),
    [
        ('token = ""', r"metrics\.token"),
        ('socket_group = ""', r"metrics\.socket_group"),
        ("cache_s = -1", r"metrics\.cache_s"),
        ("max_clients = 0", r"metrics\.max_clients"),
        ("port = 70000", r"metrics\.port"),
        ("tokn = 1", r"metrics\.tokn: unknown key"),
    ],
)
def test_bad_metrics_settings_name_the_key(metrics: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_config(config(metrics))


def token_cfg(tmp_path: Path, content: str | None) -> tuple[Config, SecretSource]:
    creds = tmp_path / "creds"
    creds.mkdir()
    if content is not None:
        (creds / "metrics.token").write_text(content)
    return parse_config(config('port = 9105\ntoken = "metrics.token"')), SecretSource(creds, plaintext=False)


def test_the_token_is_read_from_its_systemd_credential(tmp_path: Path) -> None:
    cfg, secrets = token_cfg(tmp_path, TOKEN + "\n")
    access = metrics_access(cfg, secrets)
    assert access.token == TOKEN and access.port == 9105
    assert TOKEN not in repr(access)


@pytest.mark.parametrize("content", [None, "short", "has spaces in it, long enough", ""])
def test_a_missing_or_unusable_token_is_a_config_error(tmp_path: Path, content: str | None) -> None:
    cfg, secrets = token_cfg(tmp_path, content)
    with pytest.raises(ConfigError, match=r"^metrics\.token: ") as e:
        metrics_access(cfg, secrets)
    if content:
        assert content not in str(e.value)  # a secret never appears in an error


def test_an_unknown_socket_group_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"metrics\.socket_group: no group 'no-such-group-x' on this host"):
        metrics_access(parse_config(config('socket_group = "no-such-group-x"')))


def test_check_config_refuses_unauthenticated_tcp_and_a_missing_token(tmp_path: Path) -> None:
    for metrics, match in (
        ("port = 9105", "metrics: port = 9105 (TCP) needs metrics.token"),
        ('port = 9105\ntoken = "metrics.token"', "metrics.token: secret 'metrics.token' is not a systemd credential"),
    ):
        path = tmp_path / "edge.toml"
        path.write_text(config(metrics) + "[link]\nenabled = false\n")
        env = {k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"}
        out = subprocess.run(
            [sys.executable, "-m", "edge.cli", "--config", str(path), "check-config"],
            capture_output=True, text=True, env=env, timeout=60, check=False,
        )  # fmt: skip
        assert out.returncode == 2, out
        assert match in out.stderr, out.stderr
