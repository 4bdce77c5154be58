"""OSDP frame codec, reply decoders and the parser: golden vectors, resync, and hypothesis fuzzing."""

from __future__ import annotations

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from edge.readers import formats
from edge.readers.base import CardRead, ReaderEvent
from edge.readers.osdp import commands as c
from edge.readers.osdp.frame import (
    Frame,
    FrameError,
    FrameParser,
    checksum8,
    crc16,
    decode,
    encode,
)
from edge.readers.osdp.panel import PdConfig, PdSession, Phase

# --- golden vectors --------------------------------------------------------------------------------


def test_crc16_is_aug_ccitt() -> None:
    # CRC-16/AUG-CCITT (poly 0x1021, init 0x1D0F): the standard check value over "123456789".
    assert crc16(b"123456789") == 0xE5CC
    assert crc16(b"") == 0x1D0F


def test_id_on_the_wire_matches_libosdp_control_panel() -> None:
    # libosdp's own ControlPanel writes exactly these bytes (after its 0xFF mark byte) for ID to PD 0.
    assert encode(0, 0, c.Cmd.ID, b"\x00") == bytes.fromhex("53 00 09 00 04 61 00 c0 66")


def test_poll_on_the_wire() -> None:
    assert encode(0, 0, c.Cmd.POLL) == bytes.fromhex("53 00 08 00 04 60 eb aa")
    assert encode(1, 3, c.Cmd.POLL) == bytes.fromhex("53 01 08 00 07 60") + crc16(
        bytes.fromhex("53 01 08 00 07 60")
    ).to_bytes(2, "little")
    # checksum mode: one byte, two's complement of the sum
    assert encode(0, 0, c.Cmd.POLL, use_crc=False) == bytes.fromhex("53 00 07 00 00 60 46")
    assert checksum8(bytes.fromhex("53 00 07 00 00 60")) == 0x46


def test_pdid_reply_from_libosdp_decodes() -> None:
    # captured from the libosdp peer: PdId(version 2, model 7, vendor 0xA1B2, serial 0x12345679, fw 1.2.3)
    raw = bytes.fromhex("53 81 14 00 04 45 b2 a1 00 07 02 79 56 34 12 01 02 03 c2 2b")
    f = decode(raw)
    assert isinstance(f, Frame)
    assert (f.address, f.reply, f.sqn, f.code) == (1, True, 0, c.Rep.PDID)
    assert c.decode_reply(f.code, f.data) == c.PdId(
        vendor=0xA1B2, model=7, version=2, serial=0x12345679, firmware=(1, 2, 3)
    )


def test_encode_decode_round_trip_with_security_block_and_mac() -> None:
    raw = encode(5, 2, c.Cmd.LED, b"\x01" * 14, scb=b"\x02\x17", mac=lambda signed: b"\xaa\xbb\xcc\xdd")
    f = decode(raw)
    assert isinstance(f, Frame)
    assert f.scb_type == 0x17 and f.mac == b"\xaa\xbb\xcc\xdd" and f.data == b"\x01" * 14
    assert f.signed == raw[:-6]


def test_encode_refuses_bad_arguments() -> None:
    for bad in ({"address": 128, "sqn": 0}, {"address": 1, "sqn": 4}):
        try:
            encode(bad["address"], bad["sqn"], c.Cmd.POLL)
        except ValueError:
            continue
        raise AssertionError(f"accepted {bad}")


# --- parser -----------------------------------------------------------------------------------------


def test_parser_resynchronises_after_garbage_and_a_bad_crc() -> None:
    good = encode(1, 1, c.Rep.ACK, reply=True)
    bad = bytearray(encode(1, 2, c.Rep.ACK, reply=True))
    bad[-1] ^= 0xFF
    p = FrameParser()
    out = p.feed(b"\xff\x00\x53" + bytes(bad) + good)
    frames = [x for x in out if isinstance(x, Frame)]
    errors = [x for x in out if isinstance(x, FrameError)]
    assert len(frames) == 1 and frames[0].sqn == 1
    assert any(e.kind == "crc" for e in errors)
    assert p.pending == 0


