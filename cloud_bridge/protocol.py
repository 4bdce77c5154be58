"""The cloud <-> gateway wire protocol: one msgspec Struct per message, one tagged union per topic family.

Encoding: MessagePack by default; JSON is accepted on every topic the gateway reads (a JSON message starts
with ``{``, which is never the first byte of a MessagePack map) and the gateway can be configured to publish
JSON. Every message is an object whose ``type`` field names it. The major protocol version is in the topic
(``acs/v1/...``); within a major version, messages only ever gain fields with defaults, and receivers ignore
fields they do not know (msgspec's schema evolution rules), so an older gateway keeps working with a newer
cloud. The full description, with an example of every message, is in docs/protocol.md.

Encoders and decoders are built once at import time; `decode_*` functions raise `ProtocolError` with
msgspec's message, which names the offending field (``Expected `int`, got `str` - at `$.change_set.to_version```).
"""

from __future__ import annotations

import base64
import contextlib
import re
from typing import Annotated, Any, Literal, TypeVar

import msgspec
import numpy as np
from msgspec import Meta

from edge.events import Event
from edge.model import (
    Area,
    ChangeSet,
    Credential,
    Door,
    DoorMode,
    Group,
    Ident,
    Interlock,
    Schedule,
    SiteRules,
    Snapshot,
    User,
)

from .errors import CloudBridgeError

__all__ = [
    "PROTOCOL_VERSION",
    "AreaMove",
    "AreaMoves",
    "Birth",
    "ChangeSetMsg",
    "ChunkAck",
    "Command",
    "CommandAction",
    "CommandResult",
    "Death",
    "Downlink",
    "ErrorInfo",
    "EventAck",
    "EventBatch",
    "Lockdown",
    "OsdpFirmware",
    "OsdpFirmwareChunk",
    "OsdpOutput",
    "OsdpRotateKey",
    "ProtocolError",
    "Provision",
    "ReaderAction",
    "Rebirth",
    "ResetAntiPassback",
    "Resync",
    "ResyncRequest",
    "RightsReply",
    "RightsResult",
    "RotateKey",
    "SetDoorMode",
    "Signed",
    "SignedCommand",
    "SignedMsg",
    "SnapshotChunk",
    "SnapshotManifest",
    "Status",
    "Unlock",
    "Uplink",
]

PROTOCOL_VERSION = 1
Encoding = Literal["msgpack", "json"]
#: Request ids, transfer ids and nonces: printable, short.
RequestId = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:\-]+$")]

# --- limits (docs/protocol.md, "Limits") ------------------------------------------------------------------
#: Versions and sequence numbers are below 2^53 (exact in every JSON implementation, and in SQLite/numpy).
MAX_VERSION = 2**53 - 1
#: Timestamps on the wire (UTC seconds) lie in 2020-01-01 .. 2100-01-01.
MIN_TS = 1_577_836_800.0
MAX_TS = 4_102_444_800.0
#: Most chunks one snapshot transfer may have.
MAX_CHUNKS = 65_536
#: Deepest nesting of arrays/maps a message may have anywhere (ignored fields included).
MAX_DEPTH = 32
Version = Annotated[int, Meta(ge=0, le=MAX_VERSION)]
Seq = Annotated[int, Meta(ge=0, le=MAX_VERSION)]
Timestamp = Annotated[float, Meta(ge=MIN_TS, le=MAX_TS)]
Name = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_\-]{1,64}$")]


class ProtocolError(CloudBridgeError):
    """A message could not be decoded; `str(e)` names the field, `code` is "malformed", `path` the field's
    path when the decoder knew it (``change_set.to_version``, ``change_set.changes[0].door.id``)."""

    code = "malformed"

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


_AT = re.compile(r" - at `\$\.?([^`]*)`$")


def _validation_error(e: msgspec.ValidationError) -> ProtocolError:
    m = _AT.search(str(e))
    return ProtocolError(str(e), path=(m.group(1) or None) if m else None)


class Msg(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=False, tag_field="type"):
    """Base of every wire message: tagged by ``type``, unknown fields ignored."""


class ErrorInfo(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=False, omit_defaults=True):
    """Why a message was refused. `code` is machine-readable; `message` is for people; `path` names the field."""

    code: str
    message: str
    path: str | None = None


# --- presence: acs/v1/<site>/<gateway>/status (retained) -------------------------------------------------


