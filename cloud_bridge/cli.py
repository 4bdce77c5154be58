"""`cloud-bridge`: the operator side on the command line (see docs/operator.md).

    cloud-bridge --db site.db init --site s1 --admin root --host 127.0.0.1 --port 1883 --tz Europe/Berlin
    cloud-bridge --db site.db --operator root import users.csv
    cloud-bridge --db site.db --operator root publish

Every command runs as `--operator` and is checked against that operator's permissions. The site key's
passphrase comes from the CLOUD_BRIDGE_PASSPHRASE environment variable (never from the command line).

Through the operator service instead of a site database file (docs/operator.md, "The CLI and the service"):

    CLOUD_BRIDGE_TOKEN=cbt_... cloud-bridge --service https://acs.example:8443 user add alice --card 1001
    cloud-bridge --config service.toml import users.csv       # locally, as the local administrator

user, group, assign, import, publish and operator go through the service's /api/v1 (its permissions,
validation and audit log); the other commands need --db.
Results are printed as lines for people, or with `--json` as one JSON object on stdout.
Exit status: 0 done, 1 refused or failed (the message says why), 2 usage.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from edge.errors import EdgeError

from .errors import CloudBridgeError
from .operator.csvimport import ImportFailed
from .operator.db import parse_card
from .operator.service import GatewayDoors, Service
from .protocol import OsdpOutput, OsdpRotateKey

EPILOG = """\
environment:
  CLOUD_BRIDGE_PASSPHRASE  the passphrase that encrypts the site's signing key (init, commands, publish)
  CLOUD_BRIDGE_OPERATOR    the default for --operator
  CLOUD_BRIDGE_TOKEN       the API token for --service

