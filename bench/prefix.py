"""Prefix-cache benchmark: TTFT of a prompt whose prefix another replica left in Redis, vs cold.

    tandem bench prefix --model /tmp/perf_anchor/models/dense-100m [--reps 5] [--json out.json]
    tandem bench prefix --workload chat [--conversations 16 --turns 8 --system-len 512]   (bench/prefix_chat.py)

What it does (everything real, on this machine): starts a redis-server (127.0.0.1, free
port, stopped by PID at the end) and a local Ray head, deploys two independent Serve apps
from deploy/pd.yaml (A and B, each its own router, PrefillWorker and DecodeWorker) that
share that Redis, and talks to them over gRPC.

- cold: B gets a fresh ``--prompt-len`` prompt (no block of it is cached anywhere).
- redis: A first serves a fresh ``--prefix-len`` prompt and writes its full blocks back to
  Redis; once every block is there, B (which has never seen it) gets prefix + new tokens,
  so it loads the prefix from Redis and computes only the rest.

TTFT = time from sending the request to its first response message, at the client. Each
figure is the median of ``--reps`` runs after one warm-up of each app. Prompts are random
token ids, greedy, ``--output-len`` tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import random
import socket
import statistics
import sys
import time
from pathlib import Path

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _app_config(name: str, model: str, redis_url: str | None, engine: dict, mode: str, replicas: int = 1,
                prefix_routing: bool = True) -> dict:
    """One app's Serve config; ``replicas`` prompt-side replicas (prefill or unified), one decode."""
    from router import launcher

    store = {"prefix_store": {"url": redis_url}} if redis_url else {}  # default timeouts
    pd = mode == "pd"
    yaml, prompt_side = ("pd.yaml", "PrefillWorker") if pd else ("local.yaml", "UnifiedWorker")
    workers = {prompt_side: replicas, **({"DecodeWorker": 1} if pd else {})}
    config = launcher.load_config(DEPLOY / yaml, model=model, port=_free_port(),
                                  overrides={"engine": engine, "router": {"prefix_routing": prefix_routing}, **store},
                                  deployments={d: {"autoscaling_config": None, "num_replicas": n}
                                               for d, n in workers.items()})
    config["applications"][0]["name"] = name
    config["applications"][0]["logging_config"] = {"enable_access_log": False, "log_level": "WARNING"}
    return config


def deploy_apps(model: str, redis_url: str | None, names: list[str], engine: dict, mode: str,
                **app_options) -> dict[str, str]:
    """Deploy one app (``mode`` pd or unified) per name on the connected Ray head; {name: gRPC address}.
    ``app_options``: ``replicas``, ``prefix_routing`` of ``_app_config``."""
    from router import launcher

    configs = {n: _app_config(f"tandem-{n.lower()}", model, redis_url, engine, mode, **app_options) for n in names}
    merged = copy.deepcopy(next(iter(configs.values())))
    merged["applications"] = [c["applications"][0] for c in configs.values()]
    launcher.deploy(merged, timeout_s=600)
    addresses = {n: launcher.app_address(c) for n, c in configs.items()}
    for address in addresses.values():
        launcher.wait_serving(address)
    return addresses


async def ttft(stub, prompt: list[int], output_len: int) -> tuple[float, int]:
    """(seconds to the first response message, usage.cached_prompt_tokens)."""
    from protos.tandem.v1 import generation_pb2 as pb
    from router.client import call_metadata

    req = pb.GenerateRequest(prompt_token_ids=prompt, sampling=pb.SamplingParams(
        max_tokens=output_len, temperature=0, ignore_eos=True))
    t0 = time.perf_counter()
    first = None
    last = None
    async for msg in stub.Generate(req, timeout=600, metadata=call_metadata()):
        if first is None:
            first = time.perf_counter() - t0
        last = msg
    return first, last.usage.cached_prompt_tokens


def random_prompt(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(4, vocab) for _ in range(n)]


def wait_written(client, keys: list[str], timeout_s: float = 30.0) -> float:
    """Seconds until every key exists in Redis (write-back is asynchronous)."""
    t0 = time.monotonic()
    while client.exists(*keys) < len(keys):
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"{client.exists(*keys)} of {len(keys)} blocks written back after {timeout_s}s")
        time.sleep(0.01)
    return time.monotonic() - t0


def block_keys(model: str, prompt: list[int], block_size: int) -> list[str]:
    from services.engine.checkpoint import checkpoint_fingerprint
    from services.engine.kv_cache import block_hash_chain, hash_seed
    from services.prefix_store import block_key

    fp = checkpoint_fingerprint(model)
    return [block_key(fp, h) for h in block_hash_chain(hash_seed(fp, "float32", block_size), prompt, block_size)]


