"""The engine's side of the ExpertWorker shards: an ``ExpertShards`` that calls their Serve handles.

``experts: {backend: remote, deployment: NAME, num_shards: N}`` in a worker's engine config makes
router/app.py deploy the shards ``NAME0 .. NAME{N-1}`` (services/expert_worker.py) and hand their
handles to ``EngineWorker``, which injects ``remote_expert_shards`` (``HostDeps.expert_shards``);
the engine's ``remote`` backend (services/engine/model/expert_backends/remote.py) then calls
``RemoteExpertShards.run`` once per MoE layer and step, from the engine thread.

``run`` sends one ``ExpertCall`` per shard that got rows, all at once, from a small event loop of
its own (thread ``tandem-expert-client``, never the replica's loop, which may wait for the step
lock), and waits for all of them at most ``call_timeout_s``: a shard that died, failed, or is
late makes the step raise ``ExpertsUnavailableError`` (its requests fail UNAVAILABLE); pending
calls are cancelled. The next step calls again: Serve sends it to a live replica, or queues it
until the replacement of a dead one is up.

Every call's latency (handle round trip, seconds) and outcome go to an ``ExpertCallLog``: the
worker's Prometheus histogram observes it, and its request traces read the totals (span events).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from services.draft_client import ClientLoop
from services.engine.model.expert_backends.remote import ExpertShards, RemoteOptions, ShardWork, shard_names
from services.engine.model.experts import ExpertsUnavailableError
from services.expert_service import dtype_name, from_array, to_array
from services.types import ExpertCall, ExpertReply


@dataclass(frozen=True)
class ExpertCallTotals:
    """The remote expert calls of one process since start."""

    num_calls: int = 0  # shard calls made
    num_failures: int = 0  # of those, failed or not answered in time
    seconds: float = 0.0  # summed latency of the answered ones
    max_seconds: float = 0.0  # the slowest answered one


class ExpertCallLog:
    """Totals of this process's shard calls, and observers of each (thread-safe: the client
    loop records, the replica's event loop and /metrics read)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._totals = ExpertCallTotals()
        self.observers: list[Callable[[int, float, bool], None]] = []  # (shard, seconds, ok)

    def record(self, shard: int, seconds: float, ok: bool) -> None:
        with self._lock:
            t = self._totals
            self._totals = ExpertCallTotals(t.num_calls + 1, t.num_failures + (not ok),
                                            t.seconds + seconds * ok, max(t.max_seconds, seconds * ok))
        for observe in list(self.observers):
            observe(shard, seconds, ok)

    def totals(self) -> ExpertCallTotals:
        with self._lock:
            return self._totals


class RemoteExpertShards(ExpertShards):
    """Calls the shards' handles (module docstring). ``handles[s]``: shard s's Serve handle
    (anything with ``run.remote(call)`` returning an awaitable ``ExpertReply``)."""

    def __init__(self, handles: list, options: RemoteOptions, log: ExpertCallLog | None = None,
                 loop: ClientLoop | None = None):
        self.handles = handles
        self.timeout_s = options.call_timeout_s
        self.log = log or ExpertCallLog()
        self.loop = loop or ClientLoop("tandem-expert-client")

    def run(self, work: list[ShardWork]) -> list[torch.Tensor]:
        if not work:
            return []
        calls = [ExpertCall(w.layer, list(w.experts), list(w.counts), to_array(w.x), dtype_name(w.x.dtype))
                 for w in work]
        future = self.loop.submit(self._gather(work, calls))
        try:
            replies = future.result(timeout=self.timeout_s + 1.0)  # the loop's own timeout fires first
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise ExpertsUnavailableError(f"expert shards did not answer within {self.timeout_s:g}s") from None
        return [self._output(w, c, r) for w, c, r in zip(work, calls, replies)]

    async def _gather(self, work: list[ShardWork], calls: list[ExpertCall]) -> list[ExpertReply]:
        tasks = [asyncio.ensure_future(self._one(w.shard, c)) for w, c in zip(work, calls)]
        try:
            return await asyncio.wait_for(asyncio.gather(*tasks), self.timeout_s)
        except asyncio.TimeoutError:
            late = [w.shard for w, t in zip(work, tasks) if not t.done()]
            raise ExpertsUnavailableError(f"expert shard(s) {late} did not answer within {self.timeout_s:g}s") \
                from None
        finally:
            for t in tasks:
                t.cancel()

    async def _one(self, shard: int, call: ExpertCall) -> ExpertReply:
        t0 = time.perf_counter()
        try:
            reply = await self.handles[shard].run.remote(call)
        except asyncio.CancelledError:
            self.log.record(shard, time.perf_counter() - t0, False)
            raise
        except Exception as exc:
            self.log.record(shard, time.perf_counter() - t0, False)
            raise ExpertsUnavailableError(f"expert shard {shard} failed: {type(exc).__name__}: "
                                          f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}") \
                from None
        self.log.record(shard, time.perf_counter() - t0, True)
        return reply

    def _output(self, work: ShardWork, call: ExpertCall, reply) -> torch.Tensor:
        if not isinstance(reply, ExpertReply) or not isinstance(reply.output, np.ndarray) \
                or reply.output.shape != call.hidden.shape:
            raise ExpertsUnavailableError(f"expert shard {work.shard} answered with the wrong shape")
        try:
            return from_array(reply.output, call.dtype, "output")
        except ValueError as exc:
            raise ExpertsUnavailableError(f"expert shard {work.shard}: {exc}") from None


def remote_expert_shards(handles: Mapping[str, object], log: ExpertCallLog | None = None
                         ) -> dict[str, Callable[[RemoteOptions], RemoteExpertShards]]:
    """``HostDeps.expert_shards`` for ExpertWorker shard deployments by name (``handles``): keyed
    by the ``deployment`` the ``experts`` section names, building the transport to its shards."""
    log = log or ExpertCallLog()
    prefixes = {name.rstrip("0123456789") for name in handles}

    def build(options: RemoteOptions) -> RemoteExpertShards:
        names = shard_names(options)
        missing = [n for n in names if n not in handles]
        if missing:
            raise ValueError(f"experts.num_shards: no handle for shard deployment(s) {missing}")
        return RemoteExpertShards([handles[n] for n in names], options, log)

    return {prefix: build for prefix in prefixes}
