"""CloudLink against a real Mosquitto: presence, provisioning, events, commands, outages."""

# ruff: noqa: F811  (pytest fixtures imported from tests.broker are used as parameters)

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud_bridge.protocol import (
    ChangeSetMsg,
    Death,
    Lockdown,
    ResyncRequest,
    RightsResult,
    SetDoorMode,
    SnapshotChunk,
    Unlock,
    encode,
)
from cloud_bridge.topics import Leaf
from edge.events import SECURITY_COMMAND_REJECTED
from edge.model import (
    ChangeSet,
    Credential,
    DeleteCredential,
    Door,
    DoorMode,
    Group,
    PutCredential,
    PutDoor,
    PutGroup,
    PutUser,
    Snapshot,
    User,
)

from .broker import broker, cloud_peer, gateway, site_key, unique  # noqa: F401
from .conftest import basic_site
from .mosquitto import Mosquitto


def site_snapshot(version: int, n: int) -> Snapshot:
    cs = basic_site()
    doors = [c.door for c in cs.changes if isinstance(c, PutDoor)]
    groups = [c.group for c in cs.changes if isinstance(c, PutGroup)]
    users = [c.user for c in cs.changes if isinstance(c, PutUser)]
    from edge.model import PutSchedule

    scheds = [c.schedule for c in cs.changes if isinstance(c, PutSchedule)]
    creds = [Credential(card=100_000 + i, user=["alice", "bob"][i % 2]) for i in range(n)]
    return Snapshot(version=version, doors=doors, schedules=scheds, groups=groups, users=users, credentials=creds)


def add_cards(frm: int, cards: range, user: str = "alice") -> ChangeSet:
    return ChangeSet(
        from_version=frm, to_version=frm + 1,
        changes=[PutCredential(credential=Credential(card=c, user=user)) for c in cards],
    )  # fmt: skip


async def test_birth_then_first_sync_by_chunked_snapshot(
    broker: Mosquitto, tmp_path: Path, site_key: Ed25519PrivateKey
) -> None:
    site, gw = unique("s"), "gw1"
    async with (
        gateway(broker, tmp_path / "gw", site_key, site=site, gw=gw, max_message_bytes=16384) as g,
        cloud_peer(broker, site_key, site=site, gw=gw, max_message_bytes=16384) as cloud,
    ):
        birth = await cloud.wait_online()
        assert birth.site == site and birth.gateway == gw and birth.rights_version == 0
        assert [d.id for d in birth.doors] == ["front", "lab"]
        assert birth.readers[0].kind == "wiegand"
        assert g.link.online and g.link.offline_since is None and g.states == [True]
        snap = site_snapshot(7, 3000)
        result = await cloud.send_snapshot(snap)
        assert result.ok and result.applied and result.version == 7, result
        chunks = [r for r in cloud.rights_replies if type(r).__name__ == "ChunkAck"]
        assert len(chunks) > 3  # it really was chunked
        assert g.store.version == 7
        assert g.store.index.cred(100_000 + 2999) is not None
        assert (await g.store.counts())["credentials"] == 3000
        # The same transfer again is answered from memory of it, not applied twice.
        again = await cloud.send_snapshot(snap, id=result.id)
        assert again.ok and again.version == 7 and again.applied
        # A fresh transfer at the version already held: acknowledged, not applied.
        same = await cloud.send_snapshot(snap)
        assert same.ok and not same.applied and same.version == 7
        # Birth on request carries the new version.
        await cloud.request_rebirth()
        b2 = await cloud.wait_for(lambda: cloud.births[-1] if cloud.births[-1].rights_version == 7 else None)
        assert b2.rights_version == 7


