"""`cloud-bridge` as an operator uses it (issue 12): help for every command and option, results as lines or
JSON, and `publish` / `import` on a fresh site database finding the gateway by its retained birth (a real
Mosquitto, the real edge agent on the simulated gateway, the CLI as a separate process)."""

# ruff: noqa: F811

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

import aiomqtt
import pytest

from cloud_bridge.cli import main, parser
from cloud_bridge.operator.service import Service
from cloud_bridge.protocol import Birth, decode_status
from cloud_bridge.topics import Topics
from edge.agent import Agent

from .broker import broker  # noqa: F401
from .mosquitto import Mosquitto
from .test_operator_e2e import GW, PW, SITE, agent_running, sock_dir, tap_card  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent


def _parsers(p: argparse.ArgumentParser, path: str = "cloud-bridge") -> list[tuple[str, argparse.ArgumentParser]]:
    out = [(path, p)]
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sp in a.choices.items():
                out += _parsers(sp, f"{path} {name}")
    return out


def test_every_subcommand_and_option_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    missing = []
    for path, p in _parsers(parser()):
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                missing += [f"{path} {c.dest}" for c in a._choices_actions if not c.help]
                names = {c.dest for c in a._choices_actions}
                missing += [f"{path} {n} (not listed)" for n in a.choices if n not in names]
            elif not a.help:
                missing.append(f"{path} {'/'.join(a.option_strings) or a.dest}")
    assert missing == []
    with pytest.raises(SystemExit) as ei:
        main(["--help"])
    assert ei.value.code == 0
    top = " ".join(capsys.readouterr().out.split())  # whatever the terminal width
    for line in ("publish plan the pending changes and send them to every online gateway",
                 "refresh ask a gateway to announce itself again; list its doors and their groups",
                 "--json print the result as one JSON object instead of lines",
                 "CLOUD_BRIDGE_PASSPHRASE the passphrase that encrypts the site's signing key"):  # fmt: skip
        assert line in top, top
    with pytest.raises(SystemExit):
        main(["--db", "x.db", "import", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--encoding ENCODING the file's encoding when it is not UTF-8" in text, text
    assert "UTF-8 (with or without a BOM)" in text


async def cli(*args: str, db: Path) -> tuple[int, str, str]:
    """The CLI as its own process (as an operator runs it), with the site passphrase in its environment."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), CLOUD_BRIDGE_PASSPHRASE=PW)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cloud_bridge.cli", "--db", str(db), "--operator", "root", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    return int(proc.returncode or 0), out.decode(), err.decode()


async def retained_birth(broker: Mosquitto, agent: Agent) -> Birth:
    """The gateway's birth as the broker keeps it (a separate client that subscribes once the gateway is up)."""
    async with asyncio.timeout(20):
        while not agent.link_online:
            await asyncio.sleep(0.05)
    async with aiomqtt.Client(broker.host, broker.port, protocol=aiomqtt.ProtocolVersion.V5) as c:
        await c.subscribe(Topics(SITE, GW).status, qos=1)
        async with asyncio.timeout(20):
            async for m in c.messages:
                st = decode_status(m.payload if isinstance(m.payload, bytes) else b"")
                if isinstance(st, Birth):
                    assert m.retain
                    return st
    raise AssertionError("no birth")


def fresh_site(db: Path, broker: Mosquitto) -> Service:
    """A site database that has never seen a gateway: a group and a user, nothing else."""
    svc = Service.init(db, site=SITE, admin="root", host=broker.host, port=broker.port, tz="Europe/Berlin",
                       passphrase=PW)  # fmt: skip
    svc.put_group("staff", [(GW, "door1")])
    return svc


@pytest.mark.parametrize("command", ["publish", "import"])
async def test_publish_and_import_on_a_fresh_database_find_the_gateway_by_its_retained_birth(
    broker: Mosquitto, tmp_path: Path, sock_dir: Path, command: str
) -> None:
    """The reported bug: "no gateway online" although the gateway's retained birth is on the broker."""
    db = tmp_path / "site.db"
    svc = fresh_site(db, broker)
    csv = tmp_path / "users.csv"
    csv.write_text("id,name,card,groups\nalice,Alice,1001,staff\n")
    if command == "publish":
        svc.import_csv(csv.read_bytes())
    key = svc.public_key_hex()
    svc.close()
    async with agent_running(broker, tmp_path / "gw", sock_dir / "c.sock", key) as agent:
        await retained_birth(broker, agent)
        args = ("publish", "--wait-online", "0") if command == "publish" else ("import", str(csv))
        code, out, err = await cli(*args, db=db)
        assert code == 0, err
        assert out == ("" if command == "publish" else "1 users imported\n") + f"{GW}: version 1\n", out
        assert (await tap_card(agent, 1001)).granted

        # refresh: readable lines, or JSON
        code, out, err = await cli("refresh", "--gateway", GW, db=db)
        assert code == 0, err
        lines = out.splitlines()
        assert lines[0].startswith(f"gateway {GW}: software ") and lines[0].endswith(", 2 door(s)"), out
        assert [ln.split(":")[0] for ln in lines[1:]] == ["  door door1", "  door door2"], out
        assert lines[1].endswith(": groups staff") and lines[2].endswith(": no group opens it"), out
        assert "{" not in out  # not a Python dict
        code, out, err = await cli("--json", "refresh", "--gateway", GW, db=db)
        assert code == 0, err
        r = json.loads(out)
        assert r["gateway"] == GW and r["rights_version"] == 1
        assert [(d["id"], d["groups"]) for d in r["doors"]] == [("door1", ["staff"]), ("door2", [])]
        code, out, err = await cli("--json", "publish", db=db)
        assert code == 0 and json.loads(out) == {"gateways": {GW: {"version": 1}}, "not_sent": []}, (out, err)
