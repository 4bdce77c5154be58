"""`cloud-bridge`: the operator side on the command line (see docs/operator.md).

    cloud-bridge --db site.db init --site s1 --admin root --host 127.0.0.1 --port 1883 --tz Europe/Berlin
    cloud-bridge --db site.db --operator root import users.csv
    cloud-bridge --db site.db --operator root publish

Every command runs as `--operator` and is checked against that operator's permissions. The site key's
passphrase comes from the CLOUD_BRIDGE_PASSPHRASE environment variable (never from the command line).
Exit status: 0 done, 1 refused or failed (the message says why), 2 usage.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path

from edge.errors import EdgeError

from .operator.csvimport import ImportFailed
from .operator.db import parse_card
from .operator.service import Service


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
    p = argparse.ArgumentParser(prog="cloud-bridge", description=__doc__.split("\n")[0])
    p.add_argument("--db", required=True, type=Path)
    p.add_argument("--operator", default=os.environ.get("CLOUD_BRIDGE_OPERATOR"))
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("init")
    s.add_argument("--site", required=True)
    s.add_argument("--admin", required=True)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=1883)
    s.add_argument("--tz", default="UTC")
    s = sub.add_parser("import")
    s.add_argument("csv", type=Path)
    s.add_argument("--no-publish", action="store_true")
    u = sub.add_parser("user").add_subparsers(dest="action", required=True)
    a = u.add_parser("add")
    a.add_argument("id")
    a.add_argument("--name", default="")
    a.add_argument("--card")
    a.add_argument("--group", action="append", default=[])
    a.add_argument("--offline-access", action="store_true")
    a.add_argument("--inactive", action="store_true")
    for name in ("activate", "deactivate", "delete"):
        u.add_parser(name).add_argument("id")
    g = sub.add_parser("group")
    g.add_argument("id")
    g.add_argument("--door", action="append", default=[], help="GATEWAY/DOOR (repeat)")
    g.add_argument("--schedule")
    g.add_argument("--tag", action="append", default=[])
    s = sub.add_parser("assign")
    s.add_argument("user")
    s.add_argument("group")
    s.add_argument("--from", dest="valid_from")
    s.add_argument("--until")
    v = sub.add_parser("visitor").add_subparsers(dest="action", required=True)
    a = v.add_parser("issue")
    a.add_argument("name")
    a.add_argument("--location", required=True)
    a.add_argument("--badge", required=True)
    a.add_argument("--group", action="append", required=True)
    v.add_parser("signout").add_argument("visit", type=int)
    b = sub.add_parser("badge-pool").add_subparsers(dest="action", required=True)
    a = b.add_parser("add")
    a.add_argument("location")
    a.add_argument("badge")
    a.add_argument("--name", default="")
    a.add_argument("--type", default="")
    s = sub.add_parser("unlock")
    s.add_argument("--gateway", required=True)
    s.add_argument("--door", required=True)
    s.add_argument("--seconds", type=float, default=5.0)
    for name in ("refresh", "test"):
        sub.add_parser(name).add_argument("--gateway", required=True)
    s = sub.add_parser("publish")
    s.add_argument("--timeout", type=float, default=60.0)
    s.add_argument("--wait-online", type=float, default=3.0)
    s = sub.add_parser("collect")
    s.add_argument("--group", default="collectors")
    o = sub.add_parser("operator").add_subparsers(dest="action", required=True)
    a = o.add_parser("add")
    a.add_argument("id")
    a.add_argument("--group", action="append", default=[])
    a = o.add_parser("grant")
    a.add_argument("id")
    a.add_argument("group")
    k = sub.add_parser("key").add_subparsers(dest="action", required=True)
    k.add_parser("rotate")
    k.add_parser("show")
    return p


async def run(args: argparse.Namespace) -> int:
    pw = os.environ.get("CLOUD_BRIDGE_PASSPHRASE")
    if args.cmd == "init":
        if not pw:
            raise EdgeError("set CLOUD_BRIDGE_PASSPHRASE: it encrypts the site's signing key")
        svc = Service.init(args.db, site=args.site, admin=args.admin, host=args.host, port=args.port, tz=args.tz,
                           passphrase=pw)  # fmt: skip
        print(f"site {args.site}: command key {svc.public_key_hex()} (set it as link.command_key on every gateway)")
        return 0
    if not args.operator:
        raise EdgeError("--operator is required (or CLOUD_BRIDGE_OPERATOR)")
    async with Service(args.db, operator=args.operator, passphrase=pw) as svc:
        c = args.cmd
        if c == "import":
            with args.csv.open(newline="") as f:
                rep = svc.import_csv(f, progress=_progress)
            print(rep.text())
            if not args.no_publish:
                print(_fmt(await svc.publish()))
        elif c == "user":
            if args.action == "add":
                card = parse_card(args.card) if args.card else None
                svc.add_user(args.id, name=args.name, card=card, groups=args.group,
                             offline_access=args.offline_access, active=not args.inactive)  # fmt: skip
            elif args.action in ("activate", "deactivate"):
                svc.set_active(args.id, args.action == "activate")
            else:
                svc.delete_user(args.id)
            print(f"user {args.id}: {args.action} (run `publish` to send)")
        elif c == "group":
            doors = [tuple(d.split("/", 1)) for d in args.door]
            if any(len(d) != 2 for d in doors):
                raise EdgeError("--door takes GATEWAY/DOOR")
            svc.put_group(args.id, [(d[0], d[1]) for d in doors], schedule=args.schedule, tags=args.tag)
        elif c == "assign":
            svc.assign(args.user, args.group, valid_from=_ts(args.valid_from), valid_until=_ts(args.until))
        elif c == "visitor":
            if args.action == "issue":
                vid, _uid, ends = svc.issue_visitor(args.name, location=args.location, badge=parse_card(args.badge),
                                                   groups=args.group)  # fmt: skip
                print(f"visit {vid}: badge {args.badge} for {args.name} until {datetime.fromtimestamp(ends)}")
            else:
                svc.sign_out(args.visit)
            print(_fmt(await svc.publish()))
        elif c == "badge-pool":
            svc.add_badge(args.location, args.badge, name=args.name, badge_type=args.type)
        elif c == "unlock":
            r = await svc.unlock(args.gateway, args.door, seconds=args.seconds)
            print("unlocked" if r.ok else f"refused by the gateway: {r.error}")
            return 0 if r.ok else 1
        elif c == "refresh":
            print(await svc.refresh(args.gateway))
        elif c == "test":
            b = await svc.test(args.gateway)
            print(f"gateway {args.gateway} answers: {b.software}, rights version {b.rights_version}")
        elif c == "publish":
            out = await svc.publish(timeout=args.timeout, wait_online_s=args.wait_online)
            print(_fmt(out))
            return 0 if all(isinstance(v, int) for v in out.values()) else 1
        elif c == "collect":
            from .operator.collector import Collector

            svc.require_collect()
            await Collector(svc.db, host=svc.host, port=svc.port, site=svc.site, group=args.group,
                            signing_key=svc.signing_key()).run()
        elif c == "operator":
            if args.action == "add":
                svc.add_operator(args.id, args.group)
            else:
                svc.grant(args.id, args.group)
        elif c == "key":
            if args.action == "rotate":
                rot = await svc.rotate_key(wait_online_s=2.0)
                state = "current" if rot.current else "pending: run again when every gateway is online"
                print(f"new command key {rot.public_key} ({rot.fingerprint}): {state}")
                print(_fmt(rot.gateways))
                return 0 if rot.current else 1
            else:
                print(svc.public_key_hex())
    return 0


def _fmt(out: Mapping[str, int | str]) -> str:
    return "\n".join(f"{gw}: {'version ' + str(v) if isinstance(v, int) else v}" for gw, v in sorted(out.items())) or (
        "no gateway online"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return asyncio.run(run(args))
    except ImportFailed as e:
        print(e.report.text(), file=sys.stderr)
        return 1
    except (EdgeError, OSError, ValueError) as e:
        print(f"cloud-bridge: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
