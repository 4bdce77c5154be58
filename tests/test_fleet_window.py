"""The fleet publisher's in-flight window (cloud_bridge/fleet/window.py, docs/scaling.md "The publisher's window"):
the pure `SendWindow` on its own, then a publisher on a real Mosquitto with simulated gateways (real `CloudLink`s),
watched by a spy client that sees every change set and every result on the broker."""
# ruff: noqa: F811  (pytest fixtures imported from tests.broker are used as parameters)

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import insert, select

from cloud_bridge import mqtt
from cloud_bridge.fleet.publisher import Publisher
from cloud_bridge.fleet.sim import Fleet
from cloud_bridge.fleet.window import Send, SendWindow
from cloud_bridge.protocol import ChangeSetMsg, RightsResult, Signed, decode_downlink, decode_rights_reply, encode
from cloud_bridge.service import schema
from cloud_bridge.service.database import Database
from cloud_bridge.signing import open_signed, public_bytes
from cloud_bridge.topics import parse
from edge.model import ChangeSet, Group, PutGroup
from edge.tasks import cancel_and_wait

from .broker import broker, link_config, site_key, unique  # noqa: F401
from .mosquitto import Mosquitto

# --- SendWindow, pure -----------------------------------------------------------------------------------------


def sends(out: list[Send]) -> list[tuple[str, int, bool]]:
    return [(s.gateway, s.version, s.resend) for s in out]


def test_without_a_limit_every_pending_gateway_is_sent_and_resent_every_resend_s() -> None:
    for size in (None, 0):
        w = SendWindow(size, resend_s=3.0, tries=1)
        w.sync({"a": 1, "b": 1, "c": 2})
        assert sends(w.due(0.0)) == [("a", 1, False), ("b", 1, False), ("c", 2, False)]
        assert w.due(2.9) == []
        w.sync({"a": 1, "c": 2})  # b acknowledged
        for t in (3.0, 6.0, 9.0):  # resent for ever: nothing is released without a limit
            assert sends(w.due(t)) == [("a", 1, True), ("c", 2, True)]
        assert (w.peak, w.deferred, w.released, w.in_flight, w.waiting) == (3, 0, 0, 2, 0)


def test_at_most_size_in_flight_oldest_first_and_an_ack_frees_a_slot() -> None:
    w = SendWindow(2, resend_s=3.0)
    w.sync({"a": 1, "b": 1, "c": 1, "d": 1})
    assert sends(w.due(0.0)) == [("a", 1, False), ("b", 1, False)]
    assert (w.in_flight, w.waiting, w.deferred) == (2, 2, 2)
    assert w.due(0.5) == [] and w.deferred == 2  # a wait is counted once
    w.sync({"b": 1, "c": 1, "d": 1, "e": 1})  # a acknowledged; e became pending (joins at the back)
    assert sends(w.due(1.0)) == [("c", 1, False)]
    assert w.deferred == 3  # e waits too
    # b's resend is due (3 s after its send) and keeps its slot: the resend counts against the window
    assert sends(w.due(3.0)) == [("b", 1, True)]
    assert w.in_flight == 2 and w.waiting == 2
    # b acknowledges version 1 and has version 2 pending: it waits behind d and e (the older waits)
    w.sync({"b": 2, "c": 1, "d": 1, "e": 1})
    assert sends(w.due(3.1)) == [("d", 1, False)]
    w.sync({"b": 2, "e": 1})
    assert sends(w.due(3.2)) == [("e", 1, False), ("b", 2, False)]
    assert w.peak == 2


def test_a_gateway_that_does_not_answer_gives_its_slot_up_to_the_back_of_the_queue() -> None:
    w = SendWindow(1, resend_s=1.0, tries=2)
    w.sync({"dead": 1, "a": 1, "b": 1})
    assert sends(w.due(0.0)) == [("dead", 1, False)]
    assert sends(w.due(1.0)) == [("dead", 1, True)]  # second try, in its slot
    assert sends(w.due(2.0)) == [("a", 1, False)]  # 2 tries without an answer: released, a gets the slot
    assert w.released == 1 and w.waiting == 2
    w.sync({"dead": 1, "b": 1})
    assert sends(w.due(2.1)) == [("b", 1, False)]  # b waited longer than dead
    w.sync({"dead": 1})
    assert sends(w.due(2.2)) == [("dead", 1, True)]  # its next turn: a new slot, a resend of version 1


