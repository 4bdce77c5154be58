"""The users list's query (GET /api/v1/users, the console's People page), written so that each part runs on
an index at 100,000 users (migration 0007):

* "the id starts with `search`": on PostgreSQL ``id LIKE 'x%'`` on ``ix_users_id_prefix``
  (varchar_pattern_ops: any collation); on SQLite, whose LIKE ignores case and so cannot use an index, the
  range ``id >= 'x' AND id < 'x' || U+10FFFF`` on the same index (byte order: exactly the ids that start
  with x), with the LIKE kept as the exact test;
* "the name contains `search`" (case-insensitive): on PostgreSQL ``name ILIKE '%x%'`` on the GIN trigram
  index ``ix_users_name_trgm``; on SQLite ``name LIKE '%x%'`` (case-insensitive there) either on the FTS5
  trigram index ``users_fts`` (migration 0009) or as a scan in id order that stops at `limit` matches. The
  scan is quick for a common part (Hopper: 1 ms) and slow for a rare one (a whole scan, 40 ms at 100,000
  users); the index the other way round (Hopper's 10,000 matches sorted: 28 ms, a rare part: 0.2 ms). So
  `user_ids` first counts the index's matches up to `PROBE`: fewer, and the index answers; as many, and the
  scan reaches `limit` matches within about limit/PROBE of the table. The index's matches are tested with
  the same LIKE (its case folding is Unicode's, LIKE's ASCII's: the index finds a superset). A part shorter
  than 3 characters has no trigram: the scan;
* the two halves, each in id order and cut at `limit`, are one UNION statement: one round trip.
"""

from __future__ import annotations

from sqlalchemy import ColumnElement, Integer, Select, String, and_, column, func, literal_column, select, table, union
from sqlalchemy.ext.asyncio import AsyncConnection

from . import schema

_TOP = "\U0010ffff"  # above every character an id may hold
#: SQLite: at this many trigram-index matches of a name part, the id-ordered scan is the quicker way.
PROBE = 1000
#: SQLite's trigram index of the names (migration 0009: FTS5, rowid = users.rowid); the column named as the
#: table is FTS5's MATCH target.
_FTS = table("users_fts", column("rowid", Integer), column("users_fts", String))


def fts_phrase(text: str) -> str:
    """`text` as one FTS5 phrase (in double quotes, its own doubled): matched as a substring by the trigram
    tokenizer, no query syntax."""
    return '"' + text.replace('"', '""') + '"'


def _fts_matches(search: str) -> Select[tuple[int]]:
    return select(_FTS.c.rowid).where(_FTS.c.users_fts.op("MATCH")(fts_phrase(search)))


def like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def user_ids_query(dialect: str, *, search: str, after: str | None, limit: int,
                   trigram: bool = False) -> Select[tuple[str]]:  # fmt: skip
    """The statement of `user_ids` (on `dialect`: "sqlite" or "postgresql"; `trigram`: SQLite's name part
    through `users_fts`)."""
    u = schema.users

    def part(*cond: ColumnElement[bool]) -> Select[tuple[str]]:
        q = select(u.c.id).where(*cond)
        if after is not None:
            q = q.where(u.c.id > after)
        return q.order_by(u.c.id).limit(limit)

    if not search:
        return part()
    esc = like_escape(search)
    prefix: list[ColumnElement[bool]] = [u.c.id.like(f"{esc}%", escape="\\")]
    name: ColumnElement[bool]
    if dialect == "sqlite":
        prefix += [u.c.id >= search, u.c.id < search + _TOP]
        # SQLite's LIKE ignores the case of ASCII letters, as its lower() does: the same test as ILIKE's
        # lower(name) LIKE lower(?), without a lower() call per row (a third of the scan's time)
        name = u.c.name.like(f"%{esc}%", escape="\\")
        if trigram:
            name = and_(literal_column("users.rowid").in_(_fts_matches(search)), name)
    else:
        name = u.c.name.ilike(f"%{esc}%", escape="\\")
    halves = [part(*prefix).subquery(), part(name).subquery()]
    both = union(*(select(h.c.id) for h in halves)).subquery()
    return select(both.c.id).order_by(both.c.id).limit(limit)


async def user_ids(c: AsyncConnection, *, search: str, after: str | None, limit: int) -> list[str]:
    """At most `limit` user ids in id order, greater than `after`, whose id starts with `search` or whose
    name contains it (no `search`: all)."""
    trigram = False
    if c.dialect.name == "sqlite" and len(search) >= 3:
        found = _fts_matches(search).limit(PROBE).subquery()
        trigram = (await c.execute(select(func.count()).select_from(found))).scalar_one() < PROBE
    q = user_ids_query(c.dialect.name, search=search, after=after, limit=limit, trigram=trigram)
    return list((await c.execute(q)).scalars())
