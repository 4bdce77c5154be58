"""Rotating the site's command key in band (issue 6), against a real Mosquitto.

Gateway side: a `RotateKey` signed by the current key is stored durably before its ok and every later
command must be signed by the new key (also after a restart with the old key still configured); a
rotation signed by any other key, or replayed, changes nothing. Operator side: `Service.rotate_key()`
moves every gateway it can reach, keeps signing for a gateway that was offline with the key it holds, and
brings that gateway over when it returns.
"""

# ruff: noqa: F811

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud_bridge.cloud import CloudPeer
from cloud_bridge.link import KEY_FILE, KEY_ROTATED
from cloud_bridge.operator.service import Service
from cloud_bridge.permissions import Action, ObjectType, PermissionDenied, PermissionGroup, grant
from cloud_bridge.protocol import CommandResult, Lockdown, RotateKey, SignedCommand, Unlock, encode
from cloud_bridge.signing import KeyState, fingerprint, load_key_state, public_bytes, save_key_state
from edge.errors import StoreError
from edge.events import SECURITY_COMMAND_REJECTED

from .broker import broker, cloud_peer, gateway, site_key, unique  # noqa: F401
from .mosquitto import Mosquitto


def rotate_to(key: Ed25519PrivateKey, **kw: float | None) -> RotateKey:
    return RotateKey(new_public_key=public_bytes(key).hex(), **kw)  # type: ignore[arg-type]


async def send_and_wait(cloud: CloudPeer, signed: SignedCommand) -> CommandResult:
    """Send one signed command once and return the first result after it (a refusal of an unverifiable
    command names no request)."""
    start = len(cloud.command_results)
    await cloud.send_command(signed)
    res: list[CommandResult] = await cloud.wait_for(lambda: cloud.command_results[start:])
    return res[0]


async def test_rotation_end_to_end_and_the_stored_key_wins_after_restart(
    broker: Mosquitto, tmp_path: Path, site_key: Ed25519PrivateKey
) -> None:
    site, gw, state = unique("s"), "gw1", tmp_path / "gw"
    new_key = Ed25519PrivateKey.generate()
    old_fp, new_fp = fingerprint(public_bytes(site_key)), fingerprint(public_bytes(new_key))
    async with cloud_peer(broker, site_key, site=site, gw=gw) as cloud:
        async with gateway(broker, state, site_key, site=site, gw=gw) as g:
            await cloud.wait_online()
            assert (await cloud.command(Unlock(door="front", seconds=1), operator="alice")).ok  # old key works
            assert not (state / KEY_FILE).exists()
            r = await cloud.command(rotate_to(new_key), operator="root")
            assert r.ok, r
            # stored before the ok: the file is there, holds the new key, and is an ordinary 0644 file
            assert load_key_state(state / KEY_FILE) is not None
            st = load_key_state(state / KEY_FILE)
            assert st is not None and st.key == public_bytes(new_key).hex() and st.previous is None
            assert stat.S_IMODE(os.stat(state / KEY_FILE).st_mode) == 0o644
            assert g.link.key_state.key == public_bytes(new_key).hex()
            # the old key is refused from now on, the new one works
            old_signed = cloud.sign(Unlock(door="front", seconds=2), operator="alice")
            refused = await send_and_wait(cloud, old_signed)
            assert not refused.ok and refused.error is not None and refused.error.code == "bad_signature"
            cloud.signing_key = new_key
            assert (await cloud.command(Unlock(door="lab", seconds=3), operator="alice")).ok
            assert ("unlock", "front", 2) not in g.commands.calls
            assert g.commands.calls[-1] == ("unlock", "lab", 3)

            # journalled: the rotation with both fingerprints, the refusal as a security event
            def rotated() -> list[dict[str, object]]:
                return [dict(e.detail) for e in cloud.events.values() if e.type == KEY_ROTATED]

            def refusals() -> list[str | None]:
                return [e.reason for e in cloud.events.values() if e.type == SECURITY_COMMAND_REJECTED]

            await cloud.wait_for(lambda: rotated() and "bad_signature" in refusals())
            ev = rotated()
            assert len(ev) == 1 and ev[0]["old"] == old_fp and ev[0]["new"] == new_fp
            assert all(e.user == "root" for e in cloud.events.values() if e.type == KEY_ROTATED)
            session = cloud.births[-1].session
        # restart with the OLD key still in the config: the stored key wins
        async with gateway(broker, state, site_key, site=site, gw=gw) as g2:
            await cloud.wait_online(after=session)
            assert g2.link.config_key == public_bytes(site_key)
            assert g2.link.key_state.key == public_bytes(new_key).hex()
            assert (await cloud.command(Lockdown(active=True), operator="alice")).ok  # new key
            cloud.signing_key = site_key
            r = await send_and_wait(cloud, cloud.sign(Lockdown(active=False), operator="alice"))
            assert not r.ok and r.error is not None and r.error.code == "bad_signature"
            assert g2.commands.calls == [("lockdown", True)]


