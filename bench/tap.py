"""Tap-to-relay latency: from the last Wiegand edge of a card frame to the door relay switching to unlock.

An in-process Agent on the `sim` hardware profile (VirtualClockFactory pins, a temporary state dir, the
control socket unused) with two Wiegand readers: door1's uses the adaptive end of frame, door2's the fixed
25 ms baseline; taps alternate between them so both see the same conditions. Each tap is a real-time
frame from `WiegandTransmitter.send()` (50 us pulses, 1.5 ms +- 0.2 ms spacing, H10301). The latency is the
relay MockPin's recorded change minus the frame's last D0/D1 edge: both are stamped by the factory's
`ticks()`, the same clock. door1 is fail-secure (unlock = energise), door2 fail-safe (unlock = release).

Scenarios: idle; loaded = the store applies 100,000-credential change sets back to back (for 100,000 users
created beforehand) while a task journals 1,000 events/s. The event-loop lag (oversleep of a 2 ms timer)
is reported for both.

    python bench/tap.py [--quick] [--taps N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edge.agent import Agent, run_agent  # noqa: E402
from edge.config import parse_config  # noqa: E402
from edge.model import (  # noqa: E402
    Assignment,
    ChangeSet,
    Credential,
    Door,
    Group,
    PutCredential,
    PutDoor,
    PutGroup,
    PutUser,
    User,
)
from edge.readers.wiegand.reader import WiegandReader  # noqa: E402
from edge.sim.hands import card_frame, simulated_agent  # noqa: E402
from edge.sim.transmitter import WiegandTransmitter  # noqa: E402

CARD = 777
USERS = 100_000
CONFIG = """
hardware = "sim"
[site]
id = "bench"
gateway = "tap"
timezone = "Europe/Berlin"
[policy]
clock_source = "{clock}"
[storage]
state_dir = "{state}"
[control]
socket = "{state}/control.sock"
[link]
enabled = false
[[readers]]
driver = "wiegand"
door = "door1"
end_of_frame = "adaptive"
[[readers]]
driver = "wiegand"
door = "door2"
end_of_frame = "fixed"
"""


def emit(metric: str, value: float, unit: str, **params: Any) -> None:
    print(json.dumps({"metric": metric, "value": round(value, 3), "unit": unit, "params": params}), flush=True)


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))] if s else float("nan")


def site() -> ChangeSet:
    return ChangeSet(from_version=0, to_version=1, changes=[
        PutDoor(door=Door(id="door1", strike_s=3.0)),
        PutDoor(door=Door(id="door2", strike_s=3.0)),
        PutGroup(group=Group(id="all", doors=["door1", "door2"])),
        PutUser(user=User(id="tapper", assignments=[Assignment(group="all")])),
        PutCredential(credential=Credential(card=CARD, user="tapper")),
    ])  # fmt: skip


def users() -> ChangeSet:
    return ChangeSet(from_version=1, to_version=2, changes=[
        PutUser(user=User(id=f"u{i}", assignments=[Assignment(group="all")])) for i in range(USERS)
    ])  # type: ignore[arg-type]  # fmt: skip


def credentials(variant: int) -> ChangeSet:
    """100k credentials for the pre-created users; the variants differ in validity, so each is a real change."""
    until = datetime.now(UTC) + timedelta(days=365 + variant)
    return ChangeSet(from_version=0, to_version=1, changes=[
        PutCredential(credential=Credential(card=10_000_000 + i, user=f"u{i}", valid_until=until))
        for i in range(USERS)
    ])  # type: ignore[arg-type]  # fmt: skip


class Lag:
    """Event-loop lag: how late a 2 ms sleep wakes up."""

    def __init__(self) -> None:
        self.samples: list[float] = []

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t = loop.time()
            await asyncio.sleep(0.002)
            self.samples.append((loop.time() - t - 0.002) * 1e3)


async def journal_load(agent: Agent, rate: float, counter: list[int]) -> None:
    assert agent.journal is not None
    start = time.monotonic()
    while True:
        due = int((time.monotonic() - start) * rate) - counter[0]
        for _ in range(due):
            agent.journal.record("bench.load", door="door1", detail={"n": counter[0]})
            counter[0] += 1
        await asyncio.sleep(0.005)


async def apply_load(agent: Agent, sets: list[ChangeSet], durations: list[float], busy: list[bool]) -> None:
    assert agent.store is not None
    i = 0
    while True:
        v = agent.store.version
        cs = msgspec.structs.replace(sets[i % len(sets)], from_version=v, to_version=v + 1)
        t = time.perf_counter()
        busy[0] = True
        try:
            await agent.store.apply(cs)
        finally:
            busy[0] = False
        durations.append(time.perf_counter() - t)
        i += 1
        await asyncio.sleep(0)


class Tapper:
    def __init__(self, agent: Agent, door: str, rng: random.Random) -> None:
        io = agent.profile.door(door)
        assert io.reader_d0_pin is not None and io.reader_d1_pin is not None
        self.agent, self.door = agent, door
        self.fail_safe = io.lock_type == "fail_safe"
        self.tx = WiegandTransmitter(agent.factory, io.reader_d0_pin, io.reader_d1_pin, pulse_s=50e-6,
                                     interval_s=1.5e-3, jitter_s=0.2e-3, rng=rng)  # fmt: skip
        self.relay = agent.factory.pin(io.relay_pin)
        reader = next(r for r in agent.readers.values() if agent.reader_door[r.name] == door)
        assert isinstance(reader, WiegandReader)
        self.mode = reader.assembler.timing.mode
        self.frame = card_frame(reader.assembler.formats, CARD, fmt="h10301")
        self.latencies: list[float] = []
        self.misses = 0
        self.during_apply = 0

    async def tap(self, busy: list[bool] | None = None) -> None:
        self.relay.clear_states()
        base = self.relay._last_change
        last_edge = await self.tx.send(*self.frame)  # the stamp of the frame's last (rising) edge
        for _ in range(400):
            if len(self.relay.states) > 1:
                break
            await asyncio.sleep(0.001)
        else:
            self.misses += 1
            return
        st = self.relay.states[1]
        assert st.state is (not self.fail_safe), "the relay switched the wrong way"
        self.latencies.append((base + st.timestamp - last_edge) * 1e3)
        if busy is not None and busy[0]:
            self.during_apply += 1
        self.agent.doors[self.door].relock()

    def report(self, scenario: str, **extra: Any) -> None:
        xs = self.latencies
        target = 5.0 if scenario == "idle" else 10.0
        params = {
            "scenario": scenario, "end_of_frame": self.mode, "door": self.door, "n": len(xs), "misses": self.misses,
            "p50_ms": round(pct(xs, 0.5), 3), "p99_ms": round(pct(xs, 0.99), 3), "max_ms": round(max(xs), 3),
            "mean_ms": round(statistics.fmean(xs), 3), "bit_interval_ms": 1.5, "jitter_ms": 0.2, "pulse_us": 50,
            **({"target_p99_ms": target} if self.mode == "adaptive" else {"baseline": True}), **extra,
        }  # fmt: skip
        emit(f"tap_to_relay_p99.{scenario}.{self.mode}", pct(xs, 0.99), "ms", **params)


def proc_io() -> dict[str, int]:
    """This process's I/O counters (/proc/self/io)."""
    out: dict[str, int] = {}
    with open("/proc/self/io") as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k.strip()] = int(v)
    return out