def test_parser_handles_byte_by_byte_and_truncation() -> None:
    raw = encode(2, 1, c.Rep.ACK, reply=True)
    p = FrameParser()
    got: list[Frame | FrameError] = []
    for b in raw[:-1]:
        got += p.feed(bytes((b,)))
    assert got == [] and p.pending == len(raw) - 1
    err = p.discard()
    assert err is not None and err.kind == "truncated"
    assert [type(x) for x in p.feed(raw)] == [Frame]


def test_parser_rejects_impossible_lengths() -> None:
    p = FrameParser()
    out = p.feed(bytes.fromhex("53 01 02 00 04 60 00 00"))  # length 2 < minimum
    assert not any(isinstance(x, Frame) for x in out)
    out = p.feed(bytes.fromhex("53 01 ff ff 04"))  # 65535 > max
    assert not any(isinstance(x, Frame) for x in out)


# --- reply decoders ---------------------------------------------------------------------------------


def test_raw_card_decoder_is_strict() -> None:
    bits = formats.encode("h10301", 12, 3456)
    data = bytes((0, 1, 26, 0)) + (bits << 6).to_bytes(4, "big")
    assert c.decode_reply(c.Rep.RAW, data) == c.RawCard(reader=0, format=1, bits=26, value=bits)
    assert isinstance(c.decode_reply(c.Rep.RAW, data[:-1]), c.Malformed)  # too few bytes for 26 bits
    assert isinstance(c.decode_reply(c.Rep.RAW, data + b"\x00"), c.Malformed)
    assert isinstance(c.decode_reply(c.Rep.RAW, bytes((0, 1, 0, 0, 0))), c.Malformed)


def test_other_reply_decoders() -> None:
    assert c.decode_reply(c.Rep.ACK, b"") == c.Ack()
    assert c.decode_reply(c.Rep.NAK, b"\x04") == c.NakReply(4, b"")
    assert c.decode_reply(c.Rep.LSTATR, b"\x01\x00") == c.LocalStatus(tamper=True, power_failure=False)
    assert c.decode_reply(c.Rep.ISTATR, b"\x00\x01") == c.IoStatus("input", (0, 1))
    assert c.decode_reply(c.Rep.OSTATR, b"\x01") == c.IoStatus("output", (1,))
    assert c.decode_reply(c.Rep.RSTATR, b"\x00") == c.IoStatus("reader", (0,))
    assert c.decode_reply(c.Rep.KEYPAD, b"\x00\x03\x31\x32\x0d") == c.Keypad(reader=0, keys="12#")
    assert c.decode_reply(c.Rep.FMT, b"\x00\x00\x04" + b"1234") == c.FmtCard(0, 0, "1234")
    assert c.decode_reply(c.Rep.PDCAP, b"\x09\x01\x01\x04\x01\x01").has(c.Cap.COMM_SECURITY)  # type: ignore[union-attr]
    assert c.decode_reply(c.Rep.BUSY, b"") == c.Busy()
    assert c.decode_reply(c.Rep.COM, b"\x05\x00\x96\x00\x00") == c.Com(5, 38400)
    assert isinstance(c.decode_reply(c.Rep.CCRYPT, b"\x00" * 31), c.Malformed)
    assert isinstance(c.decode_reply(0x99, b"x"), c.Unknown)
    # osdp_MFGREP: a 3-byte vendor code (OUI, least significant byte first), then the vendor's bytes
    assert c.decode_reply(c.Rep.MFGREP, b"\x5c\x26\x0a\x01\x02") == c.MfgReply(vendor=0x0A265C, data=b"\x01\x02")
    assert isinstance(c.decode_reply(c.Rep.MFGREP, b"\x5c\x26"), c.Malformed)
    # osdp_FTSTAT as libosdp's PD builds it (src/osdp_file.c: control u8, delay u16, status s16, rx_size u16)
    assert c.decode_reply(c.Rep.FTSTAT, bytes.fromhex("01000001000000")) == c.FileStatus(1, 0, 1, 0)
    assert c.decode_reply(c.Rep.FTSTAT, bytes.fromhex("01e803fdff0001")) == c.FileStatus(1, 1000, -3, 256)
    assert isinstance(c.decode_reply(c.Rep.FTSTAT, b"\x01"), c.Malformed)


