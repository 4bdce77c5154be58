"""Soak: fuzzed downlink payloads against the real decoders and a live gateway link (issue 11).

    .venv/bin/python bench/soak_fuzz.py [--quick] [--total N] [--live N] [--rate R] [--seed S]

(a) In process: a mutation fuzzer over the gateway's downlink decoders (`decode_downlink`, `decode_event_ack`,
    `decode_command`, `decode_provision`, `decode_command_body`, `peek_ref`, `check_depth`; the body of every
    envelope that decodes is decoded again as the link does after the signature). Seeds are valid messages of
    every kind the gateway reads (signed change sets, snapshot manifests, rebirths and event acks, snapshot
    chunks, bare change sets/manifests/acks, signed commands of every action, the signed bodies themselves),
    each in MessagePack and JSON. Mutations: byte flips, truncations, insertions of random or special bytes,
    deletions, duplications, splices of two seeds, nesting 20..5,000 deep in an ignored field, structured
    replacements of one field (huge/negative ints, 2^53, 2^63, 2^64-1, inf/nan/1e308 floats, 100 KB strings,
    wrong types, maps with int keys, another seed's subtree), JSON number literals of 400 digits or 1e400,
    and mutations of the signed body inside an envelope. Every input must decode or raise `ProtocolError`
    (`peek_ref` must return None or a short string): anything else is a crash, saved under --crash-dir.

(c) In process: mutants of signed change sets and snapshot chunks that still decode are applied to a real
    `Store` as the link would: each must apply or raise `ChangeRejected` with nothing applied (5,000; not
    counted in the total).

(b) Live: a real Mosquitto; a gateway (Store + Journal + CloudLink, as tests/broker.py) with a task deciding
    a tap every 5 ms on the live index (and journalling it), provisioned by a real `CloudPeer` that sends a
    signed change set every 0.2 s and a snapshot every 25; a publisher *process* sends mutated forged
    payloads on `rights`, `events/ack` and `command` (unsigned, signed by another key, signed by the site key
    for another gateway with a mutated body; all carrying backdoor cards 666000.., door unlocks, lockdowns,
    key rotations, acks of 2^40 with far clocks). Rounds alternate baseline (no fuzz) and fuzz, same length.
    Counted: link deaths (offline transitions, new sessions), `handler_errors`, wrong grants (a tap on a
    backdoor card granted, or a known card decided other than the version it was decided at says, or a
    forged command executed, or a forged clock sample taken), events lost (seqs missing at the cloud after
    the drain), tap decision lateness p50/p99 baseline vs fuzz.

Full run: 10^6 payloads in all (`--live` 100,000 of them through the broker, the rest in process).
`--quick`: 50,000 + 3,000, under 60 s. Prints JSON lines {"metric", "value", "unit", "params"}.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import logging
import os
import random
import re
import statistics
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import msgspec  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from cloud_bridge.protocol import (  # noqa: E402
    ChangeSetMsg,
    EventAck,
    Lockdown,
    ProtocolError,
    Provision,
    Rebirth,
    RebirthAction,
    Resync,
    RotateKey,
    SetDoorMode,
    Signed,
    SignedCommand,
    SignedMsg,
    SnapshotChunk,
    SnapshotManifest,
    Unlock,
    check_depth,
    decode_command,
    decode_command_body,
    decode_downlink,
    decode_event_ack,
    decode_provision,
    encode,
    peek_ref,
)
from cloud_bridge.signing import DOWNLINK_DOMAIN, public_bytes, sign_command, sign_downlink  # noqa: E402
from edge.model import (  # noqa: E402
    Assignment,
    ChangeSet,
    Credential,
    CredentialStatus,
    Door,
    DoorMode,
    Group,
    Interval,
    PutCredential,
    PutDoor,
    PutGroup,
    PutSchedule,
    PutUser,
    Schedule,
    Snapshot,
    User,
)

SITE, GW = "soak", "gw1"
OTHER_GW = "another-gateway-of-the-site"
BACKDOOR = range(666_000, 666_100)


def emit(metric: str, value: float, unit: str, **params: Any) -> None:
    print(json.dumps({"metric": metric, "value": round(value, 4), "unit": unit, "params": params}), flush=True)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- seeds -------------------------------------------------------------------------------------------------


def backdoor_change_set(frm: int = 1) -> ChangeSet:
    when = datetime(2026, 1, 1, tzinfo=UTC)
    office = Schedule(id="office", intervals=[Interval(day=d, start="08:00", end="18:00") for d in range(5)],
                      holidays=[when.date()])  # fmt: skip
    return ChangeSet(from_version=frm, to_version=frm + 1, changes=[
        PutSchedule(schedule=office),
        PutDoor(door=Door(id="front", mode=DoorMode.UNLOCKED)),
        PutDoor(door=Door(id="lab", mode=DoorMode.FIRST_CARD, unlock_schedule="office")),
        PutGroup(group=Group(id="all", doors=["front", "lab"], schedule="office")),
        PutUser(user=User(id="mallory", valid_from=when, assignments=[Assignment(group="all", valid_until=when)])),
        *[PutCredential(credential=Credential(card=c, user="mallory", valid_until=when)) for c in BACKDOOR[:3]],
        PutCredential(credential=Credential(card=BACKDOOR[3], user="mallory", status=CredentialStatus.SUSPENDED)),
    ])  # fmt: skip


def backdoor_chunk(transfer: str = "t-evil", version: int = 9) -> SnapshotChunk:
    cs = backdoor_change_set()
    return SnapshotChunk(
        id=transfer, version=version, index=0, count=2,
        doors=[Door(id="front", mode=DoorMode.UNLOCKED)],
        groups=[Group(id="all", doors=["front"])],
        users=[User(id="mallory", assignments=[Assignment(group="all")])],
        credentials=[c.credential for c in cs.changes if isinstance(c, PutCredential)],
    )  # fmt: skip


def downlink_msgs() -> list[SignedMsg]:
    return [
        ChangeSetMsg(id="cs-evil-1", change_set=backdoor_change_set()),
        SnapshotManifest(id="t-evil", version=9, count=2, hashes=[os.urandom(32), os.urandom(32)], size=4096),
        Rebirth(),
        EventAck(upto_seq=2**40, ts=4_000_000_000.0, ref="0123456789abcdef"),
    ]


def actions(attacker_pub: bytes) -> list[Any]:
    return [Unlock(door="front", seconds=3600), SetDoorMode(door="front", mode=DoorMode.UNLOCKED),
            Lockdown(active=True), Resync(), RebirthAction(), RotateKey(new_public_key=attacker_pub.hex())]  # fmt: skip


def seeds(key: Ed25519PrivateKey, *, gateway: str = GW) -> dict[str, list[bytes]]:
    """Valid encoded messages by downlink topic, every kind, MessagePack and JSON. `key` signs them."""
    out: dict[str, list[bytes]] = {"rights": [], "events/ack": [], "command": [], "body": []}
    for enc in ("msgpack", "json"):
        for m in downlink_msgs():
            s = sign_downlink(key, m, site=SITE, gateway=gateway, encoding=enc)  # type: ignore[arg-type]
            leaf = "events/ack" if isinstance(m, EventAck) else "rights"
            out[leaf] += [encode(s, enc), encode(m, enc)]  # type: ignore[arg-type]
            out["body"].append(s.body)
        out["rights"].append(encode(backdoor_chunk(), enc))  # type: ignore[arg-type]
        for a in actions(public_bytes(key)):
            cmd, sc = sign_command(key, site=SITE, gateway=gateway, action=a, operator="mallory",
                                   encoding=enc)  # type: ignore[arg-type]  # fmt: skip
            out["command"] += [encode(sc, enc), encode(cmd, enc), encode(SignedCommand(body=sc.body), enc)]  # type: ignore[arg-type]
            out["body"].append(sc.body)
    return out


# --- the mutator -------------------------------------------------------------------------------------------

SPECIAL_BYTES = [b"\xc1", b"\xc0", b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff", b"\xdb\xff\xff\xff\xff",
                 b"\xcf\xff\xff\xff\xff\xff\xff\xff\xff", b"\xd3\x80\x00\x00\x00\x00\x00\x00\x00",
                 b"\xcb\x7f\xf0\x00\x00\x00\x00\x00\x00", b"\xcb\x7f\xf8\x00\x00\x00\x00\x00\x00", b"\xc7\xff\x01",
                 b"\xd6\xff\x00\x00\x00\x00", b'"', b"\\", b"[", b"{", b"}", b"]", b",", b":", b"\x00", b"\xff",
                 b"\\u0000", b"\\ud800", b"\xed\xa0\x80", b"null", b"1e400", b"-"]  # fmt: skip
_INTS = [0, -1, 1, 2**31, 2**32, 2**53 - 1, 2**53, 2**63 - 1, 2**63, 2**64 - 1, -(2**63), -(2**53)]
_FLOATS = [0.0, -0.0, 1e308, -1e308, 5e-324, float("inf"), float("-inf"), float("nan"), 1e12, 5e9, 1.5]
_JSON_NUMS = [b"1" * 400, b"1e400", b"-1e400", b"18446744073709551616", b"9007199254740993", b"-9223372036854775809",
              b"NaN", b"Infinity", b"-0", b"1.0e-400", b"0x10", b"01"]  # fmt: skip
_STRINGS = ("front", "lab", "all", "office", "mallory", "bob", "nobody", "x" * 64, "08:00", "24:00", "18:00",
            "00:00", "2026-01-01T00:00:00Z", "2019-12-31", "unlocked", "locked", "revoked", "lost", "h10302",
            "csn56", "Europe/Berlin", "Mars/Base")  # fmt: skip
_JSON_NUM = re.compile(rb"(?<=[:\[,])-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?")


def _leaves(tree: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [path]
    if isinstance(tree, dict):
        for k, v in tree.items():
            out += _leaves(v, (*path, k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            out += _leaves(v, (*path, i))
    return out


def _get(tree: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        tree = tree[p]
    return tree


def _put(tree: Any, path: tuple[Any, ...], value: Any) -> Any:
    """A copy of `tree` with the node at `path` replaced (containers copied along the path only)."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    c: Any = dict(tree) if isinstance(tree, dict) else list(tree)
    c[head] = _put(tree[head], rest, value)
    return c


