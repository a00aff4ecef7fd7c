"""The ``DraftWorker`` Ray Serve deployment: one draft model shared by many engines.

``speculative: {method: draft_model, model: PATH, deployment: NAME}`` in a worker's engine
config makes router/app.py deploy a ``DraftWorker`` named NAME next to the workers; their
engines' proposers (services/draft_client.py) call it once per engine step.

- ``propose(DraftCall, route=None) -> DraftReply``: apply the call's releases and context
  deltas, draft up to k tokens per sequence (services/draft_service.py, which runs the engine's
  ``DraftModelProposer``). Calls that arrive while a batch runs are drafted together in the next
  batch (one batched forward per draft position for all of them), on one thread, so the
  replica's event loop never waits for the model. Each reply names this replica's Ray actor.
- ``propose_now(call)``: the same for one call, blocking; what a plain actor call from a client
  runs (services/draft_direct.py: the cheap path that skips the Serve handle).
- ``release(DraftRelease, route=None)``: free finished sequences (batched by the clients).
- sequences that no call mentions for ``session_ttl_s`` (their engine died) are freed.
- ``stats() -> DraftWorkerStats``; ``check_health``: the batch thread must not be stuck.

``route`` is read by the request router (router/replica_router.py): a client's calls go to the
replica that holds its sequences.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import time

import torch
import ray
from ray import serve

from services.config import DraftWorkerConfig
from services.draft_service import DraftService
from services.replica_bind import bind_replica_grpc_to_node_ip
from services.types import DraftCall, DraftRelease, DraftReply, DraftWorkerStats, Route

STUCK_AFTER_S = 120.0  # a batch running longer than this fails the health check


class DraftWorker:
    """One DraftWorker replica (module docstring)."""

    def __init__(self, config: DraftWorkerConfig):
        bind_replica_grpc_to_node_ip()
        self.config = config
        torch.set_num_threads(config.torch_threads or os.cpu_count() or 1)
        self.service = DraftService.from_config(config, _replica_id())
        self.actor = _actor()  # (namespace, name) of this replica's Ray actor, named in every reply
        # one thread runs the handle calls' batches and releases in order; a direct call drafts on
        # the actor's thread. DraftService is not thread-safe: every use holds _service_lock
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tandem-draft")
        self._service_lock = threading.Lock()
        self._pending: list[tuple[DraftCall, asyncio.Future]] = []
        self._draining = False
        self._batch_started: float | None = None

    async def propose(self, call: DraftCall, route: Route | None = None) -> DraftReply:
        """Drafts for ``call``'s sequences (batched with the calls that arrive meanwhile)."""
        future = asyncio.get_running_loop().create_future()
        self._pending.append((call, future))
        if not self._draining:
            self._draining = True
            asyncio.create_task(self._drain())
        return await future

    def propose_now(self, call: DraftCall) -> DraftReply:
        """``propose`` without the Serve handle (services/draft_direct.py): drafted on the calling
        thread (no hand-over), one at a time with the batches of handle calls."""
        with self._service_lock:
            return self._timed_propose([call])[0]

    async def release(self, release: DraftRelease, route: Route | None = None) -> None:
        await self._run(self.service.release, release.client_id, list(release.seq_ids))

    async def stats(self) -> DraftWorkerStats:
        return await self._run(self.service.snapshot)

    def pid(self) -> int:
        return os.getpid()

    def check_health(self) -> None:
        started = self._batch_started
        if started is not None and time.monotonic() - started > STUCK_AFTER_S:
            raise RuntimeError(f"a draft batch has run for over {STUCK_AFTER_S:.0f}s")

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []  # a cancelled caller's deltas still apply
                try:
                    replies = await self._run(self._timed_propose, [c for c, _ in batch])
                except Exception as exc:
                    replies = [exc] * len(batch)
                for (_, f), reply in zip(batch, replies):
                    if f.done():
                        continue
                    if isinstance(reply, Exception):
                        f.set_exception(reply)
                    else:
                        f.set_result(reply)
        finally:
            self._draining = False

    def _timed_propose(self, calls: list[DraftCall]) -> list[DraftReply]:
        self._batch_started = time.monotonic()
        try:
            replies = self.service.propose(calls)
            for reply in replies:
                reply.actor = self.actor
            return replies
        finally:
            self._batch_started = None

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._locked, fn, *args)

    def _locked(self, fn, *args):
        with self._service_lock:
            return fn(*args)


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:
        return ""


def _actor() -> tuple[str, str]:
    try:
        ctx = ray.get_runtime_context()
        return ctx.namespace or "", ctx.get_actor_name() or ""
    except Exception:
        return "", ""


DraftWorkerDeployment = serve.deployment(DraftWorker, name="DraftWorker", max_ongoing_requests=1024,
                                         ray_actor_options={"num_cpus": 1}, health_check_period_s=5,
                                         health_check_timeout_s=30, graceful_shutdown_timeout_s=5)
