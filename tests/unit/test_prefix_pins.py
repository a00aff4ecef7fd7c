"""Engine hooks of the external prefix tier (no Redis, no Ray): hash chain, local count,
importing KV blocks as pinned cached blocks, exporting a request's new full blocks."""

import asyncio

import pytest

from services.engine import LLM, SamplingParams
from services.engine.engine import LLMEngine
from services.engine.kv_cache import block_hash_chain
from services.engine.llm import build_engine_config
from services.engine.make_model import make_model
from services.serving_engine import ServingEngine

BS = 16
PROMPT = [(i * 7 + 3) % 500 + 4 for i in range(100)]  # 6 full blocks + 4 tokens
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return str(make_model("tiny-llama", tmp_path_factory.mktemp("tiny-llama")))


def run(engine: LLMEngine, prompt, rid, params=GREEDY):
    engine.add_request(prompt, params, request_id=rid)
    chunks = []
    while engine.has_unfinished_requests():
        chunks += [c for c in engine.step() if c.request_id == rid]
    return [t for c in chunks for t in c.token_ids], chunks[-1]


def exported_blocks(path, prompt):
    """The full prompt blocks of ``prompt`` as another engine exports them for write-back."""
    se = ServingEngine.from_model(path, device="cpu", num_kv_blocks=32, block_size=BS)

    async def main():
        se.expect_export("w", len(prompt), 0)
        async for _ in se.add_request(prompt, GREEDY, request_id="w"):
            pass
        return se.pop_export("w")

    try:
        return asyncio.run(main())
    finally:
        se.shutdown()


def test_hash_chain_and_prefix_bounds(path):
    eng = LLMEngine(build_engine_config(path, device="cpu", num_kv_blocks=16, block_size=BS))
    hashes = eng.prompt_block_hashes(PROMPT)
    assert hashes == block_hash_chain(eng.kv.seed, PROMPT, BS) and len(hashes) == 6
    assert eng.max_prefix_blocks(96) == 5 and eng.max_prefix_blocks(97) == 6  # one token always computed
    assert eng.pin_cached_prefix("x", hashes) == 0
    run(eng, PROMPT, "a")
    assert eng.kv.num_cached_blocks(hashes) == 6
    assert eng.pin_cached_prefix("x", hashes) == 6
    eng.release_prefix_pins("x")
    assert eng.kv.num_free_blocks == 16


def test_export_holds_the_new_full_prompt_blocks(path):
    kv = exported_blocks(path, PROMPT)
    eng = LLMEngine(build_engine_config(path, device="cpu", num_kv_blocks=16, block_size=BS))
    assert tuple(kv.shape) == (eng.model_config.num_layers, 2, 6, BS, eng.model_config.num_kv_heads,
                               eng.model_config.head_dim)
    assert kv.abs().sum() > 0


def test_imported_blocks_are_pinned_until_admission_and_used(path):
    kv = exported_blocks(path, PROMPT)
    want = LLM(path, device="cpu", num_kv_blocks=32, block_size=BS, enable_prefix_caching=False).generate(
        [PROMPT], GREEDY)[0].token_ids
    eng = LLMEngine(build_engine_config(path, device="cpu", num_kv_blocks=16, block_size=BS))
    hashes = eng.prompt_block_hashes(PROMPT)
    assert eng.import_prefix_blocks("r", hashes, kv, len(PROMPT)) == 6
    assert eng.kv.num_free_blocks == 10
    # pressure: another request takes every free block (LRU reuse would evict unpinned cached blocks)
    run(eng, [9] * (10 * BS - 8), "other", SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    assert eng.kv.num_cached_blocks(hashes) == 6
    before = eng.stats.num_prompt_tokens_computed
    tokens, last = run(eng, PROMPT, "r")
    assert tokens == want
    assert last.num_cached_tokens == 96 and last.num_imported_cached_tokens == 96
    assert eng.stats.num_prompt_tokens_computed - before == len(PROMPT) - 96
    assert eng.kv.num_free_blocks == 16  # pins went at admission, the request's refs at its end


def test_import_refused_when_the_rest_would_not_fit(path):
    kv = exported_blocks(path, PROMPT)
    eng = LLMEngine(build_engine_config(path, device="cpu", num_kv_blocks=8, block_size=BS))
    eng.kv.pool.allocate(2)  # 6 free; the prompt needs 7 blocks
    assert eng.import_prefix_blocks("r", eng.prompt_block_hashes(PROMPT), kv, len(PROMPT)) == 0
    assert eng.kv.num_free_blocks == 6


def test_unadmitted_request_releases_its_pins(path):
    kv = exported_blocks(path, PROMPT)
    eng = LLMEngine(build_engine_config(path, device="cpu", num_kv_blocks=16, block_size=BS))
    eng.import_prefix_blocks("r", eng.prompt_block_hashes(PROMPT), kv, len(PROMPT))
    eng.add_request(PROMPT, GREEDY, request_id="r")
    eng.abort("r")  # never admitted: free() drops the pins
    assert eng.kv.num_free_blocks == 16
    assert eng.kv.num_cached_blocks(eng.prompt_block_hashes(PROMPT)) == 6  # still cached, now evictable
