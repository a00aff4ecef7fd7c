"""Speculative decoding logic without a model: n-gram lookup, the rejection rule (chi-square
against the target's distribution with a deliberately poor draft), drafts in the scheduler's
token budget, options validation."""

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from services.engine.config import EngineConfig, SchedulerConfig
from services.engine.config_parse import ConfigError
from services.engine.kv_cache import KVCacheManager, hash_seed
from services.engine.request import Request
from services.engine.sampler import filtered_probs
from services.engine.sampling_params import SamplingParams
from services.engine.scheduler import Scheduler
from services.engine.spec_decode.ngram import find_continuation
from services.engine.spec_decode.rejection import verify, verify_greedy


def cont(tokens, n_min=1, n_max=3, k=3):
    return find_continuation(np.asarray(tokens, dtype=np.int64), n_min, n_max, k)


def test_ngram_proposes_what_followed_the_longest_most_recent_match():
    assert cont([1, 2, 3, 9, 9, 1, 2, 3]) == [9, 9, 1]
    # "2 3" follows "5 2 3" (3-gram match) at the start and "7 2 3" (2-gram) later: the longer wins
    assert cont([5, 2, 3, 4, 4, 7, 2, 3, 8, 5, 2, 3]) == [4, 4, 7]
    # equal lengths: the most recent occurrence wins
    assert cont([2, 3, 4, 1, 2, 3, 6, 0, 2, 3]) == [6, 0, 2]
    assert cont([1, 2, 3, 4]) == []  # nothing recurs
    assert cont([7, 8, 7, 8], n_min=2, k=5) == [7, 8]  # fewer than k tokens follow
    assert cont([1, 2, 9, 1, 2], n_min=3) == []  # the suffix of n_min tokens never recurs
    assert cont([4, 4, 4, 4], k=2) == [4]  # overlapping occurrence: what follows it


V = 6
# target logits and a poor draft q at three draft positions (+ the bonus position for p)
TARGET = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -1.0],
                       [0.0, 1.0, 2.0, 0.0, 1.0, 0.5],
                       [1.0, 1.0, 0.0, -1.0, 2.0, 0.0],
                       [0.5, 0.0, 0.0, 2.0, 0.0, 1.0]])
POOR_Q = torch.tensor([[0.10, 0.10, 0.10, 0.10, 0.10, 0.50],  # most mass where p is least
                       [0.50, 0.10, 0.10, 0.10, 0.10, 0.10],
                       [0.15, 0.15, 0.10, 0.50, 0.00, 0.10]])  # never drafts p's favourite
ONE_HOT_DRAFT = [1, 4, 0]  # a deterministic proposer's guesses (q one-hot), seldom the target's choice


def draw_emitted(params, q, n, seed=0):
    """Verify n drafts at once, each drawn afresh from q (None: always ``ONE_HOT_DRAFT``), against
    the same target rows; returns the emitted tokens by position (position j is emitted only
    when the drafts before it were accepted)."""
    gen = torch.Generator().manual_seed(seed)
    if q is None:
        drafts = [ONE_HOT_DRAFT] * n
    else:
        drafts = torch.stack([torch.multinomial(q[j], n, replacement=True, generator=gen)
                              for j in range(q.shape[0])], dim=1).tolist()
    logits = TARGET.repeat(n, 1)
    verified = verify(logits, drafts, [q] * n, [params] * n, [None] * n, gen)
    by_pos = [[] for _ in range(TARGET.shape[0])]
    for draft, v in zip(drafts, verified):
        assert v.token_ids[:-1] == draft[:v.num_accepted] and len(v.token_ids) == v.num_accepted + 1
        for j, t in enumerate(v.token_ids):
            by_pos[j].append(t)
    return by_pos


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.8, top_k=4),
                                    SamplingParams(temperature=1.2, top_p=0.8, min_p=0.05)])
@pytest.mark.parametrize("q", [POOR_Q, None], ids=["draft-q", "one-hot"])
def test_emitted_tokens_follow_the_target_distribution_at_every_position(params, q):
    """Each emitted token has the target's (filtered) distribution at its position, whatever q."""
    p = filtered_probs(TARGET, [params] * TARGET.shape[0]).double()
    by_pos = draw_emitted(params, q, 6000)
    assert len(by_pos[1]) > 500  # the poor draft is still accepted now and then
    for j, tokens in enumerate(by_pos):
        if len(tokens) < 200:
            continue
        counts = torch.bincount(torch.tensor(tokens), minlength=V).double()
        exp = p[j] / p[j].sum() * len(tokens)
        support = exp > 0
        assert counts[~support].sum() == 0, f"position {j}: a token the filters remove"
        stat = chisquare(counts[support].numpy(), exp[support].numpy())
        assert stat.pvalue > 1e-3, (j, counts.tolist(), exp.tolist())


def test_a_draft_equal_to_the_target_is_always_accepted():
    params = SamplingParams(temperature=1.0)
    p = filtered_probs(TARGET, [params] * 4)
    gen = torch.Generator().manual_seed(3)
    for _ in range(200):
        draft = [int(torch.multinomial(p[j], 1, generator=gen)[0]) for j in range(3)]
        (v,) = verify(TARGET, [draft], [p[:3]], [params], [None], gen)
        assert v.num_accepted == 3