class Seed:
    def __init__(self, data: bytes, kind: str = "") -> None:
        self.data, self.kind = data, kind
        self.json = data[:1] == b"{"
        self.tree = msgspec.json.decode(data) if self.json else msgspec.msgpack.decode(data)
        self.paths = _leaves(self.tree)


class Mutator:
    """Turns valid seeds into near-valid and invalid payloads (see the module doc)."""

    def __init__(self, rng: random.Random, pool: list[bytes] | dict[str, list[bytes]]) -> None:
        self.rng = rng
        by_kind = pool if isinstance(pool, dict) else {"": pool}
        self.seeds = [Seed(d, k) for k, ds in by_kind.items() for d in ds]
        self.last: Seed = self.seeds[0]
        self.ops: list[Callable[[Seed], bytes]] = [
            self.flip, self.flip, self.truncate, self.insert, self.delete, self.duplicate, self.splice,
            self.nest, self.structured, self.structured, self.structured, self.typed, self.typed, self.json_number,
            self.inner, self.inner, self.stack,
        ]  # fmt: skip

    def __call__(self) -> bytes:
        s = self.last = self.rng.choice(self.seeds)
        return self.rng.choice(self.ops)(s)

    def _bytes_op(self, data: bytes) -> bytes:
        s = Seed.__new__(Seed)
        s.data, s.json = data, data[:1] == b"{"
        return self.rng.choice([self.flip, self.truncate, self.insert, self.delete, self.duplicate])(s)

    def flip(self, s: Seed) -> bytes:
        b = bytearray(s.data)
        for _ in range(self.rng.choice((1, 1, 2, 4, 8))):
            i = self.rng.randrange(len(b))
            b[i] = b[i] ^ (1 << self.rng.randrange(8)) if self.rng.random() < 0.5 else self.rng.randrange(256)
        return bytes(b)

    def truncate(self, s: Seed) -> bytes:
        return s.data[: self.rng.randrange(len(s.data))]

    def insert(self, s: Seed) -> bytes:
        i = self.rng.randrange(len(s.data) + 1)
        r = self.rng.random()
        ins = self.rng.choice(SPECIAL_BYTES) if r < 0.6 else self.rng.randbytes(self.rng.randrange(1, 16))
        return s.data[:i] + ins + s.data[i:]

    def delete(self, s: Seed) -> bytes:
        i = self.rng.randrange(len(s.data))
        return s.data[:i] + s.data[i + self.rng.randrange(1, 32) :]

    def duplicate(self, s: Seed) -> bytes:
        i = self.rng.randrange(len(s.data))
        j = min(len(s.data), i + self.rng.randrange(1, 64))
        return s.data[:j] + s.data[i:j] * self.rng.randrange(1, 4) + s.data[j:]

    def splice(self, s: Seed) -> bytes:
        o = self.rng.choice(self.seeds).data
        return s.data[: self.rng.randrange(len(s.data) + 1)] + o[self.rng.randrange(len(o) + 1) :]

    def nest(self, s: Seed) -> bytes:
        d = self.rng.choice((20, 31, 32, 33, 100, 1000, 5000))
        if s.json:
            return b'{"zz":' + b"[" * d + b"]" * d + b"," + s.data[1:]
        if 0x80 <= s.data[0] < 0x8F:  # fixmap: one more key, nested arrays, in front
            return bytes([s.data[0] + 1]) + b"\xa2zz" + b"\x91" * d + b"\xc0" + s.data[1:]
        return b"\x91" * d + s.data

    def _value(self, old: Any) -> Any:
        r = self.rng.random()
        if r < 0.3:
            return self.rng.choice(_INTS)
        if r < 0.45:
            return self.rng.choice(_FLOATS)
        if r < 0.6:
            long = "a" * (100_000 if self.rng.random() < 0.05 else 300)
            return self.rng.choice(("", "x" * 65, "é" * 70, "\x00", long, "signed", "change_set", "snapshot_chunk",
                                    "events_ack", "command", "front", "2026-13-45"))  # fmt: skip
        if r < 0.7:
            return self.rng.choice((None, True, [], {}, b"", b"\x00" * 32, os.urandom(64)))
        if r < 0.8:
            v: Any = 0
            for _ in range(self.rng.choice((31, 32, 33, 40))):
                v = [v]
            return v
        if r < 0.9 and isinstance(old, dict) and old:
            k = self.rng.choice(list(old))
            c = dict(old)
            del c[k]
            if self.rng.random() < 0.5:
                c[self.rng.choice((1, "type", "zz", "id"))] = old[k]
            return c
        o = self.rng.choice(self.seeds)
        return _get(o.tree, self.rng.choice(o.paths))

    def _encode(self, s: Seed, tree: Any) -> bytes:
        try:
            if s.json:
                return msgspec.json.encode(tree)
            return msgspec.msgpack.encode(tree)
        except (TypeError, OverflowError, ValueError, msgspec.EncodeError):
            return s.data

    def _same_kind(self, old: Any) -> Any:
        """A value of the same JSON type as `old` (so that more mutants pass the schema and reach the store)."""
        if isinstance(old, bool):
            return not old
        if isinstance(old, int):
            return self.rng.choice((*_INTS, 0, 1, 7, 100, 666_000, old + 1, old - 1))
        if isinstance(old, float):
            return self.rng.choice((*_FLOATS, old + 86400 * 365, old - 1))
        if isinstance(old, str):
            return self.rng.choice(_STRINGS)
        if isinstance(old, list) and old:
            return self.rng.choice(([], old + old, old[:1], [old[0]] * 3))
        if isinstance(old, dict) and old:
            return {k: v for k, v in old.items() if k != self.rng.choice(list(old))}
        return self._value(old)

    def typed(self, s: Seed) -> bytes:
        tree = s.tree
        for _ in range(self.rng.choice((1, 1, 2, 3))):
            path = self.rng.choice(s.paths)
            try:
                tree = _put(tree, path, self._same_kind(_get(tree, path)))
            except (KeyError, IndexError, TypeError):
                break
        return self._encode(s, tree)

    def structured(self, s: Seed) -> bytes:
        path = self.rng.choice(s.paths)
        return self._encode(s, _put(s.tree, path, self._value(_get(s.tree, path))))

    def json_number(self, s: Seed) -> bytes:
        data = s.data if s.json else msgspec.json.encode(s.tree)
        nums = list(_JSON_NUM.finditer(data))
        if not nums:
            return self.flip(s)
        m = self.rng.choice(nums)
        return data[: m.start()] + self.rng.choice(_JSON_NUMS) + data[m.end() :]

    def inner(self, s: Seed) -> bytes:
        """Mutate the signed body inside an envelope (MessagePack bin, JSON base64)."""
        tree = s.tree
        if not isinstance(tree, dict) or "body" not in tree:
            return self.structured(s)
        body = tree["body"]
        raw = base64.b64decode(body) if isinstance(body, str) else body
        new = self._bytes_op(raw) if self.rng.random() < 0.5 else self._structured_bytes(raw)
        return self._encode(s, {**tree, "body": base64.b64encode(new).decode() if s.json else new})

    def _structured_bytes(self, raw: bytes) -> bytes:
        try:
            return self.structured(Seed(raw))
        except (msgspec.DecodeError, IndexError):
            return raw

    def stack(self, s: Seed) -> bytes:
        """Two mutations in a row."""
        first = self.rng.choice([self.structured, self.flip, self.insert])(s)
        return self._bytes_op(first) if first else first


