"""Token sampling: greedy, temperature, top-k, top-p, min-p, per-request seeds, logprobs.

Filters apply in the order temperature -> top-k -> top-p -> min-p on each row's
probabilities. A request with a seed draws output token ``i`` from its own ``torch.Generator``
seeded with ``position_seed(seed, i)``, once per generated token, so its tokens depend only on
(seed, position, distribution): not on what else shares the batch, and not on where its earlier
tokens were sampled, so a request resumed elsewhere after ``i`` tokens (a P/D hand-off, a
migration after its replica died, a preemption) continues exactly as it would have. Logprobs
are those of the raw model distribution (log-softmax of the unscaled logits).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from services.engine.sampling_params import SamplingParams


_MASK64 = (1 << 64) - 1


def position_seed(seed: int, position: int) -> int:
    """The seed of the draw for output token ``position`` (0-based) of a request seeded with
    ``seed``: SplitMix64 of the pair, in [0, 2**63) (any int seed, negative or wide, is accepted)."""
    z = ((seed & _MASK64) * 0x9E3779B97F4A7C15 + position + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


@dataclass
class SampleResult:
    """Sampled tokens of one step, one entry per sampling row."""

    token_ids: list[int]  # the chosen token of each row
    logprobs: list[dict[int, float] | None]  # sampled token + top-n logprobs, None if not asked


class Sampler:
    def __init__(self, generator: torch.Generator):
        self.generator = generator  # for rows without a per-request seed

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams],
                 generators: list[torch.Generator | None]) -> SampleResult:
        """logits [N, V] float32 -> one token per row."""
        logits = logits.float()
        greedy = [i for i, p in enumerate(params) if p.greedy]
        if len(greedy) == len(params):  # all greedy: no row selection (a copy of the logits)
            token_list = argmax_rows(logits).tolist()
            return SampleResult(token_list, self._logprobs(logits, params, token_list))
        tokens = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
        sampled = [i for i, p in enumerate(params) if not p.greedy]
        if greedy:
            idx = torch.tensor(greedy, device=logits.device)
            tokens[idx] = argmax_rows(logits[idx])
        idx = torch.tensor(sampled, device=logits.device)
        probs = filtered_probs(logits[idx], [params[i] for i in sampled])
        tokens[idx] = self._draw(probs, [generators[i] for i in sampled])
        token_list = tokens.tolist()
        return SampleResult(token_list, self._logprobs(logits, params, token_list))

    def _draw(self, probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
        out = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
        shared = [i for i, g in enumerate(generators) if g is None]
        if shared:
            idx = torch.tensor(shared, device=probs.device)
            out[idx] = torch.multinomial(probs[idx], 1, generator=self.generator).squeeze(1)
        for i, g in enumerate(generators):
            if g is not None:
                out[i] = torch.multinomial(probs[i], 1, generator=g)[0]
        return out

    def token_logprobs(self, logits: torch.Tensor, params: list[SamplingParams], tokens: list[int]):
        """Per row: {chosen token: logprob} plus the top-n the row's params ask for (None if none)."""
        return self._logprobs(logits.float(), params, tokens)

    @staticmethod
    def _logprobs(logits: torch.Tensor, params: list[SamplingParams], tokens: list[int]):
        rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        result: list[dict[int, float] | None] = [None] * len(params)
        if not rows:
            return result
        lp = torch.log_softmax(logits[rows], dim=-1)
        k = max(params[i].logprobs for i in rows)
        top_vals, top_ids = lp.topk(max(k, 1), dim=-1) if k else (None, None)
        chosen = lp[torch.arange(len(rows)), torch.tensor([tokens[i] for i in rows])].tolist()
        for j, i in enumerate(rows):
            entry = {tokens[i]: chosen[j]}
            n = params[i].logprobs
            if n:
                for t, v in zip(top_ids[j, :n].tolist(), top_vals[j, :n].tolist()):
                    entry.setdefault(t, v)
            result[i] = entry
        return result


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """x [N, V] -> [N] int64, the first maximal index of each row (as ``torch.argmax``).

    On CPU numpy's vectorized argmax: 87 us for [32, 32000] fp32 where torch's took 1,255 us
    (2 threads, 2026-11-27)."""
    if x.device.type == "cpu":
        return torch.from_numpy(np.argmax(x.numpy(), axis=1).astype(np.int64, copy=False))
    return x.argmax(dim=-1)


def filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Probabilities [N, V] after temperature, top-k, top-p and min-p (rows renormalized)."""
    dev = logits.device
    temp = torch.tensor([p.temperature for p in params], device=dev, dtype=logits.dtype)
    logits = logits / temp.unsqueeze(1)
    vocab = logits.shape[1]
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    if any(k < vocab for k in top_k):
        k_t = torch.tensor(top_k, device=dev)
        kth = logits.sort(dim=-1, descending=True).values.gather(1, (k_t - 1).unsqueeze(1))
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if any(p.top_p < 1 for p in params):
        top_p = torch.tensor([p.top_p for p in params], device=dev, dtype=probs.dtype)
        sorted_p, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_p.cumsum(dim=-1) - sorted_p
        drop_sorted = mass_before >= top_p.unsqueeze(1)  # keeps at least the most likely token
        drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
    if any(p.min_p > 0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], device=dev, dtype=probs.dtype)
        floor = probs.max(dim=-1, keepdim=True).values * min_p.unsqueeze(1)
        probs = probs.masked_fill(probs < floor, 0.0)
    return probs / probs.sum(dim=-1, keepdim=True)
