"""Who may use the installer page: accounts (scrypt), the one-time setup code, login sessions with CSRF tokens.

Like the operator console (cloud_bridge/service/auth.py), without its database:

* No default password. While no account exists, the agent makes a one-time setup code at each start (printed
  in the system journal and by `edge status`, never in the event journal that goes to the cloud); it creates
  the first account (role "installer") and is gone. An installer can add further accounts ("viewer" or
  "installer") on the accounts page.
* Passwords are hashed with scrypt (RFC 7914: N=2^14, r=8, p=1, 16-byte salt) on a worker thread; a login for
  an unknown name is checked against a dummy hash, so it takes as long. After 5 failures in a row a name is
  locked for 30 s, doubled at each further failure (at most 15 minutes).
* Accounts are a JSON file (mode 0600) in `<state_dir>/installer/`, written atomically off the loop.
* Sessions live in memory (a restart logs everyone out): the cookie is 32 random bytes, kept only as its
  SHA-256, with a CSRF token every POST must carry.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import msgspec

from edge.errors import EdgeError

Role = Literal["viewer", "installer"]
ROLES: tuple[Role, ...] = ("viewer", "installer")
NAME = re.compile(r"^[a-z][a-z0-9_.\-]{1,31}$")
MIN_PASSWORD = 10
MAX_PASSWORD = 1024
LOCK_AFTER = 5
LOCK_BASE_S = 30.0
LOCK_MAX_S = 900.0


class AuthError(EdgeError):
    """A refused login, setup code or form value; `field` names the form field when there is one."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class Account(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    role: Role
    hash: str  # "scrypt$<salt hex>$<key hex>"
    created: float


class Session(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    role: Role
    csrf: str
    expires: float
    id_hash: str


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _scrypt(password: str, salt: bytes) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, n=2**14, r=8, p=1, dklen=32, maxmem=64 * 1024 * 1024)


def hash_password(password: str) -> str:
    """Blocking (about 50 ms): call it on a worker thread."""
    salt = os.urandom(16)
    return f"scrypt${salt.hex()}${_scrypt(password, salt).hex()}"


def verify_password(stored: str, password: str) -> bool:
    """Blocking, like `hash_password`."""
    try:
        kind, salt, key = stored.split("$")
        if kind != "scrypt":
            return False
        return hmac.compare_digest(_scrypt(password, bytes.fromhex(salt)), bytes.fromhex(key))
    except ValueError:
        return False


def check_name(name: str) -> str:
    if not NAME.match(name):
        raise AuthError("a name is 2-32 characters: lower-case letters, digits, '.', '_' or '-', starting with a "
                        "letter", "name")  # fmt: skip
    return name


def check_password(password: str) -> str:
    if len(password) < MIN_PASSWORD:
        raise AuthError(f"a password needs at least {MIN_PASSWORD} characters", "password")
    if len(password) > MAX_PASSWORD:
        raise AuthError(f"a password has at most {MAX_PASSWORD} characters", "password")
    return password


