"""CSV import (issue 12) and operator-side field limits (issue 11): every bad line is named, nothing of a bad
file is applied, and one oversized row can never block a gateway (real SQLite; the last test also a real
Mosquitto and the real edge agent on the simulated gateway)."""

# ruff: noqa: F811

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

from cloud_bridge.cli import main
from cloud_bridge.operator.csvimport import ImportFailed
from cloud_bridge.operator.db import MAX_NAME_CHARS, Model, OperatorError
from cloud_bridge.operator.service import Service

from .broker import broker  # noqa: F401
from .mosquitto import Mosquitto
from .test_operator_e2e import GW, published, site, sock_dir, tap_card  # noqa: F401

PW = "pw"


@pytest.fixture
def svc(tmp_path: Path) -> Service:
    s = Service.init(tmp_path / "c.db", site="s1", admin="root", passphrase=PW)
    s.db.record_birth("gw1", session=1, version=0, doors=[("d1", "")], software="", ts=0.0)
    s.put_group("staff", [("gw1", "d1")])
    return s


def users(svc: Service) -> list[str]:
    return [str(r[0]) for r in svc.db.con.execute("SELECT id FROM users ORDER BY id")]


def problems(e: pytest.ExceptionInfo[ImportFailed]) -> list[str]:
    return [str(p) for p in e.value.report.problems]


def test_a_utf8_bom_is_accepted(svc: Service) -> None:
    """Excel's "CSV UTF-8" starts with EF BB BF; it used to give `missing column 'id'`."""
    data = "\ufeffid,name,card,groups\nalice,Zoë Müller,1001,staff\n".encode()
    assert data.startswith(b"\xef\xbb\xbf")
    rep = svc.import_csv(data)
    assert rep.imported == 1
    assert svc.db.con.execute("SELECT name FROM users WHERE id='alice'").fetchone()[0] == "Zoë Müller"
    # the same through an already decoded text (a caller that read the file as text)
    assert svc.import_csv("\ufeffid,card\nbob,1002\n").imported == 1


def test_latin1_names_each_line_and_byte_unless_the_encoding_is_given(svc: Service) -> None:
    data = "id,name,card\nalice,Zoë,1001\nbob,Bob,1002\ncarl,Müller,1003\n".encode("latin-1")
    with pytest.raises(ImportFailed) as ei:
        svc.import_csv(data)
    assert problems(ei) == [
        "line 2: (file): byte 0xEB at byte 9 of the line is not utf-8: the file must be utf-8; save it as UTF-8 "
        '(Excel: "CSV UTF-8") or pass --encoding, e.g. latin-1',
        "line 4: (file): byte 0xFC at byte 7 of the line is not utf-8: the file must be utf-8; save it as UTF-8 "
        '(Excel: "CSV UTF-8") or pass --encoding, e.g. latin-1',
    ]
    assert users(svc) == []  # nothing, not even bob's good line
    assert svc.import_csv(data, encoding="latin-1").imported == 3
    assert svc.db.con.execute("SELECT name FROM users WHERE id='carl'").fetchone()[0] == "Müller"
    with pytest.raises(OperatorError, match="unknown encoding 'klingon'"):
        svc.import_csv(data, encoding="klingon")


def test_a_field_over_the_csv_limit_names_its_line_and_every_other_bad_row_is_reported(svc: Service) -> None:
    huge = "x" * 200_000  # over the csv module's 131,072-character field limit
    text = (f'id,name,card,groups\nalice,Alice,1001,staff\nbob,"{huge}",1002,staff\ncarl,"two\nlines",12x,staff\n'
            f"dora,Dora,1004,nope\n")  # fmt: skip
    with pytest.raises(ImportFailed) as ei:
        svc.import_csv(text.encode())
    assert problems(ei) == [
        f"line 3: (row): cannot read the row: a field is longer than 131,072 characters (a name may have "
        f"{MAX_NAME_CHARS})",
        "line 4: card: card ID '12x' is not numeric",  # the row starting on line 4 (its name spans 4-5)
        "line 6: groups: unknown group 'nope'",
    ]
    assert users(svc) == []  # all or nothing: alice's good row is not applied either


