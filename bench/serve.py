"""Serving benchmark: a gRPC load generator for a running Tandem server (like `vllm bench serve`).

    tandem bench serve --address 127.0.0.1:50051 --concurrency 32 --num-prompts 128 \\
        --input-len 128 --output-len 128 [--request-rate 8] [--random-range-ratio 0.5] [--json out.json]
    tandem bench serve --inprocess dense-100m ...   # same workload, in-process AsyncEngine (baseline)
    tandem bench serve --address ... --router-metrics http://127.0.0.1:9464/metrics   # + router delay, dwell

Load: closed loop (``--concurrency`` requests in flight, each client sends its next request
when its previous one ends) or open loop (``--request-rate`` Poisson arrivals per second,
optionally capped by ``--concurrency``). Prompts are random token ids (``bench.workload``
formula), lengths fixed or uniform in ``len * [1 - r, 1 + r]``; outputs are greedy with
ignore_eos so every request produces exactly its output length. Every call carries
``authorization: Bearer $TANDEM_API_KEY`` when that variable is set (as `tandem generate`:
router/client.py), so the load reaches a router with API keys on.

Metrics per request: TTFT = first token - send; e2e = last message - send;
TPOT = (e2e - TTFT) / (output tokens - 1); ITL = gap between messages / tokens in the later
one. Throughput = output tokens / (last finish - first send). Errors are counted by status.

Router token delay and dwell (``--router-metrics``): the router's histograms
``tandem_router_token_delay_seconds`` (engine output -> response message handed to gRPC) and
``tandem_router_dwell_seconds`` (arrival at the router -> the same hand-off: the router's own
share), once per message with tokens, scraped before and after the measured run (not the
warm-up); their p50/p90/p99 interpolate inside the buckets of the difference, as PromQL's
histogram_quantile does (bench/prometheus_histogram.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from bench.prometheus_histogram import delay_summary, scrape_histograms
from bench.workload import percentiles, prompts

TOKEN_DELAY = "tandem_router_token_delay_seconds"
DWELL = "tandem_router_dwell_seconds"
# --router-metrics: summary key -> (table row, router histogram read over the measured run)
ROUTER_HISTOGRAMS = {"router_token_delay_ms": ("ROUTER DELAY", TOKEN_DELAY),
                     "router_dwell_ms": ("ROUTER DWELL", DWELL)}


@dataclass
class RequestSpec:
    prompt_ids: list[int]  # the prompt
    output_len: int  # max_tokens (ignore_eos: exactly this many)


@dataclass
class RequestResult:
    ok: bool = False
    status: str = "OK"  # gRPC status code name on failure
    prompt_len: int = 0
    output_tokens: int = 0
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)  # per-token gaps between messages

    @property
    def tpot_s(self) -> float | None:
        if not self.ok or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


# ---- targets -----------------------------------------------------------------------------
class GrpcTarget:
    """A Tandem server over gRPC."""

    def __init__(self, address: str):
        import grpc

        from protos.tandem.v1 import generation_pb2 as pb
        from protos.tandem.v1 import generation_pb2_grpc as pb_grpc
        from router.client import call_metadata

        self.grpc, self.pb = grpc, pb
        self.metadata = call_metadata()  # the API key from TANDEM_API_KEY, if set
        self.channel = grpc.aio.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 << 20)])
        self.stub = pb_grpc.GenerationStub(self.channel)

    async def vocab_size(self) -> int:
        return (await self.stub.GetModelInfo(self.pb.GetModelInfoRequest(), timeout=30,
                                             metadata=self.metadata)).vocab_size

    async def run(self, spec: RequestSpec, result: RequestResult, timeout: float) -> None:
        pb = self.pb
        req = pb.GenerateRequest(prompt_token_ids=spec.prompt_ids, sampling=pb.SamplingParams(
            max_tokens=spec.output_len, temperature=0, ignore_eos=True))
        try:
            messages = self.stub.Generate(req, timeout=timeout, metadata=self.metadata)
            await _consume(((len(r.token_ids), r.finish_reason) async for r in messages), result)
        except self.grpc.RpcError as exc:
            result.ok, result.status = False, exc.code().name

    async def close(self) -> None:
        await self.channel.close()


class InProcessTarget:
    """The engine in this process (``AsyncEngine``), for a baseline on the same workload."""

    def __init__(self, model: str, engine_options: dict):
        from services.engine import AsyncEngine, SamplingParams

        self.SamplingParams = SamplingParams
        self.engine = AsyncEngine.from_model(model, **engine_options)

    async def vocab_size(self) -> int:
        return self.engine.engine.model_config.vocab_size

    async def run(self, spec: RequestSpec, result: RequestResult, timeout: float) -> None:
        params = self.SamplingParams(max_tokens=spec.output_len, temperature=0, ignore_eos=True)
        try:
            stream = await self.engine.add_request_async(spec.prompt_ids, params)
            await _consume(((len(c.token_ids), c.finish_reason or "") async for c in stream), result)
        except Exception as exc:  # noqa: BLE001 - reported as an error status
            result.ok, result.status = False, type(exc).__name__

    async def close(self) -> None:
        self.engine.shutdown()


async def _consume(messages, result: RequestResult) -> None:
    start = last = time.perf_counter()
    async for n, finish in messages:
        now = time.perf_counter()
        if n and result.ttft_s is None:
            result.ttft_s = now - start
        elif n:
            result.itl_s.extend([(now - last) / n] * n)
        if n:
            last = now
        result.output_tokens += n
        if finish:
            result.e2e_s = now - start
    result.ok = result.e2e_s is not None and result.ttft_s is not None


# ---- load --------------------------------------------------------------------------------
def make_specs(args: argparse.Namespace, vocab: int) -> list[RequestSpec]:
    rng = random.Random(args.seed)
    r = args.random_range_ratio

    def length(n: int) -> int:
        return max(1, rng.randint(int(n * (1 - r)), int(n * (1 + r)))) if r > 0 else n

    specs = []
    for i in range(args.num_prompts):
        plen = length(args.input_len)
        specs.append(RequestSpec(prompts(1, plen, seed=args.seed + 1 + i, vocab=vocab)[0], length(args.output_len)))
    return specs


async def drive(target, specs: list[RequestSpec], args: argparse.Namespace) -> tuple[list[RequestResult], float]:
    """Send every spec (closed or open loop); return the results and the wall time."""
    results = [RequestResult(prompt_len=len(s.prompt_ids)) for s in specs]
    bar = tqdm(total=len(specs), desc="bench serve", unit="req", disable=args.no_progress)
    limit = asyncio.Semaphore(args.concurrency) if args.concurrency else None
    rng = random.Random(args.seed)

    async def one(i: int) -> None:
        if limit is not None:
            async with limit:
                await target.run(specs[i], results[i], args.timeout)
        else:
            await target.run(specs[i], results[i], args.timeout)
        bar.update(1)

    start = time.perf_counter()
    tasks = []
    for i in range(len(specs)):
        tasks.append(asyncio.create_task(one(i)))
        if args.request_rate and args.request_rate != float("inf"):
            await asyncio.sleep(rng.expovariate(args.request_rate))
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - start
    bar.close()
    return results, wall


def summarize(results: list[RequestResult], wall_s: float, args: argparse.Namespace) -> dict:
    ok = [r for r in results if r.ok]
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.status] = errors.get(r.status, 0) + 1
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)

    def pct(values):
        values = [v for v in values if v is not None]
        return {k: v * 1000 for k, v in percentiles(values).items()} if values else None

    from bench.sysperf import environment
    return {
        "target": args.address or f"inprocess:{args.inprocess}",
        "env": environment(),  # the machine this client ran on (also the engine's with --inprocess)
        "load": {"concurrency": args.concurrency, "request_rate": args.request_rate, "num_prompts": args.num_prompts,
                 "input_len": args.input_len, "output_len": args.output_len,
                 "random_range_ratio": args.random_range_ratio},
        "duration_s": wall_s, "completed": len(ok), "failed": len(results) - len(ok), "errors": errors,
        "request_throughput": len(ok) / wall_s, "output_tok_per_s": out_tokens / wall_s,
        "total_tok_per_s": (out_tokens + in_tokens) / wall_s,
        "ttft_ms": pct([r.ttft_s for r in ok]), "tpot_ms": pct([r.tpot_s for r in ok]),
        "itl_ms": pct([x for r in ok for x in r.itl_s]), "e2e_ms": pct([r.e2e_s for r in ok]),
    }


def print_table(s: dict) -> None:
    print(f"\n==== tandem bench serve: {s['target']} ====")
    if s.get("env"):
        env = s["env"]
        where = "engine and client" if s["target"].startswith("inprocess:") else "client"
        print(f"CPU ({where}): {env['cpu']} | torch {env['torch']}, {env['torch_threads']} threads")
    rows = [("completed / failed", f"{s['completed']} / {s['failed']}"),
            ("errors by status", ", ".join(f"{k}={v}" for k, v in s["errors"].items()) or "-"),
            ("duration (s)", f"{s['duration_s']:.2f}"),
            ("request throughput (req/s)", f"{s['request_throughput']:.2f}"),
            ("output throughput (tok/s)", f"{s['output_tok_per_s']:.1f}"),
            ("total throughput (tok/s)", f"{s['total_tok_per_s']:.1f}")]
    for w in rows:
        print(f"{w[0]:<30}{w[1]}")
    print(f"{'latency (ms)':<14}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}")
    for name in ("ttft", "tpot", "itl", "e2e"):
        p = s[f"{name}_ms"]
        if p:
            print(f"{name.upper():<14}{p['mean']:>10.2f}{p['p50']:>10.2f}{p['p90']:>10.2f}{p['p99']:>10.2f}")
    for key, (row, _) in ROUTER_HISTOGRAMS.items():
        d = s.get(key)
        if d:
            print(f"{row:<14}{d['mean']:>10.3f}{d['p50']:>10.3f}{d['p90']:>10.3f}{d['p99']:>10.3f}"
                  f"   ({d['count']} messages; from the router's buckets)")
        elif key in s:
            print(f"{row:<14}no token-carrying messages observed at --router-metrics")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="tandem bench serve", description=__doc__.splitlines()[0])
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--address", help="host:port of a Tandem router")
    where.add_argument("--inprocess", help="baseline, engine in this process: model folder, .gguf file, "
                       "model name (smollm2) or make_model shape")
    ap.add_argument("--num-prompts", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=32, help="requests in flight at most (0 = unlimited)")
    ap.add_argument("--request-rate", type=float, default=None, help="open loop: Poisson arrivals per second")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--random-range-ratio", type=float, default=0.0, help="lengths uniform in len*[1-r, 1+r]")
    ap.add_argument("--warmup", type=int, default=4, help="requests sent (and not measured) first")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=600.0, help="per-request deadline (s)")
    ap.add_argument("--kv-cache-memory-gb", type=float, default=1.0, help="in-process engine's KV pool")
    ap.add_argument("--router-metrics", metavar="URL",
                    help=f"router /metrics to read {TOKEN_DELAY} and {DWELL} from, e.g. "
                         "http://127.0.0.1:9464/metrics")
    ap.add_argument("--json", type=Path, help="write the summary here")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if not 0 <= args.random_range_ratio < 1:
        ap.error("--random-range-ratio must be in [0, 1)")
    if args.router_metrics and not args.address:
        ap.error("--router-metrics needs --address (the in-process engine has no router)")
    return args


async def run(args: argparse.Namespace) -> dict:
    if args.address:
        target = GrpcTarget(args.address)
    else:
        from bench.workload import resolve_model

        target = InProcessTarget(str(resolve_model(args.inprocess)),
                                 {"device": "cpu", "kv_cache_memory_gb": args.kv_cache_memory_gb})
    try:
        specs = make_specs(args, await target.vocab_size())
        if args.warmup:
            warm = argparse.Namespace(**{**vars(args), "no_progress": True, "request_rate": None})
            await drive(target, specs[:args.warmup], warm)
        names = [name for _, name in ROUTER_HISTOGRAMS.values()]
        before = scrape_histograms(args.router_metrics, names) if args.router_metrics else None
        results, wall = await drive(target, specs, args)
        after = scrape_histograms(args.router_metrics, names) if args.router_metrics else None
    finally:
        await target.close()
    summary = summarize(results, wall, args)
    if before is not None:
        for key, (_, name) in ROUTER_HISTOGRAMS.items():
            summary[key] = delay_summary(after[name].minus(before[name]))
    return summary


def main(argv: list[str] | None = None) -> int:
    import grpc

    args = parse_args(argv)
    try:
        summary = asyncio.run(run(args))
    except grpc.RpcError as exc:  # e.g. UNAUTHENTICATED: keys on and no (or a wrong) TANDEM_API_KEY
        print(f"tandem bench serve: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 2
    print_table(summary)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
        print(f"\nwrote {args.json}")
    return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

