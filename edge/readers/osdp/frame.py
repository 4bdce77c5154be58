"""OSDP frames: CRC-16 / checksum, encoding, and a resynchronising parser.

A frame on the wire (SIA OSDP v2.2 section 5)::

    SOM(0x53) ADDR LEN_LSB LEN_MSB CTRL [SCB_LEN SCB_TYPE SCB_DATA...] CODE DATA... [MAC x4] CKSUM | CRC_LSB CRC_MSB

`LEN` counts every byte of the frame, SOM to the last check byte. `ADDR` has bit 7 set on replies (PD -> CP).
`CTRL` holds the sequence number (bits 0-1), CRC-vs-checksum (bit 2) and "security block present" (bit 3).

Everything here is pure and synchronous. The parser never raises on bad bytes: it reports what it threw away
as `FrameError`s and starts again at the next start-of-message byte.
"""

from __future__ import annotations

from binascii import crc_hqx
from collections.abc import Callable
from typing import Final

SOM: Final = 0x53
BROADCAST: Final = 0x7F
REPLY_BIT: Final = 0x80

CTRL_SQN: Final = 0x03
CTRL_CRC: Final = 0x04
CTRL_SCB: Final = 0x08

#: Largest frame we accept (the spec lets a PD advertise up to 64 KiB; readers never need more than this).
MAX_FRAME: Final = 1440
#: Smallest frame: SOM ADDR LEN LEN CTRL CODE CKSUM.
MIN_FRAME: Final = 7

#: Security block types that carry a 4-byte MAC after the data.
MAC_SCB_TYPES: Final = frozenset({0x15, 0x16, 0x17, 0x18})


def crc16(data: bytes | bytearray | memoryview, crc: int = 0x1D0F) -> int:
    """CRC-16/AUG-CCITT as OSDP uses it: polynomial 0x1021, initial value 0x1D0F, no reflection, no final
    XOR. That is CRC-CCITT (XMODEM) started at 0x1D0F, which the standard library computes in C
    (`binascii.crc_hqx`); checked against the SIA Annex E examples in tests/test_osdp_frame.py."""
    return crc_hqx(data, crc)


def checksum8(data: bytes | bytearray | memoryview) -> int:
    """The 8-bit checksum mode: two's complement of the byte sum."""
    return (-sum(data)) & 0xFF


class Frame:
    """One well-formed frame (its check bytes verified; its MAC, if any, not yet).

    `signed` is the part of the frame a Secure Channel MAC covers: SOM up to the end of the data.
    """

    __slots__ = ("address", "code", "data", "mac", "raw", "reply", "scb_data", "scb_type", "sqn", "use_crc")

    def __init__(
        self,
        *,
        address: int,
        reply: bool,
        sqn: int,
        use_crc: bool,
        code: int,
        data: bytes,
        scb_type: int | None = None,
        scb_data: bytes = b"",
        mac: bytes | None = None,
        raw: bytes = b"",
    ) -> None:
        self.address = address
        self.reply = reply
        self.sqn = sqn
        self.use_crc = use_crc
        self.code = code
        self.data = data
        self.scb_type = scb_type
        self.scb_data = scb_data
        self.mac = mac
        self.raw = raw

    @property
    def signed(self) -> bytes:
        trailer = (2 if self.use_crc else 1) + (4 if self.mac is not None else 0)
        return self.raw[:-trailer]

    def __repr__(self) -> str:  # data may be a card number or key material: show only its size
        return (
            f"Frame(address={self.address}, reply={self.reply}, sqn={self.sqn}, code=0x{self.code:02x}, "
            f"data=<{len(self.data)} bytes>, scb_type={self.scb_type})"
        )


class FrameError:
    """Bytes the parser threw away, and why ("garbage", "crc", "checksum", "length", "header")."""

    __slots__ = ("data", "kind")

    def __init__(self, kind: str, data: bytes) -> None:
        self.kind = kind
        self.data = data

    def __repr__(self) -> str:
        return f"FrameError({self.kind!r}, <{len(self.data)} bytes>)"


MacFunction = Callable[[bytes], bytes]