exit status: 0 done, 1 refused or failed (the message says why), 2 usage
"""


def _progress(done: int, total: int) -> None:
    if total < 5000:
        return
    width = 30
    filled = width * done // max(1, total)
    sys.stderr.write(f"\rvalidating [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
    if done >= total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def _ts(text: str | None) -> float | None:
    return None if text is None else datetime.fromisoformat(text).timestamp()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cloud-bridge", description="The operator side of the edge access controller: the site model, "
        "provisioning of the gateways over MQTT, signed commands and event collection.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("--db", type=Path, help="the site database (SQLite file; one site per file); not for serve")
    p.add_argument("--operator", default=os.environ.get("CLOUD_BRIDGE_OPERATOR"),
                   help="the operator this command runs as (default: $CLOUD_BRIDGE_OPERATOR)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the result as one JSON object instead of lines")
    p.add_argument("--service", metavar="URL", help="run the command through a running operator service, with the "
                   "API token in $CLOUD_BRIDGE_TOKEN")  # fmt: skip
    p.add_argument("--config", type=Path, metavar="FILE", help="run the command on the operator service's database "
                   "(its TOML file), as the local administrator")  # fmt: skip
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    s = sub.add_parser("init", help="create a site database with its signing key and a first administrator")
    s.add_argument("--site", required=True, help="the site id (the topic level acs/v1/<site>/...)")
    s.add_argument("--admin", required=True, help="the first operator, in System Administrator")
    s.add_argument("--host", default="127.0.0.1", help="the MQTT broker's host (default: %(default)s)")
    s.add_argument("--port", type=int, default=1883, help="the MQTT broker's port (default: %(default)s)")
    s.add_argument("--tz", default="UTC", help="the site's time zone, e.g. Europe/Berlin (default: %(default)s)")

    s = sub.add_parser("import", help="bulk load users and cards from a CSV file (all or nothing), then publish")
    s.add_argument("csv", type=Path, help="columns id, card (required), name, groups (;-separated), active, "
                   "offline_access; UTF-8 (with or without a BOM)")  # fmt: skip
    s.add_argument("--encoding", default="utf-8",
                   help="the file's encoding when it is not UTF-8, e.g. latin-1 or cp1252 (default: utf-8)")
    s.add_argument("--no-publish", action="store_true", help="import only; send to the gateways later (publish)")

    u = sub.add_parser("user", help="add, activate, deactivate or delete a user").add_subparsers(
        dest="action", required=True, metavar="ACTION")  # fmt: skip
    a = u.add_parser("add", help="add a user (and a card)")
    a.add_argument("id", help="user id: 1-64 letters, digits or _ . : @ -")
    a.add_argument("--name", default="", help="display name (at most 256 characters)")
    a.add_argument("--card", help="card number (decimal digits)")
    a.add_argument("--group", action="append", default=[], help="a group the user is assigned to (repeat)")
    a.add_argument("--offline-access", action="store_true", help="may open doors while the gateway is offline "
                   "(the flagged offline policy)")  # fmt: skip
    a.add_argument("--inactive", action="store_true", help="add the user with access control deactivated")
    for name, what in (("activate", "activate a user's access"), ("deactivate", "deactivate a user's access"),
                       ("delete", "delete a user (its cards become free)")):  # fmt: skip
        u.add_parser(name, help=what).add_argument("id", help="user id")

    g = sub.add_parser("group", help="create or replace a group: the doors it opens, its schedule and tags")
    g.add_argument("id", help="group id: 1-64 letters, digits or _ . : @ -")
    g.add_argument("--door", action="append", default=[], help="a door it opens, as GATEWAY/DOOR (repeat)")
    g.add_argument("--schedule", help="the id of the schedule that limits it (default: always)")
    g.add_argument("--tag", action="append", default=[], help="a tag for operator permissions (repeat)")

    s = sub.add_parser("assign", help="assign a user to a group, optionally for a time span")
    s.add_argument("user", help="user id")
    s.add_argument("group", help="group id")
    s.add_argument("--from", dest="valid_from", help="start, ISO 8601 (default: now)")
    s.add_argument("--until", help="end, ISO 8601 (default: for ever)")

    v = sub.add_parser("visitor", help="issue or sign out a visitor badge").add_subparsers(
        dest="action", required=True, metavar="ACTION")  # fmt: skip
    a = v.add_parser("issue", help="give a visitor a pool badge until the end of the local day, and publish")
    a.add_argument("name", help="the visitor's name")
    a.add_argument("--location", required=True, help="the badge pool's location")
    a.add_argument("--badge", required=True, help="the badge number (from that pool)")
    a.add_argument("--group", action="append", required=True, help="a group the visitor may use (repeat)")
    v.add_parser("signout", help="end a visit (the badge is free at once), and publish").add_argument(
        "visit", type=int, help="the visit number `visitor issue` printed")  # fmt: skip

    b = sub.add_parser("badge-pool", help="manage visitor badge pools").add_subparsers(
        dest="action", required=True, metavar="ACTION")  # fmt: skip
    a = b.add_parser("add", help="add a badge to a location's pool")
    a.add_argument("location", help="the pool's location")
    a.add_argument("badge", help="the badge number (decimal digits)")
    a.add_argument("--name", default="", help="a label for the badge")
    a.add_argument("--type", default="", help="the badge type, e.g. temporary")

    s = sub.add_parser("unlock", help="unlock a door remotely (a signed command)")
    s.add_argument("--gateway", required=True, help="gateway id")
    s.add_argument("--door", required=True, help="door id on that gateway")
    s.add_argument("--seconds", type=float, default=5.0, help="how long the door stays unlocked (default: 5)")

    o = sub.add_parser("osdp", help="OSDP reader commands (signed): key rotation, an output, firmware").add_subparsers(
        dest="action", required=True, metavar="ACTION")  # fmt: skip
    for name, what in (("rotate-key", "move a reader to a new Secure Channel key (made on the gateway)"),
                       ("output", "switch a reader's output (osdp_OUT), e.g. its aux relay"),
                       ("firmware", "send a file (the reader's firmware) to a reader")):  # fmt: skip
        a = o.add_parser(name, help=what)
        a.add_argument("--gateway", required=True, help="gateway id")
        a.add_argument("--reader", required=True, help="the reader's name on that gateway")
        if name == "output":
            a.add_argument("--output", type=int, default=0, help="output number (default: 0)")
            a.add_argument("--off", action="store_true", help="switch it off (default: on)")
            a.add_argument("--seconds", type=float, help="on for this long, then off")
        if name == "firmware":
            a.add_argument("file", type=Path, help="the file")
            a.add_argument("--file-type", type=int, default=1, help="osdp_FILETRANSFER file type (default: 1)")

    s = sub.add_parser("refresh", help="ask a gateway to announce itself again; list its doors and their groups")
    s.add_argument("--gateway", required=True, help="gateway id")
    s = sub.add_parser("test", help="check that a gateway answers (it announces itself again)")
    s.add_argument("--gateway", required=True, help="gateway id")

    s = sub.add_parser("publish", help="plan the pending changes and send them to every online gateway")
    s.add_argument("--timeout", type=float, default=60.0,
                   help="seconds to wait for each gateway's acknowledgement (default: 60)")  # fmt: skip
    s.add_argument("--wait-online", type=float, default=3.0,
                   help="seconds to wait for known gateways that are not online yet (default: 3)")  # fmt: skip

    s = sub.add_parser("collect", help="collect the gateways' events into the database (runs until stopped)")
    s.add_argument("--group", default="collectors",
                   help="the MQTT shared-subscription group: collectors in one group split the load")
    s.add_argument("--relay-areas", action="store_true",
                   help="relay each gateway's area passages to the site's other gateways (cross-gateway "
                        "anti-passback, docs/model.md)")  # fmt: skip

    o = sub.add_parser("operator", help="add operators and grant them permission groups").add_subparsers(
        dest="action", required=True, metavar="ACTION")  # fmt: skip
    a = o.add_parser("add", help="add an operator")
    a.add_argument("id", help="operator id")
    a.add_argument("--group", action="append", default=[], help="a permission group (repeat)")
    a = o.add_parser("grant", help="add a permission group to an operator")
    a.add_argument("id", help="operator id")
    a.add_argument("group", help="permission group id")

    k = sub.add_parser("key", help="the site's command signing key").add_subparsers(
        dest="action", required=True, metavar="ACTION")  # fmt: skip
    k.add_parser("rotate", help="rotate the command key in band (every online gateway moves over)")
    k.add_parser("show", help="print the public command key (link.command_key on the gateways)")

    s = sub.add_parser("serve", help="run the operator service (HTTP API; docs/operator.md)")
    s.add_argument("config", type=Path, help="the service's TOML file")
    s.add_argument("--init", action="store_true", help="create the site in the service's database and print "
                   "the first administrator's one-time setup link, then exit")  # fmt: skip
    s.add_argument("--site", help="with --init: the site id")
    s.add_argument("--admin", default="admin", help="with --init: the first operator (default: %(default)s)")
    s.add_argument("--tz", default="UTC", help="with --init: the site's time zone (default: %(default)s)")
    s.add_argument("--mqtt-host", default="127.0.0.1", help="with --init: the broker's host (default: %(default)s)")
    s.add_argument("--mqtt-port", type=int, default=1883, help="with --init: the broker's port (default: %(default)s)")
    s.add_argument("--import", dest="import_from", type=Path,
                   help="with --init: migrate this existing site database (cloud-bridge init) instead")
    s.add_argument("--setup-code", metavar="OPERATOR", help="print a new one-time setup link for OPERATOR, then exit")

    s = sub.add_parser("demo", help="run the whole product on this machine, on loopback: a broker, the operator "
                       "service and its console, a simulated gateway it provisions (Ctrl-C stops all)")  # fmt: skip
    s.add_argument("--dir", type=Path, default=Path("var/demo"),
                   help="the demo's folder, wiped at each start (default: %(default)s)")  # fmt: skip
    s.add_argument("--exit-after-taps", action="store_true",
                   help="stop everything after the scripted taps (exit status 1 if one was not as expected)")
    s.add_argument("--no-taps", action="store_true", help="do not tap the scripted demo cards")
    return p


class Output:
    """Collects a command's result: `line()` for people, `data` for --json; printed once at the end."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.data: dict[str, Any] = {}
        self.lines: list[str] = []

    def line(self, text: str) -> None:
        self.lines.append(text)

    def flush(self) -> None:
        if self.as_json:
            print(json.dumps(self.data, indent=2, sort_keys=True))
        elif self.lines:
            print("\n".join(self.lines))


