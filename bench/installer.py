"""Tap-to-relay latency with the installer page polled by 10 browsers, against none (issue 16: "unchanged within
noise").

The agent of bench/tap.py (sim profile, door1 adaptive end of frame, door2 the fixed 25 ms baseline) with its
installer page on 127.0.0.1. Scenario "none": taps only. Scenario "polled": 10 clients in a separate process
(each logged in with its own session, as 10 browsers) fetch what the pages poll, every fragment each second:
/fragment/status, /fragment/doors, /fragment/reads, /fragment/events (40 requests/s in all; `--rate` scales
it). Scenario "control": the same client process polling a trivial server of its own, so that what the
clients' CPU costs the machine (browsers are elsewhere on a real site) is told apart from what the page costs
the agent. The two scenarios alternate in blocks (`--rounds`) so that both see the same machine. The tap latency is
measured as in bench/tap.py (last Wiegand edge to the relay MockPin's change).

    python bench/installer.py [--quick] [--taps N] [--rounds R] [--clients 10] [--rate 1.0]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import re
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from tap import CONFIG, Lag, Tapper, emit, pct, site  # noqa: E402

from edge.agent import run_agent  # noqa: E402
from edge.config import parse_config  # noqa: E402
from edge.sim.hands import simulated_agent  # noqa: E402

FRAGMENTS = ("/fragment/status", "/fragment/doors", "/fragment/reads", "/fragment/events")
PASSWORD = "bench password 1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# --- the clients (a separate process: browsers are not in the gateway's event loop) -------------------------


async def client_main(base: str, clients: int, rate: float, seconds: float) -> dict[str, Any]:
    """Poll until `seconds` have passed or SIGTERM; returns the response times."""
    import signal

    import httpx

    times: list[float] = []
    logins: list[float] = []
    errors = [0]

    control = base == "self"
    if control:  # the control: the same clients, polling a trivial server of their own process
        body = b"<table>" + b"<tr><td>x</td></tr>" * 100 + b"</table>"
        head = b"HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: %d\r\n\r\n" % len(body)

        async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while await r.readuntil(b"\r\n\r\n"):
                    w.write(head + body)
                    await w.drain()

        srv = await asyncio.start_server(serve, "127.0.0.1", 0)
        base = f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}"
        print("ready", flush=True)

    async def one(i: int) -> None:
        async with httpx.AsyncClient(base_url=base, timeout=10) as c:
            if control:
                await poll(c, i)
                return
            t = time.perf_counter()
            page = await c.get("/login")
            token = re.search(r'name="_csrf" value="([^"]+)"', page.text)
            assert token, page.text[:300]
            r = await c.post("/login", data={"_csrf": token.group(1), "name": f"viewer{i}", "password": PASSWORD})
            assert r.status_code == 303, r.text[:300]
            logins.append((time.perf_counter() - t) * 1e3)
            if len(logins) == clients:
                print("ready", flush=True)  # the bench starts its taps now (the logins' scrypt is done)
            await poll(c, i)

    async def poll(c: httpx.AsyncClient, i: int) -> None:
        end = time.monotonic() + seconds
        period = 1.0 / rate
        while time.monotonic() < end:
            t0 = time.monotonic()
            for path in FRAGMENTS:
                t = time.perf_counter()
                try:
                    r = await c.get(path)
                    ok = r.status_code == 200
                except httpx.HTTPError as e:
                    print(f"client {i}: {path}: {type(e).__name__}", file=sys.stderr)
                    ok = False
                if not ok:
                    errors[0] += 1
                times.append((time.perf_counter() - t) * 1e3)
            await asyncio.sleep(max(0.0, period - (time.monotonic() - t0)))

    task = asyncio.ensure_future(asyncio.gather(*(one(i) for i in range(clients))))
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        pass
    return {"requests": len(times), "errors": errors[0], "p50_ms": round(pct(times, 0.5), 2),
            "p99_ms": round(pct(times, 0.99), 2), "login_max_ms": round(max(logins, default=0.0), 1)}  # fmt: skip


# --- the gateway ---------------------------------------------------------------------------------------------


async def bench(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-installer-") as tmp:
        port = free_port()
        text = CONFIG.format(state=tmp, clock="system") + f"\n[installer]\nenabled = true\nport = {port}\n"
        cfg = parse_config(text)
        agent = simulated_agent(cfg, demo=site())
        async with asyncio.TaskGroup() as tg:
            tg.create_task(run_agent(agent), name="agent")
            await asyncio.wait_for(agent.started.wait(), 30)
            accounts = agent.installer.accounts
            code = accounts.setup_code
            await accounts.use_setup_code(code, "bench", PASSWORD)
            for i in range(args.clients):
                await accounts.add(f"viewer{i}", "viewer", PASSWORD)
            rng = random.Random(16)
            lag = Lag()
            lag_task = tg.create_task(lag.run(), name="lag")

            async def taps(tappers: list[Tapper], n: int) -> None:
                for _ in range(n):
                    for t in tappers:
                        await t.tap()
                        await asyncio.sleep(rng.uniform(0.03, 0.06))

            results: dict[str, Any] = {}
            scenarios = ("none", "polled", "control")
            tappers = {sc: [Tapper(agent, "door1", rng), Tapper(agent, "door2", rng)] for sc in scenarios}
            lags: dict[str, list[float]] = {sc: [] for sc in scenarios}
            clients: dict[str, dict[str, Any]] = {"polled": {}, "control": {}}
            elapsed = dict.fromkeys(scenarios, 0.0)
            per_block = max(1, args.taps // args.rounds)
            for rnd in range(args.rounds):  # alternating blocks, so that both scenarios see the machine's noise
                for scenario in scenarios if rnd % 2 == 0 else scenarios[::-1]:
                    proc = None
                    if scenario != "none":
                        target = f"http://127.0.0.1:{port}" if scenario == "polled" else "self"
                        proc = await asyncio.create_subprocess_exec(
                            sys.executable, __file__, "--client", target, "--clients",
                            str(args.clients), "--rate", str(args.rate), "--seconds", str(per_block * 0.5 + 30),
                            stdout=asyncio.subprocess.PIPE,
                        )  # fmt: skip
                        assert proc.stdout is not None
                        ready = await asyncio.wait_for(proc.stdout.readline(), 120)
                        assert ready.strip() == b"ready", ready
                        await asyncio.sleep(1.0)  # polling
                    lag.samples.clear()
                    t0 = time.perf_counter()
                    await taps(tappers[scenario], per_block)
                    elapsed[scenario] += time.perf_counter() - t0
                    lags[scenario] += lag.samples
                    if proc is not None:
                        proc.terminate()
                        out, _ = await proc.communicate()
                        got = json.loads(out.splitlines()[-1]) if out.strip() else {}
                        cs = clients[scenario]
                        for k in ("requests", "errors"):
                            cs[k] = cs.get(k, 0) + got.get(k, 0)
                        for k in ("p99_ms", "login_max_ms"):
                            cs[k] = max(cs.get(k, 0.0), got.get(k, 0.0))
            for scenario in scenarios:
                for t in tappers[scenario]:
                    extra = {f"page_{k}": v for k, v in clients.get(scenario, {}).items()}
                    t.report(f"installer_{scenario}", clients=args.clients if scenario != "none" else 0,
                             rate_per_s=args.rate, rounds=args.rounds, elapsed_s=round(elapsed[scenario], 1),
                             **extra)  # fmt: skip
                results[scenario] = pct(tappers[scenario][0].latencies, 0.99)
                emit(f"loop_lag_p99.installer_{scenario}", pct(lags[scenario], 0.99), "ms",
                     max_ms=round(max(lags[scenario]), 3), n=len(lags[scenario]))  # fmt: skip
            emit("installer_tap_p99_delta", results["polled"] - results["none"], "ms",
                 none_ms=round(results["none"], 3), polled_ms=round(results["polled"], 3),
                 control_ms=round(results["control"], 3), door="door1",
                 end_of_frame="adaptive",
                 requests_per_s=round(args.clients * args.rate * len(FRAGMENTS), 1))  # fmt: skip
            lag_task.cancel()
            agent.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="< 60 s: fewer taps")
    p.add_argument("--taps", type=int, help="taps per door and scenario (default 300, quick 24)")
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--rounds", type=int, help="alternating blocks of each scenario (default 6, quick 2)")
    p.add_argument("--rate", type=float, default=1.0, help="page polls per client and second (each: 4 fragments)")
    p.add_argument("--client", help=argparse.SUPPRESS)
    p.add_argument("--seconds", type=float, default=60.0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.client:
        _client(args)
        return
    args.taps = args.taps or (24 if args.quick else 300)
    args.rounds = args.rounds or (2 if args.quick else 6)
    sys.setswitchinterval(0.0005)  # as `edge run` does
    asyncio.run(bench(args))


def _client(args: argparse.Namespace) -> None:
    stats = asyncio.run(client_main(args.client, args.clients, args.rate, args.seconds))
    print(json.dumps(stats), flush=True)


if __name__ == "__main__":
    main()
