"""Token-exact greedy generation against transformers for every supported architecture,
with a batch of prompts of different lengths, submitted together and staggered, under a
small token budget so prefill is chunked and mixed with decodes."""

import random

import pytest

from services.engine import LLM, SamplingParams
from tests.engine.hf_oracle import hf_greedy

ARCHS = ["tiny-llama", "tiny-llama3", "tiny-mistral", "tiny-qwen2", "tiny-qwen2-tied", "tiny-qwen3",
         "tiny-mixtral", "tiny-qwen2-moe", "tiny-qwen3-moe"]
NEW_TOKENS = 32
LENGTHS = [3, 17, 40, 9, 64, 25, 33]


def prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in LENGTHS]


def check_against_hf(path, batch, outputs):
    for ids, out in zip(batch, outputs):
        want_ids, want_lp = hf_greedy(path, ids, NEW_TOKENS)
        assert out.token_ids == want_ids
        got_lp = [next(iter(d.values())) for d in out.logprobs]
        assert max(abs(a - b) for a, b in zip(got_lp, want_lp)) < 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_batch_together_matches_transformers(arch, model_dir):
    path = model_dir(arch)
    llm = LLM(path, device="cpu", dtype="float32", max_num_batched_tokens=24, num_kv_blocks=64, block_size=8)
    batch = prompts(llm.engine.model_config.vocab_size)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True, logprobs=1)
    outputs = llm.generate(batch, params)
    assert all(o.finish_reason == "length" and len(o.token_ids) == NEW_TOKENS for o in outputs)
    check_against_hf(path, batch, outputs)
    assert llm.engine.kv.num_free_blocks == 64


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-qwen3", "tiny-qwen2-moe"])
def test_staggered_arrivals_match_transformers(arch, model_dir):
    path = model_dir(arch)
    llm = LLM(path, device="cpu", dtype="float32", max_num_batched_tokens=16, num_kv_blocks=64, block_size=8)
    engine = llm.engine
    batch = prompts(engine.model_config.vocab_size, seed=1)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True, logprobs=1)
    reqs = []
    for ids in batch:  # a new request every 3 steps, while earlier ones decode
        reqs.append(engine.add_request(ids, params))
        for _ in range(3):
            engine.step()
    while engine.has_unfinished_requests():
        engine.step()
    outputs = [type("O", (), {"token_ids": r.output_token_ids, "logprobs": r.logprobs}) for r in reqs]
    check_against_hf(path, batch, outputs)
    assert engine.kv.num_free_blocks == 64
