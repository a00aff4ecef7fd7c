"""Ray Serve deployments that host the engine: unified, prefill and decode workers.

All three are one class, ``EngineWorker``, deployed under three names so that each has its
own replicas and autoscaling config. The role decides which calls make sense:

- unified: ``generate`` (prompt -> stream of chunks), no KV transfer;
- prefill: ``prefill`` (prompt -> first token + ``KVHandle``, streamed; the KV is held until
  the caller closes the stream);
- decode:  ``decode`` (``DecodeCall`` -> stream of chunks from the second token on).

Leaving a stream early (the router cancels it on client cancel / deadline / abort) aborts
the engine request, which frees its blocks before the next engine step.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import ray
import torch
from ray import serve

from services import kv_transfer
from services.config import WorkerConfig
from services.draft_client import remote_proposers
from services.expert_client import ExpertCallLog, remote_expert_shards
from services.engine.gc_tuning import freeze_startup_objects
from services.engine.model.experts import ExpertsUnavailableError
from services.engine.plugins import HostDeps
from services.engine.scheduler import EngineOverloadedError
from services.routing_report import routing_stats
from services.prefix_store.tier import PrefixCacheTier
from services.replica_bind import bind_replica_grpc_to_node_ip
from services.serving_engine import ServingEngine
from services.stream_channel import ChannelHub
from services.telemetry import WorkerTelemetry, traced_stream
from services.types import (ChunkBatch, DecodeCall, GenerateCall, KVTransferError, ModelInfo, PrefillFailedError,
                            PrefillResult, Route, StreamChunk, WorkerStats)

log = logging.getLogger("tandem.worker")


@asynccontextmanager
async def _until(deadline: float | None):
    """Raise TimeoutError inside the block once the unix-time ``deadline`` passes."""
    if deadline is None:
        yield
        return
    async with asyncio.timeout(max(deadline - time.time(), 0.0)):
        yield


class EngineWorker:
    """One engine replica (see module docstring for the roles)."""

    def __init__(self, config: WorkerConfig, drafts: dict | None = None, experts: dict | None = None):
        bind_replica_grpc_to_node_ip()  # Serve's in-replica gRPC server: node IP, not all interfaces
        self.config = config
        # Ray sets OMP_NUM_THREADS to the actor's num_cpus (1): torch would use one core only.
        torch.set_num_threads(config.torch_threads or os.cpu_count() or 1)
        # what the engine's variants need from other deployments: DraftWorker handles by name
        # (``drafts``, bound by router/app.py) become proposers that call them (services/draft_client.py)
        # and ExpertWorker shard handles by name (``experts``) the transport of remote experts
        # (services/expert_client.py), whose calls ``expert_calls`` times
        self.expert_calls = ExpertCallLog()
        deps = HostDeps(proposers=remote_proposers(drafts or {}, _replica_id()),
                        expert_shards=remote_expert_shards(experts or {}, self.expert_calls))
        self.engine = ServingEngine.from_config(config.engine, deps)
        self.transfer = kv_transfer.create(config.kv_transfer, deps) if config.role != "unified" else None
        # the prefix cache's tiers: this engine's blocks, then Redis (services/prefix_store/tier.py)
        self.prefix_store = PrefixCacheTier.for_engine(self.engine, config.prefix_store if config.role != "decode"
                                                       else None)
        # spans from OTEL_*, /metrics (engine gauges and prefix store counters read at scrape time)
        self.telemetry = WorkerTelemetry.for_replica(config.role, config.model_id, _replica_id(), self.engine.stats,
                                                     lambda: _store_stats(self))
        self.transfer = self.telemetry.traced_transfer(self.transfer)
        self.telemetry.watch_expert_calls(self.expert_calls)  # latency histogram, span events
        self._open = 0
        self._sent = 0
        self._adopted = 0
        eng = self.engine.engine
        self.info = ModelInfo(model_id=config.model_id, max_model_len=eng.max_model_len,
                              vocab_size=eng.model_config.vocab_size,
                              eos_token_ids=tuple(sorted(eng.eos_token_ids)), block_size=eng.kv.block_size,
                              block_hash_seed=eng.kv.seed)
        self.channels = ChannelHub(_replica_id())  # the token channels to the routers (stream_channel.py)
        freeze_startup_objects()  # again: what the transfer, store and telemetry set up (gc_tuning.py)

    # ---- request paths -------------------------------------------------------------------
    @traced_stream("unified")
    async def generate(self, call: GenerateCall) -> AsyncIterator[StreamChunk]:
        """Unified role: the whole request in this engine (decode role too, for a migrated request:
        ``call.resume_token_ids`` recomputed here, no KV hand-off)."""
        self._open += 1
        try:
            # a migrated request recomputes prompt + the output its client has (the prefix cache applies)
            known = call.prompt_token_ids + call.resume_token_ids if call.resume_token_ids else call.prompt_token_ids
            async with _until(call.deadline), self.prefix_store.serving(call.request_id, known):
                stream = await self.engine.add_request_async(call.prompt_token_ids, call.params,
                                                             request_id=call.request_id, priority=call.priority,
                                                             resume_token_ids=call.resume_token_ids or None)
                async for chunk in stream:
                    yield StreamChunk.from_engine(chunk)
        finally:
            self._open -= 1

    @traced_stream("prefill")
    async def prefill(self, call: GenerateCall, route: Route | None = None) -> AsyncIterator[PrefillResult]:
        """Prefill role: compute the prompt, sample the first token, hand the KV to the backend.

        Streams one ``PrefillResult`` and then holds the KV until the caller closes the stream
        (the decode side adopted it, or the request ended) or ``kv_hold_s`` passes.
        """
        self._open += 1
        try:
            async with _until(call.deadline), self.prefix_store.serving(call.request_id, call.prompt_token_ids) as job:
                out = await self.engine.prefill(call.prompt_token_ids, call.params, call.request_id,
                                                call.priority)
                job.new_blocks = out.new_blocks  # written back when the block ends (never awaited)
        except (ValueError, EngineOverloadedError, asyncio.CancelledError, TimeoutError, ExpertsUnavailableError):
            raise
        except Exception as exc:
            raise PrefillFailedError(f"prefill of {call.request_id!r} failed: {type(exc).__name__}: {exc}") from exc
        finally:
            self._open -= 1
        handle = None
        if out.kv is not None:
            handle = self.transfer.send(out.kv, call.traceparent)
            self._sent += 1
        try:
            yield PrefillResult(call.request_id, StreamChunk.from_engine(out.chunk), handle)
            if handle is not None:
                await asyncio.sleep(self.config.kv_hold_s)
                log.warning("request %s: KV not adopted within %.0fs; released", call.request_id,
                            self.config.kv_hold_s)
        finally:
            if handle is not None:
                self.transfer.release(handle)

    @traced_stream("decode")
    async def decode(self, call: DecodeCall) -> AsyncIterator[StreamChunk]:
        """Decode role: fetch and adopt the KV, then stream from the second token on."""
        req = call.call
        self._open += 1
        try:
            async with _until(req.deadline):
                if self.transfer is None:
                    raise KVTransferError("decode called on a unified worker")
                payload = await self.transfer.fetch(call.kv)
                stream = await self.engine.adopt(
                    req.request_id, req.prompt_token_ids, req.params, call.first_token, payload,
                    first_logprobs=call.first_logprobs, priority=req.priority,
                    num_cached_tokens=call.num_cached_tokens, timeout_s=self.config.adopt_timeout_s)
                del payload  # the blocks are copied: drop our view of the transferred object
                self._adopted += 1
                async for chunk in stream:
                    yield StreamChunk.from_engine(chunk)
        finally:
            self._open -= 1

    # ---- the token channel (services/stream_channel.py) ----------------------------------
    async def submit(self, call: GenerateCall | DecodeCall, route: Route) -> None:
        """One request (unified: ``generate``; decode: ``decode``) whose chunks go to the router's
        channel; returns when the request ended. Cancelling the call aborts the request."""
        self.channels.check(route)
        if isinstance(call, DecodeCall):
            source, rid = self.decode(call), call.call.request_id
        else:
            source, rid = self.generate(call), call.request_id
        await self.channels.pump(route, rid, source)

    async def channel(self, route: Route) -> AsyncIterator[ChunkBatch]:
        """The long-lived stream of one router replica: a ``ChunkBatch`` per engine step."""
        async for batch in self.channels.stream(route):
            yield batch

    async def record_routing_stats(self) -> dict:
        """Serve calls this per ``request_routing_stats_period_s`` (services/routing_report.py);
        the step lock is waited for in a thread, not on the event loop that forwards tokens.
        A plain dict crosses Serve (``RoutingStats.as_dict``; the router reads ``from_dict``)."""
        stats = await asyncio.to_thread(routing_stats, self.engine, self.config.role != "decode")
        return stats.as_dict()

    # ---- admin ---------------------------------------------------------------------------
    def abort(self, request_id: str) -> bool:
        return self.engine.abort(request_id)

    def model_info(self) -> ModelInfo:
        return self.info

    def stats(self) -> WorkerStats:
        s = self.engine.stats()
        return WorkerStats(role=self.config.role, replica_id=_replica_id(),
                           node_id=ray.get_runtime_context().get_node_id() if ray.is_initialized() else "",
                           kv_blocks_total=s.kv_blocks_total, kv_blocks_free=s.kv_blocks_free,
                           num_running=s.num_running, num_waiting=s.num_waiting, num_open_streams=self._open,
                           num_kv_sent=self._sent, num_kv_adopted=self._adopted,
                           num_kv_held=self.transfer.num_held() if self.transfer is not None else 0,
                           metrics_address=self.telemetry.metrics_address)

    def check_health(self) -> None:
        """Serve health check: the engine thread must be alive."""
        if not self.engine.is_alive():
            raise RuntimeError("engine thread died")

    def __del__(self):
        try:
            self.engine.shutdown()
        except Exception:
            pass
        telemetry = getattr(self, "telemetry", None)
        if telemetry is not None:
            telemetry.shutdown()  # flushes buffered spans


def _store_stats(worker) -> dict | None:
    """The prefix store's counters (None without a store): read by /metrics at scrape time."""
    store = getattr(worker, "prefix_store", None)
    return store.stats() if store is not None else None


def _replica_id() -> str:
    """This Serve replica's id ("" outside Serve)."""
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:
        return ""


_DEFAULTS = dict(max_ongoing_requests=512, ray_actor_options={"num_cpus": 1},
                 health_check_period_s=5, health_check_timeout_s=30, graceful_shutdown_timeout_s=5)

UnifiedWorker = serve.deployment(EngineWorker, name="UnifiedWorker", **_DEFAULTS)
PrefillWorker = serve.deployment(EngineWorker, name="PrefillWorker", **_DEFAULTS)
DecodeWorker = serve.deployment(EngineWorker, name="DecodeWorker", **_DEFAULTS)
