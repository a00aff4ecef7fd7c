"""What a worker replica tells the routers per interval (Serve's ``record_routing_stats``).

Serve calls ``record_routing_stats`` on every replica each ``request_routing_stats_period_s``
and hands the result to every deployment handle's request router (router/replica_router.py),
so the router knows load and cached prefixes without a call per request. The report is a
``services.types.RoutingStats`` (its fields: load, free KV blocks, and the keys of the full
blocks the local cache holds: the newest ``max_keys`` by the time they were cached, 8 bytes
per block, 64k blocks = 512 KiB; only for roles that take prompts).
"""

from __future__ import annotations

from array import array

from services.types import RoutingStats

KEY_BYTES = 8  # = router.prefix_routing.KEY_BYTES (services does not import router)


def routing_stats(async_engine, with_keys: bool, max_keys: int = 65536) -> RoutingStats:
    """The report of one engine (``services.engine.async_engine.AsyncEngine``); waits for the
    step lock, so call it off the event loop."""
    stats, hashes = async_engine.routing_snapshot(max_keys if with_keys else 0)
    keys = array("Q", (int.from_bytes(h[:KEY_BYTES], "little") for h in hashes))
    return RoutingStats(load=stats.num_running + stats.num_waiting, kv_free=stats.kv_blocks_free,
                        block_keys=keys.tobytes())
