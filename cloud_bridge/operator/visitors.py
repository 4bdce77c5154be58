"""Visitors (seed 004): badge pools per location, a badge issued anew for each visit.

A visit makes a visitor user (``visit-<n>``) holding the pool's badge as its card and the chosen groups,
valid from sign-in until the end of the site's local day (or an earlier `until`). The end travels to the
gateway as the window of the assignments and of the card, so the gateway enforces it even while offline.
Sign-out deletes the visitor user (the badge is free again at once); a visit that ran past its end is
removed by the next publish, and its badge can then be issued again.

These functions work on the CLI's SQLite `Model`; the service does the same on its own tables
(service/visitors.py), with the rules shared from here (`visit_end`, `parse_card`).
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from .db import Conflict, Model, NotFound, OperatorError, check_ident, parse_card


def end_of_local_day(ts: float, tz: str) -> float:
    """The next local midnight after `ts` in `tz` (UTC seconds)."""
    z = ZoneInfo(tz)
    local = datetime.fromtimestamp(ts, z)
    midnight = datetime.combine(local.date() + timedelta(days=1), datetime.min.time(), z)
    return midnight.timestamp()


def visit_end(now: float, tz: str, until: float | None = None) -> float:
    """When a visit signed in at `now` ends: the end of the site's local day, or `until` if earlier.
    The one rule of a visit's length, used here and by the service (service/visitors.py)."""
    ends = end_of_local_day(now, tz)
    if until is not None:
        if until <= now:
            raise OperatorError("a visit must end after it starts")
        ends = min(ends, until)
    return ends


def add_badge(db: Model, location: str, card: str | int, *, name: str = "", badge_type: str = "") -> int:
    check_ident("location", location)
    n = parse_card(card)  # "numeric only": anything else is a validation error
    with db.tx() as c:
        if (owner := db.card_owner(n)) is not None:
            raise Conflict(
                f"badge {n} is already {'in ' + owner if owner.startswith('badge') else 'assigned to ' + owner}"
            )
        c.execute("INSERT INTO badges (card, location, name, type) VALUES (?,?,?,?)", (n, location, name, badge_type))
    return n


def issue(
    db: Model, *, visitor: str, location: str, badge: int, groups: list[str], tz: str,
    now: float | None = None, until: float | None = None,
) -> tuple[int, str, float]:  # fmt: skip
    """Issue `badge` for a new visit; returns (visit id, visitor user id, end time)."""
    t = time.time() if now is None else now
    ends = visit_end(t, tz, until)
    if not groups:
        raise OperatorError("a visitor badge needs at least one group")
    with db.tx() as c:
        row = c.execute("SELECT location FROM badges WHERE card=?", (badge,)).fetchone()
        if row is None:
            raise NotFound(f"badge {badge} is in no badge pool")
        if row[0] != location:
            raise OperatorError(f"badge {badge} belongs to location {row[0]!r}, not {location!r}")
        busy = c.execute("SELECT id FROM visits WHERE badge=? AND signed_out IS NULL AND ends>?", (badge, t)).fetchone()
        if busy is not None:
            raise Conflict(f"badge {badge} is in use by visit {busy[0]}")
        for g in groups:
            if not db.group_exists(g):
                raise NotFound(f"unknown group {g!r}")
        # a previous visit with this badge that has ended: its user and card go now
        for (uid,) in c.execute("SELECT user_id FROM visits WHERE badge=? AND signed_out IS NULL", (badge,)).fetchall():
            c.execute("DELETE FROM users WHERE id=?", (uid,))
            c.execute("UPDATE visits SET signed_out=? WHERE user_id=?", (t, uid))
        vid = int(c.execute("SELECT coalesce(max(id), 0) + 1 FROM visits").fetchone()[0])
        uid = f"visit-{vid}"
        c.execute("INSERT INTO users (id, name, kind, valid_from, valid_until) VALUES (?,?,?,?,?)",
                  (uid, visitor, "visitor", t, ends))  # fmt: skip
        # the card row moves from the pool to the visitor for the visit (the badge row stays: it is the pool)
        c.execute("INSERT INTO credentials (card, user_id, valid_from, valid_until) VALUES (?,?,?,?)",
                  (badge, uid, t, ends))  # fmt: skip
        c.executemany("INSERT INTO assignments (user_id, group_id, valid_from, valid_until) VALUES (?,?,?,?)",
                      [(uid, g, t, ends) for g in groups])  # fmt: skip
        c.execute("INSERT INTO visits (id, visitor, badge, location, user_id, started, ends) VALUES (?,?,?,?,?,?,?)",
                  (vid, visitor, badge, location, uid, t, ends))  # fmt: skip
    return vid, uid, ends


def sign_out(db: Model, visit: int, *, now: float | None = None) -> str:
    t = time.time() if now is None else now
    with db.tx() as c:
        row = c.execute("SELECT user_id, signed_out FROM visits WHERE id=?", (visit,)).fetchone()
        if row is None:
            raise NotFound(f"no visit {visit}")
        if row[1] is not None:
            raise Conflict(f"visit {visit} is already signed out")
        c.execute("DELETE FROM users WHERE id=?", (row[0],))
        c.execute("UPDATE visits SET signed_out=? WHERE id=?", (t, visit))
    return str(row[0])
