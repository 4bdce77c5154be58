"""Every MQTT topic of the protocol, built and parsed here and nowhere else.

acs/v1/<site>/<gateway>/status               gateway -> cloud   Birth | Death      QoS 1, retained
acs/v1/<site>/<gateway>/rights               cloud -> gateway   ChangeSetMsg | SnapshotChunk | Rebirth   QoS 1
acs/v1/<site>/<gateway>/rights/reply         gateway -> cloud   RightsResult | ChunkAck | ResyncRequest  QoS 1
acs/v1/<site>/<gateway>/events               gateway -> cloud   EventBatch         QoS 1
acs/v1/<site>/<gateway>/events/ack           cloud -> gateway   EventAck           QoS 1
acs/v1/<site>/<gateway>/command              cloud -> gateway   SignedCommand      QoS 1, message expiry
acs/v1/<site>/<gateway>/command/result       gateway -> cloud   CommandResult      QoS 1
"""

from __future__ import annotations

import enum
import re

PREFIX = "acs/v1"
_NAME = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")


class Leaf(enum.StrEnum):
    STATUS = "status"
    RIGHTS = "rights"
    RIGHTS_REPLY = "rights/reply"
    EVENTS = "events"
    EVENTS_ACK = "events/ack"
    COMMAND = "command"
    COMMAND_RESULT = "command/result"


#: What the gateway subscribes to (the cloud publishes these).
DOWNLINK = (Leaf.RIGHTS, Leaf.EVENTS_ACK, Leaf.COMMAND)
#: What the cloud subscribes to (the gateway publishes these).
UPLINK = (Leaf.STATUS, Leaf.RIGHTS_REPLY, Leaf.EVENTS, Leaf.COMMAND_RESULT)


def check_name(kind: str, name: str) -> str:
    """Site and gateway names are topic levels: letters, digits, `_` and `-` only (no `/`, `+`, `#`)."""
    if not _NAME.match(name):
        raise ValueError(f"{kind} name {name!r}: use 1-64 letters, digits, '_' or '-'")
    return name


class Topics:
    """The topics of one gateway. `Topics("s1", "gw1").status == "acs/v1/s1/gw1/status"`."""

    def __init__(self, site: str, gateway: str) -> None:
        self.site = check_name("site", site)
        self.gateway = check_name("gateway", gateway)
        self.base = f"{PREFIX}/{site}/{gateway}"

    def __getitem__(self, leaf: Leaf) -> str:
        return f"{self.base}/{leaf.value}"

    @property
    def status(self) -> str:
        return self[Leaf.STATUS]

    @property
    def rights(self) -> str:
        return self[Leaf.RIGHTS]

    @property
    def rights_reply(self) -> str:
        return self[Leaf.RIGHTS_REPLY]

    @property
    def events(self) -> str:
        return self[Leaf.EVENTS]

    @property
    def events_ack(self) -> str:
        return self[Leaf.EVENTS_ACK]

    @property
    def command(self) -> str:
        return self[Leaf.COMMAND]

    @property
    def command_result(self) -> str:
        return self[Leaf.COMMAND_RESULT]

    def downlink(self) -> list[str]:
        return [self[leaf] for leaf in DOWNLINK]

    @property
    def tree(self) -> str:
        """The one filter of all this gateway's topics (`link.downlink_filter = "one"`, with No Local)."""
        return f"{self.base}/#"

    def uplink(self) -> list[str]:
        return [self[leaf] for leaf in UPLINK]

    def parse(self, topic: str) -> Leaf | None:
        """The leaf of one of this gateway's topics, or None for any other topic."""
        prefix = self.base + "/"
        if not topic.startswith(prefix):
            return None
        try:
            return Leaf(topic[len(prefix) :])
        except ValueError:
            return None


def site_wildcard(site: str, leaf: Leaf) -> str:
    """`acs/v1/<site>/+/<leaf>`: one leaf of every gateway of a site (the cloud side)."""
    return f"{PREFIX}/{check_name('site', site)}/+/{leaf.value}"


def parse(topic: str) -> tuple[str, str, Leaf] | None:
    """(site, gateway, leaf) of any protocol topic, or None."""
    parts = topic.split("/", 4)
    if len(parts) != 5 or f"{parts[0]}/{parts[1]}" != PREFIX:
        return None
    try:
        return parts[2], parts[3], Leaf(parts[4])
    except ValueError:
        return None
