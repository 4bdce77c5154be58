"""The index layout before issue 18, for the decide bench's same-run comparison (not used by the gateway).

Credentials as columns sorted by card number, looked up by `bisect` through memoryviews (22 levels at 2M);
users sorted by uid with their own assignment rows (CSR) and external ids in one blob; every column full
width (card u64, uid/status/from/until u32; flags u8, from/until/aoff/idoff u32; group u16, from/until u32).
Built from the logical columns of a current index (`edge.index.unpack`), so both answer the same rows.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

import numpy as np

from edge.index import AssignRow, Columns, CredRow, RightsIndex, Tables, UserRow, unpack


class LegacyIndex:
    """`cred()` / `user()` / `tables` as `Decider` reads them, over the old layout."""

    def __init__(self, index: RightsIndex) -> None:
        lg = unpack(index._base.arrays)
        order = np.argsort(lg["c_card"], kind="stable")
        self.arrays: Columns = {k: lg[k][order] for k in ("c_card", "c_uid", "c_status", "c_from", "c_until")}
        self.arrays |= {k: lg[k] for k in ("u_uid", "u_flags", "u_from", "u_until", "u_aoff", "u_idoff", "a_gidx",
                                           "a_from", "a_until")}  # fmt: skip
        self.idblob = lg["u_id"].tobytes()
        pblob, poff = lg["p_hash"].tobytes(), lg["p_off"].tolist()
        self.pins = {int(u): pblob[poff[i] : poff[i + 1]].decode() for i, u in enumerate(lg["p_uid"].tolist())}
        mv: dict[str, Any] = {k: memoryview(v) for k, v in self.arrays.items()}  # type: ignore[arg-type]
        self.c_card, self.c_uid, self.c_status, self.c_from, self.c_until = (
            mv[k] for k in ("c_card", "c_uid", "c_status", "c_from", "c_until")
        )
        self.u_uid, self.u_flags, self.u_from, self.u_until = (mv[k] for k in ("u_uid", "u_flags", "u_from", "u_until"))
        self.u_aoff, self.u_idoff = mv["u_aoff"], mv["u_idoff"]
        self.a_gidx, self.a_from, self.a_until = mv["a_gidx"], mv["a_from"], mv["a_until"]
        self.n_creds = len(self.arrays["c_card"])
        self.n_users = len(self.arrays["u_uid"])
        self.tables: Tables = index.tables

    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.arrays.values()) + len(self.idblob)

    def cred(self, card: int) -> CredRow | None:
        i = bisect_left(self.c_card, card)
        if i == self.n_creds or self.c_card[i] != card:
            return None
        return (self.c_uid[i], self.c_status[i], self.c_from[i], self.c_until[i])

    def user(self, uid: int) -> UserRow | None:
        i = uid - 1
        if not (0 <= i < self.n_users and self.u_uid[i] == uid):
            i = bisect_left(self.u_uid, uid)
            if i == self.n_users or self.u_uid[i] != uid:
                return None
        a0, a1 = self.u_aoff[i], self.u_aoff[i + 1]
        ag, af, au = self.a_gidx, self.a_from, self.a_until
        rows: tuple[AssignRow, ...] = tuple((ag[j], af[j], au[j]) for j in range(a0, a1))
        return (
            self.idblob[self.u_idoff[i] : self.u_idoff[i + 1]].decode(), self.u_flags[i], self.u_from[i],
            self.u_until[i], self.pins.get(uid), rows,
        )  # fmt: skip
