"""Speculative decoding in the engine on tiny Llamas: greedy output identical with speculation on
and off (n-gram and draft model; batched, staggered, preempted, prefix hits, stops inside an
accepted run; drafting every step, with the adaptive policy, and with draft lengths chosen at
random per request and step), every KV block free afterwards, the target as its own draft
accepting every proposal, and sampled output following the target's distribution with a poor
draft."""

import math
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from scipy.stats import chisquare

from services.engine import LLM, SamplingParams
from services.engine.model_catalog import embedded_model_path
from services.engine.spec_decode.policy import SpeculationPolicy

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


def rand_ids(n, seed, vocab=500):
    rng = random.Random(seed)
    return [rng.randrange(4, vocab) for _ in range(n)]


def repetitive(n, seed):
    """A prompt that repeats itself (n-gram lookup finds matches in it)."""
    part = rand_ids(n, seed)
    return part + rand_ids(3, seed + 100) + part


@pytest.fixture(scope="module")
def target(model_dir):
    return model_dir("tiny-llama")


def noisy_copy(path: str, out: Path, noise: float, seed: int = 7) -> str:
    """The checkpoint at ``path`` with every weight perturbed by ``noise`` times its std."""
    shutil.copytree(path, out)
    gen = torch.Generator().manual_seed(seed)
    weights = load_file(out / "model.safetensors")
    for name, w in weights.items():
        weights[name] = w + noise * w.float().std() * torch.randn(w.shape, generator=gen)
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return str(out)


@pytest.fixture(scope="module")
def poor_draft(target, tmp_path_factory):
    """The target's shape and tokenizer with noisy weights: a draft that is often wrong."""
    return noisy_copy(target, tmp_path_factory.mktemp("draft") / "model", noise=0.5)


def spec_config(kind, target, poor_draft, k=3, adaptive=False):
    """The speculative section of ``kind``; ``adaptive=False`` (these tests' default) drafts at
    every step, so what a test checks does not depend on the policy's timings."""
    if kind == "ngram":
        return {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": 1, "prompt_lookup_max": 3,
                "adaptive": adaptive}
    return {"method": "draft_model", "model": target if kind == "self" else poor_draft, "num_speculative_tokens": k,
            "adaptive": adaptive}


def engine_llm(target, spec=None, **options):
    base = dict(device="cpu", block_size=16, num_kv_blocks=128)
    base.update(options)
    if spec is not None:
        base["speculative_config"] = spec
    return LLM(target, **base)


@pytest.fixture(scope="module")
def baseline(target):
    return engine_llm(target)


def assert_all_free(llm):
    engine = llm.engine
    assert not engine.has_unfinished_requests()
    assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks
    draft_kv = getattr(engine.proposer, "kv", None)
    if draft_kv is not None:
        assert draft_kv.num_free_blocks == draft_kv.pool.num_blocks and not engine.proposer.shadows


PROMPTS = [repetitive(10, 1), rand_ids(5, 2), repetitive(20, 3), rand_ids(33, 4), repetitive(7, 5), [9, 9, 9, 9]]


@pytest.mark.parametrize("kind", ["ngram", "draft", "self"])
def test_greedy_output_is_identical_batched_and_staggered(kind, target, poor_draft, baseline):
    expected = [o.token_ids for o in baseline.generate(PROMPTS, GREEDY)]
    llm = engine_llm(target, spec_config(kind, target, poor_draft))
    assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == expected
    stats = llm.engine.stats
    assert stats.spec_num_drafts > 0 and stats.spec_num_accepted_tokens > 0
    assert_all_free(llm)
    # staggered: a new request joins every other step while others are mid-draft
    engine, pending, reqs, step = llm.engine, list(PROMPTS), [], 0
    while pending or engine.has_unfinished_requests():
        if pending and step % 2 == 0:
            reqs.append(engine.add_request(pending.pop(0), GREEDY))
        engine.step()
        step += 1
    assert [r.output_token_ids for r in reqs] == expected
    assert_all_free(llm)