# --- (a) in process --------------------------------------------------------------------------------------


def _peek(data: bytes) -> None:
    r = peek_ref(data)
    if r is not None and not (isinstance(r, str) and 0 < len(r) <= 64):
        raise AssertionError(f"peek_ref returned {r!r}")


DECODERS: dict[str, Callable[[bytes], Any]] = {
    "decode_downlink": decode_downlink, "decode_event_ack": decode_event_ack, "decode_command": decode_command,
    "decode_provision": decode_provision, "decode_command_body": decode_command_body, "check_depth": check_depth,
    "peek_ref": _peek,
}  # fmt: skip
#: The decoders the link runs on a payload of each topic (and the body decoders for signed bodies); one
#: input in ten goes through all of them.
ROUTES: dict[str, tuple[str, ...]] = {
    "rights": ("decode_downlink", "peek_ref"), "events/ack": ("decode_event_ack",),
    "command": ("decode_command", "decode_command_body", "peek_ref"), "body": ("decode_provision",
    "decode_command_body", "check_depth"),
}  # fmt: skip


def save_crash(crash_dir: Path, name: str, sig: str, data: bytes) -> None:
    """Keep the first input of each kind of crash (hex, with the traceback) for reproduction."""
    crash_dir.mkdir(parents=True, exist_ok=True)
    f = crash_dir / f"{name}.hex"
    f.write_text(f"{sig}\n{data.hex()}\n{traceback.format_exc()}")
    log(f"CRASH {sig} (input saved in {f})")


