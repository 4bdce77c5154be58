"""A duress PIN's `alarm.duress` (silent at the door, issue 19) is an alarm in the service on both databases:
raised when the event is stored, also when it arrives ahead of the older events (the gateway's priority
lane), once when the same event comes again in order; `duress` is a kind the alarm list filters on."""

# ruff: noqa: F811

from __future__ import annotations

from sqlalchemy import select

from cloud_bridge.service import schema
from cloud_bridge.service.alarms import KINDS, condition
from cloud_bridge.service.events import EventService

from .postgres import db_url, postgres_server  # noqa: F401
from .test_service_events_store import T0, _db, batch, ev


def test_duress_is_an_alarm_kind() -> None:
    assert "duress" in KINDS
    assert condition(ev(1, "alarm.duress", card=1001, user="alice")) == ("duress", True)
    assert condition(ev(1, "access.granted", card=1001, user="alice")) is None


async def test_duress_alarm_raised_ahead_of_older_events_and_once(db_url: str) -> None:
    db = await _db(db_url)
    try:
        svc = EventService(db)
        duress = ev(4, "alarm.duress", card=1001, user="alice", reason="granted")
        # sent ahead: seq 4 before 1..3 (the acknowledgement waits for the gap, the alarm does not)
        s = await svc.store_batch("gw1", batch([duress], 3))
        assert s.upto == 0 and len(s.new) == 1
        async with db.read() as c:
            rows = (await c.execute(select(schema.alarms))).all()
        assert [(r.kind, r.door, r.state, r.event_id, r.ts) for r in rows] == [
            ("duress", "front", "open", duress.id, T0 + 4)]  # fmt: skip
        # then in order, with the events before it: the same event is not a second alarm
        older = [ev(1, "access.granted", card=1001, user="alice"), ev(2), ev(3)]
        s = await svc.store_batch("gw1", batch([*older, duress], 0))
        assert s.upto == 4 and s.duplicates == 1
        async with db.read() as c:
            kinds = [r.kind for r in (await c.execute(select(schema.alarms))).all()]
        assert kinds == ["duress"]
    finally:
        await db.close()
