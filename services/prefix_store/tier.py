"""The two-tier prefix cache as a worker uses it: the engine's own blocks, then Redis.

Per request (prefill and unified workers):

1. ``prepare``: hash the prompt's full blocks; pin the leading ones the engine holds
   (local tier); look the next ones up in Redis and import the hits into the paged cache,
   pinned (Redis tier). The engine's normal prefix match then finds both at admission and
   computes only the rest. One span ``tandem.prefix_cache.lookup`` covers it.
2. The worker runs the request with ``expect_export(from_block=plan.cached_blocks)``.
3. ``write_back``: the newly computed full prompt blocks go to the store's background
   writer (never awaited by the request).

Invariant: every block pinned by ``prepare`` is released by admission, by the end of the
request, or by ``release`` (call it when the request is not added after all).
"""

from __future__ import annotations

import logging
from collections import Counter
from contextlib import asynccontextmanager
from dataclasses import dataclass

import torch
from opentelemetry import trace

from services.engine.step_lock import off_loop
from services.prefix_store.blob import BlockLayout
from services.prefix_store.store import PrefixStore

log = logging.getLogger("tandem.prefix_store")
_tracer = trace.get_tracer("tandem")


@dataclass(frozen=True)
class PrefixPlan:
    """What the cache tiers hold of one prompt, found before the request is queued."""

    num_prompt_tokens: int  # P
    hashes: list[bytes]  # hash chain of every full prompt block (P // block_size)
    local_blocks: int  # leading blocks found in the engine's own cache (pinned)
    redis_blocks: int  # following blocks loaded from Redis into the engine (pinned)

    @property
    def cached_blocks(self) -> int:
        """Blocks the request will not compute; write-back starts after them."""
        return self.local_blocks + self.redis_blocks


class PrefixCacheTier:
    """Local tier first, then the Redis ``PrefixStore`` (None = local tier only)."""

    def __init__(self, engine, store: PrefixStore | None):
        self.engine = engine  # a services.serving_engine.ServingEngine
        self.store = store
        self.block_size = engine.engine.kv.block_size
        self._local: Counter[str] = Counter()  # "queries" / "hits" in tokens, when there is no store

    @classmethod
    def for_engine(cls, engine, config) -> "PrefixCacheTier":
        """Build the tiers of a ``ServingEngine``; ``config`` is a PrefixStoreConfig or None."""
        if config is None:
            return cls(engine, None)
        dtype, shape = engine.engine.kv_block_shape()
        store = PrefixStore(config, engine.engine.fingerprint, BlockLayout(dtype, shape))
        log.info("prefix cache: local tier + Redis at %s (ttl %ss)", config.url, config.ttl_s)
        return cls(engine, store)

    async def prepare(self, request_id: str, prompt_ids: list[int]) -> PrefixPlan:
        """Pin local hits and import Redis hits for a request about to be queued."""
        eng = self.engine.engine
        hashes = eng.prompt_block_hashes(prompt_ids)
        usable = hashes[:eng.max_prefix_blocks(len(prompt_ids))]
        with _tracer.start_as_current_span("tandem.prefix_cache.lookup") as span:
            try:
                local = await off_loop(self.engine.pin_prefix, request_id, usable)
                redis = await self._load(request_id, usable[local:], len(prompt_ids))
            except BaseException:
                self.engine.release_prefix(request_id)
                raise
            span.set_attribute("tandem.prefix_cache.lookup_tokens", len(usable) * self.block_size)
            span.set_attribute("tandem.prefix_cache.local_hit_tokens", local * self.block_size)
            span.set_attribute("tandem.prefix_cache.redis_hit_tokens", redis * self.block_size)
        self._record_local(len(usable) * self.block_size, local * self.block_size)
        return PrefixPlan(len(prompt_ids), hashes, local, redis)

    async def _load(self, request_id: str, hashes: list[bytes], num_prompt_tokens: int) -> int:
        if self.store is None or not hashes:
            return 0
        kv = await self.store.lookup(hashes)  # [L, 2, n, bs, Hkv, D]
        if kv.shape[2] == 0:
            return 0
        return await off_loop(self.engine.import_prefix, request_id, hashes, kv, num_prompt_tokens)

    @asynccontextmanager
    async def serving(self, request_id: str, prompt_ids: list[int]):
        """``prepare`` before the block; on leaving it drop leftover pins and write back the
        new blocks (from the engine's export, or ``job.new_blocks`` when the block set them)."""
        job = PrefixJob(await self.prepare(request_id, prompt_ids))
        self.expect_export(request_id, job.plan)
        try:
            yield job
        finally:
            if self.engine.engine.kv.num_pinned(request_id):  # not admitted (failed or cancelled before)
                self.release(request_id)
            exported = self.engine.pop_export(request_id) if self.store is not None else None
            self.write_back(job.plan, job.new_blocks if job.new_blocks is not None else exported)

    def expect_export(self, request_id: str, plan: PrefixPlan) -> None:
        """Ask the engine for the request's new full prompt blocks (only when there is a store)."""
        if self.store is not None and plan.cached_blocks < len(plan.hashes):
            self.engine.expect_export(request_id, plan.num_prompt_tokens, plan.cached_blocks)

    def write_back(self, plan: PrefixPlan, new_blocks: torch.Tensor | None) -> None:
        """Queue ``new_blocks`` (``[L, 2, n, bs, Hkv, D]``, blocks from ``plan.cached_blocks`` on)."""
        if self.store is None or new_blocks is None or new_blocks.shape[2] == 0:
            return
        start = plan.cached_blocks
        self.store.submit(plan.hashes[start:start + new_blocks.shape[2]], new_blocks)

    def release(self, request_id: str) -> None:
        self.engine.release_prefix(request_id)

    def _record_local(self, query_tokens: int, hit_tokens: int) -> None:
        if self.store is not None:
            self.store.record_local(query_tokens, hit_tokens)
        else:
            self._local["queries"] += query_tokens
            self._local["hits"] += hit_tokens

    def stats(self) -> dict:
        """``PrefixStore.stats()``; without a store the same keys, local tier only."""
        if self.store is not None:
            return self.store.stats()
        return {"queries_tokens": {"local": self._local["queries"], "redis": 0},
                "hits_tokens": {"local": self._local["hits"], "redis": 0}, "errors": {}, "corrupt_blobs": 0,
                "breaker_open": 0, "blocks_written": 0, "writes_dropped": 0}


class PrefixJob:
    """One request inside ``PrefixCacheTier.serving``."""

    def __init__(self, plan: PrefixPlan):
        self.plan = plan
        self.new_blocks: torch.Tensor | None = None  # set by a prefill that already has them
