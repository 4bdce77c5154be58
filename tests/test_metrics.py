"""Prometheus text exposition and the loopback HTTP server, scraped over a real TCP socket."""

from __future__ import annotations

import asyncio
import math
import re
from typing import Any

import pytest

import edge.metrics as metrics_mod
from edge.metrics import CONTENT_TYPE, EdgeMetrics, Metrics, MetricsServer, format_value

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


async def http(port: int, raw: bytes, *, read_all: bool = True) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
    return status, headers, body


def get(path: str, method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: test\r\n\r\n".encode()


@pytest.fixture
def registry() -> EdgeMetrics:
    em = EdgeMetrics()
    em.update_from_status(agent_status())
    return em


async def test_scrape_over_tcp(registry: EdgeMetrics) -> None:
    async with MetricsServer(0, registry.registry.render) as srv:
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
        assert srv._server is not None
        addrs = {s.getsockname()[0] for s in srv._server.sockets}
    assert addrs == {"127.0.0.1"}
