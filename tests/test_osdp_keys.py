"""Secure Channel key rotation in session (issue 17), against libosdp's PeripheralDevice on a pty: KEYSET
inside the secure session, the new key committed to its store only once the reader is secure on it, a
refused rotation and one interrupted by a restart, and the systemd-credential store with systemd-creds."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
from pathlib import Path

import pytest

from edge.readers.base import CardRead, ReaderStatus
from edge.readers.osdp import OsdpReader, PlainKeyFile, SystemdCredential
from tests.osdp_peer import SITE_KEY, PeerBus
from tests.test_osdp_bus import FAST, GRANTED_CARD, Gate, online, peers, running, until

__all__ = ["peers"]

NEW_KEY = bytes.fromhex("0F1E2D3C4B5A69788796A5B4C3D2E1F0")


def key_file(tmp_path: Path, key: bytes) -> PlainKeyFile:
    d = tmp_path / "keys"
    d.mkdir(mode=0o700, exist_ok=True)
    p = d / "door1.scbk"
    p.write_text(key.hex())
    p.chmod(0o600)
    return PlainKeyFile(p)


def reader(gate: Gate, pb: PeerBus, store: PlainKeyFile | None, key: bytes, **kw: object) -> OsdpReader:
    r = OsdpReader("front", gate.sink, port=pb.path, address=1, scbk=key.hex(), key_store=store,
                   timing=FAST, **kw)  # type: ignore[arg-type]
    gate.readers["front"] = r
    return r


async def test_key_rotation_in_session(peers: PeerBus, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The old CP had no way to rotate; a KEYSET sent by hand moved the reader and left our CP on the old
    key, refused from then on."""
    caplog.set_level(logging.DEBUG)
    peer = peers.add(1, scbk=SITE_KEY, enforce_secure=True)
    store = key_file(tmp_path, SITE_KEY)
    gate = Gate()
    async with running(reader(gate, peers, store, SITE_KEY)) as r:
        await until(online(gate, secure=True), what="secure online")
        result = await r.rotate_key()
        assert result.ok, result
        assert len(peer.keys) == 1  # the reader took one key, and it is the one now in the store
        new = peer.keys[0]
        assert new != SITE_KEY
        assert store.path.read_text() == new.hex()
        assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
        assert not store.next.exists()
        assert r.secure and peer.sc_active()
        peer.card(GRANTED_CARD, 26)
        await until(lambda: gate.of(CardRead), what="card on the new key")
    assert any(s.detail == "secure channel key rotated" for s in gate.of(ReaderStatus))
    assert all(s.online for s in gate.of(ReaderStatus))  # never reported offline
    wire = b"".join(d for _, d in peers.received)
    assert new not in wire and new.hex() not in caplog.text and new.hex().upper() not in caplog.text
    # a gateway started afresh from the store is secure with the reader
    gate2 = Gate()
    async with running(reader(gate2, peers, store, bytes.fromhex(store.path.read_text()))):
        await until(online(gate2, secure=True), what="secure online on the stored key")


async def test_key_rotation_refused_by_the_reader_keeps_the_old_key(peers: PeerBus, tmp_path: Path) -> None:
    peer = peers.add(1, scbk=SITE_KEY, enforce_secure=True)
    peer.keyset_result = -1  # libosdp answers NAK
    store = key_file(tmp_path, SITE_KEY)
    gate = Gate()
    async with running(reader(gate, peers, store, SITE_KEY)) as r:
        await until(online(gate, secure=True), what="secure online")
        result = await r.rotate_key()
        assert not result.ok and "old key" in result.detail
        assert store.path.read_text() == SITE_KEY.hex() and not store.next.exists()
        peer.card(GRANTED_CARD, 26)
        await until(lambda: gate.of(CardRead), what="card on the old key")
        assert r.secure


async def test_rotation_interrupted_by_a_restart_is_resolved_at_the_next_start(
    peers: PeerBus, tmp_path: Path
) -> None:
    """The gateway stopped after the reader took the new key but before the store committed it: the staged
    key is tried at the next start, and committed once the reader is secure on it."""
    peers.add(1, scbk=NEW_KEY, enforce_secure=True)
    store = key_file(tmp_path, SITE_KEY)
    store.stage(NEW_KEY)
    staged = store.staged()
    assert staged == NEW_KEY
    gate = Gate()
    async with running(reader(gate, peers, store, SITE_KEY, scbk_next=staged.hex())):
        await until(online(gate, secure=True), what="secure online on the staged key")
        await until(lambda: not store.next.exists(), what="staged key committed")
    assert store.path.read_text() == NEW_KEY.hex()
    assert not gate.faults("handshake")


async def test_rotation_needs_a_secure_session_and_a_store(peers: PeerBus) -> None:
    peers.add(1)
    gate = Gate()
    plain = OsdpReader("front", gate.sink, port=peers.path, address=1, secure=False, timing=FAST)
    gate.readers["front"] = plain
    async with running(plain):
        await until(online(gate), what="online")
        with pytest.raises(RuntimeError, match="no key store"):
            await plain.rotate_key()
        plain.key_store = PlainKeyFile(Path("/nonexistent/k"))
        with pytest.raises(RuntimeError, match="secure session"):
            plain.session.rotate_key(NEW_KEY)


def test_systemd_credential_store_round_trip(tmp_path: Path) -> None:
    """Staged and committed with the real systemd-creds (host key): the credential decrypts under its own
    name only, and the key is never on a command line."""
    store = SystemdCredential("door1.scbk", tmp_path)
    store.stage(NEW_KEY)
    assert store.next.exists() and stat.S_IMODE(store.next.stat().st_mode) == 0o600
    assert NEW_KEY.hex().encode() not in store.next.read_bytes()
    assert store.staged() == NEW_KEY
    store.commit()
    assert not store.next.exists()
    out = subprocess.run(["systemd-creds", "decrypt", "--name=door1.scbk", str(store.path), "-"],
                         capture_output=True, check=True).stdout
    assert out.decode() == NEW_KEY.hex()
    wrong = subprocess.run(["systemd-creds", "decrypt", "--name=door2.scbk", str(store.path), "-"],
                           capture_output=True, check=False)
    assert wrong.returncode != 0
    store.stage(SITE_KEY)
    store.discard()
    assert not store.next.exists() and store.staged() is None
    assert os.listdir(tmp_path) == ["door1.scbk.cred"]