class DeviceInfo(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=False, omit_defaults=True):
    """A door or reader of the gateway, for the cloud to import as an entitlement."""

    id: str
    kind: str = ""
    door: str | None = None
    name: str = ""


class Birth(Msg, tag="birth", frozen=True):
    """Published retained on every connect (Sparkplug NBIRTH). `session` matches the will's `Death.session`."""

    site: str
    gateway: str
    session: int = 0
    ts: float = 0.0
    software: str = ""
    protocol: int = PROTOCOL_VERSION
    rights_version: int = 0
    config_hash: str = ""
    doors: list[DeviceInfo] = []
    readers: list[DeviceInfo] = []
    journal_depth: int = 0
    encoding: Encoding = "msgpack"
    #: The largest message the gateway reads or writes (size snapshot chunks to fit).
    max_message_bytes: int = 0
    #: Fingerprint of the site key the gateway verifies with now (`signing.fingerprint`).
    key: str = ""
    #: Whether the broker connection is TLS; a gateway on plain MQTT says so here and in `warnings`.
    tls: bool = False
    #: Conditions an operator must see (plain MQTT, rights damaged and waiting for a snapshot, ...).
    warnings: list[str] = []
    #: Access rules (issue 19): users counted in each area on this gateway now (areas with nobody: absent).
    occupancy: dict[str, int] = {}
    #: The MQTT version of this connection ("5" or "3.1.1"; nothing in the protocol depends on MQTT 5).
    mqtt: str = "5"
    #: The broker node ("host:port") this connection went to (one of the gateway's endpoints).
    broker: str = ""


class Death(Msg, tag="death", frozen=True):
    """The retained last will (Sparkplug NDEATH), also published on a clean shutdown.

    A Death whose `session` is lower than that of the retained Birth the cloud already saw is stale. `ts` is
    when the will was registered (the connection's start) for `lost`, and the shutdown time for `shutdown`."""

    site: str
    gateway: str
    session: int = 0
    ts: float = 0.0
    reason: Literal["lost", "shutdown"] = "lost"


Status = Birth | Death


# --- provisioning: acs/v1/<site>/<gateway>/rights (cloud -> gateway) ------------------------------------


class ChangeSetMsg(Msg, tag="change_set", frozen=True):
    """A versioned change set. `id` is echoed in the reply (resend the same id until a reply comes)."""

    id: RequestId
    change_set: ChangeSet


class SnapshotChunk(Msg, tag="snapshot_chunk", frozen=True):
    """Chunk `index` of `count` of snapshot transfer `id` at `version`.

    The lists of all chunks together make one `Snapshot`; any split is allowed. A chunk is not signed
    itself: it is accepted only when the transfer's signed `SnapshotManifest` is staged and names the
    SHA-256 of exactly these bytes at `index`. The snapshot replaces the rights atomically once all
    `count` chunks are in. (`force` is ignored: a snapshot must carry a version above the one held.)"""

    id: RequestId
    version: Version
    index: Annotated[int, Meta(ge=0, lt=MAX_CHUNKS)]
    count: Annotated[int, Meta(ge=1, le=MAX_CHUNKS)]
    force: bool = False
    doors: list[Door] = []
    schedules: list[Schedule] = []
    groups: list[Group] = []
    users: list[User] = []
    credentials: list[Credential] = []
    areas: list[Area] = []
    interlocks: list[Interlock] = []
    site_rules: list[SiteRules] = []


#: The parts of a snapshot: each is a list spread over the chunks of a transfer (any split).
SNAPSHOT_PARTS = ("doors", "schedules", "groups", "users", "credentials", "areas", "interlocks", "site_rules")


class SnapshotManifest(Msg, tag="snapshot_manifest", frozen=True):
    """The signed description of snapshot transfer `id`: its version, its `count` chunks and the SHA-256 of
    each chunk's exact payload bytes (`hashes[i]` for chunk `index` i), and their total size. Sent (signed)
    before the chunks; the gateway stages no chunk it cannot check against it."""

    id: RequestId
    version: Version
    count: Annotated[int, Meta(ge=1, le=MAX_CHUNKS)]
    hashes: Annotated[list[Annotated[bytes, Meta(min_length=32, max_length=32)]], Meta(max_length=MAX_CHUNKS)]
    size: Annotated[int, Meta(ge=0, le=MAX_VERSION)]


