"""Journal events: what the agent records for every decision, alarm and state change.

Producers call a synchronous `EventSink` (`journal.record`); the journal stamps each event with a unique id,
a monotonic sequence number, UTC and site-local time and the cloud link state, buffers it in memory and
writes batches to disk off the tap path.
"""

from __future__ import annotations

from typing import Protocol

import msgspec

Detail = dict[str, str | int | float | bool | None]


class Event(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    id: str  # 32 hex chars, unique across gateways and restarts (de-duplication key)
    seq: int  # monotonic per gateway, never reused
    type: str  # e.g. "access.granted", "access.denied", "door.forced_open", "reader.fault"
    ts: float  # UTC seconds since the epoch
    local: str  # site-local ISO 8601 time with offset
    link_up: bool
    door: str | None = None
    reader: str | None = None
    card: int | None = None
    user: str | None = None
    group: str | None = None
    reason: str | None = None
    detail: Detail = {}


class EventSink(Protocol):
    def __call__(
        self,
        type: str,
        *,
        door: str | None = None,
        reader: str | None = None,
        card: int | None = None,
        user: str | None = None,
        group: str | None = None,
        reason: str | None = None,
        detail: Detail | None = None,
    ) -> None: ...


# Event types (the full list is in docs/protocol.md).
ACCESS_GRANTED = "access.granted"
ACCESS_DENIED = "access.denied"
#: A grant taken back: its card read turned out to be the head of a longer frame (reason "cut_frame").
ACCESS_REVOKED = "access.revoked"
ALARM_PIN_LOCKOUT = "alarm.pin_lockout"
DOOR_FORCED_OPEN = "door.forced_open"
DOOR_HELD_OPEN = "door.held_open"
DOOR_HELD_OPEN_PREALARM = "door.held_open_prealarm"
DOOR_STATE = "door.state"
DOOR_REX = "door.rex"
READER_FAULT = "reader.fault"
READER_STATUS = "reader.status"
#: A reader's inputs or outputs moved (reason "input" / "output"; detail: states "1001", changed "0,3").
READER_IO = "reader.io"
READER_TAMPER = "reader.tamper"
READER_POWER = "reader.power"
#: An OSDP reader's Secure Channel key rotation resolved (detail: committed, request_id; never a key).
READER_KEY_ROTATED = "security.reader_key_rotated"
#: A firmware file for OSDP readers: reason "staged" (all of it on the gateway, hash checked), "progress",
#: "done" (the reader's identity checked, detail firmware), "failed" (detail offset: where to resume).
READER_FIRMWARE = "reader.firmware"
JOURNAL_NEAR_FULL = "alarm.journal_near_full"
SECURITY_COMMAND_REJECTED = "security.command_rejected"
SYSTEM = "system"

# Alarms and audit events raised outside the tap path (the whole catalogue is docs/protocol.md, "Event types").
#: The silent alarm of a duress PIN, and the alarm of a soft anti-passback grant (journalled).
ALARM_DURESS = "alarm.duress"
ALARM_ANTI_PASSBACK = "alarm.anti_passback"
#: A user passed a door between areas (access rules): detail `from`, `to` (area ids, None = outside), `occupancy`
#: (users in `to` now), `at` (UTC seconds of the passage). The cloud relays these to the site's other gateways.
AREA_PASSAGE = "area.passage"
#: The alarm the agent journals when the store was found damaged at open (`Store.damage` is its detail).
RIGHTS_DAMAGED = "alarm.rights_damaged"
#: The index image found at open was damaged (discarded) or stale: the index was built from the rights file
#: instead (`Store.image_problem` is its detail).
INDEX_IMAGE_DAMAGED = "alarm.index_image"
JOURNAL_OVERFLOW = "alarm.journal_overflow"
STORAGE_ALARM = "alarm.storage"
#: The journal file failed its integrity check at open: it was moved aside (kept) and a new one started.
JOURNAL_DAMAGED = "alarm.journal_damaged"
#: Journal event type of every command carried out (user = the operator).
COMMAND_EXECUTED = "command.executed"
#: Journal event type of an accepted key rotation (detail: old and new key fingerprints).
KEY_ROTATED = "security.key_rotated"
#: Journal event type of a refused downlink message (rights, events/ack); commands use
#: `security.command_rejected`. Rate-limited: see `RefusalLog`.
SECURITY_MESSAGE_REJECTED = "security.message_rejected"
#: What a person did on the local installer page (login, setup, account added, relay pulsed, bundle taken;
#: user = the page account, detail.action names it, detail.result "ok" or the refusal).
INSTALLER_ACTION = "installer.action"
#: A command from Home Assistant (edge/hass.py): a pulse carried out or refused (detail.result).
HASS_COMMAND = "hass.command"