async def test_rotation_signed_by_a_wrong_key_is_refused_and_changes_nothing(
    broker: Mosquitto, tmp_path: Path, site_key: Ed25519PrivateKey
) -> None:
    site, gw, state = unique("s"), "gw1", tmp_path / "gw"
    mallory, target = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    async with (
        gateway(broker, state, site_key, site=site, gw=gw) as g,
        cloud_peer(broker, site_key, site=site, gw=gw) as cloud,
        cloud_peer(broker, mallory, site=site, gw=gw) as forger,
    ):
        await cloud.wait_online()
        # signed by a key the gateway does not hold (asking to rotate to the forger's own key, or another)
        for new in (mallory, target):
            r = await send_and_wait(cloud, forger.sign(rotate_to(new), operator="mallory"))
            assert not r.ok and r.error is not None and r.error.code == "bad_signature"
        # a rotation of another gateway, signed by the right key: wrong target
        async with cloud_peer(broker, site_key, site=site, gw="gw2") as other:
            r = await send_and_wait(cloud, other.sign(rotate_to(mallory), operator="root"))
            assert not r.ok and r.error is not None and r.error.code == "wrong_target"
        assert not (state / KEY_FILE).exists()
        assert g.link.key_state == KeyState(key=public_bytes(site_key).hex())
        assert (await cloud.command(Unlock(door="front"), operator="alice")).ok  # the site key still works
        forger_result = await send_and_wait(cloud, forger.sign(Unlock(door="front"), operator="mallory"))
        assert forger_result.error is not None and forger_result.error.code == "bad_signature"
        # refusals are journalled once per kind and window (bad_signature, wrong_target), the rest counted
        await cloud.wait_for(lambda: sum(1 for e in cloud.events.values() if e.type == SECURITY_COMMAND_REJECTED) >= 2)
        assert g.link.stats["refused"] >= 4
        assert not any(e.type == KEY_ROTATED for e in cloud.events.values())


async def test_replayed_rotation_is_refused(broker: Mosquitto, tmp_path: Path, site_key: Ed25519PrivateKey) -> None:
    site, gw, state = unique("s"), "gw1", tmp_path / "gw"
    b_key = Ed25519PrivateKey.generate()
    async with (
        gateway(broker, state, site_key, site=site, gw=gw) as g,
        cloud_peer(broker, site_key, site=site, gw=gw) as cloud,
    ):
        await cloud.wait_online()
        a_to_b = cloud.sign(rotate_to(b_key), operator="root", ttl_s=600)
        assert (await send_and_wait(cloud, a_to_b)).ok
        # the same bytes again: signed by a key that is no longer in use
        r = await send_and_wait(cloud, a_to_b)
        assert not r.ok and r.error is not None and r.error.code == "bad_signature"
        # rotate back to A; the captured A->B rotation verifies again, but its nonce was seen
        cloud.signing_key = b_key
        assert (await cloud.command(rotate_to(site_key), operator="root")).ok
        cloud.signing_key = site_key
        r = await send_and_wait(cloud, a_to_b)
        assert not r.ok and r.error is not None and r.error.code == "replayed"
        assert g.link.key_state.key == public_bytes(site_key).hex()
        assert (await cloud.command(Unlock(door="front"), operator="alice")).ok  # A still the key
        # rotating to the key in use is an ok that changes nothing (and journals no rotation)
        before = load_key_state(state / KEY_FILE)
        assert (await cloud.command(rotate_to(site_key), operator="root")).ok
        assert load_key_state(state / KEY_FILE) == before
        await cloud.wait_for(lambda: sum(1 for e in cloud.events.values() if e.type == KEY_ROTATED) >= 2)
        await cloud.wait_for(lambda: any(e.detail.get("unchanged") for e in cloud.events.values()))
        assert sum(1 for e in cloud.events.values() if e.type == KEY_ROTATED) == 2


