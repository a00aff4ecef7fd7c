"""Engine behaviour on a tiny Llama: prefix reuse, preemption, seeds, stops, bad input."""

import random

import pytest

from services.engine import LLM, EngineOverloadedError, SamplingParams
from tests.engine.hf_oracle import hf_greedy

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def path(model_dir):
    return model_dir("tiny-llama")


@pytest.fixture(scope="module")
def llm(path):
    return LLM(path, device="cpu", block_size=16, num_kv_blocks=128, max_num_batched_tokens=64)


def rand_ids(n, seed, vocab=500):
    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(n)]


def test_prefix_reuse_computes_only_the_rest(path):
    llm = LLM(path, device="cpu", block_size=16, num_kv_blocks=64)
    stats = llm.engine.stats
    prefix = rand_ids(48, seed=1)  # 3 full blocks
    first = llm.generate([prefix + rand_ids(7, seed=2)], GREEDY)[0]
    assert first.num_cached_tokens == 0
    second_prompt = prefix + rand_ids(11, seed=3)
    before = stats.num_prompt_tokens_computed
    second = llm.generate([second_prompt], GREEDY)[0]
    assert stats.num_prompt_tokens_computed - before == 11
    assert second.num_cached_tokens == 48
    cold = LLM(path, device="cpu", block_size=16, num_kv_blocks=64, enable_prefix_caching=False)
    assert second.token_ids == cold.generate([second_prompt], GREEDY)[0].token_ids


def test_preemption_keeps_outputs_identical_and_frees_everything(path):
    # 6 requests x (40 prompt + 24 new) tokens need 6 x 8 blocks of 8; the pool has 20
    llm = LLM(path, device="cpu", dtype="float32", block_size=8, num_kv_blocks=20, max_num_batched_tokens=64)
    batch = [rand_ids(40, seed=10 + i) for i in range(6)]
    outputs = llm.generate(batch, GREEDY)
    assert llm.engine.stats.num_preemptions > 0
    for ids, out in zip(batch, outputs):
        assert out.token_ids == hf_greedy(path, ids, 24)[0]
    assert llm.engine.kv.num_free_blocks == 20
    # aborted mid-way, with preemptions going on: still all free afterwards
    reqs = [llm.engine.add_request(ids, GREEDY) for ids in batch]
    for _ in range(6):
        llm.engine.step()
    for r in reqs:
        llm.engine.abort(r.request_id)
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.kv.num_free_blocks == 20


def test_seeded_sampling_is_independent_of_batch(llm):
    params = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.95, seed=1234, ignore_eos=True)
    target = rand_ids(12, seed=5)
    alone = llm.generate([target], params)[0].token_ids
    others = [rand_ids(n, seed=n) for n in (5, 30, 19)]
    noisy = SamplingParams(max_tokens=20, temperature=0.8, ignore_eos=True)
    mixed = llm.generate(others[:2] + [target] + others[2:], [noisy, noisy, params, noisy])[2].token_ids
    assert alone == mixed
    other_seed = llm.generate([target], SamplingParams(max_tokens=20, seed=99, ignore_eos=True))[0].token_ids
    assert other_seed != alone


def test_stop_token_ids_stop_strings_and_max_tokens(llm):
    prompt = rand_ids(10, seed=7)
    free_run = llm.generate([prompt], GREEDY)[0]
    stop_tok = free_run.token_ids[5]
    out = llm.generate([prompt], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True,
                                                stop_token_ids=[stop_tok]))[0]
    first = free_run.token_ids.index(stop_tok)
    assert out.finish_reason == "stop" and out.stop_reason == stop_tok
    assert out.token_ids == free_run.token_ids[:first + 1]
    text = free_run.text
    needle = text[len(text) // 2:len(text) // 2 + 3]
    assert needle
    out = llm.generate([prompt], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=[needle]))[0]
    assert out.finish_reason == "stop" and out.stop_reason == needle
    assert out.text == text[:text.index(needle)] and needle not in out.text
    out = llm.generate([prompt], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 3


def test_eos_finishes_unless_ignored(llm):
    eos = next(iter(llm.engine.eos_token_ids))
    prompt = rand_ids(10, seed=8)
    out = llm.generate([prompt], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True,
                                                logprobs=3))[0]
    assert len(out.logprobs) == 24 and all(len(d) >= 3 for d in out.logprobs)
    # stop on the model's first token by declaring it EOS-like via stop_token_ids is covered above;
    # here: EOS in the vocabulary really stops a request when not ignored
    llm.engine.eos_token_ids = frozenset({out.token_ids[2]})
    try:
        stopped = llm.generate([prompt], SamplingParams(max_tokens=24, temperature=0))[0]
    finally:
        llm.engine.eos_token_ids = frozenset({eos})
    assert stopped.finish_reason == "stop" and len(stopped.token_ids) == out.token_ids.index(out.token_ids[2]) + 1


@pytest.mark.parametrize("prompt,params,field", [
    ("", {}, "prompt"),
    ([], {}, "prompt_token_ids"),
    ([1, 2, 10**6], {}, "prompt_token_ids"),
    ([1, -1], {}, "prompt_token_ids"),
    ([1, 2, 3], {"max_tokens": 5000}, "max_tokens"),
])
def test_bad_input_names_the_field_and_engine_keeps_serving(llm, prompt, params, field):
    with pytest.raises(ValueError, match=field):
        llm.generate([prompt], SamplingParams(**params))
    assert not llm.engine.has_unfinished_requests()
    assert llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2, temperature=0))[0].finish_reason == "length"


@pytest.mark.parametrize("kwargs,field", [
    ({"max_tokens": 0}, "max_tokens"), ({"temperature": -0.1}, "temperature"), ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"), ({"top_k": -2}, "top_k"), ({"min_p": 2}, "min_p"), ({"logprobs": 99}, "logprobs"),
])
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_failed_batch_leaves_nothing_behind(llm):
    with pytest.raises(ValueError, match="prompt_token_ids"):
        llm.generate([[1, 2, 3], [1, 10**7]], GREEDY)
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.kv.num_free_blocks == 128


def test_admission_limit_rejects(path):
    llm = LLM(path, device="cpu", num_kv_blocks=32, max_waiting_requests=2)
    llm.engine.add_request([1, 2, 3], GREEDY)
    llm.engine.add_request([1, 2, 3], GREEDY)
    with pytest.raises(EngineOverloadedError):
        llm.engine.add_request([1, 2, 3], GREEDY)


def test_text_prompt_and_text_output(llm):
    out = llm.generate("def main():", SamplingParams(max_tokens=8, temperature=0))[0]
    assert out.prompt == "def main():" and out.prompt_token_ids == llm.tokenizer.encode("def main():")
    assert out.text == llm.tokenizer.decode(out.token_ids)