async def measure(args, addresses: dict[str, str], redis_url: str) -> dict:
    import grpc
    import redis

    from protos.tandem.v1 import generation_pb2_grpc as pb_grpc

    rng = random.Random(args.seed)
    client = redis.Redis.from_url(redis_url)
    out = {"cold": [], "redis": [], "local": [], "cached_tokens": [], "write_back_s": []}
    async with grpc.aio.insecure_channel(addresses["A"]) as ca, grpc.aio.insecure_channel(addresses["B"]) as cb:
        a, b = pb_grpc.GenerationStub(ca), pb_grpc.GenerationStub(cb)
        for stub in (a, b):  # warm-up: first-call costs of each replica
            await ttft(stub, random_prompt(rng, args.prompt_len, args.vocab), args.output_len)
        for rep in range(args.reps):
            s, cached = await ttft(b, random_prompt(rng, args.prompt_len, args.vocab), args.output_len)
            out["cold"].append(s)
            prefix = random_prompt(rng, args.prefix_len, args.vocab)
            await ttft(a, prefix, args.output_len)
            out["write_back_s"].append(wait_written(client, block_keys(args.model, prefix, args.block_size)))
            prompt = prefix + random_prompt(rng, args.prompt_len - args.prefix_len, args.vocab)
            s, cached = await ttft(b, prompt, args.output_len)
            out["redis"].append(s)
            out["cached_tokens"].append(cached)
            local, _ = await ttft(b, prompt, args.output_len)  # again on B: its local tier has it now
            out["local"].append(local)
            print(f"rep {rep}: cold {out['cold'][-1]:.3f}s  redis-prefix {s:.3f}s (cached {cached})  "
                  f"same prompt again, local tier {local:.3f}s", flush=True)
    client.close()
    cold, warm = statistics.median(out["cold"]), statistics.median(out["redis"])
    return {**out, "cold_ttft_s": cold, "redis_ttft_s": warm, "local_ttft_s": statistics.median(out["local"]),
            "ratio": warm / cold}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tandem bench prefix", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="/tmp/perf_anchor/models/dense-100m")
    p.add_argument("--prompt-len", type=int, default=2048)
    p.add_argument("--prefix-len", type=int, default=1984, help="tokens written to Redis by the other replica")
    p.add_argument("--output-len", type=int, default=4)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-cache-gb", type=float, default=1.0)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--workload", choices=["ttft", "chat", "chat-routed"], default="ttft",
                   help="chat: turns alternate between two apps, Redis vs local only; chat-routed: one app with "
                        "two replicas, prefix routing + Redis vs prefix-blind routing without Redis")
    p.add_argument("--mode", choices=["pd", "unified"], default="pd", help="deploy/pd.yaml or deploy/local.yaml apps")
    p.add_argument("--conversations", type=int, default=16, help="chat: conversations at once")
    p.add_argument("--turns", type=int, default=8, help="chat: turns per conversation")
    p.add_argument("--system-len", type=int, default=512, help="chat: shared system prompt tokens")
    p.add_argument("--user-len", type=int, default=64, help="chat: tokens per user turn")
    return p.parse_args(argv)


def serve_and_run(args, redis_url: str | None, fn, names=("A", "B"), **app_options) -> dict:
    """Start Ray, deploy apps ``names`` (Redis tier at ``redis_url``, None = local only), run
    ``fn(args, addresses)``, stop Ray."""
    from router import launcher

    launcher.start_local_ray(num_cpus=16)
    try:
        engine = {"block_size": args.block_size, "kv_cache_memory_gb": args.kv_cache_gb}
        addresses = deploy_apps(args.model, redis_url, list(names), engine, args.mode, **app_options)
        return asyncio.run(fn(args, addresses))
    finally:
        launcher.shutdown()


def chat_main(args) -> dict:
    from bench.prefix_chat import run_chat
    from services.prefix_store.server import LocalRedisServer

    if args.output_len == 4:
        args.output_len = 32
    results = {}
    with LocalRedisServer(maxmemory="1gb") as redis_url:
        results["redis"] = serve_and_run(args, redis_url, run_chat)
    results["local_only"] = serve_and_run(args, None, run_chat)
    print_chat(results)
    return results


def chat_routed_main(args) -> dict:
    """One app, two prompt-side replicas behind one router: prefix routing + Redis vs a
    prefix-blind (least-load) choice with the local tier only."""
    from bench.prefix_chat import run_chat
    from services.prefix_store.server import LocalRedisServer

    if args.output_len == 4:
        args.output_len = 32
    results = {}
    with LocalRedisServer(maxmemory="1gb") as redis_url:
        results["routing+redis"] = serve_and_run(args, redis_url, run_chat, ("A",), replicas=2)
    results["blind,local"] = serve_and_run(args, None, run_chat, ("A",), replicas=2, prefix_routing=False)
    print_chat(results)
    return results


def print_chat(results: dict) -> None:
    for name, r in results.items():
        print(f"{name:10s}: {r['requests']} requests in {r['wall_s']:.1f}s, {r['throughput_tok_s']:.1f} output tok/s, "
              f"TTFT p50 {r['ttft_s']['p50']:.3f}s p99 {r['ttft_s']['p99']:.3f}s, prompt tokens from cache: "
              f"local {r['hit_rate_local']:.1%} redis {r['hit_rate_redis']:.1%} "
              f"(usage total {r['cached_prompt_tokens']}/{r['prompt_tokens']})", flush=True)


def main(argv: list[str] | None = None) -> int:
    from services.prefix_store.server import LocalRedisServer

    args = parse_args(argv)
    args.vocab = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
    if args.workload in ("chat", "chat-routed"):
        result = chat_main(args) if args.workload == "chat" else chat_routed_main(args)
        if args.json:
            Path(args.json).write_text(json.dumps({"args": vars(args), **result}, indent=2))
        return 0
    with LocalRedisServer(maxmemory="1gb") as redis_url:
        print(f"redis-server at {redis_url}; starting Ray and two pd apps of {Path(args.model).name} ...", flush=True)
        result = serve_and_run(args, redis_url, lambda a, addresses: measure(a, addresses, redis_url))
    print(f"TTFT {args.prompt_len}-token prompt, median of {args.reps}: cold {result['cold_ttft_s']:.3f}s, "
          f"first {args.prefix_len} tokens from Redis {result['redis_ttft_s']:.3f}s "
          f"(ratio {result['ratio']:.3f}, goal <= 0.125), local tier {result['local_ttft_s']:.3f}s; "
          f"cached tokens {result['cached_tokens']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": {k: v for k, v in vars(args).items()}, **result}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
