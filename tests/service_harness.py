"""The operator service for tests: a real uvicorn on a free loopback port, in the test's event loop, on the
database `db_url` gives (SQLite or PostgreSQL); clients talk real HTTP to it (httpx)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn

from cloud_bridge.service.app import create_app, init_site
from cloud_bridge.service.config import ServiceConfig, parse_config

from .mosquitto import free_port

PASSPHRASE = "correct horse battery"
PASSWORD = "a long enough password"


def config(db_url: str, tmp: Path, *, extra: str = "", port: int | None = None) -> ServiceConfig:
    (tmp / "passphrase").write_text(PASSPHRASE)
    # small argon2 parameters keep the tests quick; the defaults are RFC 9106's (docs/operator.md)
    return parse_config(f"""
passphrase_file = "{tmp / 'passphrase'}"
[service]
port = {port or free_port()}
[database]
url = "{db_url}"
[auth]
argon2_time_cost = 1
argon2_memory_kib = 8192
argon2_parallelism = 1
lockout_after = 3
lockout_base_s = 1.0
[mqtt]
workspace = "{tmp / 'link.db'}"
resend_s = 1.0
{extra}
""")


@dataclass
class Running:
    cfg: ServiceConfig
    url: str
    setup_link: str

    @property
    def setup_code(self) -> str:
        return self.setup_link.partition("#")[2]


@asynccontextmanager
async def running(cfg: ServiceConfig, *, provisioning: bool = False, broker_host: str = "127.0.0.1",
                  broker_port: int = 1883, init: bool = True) -> AsyncIterator[Running]:  # fmt: skip
    link = ""
    if init:
        link = await init_site(cfg, site_id="s1", admin="root", tz="Europe/Berlin", host=broker_host,
                               port=broker_port)  # fmt: skip
    server = uvicorn.Server(uvicorn.Config(create_app(cfg, provisioning=provisioning), host="127.0.0.1",
                                           port=cfg.service.port, log_level="warning", lifespan="on"))  # fmt: skip
    task = asyncio.get_running_loop().create_task(server.serve(), name="uvicorn")
    try:
        async with asyncio.timeout(30):
            while not server.started:
                if task.done():
                    task.result()
                    raise RuntimeError("uvicorn stopped")
                await asyncio.sleep(0.02)
        yield Running(cfg, f"http://127.0.0.1:{cfg.service.port}", link)
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)


async def login(client: httpx.AsyncClient, operator: str, password: str) -> str:
    """Log in; keeps the session cookie on `client` (sent by hand: the test talks http, the cookie is
    Secure) and returns the CSRF token."""
    r = await client.post("/api/v1/auth/login", json={"operator": operator, "password": password})
    assert r.status_code == 200, r.text
    value = r.cookies.get("cb_session") or r.headers["set-cookie"].split(";")[0].split("=", 1)[1]
    client.headers["cookie"] = f"cb_session={value}"
    csrf: str = r.json()["csrf_token"]
    client.headers["x-csrf-token"] = csrf
    return csrf


async def admin_client(svc: Running) -> httpx.AsyncClient:
    client = httpx.AsyncClient(base_url=svc.url, timeout=60)
    r = await client.post("/api/v1/auth/setup", json={"code": svc.setup_code, "password": PASSWORD})
    assert r.status_code == 200, r.text
    await login(client, "root", PASSWORD)
    return client
