"""Prefix-cache benchmark: TTFT of a prompt whose prefix another replica left in Redis, vs cold.

    tandem bench prefix --model /tmp/perf_anchor/models/dense-100m [--reps 5] [--json out.json]

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


def _app_config(name: str, model: str, redis_url: str | None, engine: dict) -> dict:
    from router import launcher

    store = {"prefix_store": {"url": redis_url}} if redis_url else {}  # default timeouts
    config = launcher.load_config(DEPLOY / "pd.yaml", model=model, port=_free_port(),
                                  overrides={"engine": engine, **store},
                                  deployments={d: {"autoscaling_config": None, "num_replicas": 1}
                                               for d in ("PrefillWorker", "DecodeWorker")})
    config["applications"][0]["name"] = name
    config["applications"][0]["logging_config"] = {"enable_access_log": False, "log_level": "WARNING"}
    return config


def deploy_apps(model: str, redis_url: str | None, names: list[str], engine: dict) -> dict[str, str]:
    """Deploy one pd app per name on the connected Ray head; {name: gRPC address}."""
    from router import launcher

    configs = {n: _app_config(f"tandem-{n.lower()}", model, redis_url, engine) for n in names}
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

    req = pb.GenerateRequest(prompt_token_ids=prompt, sampling=pb.SamplingParams(
        max_tokens=output_len, temperature=0, ignore_eos=True))
    t0 = time.perf_counter()
    first = None
    last = None
    async for msg in stub.Generate(req, timeout=600):
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
    out = {"cold": [], "redis": [], "cached_tokens": [], "write_back_s": []}
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
            s, cached = await ttft(b, prefix + random_prompt(rng, args.prompt_len - args.prefix_len, args.vocab),
                                   args.output_len)
            out["redis"].append(s)
            out["cached_tokens"].append(cached)
            print(f"rep {rep}: cold {out['cold'][-1]:.3f}s  redis-prefix {s:.3f}s  cached {cached}", flush=True)
    client.close()
    cold, warm = statistics.median(out["cold"]), statistics.median(out["redis"])
    return {**out, "cold_ttft_s": cold, "redis_ttft_s": warm, "ratio": warm / cold}


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
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from router import launcher
    from services.prefix_store.server import LocalRedisServer

    args = parse_args(argv)
    args.vocab = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
    engine = {"block_size": args.block_size, "kv_cache_memory_gb": args.kv_cache_gb}
    with LocalRedisServer(maxmemory="1gb") as redis_url:
        print(f"redis-server at {redis_url}; starting Ray and two pd apps of {Path(args.model).name} ...", flush=True)
        launcher.start_local_ray(num_cpus=16)
        try:
            addresses = deploy_apps(args.model, redis_url, ["A", "B"], engine)
            result = asyncio.run(measure(args, addresses, redis_url))
        finally:
            launcher.shutdown()
    print(f"TTFT {args.prompt_len}-token prompt, median of {args.reps}: cold {result['cold_ttft_s']:.3f}s, "
          f"first {args.prefix_len} tokens from Redis {result['redis_ttft_s']:.3f}s "
          f"(ratio {result['ratio']:.3f}, goal <= 0.125); cached tokens {result['cached_tokens']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": {k: v for k, v in vars(args).items()}, **result}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
