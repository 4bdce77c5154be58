"""The signed cloud commands for OSDP readers (issue 17), end to end: a cloud peer signs them, a real Mosquitto
carries them, the real agent (simulated doors, its cloud link on) verifies and carries them out on an OSDP
reader on a pty, libosdp's PeripheralDevice behind it, in a secure session:

* `osdp_rotate_key`: the new key is made on the gateway, stored 0600 in the configured key store and
  committed only once the reader is secure on it; it never reaches the wire to the cloud, a log or the journal;
* `osdp_output`: the reader's output switches (osdp_OUT), the result carries the states it reports;
* `osdp_firmware_chunk` + `osdp_firmware`: a 64 KiB file staged as signed chunks (an out-of-order chunk is
  refused with what the gateway holds, a wrong hash discards), then sent byte-exact with progress events,
  and the reader's identity checked after it.
"""

# ruff: noqa: F811  (pytest fixtures imported from tests.broker are used as parameters)

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import stat
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud_bridge.cloud import CloudPeer
from cloud_bridge.operator.service import Service
from cloud_bridge.protocol import OsdpFirmware, OsdpFirmwareChunk, OsdpOutput, OsdpRotateKey, Unlock
from cloud_bridge.signing import public_bytes
from edge.agent import Agent, run_agent
from edge.config import check_files, parse_config
from edge.errors import ConfigError
from edge.events import Event
from edge.readers.osdp import OsdpReader, PlainKeyFile
from edge.readers.osdp.commands import Cmd
from edge.readers.osdp.frame import Frame, FrameParser
from edge.sim.hands import simulated_agent
from tests.osdp_peer import SITE_KEY, PeerBus
from tests.test_osdp_bus import until

from .broker import broker, site_key  # noqa: F401
from .mosquitto import Mosquitto
from .test_operator_cli import PW, cli

SITE, GW, READER = "s1", "gw-osdp", "door1.osdp0"


def config_text(broker: Mosquitto, state: Path, keys: Path, sock: Path, port: str, pub_hex: str) -> str:
    return f"""
hardware = "sim"
[site]
id = "{SITE}"
gateway = "{GW}"
[storage]
state_dir = "{state}"
synchronous = "NORMAL"
plaintext_secrets = true
key_store = "{keys}"
[control]
socket = "{sock}"
[link]
host = "{broker.host}"
port = {broker.port}
backoff_min_s = 0.1
backoff_max_s = 0.5
keepalive_s = 5
command_key = "{pub_hex}"
[[readers]]
driver = "osdp"
door = "door1"
port = "{port}"
address = 1
key_file = "door1.scbk"
"""


def key_dir(tmp_path: Path, key: bytes) -> Path:
    d = tmp_path / "keys"
    d.mkdir(mode=0o700)
    f = d / "door1.scbk"
    f.write_text(key.hex())
    f.chmod(0o600)
    return d


@asynccontextmanager
async def gateway(broker: Mosquitto, tmp_path: Path, pb: PeerBus, pub_hex: str, staged: bytes | None = None
                  ) -> AsyncIterator[Agent]:  # fmt: skip
    keys = tmp_path / "keys" if (tmp_path / "keys").exists() else key_dir(tmp_path, SITE_KEY)  # a restart keeps it
    if staged is not None:
        PlainKeyFile(keys / "door1.scbk").stage(staged)  # a rotation the last run left open
    cfg = parse_config(config_text(broker, tmp_path / "state", keys, tmp_path / "edge.sock", pb.path, pub_hex))
    check_files(cfg)
    agent = simulated_agent(cfg)
    async with asyncio.TaskGroup() as tg:
        tg.create_task(run_agent(agent), name="agent")
        await asyncio.wait_for(agent.started.wait(), 10)
        try:
            yield agent
        finally:
            agent.stop()


def events_of(cloud: CloudPeer, type: str) -> list[Event]:
    return [e for e in list(cloud.events.values()) if e.type == type]


