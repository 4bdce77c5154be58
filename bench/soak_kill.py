"""Soak: SIGKILL at random moments during change sets, snapshots and journaling, N times (issue 11).

    .venv/bin/python bench/soak_kill.py [--quick] [--kills N] [--seed S]

A child process (forked from this one, so that a restart costs no interpreter start) opens a real `Store`
(rights.db) and a real `Journal` (journal.db), both with their default `synchronous=FULL`, and runs three
tasks at once until it is killed:

* rights: from version v it applies the change set v -> v+1 (80 %) or replaces everything by the snapshot of
  version v+1 (20 %). Version w's rights are: K marker cards `marker(w)` (all active, the markers of w-1
  deleted) and B ballast cards whose status is active for even w, suspended for odd w, so every change set
  rewrites K + K + B rows and a torn one shows as a partial marker range, stale markers or mixed ballast;
* journal: records events in bursts of 20 and flushes; after each flush it prints `durable <seq>` (every
  event up to that seq is on disk);
* acks: every ~30 ms it acknowledges up to a random durable seq like the cloud would (only what was flushed):
  prints `acking <upto>`, calls `Journal.ack`, prints `acked <upto>`.

The parent kills it with SIGKILL after a random delay (0-400 ms after it opened; 10 % of the kills during its
start, before it has opened), then checks the files through the real boot path (`Store`, `Journal`):

* half_applied: the rights are not exactly those of the version the store reports (see above);
* version_back: the version is below one seen before or below one the child printed as committed;
* lost_events: an event printed durable is missing, and no ack covering it had even been issued (events are
  released only by an ack); `acked_present` counts rows an ack that returned still shows (never expected);
  `seq_reused`: the journal would hand out a sequence number already printed durable.

Prints JSON lines: kills, half_applied, version_back, lost_events, seconds (and what the kills interrupted).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import select
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edge.index import STATUS_CODES  # noqa: E402
from edge.journal import Journal  # noqa: E402
from edge.model import (  # noqa: E402
    Assignment,
    ChangeSet,
    Credential,
    CredentialStatus,
    DeleteCredential,
    Door,
    Group,
    PutCredential,
    PutDoor,
    PutGroup,
    PutUser,
    Snapshot,
    User,
)
from edge.store import Store  # noqa: E402

K = 200  # marker cards per version
B = 1500  # ballast cards
BALLAST = range(100, 100 + B)


def emit(metric: str, value: float, unit: str, **params: Any) -> None:
    print(json.dumps({"metric": metric, "value": round(value, 4), "unit": unit, "params": params}), flush=True)


def marker(w: int) -> range:
    return range(1_000_000 + w * K, 1_000_000 + (w + 1) * K)


def ballast_status(w: int) -> CredentialStatus:
    return CredentialStatus.ACTIVE if w % 2 == 0 else CredentialStatus.SUSPENDED


def users(w: int) -> list[User]:
    return [User(id="m", name=f"v{w}", assignments=[Assignment(group="g")]), User(id="b")]


def change_set(v: int) -> ChangeSet:
    nxt = v + 1
    changes: list[Any] = []
    if v == 0:
        changes += [PutDoor(door=Door(id="d")), PutGroup(group=Group(id="g", doors=["d"]))]
    changes += [PutUser(user=u) for u in users(nxt)]
    if v >= 1:
        changes += [DeleteCredential(card=c) for c in marker(v)]
    changes += [PutCredential(credential=Credential(card=c, user="m")) for c in marker(nxt)]
    changes += [PutCredential(credential=Credential(card=c, user="b", status=ballast_status(nxt))) for c in BALLAST]
    return ChangeSet(from_version=v, to_version=nxt, changes=changes)


def snapshot(w: int) -> Snapshot:
    return Snapshot(
        version=w, doors=[Door(id="d")], groups=[Group(id="g", doors=["d"])], users=users(w),
        credentials=[Credential(card=c, user="m") for c in marker(w)]
        + [Credential(card=c, user="b", status=ballast_status(w)) for c in BALLAST],
    )  # fmt: skip


# --- the child ---------------------------------------------------------------------------------------------


async def child_main(state: Path, seed: int, out: int) -> None:
    rng = random.Random(seed)

    def say(line: str) -> None:
        os.write(out, line.encode() + b"\n")  # one write per line: whole lines in the pipe, unbuffered

    async with Store(state / "rights.db", "UTC") as store, Journal(state / "journal.db", interval_s=0.01) as journal:
        say(f"open {store.version} {journal.next_seq}")
        durable = [0]

        async def rights() -> None:
            while True:
                v = store.version
                if rng.random() < 0.2:
                    say(f"applying snapshot {v + 1}")
                    await store.replace(snapshot(v + 1))
                else:
                    say(f"applying change_set {v + 1}")
                    await store.apply(change_set(v))
                say(f"committed {store.version}")

        async def journaling() -> None:
            n = 0
            while True:
                last = 0
                for _ in range(20):
                    last = journal.record("soak.event", door="d", card=n).seq
                    n += 1
                await journal.flush()
                durable[0] = last
                say(f"durable {last}")
                await asyncio.sleep(rng.uniform(0, 0.01))

        async def acks() -> None:
            acked = 0
            while True:
                await asyncio.sleep(rng.uniform(0.01, 0.05))
                if durable[0] > acked:
                    upto = rng.randint(acked + 1, durable[0])
                    say(f"acking {upto}")
                    await journal.ack(upto)
                    say(f"acked {upto}")
                    acked = upto

        async with asyncio.TaskGroup() as tg:
            tg.create_task(rights())
            tg.create_task(journaling())
            tg.create_task(acks())


def spawn(state: Path, seed: int) -> tuple[int, int]:
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(r)
        code = 0
        try:
            asyncio.run(child_main(state, seed, w))
        except BaseException:  # report and exit; the parent counts a dead child
            import traceback

            traceback.print_exc()
            code = 1
        os._exit(code)
    os.close(w)
    return pid, r


# --- the parent --------------------------------------------------------------------------------------------


class Tracker:
    def __init__(self) -> None:
        self.durable = 0  # highest seq printed durable
        self.ack_issued = 0  # highest ack the child started
        self.ack_done = 0  # highest ack that returned
        self.committed = 0  # highest version printed committed
        self.version = 0  # highest version seen on disk
        self.counts: Counter[str] = Counter()
        self.interrupted: Counter[str] = Counter()
        self.pending: dict[str, str] = {}

    def line(self, ln: str) -> None:
        w = ln.split()
        if not w:
            return
        if w[0] == "open":
            self.pending.clear()
            if int(w[1]) < self.version:
                self.counts["version_back"] += 1
            if int(w[2]) <= self.durable:
                self.counts["seq_reused"] += 1
        elif w[0] == "durable":
            self.durable = max(self.durable, int(w[1]))
            self.counts["flushes"] += 1
        elif w[0] == "acking":
            self.ack_issued = max(self.ack_issued, int(w[1]))
            self.pending["ack"] = ln
        elif w[0] == "acked":
            self.ack_done = max(self.ack_done, int(w[1]))
            self.pending.pop("ack", None)
            self.counts["acks"] += 1
        elif w[0] == "applying":
            self.pending["rights"] = w[1]
        elif w[0] == "committed":
            self.committed = max(self.committed, int(w[1]))
            kind = self.pending.pop("rights", "change_set")
            self.counts["snapshots" if kind == "snapshot" else "change_sets"] += 1


def read_until(fd: int, deadline: float | None, want: str | None, tr: Tracker, buf: bytearray) -> bool:
    """Feed the child's lines to the tracker until `deadline` (or EOF); True once a line starts with `want`."""
    while True:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            return False
        chunk = os.read(fd, 65536)
        if not chunk:
            return False
        buf += chunk
        while b"\n" in buf:
            ln, _, rest = bytes(buf).partition(b"\n")
            buf[:] = rest
            tr.line(ln.decode())
            if want is not None and ln.startswith(want.encode()):
                return True


