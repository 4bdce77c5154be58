"""Found by the soak fuzzer (bench/soak_fuzz.py): the JSON depth check scanned strings with a regex whose
closing quote was required, so every quote of an unterminated string started a new scan to the end of the
message (quadratic). 64 KB of `{"\\"\\...` held the thread 68 s; on `command` and `events/ack` that thread is
the event loop: no tap was decided, no command answered. Real Mosquitto, real link."""

# ruff: noqa: F811  (pytest fixtures imported from tests.broker are used as parameters)

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud_bridge.protocol import Lockdown, ProtocolError, check_depth, decode_event_ack
from cloud_bridge.topics import Leaf

from .broker import broker, cloud_peer, gateway, site_key, unique  # noqa: F401
from .mosquitto import Mosquitto

#: An unterminated JSON string of 100 KB made of escaped quotes (`"\"\"\...`).
UNTERMINATED = b"{" + b'"\\' * 50_000


def test_depth_is_counted_outside_strings_only() -> None:
    check_depth(b'{"a":"[[[[\\"[[[[' + b"[" * 40 + b'","b":[[1]]}')  # brackets inside a string, escaped quote
    with pytest.raises(ProtocolError, match="nested deeper than 32"):
        check_depth(b'{"a":"\\\\",' + b'"b":' + b"[" * 40 + b"]" * 40 + b"}")  # an escaped backslash ends it
    with pytest.raises(ProtocolError):
        decode_event_ack(UNTERMINATED)  # refused (not valid JSON), and in linear time


@pytest.mark.parametrize("leaf", [Leaf.COMMAND, Leaf.EVENTS_ACK, Leaf.RIGHTS])
async def test_an_unterminated_json_string_does_not_stall_the_link(
    broker: Mosquitto, tmp_path: Path, site_key: Ed25519PrivateKey, leaf: Leaf
) -> None:
    site, gw = unique("s"), "gw1"
    async with (
        gateway(broker, tmp_path / "gw", site_key, site=site, gw=gw) as g,
        cloud_peer(broker, site_key, site=site, gw=gw) as cloud,
    ):
        first = await cloud.wait_online()
        for _ in range(3):
            await cloud.publish_raw(leaf, UNTERMINATED)
        # the old check spent minutes on each of these on the loop thread; the lockdown waited behind them
        r = await cloud.command(Lockdown(active=True), operator="root", timeout=30)
        assert r.ok and ("lockdown", True) in g.commands.calls
        assert g.link.online and g.link.stats["handler_errors"] == 0
        assert cloud.births[-1].session == first.session


@pytest.mark.parametrize("leaf", [Leaf.EVENTS_ACK, Leaf.COMMAND, Leaf.RIGHTS])
async def test_an_oversized_message_is_refused_without_holding_the_loop(
    broker: Mosquitto, tmp_path: Path, site_key: Ed25519PrivateKey, leaf: Leaf
) -> None:
    """Empty MessagePack arrays kept the loop thread in the depth check for seconds (about 0.7 us per array),
    past the keepalive, and the broker dropped the link (16 MB did; 32 MB here): on `events/ack` (no size bound
    at all), and on `rights` and `command`, where the refusal `too_large` first looked for the request id to
    echo. Now an oversized message is refused `too_large` and read only off the loop thread, if at all."""
    site, gw = unique("s"), "gw1"
    n = 32 * 1024 * 1024
    wide = b"\xdd" + n.to_bytes(4, "big") + b"\x90" * n
    async with (
        gateway(broker, tmp_path / "gw", site_key, site=site, gw=gw) as g,
        cloud_peer(broker, site_key, site=site, gw=gw) as cloud,
    ):
        first = await cloud.wait_online()
        await cloud.publish_raw(leaf, wide)
        await cloud.wait_for(lambda: g.link.stats["refused"] >= 1)
        r = await cloud.command(Lockdown(active=True), operator="root", timeout=30)
        assert r.ok and g.link.online and g.states == [True]
        assert cloud.births[-1].session == first.session
        # the refusal is journalled (and reaches the cloud; the events are acknowledged, so not read back here)
        await cloud.wait_for(lambda: any(e.reason == "too_large" and e.type.endswith("_rejected")
                                         for e in cloud.events.values()))  # fmt: skip