def test_a_huge_name_row_is_refused_naming_its_line(svc: Service) -> None:
    """Issue 11: a 131,072-character name (393 KB in UTF-8) passed validation and then blocked the gateway."""
    name = "€" * 131_072
    text = f"id,name,card,groups\nalice,Alice,1001,staff\nbig,{name},1002,staff\n"
    with pytest.raises(ImportFailed) as ei:
        svc.import_csv(text.encode())
    assert problems(ei) == [f"line 3: name: 131,072 characters: a name may have at most {MAX_NAME_CHARS}"]
    assert users(svc) == []
    many = ";".join(f"g{i}" for i in range(300))
    with pytest.raises(ImportFailed) as ei:
        svc.import_csv(f"id,card,groups\nmany,1003,{many}\n")
    assert problems(ei) == ["line 2: groups: 300 groups: a user may be in at most 256"]
    long_id = "u" * 5000
    with pytest.raises(ImportFailed) as ei:
        svc.import_csv(f"id,card\n{long_id},{'9' * 5000}\n")
    assert problems(ei) == [
        "line 2: id: 'uuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuu'... (5,000 characters) is not a valid user id "
        "(1-64 letters, digits or _ . : @ -)",
        "line 2: card: card ID 999999999999999999999999999999... is too large (at most 2^63 - 1)",
    ]
    # the same limits on the other ways in
    with pytest.raises(OperatorError, match="user name: 131,072 characters, at most 256"):
        svc.add_user("big", name=name, card=1002)
    svc.add_user("ok", card=1004)
    with pytest.raises(OperatorError, match="user name: 300 characters, at most 256"):
        svc.db.update_user("ok", name="n" * 300)
    with pytest.raises(OperatorError, match="group name: 257 characters"):
        svc.put_group("g2", [("gw1", "d1")], name="n" * 257)
    with pytest.raises(OperatorError, match="visitor name"):
        svc.issue_visitor("v" * 1000, location="lobby", badge=5, groups=["staff"])
    assert users(svc) == ["ok"]


def test_cli_import_accepts_a_bom_and_names_the_line_of_a_latin1_file(
    tmp_path: Path, svc: Service, capsys: pytest.CaptureFixture[str]
) -> None:
    db = str(tmp_path / "c.db")
    os.environ["CLOUD_BRIDGE_PASSPHRASE"] = PW
    try:
        f = tmp_path / "u.csv"
        f.write_bytes("\ufeffid,name,card,groups\nalice,Zoë,1001,staff\n".encode())
        assert main(["--db", db, "--operator", "root", "import", str(f), "--no-publish"]) == 0
        assert "1 users imported" in capsys.readouterr().out
        f.write_bytes("id,name,card,groups\nbob,Zoë,1002,staff\n".encode("cp1252"))
        assert main(["--db", db, "--operator", "root", "import", str(f), "--no-publish"]) == 1
        err = capsys.readouterr().err
        assert "nothing imported: 1 problem(s) in the file" in err
        assert "line 2: (file): byte 0xEB at byte 7 of the line is not utf-8" in err
        assert main(["--db", db, "--operator", "root", "--json", "import", str(f), "--encoding", "cp1252",
                     "--no-publish"]) == 0  # fmt: skip
        assert '"imported": 1' in capsys.readouterr().out
        assert Model(db).user_exists("bob")
    finally:
        with contextlib.suppress(KeyError):
            del os.environ["CLOUD_BRIDGE_PASSPHRASE"]


async def test_an_oversized_user_in_the_database_is_held_back_and_a_revocation_still_reaches_the_gateway(
    broker: Mosquitto, tmp_path: Path, sock_dir: Path
) -> None:
    """Issue 11: one row too large for a message made every later publish fail `too_large`. A row written
    straight to the database (bypassing every check) is now held back by plan(), naming it, while the other
    changes of the same round (a revocation) reach a real gateway over a real broker, and later ones too."""
    async with site(broker, tmp_path, sock_dir) as (svc, agent):
        svc.add_user("alice", card=1001, groups=["staff"])
        svc.add_user("bob", card=1002, groups=["staff"])
        await published(svc)
        assert (await tap_card(agent, 1002)).granted
        huge = "€" * 131_072  # 393,216 bytes in UTF-8: more than max_message_bytes (256 KiB)
        with svc.db.tx() as c:
            c.execute("INSERT INTO users (id, name) VALUES ('huge', ?)", (huge,))
            c.execute("INSERT INTO credentials (card, user_id) VALUES (2001, 'huge')")
            c.execute("INSERT INTO assignments (user_id, group_id) VALUES ('huge', 'staff')")
            c.execute("UPDATE users SET name=? WHERE id='alice'", (huge,))  # a user the gateway holds already
        svc.set_credential_status(1002, "lost")  # a revocation in the same round
        v = await published(svc)
        assert len(svc.not_sent) == 2, svc.not_sent
        assert all("its record is 393,3" in m and "max_message_bytes 262,144" in m for m in svc.not_sent)
        assert any("user 'huge' on gw1" in m and "nothing of it was sent" in m for m in svc.not_sent)
        assert any("user 'alice' on gw1" in m and "the gateway keeps its previous record" in m for m in svc.not_sent)
        assert agent.store is not None and agent.store.version == v
        assert (await tap_card(agent, 1002)).reason.value == "unknown_card"  # bob's card revoked
        assert agent.store.index.cred(2001) is None  # the oversized user is not on the gateway
        d = await tap_card(agent, 1001)
        assert d.granted and d.user == "alice"  # alice keeps the record the gateway had
        # the gateway is not blocked: later changes go out
        svc.add_user("carol", card=1003, groups=["staff"])
        assert await published(svc) == v + 1
        assert (await tap_card(agent, 1003)).granted
        # fixed in the database, the held-back user goes out too
        with svc.db.tx() as c:
            c.execute("UPDATE users SET name='Huge' WHERE id='huge'")
        await published(svc)
        assert svc.not_sent == [n for n in svc.not_sent if "alice" in n]
        assert (await tap_card(agent, 2001)).granted
