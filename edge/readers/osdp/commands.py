"""OSDP command and reply codes, command encoders and reply decoders (pure, no I/O).

Every decoder takes the reply's data block and returns a reply struct or `Malformed`; none raises on any
input. Multi-byte integers are little-endian unless the spec says otherwise (card data is MSB first).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Final

import msgspec


class Cmd(enum.IntEnum):
    POLL = 0x60
    ID = 0x61
    CAP = 0x62
    LSTAT = 0x64
    ISTAT = 0x65
    OSTAT = 0x66
    RSTAT = 0x67
    OUT = 0x68
    LED = 0x69
    BUZ = 0x6A
    TEXT = 0x6B
    COMSET = 0x6E
    KEYSET = 0x75
    CHLNG = 0x76
    SCRYPT = 0x77
    ACURXSIZE = 0x7B
    FILETRANSFER = 0x7C
    MFG = 0x80


class Rep(enum.IntEnum):
    ACK = 0x40
    NAK = 0x41
    PDID = 0x45
    PDCAP = 0x46
    LSTATR = 0x48
    ISTATR = 0x49
    OSTATR = 0x4A
    RSTATR = 0x4B
    RAW = 0x50
    FMT = 0x51
    KEYPAD = 0x53
    COM = 0x54
    CCRYPT = 0x76
    RMAC_I = 0x78
    BUSY = 0x79
    FTSTAT = 0x7A
    MFGREP = 0x90


class Nak(enum.IntEnum):
    NONE = 0x00
    CHECK = 0x01  # message check character(s) error
    LENGTH = 0x02  # command length error
    UNKNOWN_COMMAND = 0x03
    SEQUENCE = 0x04  # unexpected sequence number
    SC_UNSUPPORTED = 0x05  # unsupported security block or security conditions not met
    SC_REQUIRED = 0x06  # encrypted communication required
    BIO_TYPE = 0x07
    BIO_FORMAT = 0x08
    UNABLE = 0x09  # unable to process command record


class Cap(enum.IntEnum):
    CONTACT_STATUS = 1
    OUTPUT_CONTROL = 2
    CARD_FORMAT = 3
    LED_CONTROL = 4
    AUDIBLE = 5
    TEXT_OUTPUT = 6
    TIME_KEEPING = 7
    CHECK_CHARACTER = 8
    COMM_SECURITY = 9
    RECEIVE_BUFFER = 10
    COMBINED_MESSAGE = 11
    SMART_CARD = 12
    READERS = 13
    BIOMETRICS = 14


class LedColor(enum.IntEnum):
    BLACK = 0
    RED = 1
    GREEN = 2
    AMBER = 3
    BLUE = 4
    MAGENTA = 5
    CYAN = 6
    WHITE = 7


# --- commands ---------------------------------------------------------------------------------------


class LedCommand(msgspec.Struct, frozen=True, kw_only=True):
    """One LED control record (osdp_LED, 14 bytes). Times are in units of 100 ms."""

    reader: int = 0
    led: int = 0
    temp_control: int = 0  # 0 = no change, 1 = cancel, 2 = set temporary
    temp_on: int = 0
    temp_off: int = 0
    temp_on_color: int = 0
    temp_off_color: int = 0
    temp_timer: int = 0  # 100 ms units, 16 bit
    perm_control: int = 0  # 0 = no change, 1 = set permanent
    perm_on: int = 0
    perm_off: int = 0
    perm_on_color: int = 0
    perm_off_color: int = 0

    def encode(self) -> bytes:
        return bytes(
            (
                self.reader,
                self.led,
                self.temp_control,
                self.temp_on,
                self.temp_off,
                self.temp_on_color,
                self.temp_off_color,
                self.temp_timer & 0xFF,
                self.temp_timer >> 8,
                self.perm_control,
                self.perm_on,
                self.perm_off,
                self.perm_on_color,
                self.perm_off_color,
            )
        )


class BuzzerCommand(msgspec.Struct, frozen=True, kw_only=True):
    """osdp_BUZ: tone 1 = off, 2 = default tone; on/off in 100 ms units; count 0 = until cancelled."""

    reader: int = 0
    tone: int = 2
    on: int = 1
    off: int = 1
    count: int = 1

    def encode(self) -> bytes:
        return bytes((self.reader, self.tone, self.on, self.off, self.count))


class TextCommand(msgspec.Struct, frozen=True, kw_only=True):
    """osdp_TEXT: command 1 = permanent no wrap, 2 = permanent wrap, 3 = temporary no wrap, 4 = temp wrap."""

    text: str
    reader: int = 0
    command: int = 3
    temp_time: int = 3  # seconds
    row: int = 1
    column: int = 1

    def encode(self) -> bytes:
        data = self.text.encode("ascii", "replace")[:32]
        return bytes((self.reader, self.command, self.temp_time, self.row, self.column, len(data))) + data


class OutputCommand(msgspec.Struct, frozen=True, kw_only=True):
    """One osdp_OUT record: control 1 = perm off, 2 = perm on, 5 = temp on for `timer` x 100 ms, ..."""

    output: int
    control: int
    timer: int = 0

    def encode(self) -> bytes:
        return bytes((self.output, self.control, self.timer & 0xFF, (self.timer >> 8) & 0xFF))


def encode_comset(address: int, baud: int) -> bytes:
    return bytes((address,)) + baud.to_bytes(4, "little")


def encode_filetransfer(file_type: int, total: int, offset: int, fragment: bytes) -> bytes:
    """osdp_FILETRANSFER: FtType, FtSizeTotal (u32), FtOffset (u32), FtFragmentSize (u16), the fragment."""
    return (bytes((file_type,)) + total.to_bytes(4, "little") + offset.to_bytes(4, "little")
            + len(fragment).to_bytes(2, "little") + fragment)


def encode_keyset(scbk: bytes) -> bytes:
    """osdp_KEYSET for the Secure Channel Base Key (key type 1)."""
    if len(scbk) != 16:
        raise ValueError("SCBK must be 16 bytes")
    return bytes((1, 16)) + scbk


# --- replies ----------------------------------------------------------------------------------------


class Ack(msgspec.Struct, frozen=True):
    pass


class Busy(msgspec.Struct, frozen=True):
    pass


class NakReply(msgspec.Struct, frozen=True):
    reason: int
    detail: bytes = b""


class PdId(msgspec.Struct, frozen=True):
    vendor: int
    model: int
    version: int
    serial: int
    firmware: tuple[int, int, int]


class PdCap(msgspec.Struct, frozen=True):
    #: function code -> (compliance level, number of items)
    caps: dict[int, tuple[int, int]]

    def has(self, code: int) -> bool:
        level = self.caps.get(code)
        return level is not None and level[0] > 0


class LocalStatus(msgspec.Struct, frozen=True):
    tamper: bool
    power_failure: bool


class IoStatus(msgspec.Struct, frozen=True):
    """ISTATR / OSTATR / RSTATR: one status byte per input, output or attached reader."""

    kind: str  # "input", "output", "reader"
    states: tuple[int, ...]


class RawCard(msgspec.Struct, frozen=True):
    reader: int
    format: int  # 0 = raw, unspecified; 1 = raw Wiegand
    bits: int  # bit count
    value: int  # the bits, MSB first


class FmtCard(msgspec.Struct, frozen=True):
    reader: int
    direction: int
    text: str


class Keypad(msgspec.Struct, frozen=True):
    """Key presses; '*' and '#' are mapped from the wire's 0x7F and 0x0D."""

    reader: int
    keys: str

    def __repr__(self) -> str:
        return f"Keypad(reader={self.reader}, keys=<{len(self.keys)}>)"


