"""Replica choice: longest locally cached prefix, balanced against load (pure logic, no Ray).

Terms
- block key: the first 8 bytes of a block hash (``services.engine.kv_cache.block_hash_chain``)
  as an int. Replicas report the keys of the full blocks their pool holds; the router
  computes the keys of the prompt's chain with the same seed, so a key match means "this
  replica can serve that block from its local cache" (a 64-bit collision costs one cache
  miss on the replica, never a wrong answer: the replica checks full hashes itself).
- load: requests running or waiting on a replica. The router counts the requests it has
  in flight there itself (exact and instant); the replica's own report (per stats
  interval) covers other routers' requests. The larger of the two is used.
- prefix match: how many leading blocks of the prompt's chain a replica holds.

Policy (in the spirit of SGLang's cache-aware router): a replica may win on its prefix
only while it is not far busier than the least-loaded replica, that is while
``load <= min_load + abs_slack`` or ``load <= min_load * rel_slack``. Among those the
longest prefix match wins, ties go to the lower load, then to the replica id order after
a rotating offset (so equal cold replicas share the work). A replica far busier than the
rest therefore loses to a cold, idle one.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

KEY_BYTES = 8


def block_key(block_hash: bytes) -> int:
    """The truncated form of a block hash that replicas report and the router compares."""
    return int.from_bytes(block_hash[:KEY_BYTES], "little")


def pack_keys(block_hashes: Iterable[bytes], limit: int) -> bytes:
    """Up to ``limit`` block keys as little-endian uint64s (what a replica reports)."""
    keys = array("Q")
    for h in block_hashes:
        if len(keys) >= limit:
            break
        keys.append(block_key(h))
    return keys.tobytes()


def unpack_keys(data: bytes) -> frozenset[int]:
    keys = array("Q")
    keys.frombytes(data[:len(data) - len(data) % KEY_BYTES])
    return frozenset(keys)


@dataclass(frozen=True)
class ReplicaView:
    """One replica as the router sees it when choosing."""

    replica_id: str  # Serve replica id
    inflight: int = 0  # requests this router has in flight on it now
    reported_load: int = 0  # running + waiting requests it reported at its last stats interval
    cached_keys: frozenset[int] = frozenset()  # block keys of its local cache at that interval

    @property
    def load(self) -> int:
        return max(self.inflight, self.reported_load)


@dataclass(frozen=True)
class BalanceConfig:
    """When a prefix match may outweigh load."""

    abs_slack: int = 8  # a replica up to this many requests above the least-loaded one may still win on prefix
    rel_slack: float = 1.5  # ... or up to this factor above it
    prefix_aware: bool = True  # False: least load only (a prefix-blind balancer, for comparison)


@dataclass(frozen=True)
class Choice:
    replica_id: str  # the chosen replica
    matched_blocks: int  # leading prompt blocks it holds (by key)
    reason: str  # "prefix" | "load" (no usable match: least load won)


def matched_blocks(keys: Sequence[int], cached: frozenset[int]) -> int:
    """How many leading ``keys`` are in ``cached`` (the chain stops at the first miss)."""
    n = 0
    for k in keys:
        if k not in cached:
            break
        n += 1
    return n


def choose_replica(replicas: Sequence[ReplicaView], prompt_keys: Sequence[int],
                   config: BalanceConfig = BalanceConfig(), rotation: int = 0) -> Choice:
    """Pick the replica for a prompt whose block keys are ``prompt_keys`` (see module docstring).

    ``rotation`` breaks ties between equal replicas (pass a counter that advances per request).
    Raises ValueError when ``replicas`` is empty.
    """
    if not replicas:
        raise ValueError("replicas: none to choose from")
    order = sorted(replicas, key=lambda r: r.replica_id)
    k = rotation % len(order)
    order = order[k:] + order[:k]
    min_load = min(r.load for r in order)
    best, best_rank = None, None
    for r in order:
        balanced = r.load <= min_load + config.abs_slack or r.load <= min_load * config.rel_slack
        match = matched_blocks(prompt_keys, r.cached_keys) if balanced and config.prefix_aware else 0
        rank = (-match, r.load)
        if best_rank is None or rank < best_rank:
            best, best_rank = (r, match), rank
    r, match = best
    return Choice(r.replica_id, match, "prefix" if match > 0 else "load")


def least_loaded(replicas: Sequence[ReplicaView], rotation: int = 0) -> str:
    """The replica with the lowest load (decode: no prefix preference)."""
    return choose_replica(replicas, (), rotation=rotation).replica_id


def prompt_keys(seed: bytes, block_size: int, token_ids: Sequence[int]) -> list[int]:
    """Block keys of a prompt's full blocks, chained from the engine's seed ([] without a seed)."""
    if not seed:
        return []
    from services.engine.kv_cache import block_hash_chain

    return [block_key(h) for h in block_hash_chain(seed, token_ids, block_size)]
