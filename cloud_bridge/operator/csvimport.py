"""Bulk load of occupier users from CSV (seed 001): validate every row first, then apply all or nothing.

Columns (header row required, order free): ``id`` (required), ``name``, ``card`` (required: digits only,
unique in the file and on the site), ``groups`` (group ids separated by ``;``), ``active`` and
``offline_access`` (``1/0``, ``true/false``, ``yes/no``; default active, no offline access).

The file is UTF-8, with or without the byte-order mark Excel writes ("CSV UTF-8"); `decode` names every
line that is not (line and byte) unless another encoding is given (`--encoding latin-1`). Fields are bounded
(`db.MAX_NAME_CHARS` for a name, 64 characters for an id, `db.MAX_GROUPS_PER_USER` groups), so that no row
can make a change set too large for a gateway; a field over the csv module's own limit (128 KiB) is a
problem of its line like any other.

`validate` is pure: it returns the rows and a report listing every bad row with the reason; `load` writes
them in one transaction, only when the report is clean: nothing of a bad file is applied.

A file with other column names (the bulk-load wizard's "map fields" step) is read through a mapping:
`header_of` gives the file's own columns, `suggest_mapping` guesses one, `mapped` renames the header so that
`validate` reads the mapped columns (and no other) under our field names.
"""

from __future__ import annotations

import codecs
import csv
import io
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from .db import MAX_GROUPS_PER_USER, MAX_NAME_CHARS, Model, OperatorError

FIELDS = ("id", "card", "name", "groups", "active", "offline_access")
REQUIRED = ("id", "card")
_SYNONYMS = {"id": ("id", "user id", "user_id", "external id", "employee id", "username"),
             "card": ("card", "card id", "card_id", "card number", "badge", "credential"),
             "name": ("name", "full name", "display name"), "groups": ("groups", "group", "access groups"),
             "active": ("active", "enabled", "access control"),
             "offline_access": ("offline_access", "offline access", "offline")}  # fmt: skip
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
    line: int  # 1-based line number in the file where the row starts (the header is line 1)
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


def _show(text: str, limit: int = 64) -> str:
    """A field quoted for a message: a long one is cut, with its length."""
    return repr(text) if len(text) <= limit else f"{text[: limit // 2]!r}... ({len(text):,} characters)"


def decode(data: bytes, encoding: str = "utf-8") -> tuple[str, list[Problem]]:
    """The text of a CSV file's bytes. UTF-8 (the default) may start with a byte-order mark. Every line that
    does not decode is a problem naming its line and the first bad byte; the text is then empty."""
    try:
        name = codecs.lookup(encoding).name
    except LookupError:
        raise OperatorError(f"unknown encoding {encoding!r} (e.g. utf-8, latin-1, cp1252)") from None
    if name == "utf-8":
        data = data.removeprefix(codecs.BOM_UTF8)
    try:
        return data.decode(name), []
    except UnicodeDecodeError:
        pass
    problems: list[Problem] = []
    for i, raw in enumerate(data.split(b"\n")):
        try:
            raw.decode(name)
        except UnicodeDecodeError as e:
            hint = ("save it as UTF-8 (Excel: \"CSV UTF-8\") or pass --encoding, e.g. latin-1" if name == "utf-8"
                    else f"is it really {encoding}?")  # fmt: skip
            why = f"byte 0x{raw[e.start]:02X} at byte {e.start + 1} of the line is not {encoding}"
            problems.append(Problem(i + 1, "(file)", f"{why}: the file must be {encoding}; {hint}"))
    return "", problems


def _records(reader: Iterator[list[str]], line_num: Callable[[], int]) -> Iterator[tuple[int, list[str] | str]]:
    """(first line, record) for every record; (line, error) for a record the csv module refuses (a field
    over its size limit, a NUL byte...): reading goes on with the next record."""
    start = line_num() + 1
    while True:
        try:
            rec = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            why = str(e)
            if "field larger than field limit" in why:
                why = (f"a field is longer than {csv.field_size_limit():,} characters (a name may have "
                       f"{MAX_NAME_CHARS})")  # fmt: skip
            yield start, f"cannot read the row: {why}"
        else:
            yield start, rec
        start = line_num() + 1


def header_of(text: str) -> list[str]:
    """The file's first record (its column names), stripped; [] for an empty file."""
    try:
        first = next(csv.reader(io.StringIO(text.removeprefix("\ufeff"))), [])
    except csv.Error:
        return []
    return [h.strip() for h in first]


def suggest_mapping(header: list[str]) -> dict[str, str]:
    """field -> column for the columns whose name says what they hold (case and spacing ignored)."""
    norm = {h.strip().lower().replace("-", " "): h for h in header}
    out: dict[str, str] = {}
    for f, names in _SYNONYMS.items():
        for n in names:
            if n in norm:
                out[f] = norm[n]
                break
    return out


def check_mapping(header: list[str], mapping: dict[str, str]) -> None:
    """OperatorError naming the field of a mapping that does not fit the file."""
    for f, col in mapping.items():
        if f not in FIELDS:
            raise OperatorError(f"{f!r} is not a field (fields: {', '.join(FIELDS)})")
        if col not in header:
            raise OperatorError(f"field {f}: the file has no column {col!r} (columns: {', '.join(header)})")
    for f in REQUIRED:
        if f not in mapping:
            raise OperatorError(f"field {f}: map a column to it (it is required)")
    cols = list(mapping.values())
    for col in cols:
        if cols.count(col) > 1:
            raise OperatorError(f"column {col!r} is mapped to two fields")


