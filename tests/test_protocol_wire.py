"""docs/protocol.md against the wire: every message a running gateway (the real agent, simulated hardware, a
real Mosquitto) publishes is recorded, and each example in the document must have exactly the shape of the
recorded message of its kind (the same fields at every level, the same JSON types, the same formats), so the
document cannot drift from what a gateway really sends."""

# ruff: noqa: F811  (pytest fixtures imported from tests.broker are used as parameters)

from __future__ import annotations

import asyncio
import json
import re
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiomqtt
import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud_bridge.cloud import CloudPeer
from cloud_bridge.protocol import Lockdown, Unlock
from cloud_bridge.signing import public_bytes
from cloud_bridge.topics import Leaf
from edge.agent import Agent, run_agent
from edge.config import parse_config
from edge.model import ChangeSet, Credential, Group, PutCredential, PutGroup
from edge.sim.hands import simulated_agent

from .broker import broker, site_key  # noqa: F401
from .mosquitto import Mosquitto
from .test_protocol import doc_examples

SITE, GW = "s1", "gw1"


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="edge-wire-") as d:
        yield Path(d)


@asynccontextmanager
async def agent_running(broker: Mosquitto, state: Path, sock: Path, pub_hex: str) -> AsyncIterator[Agent]:
    cfg = parse_config(f"""
hardware = "sim"
[site]
id = "{SITE}"
gateway = "{GW}"
timezone = "Europe/Berlin"
[storage]
state_dir = "{state}"
synchronous = "NORMAL"
[control]
socket = "{sock}"
[link]
host = "{broker.host}"
port = {broker.port}
backoff_min_s = 0.1
backoff_max_s = 0.5
keepalive_s = 5
encoding = "json"
command_key = "{pub_hex}"
""")
    agent = simulated_agent(cfg)
    async with asyncio.TaskGroup() as tg:
        tg.create_task(run_agent(agent), name="agent")
        await asyncio.wait_for(agent.started.wait(), 10)
        try:
            yield agent
        finally:
            agent.stop()


def shape(v: Any) -> Any:
    """The structure of a JSON value: field names at every level and the JSON type of each leaf."""
    if isinstance(v, dict):
        return {k: shape(x) for k, x in sorted(v.items())}
    if isinstance(v, list):
        return [shape(v[0])] if v else []
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int | float):
        return "number"
    return type(v).__name__


def same_shape(doc: Any, wire: Any, where: str) -> None:
    if isinstance(doc, dict) and isinstance(wire, dict):
        only_doc, only_wire = sorted(set(doc) - set(wire)), sorted(set(wire) - set(doc))
        assert not only_doc and not only_wire, f"{where}: only in the doc {only_doc}, only on the wire {only_wire}"
        for k in doc:
            if k != "detail":  # free-form per event type (docs/protocol.md, "Event types")
                same_shape(doc[k], wire[k], f"{where}.{k}")
    elif isinstance(doc, list) and isinstance(wire, list):
        if doc and wire:
            for d in doc:
                same_shape(d, wire[0], f"{where}[]")
    else:
        assert shape(doc) == shape(wire) or doc is None or wire is None, f"{where}: doc {doc!r}, wire {wire!r}"


