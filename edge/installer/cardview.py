"""What a read looked like on the wire, for the installer's "present a card" view (pure).

A `CardRead` carries the card number, facility, format and bit count; its frame is the format's encoding of
those (a format's parity bits are fixed by its data bits, so the re-encoded frame is the frame the reader
sent). `explain` then decodes that frame against every known format of its length: which formats match,
what card and facility each reads, and each parity check's result, so an installer sees at once why a card
of a "wrong" format is refused or reads as another number. A refused frame (`ReaderFault.bits`: a parity
error, an unknown length) is explained the same way from the bits the reader sent (`frame_of_fault`).
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

from edge.readers.events import FAULT_BITS_MAX, CardRead, ReaderFault
from edge.readers.formats import BUILTIN, CardFormat, Decoded, FormatError, FormatTable, encode


class ParityResult(msgspec.Struct, frozen=True, kw_only=True):
    position: int
    parity: str
    ok: bool


class FormatMatch(msgspec.Struct, frozen=True, kw_only=True):
    format: str
    #: The reader accepts this format (it is in its configured list).
    accepted: bool
    ok: bool
    card: int | None
    facility: int | None
    parity: list[ParityResult]
    error: str | None = None


class FrameView(msgspec.Struct, frozen=True, kw_only=True):
    nbits: int
    #: The bits as sent, first bit first ("0"/"1").
    bits: str
    matches: list[FormatMatch]


def frame_of(read: CardRead, accepted: FormatTable) -> tuple[int, int] | None:
    """(bits, nbits) of a card read: its format's encoding of its fields (None if the format is unknown)."""
    fmt = accepted.get(read.bits)
    if fmt is None or fmt.name != read.format:
        fmt = BUILTIN.get(read.format)
    if fmt is None or fmt.length != read.bits:
        return None
    try:
        return encode(fmt, read.facility if fmt.has_facility else None, read.card), read.bits
    except FormatError:
        return None


def frame_of_fault(fault: ReaderFault) -> tuple[int, int] | None:
    """(bits, nbits) of the frame a fault refused, None if it carries none (or only the head of a longer one)."""
    raw = fault.bits
    if not raw or len(raw) >= FAULT_BITS_MAX or raw.strip("01"):
        return None
    return int(raw, 2), len(raw)


def _parity(fmt: CardFormat, bits: int, nbits: int) -> list[ParityResult]:
    out = []
    for chk in fmt.spec.parity:
        one = CardFormat(msgspec.structs.replace(fmt.spec, parity=[chk]))
        res = one.decode(bits, nbits)
        out.append(ParityResult(position=chk.position, parity=chk.parity, ok=isinstance(res, Decoded)))
    return out


def explain(bits: int, nbits: int, accepted: FormatTable, extra: Iterable[CardFormat] = ()) -> FrameView:
    """Decode one frame against every known format of its length (built in, configured, `extra`)."""
    candidates: dict[str, CardFormat] = {f.name: f for f in BUILTIN.values() if f.length == nbits}
    for f in [*accepted.values(), *extra]:
        if f.length == nbits:
            candidates[f.name] = f
    accepted_names = set(accepted.names)
    matches = []
    for name in sorted(candidates, key=lambda n: (n not in accepted_names, n)):
        f = candidates[name]
        res = f.decode(bits, nbits)
        if isinstance(res, Decoded):
            matches.append(FormatMatch(format=name, accepted=name in accepted_names, ok=True, card=res.card,
                                       facility=res.facility, parity=_parity(f, bits, nbits)))  # fmt: skip
        else:
            matches.append(FormatMatch(format=name, accepted=name in accepted_names, ok=False, card=None,
                                       facility=None, parity=_parity(f, bits, nbits), error=res.detail))  # fmt: skip
    return FrameView(nbits=nbits, bits=format(bits, f"0{nbits}b") if nbits else "", matches=matches)


__all__ = ["FormatMatch", "FrameView", "ParityResult", "explain", "frame_of", "frame_of_fault"]
