"""Eviction policies replayed on synthetic skewed routing traces (the second measurement behind
services/engine/model/expert_offload/policies.py's default; the first replays recorded traces:
``python -m bench.moe --policies``).

    python -m bench.moe_policy_replay

Each trace: 2000 steps of one MoE layer with 16 experts, top-2 per token, experts drawn by a
Zipf(1.1) popularity over a random ranking; optionally the ranking is reshuffled every 200
steps (the hot set moves). Hit rates are the mean over 3 seeds, beside Belady's MIN.
"""

from __future__ import annotations

import random
import statistics
import sys

from services.engine.model.expert_offload.cache import replay
from services.engine.model.expert_offload.oracle import oracle_hit_rate
from services.engine.model.expert_offload.policies import POLICIES


def zipf_trace(seed: int, experts: int = 16, steps: int = 2000, top_k: int = 2, tokens: int = 1,
               s: float = 1.1, shuffle_every: int | None = None) -> list[list[int]]:
    rng = random.Random(seed)
    ranking = list(range(experts))
    rng.shuffle(ranking)
    weights = [1 / (i + 1) ** s for i in range(experts)]
    trace = []
    for t in range(steps):
        if shuffle_every and t % shuffle_every == 0:
            rng.shuffle(ranking)
        used: set[int] = set()
        for _ in range(tokens):
            picks: set[int] = set()
            while len(picks) < top_k:
                picks.add(rng.choices(ranking, weights=weights)[0])
            used |= picks
        trace.append(sorted(used))
    return trace


def main(argv: list[str] | None = None) -> int:
    cases = [("static, 1 token/step", {}), ("hot set reshuffled every 200 steps, 1 token/step", {"shuffle_every": 200}),
             ("static, 8 tokens/step", {"tokens": 8}), ("reshuffled every 200, 8 tokens/step",
                                                       {"tokens": 8, "shuffle_every": 200})]
    for name, kw in cases:
        traces = [zipf_trace(seed, **kw) for seed in range(3)]
        for slots in (4, 8):
            rates = {p: statistics.mean(replay(t, slots, POLICIES[p]()) for t in traces) for p in POLICIES}
            rates["belady"] = statistics.mean(oracle_hit_rate(t, slots) for t in traces)
            print(f"{name:50s} slots={slots}/16 " + " ".join(f"{k}={v:.3f}" for k, v in rates.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
