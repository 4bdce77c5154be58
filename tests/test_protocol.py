"""Protocol structs, codecs, topics and signing (pure: no broker), and the examples in docs/protocol.md."""

from __future__ import annotations

import json
import re
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud_bridge import protocol as p
from cloud_bridge.cloud import chunk_snapshot, manifest_of
from cloud_bridge.link import LinkConfig, backoff_delays, split_events
from cloud_bridge.signing import (
    CommandRejected,
    check,
    fingerprint,
    open_signed,
    public_bytes,
    sign_command,
    sign_downlink,
)
from cloud_bridge.topics import Leaf, Topics, parse, site_wildcard
from edge.events import Event
from edge.model import (
    Assignment,
    ChangeSet,
    Credential,
    DeleteCredential,
    Door,
    DoorMode,
    Group,
    PutCredential,
    PutUser,
    Snapshot,
    User,
)

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
# A fixed key so that the signed example in the doc is reproducible (Ed25519 signatures are deterministic).
DOC_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
T0 = 1795425600.0  # 2026-11-23T08:00:00Z
#: The key the doc's rotation example moves to.
NEXT_DOC_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32, 64)))


def _event(seq: int) -> Event:
    return Event(id=f"{seq:032x}", seq=seq, type="access.granted", ts=T0 + seq, local="2026-11-23T09:00:01.000+01:00",
                 link_up=True, door="front", reader="front.wiegand0", card=1001, user="alice", group="staff",
                 reason="granted")  # fmt: skip


def examples() -> dict[str, Any]:
    """One instance of every message, as shown in docs/protocol.md."""
    _, signed = sign_command(
        DOC_KEY, site="s1", gateway="gw1", action=p.Unlock(door="front", seconds=5), operator="alice@example.com",
        request_id="r-1", ttl_s=60, now=T0, nonce="9f1c2e7a5b3d4c6e8f0a1b2c3d4e5f60", encoding="json",
    )  # fmt: skip
    when = datetime(2026, 1, 1, tzinfo=UTC)
    change_set = p.ChangeSetMsg(
        id="cs-43",
        change_set=ChangeSet(
            from_version=42,
            to_version=43,
            changes=[
                PutUser(user=User(id="dave", name="Dave", assignments=[Assignment(group="staff", valid_until=when)])),
                PutCredential(credential=Credential(card=1004, user="dave")),
                DeleteCredential(card=1003),
            ],
        ),
    )
    chunks = [
        p.SnapshotChunk(
            id="snap-7",
            version=50,
            index=0,
            count=2,
            doors=[Door(id="front", name="Front door")],
            groups=[Group(id="staff", doors=["front"])],
            users=[User(id="alice", assignments=[Assignment(group="staff")])],
        ),
        p.SnapshotChunk(id="snap-7", version=50, index=1, count=2, credentials=[Credential(card=1001, user="alice")]),
    ]
    manifest = manifest_of("snap-7", 50, [p.encode(c, "json") for c in chunks])
    envelope = sign_downlink(DOC_KEY, change_set, site="s1", gateway="gw1", now=T0, encoding="json")
    return {
        "birth": p.Birth(
            site="s1",
            gateway="gw1",
            session=1795425600000,
            ts=T0,
            software="edge 0.1.0",
            rights_version=42,
            config_hash="sha256:5d41402abc4b2a76",
            journal_depth=0,
            doors=[p.DeviceInfo(id="front", kind="door", name="Front door"), p.DeviceInfo(id="lab", kind="door",
                                                                                         name="Lab")],
            readers=[
                p.DeviceInfo(id="front.wiegand0", kind="wiegand", door="front"),
                p.DeviceInfo(id="lab.osdp1", kind="osdp", door="lab"),
            ],
            max_message_bytes=262144,
            key=fingerprint(public_bytes(DOC_KEY)),
            tls=True,
            warnings=[],
        ),
        "death": p.Death(site="s1", gateway="gw1", session=1795425600000, ts=T0, reason="lost"),
        "signed": envelope,
        "provision": msgspec.json.decode(envelope.body),
        "change_set": change_set,
        "snapshot_manifest": manifest,
        "snapshot_chunk": chunks[0],
        "snapshot_chunk_2": chunks[1],
        "rebirth": p.Rebirth(),
        "result_ok": p.RightsResult(id="cs-43", ok=True, version=43, applied=True, changes=3),
        "result_duplicate": p.RightsResult(id="cs-43", ok=True, version=43, applied=False),
        "result_refused": p.RightsResult(
            id="cs-44", ok=False, version=43,
            error=p.ErrorInfo(code="bad_signature", message="signature does not verify with the site key"),
        ),
        "result_error": p.RightsResult(
            id="cs-44",
            ok=False,
            version=43,
            error=p.ErrorInfo(
                code="unknown_reference",
                message="group 'staff': no door 'cellar'",
                path="groups[staff].doors[1]",
            ),
        ),
        "result_gap": p.RightsResult(
            id="cs-46",
            ok=False,
            version=43,
            error=p.ErrorInfo(code="version_gap", message="change set starts at version 45 but the gateway holds 43"),
        ),
        "chunk_ack": p.ChunkAck(id="snap-7", index=0, received=1, count=2),
        "resync": p.ResyncRequest(have=43, reason="version_gap", ref="cs-46"),
        "events": p.EventBatch(first_seq=101, last_seq=102, prev_seq=100, events=[_event(101), _event(102)],
                               ref="5be0c9a1d2e3f405"),
        "events_ack": p.EventAck(upto_seq=102, ts=1795435200.5, ref="5be0c9a1d2e3f405"),
        "command": signed,
        "command_body": msgspec.json.decode(signed.body),
        "command_result_ok": p.CommandResult(request_id="r-1", ok=True),
        "command_result_error": p.CommandResult(
            request_id="r-2", ok=False, error=p.ErrorInfo(code="invalid", message="no door 'cellar' on this gateway")
        ),
        "command_result_replayed": p.CommandResult(
            request_id="r-1",
            ok=False,
            error=p.ErrorInfo(code="replayed", message="this command (nonce) was received before"),
            original=p.CommandResult(request_id="r-1", ok=True),
        ),
        "action_unlock": p.Unlock(door="front", seconds=5),
        "action_door_mode": p.SetDoorMode(door="lab", mode=DoorMode.LOCKED),
        "action_lockdown": p.Lockdown(active=True),
        "action_resync": p.Resync(),
        "action_rebirth": p.RebirthAction(),
        "action_rotate_key": p.RotateKey(new_public_key=public_bytes(NEXT_DOC_KEY).hex(), not_before=T0 + 3600),
        "action_reset_anti_passback": p.ResetAntiPassback(user="alice"),
        "action_area_moves": p.AreaMoves(moves=[p.AreaMove(user="bob", area="building", ts=T0 + 30, gateway="gw2")]),
    }