def _published(out: Output, result: Mapping[str, int | str], refused: Sequence[str]) -> bool:
    out.data["gateways"] = {gw: ({"version": v} if isinstance(v, int) else {"error": v}) for gw, v in result.items()}
    out.data["not_sent"] = list(refused)
    for gw, v in sorted(result.items()):
        out.line(f"{gw}: version {v}" if isinstance(v, int) else f"{gw}: {v}")
    if not result:
        out.line("no gateway online")
    for r in refused:
        out.line(f"not sent: {r}")
    return all(isinstance(v, int) for v in result.values()) and not refused


def _doors(out: Output, r: GatewayDoors) -> None:
    out.data = dataclasses.asdict(r)
    out.line(f"gateway {r.gateway}: software {r.software}, rights version {r.rights_version}, "
             f"{len(r.doors)} door(s)")  # fmt: skip
    for d in r.doors:
        name = f" ({d.name})" if d.name and d.name != d.id else ""
        out.line(f"  door {d.id}{name}: " + (f"groups {', '.join(d.groups)}" if d.groups else "no group opens it"))
    for u in r.unknown_doors:
        out.line(f"  door {u}: named by a group but not announced by the gateway")


async def serve_setup(args: argparse.Namespace, out: Output) -> int:
    """`serve --init` / `serve --setup-code`: prepare the service's database, print a one-time setup link."""
    from .service import site
    from .service.app import init_site
    from .service.config import load_config
    from .service.database import Database

    cfg = load_config(args.config)
    if args.init:
        if not args.site and args.import_from is None:
            raise EdgeError("serve --init needs --site (or --import)")
        link = await init_site(cfg, site_id=args.site or "", admin=args.admin, tz=args.tz, host=args.mqtt_host,
                               port=args.mqtt_port, import_from=args.import_from)  # fmt: skip
        who = args.admin
    else:
        db = Database(cfg.database.url)
        try:
            await db.migrate()
            code = await site.setup_code_for(db, args.setup_code, hours=cfg.auth.setup_code_hours)
        finally:
            await db.close()
        base = cfg.service.public_url.rstrip("/") or f"http://{cfg.service.listen}:{cfg.service.port}"
        link, who = f"{base}/setup#{code}", args.setup_code
    out.data = {"operator": who, "setup_link": link}
    out.line(f"one-time setup link for operator {who} (valid {cfg.auth.setup_code_hours:g} h): {link}")
    out.line("POST its code with a password to /api/v1/auth/setup; it works once.")
    return 0


