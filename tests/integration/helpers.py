"""Helpers of the integration tests: clusters from deploy/*.yaml, gRPC calls, worker stats."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

import grpc

from protos.tandem.v1 import admin_pb2, admin_pb2_grpc
from protos.tandem.v1 import generation_pb2 as pb
from protos.tandem.v1 import generation_pb2_grpc as pb_grpc

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
TINY_ENGINE = {"num_kv_blocks": 256, "block_size": 16, "max_num_seqs": 128}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def ray_head(**options):
    from router import launcher

    launcher.start_local_ray(num_cpus=16, **options)
    try:
        yield
    finally:
        launcher.shutdown()


@contextmanager
def serve_app(config_file: str, model: str, overrides: dict | None = None, deployments: dict | None = None):
    """Start Ray, deploy deploy/<config_file> with ``overrides`` (app args) and ``deployments``
    (per-deployment options) on a free port; yield the router address."""
    from router import launcher

    config = launcher.load_config(DEPLOY / config_file, model=model, port=free_port(), overrides=overrides,
                                  deployments=deployments)
    config["applications"][0]["logging_config"] = {"enable_access_log": False}  # quieter test output
    with ray_head():
        yield launcher.deploy(config)


@contextmanager
def environment(**values):
    """Set environment variables for the block (Ray's head and workers are started inside it)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def tandem_serve(model: str | None, port: int, log: Path, *extra: str, timeout_s: float = 180,
                 env: dict[str, str] | None = None):
    """Run ``tandem serve --config deploy/local.yaml`` as a child process (own session) until it
    prints "serving" (and the line after it); yield the process; kill its process group if it is
    still running at the end. ``model=None``: no --model (the default model). ``env``: the
    child's whole environment (default: this process's)."""
    import signal
    import subprocess
    import sys

    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "router.cli", "serve", "--config", str(DEPLOY / "local.yaml"),
                                 *(["--model", model] if model else []), "--port", str(port), *extra], stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        end = time.monotonic() + timeout_s
        while "  try: " not in log.read_text():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < end, "tandem serve did not come up"
            time.sleep(0.5)
        yield proc
    finally:
        if proc.poll() is None:
            from router.processes import descendants

            below = descendants(proc.pid) - {proc.pid}  # redis-server and Ray's daemons have their own sessions
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            for pid in below:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


# ---- gRPC helpers ------------------------------------------------------------------------
def request(prompt=None, ids=None, **sampling) -> pb.GenerateRequest:
    kw = {"sampling": pb.SamplingParams(**sampling)}
    if prompt is not None:
        kw["prompt"] = prompt
    if ids is not None:
        kw["prompt_token_ids"] = ids
    return pb.GenerateRequest(**kw)


async def collect(stub, req, timeout=None) -> list[pb.GenerateResponse]:
    return [r async for r in stub.Generate(req, timeout=timeout)]


def run_concurrently(address: str, requests: list[pb.GenerateRequest], timeout=120.0):
    """Send all requests at once; return the responses (or the RpcError) of each."""

    async def main():
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.GenerationStub(channel)
            return await asyncio.gather(*(collect(stub, r, timeout) for r in requests), return_exceptions=True)

    return asyncio.run(main())


def tokens(responses) -> list[int]:
    return [t for r in responses for t in r.token_ids]


def text(responses) -> str:
    return "".join(r.text for r in responses)


def worker_stats(address: str) -> list[admin_pb2.WorkerStats]:
    with grpc.insecure_channel(address) as channel:
        return list(admin_pb2_grpc.AdminStub(channel).GetWorkerStats(admin_pb2.GetWorkerStatsRequest(),
                                                                     timeout=30).workers)


def wait_all_free(address: str, timeout_s: float = 10.0) -> list[admin_pb2.WorkerStats]:
    """Until every worker reports its whole block pool free and no open request; returns the stats."""
    end = time.monotonic() + timeout_s
    while True:
        stats = worker_stats(address)
        if stats and all(s.kv_blocks_free == s.kv_blocks_total and s.num_running == 0 and s.num_waiting == 0
                         and s.num_open_streams == 0 and s.num_kv_held == 0 for s in stats):
            return stats
        if time.monotonic() > end:
            raise AssertionError(f"blocks still held after {timeout_s}s: {stats}")
        time.sleep(0.2)