def as_json(x: Any) -> str:
    return json.dumps(json.loads(msgspec.json.encode(x)), indent=2)


def doc_examples() -> dict[str, str]:
    text = DOC.read_text()
    return dict(re.findall(r"<!-- example: (\w+) -->\n```json\n(.*?)\n```", text, re.S))


def test_every_example_in_the_doc_is_generated_from_the_structs() -> None:
    docs, gen = doc_examples(), examples()
    assert set(docs) == set(gen), f"doc lacks {set(gen) - set(docs)}, has unknown {set(docs) - set(gen)}"
    for name, block in docs.items():
        assert json.loads(block) == json.loads(as_json(gen[name])), (
            f"example {name} is stale: run python -m tests.test_protocol"
        )


def _decoder(name: str) -> Any:
    if name.startswith("action_"):
        return lambda data: (
            msgspec.msgpack.decode(data, type=p.CommandAction)
            if data[:1] != b"{"
            else msgspec.json.decode(data, type=p.CommandAction)
        )
    if name == "command_body":
        return p.decode_command_body
    if name == "provision":
        return p.decode_provision
    if name in ("change_set", "snapshot_chunk", "snapshot_chunk_2", "rebirth", "signed", "snapshot_manifest"):
        return p.decode_downlink
    if name == "events_ack":
        return p.decode_event_ack
    if name == "command":
        return p.decode_command
    return p.decode_uplink


def test_every_doc_example_decodes_with_the_real_decoders() -> None:
    gen = examples()
    for name, block in doc_examples().items():
        dec = _decoder(name)
        v = dec(block.encode())
        if name == "command_body":
            assert v == p.decode_command_body(gen["command"].body)
        elif name == "provision":
            assert v == p.decode_provision(gen["signed"].body)
        else:
            assert v == gen[name], name
        assert dec(p.encode(v)) == v, name  # and the same message in MessagePack


