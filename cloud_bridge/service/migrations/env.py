"""Alembic environment: migrations run on the connection `database.migrate` hands over (SQLite or PostgreSQL)."""

from __future__ import annotations

from alembic import context

from cloud_bridge.service.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through cloud_bridge.service.database.Database.migrate()")
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True, compare_type=True)
with context.begin_transaction():
    context.run_migrations()
