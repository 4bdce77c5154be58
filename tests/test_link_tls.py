"""TLS with client certificates and a per-gateway ACL: a gateway reaches its own topics and no others."""

# ruff: noqa: F811  (pytest fixtures imported from tests.broker are used as parameters)

from __future__ import annotations

import asyncio
from pathlib import Path

import aiomqtt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud_bridge.cloud import CloudPeer
from cloud_bridge.protocol import Unlock
from cloud_bridge.topics import Topics

from .broker import gateway, site_key  # noqa: F401
from .mosquitto import Mosquitto, make_pki, tls_extra

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"


def doc_acl(gateways: list[tuple[str, str]]) -> str:
    """The ACL exactly as docs/protocol.md gives it (its `acl` block), for the cloud and each gateway."""
    text = DOC.read_text()
    block = text.split("<!-- acl -->\n```\n", 1)[1].split("```", 1)[0]
    cloud, per_gw = block.split("\n\n", 1)
    return cloud + "\n\n" + "\n\n".join(
        per_gw.replace("<site>", s).replace("<gateway>", g).strip() for s, g in gateways
    ) + "\n"


ACL = doc_acl([("s1", "gw1"), ("s1", "gw2")])


@pytest.fixture
def tls_broker(tmp_path: Path) -> tuple[Mosquitto, Path]:
    pki = make_pki(tmp_path / "pki", ["cloud", "s1-gw1", "s1-gw2", "intruder"])
    m = Mosquitto(tmp_path / "tlsbroker", extra=tls_extra(pki, ACL))
    m.start()
    yield m, pki.dir  # type: ignore[misc]
    m.stop()


def client(m: Mosquitto, pki: Path, name: str, **kw: object) -> aiomqtt.Client:
    tls = aiomqtt.TLSParameters(
        ca_certs=str(pki / "ca.crt"), certfile=str(pki / f"{name}.crt"), keyfile=str(pki / f"{name}.key")
    )
    return aiomqtt.Client(
        m.host, m.port, identifier=name, protocol=aiomqtt.ProtocolVersion.V5, tls_params=tls, timeout=5, **kw
    )  # type: ignore[arg-type]


@pytest.mark.parametrize("downlink_filter", ["per-leaf", "one"])
async def test_gateway_over_tls_with_client_certificate(
    tls_broker: tuple[Mosquitto, Path], tmp_path: Path, site_key: Ed25519PrivateKey, downlink_filter: str
) -> None:
    """Under the documented ACL (read: only the three downlink topics), with one subscription per downlink topic
    or the one `<base>/#` (Mosquitto checks read access per message delivered)."""
    m, pki = tls_broker
    tls = {"ca": str(pki / "ca.crt"), "cert": str(pki / "s1-gw1.crt"), "key": str(pki / "s1-gw1.key")}
    async with (
        gateway(m, tmp_path / "gw", site_key, site="s1", gw="gw1", downlink_filter=downlink_filter, **tls) as g,
        CloudPeer(host=m.host, port=m.port, site="s1", gateway="gw1", signing_key=site_key, ca=str(pki / "ca.crt"),
                  cert=str(pki / "cloud.crt"), key=str(pki / "cloud.key"), resend_s=2) as cloud,
    ):  # fmt: skip
        await cloud.wait_online()
        r = await cloud.command(Unlock(door="front"), operator="alice")
        assert r.ok and g.commands.calls == [("unlock", "front", 5.0)]
        g.journal.record("access.granted", door="front", card=1)
        await cloud.wait_events(2)  # the grant and the command.executed audit event


async def test_no_certificate_no_connection(tls_broker: tuple[Mosquitto, Path]) -> None:
    m, pki = tls_broker
    c = aiomqtt.Client(
        m.host, m.port, identifier="anon", tls_params=aiomqtt.TLSParameters(ca_certs=str(pki / "ca.crt")), timeout=3
    )
    with pytest.raises(aiomqtt.MqttError):
        async with c:
            pass
    plain = aiomqtt.Client(m.host, m.port, identifier="plain", timeout=3)
    with pytest.raises(aiomqtt.MqttError):
        async with plain:
            pass