async def test_doc_examples_have_the_shape_of_what_a_running_gateway_sends(
    broker: Mosquitto, tmp_path: Path, sock_dir: Path, site_key: Ed25519PrivateKey
) -> None:
    recorded: dict[str, list[dict[str, Any]]] = {}

    async def record(client: aiomqtt.Client) -> None:
        async for m in client.messages:
            if isinstance(m.payload, bytes) and m.payload:
                msg = json.loads(m.payload)
                recorded.setdefault(msg["type"], []).append(msg)

    async with aiomqtt.Client(broker.host, broker.port, protocol=aiomqtt.ProtocolVersion.V5) as spy:
        for leaf in (Leaf.STATUS, Leaf.RIGHTS_REPLY, Leaf.EVENTS, Leaf.COMMAND_RESULT):
            await spy.subscribe(f"acs/v1/{SITE}/{GW}/{leaf.value}", qos=1)
        task = asyncio.get_running_loop().create_task(record(spy))
        try:
            async with (
                agent_running(broker, tmp_path / "gw", sock_dir / "c.sock", public_bytes(site_key).hex()) as agent,
                CloudPeer(host=broker.host, port=broker.port, site=SITE, gateway=GW, signing_key=site_key,
                          resend_s=2.0) as cloud,  # fmt: skip
            ):
                await cloud.wait_online()
                v = cloud.births[-1].rights_version
                from edge.sim.demo import demo_change_set

                base = demo_change_set(agent.profile)
                ok = await cloud.send_change_set(ChangeSet(from_version=v, to_version=v + 1, changes=base.changes))
                assert ok.ok and ok.applied
                await cloud.send_change_set(ChangeSet(from_version=v, to_version=v + 1, changes=base.changes),
                                            id=ok.id)  # fmt: skip
                bad = ChangeSet(from_version=v + 1, to_version=v + 2, changes=[
                    PutGroup(group=Group(id="g2", doors=["cellar"]))])  # fmt: skip
                r = await cloud.send_change_set(bad)
                assert r.error is not None and r.error.code == "unknown_reference"
                gap = ChangeSet(from_version=v + 5, to_version=v + 6, changes=[
                    PutCredential(credential=Credential(card=77, user=base_user(base)))])  # fmt: skip
                await cloud.send_change_set(gap)
                from .test_trust_boundary import small_snapshot

                snap = small_snapshot(v + 10, range(2000, 2010))
                assert (await cloud.send_snapshot(snap)).applied
                assert (await cloud.command(Unlock(door="door1", seconds=1), operator="alice")).ok
                r2 = await cloud.command(Unlock(door="cellar"), operator="alice")
                assert not r2.ok
                signed = cloud.sign(Lockdown(active=False), operator="alice")
                await cloud.send_command(signed)
                await cloud.send_command(signed)
                await cloud.wait_for(lambda: len(recorded.get("command_result", [])) >= 4)
                await cloud.wait_for(lambda: recorded.get("events"))
                await cloud.wait_for(lambda: recorded.get("resync"))
        finally:
            await asyncio.sleep(0.5)  # the shutdown death
            task.cancel()
    docs = {name: json.loads(block) for name, block in doc_examples().items()}
    wire_for = {
        "birth": recorded["birth"][-1],
        "death": recorded["death"][-1],
        "result_ok": next(m for m in recorded["result"] if m["ok"] and m["applied"]),
        "result_duplicate": next(m for m in recorded["result"] if m["ok"] and not m["applied"]),
        "result_error": next(m for m in recorded["result"] if m["error"] and m["error"]["code"] == "unknown_reference"),
        "result_gap": next(m for m in recorded["result"] if m["error"] and m["error"]["code"] == "version_gap"),
        "resync": recorded["resync"][-1],
        "chunk_ack": recorded["chunk_ack"][-1],
        "events": next(m for m in recorded["events"] if m["events"]),
        "command_result_ok": next(m for m in recorded["command_result"] if m["ok"]),
        "command_result_error": next(m for m in recorded["command_result"] if not m["ok"]
                                     and m["error"]["code"] == "invalid"),
        "command_result_replayed": next(m for m in recorded["command_result"] if not m["ok"]
                                        and m["error"]["code"] == "replayed"),
    }
    for name, wire in wire_for.items():
        assert name in docs, f"docs/protocol.md has no example of {name}"
        same_shape(docs[name], wire, name)
    birth = recorded["birth"][-1]
    assert re.fullmatch(r"edge \d+\.\d+\.\d+", birth["software"]), birth["software"]
    assert re.fullmatch(r"sha256:[0-9a-f]{16}", birth["config_hash"]), birth["config_hash"]
    assert all(d.get("name") for d in birth["doors"]), birth["doors"]
    assert birth["max_message_bytes"] == 256 * 1024 and birth["tls"] is False
    assert any("without TLS" in w for w in birth["warnings"])
    err = wire_for["result_error"]["error"]
    assert err["path"] and " " not in err["path"], err  # a path, not a description
    assert msgspec.json.encode(wire_for["result_duplicate"]["applied"]) == b"false"  # present, not omitted


def base_user(cs: ChangeSet) -> str:
    from edge.model import PutUser

    return next(c.user.id for c in cs.changes if isinstance(c, PutUser))
