"""Lossless verification of drafts: the rejection rule of Leviathan et al. 2023 ("Fast
Inference from Transformers via Speculative Decoding", arXiv 2211.17192) and Chen et al. 2023
("Accelerating Large Language Model Decoding with Speculative Sampling", arXiv 2302.01318).

Glossary
- k: draft tokens of one request this step, d_1..d_k; the target scored k + 1 positions: the
  request's last known token (giving p_1, the distribution of d_1's position) and each draft.
- p_j: the target's distribution at position j after the request's sampling filters
  (temperature, top-k, top-p, min-p; ``filtered_probs``), the distribution it would sample.
- q_j: the proposer's distribution of d_j (one-hot for a deterministic proposer).
- accepted: the leading drafts kept; the step then emits them plus one more token, so it
  emits between 1 and k + 1 tokens.

Rule, for j = 1..k: accept d_j with probability min(1, p_j(d_j) / q_j(d_j)); at the first
rejection emit a token drawn from norm(max(p_j - q_j, 0)) and stop; when all k are accepted
emit a bonus token drawn from p_{k+1}. Every emitted token then has exactly the target's
distribution. Greedy requests (temperature 0) accept while d_j equals the target's argmax and
emit the argmax at the first mismatch (or as the bonus), which is token for token what decoding
without speculation produces.

Random draws of a request with a seed come from its own generator (k uniforms, then one
sample), so its tokens do not depend on the rest of the batch; the others share one generator
and are drawn together (one ``rand`` and one ``multinomial`` call per step).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from services.engine.sampler import argmax_rows, filtered_probs
from services.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class Verified:
    """The outcome of one request's draft."""

    token_ids: list[int]  # the tokens to emit: accepted drafts, then the correction or bonus token
    num_accepted: int  # drafts accepted (len(token_ids) - 1)


def verify_greedy(logits: torch.Tensor, drafts: Sequence[list[int]]) -> list[Verified]:
    """logits [sum(k_i + 1), V]: each request's k_i + 1 rows in order -> accepted runs."""
    best = argmax_rows(logits.float()).tolist()
    out, row = [], 0
    for draft in drafts:
        target = best[row:row + len(draft) + 1]
        a = 0
        while a < len(draft) and draft[a] == target[a]:
            a += 1
        out.append(Verified(draft[:a] + [target[a]], a))
        row += len(draft) + 1
    return out


def verify_sampled(logits: torch.Tensor, drafts: Sequence[list[int]], probs: Sequence[torch.Tensor | None],
                   params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None],
                   shared: torch.Generator) -> list[Verified]:
    """Sampled requests, batched: logits [sum(k_i + 1), V], request i's rows together; q of
    request i ``probs[i]`` [k_i, V] (None = one-hot of its draft). Draws: a request with its own
    generator takes its k_i uniforms, then its one sample, from it; the others share ``shared``."""
    dev = logits.device
    counts = [len(d) + 1 for d in drafts]
    p = filtered_probs(logits.float(), [pr for pr, n in zip(params, counts) for _ in range(n)])  # [R, V]
    starts = [sum(counts[:i]) for i in range(len(counts))]
    draft_rows = torch.tensor([starts[i] + j for i, d in enumerate(drafts) for j in range(len(d))],
                              dtype=torch.long, device=dev)
    flat = torch.tensor([t for d in drafts for t in d], dtype=torch.long, device=dev)
    p_draft = p[draft_rows, flat]  # p_j(d_j) of every draft token
    q_draft = torch.ones_like(p_draft)
    for i, q in enumerate(probs):
        if q is not None and drafts[i]:
            lo = starts[i] - i  # draft tokens before request i
            q_draft[lo:lo + len(drafts[i])] = q[torch.arange(len(drafts[i]), device=dev), flat[lo:lo + len(drafts[i])]]
    u = _uniforms([len(d) for d in drafts], generators, shared, dev)
    rejected = (u * q_draft >= p_draft).tolist()  # accept iff u < p/q (q = 0 with p > 0: accept)
    accepted, rows, lo = [], [], 0
    for i, d in enumerate(drafts):
        run = rejected[lo:lo + len(d)]
        a = run.index(True) if True in run else len(d)
        accepted.append(a)
        lo += len(d)
    dist = p[torch.tensor([starts[i] + a for i, a in enumerate(accepted)], dtype=torch.long, device=dev)]
    for i, a in enumerate(accepted):  # at a rejection: the residual norm(max(p - q, 0))
        if a < len(drafts[i]):
            residual = dist[i].clone()
            if probs[i] is None:
                residual[drafts[i][a]] = 0.0
            else:
                residual = (residual - probs[i][a].to(residual.dtype)).clamp_min_(0.0)
            if residual.sum() > 0:  # else p_a == q_a up to rounding: p_a itself is exact
                dist[i] = residual
    tokens = _draw(dist, generators, shared)
    return [Verified(d[:a] + [t], a) for d, a, t in zip(drafts, accepted, tokens)]


