"""Subprocess for the crash test: applies change sets forever, printing each committed version.

Change set v -> v+1 adds user u<v+1> with K cards numbered (v+1)*10_000 + i, and revokes the cards of
user u<v>, so a torn change set would show as a partial card range or a half-revoked user.
"""

from __future__ import annotations

import asyncio
import sys

from edge.model import (
    Assignment,
    ChangeSet,
    Credential,
    CredentialStatus,
    Door,
    Group,
    PutCredential,
    PutDoor,
    PutGroup,
    PutUser,
    User,
)
from edge.store import Store

K = 400


def change_set(v: int) -> ChangeSet:
    nxt = v + 1
    changes: list[object] = []
    if v == 0:
        changes += [PutDoor(door=Door(id="d")), PutGroup(group=Group(id="g", doors=["d"]))]
    changes.append(PutUser(user=User(id=f"u{nxt}", assignments=[Assignment(group="g")])))
    changes += [PutCredential(credential=Credential(card=nxt * 10_000 + i, user=f"u{nxt}")) for i in range(K)]
    if v >= 1:
        changes += [
            PutCredential(credential=Credential(card=v * 10_000 + i, user=f"u{v}", status=CredentialStatus.REVOKED))
            for i in range(K)
        ]
    return ChangeSet(from_version=v, to_version=nxt, changes=changes)  # type: ignore[arg-type]


async def main(path: str) -> None:
    async with Store(path, "UTC") as store:
        print(f"open {store.version}", flush=True)
        while True:
            r = await store.apply(change_set(store.version))
            print(f"committed {r.version}", flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
