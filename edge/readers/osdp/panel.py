"""The control panel's view of one peripheral device: a pure, synchronous state machine.

`PdSession` decides what to send next (`build`), digests each reply addressed to it (`accept`) or the lack of
one (`timeout`), and hands reader events to the sink synchronously, inside the call that completed them. The
bus (`edge.readers.osdp.bus`) only moves bytes and keeps time.

Life of a PD::

    OFFLINE --ID(sqn 0)--> CAP --> [secure] CHLNG --> SCRYPT --> [install key] KEYSET --> CHLNG ...
                                                           \\--> ONLINE (POLL / queued LED, BUZ, TEXT, OUT ...)

A failed handshake is reported (`ReaderFault(kind="handshake")`); the reader is then only used in clear text
if its config says `allow_plaintext`, otherwise it stays refused and the handshake is retried later.
"""

from __future__ import annotations

import enum
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Annotated, Final

import msgspec
from msgspec import Meta

from edge.errors import ConfigError
from edge.readers import formats
from edge.readers.base import CardRead, Feedback, ReaderFault, ReaderSink, ReaderStatus
from edge.readers.keypad import KEY_CLEAR, KEY_ENTER, PinPad

from . import commands as c
from .events import InputsChanged, OutputsChanged, PowerChanged, ReaderIoEvent, TamperChanged
from .frame import Frame, encode
from .secure import (
    KEY_SCBK,
    KEY_SCBK_D,
    SCBK_DEFAULT,
    SCS_11,
    SCS_13,
    SCS_15,
    SCS_16,
    SCS_17,
    SCS_18,
    HandshakeError,
    SecureChannel,
)

log = logging.getLogger(__name__)