async def test_a_snapshot_of_many_more_chunks_than_the_rights_queue_drops_none(
    broker: Mosquitto, tmp_path: Path, site_key: Ed25519PrivateKey
) -> None:
    """The cloud sends a window of chunks at a time (cloud.CHUNK_WINDOW), not every unacknowledged chunk at
    once: a snapshot of ~200 chunks to a gateway whose rights queue holds 80 messages goes through with no
    message dropped. (Before, the whole burst overflowed the queue; on a loaded gateway each round's copies
    kept it full, and a large snapshot never finished: test_link_crash timed out under load.)"""
    from cloud_bridge.cloud import CHUNK_WINDOW, chunk_round

    assert chunk_round(200, set()) == list(range(CHUNK_WINDOW))
    assert chunk_round(200, set(range(CHUNK_WINDOW))) == list(range(CHUNK_WINDOW, 2 * CHUNK_WINDOW))
    assert chunk_round(200, set(range(200))) == [199]  # all staged, no result yet: prod with the last
    site, gw = unique("s"), "gw1"
    async with (
        gateway(broker, tmp_path / "gw", site_key, site=site, gw=gw, max_message_bytes=16384,
                rights_queue=CHUNK_WINDOW + 16) as g,
        cloud_peer(broker, site_key, site=site, gw=gw, max_message_bytes=4096, resend_s=5.0) as cloud,
    ):  # fmt: skip
        await cloud.wait_online()
        result = await cloud.send_snapshot(site_snapshot(3, 12_000), timeout=120)
        acks = {r.index for r in cloud.rights_replies if type(r).__name__ == "ChunkAck"}
        assert result.ok and result.version == 3, result
        assert len(acks) > 2 * CHUNK_WINDOW, len(acks)  # several windows
        assert g.link.stats["dropped"] == 0, g.link.stats
        assert (await g.store.counts())["credentials"] == 12_000


async def test_deltas_in_order_duplicate_gap_and_out_of_order(
    broker: Mosquitto, tmp_path: Path, site_key: Ed25519PrivateKey
) -> None:
    site, gw = unique("s"), "gw1"
    async with (
        gateway(broker, tmp_path / "gw", site_key, site=site, gw=gw) as g,
        cloud_peer(broker, site_key, site=site, gw=gw) as cloud,
    ):
        await cloud.wait_online()
        r1 = await cloud.send_change_set(basic_site())
        assert r1.ok and r1.applied and r1.version == 1
        r2 = await cloud.send_change_set(add_cards(1, range(5000, 5010)))
        assert r2.ok and r2.applied and r2.version == 2 and r2.changes == 10
        # duplicate (same id resent, or the same set again): acknowledged, not applied twice
        dup = await cloud.send_change_set(add_cards(1, range(5000, 5010)), id=r2.id)
        assert dup.ok and not dup.applied and dup.version == 2
        old = await cloud.send_change_set(basic_site())
        assert old.ok and not old.applied and old.version == 2
        # out of order: 3->4 arrives before 2->3: a gap, nothing applied, a resync asked for
        gap = await cloud.send_change_set(add_cards(3, range(7000, 7005)))
        assert not gap.ok and gap.error is not None and gap.error.code == "version_gap"
        assert gap.version == 2
        rs = await cloud.wait_for(lambda: cloud.resyncs)
        assert rs[-1] == ResyncRequest(have=2, reason="version_gap", ref=gap.id)
        assert g.store.index.cred(7000) is None and g.store.version == 2
        # then the missing one and the one after it, in order
        assert (await cloud.send_change_set(add_cards(2, range(6000, 6005)))).version == 3
        r4 = await cloud.send_change_set(add_cards(3, range(7000, 7005)))
        assert r4.ok and r4.version == 4 and g.store.index.cred(7004) is not None
        # a delete
        r5 = await cloud.send_change_set(ChangeSet(from_version=4, to_version=5, changes=[DeleteCredential(card=7004)]))
        assert r5.ok and g.store.index.cred(7004) is None