def mapped(text: str, mapping: dict[str, str]) -> Iterator[str]:
    """The file's lines with its header renamed: the column mapped to a field carries the field's name,
    every other column a name `validate` ignores. Line numbers stay those of the file."""
    lines = io.StringIO(text.removeprefix("\ufeff"))
    first = lines.readline()
    header = [h.strip() for h in next(csv.reader([first]), [])]
    by_col = {col: f for f, col in mapping.items()}
    out = io.StringIO()
    csv.writer(out).writerow([by_col.get(h, f"_unmapped_{i}") for i, h in enumerate(header)])
    yield out.getvalue()
    yield from lines


def validate(
    text: str | Iterable[str], *, existing_cards: dict[int, str], existing_users: set[str], groups: set[str],
    progress: Progress | None = None,
) -> Report:  # fmt: skip
    """Check every row; collect every problem (not only the first)."""
    if isinstance(text, str):
        text = text.removeprefix("\ufeff")
    lines = io.StringIO(text) if isinstance(text, str) else text
    reader = csv.reader(lines)
    rep = Report()
    records = _records(reader, lambda: reader.line_num)
    first = next(records, (1, []))
    if isinstance(first[1], str):
        rep.problems.append(Problem(first[0], "(header)", first[1]))
        return rep
    header = [h.strip().lower() for h in first[1]]
    if header:
        header[0] = header[0].removeprefix("\ufeff")  # a BOM read through an already decoded stream
    for col in ("id", "card"):
        if col not in header:
            rep.problems.append(Problem(1, col, f"missing column {col!r} (header: {', '.join(header) or 'empty'})"))
    if rep.problems:
        return rep
    ix = {h: i for i, h in enumerate(header)}
    seen_cards: dict[int, int] = {}
    seen_ids: dict[str, int] = {}
    raw = list(records)
    total = len(raw)

    def get(rec: list[str], col: str) -> str:
        i = ix.get(col)
        return rec[i].strip() if i is not None and i < len(rec) else ""

    for n, (line, rec) in enumerate(raw):
        if progress is not None and n % 5000 == 0:
            progress(n, total)
        if isinstance(rec, str):
            rep.problems.append(Problem(line, "(row)", rec))
            continue
        if not any(f.strip() for f in rec):
            continue
        bad = False
        uid = get(rec, "id")
        if not _IDENT.match(uid):
            rep.problems.append(Problem(line, "id", f"{_show(uid)} is not a valid user id (1-64 letters, digits or "
                                                    "_ . : @ -)"))  # fmt: skip
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
            rep.problems.append(Problem(line, "card", f"card ID {_show(card_s)} is not numeric"))
            bad = True
        elif len(card_s) > 19 or (card := int(card_s)) >= 2**63:
            rep.problems.append(Problem(line, "card", f"card ID {card_s[:30]}{'...' if len(card_s) > 30 else ''} "
                                                      "is too large (at most 2^63 - 1)"))  # fmt: skip
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
        name = get(rec, "name")
        if len(name) > MAX_NAME_CHARS:
            rep.problems.append(Problem(line, "name", f"{len(name):,} characters: a name may have at most "
                                                      f"{MAX_NAME_CHARS}"))  # fmt: skip
            bad = True
        gs = tuple(dict.fromkeys(g.strip() for g in get(rec, "groups").split(";") if g.strip()))
        if len(gs) > MAX_GROUPS_PER_USER:
            rep.problems.append(Problem(line, "groups", f"{len(gs)} groups: a user may be in at most "
                                                        f"{MAX_GROUPS_PER_USER}"))  # fmt: skip
            bad = True
            gs = ()
        for g in gs:
            if g not in groups:
                rep.problems.append(Problem(line, "groups", f"unknown group {_show(g)}"))
                bad = True
        flags: dict[str, bool] = {}
        for col, default in (("active", True), ("offline_access", False)):
            v = get(rec, col).lower()
            b = _BOOL.get(v, default) if v in _BOOL else None
            if b is None and v not in _BOOL:
                rep.problems.append(Problem(line, col, f"{_show(v)} is not yes/no"))
                bad = True
            flags[col] = default if b is None else b
        if not bad:
            rep.rows.append(Row(line, uid, name, card, gs, flags["active"], flags["offline_access"]))
    if progress is not None:
        progress(total, total)
    return rep


def load(db: Model, text: bytes | str | Iterable[str], *, encoding: str = "utf-8", progress: Progress | None = None
         ) -> Report:  # fmt: skip
    """Validate against the site and, when every row is good, insert them all in one transaction.
    Raises `ImportFailed` (with the report) and changes nothing otherwise. Bytes are decoded first
    (`decode`: UTF-8 with or without a BOM unless `encoding` says otherwise)."""
    if isinstance(text, bytes):
        text, problems = decode(text, encoding)
        if problems:
            raise ImportFailed(Report(problems=problems))
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
