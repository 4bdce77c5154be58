"""PIN hashing: PBKDF2-HMAC-SHA256 with a random salt. A PIN is never stored or logged in clear.

The iteration count is bounded (`MIN_ITERATIONS` .. `MAX_ITERATIONS`, docs/model.md): a hash beyond it is
refused when the rights are validated and never computed, so no stored hash can stall a gateway. The
agent runs the check on a worker thread, off the event loop (edge/agent/tap.py).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

DEFAULT_ITERATIONS = 20_000
#: The bounds on a stored hash's iterations. 200,000 cost ~50 ms on a desktop core, ~0.3 s on a Pi 4.
MIN_ITERATIONS = 1_000
MAX_ITERATIONS = 200_000
_PREFIX = "pbkdf2_sha256"


def _b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).decode().rstrip("=")


def _unb64(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def check_pin_format(pin: str) -> None:
    if not (pin.isdigit() and pin.isascii() and 4 <= len(pin) <= 12):
        raise ValueError("a PIN is 4 to 12 decimal digits")


def hash_pin(pin: str, *, iterations: int = DEFAULT_ITERATIONS, salt: bytes | None = None) -> str:
    """`pbkdf2_sha256$<iterations>$<salt>$<digest>` for a PIN of 4-12 digits."""
    check_pin_format(pin)
    check_iterations(iterations)
    salt = salt if salt is not None else os.urandom(16)
    digest = hashlib.pbkdf2_hmac("sha256", pin.encode(), salt, iterations)
    return f"{_PREFIX}${iterations}${_b64(salt)}${_b64(digest)}"


def check_iterations(iterations: int) -> None:
    """Refuse an iteration count outside the documented bounds."""
    if not MIN_ITERATIONS <= iterations <= MAX_ITERATIONS:
        raise ValueError(
            f"PIN hash iterations must be {MIN_ITERATIONS:,} to {MAX_ITERATIONS:,}, got {iterations:,}"
        )


def valid_pin_hash(text: str) -> bool:
    """A well-formed hash whose iteration count is within the bounds (the store refuses any other)."""
    parts = text.split("$")
    if len(parts) != 4 or parts[0] != _PREFIX or not parts[1].isdigit() or len(parts[1]) > 9:
        return False
    try:
        check_iterations(int(parts[1]))
        return len(_unb64(parts[2])) >= 8 and len(_unb64(parts[3])) == 32
    except ValueError:
        return False


def verify_pin(pin: str, stored: str) -> bool:
    """Constant-time check of `pin` against a stored hash; a malformed hash never matches."""
    if not valid_pin_hash(stored):
        return False
    _, iterations, salt, digest = stored.split("$")
    got = hashlib.pbkdf2_hmac("sha256", pin.encode(), _unb64(salt), int(iterations))
    return hmac.compare_digest(got, _unb64(digest))
