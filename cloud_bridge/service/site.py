"""A site in the service's database: created by `cloud-bridge serve --init` (or imported), read at start.

The meta keys are those of `cloud_bridge/operator/db.py` (site, tz, host, port, site_key: the Ed25519
signing key, PKCS#8 PEM encrypted with the site passphrase), so an imported site database works as it was.
The first administrator has no password: `init` returns a one-time setup code (`auth.new_setup_code`).
"""

from __future__ import annotations

from dataclasses import dataclass
from zoneinfo import ZoneInfo

import msgspec
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from cloud_bridge.permissions import SYSTEM_ADMINISTRATOR, Operator
from cloud_bridge.topics import check_name

from . import audit, auth, schema
from .database import Database
from .errors import Conflict, ServiceError


@dataclass(frozen=True)
class SiteInfo:
    site: str
    tz: str
    host: str
    port: int


def encrypt_key(key: Ed25519PrivateKey, passphrase: str) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(passphrase.encode()),
    ).decode()  # fmt: skip


def decrypt_key(pem: str, passphrase: str) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(pem.encode(), passphrase.encode())
    except (ValueError, TypeError):
        raise ServiceError("wrong passphrase for the site key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ServiceError("the site key is not an Ed25519 key")
    return key


async def meta(c: AsyncConnection, key: str) -> str | None:
    v = (await c.execute(select(schema.meta.c.value).where(schema.meta.c.key == key))).scalar()
    return None if v is None else str(v)


async def load(db: Database) -> SiteInfo | None:
    async with db.read() as c:
        site = await meta(c, "site")
        if site is None:
            return None
        return SiteInfo(site=site, tz=await meta(c, "tz") or "UTC", host=await meta(c, "host") or "127.0.0.1",
                        port=int(await meta(c, "port") or 1883))  # fmt: skip


async def create(db: Database, *, site: str, admin: str, passphrase: str, host: str = "127.0.0.1",
                 port: int = 1883, tz: str = "UTC", setup_hours: float = 24.0) -> str:  # fmt: skip
    """Create the site with its signing key and a first operator in System Administrator, without a
    password. Returns that operator's one-time setup code."""
    check_name("site", site)
    try:
        ZoneInfo(tz)
    except (ValueError, KeyError):
        raise ServiceError(f"unknown time zone {tz!r}") from None
    if not passphrase:
        raise ServiceError("a passphrase is needed: it encrypts the site's signing key (CLOUD_BRIDGE_PASSPHRASE)")
    async with db.write() as c:
        if (have := await meta(c, "site")) is not None:
            raise Conflict(f"the database already holds site {have!r}")
        key = encrypt_key(Ed25519PrivateKey.generate(), passphrase)
        await c.execute(schema.meta.insert(), [{"key": k, "value": v} for k, v in (
            ("site", site), ("tz", tz), ("host", host), ("port", str(port)), ("site_key", key))])  # fmt: skip
        op = Operator(id=admin, groups=[SYSTEM_ADMINISTRATOR.id])
        await c.execute(schema.operators.insert().values(id=admin, body=msgspec.json.encode(op)))
        await audit.record(c, "local administrator", "site.create", "site", site, after={"site": site, "admin": admin},
                           via="local")  # fmt: skip
        return await auth.new_setup_code(c, admin, hours=setup_hours)


async def setup_code_for(db: Database, oid: str, *, hours: float = 24.0) -> str:
    """A new one-time setup code for an existing operator (e.g. of an imported site, or a lost password)."""
    async with db.write() as c:
        if await auth.load_operator(c, oid) is None:
            raise ServiceError(f"no operator {oid!r}")
        await audit.record(c, "local administrator", "operator.setup_code", "operator", oid, via="local")
        return await auth.new_setup_code(c, oid, hours=hours)