async def run(args: argparse.Namespace, out: Output) -> int:
    pw = os.environ.get("CLOUD_BRIDGE_PASSPHRASE")
    if args.cmd == "serve":
        return await serve_setup(args, out)
    if args.service or args.config:
        return await through_service(args, out)
    if args.db is None:
        raise EdgeError("--db is required")
    if args.cmd == "init":
        if not pw:
            raise CloudBridgeError("set CLOUD_BRIDGE_PASSPHRASE: it encrypts the site's signing key")
        svc = Service.init(args.db, site=args.site, admin=args.admin, host=args.host, port=args.port, tz=args.tz,
                           passphrase=pw)  # fmt: skip
        out.data = {"site": args.site, "command_key": svc.public_key_hex()}
        out.line(f"site {args.site}: command key {svc.public_key_hex()} (set it as link.command_key on every gateway)")
        return 0
    if not args.operator:
        raise CloudBridgeError("--operator is required (or CLOUD_BRIDGE_OPERATOR)")
    async with Service(args.db, operator=args.operator, passphrase=pw) as svc:
        c = args.cmd
        if c == "import":
            rep = svc.import_csv(args.csv.read_bytes(), encoding=args.encoding, progress=_progress)
            out.data["imported"] = rep.imported
            out.line(rep.text())
            if not args.no_publish:
                return 0 if _published(out, await svc.publish(), svc.not_sent) else 1
        elif c == "user":
            if args.action == "add":
                card = parse_card(args.card) if args.card else None
                svc.add_user(args.id, name=args.name, card=card, groups=args.group,
                             offline_access=args.offline_access, active=not args.inactive)  # fmt: skip
            elif args.action in ("activate", "deactivate"):
                svc.set_active(args.id, args.action == "activate")
            else:
                svc.delete_user(args.id)
            out.data = {"user": args.id, "action": args.action}
            out.line(f"user {args.id}: {args.action} (run `publish` to send)")
        elif c == "group":
            doors = [tuple(d.split("/", 1)) for d in args.door]
            if any(len(d) != 2 for d in doors):
                raise CloudBridgeError("--door takes GATEWAY/DOOR")
            svc.put_group(args.id, [(d[0], d[1]) for d in doors], schedule=args.schedule, tags=args.tag)
            out.data = {"group": args.id, "doors": args.door}
            out.line(f"group {args.id}: {len(doors)} door(s) (run `publish` to send)")
        elif c == "assign":
            n = svc.assign(args.user, args.group, valid_from=_ts(args.valid_from), valid_until=_ts(args.until))
            out.data = {"assignment": n, "user": args.user, "group": args.group}
            out.line(f"assignment {n}: user {args.user} in group {args.group} (run `publish` to send)")
        elif c == "visitor":
            if args.action == "issue":
                vid, uid, ends = svc.issue_visitor(args.name, location=args.location, badge=parse_card(args.badge),
                                                   groups=args.group)  # fmt: skip
                out.data = {"visit": vid, "user": uid, "until": datetime.fromtimestamp(ends).isoformat()}
                out.line(f"visit {vid}: badge {args.badge} for {args.name} until {datetime.fromtimestamp(ends)}")
            else:
                svc.sign_out(args.visit)
                out.data = {"visit": args.visit, "signed_out": True}
                out.line(f"visit {args.visit}: signed out")
            return 0 if _published(out, await svc.publish(), svc.not_sent) else 1
        elif c == "badge-pool":
            n = svc.add_badge(args.location, args.badge, name=args.name, badge_type=args.type)
            out.data = {"location": args.location, "badge": n}
            out.line(f"badge {n} added to the pool of {args.location}")
        elif c == "unlock":
            r = await svc.unlock(args.gateway, args.door, seconds=args.seconds)
            out.data = {"ok": r.ok, "error": None if r.error is None else {"code": r.error.code,
                                                                         "message": r.error.message}}  # fmt: skip
            out.line(f"{args.gateway}/{args.door}: unlocked" if r.ok else f"refused by the gateway: {r.error}")
            return 0 if r.ok else 1
        elif c == "osdp":
            if args.action == "firmware":
                r = await svc.send_firmware(args.gateway, args.reader, args.file.read_bytes(),
                                            file_type=args.file_type, progress=_progress)  # fmt: skip
            elif args.action == "output":
                r = await svc.reader_command(args.gateway, OsdpOutput(reader=args.reader, output=args.output,
                                                                      on=not args.off, seconds=args.seconds))
            else:
                r = await svc.reader_command(args.gateway, OsdpRotateKey(reader=args.reader))
            err = None if r.error is None else {"code": r.error.code, "message": r.error.message}
            out.data = {"ok": r.ok, "error": err, "detail": r.detail}
            what = ", ".join(f"{k} {v}" for k, v in r.detail.items())
            out.line(f"{args.gateway}/{args.reader}: {what}" if r.ok else f"refused by the gateway: {r.error}")
            return 0 if r.ok else 1
        elif c == "refresh":
            _doors(out, await svc.refresh(args.gateway))
        elif c == "test":
            b = await svc.test(args.gateway)
            out.data = {"gateway": args.gateway, "software": b.software, "rights_version": b.rights_version}
            out.line(f"gateway {args.gateway} answers: {b.software}, rights version {b.rights_version}")
        elif c == "publish":
            res = await svc.publish(timeout=args.timeout, wait_online_s=args.wait_online)
            return 0 if _published(out, res, svc.not_sent) else 1
        elif c == "collect":
            from .operator.collector import Collector

            svc.require_collect()
            collector = Collector(svc.db, host=svc.host, port=svc.port, site=svc.site, group=args.group,
                                  signing_key=svc.signing_key())  # fmt: skip
            if not args.relay_areas:
                await collector.run()
            else:
                from .relay import AreaRelay

                async with AreaRelay.over_site_link(await svc.link(), svc.signing_key(), svc.db.gateways()) as relay:
                    collector.on_batch.append(relay.observe)
                    await collector.run()
        elif c == "operator":
            if args.action == "add":
                svc.add_operator(args.id, args.group)
            else:
                svc.grant(args.id, args.group)
            out.data = {"operator": args.id, "action": args.action}
            out.line(f"operator {args.id}: {'added' if args.action == 'add' else 'granted ' + args.group}")
        elif c == "key":
            if args.action == "rotate":
                rot = await svc.rotate_key(wait_online_s=2.0)
                out.data = dataclasses.asdict(rot)
                state = "current" if rot.current else "pending: run again when every gateway is online"
                out.line(f"new command key {rot.public_key} ({rot.fingerprint}): {state}")
                out.lines += [f"{gw}: {v}" for gw, v in sorted(rot.gateways.items())]
                return 0 if rot.current else 1
            out.data = {"command_key": svc.public_key_hex(), "key_id": svc.key_id()}
            out.line(svc.public_key_hex())
    return 0


