"""Who is asking: operator passwords (argon2id), login sessions, API tokens, one-time setup codes, lockout.

* Passwords are hashed with argon2id (argon2-cffi; RFC 9106's second recommended parameters by default:
  t=3, m=64 MiB, p=4, 16-byte salt, 32-byte tag; `AuthSection` sets them). Hashing runs in a worker thread:
  the event loop never waits on it. A login for an unknown operator verifies against a dummy hash, so the
  answer takes as long as for a known one.
* Lockout: after `lockout_after` consecutive failures the account is locked for `lockout_base_s`, doubled at
  every further failure up to `lockout_max_s`. A login while locked fails without checking the password
  (the same 401 as a wrong password: nothing tells a guesser which it was). A success resets the count.
* Sessions: the cookie value is 32 random bytes; the database keeps only its SHA-256, with a CSRF token that
  every state-changing request of that session must send in `X-CSRF-Token`. A session ends `session_hours`
  after its login (absolute) or `session_idle_minutes` after its last use (idle): `expires` is the earlier
  of the two, moved on by `touch_session` (at most one write a minute per session).
* API tokens: ``cbt_<id>_<secret>``, shown once at creation; the database keeps the id and the SHA-256 of the
  secret (256 random bits: a slow hash adds nothing to guessing and would cost every API call 50 ms). A token
  acts for its owner with at most the permission groups it was scoped to (and only those the owner still
  has), until it expires or is revoked.
* Setup codes: one-time, hashed, expiring; `cloud-bridge serve --init` prints one for the first admin.
* `principal_for` remembers a verified session or token for `CACHE_S` (1 s) in this process, keyed by the
  SHA-256 of the secret, and forgets everything at every write transaction this process ends (a logout, a
  revoked token, a changed operator or group: the next request reads the database). A change made by
  another process (the CLI on the database, another worker) applies within that second. Only successes are
  kept: a wrong secret always costs a database read.

No password, token, code or PIN is ever logged or written to the audit log.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import time
import weakref

import msgspec
from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import delete, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from cloud_bridge.permissions import Operator

from . import schema
from .config import AuthSection
from .database import Database
from .errors import BadRequest, Unauthorized

log = logging.getLogger(__name__)
_op_dec = msgspec.json.Decoder(Operator)
TOKEN_PREFIX = "cbt_"


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class Principal(msgspec.Struct, frozen=True):
    """The operator a request acts as, and how it authenticated (`via`: "session", "token:<id>", "local")."""

    operator: Operator
    via: str
    address: str = ""
    csrf: str | None = None  # the session's CSRF token (None for tokens)
    session_hash: str | None = None
    #: When the session or token ends as it was read (UTC seconds; None: not read from the database).
    expires: float | None = None


class Passwords:
    def __init__(self, cfg: AuthSection) -> None:
        self.cfg = cfg
        self.hasher = PasswordHasher(time_cost=cfg.argon2_time_cost, memory_cost=cfg.argon2_memory_kib,
                                     parallelism=cfg.argon2_parallelism, type=Type.ID)  # fmt: skip
        self._dummy: str | None = None

    async def hash(self, password: str) -> str:
        if len(password) < self.cfg.min_password_chars:
            raise BadRequest(f"a password needs at least {self.cfg.min_password_chars} characters", "body.password")
        if len(password) > 1024:
            raise BadRequest("a password has at most 1024 characters", "body.password")
        return await asyncio.to_thread(self.hasher.hash, password)

    async def verify(self, stored: str | None, password: str) -> bool:
        if stored is None:
            if self._dummy is None:
                self._dummy = await asyncio.to_thread(self.hasher.hash, secrets.token_hex(16))
            stored = self._dummy

        def check() -> bool:
            try:
                return self.hasher.verify(stored, password)
            except (VerifyMismatchError, VerificationError, InvalidHashError):
                return False

        return await asyncio.to_thread(check)

    def lock_for(self, failures: int) -> float:
        """Seconds the account is locked after `failures` consecutive failures (0: not locked)."""
        over = failures - self.cfg.lockout_after
        if over < 0:
            return 0.0
        return float(min(self.cfg.lockout_max_s, self.cfg.lockout_base_s * 2 ** min(over, 40)))


async def load_operator(c: AsyncConnection, oid: str) -> Operator | None:
    body = (await c.execute(select(schema.operators.c.body).where(schema.operators.c.id == oid))).scalar()
    return None if body is None else _op_dec.decode(body)


async def login(c: AsyncConnection, pw: Passwords, oid: str, password: str, *, now: float | None = None
                ) -> Operator:  # fmt: skip
    """Check an operator's password (with lockout). Raises Unauthorized, without detail, on any failure;
    the failure count is updated in `c`'s transaction (commit it even when this raises)."""
    t = time.time() if now is None else now
    row = (await c.execute(select(schema.operator_passwords).where(schema.operator_passwords.c.operator_id == oid))
           ).one_or_none()  # fmt: skip
    op = await load_operator(c, oid) if row is not None else None
    if row is not None and row.locked_until is not None and row.locked_until > t:
        raise Unauthorized("login failed")
    ok = await pw.verify(row.hash if row is not None else None, password)
    if row is None or op is None:
        raise Unauthorized("login failed")
    tbl = schema.operator_passwords
    if not ok or not op.active:
        failures = int(row.failures) + 1
        lock = pw.lock_for(failures)
        await c.execute(update(tbl).where(tbl.c.operator_id == oid)
                        .values(failures=failures, locked_until=(t + lock) if lock else None))  # fmt: skip
        raise Unauthorized("login failed")
    if row.failures or row.locked_until is not None:
        await c.execute(update(tbl).where(tbl.c.operator_id == oid).values(failures=0, locked_until=None))
    if pw.hasher.check_needs_rehash(row.hash):
        await c.execute(update(tbl).where(tbl.c.operator_id == oid).values(hash=await pw.hash(password)))
    return op


