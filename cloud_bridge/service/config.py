"""`cloud-bridge serve`'s configuration: one strict TOML file, validated once at start.

    [service]
    listen = "127.0.0.1"
    port = 8080
    public_url = "https://access.example.org"     # what the setup link starts with

    [database]
    url = "sqlite+aiosqlite:////var/lib/cloud-bridge/site.db"   # or "postgresql+asyncpg://user@host/db"

    [auth]                                          # every key optional (defaults below)
    session_hours = 12                              # a session ends this long after its login (absolute)
    session_idle_minutes = 30                       # or after this long without a page or API request

An unknown key, a wrong type or a value out of range is refused with the key's path
(``service.toml: Object contains unknown field `prot` - at `$.service` ``). The site key's passphrase is
never in this file: it comes from the environment (CLOUD_BRIDGE_PASSPHRASE) or `passphrase_file`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import msgspec
from msgspec import Meta

from .errors import ServiceError


class _Strict(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    pass


class ServiceSection(_Strict, kw_only=True, frozen=True, forbid_unknown_fields=True):
    listen: Annotated[str, Meta(min_length=1, max_length=255)] = "127.0.0.1"
    port: Annotated[int, Meta(ge=0, le=65535)] = 8080
    #: The address people open (behind a reverse proxy: its https URL); the setup link starts with it.
    public_url: Annotated[str, Meta(max_length=2048)] = ""
    #: Largest request body accepted (bytes).
    max_body_bytes: Annotated[int, Meta(ge=1024, le=256 * 1024 * 1024)] = 1024 * 1024


class DatabaseSection(_Strict, kw_only=True, frozen=True, forbid_unknown_fields=True):
    url: Annotated[str, Meta(min_length=1, max_length=4096)]


class AuthSection(_Strict, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Login, lockout and token rules; argon2id parameters (docs/operator.md, "Authentication")."""

    session_hours: Annotated[float, Meta(gt=0, le=24 * 30)] = 12.0
    #: A session not used (no page loaded, no form sent, no API request) for this long ends (idle timeout).
    session_idle_minutes: Annotated[float, Meta(gt=0, le=24 * 60)] = 30.0
    #: Consecutive failed logins before the account is locked; each further failure doubles the lock.
    lockout_after: Annotated[int, Meta(ge=1, le=100)] = 5
    lockout_base_s: Annotated[float, Meta(gt=0, le=3600)] = 30.0
    lockout_max_s: Annotated[float, Meta(gt=0, le=7 * 86400)] = 3600.0
    min_password_chars: Annotated[int, Meta(ge=8, le=128)] = 12
    token_max_days: Annotated[int, Meta(ge=1, le=3650)] = 365
    setup_code_hours: Annotated[float, Meta(gt=0, le=24 * 7)] = 24.0
    argon2_time_cost: Annotated[int, Meta(ge=1, le=20)] = 3
    argon2_memory_kib: Annotated[int, Meta(ge=8 * 1024, le=4 * 1024 * 1024)] = 64 * 1024
    argon2_parallelism: Annotated[int, Meta(ge=1, le=16)] = 4


class MqttSection(_Strict, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """The broker the service's site link uses (default: the host and port stored with the site at init)."""

    host: Annotated[str, Meta(min_length=1, max_length=255)] | None = None
    port: Annotated[int, Meta(ge=1, le=65535)] | None = None
    resend_s: Annotated[float, Meta(gt=0, le=300)] = 5.0
    #: No longer used (the site link works on the service's database); accepted so that old files still load.
    workspace: str = ""


class ServiceConfig(_Strict, kw_only=True, frozen=True, forbid_unknown_fields=True):
    version: Annotated[int, Meta(ge=1, le=1)] = 1
    database: DatabaseSection
    service: ServiceSection = ServiceSection()
    auth: AuthSection = AuthSection()
    mqtt: MqttSection = MqttSection()
    passphrase_file: str = ""

    def passphrase(self) -> str | None:
        if self.passphrase_file:
            try:
                return Path(self.passphrase_file).read_text().strip() or None
            except OSError as e:
                raise ServiceError(f"passphrase_file: {e}") from None
        return os.environ.get("CLOUD_BRIDGE_PASSPHRASE") or None


def parse_config(text: str, *, source: str = "service.toml") -> ServiceConfig:
    try:
        return msgspec.toml.decode(text.encode(), type=ServiceConfig)
    except msgspec.ValidationError as e:
        raise ServiceError(f"{source}: {e}") from None
    except msgspec.DecodeError as e:
        raise ServiceError(f"{source}: not valid TOML: {e}") from None


def load_config(path: Path) -> ServiceConfig:
    try:
        text = path.read_text()
    except OSError as e:
        raise ServiceError(f"{path}: {e.strerror}") from None
    return parse_config(text, source=str(path))
