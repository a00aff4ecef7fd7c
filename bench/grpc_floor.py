"""The floor of the router's token delay: what grpc.aio alone costs to hand one message per
stream to gRPC, with no Ray, no engine and no router code.

``tandem bench grpc-floor [--streams 1,8,32] [--steps 100] [--interval 0.15]``

A ``tandem.v1.Generation`` server in this process keeps S streams open (a client in a
child process reads them, on the same machine, as ``tandem bench serve`` does). Every
``interval`` seconds a "step" emits one token to every stream at once, as an engine step
does at concurrency S. Each stream's handler then builds its ``GenerateResponse`` and yields
it to gRPC; the delay of a message is the time from the step's emission to that hand-off,
the same two points that ``tandem_router_token_delay_seconds`` measures in the router
(engine emission stamp -> ``RequestTelemetry.handed_over``). The handlers do nothing else,
so the figures are a lower bound for the router's delay at the same concurrency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import sys
import time

import grpc

from bench.workload import percentiles
from protos.tandem.v1 import generation_pb2 as pb
from protos.tandem.v1 import generation_pb2_grpc as pb_grpc


class _StepServicer(pb_grpc.GenerationServicer):
    """Streams ``steps`` messages to each caller, one per emitted step; records hand-off delays."""

    def __init__(self, steps: int):
        self.steps = steps
        self.step = asyncio.Condition()
        self.step_no = 0
        self.emitted_at = 0.0
        self.streams = 0
        self.delays: list[list[float]] = [[] for _ in range(steps)]  # per step, one delay per stream

    async def Generate(self, request, context):
        self.streams += 1
        for i in range(self.steps):
            async with self.step:
                await self.step.wait_for(lambda: self.step_no > i)
            msg = pb.GenerateResponse(request_id=request.request_id, token_ids=[i], text=" tok")
            self.delays[i].append(time.perf_counter() - self.emitted_at)
            yield msg

    async def emit(self) -> None:
        async with self.step:
            self.emitted_at = time.perf_counter()
            self.step_no += 1
            self.step.notify_all()


def _client(address: str, streams: int) -> None:
    """Child process: open ``streams`` Generate calls and read them to the end."""

    async def run():
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.GenerationStub(channel)

            async def one(i: int):
                async for _ in stub.Generate(pb.GenerateRequest(request_id=str(i), prompt="x")):
                    pass

            await asyncio.gather(*(one(i) for i in range(streams)))

    asyncio.run(run())


async def measure(streams: int, steps: int, interval: float, warmup: int) -> dict:
    """One run at ``streams`` concurrent streams; delays of the steps after ``warmup``, in seconds."""
    servicer = _StepServicer(steps)
    server = grpc.aio.server()
    pb_grpc.add_GenerationServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    client = mp.get_context("spawn").Process(target=_client, args=(f"127.0.0.1:{port}", streams))
    client.start()
    try:
        while servicer.streams < streams:
            await asyncio.sleep(0.01)
        for _ in range(steps):
            await asyncio.sleep(interval)
            await servicer.emit()
        await asyncio.get_running_loop().run_in_executor(None, client.join, 30)
    finally:
        if client.is_alive():
            client.terminate()
        await server.stop(1)
    delays = [d for step in servicer.delays[warmup:] for d in step]
    return {"streams": streams, "messages": len(delays), "delay_s": percentiles(delays)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tandem bench grpc-floor", description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", default="1,8,32", help="comma-separated stream counts (one run each)")
    ap.add_argument("--steps", type=int, default=100, help="messages per stream")
    ap.add_argument("--interval", type=float, default=0.15, help="seconds between steps (an engine step)")
    ap.add_argument("--warmup", type=int, default=5, help="first steps left out of the figures")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    counts = [int(s) for s in args.streams.split(",")]
    if any(c < 1 for c in counts) or args.steps <= args.warmup or args.interval <= 0:
        ap.error("--streams must be >= 1, --steps > --warmup, --interval > 0")
    results = [asyncio.run(measure(c, args.steps, args.interval, args.warmup)) for c in counts]
    print("grpc.aio hand-off delay (step emission -> message yielded to gRPC), no router code")
    print(f"{'streams':>8} {'messages':>9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8}")
    for r in results:
        d = r["delay_s"]
        print(f"{r['streams']:>8} {r['messages']:>9} {d['p50'] * 1e3:>8.2f} {d['p90'] * 1e3:>8.2f} {d['p99'] * 1e3:>8.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"interval_s": args.interval, "steps": args.steps, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
