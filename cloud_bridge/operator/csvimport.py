"""Bulk load of occupier users from CSV (seed 001): validate every row first, then apply all or nothing.

Columns (header row required, order free): ``id`` (required), ``name``, ``card`` (required: digits only,
unique in the file and on the site), ``groups`` (group ids separated by ``;``), ``active`` and
``offline_access`` (``1/0``, ``true/false``, ``yes/no``; default active, no offline access).

`validate` is pure: it returns the rows and a report listing every bad row with the reason; `apply` writes
them in one transaction, only when the report is clean.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .db import Model, OperatorError

_IDENT = re.compile(r"^[A-Za-z0-9_.:@\-]{1,64}$")
_BOOL = {"1": True, "true": True, "yes": True, "y": True, "0": False, "false": False, "no": False, "n": False, "": None}
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Row:
    line: int
    id: str
    name: str
    card: int
    groups: tuple[str, ...]
    active: bool = True
    offline_access: bool = False


@dataclass(frozen=True)
class Problem:
    line: int  # 1-based line number in the file (the header is line 1)
    column: str
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.column}: {self.reason}"


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    imported: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def text(self, limit: int = 50) -> str:
        if self.ok:
            return f"{self.imported or len(self.rows)} users imported"
        lines = [f"nothing imported: {len(self.problems)} problem(s) in the file"]
        lines += [f"  {p}" for p in self.problems[:limit]]
        if len(self.problems) > limit:
            lines.append(f"  ... and {len(self.problems) - limit} more")
        return "\n".join(lines)


class ImportFailed(OperatorError):
    def __init__(self, report: Report) -> None:
        super().__init__(report.text())
        self.report = report


def validate(
    text: str | Iterable[str], *, existing_cards: dict[int, str], existing_users: set[str], groups: set[str],
    progress: Progress | None = None,
) -> Report:  # fmt: skip
    """Check every row; collect every problem (not only the first)."""
    lines = io.StringIO(text) if isinstance(text, str) else text
    reader = csv.reader(lines)
    rep = Report()
    header = [h.strip().lower() for h in next(reader, [])]
    for col in ("id", "card"):
        if col not in header:
            rep.problems.append(Problem(1, col, f"missing column {col!r} (header: {', '.join(header) or 'empty'})"))
    if rep.problems:
        return rep
    ix = {h: i for i, h in enumerate(header)}
    seen_cards: dict[int, int] = {}
    seen_ids: dict[str, int] = {}
    raw = list(reader)
    total = len(raw)

    def get(rec: list[str], col: str) -> str:
        i = ix.get(col)
        return rec[i].strip() if i is not None and i < len(rec) else ""

    for n, rec in enumerate(raw):
        line = n + 2
        if progress is not None and n % 5000 == 0:
            progress(n, total)
        if not any(f.strip() for f in rec):
            continue
        bad = False
        uid = get(rec, "id")
        if not _IDENT.match(uid):
            rep.problems.append(Problem(line, "id", f"{uid!r} is not a valid user id"))
            bad = True
        elif uid in seen_ids:
            rep.problems.append(Problem(line, "id", f"user {uid!r} is also on line {seen_ids[uid]}"))
            bad = True
        elif uid in existing_users:
            rep.problems.append(Problem(line, "id", f"user {uid!r} already exists"))
            bad = True
        else:
            seen_ids[uid] = line
        card_s = get(rec, "card")
        card = -1
        if not (card_s.isascii() and card_s.isdigit()):
            rep.problems.append(Problem(line, "card", f"card ID {card_s!r} is not numeric"))
            bad = True
        elif (card := int(card_s)) >= 2**63:
            rep.problems.append(Problem(line, "card", f"card ID {card_s} is too large"))
            bad = True
        elif card in seen_cards:
            rep.problems.append(
                Problem(line, "card", f"card {card} is duplicated in the file (line {seen_cards[card]})")
            )
            bad = True
        elif card in existing_cards:
            rep.problems.append(Problem(line, "card", f"card {card} is already assigned to {existing_cards[card]}"))
            bad = True
        else:
            seen_cards[card] = line
        gs = tuple(g.strip() for g in get(rec, "groups").split(";") if g.strip())
        for g in gs:
            if g not in groups:
                rep.problems.append(Problem(line, "groups", f"unknown group {g!r}"))
                bad = True
        flags: dict[str, bool] = {}
        for col, default in (("active", True), ("offline_access", False)):
            v = get(rec, col).lower()
            b = _BOOL.get(v, default) if v in _BOOL else None
            if b is None and v not in _BOOL:
                rep.problems.append(Problem(line, col, f"{v!r} is not yes/no"))
                bad = True
            flags[col] = default if b is None else b
        if not bad:
            rep.rows.append(Row(line, uid, get(rec, "name"), card, gs, flags["active"], flags["offline_access"]))
    if progress is not None:
        progress(total, total)
    return rep


def load(db: Model, text: str | Iterable[str], *, progress: Progress | None = None) -> Report:
    """Validate against the site and, when every row is good, insert them all in one transaction.
    Raises `ImportFailed` (with the report) and changes nothing otherwise."""
    cards = {int(c): f"user {u!r}" for c, u in db.con.execute("SELECT card, user_id FROM credentials")}
    cards |= {int(c): f"badge pool {loc!r}" for c, loc in db.con.execute("SELECT card, location FROM badges")}
    users = {str(r[0]) for r in db.con.execute("SELECT id FROM users")}
    groups = {str(r[0]) for r in db.con.execute("SELECT id FROM groups")}
    rep = validate(text, existing_cards=cards, existing_users=users, groups=groups, progress=progress)
    if not rep.ok:
        raise ImportFailed(rep)
    with db.tx() as c:
        c.executemany("INSERT INTO users (id, name, active, offline_access) VALUES (?,?,?,?)",
                      [(r.id, r.name, int(r.active), int(r.offline_access)) for r in rep.rows])  # fmt: skip
        c.executemany("INSERT INTO credentials (card, user_id) VALUES (?,?)", [(r.card, r.id) for r in rep.rows])
        c.executemany("INSERT INTO assignments (user_id, group_id) VALUES (?,?)",
                      [(r.id, g) for r in rep.rows for g in r.groups])  # fmt: skip
    rep.imported = len(rep.rows)
    return rep
