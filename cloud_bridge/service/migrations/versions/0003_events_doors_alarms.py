"""events stored by the service: filter columns, exactly once per gateway and seq; gateway status; live door
state; alarms cleared

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    with op.batch_alter_table("events", schema=None) as b:
        for name in ("door", "reader", "user_id"):
            b.add_column(sa.Column(name, sa.String(length=128), nullable=True))
        b.add_column(sa.Column("card", sa.BigInteger(), nullable=True))
        b.add_column(sa.Column("result", sa.String(length=16), nullable=True))
        b.add_column(sa.Column("reason", sa.String(length=64), nullable=True))
    with op.batch_alter_table("events", schema=None) as b:
        b.create_unique_constraint(op.f("uq_events_gateway_seq"), ["gateway", "seq"])
        b.create_index("ix_events_gateway_door_ts", ["gateway", "door", "ts"], unique=False)
        b.create_index("ix_events_user_id_ts", ["user_id", "ts"], unique=False)
        b.create_index("ix_events_type_ts", ["type", "ts"], unique=False)
    with op.batch_alter_table("alarms", schema=None) as b:
        b.add_column(sa.Column("cleared_at", sa.Float(), nullable=True))
        b.create_index("ix_alarms_state_ts", ["state", "ts"], unique=False)
    op.create_table(
        "gateway_status",
        sa.Column("gateway", sa.String(length=128), nullable=False),
        sa.Column("online", sa.Boolean(), nullable=False),
        sa.Column("session", sa.BigInteger(), nullable=False),
        sa.Column("software", sa.Text(), nullable=False),
        sa.Column("rights_version", sa.BigInteger(), nullable=False),
        sa.Column("journal_depth", sa.BigInteger(), nullable=False),
        sa.Column("warnings", sa.Text(), nullable=False),
        sa.Column("last_seen", sa.Float(), nullable=True),
        sa.Column("lockdown", sa.Boolean(), nullable=False),
        sa.Column("events_upto", sa.BigInteger(), nullable=False),
        sa.Column("events_stored", sa.BigInteger(), nullable=False),
        sa.Column("duplicates", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("gateway", name=op.f("pk_gateway_status")),
    )
    op.create_table(
        "door_state",
        sa.Column("gateway", sa.String(length=128), nullable=False),
        sa.Column("door", sa.String(length=128), nullable=False),
        sa.Column("lock", sa.String(length=16), nullable=True),
        sa.Column("contact", sa.String(length=16), nullable=True),
        sa.Column("mode", sa.String(length=32), nullable=True),
        sa.Column("forced", sa.Boolean(), nullable=False),
        sa.Column("held", sa.Boolean(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("ts", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("gateway", "door", name=op.f("pk_door_state")),
    )


def downgrade() -> None:
    op.drop_table("door_state")
    op.drop_table("gateway_status")
    with op.batch_alter_table("alarms", schema=None) as b:
        b.drop_index("ix_alarms_state_ts")
        b.drop_column("cleared_at")
    with op.batch_alter_table("events", schema=None) as b:
        b.drop_index("ix_events_type_ts")
        b.drop_index("ix_events_user_id_ts")
        b.drop_index("ix_events_gateway_door_ts")
        b.drop_constraint(op.f("uq_events_gateway_seq"), type_="unique")
        for name in ("reason", "result", "card", "user_id", "reader", "door"):
            b.drop_column(name)
