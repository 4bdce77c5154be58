"""The settings of the gateway's cloud link, defined once.

`LinkSettings` holds every setting the gateway's config file (`[link]`, `edge.config.LinkSection`) and the
link itself (`LinkConfig`) share: one field, one default, one limit each. `LinkSection` adds what only the
file knows (whether the link is on, secrets by credential name, the command key); `LinkConfig` adds what the
agent resolves at start (site and gateway names, the client key's path, the password, the SQLite
`synchronous` of the link's state). `LinkConfig.of` builds one from the other without naming fields.

Limits (`Meta`) are checked when a config is decoded (`msgspec.convert`), not when a Struct is built in code.
Pure: no I/O.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Self

import msgspec
from msgspec import Meta

#: A site or gateway name (also a topic level: docs/protocol.md §2).
Name = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_\-]{1,64}$")]
#: A path or a credential name: never empty, never unbounded.
PathText = Annotated[str, Meta(min_length=1, max_length=4096)]
Text = Annotated[str, Meta(min_length=1, max_length=256)]
#: Another broker node, "host:port".
Endpoint = Annotated[str, Meta(pattern=r"^[^\s:]{1,253}:[0-9]{1,5}$|^\[[0-9A-Fa-f:.]{2,45}\]:[0-9]{1,5}$")]


class LinkSettings(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """The cloud link's settings (docs/protocol.md); the `[link]` keys of the gateway's config file."""

    host: Annotated[str, Meta(min_length=1, max_length=253)] = "localhost"
    port: Annotated[int, Meta(ge=1, le=65535)] = 1883
    #: More nodes of the same broker cluster ("host:port" each), tried in turn after `host:port` when a
    #: connection fails or drops (docs/scaling.md); while on one of them, `host:port` is tried again every
    #: `failback_s` (jittered) and the link moves back when it answers.
    endpoints: Annotated[list[Endpoint], Meta(max_length=16)] = []
    #: The order the other nodes are tried in when a connection fails or drops: "spread", a random order for
    #: each round of failovers (a dead node's gateways spread over the survivors instead of all moving to the
    #: next one in the list: docs/scaling.md), or "in_order", as listed.
    failover: Literal["spread", "in_order"] = "spread"
    failback_s: Annotated[float, Meta(ge=1, le=86400)] = 300.0
    #: MQTT version: "5", or "3.1.1" (RabbitMQ 3.10). Nothing in the protocol needs MQTT 5 (the session and
    #: message expiries are dropped on 3.1.1); announced in the birth (`mqtt`).
    mqtt_version: Literal["5", "3.1.1"] = "5"
    #: "persistent": clean start off, the broker queues the downlink while the gateway is away (Mosquitto,
    #: a few gateways per broker); "clean": a fresh session per connection (a large fleet on a cluster: no
    #: replicated queue per gateway; the cloud resends until answered either way). docs/scaling.md.
    session: Literal["persistent", "clean"] = "persistent"
    #: QoS of the downlink subscriptions (rights, events/ack, command). 1, or 0 where the broker pays for
    #: every QoS 1 subscription (NATS: a JetStream consumer each). docs/scaling.md.
    downlink_qos: Literal[0, 1] = 1
    #: How the downlink is subscribed: "per-leaf", one subscription per downlink topic (any MQTT version), or
    #: "one", a single `acs/v1/<site>/<gateway>/#` with MQTT 5's No Local (the gateway's own uplink is not
    #: sent back) and no retained messages at subscribe (MQTT 5 only). The cloud publishes the same either way;
    #: a broker that pays per subscription (RabbitMQ: a binding each) sets a gateway up in less than half the
    #: CPU with "one". docs/scaling.md.
    downlink_filter: Literal["per-leaf", "one"] = "per-leaf"
    #: QoS of the replies on `rights/reply` (a change set's result, a resync request). 0 loses nothing (the
    #: cloud resends a change set until its result arrives, and a duplicate gets the same result again) and
    #: spares a broker that stores every QoS 1 message (NATS: a JetStream write each). docs/scaling.md.
    reply_qos: Literal[0, 1] = 1
    #: TLS: the CA that signed the broker's certificate, and this gateway's client certificate (PEM paths).
    ca: PathText | None = None
    cert: PathText | None = None
    username: Text | None = None
    keepalive_s: Annotated[int, Meta(ge=5, le=3600)] = 30
    #: MQTT 5 session expiry (a 32-bit count of seconds): how long the broker keeps our subscriptions and
    #: queued QoS 1 messages.
    session_expiry_s: Annotated[int, Meta(ge=0, le=2**32 - 1)] = 7 * 24 * 3600
    #: Reconnect delays: full-jitter exponential backoff between these bounds (`cloud_bridge.mqtt.Backoff`).
    backoff_min_s: Annotated[float, Meta(gt=0, le=3600)] = 0.5
    backoff_max_s: Annotated[float, Meta(gt=0, le=3600)] = 60.0
    #: The first retry after a drop or a failed connect waits up to this long (uniform from half of
    #: `backoff_min_s`; 0: up to `backoff_min_s`, as every later round does). A fleet sets it to about the
    #: gateways of one broker node divided by the connects a second the other nodes take (docs/scaling.md):
    #: the gateways of a dead node then arrive at the survivors at a rate they can serve, not all at once.
    reconnect_spread_s: Annotated[float, Meta(ge=0, le=3600)] = 0.0
    #: How long a connection's setup (CONNACK, each SUBACK, the birth's PUBACK) may take. Every setup in a row
    #: that runs out of it doubles it, up to `connect_timeout_max_s`: a broker too busy to answer within the
    #: first timeout gets the time to finish connects, instead of retries it cannot serve (a fleet that gives
    #: up and retries faster than the broker answers never connects: docs/scaling.md).
    connect_timeout_s: Annotated[float, Meta(gt=0, le=3600)] = 10.0
    connect_timeout_max_s: Annotated[float, Meta(gt=0, le=3600)] = 120.0
    #: Events per EventBatch (fewer when a batch would exceed `max_message_bytes`).
    batch_events: Annotated[int, Meta(ge=1, le=100_000)] = 1000
    #: The largest message either side sends or reads (Mosquitto's `message_size_limit`, AWS IoT's 128 KiB;
    #: MQTT's own limit is 256 MiB; 16 MiB is plenty for a Pi).
    max_message_bytes: Annotated[int, Meta(ge=4096, le=16 * 1024 * 1024)] = 256 * 1024
    encoding: Literal["msgpack", "json"] = "msgpack"
    #: Event batches sent ahead of the cloud's acknowledgement, at most: after an ack timeout the upload starts
    #: again at one and opens by one per acknowledgement (`cloud_bridge/link/upload.py`).
    window: Annotated[int, Meta(ge=1, le=1000)] = 8
    #: Without an event acknowledgement for this long, the unacknowledged tail is sent again; the wait doubles
    #: with each timeout in a row (x 1-1.25, at most 8 x this) and is back to this at the next acknowledgement
    #: or connection.
    ack_timeout_s: Annotated[float, Meta(gt=0, le=3600)] = 30.0
    #: Grace for the clocks of the cloud and the gateway when checking a command's issue and expiry times.
    command_skew_s: Annotated[float, Meta(ge=0, le=3600)] = 30.0
    #: Longest lifetime (expires - issued) a command may claim.
    command_max_ttl_s: Annotated[float, Meta(gt=0, le=7 * 86400)] = 86400.0
    #: Largest snapshot transfer staged on disk (also bounded by the free space less 8 MiB).
    snapshot_max_bytes: Annotated[int, Meta(ge=4096, le=2**40)] = 512 * 1024 * 1024
    #: Rights messages waiting to be processed; more are dropped (the cloud resends until answered).
    rights_queue: Annotated[int, Meta(ge=1, le=100_000)] = 256
    #: A refused downlink message of one kind is journalled at most once per this many seconds (the rest
    #: are counted).
    refusal_journal_s: Annotated[float, Meta(ge=0, le=86400)] = 60.0


class LinkConfig(LinkSettings, kw_only=True, frozen=True):
    """Everything `CloudLink` needs: the shared settings, resolved for this gateway."""

    site: Name
    gateway: Name
    #: The TLS client key (a PEM path) and the broker password, read from their credentials at start.
    key: str | None = None
    password: str | None = None
    #: SQLite `synchronous` for the link's own state (command nonces).
    synchronous: str = "FULL"
    #: How often the MQTT client checks its keepalive (`mqtt.client`'s `housekeeping_s`): 1 s on a gateway;
    #: the fleet simulator, thousands of links on one loop, uses a longer period.
    housekeeping_s: float = 1.0

    @classmethod
    def of(cls, settings: LinkSettings, *, site: str, gateway: str, key: str | None = None,
           password: str | None = None, synchronous: str = "FULL", housekeeping_s: float = 1.0) -> Self:  # fmt: skip
        """The link's config from the shared settings of `settings` (a `LinkSection`, or any `LinkSettings`)."""
        shared: dict[str, Any] = {f: getattr(settings, f) for f in LinkSettings.__struct_fields__}
        return cls(site=site, gateway=gateway, key=key, password=password, synchronous=synchronous,
                   housekeeping_s=housekeeping_s, **shared)  # fmt: skip