class Fuzz:
    def __init__(self, crash_dir: Path) -> None:
        self.crash_dir = crash_dir
        self.crashes: Counter[str] = Counter()
        self.decoded: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()
        self.inputs = 0
        self.slowest = (0, b"")

    def one(self, data: bytes, kind: str = "", everything: bool = True) -> None:
        self.inputs += 1
        t0 = time.perf_counter_ns()
        for name in DECODERS if everything or not kind else ROUTES[kind]:
            env = self._call(name, DECODERS[name], data)
            # what the link decodes next (after the signature verified): the envelope's body
            body = getattr(env, "body", None)
            if isinstance(body, bytes) and body:
                inner = decode_command_body if name == "decode_command" else decode_provision
                self._call(f"{name}.body", inner, body)
        dt = time.perf_counter_ns() - t0
        if dt > self.slowest[0]:
            self.slowest = (dt, data)

    def _call(self, name: str, fn: Callable[[bytes], Any], data: bytes) -> Any:
        try:
            out = fn(data)
        except ProtocolError:
            self.refused[name] += 1
        except Exception as e:
            sig = f"{name}: {type(e).__name__}: {str(e)[:80]}"
            self.crashes[sig] += 1
            if self.crashes[sig] == 1:
                save_crash(self.crash_dir, f"crash-{len(self.crashes):03d}", sig, data)
        else:
            self.decoded[name] += 1
            return out
        return None


def in_process(n: int, seed: int, crash_dir: Path) -> Fuzz:
    rng = random.Random(seed)
    key = Ed25519PrivateKey.generate()
    s = seeds(key)
    mut = Mutator(rng, s)
    fz = Fuzz(crash_dir)
    for seed in mut.seeds:  # the seeds themselves decode
        fz.one(seed.data)
    t0 = time.perf_counter()
    for i in range(n - len(mut.seeds)):
        data = mut()
        fz.one(data, mut.last.kind, rng.random() < 0.1)
        if i % 100_000 == 99_999:
            log(f"in-process: {i + 1} inputs, {time.perf_counter() - t0:.0f} s, {sum(fz.crashes.values())} crashes")
    fz.seconds = time.perf_counter() - t0  # type: ignore[attr-defined]
    return fz


# --- (c) in process: decoded change sets and snapshots into a real Store -----------------------------------


def store_seeds() -> dict[str, list[bytes]]:
    """Signed bodies (as `decode_provision` reads them) of change sets and snapshot chunks with every kind of
    change, MessagePack and JSON."""
    from edge.model import DeleteCredential, DeleteDoor, DeleteGroup, DeleteSchedule, DeleteUser

    cs = backdoor_change_set(0)
    more = ChangeSet(from_version=1, to_version=2, changes=[
        *cs.changes, PutDoor(door=Door(id="lab", mode=DoorMode.CARD_AND_PIN, pin_schedule="office")),
        PutUser(user=User(id="bob", offline_access=True, emergency=True, assignments=[Assignment(group="all")])),
        PutCredential(credential=Credential(card=7, user="bob", format="h10302", facility=12)),
        DeleteCredential(card=BACKDOOR[0]), DeleteUser(id="nobody"), DeleteGroup(id="g9"), DeleteDoor(id="d9"),
        DeleteSchedule(id="s9"),
    ])  # fmt: skip
    out: dict[str, list[bytes]] = {"body": [], "chunk": []}
    for enc in ("msgpack", "json"):
        for m in (ChangeSetMsg(id="c1", change_set=cs), ChangeSetMsg(id="c2", change_set=more)):
            out["body"].append(encode(Provision(site=SITE, gateway=GW, issued=time.time(), msg=m), enc))  # type: ignore[arg-type]
        out["chunk"].append(encode(backdoor_chunk(), enc))  # type: ignore[arg-type]
    return out