async def test_rejected_messages_name_the_problem_and_apply_nothing(
    broker: Mosquitto, tmp_path: Path, site_key: Ed25519PrivateKey
) -> None:
    site, gw = unique("s"), "gw1"
    async with (
        gateway(broker, tmp_path / "gw", site_key, site=site, gw=gw, max_message_bytes=8192) as g,
        cloud_peer(broker, site_key, site=site, gw=gw) as cloud,
    ):
        await cloud.wait_online()
        assert (await cloud.send_change_set(basic_site())).version == 1
        before = await g.store.counts()

        async def raw(data: bytes) -> RightsResult:
            n = len(cloud.rights_replies)
            await cloud.publish_raw(Leaf.RIGHTS, data)
            r: RightsResult = await cloud.wait_for(
                lambda: next((x for x in cloud.rights_replies[n:] if isinstance(x, RightsResult)), None)
            )
            return r

        # unknown door in a group: named, nothing of the set applied (the card before it neither)
        bad_ref = ChangeSet(from_version=1, to_version=2, changes=[
            PutCredential(credential=Credential(card=4242, user="alice")),
            PutGroup(group=Group(id="g2", doors=["nowhere"])),
        ])  # fmt: skip
        r = await cloud.send_change_set(bad_ref)
        assert not r.ok and r.error is not None and r.error.code == "unknown_reference", r
        assert "nowhere" in r.error.message and r.version == 1
        assert g.store.index.cred(4242) is None
        # a bad field type: msgspec names the path; the id is still echoed
        js = b'{"type":"change_set","id":"m1","change_set":{"from_version":1,"to_version":"two","changes":[]}}'
        r = await raw(js)
        assert r.id == "m1" and r.error is not None and r.error.code == "malformed"
        assert "$.change_set.to_version" in r.error.message
        # a bad door field value
        js = (
            b'{"type":"change_set","id":"m2","change_set":{"from_version":1,"to_version":2,'
            b'"changes":[{"type":"put_door","door":{"id":"has space"}}]}}'
        )
        r = await raw(js)
        assert r.error is not None and r.error.code == "malformed" and "door.id" in r.error.message
        # garbage
        r = await raw(b"\xc1\x00garbage")
        assert r.id is None and r.error is not None and r.error.code == "malformed"
        # unknown message type
        r = await raw(b'{"type":"format_disk","id":"m3"}')
        assert r.id == "m3" and r.error is not None and r.error.code == "malformed"
        # oversized
        big = add_cards(1, range(10_000, 12_000))
        r = await raw(encode(ChangeSetMsg(id="big", change_set=big)))
        assert r.id == "big" and r.error is not None and r.error.code == "too_large"
        # a chunk with no signed manifest staged for its transfer
        r = await raw(encode(SnapshotChunk(id="t1", version=9, index=1, count=2)))
        assert r.id == "t1" and r.error is not None and r.error.code == "unsigned"
        # a well-formed change set without a signature
        r = await raw(encode(ChangeSetMsg(id="plain", change_set=add_cards(1, range(1, 3)))))
        assert r.id == "plain" and r.error is not None and r.error.code == "unsigned"
        assert g.store.version == 1
        # a complete snapshot that is invalid as a whole: nothing of it applied
        bad_snap = Snapshot(version=9, doors=[Door(id="x")], users=[User(id="u")],
                            credentials=[Credential(card=1, user="ghost")])  # fmt: skip
        r = await cloud.send_snapshot(bad_snap)
        assert not r.ok and r.error is not None and r.error.code == "unknown_reference", r
        assert g.store.version == 1 and await g.store.counts() == before
        # JSON works as well as MessagePack
        ok = await cloud_json_change_set(cloud, add_cards(1, range(8000, 8002)))
        assert ok.ok and ok.version == 2


async def cloud_json_change_set(cloud: object, cs: ChangeSet) -> RightsResult:
    from cloud_bridge.cloud import CloudPeer

    assert isinstance(cloud, CloudPeer)
    cloud.encoding = "json"
    try:
        return await cloud.send_change_set(cs)
    finally:
        cloud.encoding = "msgpack"


async def test_events_drained_and_acknowledged(broker: Mosquitto, tmp_path: Path, site_key: Ed25519PrivateKey) -> None:
    site, gw = unique("s"), "gw1"
    async with (
        gateway(broker, tmp_path / "gw", site_key, site=site, gw=gw, batch_events=40) as g,
        cloud_peer(broker, site_key, site=site, gw=gw) as cloud,
    ):
        await cloud.wait_online()
        for i in range(300):
            g.journal.record("access.granted", door="front", card=i, user="alice")
        await cloud.wait_events(300)
        await cloud.wait_for(lambda: g.journal.depth == 0)
        seqs = [e.seq for e in cloud.events.values()]
        assert seqs == sorted(seqs) and len(set(seqs)) == 300
        assert [e.card for e in cloud.events.values()] == list(range(300))
        assert all(e.link_up for e in cloud.events.values())
        assert g.link.stats["batches_sent"] >= 300 // 40