async def wait_event(cloud: CloudPeer, type: str, cond: Callable[[Event], bool] = lambda e: True,
                     timeout: float = 30.0) -> Event:  # fmt: skip
    await until(lambda: any(cond(e) for e in events_of(cloud, type)), timeout=timeout, what=type)
    return next(e for e in events_of(cloud, type) if cond(e))


async def test_rotate_key_output_and_firmware_through_the_broker(
    broker: Mosquitto, tmp_path: Path, site_key: Ed25519PrivateKey, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    wire: list[bytes] = []
    with PeerBus() as pb:
        peer = pb.add(1, scbk=SITE_KEY, enforce_secure=True)
        async with (
            gateway(broker, tmp_path, pb, public_bytes(site_key).hex()) as agent,
            CloudPeer(
                host=broker.host, port=broker.port, site=SITE, gateway=GW, signing_key=site_key, resend_s=5.0
            ) as cloud,  # fmt: skip
        ):
            cloud.on_events.append(lambda b: wire.append(repr(b).encode()))
            await cloud.wait_online()
            reader = agent.readers[READER]
            assert isinstance(reader, OsdpReader)
            await until(lambda: reader.online and reader.secure, timeout=10, what="secure online")

            # --- key rotation ---
            r = await cloud.command(OsdpRotateKey(reader=READER), operator="alice")
            assert r.ok, r
            assert r.detail == {"reader": READER, "committed": True}
            assert len(peer.keys) == 1 and peer.keys[0] != SITE_KEY
            new = peer.keys[0]
            store = tmp_path / "keys" / "door1.scbk"
            assert store.read_text() == new.hex()  # committed: the file the next start reads
            assert stat.S_IMODE(store.stat().st_mode) == 0o600
            assert not PlainKeyFile(store).next.exists()
            assert reader.secure and peer.sc_active()
            rotated = await wait_event(cloud, "security.reader_key_rotated")
            assert (rotated.reader, rotated.door, rotated.reason) == (READER, "door1", "committed")
            # an unknown reader, and a rotation with nowhere to store the key, are refused
            bad = await cloud.command(OsdpRotateKey(reader="door9.osdp"), operator="alice")
            assert not bad.ok and bad.error is not None and bad.error.code == "invalid"

            # --- an output, pulsed ---
            r = await cloud.command(OsdpOutput(reader=READER, output=1, seconds=2.5), operator="alice")
            assert r.ok, r
            out = peer.commands_of(__import__("osdp").Command.Output)[-1]
            assert (out["output_no"], out["control_code"], out["timer_count"]) == (1, 5, 25)
            assert r.detail["reader"] == READER and r.detail["output"] == 1
            r = await cloud.command(OsdpOutput(reader=READER, output=7), operator="alice")
            assert not r.ok and r.error is not None and r.error.code == "invalid"
            assert "no output 7" in r.error.message

            # --- firmware: staged as signed chunks, then sent ---
            image = os.urandom(64 * 1024)
            sha = hashlib.sha256(image).hexdigest()
            step = 24 * 1024

            def chunk(offset: int, data: bytes | None = None, digest: str = sha) -> OsdpFirmwareChunk:
                return OsdpFirmwareChunk(
                    sha256=digest,
                    size=len(image),
                    offset=offset,
                    data=data if data is not None else image[offset : offset + step],
                )

            missing = await cloud.command(OsdpFirmware(reader=READER, sha256=sha, size=len(image)), operator="a")
            assert not missing.ok and missing.error is not None and missing.error.code == "not_staged"
            r = await cloud.command(chunk(0), operator="alice")
            assert r.ok and r.detail == {"have": step, "complete": False}
            gap = await cloud.command(chunk(2 * step), operator="alice")  # the middle piece lost
            assert not gap.ok and gap.error is not None and gap.error.code == "gap"
            assert gap.detail == {"have": step}  # where to resume
            r = await cloud.command(chunk(step), operator="alice")
            assert r.ok and r.detail == {"have": 2 * step, "complete": False}
            r = await cloud.command(chunk(2 * step), operator="alice")
            assert r.ok and r.detail == {"have": len(image), "complete": True}
            await wait_event(cloud, "reader.firmware", lambda e: e.reason == "staged")
            # a file whose bytes do not hash to what was signed is discarded
            wrong = hashlib.sha256(b"other").hexdigest()
            bad = await cloud.command(chunk(0, image, digest=wrong), operator="alice")
            assert not bad.ok and bad.error is not None and bad.error.code == "hash_mismatch"

            r = await cloud.command(OsdpFirmware(reader=READER, sha256=sha, size=len(image)), operator="alice")
            assert r.ok and r.detail == {"reader": READER, "state": "started", "offset": 0, "total": len(image)}
            again = await cloud.command(OsdpFirmware(reader=READER, sha256=sha, size=len(image)), operator="alice")
            assert again.ok and again.detail["state"] == "in_progress"
            done = await wait_event(cloud, "reader.firmware", lambda e: e.reason in ("done", "failed"), timeout=90)
            assert done.reason == "done", done
            assert done.detail["firmware"] == "1.2.3" and "identity checked" in str(done.detail["detail"])
            assert bytes(peer.file) == image
            progress = [e.detail["offset"] for e in events_of(cloud, "reader.firmware") if e.reason == "progress"]
            assert len(progress) >= 5 and progress == sorted(progress)
            executed = [e.detail.get("action") for e in events_of(cloud, "command.executed")]
            assert {"osdp_rotate_key", "osdp_output", "osdp_firmware_chunk", "osdp_firmware"} <= set(executed)
    # the new key never left the gateway: not in a log line, not in any event the cloud received
    for text in (new.hex(), new.hex().upper()):
        assert text not in caplog.text
        assert all(text.encode() not in w and new not in w for w in wire)
    assert all(new.hex() not in repr(e) for e in cloud.events.values())


async def test_the_link_keeps_reading_while_a_rotation_waits_for_the_reader(
    broker: Mosquitto, tmp_path: Path, site_key: Ed25519PrivateKey
) -> None:
    """A key rotation waits for the reader (its KEYSET answered, a handshake on the new key): up to 15 s. It
    runs beside the link's read loop, so an unlock sent meanwhile is carried out and answered at once, the
    cloud's resends of the rotation are not refused as replays, and the rotation's own result still comes.
    The reader is held by taking every command off the line from its KEYSET on, for a while."""
    held: list[float] = []
    release = asyncio.Event()

    def hold(data: bytes) -> bytes | None:
        if not held and any(isinstance(f, Frame) and f.code == Cmd.KEYSET for f in FrameParser().feed(data)):
            held.append(1.0)
        return b"" if held and not release.is_set() else None  # b"": the command never reaches the reader

    with PeerBus() as pb:
        peer = pb.add(1, scbk=SITE_KEY, enforce_secure=True)
        async with (
            gateway(broker, tmp_path, pb, public_bytes(site_key).hex()) as agent,
            CloudPeer(host=broker.host, port=broker.port, site=SITE, gateway=GW, signing_key=site_key,
                      resend_s=0.3) as cloud,  # fmt: skip
        ):
            await cloud.wait_online()
            reader = agent.readers[READER]
            assert isinstance(reader, OsdpReader)
            await until(lambda: reader.online and reader.secure, timeout=10, what="secure online")
            pb.intercept = hold
            rotation = asyncio.create_task(cloud.command(OsdpRotateKey(reader=READER), operator="alice"))
            await until(lambda: bool(held), timeout=10, what="the KEYSET on the line")
            try:
                r = await cloud.command(Unlock(door="door1", seconds=1.0), operator="bob", timeout=5)
                assert r.ok, r
                assert not rotation.done()  # answered while the rotation still waits for the reader
                await wait_event(cloud, "command.executed", lambda e: e.detail.get("action") == "unlock")
                assert agent.link is not None
            finally:
                release.set()
            result = await asyncio.wait_for(rotation, 30)
            # the retransmitted KEYSET reached the reader (committed), or it went offline first (kept its key)
            assert result.ok == bool(peer.keys), result
            if result.ok:
                assert result.detail == {"reader": READER, "committed": True}
            else:
                assert result.error is not None and result.error.code == "not_committed", result
            await wait_event(cloud, "security.reader_key_rotated")


async def test_a_firmware_transfer_goes_on_from_its_offset_after_a_gateway_restart(
    broker: Mosquitto, tmp_path: Path, site_key: Ed25519PrivateKey
) -> None:
    """The agent stops in the middle of a transfer: the fragment in flight is answered, the offset the reader
    acknowledged is on disk (transfers.json, written atomically), and the next start sends the rest by
    itself from there once the reader is online: the reader holds the file byte-exact, from one transfer
    (libosdp's PD counts the bytes of a transfer: a resume from a wrong offset would not end right)."""
    image = os.urandom(48 * 1024)
    sha = hashlib.sha256(image).hexdigest()
    pub = public_bytes(site_key).hex()
    log_file = tmp_path / "state" / "firmware" / "transfers.json"
    with PeerBus() as pb:
        peer = pb.add(1, scbk=SITE_KEY, enforce_secure=True)
        async with CloudPeer(host=broker.host, port=broker.port, site=SITE, gateway=GW, signing_key=site_key,
                             resend_s=5.0) as cloud:  # fmt: skip
            async with gateway(broker, tmp_path, pb, pub) as agent:
                await cloud.wait_online()
                reader = agent.readers[READER]
                assert isinstance(reader, OsdpReader)
                await until(lambda: reader.online and reader.secure, timeout=10, what="secure online")
                for off in range(0, len(image), 24 * 1024):
                    r = await cloud.command(OsdpFirmwareChunk(sha256=sha, size=len(image), offset=off,
                                                              data=image[off : off + 24 * 1024]), operator="a")
                    assert r.ok, r
                r = await cloud.command(OsdpFirmware(reader=READER, sha256=sha, size=len(image)), operator="a")
                assert r.ok and r.detail["state"] == "started", r
                await until(lambda: 8 * 1024 < (reader.session.file_offset or 0) < 32 * 1024, timeout=30,
                            what="a part of the file sent")  # fmt: skip
            # stopped: what the reader acknowledged, kept as a running transfer
            kept = json.loads(log_file.read_text())["transfers"][READER]
            assert kept["sha256"] == sha and kept["active"] is True
            assert 0 < kept["offset"] < len(image)
            assert bytes(peer.file[: kept["offset"]]) == image[: kept["offset"]]
            assert not any(peer.file[kept["offset"] :])  # nothing past it reached the reader
            assert stat.S_IMODE(log_file.stat().st_mode) == 0o600
            async with gateway(broker, tmp_path, pb, pub) as agent:
                started = await wait_event(cloud, "reader.firmware", lambda e: e.detail.get("resumed") is True,
                                           timeout=30)  # fmt: skip
                assert started.reason == "started" and started.detail["offset"] == kept["offset"]
                done = await wait_event(cloud, "reader.firmware", lambda e: e.reason in ("done", "failed") and
                                        e.detail.get("detail") != "stopped (the agent stops)", timeout=90)  # fmt: skip
                assert done.reason == "done", done
    assert bytes(peer.file) == image
    assert peer.file_opened == [(1, len(image))]  # one transfer, resumed, not started again
    assert json.loads(log_file.read_text())["transfers"] == {}


def test_key_store_setting(tmp_path: Path) -> None:
    """storage.key_store: strict (an unknown with_key is an error naming the key), defaulting to the systemd
    credentials directory under the state dir, and refused by check-config when other users can enter it."""
    base = f"""
[site]
id = "s1"
gateway = "g1"
[storage]
state_dir = "{tmp_path / "state"}"
"""
    reader = f"""
[[readers]]
driver = "osdp"
door = "door1"
port = "{tmp_path}"
key_file = "door1.scbk"
"""
    cfg = parse_config(base + reader)
    assert cfg.key_store_dir == tmp_path / "state" / "credentials"
    assert parse_config(base + "plaintext_secrets = true\n" + reader).key_store_dir == tmp_path / "state" / "keys"
    with pytest.raises(ConfigError, match=r"storage\.key_store_with_key: invalid enum value 'tpm3'"):
        parse_config(base + 'key_store_with_key = "tpm3"\n' + reader)
    with pytest.raises(ConfigError, match=r"storage\.key_stor: unknown key"):
        parse_config(base + 'key_stor = "/x"\n' + reader)
    open_dir = tmp_path / "open"
    open_dir.mkdir(mode=0o755)
    open_dir.chmod(0o755)
    cfg = parse_config(base + f'key_store = "{open_dir}"\n' + reader)
    with pytest.raises(ConfigError, match=r"storage\.key_store: .* open to other users \(mode 0755\)"):
        check_files(cfg, ports=False)
    open_dir.chmod(0o700)
    check_files(cfg, ports=False)


async def test_the_operator_cli_sends_them(broker: Mosquitto, tmp_path: Path) -> None:
    """`cloud-bridge osdp output|rotate-key|firmware` as its own process, signed with the site's key from the
    site database, authorised as the operator, against the running gateway."""
    db = tmp_path / "site.db"
    svc = Service.init(db, site=SITE, admin="root", host=broker.host, port=broker.port, tz="Europe/Berlin",
                       passphrase=PW)  # fmt: skip
    pub = svc.public_key_hex()
    svc.close()
    with PeerBus() as pb:
        peer = pb.add(1, scbk=SITE_KEY, enforce_secure=True)
        async with gateway(broker, tmp_path, pb, pub) as agent:
            reader = agent.readers[READER]
            assert isinstance(reader, OsdpReader)
            await until(lambda: reader.online and reader.secure and agent.link_online, timeout=15, what="up")
            code, out, err = await cli("osdp", "output", "--gateway", GW, "--reader", READER, "--output", "1",
                                       db=db)  # fmt: skip
            assert code == 0, err
            assert out.startswith(f"{GW}/{READER}: reader {READER}, output 1, states ") and peer.outputs[1] == 1
            code, out, err = await cli("--json", "osdp", "rotate-key", "--gateway", GW, "--reader", READER, db=db)
            assert code == 0, err
            assert json.loads(out) == {"ok": True, "error": None, "detail": {"reader": READER, "committed": True}}
            assert len(peer.keys) == 1 and (tmp_path / "keys" / "door1.scbk").read_text() == peer.keys[0].hex()
            image = os.urandom(40 * 1024)  # two chunks of the CLI's 32 KiB
            (tmp_path / "fw.bin").write_bytes(image)
            code, out, err = await cli("osdp", "firmware", "--gateway", GW, "--reader", READER,
                                       str(tmp_path / "fw.bin"), db=db)  # fmt: skip
            assert code == 0, err
            assert "state started" in out, out
            await until(lambda: bytes(peer.file) == image, timeout=60, what="file on the reader")
            code, out, err = await cli("osdp", "output", "--gateway", GW, "--reader", "nope", db=db)
            assert code == 1 and "no OSDP reader 'nope'" in out, (out, err)


async def test_a_rotation_left_open_by_the_last_run_is_settled_at_start(
    broker: Mosquitto, tmp_path: Path, site_key: Ed25519PrivateKey
) -> None:
    """The agent stopped after the reader took the new key, before the key store committed it: at the next
    start the staged key is tried too, the reader is secure on it, and it is committed (and journalled)."""
    new = bytes.fromhex("0F1E2D3C4B5A69788796A5B4C3D2E1F0")
    with PeerBus() as pb:
        pb.add(1, scbk=new, enforce_secure=True)
        async with (
            gateway(broker, tmp_path, pb, public_bytes(site_key).hex(), staged=new) as agent,
            CloudPeer(host=broker.host, port=broker.port, site=SITE, gateway=GW, signing_key=site_key) as cloud,
        ):
            reader = agent.readers[READER]
            assert isinstance(reader, OsdpReader)
            await until(lambda: reader.online and reader.secure, timeout=10, what="secure on the staged key")
            store = PlainKeyFile(tmp_path / "keys" / "door1.scbk")
            await until(lambda: not store.next.exists(), what="staged key committed")
            assert store.path.read_text() == new.hex()
            ev = await wait_event(cloud, "security.reader_key_rotated")
            assert (ev.reader, ev.reason, ev.detail["committed"]) == (READER, "committed", True)


def test_firmware_store_on_disk(tmp_path: Path) -> None:
    """The staging store alone, on a real directory: pieces in order (a repeated piece is fine, one past what
    is held is a gap), 0700 directory and 0600 files, a hash mismatch discards, and at most two complete and
    two partial files are kept."""
    from edge.errors import CommandFailed
    from edge.readers.osdp.remote import FirmwareStore

    store = FirmwareStore(tmp_path / "firmware")

    def put(data: bytes, offset: int, piece: bytes, sha: str | None = None) -> tuple[int, bool]:
        return store.put(OsdpFirmwareChunk(sha256=sha or hashlib.sha256(data).hexdigest(), size=len(data),
                                           offset=offset, data=piece))  # fmt: skip

    files = [os.urandom(3000 + i) for i in range(4)]
    a = files[0]
    assert put(a, 0, a[:1000]) == (1000, False)
    assert put(a, 0, a[:1000]) == (1000, False)  # resent: nothing changes
    with pytest.raises(CommandFailed) as ei:
        put(a, 2000, a[2000:])
    assert ei.value.code == "gap" and ei.value.detail == {"have": 1000}
    assert put(a, 1000, a[1000:]) == (len(a), True)
    sha_a = hashlib.sha256(a).hexdigest()
    assert store.read(sha_a, len(a)) == a
    assert stat.S_IMODE((tmp_path / "firmware").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "firmware" / f"{sha_a}.bin").stat().st_mode) == 0o600
    with pytest.raises(CommandFailed) as ei:
        put(files[1], 0, files[1], sha=hashlib.sha256(b"x").hexdigest())
    assert ei.value.code == "hash_mismatch" and not list((tmp_path / "firmware").glob("*.part"))
    for f in files[1:]:
        put(f, 0, f[:100])  # partial uploads
    assert len(list((tmp_path / "firmware").glob("*.part"))) == 2
    for f in files[1:]:
        put(f, 0, f)
    kept = sorted(p.name for p in (tmp_path / "firmware").glob("*.bin"))
    assert kept == sorted(f"{hashlib.sha256(f).hexdigest()}.bin" for f in files[2:])
    with pytest.raises(CommandFailed) as ei:
        store.read(sha_a, len(a))
    assert ei.value.code == "not_staged"


