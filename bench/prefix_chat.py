"""Multi-turn chat workload for the prefix cache (``tandem bench prefix --workload chat``).

``--conversations`` conversations of ``--turns`` turns run at once (each conversation
sends its next turn when the previous one ended). Every prompt is a shared
``--system-len``-token system prompt, then the conversation's history (user turns of
``--user-len`` random tokens and the tokens the model answered), then the new user turn.

``--workload chat-routed``: one app whose router spreads the turns over two prompt-side
replicas, with prefix routing + Redis, then prefix-blind (least load) with the local tier only.

``--workload chat``: two apps (A and B) serve it; turn t of conversation c goes to app ``(c + t) % 2``: a
replica choice that ignores where prefixes are (what a prefix-blind load balancer does
half of the time). So a turn's history is in the *other* replica's local cache, and only
the Redis tier can serve it. Run once with Redis and once without (``--no-redis``) and
compare: throughput (output tokens / wall time), TTFT p50/p99, prompt tokens served from
cache by tier (the prefill workers' tandem_prefix_cache_* counters).
"""

from __future__ import annotations

import asyncio
import random
import re
import time
import urllib.request

from bench.workload import percentiles


async def conversation(stubs, c: int, args, system: list[int], rng: random.Random, out: dict) -> None:
    from protos.tandem.v1 import generation_pb2 as pb
    from router.client import call_metadata

    history = list(system)
    for t in range(args.turns):
        history += [rng.randrange(4, args.vocab) for _ in range(args.user_len)]
        req = pb.GenerateRequest(prompt_token_ids=history, sampling=pb.SamplingParams(
            max_tokens=args.output_len, temperature=0, ignore_eos=True))
        t0 = time.perf_counter()
        first, answer, cached = None, [], 0
        async for msg in stubs[(c + t) % len(stubs)].Generate(req, timeout=600, metadata=call_metadata()):
            first = first if first is not None else time.perf_counter() - t0
            answer += list(msg.token_ids)
            cached = msg.usage.cached_prompt_tokens or cached
        out["ttft"].append(first)
        out["output_tokens"] += len(answer)
        out["prompt_tokens"] += len(history)
        out["cached_tokens"] += cached
        history += answer


def prefix_counters(addresses: dict[str, str]) -> dict[str, float]:
    """Sum over the apps' prefill workers of tandem_prefix_cache_{queries,hits}_total by tier."""
    import grpc

    from protos.tandem.v1 import admin_pb2, admin_pb2_grpc
    from router.client import call_metadata

    totals: dict[str, float] = {}
    for address in addresses.values():
        with grpc.insecure_channel(address) as ch:
            stats = admin_pb2_grpc.AdminStub(ch).GetWorkerStats(admin_pb2.GetWorkerStatsRequest(), timeout=30,
                                                                    metadata=call_metadata()).workers
        for s in stats:
            if s.role not in ("prefill", "unified") or not s.metrics_address:
                continue
            text = urllib.request.urlopen(f"http://{s.metrics_address}/metrics", timeout=5).read().decode()
            for m in re.finditer(r'^tandem_prefix_cache_(queries|hits)_total\{[^}]*tier="(\w+)"[^}]*\} (\S+)$', text,
                                 re.M):
                key = f"{m.group(1)}_{m.group(2)}"
                totals[key] = totals.get(key, 0.0) + float(m.group(3))
    return totals


async def run_chat(args, addresses: dict[str, str]) -> dict:
    import grpc

    from protos.tandem.v1 import generation_pb2_grpc as pb_grpc

    rng = random.Random(args.seed)
    system = [rng.randrange(4, args.vocab) for _ in range(args.system_len)]
    out = {"ttft": [], "output_tokens": 0, "prompt_tokens": 0, "cached_tokens": 0}
    before = prefix_counters(addresses)
    channels = [grpc.aio.insecure_channel(a) for a in addresses.values()]
    try:
        stubs = [pb_grpc.GenerationStub(ch) for ch in channels]
        t0 = time.perf_counter()
        await asyncio.gather(*(conversation(stubs, c, args, system, random.Random(args.seed * 1000 + c), out)
                               for c in range(args.conversations)))
        wall = time.perf_counter() - t0
    finally:
        for ch in channels:
            await ch.close()
    after = prefix_counters(addresses)
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    return {"wall_s": wall, "requests": len(out["ttft"]), "throughput_tok_s": out["output_tokens"] / wall,
            "ttft_s": percentiles(out["ttft"]), "prompt_tokens": out["prompt_tokens"],
            "cached_prompt_tokens": out["cached_tokens"], "prefix_counters": delta,
            "hit_rate_local": delta.get("hits_local", 0.0) / max(out["prompt_tokens"], 1),
            "hit_rate_redis": delta.get("hits_redis", 0.0) / max(out["prompt_tokens"], 1)}