def test_more_silent_gateways_than_slots_still_let_the_others_through() -> None:
    w = SendWindow(2, resend_s=1.0, tries=1)
    silent = {"d0": 1, "d1": 1, "d2": 1}
    live = {f"g{i}": 1 for i in range(4)}
    pending = {**silent, **live}
    w.sync(pending)
    t, acked, got_slot = 0.0, [], set()
    while live and t < 60:
        for s in w.due(t):
            assert w.in_flight <= 2
            got_slot.add(s.gateway)
            if s.gateway in live:  # a live gateway answers at once
                del live[s.gateway], pending[s.gateway]
                acked.append(s.gateway)
        w.sync(pending)
        t += 0.25
    # d0 and d1 hold both slots for 1 s, then d2 and the live ones take turns
    assert sorted(acked) == ["g0", "g1", "g2", "g3"] and got_slot >= set(silent)
    assert w.peak == 2 and w.released == 2 and t <= 2.5


def test_a_birth_makes_a_resend_due_now_or_moves_a_released_gateway_to_the_head() -> None:
    w = SendWindow(1, resend_s=10.0, tries=1)
    w.sync({"a": 1, "b": 1, "c": 1})
    assert sends(w.due(0.0)) == [("a", 1, False)]
    w.expedite("a")
    assert sends(w.due(0.1)) == [("a", 1, True)]  # in flight: resent at once, in its slot
    assert sends(w.due(10.1)) == [("b", 1, False)]  # a released (1 try), b's turn; queue: c, a
    w.expedite("c")  # c never had a slot: its birth does not jump the queue
    w.expedite("a")  # a gave its slot up: back online, it goes first
    w.sync({"a": 1, "c": 1})
    assert sends(w.due(10.2)) == [("a", 1, True)]


def test_a_push_makes_every_in_flight_resend_due_now() -> None:
    w = SendWindow(2, resend_s=10.0, tries=1)
    w.sync({"a": 1, "b": 1, "c": 1})
    w.due(0.0)
    w.reset()
    assert sends(w.due(0.1)) == [("a", 1, True), ("b", 1, True)]
    with pytest.raises(ValueError):
        SendWindow(-1, resend_s=1.0)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 4), st.lists(st.tuples(st.sampled_from(["ack", "new", "due", "birth"]), st.integers(0, 7),
                                              st.booleans(), st.floats(0.0, 2.0)), max_size=80))  # fmt: skip
def test_settle_one_gateway_at_a_time_does_what_sync_of_the_whole_map_does(
    size: int, ops: list[tuple[str, int, bool, float]]
) -> None:
    """The publisher tells the window of each acknowledgement alone (`settle`, cheap at thousands of gateways);
    the same history told by `sync` of the whole pending map after each change gives the same sends and
    counters."""
    by_settle, by_sync = SendWindow(size, resend_s=1.0, tries=2), SendWindow(size, resend_s=1.0, tries=2)
    pending: dict[str, int] = {}
    now = 0.0
    for op, i, more, dt in ops:
        gw = f"g{i}"
        if op == "ack" and gw in pending:  # its version acknowledged; the next one pending, or nothing
            if more:
                pending[gw] += 1
            else:
                del pending[gw]
            by_settle.settle(gw, pending.get(gw))
            by_sync.sync(pending)
        elif op == "new" and gw not in pending:
            pending[gw] = 1
            by_settle.settle(gw, 1)
            by_sync.sync(pending)
        elif op == "birth":
            by_settle.expedite(gw)
            by_sync.expedite(gw)
        elif op == "due":
            now += dt
            assert by_settle.due(now) == by_sync.due(now)
        counters = [(w.peak, w.deferred, w.released, w.in_flight, w.waiting) for w in (by_settle, by_sync)]
        assert counters[0] == counters[1]
    assert by_settle.due(now + 5) == by_sync.due(now + 5)


