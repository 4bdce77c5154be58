"""Wiegand keypads: key bursts and the PIN-entry state machine (pure, no clock of its own).

Keys are ints: 0-9 are digits, `KEY_CLEAR` (10, "*") clears the entry, `KEY_ENTER` (11, "#") submits it.

* 4-bit bursts carry one key per frame, MSB first.
* 8-bit bursts carry the key nibble and its one's complement. Vendors differ in which nibble comes first,
  and the order can **not** be guessed per byte: key 5 sent key-first is 0x5A, which read complement-first
  is key 10 ("*"); key 4 key-first (0x4B) would read as "#". So each reader's configuration names the
  order (`"key_high"`: key in the first/high nibble, `"key_low"`: key in the second/low nibble); both are
  supported and the complement is always checked.

Nothing here logs, and no key value or PIN digit ever goes into an error message.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from edge.readers.events import KeyPressed, PinEntry, ReaderFault

KEY_CLEAR = 10
KEY_ENTER = 11
KeyOrder = Literal["key_high", "key_low"]
#: How a key is shown outside the PIN pad (`KeyPressed.key`): a digit is only ever "digit".
_MASKED = {KEY_CLEAR: "*", KEY_ENTER: "#"}


def decode_key4(bits: int) -> int | None:
    """The key of a 4-bit burst, or None for the unused codes 12-15."""
    return bits if 0 <= bits <= KEY_ENTER else None


def decode_key8(bits: int, order: KeyOrder) -> int | None:
    """The key of an 8-bit burst in the given nibble order, or None if the complement check fails."""
    if not 0 <= bits <= 0xFF:
        return None
    hi, lo = bits >> 4, bits & 0xF
    if hi ^ lo != 0xF:
        return None
    key = hi if order == "key_high" else lo
    return key if key <= KEY_ENTER else None


def encode_key4(key: int) -> int:
    if not 0 <= key <= KEY_ENTER:
        raise ValueError("key must be 0..11")
    return key


def encode_key8(key: int, order: KeyOrder) -> int:
    if not 0 <= key <= KEY_ENTER:
        raise ValueError("key must be 0..11")
    comp = key ^ 0xF
    return (key << 4 | comp) if order == "key_high" else (comp << 4 | key)


class PinPad:
    """Accumulates digits into a PIN: "*" clears, "#" submits a `PinEntry`, a pause longer than
    `timeout_s` between keys discards what was typed. Times are the caller's (the key's timestamp).

    `key()` and `expire()` return at most one event; a discarded entry gives a `ReaderFault` of kind
    "pin_timeout" or "pin_overflow" that says how many digits were lost, never which.

    `on_key`, if set, is told of every key fed as a masked `KeyPressed` (a digit as "digit") before the key
    acts; it must not raise (the installer's feed only appends). It changes nothing the pad returns.
    """

    def __init__(self, reader: str, *, timeout_s: float = 10.0, max_digits: int = 12) -> None:
        if timeout_s <= 0 or max_digits < 1:
            raise ValueError("timeout_s must be > 0 and max_digits >= 1")
        self.reader = reader
        self.timeout_s = timeout_s
        self.max_digits = max_digits
        self._digits: list[str] = []
        self._last: float | None = None
        self.on_key: Callable[[KeyPressed], None] | None = None

    def __repr__(self) -> str:
        return f"PinPad(reader={self.reader!r}, pending=<{len(self._digits)} digits>)"

    @property
    def pending(self) -> int:
        """How many digits are typed and not yet submitted."""
        return len(self._digits)

    @property
    def deadline(self) -> float | None:
        """When the pending entry times out (None when nothing is pending)."""
        if not self._digits or self._last is None:
            return None
        return self._last + self.timeout_s

    def clear(self) -> None:
        self._digits.clear()
        self._last = None

    def expire(self, now: float) -> ReaderFault | None:
        """Discard a pending entry whose last key is more than `timeout_s` before `now`."""
        if self._digits and self._last is not None and now - self._last > self.timeout_s:
            n = len(self._digits)
            self.clear()
            return ReaderFault(reader=self.reader, kind="pin_timeout",
                               detail=f"{n} digits discarded after {self.timeout_s:g} s", at=now)
        return None

    def key(self, key: int, at: float) -> PinEntry | ReaderFault | None:
        """Feed one key pressed at `at`. Returns a `PinEntry` on "#" with digits pending."""
        if self.on_key is not None and 0 <= key <= KEY_ENTER:
            self.on_key(KeyPressed(reader=self.reader, key=_MASKED.get(key, "digit"), at=at))
        stale = self.expire(at)
        if key == KEY_CLEAR:
            self.clear()
            return stale
        if key == KEY_ENTER:
            if not self._digits:
                return stale
            pin = "".join(self._digits)
            self.clear()
            return PinEntry(reader=self.reader, pin=pin, at=at)
        if not 0 <= key <= 9:
            raise ValueError("key must be 0..11")
        if len(self._digits) >= self.max_digits:
            n = len(self._digits)
            self.clear()
            return ReaderFault(reader=self.reader, kind="pin_overflow",
                               detail=f"more than {n} digits typed; entry discarded", at=at)
        self._digits.append(chr(48 + key))
        self._last = at
        return stale