SERVICE_COMMANDS = ("user", "group", "assign", "import", "publish", "operator", "visitor", "badge-pool", "unlock",
                    "refresh", "test", "key")  # fmt: skip


async def _api(c: Any, method: str, path: str, **kw: Any) -> Any:
    from .service.cli_client import detail

    r = await c.request(method, path, **kw)
    if r.status_code >= 400:
        raise CloudBridgeError(f"{method} {path}: {detail(r)}")
    return r.json()


async def through_service(args: argparse.Namespace, out: Output) -> int:
    """A command as requests to the operator service's /api/v1 (remote with a token, or local)."""
    from .service.cli_client import service_client

    if args.service and args.config:
        raise EdgeError("give --service or --config, not both")
    if args.cmd not in SERVICE_COMMANDS or (args.cmd == "key" and args.action != "show"):
        what = "key rotate" if args.cmd == "key" else args.cmd
        raise EdgeError(f"{what} is not available through the service yet: use --db")
    token = os.environ.get("CLOUD_BRIDGE_TOKEN")
    async with service_client(url=args.service, token=token, config=args.config) as c:
        cmd = args.cmd
        if cmd == "user":
            uid = quote(args.id, safe="")
            if args.action == "add":
                body: dict[str, Any] = {"id": args.id, "name": args.name, "groups": args.group,
                                        "offline_access": args.offline_access, "active": not args.inactive}  # fmt: skip
                if args.card:
                    body["cards"] = [{"card": parse_card(args.card)}]
                out.data = await _api(c, "POST", "/api/v1/users", json=body)
            elif args.action in ("activate", "deactivate"):
                out.data = await _api(c, "PATCH", f"/api/v1/users/{uid}", json={"active": args.action == "activate"})
            else:
                out.data = await _api(c, "DELETE", f"/api/v1/users/{uid}")
            out.line(f"user {args.id}: {args.action} (run `publish` to send)")
        elif cmd == "group":
            doors = [d.split("/", 1) for d in args.door]
            if any(len(d) != 2 for d in doors):
                raise CloudBridgeError("--door takes GATEWAY/DOOR")
            out.data = await _api(c, "PUT", f"/api/v1/groups/{quote(args.id, safe='')}", json={
                "schedule": args.schedule, "tags": args.tag,
                "doors": [{"gateway": g, "door": d} for g, d in doors]})  # fmt: skip
            out.line(f"group {args.id}: {len(doors)} door(s) (run `publish` to send)")
        elif cmd == "assign":
            out.data = await _api(c, "POST", f"/api/v1/users/{quote(args.user, safe='')}/assignments", json={
                "group": args.group, "valid_from": _ts(args.valid_from), "valid_until": _ts(args.until)})  # fmt: skip
            out.line(f"assignment {out.data['id']}: user {args.user} in group {args.group} (run `publish` to send)")
        elif cmd == "import":
            return await _import_through_service(c, args, out)
        elif cmd == "publish":
            res = await _api(c, "POST", "/api/v1/publish", params={"timeout": args.timeout})
            return 0 if _published(out, res["gateways"], res["not_sent"]) else 1
        elif cmd == "operator":
            oid = quote(args.id, safe="")
            if args.action == "add":
                body = {"groups": args.group}
            else:
                have = await _api(c, "GET", f"/api/v1/operators/{oid}")
                groups = [*have["groups"], *([args.group] if args.group not in have["groups"] else [])]
                body = {"name": have["name"], "active": have["active"], "groups": groups}
            out.data = await _api(c, "PUT", f"/api/v1/operators/{oid}", json=body)
            out.line(f"operator {args.id}: {'added' if args.action == 'add' else 'granted ' + args.group}")
            if out.data.get("setup_code"):
                out.line(f"one-time setup code (POST it with a password to /api/v1/auth/setup): "
                         f"{out.data['setup_code']}")  # fmt: skip
        else:
            return await _more_through_service(c, args, out)
    return 0


