"""Running a fleet on a broker cluster (docs/scaling.md): the cloud side split into shards of sites, and a
simulator of many gateways.

- `ingest`: `Ingest`, event ingest for one shard of sites into the service's `events` table (PostgreSQL),
  acknowledged to each gateway only after the commit; `shard_of` / `sites_of`, the partition.
- `publisher`: `Publisher`, the downlink for one shard: pending change sets from the `outbox` table, resent
  until each gateway's result arrives, at most `window` gateways in flight at once; presence from live births
  (rebirth requests), not retained ones.
- `window`: `SendWindow`, the publisher's in-flight window (pure: which gateways to send to now).
- `sim`: `Fleet`, thousands of real `CloudLink`s on one event loop over in-memory ports.
- `__main__`: the worker processes (JSON lines on stdin/stdout) that bench/fleet_cluster.py runs.
"""
