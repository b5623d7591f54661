"""Data: spec files, the build driver and its builders, shards, catalog, rejects, input guards."""