async def test_broker_outage_loses_no_event_and_keeps_order(
    broker: Mosquitto, tmp_path: Path, site_key: Ed25519PrivateKey
) -> None:
    site, gw = unique("s"), "gw1"
    async with (
        gateway(broker, tmp_path / "gw", site_key, site=site, gw=gw, batch_events=50) as g,
        cloud_peer(broker, site_key, site=site, gw=gw) as cloud,
    ):
        await cloud.wait_online()
        for i in range(100):
            g.journal.record("access.granted", door="front", card=i)
        await cloud.wait_events(100)
    async with gateway(broker, tmp_path / "gw", site_key, site=site, gw=gw, batch_events=50) as g:
        # the broker goes down while taps go on
        await asyncio.sleep(0.3)
        broker.stop()
        await asyncio.sleep(0.5)
        assert not g.link.online and g.link.offline_since is not None
        for i in range(100, 600):
            g.journal.record("access.granted", door="front", card=i)
            if i % 50 == 0:
                await asyncio.sleep(0.01)
        await g.journal.flush()
        assert g.journal.depth >= 500
        broker.start()
        async with cloud_peer(broker, site_key, site=site, gw=gw) as cloud2:
            await cloud2.wait_events(500, timeout=30)
            await cloud2.wait_for(lambda: g.journal.depth == 0, timeout=30)
            cards = [e.card for e in cloud2.events.values()]
            # after the first session's acked events, the rest arrive once each, in order
            assert [c for c in cards if c is not None and c >= 100] == list(range(100, 600))
            offline = [e for e in cloud2.events.values() if e.card is not None and e.card >= 100]
            assert not any(e.link_up for e in offline)
            assert g.link.online and g.states[-1] is True and False in g.states


async def test_a_repeated_ack_sends_the_window_again_only_when_it_names_a_batch_past_a_gap(
    broker: Mosquitto, tmp_path: Path, site_key: Ed25519PrivateKey
) -> None:
    """A repeated acknowledgement that names a batch of the current round beyond it (the cloud got that batch
    but lacks one before it) makes the gateway go back at once; one that names a duplicate (a batch already
    answered, or one sent before the last go-back: what a broker redelivers after a node died) does not. Going
    back on those fed a storm of resends in the fleet bench (bench/fleet_cluster.py: 355,000 duplicates for
    200,000 events after a node was killed)."""
    site, gw = unique("s"), "gw1"
    async with (
        gateway(broker, tmp_path / "gw", site_key, site=site, gw=gw, batch_events=10, ack_timeout_s=120.0) as g,
        cloud_peer(broker, site_key, site=site, gw=gw, auto_ack=False) as cloud,
    ):
        await cloud.wait_online()
        for i in range(30):  # durable together: three batches of ten
            g.journal.record("access.granted", door="front", card=i)
        await cloud.wait_for(lambda: len(cloud.batches) >= 1)
        b1 = cloud.batches[0]
        await cloud.ack_events(b1.last_seq, ref=b1.ref)  # (one batch ahead after a connect, then two)
        await cloud.wait_for(lambda: len(cloud.batches) >= 3 and cloud.batches[-1].last_seq >= 30)
        assert [(b.prev_seq, b.last_seq) for b in cloud.batches] == [(0, 10), (10, 20), (20, 30)]
        b2, b3 = cloud.batches[-2], cloud.batches[-1]
        await cloud.wait_for(lambda: g.journal.depth == 30 - b1.last_seq)
        resends = g.link.stats["resends"]

        def sent_again(after: int) -> bool:
            return any(b.prev_seq == b1.last_seq for b in cloud.batches[after:])

        # the same ack again, naming b1 (answered already): a duplicate, nothing sent again
        n = len(cloud.batches)
        await cloud.ack_events(b1.last_seq, ref=b1.ref)
        await asyncio.sleep(2.0)
        assert len(cloud.batches) == n and g.link.stats["resends"] == resends
        assert g.link.stats["repeated_acks"] == 1
        # naming b3, of this round and beyond the mark: the cloud lacks b2, so the window goes again now
        await cloud.ack_events(b1.last_seq, ref=b3.ref)
        await cloud.wait_for(lambda: sent_again(n), timeout=5)
        assert g.link.stats["resends"] == resends + 1
        await cloud.wait_for(lambda: cloud.batches[-1].last_seq == 30)
        await asyncio.sleep(1.5)  # past the once-a-second bound on going back
        # naming b2, sent before that go-back: a late copy of the old round, nothing sent again
        n = len(cloud.batches)
        await cloud.ack_events(b1.last_seq, ref=b2.ref)
        await asyncio.sleep(2.0)
        assert len(cloud.batches) == n and g.link.stats["resends"] == resends + 1
        assert g.link.stats["repeated_acks"] == 2
        # an ack naming no batch ("I hold up to here", as a cloud says when it connects) still sends the rest
        await cloud.ack_events(b1.last_seq, ref="")
        await cloud.wait_for(lambda: sent_again(n), timeout=5)
        assert g.link.stats["resends"] == resends + 2


