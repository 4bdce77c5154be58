"""The cloud-side model in its own SQLite database (one site per database file).

Tables: users, credentials (card numbers are the primary key: unique per site), assignments (user ->
group with a time span), groups and the doors they open (per gateway), schedules, gateways and the doors
they announced in their birth, badge pools and visits, operators, the per-gateway shadow of what was last
published, the outbox of change sets / snapshots not yet acknowledged, and collected events. Command keys:
every site key ever used (`site_keys`, private keys encrypted with the site passphrase) and the fingerprint
of the key each gateway acknowledged holding (`gateway_keys`; no row: the current key).

Times are UTC seconds since the epoch (REAL); NULL means "since always" / "for ever". All mutations here
are plain synchronous `sqlite3` calls in short transactions (the operator process is not a hot path);
WAL mode and a busy timeout let several collector processes and a CLI share the file.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cloud_bridge.errors import CloudBridgeError

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS gateways (
    id TEXT PRIMARY KEY, online INTEGER NOT NULL DEFAULT 0, session INTEGER NOT NULL DEFAULT 0,
    reported_version INTEGER NOT NULL DEFAULT 0, version INTEGER NOT NULL DEFAULT 0,
    acked INTEGER NOT NULL DEFAULT 0, events_upto INTEGER NOT NULL DEFAULT 0,
    last_seen REAL, software TEXT NOT NULL DEFAULT '', error TEXT);
CREATE TABLE IF NOT EXISTS doors (
    gateway TEXT NOT NULL, id TEXT NOT NULL, name TEXT NOT NULL DEFAULT '', PRIMARY KEY (gateway, id));
CREATE TABLE IF NOT EXISTS schedules (id TEXT PRIMARY KEY, body BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS groups (
    id TEXT PRIMARY KEY, name TEXT NOT NULL DEFAULT '', schedule TEXT, tags TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS group_doors (
    group_id TEXT NOT NULL REFERENCES groups(id) ON DELETE CASCADE, gateway TEXT NOT NULL, door TEXT NOT NULL,
    PRIMARY KEY (group_id, gateway, door));
CREATE TABLE IF NOT EXISTS users (
    id TEXT PRIMARY KEY, name TEXT NOT NULL DEFAULT '', active INTEGER NOT NULL DEFAULT 1,
    offline_access INTEGER NOT NULL DEFAULT 0, valid_from REAL, valid_until REAL,
    kind TEXT NOT NULL DEFAULT 'user');
CREATE TABLE IF NOT EXISTS credentials (
    card INTEGER PRIMARY KEY, user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    status TEXT NOT NULL DEFAULT 'active', format TEXT NOT NULL DEFAULT 'h10301', valid_from REAL, valid_until REAL);
CREATE INDEX IF NOT EXISTS credentials_user ON credentials(user_id);
CREATE TABLE IF NOT EXISTS assignments (
    id INTEGER PRIMARY KEY, user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    group_id TEXT NOT NULL REFERENCES groups(id) ON DELETE CASCADE, valid_from REAL, valid_until REAL);
CREATE INDEX IF NOT EXISTS assignments_user ON assignments(user_id);
CREATE INDEX IF NOT EXISTS assignments_group ON assignments(group_id);
CREATE TABLE IF NOT EXISTS badges (
    card INTEGER PRIMARY KEY, location TEXT NOT NULL, name TEXT NOT NULL DEFAULT '', type TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS visits (
    id INTEGER PRIMARY KEY, visitor TEXT NOT NULL, badge INTEGER NOT NULL, location TEXT NOT NULL,
    user_id TEXT NOT NULL, started REAL NOT NULL, ends REAL NOT NULL, signed_out REAL);
CREATE TABLE IF NOT EXISTS operators (id TEXT PRIMARY KEY, body BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS shadow (
    gateway TEXT NOT NULL, kind TEXT NOT NULL, key TEXT NOT NULL, body BLOB NOT NULL,
    PRIMARY KEY (gateway, kind, key)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS outbox (
    gateway TEXT NOT NULL, to_version INTEGER NOT NULL, from_version INTEGER NOT NULL, kind TEXT NOT NULL,
    body BLOB NOT NULL, PRIMARY KEY (gateway, to_version));
CREATE TABLE IF NOT EXISTS events (
    id TEXT PRIMARY KEY, gateway TEXT NOT NULL, seq INTEGER NOT NULL, type TEXT NOT NULL, ts REAL NOT NULL,
    body BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS event_ranges (gateway TEXT NOT NULL, prev_seq INTEGER NOT NULL, last_seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS site_keys (
    fingerprint TEXT PRIMARY KEY, public_key TEXT NOT NULL, private_pem TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS gateway_keys (gateway TEXT PRIMARY KEY, fingerprint TEXT NOT NULL, acked REAL);
"""


