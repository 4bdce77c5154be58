"""indexes for the list endpoints at 100,000 users and 1,000,000 events (issues 14, 15)

* events: the filter indexes end in (ts, id), the order of every events page (newest first, keyset on
  (ts, id)), so a page filtered by user, door or type reads its 50 rows from the index in order, no sort;
* users: `ix_users_id_prefix` answers "the id starts with" (on PostgreSQL with varchar_pattern_ops, so
  LIKE 'x%' uses it whatever the database's collation); `ix_users_name_trgm` replaces `ix_users_name`: on
  PostgreSQL a GIN trigram index (pg_trgm, in Debian's postgresql package) for "a part of the name"
  (ILIKE '%x%'), on SQLite the same plain index on name as before. Where the extension cannot be created
  (no contrib, no privilege), a plain index stands in: search still works, only slower.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | None = None
depends_on: str | None = None

EVENTS_OLD = {
    "ix_events_gateway_door_ts": ["gateway", "door", "ts"],
    "ix_events_user_id_ts": ["user_id", "ts"],
    "ix_events_type_ts": ["type", "ts"],
}
EVENTS_NEW = {
    "ix_events_gateway_door_ts_id": ["gateway", "door", "ts", "id"],
    "ix_events_user_id_ts_id": ["user_id", "ts", "id"],
    "ix_events_type_ts_id": ["type", "ts", "id"],
}


def _trigram_available(bind: sa.Connection) -> bool:
    """CREATE EXTENSION pg_trgm (trusted since PostgreSQL 13: the database owner may); False if it fails."""
    if bind.execute(sa.text("SELECT 1 FROM pg_extension WHERE extname = 'pg_trgm'")).scalar():
        return True
    try:
        with bind.begin_nested():
            bind.execute(sa.text("CREATE EXTENSION IF NOT EXISTS pg_trgm"))
    except sa.exc.DBAPIError:
        return False
    return True


def upgrade() -> None:
    bind = op.get_bind()
    for name, cols in EVENTS_NEW.items():
        op.create_index(name, "events", cols)
    for name in EVENTS_OLD:
        op.drop_index(name, table_name="events")
    op.drop_index("ix_users_name", table_name="users")
    if bind.dialect.name == "postgresql":
        op.create_index("ix_users_id_prefix", "users", ["id"], postgresql_ops={"id": "varchar_pattern_ops"})
        if _trigram_available(bind):
            op.create_index("ix_users_name_trgm", "users", ["name"], postgresql_using="gin",
                            postgresql_ops={"name": "gin_trgm_ops"})  # fmt: skip
        else:
            op.create_index("ix_users_name_trgm", "users", ["name"])
    else:
        op.create_index("ix_users_id_prefix", "users", ["id"])
        op.create_index("ix_users_name_trgm", "users", ["name"])


def downgrade() -> None:
    op.drop_index("ix_users_name_trgm", table_name="users")
    op.drop_index("ix_users_id_prefix", table_name="users")
    op.create_index("ix_users_name", "users", ["name"])
    for name, cols in EVENTS_OLD.items():
        op.create_index(name, "events", cols)
    for name in EVENTS_NEW:
        op.drop_index(name, table_name="events")