class Rebirth(Msg, tag="rebirth", frozen=True):
    """Ask the gateway to publish its Birth again (Sparkplug rebirth)."""


# --- provisioning replies: acs/v1/<site>/<gateway>/rights/reply (gateway -> cloud) ---------------------


class RightsResult(Msg, tag="result", frozen=True):
    """The answer to a change set or a whole snapshot: the version now held, or why nothing was applied.

    `id` is the request's id (None when the request could not even be decoded). `applied` is False for a
    duplicate or old change set (acknowledged without applying it twice) and on error."""

    id: str | None
    ok: bool
    version: int
    applied: bool = False
    changes: int = 0
    error: ErrorInfo | None = None


class ChunkAck(Msg, tag="chunk_ack", frozen=True):
    """Snapshot chunk `index` of transfer `id` is staged on disk (`received` of `count` so far)."""

    id: str
    index: int
    received: int
    count: int


class ResyncRequest(Msg, tag="resync", frozen=True, omit_defaults=True):
    """The gateway needs a snapshot (or the change sets after `have`): sent on a version gap and on a resync
    command."""

    have: int
    reason: Literal["version_gap", "command", "empty", "damaged"] = "version_gap"
    ref: str | None = None


RightsReply = RightsResult | ChunkAck | ResyncRequest


# --- events: acs/v1/<site>/<gateway>/events (gateway -> cloud), .../events/ack (cloud -> gateway) --------


class EventBatch(Msg, tag="events", frozen=True):
    """Journal events `first_seq`..`last_seq` in order (there may be holes where events were never
    written; `alarm.journal_overflow` events name any that were lost). At-least-once: de-duplicate on
    `Event.id`."""

    first_seq: int
    last_seq: int
    events: list[Event]
    #: The batch covers every event with prev_seq < seq <= last_seq that the journal still holds: a cloud
    #: that has everything up to `prev_seq` has everything up to `last_seq` after this batch.
    prev_seq: int = 0
    #: A random name of this sending of the batch, echoed in the acknowledgement that answers it: the
    #: gateway takes the cloud's clock only from an ack that names a batch it sent (a fresh answer).
    ref: str = ""
    #: An urgent copy sent ahead of the backlog (the priority lane: `alarm.duress`): its events travel again in
    #: order later; it says nothing about the events before it, and the cloud does not acknowledge it.
    priority: bool = False


class EventAck(Msg, tag="events_ack", frozen=True, omit_defaults=True):
    """The cloud holds every event with seq <= `upto_seq`: the gateway may delete them. Travels signed
    (inside `Signed`), like every downlink message.

    `ts` is the cloud's clock (UTC seconds) when it sent the acknowledgement and `ref` the `ref` of the
    batch that made it send this ack (its last batch received). The gateway, which knows when it sent
    that batch, checks its own clock against `ts` (skew alarm, and the time source of a gateway whose clock
    is not yet trusted; see docs/operations.md) only when `ref` names a batch it sent and has not been
    answered yet."""

    upto_seq: Seq
    ts: Timestamp | None = None
    ref: str = ""


# --- the signed downlink envelope (rights, events/ack) ---------------------------------------------------


#: What a signed downlink envelope may carry (on `rights`: the first three; on `events/ack`: `EventAck`).
SignedMsg = ChangeSetMsg | SnapshotManifest | Rebirth | EventAck


class Provision(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=False):
    """The signed part of every downlink message that is not a command: the target (so a message signed for
    one gateway is refused by every other), when the cloud signed it, and the message itself."""

    site: Name
    gateway: Name
    issued: Timestamp
    msg: SignedMsg


class Signed(Msg, tag="signed", frozen=True):
    """`body` is the encoded `Provision` (MessagePack, or JSON as UTF-8), exactly the bytes that were signed;
    `sig` is the site key's Ed25519 signature over ``b"acs/v1/downlink\\0" + body``; `key_id` is the
    fingerprint of the signing key (informative)."""

    body: bytes = b""
    sig: bytes = b""
    key_id: str = ""


#: Everything the gateway reads on `rights`: signed envelopes and manifest-checked chunks. A bare
#: `change_set`, `snapshot_manifest` or `rebirth` decodes (so its id can be echoed) but is refused `unsigned`.
Downlink = Signed | SnapshotChunk | ChangeSetMsg | SnapshotManifest | Rebirth


