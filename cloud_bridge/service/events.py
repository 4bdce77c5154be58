"""Events inside the service: the collector's store (every event once, acknowledged after the commit), gateway
status from births and deaths, live door state, alarms raised, and /api/v1/events (history, CSV, live SSE).

Storing a batch (`EventService.store`, called by `operator.collector.Collector`) is one transaction:

1. the events not stored yet go into `events` (unique on gateway + seq, and on the event id: a batch sent
   again, or received by two collectors, stores nothing twice; the repeats are counted in
   `gateway_status.duplicates`), with the columns the API filters on (door, user, kind, result);
2. the batch's range is recorded and the gateway's contiguous high-water mark advanced (as in
   `operator/collector.py`: a batch out of order is acknowledged once the gap before it closes);
3. each new event moves its door's live state (`door_state`: lock, contact, forced, held, mode override)
   and raises or clears alarms (`alarms.py`).

Only after the commit is the batch acknowledged (by the collector) and its events handed to the live
stream (`EventHub`, in process: the SSE clients of this service).

Who sees what: an event is an `event` object for the Authorizer, on its gateway and door (so applies-to
``gw1`` or ``gw1/front`` selects it) and tagged with its kind and family (``access.denied`` and ``access``):
``grant event read tags=[door]`` shows door events only. History, CSV and stream are filtered with it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import csv
import io
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from litestar import Controller, Request, Response, get
from litestar.params import FromQuery
from litestar.response import ServerSentEvent, ServerSentEventMessage
from msgspec import Meta
from sqlalchemy import Select, Table, func, literal, or_, select, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

import edge.events as kinds
from cloud_bridge.operator.collector import Collector
from cloud_bridge.permissions import Action, Authorizer, ObjectType, Operator, Target
from cloud_bridge.protocol import Birth, Death, EventBatch
from edge.events import Event
from edge.tasks import cancel_and_wait

from . import alarms as alarm_rules
from . import auth, schema
from .core import ServiceState, authorizer, permitted, principal_of, state_of
from .database import Database
from .errors import BadRequest

log = logging.getLogger("cloud_bridge.service.events")
_enc = msgspec.msgpack.Encoder()
_ev_dec = msgspec.msgpack.Decoder(Event)
_json = msgspec.json.Encoder()

RESULTS = {kinds.ACCESS_GRANTED: "granted", kinds.ACCESS_DENIED: "denied"}


# --- what the API shows ------------------------------------------------------------------------------------


class EventOut(msgspec.Struct, kw_only=True):
    id: str
    gateway: str
    seq: int
    type: str
    ts: float
    local: str
    door: str | None
    reader: str | None
    card: int | None
    user: str | None
    group: str | None
    #: granted | denied for access decisions, else None.
    result: str | None
    reason: str | None
    detail: dict[str, Any]
    link_up: bool


class EventPage(msgspec.Struct, kw_only=True):
    items: list[EventOut]
    #: Pass as `cursor` for the next (older) page; None when there is nothing older.
    next_cursor: str | None


def event_out(gw: str, e: Event) -> EventOut:
    return EventOut(id=e.id, gateway=gw, seq=e.seq, type=e.type, ts=e.ts, local=e.local, door=e.door,
                    reader=e.reader, card=e.card, user=e.user, group=e.group, result=RESULTS.get(e.type),
                    reason=e.reason, detail=dict(e.detail), link_up=e.link_up)  # fmt: skip


def event_target(gateway: str, door: str | None, kind: str, oid: str) -> Target:
    """An event (or an alarm) as the Authorizer sees it: on its gateway and door, tagged with its kind."""
    tags = frozenset({kind, kind.partition(".")[0]})
    return Target(ObjectType.EVENT, oid, tags, gateway=gateway, door=door)


def may_read(authz: Authorizer, op: Operator, e: EventOut) -> bool:
    return authz.check(op, Action.READ, event_target(e.gateway, e.door, e.type, e.id)).allowed


# --- the live stream (in process) ---------------------------------------------------------------------------


class EventHub:
    """Fan-out of newly committed events to the open SSE streams of this process. A stream that falls more
    than `depth` events behind is ended (its client reconnects and reads the history)."""

    def __init__(self, depth: int = 1000) -> None:
        self.depth = depth
        self._subs: set[asyncio.Queue[EventOut | None]] = set()

    def subscribe(self) -> asyncio.Queue[EventOut | None]:
        q: asyncio.Queue[EventOut | None] = asyncio.Queue(self.depth + 1)
        self._subs.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue[EventOut | None]) -> None:
        self._subs.discard(q)

    def publish(self, items: Iterable[EventOut]) -> None:
        items = list(items)
        for q in list(self._subs):
            for e in items:
                if q.qsize() >= self.depth:
                    self._subs.discard(q)
                    q.put_nowait(None)  # the end of this stream
                    break
                q.put_nowait(e)


# --- storing (the collector's store) -------------------------------------------------------------------------


async def insert_ignore(c: AsyncConnection, table: Table, rows: Sequence[dict[str, Any]]) -> None:
    """INSERT, skipping rows that hit a unique key (a concurrent writer stored them first)."""
    if not rows:
        return
    ins = postgresql.insert(table) if c.dialect.name == "postgresql" else sqlite.insert(table)
    await c.execute(ins.on_conflict_do_nothing(), list(rows))


@dataclass
class Stored:
    upto: int
    new: list[EventOut] = field(default_factory=list)
    duplicates: int = 0


class EventService:
    """The operator service's `BatchStore` and `StatusSink` (operator/collector.py) on its database."""

    def __init__(self, db: Database, hub: EventHub | None = None) -> None:
        self.db = db
        self.hub = hub or EventHub()
        self.duplicates = 0

    async def store(self, gateway: str, batch: EventBatch) -> int:
        s = await self.store_batch(gateway, batch)
        self.hub.publish(s.new)  # committed: the stream may show them
        return s.upto

    async def store_batch(self, gw: str, batch: EventBatch) -> Stored:
        ev, gs = schema.events, schema.gateway_status
        now = time.time()
        async with self.db.write() as c:
            # a site database imported from `cloud-bridge collect` carries its high-water mark in gateways
            known = (await c.execute(select(schema.gateways.c.events_upto).where(schema.gateways.c.id == gw))).scalar()
            await insert_ignore(c, gs, [{**_status_row(gw), "events_upto": int(known or 0)}])
            await c.execute(select(gs.c.gateway).where(gs.c.gateway == gw).with_for_update())
            seqs = [e.seq for e in batch.events]
            ids = [e.id for e in batch.events]
            have: set[int] = set()
            have_ids: set[str] = set()
            for part in _chunks(list(zip(seqs, ids, strict=True)), 500):
                rows = (await c.execute(select(ev.c.seq, ev.c.id).where(ev.c.gateway == gw, or_(
                    ev.c.seq.in_([s for s, _ in part]), ev.c.id.in_([i for _, i in part]))))).all()  # fmt: skip
                have |= {int(r.seq) for r in rows}
                have_ids |= {str(r.id) for r in rows}
            fresh: list[Event] = []
            seen: set[int] = set()
            for e in sorted(batch.events, key=lambda e: e.seq):
                if e.seq in have or e.id in have_ids or e.seq in seen:
                    continue
                seen.add(e.seq)
                fresh.append(e)
            await insert_ignore(c, ev, [_event_row(gw, e) for e in fresh])
            await c.execute(schema.event_ranges.insert().values(gateway=gw, prev_seq=batch.prev_seq,
                                                                last_seq=batch.last_seq))  # fmt: skip
            upto = await _advance(c, gw)
            for e in fresh:
                await _apply_door(c, gw, e)
                await alarm_rules.raise_from(c, gw, e)
            dup = len(batch.events) - len(fresh)
            await c.execute(update(gs).where(gs.c.gateway == gw).values(
                events_upto=upto, events_stored=gs.c.events_stored + len(fresh), duplicates=gs.c.duplicates + dup,
                last_seen=now))  # fmt: skip
        self.duplicates += dup
        return Stored(upto, [event_out(gw, e) for e in fresh], dup)

    async def status(self, gateway: str, status: Birth | Death) -> None:
        """A birth: online, software, the rights version it holds, its journal depth; a death: offline (a
        stale will, older than the birth seen, is ignored)."""
        gs = schema.gateway_status
        async with self.db.write() as c:
            await insert_ignore(c, gs, [_status_row(gateway)])
            row = (await c.execute(select(gs).where(gs.c.gateway == gateway).with_for_update())).one()
            if isinstance(status, Death):
                if status.session < int(row.session):
                    return
                await c.execute(update(gs).where(gs.c.gateway == gateway).values(
                    online=False, session=status.session, last_seen=time.time()))  # fmt: skip
                return
            await c.execute(update(gs).where(gs.c.gateway == gateway).values(
                online=True, session=status.session, software=status.software[:200],
                rights_version=status.rights_version, journal_depth=status.journal_depth,
                warnings=_json.encode(status.warnings[:20]).decode(), last_seen=time.time()))  # fmt: skip