async def bench(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-tap-") as tmp:
        cfg = parse_config(CONFIG.format(state=tmp, clock=args.clock_source))
        agent = simulated_agent(cfg, demo=site())
        async with asyncio.TaskGroup() as tg:
            tg.create_task(run_agent(agent), name="agent")
            await asyncio.wait_for(agent.started.wait(), 30)
            assert agent.store is not None
            rng = random.Random(7)
            tappers = [Tapper(agent, "door1", rng), Tapper(agent, "door2", rng)]
            assert [t.mode for t in tappers] == ["adaptive", "fixed"]

            async def taps(n: int, busy: list[bool] | None = None) -> None:
                for _ in range(n):
                    for t in tappers:
                        await t.tap(busy)
                        await asyncio.sleep(rng.uniform(0.03, 0.06))

            lag = Lag()
            lag_task = tg.create_task(lag.run(), name="lag")
            # (a), (b): idle; the process's write volume over these taps is the journal's (SD-card wear)
            assert agent.journal is not None
            await agent.journal.flush()
            io0, seq0 = proc_io(), agent.journal.next_seq
            await taps(args.taps)
            await agent.journal.flush()
            io1, events = proc_io(), agent.journal.next_seq - seq0
            ntaps = 2 * args.taps
            for key in ("wchar", "write_bytes"):
                emit(f"write_{key}_per_1000_taps", (io1[key] - io0[key]) * 1000 / ntaps, "bytes",
                     taps=ntaps, journal_events=events, synchronous=cfg.storage.synchronous,
                     source=f"/proc/self/io {key} (write_bytes: what reached the block layer; 0 on some "
                            "containers' overlay filesystems)")  # fmt: skip
            for t in tappers:
                t.report("idle")
            emit("loop_lag_p99.idle", pct(lag.samples, 0.99), "ms", max_ms=round(max(lag.samples), 3),
                 n=len(lag.samples))  # fmt: skip

            # provisioning for the load: 100k users first (not measured)
            t0 = time.perf_counter()
            await agent.store.apply(users())
            emit("setup_apply_100k_users_s", time.perf_counter() - t0, "s")
            sets = [credentials(0), credentials(1)]
            fresh = [Tapper(agent, "door1", rng), Tapper(agent, "door2", rng)]
            tappers[:] = fresh

            # (c), (d): loaded
            durations: list[float] = []
            busy = [False]
            journalled = [0]
            await asyncio.sleep(0.05)  # the lag sampler's sleep that spans building `sets` is not the load's
            lag.samples.clear()
            t0 = time.perf_counter()
            ld = tg.create_task(apply_load(agent, sets, durations, busy), name="apply-load")
            jl = tg.create_task(journal_load(agent, 1000.0, journalled), name="journal-load")
            await asyncio.sleep(0.05)
            await taps(args.taps, busy)
            elapsed = time.perf_counter() - t0
            ld.cancel()
            jl.cancel()
            for t in tappers:
                t.report("loaded", taps_during_apply=t.during_apply, applies_done=len(durations))
            emit("loop_lag_p99.loaded", pct(lag.samples, 0.99), "ms", max_ms=round(max(lag.samples), 3),
                 p50_ms=round(pct(lag.samples, 0.5), 3), p999_ms=round(pct(lag.samples, 0.999), 3),
                 over_5ms=sum(x > 5 for x in lag.samples), n=len(lag.samples))  # fmt: skip
            if durations:
                emit("apply_100k_credentials_s", statistics.median(durations), "s", n=len(durations),
                     max_s=round(max(durations), 3), note="median, while taps and journal load run")  # fmt: skip
            emit("journal_load_rate", journalled[0] / elapsed, "events/s", events=journalled[0])
            lag_task.cancel()
            agent.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="< 60 s: fewer taps")
    p.add_argument("--taps", type=int, help="taps per door and scenario (default 300, quick 40)")
    p.add_argument("--clock-source", choices=["ntp", "system"], default="ntp",
                   help="policy.clock_source of the agent (ntp: checks NTP every 30 s, as on a Pi)")
    args = p.parse_args()
    args.taps = args.taps or (40 if args.quick else 300)
    sys.setswitchinterval(0.0005)  # as `edge run` does
    asyncio.run(bench(args))


if __name__ == "__main__":
    main()