async def _more_through_service(c: Any, args: argparse.Namespace, out: Output) -> int:
    """visitor, badge-pool, unlock, refresh, test and key show as requests to /api/v1."""
    cmd = args.cmd
    if cmd == "visitor":
        if args.action == "issue":
            r = await _api(c, "POST", "/api/v1/visitors/visits", json={
                "visitor": args.name, "location": args.location, "badge": parse_card(args.badge),
                "groups": args.group})  # fmt: skip
            v = r["visit"]
            out.line(f"visit {v['id']}: badge {args.badge} for {args.name} until {datetime.fromtimestamp(v['ends'])}")
        else:
            r = await _api(c, "POST", f"/api/v1/visitors/visits/{int(args.visit)}/sign-out")
            out.line(f"visit {args.visit}: signed out")
        out.data = r
        if r["published"] is None:
            out.line("not published: the service runs no site link (no site passphrase); publish later")
            return 1
        return 0 if _published(out, r["published"], r["not_sent"]) else 1
    if cmd == "badge-pool":
        out.data = await _api(c, "PUT", f"/api/v1/visitors/badges/{parse_card(args.badge)}", json={
            "location": args.location, "name": args.name, "type": args.type})  # fmt: skip
        out.line(f"badge {out.data['card']} added to the pool of {args.location}")
        return 0
    gw = quote(getattr(args, "gateway", "") or "", safe="")
    if cmd == "unlock":
        r = await _api(c, "POST", f"/api/v1/doors/{gw}/{quote(args.door, safe='')}/unlock",
                       json={"seconds": args.seconds})  # fmt: skip
        out.data = {"ok": r["ok"], "error": r.get("error")}
        out.line(f"{args.gateway}/{args.door}: unlocked" if r["ok"] else f"refused by the gateway: {r.get('error')}")
        return 0 if r["ok"] else 1
    if cmd in ("refresh", "test"):
        r = await _api(c, "POST", f"/api/v1/gateways/{gw}/{cmd}")
        out.data = r
        t = r["test"] if cmd == "refresh" else r
        if not t["ok"]:
            out.line(f"gateway {args.gateway} refused: {t.get('error')}")
            return 1
        if cmd == "test":
            out.line(f"gateway {args.gateway} answers in {t['round_trip_ms']:.0f} ms")
        else:
            ln = r["link"]
            out.line(f"gateway {args.gateway}: software {ln['software']}, rights version {ln['rights_version']}")
        return 0
    site = (await _api(c, "GET", "/api/v1/sites"))[0]  # key show
    if not site.get("command_key"):
        raise CloudBridgeError("the service has not opened the site key (no passphrase given to it)")
    out.data = {"command_key": site["command_key"], "key_fingerprint": site["key_fingerprint"]}
    out.line(site["command_key"])
    return 0


