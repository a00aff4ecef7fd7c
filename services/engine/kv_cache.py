"""Paged KV cache bookkeeping: block pool, block tables, prefix reuse.

Glossary
- block: ``block_size`` consecutive token slots of every layer's KV cache.
- full block: a block whose ``block_size`` tokens are all computed; only full blocks
  are hashed and shared.
- block hash: ``h_i = H(h_{i-1}, tokens of block i)``, ``h_{-1}`` = the hash seed derived
  from the model fingerprint, KV dtype and block size (so two models never share KV).
- free queue: blocks with reference count 0 in LRU order; a free block that still holds
  a hash stays reusable until it is handed out again (then its hash is forgotten).
- pin: a reference held for a request that is not admitted yet, on cached blocks it will
  find by prefix match (local hits, and blocks imported from an external tier such as the
  Redis prefix store), so that LRU reuse cannot evict them before admission. Pins are
  dropped when the request is admitted (it then holds its own references) or freed.

This module only does bookkeeping on block ids; the tensors live in the runner.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence

from services.engine.request import Request


def hash_seed(model_fingerprint: str, kv_dtype: str, block_size: int) -> bytes:
    """Seed of every block-hash chain of one model / KV layout."""
    return hashlib.sha256(f"tandem-kv-v1:{model_fingerprint}:{kv_dtype}:{block_size}".encode()).digest()


def hash_block(parent: bytes, tokens: Sequence[int]) -> bytes:
    """``H(parent, tokens)``: sha256 over the parent hash and the tokens as little-endian int32."""
    h = hashlib.sha256(parent)
    h.update(array("i", tokens).tobytes())
    return h.digest()


def block_hash_chain(seed: bytes, tokens: Sequence[int], block_size: int) -> list[bytes]:
    """Hashes of every full block of ``tokens`` (a trailing partial block is not hashed)."""
    hashes, parent = [], seed
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = hash_block(parent, tokens[start:start + block_size])
        hashes.append(parent)
    return hashes


class BlockPool:
    """Fixed set of block ids with reference counts, an LRU free queue and a hash index.

    Invariants: a block is in the free queue iff its ref count is 0; ``cached[h] == b``
    implies ``block_hash[b] == h``.
    """

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.ref_cnt = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[bytes, int] = {}

    @property
    def num_free(self) -> int:
        return len(self.free)

    def lookup(self, h: bytes) -> int | None:
        return self.cached.get(h)

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` blocks from the LRU end of the free queue (evicting their hashes)."""
        if n > len(self.free):
            raise RuntimeError(f"allocate({n}) with only {len(self.free)} free blocks")
        out = []
        for _ in range(n):
            b, _ = self.free.popitem(last=False)
            h = self.block_hash[b]
            if h is not None:
                del self.cached[h]
                self.block_hash[b] = None
            self.ref_cnt[b] = 1
            out.append(b)
        return out

    def touch(self, blocks: Iterable[int]) -> None:
        """Take another reference on (possibly free but cached) blocks."""
        for b in blocks:
            if self.ref_cnt[b] == 0:
                del self.free[b]
            self.ref_cnt[b] += 1

    def release(self, blocks: Iterable[int]) -> None:
        """Drop one reference; blocks reaching 0 join the most-recently-used end of the queue."""
        for b in blocks:
            self.ref_cnt[b] -= 1
            assert self.ref_cnt[b] >= 0, f"block {b} released more often than taken"
            if self.ref_cnt[b] == 0:
                self.free[b] = None

    def set_hash(self, b: int, h: bytes) -> None:
        """Make block ``b`` findable by ``h`` unless it, or another block, already is."""
        if self.block_hash[b] is not None or h in self.cached:
            return
        self.block_hash[b] = h
        self.cached[h] = b