# --- commands: acs/v1/<site>/<gateway>/command (cloud -> gateway) ---------------------------------------


class Action(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=False, tag_field="action"):
    pass


class Unlock(Action, tag="unlock", frozen=True):
    """Momentary unlock of `door` for `seconds`."""

    door: Ident
    seconds: Annotated[float, Meta(gt=0, le=3600)] = 5.0


class SetDoorMode(Action, tag="door_mode", frozen=True):
    """Override the mode of `door`; `mode` None returns it to its provisioned mode."""

    door: Ident
    mode: DoorMode | None = None


class Lockdown(Action, tag="lockdown", frozen=True):
    """Site lockdown on (`active` true) or released."""

    active: bool


class Resync(Action, tag="resync", frozen=True):
    """Make the gateway ask for a snapshot (it answers with a `resync` message on rights/reply)."""


class RebirthAction(Action, tag="rebirth", frozen=True):
    """Make the gateway republish its Birth."""


class RotateKey(Action, tag="rotate_key", frozen=True):
    """Replace the site's command key on the gateway by `new_public_key` (raw Ed25519 public key, hex).

    Accepted only when signed by the key the gateway verifies commands with now; the new key is stored on
    the gateway's disk before the ok is sent, and from `not_before` (UTC seconds; None: at once) every
    command must be signed with it: the old key is refused from then on. Rotating to the key already in
    use is an ok that changes nothing (a cloud that lost the first answer can check with the new key)."""

    new_public_key: Annotated[str, Meta(pattern=r"^[0-9a-fA-F]{64}$")]
    not_before: float | None = None


#: A SHA-256 in hex (64 digits): names a firmware file and checks it.
Sha256 = Annotated[str, Meta(pattern=r"^[0-9a-f]{64}$")]
#: Largest file the gateway stages for an OSDP reader (osdp_FILETRANSFER), and the largest chunk of one.
MAX_FIRMWARE_BYTES = 16 * 1024 * 1024
MAX_FIRMWARE_CHUNK = 64 * 1024


class OsdpRotateKey(Action, tag="osdp_rotate_key", frozen=True):
    """Move OSDP reader `reader` to a new Secure Channel key in session (osdp_KEYSET). The key is made on the
    gateway, stored there before the reader is sent it and never leaves it; the result is ok only once the
    reader is secure on the new key and the key store committed it (`detail.committed`)."""

    reader: Ident


class OsdpOutput(Action, tag="osdp_output", frozen=True):
    """osdp_OUT: output `output` of OSDP reader `reader` (e.g. its aux relay) on or off, or with `seconds`
    on for that long (0.1 .. 6553.5 s) and then off. The result's detail has the outputs' states."""

    reader: Ident
    output: Annotated[int, Meta(ge=0, le=255)] = 0
    on: bool = True
    seconds: Annotated[float, Meta(ge=0.1, le=6553.5)] | None = None


class OsdpFirmwareChunk(Action, tag="osdp_firmware_chunk", frozen=True):
    """One piece of a file for OSDP readers, staged on the gateway under its SHA-256 (`sha256`, `size`: the
    whole file's). Pieces go in order from `offset` 0 (a piece the gateway already has is an ok); the
    result's `detail.have` is how many bytes the gateway holds, so an interrupted upload resumes there. The
    last piece is checked against `sha256` (a mismatch discards the file)."""

    sha256: Sha256
    size: Annotated[int, Meta(ge=1, le=MAX_FIRMWARE_BYTES)]
    offset: Annotated[int, Meta(ge=0, lt=MAX_FIRMWARE_BYTES)]
    data: Annotated[bytes, Meta(min_length=1, max_length=MAX_FIRMWARE_CHUNK)]


class OsdpFirmware(Action, tag="osdp_firmware", frozen=True):
    """Send the staged file `sha256` (`size` bytes) to OSDP reader `reader` with osdp_FILETRANSFER (`file_type`
    1: its firmware). The result comes at the start (`detail.state` "started", or "in_progress" for one
    already running, with its `offset`); progress and the end (the reader's identity checked after it
    restarts, its new firmware version) are journal events `reader.firmware`. Sent again after a transfer
    that stopped, it resumes from the last offset the reader acknowledged."""

    reader: Ident
    sha256: Sha256
    size: Annotated[int, Meta(ge=1, le=MAX_FIRMWARE_BYTES)]
    file_type: Annotated[int, Meta(ge=0, le=255)] = 1