async def test_acl_keeps_gateways_apart(tls_broker: tuple[Mosquitto, Path]) -> None:
    m, pki = tls_broker
    gw1, gw2 = Topics("s1", "gw1"), Topics("s1", "gw2")
    async with (
        client(m, pki, "cloud") as cloud,
        client(m, pki, "s1-gw2") as intruder,
        client(m, pki, "intruder") as stranger,
    ):
        await cloud.subscribe("acs/v1/#", qos=1)
        # gw2 subscribes to gw1's downlink (commands, rights) and to a wildcard over the site. Mosquitto 2.0
        # grants such subscriptions but checks read access on every delivery: nothing of gw1's arrives.
        await intruder.subscribe(gw1.command, qos=1)
        await intruder.subscribe("acs/v1/s1/+/command", qos=1)
        await intruder.subscribe("acs/v1/#", qos=1)
        # gw2 publishing on gw1's uplink topics is dropped by the broker
        await intruder.publish(gw1.status, b"forged", qos=1)
        await intruder.publish(gw1.events, b"forged", qos=1)
        await stranger.publish(gw1.events, b"forged", qos=1)
        # its own topics work
        await intruder.publish(gw2.events, b"mine", qos=1)
        # the cloud publishes to both gateways
        await cloud.publish(gw1.command, b"for-gw1", qos=1)
        await cloud.publish(gw2.command, b"for-gw2", qos=1)
        seen_cloud: list[tuple[str, bytes]] = []
        seen_intruder: list[tuple[str, bytes]] = []

        async def collect(c: aiomqtt.Client, into: list[tuple[str, bytes]]) -> None:
            async for msg in c.messages:
                assert isinstance(msg.payload, bytes)
                into.append((msg.topic.value, msg.payload))

        async with asyncio.TaskGroup() as tg:
            t1 = tg.create_task(collect(cloud, seen_cloud))
            t2 = tg.create_task(collect(intruder, seen_intruder))
            await asyncio.sleep(1.0)
            t1.cancel()
            t2.cancel()
        assert (gw2.events, b"mine") in seen_cloud
        assert not any(p == b"forged" for _, p in seen_cloud), seen_cloud
        assert (gw2.command, b"for-gw2") in seen_intruder
        assert not any(t.startswith("acs/v1/s1/gw1/") for t, _ in seen_intruder), seen_intruder


async def test_a_gateways_own_certificate_cannot_write_its_downlink(tls_broker: tuple[Mosquitto, Path]) -> None:
    """A stolen gateway certificate (or a compromised gateway) cannot forge what its gateway, or any other,
    would act on: the ACL gives it write access to its uplink topics only."""
    m, pki = tls_broker
    gw1 = Topics("s1", "gw1")
    async with client(m, pki, "cloud") as cloud, client(m, pki, "s1-gw1") as stolen:
        await cloud.subscribe("acs/v1/#", qos=1)
        for topic in (gw1.rights, gw1.command, gw1.events_ack, Topics("s1", "gw2").command):
            await stolen.publish(topic, b"forged-downlink", qos=1)
        await stolen.publish(gw1.events, b"uplink-ok", qos=1)
        seen: list[tuple[str, bytes]] = []

        async def collect() -> None:
            async for msg in cloud.messages:
                assert isinstance(msg.payload, bytes)
                seen.append((msg.topic.value, msg.payload))

        async with asyncio.TaskGroup() as tg:
            t = tg.create_task(collect())
            await asyncio.sleep(1.0)
            t.cancel()
        assert (gw1.events, b"uplink-ok") in seen
        assert not any(p == b"forged-downlink" for _, p in seen), seen

