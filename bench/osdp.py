"""OSDP control-panel benchmarks against libosdp's PeripheralDevice on a pty (JSON lines on stdout).

    .venv/bin/python bench/osdp.py [--quick] [--baseline-python PATH]

Metrics:
  * cpu_per_exchange (plain / secure): event-loop thread CPU time per POLL/ACK exchange, polling back to back
    (the peer runs in another thread and is not counted).
  * cpu_per_exchange_vs_libosdp (plain / secure): ours and libosdp's own ControlPanel (its C core, driven
    from a Python thread through a Python channel, as ours is driven by asyncio) against the same libosdp PD,
    both at libosdp's own poll rate; CPU of the CP's thread per exchange and the ratio (target <= 2x).
  * line8_polls_per_reader / line8_card_to_led_p99 / line8_dead_ratio: 8 secure readers on one line paced
    at 115,200 baud, 50 ms poll interval: the slowest reader's polls/s answered (replies its PD wrote;
    target >= 18), card to LED p99 (from the PD's card event to libosdp's PD handing the LED command to
    its application; target <= 60 ms), and with one of the 8 dead the live readers' answered rate over
    the rate without (target >= 0.9), measured once the dead reader's probing has backed off.
  * file_transfer_64k: 64 KiB over osdp_FILETRANSFER to a libosdp PD in a secure session at 115,200 baud,
    byte-exact (checked), seconds.
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


# --- libosdp's own control panel, side by side ------------------------------------------------------


def libosdp_cp(secure: bool, seconds: float) -> tuple[float, float, float]:
    """(CPU ms per exchange inside libosdp's ControlPanel.refresh(), exchanges/s, CPU ms per exchange of the
    whole thread driving it) against a libosdp PD."""
    import select
    import threading
    import tty

    import osdp as libosdp

    with PeerBus() as pb:
        pb.add(1, scbk=SITE_KEY if secure else None)
        fd = os.open(pb.path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        tty.setraw(fd)

        class Channel(libosdp.Channel):  # type: ignore[misc]
            def read(self, max_bytes: int) -> bytes:
                try:
                    return os.read(fd, max_bytes)
                except BlockingIOError:
                    return b""

            def write(self, buf: bytes) -> int:
                return os.write(fd, bytes(buf))

            def flush(self) -> None:
                pass

        flags = [libosdp.LibFlag.EnforceSecure] if secure else []
        info = libosdp.PDInfo(1, Channel(), scbk=SITE_KEY if secure else None, flags=flags)
        cp = libosdp.ControlPanel([info], log_level=libosdp.LogLevel.Emergency)
        stop = threading.Event()
        cpu: dict[str, float] = {}
        mark = threading.Event()
        done = threading.Event()

        def drive() -> None:
            # the thread's CPU in the window, and the part spent inside refresh() (libosdp's own work and
            # our channel callbacks, without this loop's select): the ratio uses the smaller one
            inside = 0.0
            while not stop.is_set():
                if mark.is_set() and "t0" not in cpu:
                    cpu["t0"] = time.thread_time()
                    inside = 0.0
                if done.is_set() and "t1" not in cpu:
                    cpu["t1"] = time.thread_time()
                    cpu["inside"] = inside
                c = time.thread_time()
                cp.ctx.refresh()
                inside += time.thread_time() - c
                select.select([fd], [], [], 0.001)

        th = threading.Thread(target=drive, name="libosdp-cp", daemon=True)
        th.start()
        end = time.monotonic() + 10
        while not (cp.ctx.sc_status() if secure else cp.ctx.status()) & 1:
            if time.monotonic() > end:
                stop.set()
                raise RuntimeError("libosdp CP did not come online")
            time.sleep(0.01)  # noqa: TID251 (bench driver thread, not an event loop)
        time.sleep(0.3)  # noqa: TID251
        t0 = time.perf_counter()
        mark.set()
        time.sleep(seconds)  # noqa: TID251
        done.set()
        t1 = time.perf_counter()
        time.sleep(0.05)  # noqa: TID251
        stop.set()
        th.join(2)
        os.close(fd)
        n = frames_in(pb.received, t0, t1)
    return cpu["inside"] * 1000 / max(1, n), n / (t1 - t0), (cpu["t1"] - cpu["t0"]) * 1000 / max(1, n)


async def ours_at(secure: bool, seconds: float, poll_interval: float, pkg: Any = None) -> tuple[float, float]:
    """(CPU ms per exchange on the loop thread, exchanges/s) at `poll_interval`; `pkg` another copy of the
    edge.readers.osdp package to measure instead (--before)."""
    events: list[ReaderEvent] = []
    reader_cls, timing_cls = (OsdpReader, Timing) if pkg is None else (pkg.OsdpReader, pkg.Timing)
    with PeerBus() as pb:
        pb.add(1, scbk=SITE_KEY if secure else None)
        reader = reader_cls("bench", events.append, port=pb.path, address=1, secure=secure,
                            scbk=SITE_KEY.hex() if secure else None, timing=timing_cls(poll_interval=poll_interval))
        async with reader:
            task = asyncio.create_task(reader.run(), name="bench.osdp")
            await wait_online(events, secure)
            await asyncio.sleep(0.3)
            c0, t0 = time.thread_time(), time.perf_counter()
            await asyncio.sleep(seconds)
            c1, t1 = time.thread_time(), time.perf_counter()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        n = frames_in(pb.received, t0, t1)
    return (c1 - c0) * 1000 / max(1, n), n / (t1 - t0)


# --- 8 readers on one line --------------------------------------------------------------------------


def per_address(chunks: list[tuple[float, bytes]], t0: float, t1: float) -> dict[int, list[tuple[float, int]]]:
    p = FrameParser()
    out: dict[int, list[tuple[float, int]]] = {}
    for t, data in chunks:
        for item in p.feed(data):
            if isinstance(item, Frame) and t0 <= t <= t1:
                out.setdefault(item.address, []).append((t, item.code))
    return out


def replies_per_address(pb: PeerBus, t0: float, t1: float) -> dict[int, int]:
    """Replies each PD wrote in [t0, t1] (what the PD side sent: exchanges it actually answered)."""
    p = FrameParser()
    out: dict[int, int] = {}
    for t, data in list(pb.sent):
        for item in p.feed(data):
            if isinstance(item, Frame) and item.reply and t0 <= t <= t1:
                out[item.address] = out.get(item.address, 0) + 1
    return out


def led_seen_after(peer: Any, since: float) -> float | None:
    """When libosdp's PD handed its application the first LED command after `since` (its command callback:
    the PD has received, checked and decrypted it), or None."""
    import osdp as libosdp

    for t, cmd in zip(list(peer.command_times), list(peer.commands), strict=False):
        if t >= since and cmd.get("command") == libosdp.Command.LED:
            return float(t)
    return None


async def line8(dead: bool, seconds: float, settle: float, taps: int, pkg: Any = None,
                cpu: dict[str, float] | None = None
                ) -> tuple[dict[int, float], list[float], dict[int, float]]:  # fmt: skip
    """Per live reader: polls/s answered by its PD, and commands/s it was sent; card-to-LED latencies (ms) of
    cards shown at live readers, from the PD's card event to the PD receiving the LED command. `pkg`: another
    copy of edge.readers.osdp to measure instead (--before)."""
    from edge.readers.base import CardRead, Feedback
    from edge.readers.osdp import osdp_bus

    cpu = {} if cpu is None else cpu
    reader_cls = OsdpReader
    if pkg is not None:
        reader_cls, osdp_bus = pkg.OsdpReader, pkg.osdp_bus

    addresses = list(range(1, 9))
    live = addresses[:-1] if dead else addresses
    events: list[ReaderEvent] = []
    readers: dict[str, OsdpReader] = {}

    def sink(ev: ReaderEvent) -> None:
        events.append(ev)
        if isinstance(ev, CardRead):
            readers[ev.reader].feedback(Feedback.GRANTED)

    with PeerBus(baud=115200) as pb:
        peers = {a: pb.add(a, scbk=SITE_KEY) for a in addresses}
        if dead:
            peers[8].silent = True
        for a in addresses:
            readers[f"r{a}"] = reader_cls(f"r{a}", sink, address=a, scbk=SITE_KEY.hex())
        async with osdp_bus(pb.path, list(readers.values())) as bus:
            task = asyncio.create_task(bus.run(), name="bench.osdp.line8")
            end = time.monotonic() + 20
            while not all(readers[f"r{a}"].online and readers[f"r{a}"].secure for a in live):
                if time.monotonic() > end:
                    raise RuntimeError("8-reader line did not come online")
                await asyncio.sleep(0.02)
            await asyncio.sleep(settle)  # a dead reader's probing backs off meanwhile
            t0, c0, p0, n0 = time.perf_counter(), time.thread_time(), time.process_time(), bus.exchanges
            await asyncio.sleep(seconds)
            t1, c1, p1, n1 = time.perf_counter(), time.thread_time(), time.process_time(), bus.exchanges
            cpu["cp_us"] = (c1 - c0) * 1e6 / max(1, n1 - n0)  # the loop thread: our control panel
            cpu["all_us"] = (p1 - p0) * 1e6 / max(1, n1 - n0)  # the process: ours and the 8 libosdp PDs
            cpu["busy"] = (p1 - p0) / (t1 - t0)  # CPU seconds per second, both (of the machine's cores)
            lat: list[float] = []
            bits = formats.encode("h10301", 12, 3456)
            for i in range(taps):
                a = live[i % len(live)]
                await asyncio.sleep(0.011 * (i % 5) + 0.03)
                c0 = time.perf_counter()
                peers[a].card(bits, 26)
                found = None
                deadline = time.monotonic() + 2
                while found is None and time.monotonic() < deadline:
                    await asyncio.sleep(0.002)
                    found = led_seen_after(peers[a], c0)
                if found is not None:
                    lat.append((found - c0) * 1000)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        answered = replies_per_address(pb, t0, t1)
        sent = per_address(pb.received, t0, t1)
    span = t1 - t0
    return ({a: answered.get(a, 0) / span for a in live}, lat,
            {a: len(sent.get(a, [])) / span for a in live})  # fmt: skip


async def file_64k() -> tuple[float, bool]:
    events: list[ReaderEvent] = []
    image = os.urandom(64 * 1024)
    with PeerBus(baud=115200) as pb:
        peer = pb.add(1, scbk=SITE_KEY)
        reader = OsdpReader("bench", events.append, port=pb.path, address=1, scbk=SITE_KEY.hex())
        async with reader:
            task = asyncio.create_task(reader.run(), name="bench.osdp.file")
            await wait_online(events, True)
            t0 = time.perf_counter()
            result = await asyncio.wait_for(reader.transfer_file(image), 120)
            took = time.perf_counter() - t0
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        exact = result.ok and bytes(peer.file) == image
    return took, exact


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


def load_before(path: str | None) -> Any:
    """The package `osdp_before` under `path`: a copy of an older edge/readers/osdp (its absolute imports of
    edge.* resolve to this tree), e.g. ``git show REV:edge/readers/osdp/X.py > DIR/osdp_before/X.py``."""
    if path is None:
        return None
    import importlib

    sys.path.insert(0, path)
    try:
        return importlib.import_module("osdp_before")
    finally:
        sys.path.remove(path)


def line8_part(quick: bool, taps: int, before: Any = None) -> None:
    """8 secure readers on one line: polls per reader, card to LED, and the cost of one dead reader (and
    the same for `before`, an older copy, measured right after in the same run: `line8_before_*`)."""
    settle = 8.0 if quick else 16.0  # probes of a dead reader at 1, 2, 4, 8 s: steady state after ~15 s
    window = 4.0 if quick else 10.0
    for name, pkg in (("line8", None), ("line8_before", before)):
        if name == "line8_before" and pkg is None:
            continue
        load0 = round(os.getloadavg()[0], 2)
        cpu: dict[str, float] = {}
        base, lat, sent = asyncio.run(line8(False, window, 0.5, taps, pkg, cpu))
        with_dead, _, _ = asyncio.run(line8(True, window, settle, 0, pkg))
        load = [load0, round(os.getloadavg()[0], 2)]
        emit(f"{name}_polls_per_reader", min(base.values()), "1/s", readers=8, baud=115200, poll_interval_ms=50,
             target_min=18, max=round(max(base.values()), 1), commands_min=round(min(sent.values()), 1),
             counted="replies written by each PD", seconds=window, load1=load,
             cp_cpu_us_per_exchange=round(cpu["cp_us"], 1), process_cpu_us_per_exchange=round(cpu["all_us"], 1),
             process_cpu_s_per_s=round(cpu["busy"], 3))
        if lat:
            lat.sort()
            emit(f"{name}_card_to_led_p99", lat[min(len(lat) - 1, int(0.99 * len(lat)))], "ms", readers=8,
                 target_ms=60, p50=round(statistics.median(lat), 1), max=round(lat[-1], 1), taps=len(lat),
                 missed=taps - len(lat), measured="PD card event to the PD's LED command callback", load1=load)
        emit(f"{name}_dead_ratio", min(with_dead.values()) / max(1e-9, statistics.mean(base.values())), "x",
             readers=8, dead=1, target_min=0.9, live_min=round(min(with_dead.values()), 1),
             live_mean_without=round(statistics.mean(base.values()), 1), settle_s=settle, seconds=window,
             load1=load)


def vs_libosdp(seconds: float, rounds: int, before: Any = None) -> None:
    """Ours (and `before`, an older copy) and libosdp's ControlPanel, one after the other in each round (the
    same load); the median ratio per mode. The load average is printed with each result."""
    for secure in (False, True):
        mode = "secure" if secure else "plain"
        rows, old = [], []
        load0 = os.getloadavg()[0]
        for _ in range(rounds):
            theirs_cpu, theirs_rate, theirs_thread = libosdp_cp(secure, seconds)
            ours_cpu, ours_rate = asyncio.run(ours_at(secure, seconds, 0.05))
            rows.append((ours_cpu / theirs_cpu, ours_cpu, theirs_cpu, theirs_thread, ours_rate, theirs_rate))
            if before is not None:
                b_cpu, _ = asyncio.run(ours_at(secure, seconds, 0.05, before))
                old.append((b_cpu / theirs_cpu, b_cpu))
        ratio, ours_cpu, theirs_cpu, theirs_thread, ours_rate, theirs_rate = sorted(rows)[len(rows) // 2]
        load = [round(load0, 2), round(os.getloadavg()[0], 2)]
        emit("cpu_per_exchange_vs_libosdp", ratio, "x", mode=mode, target_x=2.0,
             ours_ms=round(ours_cpu, 4), libosdp_refresh_ms=round(theirs_cpu, 4),
             libosdp_thread_ms=round(theirs_thread, 4), ours_per_s=round(ours_rate, 1),
             libosdp_per_s=round(theirs_rate, 1), seconds=seconds, rounds=rounds,
             all_x=[round(r[0], 2) for r in rows], load1=load)
        if old:
            b_ratio, b_cpu = sorted(old)[len(old) // 2]
            emit("cpu_per_exchange_vs_libosdp_before", b_ratio, "x", mode=mode, before_ms=round(b_cpu, 4),
                 all_x=[round(r[0], 2) for r in old], rounds=rounds, load1=load)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--baseline-python", default=None)
    ap.add_argument("--only", choices=["vs_libosdp", "line8"], default=None,
                    help="run one part: vs_libosdp (CPU per exchange against libosdp's ControlPanel), line8")
    ap.add_argument("--rounds", type=int, default=1, help="rounds of the vs_libosdp part (median reported)")
    ap.add_argument("--before", default=None,
                    help="a directory holding an older copy of edge/readers/osdp as package 'osdp_before': "
                    "measured in the same rounds as the vs_libosdp part and right after the line8 part")  # fmt: skip
    args = ap.parse_args()
    seconds = 2.0 if args.quick else 5.0
    taps = 15 if args.quick else 40
    before = load_before(args.before)
    if args.only == "vs_libosdp":
        vs_libosdp(seconds, args.rounds, before)
        return
    if args.only == "line8":
        line8_part(args.quick, taps, before)
        return

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

    vs_libosdp(seconds, args.rounds, before)

    line8_part(args.quick, taps)

    took, exact = asyncio.run(file_64k())
    emit("file_transfer_64k", took, "s", baud=115200, secure=True, byte_exact=exact)

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