class Timing(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Bus timing. Defaults follow the spec: a PD must answer within 200 ms and drops its Secure Channel
    after 8 s without traffic, so each PD is polled far more often than that."""

    poll_interval: Annotated[float, Meta(gt=0, le=2.0)] = 0.05
    reply_timeout: Annotated[float, Meta(gt=0, le=2.0)] = 0.2
    #: Retransmissions of an unanswered command before the reader may be declared offline.
    retries: Annotated[int, Meta(ge=0, le=10)] = 2
    #: Offline detection: a reader is reported offline only after this long without a valid reply (and
    #: `retries` retransmissions). Between its retransmissions every other reader of the line is served.
    offline_after: Annotated[float, Meta(gt=0, le=30)] = 1.5
    #: An offline reader is probed (one osdp_ID, no retransmission) after `offline_retry`, then at doubling
    #: intervals up to `offline_retry_max`: a dead reader costs the live ones one exchange per probe.
    offline_retry: Annotated[float, Meta(gt=0, le=60)] = 1.0
    #: How long a probe waits for its answer (one poll slot: a live PD answers osdp_ID in milliseconds).
    probe_timeout: Annotated[float, Meta(gt=0, le=2.0)] = 0.05
    offline_retry_max: Annotated[float, Meta(gt=0, le=600)] = 8.0
    handshake_retry: Annotated[float, Meta(gt=0, le=600)] = 5.0
    busy_retry: Annotated[float, Meta(ge=0, le=1.0)] = 0.02
    #: Feedback queued when a secure session had to be rebuilt is re-sent if the session is back within this.
    feedback_hold: Annotated[float, Meta(ge=0, le=10)] = 2.0


class PdConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One reader on a bus. `scbk` is the site's Secure Channel Base Key in hex (32 digits); never logged."""

    address: Annotated[int, Meta(ge=0, le=126)]
    secure: bool = True
    allow_install_mode: bool = False
    allow_plaintext: bool = False
    scbk: str | None = None
    use_crc: bool = True
    #: Card formats accepted from RAW reads (passed to edge.readers.formats.decode); None = all it knows.
    formats: list[str] | None = None
    #: Send osdp_TEXT with feedback: None = if the reader reports a text display in its capabilities.
    display: bool | None = None
    #: A key rotation left unresolved (the new key staged, not yet known to be the reader's): the
    #: handshake tries `scbk` and then this one, and reports which one the reader holds. Never logged.
    scbk_next: str | None = None

    def __repr__(self) -> str:
        return (
            f"PdConfig(address={self.address}, secure={self.secure}, "
            f"allow_install_mode={self.allow_install_mode}, allow_plaintext={self.allow_plaintext}, "
            f"scbk={'<set>' if self.scbk else None})"
        )

    def key(self) -> bytes | None:
        return _parse_key(self.scbk, "scbk")

    def next_key(self) -> bytes | None:
        return _parse_key(self.scbk_next, "scbk_next")


def _parse_key(text: str | None, what: str) -> bytes | None:
    if text is None:
        return None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise ConfigError(f"osdp reader {what}: expected 32 hex digits") from None
    if len(key) != 16:
        raise ConfigError(f"osdp reader {what}: expected 32 hex digits (16 bytes)")
    return key


class KeyRotation(msgspec.Struct, frozen=True, kw_only=True):
    """How a Secure Channel key rotation ended: `ok` = the reader is secure on the new key (commit it);
    otherwise it is still on the old one (discard the new). Carries no key material."""

    reader: str
    ok: bool
    detail: str = ""


class Phase(enum.Enum):
    OFFLINE = "offline"
    CAP = "cap"
    CHLNG = "chlng"
    SCRYPT = "scrypt"
    KEYSET = "keyset"
    ONLINE = "online"
    REFUSED = "refused"


_NEXT_SQN: Final = (1, 2, 3, 1)
_MAX_QUEUE: Final = 16
_FEEDBACK: Final = frozenset({c.Cmd.LED, c.Cmd.BUZ, c.Cmd.TEXT})


def _feedback_commands(what: Feedback, text: str | None, display: bool) -> list[tuple[int, bytes]]:
    """LED / buzzer / text records for one feedback."""
    led = c.LedCommand
    out: list[tuple[int, bytes]] = []
    if what is Feedback.GRANTED:
        out.append((c.Cmd.LED, led(temp_control=2, temp_on=30, temp_off=0, temp_on_color=c.LedColor.GREEN,
                                   temp_timer=30).encode()))
        out.append((c.Cmd.BUZ, c.BuzzerCommand(tone=2, on=2, off=0, count=1).encode()))
        default = "ACCESS GRANTED"
    elif what is Feedback.DENIED:
        out.append((c.Cmd.LED, led(temp_control=2, temp_on=2, temp_off=2, temp_on_color=c.LedColor.RED,
                                   temp_timer=20).encode()))
        out.append((c.Cmd.BUZ, c.BuzzerCommand(tone=2, on=1, off=1, count=3).encode()))
        default = "ACCESS DENIED"
    elif what is Feedback.PIN_NEEDED:
        out.append((c.Cmd.LED, led(temp_control=2, temp_on=5, temp_off=5, temp_on_color=c.LedColor.AMBER,
                                   temp_timer=100).encode()))
        out.append((c.Cmd.BUZ, c.BuzzerCommand(tone=2, on=1, off=0, count=1).encode()))
        default = "ENTER PIN"
    elif what is Feedback.ALARM:
        out.append((c.Cmd.LED, led(perm_control=1, perm_on=3, perm_off=3, perm_on_color=c.LedColor.RED,
                                   temp_control=1).encode()))
        out.append((c.Cmd.BUZ, c.BuzzerCommand(tone=2, on=5, off=5, count=0).encode()))
        default = "ALARM"
    else:  # IDLE: cancel temporary states, steady red, silence
        out.append((c.Cmd.LED, led(temp_control=1, perm_control=1, perm_on=1, perm_off=0,
                                   perm_on_color=c.LedColor.RED).encode()))
        out.append((c.Cmd.BUZ, c.BuzzerCommand(tone=1, on=0, off=0, count=0).encode()))
        default = ""
    shown = default if text is None else text
    if display and shown:
        out.append((c.Cmd.TEXT, c.TextCommand(text=shown[:32], command=3, temp_time=3).encode()))
    return out


#: Formats a reader accepts when its config names none: the same list as a Wiegand reader's (edge/config.py;
#: one per length, H10302 left out for H10304, H10306 left out as one bit from Corporate 1000 35).
DEFAULT_FORMATS: Final = ("h10301", "h10304", "corp1000_35", "corp1000_48", "csn32", "csn56")


def card_from_raw(reader: str, raw: c.RawCard, table: formats.FormatTable, at: float) -> CardRead | ReaderFault:
    """Turn the bits of an osdp_RAW reply into a card with the project's card formats (as Wiegand does)."""
    result = formats.decode(raw.value, raw.bits, table)
    if isinstance(result, formats.FormatError):
        return ReaderFault(reader=reader, kind=result.kind, detail=result.detail, at=at)
    return CardRead(reader=reader, card=result.card, format=result.format, bits=result.nbits,
                    facility=result.facility, at=at)


class FileTransferResult(msgspec.Struct, frozen=True, kw_only=True):
    """How a file transfer (osdp_FILETRANSFER) ended. `offset` is what the reader acknowledged: a transfer
    that did not finish can be resumed from there. `firmware` is the version the reader reports after it
    (its identity - vendor, model, serial - checked to be the same reader)."""

    reader: str
    ok: bool
    offset: int
    total: int
    status: int = 0
    detail: str = ""
    firmware: tuple[int, int, int] | None = None


#: Largest fragment when the reader does not advertise its receive buffer (PDCAP function 10).
FT_FRAGMENT_DEFAULT: Final = 128
#: Frame bytes around a fragment in a secure session: header, security block, code, FILETRANSFER header,
#: padding, MAC, CRC, mark.
_FT_OVERHEAD: Final = 5 + 2 + 1 + 11 + 16 + 4 + 2 + 1
#: During a transfer one slot in this many is a POLL, so cards and keys still come in.
FT_POLL_EVERY: Final = 4
#: A fragment left unanswered this many times (the reader declared offline each time) ends the transfer.
FT_MAX_FAILURES: Final = 3


class _FileTransfer:
    __slots__ = ("cancel", "data", "done", "failures", "file_type", "fragment", "identity", "in_flight",
                 "not_before", "offset", "on_done", "on_progress", "since_poll", "status", "verify")

    def __init__(self, data: bytes, file_type: int, offset: int, fragment: int, *,
                 on_progress: Callable[[int, int], None] | None,
                 on_done: Callable[[FileTransferResult], None] | None, identity: c.PdId | None) -> None:
        self.data = data
        self.file_type = file_type
        self.offset = offset
        self.fragment = fragment
        self.in_flight = 0
        self.not_before = 0.0
        self.since_poll = 0
        self.status = 0
        self.done = False
        self.verify = False
        self.cancel = False
        #: times the fragment at `offset` went unanswered until the reader was declared offline
        self.failures = 0
        self.identity = identity
        self.on_progress = on_progress
        self.on_done = on_done


def _moved(old: tuple[int, ...], new: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(i for i, v in enumerate(new) if i >= len(old) or old[i] != v)


class PdSession:
    """The control panel's state for one PD (pure: no I/O, time passed in)."""

    def __init__(self, name: str, config: PdConfig, sink: ReaderSink, timing: Timing | None = None) -> None:
        self.name = name
        self.config = config
        self.sink = sink
        self.timing = timing or Timing()
        self.address = config.address
        self._key = config.key()
        #: rotation in progress: the key it moves to and the one it moves from (both tried at a handshake
        #: until the reader is secure on one of them)
        self._next_key = config.next_key()
        self._old_key = self._key if self._next_key is not None else None
        self._tried: set[bytes] = set()
        #: called when a key rotation is resolved (the reader layer commits or discards the stored key)
        self.on_key: Callable[[KeyRotation], None] | None = None
        #: where reader I/O events (inputs, outputs, tamper, power) go when they change (None: `sink`)
        self.io_sink: Callable[[ReaderIoEvent], None] | None = None
        #: callers waiting for the reply to one command code (ISTAT, OSTAT, OUT): called with the reply,
        #: or None if the reader went offline first
        self._completions: dict[int, Callable[[c.Reply | None], None]] = {}
        self._ft: _FileTransfer | None = None
        if config.secure and self._key is None and not config.allow_install_mode:
            raise ConfigError(f"osdp reader {name}: secure=true needs an scbk (or allow_install_mode)")
        self.phase = Phase.OFFLINE
        self.online = False
        self.sqn = 0
        self.due = 0.0
        #: the fixed poll schedule while online: the deadline of this PD's next poll. Polls are due every
        #: `poll_interval` on that grid, whatever the replies' latency or the extra exchanges in between
        #: (feedback, retransmissions), so a PD is polled 1 / poll_interval times a second
        self.slot = 0.0
        #: where in each poll interval this PD's slots lie (0 <= phase < 1): the bus spreads the PDs of one
        #: line evenly, so their polls do not queue behind each other
        self.slot_phase = 0.0
        self.sc: SecureChannel | None = None
        self.secure = False
        self.pdid: c.PdId | None = None
        self.pdcap: c.PdCap | None = None
        self.tamper: bool | None = None
        self.power_ok: bool | None = None
        self.inputs: tuple[int, ...] = ()
        self.outputs: tuple[int, ...] = ()
        self.readers: tuple[int, ...] = ()
        self._pending: deque[tuple[int, bytes]] = deque()
        #: feedback that was queued (or in flight) when the secure session dropped, and until when it is
        #: worth showing once the session is back
        self._carry: list[tuple[int, bytes]] = []
        self._carry_until = 0.0
        self._inflight: tuple[int, bytes] = (c.Cmd.POLL, b"")
        self._retx: bytes | None = None
        self._last_heard = 0.0
        self._probe_interval = self.timing.offline_retry
        #: BUSY replies seen (diagnostics)
        self.busy = 0
        self._busy_since: float | None = None
        self._cmd = 0
        #: the address our own COMSET in flight asks for (None when the command in flight is not a COMSET)
        self._asked_address: int | None = None
        self._asked_baud: int | None = None
        #: called with the osdp_COM that answered our own COMSET (the bus waits on it to switch its baud rate)
        self.on_com: Callable[[c.Com], None] | None = None
        self._attempts = 0
        self._key_type = KEY_SCBK
        self._installing = False
        #: install mode armed at run time (`arm_install_mode`): until when (loop time), and the configured setting
        #: it returns to when the window ends or the site key is installed
        self._install_until: float | None = None
        self._install_base = config.allow_install_mode
        self._refused_reported = False
        self.formats = formats.FormatTable(config.formats if config.formats is not None else DEFAULT_FORMATS)
        self.pinpad = PinPad(name)
        self._multipart = c.MultiPart()
        self._scrypt = b""
        self.exchanges = 0
        #: called when a command is queued (the bus wakes its scheduler)
        self.on_queue: Callable[[], None] | None = None

    def __repr__(self) -> str:
        return f"PdSession({self.name!r}, address={self.address}, phase={self.phase.value}, secure={self.secure})"

    def set_timing(self, timing: Timing) -> None:
        self.timing = timing
        self._probe_interval = timing.offline_retry

    # --- API used by the reader adapter ---

    def queue(self, code: int, data: bytes = b"") -> None:
        """Queue a command for the next slot of this PD (oldest dropped past a small bound)."""
        if len(self._pending) >= _MAX_QUEUE:
            self._pending.popleft()
        self._pending.append((code, data))
        if self.on_queue is not None:
            self.on_queue()

    def feedback(self, what: Feedback, text: str | None = None, now: float | None = None) -> None:
        display = self.config.display
        if display is None:
            display = self.pdcap is not None and self.pdcap.has(c.Cap.TEXT_OUTPUT)
        if self.phase is not Phase.ONLINE:
            if self.online and self.phase in (Phase.CHLNG, Phase.SCRYPT):
                # the secure session is being rebuilt: shown as soon as it is back (if soon enough)
                self._carry = _feedback_commands(what, text, display)
                self._carry_until = (time.monotonic() if now is None else now) + self.timing.feedback_hold
            return  # otherwise nothing to show it on; stale feedback must not flash later
        # a newer result replaces feedback not yet sent
        self._pending = deque(p for p in self._pending if p[0] not in (c.Cmd.LED, c.Cmd.BUZ, c.Cmd.TEXT))
        for cmd in _feedback_commands(what, text, display):
            self.queue(*cmd)

    def set_address(self, address: int, baud: int) -> None:
        """Ask the PD to move to `address` (osdp_COMSET at `baud`, the line's rate). The session follows only
        when the PD answers this very command with an osdp_COM for that address (see `_on_com`); use
        `OsdpBus.set_address`, which keeps the addresses of one line unique."""
        if not 0 <= address <= 126:
            raise ValueError(f"osdp reader {self.name}: address {address} is outside 0..126")
        self.queue(c.Cmd.COMSET, c.encode_comset(address, baud))

    def rotate_key(self, new_key: bytes) -> None:
        """Start moving the reader to `new_key` in session: osdp_KEYSET inside the secure session, then a
        handshake on the new key. `on_key` is called once the reader is secure on one of the two keys."""
        if len(new_key) != 16:
            raise ValueError("an SCBK is 16 bytes")
        if self.phase is not Phase.ONLINE or not self.secure or self._key_type != KEY_SCBK or self._key is None:
            raise RuntimeError(f"osdp reader {self.name}: a key rotation needs the reader online in a secure "
                               "session on its site key")
        if self._next_key is not None:
            raise RuntimeError(f"osdp reader {self.name}: a key rotation is already in progress")
        if new_key == self._key:
            raise ValueError(f"osdp reader {self.name}: the new key is the current one")
        self._next_key, self._old_key = new_key, self._key
        self.queue(c.Cmd.KEYSET, c.encode_keyset(new_key))

    def request(self, code: int, data: bytes, done: Callable[[c.Reply | None], None]) -> None:
        """Queue one command whose reply a caller waits for (one at a time per command code)."""
        if self.phase is not Phase.ONLINE:
            raise RuntimeError(f"osdp reader {self.name} is not online")
        if code in self._completions:
            raise RuntimeError(f"osdp reader {self.name}: command 0x{code:02x} already in flight")
        self._completions[code] = done
        self.queue(code, data)

    def send_file(self, data: bytes, *, file_type: int = 1, offset: int = 0,
                  on_progress: Callable[[int, int], None] | None = None,
                  on_done: Callable[[FileTransferResult], None] | None = None) -> None:
        """Start sending `data` (e.g. reader firmware) with osdp_FILETRANSFER from `offset` (0, or where an
        interrupted transfer stopped). Fragments are interleaved with polls; a reader that goes offline
        pauses the transfer, which goes on from the last acknowledged offset when it is back."""
        if self.phase is not Phase.ONLINE:
            raise RuntimeError(f"osdp reader {self.name} is not online")
        if self._ft is not None:
            raise RuntimeError(f"osdp reader {self.name}: a file transfer is already in progress")
        if not data or len(data) > 0xFFFFFFFF or not 0 <= offset < len(data) or not 0 <= file_type <= 255:
            raise ValueError(f"osdp reader {self.name}: file of {len(data)} bytes from offset {offset}")
        cap = self.pdcap.caps.get(c.Cap.RECEIVE_BUFFER) if self.pdcap else None
        rx = (cap[0] | cap[1] << 8) if cap else 0
        fragment = min(rx - _FT_OVERHEAD, 1024) if rx > _FT_OVERHEAD + 16 else FT_FRAGMENT_DEFAULT
        self._ft = _FileTransfer(data, file_type, offset, fragment, on_progress=on_progress, on_done=on_done,
                                 identity=self.pdid)
        if self.on_queue is not None:
            self.on_queue()

    def cancel_file(self) -> None:
        """Stop the transfer after the fragment in flight (its acknowledgement still counts, so the offset
        reported through `on_progress` is exactly where to resume)."""
        ft = self._ft
        if ft is None:
            return
        ft.cancel = True
        if not ft.in_flight or self._cmd != c.Cmd.FILETRANSFER or self._retx is None:
            self._ft_finish(False, "cancelled")

    @property
    def file_offset(self) -> int | None:
        """The acknowledged offset of the transfer in progress (None: none)."""
        return None if self._ft is None else self._ft.offset

    def _ft_ready(self, now: float) -> bool:
        ft = self._ft
        return (ft is not None and not ft.done and not ft.cancel and now >= ft.not_before
                and ft.since_poll < FT_POLL_EVERY)

    def _ft_finish(self, ok: bool, detail: str, firmware: tuple[int, int, int] | None = None) -> None:
        ft, self._ft = self._ft, None
        if ft is None:
            return
        log.info("osdp %s: file transfer %s at %d/%d: %s", self.name, "done" if ok else "stopped", ft.offset,
                 len(ft.data), detail)
        if ft.on_done is not None:
            ft.on_done(FileTransferResult(reader=self.name, ok=ok, offset=ft.offset, total=len(ft.data),
                                          status=ft.status, detail=detail, firmware=firmware))

    def _ft_identity(self, pdid: c.PdId) -> None:
        """The reader's identity after a transfer: the same reader (vendor, model, serial), its firmware."""
        ft = self._ft
        if ft is None or not ft.verify:
            return
        before = ft.identity
        same = before is None or (before.vendor, before.model, before.serial) == (pdid.vendor, pdid.model,
                                                                                  pdid.serial)
        if same:
            self._ft_finish(True, "file transferred; reader identity checked", pdid.firmware)
        else:
            self._ft_finish(False, "file transferred, but another reader answers at this address now")

    def _on_file_status(self, st: c.FileStatus, now: float) -> None:
        ft = self._ft
        assert ft is not None
        ft.status = st.status
        if st.status < 0:
            ft.in_flight = 0
            self._ft_finish(False, f"the reader stopped the transfer (status {st.status})")
            return
        ft.offset += ft.in_flight
        ft.in_flight = 0
        ft.failures = 0
        ft.not_before = now + st.delay / 1000
        if st.update_max > _FT_OVERHEAD + 16:
            ft.fragment = min(st.update_max - _FT_OVERHEAD, 1024)
        if ft.on_progress is not None:
            ft.on_progress(ft.offset, len(ft.data))
        if ft.cancel and ft.offset < len(ft.data):
            self._ft_finish(False, "cancelled")
            return
        if ft.offset >= len(ft.data) and st.status != 3:  # 3: the reader is finishing; keep it company
            ft.done = ft.verify = True
            self._pending.append((c.Cmd.ID, b"\x00"))  # who is there now (status 2: after its restart)

    def _complete_all(self) -> None:
        done, self._completions = self._completions, {}
        for f in done.values():
            f(None)

    @property
    def rotating(self) -> bool:
        return self._next_key is not None

    @property
    def reply_timeout(self) -> float:
        """How long the bus waits for this PD's reply to the command `build` gave it."""
        t = self.timing
        return min(t.probe_timeout, t.reply_timeout) if self.phase is Phase.OFFLINE else t.reply_timeout

    @property
    def has_pending(self) -> bool:
        return bool(self._pending) and self.phase is Phase.ONLINE

    # --- what to send ---

    def build(self, now: float) -> bytes:
        """The next frame for this PD (a retransmission if the last one went unanswered)."""
        if self._retx is not None:
            return self._retx
        phase = self.phase
        scb: bytes | None = None
        code: int
        data: bytes
        if phase is Phase.OFFLINE or phase is Phase.REFUSED:
            self.phase = Phase.OFFLINE
            self.sqn = 0
            self.sc = None
            self.secure = False
            code, data = c.Cmd.ID, b"\x00"
        elif phase is Phase.CAP:
            code, data = c.Cmd.CAP, b"\x00"
        elif phase is Phase.CHLNG:
            key = SCBK_DEFAULT if self._key_type == KEY_SCBK_D else self._key
            assert key is not None
            self.sc = SecureChannel(key, key_type=self._key_type)
            self.secure = False
            code, data = c.Cmd.CHLNG, self.sc.challenge()
            scb = bytes((3, SCS_11, self._key_type))
        elif phase is Phase.SCRYPT:
            assert self.sc is not None
            code, data = c.Cmd.SCRYPT, self._scrypt
            scb = bytes((3, SCS_13, self._key_type))
        elif phase is Phase.KEYSET:
            assert self._key is not None
            code, data = c.Cmd.KEYSET, c.encode_keyset(self._key)
        elif self._pending:
            code, data = self._pending.popleft()
        elif self._ft is not None and self._ft_ready(now):
            ft = self._ft
            chunk = ft.data[ft.offset : ft.offset + ft.fragment]
            ft.in_flight = len(chunk)
            ft.since_poll += 1
            code, data = c.Cmd.FILETRANSFER, c.encode_filetransfer(ft.file_type, len(ft.data), ft.offset, chunk)
        else:
            if self._ft is not None:
                self._ft.since_poll = 0
            code, data = c.Cmd.POLL, b""
            if phase is Phase.ONLINE:
                self._next_slot(now)
        self._inflight = (code, data)
        self._asked_address = data[0] if code == c.Cmd.COMSET and data else None
        self._asked_baud = int.from_bytes(data[1:5], "little") if code == c.Cmd.COMSET and data else None
        sc = self.sc
        if sc is not None and sc.established and scb is None:
            if data:
                data = sc.encrypt_command(data)
                scb = bytes((2, SCS_17))
            else:
                scb = bytes((2, SCS_15))
            frame = encode(self.address, self.sqn, code, data, use_crc=self.config.use_crc, scb=scb,
                           mac=sc.mac_command)
        else:
            frame = encode(self.address, self.sqn, code, data, use_crc=self.config.use_crc, scb=scb)
        self._cmd = code
        self._retx = frame
        self._attempts = 0
        return frame

    # --- what came back ---

    def fault(self, kind: str, detail: str = "", at: float | None = None) -> None:
        self.sink(ReaderFault(reader=self.name, kind=kind, detail=detail,
                              at=time.monotonic() if at is None else at))

    def accept(self, frame: Frame, now: float) -> bool:
        """Digest a reply addressed to this PD. False if it is not the answer to the command in flight
        (wrong sequence number): the bus keeps waiting for the right one."""
        if self._retx is None:
            self.fault("unsolicited", f"reply 0x{frame.code:02x} with no command in flight")
            return False
        if frame.code == c.Rep.BUSY and frame.scb_type is None and not frame.data and frame.sqn in (0, self.sqn):
            # osdp_BUSY (spec 5.7 / 7.x): sent with sequence number 0 and always in clear, also inside a
            # secure session. The PD has not processed the command: send the very same frame again (same
            # sequence number, same MAC, so the MAC chain stays where it is) a moment later.
            return self._on_busy(now)
        if frame.sqn != self.sqn:
            self.fault("sequence", f"reply sqn {frame.sqn}, expected {self.sqn}")
            return False
        code = frame.code
        data = frame.data
        sc = self.sc
        in_session = sc is not None and sc.established
        if in_session:
            assert sc is not None
            if frame.scb_type is None and code == c.Rep.ACK and self._cmd == c.Cmd.KEYSET and not data:
                # a PD may drop the old session keys as soon as it takes the new key and ACK in clear
                self._exchange_done()
                self._dispatch(c.Ack(), frame, now)
                return True
            if frame.scb_type not in (SCS_16, SCS_18) or frame.mac is None:
                kind = "nak" if code == c.Rep.NAK else "mac"
                self._exchange_done()
                self.fault(kind, "reply outside the secure session: session dropped by the reader")
                self._restart_handshake(now)
                return True
            if not sc.verify_reply(frame.signed, frame.mac):
                self._exchange_done()
                self.fault("mac", "reply MAC does not verify")
                self._restart_handshake(now)
                return True
            if frame.scb_type == SCS_18:
                plain = sc.decrypt_reply(data)
                if plain is None:
                    self._exchange_done()
                    self.fault("mac", "reply data block does not decrypt")
                    self._restart_handshake(now)
                    return True
                data = plain
        elif frame.scb_type in (SCS_16, SCS_18):
            self._exchange_done()
            self.fault("mac", "secure reply with no session")
            self._go_offline(now, "secure reply with no session")
            return True
        reply = c.decode_reply(code, data)
        if isinstance(reply, c.Busy):  # a BUSY inside the session's security block: same handling
            return self._on_busy(now)
        self._exchange_done()
        self._dispatch(reply, frame, now)
        return True

    def _on_busy(self, now: float) -> bool:
        """The PD is busy: the same frame again after `busy_retry`; a PD busy for longer than
        `offline_after` is treated as one that does not answer."""
        self.busy += 1
        if self._busy_since is None:
            self._busy_since = now
        elif now - self._busy_since >= self.timing.offline_after:
            self._busy_since = None
            self._go_offline(now, "busy for too long")
            return True
        self.due = now + self.timing.busy_retry
        return True

    def _next_slot(self, now: float) -> None:
        """A poll went out: the next one is due one interval after its slot (not after its reply). A PD more
        than one interval behind (the line was held up) or ahead (polls in between, as during a file
        transfer) goes back to its phase of the grid rather than polling back to back or waiting."""
        interval = self.timing.poll_interval
        nxt = self.slot + interval
        if not now - interval <= nxt <= now + interval:
            nxt = self._grid(now + 0.5 * interval)
        self.slot = nxt

    def _grid(self, now: float) -> float:
        """The first slot of this PD's phase at or after `now`."""
        interval = self.timing.poll_interval
        offset = self.slot_phase * interval
        return offset + -((offset - now) // interval) * interval

    def _exchange_done(self) -> None:
        self._retx = None
        self._attempts = 0
        self._busy_since = None
        self.sqn = _NEXT_SQN[self.sqn]
        self.exchanges += 1

    def heard(self, now: float) -> None:
        """A well-formed frame from this PD arrived (the bus calls it before `accept`)."""
        self._last_heard = now
        self._probe_interval = self.timing.offline_retry

    def timeout(self, now: float) -> None:
        """No valid reply within the reply timeout."""
        t = self.timing
        if self.phase is Phase.OFFLINE:
            # a probe of an offline reader: no retransmission, the next probe later and later
            self._retx = None
            self.due = now + self._probe_interval
            self._probe_interval = min(self._probe_interval * 2, t.offline_retry_max)
            return
        self._attempts += 1
        if self._attempts <= t.retries or now - self._last_heard < t.offline_after:
            # retransmit the same bytes in this PD's next slot: every reader already due goes first
            self.due = now
            return
        self._go_offline(now, "no reply")

    def arm_install_mode(self, seconds: float, now: float) -> float:
        """Allow install mode for `seconds` from `now` (loop time): a reader still on the default key SCBK-D
        is moved to the site key at its next handshake (tried at once if it was refused). Disarmed when the
        window ends or once the site key is installed. Returns the window's end. Raises ValueError for a
        reader without a site key or a secure channel, or a window outside 1 s .. 1 h."""
        if not self.config.secure or self._key is None:
            raise ValueError(f"osdp reader {self.name}: install mode needs secure = true and a site key (key_file)")
        if not 1 <= seconds <= 3600:
            raise ValueError(f"osdp reader {self.name}: install mode is armed for 1 .. 3600 s, got {seconds}")
        self._install_until = now + seconds
        self.config = msgspec.structs.replace(self.config, allow_install_mode=True)
        log.info("osdp %s: install mode armed for %g s", self.name, seconds)
        if self.phase is Phase.REFUSED:
            self.due = now
        return self._install_until

    def install_armed_until(self, now: float) -> float | None:
        """The end of the armed install-mode window (loop time), or None (never armed, ended, or used)."""
        self._install_window(now)
        return self._install_until

    def _install_window(self, now: float) -> None:
        if self._install_until is not None and now >= self._install_until:
            log.info("osdp %s: install mode window ended", self.name)
            self._disarm_install()

    def _disarm_install(self) -> None:
        self._install_until = None
        self.config = msgspec.structs.replace(self.config, allow_install_mode=self._install_base)

    # --- internals ---

    def _go_online(self, now: float, detail: str = "") -> None:
        self.phase = Phase.ONLINE
        was = self.online
        self.online = True
        self._refused_reported = False
        self._pending.clear()
        self._pending.append((c.Cmd.LSTAT, b""))
        if self._carry and now <= self._carry_until:
            self._pending.extend(self._carry)  # feedback of a session that had to be rebuilt: show it now
        self._carry = []
        self.due = now
        self.slot = self._grid(now)
        if was and not detail:
            return  # a secure session rebuilt without the reader ever being reported offline
        self.sink(ReaderStatus(reader=self.name, online=True, tamper=self.tamper, power_ok=self.power_ok,
                               secure=self.secure, detail=detail))

    def _go_offline(self, now: float, why: str) -> None:
        was = self.online
        self.phase = Phase.OFFLINE
        self.online = False
        self.secure = False
        self.sc = None
        self._retx = None
        self._pending.clear()
        self._carry = []
        self._complete_all()
        ft = self._ft
        if ft is not None:
            if ft.in_flight and self._cmd == c.Cmd.FILETRANSFER:
                ft.failures += 1
            ft.in_flight = 0  # paused: goes on from the acknowledged offset once the reader is back
            ft.since_poll = 0
            if ft.failures >= FT_MAX_FAILURES:
                self._ft_finish(False, f"the reader does not answer FILETRANSFER at offset {ft.offset}")
            elif ft.cancel:
                self._ft_finish(False, "cancelled; the reader went offline")
        self.pinpad.clear()
        self._probe_interval = self.timing.offline_retry
        self.due = now + self._probe_interval
        if was:
            self.sink(ReaderStatus(reader=self.name, online=False, tamper=self.tamper, power_ok=self.power_ok,
                                   secure=False, detail=why))

    def _restart_handshake(self, now: float) -> None:
        """The PD dropped (or we dropped) the secure session: handshake again at once. Feedback that was
        queued, or in flight when the session went (its reply lost: the PD may not have shown it), is kept
        and sent once the session is back, if that is within `feedback_hold`."""
        self.sc = None
        self.secure = False
        if self._ft is not None:
            self._ft.in_flight = 0
        if self.phase is Phase.ONLINE:
            carry = [p for p in (self._inflight, *self._pending) if p[0] in _FEEDBACK]
            if carry:
                self._carry = carry
                self._carry_until = now + self.timing.feedback_hold
        self._pending.clear()
        self.due = now
        if self.config.secure:
            self._key_type = KEY_SCBK if self._key is not None else KEY_SCBK_D
            self.phase = Phase.CHLNG
        else:
            self._go_offline(now, "reply out of sequence")

    def _start_secure(self, now: float) -> None:
        self._install_window(now)
        self._key_type = KEY_SCBK if self._key is not None else KEY_SCBK_D
        self._installing = False
        self.phase = Phase.CHLNG
        self.due = now

    def _handshake_failed(self, now: float, why: str) -> None:
        self.sc = None
        self.secure = False
        if self._next_key is not None and self._key_type == KEY_SCBK and self._key is not None:
            # a rotation in progress: the reader holds one of the two keys; try the other one once
            self._tried.add(self._key)
            other = self._old_key if self._key == self._next_key else self._next_key
            if other is not None and other not in self._tried:
                self._key = other
                self.phase = Phase.CHLNG
                self.due = now
                return
            self._tried.clear()
        self.fault("handshake", why)
        self._install_window(now)
        if self._key_type == KEY_SCBK and self.config.allow_install_mode:
            self._key_type = KEY_SCBK_D
            self.phase = Phase.CHLNG
            self.due = now
            return
        if self.config.allow_plaintext:
            self._go_online(now, "secure channel failed; plaintext allowed by config")
            return
        was = self.online
        self.online = False
        self.phase = Phase.REFUSED
        self._pending.clear()
        self.due = now + self.timing.handshake_retry
        if was or not self._refused_reported:
            self._refused_reported = True
            self.sink(ReaderStatus(reader=self.name, online=False, secure=False,
                                   detail=f"secure channel refused: {why}"))

    def _dispatch(self, reply: c.Reply, frame: Frame, now: float) -> None:
        phase = self.phase
        if phase is Phase.OFFLINE:
            if isinstance(reply, c.PdId):
                self.pdid = reply
                self.phase = Phase.CAP
                self.due = now
                self._ft_identity(reply)
            else:
                self.fault("protocol", f"ID answered with {type(reply).__name__}")
                self.due = now + self.timing.offline_retry
            return
        if phase is Phase.CAP:
            if isinstance(reply, c.PdCap):
                self.pdcap = reply
            else:
                self.fault("protocol", f"CAP answered with {type(reply).__name__}")
            if self.config.secure:
                self._start_secure(now)
            else:
                self._go_online(now)
            return
        if phase is Phase.CHLNG:
            if isinstance(reply, c.CCrypt) and self.sc is not None:
                try:
                    self._scrypt = self.sc.check_ccrypt(reply.rnd_b, reply.cryptogram)
                except HandshakeError as e:
                    self._handshake_failed(now, str(e))
                    return
                self.phase = Phase.SCRYPT
                self.due = now
            else:
                self._handshake_failed(now, f"challenge answered with {type(reply).__name__}")
            return
        if phase is Phase.SCRYPT:
            if isinstance(reply, c.RMacI) and self.sc is not None:
                if frame.scb_data[:1] == b"\xff":
                    self._handshake_failed(now, "reader refused our cryptogram")
                    return
                try:
                    self.sc.check_rmac_i(reply.rmac)
                except HandshakeError as e:
                    self._handshake_failed(now, str(e))
                    return
                self.secure = True
                if self._key_type == KEY_SCBK_D:
                    if self._key is None:
                        self._go_online(now, "install mode: default key, no site key configured")
                    else:
                        self.phase = Phase.KEYSET
                        self.due = now
                else:
                    detail = "site key installed" if self._installing else ""
                    if self._installing and self._install_until is not None:
                        self._disarm_install()
                    self._installing = False
                    if self._next_key is not None:
                        detail = self._rotation_done()
                    self._go_online(now, detail)
            else:
                self._handshake_failed(now, f"server cryptogram answered with {type(reply).__name__}")
            return
        if phase is Phase.KEYSET:
            if isinstance(reply, c.Ack):
                log.info("osdp %s: site key installed (KEYSET acknowledged)", self.name)
                self._installing = True
                self._key_type = KEY_SCBK
                self.sc = None
                self.secure = False
                self.phase = Phase.CHLNG
                self.due = now
            else:
                self._install_until = None
                self.config = msgspec.structs.replace(self.config, allow_install_mode=False)
                self._handshake_failed(now, f"KEYSET answered with {type(reply).__name__}")
            return
        # ONLINE
        ft = self._ft
        if self._pending or (ft is not None and not ft.done):
            self.due = max(now, ft.not_before) if ft is not None and not self._pending else now
        else:
            self.due = self.slot
        self._on_event(reply, frame, now)

    def _rotation_done(self, refused: bool = False) -> str:
        """The reader is secure on `self._key` (or refused the KEYSET): the rotation is resolved."""
        ok = self._key == self._next_key and not refused
        self._next_key = self._old_key = None
        self._tried.clear()
        detail = "secure channel key rotated" if ok else "key rotation failed: the reader kept its old key"
        log.info("osdp %s: %s", self.name, detail)
        if self.on_key is not None:
            self.on_key(KeyRotation(reader=self.name, ok=ok, detail=detail))
        return detail

    def _on_keyset_ack(self, now: float) -> None:
        """The reader took the new key: handshake on it at once (feedback queued meanwhile is kept)."""
        assert self._next_key is not None
        self._key = self._next_key
        self._tried.clear()
        self._restart_handshake(now)

    def _on_com(self, reply: c.Com, frame: Frame, at: float) -> None:
        """osdp_COM: the PD's new address. Trusted only as the answer, from the address we polled, to the
        COMSET we sent ourselves, and only for the address that COMSET asked for. Anything else (a COM
        answering a POLL, a COM we did not ask for, one naming another address: what a device forging
        replies on a plaintext line sends to steal another reader's traffic) changes nothing."""
        asked, self._asked_address = self._asked_address, None
        baud, self._asked_baud = self._asked_baud, None
        if self._cmd == c.Cmd.COMSET and asked is not None and reply.address == asked \
                and frame.address == self.address:
            if reply.address != self.address:
                log.info("osdp %s: reader moved from address %d to %d", self.name, self.address, reply.address)
            self.address = reply.address
            if baud is not None and reply.baud != baud:
                self.fault("comset", f"asked for {baud} baud, the reader answered {reply.baud}", at)
            if self.on_com is not None:
                self.on_com(reply)
            return
        why = "not asked for" if asked is None else f"we asked for address {asked}"
        self.fault("address", f"osdp_COM to address {reply.address} ignored ({why}; answering command "
                              f"0x{self._cmd:02x}): address stays {self.address}", at)

    def _on_event(self, reply: c.Reply, frame: Frame, now: float) -> None:
        done = self._completions.pop(self._cmd, None) if self._completions else None
        try:
            self._on_reply(reply, frame, now)
        finally:
            if done is not None:
                done(reply)

    def _io(self, event: ReaderIoEvent) -> None:
        (self.io_sink or self.sink)(event)

    def _on_reply(self, reply: c.Reply, frame: Frame, now: float) -> None:
        at = time.monotonic()
        if self.pinpad.pending:
            stale = self.pinpad.expire(at)
            if stale is not None:
                self.sink(stale)
        if isinstance(reply, c.Ack):
            if self._cmd == c.Cmd.KEYSET and self._next_key is not None:
                self._on_keyset_ack(now)
            return
        if isinstance(reply, c.FileStatus) and self._ft is not None and self._cmd == c.Cmd.FILETRANSFER:
            self._on_file_status(reply, now)
            return
        if isinstance(reply, c.PdId):
            self.pdid = reply
            self._ft_identity(reply)
            return
        if isinstance(reply, c.RawCard):
            self.sink(card_from_raw(self.name, reply, self.formats, at))
        elif isinstance(reply, c.FmtCard):
            if reply.text.isdigit():
                self.sink(CardRead(reader=self.name, card=int(reply.text), format="ascii",
                                   bits=len(reply.text) * 8, at=at))
            else:
                self.fault("format", "formatted card data is not a number", at)
        elif isinstance(reply, c.Keypad):
            self._on_keys(reply.keys, at)
        elif isinstance(reply, c.LocalStatus):
            tamper, power_ok = reply.tamper, not reply.power_failure
            if (tamper, power_ok) != (self.tamper, self.power_ok):
                if tamper != self.tamper:
                    self._io(TamperChanged(reader=self.name, tamper=tamper, at=at))
                if power_ok != self.power_ok:
                    self._io(PowerChanged(reader=self.name, power_ok=power_ok, at=at))
                self.tamper, self.power_ok = tamper, power_ok
                self.sink(ReaderStatus(reader=self.name, online=True, tamper=tamper, power_ok=power_ok,
                                       secure=self.secure))
        elif isinstance(reply, c.IoStatus):
            if reply.kind == "input":
                old, self.inputs = self.inputs, reply.states
                if old != reply.states:
                    self._io(InputsChanged(reader=self.name, states=reply.states, changed=_moved(old, reply.states),
                                           at=at))
            elif reply.kind == "output":
                old, self.outputs = self.outputs, reply.states
                if old != reply.states:
                    self._io(OutputsChanged(reader=self.name, states=reply.states,
                                            changed=_moved(old, reply.states), at=at))
            else:
                changed = reply.states != self.readers
                self.readers = reply.states
                if changed and any(reply.states):
                    self.fault("reader_tamper", f"attached reader status {list(reply.states)}", at)
        elif isinstance(reply, c.Com):
            self._on_com(reply, frame, at)
        elif isinstance(reply, c.NakReply):
            self.fault("nak", f"reader refused command 0x{self._cmd:02x}: reason {reply.reason}", at)
            if self._cmd == c.Cmd.FILETRANSFER and self._ft is not None:
                self._ft.in_flight = 0
                self._ft_finish(False, f"the reader refused FILETRANSFER (NAK reason {reply.reason})")
            if self._cmd == c.Cmd.KEYSET and self._next_key is not None:
                self._rotation_done(refused=True)  # still on the old key, and secure on it
            if reply.reason == c.Nak.SEQUENCE:
                self._go_offline(now, "sequence error")
            elif reply.reason in (c.Nak.SC_REQUIRED, c.Nak.SC_UNSUPPORTED) and self.config.secure:
                self._restart_handshake(now)
        elif isinstance(reply, c.Malformed):
            self.fault("malformed", reply.reason, at)
        elif isinstance(reply, c.Unknown):
            self.fault("unknown_reply", f"reply code 0x{reply.code:02x}", at)

    def _on_keys(self, keys: str, at: float) -> None:
        for k in keys:
            key = KEY_CLEAR if k == "*" else KEY_ENTER if k == "#" else ord(k) - 48
            event = self.pinpad.key(key, at)
            if event is not None:
                self.sink(event)