# --- a publisher on Mosquitto -----------------------------------------------------------------------------------


def change_set(gw: str) -> bytes:
    cs = ChangeSet(from_version=0, to_version=1, changes=[PutGroup(group=Group(id="staff", name="Staff",
                                                                                doors=["front", "lab"]))])  # fmt: skip
    return encode(ChangeSetMsg(id=f"cs-{gw}-1", change_set=cs))


@dataclass
class Spy:
    """What the broker carried, in its order: ("send", gw) per change set, ("ack", gw) per ok result."""

    seen: list[tuple[str, str]] = field(default_factory=list)

    def outstanding_peak(self, among: set[str]) -> int:
        """The most gateways of `among` that had a change set sent and no ok result yet, at once."""
        out: set[str] = set()
        peak = 0
        for kind, gw in self.seen:
            if gw not in among:
                continue
            if kind == "send":
                out.add(gw)
            else:
                out.discard(gw)
            peak = max(peak, len(out))
        return peak

    def sends_to(self, gw: str) -> int:
        return sum(1 for k, g in self.seen if k == "send" and g == gw)


@contextlib.asynccontextmanager
async def spying(b: Mosquitto, site: str, key: Ed25519PrivateKey) -> AsyncIterator[Spy]:
    spy = Spy()
    c = await mqtt.connect(mqtt.client(b.host, b.port, identifier=unique("spy")), [f"acs/v1/{site}/+/rights/#"],
                           qos=0)  # fmt: skip

    async def read() -> None:
        async for m in c.messages:
            p = parse(m.topic.value)
            assert p is not None
            _site, gw, leaf = p
            data = mqtt.payload(m)
            if leaf.value == "rights":
                signed = decode_downlink(data)
                assert isinstance(signed, Signed)
                if isinstance(open_signed(signed, key.public_key(), site=site, gateway=gw).msg, ChangeSetMsg):
                    spy.seen.append(("send", gw))
            elif leaf.value == "rights/reply":
                r = decode_rights_reply(data)
                if isinstance(r, RightsResult) and r.ok and r.version >= 1:
                    spy.seen.append(("ack", gw))

    task = asyncio.get_running_loop().create_task(read())
    try:
        yield spy
    finally:
        await cancel_and_wait(task)
        await mqtt.close(c)


async def until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not cond():
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"not within {timeout} s: {what}") from None


@contextlib.asynccontextmanager
async def fleet_and_publisher(b: Mosquitto, tmp_path: Path, key: Ed25519PrivateKey, site: str, names: list[str],
                              **kw: float | int) -> AsyncIterator[tuple[Fleet, Publisher, Database]]:  # fmt: skip
    """The gateways online and a publisher of all of them connected, over an SQLite database with each gateway's
    row (and nothing in the outbox yet)."""
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'service.db'}")
    await db.migrate()
    async with db.write() as c:
        await c.execute(insert(schema.gateways), [{"id": g} for g in names])
    cfgs = [link_config(b, site, g, session="clean", mqtt_version="3.1.1") for g in names]
    pub = Publisher(db, endpoints=[(b.host, b.port)], roster=dict.fromkeys(names, site), signing_key=key,
                    version="3.1.1", **kw)  # type: ignore[arg-type]  # fmt: skip
    task: asyncio.Task[None] | None = None
    try:
        async with Fleet(cfgs, public_bytes(key), tmp_path / "fleet", stagger_s=0.0) as fleet:
            task = asyncio.get_running_loop().create_task(pub.run())
            await until(lambda: fleet.online() == len(names) and bool(pub.stats.connects), 30, "fleet online")
            yield fleet, pub, db
    finally:
        if task is not None:
            await cancel_and_wait(task)
        await pub.flush()
        await db.close()