async def _import_through_service(c: Any, args: argparse.Namespace, out: Output) -> int:
    """Upload, dry-run with the file's own column names, commit (and publish): all rows or none."""
    job = await _api(c, "POST", "/api/v1/imports", content=args.csv.read_bytes(),
                     params={"filename": args.csv.name, "encoding": args.encoding},
                     headers={"content-type": "text/csv"})  # fmt: skip
    cols = {f: f for f in ("id", "card", "name", "groups", "active", "offline_access") if f in job["columns"]}
    jid = job["id"]
    await _api(c, "POST", f"/api/v1/imports/{jid}/dry-run", json={"columns": cols})
    job = await _wait_job(c, jid)
    if job["state"] == "validated":
        await _api(c, "POST", f"/api/v1/imports/{jid}/commit", json={"publish": not args.no_publish})
        job = await _wait_job(c, jid)
    rep = job.get("report") or {}
    if job["state"] != "done":
        problems = [f"line {p['row']}: {p['field']}: {p['message']}" for p in rep.get("problems", [])]
        out.data = {"imported": 0, "problems": problems, "error": job.get("error")}
        out.line(f"nothing imported: {rep.get('problem_count', 0)} problem(s) in the file" + (
            f" ({job['error']})" if job.get("error") else ""))  # fmt: skip
        out.lines += [f"  {p}" for p in problems[:50]]
        return 1
    out.data = {"imported": job["result"]["imported"]}
    out.line(f"{job['result']['imported']} users imported")
    if "published" in job["result"]:
        pub = job["result"]["published"]
        return 0 if _published(out, pub, []) else 1
    return 0