def test_the_target_as_its_own_draft_accepts_every_greedy_proposal(target, poor_draft):
    llm = engine_llm(target, spec_config("self", target, poor_draft, k=4))
    llm.generate(PROMPTS, GREEDY)
    s = llm.engine.stats
    assert s.spec_num_draft_tokens > 0 and s.spec_num_accepted_tokens == s.spec_num_draft_tokens
    assert s.spec_num_accepted_per_pos[0] == s.spec_num_drafts
    # streaming: a step emits the accepted run (k + 1 tokens) as one chunk
    engine = llm.engine
    req = engine.add_request(rand_ids(9, 6), GREEDY)
    first = engine.step()  # prefill: one token
    (chunk,) = engine.step()
    assert len(first[0].token_ids) == 1 and len(chunk.token_ids) == 5 and chunk.num_output_tokens == 6
    engine.abort(req.request_id)
    assert_all_free(llm)


@pytest.mark.parametrize("kind", ["ngram", "draft"])
def test_preemption_keeps_outputs_identical_and_frees_everything(kind, target, poor_draft, baseline):
    # 6 requests x (40 prompt + 24 new) tokens need 6 x 8 blocks of 8; the pool has 20
    options = dict(block_size=8, num_kv_blocks=20, max_num_batched_tokens=64)
    llm = engine_llm(target, spec_config(kind, target, poor_draft), **options)
    batch = [repetitive(18, 10 + i) for i in range(6)]
    outputs = llm.generate(batch, GREEDY)
    assert llm.engine.stats.num_preemptions > 0 and llm.engine.stats.spec_num_drafts > 0
    assert [o.token_ids for o in outputs] == [o.token_ids for o in baseline.generate(batch, GREEDY)]
    assert_all_free(llm)


@pytest.mark.parametrize("kind", ["ngram", "self"])
def test_prefix_cache_hits_on_blocks_that_hold_accepted_drafts(kind, target, poor_draft, baseline):
    llm = engine_llm(target, spec_config(kind, target, poor_draft, k=4))
    prompt = repetitive(14, 20)  # 31 tokens
    first = llm.generate([prompt], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))[0]
    # the output's blocks were filled through verified drafts; a prompt that continues it reuses them
    follow = prompt + first.token_ids[:33]
    second = llm.generate([follow], GREEDY)[0]
    assert second.num_cached_tokens == 48
    assert second.token_ids == baseline.generate([follow], GREEDY)[0].token_ids
    assert_all_free(llm)


