"""Ed25519 command signing (cloud side) and verification with a durable nonce store (gateway side).

The signature covers ``DOMAIN + body``, where `body` is the exact encoded `Command` carried in
`SignedCommand.body`: the gateway verifies the bytes it received before decoding anything in them. A
command is accepted only when, in this order: the signature verifies with the site's key; the body
decodes; it names this site and gateway; it has not expired (with `skew_s` of grace for clocks) and does
not live longer than `max_ttl_s`; its nonce has not been seen before. Nonces are kept on disk until the
command's expiry, so a replay after a restart is refused too.

`check()` is the pure part (no I/O); `NonceStore` is the SQLite part.

Key rotation: the gateway keeps the command key it verifies with in a `KeyState` (pure), stored in its
state directory by `save_key_state` (written to a temporary file, fsynced, renamed over the old one, the
directory fsynced) so that a rotated key survives a restart and wins over the configured one. Keys are
named by `fingerprint()` in logs and events; only public keys are ever stored on the gateway.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import sqlite3
import time
from pathlib import Path
from types import TracebackType
from typing import Self

import aiosqlite
import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge.errors import StoreError

from .errors import CloudBridgeError
from .protocol import (
    Command,
    CommandAction,
    Encoding,
    ProtocolError,
    Provision,
    Signed,
    SignedCommand,
    SignedMsg,
    decode_command_body,
    decode_provision,
    encode,
)

DOMAIN = b"acs/v1/command\0"
#: Domain of every other signed downlink message (change sets, snapshot manifests, rebirth, event acks):
#: a signature made for one kind of message can never be passed off as the other.
DOWNLINK_DOMAIN = b"acs/v1/downlink\0"
#: Longest lifetime a command may claim (bounds how long nonces are kept).
MAX_TTL_S = 24 * 3600.0


class CommandRejected(CloudBridgeError):
    """A command was refused. `code`: unsigned, bad_signature, malformed, wrong_target, expired,
    not_yet_valid, ttl_too_long, replayed."""

    def __init__(self, code: str, message: str, *, request_id: str | None = None, operator: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.request_id = request_id
        self.operator = operator


def key_id(public_key: bytes) -> str:
    """The `key_id` carried by signed messages: the key's `fingerprint`, the same name as in logs, events
    and the operator database (informative: the gateway verifies with the key it holds, whatever this says)."""
    return fingerprint(public_key)


def fingerprint(public_key: bytes) -> str:
    """The name of a public key in logs, events and the operator database: first 16 hex of its SHA-256."""
    return hashlib.sha256(public_key).hexdigest()[:16]


def public_bytes(key: Ed25519PrivateKey) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding as E
    from cryptography.hazmat.primitives.serialization import PublicFormat

    return key.public_key().public_bytes(E.Raw, PublicFormat.Raw)


def sign_command(
    key: Ed25519PrivateKey,
    *,
    site: str,
    gateway: str,
    action: CommandAction,
    operator: str,
    request_id: str | None = None,
    ttl_s: float = 60.0,
    now: float | None = None,
    nonce: str | None = None,
    encoding: Encoding = "msgpack",
) -> tuple[Command, SignedCommand]:
    """Build, encode and sign one command (the cloud's job; also used by tests and the bench)."""
    t = time.time() if now is None else now
    cmd = Command(
        site=site,
        gateway=gateway,
        request_id=request_id or os.urandom(8).hex(),
        operator=operator,
        issued=t,
        expires=t + ttl_s,
        nonce=nonce or os.urandom(16).hex(),
        command=action,
    )
    body = encode(cmd, encoding)
    return cmd, SignedCommand(body=body, sig=key.sign(DOMAIN + body), key_id=_signer_id(key))


def sign_downlink(
    key: Ed25519PrivateKey,
    msg: SignedMsg,
    *,
    site: str,
    gateway: str,
    now: float | None = None,
    encoding: Encoding = "msgpack",
) -> Signed:
    """Wrap one downlink message (change set, snapshot manifest, rebirth, event ack) for one gateway and
    sign it with the site key (the cloud's job)."""
    body = encode(Provision(site=site, gateway=gateway, issued=time.time() if now is None else now, msg=msg),
                  encoding)  # fmt: skip
    return Signed(body=body, sig=key.sign(DOWNLINK_DOMAIN + body), key_id=_signer_id(key))


@functools.lru_cache(maxsize=16)
def _signer_id(key: Ed25519PrivateKey) -> str:
    """`key_id` of a signing key, worked out once per key (a publisher signs thousands of messages a second with
    one key; the key objects hash by identity, and the few a process holds are kept alive here)."""
    return key_id(public_bytes(key))


def open_signed(signed: Signed, public_key: Ed25519PublicKey, *, site: str, gateway: str) -> Provision:
    """Verify a downlink envelope and return what it carries. Raises `CommandRejected` with code
    `unsigned`, `bad_signature`, `malformed` or `wrong_target` (the request id is named when the body
    could be read). Nothing in the body is read before the signature verified."""
    if not signed.sig or not signed.body:
        raise CommandRejected("unsigned", "message carries no signature")
    try:
        public_key.verify(signed.sig, DOWNLINK_DOMAIN + signed.body)
    except InvalidSignature:
        raise CommandRejected("bad_signature", "signature does not verify with the site key") from None
    try:
        p = decode_provision(signed.body)
    except ProtocolError as e:
        raise CommandRejected("malformed", f"signed body: {e}") from None
    if p.site != site or p.gateway != gateway:
        rid = getattr(p.msg, "id", None)
        raise CommandRejected("wrong_target", f"message is for {p.site}/{p.gateway}, this is {site}/{gateway}",
                              request_id=rid if isinstance(rid, str) else None)  # fmt: skip
    return p


def check(
    signed: SignedCommand,
    public_key: Ed25519PublicKey,
    *,
    site: str,
    gateway: str,
    now: float,
    skew_s: float = 30.0,
    max_ttl_s: float = MAX_TTL_S,
) -> Command:
    """Verify signature, target and time window (not the nonce). Raises `CommandRejected`."""
    if not signed.sig or not signed.body:
        raise CommandRejected("unsigned", "command carries no signature")
    try:
        public_key.verify(signed.sig, DOMAIN + signed.body)
    except InvalidSignature:
        raise CommandRejected("bad_signature", "signature does not verify with the site key") from None
    try:
        cmd = decode_command_body(signed.body)
    except ProtocolError as e:
        raise CommandRejected("malformed", f"signed body: {e}") from None
    rid, op = cmd.request_id, cmd.operator
    if cmd.site != site or cmd.gateway != gateway:
        raise CommandRejected(
            "wrong_target",
            f"command is for {cmd.site}/{cmd.gateway}, this is {site}/{gateway}",
            request_id=rid,
            operator=op,
        )
    if cmd.expires <= cmd.issued:
        raise CommandRejected("expired", "expires is not after issued", request_id=rid, operator=op)
    if cmd.expires - cmd.issued > max_ttl_s:
        raise CommandRejected(
            "ttl_too_long", f"lifetime over {max_ttl_s:.0f} s is refused", request_id=rid, operator=op
        )
    if now > cmd.expires + skew_s:
        raise CommandRejected("expired", f"expired {now - cmd.expires:.0f} s ago", request_id=rid, operator=op)
    if cmd.issued > now + skew_s:
        raise CommandRejected(
            "not_yet_valid", f"issued {cmd.issued - now:.0f} s in the future", request_id=rid, operator=op
        )
    return cmd


def load_public_key(raw: bytes) -> Ed25519PublicKey:
    if len(raw) != 32:
        raise ValueError(f"an Ed25519 public key is 32 raw bytes, got {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


class NonceStore:
    """Seen command nonces (with the result each command got), on disk until expiry + skew."""

    def __init__(self, path: Path | str, *, keep_extra_s: float = 60.0, synchronous: str = "FULL") -> None:
        self.path = Path(path)
        self.keep_extra_s = keep_extra_s
        self.synchronous = synchronous
        self._db: aiosqlite.Connection | None = None
        #: nonce -> (keep until, result): the nonces of this process, so that a replay is refused even when
        #: the disk refused to store the nonce.
        self._memory: dict[str, tuple[float, bytes | None]] = {}
        #: Why the last write failed (None when the store is healthy).
        self.degraded: str | None = None

    async def __aenter__(self) -> Self:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = await aiosqlite.connect(self.path, isolation_level=None)
        try:
            await self._db.execute("PRAGMA journal_mode=WAL")
            await self._db.execute(f"PRAGMA synchronous={self.synchronous}")
            await self._db.execute(
                "CREATE TABLE IF NOT EXISTS nonces (nonce TEXT PRIMARY KEY, expires REAL NOT NULL, "
                "request_id TEXT NOT NULL, result BLOB) WITHOUT ROWID"
            )
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await db.close()

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise CloudBridgeError("nonce store is not open")
        return self._db

    async def claim(self, cmd: Command) -> tuple[bool, bytes | None]:
        """Record `cmd.nonce`. Returns (True, None) when it is new, (False, earlier result) if seen.

        The nonce is kept in memory first and then on disk. When the disk refuses the write (full, read
        only, damaged), the command is still accepted (a lockdown must not wait for a disk) and its replay
        is refused from memory until the agent restarts; `degraded` names the failure for the caller to
        report."""
        mem = self._memory.get(cmd.nonce)
        if mem is not None:
            return False, mem[1]
        try:
            async with self.db.execute("SELECT result FROM nonces WHERE nonce=?", (cmd.nonce,)) as cur:
                row = await cur.fetchone()
        except sqlite3.Error as e:
            self.degraded = f"nonce store unreadable: {e}"
            row = None
        if row is not None:
            return False, row[0]
        self._memory[cmd.nonce] = (cmd.expires + self.keep_extra_s, None)
        try:
            await self.db.execute(
                "INSERT INTO nonces (nonce, expires, request_id) VALUES (?, ?, ?)",
                (cmd.nonce, cmd.expires + self.keep_extra_s, cmd.request_id),
            )
        except sqlite3.Error as e:
            self.degraded = f"nonce not saved: {e}"
        else:
            self.degraded = None
        return True, None

    async def set_result(self, nonce: str, result: bytes) -> None:
        exp = self._memory.get(nonce, (0.0, None))[0]
        self._memory[nonce] = (exp, result)
        try:
            await self.db.execute("UPDATE nonces SET result=? WHERE nonce=?", (result, nonce))
        except sqlite3.Error as e:
            self.degraded = f"command result not saved: {e}"

    async def purge(self, now: float) -> int:
        for k in [k for k, (exp, _r) in self._memory.items() if exp < now]:
            del self._memory[k]
        cur = await self.db.execute("DELETE FROM nonces WHERE expires < ?", (now,))
        n = cur.rowcount if cur.rowcount and cur.rowcount > 0 else 0
        await cur.close()
        return n

    async def count(self) -> int:
        async with self.db.execute("SELECT count(*) FROM nonces") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0


# --- the gateway's command key (rotation) -----------------------------------------------------------------


class KeyState(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=False, omit_defaults=True):
    """The command key a gateway holds. `key` is the newest key (hex); while a rotation waits for its
    `not_before`, `previous` is still the key in use. `request_id`/`operator` name the rotation that set it."""

    key: str
    previous: str | None = None
    not_before: float | None = None
    rotated_at: float = 0.0
    request_id: str = ""
    operator: str = ""

    def pending(self, now: float) -> bool:
        """A rotation was accepted and waits for its `not_before`."""
        return self.previous is not None and self.not_before is not None and now < self.not_before

    def in_use(self, now: float) -> bytes:
        """The raw public key commands must be signed with at `now`."""
        return bytes.fromhex(self.previous if self.pending(now) and self.previous else self.key)

    def rotated(
        self, new_key: bytes, *, not_before: float | None, now: float, request_id: str = "", operator: str = ""
    ) -> KeyState:
        """The state after a rotation to `new_key` accepted at `now` (pure). Returns `self` when nothing
        changes (the key is already in use and no other rotation is pending)."""
        load_public_key(new_key)  # 32 bytes
        current = self.in_use(now)
        if new_key == current and not self.pending(now):
            return self
        later = not_before is not None and not_before > now and new_key != current
        return KeyState(
            key=new_key.hex(), previous=current.hex() if later else None, not_before=not_before if later else None,
            rotated_at=now, request_id=request_id, operator=operator,
        )  # fmt: skip


_key_state_dec = msgspec.json.Decoder(KeyState)


def load_key_state(path: Path) -> KeyState | None:
    """The key state stored at `path`, or None when there is none. A file that cannot be read is an error
    (falling back to the configured key could bring a retired key back): `StoreError` names it."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StoreError(f"{path}: cannot read the stored command key: {e.strerror}") from None
    try:
        st = _key_state_dec.decode(data)
        for k in (st.key, st.previous):
            if k is not None:
                load_public_key(bytes.fromhex(k))
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as e:
        raise StoreError(f"{path}: the stored command key is unreadable ({e}); restore it or remove the file "
                         "to fall back to link.command_key") from None  # fmt: skip
    return st


def save_key_state(path: Path, state: KeyState) -> None:
    """Write `state` durably and atomically (temporary file, fsync, rename, fsync of the directory), mode
    0644. Raises `StoreError`; the previous file is then unchanged."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    data = msgspec.json.encode(state) + b"\n"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.fchmod(fd, 0o644)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise StoreError(f"{path}: cannot store the command key: {e.strerror}") from None
