"""`edge` command line: run, check-config, decide, status, sim."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from datetime import UTC, datetime
from typing import Any

from .config import Config, config_path, load_config, parse_config
from .errors import ConfigError, EdgeError

log = logging.getLogger("edge")

#: The configuration used when none is given and /etc/edge/edge.toml does not exist: a simulated
#: two-door gateway with demo provisioning, its state under ./var/edge-sim.
SIM_CONFIG = """
hardware = "sim"
[site]
id = "demo"
gateway = "sim-1"
timezone = "Europe/Berlin"
[policy]
clock_source = "system"
[storage]
state_dir = "var/edge-sim"
[control]
socket = "var/edge-sim/control.sock"
[link]
host = "127.0.0.1"
port = 1883
[demo]
enabled = true
"""


def _setup_logging(verbose: bool) -> None:
    journald = bool(os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"))
    fmt = "<%(levelno)s>%(name)s: %(message)s" if journald else "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=fmt, stream=sys.stderr)
    if journald:  # map Python levels to syslog priorities that journald understands
        for lvl, prio in (
            (logging.DEBUG, 7),
            (logging.INFO, 6),
            (logging.WARNING, 4),
            (logging.ERROR, 3),
            (logging.CRITICAL, 2),
        ):
            logging.addLevelName(lvl, str(prio))


def _resolve_config(arg: str | None) -> tuple[Config, str]:
    path = config_path(arg)
    if arg is None and not os.environ.get("EDGE_CONFIG") and not path.exists():
        return parse_config(SIM_CONFIG, source="<built-in simulated gateway>"), "<built-in simulated gateway>"
    return load_config(path), str(path)


def cmd_run(args: argparse.Namespace) -> int:
    from .agent import Agent

    cfg, source = _resolve_config(args.config)
    _setup_logging(args.verbose)
    _check_secrets(cfg, source)
    sys.setswitchinterval(0.0005)  # worker threads (SQLite) must not hold the GIL for 5 ms at a time
    log.info("config: %s", source)
    agent = Agent(cfg)
    if agent.simulated:  # the one place that picks the simulator: its hands on the control socket
        from .sim.hands import install

        install(agent)
    demo = None
    if cfg.demo.enabled:
        from .sim.demo import demo_change_set

        demo = demo_change_set(agent.profile)
    agent.demo = demo
    try:
        asyncio.run(_run_with_demo(agent, cfg, demo is not None and not args.no_demo_taps))
    except KeyboardInterrupt:
        pass
    return 0


async def _run_with_demo(agent: Any, cfg: Config, taps: bool) -> None:
    from .agent import run_agent
    from .sim.demo import demo_taps

    async with asyncio.TaskGroup() as tg:
        main = tg.create_task(run_agent(agent), name="agent")
        demo = tg.create_task(demo_taps(agent), name="demo-taps") if taps else None
        await main
        if demo is not None:
            demo.cancel()  # the agent has stopped: no more taps


def _check_secrets(cfg: Config, source: str, *, ports: bool = False) -> None:
    """Every secret and file the config names can be read now (and the command key is a valid key): a
    missing one is a config error at start (exit 2), not a subsystem failing and restarting for ever."""
    from .config import OsdpReaderConfig, check_files
    from .link import link_config
    from .metrics import metrics_access
    from .readers.registry import read_key

    try:
        for i, r in enumerate(cfg.readers):
            if isinstance(r, OsdpReaderConfig):
                read_key(cfg, r, f"readers[{i}]")
        if cfg.link.enabled:
            link_config(cfg)
        check_files(cfg, ports=ports)
        metrics_access(cfg)  # the token credential, the socket's group
        _check_local_services(cfg)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def _check_local_services(cfg: Config) -> None:
    """The installer page's packages are installed, Home Assistant's broker password can be read."""
    if cfg.installer.enabled:
        import importlib.util

        missing = [m for m in ("litestar", "uvicorn", "jinja2") if importlib.util.find_spec(m) is None]
        if missing:
            raise ConfigError(f"installer.enabled: needs {', '.join(missing)} (pip install 'edge-access[installer]')")
    if cfg.hass.enabled and cfg.hass.broker == "local" and cfg.hass.password_file:
        from .secrets import SecretSource

        SecretSource.from_env(plaintext=cfg.storage.plaintext_secrets).read(cfg.hass.password_file,
                                                                            "hass.password_file")  # fmt: skip


def cmd_check_config(args: argparse.Namespace) -> int:
    from .config import WiegandReaderConfig
    from .hw import load_profile

    cfg, source = _resolve_config(args.config)
    try:
        profile = load_profile(cfg.hardware)
    except ConfigError as e:
        raise ConfigError(f"{source}: hardware: {e}") from None
    for i, r in enumerate(cfg.readers):
        try:
            io = profile.door(r.door)
        except KeyError:
            raise ConfigError(f"{source}: readers[{i}].door: hardware profile {profile.name!r} has no door {r.door!r}"
                              ) from None  # fmt: skip
        if isinstance(r, WiegandReaderConfig) and (io.reader_d0_pin is None or io.reader_d1_pin is None):
            raise ConfigError(f"{source}: readers[{i}].door: door {r.door!r} has no reader_d0_pin/reader_d1_pin in "
                              f"hardware profile {profile.name!r}")  # fmt: skip
    _check_secrets(cfg, source, ports=True)
    print(
        f"{source}: OK (site {cfg.site.id}, gateway {cfg.site.gateway}, profile {profile.name}, "
        f"{len(profile.doors)} doors, {len(cfg.readers)} readers configured)"
    )
    return 0


def cmd_decide(args: argparse.Namespace) -> int:
    from .decision import Decider
    from .store import Store

    cfg, _ = _resolve_config(args.config)
    db = cfg.state_dir / "rights.db"
    if not db.exists():
        raise EdgeError(f"{db}: no rights store (has the gateway been provisioned?)")
    at = datetime.fromisoformat(args.at) if args.at else datetime.now(UTC)
    if at.tzinfo is None:
        at = at.replace(tzinfo=cfg.tz)

    async def go() -> dict[str, Any]:
        async with Store(db, cfg.tz) as store:
            d = Decider(store.index, cfg.site_policy()).decide(
                args.door, args.card, at, pin=args.pin, link_online=not args.offline, facility=args.facility
            )
            return {
                "granted": d.granted, "reason": d.reason.value, "door": d.door, "card": d.card, "user": d.user,
                "group": d.group, "strike_s": d.strike_s, "at": at.isoformat(), "rights_version": store.version,
            }  # fmt: skip

    out = asyncio.run(go())
    print(json.dumps(out))
    return 0 if out["granted"] else 1


def cmd_status(args: argparse.Namespace) -> int:
    from .control import StatusRequest, request

    cfg, _ = _resolve_config(args.config)
    try:
        reply = asyncio.run(request(cfg.control.socket, StatusRequest()))
    except (FileNotFoundError, ConnectionRefusedError):
        print(f"agent not running (no control socket at {cfg.control.socket})", file=sys.stderr)
        return 3
    if not reply.ok:
        print(f"error: {reply.error}", file=sys.stderr)
        return 1
    st = reply.result or {}
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    link = st.get("link", {})
    print(
        f"gateway {st.get('site')}/{st.get('gateway')}  software {st.get('version')}"
        f"{'  (simulated)' if st.get('simulated') else ''}"
    )
    print(f"rights version {st.get('rights_version')}  credentials {st.get('credentials')}")
    print(f"link {'online' if link.get('online') else 'OFFLINE since ' + str(link.get('offline_since'))}")
    print(
        f"journal depth {st.get('journal_depth')}  storage {'ok' if st.get('storage_ok') else 'FAILING'}"
        f"  clock {'trusted' if st.get('clock_trusted') else 'NOT TRUSTED'}  lockdown {st.get('lockdown')}"
    )
    for door, ds in (st.get("doors") or {}).items():
        print(f"door {door}: {json.dumps(ds)}")
    for r, rs in (st.get("readers") or {}).items():
        print(f"reader {r}: {json.dumps(rs)}")
    inst = st.get("installer")
    if inst:
        print(
            f"installer page {inst.get('url')}"
            + (f"  certificate SHA-256 {inst['fingerprint']}" if inst.get("fingerprint") else "")
        )
        if inst.get("setup_code"):
            print(f"installer setup code {inst['setup_code']} (one-time: creates the first account)")
    return 0


def cmd_sim(args: argparse.Namespace) -> int:
    from .control import DoorRequest, RexRequest, TapRequest, request

    cfg, _ = _resolve_config(args.config)
    req: TapRequest | DoorRequest | RexRequest
    if args.sim_cmd == "tap":
        req = TapRequest(door=args.door, card=args.card, format=args.format, facility=args.facility, pin=args.pin)
    elif args.sim_cmd == "door":
        req = DoorRequest(door=args.door, action=args.action)
    else:
        req = RexRequest(door=args.door)
    try:
        reply = asyncio.run(request(cfg.control.socket, req))
    except (FileNotFoundError, ConnectionRefusedError):
        print(f"agent not running (no control socket at {cfg.control.socket})", file=sys.stderr)
        return 3
    if not reply.ok:
        print(f"error: {reply.error}", file=sys.stderr)
        return 1
    print(json.dumps(reply.result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge", description="Edge access controller")
    p.add_argument(
        "--config",
        help="config file (default: $EDGE_CONFIG or /etc/edge/edge.toml; without either, a built-in simulated gateway)",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the gateway agent")
    r.add_argument("--no-demo-taps", action="store_true", help="with demo provisioning, do not tap the demo cards")
    sub.add_parser("check-config", help="validate the config and hardware profile without starting")
    d = sub.add_parser("decide", help="answer a tap from the local store (support tool)")
    d.add_argument("--door", required=True)
    d.add_argument("--card", required=True, type=int)
    d.add_argument("--at", help="ISO 8601 time (site time zone if no offset); default now")
    d.add_argument("--pin")
    d.add_argument("--facility", type=int, help="the facility code the reader read (formats that carry one)")
    d.add_argument("--offline", action="store_true", help="as if the cloud link had been down past the grace")
    s = sub.add_parser("status", help="show the running agent's state")
    s.add_argument("--json", action="store_true")
    sim = sub.add_parser("sim", help="drive the simulated gateway's readers, doors and exit buttons")
    simsub = sim.add_subparsers(dest="sim_cmd", required=True)
    t = simsub.add_parser("tap", help="present a card (and PIN) at a door's reader")
    t.add_argument("--door", required=True)
    t.add_argument("--card", required=True, type=int)
    t.add_argument("--format", help="card format, e.g. h10301 (default: the reader's first that fits)")
    t.add_argument("--facility", type=int)
    t.add_argument("--pin")
    dd = simsub.add_parser("door", help="open or close a door (its position switch)")
    dd.add_argument("action", choices=["open", "close"])
    dd.add_argument("--door", required=True)
    rx = simsub.add_parser("rex", help="press a door's exit button")
    rx.add_argument("--door", required=True)
    return p


COMMANDS = {
    "run": cmd_run, "check-config": cmd_check_config, "decide": cmd_decide, "status": cmd_status, "sim": cmd_sim,
}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.cmd](args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except EdgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
