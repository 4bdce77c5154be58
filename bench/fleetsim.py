"""Worker processes for `bench/fleet.py` (not run by hand). Talks JSON lines: commands on stdin, answers on
stdout; diagnostics on stderr.

    python bench/fleetsim.py gateways --host H --port P --site S --key HEX --state DIR --names gw000,gw001,...
        N real gateways (Store + Journal + CloudLink, each with its own SQLite files under DIR/<name>) on one
        event loop. Prints {"ready": N} once every link is online, then answers:
          {"cmd": "events", "k": K}  -> each gateway journals K events; prints {"recorded": N*K} at once and
                                        {"drained": <wall time>, ...} when every journal is acknowledged (depth 0)
          {"cmd": "versions"}        -> {"versions": {gateway: rights version held}}
          {"cmd": "stop"} or EOF     -> closes everything, prints {"stopped": ..., link stats}

    python bench/fleetsim.py collector --db PATH --host H --port P --site S
        One `Collector` on the site's shared subscription. Prints {"ready": 1}; on "stop"/EOF prints its
        {"batches": ..., "events": ...} (events received, duplicates included) and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cloud_bridge.link import CloudLink, LinkConfig
from cloud_bridge.operator.collector import Collector
from cloud_bridge.operator.db import Model
from edge.journal import Journal
from edge.store import Store
from tests.broker import RecordingCommands, birth_info


def say(**msg: Any) -> None:
    sys.stdout.write(json.dumps(msg) + "\n")
    sys.stdout.flush()


async def lines() -> Any:
    """Commands from stdin, one JSON object a line; None at EOF."""
    while True:
        line = await asyncio.to_thread(sys.stdin.readline)
        if not line:
            yield None
            return
        if line.strip():
            yield json.loads(line)


class Gw:
    def __init__(self, name: str, store: Store, journal: Journal, link: CloudLink, task: asyncio.Task[None]) -> None:
        self.name, self.store, self.journal, self.link, self.task = name, store, journal, link, task


def _up(holder: list[CloudLink]) -> Callable[[], bool]:
    return lambda: bool(holder) and holder[0].online


async def open_gateway(stack: AsyncExitStack, a: argparse.Namespace, name: str) -> Gw:
    state = Path(a.state) / name
    cfg = LinkConfig(site=a.site, gateway=name, host=a.host, port=a.port, backoff_min_s=0.2, backoff_max_s=2.0,
                     keepalive_s=30, synchronous="NORMAL", ack_timeout_s=10.0)  # fmt: skip
    holder: list[CloudLink] = []
    store = await stack.enter_async_context(Store(state / "rights.db", "UTC", synchronous="NORMAL"))
    journal = await stack.enter_async_context(
        Journal(state / "journal.db", link_up=_up(holder), synchronous="NORMAL", interval_s=0.02)
    )
    link = await stack.enter_async_context(CloudLink(
        cfg, store=store, journal=journal, commands=RecordingCommands({"front", "lab"}), birth=birth_info,
        site_public_key=bytes.fromhex(a.key), state_dir=state,
    ))  # fmt: skip
    holder.append(link)
    task = asyncio.get_running_loop().create_task(link.run(), name=f"link.{name}")
    return Gw(name, store, journal, link, task)


async def run_gateways(a: argparse.Namespace) -> None:
    sys.setswitchinterval(0.0005)
    names = a.names.split(",")
    async with AsyncExitStack() as stack:
        gws = [await open_gateway(stack, a, n) for n in names]
        try:
            up = asyncio.Event()
            for g in gws:
                g.link.on_state.append(lambda _s: up.set() if all(x.link.online for x in gws) else None)
            async with asyncio.timeout(120):
                if not all(g.link.online for g in gws):
                    await up.wait()
            say(ready=len(gws))
            drain: asyncio.Task[None] | None = None
            async for cmd in lines():
                if cmd is None or cmd["cmd"] == "stop":
                    break
                if cmd["cmd"] == "versions":
                    say(versions={g.name: g.store.version for g in gws})
                elif cmd["cmd"] == "events":
                    k = int(cmd["k"])
                    for i in range(k):
                        for g in gws:
                            g.journal.record("access.granted", door="front", card=1_000_000 + i, user=f"u{i}",
                                             reason="granted")  # fmt: skip
                        if i % 50 == 0:
                            await asyncio.sleep(0)
                    say(recorded=k * len(gws), t=time.time())
                    drain = asyncio.get_running_loop().create_task(drained(gws))
            if drain is not None:
                drain.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await drain
            stats = {k: sum(g.link.stats[k] for g in gws) for k in gws[0].link.stats}
            say(stopped=len(gws), stats=stats, next_seq={g.name: g.journal.next_seq for g in gws})
        finally:
            for g in gws:
                g.task.cancel()
            for g in gws:
                with contextlib.suppress(asyncio.CancelledError):
                    await g.task


async def drained(gws: list[Gw]) -> None:
    # the journal has no "acknowledged" hook: poll its depth (acks come from the collectors)
    while any(g.journal.depth for g in gws):  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    say(drained=time.time(), next_seq={g.name: g.journal.next_seq for g in gws})


async def run_collector(a: argparse.Namespace) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(a.signing_key))
    col = Collector(Model(a.db), host=a.host, port=a.port, site=a.site, group="fleet", signing_key=key)
    task = asyncio.get_running_loop().create_task(col.run(), name="collector")
    await asyncio.sleep(0.5)  # Collector.run has no "subscribed" signal
    if task.done():
        task.result()
    say(ready=1)
    async for cmd in lines():
        if cmd is None or cmd.get("cmd") == "stop":
            break
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    say(batches=col.batches, events=col.events)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["gateways", "collector"])
    for opt in ("--host", "--site", "--key", "--state", "--names", "--db", "--signing-key"):
        ap.add_argument(opt)
    ap.add_argument("--port", type=int)
    a = ap.parse_args()
    asyncio.run(run_gateways(a) if a.mode == "gateways" else run_collector(a))


if __name__ == "__main__":
    main()