def test_multipart_reassembly() -> None:
    mp = c.MultiPart()
    whole = bytes(range(10))
    assert mp.add(bytes((10, 0, 0, 0, 4, 0)) + whole[:4]) is None
    assert mp.add(bytes((10, 0, 4, 0, 6, 0)) + whole[4:]) == whole
    assert isinstance(mp.add(bytes((10, 0, 4, 0, 6, 0)) + whole[4:]), c.Malformed)  # no first part


def test_command_encoders() -> None:
    led = c.LedCommand(temp_control=2, temp_on=5, temp_on_color=c.LedColor.GREEN, temp_timer=300).encode()
    assert len(led) == 14 and led[7:9] == (300).to_bytes(2, "little")
    assert c.BuzzerCommand(tone=2, on=1, off=1, count=3).encode() == bytes((0, 2, 1, 1, 3))
    assert c.TextCommand(text="HI").encode() == bytes((0, 3, 3, 1, 1, 2)) + b"HI"
    assert c.OutputCommand(output=1, control=5, timer=50).encode() == bytes((1, 5, 50, 0))
    assert c.encode_comset(3, 9600) == bytes((3,)) + (9600).to_bytes(4, "little")
    assert c.encode_keyset(bytes(16))[:2] == b"\x01\x10"


# --- fuzzing ----------------------------------------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=80), max_size=8))
def test_fuzz_parser_never_raises(chunks: list[bytes]) -> None:
    p = FrameParser()
    for chunk in chunks:
        for item in p.feed(chunk):
            assert isinstance(item, (Frame, FrameError))
    p.discard()


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(c.DECODERS)), st.binary(max_size=64))
def test_fuzz_every_reply_decoder_never_raises(code: int, data: bytes) -> None:
    reply = c.decode_reply(code, data)
    assert reply is not None


def _online_session(events: list[ReaderEvent]) -> PdSession:
    s = PdSession("r", PdConfig(address=1, secure=False), events.append)
    s.phase = Phase.ONLINE
    s.online = True
    return s


_CARD_BITS = formats.encode("h10301", 12, 3456)
_RAW_DATA = bytes((0, 1, 26, 0)) + (_CARD_BITS << 6).to_bytes(4, "big")


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.integers(min_value=0, max_value=40),
    st.integers(min_value=1, max_value=255),
    st.sampled_from(["flip", "truncate", "insert"]),
)
def test_fuzz_no_card_from_a_corrupt_frame(pos: int, value: int, how: str) -> None:
    good = encode(1, 1, c.Rep.RAW, _RAW_DATA, reply=True)
    raw = bytearray(good)
    pos %= len(raw)
    if how == "flip":
        raw[pos] ^= value
    elif how == "truncate":
        raw = raw[:pos]
    else:  # inside the frame (a byte before SOM is line noise, and the frame after it is good)
        pos = max(pos, 1)
        raw[pos:pos] = bytes((value,))
    # An inserted start-of-message byte right before the frame makes the first byte line noise, with the
    # whole frame intact after it: the parser resynchronising on it and reading the card is right.
    assume(bytes(good) not in bytes(raw))
    events: list[ReaderEvent] = []
    s = _online_session(events)
    s.sqn = 1
    s.build(0.0)  # a POLL in flight with sqn 1
    p = FrameParser()
    for item in p.feed(bytes(raw)):
        if isinstance(item, Frame) and item.reply and item.address == 1:
            s.accept(item, 0.0)
    cards = [e for e in events if isinstance(e, CardRead)]
    assert cards == [], f"card from corrupt frame {bytes(raw).hex()}"


def test_the_uncorrupted_raw_frame_does_give_the_card() -> None:
    events: list[ReaderEvent] = []
    s = _online_session(events)
    s.sqn = 1
    s.build(0.0)
    for item in FrameParser().feed(encode(1, 1, c.Rep.RAW, _RAW_DATA, reply=True)):
        assert isinstance(item, Frame)
        assert s.accept(item, 0.0)
    assert [e for e in events if isinstance(e, CardRead)] == [
        CardRead(reader="r", card=3456, format="h10301", bits=26, facility=12, at=events[0].at)  # type: ignore[union-attr]
    ]