def _chunks(items: list[Any], n: int) -> Iterable[list[Any]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def _status_row(gw: str) -> dict[str, Any]:
    return {"gateway": gw, "online": False, "session": 0, "software": "", "rights_version": 0, "journal_depth": 0,
            "warnings": "[]", "last_seen": None, "lockdown": False, "events_upto": 0, "events_stored": 0,
            "duplicates": 0}  # fmt: skip


def filter_columns(body: bytes) -> dict[str, Any]:
    """The filter columns of a stored event body (for rows copied from a `cloud-bridge collect` database)."""
    try:
        e = _ev_dec.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return {}
    row = _event_row("", e)
    return {k: row[k] for k in ("door", "reader", "user_id", "card", "result", "reason")}


def _event_row(gw: str, e: Event) -> dict[str, Any]:
    return {"id": e.id, "gateway": gw, "seq": e.seq, "type": e.type[:64], "ts": e.ts, "body": _enc.encode(e),
            "door": e.door, "reader": e.reader, "user_id": e.user, "card": e.card if e.card is None or
            0 <= e.card < 2**63 else None, "result": RESULTS.get(e.type),
            "reason": None if e.reason is None else e.reason[:64]}  # fmt: skip


async def _advance(c: AsyncConnection, gw: str) -> int:
    gs, r = schema.gateway_status, schema.event_ranges
    upto = int((await c.execute(select(gs.c.events_upto).where(gs.c.gateway == gw))).scalar() or 0)
    while True:
        top = (await c.execute(select(func.max(r.c.last_seq)).where(
            r.c.gateway == gw, r.c.prev_seq <= upto, r.c.last_seq > upto))).scalar()  # fmt: skip
        if top is None:
            break
        upto = int(top)
    await c.execute(r.delete().where(r.c.gateway == gw, r.c.last_seq <= upto))
    return upto


async def _apply_door(c: AsyncConnection, gw: str, e: Event) -> None:
    """The door's live state after event `e` (only an event newer than the last one applied moves it)."""
    d = e.detail
    values: dict[str, Any] = {}
    if e.type == kinds.DOOR_STATE:
        if d.get("lock") in ("locked", "unlocked"):
            values["lock"] = d["lock"]
        if d.get("contact") in ("open", "closed"):
            values["contact"] = d["contact"]
    elif e.type == kinds.DOOR_FORCED_OPEN:
        values["forced"] = d.get("state") == "active"
    elif e.type == kinds.DOOR_HELD_OPEN:
        values["held"] = d.get("state") == "active"
    elif e.type == kinds.COMMAND_EXECUTED and d.get("action") == "door_mode":
        values["mode"] = None if d.get("mode") is None else str(d.get("mode"))[:32]
    elif e.type == kinds.COMMAND_EXECUTED and d.get("action") == "lockdown":
        gs = schema.gateway_status
        await c.execute(update(gs).where(gs.c.gateway == gw).values(lockdown=bool(d.get("active"))))
        return
    if not values or e.door is None:
        return
    ds = schema.door_state
    await insert_ignore(c, ds, [{"gateway": gw, "door": e.door, "lock": None, "contact": None, "mode": None,
                                 "forced": False, "held": False, "seq": 0, "ts": None}])  # fmt: skip
    await c.execute(update(ds).where(ds.c.gateway == gw, ds.c.door == e.door, ds.c.seq < e.seq).values(
        seq=e.seq, ts=e.ts, **values))  # fmt: skip


# --- reading -------------------------------------------------------------------------------------------------

Ident = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:@\-]+$")]
Kind = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+\*?$")]