def test_transfer_log_on_disk(tmp_path: Path) -> None:
    """The transfers' progress file alone: what is saved loads back; a torn or foreign file is set aside as
    `.bad` (nothing lost: it stays for a look) and read as no transfers; no temporary file stays behind."""
    from edge.readers.osdp.remote import TransferLog

    log_ = TransferLog(tmp_path / "firmware")
    assert log_.load() == {}
    rec = {"sha256": "a" * 64, "total": 4096, "offset": 1024, "start": 512, "file_type": 1, "active": True}
    log_.save({"door1.osdp0": rec})
    assert stat.S_IMODE(log_.path.stat().st_mode) == 0o600
    assert [p.name for p in log_.path.parent.iterdir()] == ["transfers.json"]
    (name, job), = log_.load().items()
    assert name == "door1.osdp0" and job.record() == rec
    for bad in (b'{"version": 1, "transfers": {"r": {"sha256": "ab", "total": 1, "offset": 0}}}',
                b'{"version": 1, "transfers": {"r": {"sha256": "' + b"a" * 64 + b'", "total": 10, "offset": 11}}}',
                b'{"version": 2, "transfers": {}}', b'{"version": 1, "tra', b"[]"):  # fmt: skip
        log_.path.write_bytes(bad)
        assert log_.load() == {}
        assert not log_.path.exists() and log_.path.with_suffix(".bad").read_bytes() == bad
