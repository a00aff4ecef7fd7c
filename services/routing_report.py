"""What a worker replica tells the routers per interval (Serve's ``record_routing_stats``).

Serve calls ``record_routing_stats`` on every replica each ``request_routing_stats_period_s``
and hands the dict to every deployment handle's request router (router/replica_router.py),
so the router knows load and cached prefixes without a call per request.

Keys of the dict (plain data; Serve moves it through its controller):
- ``load``: requests running + waiting in the engine;
- ``kv_free``: free KV blocks (cached-but-free ones count as free);
- ``block_keys``: little-endian uint64 block keys (router/prefix_routing.py) of the full
  blocks the local cache holds (the newest ``max_keys`` by the time they were cached;
  8 bytes per block: 64k blocks = 512 KiB); only for roles that take prompts.
"""

from __future__ import annotations

from array import array

KEY_BYTES = 8  # = router.prefix_routing.KEY_BYTES (services does not import router)


def routing_stats(async_engine, with_keys: bool, max_keys: int = 65536) -> dict:
    """The report of one engine (``services.serving_engine.ServingEngine``)."""
    eng = async_engine.engine
    with async_engine._lock:  # the engine thread mutates the pool during a step
        stats = eng.snapshot_stats()
        hashes = list(eng.kv.pool.cached) if with_keys else []
    keys = array("Q", (int.from_bytes(h[:KEY_BYTES], "little") for h in hashes[-max_keys:]))
    return {"load": stats.num_running + stats.num_waiting, "kv_free": stats.kv_blocks_free,
            "block_keys": keys.tobytes()}