def test_doc_command_signature_verifies() -> None:
    signed = examples()["command"]
    cmd = check(signed, DOC_KEY.public_key(), site="s1", gateway="gw1", now=T0 + 1)
    assert cmd.command == p.Unlock(door="front", seconds=5) and cmd.operator == "alice@example.com"


@pytest.mark.parametrize("enc", ["msgpack", "json"])
def test_round_trip_every_message(enc: p.Encoding) -> None:
    for name, msg in examples().items():
        if name.startswith("action_") or name in ("command_body", "provision"):
            continue
        assert _decoder(name)(p.encode(msg, enc)) == msg, name


def test_unknown_fields_are_ignored_and_new_fields_default() -> None:
    data = b'{"type":"events_ack","upto_seq":5,"from_the_future":[1,2,3]}'
    assert p.decode_event_ack(data) == p.EventAck(upto_seq=5)
    old_birth = b'{"type":"birth","site":"s1","gateway":"gw1"}'
    b = p.decode_status(old_birth)
    assert isinstance(b, p.Birth) and b.rights_version == 0 and b.doors == []


def test_decode_errors_name_the_field() -> None:
    with pytest.raises(p.ProtocolError, match=r"\$\.change_set\.changes\[0\]\.credential\.card"):
        p.decode_downlink(b'{"type":"change_set","id":"x","change_set":{"from_version":0,"to_version":1,'
                          b'"changes":[{"type":"put_credential","credential":{"card":-1,"user":"a"}}]}}')  # fmt: skip
    with pytest.raises(p.ProtocolError, match="Invalid value 'nope'"):
        p.decode_downlink(b'{"type":"nope"}')
    with pytest.raises(p.ProtocolError, match="not valid"):
        p.decode_downlink(b"\xc1")
    with pytest.raises(p.ProtocolError, match="request_id"):
        p.decode_command_body(b'{"site":"s","gateway":"g","request_id":"bad id!","operator":"o","issued":1,'
                              b'"expires":2,"nonce":"0123456789abcdef","command":{"action":"resync"}}')  # fmt: skip
    assert p.peek_ref(b'{"type":"change_set","id":"abc","change_set":7}') == "abc"
    assert p.peek_ref(b"\xc1") is None


def test_card_numbers_up_to_56_bits_and_beyond_decode() -> None:
    c = msgspec.json.decode(b'{"card":72057594037927935,"user":"u"}', type=Credential)
    assert c.card == 2**56 - 1
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(b'{"card":9223372036854775808,"user":"u"}', type=Credential)


def test_topics_built_and_parsed_in_one_place() -> None:
    t = Topics("s1", "gw1")
    assert t.status == "acs/v1/s1/gw1/status"
    assert t.command_result == "acs/v1/s1/gw1/command/result"
    assert t.downlink() == ["acs/v1/s1/gw1/rights", "acs/v1/s1/gw1/events/ack", "acs/v1/s1/gw1/command"]
    assert t.parse("acs/v1/s1/gw1/events/ack") is Leaf.EVENTS_ACK
    assert t.parse("acs/v1/s1/gw2/events/ack") is None
    assert t.parse("acs/v1/s1/gw1/bogus") is None
    assert parse("acs/v1/s1/gw9/rights/reply") == ("s1", "gw9", Leaf.RIGHTS_REPLY)
    assert parse("other/v1/s1/gw9/status") is None
    assert site_wildcard("s1", Leaf.STATUS) == "acs/v1/s1/+/status"
    for bad in ("a/b", "+", "#", "", "x" * 65):
        with pytest.raises(ValueError):
            Topics(bad, "gw1")