#: The commands for OSDP readers (`CommandHandler.reader_command`).
ReaderAction = OsdpRotateKey | OsdpOutput | OsdpFirmwareChunk | OsdpFirmware

class ResetAntiPassback(Action, tag="reset_anti_passback", frozen=True):
    """Anti-passback reset (issue 19): forget where `user` was seen, or everyone seen in `area`, or (both
    None) everyone; with both, that user only if seen in that area. A forgotten user passes any door once."""

    user: Ident | None = None
    area: Ident | None = None


class AreaMove(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=False):
    """One user's passage into `area` (None: outside) at `ts`, seen by `gateway` (an `area.passage` event)."""

    user: Ident
    area: Ident | None = None
    ts: Timestamp
    gateway: Name


class AreaMoves(Action, tag="area_moves", frozen=True):
    """Passages seen by the site's other gateways, relayed by the cloud (cross-gateway anti-passback): each
    is applied unless this gateway saw that user pass later (the latest `ts` wins)."""

    moves: Annotated[list[AreaMove], Meta(min_length=1, max_length=1000)]


CommandAction = (
    Unlock | SetDoorMode | Lockdown | Resync | RebirthAction | RotateKey | ResetAntiPassback | AreaMoves | ReaderAction
)


class Command(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=False):
    """The signed part of a command. It names its target, so a command signed for one gateway is refused by
    every other; `nonce` is unique per command and `expires` bounds how long it can be replayed."""

    site: str
    gateway: str
    request_id: RequestId
    operator: Annotated[str, Meta(min_length=1, max_length=128)]
    issued: Timestamp  # UTC seconds since the epoch
    expires: Timestamp  # UTC seconds since the epoch
    nonce: Annotated[str, Meta(min_length=16, max_length=64)]
    command: CommandAction


class SignedCommand(Msg, tag="command", frozen=True):
    """`body` is the encoded `Command` (MessagePack, or JSON as UTF-8), exactly the bytes that were signed;
    `sig` is the site key's Ed25519 signature over ``b"acs/v1/command\\0" + body``."""

    body: bytes
    sig: bytes = b""
    key_id: str = ""


# --- command results: acs/v1/<site>/<gateway>/command/result (gateway -> cloud) -------------------------


class CommandResult(Msg, tag="command_result", frozen=True, omit_defaults=True):
    """The outcome of one command. `request_id` is None when the command could not be read at all.

    For a replayed command (`error.code == "replayed"`), `original` is the result the first copy got,
    when it completed: a cloud that resent a command because its result was lost learns the outcome."""

    request_id: str | None
    ok: bool
    error: ErrorInfo | None = None
    original: CommandResult | None = None
    #: What the command found or did, when it says more than ok (an OSDP reader's output states, ...).
    detail: dict[str, str | int | float | bool | None] = {}


Uplink = Status | RightsReply | EventBatch | CommandResult


# --- codecs ---------------------------------------------------------------------------------------------

_mp_enc = msgspec.msgpack.Encoder()
_js_enc = msgspec.json.Encoder()

T = TypeVar("T")


def _json_depth(data: bytes | bytearray | memoryview) -> int:
    """Deepest nesting of arrays/objects in a JSON text (strings skipped); vectorised, no recursion."""
    raw = bytes(data)
    if b"[" not in raw and b"{" not in raw:
        return 0
    stripped = _JSON_STRING.sub(b'""', raw)
    a = np.frombuffer(stripped, dtype=np.uint8)
    step = np.zeros(a.shape, dtype=np.int32)
    step[(a == 0x5B) | (a == 0x7B)] = 1
    step[(a == 0x5D) | (a == 0x7D)] = -1
    return int(np.cumsum(step).max(initial=0))


#: A JSON string, or an unterminated one up to the end of the text. The closing quote is optional so that a
#: string that never ends matches once, to the end: a required quote made every later quote start a new scan
#: to the end (quadratic: 64 KB of `"\` held the loop thread 68 s).
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)


