"""The trust boundary, tried as an attacker on the MQTT side would (issue 11): any client that may publish on a
gateway's downlink topics, without the site key. Real Mosquitto, real SQLite, a real tmpfs for the full disk.

Each test shows the refusal, that the link and the rest kept working, and that nothing was lost."""

# ruff: noqa: F811  (pytest fixtures imported from tests.broker are used as parameters)

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud_bridge.cloud import CloudPeer, chunk_snapshot, manifest_of
from cloud_bridge.link import SECURITY_MESSAGE_REJECTED
from cloud_bridge.protocol import (
    ChangeSetMsg,
    ChunkAck,
    EventAck,
    Rebirth,
    RightsResult,
    SignedCommand,
    SnapshotChunk,
    encode,
)
from cloud_bridge.signing import sign_downlink
from cloud_bridge.topics import Leaf
from edge.events import SECURITY_COMMAND_REJECTED
from edge.model import (
    ChangeSet,
    Credential,
    Door,
    DoorMode,
    PutCredential,
    PutDoor,
    PutUser,
    Snapshot,
    User,
)

from .broker import broker, cloud_peer, gateway, site_key, unique  # noqa: F401
from .conftest import basic_site
from .mosquitto import Mosquitto


async def rights_answer(cloud: CloudPeer, data: bytes, rid: str | None) -> RightsResult:
    """Publish one raw message on `rights` and wait for the result naming `rid`."""
    n = len(cloud.rights_replies)
    await cloud.publish_raw(Leaf.RIGHTS, data)
    r: RightsResult = await cloud.wait_for(
        lambda: next((x for x in cloud.rights_replies[n:] if isinstance(x, RightsResult) and x.id == rid), None)
    )
    return r


def backdoor(frm: int, to: int | None = None) -> ChangeSet:
    return ChangeSet(from_version=frm, to_version=to if to is not None else frm + 1, changes=[
        PutUser(user=User(id="mallory")),
        PutCredential(credential=Credential(card=666, user="mallory")),
        PutDoor(door=Door(id="front", mode=DoorMode.UNLOCKED)),
    ])  # fmt: skip


async def test_forged_change_sets_are_refused_with_their_id_and_change_nothing(
    broker: Mosquitto, tmp_path: Path, site_key: Ed25519PrivateKey
) -> None:
    site, gw = unique("s"), "gw1"
    mallory = Ed25519PrivateKey.generate()
    async with (
        gateway(broker, tmp_path / "gw", site_key, site=site, gw=gw) as g,
        cloud_peer(broker, site_key, site=site, gw=gw) as cloud,
        cloud_peer(broker, mallory, site=site, gw=gw, auto_ack=False) as forger,
    ):
        await cloud.wait_online()
        assert (await cloud.send_change_set(basic_site())).version == 1
        before = await g.store.counts()
        # unsigned: put_door unlocked + a backdoor card
        r = await rights_answer(cloud, encode(ChangeSetMsg(id="evil-1", change_set=backdoor(1))), "evil-1")
        assert not r.ok and r.error is not None and r.error.code == "unsigned" and r.version == 1
        # signed by another key
        r = await rights_answer(cloud, forger.seal(ChangeSetMsg(id="evil-2", change_set=backdoor(1))), "evil-2")
        assert not r.ok and r.error is not None and r.error.code == "bad_signature"
        # signed by the site key for another gateway, replayed here
        other = sign_downlink(site_key, ChangeSetMsg(id="evil-3", change_set=backdoor(1)), site=site, gateway="gw2")
        r = await rights_answer(cloud, encode(other), "evil-3")
        assert not r.ok and r.error is not None and r.error.code == "wrong_target"
        # a signed body tampered with
        env = msgspec.msgpack.decode(cloud.seal(ChangeSetMsg(id="evil-4", change_set=basic_site_next())))
        env["body"] = env["body"].replace(b"alice", b"alicf")
        r = await rights_answer(cloud, msgspec.msgpack.encode(env), "evil-4")
        assert not r.ok and r.error is not None and r.error.code == "bad_signature"
        # a huge version, unsigned or forged: refused; the real cloud's next change set applies
        r = await rights_answer(
            cloud, encode(ChangeSetMsg(id="evil-5", change_set=backdoor(1, 2**63 - 1))), "evil-5")  # fmt: skip
        assert not r.ok and r.error is not None and r.error.code == "unsigned"
        assert g.store.version == 1 and await g.store.counts() == before
        assert g.store.index.cred(666) is None
        ok = await cloud.send_change_set(basic_site_next())
        assert ok.ok and ok.applied and ok.version == 2
        # even the site key cannot move the version past 2^53 (a cloud bug must not wedge the gateway)
        huge = ChangeSet(from_version=2, to_version=2**60, changes=[])
        r = await cloud.send_change_set(huge)
        assert not r.ok and r.error is not None and r.error.code == "bad_field"
        assert r.error.path == "change_set.to_version"
        assert g.store.version == 2
        # refusals are journalled (rate-limited: one per kind)
        await cloud.wait_for(lambda: {e.reason for e in cloud.events.values() if e.type == SECURITY_MESSAGE_REJECTED}
                             >= {"unsigned", "bad_signature", "wrong_target"})  # fmt: skip


