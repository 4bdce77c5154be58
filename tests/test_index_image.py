"""The index image (`edge/index_image.py`): a boot maps it and replays only the change sets since; a damaged,
stale or half-written image is detected and the index rebuilt from the rights file; decisions agree with the
plain reference however the index was built."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from edge.decision import Decider, Reason
from edge.errors import ChangeRejected
from edge.index import index_digest
from edge.index_image import ImageError, read_image
from edge.model import Assignment, ChangeSet, Credential, Door, Group, PutCredential, PutDoor, PutGroup, PutUser, User
from edge.store import Store

from .reference import SiteModel, change_set_refusal
from .test_decide_property import ZONES, instants, runtimes
from .test_store_property import SEQUENCE_SETTINGS, Probes, cards_of, change_sets

NOW = datetime(2025, 3, 3, 10, 0, tzinfo=UTC)


async def settled(store: Store) -> None:
    """Wait for the image the store writes in the background after building its index from the rows."""
    await store.image_written()


def fast(path: Path, tz: str = "UTC") -> Store:
    return Store(path, tz, verify_at_open=False)


@SEQUENCE_SETTINGS
@given(st.data())
def test_decisions_agree_with_the_reference_after_replay_and_after_a_crash_between_image_and_commit(
    data: st.DataObject,
) -> None:
    """Random change sets; after each: in memory, after a boot from an older image (replaying the sets
    since), and with an image written for the next version while the rights file never committed it (what a
    crash between the two would leave): the image is refused as stale and the index built from the rows."""
    zone = data.draw(st.sampled_from(ZONES), label="zone")

    async def scenario(root: Path) -> None:
        path = root / "main" / "rights.db"
        model = SiteModel(ZoneInfo(zone))
        version = 0
        for n in range(data.draw(st.integers(2, 6), label="change sets")):
            cs = data.draw(change_sets(model, version, zone), label=f"change set {n}")
            refusal = change_set_refusal(model, cs)
            before = root / f"before{n}"
            if path.exists():
                shutil.copytree(path.parent, before)
            old_model = model.copy()
            async with fast(path, zone) as store:
                await settled(store)
                assert store.version == version
                try:
                    await store.apply(cs)
                except ChangeRejected as e:
                    assert refusal == e.code, f"refused {e.code} ({e}), the reference says {refusal}"
                    continue
                assert refusal is None, f"applied, the reference refuses it: {refusal}"
                model.apply(cs)
                version += 1
                now = data.draw(instants, label=f"now {n}")
                rt = data.draw(runtimes(model, n=8), label=f"probes {n}") if model.credentials and model.doors else None
                probes = Probes(model, now, cards_of(model, cs), rt, f"change set {n}, ")
                probes.check(Decider(store.index), "in memory")
                if n % 2:
                    await store.compact()  # writes the image at this version
            async with fast(path, zone) as again:
                assert again.version == version and again.image_problem is None
                event(f"booted from {again.booted_from}")
                probes.check(Decider(again.index), f"booted from {again.booted_from}")
                assert again._digest == await asyncio.to_thread(index_digest, again.index)
                await settled(again)
            if before.exists() and n % 2:  # the image of version n+1 beside the rights of version n
                shutil.copyfile(path.parent / "rights.db.idx", before / "rights.db.idx")
                async with fast(before / "rights.db", zone) as crashed:
                    # built from the rows, or from the previous image when there is a sound one
                    assert crashed.version == version - 1 and crashed.image_problem is not None
                    assert crashed.image_problem["image"] == "stale"
                    assert crashed.booted_from == "rows" or crashed.image_problem["booted_from"] == "previous image"
                    Probes(old_model, now, probes.cards, None, f"change set {n}, ").check(
                        Decider(crashed.index), "image ahead of the rights"
                    )
                    await settled(crashed)
            newest = path.parent / "rights.db.idx"
            if newest.exists() and data.draw(st.booleans(), label=f"damage the newest image {n}"):
                damage(newest, "magic")  # the previous image (or the rows) must give exactly the same rights
                async with fast(path, zone) as fallback:
                    assert fallback.version == version and fallback.image_problem is not None
                    assert fallback.image_problem["image"] == "damaged" and not newest.exists()
                    how = fallback.image_problem.get("booted_from", "rows")
                    event(f"newest image damaged: booted from the {how}")
                    probes.check(Decider(fallback.index), f"newest image damaged, booted from the {how}")
                    assert fallback._digest == await asyncio.to_thread(index_digest, fallback.index)
                    await settled(fallback)

    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(scenario(Path(tmp)))


def site(n: int, frm: int = 0, *, card0: int = 1000) -> ChangeSet:
    changes: list[object] = [PutDoor(door=Door(id="front")), PutGroup(group=Group(id="staff", doors=["front"]))]
    for i in range(n):
        changes.append(PutUser(user=User(id=f"u{i}", assignments=[Assignment(group="staff")])))
        changes.append(PutCredential(credential=Credential(card=card0 + i, user=f"u{i}")))
    return ChangeSet(from_version=frm, to_version=frm + 1, changes=changes)  # type: ignore[arg-type]


def granted(store: Store, card: int) -> bool:
    return Decider(store.index).decide("front", card, NOW).granted


async def a_store_with_an_image(path: Path, n: int = 300) -> None:
    async with fast(path) as s:
        await s.apply(site(n))
        await s.compact()
    async with fast(path) as s:
        assert s.booted_from == "image" and s.image_problem is None


def damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "column_byte":
        data[len(data) - 100] ^= 0x10  # inside the last column
    elif how == "header_byte":
        data[40] ^= 0x01
    elif how == "truncated":
        del data[len(data) // 2 :]
    elif how == "empty":
        data = bytearray()
    elif how == "magic":
        data[0:8] = b"NOTANIDX"
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["column_byte", "header_byte", "truncated", "empty", "magic"])
async def test_a_damaged_image_is_discarded_with_an_alarm_and_rebuilt(tmp_path: Path, how: str) -> None:
    path = tmp_path / "rights.db"
    await a_store_with_an_image(path)
    image = path.with_name("rights.db.idx")
    path.with_name("rights.db.idx.1").unlink(missing_ok=True)  # the only image (two: see the tests below)
    damage(image, how)
    with pytest.raises(ImageError):
        read_image(image)
    async with fast(path) as s:
        assert s.booted_from == "rows"
        assert s.image_problem is not None and s.image_problem["image"] == "damaged", s.image_problem
        assert granted(s, 1000) and granted(s, 1299) and not granted(s, 1300) and len(s.index) == 300
        await settled(s)  # a new image is written from the rows
    read_image(image)
    async with fast(path) as s:
        assert s.booted_from == "image" and s.image_problem is None and len(s.index) == 300


async def test_an_image_of_rights_replaced_since_is_stale_and_rebuilt(tmp_path: Path) -> None:
    """A snapshot renews the image epoch: the image of the rights before it is never replayed onto it."""
    path = tmp_path / "rights.db"
    await a_store_with_an_image(path)
    old = tmp_path / "old.idx"
    shutil.copyfile(path.with_name("rights.db.idx"), old)
    async with fast(path) as s:
        from edge.model import Snapshot

        snap = Snapshot(
            version=5, doors=[Door(id="front")], groups=[Group(id="staff", doors=["front"])],
            users=[User(id="x", assignments=[Assignment(group="staff")])], credentials=[Credential(card=7, user="x")],
        )  # fmt: skip
        await s.replace(snap)
    shutil.copyfile(old, path.with_name("rights.db.idx"))  # as if the snapshot's own image was never written
    async with fast(path) as s:
        assert s.booted_from == "rows" and s.version == 5
        assert s.image_problem is not None and s.image_problem["image"] == "stale"
        assert granted(s, 7) and not granted(s, 1000) and len(s.index) == 1
        await settled(s)
    async with fast(path) as s:
        assert s.booted_from == "image" and granted(s, 7) and not granted(s, 1000)


async def test_a_boot_from_an_image_replays_only_the_change_sets_since(tmp_path: Path) -> None:
    path = tmp_path / "rights.db"
    await a_store_with_an_image(path)
    async with fast(path) as s:
        await s.apply(ChangeSet(from_version=1, to_version=2, changes=[
            PutCredential(credential=Credential(card=1000, user="u0", status="revoked")),
            PutCredential(credential=Credential(card=5000, user="u1")),
        ]))  # fmt: skip
        assert s.index.overlay_size == 2
    async with fast(path) as s:
        assert s.booted_from == "image" and s.version == 2
        assert s.index.overlay_size == 2  # the two rows replayed over the image of version 1
        d = Decider(s.index)
        assert d.decide("front", 1000, NOW).reason is Reason.CREDENTIAL_REVOKED
        assert granted(s, 5000) and granted(s, 1001)


async def test_rows_changed_under_the_image_are_caught_by_the_checksum(tmp_path: Path) -> None:
    """The image and the replay must give the checksum the rights file holds: a change set the `changed`
    table does not name (here: its row removed by hand) makes the image stale, not silently wrong."""
    import sqlite3

    path = tmp_path / "rights.db"
    await a_store_with_an_image(path)
    async with fast(path) as s:
        await s.apply(ChangeSet(from_version=1, to_version=2, changes=[
            PutCredential(credential=Credential(card=1000, user="u0", status="revoked"))]))  # fmt: skip
    con = sqlite3.connect(path)
    con.execute("DELETE FROM changed")
    con.commit()
    con.close()
    async with fast(path) as s:
        assert s.booted_from == "rows" and s.image_problem is not None and s.image_problem["image"] == "stale"
        assert Decider(s.index).decide("front", 1000, NOW).reason is Reason.CREDENTIAL_REVOKED


def kill_when_written(proc: subprocess.Popen[bytes], folder: Path, pattern: str) -> None:
    """SIGKILL `proc` as soon as a file matching `pattern` shows in `folder` (within 10 s, else at once)."""
    deadline = time.monotonic() + 10
    while not any(folder.glob(pattern)) and time.monotonic() < deadline:
        pass
    proc.send_signal(signal.SIGKILL)


async def test_sigkill_while_the_image_is_written_leaves_a_usable_gateway(tmp_path: Path) -> None:
    path = tmp_path / "rights.db"
    n = 20_000
    async with fast(path) as s:
        await s.apply(site(n))
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    rng = random.Random(18)
    leftovers = 0
    booted: list[str] = []
    for round_ in range(6):
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.image_write_kill", str(path)], stdout=subprocess.PIPE, env=env,
            cwd=Path(__file__).resolve().parent.parent,
        )  # fmt: skip
        assert proc.stdout is not None
        line = await asyncio.to_thread(proc.stdout.readline)
        assert line.startswith(b"ready"), line
        if round_ % 2:  # at a random moment of the loop (link, write, fsync, replace, map, DELETE) ...
            await asyncio.sleep(rng.uniform(0.0, 0.3))
            proc.send_signal(signal.SIGKILL)
        else:  # ... or the moment its temp file is seen: a kill inside write_image, on a fast disk too
            await asyncio.to_thread(kill_when_written, proc, path.parent, "rights.db.idx.*.tmp")
        proc.wait()
        proc.stdout.close()
        leftovers += any(path.parent.glob("rights.db.idx.*.tmp"))
        async with fast(path) as s:
            booted.append(s.booted_from)
            assert s.version == 1 and len(s.index) == n
            assert all(granted(s, 1000 + i) for i in range(0, n, 997)) and not granted(s, 1000 + n)
            await settled(s)
    assert leftovers >= 1, "no kill landed while an image was being written"
    print(f"kills mid-write: {leftovers} of 6; booted from: {booted}")


async def two_images(path: Path) -> None:
    """Rights of version 3 with the image of version 2 (the newest) and of version 1 (the previous)."""
    async with fast(path) as s:
        await s.apply(site(300))
        await s.compact()  # image of version 1
        await s.apply(ChangeSet(from_version=1, to_version=2, changes=[
            PutCredential(credential=Credential(card=1000, user="u0", status="revoked")),
            PutCredential(credential=Credential(card=5000, user="u1")),
        ]))  # fmt: skip
        await s.compact()  # image of version 2; version 1's is kept as the previous image
        await s.apply(ChangeSet(from_version=2, to_version=3, changes=[
            PutCredential(credential=Credential(card=1001, user="u1", status="revoked"))]))  # fmt: skip
    assert read_image(path.with_name("rights.db.idx"))[0].version == 2
    assert read_image(path.with_name("rights.db.idx.1"))[0].version == 1


def version_3_rights(s: Store) -> None:
    d = Decider(s.index)
    assert s.version == 3 and len(s.index) == 301
    assert d.decide("front", 1000, NOW).reason is Reason.CREDENTIAL_REVOKED
    assert d.decide("front", 1001, NOW).reason is Reason.CREDENTIAL_REVOKED
    assert granted(s, 5000) and granted(s, 1002) and granted(s, 1299) and not granted(s, 1300)


@pytest.mark.parametrize("how", ["column_byte", "header_byte", "truncated", "magic"])
async def test_a_damaged_newest_image_boots_from_the_previous_one_with_the_same_rights(tmp_path: Path,
                                                                                       how: str) -> None:  # fmt: skip
    path = tmp_path / "rights.db"
    await two_images(path)
    newest, previous = path.with_name("rights.db.idx"), path.with_name("rights.db.idx.1")
    damage(newest, how)
    async with fast(path) as s:
        assert s.booted_from == "image" and s.image_problem is not None
        assert s.image_problem["image"] == "damaged" and s.image_problem["booted_from"] == "previous image"
        assert not newest.exists()  # the damaged one is gone
        assert s.index.overlay_size == 3  # version 1's image + the rows of the change sets 2 and 3
        version_3_rights(s)
        assert s._digest == await asyncio.to_thread(index_digest, s.index)
        await s.compact()  # a new newest image (version 3); the sound previous one stays
    assert read_image(newest)[0].version == 3 and read_image(previous)[0].version == 1
    async with fast(path) as s:
        assert s.booted_from == "image" and s.image_problem is None and s.index.overlay_size == 0
        version_3_rights(s)


async def test_both_images_damaged_rebuild_from_the_rows(tmp_path: Path) -> None:
    path = tmp_path / "rights.db"
    await two_images(path)
    damage(path.with_name("rights.db.idx"), "column_byte")
    damage(path.with_name("rights.db.idx.1"), "truncated")
    async with fast(path) as s:
        assert s.booted_from == "rows" and s.image_problem is not None and s.image_problem["image"] == "damaged"
        version_3_rights(s)
        await settled(s)
    async with fast(path) as s:
        assert s.booted_from == "image" and s.image_problem is None
        version_3_rights(s)


async def test_the_previous_image_is_not_kept_across_a_snapshot(tmp_path: Path) -> None:
    """A snapshot renews the image epoch: the images before it are of other rights, never a fallback."""
    from edge.model import Snapshot

    path = tmp_path / "rights.db"
    await two_images(path)
    async with fast(path) as s:
        await s.replace(Snapshot(version=9, doors=[Door(id="front")], groups=[Group(id="staff", doors=["front"])],
                                 users=[User(id="x", assignments=[Assignment(group="staff")])],
                                 credentials=[Credential(card=7, user="x")]))  # fmt: skip
        assert not path.with_name("rights.db.idx.1").exists()
        assert read_image(path.with_name("rights.db.idx"))[0].version == 9
    async with fast(path) as s:
        assert s.booted_from == "image" and granted(s, 7) and not granted(s, 1002)