async def test_a_cloud_that_does_not_answer_gets_one_batch_at_ever_longer_intervals(
    broker: Mosquitto, tmp_path: Path, site_key: Ed25519PrivateKey
) -> None:
    """Congestion control of the upload: after an ack timeout one batch goes ahead of the acknowledgements; each
    timeout in a row sends that one batch again and doubles the wait (x 1-1.25, at most 8 x ack_timeout_s);
    an acknowledgement brings the wait back and opens the window by one. A fixed timeout with the whole window
    sent again made a slow cloud's backlog many times larger (bench/fleet_cluster.py after a node kill)."""
    site, gw = unique("s"), "gw1"
    async with (
        gateway(broker, tmp_path / "gw", site_key, site=site, gw=gw, batch_events=1, ack_timeout_s=0.4) as g,
        cloud_peer(broker, site_key, site=site, gw=gw, auto_ack=False) as cloud,
    ):
        await cloud.wait_online()
        arrived: list[float] = []
        cloud.on_events.append(lambda b: arrived.append(time.monotonic()))
        for i in range(12):
            g.journal.record("access.granted", door="front", card=i)
        await asyncio.sleep(8.0)
        # the window of 8 at the connect, then only the first batch, again and again
        assert [(b.prev_seq, b.last_seq) for b in cloud.batches[:8]] == [(i, i + 1) for i in range(8)]
        assert {(b.prev_seq, b.last_seq) for b in cloud.batches[8:]} == {(0, 1)}
        arrived = arrived[7:]  # from the first batch's last sending at the connect
        gaps = [b - a for a, b in itertools.pairwise(arrived)]
        assert 5 <= len(arrived) <= 6, gaps  # at about 0, 0.4, 1.3, 3.3, 6.5 s
        assert 0.3 <= gaps[0] <= 0.8, gaps
        assert all(y >= 1.5 * x for x, y in itertools.pairwise(gaps[:3])), gaps  # doubling, below the cap
        assert max(gaps) <= 8 * 0.4 + 0.5, gaps  # the cap
        assert g.link.stats["ack_timeouts"] == len(arrived) - 1
        # acknowledged: the wait is back to 0.4 s and two batches go ahead (not the whole window of 8)
        n = len(cloud.batches)
        await cloud.ack_events(1)
        await cloud.wait_for(lambda: len(cloud.batches) >= n + 2)
        await asyncio.sleep(1.0)
        after = [(b.prev_seq, b.last_seq) for b in cloud.batches[n:]]
        assert after[:2] == [(1, 2), (2, 3)], after
        assert {p for p, _ in after} == {1, 2}, after  # then the timeout (0.4 s again) sends from seq 1 again
        assert len(after) >= 3, after


async def test_unacknowledged_events_are_sent_again_after_restart(
    broker: Mosquitto, tmp_path: Path, site_key: Ed25519PrivateKey
) -> None:
    site, gw = unique("s"), "gw1"
    async with (
        gateway(broker, tmp_path / "gw", site_key, site=site, gw=gw) as g,
        cloud_peer(broker, site_key, site=site, gw=gw, auto_ack=False) as cloud,
    ):
        await cloud.wait_online()
        for i in range(50):
            g.journal.record("door.state", door="front", detail={"i": i})
        await cloud.wait_events(50)
        first_ids = set(cloud.events)
        assert g.journal.depth == 50  # nothing acknowledged, nothing deleted
        await cloud.ack_events(20)
        await cloud.wait_for(lambda: g.journal.depth == 30)
    async with (
        gateway(broker, tmp_path / "gw", site_key, site=site, gw=gw) as g,
        cloud_peer(broker, site_key, site=site, gw=gw) as cloud,
    ):
        await cloud.wait_events(30)
        await cloud.wait_for(lambda: g.journal.depth == 0)
        again = set(cloud.events)
        assert again <= first_ids and len(again) == 30  # the same ids: the cloud can de-duplicate
        assert min(e.seq for e in cloud.events.values()) == 21


