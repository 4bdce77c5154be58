"""The operator service (`cloud-bridge serve`): an authenticated HTTP API on one data layer (SQLAlchemy Core,
embedded SQLite or PostgreSQL). See docs/operator.md, "The operator service"."""
