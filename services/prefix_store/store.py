"""``PrefixStore``: KV blocks of every worker in one Redis, found by their block hash.

Glossary
- key: ``tandem:{fingerprint}:kv:{hash_hex}`` (DESIGN.md "Prefix cache in Redis"); the
  hash already chains the model fingerprint, KV dtype, block size and every earlier token,
  so one key names exactly one block of one prefix of one model.
- lookup: ``EXISTS`` of every candidate key in one pipeline; the hits up to the first miss
  are then fetched with one ``GET`` pipeline. A key gone between the two (evicted, expired)
  or a corrupt blob ends the prefix there: a clean miss. Corrupt blobs are deleted.
- write-back: ``submit`` only enqueues (bounded; full = dropped and counted); a background
  task encodes off the event loop and writes with one ``SET ... EX ttl`` pipeline. A request
  never waits for it. Blobs are written in the store's ``BlockLayout`` (KV of another dtype
  is converted first, as ``Runner.write_kv`` converts on import), so every blob a store
  writes is one its readers take; a failed write-back is logged and counted
  (``writes_dropped``, ``errors["set"]``), never silent.
- I/O thread: every Redis call runs on the store's own event loop in a daemon thread, so
  the caller's loop (a Serve replica's, which also takes the engine's step lock) can never
  stall a Redis call into a false timeout, and write-backs never compete with it.
- failure: each call has a short timeout; failures feed a ``CircuitBreaker``; while it is
  open every lookup is an instant miss and write-backs are dropped.

Unit (one block per key), chosen by measurement on the 2-core box, loopback redis-server
7.0, dense-100m fp32 (16 KiB of KV per token, 256 KiB per 16-token block), moving the
31 MiB of a 1,984-token prefix with one pipeline (best of 5):

    unit       keys   SET pipeline   GET pipeline   one GET
    256 KiB     124        38 ms          68 ms     0.5 ms    (1 block)
    1 MiB        31        30 ms          51 ms     1.4 ms    (4 blocks)
    2 MiB        15        37 ms          45 ms     2.9 ms    (8 blocks)
    4 MiB         7        49 ms          42 ms     5.2 ms    (16 blocks)

Chunks of 4-16 blocks would save 17-26 ms per 31 MiB (the per-key cost is ~0.15 ms), but a
chunk can only be used whole: a prefix that ends inside a chunk loses up to chunk-1 blocks,
a local hit that ends inside one re-reads blocks already present, and write-back must
re-read cached blocks to complete a chunk. Blocks of real models are bigger than here
(Llama-3-8B bf16: 2 MiB per block), where the per-key cost vanishes. So: one block per key.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from typing import Callable

import torch

from services.prefix_store.blob import BlockLayout, decode_chain, encode_block
from services.prefix_store.breaker import CircuitBreaker
from services.prefix_store.config import PrefixStoreConfig

log = logging.getLogger("tandem.prefix_store")
TIERS = ("local", "redis")
FETCH_BYTES = 16 << 20  # one GET pipeline moves at most this much (timeout_s applies per pipeline)


def block_key(fingerprint: str, block_hash: bytes) -> str:
    """The Redis key of one block (DESIGN.md)."""
    return f"tandem:{fingerprint}:kv:{block_hash.hex()}"


class PrefixStore:
    """The Redis tier of the prefix cache for one engine (one fingerprint, one block layout).

    ``lookup``/``flush``/``close`` are awaited from any event loop, ``submit`` is called from
    any thread; the Redis I/O itself runs on the store's I/O thread.
    """

    def __init__(self, config: PrefixStoreConfig, fingerprint: str, layout: BlockLayout,
                 clock: Callable[[], float] = time.monotonic, client=None):
        self.config = config
        self.fingerprint = fingerprint
        self.layout = layout
        self.client = client if client is not None else config.client()
        self.sync_client = config.client(sync=True)  # bulk GETs (see _get)
        self.breaker = CircuitBreaker(config.breaker_failures, config.breaker_retry_s, clock)
        self.query_tokens: Counter[str] = Counter()  # tier -> prompt tokens looked up
        self.hit_tokens: Counter[str] = Counter()  # tier -> prompt tokens served
        self.errors: Counter[str] = Counter()  # op ("exists" | "get" | "set" | "delete") -> failed calls
        self.corrupt_blobs = 0  # blobs that failed the format check (each deleted)
        self.blocks_written = 0  # blocks SET by write-back
        self.writes_dropped = 0  # write-backs dropped (queue full, breaker open or failed)
        self._queue: asyncio.Queue = asyncio.Queue()  # used on the I/O loop only
        self._pending = 0  # write-backs queued or in progress (bounded by write_queue_size)
        self._pending_lock = threading.Lock()
        self._io = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._io.run_forever, name="prefix-store-io", daemon=True)
        self._thread.start()
        self._writer = asyncio.run_coroutine_threadsafe(self._write_loop(), self._io)

    async def _on_io(self, coro):
        """Run ``coro`` on the I/O loop and await its result from the caller's loop."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._io))

    def key(self, block_hash: bytes) -> str:
        return block_key(self.fingerprint, block_hash)

    # ---- lookups -------------------------------------------------------------------------
    async def lookup(self, hashes: list[bytes]) -> torch.Tensor:
        """KV of the longest run of ``hashes[0:]`` found in Redis: ``[L, 2, n, bs, Hkv, D]``
        (``n = 0`` on a miss, an error, or an open breaker). Never raises for Redis trouble."""
        return await self._on_io(self._lookup(hashes))

    async def _lookup(self, hashes: list[bytes]) -> torch.Tensor:
        self.query_tokens["redis"] += len(hashes) * self.layout.block_size
        empty = torch.empty((self.layout.shape[0], 2, 0) + self.layout.shape[2:], dtype=self.layout.torch_dtype)
        if not hashes or not self.breaker.allow():
            return empty
        keys = [self.key(h) for h in hashes]
        found = await self._call("exists", self._exists, keys)
        n = next((i for i, e in enumerate(found or []) if not e), len(found or []))
        blobs = await self._fetch(keys[:n])
        if not blobs:
            return empty
        kv, bad, why = await asyncio.to_thread(decode_chain, blobs, self.layout)
        if bad is not None:
            self.corrupt_blobs += 1
            log.warning("prefix-cache blob %s rejected (%s) and deleted: a miss", keys[bad], why)
            await self._call("delete", self._delete, keys[bad])
        self.hit_tokens["redis"] += kv.shape[2] * self.layout.block_size
        return kv

    async def _fetch(self, keys: list[str]) -> list[bytes]:
        """GET ``keys`` in pipelines of at most ``FETCH_BYTES`` each (one timeout per pipeline);
        returns the blobs up to the first one missing (evicted since EXISTS) or not fetched."""
        per_call = max(1, FETCH_BYTES // self.layout.num_bytes)
        blobs: list[bytes] = []
        for start in range(0, len(keys), per_call):
            got = await self._call("get", self._get, keys[start:start + per_call]) or [None]
            n = next((i for i, b in enumerate(got) if b is None), len(got))
            blobs += got[:n]
            if n < len(got):
                break
        return blobs

    def record_local(self, query_tokens: int, hit_tokens: int) -> None:
        """Count a lookup in the local (in-engine) tier, for ``stats()``."""
        self.query_tokens["local"] += query_tokens
        self.hit_tokens["local"] += hit_tokens

    async def _exists(self, keys: list[str]) -> list[int]:
        async with self.client.pipeline(transaction=False) as pipe:
            for k in keys:
                pipe.exists(k)
            return await pipe.execute()

    async def _get(self, keys: list[str]) -> list[bytes | None]:
        """One GET pipeline on the blocking client in a thread: 31 MiB took a median 58 ms
        that way vs 92 ms through redis.asyncio (10 runs, loopback, 2-core box)."""
        def get() -> list[bytes | None]:
            with self.sync_client.pipeline(transaction=False) as pipe:
                for k in keys:
                    pipe.get(k)
                return pipe.execute()

        return await asyncio.to_thread(get)

    async def _delete(self, key: str) -> int:
        return await self.client.delete(key)

    async def _call(self, op: str, fn, *args, timeout_s: float | None = None):
        """``fn(*args)`` under the per-call timeout; failures are counted, fed to the breaker
        and turned into None."""
        try:
            async with asyncio.timeout(timeout_s or self.config.timeout_s):
                result = await fn(*args)
        except Exception as exc:  # redis errors, timeouts, connection refused: all a miss
            if not self.breaker.is_open:  # at most breaker_failures lines per outage
                log.warning("redis %s failed: %s: %s", op, type(exc).__name__, exc)
            self.errors[op] += 1
            self.breaker.record_failure(f"{op}: {type(exc).__name__}: {exc}")
            return None
        self.breaker.record_success()
        return result

    # ---- write-back ----------------------------------------------------------------------
    def submit(self, hashes: list[bytes], kv: torch.Tensor) -> bool:
        """Queue blocks ``kv[:, :, i]`` (``[L, 2, n, bs, Hkv, D]``, host memory) for writing
        under ``hashes[i]``; returns False when dropped. Never blocks; any thread."""
        if not hashes:
            return True
        if kv.shape[2] != len(hashes):
            raise ValueError(f"kv: {kv.shape[2]} blocks for {len(hashes)} hashes")
        block_shape = (kv.shape[0], kv.shape[1]) + tuple(kv.shape[3:])
        if kv.dim() != 6 or block_shape != self.layout.shape:
            raise ValueError(f"kv: blocks of shape {block_shape} do not fit this store's {self.layout.shape}")
        with self._pending_lock:
            if self._pending >= self.config.write_queue_size:
                self.writes_dropped += 1
                return False
            self._pending += 1
        self._io.call_soon_threadsafe(self._queue.put_nowait, (list(hashes), kv))
        return True

    async def _write_loop(self) -> None:
        while True:
            hashes, kv = await self._queue.get()
            try:
                await self._write(hashes, kv)
            except Exception:  # never let one bad write stop the writer
                log.exception("prefix-cache write-back failed")
                self.writes_dropped += 1
            finally:
                with self._pending_lock:
                    self._pending -= 1
                self._queue.task_done()

    async def _write(self, hashes: list[bytes], kv: torch.Tensor) -> None:
        if not self.breaker.allow():
            self.writes_dropped += 1
            return
        dtype = self.layout.torch_dtype
        blobs = await asyncio.to_thread(lambda: [encode_block(kv[:, :, i].to(dtype)) for i in range(len(hashes))])
        ok = await self._call("set", self._set, [self.key(h) for h in hashes], blobs,
                              timeout_s=self.config.write_timeout_s)
        if ok is None:
            self.writes_dropped += 1
        else:
            self.blocks_written += len(hashes)

    async def _set(self, keys: list[str], blobs: list[bytes]) -> list:
        async with self.client.pipeline(transaction=False) as pipe:
            for k, b in zip(keys, blobs):
                pipe.set(k, b, ex=self.config.ttl_s)
            return await pipe.execute()

    async def flush(self) -> None:
        """Wait until every queued write-back is done (tests, shutdown)."""
        await self._on_io(self._queue.join())

    async def close(self) -> None:
        """Drop pending write-backs, close the connections, stop the I/O thread."""
        self._writer.cancel()
        await self._on_io(self.client.aclose())
        self.sync_client.close()
        self._io.call_soon_threadsafe(self._io.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._io.close()

    # ---- observability -------------------------------------------------------------------
    def stats(self) -> dict:
        """Plain counters (monotonic) and the breaker gauge; exported as Prometheus metrics
        by services/telemetry (tandem_prefix_cache_*, tandem_redis_*)."""
        return {
            "queries_tokens": {t: self.query_tokens[t] for t in TIERS},
            "hits_tokens": {t: self.hit_tokens[t] for t in TIERS},
            "errors": dict(self.errors),
            "corrupt_blobs": self.corrupt_blobs,
            "breaker_open": int(self.breaker.is_open),
            "blocks_written": self.blocks_written,
            "writes_dropped": self.writes_dropped,
        }