async def test_clean_shutdown_publishes_death_and_restart_a_new_birth(
    broker: Mosquitto, tmp_path: Path, site_key: Ed25519PrivateKey
) -> None:
    site, gw = unique("s"), "gw1"
    async with cloud_peer(broker, site_key, site=site, gw=gw) as cloud:
        async with gateway(broker, tmp_path / "gw", site_key, site=site, gw=gw):
            b1 = await cloud.wait_online()
        death = await cloud.wait_offline()
        assert death.reason == "shutdown" and death.session == b1.session
        async with gateway(broker, tmp_path / "gw", site_key, site=site, gw=gw):
            b2 = await cloud.wait_online(after=b1.session)
            assert b2.session > b1.session
    # retained: a cloud that connects later still learns the state
    async with cloud_peer(broker, site_key, site=site, gw=gw) as late:
        st = await late.wait_for(lambda: late.status)
        assert isinstance(st, Death)


async def test_commands_executed_and_refused(broker: Mosquitto, tmp_path: Path, site_key: Ed25519PrivateKey) -> None:
    site, gw = unique("s"), "gw1"
    other_key = Ed25519PrivateKey.generate()
    async with (
        gateway(broker, tmp_path / "gw", site_key, site=site, gw=gw) as g,
        cloud_peer(broker, site_key, site=site, gw=gw) as cloud,
        cloud_peer(broker, other_key, site=site, gw=gw) as forger,
        cloud_peer(broker, site_key, site=site, gw="gw2") as for_gw2,
    ):
        await cloud.wait_online()
        r = await cloud.command(Unlock(door="front", seconds=3), operator="alice@example.com")
        assert r.ok and g.commands.calls[-1] == ("unlock", "front", 3)
        r = await cloud.command(SetDoorMode(door="lab", mode=DoorMode.LOCKED), operator="alice")
        assert r.ok and g.commands.calls[-1] == ("door_mode", "lab", DoorMode.LOCKED)
        r = await cloud.command(SetDoorMode(door="lab"), operator="alice")
        assert r.ok and g.commands.calls[-1] == ("door_mode", "lab", None)
        r = await cloud.command(Lockdown(active=True), operator="bob")
        assert r.ok and g.commands.calls[-1] == ("lockdown", True)
        r = await cloud.command(Unlock(door="cellar"), operator="alice")
        assert not r.ok and r.error is not None and r.error.code == "invalid" and "cellar" in r.error.message
        n_calls = len(g.commands.calls)

        async def refused(sender: object, data: bytes) -> str:
            start = len(cloud.command_results)
            await cloud.send_command(data)
            res = await cloud.wait_for(lambda: cloud.command_results[start:])
            assert not res[0].ok and res[0].error is not None
            return res[0].error.code

        signed = cloud.sign(Lockdown(active=False), operator="mallory")
        assert await refused(cloud, encode(msgspec.structs.replace(signed, sig=b""))) == "unsigned"
        assert await refused(cloud, signed.body) == "unsigned"  # a bare command body
        assert await refused(cloud, encode(forger.sign(Lockdown(active=False), operator="mallory"))) == "bad_signature"
        tampered = signed.body.replace(b"mallory", b"mallorz")
        assert await refused(cloud, encode(msgspec.structs.replace(signed, body=tampered))) == "bad_signature"
        expired = cloud.sign(Lockdown(active=False), operator="mallory", ttl_s=10, now=time.time() - 3600)
        assert await refused(cloud, encode(expired)) == "expired"
        assert await refused(cloud, encode(for_gw2.sign(Lockdown(active=False), operator="mallory"))) == "wrong_target"
        assert await refused(cloud, b"\x93\x01\x02") == "malformed"
        assert g.commands.calls[n_calls:] == []  # none of them did anything
        # replay: the first copy runs, the second is refused and carries the first one's result
        ok = cloud.sign(Unlock(door="lab", seconds=1), operator="alice")
        start = len(cloud.command_results)
        await cloud.send_command(ok)
        await cloud.send_command(ok)
        res = await cloud.wait_for(
            lambda: cloud.command_results[start:] if len(cloud.command_results) - start >= 2 else None
        )
        assert res[0].ok and res[1].error is not None and res[1].error.code == "replayed"
        assert res[1].original is not None and res[1].original.ok
        assert g.commands.calls[n_calls:] == [("unlock", "lab", 1)]

        # every refusal is journalled as a security event (and reaches the cloud like any event)
        def security() -> list[str | None]:
            return [e.reason for e in cloud.events.values() if e.type == SECURITY_COMMAND_REJECTED]

        # (rate-limited: the first refusal of each kind is journalled, the rest only counted)
        await cloud.wait_for(lambda: len(security()) >= 6)
        events = list(cloud.events.values())
        assert sorted(security()) == sorted(["unsigned", "bad_signature", "expired", "wrong_target", "malformed",
                                             "replayed"])  # fmt: skip
        assert any(e.type == "command.executed" and e.user == "alice@example.com" for e in events)