class Com(msgspec.Struct, frozen=True):
    address: int
    baud: int


class CCrypt(msgspec.Struct, frozen=True):
    cuid: bytes
    rnd_b: bytes
    cryptogram: bytes


class RMacI(msgspec.Struct, frozen=True):
    rmac: bytes


class MfgReply(msgspec.Struct, frozen=True):
    vendor: int
    data: bytes


class FileStatus(msgspec.Struct, frozen=True):
    """osdp_FTSTAT: `status` 0 = go on, 1 = file processed, 2 = rebooting to apply it, 3 = finishing (keep
    sending), < 0 = an error (-1 abort, -2 unrecognised contents, -3 malformed); `delay` ms before the next
    fragment; `update_max` a new largest fragment (0 = unchanged); `action` bit 0 = polls may interleave."""

    action: int
    delay: int
    status: int
    update_max: int


class Malformed(msgspec.Struct, frozen=True):
    code: int
    reason: str


class Unknown(msgspec.Struct, frozen=True):
    code: int
    data: bytes


Reply = (
    Ack
    | Busy
    | NakReply
    | PdId
    | PdCap
    | LocalStatus
    | IoStatus
    | RawCard
    | FmtCard
    | Keypad
    | Com
    | CCrypt
    | RMacI
    | MfgReply
    | FileStatus
    | Malformed
    | Unknown
)
Decoder = Callable[[bytes], Reply]

