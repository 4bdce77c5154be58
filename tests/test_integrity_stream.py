"""The periodic integrity check hashes the rows a chunk at a time (issue 18): the same checksum as an index
read from every row, at any chunk size, with memory bounded by one chunk rather than by the file."""

from __future__ import annotations

import sqlite3
import tracemalloc
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from edge.index import index_digest
from edge.model import (
    Assignment,
    ChangeSet,
    Credential,
    CredentialStatus,
    DeleteGroup,
    Group,
    PutCredential,
    PutGroup,
    PutUser,
    User,
)
from edge.pin import hash_pin
from edge.store import Store, read_digest, read_index
from edge.store import schema as store_schema

from .conftest import basic_site

TZ = "Europe/Berlin"
T1 = datetime(2025, 1, 1, tzinfo=UTC)
T2 = datetime(2030, 1, 1, tzinfo=UTC)


def varied(frm: int, n: int) -> ChangeSet:
    """Users with windows, PINs, several assignments and cards with statuses, facilities and use limits."""
    pin = hash_pin("1234", iterations=1000)
    changes: list[Any] = []
    for i in range(n):
        assigns = [Assignment(group="lab")] + ([Assignment(group="staff", valid_from=T1)] if i % 3 == 0 else [])
        changes.append(PutUser(user=User(
            id=f"u{i}", name=f"User {i}", assignments=assigns, pin_hash=pin if i % 4 == 0 else None,
            valid_until=T2 if i % 5 == 0 else None,
        )))  # fmt: skip
        changes += [
            PutCredential(credential=Credential(
                card=10_000 + 2 * i + k, user=f"u{i}", facility=7 if k else None, max_uses=3 if i % 7 == 0 else None,
                status=CredentialStatus.SUSPENDED if i % 11 == 0 else CredentialStatus.ACTIVE,
                valid_from=T1 if i % 2 else None,
            ))
            for k in range(2)
        ]  # fmt: skip
    return ChangeSet(from_version=frm, to_version=frm + 1, changes=changes)


@pytest.mark.parametrize("chunk", [1, 7, 65_536])
async def test_the_streamed_checksum_is_that_of_every_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    path = tmp_path / "rights.db"
    async with Store(path, TZ) as s:
        await s.apply(basic_site())
        await s.apply(varied(1, 40))
        # a deleted group: a hole in the group numbering the checksum names groups through
        await s.apply(ChangeSet(from_version=2, to_version=3, changes=[PutGroup(group=Group(id="old", doors=[]))]))
        await s.apply(ChangeSet(from_version=3, to_version=4, changes=[DeleteGroup(id="old")]))
        want = s._digest
        monkeypatch.setattr(store_schema, "DIGEST_CHUNK", chunk)
        got, stored, problem = read_digest(path, s.site_tz)
        assert problem is None and stored == want.text()
        assert got == want == index_digest(read_index(path, s.site_tz)[0])
        assert await s.check_integrity() is None


async def test_a_row_changed_on_disk_changes_the_streamed_checksum(tmp_path: Path) -> None:
    path = tmp_path / "rights.db"
    async with Store(path, TZ) as s:
        await s.apply(basic_site())
        await s.apply(varied(1, 20))
        want = s._digest
        for sql in ("UPDATE users SET flags = flags + 2 - 4 * (flags & 2) / 2 WHERE ext_id = 'u3'",
                    "UPDATE assignments SET vuntil = vuntil - 1 WHERE uid = (SELECT uid FROM users WHERE ext_id='u6')",
                    "UPDATE credentials SET status = 3 WHERE card = 10005"):  # fmt: skip
            con = sqlite3.connect(path)
            with con:
                con.execute(sql)
            con.close()
            got, _, _ = read_digest(path, s.site_tz)
            assert got != want, sql
            assert await s.check_integrity() is not None


async def test_the_streamed_check_holds_one_chunk_not_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "rights.db"
    async with Store(path, TZ, synchronous="NORMAL") as s:
        await s.apply(basic_site())
        await s.apply(varied(1, 3000))
        tz = s.site_tz
    monkeypatch.setattr(store_schema, "DIGEST_CHUNK", 256)
    peaks = []
    for read in (read_digest, read_index):
        tracemalloc.start()
        read(path, tz)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    streamed, whole = peaks
    assert streamed * 4 < whole, peaks