async def test_rotation_with_not_before_keeps_the_old_key_until_then(
    broker: Mosquitto, tmp_path: Path, site_key: Ed25519PrivateKey
) -> None:
    site, gw, state = unique("s"), "gw1", tmp_path / "gw"
    new_key = Ed25519PrivateKey.generate()
    now = {"t": 1_900_000_000.0}
    async with (
        gateway(broker, state, site_key, site=site, gw=gw) as g,
        cloud_peer(broker, site_key, site=site, gw=gw) as cloud,
    ):
        g.link.clock = lambda: now["t"]
        await cloud.wait_online()

        def at(key: Ed25519PrivateKey, action: Unlock | RotateKey) -> SignedCommand:
            cloud.signing_key = key
            return cloud.sign(action, operator="root", now=now["t"])

        assert (await send_and_wait(cloud, at(site_key, rotate_to(new_key, not_before=now["t"] + 100)))).ok
        st = load_key_state(state / KEY_FILE)
        assert st is not None and st.pending(now["t"]) and st.previous == public_bytes(site_key).hex()
        r = await send_and_wait(cloud, at(new_key, Unlock(door="front")))
        assert r.error is not None and r.error.code == "bad_signature"  # not yet
        assert (await send_and_wait(cloud, at(site_key, Unlock(door="front", seconds=1)))).ok
        now["t"] += 101
        assert (await send_and_wait(cloud, at(new_key, Unlock(door="front", seconds=2)))).ok
        r = await send_and_wait(cloud, at(site_key, Unlock(door="front", seconds=3)))
        assert r.error is not None and r.error.code == "bad_signature"
        assert g.commands.calls == [("unlock", "front", 1), ("unlock", "front", 2)]


def test_key_state_file_is_atomic_and_a_damaged_one_is_an_error(tmp_path: Path) -> None:
    k1, k2 = (public_bytes(Ed25519PrivateKey.generate()) for _ in range(2))
    st = KeyState(key=k1.hex()).rotated(k2, not_before=None, now=10.0, request_id="r1", operator="root")
    assert st.in_use(11.0) == k2 and st.previous is None and st.request_id == "r1"
    assert KeyState(key=k1.hex()).rotated(k1, not_before=None, now=10.0).key == k1.hex()
    path = tmp_path / KEY_FILE
    save_key_state(path, st)
    assert load_key_state(path) == st
    assert json.loads(path.read_text())["key"] == k2.hex()
    assert [p.name for p in tmp_path.iterdir()] == [KEY_FILE]  # no temporary file left behind
    path.write_text('{"key": "zz"}')
    with pytest.raises(StoreError, match="unreadable"):
        load_key_state(path)
    with pytest.raises(StoreError, match="cannot store"):
        save_key_state(tmp_path / "missing-dir" / KEY_FILE, st)
    assert msgspec.json.decode(encode(rotate_to(Ed25519PrivateKey.generate()), "json"))["action"] == "rotate_key"


# --- operator side ----------------------------------------------------------------------------------------

