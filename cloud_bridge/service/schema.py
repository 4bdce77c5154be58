"""The operator model as SQLAlchemy Core tables: one schema for embedded SQLite and PostgreSQL.

The site-model tables have the names and columns of `cloud_bridge/operator/db.py` (today's SQLite site
database), so an existing database imports column for column (`importer.py`); the site link and its planner
work on these tables directly (`planner.py`). New here: operator credentials
(argon2id hashes), one-time setup codes, login sessions, API tokens (hashed), the append-only audit log and
alarms. Times are UTC seconds since the epoch (double precision); NULL means "since always" / "for ever".

Alembic migrations (`migrations/versions/`) are generated from this module; change a table here, then add a
revision (docs/operator.md, "Schema changes").
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

ID = 128  # identifiers (ids are at most 64 characters by the model's rules; operator ids 128)

# --- the site model (as in cloud_bridge/operator/db.py) -----------------------------------------------------

meta = Table("meta", metadata, Column("key", String(ID), primary_key=True), Column("value", Text, nullable=False))

gateways = Table(
    "gateways", metadata,
    Column("id", String(ID), primary_key=True),
    Column("online", Boolean, nullable=False, default=False),
    Column("session", BigInteger, nullable=False, default=0),
    Column("reported_version", BigInteger, nullable=False, default=0),
    Column("version", BigInteger, nullable=False, default=0),
    Column("acked", BigInteger, nullable=False, default=0),
    Column("events_upto", BigInteger, nullable=False, default=0),
    Column("last_seen", Float),
    Column("software", Text, nullable=False, default=""),
    Column("error", Text),
)  # fmt: skip

doors = Table(
    "doors", metadata,
    Column("gateway", String(ID), primary_key=True),
    Column("id", String(ID), primary_key=True),
    Column("name", Text, nullable=False, default=""),
)  # fmt: skip

schedules = Table(
    "schedules", metadata, Column("id", String(ID), primary_key=True), Column("body", LargeBinary, nullable=False)
)

groups = Table(
    "groups", metadata,
    Column("id", String(ID), primary_key=True),
    Column("name", Text, nullable=False, default=""),
    Column("schedule", String(ID)),
    Column("tags", Text, nullable=False, default=""),  # comma-separated, as in db.py
)  # fmt: skip

group_doors = Table(
    "group_doors", metadata,
    Column("group_id", String(ID), ForeignKey("groups.id", ondelete="CASCADE"), primary_key=True),
    Column("gateway", String(ID), primary_key=True),
    Column("door", String(ID), primary_key=True),
)  # fmt: skip

users = Table(
    "users", metadata,
    Column("id", String(ID), primary_key=True),
    Column("name", Text, nullable=False, default=""),
    Column("active", Boolean, nullable=False, default=True),
    Column("offline_access", Boolean, nullable=False, default=False),
    Column("valid_from", Float),
    Column("valid_until", Float),
    Column("kind", String(32), nullable=False, default="user"),
)  # fmt: skip
# migration 0007: "the id starts with" (varchar_pattern_ops: LIKE 'x%' in any collation) and "a part of the
# name" (PostgreSQL: a GIN trigram index, pg_trgm, for ILIKE '%x%'; SQLite: a plain index on name)
Index("ix_users_id_prefix", users.c.id, postgresql_ops={"id": "varchar_pattern_ops"})
Index("ix_users_name_trgm", users.c.name, postgresql_using="gin", postgresql_ops={"name": "gin_trgm_ops"})

credentials = Table(
    "credentials", metadata,
    Column("card", BigInteger, primary_key=True, autoincrement=False),
    Column("user_id", String(ID), ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("status", String(32), nullable=False, default="active"),
    Column("format", String(32), nullable=False, default="h10301"),
    Column("valid_from", Float),
    Column("valid_until", Float),
)  # fmt: skip

assignments = Table(
    "assignments", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("user_id", String(ID), ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("group_id", String(ID), ForeignKey("groups.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("valid_from", Float),
    Column("valid_until", Float),
)  # fmt: skip

badges = Table(
    "badges", metadata,
    Column("card", BigInteger, primary_key=True, autoincrement=False),
    Column("location", String(ID), nullable=False),
    Column("name", Text, nullable=False, default=""),
    Column("type", Text, nullable=False, default=""),
)  # fmt: skip

visits = Table(
    "visits", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("visitor", Text, nullable=False),
    Column("badge", BigInteger, nullable=False),
    Column("location", String(ID), nullable=False),
    Column("user_id", String(ID), nullable=False),
    Column("started", Float, nullable=False),
    Column("ends", Float, nullable=False),
    Column("signed_out", Float),
)  # fmt: skip

operators = Table(
    "operators", metadata, Column("id", String(ID), primary_key=True), Column("body", LargeBinary, nullable=False)
)
permission_groups = Table(
    "permission_groups", metadata,
    Column("id", String(ID), primary_key=True), Column("body", LargeBinary, nullable=False),
)  # fmt: skip

shadow = Table(
    "shadow", metadata,
    Column("gateway", String(ID), primary_key=True),
    Column("kind", String(32), primary_key=True),
    Column("key", String(ID), primary_key=True),
    Column("body", LargeBinary, nullable=False),
)  # fmt: skip

outbox = Table(
    "outbox", metadata,
    Column("gateway", String(ID), primary_key=True),
    Column("to_version", BigInteger, primary_key=True, autoincrement=False),
    Column("from_version", BigInteger, nullable=False),
    Column("kind", String(16), nullable=False),
    Column("body", LargeBinary, nullable=False),
)  # fmt: skip

events = Table(
    "events", metadata,
    Column("id", String(ID), primary_key=True),
    Column("gateway", String(ID), nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("type", String(64), nullable=False),
    Column("ts", Float, nullable=False),
    Column("body", LargeBinary, nullable=False),
    # migration 0003: what the events API filters on, copied out of the body when the event is stored
    Column("door", String(ID)),
    Column("reader", String(ID)),
    Column("user_id", String(ID)),
    Column("card", BigInteger),
    Column("result", String(16)),  # granted | denied (access decisions), else NULL
    Column("reason", String(64)),
    UniqueConstraint("gateway", "seq"),  # exactly once per gateway and sequence number
)  # fmt: skip
# every events page is newest first by (ts, id): each filter index ends in both (migration 0007), so a
# filtered page reads its rows from the index in order (no sort)
Index("ix_events_ts_id", events.c.ts, events.c.id)
Index("ix_events_gateway_door_ts_id", events.c.gateway, events.c.door, events.c.ts, events.c.id)
Index("ix_events_user_id_ts_id", events.c.user_id, events.c.ts, events.c.id)
Index("ix_events_type_ts_id", events.c.type, events.c.ts, events.c.id)

# migration 0009: the events of each type at each door per 15 minutes (UTC bucket start, a multiple of 900
# seconds; door '' for none), kept by triggers on `events` in the storing transaction: a day's totals per
# reader are a sum of at most 96 rows a door and type (reports.py)
event_counts = Table(
    "event_counts", metadata,
    Column("bucket", Float, primary_key=True),
    Column("gateway", String(ID), primary_key=True),
    Column("door", String(ID), primary_key=True),
    Column("type", String(64), primary_key=True),
    Column("n", BigInteger, nullable=False),
)  # fmt: skip
#: The bucket of `event_counts`, in seconds.
COUNT_BUCKET = 900

event_ranges = Table(
    "event_ranges", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("gateway", String(ID), nullable=False),
    Column("prev_seq", BigInteger, nullable=False),
    Column("last_seq", BigInteger, nullable=False),
)  # fmt: skip

site_keys = Table(
    "site_keys", metadata,
    Column("fingerprint", String(ID), primary_key=True),
    Column("public_key", Text, nullable=False),
    Column("private_pem", Text, nullable=False),
    Column("created", Float, nullable=False),
)  # fmt: skip

gateway_keys = Table(
    "gateway_keys", metadata,
    Column("gateway", String(ID), primary_key=True),
    Column("fingerprint", String(ID), nullable=False),
    Column("acked", Float),
)  # fmt: skip

#: The tables an existing SQLite site database holds (cloud_bridge/operator/db.py), in an order that keeps
#: foreign keys satisfied while copying.
SITE_TABLES: tuple[Table, ...] = (
    meta, gateways, doors, schedules, groups, group_doors, users, credentials, assignments, badges, visits,
    operators, permission_groups, shadow, outbox, events, event_ranges, site_keys, gateway_keys,
)  # fmt: skip

# --- new with the service ------------------------------------------------------------------------------

operator_passwords = Table(
    "operator_passwords", metadata,
    Column("operator_id", String(ID), ForeignKey("operators.id", ondelete="CASCADE"), primary_key=True),
    Column("hash", Text, nullable=False),  # argon2id, PHC string (parameters inside)
    Column("changed", Float, nullable=False),
    Column("failures", Integer, nullable=False, default=0),  # consecutive failed logins
    Column("locked_until", Float),
)  # fmt: skip

setup_codes = Table(
    "setup_codes", metadata,
    Column("code_hash", String(64), primary_key=True),  # sha256 hex of the one-time code
    Column("operator_id", String(ID), ForeignKey("operators.id", ondelete="CASCADE"), nullable=False),
    Column("expires", Float, nullable=False),
)  # fmt: skip

sessions = Table(
    "sessions", metadata,
    Column("id_hash", String(64), primary_key=True),  # sha256 hex of the cookie value
    Column("operator_id", String(ID), ForeignKey("operators.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("csrf", String(64), nullable=False),
    Column("created", Float, nullable=False),
    Column("expires", Float, nullable=False),
    Column("address", String(64), nullable=False, default=""),
    Column("reauth_until", Float),  # the password was given again: operator changes allowed until then
)  # fmt: skip

api_tokens = Table(
    "api_tokens", metadata,
    Column("id", String(32), primary_key=True),  # the public part of the token
    Column("secret_hash", String(64), nullable=False),  # sha256 hex of the secret part
    Column("operator_id", String(ID), ForeignKey("operators.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("name", Text, nullable=False, default=""),
    Column("groups", Text, nullable=False),  # JSON list of permission group ids (a subset of the owner's)
    Column("created", Float, nullable=False),
    Column("expires", Float, nullable=False),
    Column("revoked", Float),
    Column("last_used", Float),
)  # fmt: skip

audit_log = Table(
    "audit_log", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("ts", Float, nullable=False),
    Column("actor", String(ID), nullable=False),
    Column("via", String(32), nullable=False),  # session | token:<id> | local | setup | login
    Column("address", String(64), nullable=False, default=""),
    Column("action", String(64), nullable=False),
    Column("object_type", String(32), nullable=False),
    Column("object_id", Text, nullable=False),
    Column("before", Text),  # JSON
    Column("after", Text),  # JSON
    Column("outcome", String(16), nullable=False),  # ok | denied | failed
)  # fmt: skip
Index("ix_audit_log_ts", audit_log.c.ts)

alarms = Table(
    "alarms", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("gateway", String(ID), nullable=False),
    Column("door", String(ID)),
    Column("kind", String(32), nullable=False),  # forced | held_open | tamper | pin_lockout | reader_offline | storage
    Column("event_id", String(ID)),
    Column("ts", Float, nullable=False),
    Column("state", String(16), nullable=False, default="open"),  # open | acknowledged
    Column("acked_by", String(ID)),
    Column("acked_at", Float),
    Column("comment", Text),
    Column("cleared_at", Float),  # migration 0003: when the gateway reported the condition over
)  # fmt: skip
Index("ix_alarms_state_ts", alarms.c.state, alarms.c.ts)

# --- migration 0003: what the collector keeps (events.py) ------------------------------------------------

#: Per gateway, from its births, deaths and event batches (the collector's own: the provisioning workspace
#: copies `gateways` back wholesale, so nothing of the collector's may live there).
gateway_status = Table(
    "gateway_status", metadata,
    Column("gateway", String(ID), primary_key=True),
    Column("online", Boolean, nullable=False, default=False),
    Column("session", BigInteger, nullable=False, default=0),
    Column("software", Text, nullable=False, default=""),
    Column("rights_version", BigInteger, nullable=False, default=0),  # reported in the last birth
    Column("journal_depth", BigInteger, nullable=False, default=0),  # in the last birth
    Column("warnings", Text, nullable=False, default=""),  # JSON list, from the last birth
    Column("last_seen", Float),  # the last birth, death or event batch
    Column("lockdown", Boolean, nullable=False, default=False),
    Column("events_upto", BigInteger, nullable=False, default=0),  # contiguous high-water mark (acknowledged)
    Column("events_stored", BigInteger, nullable=False, default=0),
    Column("duplicates", BigInteger, nullable=False, default=0),  # events received again, not stored twice
)  # fmt: skip

#: A door's live state, from its newest door.state / door.* / command.executed events.
door_state = Table(
    "door_state", metadata,
    Column("gateway", String(ID), primary_key=True),
    Column("door", String(ID), primary_key=True),
    Column("lock", String(16)),  # locked | unlocked
    Column("contact", String(16)),  # open | closed
    Column("mode", String(32)),  # the override (door_mode command) or lockdown; NULL: as provisioned
    Column("forced", Boolean, nullable=False, default=False),
    Column("held", Boolean, nullable=False, default=False),
    Column("seq", BigInteger, nullable=False, default=0),  # the newest event applied
    Column("ts", Float),
)  # fmt: skip

# --- integrations (service/integrations.py) --------------------------------------------------------------

#: An identity manager's entitlement assignment, by its own (external) id: the `assignments` row it is.
#: A separate table, so the site tables keep the columns of operator/db.py (the workspace and the importer).
assignment_refs = Table(
    "assignment_refs", metadata,
    Column("external_id", String(ID), primary_key=True),
    Column("assignment_id", Integer, ForeignKey("assignments.id", ondelete="CASCADE"), nullable=False,
           unique=True),
)  # fmt: skip

# --- access rules (issue 19; cloud_bridge/service/areas.py) ---------------------------------------------

#: Areas (site-wide): `body` is the encoded `edge.model.Area` (MessagePack).
areas = Table(
    "areas", metadata, Column("id", String(ID), primary_key=True), Column("body", LargeBinary, nullable=False)
)
#: The access-rule fields of a door (`cloud_bridge.operator.rules.DoorRules`, MessagePack).
door_rules = Table(
    "door_rules", metadata,
    Column("gateway", String(ID), primary_key=True),
    Column("door", String(ID), primary_key=True),
    Column("body", LargeBinary, nullable=False),
)  # fmt: skip
#: Interlocks, per gateway (`edge.model.Interlock`, MessagePack).
interlocks = Table(
    "interlocks", metadata,
    Column("gateway", String(ID), primary_key=True),
    Column("id", String(ID), primary_key=True),
    Column("body", LargeBinary, nullable=False),
)  # fmt: skip

# --- CSV import jobs (migration 0008; cloud_bridge/service/imports.py) ------------------------------------

#: One import job: the uploaded file (decoded text), its mapping, state and phase, the per-row report and the
#: result, as JSON. Kept across restarts; a job found running at start is marked failed (interrupted).
import_jobs = Table(
    "import_jobs", metadata,
    Column("id", String(32), primary_key=True),
    Column("owner", String(ID), nullable=False, index=True),
    Column("filename", Text, nullable=False),
    Column("created", Float, nullable=False),
    Column("updated", Float, nullable=False),
    Column("state", String(16), nullable=False),
    Column("phase", String(16), nullable=False),
    Column("done", BigInteger, nullable=False, default=0),
    Column("total", BigInteger, nullable=False, default=0),
    Column("text", Text, nullable=False),
    #: JSON: the decode problems, the file's columns, the mapping and bulk settings, the report, the result.
    Column("detail", Text, nullable=False),
    Column("error", Text),
)  # fmt: skip