async def store_fuzz(n: int, seed: int, crash_dir: Path) -> dict[str, Any]:
    """Mutated change sets and snapshots that still decode are applied to a real Store, as the link would
    (versions made to follow the store's in 80 % of them): each must apply, or raise `ChangeRejected`
    (`VersionGap` included) with nothing applied. Anything else is a crash."""
    from cloud_bridge.protocol import snapshot_of
    from edge.errors import ChangeRejected
    from edge.store import Store

    rng = random.Random(seed + 3)
    mut = Mutator(rng, store_seeds())
    mut.ops = [mut.typed, mut.typed, mut.typed, mut.structured, mut.json_number]  # mostly still decodable
    outcomes: Counter[str] = Counter()
    crashes: Counter[str] = Counter()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="soak-store-") as d:
        async with Store(Path(d) / "rights.db", "UTC", synchronous="OFF") as store:
            for _ in range(n):
                data = mut()
                try:
                    msg: Any = decode_downlink(data) if mut.last.kind == "chunk" else decode_provision(data).msg
                except ProtocolError:
                    outcomes["undecodable"] += 1
                    continue
                v = store.version
                try:
                    if isinstance(msg, SnapshotChunk):
                        snap = snapshot_of([msg])
                        if rng.random() < 0.8:
                            snap = msgspec.structs.replace(snap, version=v + 1)
                        r = await store.replace(snap)
                    elif isinstance(msg, ChangeSetMsg):
                        cs = msg.change_set
                        if rng.random() < 0.8 or not (cs.from_version >= 0 and cs.to_version <= 2**53 - 1):
                            cs = msgspec.structs.replace(cs, from_version=v, to_version=v + 1)
                        r = await store.apply(cs)
                    else:
                        outcomes["other_message"] += 1
                        continue
                    outcomes["applied" if r.applied else "not_applied"] += 1
                except ChangeRejected as e:
                    outcomes[f"rejected.{e.code}"] += 1
                    if store.version != v:
                        crashes["version moved by a rejected change"] += 1
                except Exception as e:
                    sig = f"store: {type(e).__name__}: {str(e)[:80]}"
                    crashes[sig] += 1
                    if crashes[sig] == 1:
                        save_crash(crash_dir, f"store-crash-{len(crashes):03d}", sig, data)
    return {"inputs": n, "outcomes": dict(outcomes), "crashes": dict(crashes), "seconds": time.perf_counter() - t0}


# --- (b) live: the attacker -----------------------------------------------------------------------


def forged_pool(site_key: Ed25519PrivateKey, mallory: Ed25519PrivateKey) -> tuple[dict[str, list[bytes]], list[bytes]]:
    """Payloads an attacker can make: signed by mallory / unsigned (by topic), and site-key-signed bodies for
    another gateway (re-signed after mutation)."""
    forged = seeds(mallory)
    other: list[bytes] = []
    for enc in ("msgpack", "json"):
        for m in downlink_msgs():
            other.append(encode(Provision(site=SITE, gateway=OTHER_GW, issued=time.time(), msg=m), enc))  # type: ignore[arg-type]
    return forged, other


def _targets_us(body: bytes) -> bool:
    """Whether a mutated body signed with the site key would be a genuine message for this gateway."""
    for dec in (decode_provision, decode_command_body):
        try:
            p = dec(body)
        except ProtocolError:
            continue
        if p.gateway == GW:
            return True
    return False


# --- (b) live: the real cloud (same process as the publisher, not the gateway's) ---------------------------

INITIAL_CARDS, REVOKED_CARDS, TOGGLE_CARDS = range(1000, 1020), range(2000, 2020), range(4000, 4010)
NEW_CARD_BASE = 5_000_000


def expected_grant(card: int, version: int) -> bool:
    """What a tap on `card` at door front must decide at rights `version` (the real cloud's provisioning)."""
    if card in INITIAL_CARDS:
        return True
    if card in TOGGLE_CARDS:
        return card != TOGGLE_CARDS[version % 10]
    return 2 <= card - NEW_CARD_BASE <= version


def _creds(version: int) -> list[Credential]:
    out = [Credential(card=c, user=f"u{c % 10}") for c in INITIAL_CARDS]
    out += [Credential(card=c, user=f"u{c % 10}", status=CredentialStatus.REVOKED) for c in REVOKED_CARDS]
    out += [Credential(card=c, user="u0", status=CredentialStatus.ACTIVE if expected_grant(c, version)
                       else CredentialStatus.SUSPENDED) for c in TOGGLE_CARDS]  # fmt: skip
    return out + [Credential(card=NEW_CARD_BASE + k, user="u1") for k in range(2, version + 1)]


def real_snapshot(version: int) -> Snapshot:
    return Snapshot(version=version, doors=[Door(id="front"), Door(id="lab")], groups=[Group(id="g", doors=["front"])],
                    users=[User(id=f"u{i}", assignments=[Assignment(group="g")]) for i in range(10)],
                    credentials=_creds(version))  # fmt: skip


def real_change_set(v: int) -> ChangeSet:
    """v -> v+1 (v = 0: the whole site)."""
    if v == 0:
        s = real_snapshot(1)
        changes: list[Any] = [PutDoor(door=d) for d in s.doors] + [PutGroup(group=g) for g in s.groups]
        changes += [PutUser(user=u) for u in s.users] + [PutCredential(credential=c) for c in s.credentials]
        return ChangeSet(from_version=0, to_version=1, changes=changes)
    nxt = v + 1
    return ChangeSet(from_version=v, to_version=nxt, changes=[
        PutCredential(credential=Credential(card=TOGGLE_CARDS[v % 10], user="u0")),
        PutCredential(credential=Credential(card=TOGGLE_CARDS[nxt % 10], user="u0", status=CredentialStatus.SUSPENDED)),
        PutCredential(credential=Credential(card=NEW_CARD_BASE + nxt, user="u1")),
    ])  # fmt: skip


