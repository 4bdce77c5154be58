"""/api/v1/imports: seed 001's bulk load over the API. Upload, map the columns, dry-run, commit, publish.

    POST /api/v1/imports?filename=users.csv      (body: the CSV file)  -> a job: its columns, a suggested mapping
    POST /api/v1/imports/{id}/dry-run  {"columns": {"id": "Employee", "card": "Card ID"}, "defaults": {...}}
    GET  /api/v1/imports/{id}                     -> state, progress {phase, done, total}, the report
    POST /api/v1/imports/{id}/commit   {"publish": true}
    GET  /api/v1/imports/{id}                     -> state "done", result {imported, published}

The rows are read by `cloud_bridge.operator.csvimport` (its decoding, limits and checks), through the
mapping; the report lists every bad row (the row's line in the file, the field, the file's column, the
message). A dry-run applies nothing. A commit validates again inside its one write transaction (the site
may have changed since the dry-run) and inserts users, cards and assignments in it: any bad row, or any
error, and nothing is applied. Then, when asked, the site is published (needs update on the gateways).

Dry-run and commit run as tasks of the service (202 at once; poll the job for progress). Jobs are kept in
the database (`import_jobs`, migration 0008: the file, mapping, state, phase, the per-row report, the
result), one operator's own (another operator gets 404), for `JOB_TTL_S`; at most `MAX_JOBS`. The live
row count of a running phase is in the service's memory; the database has each phase as it starts and
ends (a commit's writes are one transaction: nothing else is written while it runs). A job found running
when the service starts (`recover`) is marked failed, saying what was interrupted: a dry-run or a commit
applied nothing (the commit's transaction never committed); an interrupted publish left the rows imported
and unpublished (publish again).
Each row also needs the operator's permission to create that user and that card (a refusal is a problem of
that row).
"""

# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import msgspec
from litestar import Controller, Request, delete, get, post
from litestar.params import FromPath, JSONBody
from msgspec import Meta
from sqlalchemy import delete as sql_delete
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from cloud_bridge.operator import csvimport
from cloud_bridge.operator.db import MAX_GROUPS_PER_USER, OperatorError
from cloud_bridge.permissions import Action, Authorizer, ObjectType, Operator, Target
from edge.model import Ident

from . import audit, auth, schema
from .core import ServiceState, authorizer, permitted, principal_of, state_of, target_for
from .database import Database
from .errors import BadRequest, Conflict, NotFound
from .planner import bulk_insert

MAX_UPLOAD_BYTES = 64 * 1024 * 1024
MAX_JOBS = 16
JOB_TTL_S = 3600.0
MAX_REPORTED = 1000
CHUNK = 5000
State = Literal["uploaded", "validating", "validated", "invalid", "committing", "publishing", "done", "failed"]