@dataclass
class Filters:
    since: float | None = None
    until: float | None = None
    gateway: str | None = None
    door: str | None = None
    user: str | None = None
    kinds: list[str] = field(default_factory=list)
    result: str | None = None

    def where(self) -> list[Any]:
        ev = schema.events
        out: list[Any] = []
        if self.since is not None:
            out.append(ev.c.ts >= self.since)
        if self.until is not None:
            out.append(ev.c.ts < self.until)
        if self.gateway is not None:
            out.append(ev.c.gateway == self.gateway)
        if self.door is not None:
            out.append(ev.c.door == self.door)
        if self.user is not None:
            out.append(ev.c.user_id == self.user)
        if self.result is not None:
            out.append(ev.c.result == self.result)
        if self.kinds:
            exact = [k for k in self.kinds if not k.endswith("*")]
            fams = [k[:-1] for k in self.kinds if k.endswith("*")]
            out.append(or_(*([ev.c.type.in_(exact)] if exact else []),
                           *(ev.c.type.startswith(f, autoescape=True) for f in fams)))  # fmt: skip
        return out

    def matches(self, e: EventOut) -> bool:
        if (self.since is not None and e.ts < self.since) or (self.until is not None and e.ts >= self.until):
            return False
        if (self.gateway is not None and e.gateway != self.gateway) or (self.door is not None and e.door != self.door):
            return False
        if (self.user is not None and e.user != self.user) or (self.result is not None and e.result != self.result):
            return False
        if self.kinds:
            return any(e.type.startswith(k[:-1]) if k.endswith("*") else e.type == k for k in self.kinds)
        return True


