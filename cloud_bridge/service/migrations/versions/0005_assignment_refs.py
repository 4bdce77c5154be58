"""assignment_refs: entitlement assignments by an identity manager's external id

Revision ID: 0005
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "assignment_refs",
        sa.Column("external_id", sa.String(length=128), nullable=False),
        sa.Column("assignment_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["assignment_id"],
            ["assignments.id"],
            ondelete="CASCADE",
            name=op.f("fk_assignment_refs_assignment_id_assignments"),
        ),
        sa.PrimaryKeyConstraint("external_id", name=op.f("pk_assignment_refs")),
        sa.UniqueConstraint("assignment_id", name=op.f("uq_assignment_refs_assignment_id")),
    )


def downgrade() -> None:
    op.drop_table("assignment_refs")
