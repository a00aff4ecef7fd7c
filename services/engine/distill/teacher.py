"""The teacher side of distillation: the target generates the corpus, then scores it.

1. ``generate``: the target answers the prompts with our own engine (continuous batching, every
   request in flight at once up to ``max_num_seqs``), sampled at a per-prompt temperature with a
   per-prompt seed, stopping at EOS / the chat template's end of turn or at ``max_new_tokens``.
2. ``score_topk``: one prefill-style forward pass of the target over each finished sequence
   (prompt + answer), through the engine's own runner and paged KV cache, keeping at every
   position the top-K next-token ids and their log-probabilities (full softmax, temperature 1).

Teacher logits are computed once and stored (top-K), not recomputed per training batch: a target
forward costs ~3x a student training step per token (135M vs ~16M parameters), and the corpus is
seen for several epochs, so recomputing would more than double the run for no change in the loss.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from services.engine.chat_prompt import with_end_of_turn
from services.engine.request import Request
from services.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class TeacherScores:
    """Top-K teacher distributions over a flat corpus of sequences.

    Position t of the flat ``tokens`` holds the teacher's distribution of the token that follows
    tokens[..t] within its own sequence (sequences are scored independently).
    """

    tokens: torch.Tensor  # [T] int64: every sequence's tokens, concatenated
    offsets: torch.Tensor  # [S + 1] int64: sequence s is tokens[offsets[s]:offsets[s + 1]]
    top_ids: torch.Tensor  # [T, K] int64: the teacher's K most likely next tokens
    top_logprobs: torch.Tensor  # [T, K] float32: their log-probabilities (full softmax)


def generate(engine, prompts: Sequence[list[int]], params: Sequence[SamplingParams],
             on_finish: Callable[[], None] = lambda: None) -> list[list[int]]:
    """prompt + generated token ids of every prompt, in input order. ``on_finish`` is called once
    per finished request (a progress bar)."""
    end_of_turn = engine.tokenizer.stop_token_ids
    reqs = [engine.add_request(list(p), with_end_of_turn(sp, end_of_turn)) for p, sp in zip(prompts, params)]
    while engine.has_unfinished_requests():
        for chunk in engine.step():
            if chunk.finished:
                on_finish()
    return [list(r.prompt_token_ids) + list(r.output_token_ids) for r in reqs]


@torch.inference_mode()
def score_topk(engine, sequences: Sequence[list[int]], k: int, max_tokens_per_pass: int = 2048,
               on_done: Callable[[int], None] = lambda n: None) -> TeacherScores:
    """The target's top-``k`` next-token log-probabilities at every position of every sequence.

    Sequences are packed into passes of at most ``max_tokens_per_pass`` tokens (a longer sequence
    runs alone), each pass one forward of the engine's model over freshly allocated KV blocks,
    freed after it. ``on_done(n)`` is called with the number of sequences of each pass."""
    if k < 1 or k > engine.model_config.vocab_size:
        raise ValueError(f"top_k: must be in [1, {engine.model_config.vocab_size}], got {k}")
    ids, logps = [], []
    for group in _passes([len(s) for s in sequences], max_tokens_per_pass):
        top_i, top_lp = _score_pass(engine, [sequences[i] for i in group], k)
        ids.append(top_i)
        logps.append(top_lp)
        on_done(len(group))
    lengths = torch.tensor([0] + [len(s) for s in sequences], dtype=torch.long)
    tokens = torch.tensor([t for s in sequences for t in s], dtype=torch.long)
    return TeacherScores(tokens, lengths.cumsum(0), torch.cat(ids), torch.cat(logps))


def _passes(lengths: list[int], budget: int) -> list[list[int]]:
    """Consecutive index groups whose lengths sum to <= budget (a longer one alone)."""
    groups, current, used = [], [], 0
    for i, n in enumerate(lengths):
        if current and used + n > budget:
            groups.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        groups.append(current)
    return groups


def _score_pass(engine, sequences: list[list[int]], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over ``sequences`` -> (top ids [T, k] int64, top logprobs [T, k] float32), rows
    in sequence order. Uses the engine's KV pool, which must have room (it is idle here)."""
    reqs = {f"distill-teacher-{i}": Request(f"distill-teacher-{i}", list(s), SamplingParams(max_tokens=1))
            for i, s in enumerate(sequences)}
    try:
        for req in reqs.values():
            if not engine.kv.allocate(req, req.num_tokens):
                raise RuntimeError(f"teacher scoring: the KV pool has no room for {req.num_tokens} tokens; "
                                   f"lower max_tokens_per_pass or raise kv_cache_memory_gb")
        batch = engine.runner.prepare({rid: r.num_tokens for rid, r in reqs.items()}, reqs, {})
        hidden = engine.model(batch.input_ids, batch.positions, engine.runner.kv_caches, batch.meta)  # [T, D]
        ids, logps = [], []
        for start in range(0, hidden.shape[0], 512):  # logits [512, V] at a time
            logp = torch.log_softmax(engine.model.compute_logits(hidden[start:start + 512]), dim=-1)
            top = logp.topk(k, dim=-1)
            ids.append(top.indices)
            logps.append(top.values.float())
        return torch.cat(ids).long(), torch.cat(logps)
    finally:
        for req in reqs.values():
            engine.kv.free(req)