async def set_password(c: AsyncConnection, pw: Passwords, oid: str, password: str) -> None:
    h = await pw.hash(password)
    tbl = schema.operator_passwords
    await c.execute(delete(tbl).where(tbl.c.operator_id == oid))
    await c.execute(tbl.insert().values(operator_id=oid, hash=h, changed=time.time(), failures=0))


# --- verified sessions and tokens, remembered for a second ------------------------------------------

#: How long a verified session or token is remembered (seconds), unless this process writes first.
CACHE_S = 1.0
_CACHE_MAX = 10_000
_verified: weakref.WeakKeyDictionary[Database, dict[str, tuple[int, float, Principal]]] = weakref.WeakKeyDictionary()


async def principal_for(db: Database, *, token: str | None = None, cookie: str | None = None,
                        address: str) -> Principal | None:  # fmt: skip
    """The principal of a bearer `token` or a session `cookie` (as `token_principal` / `session_principal`),
    remembered for `CACHE_S` unless `db` is written meanwhile (see the module docstring)."""
    secret = token if token is not None else cookie
    if secret is None:
        return None
    key = ("t:" if token is not None else "s:") + sha256(secret)
    memo = _verified.setdefault(db, {})
    now = time.monotonic()
    hit = memo.get(key)
    if hit is not None and hit[0] == db.generation and hit[1] > now:
        return msgspec.structs.replace(hit[2], address=address)
    generation = db.generation  # taken before the read: a write that ends meanwhile makes the entry stale
    async with db.read() as c:
        p = await (token_principal(c, secret, address) if token is not None else session_principal(c, secret, address))
    if p is not None:
        if len(memo) >= _CACHE_MAX:
            for k in [k for k, v in memo.items() if v[1] <= now or v[0] != db.generation] or list(memo):
                del memo[k]
        ends = now + (p.expires - time.time()) if p.expires is not None else now
        memo[key] = (generation, min(now + CACHE_S, ends), p)  # never past the session's or token's end
    return p


# --- sessions --------------------------------------------------------------------------------------------


async def new_session(c: AsyncConnection, oid: str, *, hours: float, address: str,
                      idle_s: float | None = None) -> tuple[str, str]:  # fmt: skip
    """Create a login session (ending after `hours`, or `idle_s` without use); returns (cookie, CSRF token)."""
    value, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    now = time.time()
    life = hours * 3600 if idle_s is None else min(hours * 3600, idle_s)
    await c.execute(schema.sessions.insert().values(id_hash=sha256(value), operator_id=oid, csrf=csrf, created=now,
                                                    expires=now + life, address=address[:64]))  # fmt: skip
    return value, csrf


async def session_principal(c: AsyncConnection, value: str, address: str) -> Principal | None:
    h = sha256(value)
    row = (await c.execute(select(schema.sessions).where(schema.sessions.c.id_hash == h))).one_or_none()
    if row is None or row.expires <= time.time():
        return None
    op = await load_operator(c, row.operator_id)
    if op is None or not op.active:
        return None
    return Principal(op, "session", address, csrf=row.csrf, session_hash=h, expires=float(row.expires))


async def touch_session(db: Database, session_hash: str, *, hours: float, idle_s: float,
                        known_expires: float | None = None) -> None:  # fmt: skip
    """The session was used: it lives on `idle_s` from now, never past `hours` after its login. Written at
    most once a minute (a tenth of `idle_s` if shorter): a page's every request does not cost a write.
    `known_expires` (the end as the request's principal read it): when even the idle end would not move it
    by that much, nothing is read either."""
    s = schema.sessions
    now = time.time()
    step = min(60.0, idle_s / 10)
    if known_expires is not None and now + idle_s - known_expires <= step:
        return
    async with db.read() as c:
        row = (await c.execute(select(s.c.created, s.c.expires).where(s.c.id_hash == session_hash))).one_or_none()
    if row is None or row.expires <= now:
        return
    until = min(float(row.created) + hours * 3600, now + idle_s)
    if until - float(row.expires) > step:
        async with db.write() as c:
            await c.execute(update(s).where(s.c.id_hash == session_hash, s.c.expires > now).values(expires=until))


