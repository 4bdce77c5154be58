"""Card formats: the bit layouts of Wiegand (and OSDP raw) card data, pure functions only.

A frame is an unsigned integer `bits` with a length `nbits`; the **first bit on the wire is the most
significant bit** of `bits`. Bit *positions* below are 0-based from that first bit (HID documents count
from 1: HID "bit 2" is position 1 here).

Every format is a `FormatSpec`: a length, an optional facility (company/site code) field, a card-number
field and an ordered list of parity checks. The built-in formats are specs too, so a format declared in
the configuration goes through exactly the same encoder and decoder.

What a decoded read holds (and so what `CardRead` holds):

* `card`: the format's *card number* field, as printed on the card (for H10301 FC 123 / card 4567 it is
  4567). For the raw card-serial-number formats (`csn32`, `csn56`) it is the whole frame value.
* `facility`: the facility / company ID field, or None for formats without one (H10302, CSNs).

Integrity: parity formats reject any single flipped bit; two flips inside one parity group pass, as with
every Wiegand controller. The CSN formats have **no parity at all**: only their length is checked, and a
corrupted CSN read decodes to a wrong number (the decision then finds no such card).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from edge.errors import ConfigError, EdgeError

#: Longest frame any format may declare (the card field itself is at most 64 bits).
MAX_FORMAT_BITS = 128


class FormatError(EdgeError):
    """A frame that is not a valid read of any accepted format, or a value a format cannot carry.

    `kind` is "length" (no accepted format has this many bits), "parity" (a parity check failed) or
    "range" (encode: a field does not fit). Returned (not raised) by `decode`; raised by `encode`.
    """

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail

    def __repr__(self) -> str:
        return f"FormatError({self.kind!r}, {self.detail!r})"


class BitRange(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`length` bits from position `start` (0-based from the first bit on the wire), MSB first."""

    start: Annotated[int, Meta(ge=0, lt=MAX_FORMAT_BITS)]
    length: Annotated[int, Meta(ge=1, le=64)]


