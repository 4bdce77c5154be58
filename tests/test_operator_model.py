"""The operator side's pure parts and its database: identity export rules, diffs, CSV validation, visitor
day ends, event ranges; plus the CLI on a real database and the shared-subscription collector."""

# ruff: noqa: F811

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path

import aiomqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud_bridge.cli import main
from cloud_bridge.operator import identity
from cloud_bridge.operator.collector import Collector, store_batch
from cloud_bridge.operator.csvimport import validate
from cloud_bridge.operator.db import Model
from cloud_bridge.operator.provision import plan
from cloud_bridge.operator.visitors import end_of_local_day
from cloud_bridge.protocol import EventBatch, encode
from cloud_bridge.topics import Topics
from edge.events import Event
from edge.model import DeleteCredential, DeleteUser, PutCredential, PutUser

from .broker import broker  # noqa: F401
from .mosquitto import Mosquitto


def site(users: list[identity.UserRow], **rules: bool) -> identity.SiteModel:
    return identity.SiteModel(doors={"gw1": {"d1": ""}, "gw2": {"d9": ""}}, groups={"g": ("", None)},
                              group_doors={"g": [("gw1", "d1")]}, users=users,
                              rules=identity.ExportRules(**rules))  # fmt: skip


def user(uid: str, creds: list[tuple[int, str]], assigns: list[tuple[str, float | None, float | None]]
         ) -> identity.UserRow:  # fmt: skip
    return identity.UserRow(uid, "", True, False, None, None, assigns, [(c, s, "h10301", None, None) for c, s in creds])


def test_export_needs_an_active_token_and_an_entitlement_on_that_gateway() -> None:
    now = 1000.0
    s = site([
        user("a", [(1, "active")], [("g", None, None)]),
        user("b", [(2, "suspended")], [("g", None, None)]),  # no active token
        user("c", [(3, "active")], []),  # no entitlement
        user("d", [(4, "active"), (5, "lost")], [("g", None, 999.0)]),  # assignment ended
        user("e", [(6, "active")], [("g", 2000.0, 3000.0)]),  # future: sent ahead with its window
    ])  # fmt: skip
    st = identity.gateway_state(s, "gw1", now)
    assert sorted(k[1] for k in st if k[0] == "user") == ["a", "e"]
    assert sorted(k[1] for k in st if k[0] == "credential") == ["1", "6"]
    e = st[("user", "e")][0]
    assert e.assignments[0].valid_from.timestamp() == 2000.0 and e.assignments[0].valid_until.timestamp() == 3000.0
    assert not [k for k in identity.gateway_state(s, "gw2", now) if k[0] == "user"]  # no door of g there
    loose = site(s.users, delete_user_on_no_token=False, delete_user_on_no_entitlement=False)
    st2 = identity.gateway_state(loose, "gw1", now)
    assert sorted(k[1] for k in st2 if k[0] == "user") == ["a", "b", "c", "d", "e"]
    assert ("credential", "2") not in st2 and ("credential", "5") not in st2  # inactive tokens never go


def test_diff_orders_moves_and_deletes_so_the_gateway_accepts_them() -> None:
    s1 = site([user("a", [(1, "active")], [("g", None, None)]), user("b", [(2, "active")], [("g", None, None)])])
    old = {k: v[1] for k, v in identity.gateway_state(s1, "gw1", 0).items()}
    s2 = site([user("c", [(1, "active")], [("g", None, None)]), user("b", [(2, "active")], [("g", None, None)])])
    ch = identity.diff(identity.gateway_state(s2, "gw1", 0), old)
    kinds = [type(c).__name__ for c in ch]
    assert kinds == ["DeleteCredential", "PutUser", "PutCredential", "DeleteUser"], kinds
    assert isinstance(ch[0], DeleteCredential) and ch[0].card == 1
    assert isinstance(ch[1], PutUser) and isinstance(ch[2], PutCredential) and isinstance(ch[3], DeleteUser)
    assert identity.diff(identity.gateway_state(s2, "gw1", 0), {k: v[1] for k, v in identity.gateway_state(
        s2, "gw1", 0).items()}) == []  # fmt: skip