def encode(
    address: int,
    sqn: int,
    code: int,
    data: bytes = b"",
    *,
    reply: bool = False,
    use_crc: bool = True,
    scb: bytes | None = None,
    mac: MacFunction | None = None,
) -> bytes:
    """Build one frame. `scb` is the whole security block (length byte first); `mac(signed) -> 4 bytes`
    is called with the frame up to the end of the data, its length field already final."""
    if not 0 <= address <= 0x7F:
        raise ValueError(f"OSDP address out of range 0..127: {address}")
    if not 0 <= sqn <= 3:
        raise ValueError(f"sequence number out of range 0..3: {sqn}")
    ctrl = sqn | (CTRL_CRC if use_crc else 0) | (CTRL_SCB if scb else 0)
    body = bytearray((SOM, address | (REPLY_BIT if reply else 0), 0, 0, ctrl))
    if scb:
        body += scb
    body.append(code)
    body += data
    total = len(body) + (4 if mac is not None else 0) + (2 if use_crc else 1)
    if total > MAX_FRAME:
        raise ValueError(f"frame too long: {total} bytes (max {MAX_FRAME})")
    body[2] = total & 0xFF
    body[3] = total >> 8
    if mac is not None:
        body += mac(bytes(body))
    if use_crc:
        crc = crc16(body)
        body.append(crc & 0xFF)
        body.append(crc >> 8)
    else:
        body.append(checksum8(body))
    return bytes(body)


def _split(raw: bytes) -> Frame | FrameError:
    """Split a frame whose length and check bytes are right into its fields."""
    ctrl = raw[4]
    use_crc = bool(ctrl & CTRL_CRC)
    end = len(raw) - (2 if use_crc else 1)
    pos = 5
    scb_type: int | None = None
    scb_data = b""
    if ctrl & CTRL_SCB:
        if pos + 2 > end:
            return FrameError("header", raw)
        scb_len = raw[pos]
        if scb_len < 2 or pos + scb_len > end:
            return FrameError("header", raw)
        scb_type = raw[pos + 1]
        scb_data = raw[pos + 2 : pos + scb_len]
        pos += scb_len
    mac: bytes | None = None
    if scb_type in MAC_SCB_TYPES:
        if end - 4 <= pos:
            return FrameError("header", raw)
        mac = raw[end - 4 : end]
        end -= 4
    if pos >= end:
        return FrameError("header", raw)
    addr = raw[1]
    return Frame(
        address=addr & 0x7F,
        reply=bool(addr & REPLY_BIT),
        sqn=ctrl & CTRL_SQN,
        use_crc=use_crc,
        code=raw[pos],
        data=raw[pos + 1 : end],
        scb_type=scb_type,
        scb_data=scb_data,
        mac=mac,
        raw=raw,
    )


def decode(raw: bytes) -> Frame | FrameError:
    """Decode exactly one whole frame (no trailing bytes)."""
    out = FrameParser().feed(raw)
    if len(out) == 1 and isinstance(out[0], Frame):
        return out[0]
    for item in out:
        if isinstance(item, FrameError):
            return item
    return FrameError("length", raw)


class FrameParser:
    """Turn a byte stream into frames. Never raises; keeps at most one partial frame between calls."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    @property
    def pending(self) -> int:
        """Bytes held back waiting for the rest of a frame."""
        return len(self._buf)

    def reset(self) -> None:
        self._buf.clear()

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame | FrameError]:
        buf = self._buf
        buf += data
        out: list[Frame | FrameError] = []
        while buf:
            if buf[0] != SOM:
                som = buf.find(SOM)
                cut = len(buf) if som < 0 else som
                out.append(FrameError("garbage", bytes(buf[:cut])))
                del buf[:cut]
                continue
            if len(buf) < 5:
                break
            length = buf[2] | (buf[3] << 8)
            if length < MIN_FRAME or length > MAX_FRAME or (buf[4] & CTRL_CRC and length < MIN_FRAME + 1):
                out.append(FrameError("length", bytes(buf[:1])))
                del buf[:1]
                continue
            if len(buf) < length:
                break
            raw = bytes(buf[:length])
            if raw[4] & CTRL_CRC:
                good = crc16(raw[:-2]) == (raw[-2] | (raw[-1] << 8))
                kind = "crc"
            else:
                good = checksum8(raw[:-1]) == raw[-1]
                kind = "checksum"
            if not good:
                # Resynchronise: the SOM may have been noise; look for the next one inside these bytes.
                out.append(FrameError(kind, bytes(buf[:1])))
                del buf[:1]
                continue
            del buf[:length]
            out.append(_split(raw))
        return out

    def discard(self) -> FrameError | None:
        """Throw away a partial frame (e.g. after the reply timeout): it was truncated."""
        if not self._buf:
            return None
        err = FrameError("truncated", bytes(self._buf))
        self._buf.clear()
        return err
