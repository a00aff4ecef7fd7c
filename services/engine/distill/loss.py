"""Distillation loss: KL(teacher || student) on the teacher's top-k tokens plus one "rest" bucket.

Glossary: p = the teacher's next-token distribution (temperature 1, the distribution speculative
verification compares the draft against), q = the student's; K = tokens kept per position.

Storing p over the whole vocabulary (49,152 for SmolLM2) per position is 196 KB; we keep the
teacher's top-K ids and log-probabilities and merge every other token into one bucket, with
p_rest = 1 - sum_k p_k and q_rest = 1 - sum_k q_k. The loss is then the exact KL divergence
between the two coarsened (K + 1)-outcome distributions:

    KL = sum_k p_k (log p_k - log q_k) + p_rest (log p_rest - log q_rest)

It is >= 0, 0 iff q matches p on the top-K and on the total of the rest, and equals the full KL
when K covers the vocabulary. Forward KL (mode-covering) is the usual choice for speculative
drafts (DistillSpec, Zhou et al. 2023, arXiv 2310.08461): acceptance of a sampled draft token is
1 - TV(p, q), and greedy acceptance needs argmax q = argmax p, both of which it drives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_TINY = 1e-6  # floor of the bucket probabilities inside the logs (representable next to 1 in float32)


def topk_kl(student_logits: torch.Tensor, top_ids: torch.Tensor, top_logprobs: torch.Tensor,
            mask: torch.Tensor) -> torch.Tensor:
    """Mean over the positions where ``mask`` is true of the coarsened KL above.

    student_logits [N, V] (any float dtype; computed in float32), top_ids [N, K] int64 (the
    teacher's top-K token ids), top_logprobs [N, K] (the teacher's log p of those ids, full
    softmax over V), mask [N] bool -> scalar float32. ValueError when no position is masked in.
    """
    if not bool(mask.any()):
        raise ValueError("mask: no position to train on")
    logq = F.log_softmax(student_logits.float(), dim=-1)  # [N, V]
    logq_top = logq.gather(1, top_ids)  # [N, K]
    logp_top = top_logprobs.float()
    p_top = logp_top.exp()
    p_rest = (1.0 - p_top.sum(-1)).clamp_min(0.0)  # [N]
    # log(1 - sum_k q_k), stable: log1p(-exp(logsumexp(log q_top)))
    log_q_rest = torch.log1p(-torch.logsumexp(logq_top, dim=-1).exp().clamp(max=1.0 - _TINY))
    rest = torch.where(p_rest > 0, p_rest * (p_rest.clamp_min(_TINY).log() - log_q_rest), 0.0)
    kl = (p_top * (logp_top - logq_top)).sum(-1) + rest  # [N]
    return torch.where(mask, kl, 0.0).sum() / mask.sum()