def test_gateways_with_the_same_groups_share_one_pass_over_the_users() -> None:
    """`people` keeps users and cards per set of groups: the states are the same as computed one by one."""
    s = identity.SiteModel(
        doors={"gw1": {"d1": ""}, "gw2": {"d2": ""}, "gw3": {"d3": ""}, "gw4": {}},
        groups={"g": ("", None), "h": ("", None)},
        group_doors={"g": [("gw1", "d1"), ("gw2", "d2"), ("gw3", "d3")], "h": [("gw3", "d3")]},
        users=[user("a", [(1, "active")], [("g", None, None)]), user("b", [(2, "active")], [("h", None, None)]),
               user("c", [(3, "active")], [("g", None, None), ("h", None, 500.0)])],
    )  # fmt: skip
    people: dict[frozenset[str], identity.Desired] = {}
    for now in (0.0, 1000.0):  # h's assignment of c ends at 500
        people.clear()
        for gw in ("gw1", "gw2", "gw3", "gw4"):
            assert identity.gateway_state(s, gw, now, people) == identity.gateway_state(s, gw, now)
        assert set(people) == {frozenset({"g"}), frozenset({"g", "h"}), frozenset()}
    assert sorted(k[1] for k in identity.gateway_state(s, "gw3", 1000.0) if k[0] == "user") == ["a", "b", "c"]
    c = identity.gateway_state(s, "gw3", 1000.0)[("user", "c")][0]
    assert [a.group for a in c.assignments] == ["g"]


def test_csv_validation_names_every_bad_row() -> None:
    text = "card,id,groups\n10,a,g\n10,b,g\n11,a,g\nx1,c,g\n12,d,h\n13,e,\n"
    rep = validate(text, existing_cards={13: "user 'z'"}, existing_users=set(), groups={"g"})
    assert [str(p) for p in rep.problems] == [
        "line 3: card: card 10 is duplicated in the file (line 2)",
        "line 4: id: user 'a' is also on line 2",
        "line 5: card: card ID 'x1' is not numeric",
        "line 6: groups: unknown group 'h'",
        "line 7: card: card 13 is already assigned to user 'z'",
    ]
    assert "nothing imported" in rep.text()
    assert validate("name\nx\n", existing_cards={}, existing_users=set(), groups=set()).problems[0].column == "id"


def test_end_of_local_day_is_local_midnight() -> None:
    ts = 1795428000.0  # 2026-11-23 08:00 UTC = 09:00 Berlin
    assert end_of_local_day(ts, "Europe/Berlin") == 1795474800.0  # 2026-11-23 23:00 UTC


def test_plan_uses_a_snapshot_when_a_change_set_would_not_fit(tmp_path: Path) -> None:
    db = Model(tmp_path / "c.db")
    db.record_birth("gw1", session=1, version=0, doors=[("d1", "")], software="", ts=0)
    db.put_group("g", [("gw1", "d1")])
    for i in range(300):
        db.add_user(f"u{i}", card=100 + i, groups=["g"])
    assert plan(db, max_bytes=8192) == {"gw1": 602}
    kinds = [r[0] for r in db.con.execute("SELECT kind FROM outbox")]
    assert kinds == ["snap"]
    db.add_user("late", card=9, groups=["g"])
    assert plan(db, max_bytes=8192) == {"gw1": 2}
    assert [r[0] for r in db.con.execute("SELECT kind FROM outbox ORDER BY to_version")] == ["snap", "cs"]
    assert plan(db) == {}  # nothing changed
    # the shadow follows each change row by row, deletions included
    db.delete_user("u7")
    assert plan(db) == {"gw1": 1}  # DeleteUser (its card goes with it)
    shadow = {(k, key) for k, key in db.con.execute("SELECT kind, key FROM shadow WHERE gateway='gw1'")}
    assert ("user", "u7") not in shadow and ("credential", "107") not in shadow and ("user", "late") in shadow
    assert len(shadow) == 2 + 2 * 300  # door, group, then 299 + "late" users with a card each
    assert plan(db) == {}


