"""OSDP control-panel benchmarks against libosdp's PeripheralDevice on a pty (JSON lines on stdout).

    .venv/bin/python bench/osdp.py [--quick] [--baseline-python PATH]

Metrics:
  * cpu_per_exchange (plain / secure): event-loop thread CPU time per POLL/ACK exchange, polling back to back
    (the peer runs in another thread and is not counted).
  * card_to_led (plain / secure): card presented at the peer -> our LED command read off the wire by the peer,
    with the default poll interval; p50 / p95 / max.
  * exchanges_per_second: ours vs the pure-Python `osdp` 1.6 control panel, counted the same way at the peer
    (commands received per second). The baseline installs a top-level module named `osdp`, as libosdp does,
    so it runs in its own virtual environment in a subprocess (created on first use under /tmp).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

# this file is named osdp.py, like libosdp's top-level module: keep its folder off the import path
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from edge.readers import formats  # noqa: E402
from edge.readers.base import ReaderEvent, ReaderStatus  # noqa: E402
from edge.readers.osdp import OsdpReader, Timing  # noqa: E402
from edge.readers.osdp.frame import Frame, FrameParser  # noqa: E402
from tests.osdp_peer import SITE_KEY, PeerBus  # noqa: E402

BASELINE_VENV = Path("/tmp/osdp16venv")


def emit(metric: str, value: float, unit: str, **params: Any) -> None:
    print(json.dumps({"metric": metric, "value": round(value, 4), "unit": unit, "params": params}), flush=True)


def frames_in(chunks: list[tuple[float, bytes]], t0: float, t1: float) -> int:
    p = FrameParser()
    n = 0
    for t, data in chunks:
        for item in p.feed(data):
            if isinstance(item, Frame) and t0 <= t <= t1:
                n += 1
    return n


async def wait_online(events: list[ReaderEvent], secure: bool, within: float = 10.0) -> None:
    end = time.monotonic() + within
    while not any(isinstance(e, ReaderStatus) and e.online and e.secure == secure for e in events):
        if time.monotonic() > end:
            raise RuntimeError("reader did not come online")
        await asyncio.sleep(0.01)


async def cpu_and_rate(secure: bool, seconds: float) -> tuple[float, float]:
    """(CPU ms per exchange on the loop thread, exchanges per second counted at the peer)."""
    events: list[ReaderEvent] = []
    with PeerBus() as pb:
        pb.add(1, scbk=SITE_KEY if secure else None)
        timing = Timing(poll_interval=0.0001, reply_timeout=0.2)
        reader = OsdpReader("bench", events.append, port=pb.path, address=1, secure=secure,
                            scbk=SITE_KEY.hex() if secure else None, timing=timing)
        async with reader:
            task = asyncio.create_task(reader.run(), name="bench.osdp")
            await wait_online(events, secure)
            await asyncio.sleep(0.2)
            assert reader.bus is not None
            n0, c0, t0 = reader.bus.exchanges, time.thread_time(), time.perf_counter()
            await asyncio.sleep(seconds)
            n1, c1, t1 = reader.bus.exchanges, time.thread_time(), time.perf_counter()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        rate = frames_in(pb.received, t0, t1) / (t1 - t0)
    return (c1 - c0) * 1000 / max(1, n1 - n0), rate


async def card_to_led(secure: bool, taps: int) -> list[float]:
    events: list[ReaderEvent] = []
    lat: list[float] = []
    with PeerBus() as pb:
        peer = pb.add(1, scbk=SITE_KEY if secure else None)
        reader: OsdpReader

        def sink(ev: ReaderEvent) -> None:
            events.append(ev)
            if type(ev).__name__ == "CardRead":
                from edge.readers.base import Feedback

                reader.feedback(Feedback.GRANTED)

        reader = OsdpReader("bench", sink, port=pb.path, address=1, secure=secure,
                            scbk=SITE_KEY.hex() if secure else None)
        bits = formats.encode("h10301", 12, 3456)
        async with reader:
            task = asyncio.create_task(reader.run(), name="bench.osdp")
            await wait_online(events, secure)
            for i in range(taps):
                await asyncio.sleep(0.013 * (i % 7) + 0.05)  # present at varying phases of the poll cycle
                start = len(pb.received)
                t0 = time.perf_counter()
                peer.card(bits, 26)
                end = time.monotonic() + 2
                found = None
                while found is None and time.monotonic() < end:
                    await asyncio.sleep(0.001)
                    p = FrameParser()
                    for t, data in pb.received[start:]:
                        for item in p.feed(data):
                            if isinstance(item, Frame) and item.code == 0x69 and t >= t0:
                                found = t
                                break
                        if found is not None:
                            break
                if found is not None:
                    lat.append((found - t0) * 1000)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return lat


BASELINE = textwrap.dedent(
    """
    import sys, time, logging
    logging.getLogger("osdp").setLevel(logging.CRITICAL)
    import osdp
    cp = osdp.ControlPanel()
    cid = cp.start_connection(osdp.SerialPortOsdpConnection(sys.argv[1], 115200))
    cp.add_device(cid, 1, True, False)
    time.sleep(float(sys.argv[2]))
    cp.shutdown()
    """
)


def ensure_baseline(python: str | None) -> str | None:
    if python:
        return python
    py = BASELINE_VENV / "bin" / "python"
    if not py.exists():
        try:
            subprocess.run([sys.executable, "-m", "venv", str(BASELINE_VENV)], check=True)
            subprocess.run([str(py), "-m", "pip", "install", "-q", "osdp==1.6", "pyserial"], check=True)
        except (subprocess.CalledProcessError, OSError) as e:  # no PyPI: the figures above still stand
            print(f"baseline venv: {e}", file=sys.stderr)
            return None
    ok = subprocess.run([str(py), "-c", "import osdp, serial; osdp.ControlPanel"],
                        check=False, capture_output=True)
    return str(py) if ok.returncode == 0 else None


def baseline_rate(python: str, seconds: float) -> float:
    with PeerBus() as pb:
        pb.add(1)
        proc = subprocess.Popen([python, "-c", BASELINE, pb.path, str(seconds + 2.0)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/tmp",
                                env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
        time.sleep(1.5)  # noqa: TID251 (bench driver, not an event loop)
        t0 = time.perf_counter()
        time.sleep(seconds)  # noqa: TID251
        t1 = time.perf_counter()
        proc.wait(timeout=30)
        return frames_in(pb.received, t0, t1) / (t1 - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--baseline-python", default=None)
    args = ap.parse_args()
    seconds = 2.0 if args.quick else 5.0
    taps = 15 if args.quick else 40

    for secure in (False, True):
        cpu, rate = asyncio.run(cpu_and_rate(secure, seconds))
        mode = "secure" if secure else "plain"
        emit("cpu_per_exchange", cpu, "ms", mode=mode, target_ms=0.3, seconds=seconds)
        emit("exchanges_per_second", rate, "1/s", mode=mode, implementation="edge.readers.osdp", peer="libosdp")
        if not secure:
            ours_plain = rate

    for secure in (False, True):
        lat = asyncio.run(card_to_led(secure, taps))
        mode = "secure" if secure else "plain"
        poll = Timing().poll_interval * 1000
        if lat:
            lat.sort()
            emit("card_to_led_p50", statistics.median(lat), "ms", mode=mode, poll_interval_ms=poll, taps=len(lat))
            emit("card_to_led_p95", lat[int(0.95 * (len(lat) - 1))], "ms", mode=mode, poll_interval_ms=poll)
            emit("card_to_led_max", lat[-1], "ms", mode=mode, poll_interval_ms=poll, target_ms=poll + 2)
        emit("card_to_led_missed", taps - len(lat), "taps", mode=mode)

    py = ensure_baseline(args.baseline_python)
    if py is None:
        emit("baseline_unavailable", 0, "", reason="could not set up osdp==1.6 venv")
        return
    base = baseline_rate(py, seconds)
    if not base:
        emit("baseline_unavailable", 0, "", reason="the osdp 1.6 control panel exchanged no frames")
        return
    emit("exchanges_per_second", base, "1/s", mode="plain", implementation="osdp 1.6 (pure Python)",
         peer="libosdp")
    emit("exchanges_per_second_ratio", ours_plain / base if base else float("inf"), "x", mode="plain",
         ours=round(ours_plain, 1), baseline=round(base, 1))


if __name__ == "__main__":
    main()