def stop_variants(free):
    """Sampling params whose stop lands inside a run of accepted drafts, from a free run."""
    text = free.text
    needle = text[len(text) // 2:len(text) // 2 + 2]
    base = dict(max_tokens=24, temperature=0, ignore_eos=True)
    variants = [SamplingParams(**base, stop_token_ids=[free.token_ids[7]]),
                SamplingParams(**base, stop=[needle]), SamplingParams(**base, stop=[needle, "zz"], logprobs=2)]
    variants += [SamplingParams(**dict(base, max_tokens=n)) for n in (1, 2, 3, 5, 7, 8, 13)]
    return variants


def test_stops_and_max_tokens_inside_an_accepted_run_truncate_as_without_speculation(target, poor_draft,
                                                                                     baseline):
    llm = engine_llm(target, spec_config("self", target, poor_draft, k=4))
    prompt = rand_ids(10, seed=7)
    free = baseline.generate([prompt], GREEDY)[0]
    for params in stop_variants(free):
        want = baseline.generate([prompt], params)[0]
        got = llm.generate([prompt], params)[0]
        assert (got.token_ids, got.text, got.finish_reason, got.stop_reason) == \
            (want.token_ids, want.text, want.finish_reason, want.stop_reason), params
        if params.logprobs is not None:
            assert len(got.logprobs) == len(want.logprobs)
            for g, w in zip(got.logprobs, want.logprobs):
                assert g.keys() == w.keys() and all(math.isclose(g[t], w[t], abs_tol=1e-4) for t in g)
    eos, eos_at = baseline.engine.eos_token_ids, free.token_ids[6]  # emitted mid-run, declared EOS: it stops there
    for x in (llm, baseline):
        x.engine.eos_token_ids = frozenset({eos_at})
    try:
        want, got = (x.generate([prompt], SamplingParams(max_tokens=24, temperature=0))[0] for x in (baseline, llm))
    finally:
        for x in (llm, baseline):
            x.engine.eos_token_ids = eos
    assert got.token_ids == want.token_ids and got.finish_reason == "stop"
    assert_all_free(llm)


def test_aborts_mid_verification_free_every_block(target, poor_draft):
    llm = engine_llm(target, spec_config("draft", target, poor_draft))
    engine = llm.engine
    reqs = [engine.add_request(p, GREEDY) for p in PROMPTS]
    for _ in range(3):
        engine.step()
    assert engine.stats.spec_num_drafts > 0
    engine._propose()  # drafts pending for the next step, the draft's KV holding them
    assert any(r.spec_token_ids for r in reqs)
    assert engine.proposer.kv.num_free_blocks < engine.proposer.kv.pool.num_blocks
    for r in reqs:
        engine.abort(r.request_id)
    assert_all_free(llm)


def test_a_request_can_opt_out(target, poor_draft, baseline):
    llm = engine_llm(target, spec_config("ngram", target, poor_draft))
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, speculative=False)
    out = llm.generate(PROMPTS, params)
    assert llm.engine.stats.spec_num_drafts == 0
    assert [o.token_ids for o in out] == [o.token_ids for o in baseline.generate(PROMPTS, GREEDY)]


def test_a_draft_with_another_vocabulary_is_refused(target):
    with pytest.raises(ValueError, match="vocab_size is 4096, the target's 512.*map to different ids"):
        engine_llm(target, {"method": "draft_model", "model": str(embedded_model_path())})


def test_seeded_sampling_with_speculation_is_reproducible_and_batch_independent(target, poor_draft):
    llm = engine_llm(target, spec_config("draft", target, poor_draft))
    params = SamplingParams(max_tokens=20, temperature=3.0, top_k=10, seed=1234, ignore_eos=True)
    prompt = rand_ids(12, seed=5)
    alone = llm.generate([prompt], params)[0].token_ids
    noisy = SamplingParams(max_tokens=20, temperature=2.0, ignore_eos=True)
    mixed = llm.generate([rand_ids(5, 5), prompt, rand_ids(30, 6)], [noisy, params, noisy])[1].token_ids
    assert alone == mixed == llm.generate([prompt], params)[0].token_ids
    assert llm.engine.stats.spec_num_drafts > 0
    assert_all_free(llm)


def test_sampled_output_follows_the_target_distribution_with_a_poor_draft(target, poor_draft, baseline):
    """Chi-square of the second token (the first that goes through verification) given the most
    likely first token, against the target's filtered distribution."""
    temperature, top_k, n = 8.0, 8, 2000
    prompt = rand_ids(17, seed=11)  # one full block: after the first request, target and draft reuse it
    t1 = baseline.generate([prompt], SamplingParams(max_tokens=1, temperature=0))[0].token_ids[0]
    lp = baseline.generate([prompt + [t1]], SamplingParams(max_tokens=1, temperature=0, logprobs=top_k))[0].logprobs[0]
    top = sorted(lp, key=lambda t: -lp[t])[:top_k]
    p = torch.softmax(torch.tensor([lp[t] for t in top], dtype=torch.float64) / temperature, dim=0)
    llm = engine_llm(target, spec_config("draft", target, poor_draft), num_kv_blocks=256)
    params = SamplingParams(max_tokens=4, temperature=temperature, top_k=top_k, ignore_eos=True)
    outs = llm.generate([prompt] * n, params)
    seconds = [o.token_ids[1] for o in outs if o.token_ids[0] == t1]
    s = llm.engine.stats
    assert 0 < s.spec_num_accepted_tokens < s.spec_num_draft_tokens  # the draft is poor, not useless
    assert len(seconds) > 300 and set(seconds) <= set(top)
    counts = torch.tensor([seconds.count(t) for t in top], dtype=torch.float64)
    stat = chisquare(counts.numpy(), (p * len(seconds)).numpy())
    assert stat.pvalue > 1e-3, (counts.tolist(), (p * len(seconds)).tolist())
    assert_all_free(llm)