def basic_site_next() -> ChangeSet:
    return ChangeSet(from_version=1, to_version=2, changes=[
        PutCredential(credential=Credential(card=4711, user="alice")),
    ])  # fmt: skip


def small_snapshot(version: int, cards: range) -> Snapshot:
    cs = basic_site()
    return Snapshot(
        version=version,
        doors=[c.door for c in cs.changes if isinstance(c, PutDoor)],
        users=[c.user for c in cs.changes if isinstance(c, PutUser)],
        groups=[c.group for c in cs.changes if type(c).__name__ == "PutGroup"],  # type: ignore[attr-defined]
        schedules=[c.schedule for c in cs.changes if type(c).__name__ == "PutSchedule"],  # type: ignore[attr-defined]
        credentials=[Credential(card=c, user="alice") for c in cards],
    )


async def test_forged_and_same_version_snapshots_are_refused(
    broker: Mosquitto, tmp_path: Path, site_key: Ed25519PrivateKey
) -> None:
    site, gw = unique("s"), "gw1"
    mallory = Ed25519PrivateKey.generate()
    async with (
        gateway(broker, tmp_path / "gw", site_key, site=site, gw=gw, max_message_bytes=16384) as g,
        cloud_peer(broker, site_key, site=site, gw=gw, max_message_bytes=16384) as cloud,
        cloud_peer(broker, mallory, site=site, gw=gw, max_message_bytes=16384, auto_ack=False) as forger,
    ):
        await cloud.wait_online()
        r = await cloud.send_snapshot(small_snapshot(5, range(1000, 1100)))
        assert r.ok and r.applied and r.version == 5
        before = await g.store.counts()
        # an empty snapshot at the same version, chunks only (no manifest): refused, nothing staged
        empty = chunk_snapshot(Snapshot(version=5), "wipe", 16384)
        r = await rights_answer(cloud, empty[0], "wipe")
        assert r.error is not None and r.error.code == "unsigned"
        assert not list((g.state_dir / "link-snapshot").glob("chunk-*"))
        # ... with a manifest signed by another key
        r = await rights_answer(cloud, forger.seal(manifest_of("wipe2", 6, empty)), "wipe2")
        assert r.error is not None and r.error.code == "bad_signature"
        # ... chunks of a real transfer swapped for other content: the manifest's hash refuses them
        real = chunk_snapshot(small_snapshot(6, range(1000, 1101)), "t6", 16384)
        fake = chunk_snapshot(Snapshot(version=6), "t6", 16384)
        await cloud.publish_raw(Leaf.RIGHTS, cloud.seal(manifest_of("t6", 6, real)))
        r = await rights_answer(cloud, fake[0], "t6")
        assert r.error is not None and r.error.code == "bad_chunk"
        # the same version, even signed by the site key and with other content: never applied
        same = await cloud.send_snapshot(Snapshot(version=5))
        assert same.ok and not same.applied and same.version == 5
        assert g.store.version == 5 and await g.store.counts() == before
        # the real transfer still completes (the cloud resends manifest + chunks)
        done = await cloud.send_chunks("t6", real, version=6)
        assert done.ok and done.applied and done.version == 6
        assert g.store.index.cred(1100) is not None