class KVCacheManager:
    """Block tables of running requests on top of a ``BlockPool``.

    ``can``-style checks and allocation are one call: ``allocate`` either reserves every
    block needed or changes nothing and returns False.
    """

    def __init__(self, num_blocks: int, block_size: int, seed: bytes, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.seed = seed
        self.enable_prefix_caching = enable_prefix_caching
        self.block_tables: dict[str, list[int]] = {}
        self._hashes: dict[str, list[bytes]] = {}
        self._num_hashed: dict[str, int] = {}
        self._pins: dict[str, list[int]] = {}  # request id -> pinned blocks
        self._imported: dict[str, int] = {}  # request id -> blocks imported for it (pinned)

    # ---- queries -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def usage(self) -> float:
        """Share of blocks held by running requests (cached-but-free blocks count as free)."""
        return 1.0 - self.pool.num_free / self.pool.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_hashes(self, req: Request, num_blocks: int) -> list[bytes]:
        """Hashes of the request's first ``num_blocks`` full blocks (extended lazily)."""
        chain = self._hashes.setdefault(req.request_id, [])
        bs = self.block_size
        while len(chain) < num_blocks:
            i = len(chain)
            chain.append(hash_block(chain[-1] if chain else self.seed, req.token_at(i * bs, (i + 1) * bs)))
        return chain[:num_blocks]

    def find_cached_prefix(self, req: Request) -> list[int]:
        """Longest run of cached full blocks at the start of the request's tokens.

        At least one token is always left to compute (its logits give the next token).
        """
        if not self.enable_prefix_caching:
            return []
        max_blocks = (req.num_tokens - 1) // self.block_size
        hits = []
        for h in self.block_hashes(req, max_blocks):
            b = self.pool.lookup(h)
            if b is None:
                break
            hits.append(b)
        return hits

    def num_cached_blocks(self, hashes: Sequence[bytes]) -> int:
        """How many of ``hashes`` (a chain, in order) are cached here, counted from the first."""
        n = 0
        while self.enable_prefix_caching and n < len(hashes) and self.pool.lookup(hashes[n]) is not None:
            n += 1
        return n

    def num_pinned(self, request_id: str) -> int:
        """Blocks pinned for a request that is not admitted yet."""
        return len(self._pins.get(request_id, ()))

    def num_imported_tokens(self, request_id: str) -> int:
        """Tokens of the blocks imported for a request that is not admitted yet."""
        return self._imported.get(request_id, 0) * self.block_size

    # ---- pins and imports (external prefix tier) -----------------------------------------
    def pin_cached_prefix(self, request_id: str, hashes: Sequence[bytes]) -> int:
        """Pin the leading cached blocks of ``hashes`` for ``request_id``; returns how many."""
        blocks = [self.pool.lookup(h) for h in hashes[:self.num_cached_blocks(hashes)]]
        self.pool.touch(blocks)
        self._pins.setdefault(request_id, []).extend(blocks)
        return len(blocks)

    def import_blocks(self, request_id: str, hashes: Sequence[bytes]) -> list[int]:
        """Pin the leading ``hashes`` that are cached already (imported meanwhile for another
        request: two lookups of one prefix ran at once), then allocate one block per remaining
        hash, publish it as cached under that hash and pin it. Returns the new blocks, those
        of ``hashes[len(hashes) - len(result):]``; every hash counts as imported.

        The caller must write the new blocks' KV before the next step (the engine holds its
        step lock). Requires ``len(hashes) <= num_free_blocks``.
        """
        again = self.pin_cached_prefix(request_id, hashes)
        blocks = self.pool.allocate(len(hashes) - again)
        for b, h in zip(blocks, hashes[again:]):
            self.pool.set_hash(b, h)
        self._pins.setdefault(request_id, []).extend(blocks)
        self._imported[request_id] = self._imported.get(request_id, 0) + len(hashes)
        return blocks

    def drop_newest_pins(self, last: str) -> bool:
        """Drop every pin of the most recently pinned request, ``last``'s only when no other
        request holds any; False when there are none. The blocks stay cached (reusable until
        LRU hands them out again): a pin only protects them, so dropping one costs its request
        at most a recompute."""
        rid = next((r for r in reversed(self._pins) if r != last), last if last in self._pins else None)
        if rid is None:
            return False
        self.unpin(rid)
        return True

    def unpin(self, request_id: str) -> None:
        """Drop the pins held for ``request_id`` (at admission, or when it ends unadmitted)."""
        self.pool.release(reversed(self._pins.pop(request_id, [])))
        self._imported.pop(request_id, None)

    # ---- state changes -------------------------------------------------------------------
    def allocate(self, req: Request, num_new_tokens: int, cached_blocks: Sequence[int] = ()) -> bool:
        """Reserve slots for ``num_new_tokens`` after the request's computed (+ cached) tokens."""
        table = self.block_tables.setdefault(req.request_id, [])
        total = req.num_computed_tokens + len(cached_blocks) * self.block_size + num_new_tokens
        need = self.blocks_needed(total) - len(table) - len(cached_blocks)
        revived = sum(1 for b in cached_blocks if self.pool.ref_cnt[b] == 0)
        if max(need, 0) + revived > self.pool.num_free:
            if not table:
                del self.block_tables[req.request_id]
            return False
        self.pool.touch(cached_blocks)
        table.extend(cached_blocks)
        self._num_hashed[req.request_id] = self._num_hashed.get(req.request_id, 0) + len(cached_blocks)
        if need > 0:
            table.extend(self.pool.allocate(need))
        return True

    def append_slots(self, req: Request, k: int) -> bool:
        """Reserve room for ``k`` more tokens beyond the computed ones (speculative append)."""
        return self.allocate(req, k)

    def rollback(self, req: Request, num_tokens: int) -> None:
        """Forget slots past the first ``num_tokens`` tokens (rejected speculative tokens).

        Blocks that no longer hold any kept token go back to the pool; hashes only ever
        cover verified full blocks, so nothing hashed is invalidated.
        """
        table = self.block_tables.get(req.request_id, [])
        keep = self.blocks_needed(num_tokens)
        extra = table[keep:]
        del table[keep:]
        self.pool.release(reversed(extra))
        full = num_tokens // self.block_size
        if self._num_hashed.get(req.request_id, 0) > full:
            self._num_hashed[req.request_id] = full
        chain = self._hashes.get(req.request_id)
        if chain is not None:
            del chain[full:]

    def cache_full_blocks(self, req: Request, num_computed_tokens: int) -> None:
        """Publish the hashes of blocks that became full once ``num_computed_tokens`` are in cache."""
        if not self.enable_prefix_caching:
            return
        table = self.block_tables[req.request_id]
        start = self._num_hashed.get(req.request_id, 0)
        full = min(num_computed_tokens // self.block_size, len(table))
        if full <= start:
            return
        hashes = self.block_hashes(req, full)
        for i in range(start, full):
            self.pool.set_hash(table[i], hashes[i])
        self._num_hashed[req.request_id] = full

    def free(self, req: Request) -> None:
        """Return every block of the request; its tail blocks become the first to be evicted."""
        table = self.block_tables.pop(req.request_id, [])
        self.pool.release(reversed(table))
        self._hashes.pop(req.request_id, None)
        self._num_hashed.pop(req.request_id, None)
        self.unpin(req.request_id)