class Defaults(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Bulk settings for every row: groups added to each, and active / offline access where the file has
    no such column."""

    groups: Annotated[list[Ident], Meta(max_length=MAX_GROUPS_PER_USER)] = []
    active: bool = True
    offline_access: bool = False


class DryRun(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    #: field (id, card, name, groups, active, offline_access) -> the file's column; id and card are required.
    columns: dict[str, Annotated[str, Meta(max_length=256)]]
    defaults: Defaults = msgspec.field(default_factory=Defaults)


class Commit(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    publish: bool = True
    timeout: Annotated[float, Meta(gt=0, le=300)] = 60.0


class RowProblem(msgspec.Struct, kw_only=True):
    #: The line of the file where the row starts (the header is line 1).
    row: int
    field: str
    #: The file's column the field was mapped to ("" for the file or the row as a whole).
    column: str
    message: str


class Report(msgspec.Struct, kw_only=True):
    ok: bool
    #: Rows that would be (or were) imported.
    rows: int
    problem_count: int
    #: The first MAX_REPORTED problems, in file order.
    problems: list[RowProblem]


class Progress(msgspec.Struct, kw_only=True):
    phase: str
    done: int
    total: int


class ImportOut(msgspec.Struct, kw_only=True):
    id: str
    filename: str
    state: str
    created: float
    columns: list[str]
    suggested: dict[str, str]
    progress: Progress
    mapping: dict[str, str] | None = None
    report: Report | None = None
    #: After a commit: {"imported": n, "published": {gateway: version or "error: ..."}, ...}.
    result: dict[str, Any] | None = None
    error: str | None = None


class JobDetail(msgspec.Struct, kw_only=True):
    """What a job row keeps as JSON (`import_jobs.detail`)."""

    decode_problems: list[tuple[int, str, str]]
    columns: list[str]
    mapping: dict[str, str] | None = None
    defaults: Defaults = msgspec.field(default_factory=Defaults)
    report: Report | None = None
    result: dict[str, Any] | None = None


_detail_dec = msgspec.json.Decoder(JobDetail)
RUNNING = ("validating", "committing", "publishing")


@dataclass
class Job:
    id: str
    owner: str
    filename: str
    text: str
    decode_problems: list[csvimport.Problem]
    columns: list[str]
    created: float = field(default_factory=time.time)
    state: State = "uploaded"
    phase: str = "uploaded"
    done: int = 0
    total: int = 0
    mapping: dict[str, str] | None = None
    defaults: Defaults = field(default_factory=Defaults)
    report: Report | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    task: asyncio.Task[None] | None = None

    def out(self) -> ImportOut:
        return ImportOut(id=self.id, filename=self.filename, state=self.state, created=self.created,
                         columns=self.columns, suggested=csvimport.suggest_mapping(self.columns),
                         progress=Progress(phase=self.phase, done=self.done, total=self.total),
                         mapping=self.mapping, report=self.report, result=self.result, error=self.error)  # fmt: skip

    def step(self, done: int, total: int) -> None:
        self.done, self.total = done, total

    def row(self) -> dict[str, Any]:
        detail = JobDetail(decode_problems=[(p.line, p.column, p.reason) for p in self.decode_problems],
                           columns=self.columns, mapping=self.mapping, defaults=self.defaults, report=self.report,
                           result=self.result)  # fmt: skip
        return {"id": self.id, "owner": self.owner, "filename": self.filename, "created": self.created,
                "updated": time.time(), "state": self.state, "phase": self.phase, "done": self.done,
                "total": self.total, "text": self.text, "detail": msgspec.json.encode(detail).decode(),
                "error": self.error}  # fmt: skip

    @classmethod
    def of_row(cls, r: Any) -> Job:
        d = _detail_dec.decode(r.detail)
        return cls(id=r.id, owner=r.owner, filename=r.filename, text=r.text, columns=d.columns,
                   decode_problems=[csvimport.Problem(line, col, why) for line, col, why in d.decode_problems],
                   created=r.created, state=r.state, phase=r.phase, done=int(r.done), total=int(r.total),
                   mapping=d.mapping, defaults=d.defaults, report=d.report, result=d.result, error=r.error)  # fmt: skip


def _jobs(st: ServiceState) -> dict[str, Job]:
    """The jobs this process holds (running ones, and those read back from the database)."""
    jobs: dict[str, Job] = st.extra.setdefault("imports", {})
    return jobs


async def save(st: ServiceState, job: Job) -> None:
    """The job as it is now into the database (its own short transaction: never inside a commit's)."""
    j = schema.import_jobs
    async with st.db.write() as c:
        row = job.row()
        if (await c.execute(update(j).where(j.c.id == job.id).values(**row))).rowcount == 0:
            await c.execute(j.insert().values(**row))


async def _expire(st: ServiceState) -> int:
    """Forget jobs older than JOB_TTL_S (not running); returns how many jobs are left."""
    j, now = schema.import_jobs, time.time()
    async with st.db.write() as c:
        await c.execute(sql_delete(j).where(j.c.updated < now - JOB_TTL_S, j.c.state.not_in(RUNNING)))
        n = int((await c.execute(select(func.count()).select_from(j))).scalar_one())
    jobs = _jobs(st)
    for jid in [k for k, v in jobs.items() if now - v.created > JOB_TTL_S and not _busy(v)]:
        del jobs[jid]
    return n


async def _job(st: ServiceState, jid: str, operator: str) -> Job:
    job = _jobs(st).get(jid)
    if job is None:
        j = schema.import_jobs
        async with st.db.read() as c:
            r = (await c.execute(select(j).where(j.c.id == jid))).first()
        if r is not None:
            job = _jobs(st)[jid] = Job.of_row(r)
    if job is None or job.owner != operator:
        raise NotFound(f"no import {jid!r}")
    return job


async def recover(db: Database) -> int:
    """At start: every job the database has as running was cut off by a stop of the service. Mark it failed,
    saying so. Returns how many."""
    j, now = schema.import_jobs, time.time()
    said = {
        "validating": "interrupted: the service stopped during the dry-run; run the dry-run again",
        "committing": "interrupted: the service stopped during the commit; its transaction never committed, "
                      "nothing was imported; run the dry-run and the commit again",
        "publishing": "interrupted: the service stopped during the publish; the rows were imported, the "
                      "gateways may not have them yet: publish again",
    }  # fmt: skip
    n = 0
    async with db.write() as c:
        for state, why in said.items():
            r = await c.execute(update(j).where(j.c.state == state)
                                .values(state="failed", phase="interrupted", error=why, updated=now))  # fmt: skip
            n += int(r.rowcount or 0)
    return n


# --- validation ---------------------------------------------------------------------------------------------


@dataclass
class SiteNow:
    cards: dict[int, str]
    users: set[str]
    groups: set[str]


async def site_now(c: AsyncConnection) -> SiteNow:
    cr, b = schema.credentials, schema.badges
    cards = {int(k): f"user {u!r}" for k, u in (await c.execute(select(cr.c.card, cr.c.user_id))).all()}
    cards |= {int(k): f"badge pool {loc!r}" for k, loc in (await c.execute(select(b.c.card, b.c.location))).all()}
    users = set((await c.execute(select(schema.users.c.id))).scalars())
    groups = set((await c.execute(select(schema.groups.c.id))).scalars())
    return SiteNow(cards=cards, users=users, groups=groups)


def _per_object(authz: Authorizer, op: Operator, object_type: ObjectType, action: Action) -> bool:
    """Whether the operator's verdict on `action` may differ between objects of `object_type` (a matching
    line limited by `applies_to`); if not, one check stands for every row. Users and cards carry no tags,
    so a tag-limited line never matches any of them."""
    for gid in op.groups:
        g = authz.groups.get(gid)
        for line in g.permissions if g is not None else ():
            if line.object_type in (object_type, ObjectType.ALL) and action in line.actions and line.applies_to:
                return True
    return False


def check(job: Job, now: SiteNow, authz: Authorizer, op: Operator,
          progress: Callable[[int, int], None]) -> tuple[list[csvimport.Row], Report]:  # fmt: skip
    """Validate the job's file through its mapping against the site as it is (pure; runs in a thread)."""
    assert job.mapping is not None
    col_of = dict(job.mapping)
    problems = list(job.decode_problems)
    rows: list[csvimport.Row] = []
    if not problems:
        rep = csvimport.validate(csvimport.mapped(job.text, job.mapping), existing_cards=now.cards,
                                 existing_users=now.users, groups=now.groups, progress=progress)  # fmt: skip
        problems = rep.problems
        d = job.defaults
        per_user = _per_object(authz, op, ObjectType.USER, Action.CREATE)
        per_card = _per_object(authz, op, ObjectType.CREDENTIAL, Action.CREATE)
        any_user = authz.check(op, Action.CREATE, Target(ObjectType.USER, "*")).allowed
        any_card = authz.check(op, Action.CREATE, Target(ObjectType.CREDENTIAL, "*")).allowed
        for r in rep.rows:
            if not (authz.check(op, Action.CREATE, Target(ObjectType.USER, r.id)).allowed if per_user else any_user):
                problems.append(csvimport.Problem(r.line, "id", f"you may not create user {r.id!r}"))
                continue
            if not (authz.check(op, Action.CREATE, Target(ObjectType.CREDENTIAL, str(r.card))).allowed if per_card
                    else any_card):  # fmt: skip
                problems.append(csvimport.Problem(r.line, "card", f"you may not create card {r.card}"))
                continue
            groups = tuple(dict.fromkeys((*r.groups, *d.groups)))
            if len(groups) > MAX_GROUPS_PER_USER:
                problems.append(csvimport.Problem(r.line, "groups", f"{len(groups)} groups with the bulk "
                                                  f"settings' (at most {MAX_GROUPS_PER_USER})"))  # fmt: skip
                continue
            active = r.active if "active" in col_of else d.active
            offline = r.offline_access if "offline_access" in col_of else d.offline_access
            rows.append(csvimport.Row(r.line, r.id, r.name, r.card, groups, active, offline))
        problems.sort(key=lambda p: p.line)
    shown = [RowProblem(row=p.line, field=p.column, column=col_of.get(p.column, ""), message=p.reason)
             for p in problems[:MAX_REPORTED]]  # fmt: skip
    report = Report(ok=not problems, rows=0 if problems else len(rows), problem_count=len(problems), problems=shown)
    return rows, report


async def _validate(st: ServiceState, job: Job, op: Operator, c: AsyncConnection) -> tuple[list[csvimport.Row],
                                                                                              Report]:  # fmt: skip
    job.phase, job.done, job.total = "validating", 0, 0
    now = await site_now(c)
    for g in job.defaults.groups:
        if g not in now.groups:
            raise NotFound(f"the bulk settings' group {g!r} is gone")
    authz = await authorizer(st.db)
    return await asyncio.to_thread(check, job, now, authz, op, job.step)


async def _dry_run(st: ServiceState, job: Job, op: Operator) -> None:
    try:
        async with st.db.read() as c:
            _rows, job.report = await _validate(st, job, op, c)
        job.state = "validated" if job.report.ok else "invalid"
        job.phase = "validated"
    except Exception as e:  # the job says what failed; the service goes on
        job.state, job.error = "failed", f"{type(e).__name__}: {e}"
    await save(st, job)


async def _commit(st: ServiceState, job: Job, p: auth.Principal, body: Commit) -> None:
    u, cr, a = schema.users, schema.credentials, schema.assignments
    try:
        async with st.db.write() as c:  # validated again, then everything in this one transaction
            rows, job.report = await _validate(st, job, p.operator, c)
            if not job.report.ok:
                job.state, job.phase = "invalid", "validated"
            job.phase, job.done, job.total = "writing", 0, len(rows)
            for i in range(0, len(rows) if job.report.ok else 0, CHUNK):
                part = rows[i : i + CHUNK]
                await bulk_insert(c, u, ("id", "name", "active", "kind", "offline_access"),
                                  [(r.id, r.name, r.active, "user", r.offline_access) for r in part])  # fmt: skip
                await bulk_insert(c, cr, ("card", "user_id", "status", "format"),
                                  [(r.card, r.id, "active", "h10301") for r in part])  # fmt: skip
                await bulk_insert(c, a, ("user_id", "group_id"), [(r.id, g) for r in part for g in r.groups])
                job.done = i + len(part)
            if job.report.ok:
                await audit.record(c, p, "user.import", "user", job.filename[:200] or job.id, after={
                    "job": job.id, "rows": len(rows), "users": [r.id for r in rows[:20]]})  # fmt: skip
    except Exception as e:  # the transaction rolled back: nothing applied; the job says why
        job.state, job.error = "failed", f"{type(e).__name__}: {str(e)[:500]}"
        await save(st, job)
        return
    if not job.report.ok:
        await save(st, job)
        return
    job.result = {"imported": len(rows)}
    if body.publish:  # the rows are in; a publish that fails is said per gateway (publish again later)
        job.state, job.phase = "publishing", "publishing"
        await save(st, job)
        try:
            job.result["published"] = await _publish(st, p, body.timeout)
        except Exception as e:
            job.result["published"] = {"*": f"error: {type(e).__name__}: {str(e)[:300]}"}
    job.state, job.phase = "done", "done"
    await save(st, job)


async def _publish(st: ServiceState, p: auth.Principal, timeout: float) -> dict[str, int | str]:
    if st.provisioner is None:
        return {"*": "error: provisioning is not running (no site passphrase given to the service)"}
    authz = await authorizer(st.db)
    async with st.db.read() as c:
        gws = list((await c.execute(select(schema.gateways.c.id).order_by(schema.gateways.c.id))).scalars())
    allowed = [g for g in gws if authz.check(p.operator, Action.UPDATE,
                                             await target_for(st.db, ObjectType.GATEWAY, g)).allowed]  # fmt: skip
    result = await st.provisioner.publish(allowed, timeout=timeout)
    async with st.db.write() as c:
        await audit.record(c, p, "gateway.publish", "gateway", ",".join(allowed) or "-", after=result,
                           outcome="ok" if all(isinstance(v, int) for v in result.values()) else "failed")  # fmt: skip
    return result


# --- the routes -------------------------------------------------------------------------------------------


def _busy(job: Job) -> bool:
    return job.task is not None and not job.task.done()


async def _settled(job: Job) -> None:
    """A task whose job already says it ended may still be saving that: let it finish first."""
    if job.task is not None and not job.task.done() and job.state not in RUNNING:
        with contextlib.suppress(Exception):
            await asyncio.shield(job.task)


class ImportController(Controller):
    path = "/api/v1/imports"
    tags = ["import"]

    @post("/", opt={"perm": (ObjectType.USER, Action.CREATE)}, guards=[permitted], status_code=201,
          request_max_body_size=MAX_UPLOAD_BYTES)  # fmt: skip
    async def upload(self, request: Request[Any, Any, Any],
                     filename: Annotated[str, Meta(max_length=256)] = "upload.csv",
                     encoding: Annotated[str, Meta(max_length=32)] = "utf-8") -> ImportOut:  # fmt: skip
        """Upload a CSV file (the request body, at most 64 MiB; UTF-8 with or without a BOM unless
        `encoding` says otherwise). Answers the job with the file's columns and a suggested mapping."""
        p, st = principal_of(request), state_of(request)
        data = await request.body()
        try:
            text, problems = csvimport.decode(data, encoding)
        except OperatorError as e:
            raise BadRequest(str(e), "query.encoding") from None
        if (n := await _expire(st)) >= MAX_JOBS:
            raise Conflict(f"{n} imports are open: finish or delete one first")
        columns = csvimport.header_of(text)
        if not columns and not problems:
            raise BadRequest("the file is empty (a header row is needed)", "body")
        job = Job(id=secrets.token_hex(8), owner=p.operator.id, filename=filename, text=text,
                  decode_problems=problems, columns=columns)  # fmt: skip
        job.total = text.count("\n")
        await save(st, job)
        _jobs(st)[job.id] = job
        return job.out()

    @get("/{jid:str}", opt={"perm": (ObjectType.USER, Action.CREATE)}, guards=[permitted])
    async def get_import(self, request: Request[Any, Any, Any], jid: FromPath[str]) -> ImportOut:
        """The job: state, progress (`phase`, `done` of `total` rows), the report, the result."""
        return (await _job(state_of(request), jid, principal_of(request).operator.id)).out()

    @post("/{jid:str}/dry-run", opt={"perm": (ObjectType.USER, Action.CREATE)}, guards=[permitted],
          status_code=202)  # fmt: skip
    async def dry_run(self, request: Request[Any, Any, Any], jid: FromPath[str], data: JSONBody[DryRun]) -> ImportOut:
        """Check every row through the mapping; nothing is applied. Poll the job for the report."""
        p, st = principal_of(request), state_of(request)
        job = await _job(st, jid, p.operator.id)
        await _settled(job)
        if _busy(job) or job.state in ("committing", "publishing", "done"):
            raise Conflict(f"import {jid} is {job.state}")
        try:
            if not job.decode_problems:  # a file that did not decode has no columns: the report says why
                csvimport.check_mapping(job.columns, data.columns)
        except OperatorError as e:
            raise BadRequest(str(e), "body.columns") from None
        g = schema.groups
        async with st.db.read() as c:
            have = set((await c.execute(select(g.c.id).where(g.c.id.in_(data.defaults.groups)))).scalars())
        for i, gid in enumerate(data.defaults.groups):
            if gid not in have:
                raise NotFound(f"unknown group {gid!r} (body.defaults.groups[{i}])")
        job.mapping, job.defaults, job.report, job.error = dict(data.columns), data.defaults, None, None
        job.state = job.phase = "validating"
        await save(st, job)
        job.task = asyncio.get_running_loop().create_task(_dry_run(st, job, p.operator), name=f"import[{jid}]")
        await asyncio.sleep(0)
        return job.out()

    @post("/{jid:str}/commit", opt={"perm": (ObjectType.USER, Action.CREATE)}, guards=[permitted],
          status_code=202)  # fmt: skip
    async def commit(self, request: Request[Any, Any, Any], jid: FromPath[str], data: JSONBody[Commit]) -> ImportOut:
        """Import every row in one transaction (validated again first: a bad row and nothing is applied),
        then publish when asked. Needs a clean dry-run of the same file and mapping."""
        p, st = principal_of(request), state_of(request)
        job = await _job(st, jid, p.operator.id)
        await _settled(job)
        if _busy(job) or job.state != "validated" or job.report is None or not job.report.ok:
            raise Conflict(f"import {jid} is {job.state}: commit needs a clean dry-run first")
        job.state, job.phase, job.error = "committing", "committing", None
        await save(st, job)  # before the commit's transaction: a stop during it is found at the next start
        job.task = asyncio.get_running_loop().create_task(_commit(st, job, p, data), name=f"import[{jid}]")
        await asyncio.sleep(0)
        return job.out()

    @delete("/{jid:str}", opt={"perm": (ObjectType.USER, Action.CREATE)}, guards=[permitted], status_code=200)
    async def discard(self, request: Request[Any, Any, Any], jid: FromPath[str]) -> ImportOut:
        """Forget a job (its file). A running dry-run is stopped; a running commit cannot be."""
        p, st = principal_of(request), state_of(request)
        job = await _job(st, jid, p.operator.id)
        await _settled(job)
        if _busy(job) and job.state in ("committing", "publishing"):
            raise Conflict(f"import {jid} is {job.state}")
        if job.task is not None and not job.task.done():
            job.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await job.task
        _jobs(st).pop(jid, None)
        async with st.db.write() as c:
            await c.execute(sql_delete(schema.import_jobs).where(schema.import_jobs.c.id == jid))
        return job.out()