async def _wait_job(c: Any, jid: str) -> Any:
    while True:
        job = await _api(c, "GET", f"/api/v1/imports/{jid}")
        if job["state"] not in ("validating", "committing", "publishing"):
            return job
        _progress(int(job["progress"]["done"]), max(int(job["progress"]["total"]), 1))
        await asyncio.sleep(0.2)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    out = Output(args.json)
    if args.cmd == "demo":
        from .service.demo import main as demo

        try:
            return demo(args.dir, exit_after_taps=args.exit_after_taps, taps=not args.no_taps)
        except (EdgeError, OSError) as e:
            print(f"cloud-bridge: {e}", file=sys.stderr)
            return 1
    if args.cmd == "serve" and not args.init and not args.setup_code:
        from .service.app import serve
        from .service.config import load_config

        try:
            serve(load_config(args.config))
        except (EdgeError, OSError) as e:
            print(f"cloud-bridge: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130
        return 0
    try:
        code = asyncio.run(run(args, out))
    except ImportFailed as e:
        if args.json:
            print(json.dumps({"imported": 0, "problems": [str(p) for p in e.report.problems]}, indent=2))
        print(e.report.text(), file=sys.stderr)
        return 1
    except (EdgeError, OSError, ValueError) as e:
        print(f"cloud-bridge: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    out.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