async def end_session(c: AsyncConnection, session_hash: str) -> None:
    await c.execute(delete(schema.sessions).where(schema.sessions.c.id_hash == session_hash))


def csrf_ok(principal: Principal, sent: str | None) -> bool:
    if principal.csrf is None:
        return True  # a bearer token is not sent by a browser on its own: nothing to forge
    return sent is not None and hmac.compare_digest(principal.csrf.encode(), sent.encode())


# --- API tokens ------------------------------------------------------------------------------------------


async def new_token(c: AsyncConnection, owner: Operator, *, name: str, groups: list[str], expires: float
                    ) -> tuple[str, str]:  # fmt: skip
    """Create an API token for `owner` limited to `groups` (each one of the owner's). Returns (id, token)."""
    for g in groups:
        if g not in owner.groups:
            raise BadRequest(f"permission group {g!r} is not one of operator {owner.id!r}'s: a token can only be "
                             "limited, never widened", "body.groups")  # fmt: skip
    tid, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
    await c.execute(schema.api_tokens.insert().values(
        id=tid, secret_hash=sha256(secret), operator_id=owner.id, name=name,
        groups=msgspec.json.encode(groups).decode(),
        created=time.time(), expires=expires))  # fmt: skip
    return tid, f"{TOKEN_PREFIX}{tid}_{secret}"


async def token_principal(c: AsyncConnection, token: str, address: str) -> Principal | None:
    if not token.startswith(TOKEN_PREFIX):
        return None
    tid, _, secret = token[len(TOKEN_PREFIX) :].partition("_")
    if not tid or not secret or len(tid) > 32:
        return None
    t = schema.api_tokens
    row = (await c.execute(select(t).where(t.c.id == tid))).one_or_none()
    if row is None or not hmac.compare_digest(row.secret_hash, sha256(secret)):
        return None
    now = time.time()
    if row.revoked is not None or row.expires <= now:
        return None
    owner = await load_operator(c, row.operator_id)
    if owner is None or not owner.active:
        return None
    scoped = [g for g in msgspec.json.decode(row.groups, type=list[str]) if g in owner.groups]
    return Principal(msgspec.structs.replace(owner, groups=scoped), f"token:{tid}", address,
                     expires=float(row.expires))  # fmt: skip


#: How often `last_used` of one token is written at most (seconds): the column says "used around then".
TOUCH_EVERY = 60.0
_touched: weakref.WeakKeyDictionary[Database, dict[str, float]] = weakref.WeakKeyDictionary()
_writes: set[asyncio.Task[None]] = set()


async def touch_token(db: Database, tid: str) -> None:
    """Record that a token was used: at most once per `TOUCH_EVERY` seconds per token (remembered in this
    process), written in a task of its own, outside the request and its transaction. Many clients starting
    at once with one token cost one write, not one each; a failed write is logged and tried again next time."""
    now = time.time()
    seen = _touched.setdefault(db, {})
    if now - seen.get(tid, -TOUCH_EVERY) < TOUCH_EVERY:
        return
    seen[tid] = now
    task = asyncio.get_running_loop().create_task(_write_last_used(db, tid, now))
    _writes.add(task)
    task.add_done_callback(_writes.discard)


async def _write_last_used(db: Database, tid: str, now: float) -> None:
    t = schema.api_tokens
    try:
        async with db.write() as c:
            await c.execute(update(t).where(t.c.id == tid, or_(t.c.last_used.is_(None), t.c.last_used < now))
                            .values(last_used=now))  # fmt: skip
    except Exception:  # the request it came with is answered already: nothing to tell it
        _touched.get(db, {}).pop(tid, None)
        log.exception("api token %s: last_used not written", tid)


async def touch_writes() -> None:
    """Wait for the pending `last_used` writes (a clean shutdown; tests)."""
    while _writes:
        await asyncio.gather(*list(_writes), return_exceptions=True)


# --- setup codes -----------------------------------------------------------------------------------------


async def new_setup_code(c: AsyncConnection, oid: str, *, hours: float) -> str:
    code = secrets.token_urlsafe(24)
    await c.execute(schema.setup_codes.insert().values(code_hash=sha256(code), operator_id=oid,
                                                       expires=time.time() + hours * 3600))  # fmt: skip
    return code


async def use_setup_code(c: AsyncConnection, code: str) -> str:
    """Consume a setup code; returns the operator it sets up. Unauthorized when unknown or expired."""
    t = schema.setup_codes
    row = (await c.execute(select(t).where(t.c.code_hash == sha256(code)))).one_or_none()
    if row is None:
        raise Unauthorized("setup code not valid")
    await c.execute(delete(t).where(t.c.code_hash == row.code_hash))
    if row.expires <= time.time():
        raise Unauthorized("setup code not valid")
    return str(row.operator_id)