def filters_of(*, since: float | None, until: float | None, gateway: str | None, door: str | None, user: str | None,
               kind: str | None, result: str | None) -> Filters:  # fmt: skip
    """The query's filters. `door` is "gateway/door" (or a door id with `gateway`); `kind` is a comma-separated
    list of event types, each exact or a family ending in "*" ("door.*")."""
    if door is not None and "/" in door:
        gw, _, door = door.partition("/")
        if gateway is not None and gateway != gw:
            raise BadRequest("door names another gateway than gateway", "query.door")
        gateway = gw
    for name, v in (("gateway", gateway), ("door", door), ("user", user)):
        if v is not None:
            _check(v, Ident, f"query.{name}")
    ks = [k.strip() for k in (kind or "").split(",") if k.strip()]
    if len(ks) > 32:
        raise BadRequest("at most 32 kinds", "query.kind")
    for k in ks:
        _check(k, Kind, "query.kind")
    if result is not None and result not in ("granted", "denied"):
        raise BadRequest("result is granted or denied", "query.result")
    return Filters(since, until, gateway, door, user, ks, result)


def _check(value: str, typ: Any, where: str) -> None:
    try:
        msgspec.convert(value, typ)
    except msgspec.ValidationError as e:
        raise BadRequest(str(e), where) from None


def encode_cursor(ts: float, eid: str) -> str:
    return base64.urlsafe_b64encode(_enc.encode([ts, eid])).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        ts, eid = msgspec.msgpack.decode(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)),
                                         type=tuple[float, str])  # fmt: skip
    except (binascii.Error, ValueError, msgspec.DecodeError, msgspec.ValidationError):
        raise BadRequest("not a cursor this service gave out", "query.cursor") from None
    return ts, eid


#: How many rows one page may look at before it is answered short (with a cursor to go on from): an operator
#: who may see few of many events still gets a quick answer.
SCAN_LIMIT = 5000


def page_query(f: Filters, after: tuple[float, str] | None, limit: int) -> Select[Any]:
    """One chunk of a page: newest first, older than `after` (keyset on (ts, id)). The keyset test is a
    row-value comparison, which both databases turn into a range on the (..., ts, id) indexes (an OR of
    "ts < x or ts = x and id < y" is a filter instead: the deeper the page, the more rows read)."""
    ev = schema.events
    q = select(ev.c.id, ev.c.gateway, ev.c.ts, ev.c.body).where(*f.where())
    if after is not None:
        q = q.where(tuple_(ev.c.ts, ev.c.id) < tuple_(literal(after[0]), literal(after[1])))
    return q.order_by(ev.c.ts.desc(), ev.c.id.desc()).limit(limit)


async def page(c: AsyncConnection, authz: Authorizer, op: Operator, f: Filters, *, limit: int,
               cursor: str | None) -> EventPage:  # fmt: skip
    """Newest first, `limit` at most, only what `op` may read; keyset pagination on (ts, id): stable under
    inserts (an event stored later never moves one already paged past)."""
    at = decode_cursor(cursor) if cursor else None
    out: list[EventOut] = []
    scanned = 0
    last: tuple[float, str] | None = at
    more = True
    while len(out) < limit and scanned < SCAN_LIMIT and more:
        chunk = min(SCAN_LIMIT - scanned, max(limit * 2, 50))
        rows = (await c.execute(page_query(f, last, chunk))).all()
        more = len(rows) == chunk
        for r in rows:
            scanned += 1
            last = (float(r.ts), str(r.id))
            e = event_out(r.gateway, _ev_dec.decode(r.body))
            if may_read(authz, op, e):
                out.append(e)
                if len(out) == limit:
                    more = more or r is not rows[-1]
                    break
    return EventPage(items=out, next_cursor=encode_cursor(*last) if more and last is not None else None)


