"""PIN hashing: verify, wrong PINs, malformed hashes never verify, random salts, no PIN in clear."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.errors import ChangeRejected
from edge.model import ChangeSet, PutUser, User
from edge.pin import MAX_ITERATIONS, check_pin_format, hash_pin, valid_pin_hash, verify_pin
from edge.store import Store

IT = 1000


def test_hash_and_verify() -> None:
    h = hash_pin("1234", iterations=IT)
    assert h.startswith("pbkdf2_sha256$1000$")
    assert valid_pin_hash(h)
    assert verify_pin("1234", h)


@pytest.mark.parametrize("wrong", ["1235", "12345", "0000", "4321", "01234", " 1234", "1234 ", ""])
def test_wrong_pin_does_not_verify(wrong: str) -> None:
    assert not verify_pin(wrong, hash_pin("1234", iterations=IT))


def test_leading_zeros_count() -> None:
    h = hash_pin("0012", iterations=IT)
    assert verify_pin("0012", h) and not verify_pin("012", h) and not verify_pin("12", h)


def test_two_hashes_of_the_same_pin_differ() -> None:
    a, b = hash_pin("2468", iterations=IT), hash_pin("2468", iterations=IT)
    assert a != b
    assert a.split("$")[2] != b.split("$")[2]  # the salt
    assert verify_pin("2468", a) and verify_pin("2468", b)


def test_fixed_salt_is_deterministic() -> None:
    salt = b"0123456789abcdef"
    assert hash_pin("2468", iterations=IT, salt=salt) == hash_pin("2468", iterations=IT, salt=salt)
    assert hash_pin("2468", iterations=IT, salt=salt) != hash_pin("2469", iterations=IT, salt=salt)


@pytest.mark.parametrize("pin", ["123", "1234567890123", "12a4", "", "١٢٣٤", "12 34", "-123"])
def test_bad_pin_formats_are_refused(pin: str) -> None:
    with pytest.raises(ValueError, match="4 to 12"):
        hash_pin(pin, iterations=IT)
    with pytest.raises(ValueError):
        check_pin_format(pin)


GOOD = hash_pin("1234", iterations=IT)
_, _ITER, _SALT, _DIGEST = GOOD.split("$")

MALFORMED = [
    "",
    "1234",
    "pbkdf2_sha256$1000$" + _SALT,
    f"pbkdf2_sha1$1000${_SALT}${_DIGEST}",
    f"pbkdf2_sha256$abc${_SALT}${_DIGEST}",
    f"pbkdf2_sha256$-1000${_SALT}${_DIGEST}",
    f"pbkdf2_sha256$999${_SALT}${_DIGEST}",  # too few iterations to accept
    f"pbkdf2_sha256$100000000${_SALT}${_DIGEST}",  # absurd cost: refused, not computed
    f"pbkdf2_sha256$1000$${_DIGEST}",  # empty salt
    f"pbkdf2_sha256$1000$c2FsdA${_DIGEST}",  # 4-byte salt
    f"pbkdf2_sha256$1000${_SALT}${_DIGEST[:-4]}",  # short digest
    f"pbkdf2_sha256$1000${_SALT}${_DIGEST}$extra",
    f"pbkdf2_sha256$1000${_SALT}$!!!not-base64!!!",
    GOOD.upper(),
]


@pytest.mark.parametrize("stored", MALFORMED, ids=[f"malformed{i}" for i in range(len(MALFORMED))])  # salts are random
def test_malformed_hash_never_verifies(stored: str) -> None:
    assert not valid_pin_hash(stored)
    for pin in ("1234", "0000", ""):
        assert not verify_pin(pin, stored)


def test_hash_does_not_carry_the_pin_in_clear() -> None:
    for pin in ("1234", "987654", "000000000000", "73914682"):
        h = hash_pin(pin, iterations=IT)
        assert pin not in h, h
        # nor in the decoded salt/digest bytes as ASCII
        import base64

        for part in h.split("$")[2:]:
            raw = base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
            assert pin.encode() not in raw


@settings(max_examples=40, deadline=None)
@given(st.text(alphabet="0123456789", min_size=4, max_size=12), st.text(alphabet="0123456789", min_size=4, max_size=12))
def test_only_the_right_pin_verifies(pin: str, other: str) -> None:
    h = hash_pin(pin, iterations=IT)
    assert verify_pin(pin, h)
    assert verify_pin(other, h) == (other == pin)


def test_iteration_bound() -> None:
    """The documented bound (docs/model.md): a hash at MAX_ITERATIONS verifies, one above is refused without
    being computed, and `hash_pin` will not make one."""
    at_bound = hash_pin("2580", iterations=MAX_ITERATIONS)
    assert valid_pin_hash(at_bound) and verify_pin("2580", at_bound)
    _, _, salt, digest = at_bound.split("$")
    for n in (MAX_ITERATIONS + 1, 10**7, 10**18):
        above = f"pbkdf2_sha256${n}${salt}${digest}"
        assert not valid_pin_hash(above) and not verify_pin("2580", above)
    with pytest.raises(ValueError, match="iterations must be 1,000 to 200,000"):
        hash_pin("2580", iterations=10**7)


async def test_the_store_refuses_a_hash_above_the_bound(tmp_path: Path) -> None:
    _, _, salt, digest = GOOD.split("$")
    slow = f"pbkdf2_sha256$10000000${salt}${digest}"  # the 10^7 of issue 11: a 2.7 s stall per tap
    async with Store(tmp_path / "rights.db", "UTC") as store:
        with pytest.raises(ChangeRejected) as e:
            await store.apply(ChangeSet(from_version=0, to_version=1, changes=[
                PutUser(user=User(id="u", pin_hash=slow))]))  # fmt: skip
        assert e.value.code == "bad_field" and e.value.path == "changes[0].user.pin_hash"
        assert store.version == 0