async def test_forged_event_acks_neither_delete_events_nor_move_the_clock(
    broker: Mosquitto, tmp_path: Path, site_key: Ed25519PrivateKey
) -> None:
    site, gw = unique("s"), "gw1"
    mallory = Ed25519PrivateKey.generate()
    async with (
        gateway(broker, tmp_path / "gw", site_key, site=site, gw=gw, batch_events=5) as g,
        cloud_peer(broker, site_key, site=site, gw=gw, auto_ack=False) as cloud,
    ):
        samples: list[tuple[float, float]] = []
        g.link.on_cloud_time.append(lambda ts, rtt: samples.append((ts, rtt)))
        await cloud.wait_online()
        for i in range(7):
            g.journal.record("access.granted", door="front", card=i)
        await cloud.wait_events(7)
        assert g.journal.depth == 7
        far = time.time() + 11.5 * 86400
        forged = [
            encode(EventAck(upto_seq=2**40, ts=far)),  # unsigned
            encode(sign_downlink(mallory, EventAck(upto_seq=2**40, ts=far), site=site, gateway=gw)),
            encode(sign_downlink(site_key, EventAck(upto_seq=2**40, ts=far), site=site, gateway="gw2")),
            b'{"type":"events_ack","upto_seq":1099511627776,"ts":1e12}',
            b'{"type":"events_ack","upto_seq":5,"x":' + b"[" * 1000 + b"]" * 1000 + b"}",
        ]
        for data in forged:
            await cloud.publish_raw(Leaf.EVENTS_ACK, data)
        # a genuine ack replayed later (its ref answers no batch in flight) releases nothing new, no clock
        old = sign_downlink(site_key, EventAck(upto_seq=0, ts=far, ref="0123456789abcdef"), site=site, gateway=gw)
        await cloud.publish_raw(Leaf.EVENTS_ACK, encode(old))
        await cloud.wait_for(lambda: g.link.stats["refused"] >= 5)
        await asyncio.sleep(0.3)
        await g.journal.flush()
        held = await g.journal.read(0, 100)
        assert [e.card for e in held if e.type == "access.granted"] == list(range(7))  # nothing released
        assert samples == [] and g.link.online
        kinds = [e.reason for e in held if e.type == SECURITY_MESSAGE_REJECTED]
        assert set(kinds) == {"unsigned", "bad_signature", "wrong_target", "malformed"}
        # the real cloud's ack releases what it holds and gives one clock sample, with its round trip
        upto = cloud.have_upto
        await cloud.ack_events(upto)
        async with asyncio.timeout(10):
            while any(e.seq <= upto for e in await g.journal.read(0, 100)):
                await asyncio.sleep(0.05)
        assert len(samples) == 1 and abs(samples[0][0] - time.time()) < 5 and 0 <= samples[0][1] < 10


@pytest.mark.parametrize("leaf", [Leaf.RIGHTS, Leaf.COMMAND, Leaf.EVENTS_ACK])
async def test_one_message_never_kills_the_link(
    broker: Mosquitto, tmp_path: Path, site_key: Ed25519PrivateKey, leaf: Leaf
) -> None:
    """The two messages that took the link down (a version >= 2^63, 1,000 nested arrays in an ignored
    field), sent again and again: the link stays up, answers, and a signed lockdown still gets its result."""
    site, gw = unique("s"), "gw1"
    async with (
        asyncio.timeout(90),  # a hang fails here with the line it hung on, not at pytest's timeout
        gateway(broker, tmp_path / "gw", site_key, site=site, gw=gw) as g,
        cloud_peer(broker, site_key, site=site, gw=gw) as cloud,
    ):
        first = await cloud.wait_online()
        overflow = msgspec.msgpack.encode({"type": "snapshot_chunk", "id": "x", "version": 2**64 - 1, "index": 0,
                                           "count": 1})  # fmt: skip
        nested = b'{"type":"change_set","id":"n1","ignored":' + b"[" * 1000 + b"]" * 1000 + b"}"
        nested_mp = b"\x82\xa4type\xa7command\xa4junk" + b"\x91" * 5000 + b"\xc0"
        for _ in range(20):
            for data in (overflow, nested, nested_mp, b"\xc1", b""):
                await cloud.publish_raw(leaf, data)
        await asyncio.sleep(0.5)
        assert g.link.online and g.link.stats["handler_errors"] == 0
        assert cloud.births[-1].session == first.session  # never reconnected
        from cloud_bridge.protocol import Lockdown

        r = await cloud.command(Lockdown(active=True), operator="root")
        assert r.ok and ("lockdown", True) in g.commands.calls
        if leaf is Leaf.RIGHTS:
            refusals = [x for x in cloud.rights_replies if isinstance(x, RightsResult) and not x.ok]
            assert refusals and all(x.error is not None and x.error.code == "malformed" for x in refusals)
            assert (await cloud.send_change_set(basic_site())).ok