def test_greedy_accepts_while_the_draft_is_the_argmax():
    logits = torch.eye(5)[[1, 2, 3, 4, 0, 2, 2]]  # argmax rows: 1 2 3 4 | 0 2 | 2
    got = verify_greedy(logits, [[1, 2, 0], [0], []])
    assert [v.token_ids for v in got] == [[1, 2, 3], [0, 2], [2]]
    assert [v.num_accepted for v in got] == [2, 1, 0]
    mixed = verify(logits, [[1, 2, 0], [0], []], [None] * 3, [SamplingParams(temperature=0)] * 3, [None] * 3,
                   torch.Generator())
    assert mixed == got


def test_seeded_verification_does_not_depend_on_the_batch():
    params, seeded = SamplingParams(temperature=1.0), SamplingParams(temperature=1.0, seed=5)
    draft = [5, 0, 3]

    def last_request(batch):
        ps = [params] * (batch - 1) + [seeded]
        gens = [None] * (batch - 1) + [torch.Generator().manual_seed(5)]
        runs = [verify(torch.cat([TARGET] * batch), [draft] * batch, [POOR_Q] * batch, ps, gens,
                       torch.Generator().manual_seed(batch)) for _ in range(20)]
        return [r[-1].token_ids for r in runs]

    assert last_request(1) == last_request(4) == last_request(7)


def make_scheduler(num_blocks=16, budget=64):
    kv = KVCacheManager(num_blocks, 4, hash_seed("m", "float32", 4))
    return Scheduler(SchedulerConfig(max_num_batched_tokens=budget), kv), kv


def decoding(s, prompt_len, *rids):
    """Requests whose prompts are computed (one step) and first token sampled (decode state)."""
    reqs = [Request(rid, list(range(10, 10 + prompt_len)), SamplingParams(max_tokens=32)) for rid in rids]
    for r in reqs:
        s.add(r)
    s.update_after_step(s.schedule())
    for r in reqs:
        assert r.num_computed_tokens == prompt_len
        r.output_token_ids.append(99)
    return reqs


def test_scheduler_plans_drafts_inside_the_budget_and_rolls_back_rejections():
    s, kv = make_scheduler(budget=8)
    a, b = decoding(s, 3, "a", "b")  # blocks [0] and [1]
    a.spec_token_ids, b.spec_token_ids = [1, 2, 3, 4], [5, 6, 7, 8]
    out = s.schedule()
    assert out.num_scheduled_tokens == {"a": 5, "b": 3}  # b's draft trimmed to the budget left
    assert out.scheduled_spec_decode_tokens == {"a": [1, 2, 3, 4], "b": [5, 6]}
    assert kv.block_tables == {"a": [0, 2], "b": [1, 3]}  # 4 known + 4 drafts = 8 slots for a
    s.update_after_step(out, {"a": 4, "b": 0})  # a: every draft rejected, b: both accepted
    assert a.num_computed_tokens == 4 and b.num_computed_tokens == 6
    assert kv.block_tables == {"a": [0], "b": [1, 3]}  # a's rejected drafts' block went back
    assert kv.num_free_blocks == 13
    for r in (a, b):
        s.finish(r, "abort")
    assert kv.num_free_blocks == 16


def test_a_draft_that_does_not_fit_the_pool_is_dropped_not_preempting():
    s, kv = make_scheduler(num_blocks=4)
    a, b = decoding(s, 7, "a", "b")  # 8 tokens each: 2 blocks each, the pool is full
    a.spec_token_ids = [1, 2, 3]
    out = s.schedule()
    assert out.scheduled_spec_decode_tokens == {} and out.preempted_request_ids == []
    assert out.num_scheduled_tokens == {"a": 1, "b": 1}


def test_options_are_validated_with_their_path():
    cfg = EngineConfig.from_options("m", {"speculative_config": {"method": "ngram", "num_speculative_tokens": 4,
                                                                 "prompt_lookup_max": 3}})
    assert cfg.speculative.name == "ngram" and cfg.speculative.options.num_speculative_tokens == 4
    yaml_form = EngineConfig.from_options("m", {"speculative": {"method": "draft_model", "model": "/d"}})
    assert yaml_form.speculative.options.model == "/d"
    for options, message in (
            ({"method": "ngram", "num_speculative_tokens": 0}, "speculative.num_speculative_tokens: must be >= 1"),
            ({"method": "ngram", "prompt_lookup_min": 4, "prompt_lookup_max": 2}, "speculative.prompt_lookup_max"),
            ({"method": "draft_model"}, "speculative.model: the draft model's path is required"),
            ({"method": "ngram", "k": 3}, "speculative: unknown key(s) ['k']")):
        with pytest.raises(ConfigError) as err:
            EngineConfig.from_options("m", {"speculative": options})
        assert str(err.value).startswith(message), str(err.value)


def test_per_request_opt_out_is_a_checked_sampling_param():
    assert SamplingParams().speculative and not SamplingParams(speculative=False).speculative
    with pytest.raises(ValueError, match="speculative"):
        SamplingParams(speculative="no")