async def check(state: Path, tr: Tracker) -> None:
    """The files as the next start sees them, through the real boot path."""
    async with Store(state / "rights.db", "UTC") as store:
        v = store.version
        idx = store.index
        if store.damage is not None:
            # the store's own checks (quick_check, the rights checksum) refused the file and fell back to the
            # verified copy: the kill left rows that are not exactly some version
            tr.counts["half_applied"] += 1
            print(f"store damaged after a kill: {store.damage}", file=sys.stderr)
            await _journal_check(state, tr)
            return
        if v < tr.version or v < tr.committed:
            tr.counts["version_back"] += 1
            print(f"version back: {v} (seen {tr.version}, committed {tr.committed})", file=sys.stderr)
        tr.version = max(tr.version, v)
        problems = []
        if v == 0:
            if len(idx):
                problems.append(f"version 0 with {len(idx)} credentials")
        else:
            active = STATUS_CODES[CredentialStatus.ACTIVE]
            rows = [idx.cred(c) for c in marker(v)]
            if not all(r is not None and r[1] == active for r in rows):
                problems.append("marker cards of the version incomplete or not active")
            if any(idx.cred(c) is not None for c in (*marker(v - 1), *marker(v + 1))):
                problems.append("marker cards of another version present")
            want = STATUS_CODES[ballast_status(v)]
            statuses = {r[1] if r is not None else None for r in (idx.cred(c) for c in BALLAST)}
            if statuses != {want}:
                problems.append(f"ballast statuses {statuses}, expected {{{want}}}")
            if len(idx) != K + B:
                problems.append(f"{len(idx)} credentials, expected {K + B}")
        if problems:
            tr.counts["half_applied"] += 1
            print(f"half applied at version {v}: {problems}", file=sys.stderr)
    await _journal_check(state, tr)


