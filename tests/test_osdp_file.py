"""osdp_FILETRANSFER / osdp_FTSTAT (issue 17): a 64 KiB file to libosdp's PeripheralDevice on a pty,
byte-exact, with progress, interleaved with polls (a card read during it), resumed after the reader was
away, the reader's identity checked after it. The time is printed (the bench has the figure)."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from edge.readers.base import CardRead, ReaderStatus
from edge.readers.osdp import OsdpReader, Timing
from tests.osdp_peer import SITE_KEY, PeerBus
from tests.test_osdp_bus import FAST, GRANTED_CARD, Gate, online, peers, running, until

__all__ = ["peers"]


def firmware_reader(gate: Gate, pb: PeerBus, **kw: Any) -> OsdpReader:
    kw.setdefault("timing", FAST)
    r = OsdpReader("front", gate.sink, port=pb.path, address=1, scbk=SITE_KEY.hex(), **kw)
    gate.readers["front"] = r
    return r


async def test_64k_file_byte_exact_with_progress(peers: PeerBus) -> None:
    peer = peers.add(1, scbk=SITE_KEY, enforce_secure=True)
    image = os.urandom(64 * 1024)
    gate = Gate()
    progress: list[tuple[int, int]] = []
    async with running(firmware_reader(gate, peers)) as r:
        await until(online(gate, secure=True), what="secure online")
        t0 = time.perf_counter()
        task = asyncio.create_task(r.transfer_file(image, on_progress=lambda o, t: progress.append((o, t))))
        await until(lambda: progress and progress[-1][0] > 16 * 1024, timeout=20, what="a quarter sent")
        peer.card(GRANTED_CARD, 26)  # polls go on during the transfer
        await until(lambda: gate.of(CardRead), what="card during the transfer")
        result = await asyncio.wait_for(task, 60)
        took = time.perf_counter() - t0
    print(f"\n64 KiB over FILETRANSFER in a secure session: {took:.2f} s, {len(progress)} fragments")
    assert result.ok, result
    assert (result.offset, result.total) == (len(image), len(image))
    assert bytes(peer.file) == image
    assert result.firmware == (1, 2, 3)  # the reader's identity read again after the transfer
    assert progress[-1] == (len(image), len(image))
    assert [o for o, _ in progress] == sorted(o for o, _ in progress)
    assert peer.file_opened == [(1, len(image))] and peer.file_closed == 1


async def test_transfer_pauses_while_the_reader_is_away_and_goes_on(peers: PeerBus) -> None:
    peer = peers.add(1, scbk=SITE_KEY, enforce_secure=True)
    image = os.urandom(16 * 1024)
    gate = Gate()
    progress: list[int] = []
    async with running(firmware_reader(gate, peers)) as r:
        await until(online(gate, secure=True), what="secure online")
        task = asyncio.create_task(r.transfer_file(image, on_progress=lambda o, t: progress.append(o)))
        await until(lambda: progress and progress[-1] > 4 * 1024, timeout=20, what="a quarter sent")
        peer.silent = True
        await until(lambda: not gate.of(ReaderStatus)[-1].online, what="reader away")
        paused_at = r.session.file_offset
        assert paused_at is not None and 0 < paused_at < len(image)
        peer.silent = False
        result = await asyncio.wait_for(task, 60)
    assert result.ok, result
    assert bytes(peer.file) == image
    assert peer.file_opened == [(1, len(image))]  # one transfer, resumed, not restarted


async def test_a_cancelled_transfer_resumes_from_its_acknowledged_offset(peers: PeerBus) -> None:
    """The transfer is stopped (the command that drove it cancelled) and started again from the offset its
    progress reported: the reader gets every byte once, in one transfer."""
    peer = peers.add(1, scbk=SITE_KEY, enforce_secure=True)
    image = os.urandom(24 * 1024)
    gate = Gate()
    progress: list[int] = []
    async with running(firmware_reader(gate, peers)) as r:
        await until(online(gate, secure=True), what="secure online")
        task = asyncio.create_task(r.transfer_file(image, on_progress=lambda o, t: progress.append(o)))
        await until(lambda: progress and progress[-1] > 8 * 1024, timeout=20, what="a third sent")
        task.cancel()
        await until(lambda: r.session.file_offset is None, what="transfer stopped")
        stopped = progress[-1]
        assert stopped < len(image)
        await asyncio.sleep(0.1)
        assert progress[-1] == stopped  # nothing sent after the stop
        result = await asyncio.wait_for(r.transfer_file(image, offset=stopped), 60)
    assert result.ok, result
    assert bytes(peer.file) == image
    assert peer.file_opened == [(1, len(image))]


async def test_a_reader_that_never_answers_filetransfer_ends_the_transfer(peers: PeerBus) -> None:
    """libosdp's PD without file operations takes the FILETRANSFER and sends nothing back (its NAK is never
    written). Each time, the reader is declared offline and comes back; after three the transfer ends with
    a result naming the offset, and the reader is in service again."""
    peers.add(1, scbk=SITE_KEY, file_ops=False)
    gate = Gate()
    quick = Timing(poll_interval=0.02, reply_timeout=0.06, offline_after=0.2, offline_retry=0.05,
                   offline_retry_max=0.1)
    async with running(firmware_reader(gate, peers, timing=quick)) as r:
        await until(online(gate, secure=True), what="secure online")
        result = await asyncio.wait_for(r.transfer_file(os.urandom(4096)), 20)
        assert not result.ok and result.offset == 0
        assert "does not answer FILETRANSFER at offset 0" in result.detail
        await until(online(gate, secure=True), what="back in service")
