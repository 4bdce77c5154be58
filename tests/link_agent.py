"""Subprocess for the SIGKILL tests: Store + Journal + CloudLink against a broker, with taps going on.

    python -m tests.link_agent STATE_DIR PORT SITE GATEWAY PUBKEY_HEX TAPS_PER_S

Prints "ready <rights_version>" once open, then records one access event every 1/TAPS_PER_S seconds.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from cloud_bridge.link import CloudLink, LinkConfig
from edge.journal import Journal
from edge.store import Store

from .broker import RecordingCommands, birth_info


async def main(state: Path, port: int, site: str, gw: str, pub: bytes, rate: float) -> None:
    sys.setswitchinterval(0.0005)
    cfg = LinkConfig(site=site, gateway=gw, host="127.0.0.1", port=port, backoff_min_s=0.1, backoff_max_s=0.5,
                     ack_timeout_s=2.0, batch_events=200, max_message_bytes=16384)  # fmt: skip
    holder: list[CloudLink] = []
    async with (
        Store(state / "rights.db", "UTC") as store,
        Journal(state / "journal.db", link_up=lambda: bool(holder) and holder[0].online, interval_s=0.01) as journal,
        CloudLink(cfg, store=store, journal=journal, commands=RecordingCommands({"front"}), birth=birth_info,
                  site_public_key=pub, state_dir=state) as link,
    ):  # fmt: skip
        holder.append(link)
        print(f"ready {store.version}", flush=True)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(link.run(), name="link")
            n = 0
            while rate > 0:
                journal.record("access.granted", door="front", card=n)
                n += 1
                await asyncio.sleep(1 / rate)
            await asyncio.Event().wait()


if __name__ == "__main__":
    a = sys.argv[1:]
    asyncio.run(main(Path(a[0]), int(a[1]), a[2], a[3], bytes.fromhex(a[4]), float(a[5])))
