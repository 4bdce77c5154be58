"""Operator-side figures (JSON lines). Measured: `import` of an N-row CSV validated, written and planned
(change set / snapshot computed for one gateway). Not yet measured here: publishing to 200 gateways and
collecting their events (see docs/operator.md, "Figures").

    python bench/fleet.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cloud_bridge.operator import csvimport
from cloud_bridge.operator.db import Model
from cloud_bridge.operator.provision import plan


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    n = 10_000 if ap.parse_args().quick else 100_000
    with tempfile.TemporaryDirectory() as d:
        db = Model(Path(d) / "c.db")
        db.record_birth("gw1", session=1, version=0, doors=[("d1", "")], software="", ts=0)
        db.put_group("staff", [("gw1", "d1")])
        text = "id,card,groups\n" + "".join(f"u{i},{1_000_000 + i},staff\n" for i in range(n))
        t0 = time.perf_counter()
        rep = csvimport.load(db, text)
        t1 = time.perf_counter()
        planned = plan(db)
        t2 = time.perf_counter()
        assert rep.imported == n and planned["gw1"] == 2 * n + 2
        params = {"rows": n, "gateways": 1}
        for metric, value in (("import_validate_write_s", t1 - t0), ("import_plan_s", t2 - t1),
                              ("import_total_s", t2 - t0)):  # fmt: skip
            print(json.dumps({"metric": metric, "value": round(value, 3), "unit": "s", "params": params}))


if __name__ == "__main__":
    main()