def _uniforms(sizes: list[int], generators: Sequence[torch.Generator | None], shared: torch.Generator,
              device: torch.device) -> torch.Tensor:
    """U[0, 1) per draft token, request by request: own generators draw their own, the rest one call."""
    shared_n = sum(n for n, g in zip(sizes, generators) if g is None)
    pool = torch.rand(shared_n, generator=shared, device=device) if shared_n else None
    parts, used = [], 0
    for n, g in zip(sizes, generators):
        if g is None:
            parts.append(pool[used:used + n])
            used += n
        else:
            parts.append(torch.rand(n, generator=g, device=device))
    return torch.cat(parts) if parts else torch.zeros(0, device=device)


def _draw(dist: torch.Tensor, generators: Sequence[torch.Generator | None], shared: torch.Generator) -> list[int]:
    """One token per row of dist [N, V] (unnormalized); own generators draw their row alone."""
    out = [0] * dist.shape[0]
    common = [i for i, g in enumerate(generators) if g is None]
    if common:
        picks = torch.multinomial(dist[torch.tensor(common, device=dist.device)], 1, generator=shared)[:, 0].tolist()
        for i, t in zip(common, picks):
            out[i] = t
    for i, g in enumerate(generators):
        if g is not None:
            out[i] = int(torch.multinomial(dist[i], 1, generator=g)[0])
    return out


def verify(logits: torch.Tensor, drafts: Sequence[list[int]], probs: Sequence[torch.Tensor | None],
           params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None],
           shared: torch.Generator) -> list[Verified]:
    """Verify every request's draft. logits [sum(k_i + 1), V] float32, request i's k_i + 1 rows
    together in order; ``probs[i]`` is q of request i [k_i, V] or None (one-hot);
    ``generators[i]`` its own generator or None (then ``shared`` draws)."""
    greedy = [i for i, p in enumerate(params) if p.greedy]
    results: list[Verified | None] = [None] * len(drafts)
    starts, row = [], 0
    for d in drafts:
        starts.append(row)
        row += len(d) + 1
    if greedy:
        rows = [r for i in greedy for r in range(starts[i], starts[i] + len(drafts[i]) + 1)]
        sel = logits if len(rows) == logits.shape[0] else logits[torch.tensor(rows, device=logits.device)]
        for i, v in zip(greedy, verify_greedy(sel, [drafts[i] for i in greedy])):
            results[i] = v
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if sampled:
        rows = [r for i in sampled for r in range(starts[i], starts[i] + len(drafts[i]) + 1)]
        sel = logits if len(rows) == logits.shape[0] else logits[torch.tensor(rows, device=logits.device)]
        args = ([seq[i] for i in sampled] for seq in (drafts, probs, params, generators))
        for i, v in zip(sampled, verify_sampled(sel, *args, shared)):
            results[i] = v
    return results