async def test_unsigned_commands_are_unsigned_and_refusals_name_the_request(
    broker: Mosquitto, tmp_path: Path, site_key: Ed25519PrivateKey
) -> None:
    site, gw = unique("s"), "gw1"
    mallory = Ed25519PrivateKey.generate()
    from cloud_bridge.protocol import Lockdown

    async with (
        gateway(broker, tmp_path / "gw", site_key, site=site, gw=gw) as g,
        cloud_peer(broker, site_key, site=site, gw=gw) as cloud,
        cloud_peer(broker, mallory, site=site, gw=gw, auto_ack=False) as forger,
    ):
        await cloud.wait_online()
        signed = forger.sign(Lockdown(active=True), operator="mallory")
        rid = msgspec.msgpack.decode(signed.body)["request_id"]
        for data, code in ((encode(SignedCommand(body=signed.body)), "unsigned"), (encode(signed), "bad_signature")):
            n = len(cloud.command_results)
            await cloud.send_command(data)
            res = await cloud.wait_for(lambda n=n: cloud.command_results[n:])  # type: ignore[misc]
            assert res[0].request_id == rid and res[0].error is not None and res[0].error.code == code
        assert g.commands.calls == []


async def test_a_command_flood_cannot_push_real_events_out_of_the_journal(
    broker: Mosquitto, tmp_path: Path, site_key: Ed25519PrivateKey
) -> None:
    site, gw = unique("s"), "gw1"
    mallory = Ed25519PrivateKey.generate()
    from cloud_bridge.protocol import Lockdown

    async with (
        gateway(broker, tmp_path / "gw", site_key, site=site, gw=gw) as g,
        cloud_peer(broker, mallory, site=site, gw=gw, auto_ack=False) as forger,
    ):
        await forger.wait_online()
        for i in range(5):
            g.journal.record("access.granted", door="front", card=i)
        bad = [encode(forger.sign(Lockdown(active=False), operator="mallory")) for _ in range(50)]
        for _ in range(40):  # 2,000 bad-signature commands
            for data in bad:
                await forger.send_command(data)
        await forger.wait_for(lambda: g.link.stats["refused"] >= 2000, timeout=120)
        await g.journal.flush()
        events = await g.journal.read(0, 10_000)
        rejected = [e for e in events if e.type == SECURITY_COMMAND_REJECTED]
        assert 1 <= len(rejected) <= 2, len(rejected)
        assert sum(1 for e in events if e.type == "access.granted") == 5


