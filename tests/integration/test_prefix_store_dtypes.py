"""The Redis tier with bf16 KV, against a real redis-server (started here, stopped by PID), engines
in-process (no Ray): bf16 blocks go to Redis and come back bit for bit, and engines of another KV
dtype never take them (keyed apart by the hash seed; a blob of the wrong dtype under a key is a
counted miss that is deleted, not a crash and not a reinterpretation of its bytes)."""

import asyncio

import pytest
import torch

from services.engine import LLM
from services.prefix_store import BlockLayout, PrefixStore, block_key
from services.prefix_store.blob import HEADER
from services.prefix_store.tier import PrefixCacheTier
from services.serving_engine import ServingEngine
from tests.integration.test_prefix_store import (BS, GREEDY, PROMPT, config, generate,  # noqa: F401 (fixtures)
                                                 rclient, redis_server)

PROMPT2 = PROMPT + [7, 8, 9, 10, 11] * 8  # 1,064 tokens: the 64 blocks of PROMPT, then 40 new tokens


def serve(model, store_config, prompt, dtype, rid="r"):
    """A fresh ``dtype`` engine serves ``prompt`` once through the tiers; returns (tokens, last chunk,
    store stats, prompt tokens computed, its KV of the prompt's full blocks ``[L, 2, n, bs, Hkv, D]``,
    the block hashes, its fingerprint)."""
    se = ServingEngine.from_model(model, device="cpu", dtype=dtype, num_kv_blocks=160, block_size=BS)

    async def main():
        tier = PrefixCacheTier.for_engine(se, store_config)
        try:
            out = await generate(tier, se, prompt, rid)
            await tier.store.flush()
            return out, tier.stats()
        finally:
            await tier.store.close()

    try:
        (tokens, last), stats = asyncio.run(main())
        eng = se.engine
        hashes = eng.prompt_block_hashes(prompt)
        blocks = [eng.kv.pool.lookup(h) for h in hashes]
        assert None not in blocks, "the engine's own cache lost a prompt block"
        return tokens, last, stats, se.stats().num_prompt_tokens_computed, eng.read_kv_blocks(blocks), hashes, \
            eng.fingerprint
    finally:
        se.shutdown()


def test_bf16_kv_round_trips_through_redis_bit_exactly(redis_server, rclient, tiny_model):
    model, cfg = tiny_model, config(redis_server)
    _, last1, stats1, _, kv_a, hashes, fp = serve(model, cfg, PROMPT, "bfloat16")
    assert kv_a.dtype == torch.bfloat16 and last1.num_cached_tokens == 0 and stats1["blocks_written"] == 64
    assert stats1["writes_dropped"] == 0 and not stats1["errors"]
    blob = rclient.get(block_key(fp, hashes[5]))
    assert HEADER.unpack_from(blob)[2].rstrip(b"\0") == b"bfloat16"
    assert blob[HEADER.size:] == kv_a[:, :, 5].contiguous().view(torch.int16).numpy().tobytes()  # 2-byte raw bits
    _, last2, stats2, computed, kv_b, _, _ = serve(model, cfg, PROMPT2, "bfloat16", "r2")
    assert last2.num_imported_cached_tokens == 1024 and stats2["hits_tokens"]["redis"] == 1024
    assert computed == len(PROMPT2) - 1024 and stats2["corrupt_blobs"] == 0
    assert kv_b.dtype == torch.bfloat16 and torch.equal(kv_b[:, :, :64].view(torch.int16), kv_a.view(torch.int16))


def test_fp32_engine_never_takes_bf16_blocks(redis_server, rclient, tiny_model, caplog):
    model, cfg = tiny_model, config(redis_server)
    _, _, _, _, kv_bf16, hashes, fp = serve(model, cfg, PROMPT, "bfloat16")
    bf16_keys = [block_key(fp, h) for h in hashes]
    tokens, last, stats, computed, _, fp32_hashes, _ = serve(model, cfg, PROMPT, "float32", "r2")
    assert set(fp32_hashes).isdisjoint(hashes)  # the KV dtype is in the hash seed: other keys
    assert last.num_cached_tokens == 0 and stats["hits_tokens"]["redis"] == 0 and computed == len(PROMPT)
    assert tokens == LLM(model, device="cpu", dtype="float32", num_kv_blocks=160, block_size=BS,
                         enable_prefix_caching=False).generate([PROMPT], GREEDY)[0].token_ids
    assert rclient.exists(*bf16_keys) == 64 and stats["blocks_written"] == 64  # each dtype its own blocks

    async def fp32_reader_on_bf16_keys():  # a bf16 blob under a key an fp32 reader asks for
        store = PrefixStore(cfg, fp, BlockLayout("float32", tuple(kv_bf16.shape[:2]) + tuple(kv_bf16.shape[3:])))
        try:
            return await store.lookup(hashes), store.stats()
        finally:
            await store.close()

    with caplog.at_level("WARNING", logger="tandem.prefix_store"):
        kv, stats = asyncio.run(fp32_reader_on_bf16_keys())
    assert kv.shape[2] == 0 and kv.dtype == torch.float32  # a miss, nothing reinterpreted
    assert stats["corrupt_blobs"] == 1 and stats["hits_tokens"]["redis"] == 0 and not stats["errors"]
    assert any("dtype: 'bfloat16' is not 'float32'" in r.getMessage() for r in caplog.records)
    assert not rclient.exists(bf16_keys[0]) and rclient.exists(*bf16_keys[1:]) == 63  # the bad one is deleted


def test_store_writes_its_own_layout_and_rejects_other_shapes(redis_server, rclient):
    layout = BlockLayout("bfloat16", (2, 2, BS, 2, 16))
    kv = torch.randn((2, 2, 3, BS, 2, 16))  # fp32 handed to a bf16 store: written as bf16
    hashes = [bytes([i]) * 32 for i in range(3)]

    async def main():
        store = PrefixStore(config(redis_server), "own", layout)
        try:
            with pytest.raises(ValueError, match="^kv: blocks of shape"):
                store.submit(hashes, torch.zeros((2, 2, 3, BS, 2, 8)))
            assert store.submit(hashes, kv)
            await store.flush()
            return await store.lookup(hashes), store.stats()
        finally:
            await store.close()

    got, stats = asyncio.run(main())
    assert got.dtype == torch.bfloat16 and torch.equal(got, kv.to(torch.bfloat16))
    assert stats["blocks_written"] == 3 and stats["corrupt_blobs"] == 0