# --- CSV (a spreadsheet must not run a cell as a formula) ----------------------------------------------------

_FORMULA = ("=", "+", "-", "@", "\t", "\r", "\n")


def csv_cell(value: Any) -> str:
    """A value as a CSV cell: text that a spreadsheet would take for a formula (OWASP "CSV injection": a
    leading = + - @ tab or CR) is prefixed with a single quote, so it stays text."""
    text = "" if value is None else str(value)
    return f"'{text}" if text.startswith(_FORMULA) else text


CSV_COLUMNS = ("ts", "local", "gateway", "door", "reader", "type", "result", "reason", "user", "card", "group", "id")


def csv_rows(items: Iterable[EventOut]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\r\n")
    for e in items:
        w.writerow([csv_cell(getattr(e, col)) for col in CSV_COLUMNS])
    return buf.getvalue()


# --- the API -------------------------------------------------------------------------------------------------

Limit = Annotated[int, Meta(ge=1, le=1000)]


class EventController(Controller):
    path = "/api/v1/events"
    tags = ["events"]

    @get("/", opt={"perm": (ObjectType.EVENT, Action.READ)}, guards=[permitted])
    async def list_events(self, request: Request[Any, Any, Any], *, since: FromQuery[float | None] = None,
                          until: FromQuery[float | None] = None, gateway: FromQuery[str | None] = None,
                          door: FromQuery[str | None] = None,
                          user: FromQuery[str | None] = None, kind: FromQuery[str | None] = None,
                          result: FromQuery[str | None] = None,
                          cursor: FromQuery[str | None] = None, limit: Limit = 100) -> EventPage:  # fmt: skip
        """Event history, newest first, filtered by time (`since` <= ts < `until`, UTC seconds), gateway, door
        ("gw1/front"), user, kind (comma-separated, "door.*" for a family) and result (granted/denied); only
        the events the operator may read. `cursor`: the `next_cursor` of the page before (opaque)."""
        p, st = principal_of(request), state_of(request)
        f = filters_of(since=since, until=until, gateway=gateway, door=door, user=user, kind=kind, result=result)
        authz = await authorizer(st.db)
        async with st.db.read() as c:
            return await page(c, authz, p.operator, f, limit=limit, cursor=cursor)

    @get("/export.csv", opt={"perm": (ObjectType.EVENT, Action.READ)}, guards=[permitted])
    async def export_csv(self, request: Request[Any, Any, Any], *, since: FromQuery[float | None] = None,
                         until: FromQuery[float | None] = None, gateway: FromQuery[str | None] = None,
                         door: FromQuery[str | None] = None,
                         user: FromQuery[str | None] = None, kind: FromQuery[str | None] = None,
                         result: FromQuery[str | None] = None,
                         limit: Annotated[int, Meta(ge=1, le=100_000)] = 10_000) -> Response[str]:  # fmt: skip
        """The same history as CSV (newest first, at most `limit` rows); cells a spreadsheet would run as a
        formula are prefixed with a quote."""
        p, st = principal_of(request), state_of(request)
        f = filters_of(since=since, until=until, gateway=gateway, door=door, user=user, kind=kind, result=result)
        authz = await authorizer(st.db)
        items: list[EventOut] = []
        cursor: str | None = None
        async with st.db.read() as c:
            while len(items) < limit:
                pg = await page(c, authz, p.operator, f, limit=min(1000, limit - len(items)), cursor=cursor)
                items += pg.items
                if pg.next_cursor is None:
                    break
                cursor = pg.next_cursor
        body = ",".join(CSV_COLUMNS) + "\r\n" + csv_rows(items)
        return Response(body, media_type="text/csv; charset=utf-8",
                        headers={"content-disposition": 'attachment; filename="events.csv"'})  # fmt: skip

    @get("/stream", opt={"perm": (ObjectType.EVENT, Action.READ)}, guards=[permitted])
    async def stream(self, request: Request[Any, Any, Any], *, gateway: FromQuery[str | None] = None,
                     door: FromQuery[str | None] = None,
                     user: FromQuery[str | None] = None, kind: FromQuery[str | None] = None,
                     result: FromQuery[str | None] = None) -> ServerSentEvent:  # fmt: skip
        """Live events as Server-Sent Events (`event: event`, data: the event as JSON), with the same filters
        as the history; each stream lasts at most 10 minutes (EventSource reconnects on its own, and with
        `Last-Event-ID` is first sent what was stored after that event, up to 1000)."""
        p, st = principal_of(request), state_of(request)
        f = filters_of(since=None, until=None, gateway=gateway, door=door, user=user, kind=kind, result=result)
        return ServerSentEvent(live(st.db, event_hub(request), p, f, lambda e: _json.encode(e).decode(),
                                    last_id=request.headers.get("last-event-id")))  # fmt: skip


def event_hub(request: Request[Any, Any, Any]) -> EventHub:
    st = state_of(request)
    hub: EventHub | None = st.extra.get("event_hub")
    if hub is None:
        hub = st.extra["event_hub"] = EventHub()
    return hub


#: Most events a reconnecting stream is sent again (`Last-Event-ID`) before it goes live.
REPLAY_MAX = 1000


async def _replay(db: Database, after: str, f: Filters) -> list[EventOut]:
    """The stored events newer (by time) than event `after`, oldest first, at most `REPLAY_MAX`."""
    ev = schema.events
    async with db.read() as c:
        ts = (await c.execute(select(ev.c.ts).where(ev.c.id == after))).scalar()
        if ts is None:
            return []
        newer = tuple_(ev.c.ts, ev.c.id) > tuple_(literal(ts), literal(after))
        q = select(ev.c.gateway, ev.c.body).where(*f.where(), newer)
        rows = (await c.execute(q.order_by(ev.c.ts, ev.c.id).limit(REPLAY_MAX))).all()
    return [event_out(r.gateway, _ev_dec.decode(r.body)) for r in rows]


SSE = AsyncGenerator[ServerSentEventMessage, None]


async def live(db: Database, hub: EventHub, p: auth.Principal, f: Filters, render: Any, *, seconds: float = 600.0,
               event: str = "event", last_id: str | None = None) -> SSE:  # fmt: skip
    """What an SSE stream sends: each new event `p` may read and `f` selects, rendered by `render`. The
    operator's permissions are read again every 30 s (a changed group, a deactivated operator). A client
    that reconnects with `Last-Event-ID` (`last_id`) is first sent what was stored after that event."""
    q = hub.subscribe()
    try:
        authz = await authorizer(db)
        op = p.operator
        refresh = time.monotonic() + 30
        end = time.monotonic() + seconds
        yield ServerSentEventMessage(comment="connected", data=None)
        sent: set[str] = set()
        if last_id is not None and len(last_id) <= 128:
            for old in await _replay(db, last_id, f):  # subscribed first: nothing falls between the two
                sent.add(old.id)
                if may_read(authz, op, old):
                    yield ServerSentEventMessage(event=event, id=old.id, data=render(old))
        while time.monotonic() < end:
            if time.monotonic() > refresh:
                authz = await authorizer(db, fresh=True)
                async with db.read() as c:
                    fresh = await auth.load_operator(c, op.id)
                if fresh is None or not fresh.active:
                    return
                op, refresh = fresh, time.monotonic() + 30
            e: EventOut | None = None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(15.0):
                    e = await q.get()
                if e is None:
                    return  # fell behind: the client reconnects
            if e is None:
                yield ServerSentEventMessage(comment="keep-alive", data=None)
                continue
            if e.id not in sent and f.matches(e) and may_read(authz, op, e):
                yield ServerSentEventMessage(event=event, id=e.id, data=render(e))
    finally:
        hub.unsubscribe(q)


@contextlib.asynccontextmanager
async def collecting(st: ServiceState, *, site: str, host: str, port: int,
                     key: Ed25519PrivateKey) -> AsyncIterator[Collector]:  # fmt: skip
    """Run the event collector of a service (its task stopped on exit): every event batch stored in the
    service's database (`EventService`), acknowledged after the commit, handed to the live streams."""
    hub: EventHub = st.extra.setdefault("event_hub", EventHub())
    svc = EventService(st.db, hub)
    col = Collector(svc, host=host, port=port, site=site, signing_key=key, group=f"service-{site}", status=svc)
    st.extra["collector"] = col
    task = asyncio.get_running_loop().create_task(col.run(), name="service.collector")
    try:
        yield col
    finally:
        await cancel_and_wait(task)