PW = "correct horse"


async def test_service_rotates_online_gateways_and_catches_up_one_that_was_offline(
    broker: Mosquitto, tmp_path: Path
) -> None:
    site = unique("s")
    svc = Service.init(tmp_path / "cloud.db", site=site, admin="root", host=broker.host, port=broker.port,
                       passphrase=PW)  # fmt: skip
    svc.resend_s = 1.0
    old = svc.signing_key()
    try:
        async with svc, gateway(broker, tmp_path / "gw1", old, site=site, gw="gw1") as g1:
            link = await svc.link()
            async with gateway(broker, tmp_path / "gw2", old, site=site, gw="gw2") as g2:
                await link.wait_online("gw1", 20)
                await link.wait_online("gw2", 20)
                assert (await svc.unlock("gw1", "front", seconds=1)).ok  # the old key works before
                assert (await svc.unlock("gw2", "front", seconds=1)).ok
            await link.wait_for(lambda: not link.online("gw2"), 20)  # gw2 is down during the rotation

            rot = await svc.rotate_key(timeout=20)
            new_pub = bytes.fromhex(rot.public_key)
            assert rot.current and rot.gateways == {"gw1": "ok", "gw2": "offline"}
            assert svc.public_key_hex() == rot.public_key and rot.fingerprint == fingerprint(new_pub)
            assert g1.link.key_state.key == rot.public_key
            assert svc.db.gateway_key("gw1") == rot.fingerprint
            assert svc.db.gateway_key("gw2") == fingerprint(public_bytes(old))  # still holds the old key
            assert public_bytes(svc.key_for("gw2")) == public_bytes(old)
            # the new key works on gw1, the old one is refused there
            assert (await svc.unlock("gw1", "lab", seconds=2)).ok and g1.commands.calls[-1] == ("unlock", "lab", 2)
            r = await link.command("gw1", old, Unlock(door="front"), operator="root", timeout=20)
            assert not r.ok and r.error is not None and r.error.code == "bad_signature"
            # nothing private reaches the database in plain text
            raw = (tmp_path / "cloud.db").read_bytes() + (tmp_path / "cloud.db-wal").read_bytes()
            assert b"BEGIN PRIVATE KEY" not in raw and b"BEGIN ENCRYPTED PRIVATE KEY" in raw

            # gw2 comes back with the old key configured: the next command moves it over first
            async with gateway(broker, tmp_path / "gw2", old, site=site, gw="gw2") as g2:
                await link.wait_online("gw2", 20, after=link.status["gw2"].session)
                assert (await svc.unlock("gw2", "lab", seconds=3)).ok
                assert g2.commands.calls == [("unlock", "lab", 3)]
                assert g2.link.key_state.key == rot.public_key
                assert svc.db.gateway_key("gw2") == rot.fingerprint
            st = load_key_state(tmp_path / "gw2" / KEY_FILE)
            assert st is not None and st.key == rot.public_key
    finally:
        svc.close()


async def test_rotation_needs_update_on_the_site_key_and_changes_nothing_when_refused(
    broker: Mosquitto, tmp_path: Path
) -> None:
    site = unique("s")
    admin = Service.init(tmp_path / "cloud.db", site=site, admin="root", host=broker.host, port=broker.port,
                         passphrase=PW)  # fmt: skip
    try:
        admin.put_permission_group(PermissionGroup(id="viewer", permissions=[
            grant(ObjectType.GATEWAY, Action.READ), grant(ObjectType.SITE_KEY, Action.READ)]))  # fmt: skip
        admin.add_operator("guard", ["viewer"])
        before = admin.public_key_hex()
        async with Service(tmp_path / "cloud.db", operator="guard", passphrase=PW) as guard:
            with pytest.raises(PermissionDenied):
                await guard.rotate_key()
            assert guard._link is None  # refused before anything was sent
        assert admin.public_key_hex() == before
        assert admin.db.get_meta("site_key_pending") is None
    finally:
        admin.close()