def _msgpack_depth(data: bytes | bytearray | memoryview, limit: int) -> int:
    """Deepest nesting of arrays/maps in a MessagePack value, walking headers only (no recursion, stops
    as soon as `limit` is passed). Malformed input returns what was seen so far (the decoder then says why)."""
    mv = memoryview(data)
    n = len(mv)
    pos = 0
    stack: list[int] = []  # items still to read at each open level
    deepest = 0
    todo = 1  # items to read at the current level
    while pos < n:
        while todo == 0 and stack:
            todo = stack.pop()
        if todo == 0:
            break
        todo -= 1
        b = mv[pos]
        pos += 1
        items = -1
        skip = 0
        if b <= 0x7F or b >= 0xE0 or b in (0xC0, 0xC2, 0xC3):
            pass
        elif 0x80 <= b <= 0x8F:
            items = 2 * (b & 0x0F)
        elif 0x90 <= b <= 0x9F:
            items = b & 0x0F
        elif 0xA0 <= b <= 0xBF:
            skip = b & 0x1F
        elif b in (0xC4, 0xD9):
            skip = mv[pos] if pos < n else 0
            pos += 1
        elif b in (0xC5, 0xDA):
            skip = int.from_bytes(mv[pos : pos + 2], "big")
            pos += 2
        elif b in (0xC6, 0xDB):
            skip = int.from_bytes(mv[pos : pos + 4], "big")
            pos += 4
        elif b == 0xC7:
            skip = (mv[pos] if pos < n else 0) + 1
            pos += 1
        elif b == 0xC8:
            skip = int.from_bytes(mv[pos : pos + 2], "big") + 1
            pos += 2
        elif b == 0xC9:
            skip = int.from_bytes(mv[pos : pos + 4], "big") + 1
            pos += 4
        elif b in (0xCA, 0xCE, 0xD2):
            skip = 4
        elif b in (0xCB, 0xCF, 0xD3):
            skip = 8
        elif b in (0xCC, 0xD0):
            skip = 1
        elif b in (0xCD, 0xD1):
            skip = 2
        elif 0xD4 <= b <= 0xD8:
            skip = 1 + (1 << (b - 0xD4))
        elif b == 0xDC:
            items = int.from_bytes(mv[pos : pos + 2], "big")
            pos += 2
        elif b == 0xDD:
            items = int.from_bytes(mv[pos : pos + 4], "big")
            pos += 4
        elif b == 0xDE:
            items = 2 * int.from_bytes(mv[pos : pos + 2], "big")
            pos += 2
        elif b == 0xDF:
            items = 2 * int.from_bytes(mv[pos : pos + 4], "big")
            pos += 4
        else:
            break  # 0xC1 (never used): malformed
        pos += skip
        if items >= 0:
            stack.append(todo)
            todo = items
            deepest = max(deepest, len(stack))
            if deepest > limit:
                break
    return deepest


def check_depth(data: bytes | bytearray | memoryview, limit: int = MAX_DEPTH) -> None:
    """Refuse a message nested deeper than `limit` (`ProtocolError`), before any decoder recurses into it."""
    depth = _json_depth(data) if data[:1] == b"{" else _msgpack_depth(data, limit)
    if depth > limit:
        raise ProtocolError(f"nested deeper than {limit} levels")


class _Codec:
    def __init__(self, typ: Any) -> None:
        self.mp = msgspec.msgpack.Decoder(typ)
        self.js = msgspec.json.Decoder(typ)

    def decode(self, data: bytes | bytearray | memoryview) -> Any:
        """Decode one message; every failure (bad bytes, bad field, too deep, out of range) is a
        `ProtocolError` naming it. Nothing else escapes."""
        if not data:
            raise ProtocolError("empty message")
        check_depth(data)
        try:
            if data[:1] == b"{":
                return self.js.decode(data)
            return self.mp.decode(data)
        except msgspec.ValidationError as e:
            raise _validation_error(e) from None
        except msgspec.DecodeError as e:
            raise ProtocolError(f"not valid MessagePack or JSON: {e}") from None
        except (RecursionError, OverflowError, ValueError, MemoryError) as e:
            raise ProtocolError(f"undecodable: {type(e).__name__}: {e}") from None


_downlink = _Codec(Downlink)
_status = _Codec(Status)
_rights_reply = _Codec(RightsReply)
_events = _Codec(EventBatch)
_event_ack = _Codec(Signed | EventAck)
_provision = _Codec(Provision)
_command = _Codec(SignedCommand)
_command_body = _Codec(Command)
_command_result = _Codec(CommandResult)
_uplink = _Codec(Uplink)


class _Ref(msgspec.Struct, forbid_unknown_fields=False):
    id: Any = None
    request_id: Any = None
    msg: Any = None
    body: Any = None


