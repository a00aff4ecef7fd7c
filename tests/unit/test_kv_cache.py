"""Block bookkeeping: exact block ids, hash chains, LRU eviction order, rollback."""

import pytest

from services.engine.kv_cache import BlockPool, KVCacheManager, block_hash_chain, hash_block, hash_seed
from services.engine.request import Request
from services.engine.sampling_params import SamplingParams

BS = 4


def req(rid, tokens):
    return Request(rid, list(tokens), SamplingParams(max_tokens=4))


def manager(num_blocks=8):
    return KVCacheManager(num_blocks, BS, hash_seed("model-a", "float32", BS))


def test_hash_chain_is_seeded_and_covers_full_blocks_only():
    a = block_hash_chain(b"seed-a", list(range(10)), BS)
    b = block_hash_chain(b"seed-b", list(range(10)), BS)
    assert len(a) == 2 and a[0] != b[0]
    assert a[1] == hash_block(a[0], [4, 5, 6, 7])
    assert hash_seed("m1", "float32", 16) != hash_seed("m2", "float32", 16)
    assert hash_seed("m1", "float32", 16) != hash_seed("m1", "bfloat16", 16)


def test_allocate_gives_lowest_ids_first_and_failure_changes_nothing():
    kv = manager(4)
    r1 = req("a", range(9))
    assert kv.allocate(r1, 9)
    assert kv.block_tables["a"] == [0, 1, 2]
    r2 = req("b", range(8))
    assert not kv.allocate(r2, 8)  # needs 2, 1 free
    assert "b" not in kv.block_tables and kv.num_free_blocks == 1


def test_prefix_reuse_returns_exact_blocks_and_leaves_one_token():
    kv = manager(8)
    a = req("a", range(14))  # 3 full blocks + 2 tokens
    assert kv.allocate(a, 14)
    a.num_computed_tokens = 14
    kv.cache_full_blocks(a, 14)
    b = req("b", list(range(12)) + [99, 98, 97])
    assert kv.find_cached_prefix(b) == [0, 1, 2]
    # exactly 3 full blocks identical to a cached prefix: the last block is recomputed
    c = req("c", range(12))
    assert kv.find_cached_prefix(c) == [0, 1]
    assert kv.allocate(b, 3, [0, 1, 2])
    assert kv.block_tables["b"] == [0, 1, 2, 4]
    assert kv.pool.ref_cnt[:5] == [2, 2, 2, 1, 1]


def test_freed_cached_blocks_are_reused_then_evicted_in_lru_order():
    kv = manager(6)
    a = req("a", range(16))
    assert kv.allocate(a, 16)
    kv.cache_full_blocks(a, 16)
    kv.free(a)
    # freed tail first: the queue holds 4,5 (never used) then 3,2,1,0
    assert list(kv.pool.free) == [4, 5, 3, 2, 1, 0]
    b = req("b", list(range(8)) + [50] * 9)  # shares blocks 0,1
    hits = kv.find_cached_prefix(b)
    assert hits == [0, 1]
    assert kv.allocate(b, 9, hits)
    assert kv.block_tables["b"] == [0, 1, 4, 5, 3]  # block 3 (a's tail) evicted first
    assert kv.pool.block_hash[3] is None and kv.pool.block_hash[2] is not None
    kv.free(b)
    assert kv.num_free_blocks == 6


def test_shared_blocks_survive_one_owner_freeing():
    kv = manager(8)
    a = req("a", range(9))
    assert kv.allocate(a, 9)
    kv.cache_full_blocks(a, 9)
    b = req("b", range(9))
    hits = kv.find_cached_prefix(b)
    assert hits == [0, 1]
    assert kv.allocate(b, 1, hits)
    kv.free(a)
    assert kv.pool.ref_cnt[0] == 1 and kv.pool.ref_cnt[1] == 1 and 0 not in kv.pool.free


def test_append_k_and_rollback_k():
    kv = manager(8)
    a = req("a", range(6))
    assert kv.allocate(a, 6)
    a.num_computed_tokens = 6
    kv.cache_full_blocks(a, 6)
    assert kv.append_slots(a, 5)  # 11 tokens -> 3 blocks
    assert kv.block_tables["a"] == [0, 1, 2]
    kv.rollback(a, 7)  # keep 7 tokens -> 2 blocks
    assert kv.block_tables["a"] == [0, 1]
    assert kv.num_free_blocks == 6
    kv.free(a)
    assert kv.num_free_blocks == 8


def test_double_release_is_caught():
    pool = BlockPool(2)
    (b,) = pool.allocate(1)
    pool.release([b])
    with pytest.raises(AssertionError):
        pool.release([b])