async def _journal_check(state: Path, tr: Tracker) -> None:
    async with Journal(state / "journal.db") as journal:
        present = {e.seq for e in await journal.read(0, 10_000_000)}
    lost = [s for s in range(tr.ack_issued + 1, tr.durable + 1) if s not in present]
    if lost:
        tr.counts["lost_events"] += len(lost)
        print(f"lost events: {len(lost)} (first {lost[:5]})", file=sys.stderr)
    tr.counts["acked_present"] += sum(1 for s in present if s <= tr.ack_done)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="50 kills (< 60 s)")
    p.add_argument("--kills", type=int, help="default 1000 (quick 50)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--max-delay", type=float, default=0.4, help="longest run before a kill, s (default 0.4)")
    args = p.parse_args()
    kills = args.kills or (50 if args.quick else 1000)
    rng = random.Random(args.seed)
    tr = Tracker()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="soak-kill-") as d:
        state = Path(d)
        for i in range(kills):
            pid, fd = spawn(state, args.seed * 100_003 + i)
            buf = bytearray()
            if rng.random() < 0.1:  # during the start (opening, WAL recovery)
                read_until(fd, time.monotonic() + rng.uniform(0, 0.05), None, tr, buf)
                tr.interrupted["start"] += 1
            else:
                if not read_until(fd, time.monotonic() + 30, "open", tr, buf):
                    tr.counts["child_failed"] += 1
                read_until(fd, time.monotonic() + rng.uniform(0, args.max_delay), None, tr, buf)
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            read_until(fd, None, None, tr, buf)  # what it wrote before it died
            os.close(fd)
            if not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL):
                tr.counts["child_failed"] += 1
            for what in tr.pending:
                tr.interrupted["rights " + tr.pending[what] if what == "rights" else what] += 1
            tr.pending.clear()
            asyncio.run(check(state, tr))
            if i % 100 == 99:
                print(f"{i + 1} kills, version {tr.version}, durable seq {tr.durable}, {dict(tr.counts)}",
                      file=sys.stderr, flush=True)  # fmt: skip
    dt = time.monotonic() - t0
    c = tr.counts
    params = {"seed": args.seed, "K": K, "B": B, "max_delay_s": args.max_delay}
    emit("kills", kills, "count", interrupted=dict(tr.interrupted), child_failed=c["child_failed"], **params)
    emit("half_applied", c["half_applied"], "count", final_version=tr.version, change_sets=c["change_sets"],
         snapshots=c["snapshots"], **params)  # fmt: skip
    emit("version_back", c["version_back"], "count", final_version=tr.version, **params)
    emit("lost_events", c["lost_events"], "count", durable_seq=tr.durable, acks=c["acks"], flushes=c["flushes"],
         acked_present=c["acked_present"], seq_reused=c["seq_reused"], **params)  # fmt: skip
    emit("seconds", dt, "s", per_kill_ms=round(dt / kills * 1000, 1), **params)


if __name__ == "__main__":
    main()