def ev(seq: int) -> Event:
    return Event(id=f"{seq:032x}", seq=seq, type="access.granted", ts=1.0, local="", link_up=True)


def test_event_ranges_advance_only_when_contiguous(tmp_path: Path) -> None:
    db = Model(tmp_path / "c.db")
    b2 = EventBatch(first_seq=3, last_seq=4, prev_seq=2, events=[ev(3), ev(4)])
    b1 = EventBatch(first_seq=1, last_seq=2, prev_seq=0, events=[ev(1), ev(2)])
    assert store_batch(db, "gw1", b2) == 0  # out of order: held, not acknowledged
    assert store_batch(db, "gw1", b1) == 4  # joins up
    assert store_batch(db, "gw1", b1) == 4  # a duplicate changes nothing
    assert db.con.execute("SELECT count(*) FROM events").fetchone()[0] == 4


async def test_two_collectors_share_the_load_and_lose_nothing(broker: Mosquitto, tmp_path: Path) -> None:
    db_path = tmp_path / "c.db"
    key = Ed25519PrivateKey.generate()
    cols = [Collector(Model(db_path), host=broker.host, port=broker.port, site="s1", signing_key=key)
            for _ in range(2)]  # fmt: skip
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(c.run()) for c in cols]
        await asyncio.sleep(0.5)
        acks: list[int] = []
        async with aiomqtt.Client(broker.host, broker.port, protocol=aiomqtt.ProtocolVersion.V5) as gw:
            await gw.subscribe(Topics("s1", "gw1").events_ack, qos=1)
            for i in range(20):
                b = EventBatch(first_seq=i * 5 + 1, last_seq=i * 5 + 5, prev_seq=i * 5,
                               events=[ev(i * 5 + k) for k in range(1, 6)])  # fmt: skip
                await gw.publish(Topics("s1", "gw1").events, encode(b), qos=1)
            async with asyncio.timeout(10):
                async for m in gw.messages:
                    from cloud_bridge.protocol import EventAck, Signed, decode_event_ack, decode_provision

                    env = decode_event_ack(bytes(m.payload))  # type: ignore[arg-type]
                    assert isinstance(env, Signed)  # acks are signed
                    inner = decode_provision(env.body).msg
                    assert isinstance(inner, EventAck)
                    acks.append(inner.upto_seq)
                    if acks[-1] == 100:
                        break
        for t in tasks:
            t.cancel()
    assert all(c.batches > 0 for c in cols), [c.batches for c in cols]  # the broker split the batches
    assert sum(c.batches for c in cols) == 20
    assert Model(db_path).con.execute("SELECT count(*) FROM events").fetchone()[0] == 100


def test_cli_init_user_import_and_refusals(tmp_path: Path, capsys: object) -> None:
    db = str(tmp_path / "c.db")
    os.environ["CLOUD_BRIDGE_PASSPHRASE"] = "pw"
    try:
        assert main(["--db", db, "init", "--site", "s1", "--admin", "root"]) == 0
        m = Model(db)
        m.record_birth("gw1", session=1, version=0, doors=[("d1", "")], software="", ts=time.time())
        assert main(["--db", db, "--operator", "root", "group", "staff", "--door", "gw1/d1"]) == 0
        csv = tmp_path / "u.csv"
        csv.write_text("id,card,groups\na,1,staff\nb,1,staff\n")
        assert main(["--db", db, "--operator", "root", "import", str(csv), "--no-publish"]) == 1
        csv.write_text("id,card,groups\na,1,staff\nb,2,staff\n")
        assert main(["--db", db, "--operator", "root", "import", str(csv), "--no-publish"]) == 0
        assert main(["--db", db, "--operator", "root", "user", "deactivate", "a"]) == 0
        assert main(["--db", db, "--operator", "root", "operator", "add", "nobody"]) == 0
        assert main(["--db", db, "--operator", "nobody", "user", "delete", "a"]) == 1  # no permission
        assert m.user_exists("a")
        assert main(["--db", db, "--operator", "root", "badge-pool", "add", "lobby", "12a"]) == 1
    finally:
        with contextlib.suppress(KeyError):
            del os.environ["CLOUD_BRIDGE_PASSPHRASE"]
