"""A request resumed on another engine after n tokens (``LLMEngine.add_request(resume_token_ids=)``,
what a migrated stream does) goes on exactly as the uninterrupted one: tokens, text, finish,
logprobs and seeded draws; and seeded draws depend on (seed, position) only."""

from __future__ import annotations

import pytest

from services.engine.engine import LLMEngine
from services.engine.llm import build_engine_config
from services.engine.make_model import make_model
from services.engine.sampler import position_seed
from services.engine.sampling_params import SamplingParams

PROMPT = "The quick brown fox jumps over the lazy dog. A class is"


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return str(make_model("tiny-llama", tmp_path_factory.mktemp("tiny-llama")))


def engine(path) -> LLMEngine:
    return LLMEngine(build_engine_config(path, device="cpu", block_size=8, num_kv_blocks=64))


def stream(eng: LLMEngine, prompt, params, resume=None) -> list:
    """Every chunk of one request, one engine step at a time."""
    req = eng.add_request(prompt, params, request_id="r", resume_token_ids=resume)
    chunks = []
    while not req.is_finished:
        chunks += [c for c in eng.step() if c.request_id == "r"]
    return chunks


def tokens(chunks) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def text(chunks) -> str:
    return "".join(c.text for c in chunks)


def test_position_seeds_are_a_function_of_the_pair():
    seeds = {position_seed(s, p) for s in (0, 1, 7, -3, 2 ** 63 + 5) for p in range(50)}
    assert len(seeds) == 250 and all(0 <= x < 2 ** 63 for x in seeds)
    assert position_seed(7, 3) == position_seed(7, 3) != position_seed(3, 7)


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=20, temperature=0, ignore_eos=True),
    SamplingParams(max_tokens=20, temperature=0.9, top_k=50, seed=11, ignore_eos=True, logprobs=2),
    SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, seed=-5, ignore_eos=True, stop=["zzzq", "qqq"]),
], ids=["greedy", "seeded-logprobs", "seeded-stop-strings"])
@pytest.mark.parametrize("cut", [1, 7, 19])
def test_a_resumed_request_continues_the_uninterrupted_one(path, params, cut):
    full = stream(engine(path), PROMPT, params)
    # what a client has after `cut` tokens: the chunks up to there (one token per step here)
    assert all(len(c.token_ids) == 1 for c in full)
    sent = full[:cut]
    rest = stream(engine(path), PROMPT, params, resume=tokens(sent))
    assert tokens(sent) + tokens(rest) == tokens(full)
    assert text(sent) + text(rest) == text(full)
    assert rest[-1].finish_reason == full[-1].finish_reason and rest[-1].num_output_tokens == len(tokens(full))
    assert rest[0].num_prompt_tokens == full[0].num_prompt_tokens
    if params.logprobs is not None:  # recomputed in a prefill instead of decoded: equal to rounding
        got, want = [lp for c in sent + rest for lp in c.logprobs], [lp for c in full for lp in c.logprobs]
        assert [set(a) for a in got] == [set(b) for b in want]
        assert all(a[t] == pytest.approx(b[t], abs=1e-4) for a, b in zip(got, want) for t in a)


def test_a_stop_string_that_spans_the_cut_still_stops(path):
    base = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    free = stream(engine(path), PROMPT, base)
    whole = text(free)
    stop = whole[3:7] if len(whole) >= 8 else whole[1:3]
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, stop=[stop])
    full = stream(engine(path), PROMPT, params)
    for cut in range(1, len(full)):
        rest = stream(engine(path), PROMPT, params, resume=tokens(full[:cut]))
        assert text(full[:cut]) + text(rest) == text(full), cut
        assert rest[-1].finish_reason == full[-1].finish_reason == "stop"


def test_a_resumed_request_reuses_the_prefix_cache_of_its_own_tokens(path):
    eng = engine(path)
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    full = stream(eng, PROMPT, params)
    before = eng.stats.num_prompt_tokens_computed
    stream(eng, PROMPT, params, resume=tokens(full)[:20])  # same engine: prompt + 20 tokens are cached
    recomputed = eng.stats.num_prompt_tokens_computed - before
    assert recomputed <= 8, recomputed  # at most the last block is computed again


def test_bad_resume_tokens_name_the_field(path):
    eng = engine(path)
    params = SamplingParams(max_tokens=4, temperature=0)
    with pytest.raises(ValueError, match="resume_token_ids: must be token ids inside the vocabulary"):
        eng.add_request([5, 6], params, resume_token_ids=[5, 10 ** 6])
    with pytest.raises(ValueError, match="resume_token_ids: 4 tokens leave nothing to generate"):
        eng.add_request([5, 6], params, resume_token_ids=[5, 6, 7, 8])
    assert not eng.has_unfinished_requests()