def test_signing_accepts_good_and_refuses_bad_commands() -> None:
    key = Ed25519PrivateKey.generate()
    T0 = 1_795_425_600.0
    pub = key.public_key()
    cmd, s = sign_command(
        key, site="s", gateway="g", action=p.Lockdown(active=True), operator="op", now=T0, ttl_s=60
    )
    assert check(s, pub, site="s", gateway="g", now=T0 + 10) == cmd

    def code(signed: p.SignedCommand, **kw: Any) -> str:
        args: dict[str, Any] = {"site": "s", "gateway": "g", "now": T0 + 10} | kw
        with pytest.raises(CommandRejected) as e:
            check(signed, pub, **args)
        return e.value.code

    assert code(msgspec.structs.replace(s, sig=b"")) == "unsigned"
    assert code(msgspec.structs.replace(s, sig=bytes(64))) == "bad_signature"
    assert code(msgspec.structs.replace(s, body=s.body + b" ")) == "bad_signature"
    assert check(s, pub, site="s", gateway="g", now=T0 + 60 + 29)  # within the skew
    assert code(s, now=T0 + 60 + 31) == "expired"
    assert code(s, now=T0 - 31) == "not_yet_valid"
    assert code(s, gateway="other") == "wrong_target"
    assert code(s, site="other") == "wrong_target"
    _, long = sign_command(key, site="s", gateway="g", action=p.Resync(), operator="op", now=T0, ttl_s=10**6)
    assert code(long) == "ttl_too_long"
    _, j = sign_command(key, site="s", gateway="g", action=p.Resync(), operator="op", now=T0, encoding="json")
    assert j.body.startswith(b"{") and check(j, pub, site="s", gateway="g", now=T0 + 1).command == p.Resync()
    assert len(public_bytes(key)) == 32


def test_event_batches_split_to_fit_the_message_limit() -> None:
    events = [_event(i) for i in range(1, 401)]
    parts = split_events(events, 0, 8192, "msgpack")
    assert len(parts) > 1
    assert all(len(data) <= 8192 for _, data in parts)
    assert [e.seq for b, _ in parts for e in b.events] == list(range(1, 401))
    assert parts[0][0].prev_seq == 0
    assert all(parts[i][0].prev_seq == parts[i - 1][0].last_seq for i in range(1, len(parts)))


def test_snapshot_chunks_fit_and_join_back() -> None:
    snap = Snapshot(
        version=3, doors=[Door(id="d")], groups=[Group(id="g", doors=["d"])],
        users=[User(id=f"u{i}", assignments=[Assignment(group="g")]) for i in range(500)],
        credentials=[Credential(card=i, user=f"u{i % 500}") for i in range(5000)],
    )  # fmt: skip
    chunks = chunk_snapshot(snap, "t", 8192)
    assert len(chunks) > 10 and all(len(c) <= 8192 for c in chunks)
    decoded = [p.decode_downlink(c) for c in reversed(chunks)]
    assert all(isinstance(c, p.SnapshotChunk) and c.count == len(chunks) for c in decoded)
    assert p.snapshot_of(decoded) == snap  # type: ignore[arg-type]
    assert len(chunk_snapshot(Snapshot(version=1), "t", 8192)) == 1


def test_link_config_is_strict_and_backoff_is_jittered_and_bounded() -> None:
    with pytest.raises(msgspec.ValidationError, match="port"):
        msgspec.convert({"site": "s", "gateway": "g", "port": 0}, LinkConfig)
    with pytest.raises(msgspec.ValidationError, match="unknown"):
        msgspec.convert({"site": "s", "gateway": "g", "hots": "x"}, LinkConfig)
    import random

    nxt = backoff_delays(0.5, 8.0, random.Random(1))
    ds = [nxt() for _ in range(20)]
    assert all(0.25 <= d <= 8.0 for d in ds) and len(set(ds)) == 20 and max(ds[10:]) > 2


def test_doc_downlink_signature_verifies() -> None:
    signed = examples()["signed"]
    prov = open_signed(signed, DOC_KEY.public_key(), site="s1", gateway="gw1")
    assert prov.msg == examples()["change_set"] and prov.issued == T0


if __name__ == "__main__":  # rewrite the examples in docs/protocol.md (or print them with --print)
    gen = examples()
    if "--print" in sys.argv:
        for name, msg in gen.items():
            sys.stdout.write(f"<!-- example: {name} -->\n```json\n{as_json(msg)}\n```\n\n")
    else:
        text = DOC.read_text()
        missing = [n for n in gen if f"<!-- example: {n} -->" not in text]
        text = re.sub(r"(<!-- example: (\w+) -->\n```json\n)([^`]*?)(\n?```)",
                      lambda m: m.group(1) + as_json(gen[m.group(2)]) + "\n```", text)  # fmt: skip
        DOC.write_text(text)
        if missing:
            sys.stdout.write(f"examples not placed in the doc yet: {missing}\n")