_ref_mp = msgspec.msgpack.Decoder(_Ref)
_ref_js = msgspec.json.Decoder(_Ref)


def encode(msg: Any, encoding: Encoding = "msgpack") -> bytes:
    """Encode any protocol message (or `Command` body)."""
    return _mp_enc.encode(msg) if encoding == "msgpack" else _js_enc.encode(msg)


def decode_downlink(data: bytes) -> Signed | SnapshotChunk | ChangeSetMsg | SnapshotManifest | Rebirth:
    """Anything on `rights`. Only `Signed` (checked with `signing.open_signed`) and chunks covered by a
    staged manifest may be acted on."""
    return _downlink.decode(data)  # type: ignore[no-any-return]


_chunk_mp = msgspec.msgpack.Decoder(SnapshotChunk)
_chunk_js = msgspec.json.Decoder(SnapshotChunk)


def decode_staged_chunk(data: bytes) -> SnapshotChunk:
    """A chunk staged earlier: it was fully checked (depth, fields, the manifest's hash) when it arrived, so
    only the typed decode runs again."""
    try:
        return _chunk_js.decode(data) if data[:1] == b"{" else _chunk_mp.decode(data)
    except msgspec.ValidationError as e:
        raise _validation_error(e) from None
    except (msgspec.DecodeError, RecursionError, OverflowError, ValueError) as e:
        raise ProtocolError(f"staged chunk undecodable: {e}") from None


def decode_provision(data: bytes) -> Provision:
    """The signed body inside a `Signed` envelope (decode only after the signature verified)."""
    return _provision.decode(data)  # type: ignore[no-any-return]


def decode_status(data: bytes) -> Birth | Death:
    return _status.decode(data)  # type: ignore[no-any-return]


def decode_rights_reply(data: bytes) -> RightsResult | ChunkAck | ResyncRequest:
    return _rights_reply.decode(data)  # type: ignore[no-any-return]


def decode_events(data: bytes) -> EventBatch:
    return _events.decode(data)  # type: ignore[no-any-return]


def decode_event_ack(data: bytes) -> Signed | EventAck:
    """Anything on `events/ack`: a `Signed` envelope, or a bare (unsigned, refused) `EventAck`."""
    return _event_ack.decode(data)  # type: ignore[no-any-return]


def decode_command(data: bytes) -> SignedCommand:
    return _command.decode(data)  # type: ignore[no-any-return]


def decode_command_body(data: bytes) -> Command:
    return _command_body.decode(data)  # type: ignore[no-any-return]


def decode_command_result(data: bytes) -> CommandResult:
    return _command_result.decode(data)  # type: ignore[no-any-return]


def decode_uplink(data: bytes) -> Any:
    """Any gateway -> cloud message (used by docs tests and tools)."""
    return _uplink.decode(data)


def peek_ref(data: bytes | bytearray | memoryview, *, _inner: bool = True) -> str | None:
    """Best-effort request id of a message that was refused (so the refusal can name it): its `id` or
    `request_id`, or that of the message inside a `Signed` envelope's body (read without trusting it: the
    id is only echoed, never acted on)."""
    try:
        check_depth(data)
        r = _ref_js.decode(data) if data[:1] == b"{" else _ref_mp.decode(data)
    except (ProtocolError, msgspec.DecodeError, msgspec.ValidationError, RecursionError, OverflowError, ValueError):
        return None
    ref = r.id if r.id is not None else r.request_id
    if ref is None and isinstance(r.msg, dict):
        ref = r.msg.get("id", r.msg.get("request_id"))
    if ref is None and _inner and r.body is not None:
        body = r.body
        if isinstance(body, str):
            with contextlib.suppress(ValueError):
                body = base64.b64decode(body, validate=True)
        if isinstance(body, bytes | bytearray):
            return peek_ref(body, _inner=False)
    return ref if isinstance(ref, str) and 0 < len(ref) <= 64 else None


def snapshot_of(chunks: list[SnapshotChunk]) -> Snapshot:
    """Join the chunks of one transfer (any order) into the snapshot they carry."""
    ordered = sorted(chunks, key=lambda c: c.index)
    parts = {k: [x for c in ordered for x in getattr(c, k)] for k in SNAPSHOT_PARTS}
    return Snapshot(version=ordered[0].version, **parts)
