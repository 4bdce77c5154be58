"""The rights store: the rights on disk (SQLite through aiosqlite, WAL) and the in-memory index they feed.

* `service.py`: `Store`, the service (open, verify and recover; apply; replace by a snapshot; compaction;
  the integrity check and the verified copy) and the one writer of the rights tables.
* `plan.py`: the change-set planner, one handler per change kind (`HANDLERS`, by the change's type); it
  validates a change set against the rights in force and turns it into a `Plan` of rows.
* `schema.py`: the tables and their migrations, the body codecs, reading the rows into an index, and the
  rights checksum (`meta.rights_digest`).

The SQLite plumbing and the GIL hand-over of bulk work it shares with the journal are in `edge._sqlite`.
"""

from edge._sqlite import (
    background_connection,
    dispose,
    fsync_dir,
    gc_paused,
    in_background,
    lower_thread_priority,
    move_aside,
    pause,
)
from edge.events import RIGHTS_DAMAGED

from .plan import HANDLERS, INLINE_COMPILE, PLAN_SLICE, Plan, plan_changes, user_flags
from .schema import (
    DAMAGE_ERRORS,
    META_DIGEST,
    MIGRATIONS,
    SCHEMA_VERSION,
    STAGE_SLICE,
    Damaged,
    read_digest,
    read_index,
)
from .service import COMPACT_AT, DAMAGED, ApplyResult, Store

#: The name the migrations had in the single-module store (tests build old files from it).
_MIGRATIONS = MIGRATIONS

__all__ = [
    "COMPACT_AT",
    "DAMAGED",
    "DAMAGE_ERRORS",
    "HANDLERS",
    "INLINE_COMPILE",
    "META_DIGEST",
    "MIGRATIONS",
    "PLAN_SLICE",
    "RIGHTS_DAMAGED",
    "SCHEMA_VERSION",
    "STAGE_SLICE",
    "ApplyResult",
    "Damaged",
    "Plan",
    "Store",
    "background_connection",
    "dispose",
    "fsync_dir",
    "gc_paused",
    "in_background",
    "lower_thread_priority",
    "move_aside",
    "pause",
    "plan_changes",
    "read_digest",
    "read_index",
    "user_flags",
]
