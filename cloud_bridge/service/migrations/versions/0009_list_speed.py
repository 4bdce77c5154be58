"""list speed at 100,000 users and 1,000,000 events (issues 14, 15): event counts per 15 minutes, and a
trigram index on user names on SQLite

* `event_counts`: how many events of each type each door (gateway, door; '' for none) had in each
  15-minute bucket (UTC seconds, a multiple of 900; the key starts with the bucket: a day is one range),
  kept by triggers on `events` in the transaction that
  stores or deletes them (PostgreSQL: statement triggers over the transition tables, one upsert per batch;
  SQLite: a row trigger with an upsert). Every site-local day starts and ends on a 15-minute boundary (all
  time zone offsets are multiples of 15 minutes), so a day's totals per reader (reports.py) are a sum over
  at most 96 buckets a door and type, not a count over the day's events. Filled from the events stored.
* SQLite: `users_fts`, an FTS5 table with the trigram tokenizer over `users.name` (external content,
  rowid = users.rowid, kept by triggers), for "a part of the name" (listing.py). PostgreSQL has pg_trgm
  (migration 0007). `VACUUM` may renumber the rowids of `users` (it has no INTEGER PRIMARY KEY): after one,
  run ``INSERT INTO users_fts(users_fts) VALUES ('rebuild')`` (docs/operator.md).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | None = None
depends_on: str | None = None

BUCKET = 900

PG_FUNCTIONS = [
    f"""CREATE FUNCTION event_counts_add() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO event_counts AS c (gateway, door, type, bucket, n)
  SELECT gateway, coalesce(door, ''), type, floor(ts / {BUCKET}) * {BUCKET}, count(*) FROM new_rows
  GROUP BY 1, 2, 3, 4
  ON CONFLICT (bucket, gateway, door, type) DO UPDATE SET n = c.n + excluded.n;
  RETURN NULL;
END $$""",
    f"""CREATE FUNCTION event_counts_remove() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  UPDATE event_counts AS c SET n = c.n - o.n
  FROM (SELECT gateway, coalesce(door, '') AS door, type, floor(ts / {BUCKET}) * {BUCKET} AS bucket,
               count(*) AS n FROM old_rows GROUP BY 1, 2, 3, 4) AS o
  WHERE c.gateway = o.gateway AND c.door = o.door AND c.type = o.type AND c.bucket = o.bucket;
  RETURN NULL;
END $$""",
    """CREATE TRIGGER events_counted AFTER INSERT ON events REFERENCING NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION event_counts_add()""",
    """CREATE TRIGGER events_uncounted AFTER DELETE ON events REFERENCING OLD TABLE AS old_rows
  FOR EACH STATEMENT EXECUTE FUNCTION event_counts_remove()""",
]
SQLITE_TRIGGERS = [
    f"""CREATE TRIGGER events_counted AFTER INSERT ON events BEGIN
  INSERT INTO event_counts (gateway, door, type, bucket, n)
  VALUES (new.gateway, coalesce(new.door, ''), new.type, CAST(new.ts / {BUCKET} AS INTEGER) * {BUCKET}, 1)
  ON CONFLICT (bucket, gateway, door, type) DO UPDATE SET n = n + 1;
END""",
    f"""CREATE TRIGGER events_uncounted AFTER DELETE ON events BEGIN
  UPDATE event_counts SET n = n - 1 WHERE gateway = old.gateway AND door = coalesce(old.door, '')
    AND type = old.type AND bucket = CAST(old.ts / {BUCKET} AS INTEGER) * {BUCKET};
END""",
    "CREATE VIRTUAL TABLE users_fts USING fts5(name, content='users', content_rowid='rowid', tokenize='trigram')",
    """CREATE TRIGGER users_fts_insert AFTER INSERT ON users BEGIN
  INSERT INTO users_fts (rowid, name) VALUES (new.rowid, new.name);
END""",
    """CREATE TRIGGER users_fts_delete AFTER DELETE ON users BEGIN
  INSERT INTO users_fts (users_fts, rowid, name) VALUES ('delete', old.rowid, old.name);
END""",
    """CREATE TRIGGER users_fts_update AFTER UPDATE OF name ON users BEGIN
  INSERT INTO users_fts (users_fts, rowid, name) VALUES ('delete', old.rowid, old.name);
  INSERT INTO users_fts (rowid, name) VALUES (new.rowid, new.name);
END""",
    "INSERT INTO users_fts (users_fts) VALUES ('rebuild')",
]


def upgrade() -> None:
    bind = op.get_bind()
    op.create_table(
        "event_counts",
        sa.Column("bucket", sa.Float(), nullable=False),
        sa.Column("gateway", sa.String(length=128), nullable=False),
        sa.Column("door", sa.String(length=128), nullable=False),
        sa.Column("type", sa.String(length=64), nullable=False),
        sa.Column("n", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("bucket", "gateway", "door", "type", name=op.f("pk_event_counts")),
    )
    floor = "floor(ts / {b}) * {b}" if bind.dialect.name == "postgresql" else "CAST(ts / {b} AS INTEGER) * {b}"
    op.execute(f"""INSERT INTO event_counts (gateway, door, type, bucket, n)
        SELECT gateway, coalesce(door, ''), type, {floor.format(b=BUCKET)}, count(*) FROM events
        GROUP BY gateway, coalesce(door, ''), type, {floor.format(b=BUCKET)}""")
    for sql in PG_FUNCTIONS if bind.dialect.name == "postgresql" else SQLITE_TRIGGERS:
        op.execute(sql)


def downgrade() -> None:
    bind = op.get_bind()
    op.execute("DROP TRIGGER IF EXISTS events_counted" + (" ON events" if bind.dialect.name == "postgresql" else ""))
    op.execute("DROP TRIGGER IF EXISTS events_uncounted" + (" ON events" if bind.dialect.name == "postgresql" else ""))
    if bind.dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS event_counts_add()")
        op.execute("DROP FUNCTION IF EXISTS event_counts_remove()")
    else:
        for name in ("users_fts_insert", "users_fts_delete", "users_fts_update"):
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
        op.execute("DROP TABLE IF EXISTS users_fts")
    op.drop_table("event_counts")
