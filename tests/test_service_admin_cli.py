"""`cloud-bridge` through the operator service on both databases: against a running service with an API
token (its permissions, its refusals), and locally on the service's database as the local administrator
(stated as such in the audit log); import through the service all or nothing."""

# ruff: noqa: F811

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from cloud_bridge.service.config import load_config

from .mosquitto import free_port
from .postgres import db_url, postgres_server  # noqa: F401
from .service_harness import PASSPHRASE, admin_client, running


def write_config(db_url: str, tmp: Path) -> Path:
    (tmp / "passphrase").write_text(PASSPHRASE)
    path = tmp / "service.toml"
    path.write_text(f"""
passphrase_file = "{tmp / "passphrase"}"
[service]
port = {free_port()}
[database]
url = "{db_url}"
[auth]
argon2_time_cost = 1
argon2_memory_kib = 8192
argon2_parallelism = 1
[mqtt]
workspace = "{tmp / "link.db"}"
""")
    return path


async def cli(*args: str, token: str | None = None) -> tuple[int, Any, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CLOUD_BRIDGE_TOKEN", "CLOUD_BRIDGE_PASSPHRASE")}
    if token:
        env["CLOUD_BRIDGE_TOKEN"] = token
    argv = [sys.executable, "-m", "cloud_bridge.cli", "--json", *args]
    pipe = asyncio.subprocess.PIPE
    p = await asyncio.create_subprocess_exec(*argv, env=env, stdout=pipe, stderr=pipe)
    out, err = await asyncio.wait_for(p.communicate(), 120)
    assert p.returncode is not None
    text = out.decode()
    return p.returncode, json.loads(text) if text.strip().startswith("{") else text, err.decode()


async def test_cli_remote_with_a_token_and_local_as_the_local_administrator(db_url: str, tmp_path: Path) -> None:
    path = write_config(db_url, tmp_path)
    async with running(load_config(path)) as svc:
        admin = await admin_client(svc)
        tok = (await admin.post("/api/v1/tokens", json={"name": "cli"})).json()
        token, tid = tok["token"], tok["id"]
        remote = ("--service", svc.url)

        code, out, err = await cli(*remote, "group", "staff", "--door", "gw1/door1", token=token)
        assert code == 0, err
        assert out["doors"] == [{"gateway": "gw1", "door": "door1"}]
        assert (await admin.put("/api/v1/groups/night", json={})).status_code == 200
        code, out, err = await cli(*remote, "user", "add", "alice", "--card", "1001", "--group", "staff", token=token)
        assert code == 0 and out["cards"][0]["card"] == 1001, err
        code, out, err = await cli(*remote, "assign", "alice", "night", "--from", "2030-01-01T08:00+01:00",
                                   "--until", "2030-02-01T08:00+01:00", token=token)  # fmt: skip
        assert code == 0 and out["group"] == "night" and out["valid_from"] == 1893481200.0, err
        # the API's refusals, named: a card taken, no token, a token that manages no operators
        code, _, err = await cli(*remote, "user", "add", "bob", "--card", "1001", token=token)
        assert code == 1 and "card 1001 is already assigned to user 'alice'" in err
        code, _, err = await cli(*remote, "user", "add", "bob")
        assert code == 1 and "CLOUD_BRIDGE_TOKEN" in err
        code, _, err = await cli(*remote, "user", "add", "bob", token=token[:-3] + "xyz")
        assert code == 1 and "401" in err
        code, _, err = await cli(*remote, "operator", "add", "clerk", token=token)
        assert code == 1 and "login session" in err
        code, _, err = await cli(*remote, "key", "rotate", token=token)
        assert code == 1 and "key rotate is not available through the service" in err
        # the commands that used to be --db only: the service's answers (this service runs no site link)
        code, _, err = await cli(*remote, "unlock", "--gateway", "gw1", "--door", "door1", token=token)
        assert code == 1 and "POST /api/v1/doors/gw1/door1/unlock: 404" in err and "no door 'door1'" in err, err
        code, _, err = await cli(*remote, "test", "--gateway", "gw1", token=token)
        assert code == 1 and "POST /api/v1/gateways/gw1/test: " in err, err
        code, out, err = await cli(*remote, "badge-pool", "add", "lobby", "5001", "--name", "V1", token=token)
        assert code == 0 and out["card"] == 5001 and out["location"] == "lobby", err
        code, _, err = await cli(*remote, "badge-pool", "add", "lobby", "1001", token=token)
        assert code == 1 and "1001" in err  # alice's card: never a pool badge

        # locally, on the service's database, as the local administrator
        local = ("--config", str(path))
        code, out, err = await cli(*local, "user", "deactivate", "alice")
        assert code == 0 and out["active"] is False, err
        code, out, err = await cli(*local, "operator", "add", "clerk", "--group", "system-administrator")
        assert code == 0 and out["setup_code"], err
        (tmp_path / "bad.csv").write_text("id,card,groups\ncarol,2001,staff\ndave,1001,staff\n")
        code, out, err = await cli(*local, "import", str(tmp_path / "bad.csv"), "--no-publish")
        assert code == 1 and out["imported"] == 0, err
        assert out["problems"] == ["line 3: card: card 1001 is already assigned to user 'alice'"]
        assert (await admin.get("/api/v1/users/carol")).status_code == 404  # nothing applied
        (tmp_path / "good.csv").write_text("id,card,groups,name\ncarol,2001,staff,Carol\ndave,2002,night,Dave\n")
        code, out, err = await cli(*local, "import", str(tmp_path / "good.csv"), "--no-publish")
        assert code == 0 and out["imported"] == 2, err
        assert (await admin.get("/api/v1/users/dave")).json()["groups"] == ["night"]
        code, out, err = await cli(*remote, "user", "delete", "dave", token=token)
        assert code == 0, err
        code, out, err = await cli(*local, "visitor", "issue", "Vera", "--location", "lobby", "--badge", "5001",
                                   "--group", "staff")  # fmt: skip
        assert code == 1 and out["visit"]["badge"] == 5001 and out["published"] is None, err  # no link: not sent
        vid = out["visit"]["id"]
        code, out, err = await cli(*local, "visitor", "signout", str(vid))
        assert code == 1 and out["visit"]["state"] == "signed_out", err
        code, out, err = await cli(*local, "key", "show")
        assert code == 0 and len(out["command_key"]) == 64, err

        audit = (await admin.get("/api/v1/audit", params={"limit": 200})).json()["items"]
        by = {(e["action"], e["object_id"]): e for e in audit if e["outcome"] == "ok"}
        assert by[("user.create", "alice")]["via"] == f"token:{tid}" and by[("user.create", "alice")]["actor"] == "root"
        for key in (("user.update", "alice"), ("operator.create", "clerk"), ("user.import", "good.csv"),
                    ("visit.sign_in", str(vid)), ("visit.sign_out", str(vid))):
            assert by[key]["actor"] == "local administrator" and by[key]["via"] == "local", by[key]
        assert by[("user.delete", "dave")]["via"] == f"token:{tid}"
        await admin.aclose()