async def test_replay_refused_after_restart(broker: Mosquitto, tmp_path: Path, site_key: Ed25519PrivateKey) -> None:
    site, gw = unique("s"), "gw1"
    async with cloud_peer(broker, site_key, site=site, gw=gw) as cloud:
        signed = cloud.sign(Unlock(door="front"), operator="alice", ttl_s=300)
        async with gateway(broker, tmp_path / "gw", site_key, site=site, gw=gw) as g:
            await cloud.wait_online()
            await cloud.send_command(signed)
            r = await cloud.wait_for(lambda: cloud.command_results)
            assert r[0].ok and g.commands.calls == [("unlock", "front", 5.0)]
        async with gateway(broker, tmp_path / "gw", site_key, site=site, gw=gw) as g:
            await cloud.wait_online(after=cloud.births[-1].session)
            await cloud.send_command(signed)
            r = await cloud.wait_for(lambda: cloud.command_results[1:])
            assert r[0].error is not None and r[0].error.code == "replayed"
            assert g.commands.calls == []


async def test_link_task_restarts_and_offline_state(
    broker: Mosquitto, tmp_path: Path, site_key: Ed25519PrivateKey
) -> None:
    site, gw = unique("s"), "gw1"
    async with gateway(broker, tmp_path / "gw", site_key, site=site, gw=gw) as g:
        async with cloud_peer(broker, site_key, site=site, gw=gw) as cloud:
            await cloud.wait_online()
        broker.stop(kill=True)
        for _ in range(100):
            if not g.link.online:
                break
            await asyncio.sleep(0.05)
        assert not g.link.online and g.link.offline_since is not None
        broker.start()
        for _ in range(200):
            if g.link.online:
                break
            await asyncio.sleep(0.05)
        assert g.link.online and g.link.offline_since is None


async def test_event_acks_carry_the_cloud_clock(broker: Mosquitto, tmp_path: Path, site_key: Ed25519PrivateKey) -> None:
    """A cloud whose clock is an hour ahead: the gateway hears it (with a short round trip) in the acks, and
    its ClockTrust raises a skew alarm and, untrusted, takes the cloud's time."""
    import time as _time

    from edge.timetrust import CLOCK_SKEW, ClockTrust

    site, gw = unique("s"), "gw1"
    samples: list[tuple[float, float]] = []
    async with (
        gateway(broker, tmp_path / "gw", site_key, site=site, gw=gw) as g,
        cloud_peer(broker, site_key, site=site, gw=gw, clock=lambda: _time.time() + 3600) as cloud,
    ):
        g.link.on_cloud_time.append(lambda ts, rtt: samples.append((ts, rtt)))
        await cloud.wait_online()
        g.journal.record("access.granted", door="front", card=1)
        await cloud.wait_for(lambda: bool(samples))
    ts, rtt = samples[0]
    assert 0 <= rtt < 5 and abs(ts - _time.time() - 3600) < 10
    trust = ClockTrust(wall=_time.time(), mono=_time.monotonic())  # no last-good time: untrusted
    trust.cloud_time(ts, rtt, _time.time(), _time.monotonic())
    assert CLOCK_SKEW in [a.kind for a in trust.alarms()]
    assert abs(trust.now(_time.time(), _time.monotonic()) - (_time.time() + 3600)) < 10


async def test_the_link_stops_when_cancelled_as_events_become_durable(
    broker: Mosquitto, tmp_path: Path, site_key: Ed25519PrivateKey
) -> None:
    """The upload waited with `asyncio.wait_for`, which on Python 3.11 swallows a cancellation that comes while
    the awaited event is being set: the link's task then never ended (a shutdown hung for ever)."""
    async with gateway(broker, tmp_path / "gw", site_key, site=unique("s"), gw="gw1") as g:
        async with asyncio.timeout(10):
            while not g.link.online:
                await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)  # the upload is idle: nothing to send, waiting to be woken
        for cb in g.journal.on_durable:  # events became durable ...
            cb()
        g.task.cancel()  # ... just as the agent stops
        done, _ = await asyncio.wait({g.task}, timeout=10)
        assert g.task in done and g.task.cancelled()