#: Field limits on the operator side (docs/operator.md, "Limits"). They are at most the gateway model's own
#: (edge/model.py), so that whatever the operator side accepts a gateway accepts too, and small enough that
#: no single object comes near `link.max_message_bytes` (256 KiB by default): a user with a 256-character
#: name in 256 groups encodes to about 25 KB. `provision.plan` still refuses, naming it, any user whose
#: encoded change would not fit one message (a row written to the database by other means).
MAX_ID_CHARS = 64
MAX_NAME_CHARS = 256
MAX_GROUPS_PER_USER = 256
MAX_TAGS = 32
MAX_DOORS_PER_GROUP = 1024


def check_name(kind: str, value: str) -> str:
    """A display name (user, group, visitor, badge): at most MAX_NAME_CHARS characters."""
    if len(value) > MAX_NAME_CHARS:
        raise OperatorError(f"{kind} name: {len(value):,} characters, at most {MAX_NAME_CHARS}")
    return value


class OperatorError(CloudBridgeError):
    """An operator request was refused: bad input, unknown object, or a conflict. Nothing was changed."""


class NotFound(OperatorError):
    pass


class Conflict(OperatorError):
    pass


class Database:
    """The cloud model's SQLite file. Use `tx()` for a write transaction."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.con = sqlite3.connect(self.path, isolation_level=None, timeout=30.0)
        self.con.execute("PRAGMA journal_mode=WAL")
        self.con.execute("PRAGMA synchronous=NORMAL")
        self.con.execute("PRAGMA foreign_keys=ON")
        self.con.executescript(SCHEMA)

    def close(self) -> None:
        self.con.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction: committed on success, rolled back on any exception."""
        self.con.execute("BEGIN IMMEDIATE")
        try:
            yield self.con
        except BaseException:
            self.con.execute("ROLLBACK")
            raise
        self.con.execute("COMMIT")

    def get_meta(self, key: str, default: str | None = None) -> str | None:
        row = self.con.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return str(row[0]) if row else default

    def set_meta(self, key: str, value: str) -> None:
        self.con.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))


# --- the site model: reads and writes used by the service ---------------------------------------------


def _ident_ok(kind: str, value: str) -> str:
    import re

    if not re.fullmatch(r"[A-Za-z0-9_.:@\-]{1,64}", value):
        shown = repr(value) if len(value) <= 64 else f"{value[:32]!r}... ({len(value):,} characters)"
        raise OperatorError(f"{kind} id {shown}: use 1-64 letters, digits or _ . : @ -")
    return value


def check_ident(kind: str, value: str) -> str:
    return _ident_ok(kind, value)


def parse_card(text: str | int) -> int:
    """A card or badge number: decimal digits only, 0 <= n < 2**63."""
    s = str(text).strip()
    if not s.isdigit() or not s.isascii():
        raise OperatorError(f"card ID {s!r} is not numeric (digits only)")
    n = int(s)
    if n >= 2**63:
        raise OperatorError(f"card ID {s} is too large")
    return n