class ParityCheck(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The bit at `position` makes the number of ones over `mask` plus itself even or odd.

    `mask` names the covered positions: either a string of `length` characters, "1" for a covered
    position and "0" or "." for the others (first character = position 0), or an integer over the frame
    value (bit `nbits - 1 - p` for position p). The mask may include `position` itself (HID Corporate
    1000's "odd parity over all bits") or earlier parity bits: checks are computed in list order.
    """

    position: Annotated[int, Meta(ge=0, lt=MAX_FORMAT_BITS)]
    parity: Literal["even", "odd"]
    mask: int | str


class FormatSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A card format, built in or declared in the configuration (see `CardFormat` for the checks)."""

    name: Annotated[str, Meta(min_length=1, max_length=32, pattern=r"^[a-z0-9_\-]+$")]
    length: Annotated[int, Meta(ge=1, le=MAX_FORMAT_BITS)]
    card: BitRange
    facility: BitRange | None = None
    parity: list[ParityCheck] = []


class Decoded(msgspec.Struct, frozen=True, kw_only=True):
    format: str
    nbits: int
    card: int
    facility: int | None
    raw: int


def _ones(value: int) -> int:
    return value.bit_count()


class CardFormat:
    """A validated, compiled `FormatSpec`: masks and shifts precomputed for the hot path."""

    __slots__ = ("_checks", "_data_mask", "card_len", "card_shift", "fac_len", "fac_shift", "length",
                 "name", "spec")

    def __init__(self, spec: FormatSpec) -> None:
        n = spec.length
        where = f"card format {spec.name!r}"

        def field_mask(r: BitRange, what: str) -> int:
            if r.start + r.length > n:
                raise ConfigError(f"{where}: {what} bits {r.start}..{r.start + r.length - 1} "
                                  f"do not fit in {n} bits")
            return ((1 << r.length) - 1) << (n - r.start - r.length)

        card_mask = field_mask(spec.card, "card")
        fac_mask = field_mask(spec.facility, "facility") if spec.facility is not None else 0
        if card_mask & fac_mask:
            raise ConfigError(f"{where}: the card and facility fields overlap")
        data = card_mask | fac_mask
        checks: list[tuple[int, int, int]] = []  # (position bit, covered mask incl. itself, want odd)
        seen = 0
        for i, chk in enumerate(spec.parity):
            if chk.position >= n:
                raise ConfigError(f"{where}: parity[{i}] position {chk.position} is outside {n} bits")
            pbit = 1 << (n - 1 - chk.position)
            if pbit & data:
                raise ConfigError(f"{where}: parity[{i}] position {chk.position} lies in a data field")
            if pbit & seen:
                raise ConfigError(f"{where}: two parity checks share position {chk.position}")
            seen |= pbit
            mask = _parse_mask(chk.mask, n, f"{where}: parity[{i}].mask")
            if not mask & ~pbit:
                raise ConfigError(f"{where}: parity[{i}] covers no bit but its own")
            checks.append((pbit, mask | pbit, 1 if chk.parity == "odd" else 0))
        self.spec = spec
        self.name = spec.name
        self.length = n
        self.card_shift = n - spec.card.start - spec.card.length
        self.card_len = spec.card.length
        self.fac_shift = n - spec.facility.start - spec.facility.length if spec.facility else 0
        self.fac_len = spec.facility.length if spec.facility else 0
        self._data_mask = data
        self._checks = tuple(checks)

    @property
    def has_parity(self) -> bool:
        return bool(self._checks)

    @property
    def has_facility(self) -> bool:
        return self.fac_len > 0

    def __repr__(self) -> str:
        return f"CardFormat({self.name!r}, {self.length} bits)"

    def encode(self, facility: int | None, card: int) -> int:
        """The frame (MSB = first bit) for this facility and card number, parity bits set."""
        if not 0 <= card < (1 << self.card_len):
            raise FormatError("range", f"{self.name}: card number {card} does not fit in {self.card_len} bits")
        value = card << self.card_shift
        if self.fac_len:
            fac = 0 if facility is None else facility
            if not 0 <= fac < (1 << self.fac_len):
                raise FormatError("range", f"{self.name}: facility {fac} does not fit in {self.fac_len} bits")
            value |= fac << self.fac_shift
        elif facility not in (None, 0):
            raise FormatError("range", f"{self.name} has no facility field (got {facility})")
        for pbit, covered, odd in self._checks:
            if _ones(value & covered & ~pbit) & 1 != odd:
                value |= pbit
        return value

    def decode(self, bits: int, nbits: int) -> Decoded | FormatError:
        """Check the length and every parity bit, then extract the fields."""
        if nbits != self.length or bits >> nbits:
            return FormatError("length", f"{self.name} needs {self.length} bits, got {nbits}")
        for i, (_pbit, covered, odd) in enumerate(self._checks):
            if _ones(bits & covered) & 1 != odd:
                return FormatError("parity", f"{self.name}: parity check {i} failed")
        card = (bits >> self.card_shift) & ((1 << self.card_len) - 1)
        fac = (bits >> self.fac_shift) & ((1 << self.fac_len) - 1) if self.fac_len else None
        return Decoded(format=self.name, nbits=nbits, card=card, facility=fac, raw=bits)


def _parse_mask(mask: int | str, n: int, where: str) -> int:
    if isinstance(mask, int):
        if mask <= 0 or mask >> n:
            raise ConfigError(f"{where}: integer mask must be a non-zero value of at most {n} bits")
        return mask
    if len(mask) != n or set(mask) - {"0", "1", "."}:
        raise ConfigError(f"{where}: string mask must be {n} characters of '1', '0' or '.'")
    return int(mask.replace(".", "0"), 2)


def positions_mask(nbits: int, positions: Iterable[int]) -> int:
    """An integer mask over an `nbits` frame covering the given 0-based positions."""
    m = 0
    for p in positions:
        if not 0 <= p < nbits:
            raise ValueError(f"position {p} outside {nbits} bits")
        m |= 1 << (nbits - 1 - p)
    return m


def _span(nbits: int, first: int, last: int) -> int:
    return positions_mask(nbits, range(first, last + 1))


def _two_halves(name: str, n: int, *, card: BitRange, facility: BitRange | None, even_last: int,
                odd_first: int) -> FormatSpec:
    """Leading even parity over positions 1..even_last, trailing odd parity over odd_first..n-2."""
    return FormatSpec(
        name=name, length=n, card=card, facility=facility,
        parity=[
            ParityCheck(position=0, parity="even", mask=_span(n, 1, even_last)),
            ParityCheck(position=n - 1, parity="odd", mask=_span(n, odd_first, n - 2)),
        ],
    )


def _two_of_three(n: int, first: int) -> int:
    """Positions first, first+1, first+3, first+4, ... up to n-2: two of every three (0-based)."""
    return positions_mask(n, (p for p in range(first, n - 1) if (p - first) % 3 != 2))


def _corporate_1000(name: str, n: int, company_bits: int, card_bits: int, *, even_first: int,
                    odd_first: int) -> FormatSpec:
    """HID Corporate 1000: three parity bits, checked in this order (0-based positions):

    position 1 = even parity over two of every three positions from `even_first` (up to n-2);
    position n-1 = odd parity over two of every three positions from `odd_first` (up to n-2);
    position 0 = odd parity over all n bits (computed last, so it covers the other two parity bits).
    Company ID code from position 2, card number right after it, ending at position n-2.

    The two lengths do not share one phase: the published layout (proxmark3 `client/src/wiegand_formats.c`,
    Pack_C1k35s / Pack_C1k48s, whose masks 0xB6DB6DB6 / 0x6DB6DB6C over the low word continue into the high
    word differently for 35 and 48 bits) starts the groups at 2 and 1 for 35 bits (HID bits 3,4,6,7,... and
    2,3,5,6,...) but at 3 and 2 for 48 bits (HID bits 4,5,7,8,... and 3,4,6,7,...).
    """
    return FormatSpec(
        name=name, length=n,
        facility=BitRange(start=2, length=company_bits),
        card=BitRange(start=2 + company_bits, length=card_bits),
        parity=[
            ParityCheck(position=1, parity="even", mask=_two_of_three(n, even_first)),
            ParityCheck(position=n - 1, parity="odd", mask=_two_of_three(n, odd_first)),
            ParityCheck(position=0, parity="odd", mask=(1 << n) - 1),
        ],
    )


#: The built-in formats, by name.
BUILTIN_SPECS: dict[str, FormatSpec] = {
    s.name: s
    for s in (
        # H10301 (26 bit): P even over bits 2-13, FC bits 2-9 (8), card bits 10-25 (16), P odd over 14-25.
        _two_halves("h10301", 26, card=BitRange(start=9, length=16), facility=BitRange(start=1, length=8),
                    even_last=12, odd_first=13),
        # H10302 (37 bit, no facility): P even over bits 2-19, card bits 2-36 (35), P odd over 19-36.
        _two_halves("h10302", 37, card=BitRange(start=1, length=35), facility=None,
                    even_last=18, odd_first=18),
        # H10304 (37 bit): P even over 2-19, FC bits 2-17 (16), card bits 18-36 (19), P odd over 19-36.
        _two_halves("h10304", 37, card=BitRange(start=17, length=19), facility=BitRange(start=1, length=16),
                    even_last=18, odd_first=18),
        # H10306-style 34 bit: P even over 2-17, FC bits 2-17 (16), card bits 18-33 (16), P odd over 18-33.
        _two_halves("h10306", 34, card=BitRange(start=17, length=16), facility=BitRange(start=1, length=16),
                    even_last=16, odd_first=17),
        # Corporate 1000 35 bit: company ID bits 3-14 (12), card bits 15-34 (20).
        _corporate_1000("corp1000_35", 35, 12, 20, even_first=2, odd_first=1),
        # Corporate 1000 48 bit: company ID bits 3-24 (22), card bits 25-47 (23).
        _corporate_1000("corp1000_48", 48, 22, 23, even_first=3, odd_first=2),
        # Raw card serial numbers: no parity, no facility; only the length is checked.
        FormatSpec(name="csn32", length=32, card=BitRange(start=0, length=32)),
        FormatSpec(name="csn56", length=56, card=BitRange(start=0, length=56)),
    )
}

BUILTIN: dict[str, CardFormat] = {name: CardFormat(spec) for name, spec in BUILTIN_SPECS.items()}


class FormatTable(Mapping[int, CardFormat]):
    """The formats one reader accepts, keyed by length. Two accepted formats of one length (H10302 and
    H10304 are both 37 bits) make the reader's configuration ambiguous: that is a `ConfigError`."""

    def __init__(self, formats: Iterable[CardFormat | str], extra: Iterable[FormatSpec] = ()) -> None:
        known: dict[str, CardFormat] = dict(BUILTIN)
        for spec in extra:
            if spec.name in known:
                raise ConfigError(f"card format {spec.name!r} is already defined")
            known[spec.name] = CardFormat(spec)
        by_len: dict[int, CardFormat] = {}
        for item in formats:
            if isinstance(item, str):
                if item not in known:
                    raise ConfigError(f"unknown card format {item!r} (known: {', '.join(sorted(known))})")
                f = known[item]
            else:
                f = item
            other = by_len.get(f.length)
            if other is not None and other.name != f.name:
                raise ConfigError(
                    f"card formats {other.name!r} and {f.name!r} are both {f.length} bits: "
                    "a reader may accept only one of them"
                )
            by_len[f.length] = f
        if not by_len:
            raise ConfigError("a reader must accept at least one card format")
        self._by_len = by_len

    def __getitem__(self, nbits: int) -> CardFormat:
        return self._by_len[nbits]

    def __iter__(self) -> Iterator[int]:
        return iter(self._by_len)

    def __len__(self) -> int:
        return len(self._by_len)

    @property
    def names(self) -> list[str]:
        return [f.name for f in self._by_len.values()]

    def __repr__(self) -> str:
        return f"FormatTable({self.names!r})"


def lookup(name: str, extra: Iterable[FormatSpec] = ()) -> CardFormat:
    """A built-in format, or one of `extra`, by name."""
    for spec in extra:
        if spec.name == name:
            return CardFormat(spec)
    try:
        return BUILTIN[name]
    except KeyError:
        raise ConfigError(f"unknown card format {name!r}") from None


def encode(fmt: CardFormat | str, facility: int | None, card: int) -> int:
    """The frame of `card` (and `facility`) in `fmt`; its length is `fmt.length`. Raises FormatError."""
    f = BUILTIN[fmt] if isinstance(fmt, str) else fmt
    return f.encode(facility, card)


def decode(bits: int, nbits: int, allowed: FormatTable | Iterable[CardFormat | str]) -> Decoded | FormatError:
    """Decode one frame against the formats a reader accepts. Never raises for bad input."""
    table = allowed if isinstance(allowed, FormatTable) else FormatTable(allowed)
    fmt = table.get(nbits)
    if fmt is None:
        return FormatError("length", f"no accepted format has {nbits} bits (accepted: {table.names})")
    return fmt.decode(bits, nbits)
