"""The audit log: every operator and integration action (who, how, from where, what, before/after),
append-only (no code path updates or deletes an entry; the database refuses it too, migration 0002).

An entry is written in the transaction of the change it records, so a change and its entry are committed
together or not at all; a refused request (403) is recorded in a transaction of its own. `before`/`after`
are the object as the API shows it: never a password, token, setup code or PIN (those are not in any
object the API returns).
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
from sqlalchemy.ext.asyncio import AsyncConnection

from . import schema
from .auth import Principal

_enc = msgspec.json.Encoder()


def _json(obj: Any) -> str | None:
    return None if obj is None else _enc.encode(obj).decode()


async def record(
    c: AsyncConnection, who: Principal | str, action: str, object_type: str, object_id: str, *,
    before: Any = None, after: Any = None, outcome: str = "ok", address: str = "", via: str = "",
) -> None:  # fmt: skip
    if isinstance(who, Principal):
        actor, via, address = who.operator.id, who.via, who.address
    else:
        actor = who
    await c.execute(schema.audit_log.insert().values(
        ts=time.time(), actor=actor[:128], via=via[:32] or "anonymous", address=address[:64], action=action[:64],
        object_type=object_type[:32], object_id=object_id, before=_json(before), after=_json(after),
        outcome=outcome))  # fmt: skip