class Model(Database):
    """The site model's operations (no permission checks here: `service.Service` does those)."""

    # users and credentials

    def user_exists(self, uid: str) -> bool:
        return self.con.execute("SELECT 1 FROM users WHERE id=?", (uid,)).fetchone() is not None

    def card_owner(self, card: int) -> str | None:
        row = self.con.execute("SELECT user_id FROM credentials WHERE card=?", (card,)).fetchone()
        if row is not None:
            return str(row[0])
        row = self.con.execute("SELECT location FROM badges WHERE card=?", (card,)).fetchone()
        return f"badge pool {row[0]}" if row else None

    def group_exists(self, gid: str) -> bool:
        return self.con.execute("SELECT 1 FROM groups WHERE id=?", (gid,)).fetchone() is not None

    def add_user(
        self, uid: str, *, name: str = "", card: int | None = None, groups: list[str] | None = None,
        active: bool = True, offline_access: bool = False, kind: str = "user",
        valid_from: float | None = None, valid_until: float | None = None,
    ) -> None:  # fmt: skip
        check_ident("user", uid)
        check_name("user", name)
        if len(groups or []) > MAX_GROUPS_PER_USER:
            raise OperatorError(f"user {uid!r}: {len(groups or [])} groups, at most {MAX_GROUPS_PER_USER}")
        with self.tx() as c:
            if self.user_exists(uid):
                raise Conflict(f"user {uid!r} already exists")
            if card is not None and (owner := self.card_owner(card)) is not None:
                raise Conflict(f"card {card} is already assigned to {owner}")
            for g in groups or []:
                if not self.group_exists(g):
                    raise NotFound(f"unknown group {g!r}")
            c.execute(
                "INSERT INTO users (id, name, active, offline_access, kind, valid_from, valid_until) "
                "VALUES (?,?,?,?,?,?,?)", (uid, name, int(active), int(offline_access), kind, valid_from, valid_until),
            )  # fmt: skip
            if card is not None:
                c.execute("INSERT INTO credentials (card, user_id, valid_from, valid_until) VALUES (?,?,?,?)",
                          (card, uid, valid_from, valid_until))  # fmt: skip
            for g in groups or []:
                c.execute("INSERT INTO assignments (user_id, group_id, valid_from, valid_until) VALUES (?,?,?,?)",
                          (uid, g, valid_from, valid_until))  # fmt: skip

    def update_user(self, uid: str, **fields: object) -> None:
        allowed = {"active", "offline_access", "name", "valid_from", "valid_until"}
        bad = set(fields) - allowed
        if bad:
            raise OperatorError(f"cannot set {', '.join(sorted(bad))} on a user")
        if "name" in fields:
            check_name("user", str(fields["name"]))
        with self.tx() as c:
            if not self.user_exists(uid):
                raise NotFound(f"no user {uid!r}")
            for k, v in fields.items():
                c.execute(f"UPDATE users SET {k}=? WHERE id=?", (int(v) if isinstance(v, bool) else v, uid))

    def delete_user(self, uid: str) -> None:
        """Delete a user with its cards and assignments: its card numbers become free."""
        with self.tx() as c:
            if c.execute("DELETE FROM users WHERE id=?", (uid,)).rowcount == 0:
                raise NotFound(f"no user {uid!r}")

    def add_credential(
        self, uid: str, card: int, *, status: str = "active", fmt: str = "h10301",
        valid_from: float | None = None, valid_until: float | None = None,
    ) -> None:  # fmt: skip
        with self.tx() as c:
            if not self.user_exists(uid):
                raise NotFound(f"no user {uid!r}")
            if (owner := self.card_owner(card)) is not None:
                raise Conflict(f"card {card} is already assigned to {owner}")
            c.execute("INSERT INTO credentials (card, user_id, status, format, valid_from, valid_until) "
                      "VALUES (?,?,?,?,?,?)", (card, uid, status, fmt, valid_from, valid_until))  # fmt: skip

    def set_credential_status(self, card: int, status: str) -> None:
        with self.tx() as c:
            if c.execute("UPDATE credentials SET status=? WHERE card=?", (status, card)).rowcount == 0:
                raise NotFound(f"no card {card}")

    def assign(self, uid: str, gid: str, *, valid_from: float | None = None, valid_until: float | None = None) -> int:
        if valid_from is not None and valid_until is not None and valid_until <= valid_from:
            raise OperatorError("an assignment must end after it starts")
        with self.tx() as c:
            if not self.user_exists(uid):
                raise NotFound(f"no user {uid!r}")
            if not self.group_exists(gid):
                raise NotFound(f"unknown group {gid!r}")
            (n,) = c.execute("SELECT count(DISTINCT group_id) FROM assignments WHERE user_id=? AND group_id<>?",
                             (uid, gid)).fetchone()  # fmt: skip
            if n >= MAX_GROUPS_PER_USER:
                raise OperatorError(f"user {uid!r} is in {n} groups already, at most {MAX_GROUPS_PER_USER}")
            cur = c.execute("INSERT INTO assignments (user_id, group_id, valid_from, valid_until) VALUES (?,?,?,?)",
                            (uid, gid, valid_from, valid_until))  # fmt: skip
            return int(cur.lastrowid or 0)

    def unassign(self, uid: str, gid: str) -> None:
        with self.tx() as c:
            c.execute("DELETE FROM assignments WHERE user_id=? AND group_id=?", (uid, gid))

    # groups, schedules, doors

    def put_group(self, gid: str, doors: list[tuple[str, str]], *, name: str = "", schedule: str | None = None,
                  tags: list[str] | None = None) -> None:  # fmt: skip
        """Create or replace a group: its (gateway, door) pairs, schedule and tags."""
        check_ident("group", gid)
        check_name("group", name)
        if len(tags or []) > MAX_TAGS:
            raise OperatorError(f"group {gid!r}: {len(tags or [])} tags, at most {MAX_TAGS}")
        for t in tags or []:
            check_ident("tag", t)
        if len(doors) > MAX_DOORS_PER_GROUP:
            raise OperatorError(f"group {gid!r}: {len(doors)} doors, at most {MAX_DOORS_PER_GROUP}")
        for gw, d in doors:
            check_ident("gateway", gw)
            check_ident("door", d)
        with self.tx() as c:
            if schedule is not None and c.execute("SELECT 1 FROM schedules WHERE id=?", (schedule,)).fetchone() is None:
                raise NotFound(f"unknown schedule {schedule!r}")
            c.execute("INSERT INTO groups (id, name, schedule, tags) VALUES (?,?,?,?) ON CONFLICT(id) DO UPDATE SET "
                      "name=excluded.name, schedule=excluded.schedule, tags=excluded.tags",
                      (gid, name, schedule, ",".join(tags or [])))  # fmt: skip
            c.execute("DELETE FROM group_doors WHERE group_id=?", (gid,))
            c.executemany("INSERT INTO group_doors (group_id, gateway, door) VALUES (?,?,?)",
                          [(gid, gw, d) for gw, d in doors])  # fmt: skip

    def delete_group(self, gid: str) -> None:
        with self.tx() as c:
            if c.execute("DELETE FROM groups WHERE id=?", (gid,)).rowcount == 0:
                raise NotFound(f"unknown group {gid!r}")

    def put_schedule(self, body: bytes, sid: str) -> None:
        with self.tx() as c:
            c.execute("INSERT OR REPLACE INTO schedules (id, body) VALUES (?, ?)", (sid, body))

    def groups_of_gateway(self, gateway: str) -> list[str]:
        rows = self.con.execute("SELECT DISTINCT group_id FROM group_doors WHERE gateway=? ORDER BY 1", (gateway,))
        return [str(r[0]) for r in rows]

    def doors_of(self, gateway: str) -> dict[str, str]:
        rows = self.con.execute("SELECT id, name FROM doors WHERE gateway=? ORDER BY id", (gateway,))
        return {str(r[0]): str(r[1]) for r in rows}

    def group_tags(self, gid: str) -> list[str]:
        row = self.con.execute("SELECT tags FROM groups WHERE id=?", (gid,)).fetchone()
        return [t for t in str(row[0]).split(",") if t] if row else []

    # gateways

    def gateways(self) -> list[str]:
        return [str(r[0]) for r in self.con.execute("SELECT id FROM gateways ORDER BY id")]

    def gateway(self, gw: str) -> dict[str, Any] | None:
        cur = self.con.execute("SELECT * FROM gateways WHERE id=?", (gw,))
        row = cur.fetchone()
        if row is None:
            return None
        return dict(zip([d[0] for d in cur.description], row, strict=True))

    def ensure_gateway(self, gw: str) -> None:
        self.con.execute("INSERT OR IGNORE INTO gateways (id) VALUES (?)", (gw,))

    def record_birth(
        self, gw: str, *, session: int, version: int, doors: list[tuple[str, str]], software: str, ts: float
    ) -> None:
        """A gateway's birth: it is online, holds `version`, and has these doors (learned as entitlements)."""
        with self.tx() as c:
            self.ensure_gateway(gw)
            c.execute("UPDATE gateways SET online=1, session=?, reported_version=?, software=?, last_seen=? "
                      "WHERE id=?", (session, version, software, ts, gw))  # fmt: skip
            c.execute("DELETE FROM doors WHERE gateway=?", (gw,))
            c.executemany("INSERT INTO doors (gateway, id, name) VALUES (?,?,?)", [(gw, d, n) for d, n in doors])

    def record_death(self, gw: str, session: int) -> None:
        with self.tx() as c:
            c.execute("UPDATE gateways SET online=0 WHERE id=? AND session<=?", (gw, session))

    def set_acked(self, gw: str, version: int) -> None:
        with self.tx() as c:
            c.execute("UPDATE gateways SET acked=?, error=NULL WHERE id=?", (version, gw))
            c.execute("DELETE FROM outbox WHERE gateway=? AND to_version<=?", (gw, version))

    def set_error(self, gw: str, message: str | None) -> None:
        with self.tx() as c:
            c.execute("UPDATE gateways SET error=? WHERE id=?", (message, gw))

    # command keys (rotation)

    def archive_key(self, fingerprint: str, public_hex: str, private_pem: str, ts: float) -> None:
        """Keep a site key (its private part already encrypted) for gateways that still hold it."""
        self.con.execute("INSERT OR IGNORE INTO site_keys (fingerprint, public_key, private_pem, created) "
                         "VALUES (?,?,?,?)", (fingerprint, public_hex, private_pem, ts))  # fmt: skip

    def archived_key(self, fingerprint: str) -> str | None:
        row = self.con.execute("SELECT private_pem FROM site_keys WHERE fingerprint=?", (fingerprint,)).fetchone()
        return str(row[0]) if row else None

    def gateway_key(self, gw: str) -> str | None:
        """The fingerprint of the command key `gw` acknowledged holding (None: never rotated)."""
        row = self.con.execute("SELECT fingerprint FROM gateway_keys WHERE gateway=?", (gw,)).fetchone()
        return str(row[0]) if row else None

    def set_gateway_key(self, gw: str, fingerprint: str, acked: float | None) -> None:
        self.con.execute("INSERT INTO gateway_keys (gateway, fingerprint, acked) VALUES (?,?,?) ON CONFLICT(gateway) "
                         "DO UPDATE SET fingerprint=excluded.fingerprint, acked=excluded.acked",
                         (gw, fingerprint, acked))  # fmt: skip
