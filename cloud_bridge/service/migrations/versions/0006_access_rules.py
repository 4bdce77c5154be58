"""access rules: areas, door rules and interlocks (issue 19)

Revision ID: 0006
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "areas",
        sa.Column("id", sa.String(length=128), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_areas")),
    )
    op.create_table(
        "door_rules",
        sa.Column("gateway", sa.String(length=128), nullable=False),
        sa.Column("door", sa.String(length=128), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("gateway", "door", name=op.f("pk_door_rules")),
    )
    op.create_table(
        "interlocks",
        sa.Column("gateway", sa.String(length=128), nullable=False),
        sa.Column("id", sa.String(length=128), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("gateway", "id", name=op.f("pk_interlocks")),
    )


def downgrade() -> None:
    op.drop_table("interlocks")
    op.drop_table("door_rules")
    op.drop_table("areas")