_ACK: Final = Ack()
_BUSY: Final = Busy()
_KEYMAP: Final = {0x7F: "*", 0x0D: "#"}
#: Largest card we accept in one RAW reply (bits): anything longer is not a credential.
MAX_CARD_BITS: Final = 1024


def _ack(data: bytes) -> Reply:
    return _ACK if not data else Malformed(Rep.ACK, "ACK with data")


def _busy(data: bytes) -> Reply:
    return _BUSY if not data else Malformed(Rep.BUSY, "BUSY with data")


def _nak(data: bytes) -> Reply:
    if not data:
        return Malformed(Rep.NAK, "NAK without a reason")
    return NakReply(data[0], bytes(data[1:]))


def _pdid(data: bytes) -> Reply:
    if len(data) != 12:
        return Malformed(Rep.PDID, f"PDID is 12 bytes, got {len(data)}")
    return PdId(
        vendor=int.from_bytes(data[0:3], "little"),
        model=data[3],
        version=data[4],
        serial=int.from_bytes(data[5:9], "little"),
        firmware=(data[9], data[10], data[11]),
    )


def _pdcap(data: bytes) -> Reply:
    if not data or len(data) % 3:
        return Malformed(Rep.PDCAP, f"PDCAP length {len(data)} is not a multiple of 3")
    caps = {data[i]: (data[i + 1], data[i + 2]) for i in range(0, len(data), 3)}
    return PdCap(caps)


def _lstatr(data: bytes) -> Reply:
    if len(data) != 2 or data[0] > 1 or data[1] > 1:
        return Malformed(Rep.LSTATR, "LSTATR is two bytes of 0/1")
    return LocalStatus(tamper=data[0] == 1, power_failure=data[1] == 1)


def _io(kind: str, code: int) -> Decoder:
    def dec(data: bytes) -> Reply:
        if not data:
            return Malformed(code, f"{kind} status without entries")
        return IoStatus(kind, tuple(data))

    return dec


def _raw(data: bytes) -> Reply:
    if len(data) < 5:
        return Malformed(Rep.RAW, "RAW shorter than its header")
    nbits = data[2] | (data[3] << 8)
    payload = data[4:]
    if nbits == 0 or nbits > MAX_CARD_BITS:
        return Malformed(Rep.RAW, f"RAW bit count {nbits} out of range")
    if len(payload) != (nbits + 7) // 8:
        return Malformed(Rep.RAW, f"RAW has {len(payload)} data bytes for {nbits} bits")
    if data[1] > 1:
        return Malformed(Rep.RAW, f"RAW format code {data[1]} unknown")
    value = int.from_bytes(payload, "big") >> (len(payload) * 8 - nbits)
    return RawCard(reader=data[0], format=data[1], bits=nbits, value=value)


def _fmt(data: bytes) -> Reply:
    if len(data) < 3 or data[2] != len(data) - 3 or data[2] == 0:
        return Malformed(Rep.FMT, "FMT length byte does not match its data")
    text = data[3:]
    if not all(0x20 <= b < 0x7F for b in text):
        return Malformed(Rep.FMT, "FMT data is not printable ASCII")
    return FmtCard(reader=data[0], direction=data[1], text=text.decode("ascii"))


