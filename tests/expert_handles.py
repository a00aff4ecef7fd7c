"""In-process stand-ins for ExpertWorker shard handles (tests of the protocol and the engine side
without Ray; the real deployments are tested over gRPC in tests/integration/test_expert_remote_serve.py)."""

from __future__ import annotations

import asyncio

from services.config import ExpertWorkerConfig
from services.engine import LLM
from services.engine.engine import LLMEngine
from services.engine.llm import build_engine_config
from services.engine.model.expert_backends.remote import shard_names
from services.engine.plugins import HostDeps
from services.expert_client import ExpertCallLog, remote_expert_shards
from services.expert_service import ExpertService
from tests.draft_handles import Method


class InProcessShard:
    """Stands in for one shard's Serve handle: awaitable ``run`` calls into an ExpertService."""

    def __init__(self, svc: ExpertService):
        self.svc = svc
        self.delay_s = 0.0
        self.error: Exception | None = None
        self.run = Method(self._run)

    async def _run(self, call):
        await asyncio.sleep(self.delay_s)
        if self.error is not None:
            raise self.error
        return self.svc.run(call)


def remote_llm(path: str, num_shards: int = 2, timeout_s: float = 10.0, **options):
    """An LLM whose MoE layers call ``num_shards`` in-process shards; returns (llm, shards, log)."""
    experts = {"backend": "remote", "num_shards": num_shards, "call_timeout_s": timeout_s}
    config = build_engine_config(path, device="cpu", experts=experts, **options)
    names = shard_names(config.experts.options)
    shards = [InProcessShard(ExpertService.from_config(ExpertWorkerConfig(n, s, config), f"r{s}"))
              for s, n in enumerate(names)]
    log = ExpertCallLog()
    deps = HostDeps(expert_shards=remote_expert_shards(dict(zip(names, shards)), log))
    llm = object.__new__(LLM)
    llm.engine = LLMEngine(config, deps)
    return llm, shards, log