def test_every_cloud_bridge_error_derives_from_the_package_root() -> None:
    """Every exception class cloud_bridge defines is a CloudBridgeError (and so an EdgeError, which the gateway's
    and the operator's command lines report)."""
    import importlib
    import inspect
    import pkgutil

    import cloud_bridge
    from cloud_bridge.errors import CloudBridgeError
    from edge.errors import EdgeError

    found = {}
    for mod in pkgutil.walk_packages(cloud_bridge.__path__, "cloud_bridge."):
        if mod.name.startswith("cloud_bridge.service.migrations"):
            continue  # Alembic's scripts run only inside Alembic
        m = importlib.import_module(mod.name)
        for name, obj in vars(m).items():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == m.__name__:
                found[f"{m.__name__}.{name}"] = obj
    expected = {"cloud_bridge.protocol.ProtocolError", "cloud_bridge.signing.CommandRejected",
                "cloud_bridge.cloud.CloudError", "cloud_bridge.operator.db.OperatorError",
                "cloud_bridge.operator.provision.ProvisionError", "cloud_bridge.link.staging.StagingFull"}  # fmt: skip
    assert expected <= found.keys()
    from litestar.exceptions import HTTPException

    # (a page's redirect to the login is the web framework's own control flow: an HTTPException)
    outside = [n for n, c in found.items() if not issubclass(c, CloudBridgeError | HTTPException)]
    assert not outside, outside
    assert issubclass(CloudBridgeError, EdgeError)


def test_the_one_backoff_grows_to_its_cap_and_resets() -> None:
    import random

    from cloud_bridge.mqtt import Backoff

    b = Backoff(0.5, 8.0, random.Random(7))
    first = [b() for _ in range(12)]
    assert all(0.25 <= d <= 8.0 for d in first) and max(first[6:]) > 4.0
    b.reset()
    assert 0.25 <= b() <= 0.5  # the first delay after a success is at most `lo` again


def test_the_backoff_grows_per_round_of_endpoints() -> None:
    """With 3 endpoints a failed node is followed by the next one after at most `lo`: the cap doubles only
    after a whole round has failed (issue 20: the first attempt after a node's death may land on a stalled
    node), and a success starts again from `lo`."""
    import random

    from cloud_bridge.mqtt import Backoff

    class Top(random.Random):
        def uniform(self, a: float, b: float) -> float:
            return b  # the cap of each delay

    b = Backoff(0.5, 4.0, Top(), per_round=3)
    assert [b() for _ in range(12)] == [0.5] * 3 + [1.0] * 3 + [2.0] * 3 + [4.0] * 3
    b.reset()
    assert b() == 0.5
    one = Backoff(0.5, 4.0, Top())  # one endpoint: doubles after every failure, as before
    assert [one() for _ in range(5)] == [0.5, 1.0, 2.0, 4.0, 4.0]
    low = Backoff(0.5, 4.0, random.Random(3), per_round=3)
    assert all(0.25 <= low() <= 0.5 for _ in range(3))


def test_the_first_retry_after_a_drop_is_spread_over_reconnect_spread_s() -> None:
    """`link.reconnect_spread_s`: the gateways of a dead node retry over that many seconds, not all within
    `backoff_min_s` (docs/scaling.md); the later delays are the backoff's, and a success spreads again."""
    import random
    import statistics

    from cloud_bridge.mqtt import Backoff

    class Top(random.Random):
        def uniform(self, a: float, b: float) -> float:
            return b

    b = Backoff(0.5, 4.0, Top(), per_round=3, spread=20.0)
    assert [b() for _ in range(7)] == [20.0, 0.5, 0.5, 1.0, 1.0, 1.0, 2.0]
    b.reset()
    assert b() == 20.0
    firsts = []
    for seed in range(2000):
        one = Backoff(0.5, 60.0, random.Random(seed), per_round=3, spread=20.0)
        firsts.append(one())
    assert 0.25 <= min(firsts) < 1.0 and 19.0 < max(firsts) <= 20.0
    assert 9.0 < statistics.median(firsts) < 11.0  # uniform over the spread: ~100 a second for 2,000
    assert Backoff(0.5, 4.0, Top(), spread=0.3)() == 0.5  # a spread below backoff_min_s changes nothing