def _keypad(data: bytes) -> Reply:
    if len(data) < 3 or data[1] != len(data) - 2:
        return Malformed(Rep.KEYPAD, "KEYPAD count does not match its data")
    keys = []
    for b in data[2:]:
        if 0x30 <= b <= 0x39:
            keys.append(chr(b))
        elif b in _KEYMAP:
            keys.append(_KEYMAP[b])
        else:
            return Malformed(Rep.KEYPAD, "KEYPAD key code out of range")
    return Keypad(reader=data[0], keys="".join(keys))


def _com(data: bytes) -> Reply:
    if len(data) != 5:
        return Malformed(Rep.COM, "COM is 5 bytes")
    return Com(address=data[0], baud=int.from_bytes(data[1:5], "little"))


def _ccrypt(data: bytes) -> Reply:
    if len(data) != 32:
        return Malformed(Rep.CCRYPT, "CCRYPT is 32 bytes")
    return CCrypt(cuid=bytes(data[0:8]), rnd_b=bytes(data[8:16]), cryptogram=bytes(data[16:32]))


def _rmac_i(data: bytes) -> Reply:
    if len(data) != 16:
        return Malformed(Rep.RMAC_I, "RMAC_I is 16 bytes")
    return RMacI(bytes(data))


def _mfgrep(data: bytes) -> Reply:
    if len(data) < 3:
        return Malformed(Rep.MFGREP, "MFGREP shorter than its vendor code")
    return MfgReply(vendor=int.from_bytes(data[0:3], "little"), data=bytes(data[3:]))


def _ftstat(data: bytes) -> Reply:
    if len(data) != 7:
        return Malformed(Rep.FTSTAT, f"FTSTAT is 7 bytes, got {len(data)}")
    return FileStatus(action=data[0], delay=int.from_bytes(data[1:3], "little"),
                      status=int.from_bytes(data[3:5], "little", signed=True),
                      update_max=int.from_bytes(data[5:7], "little"))


DECODERS: Final[dict[int, Decoder]] = {
    Rep.ACK: _ack,
    Rep.NAK: _nak,
    Rep.PDID: _pdid,
    Rep.PDCAP: _pdcap,
    Rep.LSTATR: _lstatr,
    Rep.ISTATR: _io("input", Rep.ISTATR),
    Rep.OSTATR: _io("output", Rep.OSTATR),
    Rep.RSTATR: _io("reader", Rep.RSTATR),
    Rep.RAW: _raw,
    Rep.FMT: _fmt,
    Rep.KEYPAD: _keypad,
    Rep.COM: _com,
    Rep.CCRYPT: _ccrypt,
    Rep.RMAC_I: _rmac_i,
    Rep.BUSY: _busy,
    Rep.MFGREP: _mfgrep,
    Rep.FTSTAT: _ftstat,
}


def decode_reply(code: int, data: bytes) -> Reply:
    """Decode one reply's data block. Never raises."""
    dec = DECODERS.get(code)
    if dec is None:
        return Unknown(code, bytes(data))
    try:
        return dec(data)
    except Exception as e:  # a decoder bug must not take the bus down; report the reply as malformed
        return Malformed(code, f"decoder error: {type(e).__name__}")


class MultiPart:
    """Reassemble a multi-part reply (spec 5.9: whole length u16, offset u16, fragment length u16, data).

    `add()` returns the whole message when the last fragment arrives, `None` while more are due, and raises
    nothing: a fragment that does not continue the message restarts it (or is refused).
    """

    __slots__ = ("_buf", "_total")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._total = -1

    def add(self, fragment: bytes) -> bytes | Malformed | None:
        if len(fragment) < 6:
            return Malformed(0, "multi-part fragment shorter than its header")
        total = fragment[0] | (fragment[1] << 8)
        offset = fragment[2] | (fragment[3] << 8)
        size = fragment[4] | (fragment[5] << 8)
        part = fragment[6:]
        if size != len(part) or offset + size > total:
            self._reset()
            return Malformed(0, "multi-part fragment sizes disagree")
        if offset == 0:
            self._buf = bytearray()
            self._total = total
        elif total != self._total or offset != len(self._buf):
            self._reset()
            return Malformed(0, "multi-part fragment out of order")
        self._buf += part
        if len(self._buf) == self._total:
            whole = bytes(self._buf)
            self._reset()
            return whole
        return None

    def _reset(self) -> None:
        self._buf = bytearray()
        self._total = -1