async def cloud_process(args: argparse.Namespace) -> None:
    """The subprocess: the real cloud (provisioning every 0.2 s, acking events) and the attacker."""
    import aiomqtt

    from cloud_bridge.cloud import CloudPeer
    from cloud_bridge.topics import Leaf, Topics

    site_key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(sys.stdin.readline().strip()))
    mallory = Ed25519PrivateKey.generate()
    rng = random.Random(args.seed + 1)
    forged, other = forged_pool(site_key, mallory)
    muts = {leaf: Mutator(rng, pool) for leaf, pool in forged.items() if leaf != "body"}
    other_mut = Mutator(rng, other)
    topics = Topics(SITE, GW)
    sent: Counter[str] = Counter()
    skipped = 0
    prov: Counter[str] = Counter()
    stopping = asyncio.Event()

    def make() -> tuple[str, bytes]:
        nonlocal skipped
        if rng.random() < 0.15:  # the site key's signature over a mutated body for another gateway
            while _targets_us(body := other_mut()):
                skipped += 1
            leaf = "events/ack" if rng.random() < 0.3 else "rights"
            s = Signed(body=body, sig=site_key.sign(DOWNLINK_DOMAIN + body), key_id="x")
            return leaf, encode(s, "json" if rng.random() < 0.3 else "msgpack")
        leaf = rng.choices(("rights", "events/ack", "command"), (0.5, 0.25, 0.25))[0]
        if rng.random() < 0.1:
            return leaf, rng.choice(forged[leaf])  # unmutated forgeries too
        return leaf, muts[leaf]()

    async def provision(cloud: CloudPeer) -> None:
        v = 1
        while not stopping.is_set():
            await asyncio.sleep(0.2)
            try:
                if v % 25 == 0:
                    r = await cloud.send_snapshot(real_snapshot(v + 1), timeout=120)
                    prov["snapshots"] += 1
                else:
                    r = await cloud.send_change_set(real_change_set(v), timeout=120)
                    prov["change_sets"] += 1
            except TimeoutError:  # no answer in 2 min (resent every 2 s): counted, and tried again
                prov["unanswered_2min"] += 1
                log(f"cloud: provisioning {v} -> {v + 1} unanswered for 120 s")
                continue
            if not (r.ok and r.version == v + 1):
                prov["not_applied"] += 1
                log(f"cloud: provisioning {v} -> {v + 1} answered {r}")
            v = max(v, r.version)
        prov["version"] = v

    async with (
        CloudPeer(host=args.host, port=args.port, site=SITE, gateway=GW, signing_key=site_key, resend_s=2.0) as cloud,
        aiomqtt.Client(args.host, args.port, identifier=f"mallory-{os.getpid()}", timeout=30) as client,
    ):
        await cloud.wait_online()
        r = await cloud.send_change_set(real_change_set(0))
        assert r.ok and r.version == 1, r
        prov_task = asyncio.get_running_loop().create_task(provision(cloud))
        print(json.dumps({"ready": True}), flush=True)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := await reader.readline():
            cmd = json.loads(line)
            if cmd["op"] == "fuzz":
                n, t0 = cmd["n"], loop.time()
                for i in range(0, n, 10):
                    batch = [make() for _ in range(min(10, n - i))]
                    await asyncio.gather(*(client.publish(topics[Leaf(leaf)], data, qos=1) for leaf, data in batch))
                    sent.update(leaf for leaf, _ in batch)
                    await asyncio.sleep(max(0.0, t0 + (i + 10) / args.rate - loop.time()))
                print(json.dumps({"done": n, "seconds": loop.time() - t0}), flush=True)
            elif cmd["op"] == "wide":  # largest-allowed messages of empty arrays, the costliest to check
                n, t0 = cmd["n"], loop.time()
                k = 256 * 1024 - 5
                wide = b"\xdd" + k.to_bytes(4, "big") + b"\x90" * k
                for i in range(n):
                    await client.publish(topics[Leaf.COMMAND if i % 2 else Leaf.EVENTS_ACK], wide, qos=1)
                    await asyncio.sleep(max(0.0, t0 + (i + 1) / cmd["rate"] - loop.time()))
                print(json.dumps({"done": n, "seconds": loop.time() - t0}), flush=True)
            elif cmd["op"] == "stop":
                stopping.set()
                await prov_task
                print(json.dumps({"stopped": True}), flush=True)
            elif cmd["op"] == "report":
                seqs = {e.seq for e in cloud.events.values()}
                top = max(seqs, default=0)
                out = {"sent": dict(sent), "skipped_self_targeted": skipped, "provisioning": dict(prov),
                       "events": len(seqs), "max_seq": top, "missing": top - len(seqs),
                       "duplicates": cloud.duplicates, "have_upto": cloud.have_upto}  # fmt: skip
                print(json.dumps(out), flush=True)
                return


# --- (b) live: the gateway (this process) ------------------------------------------------------------------


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))] if s else float("nan")


