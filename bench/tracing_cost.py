"""CPU cost of the tracing instrumentation per request, without Ray or a model.

    python -m bench.tracing_cost [--requests 2000] [--output-len 128] [--tokens-per-chunk 1]

Runs the real hooks of one request in one process — the router's ``RequestTelemetry``, the
prefill and decode workers' ``traced_stream`` wrappers and ``TracedTransfer`` — over fake
engine streams, once with tracing off (the API's no-op tracer) and once with the SDK
exporting every span (sampling 1.0, BatchSpanProcessor, OTLP/gRPC) to a receiver in another
process. The difference of this process's CPU time per request (span creation, attributes,
context propagation, batching and protobuf export included) is what tracing adds; compare
it with the CPU a request costs the cluster (cores x wall time / requests of a
``tandem bench serve`` run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time

import torch
from opentelemetry import trace

from services.engine.sampling_params import SamplingParams
from services.kv_transfer.base import KVPayload, KVTransfer
from services.telemetry import tracing
from services.telemetry.config import TracingConfig
from services.telemetry.metrics import Identity
from services.telemetry.router_telemetry import RouterTelemetry
from services.telemetry.worker_telemetry import WorkerTelemetry, traced_stream
from services.types import DecodeCall, GenerateCall, KVHandle, PrefillResult, StreamChunk


class _Transfer(KVTransfer):
    name = "fake"

    def send(self, payload, traceparent=""):
        return KVHandle("fake", payload.request_id, payload.num_tokens, 8, 16, "float32", (12, 2, 8, 16, 12, 64),
                        traceparent=traceparent)

    async def fetch(self, handle):
        return None

    def release(self, handle):
        pass

    def num_held(self):
        return 0


class _Worker:
    def __init__(self, role: str, tracer, output_len: int, per_chunk: int):
        self.telemetry = WorkerTelemetry(Identity("m", role, f"{role}-0"), tracer=tracer)
        self.transfer = self.telemetry.traced_transfer(_Transfer())
        self.output_len, self.per_chunk = output_len, per_chunk
        self.kv = KVPayload("r", torch.zeros(1, 2, 8, 16, 1, 1), 128)  # [L, 2, blocks, bs, H, D]

    @traced_stream("prefill")
    async def prefill(self, call):
        handle = self.transfer.send(self.kv, call.traceparent)
        yield PrefillResult(call.request_id, StreamChunk([1], num_cached_tokens=0, queue_time_s=0.001), handle)

    @traced_stream("decode")
    async def decode(self, call):
        await self.transfer.fetch(call.kv)
        n = 1
        while n < self.output_len:
            k = min(self.per_chunk, self.output_len - n)
            n += k
            yield StreamChunk([2] * k, num_output_tokens=n, queue_time_s=0.0 if n == 1 + k else None,
                              finish_reason="length" if n >= self.output_len else None)


async def _one(router: RouterTelemetry, prefill: _Worker, decode: _Worker, i: int, prompt: list[int]) -> None:
    obs = router.start([("traceparent", f"00-{i + 1:032x}-{i + 1:016x}-01")])
    call = GenerateCall(f"r{i}", prompt, SamplingParams(max_tokens=decode.output_len), traceparent=obs.traceparent)
    obs.dispatched(call)
    async for result in prefill.prefill(call):
        obs.on_chunk(result.first)
        async for chunk in decode.decode(DecodeCall(call, 1, None, result.kv, traceparent=call.traceparent)):
            obs.on_chunk(chunk)
    obs.end()


def run(tracer, args, flush=lambda: None) -> float:
    """CPU seconds of this process per request (``flush`` exports what is buffered, counted too)."""
    router = RouterTelemetry(Identity("m", "router", "r0"), tracer=tracer)
    prefill = _Worker("prefill", tracer, args.output_len, args.tokens_per_chunk)
    decode = _Worker("decode", tracer, args.output_len, args.tokens_per_chunk)
    prompt = list(range(args.input_len))

    async def main():
        for i in range(args.requests):
            await _one(router, prefill, decode, i, prompt)

    asyncio.run(main())  # warm up imports and caches
    flush()
    t0 = time.process_time()
    asyncio.run(main())
    flush()
    return (time.process_time() - t0) / args.requests


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--tokens-per-chunk", type=int, default=1, help="1 = a stream message per token (worst case)")
    args = p.parse_args(argv)
    off = run(trace.NoOpTracer(), args)
    receiver = subprocess.Popen([sys.executable, "-m", "bench.otlp_receiver", "--port", "0"],
                                stdout=subprocess.PIPE, text=True)
    endpoint = receiver.stdout.readline().split(" on ")[1].strip()
    try:
        provider = tracing.make_provider(TracingConfig(endpoint, ratio=1.0), {"service.instance.id": "bench"})
        on = run(provider.get_tracer("tandem"), args, flush=provider.force_flush)
        provider.shutdown()
    finally:
        receiver.terminate()
        out = receiver.communicate()[0]
    received = [int(line.split()[1]) for line in out.splitlines() if line.startswith("spans ")]
    report = {"requests": args.requests, "output_len": args.output_len, "tokens_per_chunk": args.tokens_per_chunk,
              "cpu_us_per_request_off": off * 1e6, "cpu_us_per_request_on": on * 1e6,
              "tracing_cpu_us_per_request": (on - off) * 1e6, "spans_received": received[-1] if received else None,
              "spans_sent": 2 * args.requests * 6}  # warm-up + measured run; 6 spans per request here
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