def fill_disk(path: Path) -> None:
    """Write zeros to `path` until the filesystem refuses (unbuffered: nothing left to fail at close)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            try:
                if os.write(fd, b"\0" * 65536) == 0:
                    break
            except OSError:
                break
    finally:
        os.close(fd)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 6 MiB tmpfs of the test's own (the state filesystem of a small gateway)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m,mode=0700", "tmpfs", str(mnt)], capture_output=True,
                       text=True, check=False)  # fmt: skip
    if r.returncode != 0:
        pytest.fail(f"this test needs to mount a tmpfs (run as root): {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


async def test_staging_is_bounded_and_a_newer_transfer_frees_a_full_disk(
    broker: Mosquitto, small_fs: Path, site_key: Ed25519PrivateKey
) -> None:
    site, gw = unique("s"), "gw1"
    state = small_fs / "gw"
    async with (
        gateway(broker, state, site_key, site=site, gw=gw, max_message_bytes=65536) as g,
        cloud_peer(broker, site_key, site=site, gw=gw, max_message_bytes=65536) as cloud,
    ):
        await cloud.wait_online()
        # 200 forged chunks of 60 KiB (12 MB, twice the filesystem): nothing is written
        forged = encode(SnapshotChunk(id="fill", version=9, index=0, count=1000,
                                      credentials=[Credential(card=i, user="u") for i in range(4000)]))  # fmt: skip
        for _ in range(200):
            await cloud.publish_raw(Leaf.RIGHTS, forged)
        await cloud.wait_for(lambda: g.link.stats["refused"] >= 200, timeout=60)
        assert not list((state / "link-snapshot").glob("chunk-*"))
        # a signed manifest larger than the free space: refused before anything is staged
        big = manifest_of("big", 9, [b"x" * 65536] * 200)  # 13 MB
        r = await rights_answer(cloud, cloud.seal(big), "big")
        assert not r.ok and r.error is not None and r.error.code == "too_large"
        # a real transfer, partly staged; then the disk fills up (something else on the filesystem)
        snap = small_snapshot(9, range(10_000, 40_000))
        chunks = chunk_snapshot(snap, "t9", 65536)
        await cloud.publish_raw(Leaf.RIGHTS, cloud.seal(manifest_of("t9", 9, chunks)))
        for c in chunks[:-1]:
            await cloud.publish_raw(Leaf.RIGHTS, c)
        await cloud.wait_for(lambda: sum(1 for x in cloud.rights_replies if isinstance(x, ChunkAck) and x.id == "t9")
                             >= len(chunks) - 1)  # fmt: skip
        staged = sum(f.stat().st_size for f in (state / "link-snapshot").glob("chunk-*"))
        assert staged > 500_000
        fill_disk(small_fs / "filler")
        st = os.statvfs(small_fs)
        assert st.f_bavail * st.f_frsize < 65536  # the disk is full
        # the cloud gives up on t9 and sends a newer, small snapshot: the old staging is freed, it applies
        r = await cloud.send_snapshot(small_snapshot(10, range(5000, 5010)))
        assert r.ok and r.applied and r.version == 10, r
        assert not list((state / "link-snapshot").glob("chunk-*"))
        assert g.store.index.cred(5005) is not None and g.store.index.cred(10_000) is None


async def test_staged_chunks_are_never_rejoined_at_start_without_a_signed_manifest(
    broker: Mosquitto, tmp_path: Path, site_key: Ed25519PrivateKey
) -> None:
    site, gw = unique("s"), "gw1"
    state = tmp_path / "gw"
    async with (
        gateway(broker, state, site_key, site=site, gw=gw) as g,
        cloud_peer(broker, site_key, site=site, gw=gw) as cloud,
    ):
        await cloud.wait_online()
        assert (await cloud.send_change_set(basic_site())).version == 1
    # an attacker with disk access (or a bug) leaves chunks and a manifest signed by another key
    stage = state / "link-snapshot"
    chunks = chunk_snapshot(Snapshot(version=99), "evil", 16384)
    (stage / "chunk-00000").write_bytes(chunks[0])
    mallory = Ed25519PrivateKey.generate()
    (stage / "manifest").write_bytes(encode(sign_downlink(mallory, manifest_of("evil", 99, chunks), site=site,
                                                          gateway=gw)))  # fmt: skip
    async with gateway(broker, state, site_key, site=site, gw=gw) as g, cloud_peer(broker, site_key, site=site,
                                                                                     gw=gw) as cloud:  # fmt: skip
        await cloud.wait_online()
        assert g.store.version == 1
        await cloud.wait_for(lambda: not (stage / "chunk-00000").exists() or None)
        assert not (stage / "manifest").exists()  # removed before the chunks


async def test_a_signed_rebirth_is_answered_and_an_unsigned_one_refused(
    broker: Mosquitto, tmp_path: Path, site_key: Ed25519PrivateKey
) -> None:
    site, gw = unique("s"), "gw1"
    async with (
        gateway(broker, tmp_path / "gw", site_key, site=site, gw=gw),
        cloud_peer(broker, site_key, site=site, gw=gw) as cloud,
    ):
        await cloud.wait_online()
        n = len(cloud.births)
        r = await rights_answer(cloud, encode(Rebirth()), None)
        assert r.error is not None and r.error.code == "unsigned"
        assert len(cloud.births) == n
        await cloud.request_rebirth()
        await cloud.wait_for(lambda: len(cloud.births) > n)


async def test_a_full_disk_does_not_block_a_signed_lockdown(
    broker: Mosquitto, small_fs: Path, site_key: Ed25519PrivateKey
) -> None:
    """The nonce insert fails on a full disk: the lockdown is still carried out at once, its replay is refused
    from memory, the birth warns, and the link never restarts."""
    from cloud_bridge.protocol import Lockdown

    site, gw = unique("s"), "gw1"
    async with (
        gateway(broker, small_fs / "gw", site_key, site=site, gw=gw) as g,
        cloud_peer(broker, site_key, site=site, gw=gw) as cloud,
    ):
        first = await cloud.wait_online()
        fill_disk(small_fs / "filler")
        signed = cloud.sign(Lockdown(active=True), operator="root")
        n = len(cloud.command_results)
        await cloud.send_command(signed)
        res = await cloud.wait_for(lambda: cloud.command_results[n:])
        assert res[0].ok, res[0]
        assert g.commands.calls == [("lockdown", True)]
        assert g.link._nonces.degraded is not None and "nonce not saved" in g.link._nonces.degraded
        await cloud.send_command(signed)  # the same bytes again: refused from memory
        res = await cloud.wait_for(lambda: cloud.command_results[n + 1 :])
        assert res[0].error is not None and res[0].error.code == "replayed"
        assert g.commands.calls == [("lockdown", True)]
        await cloud.request_rebirth()
        b = await cloud.wait_for(lambda: next((x for x in cloud.births if any("nonces" in w for w in x.warnings)),
                                              None))  # fmt: skip
        assert b.session == first.session  # the same connection all along


async def test_damaged_rights_make_the_gateway_ask_the_cloud_for_a_snapshot(
    broker: Mosquitto, tmp_path: Path, site_key: Ed25519PrivateKey
) -> None:
    site, gw = unique("s"), "gw1"
    state = tmp_path / "gw"
    async with (
        gateway(broker, state, site_key, site=site, gw=gw),
        cloud_peer(broker, site_key, site=site, gw=gw) as cloud,
    ):
        before = await cloud.wait_online()
        assert (await cloud.send_snapshot(small_snapshot(3, range(100, 110)))).applied
    with open(state / "rights.db", "r+b") as f:  # a bad header: the file is no SQLite database any more
        f.write(b"this is not sqlite")
    async with (
        gateway(broker, state, site_key, site=site, gw=gw) as g,
        cloud_peer(broker, site_key, site=site, gw=gw) as cloud,
    ):
        birth = await cloud.wait_online(after=before.session)  # not the retained birth of the first run
        assert g.store.needs_snapshot == "damaged"
        assert any("rights damaged" in w for w in birth.warnings), birth.warnings
        await cloud.request_rebirth()  # the resync is sent with every birth: the one at connect may predate us
        rs = await cloud.wait_for(lambda: next((r for r in cloud.resyncs if r.reason == "damaged"), None))
        assert rs.have == g.store.version
        r = await cloud.send_snapshot(small_snapshot(rs.have + 1, range(100, 120)))
        assert r.ok and r.applied and g.store.needs_snapshot is None
        assert g.store.index.cred(115) is not None


def test_a_discard_cut_short_never_leaves_a_manifest_over_missing_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A power cut during a discard: the first unlink is the manifest's, so what is left is chunks without
    a manifest (never trusted, discarded at the next start), never a signed manifest over a partial set."""
    from cloud_bridge.link.staging import SnapshotStaging

    stage = SnapshotStaging(tmp_path / "stage", max_bytes=1 << 20)
    stage._open()
    for i in range(3):
        (stage.path / f"chunk-{i:05d}").write_bytes(b"x")
    (stage.path / "manifest").write_bytes(b"signed envelope")
    real_unlink = Path.unlink

    def cut_after_one(self: Path, missing_ok: bool = False) -> None:
        real_unlink(self, missing_ok=missing_ok)
        raise OSError("power cut")

    monkeypatch.setattr(Path, "unlink", cut_after_one)
    with pytest.raises(OSError, match="power cut"):
        stage.discard()
    monkeypatch.undo()
    assert stage.envelope() is None
    assert len(stage.staged()) == 3