async def write_outbox(db: Database, names: list[str]) -> None:
    rows = [{"gateway": g, "to_version": 1, "from_version": 0, "kind": "change_set", "body": change_set(g)}
            for g in names]  # fmt: skip
    async with db.write() as c:
        await c.execute(insert(schema.outbox), rows)


async def acked_in_db(db: Database) -> dict[str, int]:
    async with db.read() as c:
        rows = (await c.execute(select(schema.gateways.c.id, schema.gateways.c.acked))).all()
    return {str(g): int(v) for g, v in rows}


async def test_window_5_keeps_at_most_5_of_50_gateways_outstanding_and_all_acknowledge(
    broker: Mosquitto, tmp_path: Path, site_key: Ed25519PrivateKey
) -> None:
    """50 live gateways, window 5: the broker carries one change set per gateway, in queue order, with never
    more than 5 unanswered (the spy's count, from what the broker delivered); every gateway acknowledges."""
    site = unique("s")
    names = [f"g{i:02d}" for i in range(50)]
    async with (
        spying(broker, site, site_key) as spy,
        fleet_and_publisher(broker, tmp_path, site_key, site, names, window=5, resend_s=10.0) as (fleet, pub, db),
    ):
        await write_outbox(db, names)
        assert await pub.push() == 50
        await until(lambda: all(pub.acked.get(g) == 1 for g in names), 30, "every gateway acknowledged")
        await until(lambda: sum(1 for k, _g in spy.seen if k == "ack") == 50, 10, "the spy saw every result")
        assert all(g.rights.version == 1 for g in fleet.gateways)
        await pub.flush()
        assert await acked_in_db(db) == dict.fromkeys(names, 1)
    # the broker carried one change set per gateway, oldest (first loaded) first, never more than 5 unanswered
    assert [g for k, g in spy.seen if k == "send"] == names
    peak = spy.outstanding_peak(set(names))
    assert 2 <= peak <= 5, spy.seen
    st = pub.stats
    assert (st.sent, st.resent, st.peak_in_flight, st.deferred, st.released) == (50, 0, 5, 45, 0)
    assert (st.in_flight, st.waiting) == (0, 0)


async def test_gateways_that_never_answer_hold_a_slot_for_window_tries_sends_then_wait_at_the_back(
    broker: Mosquitto, tmp_path: Path, site_key: Ed25519PrivateKey
) -> None:
    """6 stopped gateways (first in the queue: they take all 5 slots) and 30 live ones, window 5: each silent
    gateway holds its slot for 2 sends 0.5 s apart, then goes to the back of the queue; every live gateway is
    acknowledged; the silent ones are sent again on their later turns and stay pending."""
    site = unique("s")
    dead = [f"d{i}" for i in range(6)]
    live = [f"g{i:02d}" for i in range(30)]
    names = dead + live
    async with (
        spying(broker, site, site_key) as spy,
        fleet_and_publisher(broker, tmp_path, site_key, site, names, window=5, resend_s=0.5,
                            window_tries=2) as (fleet, pub, db),
    ):  # fmt: skip
        for g in dead:
            await fleet.stop(g)
        await write_outbox(db, names)
        await pub.push()
        await until(lambda: all(pub.acked.get(g) == 1 for g in live), 30, "every live gateway acknowledged")
        await until(lambda: all(spy.sends_to(g) >= 3 for g in dead), 30, "every silent gateway's next turn")
        await pub.flush()
        assert await acked_in_db(db) == {**dict.fromkeys(dead, 0), **dict.fromkeys(live, 1)}
    assert [g for k, g in spy.seen if k == "send"][:5] == dead[:5]  # the silent ones took every slot first
    assert spy.outstanding_peak(set(live)) <= 5
    assert all(pub.acked.get(g, 0) == 0 for g in dead)
    st = pub.stats
    assert st.peak_in_flight == 5 and st.released >= 6 and st.sent == 36
