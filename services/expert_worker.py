"""The ``ExpertWorker`` Ray Serve deployments: each hosts one shard of a MoE model's experts.

``experts: {backend: remote, deployment: NAME, num_shards: N}`` in a worker's engine config makes
router/app.py deploy ``NAME0 .. NAME{N-1}`` (this class under N names, each with its own
replicas, resources and autoscaling); shard s loads only its experts
(services/engine/model/expert_shard.py: positional reads of their byte ranges) and the engines'
MoE layers call it once per layer and step (services/expert_client.py).

- ``run(ExpertCall) -> ExpertReply``: the expert outputs of the call's rows, computed on one
  thread (calls from several engines queue there), so the event loop never waits for a GEMM.
- ``stats() -> ExpertWorkerStats``; ``pid()``; ``check_health``: a call must not be stuck.

A replica holds no per-request state: a replacement (Serve restarts a dead one) serves the next
call as the old one would have.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import time

import torch
from ray import serve

from services.config import ExpertWorkerConfig
from services.expert_service import ExpertService
from services.replica_bind import bind_replica_grpc_to_node_ip
from services.types import ExpertCall, ExpertReply, ExpertWorkerStats

STUCK_AFTER_S = 60.0  # a call running longer than this fails the health check


class ExpertWorker:
    """One ExpertWorker replica (module docstring)."""

    def __init__(self, config: ExpertWorkerConfig):
        bind_replica_grpc_to_node_ip()
        torch.set_num_threads(config.torch_threads or os.cpu_count() or 1)
        self.service = ExpertService.from_config(config, _replica_id())
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tandem-experts")
        self._started: float | None = None

    async def run(self, call: ExpertCall) -> ExpertReply:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._timed, call)

    async def stats(self) -> ExpertWorkerStats:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.service.snapshot)

    def pid(self) -> int:
        return os.getpid()

    def check_health(self) -> None:
        started = self._started
        if started is not None and time.monotonic() - started > STUCK_AFTER_S:
            raise RuntimeError(f"an expert call has run for over {STUCK_AFTER_S:.0f}s")

    def _timed(self, call: ExpertCall) -> ExpertReply:
        self._started = time.monotonic()
        try:
            return self.service.run(call)
        finally:
            self._started = None


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:
        return ""


ExpertWorkerDeployment = serve.deployment(ExpertWorker, name="ExpertWorker", max_ongoing_requests=1024,
                                          ray_actor_options={"num_cpus": 1}, health_check_period_s=2,
                                          health_check_timeout_s=10, graceful_shutdown_timeout_s=2)
