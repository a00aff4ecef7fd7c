"""Sampler: greedy, filters follow the intended distribution (chi-square), seeds are batch-independent."""

import math

import pytest
import torch
from scipy.stats import chisquare

from services.engine.sampler import Sampler, filtered_probs
from services.engine.sampling_params import SamplingParams

LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -1.0])


def expected(params: SamplingParams) -> torch.Tensor:
    """Reference distribution computed independently, token by token, renormalizing after
    each filter (temperature -> top-k -> top-p -> min-p)."""
    p = torch.softmax(LOGITS / params.temperature, dim=0).tolist()
    order = sorted(range(len(p)), key=lambda i: -p[i])
    if params.top_k > 0:
        p = [x if i in order[:params.top_k] else 0.0 for i, x in enumerate(p)]
        p = [x / sum(p) for x in p]
    mass, nucleus = 0.0, set()
    for i in order:
        if p[i] > 0 and mass < params.top_p:
            nucleus.add(i)
        mass += p[i]
    p = [x if i in nucleus else 0.0 for i, x in enumerate(p)]
    p = [x / sum(p) for x in p]
    top = max(p)
    p = [x if x >= params.min_p * top else 0.0 for x in p]
    return torch.tensor([x / sum(p) for x in p])


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_k=3),
    SamplingParams(temperature=1.3, top_p=0.8),
    SamplingParams(temperature=1.0, min_p=0.3),
    SamplingParams(temperature=0.9, top_k=4, top_p=0.9),
])
def test_sampling_follows_intended_distribution(params):
    n = 20000
    sampler = Sampler(torch.Generator().manual_seed(1234))
    logits = LOGITS.repeat(n, 1)
    tokens = sampler(logits, [params] * n, [None] * n).token_ids
    counts = torch.bincount(torch.tensor(tokens), minlength=len(LOGITS)).double()
    exp = expected(params).double()
    exp = exp / exp.sum() * n
    support = exp > 0
    assert counts[~support].sum() == 0, "sampled a token the filters remove"
    stat = chisquare(counts[support].numpy(), exp[support].numpy())
    assert stat.pvalue > 1e-3, (counts.tolist(), exp.tolist())


def test_filtered_probs_matches_reference():
    for params in [SamplingParams(temperature=0.5, top_k=2), SamplingParams(top_p=0.5), SamplingParams(min_p=0.5)]:
        got = filtered_probs(LOGITS.unsqueeze(0), [params])[0]
        assert torch.allclose(got, expected(params).float(), atol=1e-6)


def test_greedy_and_logprobs():
    sampler = Sampler(torch.Generator().manual_seed(0))
    logits = torch.tensor([[0.1, 3.0, 0.2, 1.0], [5.0, 0.0, 0.0, 4.0]])
    res = sampler(logits, [SamplingParams(temperature=0, logprobs=2), SamplingParams(temperature=0)], [None, None])
    assert res.token_ids == [1, 0]
    lp = torch.log_softmax(logits[0], 0)
    assert res.logprobs[1] is None
    assert list(res.logprobs[0]) == [1, 3]
    assert math.isclose(res.logprobs[0][3], lp[3].item(), abs_tol=1e-6)


def test_seeded_rows_do_not_depend_on_batch():
    params = SamplingParams(temperature=1.0, seed=42)
    other = SamplingParams(temperature=1.0)

    def draws(batch_size, row):
        sampler = Sampler(torch.Generator().manual_seed(7))
        g = torch.Generator().manual_seed(42)
        out = []
        for step in range(30):
            logits = torch.randn(batch_size, 50, generator=torch.Generator().manual_seed(step))
            logits[row] = torch.linspace(0, 3, 50)
            ps = [other] * batch_size
            gens = [None] * batch_size
            ps[row], gens[row] = params, g
            out.append(sampler(logits, ps, gens).token_ids[row])
        return out

    assert draws(1, 0) == draws(5, 3) == draws(9, 8)