def run_staggered(engine, prompts, params):
    """Add a request every other step while others are mid-draft; the requests, in order."""
    pending, reqs, step = list(prompts), [], 0
    while pending or engine.has_unfinished_requests():
        if pending and step % 2 == 0:
            reqs.append(engine.add_request(pending.pop(0), params))
        engine.step()
        step += 1
    return reqs


@pytest.mark.parametrize("kind", ["ngram", "draft", "self"])
def test_greedy_output_is_identical_with_the_adaptive_policy(kind, target, poor_draft, baseline):
    expected = [o.token_ids for o in baseline.generate(PROMPTS, GREEDY)]
    llm = engine_llm(target, spec_config(kind, target, poor_draft, adaptive=True))
    assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == expected
    assert llm.engine.stats.spec_num_drafts > 0  # the policy's warm-up drafts, whatever it measures after
    assert [r.output_token_ids for r in run_staggered(llm.engine, PROMPTS, GREEDY)] == expected
    assert not llm.engine.policy.requests  # finished requests are forgotten
    assert_all_free(llm)


class RandomLengths(SpeculationPolicy):
    """A policy that asks each request for a random number of draft tokens (0..limit) per step."""

    def __init__(self, seed):
        super().__init__()
        self.rng = random.Random(seed)

    def plan(self, asks, num_decodes):
        chosen = [self.rng.randint(0, a.limit) for a in asks]
        self._remember(asks, chosen)
        return chosen


@pytest.mark.parametrize("kind", ["ngram", "draft", "self"])
def test_greedy_output_is_identical_whatever_draft_lengths_a_policy_chooses(kind, target, poor_draft, baseline):
    """Requests skipped for some steps (a draft model's shadow falls behind and catches up) and
    drafts shorter than k keep every output what the target alone produces."""
    expected = [o.token_ids for o in baseline.generate(PROMPTS, GREEDY)]
    llm = engine_llm(target, spec_config(kind, target, poor_draft, k=4))
    for seed in range(3):
        llm.engine.policy = RandomLengths(seed)
        assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == expected, seed
        assert [r.output_token_ids for r in run_staggered(llm.engine, PROMPTS, GREEDY)] == expected, seed
    assert llm.engine.stats.spec_num_drafts > 0
    assert_all_free(llm)


def test_seeded_sampled_requests_draft_every_step_with_the_policy_on(target, poor_draft):
    """Their tokens must not depend on timings: the policy gives them their whole limit, so they
    match the engine that drafts every step, alone or next to greedy requests the policy decides for."""
    params = SamplingParams(max_tokens=20, temperature=3.0, top_k=10, seed=99, ignore_eos=True)
    prompt = rand_ids(12, seed=8)
    always = engine_llm(target, spec_config("draft", target, poor_draft)).generate([prompt], params)[0].token_ids
    llm = engine_llm(target, spec_config("draft", target, poor_draft, adaptive=True))
    mixed = llm.generate([rand_ids(9, 3), prompt, repetitive(8, 4)], [GREEDY, params, GREEDY])[1].token_ids
    assert mixed == always == llm.generate([prompt], params)[0].token_ids
    assert_all_free(llm)