class Child:
    """The cloud + attacker subprocess, driven by JSON lines."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def send(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd).encode() + b"\n")
        await self.proc.stdin.drain()

    async def recv(self, limit_s: float = 900) -> dict[str, Any]:
        assert self.proc.stdout is not None
        async with asyncio.timeout(limit_s):
            line = await self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the cloud/attacker process exited")
        out: dict[str, Any] = json.loads(line)
        return out


async def live(args: argparse.Namespace, n_live: int) -> dict[str, Any]:
    from cloud_bridge.link import CloudLink, LinkConfig
    from edge.decision import Decider
    from edge.journal import Journal
    from edge.store import Store
    from tests.broker import RecordingCommands, birth_info
    from tests.mosquitto import Mosquitto

    site_key = Ed25519PrivateKey.generate()
    rounds = args.rounds
    per_round = n_live // rounds
    rng = random.Random(args.seed + 2)
    with tempfile.TemporaryDirectory(prefix="soak-fuzz-") as d:
        tmp = Path(d)
        broker = Mosquitto(tmp / "broker")
        broker.start()
        state = tmp / "gw"
        cfg = LinkConfig(site=SITE, gateway=GW, host=broker.host, port=broker.port, backoff_min_s=0.1,
                         backoff_max_s=0.5, synchronous="NORMAL")  # fmt: skip
        holder: list[CloudLink] = []
        commands = RecordingCommands({"front", "lab"})
        try:
            async with (
                Store(state / "rights.db", "UTC", synchronous="NORMAL") as store,
                Journal(state / "journal.db", link_up=lambda: bool(holder) and holder[0].online,
                        synchronous="NORMAL") as journal,
                CloudLink(cfg, store=store, journal=journal, commands=commands, birth=birth_info,
                          site_public_key=public_bytes(site_key), state_dir=state) as link,
            ):  # fmt: skip
                holder.append(link)
                states: list[bool] = []
                link.on_state.append(states.append)
                clock_samples: list[tuple[float, float]] = []
                link.on_cloud_time.append(lambda ts, rtt: clock_samples.append((ts, time.time())))
                loop = asyncio.get_running_loop()
                link_task = loop.create_task(link.run(), name="link")
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, __file__, "--cloud-process", "--host", broker.host, "--port", str(broker.port),
                    "--rate", str(args.rate), "--seed", str(args.seed), stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE, cwd=ROOT,
                )  # fmt: skip
                child = Child(proc)
                assert proc.stdin is not None
                proc.stdin.write(site_key.private_bytes_raw().hex().encode() + b"\n")
                assert (await child.recv(60)).get("ready")

                decider = Decider(store.index)
                phase = ["setup"]
                lateness: dict[str, list[list[float]]] = {"baseline": [], "fuzz": [], "wide": []}
                wrong: Counter[str] = Counter()
                taps: Counter[str] = Counter()
                stop_taps = asyncio.Event()
                cards = [*INITIAL_CARDS, *REVOKED_CARDS, *TOGGLE_CARDS, *BACKDOOR[:4], 7_777_777]

                async def tapper() -> None:
                    while not stop_taps.is_set():
                        due = loop.time() + 0.005
                        await asyncio.sleep(max(0.0, due - loop.time()))
                        idx = store.index
                        v = idx.visible
                        card = rng.choice(cards) if rng.random() < 0.8 else NEW_CARD_BASE + v + rng.randrange(-1, 2)
                        decider.index = idx
                        dec = decider.decide("front", card, datetime.now(UTC))
                        journal.record("access.granted" if dec.granted else "access.denied", door="front",
                                       card=card, reason=str(dec.reason))  # fmt: skip
                        late = (loop.time() - due) * 1000
                        if phase[0] in lateness:
                            lateness[phase[0]][-1].append(late)
                            taps[phase[0]] += 1
                        if card in BACKDOOR and dec.granted:
                            wrong["backdoor_granted"] += 1
                        elif dec.granted != expected_grant(card, v):
                            wrong["known_card_decided_wrong"] += 1
                            log(f"wrong decision: card {card} at version {v}: {dec}")

                tap_task = loop.create_task(tapper(), name="taps")
                fuzz_seconds: list[float] = []
                for r in range(rounds):
                    # a fuzz phase, then a baseline phase of the same length (taps, provisioning, no fuzz)
                    phase[0] = "fuzz"
                    lateness["fuzz"].append([])
                    t0 = loop.time()
                    refused0 = link.stats["refused"]
                    await child.send(op="fuzz", n=per_round)
                    done = await child.recv()
                    # until the gateway has answered the last of them (the broker may still hold some)
                    last, still = link.stats["refused"], 0
                    while still < 5:
                        await asyncio.sleep(0.1)
                        still = still + 1 if link.stats["refused"] == last else 0
                        last = link.stats["refused"]
                    fuzz_seconds.append(loop.time() - t0)
                    log(f"round {r + 1}/{rounds}: {per_round} payloads sent in {done['seconds']:.1f} s, "
                        f"{last - refused0} refused, link stats {link.stats}")  # fmt: skip
                    phase[0] = "baseline"
                    lateness["baseline"].append([])
                    await asyncio.sleep(fuzz_seconds[-1])
                # apart: the largest messages allowed on command and events/ack, 256 KiB of empty arrays
                phase[0] = "wide"
                lateness["wide"] = [[]]
                refused0 = link.stats["refused"]
                t_wide = loop.time()
                await child.send(op="wide", n=args.wide, rate=2.0)
                await child.recv()
                while link.stats["refused"] < refused0 + args.wide:  # noqa: ASYNC110 (polls a counter)
                    await asyncio.sleep(0.1)
                wide_s = loop.time() - t_wide
                phase[0] = "drain"
                await child.send(op="stop")
                await child.recv()
                stop_taps.set()
                await tap_task
                await journal.flush()
                t0 = time.monotonic()
                while journal.depth > 0 and time.monotonic() - t0 < 120:  # noqa: ASYNC110 (polls a counter)
                    await asyncio.sleep(0.1)
                deaths = sum(1 for s in states[1:] if not s)  # before the link is stopped below
                await child.send(op="report")
                report = await child.recv()
                await proc.wait()
                link_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await link_task
                now = time.time()
                return {
                    "lateness": lateness, "wrong": wrong, "taps": taps, "fuzz_seconds": fuzz_seconds,
                    "link_deaths": deaths,
                    "sessions": 1 + sum(1 for s in states[1:] if s), "handler_errors": link.stats["handler_errors"],
                    "stats": dict(link.stats), "commands_executed": len(commands.calls),
                    "forged_clock_samples": sum(1 for ts, at in clock_samples if abs(ts - at) > 30),
                    "clock_samples": len(clock_samples), "journal_left": journal.depth,
                    "events_recorded": journal.next_seq - 1, "cloud": report, "version": store.version,
                    "backdoor_in_store": sum(1 for c in BACKDOOR if store.index.cred(c) is not None),
                    "front_mode": str(store.index.tables.doors["front"].mode), "at": now, "wide": args.wide,
                    "wide_s": wide_s,
                }  # fmt: skip
        finally:
            broker.stop()


# --- main --------------------------------------------------------------------------------------------------


def report_in_process(fz: Fuzz, seed: int) -> None:
    crashes = sum(fz.crashes.values())
    retimed = min(_retime(fz.slowest[1]) for _ in range(3))
    emit("fuzz_decoder_inputs", fz.inputs, "inputs", seed=seed, seconds=round(fz.seconds, 1),  # type: ignore[attr-defined]
         rate_per_s=round(fz.inputs / fz.seconds), decoded=dict(fz.decoded), refused=dict(fz.refused),  # type: ignore[attr-defined]
         note="each input goes through the decoders of its seed's topic (1 in 10 through all of them), and "
              "the body of each envelope that decodes through the body decoder")  # fmt: skip
    emit("fuzz_decoder_crashes", crashes, "count", kinds=dict(fz.crashes), inputs=fz.inputs)
    emit("fuzz_decoder_slowest_input", retimed, "ms", wall_ms_first=round(fz.slowest[0] / 1e6, 3),
         size=len(fz.slowest[1]), note="re-timed (min of 3) through every decoder; the first figure includes "
         "whatever else the machine did")  # fmt: skip


def _retime(data: bytes) -> float:
    t0 = time.perf_counter_ns()
    for fn in DECODERS.values():
        with contextlib.suppress(ProtocolError, Exception):
            fn(data)
    return (time.perf_counter_ns() - t0) / 1e6


def report_live(res: dict[str, Any], n_live: int, rate: float) -> None:
    lat = res["lateness"]
    base = [x for r in lat["baseline"] for x in r]
    fuzz = [x for r in lat["fuzz"] for x in r]
    per_round = {k: [round(pct(r, 0.99), 3) for r in v] for k, v in lat.items()}
    cloud = res["cloud"]
    wrong = res["wrong"]
    wrong_total = sum(wrong.values()) + res["commands_executed"] + res["forged_clock_samples"] + \
        res["backdoor_in_store"] + (res["front_mode"] != "normal")  # fmt: skip
    common = {"payloads": n_live, "rate_per_s": rate, "rounds": len(lat["fuzz"])}
    emit("fuzz_live_payloads", sum(cloud["sent"].values()), "payloads", sent=cloud["sent"], **common,
         skipped_self_targeted=cloud["skipped_self_targeted"], fuzz_seconds=[round(s, 1) for s in res["fuzz_seconds"]],
         link_stats=res["stats"])  # fmt: skip
    emit("fuzz_live_link_deaths", res["link_deaths"], "count", sessions=res["sessions"], **common)
    emit("fuzz_live_handler_errors", res["handler_errors"], "count", **common)
    emit("fuzz_live_wrong_grants", wrong_total, "count", decisions=dict(wrong), forged_commands_executed=res[
        "commands_executed"], forged_clock_samples=res["forged_clock_samples"], clock_samples=res["clock_samples"],
        backdoor_cards_in_store=res["backdoor_in_store"], front_door_mode=res["front_mode"], taps=dict(res["taps"]),
        rights_version=res["version"], provisioning=cloud["provisioning"], **common)  # fmt: skip
    emit("fuzz_live_events_lost", cloud["missing"] + res["journal_left"], "count", recorded=res["events_recorded"],
         at_cloud=cloud["events"], max_seq_at_cloud=cloud["max_seq"], left_in_journal=res["journal_left"],
         duplicates=cloud["duplicates"])  # fmt: skip
    for name, xs in (("baseline", base), ("fuzz", fuzz)):
        emit(f"fuzz_live_tap_p99.{name}", pct(xs, 0.99), "ms", p50_ms=round(pct(xs, 0.5), 3),
             max_ms=round(max(xs), 3), taps=len(xs), p99_per_round=per_round[name],
             median_round_p99=round(statistics.median(per_round[name]), 3),
             what="lateness of a tap decision after its 5 ms timer, live index, journalled")  # fmt: skip
    wide = lat["wide"][0]
    if wide:
        emit("fuzz_live_tap_p99.wide", pct(wide, 0.99), "ms", p50_ms=round(pct(wide, 0.5), 3),
             max_ms=round(max(wide), 3), taps=len(wide), messages=res["wide"], rate_per_s=2.0,
             seconds_until_all_refused=round(res["wide_s"], 1),
             what="the same while 256 KiB messages of empty MessagePack arrays (the most costly to depth-check) "
                  "arrive on command and events/ack, 2 a second; not part of the fuzz figures")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="< 60 s: 50,000 payloads in process, 3,000 live")
    p.add_argument("--total", type=int, help="payloads in all (default 10^6; quick 53,000)")
    p.add_argument("--live", type=int, help="of which through the broker (default 100,000; quick 3,000)")
    p.add_argument("--rate", type=float, default=1000.0, help="live payloads per second (default 1000)")
    p.add_argument("--rounds", type=int, help="baseline/fuzz round pairs (default 4; quick 2)")
    p.add_argument("--store", type=int, help="mutated change sets/snapshots applied to a Store (default 5,000; "
                   "quick 500)")
    p.add_argument("--wide", type=int, help="256 KiB worst-case messages after the fuzz rounds (default 20; quick 6)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--crash-dir", type=Path, default=Path(tempfile.gettempdir()) / "soak-fuzz-crashes")
    p.add_argument("--cloud-process", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--host", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    sys.setswitchinterval(0.0005)
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)  # refusals are expected; errors are not
    if args.cloud_process:
        asyncio.run(cloud_process(args))
        return
    live_n = args.live if args.live is not None else (3000 if args.quick else 100_000)
    total = args.total if args.total is not None else (53_000 if args.quick else 1_000_000)
    args.rounds = args.rounds or (2 if args.quick else 4)
    args.wide = args.wide if args.wide is not None else (6 if args.quick else 20)
    args.store = args.store if args.store is not None else (500 if args.quick else 5000)
    fz = in_process(max(0, total - live_n), args.seed, args.crash_dir)
    report_in_process(fz, args.seed)
    st = asyncio.run(store_fuzz(args.store, args.seed, args.crash_dir))
    emit("fuzz_store_crashes", sum(st["crashes"].values()), "count", inputs=st["inputs"], kinds=st["crashes"],
         outcomes=st["outcomes"], seconds=round(st["seconds"], 1),
         note="decoded mutated change sets / snapshot chunks applied to a real Store (not counted in the total)")
    if live_n:
        res = asyncio.run(live(args, live_n))
        report_live(res, live_n, args.rate)
    emit("fuzz_payloads_total", fz.inputs + live_n, "payloads", in_process=fz.inputs, live=live_n)


if __name__ == "__main__":
    main()