class Accounts:
    """The installer page's accounts, the setup code and the sessions."""

    def __init__(self, directory: Path, *, session_hours: float, setup_code_hours: float,
                 clock: Callable[[], float] = time.time) -> None:  # fmt: skip
        self.path = directory / "accounts.json"
        self.session_s = session_hours * 3600
        self.setup_code_s = setup_code_hours * 3600
        self._clock = clock
        self._accounts: dict[str, Account] = {}
        self._sessions: dict[str, Session] = {}
        self._failures: dict[str, tuple[int, float]] = {}  # name -> (failures, locked until)
        self._setup: tuple[str, float] | None = None  # (SHA-256 of the code, expires)
        #: The setup code in clear while it is valid (for `edge status` on the control socket, root only).
        self.setup_code: str | None = None
        self._dummy: str | None = None
        self._lock = asyncio.Lock()

    # --- storage ----------------------------------------------------------------------------------------

    def load(self) -> None:
        """Read the accounts (blocking: at start, before the page serves)."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not self.path.exists():
            return
        raw = json.loads(self.path.read_text())
        self._accounts = {a.name: a for a in msgspec.convert(raw, list[Account])}

    async def _save(self) -> None:
        body = msgspec.json.encode(sorted(self._accounts.values(), key=lambda a: a.name))
        await asyncio.to_thread(_write_private, self.path, body)

    @property
    def names(self) -> list[tuple[str, Role]]:
        return sorted((a.name, a.role) for a in self._accounts.values())

    @property
    def empty(self) -> bool:
        return not self._accounts

    # --- the setup code ---------------------------------------------------------------------------------

    def new_setup_code(self) -> str | None:
        """A one-time code for the first account (None when accounts exist: nothing to set up)."""
        if self._accounts:
            self._setup, self.setup_code = None, None
            return None
        code = "-".join(secrets.token_hex(3) for _ in range(3))
        self._setup = (_sha256(code), self._clock() + self.setup_code_s)
        self.setup_code = code
        return code

    async def use_setup_code(self, code: str, name: str, password: str) -> Account:
        check_name(name)
        check_password(password)
        async with self._lock:
            setup = self._setup
            if setup is None or self._accounts or setup[1] <= self._clock() or \
                    not hmac.compare_digest(setup[0], _sha256(code.strip())):  # fmt: skip
                raise AuthError("this setup code is not valid (used, expired or mistyped)", "code")
            self._setup, self.setup_code = None, None
            acct = Account(name=name, role="installer", hash=await asyncio.to_thread(hash_password, password),
                           created=self._clock())  # fmt: skip
            self._accounts[name] = acct
            await self._save()
            return acct

    async def add(self, name: str, role: str, password: str) -> Account:
        check_name(name)
        if role not in ROLES:
            raise AuthError(f"role must be one of {', '.join(ROLES)}", "role")
        check_password(password)
        async with self._lock:
            if name in self._accounts:
                raise AuthError(f"an account {name!r} exists already", "name")
            acct = Account(name=name, role="viewer" if role == "viewer" else "installer",
                           hash=await asyncio.to_thread(hash_password, password), created=self._clock())  # fmt: skip
            self._accounts[name] = acct
            await self._save()
            return acct

    # --- login and sessions -----------------------------------------------------------------------------

    async def login(self, name: str, password: str) -> tuple[str, Session]:
        """Check a password (with lockout); returns (cookie value, session). AuthError without detail."""
        now = self._clock()
        failures, locked_until = self._failures.get(name, (0, 0.0))
        acct = self._accounts.get(name)
        if self._dummy is None:
            self._dummy = await asyncio.to_thread(hash_password, secrets.token_hex(16))
        stored = acct.hash if acct is not None else self._dummy
        ok = await asyncio.to_thread(verify_password, stored, password[:MAX_PASSWORD])
        if locked_until > now or acct is None or not ok:
            if acct is not None and locked_until <= now:
                failures += 1
                over = failures - LOCK_AFTER
                lock = 0.0 if over < 0 else min(LOCK_MAX_S, LOCK_BASE_S * 2 ** min(over, 20))
                self._failures[name] = (failures, now + lock if lock else 0.0)
            raise AuthError("login failed: wrong name or password, or locked for a while after failures")
        self._failures.pop(name, None)
        value = secrets.token_urlsafe(32)
        s = Session(name=acct.name, role=acct.role, csrf=secrets.token_urlsafe(32), expires=now + self.session_s,
                    id_hash=_sha256(value))  # fmt: skip
        self._sessions[s.id_hash] = s
        return value, s

    def session(self, cookie: str | None) -> Session | None:
        if not cookie or len(cookie) > 128:
            return None
        s = self._sessions.get(_sha256(cookie))
        if s is None:
            return None
        if s.expires <= self._clock() or s.name not in self._accounts:
            self._sessions.pop(s.id_hash, None)
            return None
        return s

    def logout(self, s: Session) -> None:
        self._sessions.pop(s.id_hash, None)


def csrf_ok(s: Session, sent: str | None) -> bool:
    return sent is not None and hmac.compare_digest(s.csrf.encode(), sent.encode())


def _write_private(path: Path, body: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, body)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    with contextlib.suppress(OSError):
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


__all__ = ["ROLES", "Account", "Accounts", "AuthError", "Role", "Session", "csrf_ok", "hash_password",
           "verify_password"]  # fmt: skip
